//! Movement operators: `Reshape` (with ONNX's 0 and -1), `Flatten`,
//! `Transpose`, `Squeeze`/`Unsqueeze`/`Split` (axes and sizes as attributes
//! before opset 13, as inputs after), `Concat`, `Slice` (ONNX clamping of
//! starts and ends, also against symbolic dims), `Expand`, `Tile`,
//! `Gather`, `GatherElements`, `GatherND`, `ScatterElements`, `ScatterND`
//! and `Trilu`.
//!
//! Shape operands (reshape targets, slice bounds, expand shapes, repeats)
//! must be known at import: constants or shape values the builder derived
//! from the inputs' symbolic shapes. `Tile` and `GatherND` have no IR op and
//! are lowered to reshape/expand and to a flattened `gather` respectively.

use super::shape::{compare, ShapeValue};
use super::{Importer, Node, Outs, Val, NOT_STATIC, R};
use smelt_ir::{DType, Dim, Op, ValueId};
use std::cmp::Ordering;

fn one(v: Val) -> R<Outs> {
    Ok(vec![Some(v)])
}

fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// Divides `num` by `den` exactly, cancelling equal factors first
/// (`batch*seq*64 / (batch*4)` = `16*seq`).
fn exact_div(num: &[Dim], den: &[Dim]) -> Option<Dim> {
    let mut num: Vec<Dim> = num.to_vec();
    let mut rest = Vec::new();
    for d in den {
        if let Some(p) = num.iter().position(|x| x == d) {
            num.remove(p);
        } else {
            rest.push(d.clone());
        }
    }
    let n = Dim::product(&num);
    let dd = Dim::product(&rest);
    if let Some(k) = dd.as_const() {
        if k <= 0 {
            return None;
        }
        let q = n.floor_div(k);
        return (q.clone() * Dim::c(k) == n).then_some(q);
    }
    None
}

/// The dims of a reshape target with ONNX's 0 (copy the input dim, unless
/// `allowzero`) and -1 (infer) resolved.
pub(crate) fn reshape_dims(input: &[Dim], target: &[Dim], allowzero: bool) -> R<Vec<Dim>> {
    let mut out: Vec<Option<Dim>> = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, t) in target.iter().enumerate() {
        match t.as_const() {
            Some(0) if !allowzero => {
                let d = input
                    .get(i)
                    .ok_or_else(|| format!("target dim {i} is 0 (copy) but the input has rank {}", input.len()))?;
                out.push(Some(d.clone()));
            }
            Some(-1) => {
                if infer.replace(i).is_some() {
                    return Err("the target shape has two -1 dims".into());
                }
                out.push(None);
            }
            Some(c) if c < -1 => return Err(format!("target dim {c} is negative")),
            _ => out.push(Some(t.clone())),
        }
    }
    if let Some(i) = infer {
        let known: Vec<Dim> = out.iter().flatten().cloned().collect();
        let q = exact_div(input, &known).ok_or_else(|| {
            format!(
                "cannot infer the -1 dim: {} elements do not divide by {}",
                Dim::product(input),
                Dim::product(&known)
            )
        })?;
        out[i] = Some(q);
    }
    Ok(out.into_iter().flatten().collect())
}

pub(crate) fn reshape(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let target = cx.size_dims(n.input(1)?, "the target shape")?;
    let dims = reshape_dims(&cx.b.shape(x.id), &target, n.int("allowzero", 0)? != 0)?;
    let id = cx.b.reshape(x.id, dims)?;
    one(cx.same(x, id))
}

pub(crate) fn flatten(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let shape = cx.b.shape(x.id);
    let rank = shape.len() as i64;
    let mut axis = n.int("axis", 1)?;
    if axis < 0 {
        axis += rank;
    }
    if axis < 0 || axis > rank {
        return Err(format!("axis {} is out of range for rank {rank}", n.int("axis", 1)?));
    }
    let a = axis as usize;
    let dims = vec![Dim::product(&shape[..a]), Dim::product(&shape[a..])];
    let id = cx.b.reshape(x.id, dims)?;
    one(cx.same(x, id))
}

pub(crate) fn transpose(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let rank = cx.b.rank(x.id) as i64;
    let perm = n.ints("perm")?.unwrap_or_else(|| (0..rank).rev().collect());
    let id = cx.b.transpose(x.id, perm)?;
    one(cx.same(x, id))
}

/// Axes from the `axes` input (opset 13+) or attribute.
fn axes_of(cx: &Importer, n: &Node, input: usize) -> R<Option<Vec<i64>>> {
    if let Some(a) = n.opt(input) {
        return cx.ints(a, "the axes input").map(Some);
    }
    n.ints("axes")
}

pub(crate) fn squeeze(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let shape = cx.b.shape(x.id);
    let axes: Vec<i64> = match axes_of(cx, n, 1)? {
        Some(a) => a.iter().map(|&a| norm_axis(a, shape.len()).map(|a| a as i64)).collect::<R<_>>()?,
        None => {
            // All axes of size 1; a symbolic dim is never assumed to be 1.
            shape.iter().enumerate().filter(|(_, d)| d.as_const() == Some(1)).map(|(i, _)| i as i64).collect()
        }
    };
    if axes.is_empty() {
        return one(x);
    }
    let id = cx.b.add(Op::Squeeze { axes }, &[x.id])?;
    one(cx.same(x, id))
}

pub(crate) fn unsqueeze(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let axes = axes_of(cx, n, 1)?.ok_or("needs axes")?;
    let rank = cx.b.rank(x.id) + axes.len();
    let mut axes: Vec<i64> = axes.iter().map(|&a| norm_axis(a, rank).map(|a| a as i64)).collect::<R<_>>()?;
    axes.sort_unstable();
    let id = cx.b.unsqueeze(x.id, axes)?;
    one(cx.same(x, id))
}

pub(crate) fn concat(cx: &mut Importer, n: &Node) -> R<Outs> {
    let ins: Vec<Val> = n.ins.iter().flatten().copied().collect();
    let first = *ins.first().ok_or("needs at least one input")?;
    let axis = n.attrs.require_int("axis").map_err(|e| e.to_string())?;
    let rank = cx.b.rank(first.id);
    let axis = norm_axis(axis, rank)? as i64;
    let ids: Vec<ValueId> = ins.iter().map(|v| v.id).collect();
    if ids.len() == 1 {
        return one(first);
    }
    let id = cx.b.add(Op::Concat { axis }, &ids)?;
    one(cx.same(first, id))
}

pub(crate) fn split(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let shape = cx.b.shape(x.id);
    let axis = norm_axis(n.int("axis", 0)?, shape.len())?;
    let dim = shape[axis].clone();
    let outs = n.proto.output.len();
    let sizes: Vec<Dim> = if let Some(s) = n.opt(1) {
        cx.size_dims(s, "the split sizes")?
    } else if let Some(s) = n.ints("split")? {
        s.into_iter().map(Dim::c).collect()
    } else {
        let k = n.int_opt("num_outputs")?.unwrap_or(outs as i64);
        if k <= 0 {
            return Err(format!("cannot split into {k} parts"));
        }
        // Equal parts; with `num_outputs` the last may be smaller.
        let chunk = dim.ceil_div(k);
        let mut v = vec![chunk.clone(); k as usize];
        if let Some(last) = v.last_mut() {
            *last = dim.clone() - chunk * Dim::c(k - 1);
        }
        v
    };
    if sizes.len() != outs {
        return Err(format!("{} split sizes for {outs} outputs", sizes.len()));
    }
    let mut start = Dim::c(0);
    let mut res = Vec::with_capacity(outs);
    for s in sizes {
        let end = start.clone() + s;
        let id = cx.b.slice(x.id, axis, start.clone(), end.clone())?;
        res.push(Some(cx.same(x, id)));
        start = end;
    }
    Ok(res)
}

/// Values at least this large mean "to the end" in slice bounds (exporters
/// write INT_MAX or INT64_MAX).
const HUGE: i64 = 1 << 40;

/// An ONNX slice bound resolved against a dim: negative counts from the end,
/// then clamped to `[lo, dim + hi_off]`. Symbolic bounds and dims are
/// clamped where the symbols' bounds decide it and assumed in range otherwise.
fn clamp_bound(cx: &Importer, v: &Dim, dim: &Dim, lo: i64, hi_off: i64) -> Dim {
    let bounds = cx.b.g.symbols();
    let v = match v.as_const() {
        Some(c) if c >= HUGE => return dim.clone() + Dim::c(hi_off),
        Some(c) if c <= -HUGE => return Dim::c(lo),
        Some(c) if c < 0 => dim.clone() + Dim::c(c),
        _ => v.clone(),
    };
    let hi = dim.clone() + Dim::c(hi_off);
    let v = match compare(&v, &Dim::c(lo), bounds) {
        Some(Ordering::Less) => Dim::c(lo),
        _ => v,
    };
    match compare(&v, &hi, bounds) {
        Some(Ordering::Greater) => hi,
        _ => v,
    }
}

pub(crate) fn slice(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let shape = cx.b.shape(x.id);
    let rank = shape.len();
    let starts = cx.dims(n.input(1)?, "the slice starts")?;
    let ends = cx.dims(n.input(2)?, "the slice ends")?;
    let axes: Vec<i64> = match n.opt(3) {
        Some(a) => cx.ints(a, "the slice axes")?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps: Vec<i64> = match n.opt(4) {
        Some(s) => cx.ints(s, "the slice steps")?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps have different lengths".into());
    }
    let (mut ax, mut ss, mut es, mut st) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..starts.len() {
        let a = norm_axis(axes[i], rank)?;
        let step = steps[i];
        if step == 0 {
            return Err("a slice step is 0".into());
        }
        let dim = &shape[a];
        let (s, e) = if step > 0 {
            (clamp_bound(cx, &starts[i], dim, 0, 0), clamp_bound(cx, &ends[i], dim, 0, 0))
        } else {
            (clamp_bound(cx, &starts[i], dim, 0, -1), clamp_bound(cx, &ends[i], dim, -1, -1))
        };
        // A whole-axis slice is no slice.
        if step == 1 && s.as_const() == Some(0) && &e == dim {
            continue;
        }
        ax.push(a as i64);
        ss.push(s);
        es.push(e);
        st.push(step);
    }
    if ax.is_empty() {
        return one(x);
    }
    let id = cx.b.add(Op::Slice { axes: ax, starts: ss, ends: es, steps: st }, &[x.id])?;
    one(cx.same(x, id))
}

pub(crate) fn expand(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let target = cx.size_dims(n.input(1)?, "the expand shape")?;
    // ONNX broadcasts both ways: the IR's expand does the same (a 1 in the
    // target keeps the input's dim).
    let id = cx.b.add(Op::Expand { shape: target }, &[x.id])?;
    let id = if cx.b.shape(id) == cx.b.shape(x.id) { x.id } else { id };
    one(cx.same(x, id))
}

/// `Tile`: each axis repeated `r` times, as reshape [1, d] -> expand [r, d]
/// -> reshape [r*d] on interleaved axes.
pub(crate) fn tile(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let reps = cx.size_dims(n.input(1)?, "the repeats")?;
    let shape = cx.b.shape(x.id);
    if reps.len() != shape.len() {
        return Err(format!("{} repeats for rank {}", reps.len(), shape.len()));
    }
    if reps.iter().all(|r| r.as_const() == Some(1)) {
        return one(x);
    }
    let mut inter = Vec::new();
    let mut big = Vec::new();
    let mut fin = Vec::new();
    let consts = shape.iter().chain(&reps).filter_map(Dim::as_const);
    if !super::small_product(consts) {
        return Err("the tiled tensor would be too large".into());
    }
    for (d, r) in shape.iter().zip(&reps) {
        inter.extend([Dim::c(1), d.clone()]);
        big.extend([r.clone(), d.clone()]);
        fin.push(r.clone() * d.clone());
    }
    let b = &mut cx.b;
    let a = b.reshape(x.id, inter)?;
    let e = b.expand(a, big)?;
    let id = b.reshape(e, fin)?;
    one(cx.same(x, id))
}

pub(crate) fn gather(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (data, idx) = (n.input(0)?, n.input(1)?);
    let rank = cx.b.rank(data.id);
    let axis = norm_axis(n.int("axis", 0)?, rank)? as i64;
    let id = cx.b.add(Op::Gather { axis }, &[data.id, idx.id])?;
    one(cx.same(data, id))
}

pub(crate) fn gather_elements(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (data, idx) = (n.input(0)?, n.input(1)?);
    let rank = cx.b.rank(data.id);
    let axis = norm_axis(n.int("axis", 0)?, rank)? as i64;
    let id = cx.b.add(Op::GatherElements { axis }, &[data.id, idx.id])?;
    one(cx.same(data, id))
}

/// A dim as a runtime i64 scalar (a constant when it is one).
fn dim_scalar(cx: &mut Importer, d: &Dim) -> R<ValueId> {
    cx.b.materialize(&ShapeValue::scalar(d.clone()), DType::I64)
}

/// `GatherND`: the index tuples are turned into linear indices into data
/// flattened over the batch and indexed axes, then one `gather` on axis 0.
/// The linear index into `dims` (row-major) of each index tuple in the last
/// axis of `idx` (negative entries count from the end); `None` for
/// zero-length tuples.
fn linear_index(cx: &mut Importer, idx: ValueId, dims: &[Dim]) -> R<Option<ValueId>> {
    let last = cx.b.rank(idx) - 1;
    let ii = cx.b.cast(idx, DType::I64)?;
    let zero = cx.b.scalar(DType::I64, 0.0);
    let mut lin: Option<ValueId> = None;
    for (j, dim) in dims.iter().enumerate() {
        let c = cx.b.slice(ii, last, Dim::c(j as i64), Dim::c(j as i64 + 1))?;
        let c = cx.b.add(Op::Squeeze { axes: vec![last as i64] }, &[c])?;
        let dv = dim_scalar(cx, dim)?;
        let neg = cx.b.binary(Op::Lt {}, c, zero)?;
        let shifted = cx.b.binary(Op::Add {}, c, dv)?;
        let c = cx.b.add(Op::Where {}, &[neg, shifted, c])?;
        lin = Some(match lin {
            None => c,
            Some(l) => {
                let s = cx.b.binary(Op::Mul {}, l, dv)?;
                cx.b.binary(Op::Add {}, s, c)?
            }
        });
    }
    Ok(lin)
}

pub(crate) fn gather_nd(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (data, idx) = (n.input(0)?, n.input(1)?);
    let bd = usize::try_from(n.int("batch_dims", 0)?).map_err(|_| "batch_dims is negative")?;
    let dshape = cx.b.shape(data.id);
    let ishape = cx.b.shape(idx.id);
    let k = ishape.last().and_then(Dim::as_const).ok_or("the last dim of indices must be a constant")?;
    let k = usize::try_from(k).map_err(|_| "the last dim of indices is negative")?;
    if ishape.len() < bd + 1 || dshape.len() < bd + k {
        return Err(format!(
            "indices of rank {} (tuples of {k}) with batch_dims {bd} do not address data of rank {}",
            ishape.len(),
            dshape.len()
        ));
    }
    let mid = ishape.len() - 1 - bd; // index dims after the batch dims
    let lin = linear_index(cx, idx.id, &dshape[bd..bd + k])?;
    let inner = Dim::product(&dshape[bd..bd + k]);
    let mut lin = match lin {
        Some(l) => l,
        None => {
            // k == 0 takes whole slices: index 0 of a size-1 axis.
            let mut s = ishape[..ishape.len() - 1].to_vec();
            s.shrink_to_fit();
            cx.b.add(Op::Fill { shape: s, value: 0.0, dtype: DType::I64 }, &[])?
        }
    };
    if bd > 0 {
        // Offset every tuple by its batch position times the indexed size.
        let batch = Dim::product(&dshape[..bd]);
        let iota = cx.b.add(Op::Range { start: Dim::c(0), end: batch, step: 1, dtype: DType::I64 }, &[])?;
        let mut bshape = dshape[..bd].to_vec();
        bshape.extend(std::iter::repeat_n(Dim::c(1), mid));
        let iota = cx.b.reshape(iota, bshape)?;
        let iv = dim_scalar(cx, &inner)?;
        let off = cx.b.binary(Op::Mul {}, iota, iv)?;
        lin = cx.b.binary(Op::Add {}, lin, off)?;
    }
    let mut flat = vec![Dim::product(&dshape[..bd]) * inner];
    flat.extend(dshape[bd + k..].iter().cloned());
    let d = cx.b.reshape(data.id, flat)?;
    let id = cx.b.add(Op::Gather { axis: 0 }, &[d, lin])?;
    one(cx.same(data, id))
}

/// A scatter reduction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(n: &Node) -> R<Reduction> {
    Ok(match n.string("reduction", "none")? {
        "none" => Reduction::None,
        "add" => Reduction::Add,
        "mul" => Reduction::Mul,
        "max" => Reduction::Max,
        "min" => Reduction::Min,
        r => return Err(format!("unknown reduction `{r}`")),
    })
}

/// The value that loses every `max` (`low`) or `min` comparison in a dtype.
fn extreme(dtype: DType, low: bool) -> f64 {
    let (lo, hi) = match dtype {
        DType::I64 => (i64::MIN as f64, i64::MAX as f64),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::I8 => (-128.0, 127.0),
        DType::U8 => (0.0, 255.0),
        _ => (f64::NEG_INFINITY, f64::INFINITY),
    };
    if low {
        lo
    } else {
        hi
    }
}

/// Applies scattered updates with a reduction: `hit` is a bool one-hot
/// [.., n, ..] of which update (axis `axis`) lands on which element, `upd`
/// the updates broadcast against it; the updates landing on each element
/// are reduced over `axis` and combined with `base`.
fn reduce_scatter(cx: &mut Importer, base: ValueId, hit: ValueId, upd: ValueId, axis: i64, r: Reduction) -> R<ValueId> {
    let b = &mut cx.b;
    let dt = b.dtype(base);
    let neutral = match r {
        Reduction::Add | Reduction::None => 0.0,
        Reduction::Mul => 1.0,
        Reduction::Max => extreme(dt, true),
        Reduction::Min => extreme(dt, false),
    };
    let nv = b.scalar(dt, neutral);
    let masked = b.add(Op::Where {}, &[hit, upd, nv])?;
    let red = |axes: Vec<i64>| match r {
        Reduction::Mul => Op::ReduceProd { axes, keepdims: false },
        Reduction::Max => Op::ReduceMax { axes, keepdims: false },
        Reduction::Min => Op::ReduceMin { axes, keepdims: false },
        _ => Op::ReduceSum { axes, keepdims: false },
    };
    let contrib = b.add(red(vec![axis]), &[masked])?;
    Ok(match r {
        Reduction::Add | Reduction::None => b.binary(Op::Add {}, base, contrib)?,
        Reduction::Mul => b.binary(Op::Mul {}, base, contrib)?,
        Reduction::Max | Reduction::Min => {
            // Elements no update lands on keep their value.
            let any = b.cast(hit, DType::U8)?;
            let any = b.add(Op::ReduceMax { axes: vec![axis], keepdims: false }, &[any])?;
            let any = b.cast(any, DType::Bool)?;
            let op = if r == Reduction::Max { Op::Max {} } else { Op::Min {} };
            let m = b.binary(op, base, contrib)?;
            b.add(Op::Where {}, &[any, m, base])?
        }
    })
}

/// `ScatterElements`; with a reduction, each data element along the axis
/// reduces the updates whose index names it (a one-hot comparison of the
/// indices with the axis positions).
pub(crate) fn scatter_elements(cx: &mut Importer, n: &Node) -> R<Outs> {
    let r = reduction(n)?;
    let (data, idx, upd) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let rank = cx.b.rank(data.id);
    let axis = norm_axis(n.int("axis", 0)?, rank)?;
    if r == Reduction::None {
        let id = cx.b.add(Op::ScatterElements { axis: axis as i64 }, &[data.id, idx.id, upd.id])?;
        return one(cx.same(data, id));
    }
    let (ds, is) = (cx.b.shape(data.id), cx.b.shape(idx.id));
    if is.len() != rank || (0..rank).any(|i| i != axis && is[i] != ds[i]) {
        return Err(format!(
            "with a reduction, indices must match data outside the axis: {:?} vs {:?}",
            is.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ds.iter().map(ToString::to_string).collect::<Vec<_>>()
        ));
    }
    // Move the axis last: data [.., d], indices and updates [.., m].
    let mut perm: Vec<i64> = (0..rank as i64).filter(|&a| a != axis as i64).collect();
    perm.push(axis as i64);
    let mut inv = vec![0i64; rank];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    let dt = cx.b.transpose(data.id, perm.clone())?;
    let it = cx.b.transpose(idx.id, perm.clone())?;
    let ut = cx.b.transpose(upd.id, perm)?;
    let d = ds[axis].clone();
    let it1 = cx.b.unsqueeze(it, vec![-1])?;
    let lin = linear_index(cx, it1, std::slice::from_ref(&d))?.ok_or("empty index")?;
    let iota = cx.b.add(Op::Range { start: Dim::c(0), end: d, step: 1, dtype: DType::I64 }, &[])?;
    let li = cx.b.unsqueeze(lin, vec![-1])?; // [.., m, 1]
    let hit = cx.b.binary(Op::Eq {}, li, iota)?; // [.., m, d]
    let u = cx.b.unsqueeze(ut, vec![-1])?; // [.., m, 1]
    let out = reduce_scatter(cx, dt, hit, u, -2, r)?;
    let id = cx.b.transpose(out, inv)?;
    let v = cx.same(data, id);
    one(cx.wrap(v)?)
}

/// `ScatterND`; with a reduction, data is flattened over the indexed axes
/// and each position reduces the updates whose index tuple names it.
pub(crate) fn scatter_nd(cx: &mut Importer, n: &Node) -> R<Outs> {
    let r = reduction(n)?;
    let (data, idx, upd) = (n.input(0)?, n.input(1)?, n.input(2)?);
    if r == Reduction::None {
        let id = cx.b.add(Op::ScatterNd {}, &[data.id, idx.id, upd.id])?;
        return one(cx.same(data, id));
    }
    let (ds, is) = (cx.b.shape(data.id), cx.b.shape(idx.id));
    let k = is.last().and_then(Dim::as_const).ok_or("the last dim of indices must be a constant")?;
    let k = usize::try_from(k).map_err(|_| "the last dim of indices is negative")?;
    if k == 0 || k > ds.len() {
        return Err(format!("index tuples of {k} do not address data of rank {}", ds.len()));
    }
    let lin = linear_index(cx, idx.id, &ds[..k])?.ok_or("empty index")?;
    let p = Dim::product(&ds[..k]);
    let rest = ds[k..].to_vec();
    let nupd = Dim::product(&is[..is.len() - 1]);
    let lin = cx.b.reshape(lin, vec![nupd.clone()])?;
    let mut ushape = vec![nupd.clone(), Dim::c(1)];
    ushape.extend(rest.iter().cloned());
    let u = cx.b.reshape(upd.id, ushape)?; // [n, 1, rest..]
    let iota = cx.b.add(Op::Range { start: Dim::c(0), end: p.clone(), step: 1, dtype: DType::I64 }, &[])?;
    let li = cx.b.unsqueeze(lin, vec![1])?; // [n, 1]
    let hit = cx.b.binary(Op::Eq {}, li, iota)?; // [n, p]
    let mut hshape = vec![nupd, p.clone()];
    hshape.extend(std::iter::repeat_n(Dim::c(1), rest.len()));
    let hit = cx.b.reshape(hit, hshape)?; // [n, p, 1..]
    let mut flat = vec![p];
    flat.extend(rest);
    let base = cx.b.reshape(data.id, flat)?;
    let out = reduce_scatter(cx, base, hit, u, 0, r)?;
    let id = cx.b.reshape(out, ds)?;
    let v = cx.same(data, id);
    one(cx.wrap(v)?)
}

pub(crate) fn trilu(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let k = match n.opt(1) {
        Some(k) => cx.dims(k, "k")?.first().cloned().ok_or_else(|| format!("k {NOT_STATIC}"))?,
        None => Dim::c(0),
    };
    let upper = n.int("upper", 1)? != 0;
    let id = cx.b.add(Op::Trilu { upper, k }, &[x.id])?;
    one(cx.same(x, id))
}
