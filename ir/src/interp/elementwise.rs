//! Elementwise ops: unary, binary (numpy broadcasting), comparisons, logical
//! ops, `where` and `cast`.
//!
//! Floats are computed in f64 from their stored values and rounded once to
//! the result dtype, which is at least as accurate as computing in f32 (for
//! `+ - * /` it gives exactly the f32 result). Integers are computed exactly in
//! i64 with wrapping arithmetic and wrapped to their dtype on store, which is
//! two's complement arithmetic in the dtype. Operand dtypes have already been
//! checked by shape inference.

use super::common::{
    bools, broadcast_index, broadcast_shape, floats, from_bools, from_f64s, from_i64s, ints, numel, OpResult,
};
use crate::{DType, Data, Op, Tensor};

/// The logistic function, written so that neither branch overflows.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The float function of a unary op, or `None` for ops that are not float maps.
fn float_unary(op: &Op) -> Option<fn(f64) -> f64> {
    Some(match op {
        Op::Neg {} => |x: f64| -x,
        Op::Abs {} => f64::abs,
        // NaN propagates through relu: `NaN > 0` is false, so test it first.
        Op::Relu {} => |x: f64| if x.is_nan() || x > 0.0 { x } else { 0.0 },
        // Zeros (of either sign) and NaN map to themselves.
        Op::Sign {} => |x: f64| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        },
        Op::Exp {} => f64::exp,
        Op::Log {} => f64::ln,
        Op::Sqrt {} => f64::sqrt,
        Op::Rsqrt {} => |x: f64| 1.0 / x.sqrt(),
        Op::Reciprocal {} => |x: f64| 1.0 / x,
        Op::Sin {} => f64::sin,
        Op::Cos {} => f64::cos,
        Op::Tanh {} => f64::tanh,
        Op::Sigmoid {} => sigmoid,
        Op::Erf {} => libm::erf,
        Op::Floor {} => f64::floor,
        Op::Ceil {} => f64::ceil,
        Op::Round {} => f64::round_ties_even,
        _ => return None,
    })
}

pub(crate) fn unary(op: &Op, x: &Tensor) -> OpResult {
    let shape = x.shape.clone();
    match op {
        Op::Not {} => return Ok(from_bools(shape, bools(x).into_iter().map(|b| !b).collect())),
        Op::IsNan {} => return Ok(from_bools(shape, floats(x).into_iter().map(f64::is_nan).collect())),
        Op::IsInf {} => return Ok(from_bools(shape, floats(x).into_iter().map(f64::is_infinite).collect())),
        _ => {}
    }
    if x.dtype.is_int() {
        let f: fn(i64) -> i64 = match op {
            Op::Neg {} => i64::wrapping_neg,
            Op::Abs {} => i64::wrapping_abs,
            Op::Relu {} => |v: i64| v.max(0),
            Op::Sign {} => i64::signum,
            _ => return Err(format!("needs a float operand, found {}", x.dtype)),
        };
        return Ok(from_i64s(x.dtype, shape, ints(x).into_iter().map(f).collect()));
    }
    if !x.dtype.is_float() {
        return Err(format!("needs a numeric operand, found {}", x.dtype));
    }
    let f = float_unary(op).ok_or_else(|| format!("`{}` is not a unary op", op.name()))?;
    Ok(from_f64s(x.dtype, shape, floats(x).into_iter().map(f).collect()))
}

/// Floored modulo of floats: the result has the sign of `b`, like Python's `%`.
pub(crate) fn fmod_floor(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r == 0.0 {
        // Python gives a zero with the sign of the divisor.
        0.0f64.copysign(b)
    } else if (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }
}

fn float_binary(op: &Op, a: f64, b: f64) -> f64 {
    match op {
        Op::Add {} => a + b,
        Op::Sub {} => a - b,
        Op::Mul {} => a * b,
        Op::Div {} => a / b,
        // f64::max ignores NaN; the op propagates it.
        Op::Max {} if a.is_nan() || b.is_nan() => f64::NAN,
        Op::Max {} => a.max(b),
        Op::Min {} if a.is_nan() || b.is_nan() => f64::NAN,
        Op::Min {} => a.min(b),
        Op::Mod {} => fmod_floor(a, b),
        Op::Rem {} => a % b,
        _ => f64::NAN,
    }
}

fn int_binary(op: &Op, a: i64, b: i64) -> OpResult<i64> {
    if b == 0 && matches!(op, Op::Div {} | Op::Mod {} | Op::Rem {}) {
        return Err(format!("integer {} by zero", op.name()));
    }
    Ok(match op {
        Op::Add {} => a.wrapping_add(b),
        Op::Sub {} => a.wrapping_sub(b),
        Op::Mul {} => a.wrapping_mul(b),
        // Truncates toward zero; i64::MIN / -1 wraps.
        Op::Div {} => a.wrapping_div(b),
        Op::Max {} => a.max(b),
        Op::Min {} => a.min(b),
        Op::Mod {} => {
            let r = a.wrapping_rem(b);
            if r != 0 && ((r < 0) != (b < 0)) {
                r + b
            } else {
                r
            }
        }
        Op::Rem {} => a.wrapping_rem(b),
        _ => return Err(format!("`{}` is not an arithmetic op", op.name())),
    })
}

/// Integer power with wrapping. A negative exponent gives the integer part
/// of 1 / a^|b| (so 0 unless |a| = 1); zero to a negative power is an error.
pub(crate) fn int_pow(a: i64, b: i64) -> OpResult<i64> {
    if b < 0 {
        return match a {
            0 => Err("integer 0 raised to a negative power".into()),
            1 => Ok(1),
            -1 => Ok(if b % 2 == 0 { 1 } else { -1 }),
            _ => Ok(0),
        };
    }
    let (mut base, mut e, mut acc) = (a, b as u64, 1i64);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(base);
        }
        base = base.wrapping_mul(base);
        e >>= 1;
    }
    Ok(acc)
}

pub(crate) fn binary(op: &Op, a: &Tensor, b: &Tensor) -> OpResult {
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    numel(&shape)?;
    let ia = broadcast_index(&a.shape, &shape);
    let ib = broadcast_index(&b.shape, &shape);
    let pairs = || ia.iter().zip(&ib).map(|(&i, &j)| (i, j));
    match op {
        Op::Eq {} | Op::Ne {} | Op::Lt {} | Op::Le {} | Op::Gt {} | Op::Ge {} => {
            use std::cmp::Ordering;
            // Comparing in each dtype's own domain keeps large i64 exact; bools order false < true.
            let ords: Vec<Option<Ordering>> = if a.dtype.is_float() {
                let (x, y) = (floats(a), floats(b));
                pairs().map(|(i, j)| x[i].partial_cmp(&y[j])).collect()
            } else {
                let (x, y) = (ints(a), ints(b));
                pairs().map(|(i, j)| Some(x[i].cmp(&y[j]))).collect()
            };
            let f = |o: Option<Ordering>| match op {
                Op::Eq {} => o == Some(Ordering::Equal),
                // NaN is unequal to everything, itself included.
                Op::Ne {} => o != Some(Ordering::Equal),
                Op::Lt {} => o == Some(Ordering::Less),
                Op::Le {} => matches!(o, Some(Ordering::Less | Ordering::Equal)),
                Op::Gt {} => o == Some(Ordering::Greater),
                _ => matches!(o, Some(Ordering::Greater | Ordering::Equal)),
            };
            Ok(from_bools(shape, ords.into_iter().map(f).collect()))
        }
        Op::And {} | Op::Or {} | Op::Xor {} => {
            let (x, y) = (bools(a), bools(b));
            let v = pairs()
                .map(|(i, j)| match op {
                    Op::And {} => x[i] && y[j],
                    Op::Or {} => x[i] || y[j],
                    _ => x[i] != y[j],
                })
                .collect();
            Ok(from_bools(shape, v))
        }
        Op::Pow {} => {
            if a.dtype.is_float() {
                let (x, y) = (floats(a), floats(b));
                Ok(from_f64s(a.dtype, shape, pairs().map(|(i, j)| x[i].powf(y[j])).collect()))
            } else if b.dtype.is_float() {
                // An integer base with a float exponent: computed in f64, truncated toward zero.
                let (x, y) = (floats(a), floats(b));
                Ok(from_f64s(a.dtype, shape, pairs().map(|(i, j)| x[i].powf(y[j])).collect()))
            } else {
                let (x, y) = (ints(a), ints(b));
                let v = pairs().map(|(i, j)| int_pow(x[i], y[j])).collect::<OpResult<Vec<_>>>()?;
                Ok(from_i64s(a.dtype, shape, v))
            }
        }
        _ if a.dtype.is_float() => {
            let (x, y) = (floats(a), floats(b));
            Ok(from_f64s(a.dtype, shape, pairs().map(|(i, j)| float_binary(op, x[i], y[j])).collect()))
        }
        _ if a.dtype.is_int() => {
            let (x, y) = (ints(a), ints(b));
            let v = pairs().map(|(i, j)| int_binary(op, x[i], y[j])).collect::<OpResult<Vec<_>>>()?;
            Ok(from_i64s(a.dtype, shape, v))
        }
        _ => Err(format!("needs numeric operands, found {}", a.dtype)),
    }
}

/// `cond ? a : b` with all three broadcast.
pub(crate) fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> OpResult {
    let shape = broadcast_shape(&broadcast_shape(&cond.shape, &a.shape)?, &b.shape)?;
    numel(&shape)?;
    let (ic, ia, ib) =
        (broadcast_index(&cond.shape, &shape), broadcast_index(&a.shape, &shape), broadcast_index(&b.shape, &shape));
    let c = bools(cond);
    fn pick<T: Copy>(c: &[bool], ic: &[usize], x: &[T], ia: &[usize], y: &[T], ib: &[usize]) -> Vec<T> {
        (0..ic.len()).map(|n| if c[ic[n]] { x[ia[n]] } else { y[ib[n]] }).collect()
    }
    let data = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => Data::F32(pick(&c, &ic, x, &ia, y, &ib)),
        (Data::F64(x), Data::F64(y)) => Data::F64(pick(&c, &ic, x, &ia, y, &ib)),
        (Data::I64(x), Data::I64(y)) => Data::I64(pick(&c, &ic, x, &ia, y, &ib)),
        (Data::Bool(x), Data::Bool(y)) => Data::Bool(pick(&c, &ic, x, &ia, y, &ib)),
        _ => return Err(format!("branches differ in dtype: {} vs {}", a.dtype, b.dtype)),
    };
    Ok(Tensor { dtype: a.dtype, shape, data })
}

/// Converts to another dtype. Float to integer truncates toward zero,
/// saturates at the i64 range (NaN becomes 0) and then wraps to the target
/// like a C cast of the i64; anything to bool is `x != 0` (NaN is true).
pub(crate) fn cast(x: &Tensor, to: DType) -> OpResult {
    let shape = x.shape.clone();
    Ok(if x.dtype.is_int() { from_i64s(to, shape, ints(x)) } else { from_f64s(to, shape, floats(x)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floored_and_truncated_remainders() {
        assert_eq!(fmod_floor(-1.0, 3.0), 2.0);
        assert_eq!(fmod_floor(1.0, -3.0), -2.0);
        assert_eq!(int_binary(&Op::Mod {}, -7, 3).unwrap(), 2);
        assert_eq!(int_binary(&Op::Rem {}, -7, 3).unwrap(), -1);
        assert!(int_binary(&Op::Div {}, 1, 0).is_err());
        assert_eq!(int_binary(&Op::Div {}, i64::MIN, -1).unwrap(), i64::MIN);
    }

    #[test]
    fn integer_powers() {
        assert_eq!(int_pow(3, 4).unwrap(), 81);
        assert_eq!(int_pow(-1, -3).unwrap(), -1);
        assert_eq!(int_pow(2, -1).unwrap(), 0);
        assert!(int_pow(0, -1).is_err());
    }
}
