//! Elementwise ops with numpy broadcasting: unary maths and predicates,
//! binary arithmetic, comparisons, logical ops, `where` and `cast`, each one
//! strided map ([`templates::strided::map`]) with the op's per-element
//! expression.
//!
//! Semantics follow the reference interpreter: `max`/`min`/`relu` propagate
//! NaN, `mod` is floored (sign of the divisor) and `rem` truncated (C's
//! `fmod`), integer arithmetic wraps in the element type, casts from float
//! to integer truncate toward zero (saturating at the i64 range, NaN to 0,
//! then wrapping to i32), anything to bool is `x != 0`. Where the
//! interpreter reports an error (integer division by zero) the kernel
//! computes some value instead of trapping: an integer divisor of 0 divides
//! by 1, and `i64::MIN / -1` wraps.
//!
//! Deviations, by the backend's design (`select`'s contract): f16, bf16 and
//! f64 values are computed and stored as f32, so results are not rounded to
//! the narrower type (and a cast between float types is a copy). Integer
//! results of i8/u8 type (stored as i64) would need wrapping to 8 bits and
//! are refused, as are integer powers.

use super::{elem_of, SelectError, Selected};
use crate::kir::{CmpOp, Expr, Scalar, UnOp};
use crate::select::Instance;
use crate::templates::c;
use crate::templates::strided::{map, View};
use smelt_ir::{DType, Op, TensorType};

type Body = Box<dyn Fn(&[Expr], u8) -> Expr>;

pub fn select(op: &Op, inputs: &[TensorType], outputs: &[TensorType]) -> Result<Option<Selected>, SelectError> {
    let Some(out) = outputs.first() else { return Ok(None) };
    let unsupported = |why: &str| Err(SelectError::unsupported(op, inputs, why));
    let elems: Vec<Scalar> = inputs.iter().map(|t| elem_of(t.dtype)).collect();
    let out_elem = elem_of(out.dtype);
    let narrow = matches!(out.dtype, DType::I8 | DType::U8);
    let body: Body = match op {
        Op::Not {} => {
            let e = elems[0];
            Box::new(move |a, _| a[0].clone().cmp(CmpOp::Eq, zero(e)))
        }
        Op::IsNan {} => Box::new(|a, _| a[0].clone().cmp(CmpOp::Ne, a[0].clone())),
        Op::IsInf {} => Box::new(|a, l| a[0].clone().un(UnOp::Abs).cmp(CmpOp::Eq, c(f32::INFINITY, l))),
        Op::Neg {} | Op::Abs {} | Op::Relu {} | Op::Sign {} if elems[0].is_int() => {
            if narrow && matches!(op, Op::Neg {} | Op::Abs {}) {
                return unsupported("i8/u8 arithmetic would need wrapping to 8 bits");
            }
            let e = elems[0];
            match op {
                Op::Neg {} => Box::new(|a, _| -a[0].clone()),
                Op::Abs {} => Box::new(|a, _| a[0].clone().un(UnOp::Abs)),
                Op::Relu {} => Box::new(move |a, _| a[0].clone().max(zero(e))),
                _ => Box::new(move |a, _| {
                    let x = a[0].clone();
                    Expr::select(
                        x.clone().cmp(CmpOp::Gt, zero(e)),
                        Expr::Int(1, e),
                        Expr::select(x.cmp(CmpOp::Lt, zero(e)), Expr::Int(-1, e), zero(e)),
                    )
                }),
            }
        }
        Op::Neg {}
        | Op::Abs {}
        | Op::Relu {}
        | Op::Sign {}
        | Op::Exp {}
        | Op::Log {}
        | Op::Sqrt {}
        | Op::Rsqrt {}
        | Op::Reciprocal {}
        | Op::Sin {}
        | Op::Cos {}
        | Op::Tanh {}
        | Op::Sigmoid {}
        | Op::Erf {}
        | Op::Floor {}
        | Op::Ceil {}
        | Op::Round {} => {
            if elems[0] != Scalar::F32 {
                return unsupported("needs a float operand");
            }
            float_unary(op)
        }
        Op::Add {} | Op::Sub {} | Op::Mul {} | Op::Div {} | Op::Max {} | Op::Min {} | Op::Mod {} | Op::Rem {} => {
            match elems[0] {
                Scalar::F32 => float_binary(op),
                e if e.is_int() => {
                    if narrow {
                        return unsupported("i8/u8 arithmetic would need wrapping to 8 bits");
                    }
                    int_binary(op, e)
                }
                _ => return unsupported("needs numeric operands"),
            }
        }
        Op::Pow {} => {
            if elems[0] != Scalar::F32 {
                return unsupported("integer powers are not implemented");
            }
            let eb = elems[1];
            Box::new(move |a, _| {
                let y = if eb == Scalar::F32 { a[1].clone() } else { to_f32(a[1].clone(), eb) };
                a[0].clone().bin(crate::kir::BinOp::Pow, y)
            })
        }
        Op::Eq {} | Op::Ne {} | Op::Lt {} | Op::Le {} | Op::Gt {} | Op::Ge {} => {
            let cop = match op {
                Op::Eq {} => CmpOp::Eq,
                Op::Ne {} => CmpOp::Ne,
                Op::Lt {} => CmpOp::Lt,
                Op::Le {} => CmpOp::Le,
                Op::Gt {} => CmpOp::Gt,
                _ => CmpOp::Ge,
            };
            if elems[0] != elems[1] {
                return unsupported("operands of different element types");
            }
            Box::new(move |a, _| a[0].clone().cmp(cop, a[1].clone()))
        }
        Op::And {} | Op::Or {} | Op::Xor {} => {
            let (ea, eb) = (elems[0], elems[1]);
            let kind = op.kind();
            Box::new(move |a, _| {
                let (x, y) = (to_bool(a[0].clone(), ea), to_bool(a[1].clone(), eb));
                match kind {
                    smelt_ir::OpKind::And => Expr::select(x, y, Expr::Bool(false)),
                    smelt_ir::OpKind::Or => Expr::select(x, Expr::Bool(true), y),
                    _ => x.cmp(CmpOp::Ne, y),
                }
            })
        }
        Op::Where {} => {
            if elems[1] != elems[2] {
                return unsupported("branches of different element types");
            }
            let ec = elems[0];
            Box::new(move |a, _| Expr::select(to_bool(a[0].clone(), ec), a[1].clone(), a[2].clone()))
        }
        Op::Cast { to } => {
            if matches!(to, DType::I8 | DType::U8) {
                return unsupported("casts to i8/u8 would need wrapping to 8 bits");
            }
            let (from, to) = (elems[0], elem_of(*to));
            Box::new(move |a, _| cast(a[0].clone(), from, to))
        }
        _ => return Ok(None),
    };
    let views: Vec<View> = inputs.iter().zip(&elems).map(|(t, e)| View::broadcast(*e, &t.shape, &out.shape)).collect();
    let dtypes: Vec<&str> = inputs.iter().map(|t| t.dtype.name()).chain([out.dtype.name()]).collect();
    let prefix = format!("{}_{}", op.name(), dtypes.join("_"));
    let (kernel, scalars) = map(&prefix, &out.shape, out_elem, &views, true, &*body)
        .map_err(|e| SelectError::unsupported(op, inputs, e.to_string()))?;
    Ok(Some(Selected::Kernel(Instance { kernel, scalars })))
}

/// Zero of an element type (scalar).
fn zero(e: Scalar) -> Expr {
    match e {
        Scalar::F32 => Expr::f32(0.0),
        Scalar::Bool => Expr::Bool(false),
        e => Expr::Int(0, e),
    }
}

fn to_bool(x: Expr, e: Scalar) -> Expr {
    if e == Scalar::Bool {
        x
    } else {
        x.cmp(CmpOp::Ne, zero(e))
    }
}

fn to_f32(x: Expr, e: Scalar) -> Expr {
    match e {
        Scalar::F32 => x,
        Scalar::Bool => Expr::select(x, Expr::f32(1.0), Expr::f32(0.0)),
        _ => x.cast(Scalar::F32),
    }
}

/// A scalar conversion with the interpreter's rules (see the module docs).
pub(crate) fn cast(x: Expr, from: Scalar, to: Scalar) -> Expr {
    match (from, to) {
        (f, t) if f == t => x,
        (Scalar::Bool, t) => Expr::select(x, one(t), zero(t)),
        (f, Scalar::Bool) => x.cmp(CmpOp::Ne, zero(f)),
        // Through i64, so out-of-range values wrap as the interpreter's do.
        (Scalar::F32, Scalar::I32) => x.cast(Scalar::I64).cast(Scalar::I32),
        (_, t) => x.cast(t),
    }
}

fn one(e: Scalar) -> Expr {
    match e {
        Scalar::F32 => Expr::f32(1.0),
        Scalar::Bool => Expr::Bool(true),
        e => Expr::Int(1, e),
    }
}

/// NaN-propagating maximum or minimum, at any width.
pub(crate) fn nan_max(a: Expr, b: Expr, max: bool) -> Expr {
    let m = if max { a.clone().max(b.clone()) } else { a.clone().min(b.clone()) };
    Expr::select(a.clone().cmp(CmpOp::Ne, a.clone()), a, Expr::select(b.clone().cmp(CmpOp::Ne, b.clone()), b, m))
}

fn float_unary(op: &Op) -> Body {
    let u = |o: UnOp| -> Body { Box::new(move |a: &[Expr], _| a[0].clone().un(o)) };
    match op {
        Op::Neg {} => u(UnOp::Neg),
        Op::Abs {} => u(UnOp::Abs),
        Op::Exp {} => u(UnOp::Exp),
        Op::Log {} => u(UnOp::Log),
        Op::Sqrt {} => u(UnOp::Sqrt),
        Op::Rsqrt {} => u(UnOp::Rsqrt),
        Op::Sin {} => u(UnOp::Sin),
        Op::Cos {} => u(UnOp::Cos),
        Op::Tanh {} => u(UnOp::Tanh),
        Op::Erf {} => u(UnOp::Erf),
        Op::Floor {} => u(UnOp::Floor),
        Op::Ceil {} => u(UnOp::Ceil),
        Op::Round {} => u(UnOp::Round),
        Op::Reciprocal {} => Box::new(|a, l| c(1.0, l) / a[0].clone()),
        // `x < 0` is false for NaN, which therefore passes through.
        Op::Relu {} => Box::new(|a, l| Expr::select(a[0].clone().lt(c(0.0, l)), c(0.0, l), a[0].clone())),
        // Zeros and NaN map to themselves.
        Op::Sign {} => Box::new(|a, l| {
            let x = a[0].clone();
            Expr::select(
                x.clone().cmp(CmpOp::Gt, c(0.0, l)),
                c(1.0, l),
                Expr::select(x.clone().lt(c(0.0, l)), c(-1.0, l), x),
            )
        }),
        // With e = exp(-|x|) in (0, 1], neither branch overflows.
        _ => Box::new(|a, l| {
            let x = a[0].clone();
            let e = (-x.clone().un(UnOp::Abs)).exp();
            let s = c(1.0, l) / (c(1.0, l) + e.clone());
            Expr::select(x.cmp(CmpOp::Ge, c(0.0, l)), s.clone(), e * s)
        }),
    }
}

fn float_binary(op: &Op) -> Body {
    match op {
        Op::Add {} => Box::new(|a, _| a[0].clone() + a[1].clone()),
        Op::Sub {} => Box::new(|a, _| a[0].clone() - a[1].clone()),
        Op::Mul {} => Box::new(|a, _| a[0].clone() * a[1].clone()),
        Op::Div {} => Box::new(|a, _| a[0].clone() / a[1].clone()),
        Op::Max {} => Box::new(|a, _| nan_max(a[0].clone(), a[1].clone(), true)),
        Op::Min {} => Box::new(|a, _| nan_max(a[0].clone(), a[1].clone(), false)),
        Op::Rem {} => Box::new(|a, _| a[0].clone() % a[1].clone()),
        // Floored: the truncated remainder, moved by b when the signs differ.
        _ => Box::new(|a, l| {
            let (r, b) = (a[0].clone() % a[1].clone(), a[1].clone());
            let shifted = r.clone() + b.clone();
            Expr::select(
                r.clone().lt(c(0.0, l)),
                Expr::select(b.clone().cmp(CmpOp::Gt, c(0.0, l)), shifted.clone(), r.clone()),
                Expr::select(r.clone().cmp(CmpOp::Gt, c(0.0, l)), Expr::select(b.lt(c(0.0, l)), shifted, r.clone()), r),
            )
        }),
    }
}

fn int_binary(op: &Op, e: Scalar) -> Body {
    let k = move |v: i64| Expr::Int(v, e);
    // A divisor that cannot trap: 0 and -1 become 1 (see the module docs).
    let safe = move |b: Expr| {
        Expr::select(b.clone().cmp(CmpOp::Eq, k(0)), k(1), Expr::select(b.clone().cmp(CmpOp::Eq, k(-1)), k(1), b))
    };
    match op {
        Op::Add {} => Box::new(|a, _| a[0].clone() + a[1].clone()),
        Op::Sub {} => Box::new(|a, _| a[0].clone() - a[1].clone()),
        Op::Mul {} => Box::new(|a, _| a[0].clone() * a[1].clone()),
        Op::Max {} => Box::new(|a, _| a[0].clone().max(a[1].clone())),
        Op::Min {} => Box::new(|a, _| a[0].clone().min(a[1].clone())),
        Op::Div {} => Box::new(move |a, _| {
            let (x, y) = (a[0].clone(), a[1].clone());
            Expr::select(y.clone().cmp(CmpOp::Eq, k(-1)), -x.clone(), x / safe(y))
        }),
        Op::Rem {} => Box::new(move |a, _| a[0].clone() % safe(a[1].clone())),
        _ => Box::new(move |a, _| {
            let (r, b) = (a[0].clone() % safe(a[1].clone()), a[1].clone());
            let shifted = r.clone() + b.clone();
            Expr::select(
                r.clone().lt(k(0)),
                Expr::select(b.clone().cmp(CmpOp::Gt, k(0)), shifted.clone(), r.clone()),
                Expr::select(r.clone().cmp(CmpOp::Gt, k(0)), Expr::select(b.lt(k(0)), shifted, r.clone()), r),
            )
        }),
    }
}
