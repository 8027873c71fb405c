//! Reductions: `reduce_sum/mean/max/min/prod` over any axes (keepdims or
//! not), `argmax`, `cumsum` and the fused `softmax` over any axis.
//!
//! One parallel task per output element (per line for argmax, cumsum and
//! softmax). The input is walked as two collapsed strided nests, the kept
//! axes and the reduced axes (see `templates::strided::collapse`); when the
//! innermost reduced axis is contiguous and the data f32, it is read with
//! `f32x4` vectors into a vector accumulator whose lanes are combined at the
//! end. Softmax over a contiguous last axis is the three-pass row kernel of
//! `templates::softmax` with symbolic lengths; over another axis it walks
//! each line with its stride.
//!
//! Floats accumulate in f32 (the interpreter uses f64, so sums and means
//! differ by rounding that grows with the reduced count); max and min
//! propagate NaN; integers (i64, i32) wrap, an integer mean truncates (and
//! divides by 1 for an empty reduction, where the interpreter errors).
//! argmax returns the first maximum, NaN counting as larger than any number.

use super::elementwise::nan_max;
use super::{elem_of, Instance, SelectError, Selected};
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, Kernel, KirError, LoopKind, Scalar, Space, Ty, Var};
use crate::templates::strided::{collapse, finish_named, row_strides, sym_vec_loop, Dims, View};
use crate::templates::{widen, LANES};
use smelt_ir::ops::infer::norm_axis;
use smelt_ir::{DType, Dim, Op, OpKind, TensorType};

pub fn select(op: &Op, inputs: &[TensorType], _outputs: &[TensorType]) -> Result<Option<Selected>, SelectError> {
    let bad = |why: String| SelectError::unsupported(op, inputs, why);
    let Some(x) = inputs.first() else { return Ok(None) };
    if !matches!(
        op.kind(),
        OpKind::ReduceSum
            | OpKind::ReduceMean
            | OpKind::ReduceMax
            | OpKind::ReduceMin
            | OpKind::ReduceProd
            | OpKind::ArgMax
            | OpKind::CumSum
            | OpKind::Softmax
    ) {
        return Ok(None);
    }
    let e = elem_of(x.dtype);
    if matches!(x.dtype, DType::I8 | DType::U8 | DType::Bool) {
        return Err(bad(format!("reductions of {} are not implemented", x.dtype)));
    }
    let r = match op {
        Op::ReduceSum { axes, .. }
        | Op::ReduceMean { axes, .. }
        | Op::ReduceMax { axes, .. }
        | Op::ReduceMin { axes, .. }
        | Op::ReduceProd { axes, .. } => {
            if axes.is_empty() {
                return Ok(Some(Selected::Alias { offset: Dim::c(0) }));
            }
            let mut red = vec![false; x.rank()];
            for &a in axes {
                red[norm_axis(a, x.rank()).map_err(bad)?] = true;
            }
            reduce(op.kind(), x, e, &red)
        }
        Op::ArgMax { axis, .. } => argmax(x, e, norm_axis(*axis, x.rank()).map_err(bad)?),
        Op::CumSum { axis, exclusive, reverse } => {
            cumsum(x, e, norm_axis(*axis, x.rank()).map_err(bad)?, *exclusive, *reverse)
        }
        Op::Softmax { axis } => {
            if e != Scalar::F32 {
                return Err(bad("softmax needs a float operand".into()));
            }
            softmax(x, norm_axis(*axis, x.rank()).map_err(bad)?)
        }
        _ => return Ok(None),
    };
    let (kernel, scalars) = r.map_err(|e| bad(e.to_string()))?;
    Ok(Some(Selected::Kernel(Instance { kernel, scalars })))
}

/// The identity of a reduction in element type `e`.
fn init(kind: OpKind, e: Scalar) -> Expr {
    let (lo, hi) = if e == Scalar::I32 { (i32::MIN as i64, i32::MAX as i64) } else { (i64::MIN, i64::MAX) };
    match (kind, e) {
        (OpKind::ReduceProd, Scalar::F32) => Expr::f32(1.0),
        (OpKind::ReduceMax, Scalar::F32) => Expr::f32(f32::NEG_INFINITY),
        (OpKind::ReduceMin, Scalar::F32) => Expr::f32(f32::INFINITY),
        (_, Scalar::F32) => Expr::f32(0.0),
        (OpKind::ReduceProd, e) => Expr::Int(1, e),
        (OpKind::ReduceMax, e) => Expr::Int(lo, e),
        (OpKind::ReduceMin, e) => Expr::Int(hi, e),
        (_, e) => Expr::Int(0, e),
    }
}

fn combine(kind: OpKind, e: Scalar, acc: Expr, x: Expr) -> Expr {
    match kind {
        OpKind::ReduceProd => acc * x,
        OpKind::ReduceMax | OpKind::ReduceMin if e == Scalar::F32 => nan_max(acc, x, kind == OpKind::ReduceMax),
        OpKind::ReduceMax => acc.max(x),
        OpKind::ReduceMin => acc.min(x),
        _ => acc + x,
    }
}

/// Axes `(dim, stride)` of `x` selected by `pick`, collapsed.
fn nest(x: &TensorType, pick: impl Fn(usize) -> bool) -> Vec<(Dim, Dim)> {
    let rs = row_strides(&x.shape);
    let idx: Vec<usize> = (0..x.rank()).filter(|&i| pick(i)).collect();
    let dims: Vec<Dim> = idx.iter().map(|&i| x.shape[i].clone()).collect();
    let view = View {
        elem: Scalar::F32,
        len: Dim::c(0),
        offset: Dim::c(0),
        strides: idx.iter().map(|&i| rs[i].clone()).collect(),
    };
    collapse(&dims, &[view]).into_iter().map(|(d, s)| (d, s[0].clone())).collect()
}

fn reduce(kind: OpKind, x: &TensorType, e: Scalar, red: &[bool]) -> Result<(Kernel, Vec<Dim>), KirError> {
    let kept = nest(x, |i| !red[i]);
    let reduced = nest(x, |i| red[i]);
    let count = Dim::product((0..x.rank()).filter(|&i| red[i]).map(|i| &x.shape[i]));
    let out_n = Dim::product((0..x.rank()).filter(|&i| !red[i]).map(|i| &x.shape[i]));
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let xlen = p.expr(&mut b, &Dim::product(&x.shape));
    let xb = b.buffer("x", e, xlen, Space::Global, Access::Read);
    let olen = p.expr(&mut b, &out_n);
    let y = b.buffer("out", e, olen.clone(), Space::Global, Access::Write);
    let kept: Vec<(Expr, Expr)> = kept.iter().map(|(d, s)| (p.expr(&mut b, d), p.expr(&mut b, s))).collect();
    let reduced: Vec<(Expr, Expr)> = reduced.iter().map(|(d, s)| (p.expr(&mut b, d), p.expr(&mut b, s))).collect();
    let count = p.expr(&mut b, &count);
    let vector = e == Scalar::F32 && reduced.last().is_some_and(|(_, s)| matches!(s, Expr::Int(1, _)));
    b.for_("o", Expr::i64(0), olen, 1, LoopKind::Parallel, |b, o| {
        let base = b.let_("base", Expr::i64(0));
        if !kept.is_empty() {
            let rem = b.let_("rem", o.clone());
            for (i, (d, s)) in kept.iter().enumerate().rev() {
                let coord = if i == 0 {
                    Expr::Var(rem)
                } else {
                    let c = b.let_("coord", Expr::Var(rem) % d.clone());
                    b.assign(rem, Expr::Var(rem) / d.clone());
                    Expr::Var(c)
                };
                b.assign(base, Expr::Var(base) + coord * s.clone());
            }
        }
        let acc = b.let_("acc", init(kind, e));
        let vacc = vector.then(|| b.let_("vacc", init(kind, e).splat(LANES)));
        Walk { reduced: &reduced, xb, acc, vacc, kind, e }.walk(b, 0, Expr::Var(base));
        if let Some(v) = vacc {
            for lane in 0..LANES {
                b.assign(acc, combine(kind, e, Expr::Var(acc), Expr::Extract(Box::new(Expr::Var(v)), lane)));
            }
        }
        let result = if kind == OpKind::ReduceMean {
            if e == Scalar::F32 {
                Expr::Var(acc) / count.clone().cast(Scalar::F32)
            } else {
                let n = count.clone().max(Expr::i64(1));
                Expr::Var(acc) / if e == Scalar::I64 { n } else { n.cast(e) }
            }
        } else {
            Expr::Var(acc)
        };
        b.store(y, o, result);
    });
    let name = format!("{}_{}", kind.name(), x.dtype.name());
    finish_named(b, &name).map(|k| (k, p.dims))
}

/// The nest of reduced axes of one output element, accumulating into
/// `acc` (and the lanes of `vacc` along a contiguous innermost axis).
struct Walk<'a> {
    reduced: &'a [(Expr, Expr)],
    xb: BufId,
    acc: Var,
    vacc: Option<Var>,
    kind: OpKind,
    e: Scalar,
}

impl Walk<'_> {
    fn walk(&self, b: &mut Builder, level: usize, at: Expr) {
        let (kind, e) = (self.kind, self.e);
        let Some((d, s)) = self.reduced.get(level) else {
            b.assign(self.acc, combine(kind, e, Expr::Var(self.acc), Expr::load(self.xb, at, 1)));
            return;
        };
        if let (true, Some(vacc)) = (level + 1 == self.reduced.len(), self.vacc) {
            let start = b.let_("at", at);
            sym_vec_loop(b, "j", Expr::i64(0), d.clone(), LANES, |b, j, w| {
                let v = Expr::load(self.xb, Expr::Var(start) + j, w);
                let a = if w > 1 { vacc } else { self.acc };
                b.assign(a, combine(kind, e, Expr::Var(a), v));
            });
            return;
        }
        b.for_("k", Expr::i64(0), d.clone(), 1, LoopKind::Serial, |b, k| {
            self.walk(b, level + 1, at.clone() + k * s.clone())
        });
    }
}

/// Splits `x` around `axis` into `(outer, dim, inner)` parameters and
/// declares the input buffer.
struct Lines {
    b: Builder,
    p: Dims,
    x: BufId,
    outer: Expr,
    dim: Expr,
    inner: Expr,
    inner_is_one: bool,
}

fn lines(x: &TensorType, e: Scalar, axis: usize) -> Lines {
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let xlen = p.expr(&mut b, &Dim::product(&x.shape));
    let xb = b.buffer("x", e, xlen, Space::Global, Access::Read);
    let inner_d = Dim::product(&x.shape[axis + 1..]);
    let outer = p.expr(&mut b, &Dim::product(&x.shape[..axis]));
    let dim = p.expr(&mut b, &x.shape[axis]);
    let inner = p.expr(&mut b, &inner_d);
    Lines { b, p, x: xb, outer, dim, inner, inner_is_one: inner_d == Dim::c(1) }
}

fn argmax(x: &TensorType, e: Scalar, axis: usize) -> Result<(Kernel, Vec<Dim>), KirError> {
    let Lines { mut b, mut p, x: xb, outer, dim, inner, .. } = lines(x, e, axis);
    let olen = p.expr(&mut b, &(Dim::product(&x.shape[..axis]) * Dim::product(&x.shape[axis + 1..])));
    let y = b.buffer("out", Scalar::I64, olen, Space::Global, Access::Write);
    b.for_("t", Expr::i64(0), outer * inner.clone(), 1, LoopKind::Parallel, |b, t| {
        let o = b.let_("o", t.clone() / inner.clone());
        let n = b.let_("n", t.clone() % inner.clone());
        let base = b.let_("base", Expr::Var(o) * dim.clone() * inner.clone() + Expr::Var(n));
        let bi = b.let_("bi", Expr::i64(0));
        b.if_(
            Expr::i64(0).lt(dim.clone()),
            |b| {
                let best = b.let_("best", Expr::load(xb, Expr::Var(base), 1));
                b.for_("k", Expr::i64(1), dim.clone(), 1, LoopKind::Serial, |b, k| {
                    let v = b.let_("v", Expr::load(xb, Expr::Var(base) + k.clone() * inner.clone(), 1));
                    let (v_, best_) = (Expr::Var(v), Expr::Var(best));
                    let greater = if e == Scalar::F32 {
                        // NaN beats every number; the first NaN wins.
                        Expr::select(
                            v_.clone().cmp(CmpOp::Ne, v_.clone()),
                            best_.clone().cmp(CmpOp::Eq, best_.clone()),
                            v_.clone().cmp(CmpOp::Gt, best_.clone()),
                        )
                    } else {
                        v_.clone().cmp(CmpOp::Gt, best_.clone())
                    };
                    let g = b.let_("g", greater);
                    b.assign(best, Expr::select(Expr::Var(g), v_, best_));
                    b.assign(bi, Expr::select(Expr::Var(g), k, Expr::Var(bi)));
                });
            },
            |_| {},
        );
        b.store(y, t, Expr::Var(bi));
    });
    finish_named(b, &format!("argmax_{}", x.dtype.name())).map(|k| (k, p.dims))
}

fn cumsum(
    x: &TensorType,
    e: Scalar,
    axis: usize,
    exclusive: bool,
    reverse: bool,
) -> Result<(Kernel, Vec<Dim>), KirError> {
    let Lines { mut b, mut p, x: xb, outer, dim, inner, .. } = lines(x, e, axis);
    let olen = p.expr(&mut b, &Dim::product(&x.shape));
    let y = b.buffer("out", e, olen, Space::Global, Access::Write);
    b.for_("t", Expr::i64(0), outer * inner.clone(), 1, LoopKind::Parallel, |b, t| {
        let o = b.let_("o", t.clone() / inner.clone());
        let n = b.let_("n", t % inner.clone());
        let base = b.let_("base", Expr::Var(o) * dim.clone() * inner.clone() + Expr::Var(n));
        let acc = b.let_("acc", init(OpKind::ReduceSum, e));
        b.for_("k", Expr::i64(0), dim.clone(), 1, LoopKind::Serial, |b, k| {
            let kk = if reverse { dim.clone() - Expr::i64(1) - k } else { k };
            let i = b.let_("i", Expr::Var(base) + kk * inner.clone());
            let v = Expr::load(xb, Expr::Var(i), 1);
            if exclusive {
                b.store(y, Expr::Var(i), Expr::Var(acc));
                b.assign(acc, Expr::Var(acc) + v);
            } else {
                b.assign(acc, Expr::Var(acc) + v);
                b.store(y, Expr::Var(i), Expr::Var(acc));
            }
        });
    });
    let name = format!(
        "cumsum{}{}_{}",
        if exclusive { "_excl" } else { "" },
        if reverse { "_rev" } else { "" },
        x.dtype.name()
    );
    finish_named(b, &name).map(|k| (k, p.dims))
}

fn softmax(x: &TensorType, axis: usize) -> Result<(Kernel, Vec<Dim>), KirError> {
    let Lines { mut b, mut p, x: xb, outer, dim, inner, inner_is_one } = lines(x, Scalar::F32, axis);
    let olen = p.expr(&mut b, &Dim::product(&x.shape));
    let y = b.buffer("out", Scalar::F32, olen, Space::Global, Access::Write);
    // Vectors only along a contiguous axis.
    let lanes = if inner_is_one { LANES } else { 1 };
    b.for_("t", Expr::i64(0), outer * inner.clone(), 1, LoopKind::Parallel, |b, t| {
        let o = b.let_("o", t.clone() / inner.clone());
        let n = b.let_("n", t % inner.clone());
        let base = b.let_("base", Expr::Var(o) * dim.clone() * inner.clone() + Expr::Var(n));
        let at = |j: Expr| Expr::Var(base) + j * inner.clone();
        // Lane accumulators (when vectorised) combined into the scalar one.
        let pass =
            |b: &mut Builder, name: &str, init: f32, step: &dyn Fn(&mut Builder, Expr, Expr, u8) -> Expr, max: bool| {
                let acc = b.let_(name, Expr::f32(init));
                let vacc = (lanes > 1).then(|| b.let_(&format!("v{name}"), Expr::f32(init).splat(lanes)));
                sym_vec_loop(b, "j", Expr::i64(0), dim.clone(), lanes, |b, j, w| {
                    let a = if w > 1 { vacc.unwrap() } else { acc };
                    let v = step(b, j, Expr::Var(a), w);
                    b.assign(a, v);
                });
                if let Some(v) = vacc {
                    for lane in 0..lanes {
                        let x = Expr::Extract(Box::new(Expr::Var(v)), lane);
                        let c = if max { nan_max(Expr::Var(acc), x, true) } else { Expr::Var(acc) + x };
                        b.assign(acc, c);
                    }
                }
                acc
            };
        let m = pass(b, "m", f32::NEG_INFINITY, &|_, j, acc, w| nan_max(acc, Expr::load(xb, at(j), w), true), true);
        let sum = pass(
            b,
            "sum",
            0.0,
            &|b, j, acc, w| {
                let ev = b.var("e", Ty::F32.with_lanes(w));
                b.assign(ev, (Expr::load(xb, at(j.clone()), w) - widen(Expr::Var(m), w)).exp());
                b.store(y, at(j), Expr::Var(ev));
                acc + Expr::Var(ev)
            },
            false,
        );
        let inv = b.let_("inv", Expr::f32(1.0) / Expr::Var(sum));
        sym_vec_loop(b, "k", Expr::i64(0), dim.clone(), lanes, |b, j, w| {
            b.store(y, at(j.clone()), Expr::load(y, at(j), w) * widen(Expr::Var(inv), w));
        });
    });
    let name = format!("softmax_{}", x.dtype.name());
    finish_named(b, &name).map(|k| (k, p.dims))
}
