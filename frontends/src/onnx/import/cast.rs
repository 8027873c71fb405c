//! `Cast` and `CastLike`, including casts to and from the ONNX types smelt
//! emulates (see [`super::dtypes`]).
//!
//! A cast to a narrow float format (FLOAT8 variants, FLOAT4E2M1, FLOAT6)
//! rounds in the graph with primitives: the magnitude is compared with the
//! midpoints between consecutive values of the format (ties go to the even
//! code, which is round-to-nearest-even), the count of midpoints below it
//! indexes a table of the format's values, and the sign, NaN and overflow
//! (saturate to the largest value, or Inf / NaN per the ONNX table) are
//! applied with `where`. This is exact: every value and midpoint of these
//! formats is exact in f32.

use super::dtypes::{self, Carrier, DataType, FloatFormat, Specials};
use super::{data_type, Importer, Node, Outs, Val, R};
use smelt_ir::{DType, Op, Tensor};

pub(crate) fn cast(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let to = data_type(n.attrs.require_int("to").map_err(|e| e.to_string())?)?;
    let saturate = n.int("saturate", 1)? != 0;
    let mode = n.string("round_mode", "up")?;
    if to == DataType::Float8e8m0 {
        let xf = cx.b.cast(x.id, DType::F32)?;
        let id = round_e8m0(cx, xf, saturate, mode)?;
        return Ok(vec![Some(Val { id, ety: to })]);
    }
    Ok(vec![Some(cast_to(cx, x, to, saturate)?)])
}

/// Rounds f32 values to FLOAT8E8M0 (powers of two 2^-127..2^127) with the
/// `round_mode` of `Cast`: `up` takes the smallest power of two >= x, `down`
/// the largest <= x, `nearest` the closer one (ties up). Zero and
/// anything below 2^-127 give 2^-127; beyond 2^127, saturation gives 2^127
/// and otherwise NaN.
fn round_e8m0(cx: &mut Importer, x: smelt_ir::ValueId, saturate: bool, mode: &str) -> R<smelt_ir::ValueId> {
    let vals = FloatFormat::E8M0.positive_values();
    let n = vals.len();
    let bounds: Vec<f32> = match mode {
        // The index is the number of values below x.
        "up" => vals.clone(),
        // The index is the number of values at or below x, minus one;
        // comparing against the next value up gives the same count.
        "down" => vals[1..].iter().copied().chain([f32::INFINITY]).collect(),
        "nearest" => vals.windows(2).map(|w| (w[0] + w[1]) / 2.0).chain([vals[n - 1] * 1.5]).collect(),
        m => return Err(format!("unknown round_mode `{m}`")),
    };
    let mut table = vals;
    table.push(if saturate { table[n - 1] } else { f32::NAN });
    let b = &mut cx.b;
    let m = bounds.len();
    let bounds_c = b.constant(Tensor::from_f32(DType::F32, vec![m], bounds).map_err(|e| e.to_string())?);
    let table_c = b.constant(Tensor::from_f32(DType::F32, vec![n + 1], table).map_err(|e| e.to_string())?);
    let x1 = b.unsqueeze(x, vec![-1])?;
    let above = if mode == "down" { b.binary(Op::Ge {}, x1, bounds_c)? } else { b.binary(Op::Gt {}, x1, bounds_c)? };
    let counts = b.cast(above, DType::I64)?;
    let idx = b.add(Op::ReduceSum { axes: vec![-1], keepdims: false }, &[counts])?;
    let v = b.add(Op::Gather { axis: 0 }, &[table_c, idx])?;
    let nan = b.unary(Op::IsNan {}, x)?;
    let nan_c = b.scalar(DType::F32, f64::NAN);
    b.add(Op::Where {}, &[nan, nan_c, v])
}

pub(crate) fn cast_like(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (x, like) = (n.input(0)?, n.input(1)?);
    let saturate = n.int("saturate", 1)? != 0;
    Ok(vec![Some(cast_to(cx, x, like.ety, saturate)?)])
}

/// Converts a value to an ONNX element type.
pub(crate) fn cast_to(cx: &mut Importer, x: Val, to: DataType, saturate: bool) -> R<Val> {
    let (ir, carrier) = dtypes::carrier(to)
        .ok_or_else(|| format!("casting to {} is not supported (smelt has no such type)", to.as_str_name()))?;
    match carrier {
        Carrier::Native => {
            let id = cx.b.cast(x.id, ir)?;
            Ok(Val { id, ety: to })
        }
        Carrier::WideInt { .. } => {
            let id = cx.b.cast(x.id, ir)?;
            cx.wrap(Val { id, ety: to })
        }
        Carrier::NarrowFloat(f) if f.specials == Specials::ExponentOnly => {
            let xf = cx.b.cast(x.id, DType::F32)?;
            let id = round_e8m0(cx, xf, saturate, "up")?;
            Ok(Val { id, ety: to })
        }
        Carrier::NarrowFloat(f) => {
            let xf = cx.b.cast(x.id, DType::F32)?;
            let id = round_to_format(cx, xf, f, saturate)?;
            Ok(Val { id, ety: to })
        }
    }
}

/// Rounds f32 values to the nearest value of a narrow float format (see the
/// module docs).
fn round_to_format(cx: &mut Importer, x: smelt_ir::ValueId, f: FloatFormat, saturate: bool) -> R<smelt_ir::ValueId> {
    let vals = f.positive_values();
    let n = vals.len();
    if n < 2 {
        return Err("float format has fewer than two values".into());
    }
    let max = vals[n - 1];
    // A virtual next value one step above the largest: rounding to it means
    // overflow.
    let next = max + (max - vals[n - 2]);
    let mut ext = vals.clone();
    ext.push(next);
    let mids: Vec<f32> = ext.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    // At a tie between codes i and i+1, round-to-nearest-even picks i+1 when
    // it is even.
    let up: Vec<bool> = (0..mids.len()).map(|i| (i + 1) % 2 == 0).collect();
    let overflow = if saturate || f.specials == Specials::Finite {
        max
    } else if f.specials == Specials::Ieee {
        f32::INFINITY
    } else {
        f32::NAN
    };
    let mut table = vals;
    table.push(overflow);

    let m = mids.len();
    let b = &mut cx.b;
    let mids_c = b.constant(Tensor::from_f32(DType::F32, vec![m], mids).map_err(|e| e.to_string())?);
    let up_c = b.constant(Tensor::from_bool(vec![m], up).map_err(|e| e.to_string())?);
    let table_c = b.constant(Tensor::from_f32(DType::F32, vec![m + 1], table).map_err(|e| e.to_string())?);
    let a = b.unary(Op::Abs {}, x)?;
    let a1 = b.unsqueeze(a, vec![-1])?;
    let gt = b.binary(Op::Gt {}, a1, mids_c)?;
    let eq = b.binary(Op::Eq {}, a1, mids_c)?;
    let tie = b.binary(Op::And {}, eq, up_c)?;
    let above = b.binary(Op::Or {}, gt, tie)?;
    let counts = b.cast(above, DType::I64)?;
    let idx = b.add(Op::ReduceSum { axes: vec![-1], keepdims: false }, &[counts])?;
    let mag = b.add(Op::Gather { axis: 0 }, &[table_c, idx])?;
    let zero = b.scalar(DType::F32, 0.0);
    let neg = b.binary(Op::Lt {}, x, zero)?;
    let nmag = b.unary(Op::Neg {}, mag)?;
    let signed = b.add(Op::Where {}, &[neg, nmag, mag])?;
    // Finite-only formats (FLOAT4, FLOAT6) have no NaN: it becomes the
    // code with only the sign bit set, -0, as the ONNX reference does.
    let nan = b.unary(Op::IsNan {}, x)?;
    let nan_value = if f.specials == Specials::Finite { -0.0 } else { f64::NAN };
    let nan_c = b.scalar(DType::F32, nan_value);
    b.add(Op::Where {}, &[nan, nan_c, signed])
}
