//! Reductions (`reduce_*`), `argmax` and `cumsum`.
//!
//! Floats accumulate in f64 and are rounded to the dtype once per result;
//! integers accumulate exactly in i64 with wrapping. An empty axes list is
//! the identity. A reduction over zero elements follows ONNX: sum 0,
//! product 1, max the dtype's lowest value (-inf for floats), min its
//! highest; mean is NaN for floats and an error for integers. Max and min
//! propagate NaN.

use super::common::{
    axis, floats, from_f64s, from_i64s, int_range, ints, numel, row_strides, split_at_axis, strided_indices, OpResult,
};
use crate::{Op, Tensor};

pub(crate) fn reduce(op: &Op, x: &Tensor, axes: &[i64], keepdims: bool) -> OpResult {
    if axes.is_empty() {
        return Ok(x.clone());
    }
    let rank = x.shape.len();
    let mut reduced = vec![false; rank];
    for &a in axes {
        reduced[axis(a, rank)?] = true;
    }
    let kept: Vec<usize> = (0..rank).map(|i| if reduced[i] { 1 } else { x.shape[i] }).collect();
    let out_n = numel(&kept)?;
    let count: usize = (0..rank).filter(|&i| reduced[i]).map(|i| x.shape[i]).product();
    // For each input element, the output element it contributes to.
    let kept_strides = row_strides(&kept);
    let strides: Vec<isize> = (0..rank).map(|i| if reduced[i] { 0 } else { kept_strides[i] as isize }).collect();
    let dest = strided_indices(&x.shape, &strides, 0);
    let out_shape: Vec<usize> =
        if keepdims { kept } else { (0..rank).filter(|&i| !reduced[i]).map(|i| x.shape[i]).collect() };

    if x.dtype.is_float() {
        let (init, f): (f64, fn(f64, f64) -> f64) = match op {
            Op::ReduceSum { .. } | Op::ReduceMean { .. } => (0.0, |a, b| a + b),
            Op::ReduceProd { .. } => (1.0, |a, b| a * b),
            Op::ReduceMax { .. } => {
                (f64::NEG_INFINITY, |a, b| if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) })
            }
            Op::ReduceMin { .. } => (f64::INFINITY, |a, b| if a.is_nan() || b.is_nan() { f64::NAN } else { a.min(b) }),
            _ => return Err(format!("`{}` is not a reduction", op.name())),
        };
        let mut acc = vec![init; out_n];
        for (v, &d) in floats(x).into_iter().zip(&dest) {
            acc[d] = f(acc[d], v);
        }
        if matches!(op, Op::ReduceMean { .. }) {
            for a in &mut acc {
                *a /= count as f64;
            }
        }
        Ok(from_f64s(x.dtype, out_shape, acc))
    } else if x.dtype.is_int() {
        let (lo, hi) = int_range(x.dtype);
        let (init, f): (i64, fn(i64, i64) -> i64) = match op {
            Op::ReduceSum { .. } | Op::ReduceMean { .. } => (0, i64::wrapping_add),
            Op::ReduceProd { .. } => (1, i64::wrapping_mul),
            Op::ReduceMax { .. } => (lo, i64::max),
            Op::ReduceMin { .. } => (hi, i64::min),
            _ => return Err(format!("`{}` is not a reduction", op.name())),
        };
        let mut acc = vec![init; out_n];
        for (v, &d) in ints(x).into_iter().zip(&dest) {
            acc[d] = f(acc[d], v);
        }
        if matches!(op, Op::ReduceMean { .. }) {
            if count == 0 {
                return Err("integer mean over zero elements".into());
            }
            // Truncates toward zero, like integer division.
            for a in &mut acc {
                *a /= count as i64;
            }
        }
        Ok(from_i64s(x.dtype, out_shape, acc))
    } else {
        Err(format!("needs a numeric operand, found {}", x.dtype))
    }
}

/// Index of the first maximum along an axis. NaN counts as larger than every
/// number (the first NaN wins), as in numpy and PyTorch.
pub(crate) fn argmax(x: &Tensor, ax: i64, keepdims: bool) -> OpResult {
    let a = axis(ax, x.shape.len())?;
    let (outer, dim, inner) = split_at_axis(&x.shape, a);
    if dim == 0 {
        return Err(format!("argmax over axis {a} of size 0"));
    }
    let mut out = Vec::with_capacity(outer * inner);
    // Compare floats as f64 and integers as i64 so large integers stay exact.
    let fl = x.dtype.is_float().then(|| floats(x));
    let it = (!x.dtype.is_float()).then(|| ints(x));
    let greater = |i: usize, j: usize| -> bool {
        match (&fl, &it) {
            (Some(v), _) => (v[i].is_nan() && !v[j].is_nan()) || v[i] > v[j],
            (_, Some(v)) => v[i] > v[j],
            _ => false,
        }
    };
    for o in 0..outer {
        for n in 0..inner {
            let at = |k: usize| (o * dim + k) * inner + n;
            let mut best = 0;
            for k in 1..dim {
                if greater(at(k), at(best)) {
                    best = k;
                }
            }
            out.push(best as i64);
        }
    }
    let mut shape = x.shape.clone();
    if keepdims {
        shape[a] = 1;
    } else {
        shape.remove(a);
    }
    Ok(from_i64s(crate::DType::I64, shape, out))
}

/// Running sum along an axis; `exclusive` leaves out the current element,
/// `reverse` runs from the end. Floats accumulate in f64.
pub(crate) fn cumsum(x: &Tensor, ax: i64, exclusive: bool, reverse: bool) -> OpResult {
    let a = axis(ax, x.shape.len())?;
    let (outer, dim, inner) = split_at_axis(&x.shape, a);
    let order: Vec<usize> = if reverse { (0..dim).rev().collect() } else { (0..dim).collect() };
    if x.dtype.is_float() {
        let v = floats(x);
        let mut out = vec![0.0; v.len()];
        for o in 0..outer {
            for n in 0..inner {
                let mut acc = 0.0f64;
                for &k in &order {
                    let i = (o * dim + k) * inner + n;
                    let before = acc;
                    acc += v[i];
                    out[i] = if exclusive { before } else { acc };
                }
            }
        }
        Ok(from_f64s(x.dtype, x.shape.clone(), out))
    } else {
        let v = ints(x);
        let mut out = vec![0; v.len()];
        for o in 0..outer {
            for n in 0..inner {
                let mut acc = 0i64;
                for &k in &order {
                    let i = (o * dim + k) * inner + n;
                    let before = acc;
                    acc = acc.wrapping_add(v[i]);
                    out[i] = if exclusive { before } else { acc };
                }
            }
        }
        Ok(from_i64s(x.dtype, x.shape.clone(), out))
    }
}
