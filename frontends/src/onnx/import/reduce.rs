//! Reductions and the operators built on them: `Reduce*` (axes as an
//! attribute before opset 18 — 13 for `ReduceSum` — and as an input after),
//! `Softmax`/`LogSoftmax` (the opset-13 per-axis definition, and the older
//! coerce-to-2D one), `ArgMax`/`ArgMin` (with `select_last_index`), `CumSum`
//! and `TopK`.
//!
//! `TopK` has no IR op; it is lowered to comparisons: each element's rank is
//! the number of elements that beat it (larger, or equal at a lower index,
//! so ties keep index order as ONNX requires), and output position p takes
//! the element of rank p. This costs n^2 comparisons per row, which suits
//! the small `k`-of-`n` selections transformer graphs make (MoE routing).

use super::{Importer, Node, Outs, Val, R};
use smelt_ir::{DType, Dim, Op, ValueId};

fn one(v: Val) -> R<Outs> {
    Ok(vec![Some(v)])
}

fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// `Softmax` / `LogSoftmax`.
pub(crate) fn softmax(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let rank = cx.b.rank(x.id);
    let log = n.op_type() == "LogSoftmax";
    if n.opset < 13 {
        // Before opset 13 the input is coerced to 2-D at `axis` and the
        // softmax runs over the whole second dimension.
        let axis = norm_axis(n.int("axis", 1)?, rank)?;
        let shape = cx.b.shape(x.id);
        let rows = Dim::product(&shape[..axis]);
        let cols = Dim::product(&shape[axis..]);
        let flat = cx.b.reshape(x.id, vec![rows, cols])?;
        let y = softmax_axis(cx, flat, 1, log)?;
        let id = cx.b.reshape(y, shape)?;
        return one(cx.same(x, id));
    }
    let axis = norm_axis(n.int("axis", -1)?, rank)? as i64;
    let id = softmax_axis(cx, x.id, axis, log)?;
    one(cx.same(x, id))
}

fn softmax_axis(cx: &mut Importer, x: ValueId, axis: i64, log: bool) -> R<ValueId> {
    if !log {
        return cx.b.add(Op::Softmax { axis }, &[x]);
    }
    // x - max - log(sum(exp(x - max))): finite wherever the result is.
    let b = &mut cx.b;
    let m = b.add(Op::ReduceMax { axes: vec![axis], keepdims: true }, &[x])?;
    let s = b.binary(Op::Sub {}, x, m)?;
    let e = b.unary(Op::Exp {}, s)?;
    let sum = b.add(Op::ReduceSum { axes: vec![axis], keepdims: true }, &[e])?;
    let l = b.unary(Op::Log {}, sum)?;
    b.binary(Op::Sub {}, s, l)
}

/// The axes of a reduction: the `axes` input when present (opset 18+, 13+
/// for `ReduceSum`), else the attribute. `None` means "no axes given".
fn reduce_axes(cx: &Importer, n: &Node) -> R<Option<Vec<i64>>> {
    if let Some(a) = n.opt(1) {
        let v = cx.ints(a, "the axes input")?;
        return Ok(Some(v));
    }
    n.ints("axes")
}

/// Every `Reduce*` operator.
pub(crate) fn reduce(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let rank = cx.b.rank(x.id);
    let keepdims = n.int("keepdims", 1)? != 0;
    let axes = match reduce_axes(cx, n)? {
        Some(a) if !a.is_empty() => a,
        _ if n.int("noop_with_empty_axes", 0)? != 0 => return one(x),
        _ => (0..rank as i64).collect(),
    };
    let mut axes: Vec<i64> = axes.iter().map(|&a| norm_axis(a, rank).map(|a| a as i64)).collect::<R<_>>()?;
    axes.sort_unstable();
    axes.dedup();
    let red = |op: &str, axes: Vec<i64>| -> Op {
        match op {
            "sum" => Op::ReduceSum { axes, keepdims },
            "mean" => Op::ReduceMean { axes, keepdims },
            "max" => Op::ReduceMax { axes, keepdims },
            "min" => Op::ReduceMin { axes, keepdims },
            _ => Op::ReduceProd { axes, keepdims },
        }
    };
    // Booleans (ReduceMax/Min from opset 20) reduce as 0/1 integers.
    let is_bool = cx.b.dtype(x.id) == DType::Bool;
    let xi = if is_bool { cx.b.cast(x.id, DType::U8)? } else { x.id };
    let b = &mut cx.b;
    let id = match n.op_type() {
        "ReduceSum" => b.add(red("sum", axes), &[xi])?,
        "ReduceMean" => b.add(red("mean", axes), &[xi])?,
        "ReduceMax" => b.add(red("max", axes), &[xi])?,
        "ReduceMin" => b.add(red("min", axes), &[xi])?,
        "ReduceProd" => b.add(red("prod", axes), &[xi])?,
        "ReduceL1" => {
            let a = b.unary(Op::Abs {}, xi)?;
            b.add(red("sum", axes), &[a])?
        }
        "ReduceL2" => {
            let sq = b.binary(Op::Mul {}, xi, xi)?;
            let s = b.add(red("sum", axes), &[sq])?;
            b.unary(Op::Sqrt {}, s)?
        }
        "ReduceSumSquare" => {
            let sq = b.binary(Op::Mul {}, xi, xi)?;
            b.add(red("sum", axes), &[sq])?
        }
        "ReduceLogSum" => {
            let s = b.add(red("sum", axes), &[xi])?;
            b.unary(Op::Log {}, s)?
        }
        "ReduceLogSumExp" => {
            let e = b.unary(Op::Exp {}, xi)?;
            let s = b.add(red("sum", axes), &[e])?;
            b.unary(Op::Log {}, s)?
        }
        other => return Err(format!("{other} is not a reduction")),
    };
    let id = if is_bool { cx.b.cast(id, DType::Bool)? } else { id };
    let v = cx.same(x, id);
    one(cx.wrap(v)?)
}

/// `ArgMax` / `ArgMin`.
pub(crate) fn arg(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let rank = cx.b.rank(x.id);
    let axis = norm_axis(n.int("axis", 0)?, rank)?;
    let keepdims = n.int("keepdims", 1)? != 0;
    let last = n.int("select_last_index", 0)? != 0;
    let b = &mut cx.b;
    let mut xi = if b.dtype(x.id) == DType::Bool { b.cast(x.id, DType::U8)? } else { x.id };
    if n.op_type() == "ArgMin" {
        // The first minimum of x is the first maximum of -x. Unsigned
        // integers are negated in a wider type so no value wraps.
        if !b.dtype(xi).is_float() {
            xi = b.cast(xi, DType::I64)?;
        }
        xi = b.unary(Op::Neg {}, xi)?;
    }
    let dim = b.shape(xi)[axis].clone();
    if last {
        // The last extremum is the first one of the reversed axis.
        xi = b.add(
            Op::Slice {
                axes: vec![axis as i64],
                starts: vec![dim.clone() - Dim::c(1)],
                ends: vec![Dim::c(-1)],
                steps: vec![-1],
            },
            &[xi],
        )?;
    }
    let mut id = b.add(Op::ArgMax { axis: axis as i64, keepdims }, &[xi])?;
    if last {
        let top = b.materialize(&super::shape::ShapeValue::scalar(dim - Dim::c(1)), DType::I64)?;
        id = b.binary(Op::Sub {}, top, id)?;
    }
    one(cx.val(id))
}

/// `CumSum(x, axis)` with `exclusive` and `reverse`.
pub(crate) fn cumsum(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let axis = cx.ints(n.input(1)?, "the axis input")?;
    let axis = *axis.first().ok_or("the axis input is empty")?;
    let id = cx.b.add(
        Op::CumSum { axis, exclusive: n.int("exclusive", 0)? != 0, reverse: n.int("reverse", 0)? != 0 },
        &[x.id],
    )?;
    let v = cx.same(x, id);
    one(cx.wrap(v)?)
}

/// `TopK(x, k)`: values and indices of the k largest (or smallest) along an
/// axis, sorted, ties in index order.
pub(crate) fn top_k(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let k = cx.ints(n.input(1)?, "k")?;
    let k = *k.first().ok_or("k is empty")?;
    let rank = cx.b.rank(x.id);
    let axis = norm_axis(n.int("axis", -1)?, rank)?;
    let largest = n.int("largest", 1)? != 0;
    let b = &mut cx.b;
    // Move the axis last.
    let mut perm: Vec<i64> = (0..rank as i64).filter(|&a| a != axis as i64).collect();
    perm.push(axis as i64);
    let mut inv = vec![0i64; rank];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    let xt = b.transpose(x.id, perm)?;
    let len = b.shape(xt)[rank - 1].clone();
    let xc = if b.dtype(xt) == DType::Bool { b.cast(xt, DType::U8)? } else { xt };
    let xi = b.unsqueeze(xc, vec![-1])?; // [..., n, 1]: the element ranked
    let xj = b.unsqueeze(xc, vec![-2])?; // [..., 1, n]: its competitors
    let beats = if largest { b.binary(Op::Gt {}, xj, xi)? } else { b.binary(Op::Lt {}, xj, xi)? };
    let ties = b.binary(Op::Eq {}, xj, xi)?;
    let iota = b.add(Op::Range { start: Dim::c(0), end: len.clone(), step: 1, dtype: DType::I64 }, &[])?;
    let col = b.unsqueeze(iota, vec![0])?; // j
    let row = b.unsqueeze(iota, vec![1])?; // i
    let earlier = b.binary(Op::Lt {}, col, row)?;
    let tie_wins = b.binary(Op::And {}, ties, earlier)?;
    let wins = b.binary(Op::Or {}, beats, tie_wins)?;
    let wins = b.cast(wins, DType::I64)?;
    let ranks = b.add(Op::ReduceSum { axes: vec![-1], keepdims: false }, &[wins])?; // [..., n]
    let ranks = b.unsqueeze(ranks, vec![-2])?; // [..., 1, n]
    let pos = b.add(Op::Range { start: Dim::c(0), end: Dim::c(k), step: 1, dtype: DType::I64 }, &[])?;
    let pos = b.unsqueeze(pos, vec![1])?; // [k, 1]
    let hit = b.binary(Op::Eq {}, ranks, pos)?; // [..., k, n]
    let hit = b.cast(hit, DType::I64)?;
    let weighted = b.binary(Op::Mul {}, hit, iota)?;
    let idx = b.add(Op::ReduceSum { axes: vec![-1], keepdims: false }, &[weighted])?; // [..., k]
    let vals = b.add(Op::GatherElements { axis: -1 }, &[xt, idx])?;
    let vals = b.transpose(vals, inv.clone())?;
    let idx = b.transpose(idx, inv)?;
    Ok(vec![Some(cx.same(x, vals)), Some(cx.val(idx))])
}
