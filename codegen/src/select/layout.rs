//! Layout and data-movement ops: views that need no code (reshape, squeeze,
//! unsqueeze, a slice that keeps one contiguous block), strided copies
//! (transpose, expand, other slices), concat, gather, gather_elements, and
//! the cheap sources `fill`, `range` and `trilu`.
//!
//! Everything here copies elements without converting them, so it works for
//! every dtype, i8/u8 included. Gather indices are normalised like the
//! interpreter's (negative counts from the end); an index still out of
//! range, which the interpreter reports as an error, yields zeros instead
//! of an out-of-bounds read.

use super::{elem_of, Instance, SelectError, Selected};
use crate::kir::{Access, Builder, CmpOp, Expr, Kernel, KirError, LoopKind, Scalar, Space};
use crate::templates::packed::Packing;
use crate::templates::strided::{collapse, finish_named, map, row_strides, sym_vec_loop, Dims, View};
use crate::templates::LANES;
use smelt_ir::ops::infer::norm_axis;
use smelt_ir::{DType, Dim, Op, Tensor, TensorType};

pub fn select(op: &Op, inputs: &[TensorType], outputs: &[TensorType]) -> Result<Option<Selected>, SelectError> {
    let Some(out) = outputs.first() else { return Ok(None) };
    let bad = |why: String| SelectError::unsupported(op, inputs, why);
    let kir = |e: KirError| bad(e.to_string());
    let copy = |view: View, name: &str| -> Result<Option<Selected>, SelectError> {
        let prefix = format!("{name}_{}", out.dtype.name());
        let (kernel, scalars) =
            map(&prefix, &out.shape, elem_of(out.dtype), &[view], true, &|a, _| a[0].clone()).map_err(kir)?;
        Ok(Some(Selected::Kernel(Instance { kernel, scalars })))
    };
    let kernel = |r: Result<(Kernel, Vec<Dim>), String>| -> Result<Option<Selected>, SelectError> {
        let (kernel, scalars) = r.map_err(bad)?;
        Ok(Some(Selected::Kernel(Instance { kernel, scalars })))
    };
    match op {
        Op::Reshape { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } => {
            Ok(Some(Selected::Alias { offset: Dim::c(0) }))
        }
        Op::Transpose { perm } => {
            let x = &inputs[0];
            let rs = row_strides(&x.shape);
            let strides = perm
                .iter()
                .map(|&p| norm_axis(p, x.rank()).map(|a| rs[a].clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            copy(View { elem: elem_of(x.dtype), len: Dim::product(&x.shape), offset: Dim::c(0), strides }, "transpose")
        }
        Op::Expand { .. } => {
            let x = &inputs[0];
            copy(View::broadcast(elem_of(x.dtype), &x.shape, &out.shape), "expand")
        }
        Op::Slice { axes, starts, steps, .. } => {
            let x = &inputs[0];
            let view = crate::strided_slices::slice(x, out, axes, starts, steps).map_err(bad)?.view(x);
            // A view when the kept elements are one dense block (proved
            // symbolically; when in doubt, copy).
            match collapse(&out.shape, std::slice::from_ref(&view)).as_slice() {
                [] => Ok(Some(Selected::Alias { offset: view.offset })),
                [(_, s)] if s[0] == Dim::c(1) => Ok(Some(Selected::Alias { offset: view.offset })),
                _ => copy(view, "slice"),
            }
        }
        Op::Concat { axis } => kernel(concat(inputs, out, *axis)),
        Op::Gather { axis } => kernel(gather(&inputs[0], &inputs[1], out, *axis, elem_of(inputs[0].dtype))),
        Op::GatherElements { axis } => kernel(gather_elements(&inputs[0], &inputs[1], *axis)),
        Op::Trilu { upper, k } => kernel(trilu(&inputs[0], *upper, k).map_err(|e| e.to_string())),
        Op::Range { start, step, dtype, .. } => {
            if matches!(dtype, DType::I8 | DType::U8) {
                return Err(bad("i8/u8 ranges would need wrapping to 8 bits".into()));
            }
            kernel(range(start, *step, out).map_err(|e| e.to_string()))
        }
        Op::Fill { value, dtype, .. } => {
            let t = Tensor::full(*dtype, vec![1], *value);
            let e = elem_of(*dtype);
            let v = match e {
                Scalar::F32 => Expr::f32(t.to_f32_vec()[0]),
                Scalar::Bool => Expr::Bool(t.to_i64_vec()[0] != 0),
                e => Expr::Int(t.to_i64_vec()[0], e),
            };
            let prefix = format!("fill_{}", dtype.name());
            let body = move |_: &[Expr], l: u8| crate::templates::widen(v.clone(), l);
            kernel(map(&prefix, &out.shape, e, &[], true, &body).map_err(|e| e.to_string()))
        }
        _ => Ok(None),
    }
}

/// Zero of an element type.
fn zero(e: Scalar) -> Expr {
    match e {
        Scalar::F32 => Expr::f32(0.0),
        Scalar::Bool => Expr::Bool(false),
        e => Expr::Int(0, e),
    }
}

fn lanes_for(e: Scalar) -> u8 {
    if e == Scalar::F32 {
        LANES
    } else {
        1
    }
}

/// One parallel task per (outer index, operand): each copies its operand's
/// block for that outer index to its place in the output row.
fn concat(inputs: &[TensorType], out: &TensorType, axis: i64) -> Result<(Kernel, Vec<Dim>), String> {
    let a = norm_axis(axis, out.rank())?;
    let e = elem_of(out.dtype);
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let bufs: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let len = p.expr(&mut b, &Dim::product(&t.shape));
            b.buffer(&format!("in{i}"), e, len, Space::Global, Access::Read)
        })
        .collect();
    let out_len = p.expr(&mut b, &Dim::product(&out.shape));
    let y = b.buffer("out", e, out_len, Space::Global, Access::Write);
    let outer = p.expr(&mut b, &Dim::product(&out.shape[..a]));
    let inner = Dim::product(&out.shape[a + 1..]);
    let row = p.expr(&mut b, &(out.shape[a].clone() * inner.clone()));
    // Per operand: its block length and where the block starts in the row.
    let mut parts = vec![];
    let mut at = Dim::c(0);
    for t in inputs {
        let chunk = t.shape[a].clone() * inner.clone();
        parts.push((p.expr(&mut b, &chunk), p.expr(&mut b, &at)));
        at = at + chunk;
    }
    let k = inputs.len() as i64;
    b.for_("t", Expr::i64(0), outer * Expr::i64(k), 1, LoopKind::Parallel, |b, t| {
        let o = b.let_("o", t.clone() / Expr::i64(k));
        let which = b.let_("which", t % Expr::i64(k));
        let lanes = lanes_for(e);
        for (i, (chunk, start)) in parts.iter().enumerate() {
            let src = Expr::Var(o) * chunk.clone();
            let dst = Expr::Var(o) * row.clone() + start.clone();
            b.if_(
                Expr::Var(which).cmp(CmpOp::Eq, Expr::i64(i as i64)),
                |b| {
                    let src = b.let_("src", src);
                    let dst = b.let_("dst", dst);
                    sym_vec_loop(b, "j", Expr::i64(0), chunk.clone(), lanes, |b, j, w| {
                        let v = Expr::load(bufs[i], Expr::Var(src) + j.clone(), w);
                        b.store(y, Expr::Var(dst) + j, v);
                    });
                },
                |_| {},
            );
        }
    });
    let dt = out.dtype.name();
    finish_named(b, &format!("concat{}_{dt}", inputs.len())).map(|k| (k, p.dims)).map_err(|e| e.to_string())
}

/// An index loaded from an i32/i64 buffer as i64, normalised against `dim`
/// (negative counts from the end).
fn load_index(b: &mut Builder, buf: crate::kir::BufId, elem: Scalar, at: Expr, dim: &Expr) -> crate::kir::Var {
    let raw = Expr::load(buf, at, 1);
    let raw = if elem == Scalar::I64 { raw } else { raw.cast(Scalar::I64) };
    let ix = b.let_("ix", raw);
    b.assign(ix, Expr::select(Expr::Var(ix).lt(Expr::i64(0)), Expr::Var(ix) + dim.clone(), Expr::Var(ix)));
    ix
}

/// `gather` whose `data` (a float constant, such as an embedding table) is
/// stored as `stored` (`BF16`/`F16`, widened to f32 as it is copied); the
/// other operands and the result are as for `select`.
pub fn gather_stored(
    data: &TensorType,
    idx: &TensorType,
    out: &TensorType,
    axis: i64,
    stored: Scalar,
) -> Result<Instance, SelectError> {
    let op = Op::Gather { axis };
    let inputs = [data.clone(), idx.clone()];
    if elem_of(data.dtype) != Scalar::F32 || stored.computed() != Scalar::F32 {
        return Err(SelectError::unsupported(&op, &inputs, format!("a {} table stored as {stored:?}", data.dtype)));
    }
    let (kernel, scalars) =
        gather(data, idx, out, axis, stored).map_err(|e| SelectError::unsupported(&op, &inputs, e))?;
    Ok(Instance { kernel, scalars })
}

/// An embedding lookup (`gather` along axis 0 of a 2-D float table
/// `[rows, width]`) from the table stored as `stored` in the packed-panel
/// layout `packing` (panels of `nr` columns): the layout of the same
/// matrix as the weight of a packed matmul, so a tied embedding and output
/// head share one copy. Row `r`'s element `c` is at
/// `(r / nr) * nr * width + c * nr + packing.slot(r % nr)`. An index
/// outside the table (after wrapping one negative turn) gives a zero row.
pub fn gather_packed(
    data: &TensorType,
    idx: &TensorType,
    out: &TensorType,
    stored: Scalar,
    packing: Packing,
) -> Result<Instance, SelectError> {
    let nr = packing.nr();
    let op = Op::Gather { axis: 0 };
    let inputs = [data.clone(), idx.clone()];
    let unsupported = |why: &str| SelectError::unsupported(&op, &inputs, why);
    let (rows, width) = match &data.shape[..] {
        [r, w] => match (r.as_const(), w.as_const()) {
            (Some(r), Some(w)) if r > 0 && nr > 0 => (r as usize, w as usize),
            _ => return Err(unsupported("a packed table has constant, nonzero dims")),
        },
        _ => return Err(unsupported("a packed table is 2-D")),
    };
    if elem_of(data.dtype) != Scalar::F32 || stored.computed() != Scalar::F32 {
        return Err(unsupported("a packed table holds floats"));
    }
    let ie = elem_of(idx.dtype);
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let x = b.buffer("data", stored, Expr::idx(rows.div_ceil(nr) * nr * width), Space::Global, Access::Read);
    let n = p.expr(&mut b, &Dim::product(&idx.shape));
    let ib = b.buffer("indices", ie, n.clone(), Space::Global, Access::Read);
    let olen = p.expr(&mut b, &Dim::product(&out.shape));
    let y = b.buffer("out", Scalar::F32, olen, Space::Global, Access::Write);
    let dim = Expr::idx(rows);
    b.for_("t", Expr::i64(0), n, 1, LoopKind::Parallel, |b, t| {
        let ix = load_index(b, ib, ie, t.clone(), &dim);
        let dst = b.let_("dst", t * Expr::idx(width));
        let ok = Expr::select(Expr::Var(ix).lt(Expr::i64(0)), Expr::Bool(false), Expr::Var(ix).lt(dim.clone()));
        b.if_(
            ok,
            |b| {
                let panel = Expr::Var(ix) / Expr::idx(nr);
                let j = Expr::Var(ix) % Expr::idx(nr);
                // The column's place in a step ([`Packing::slot`]).
                let lane = match packing {
                    Packing::Panels { .. } => j,
                    Packing::PairedPanels { lanes, .. } => {
                        let j = Expr::Var(b.let_("j", j));
                        let (pair, i) = (j.clone() / Expr::idx(2 * lanes), j % Expr::idx(2 * lanes));
                        pair * Expr::idx(2 * lanes)
                            + (i.clone() % Expr::idx(lanes)) * Expr::idx(2)
                            + i / Expr::idx(lanes)
                    }
                };
                let src = b.let_("src", panel * Expr::idx(nr * width) + lane);
                b.for_("c", Expr::i64(0), Expr::idx(width), 1, LoopKind::Serial, |b, c| {
                    let at = Expr::Var(src) + c.clone() * Expr::idx(nr);
                    b.store(y, Expr::Var(dst) + c, Expr::load(x, at, 1));
                });
            },
            |b| {
                b.for_("c", Expr::i64(0), Expr::idx(width), 1, LoopKind::Serial, |b, c| {
                    b.store(y, Expr::Var(dst) + c, Expr::f32(0.0));
                });
            },
        );
    });
    let paired = match packing {
        Packing::Panels { .. } => String::new(),
        Packing::PairedPanels { lanes, .. } => format!("p{lanes}"),
    };
    let name = format!("gather_packed{nr}{paired}_{}_{}", format!("{stored:?}").to_lowercase(), idx.dtype.name());
    let kernel = finish_named(b, &name).map_err(|e| unsupported(&e.to_string()))?;
    Ok(Instance { kernel, scalars: p.dims })
}

/// `out[o, i, n] = data[o, idx[i], n]`: one task per (outer index, index);
/// each copies a row of `inner` elements (the embedding lookup when the
/// axis is 0). `data` is stored as `stored`.
fn gather(
    data: &TensorType,
    idx: &TensorType,
    out: &TensorType,
    axis: i64,
    stored: Scalar,
) -> Result<(Kernel, Vec<Dim>), String> {
    let a = norm_axis(axis, data.rank())?;
    let (e, ie) = (elem_of(data.dtype), elem_of(idx.dtype));
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let dlen = p.expr(&mut b, &Dim::product(&data.shape));
    let x = b.buffer("data", stored, dlen, Space::Global, Access::Read);
    let ilen = p.expr(&mut b, &Dim::product(&idx.shape));
    let ib = b.buffer("indices", ie, ilen.clone(), Space::Global, Access::Read);
    let olen = p.expr(&mut b, &Dim::product(&out.shape));
    let y = b.buffer("out", e, olen, Space::Global, Access::Write);
    let outer_dim = Dim::product(&data.shape[..a]);
    let outer = p.expr(&mut b, &outer_dim);
    let dim = p.expr(&mut b, &data.shape[a]);
    let inner = p.expr(&mut b, &Dim::product(&data.shape[a + 1..]));
    let n = ilen;
    let lanes = lanes_for(e);
    b.for_("t", Expr::i64(0), outer * n.clone(), 1, LoopKind::Parallel, |b, t| {
        let (o, i) = if outer_dim == Dim::c(1) {
            (Expr::i64(0), t.clone())
        } else {
            (Expr::Var(b.let_("o", t.clone() / n.clone())), Expr::Var(b.let_("i", t.clone() % n.clone())))
        };
        let ix = load_index(b, ib, ie, i, &dim);
        let dst = b.let_("dst", t * inner.clone());
        let ok = Expr::select(Expr::Var(ix).lt(Expr::i64(0)), Expr::Bool(false), Expr::Var(ix).lt(dim.clone()));
        let src = (o * dim.clone() + Expr::Var(ix)) * inner.clone();
        b.if_(
            ok,
            |b| {
                let src = b.let_("src", src);
                sym_vec_loop(b, "j", Expr::i64(0), inner.clone(), lanes, |b, j, w| {
                    b.store(y, Expr::Var(dst) + j.clone(), Expr::load(x, Expr::Var(src) + j, w));
                });
            },
            |b| {
                b.for_("j", Expr::i64(0), inner.clone(), 1, LoopKind::Serial, |b, j| {
                    b.store(y, Expr::Var(dst) + j, zero(e));
                });
            },
        );
    });
    let name = match stored {
        Scalar::BF16 => format!("gather_bf16_{}", idx.dtype.name()),
        Scalar::F16 => format!("gather_f16_{}", idx.dtype.name()),
        _ => format!("gather_{}_{}", data.dtype.name(), idx.dtype.name()),
    };
    finish_named(b, &name).map(|k| (k, p.dims)).map_err(|e| e.to_string())
}

/// `out[c] = data[c with c[axis] = idx[c]]`: one task per row of the
/// indices (all axes but the last), walking the last axis.
fn gather_elements(data: &TensorType, idx: &TensorType, axis: i64) -> Result<(Kernel, Vec<Dim>), String> {
    let r = data.rank();
    let a = norm_axis(axis, r)?;
    if idx.rank() != r {
        return Err(format!("indices {idx} must have the rank of data {data}"));
    }
    let (e, ie) = (elem_of(data.dtype), elem_of(idx.dtype));
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let dlen = p.expr(&mut b, &Dim::product(&data.shape));
    let x = b.buffer("data", e, dlen, Space::Global, Access::Read);
    let ilen = p.expr(&mut b, &Dim::product(&idx.shape));
    let ib = b.buffer("indices", ie, ilen.clone(), Space::Global, Access::Read);
    let y = b.buffer("out", e, ilen, Space::Global, Access::Write);
    let ds: Vec<Expr> = row_strides(&data.shape).iter().map(|d| p.expr(&mut b, d)).collect();
    let idims: Vec<Expr> = idx.shape.iter().map(|d| p.expr(&mut b, d)).collect();
    let dim = p.expr(&mut b, &data.shape[a]);
    let rows = p.expr(&mut b, &Dim::product(&idx.shape[..r - 1]));
    let n = idims[r - 1].clone();
    b.for_("row", Expr::i64(0), rows, 1, LoopKind::Parallel, |b, row| {
        // The data offset of this row's coordinates, leaving out the axis.
        let rem = b.let_("rem", row.clone());
        let base = b.let_("base", Expr::i64(0));
        for i in (0..r - 1).rev() {
            let coord = b.let_("coord", Expr::Var(rem) % idims[i].clone());
            b.assign(rem, Expr::Var(rem) / idims[i].clone());
            if i != a {
                b.assign(base, Expr::Var(base) + Expr::Var(coord) * ds[i].clone());
            }
        }
        let first = b.let_("first", row * n.clone());
        b.for_("j", Expr::i64(0), n.clone(), 1, LoopKind::Serial, |b, j| {
            let at = Expr::Var(first) + j.clone();
            let ix = load_index(b, ib, ie, at.clone(), &dim);
            let last = if a == r - 1 { Expr::i64(0) } else { j };
            let src = Expr::Var(base) + last + Expr::Var(ix) * ds[a].clone();
            let ok = Expr::select(Expr::Var(ix).lt(Expr::i64(0)), Expr::Bool(false), Expr::Var(ix).lt(dim.clone()));
            b.if_(ok, |b| b.store(y, at.clone(), Expr::load(x, src, 1)), |b| b.store(y, at.clone(), zero(e)));
        });
    });
    let name = format!("gather_elements_{}_{}", data.dtype.name(), idx.dtype.name());
    finish_named(b, &name).map(|k| (k, p.dims)).map_err(|e| e.to_string())
}

/// Keeps the upper (`j - i >= k`) or lower (`j - i <= k`) triangle of the
/// last two axes; one task per matrix row.
fn trilu(x: &TensorType, upper: bool, k: &Dim) -> Result<(Kernel, Vec<Dim>), KirError> {
    let r = x.rank();
    let e = elem_of(x.dtype);
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let len = p.expr(&mut b, &Dim::product(&x.shape));
    let xb = b.buffer("x", e, len.clone(), Space::Global, Access::Read);
    let y = b.buffer("out", e, len, Space::Global, Access::Write);
    let one = Dim::c(1);
    let rows_d = if r >= 2 { &x.shape[r - 2] } else { &one };
    let cols_d = if r >= 1 { &x.shape[r - 1] } else { &one };
    let (nrows, ncols) = (p.expr(&mut b, rows_d), p.expr(&mut b, cols_d));
    let all_rows = p.expr(&mut b, &Dim::product(&x.shape[..r.saturating_sub(1)]));
    let kk = p.expr(&mut b, k);
    b.for_("row", Expr::i64(0), all_rows, 1, LoopKind::Parallel, |b, row| {
        let i = b.let_("i", row.clone() % nrows.clone());
        let base = b.let_("base", row * ncols.clone());
        b.for_("j", Expr::i64(0), ncols.clone(), 1, LoopKind::Serial, |b, j| {
            let d = j.clone() - Expr::Var(i);
            let keep = if upper { d.cmp(CmpOp::Ge, kk.clone()) } else { d.cmp(CmpOp::Le, kk.clone()) };
            let at = Expr::Var(base) + j;
            b.store(y, at.clone(), Expr::select(keep, Expr::load(xb, at, 1), zero(e)));
        });
    });
    let name = format!("trilu_{}_{}", if upper { "upper" } else { "lower" }, x.dtype.name());
    finish_named(b, &name).map(|k| (k, p.dims))
}

/// `out[i] = start + i * step`, computed in i64 and converted like the
/// interpreter's integers.
fn range(start: &Dim, step: i64, out: &TensorType) -> Result<(Kernel, Vec<Dim>), KirError> {
    let e = elem_of(out.dtype);
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let n = p.expr(&mut b, &out.shape[0]);
    let y = b.buffer("out", e, n.clone(), Space::Global, Access::Write);
    let s = p.expr(&mut b, start);
    b.for_("i", Expr::i64(0), n, 1, LoopKind::Parallel, |b, i| {
        let v = s.clone() + i.clone() * Expr::i64(step);
        b.store(y, i, super::elementwise::cast(v, Scalar::I64, e));
    });
    finish_named(b, &format!("range_{}", out.dtype.name())).map(|k| (k, p.dims))
}
