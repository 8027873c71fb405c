//! Helpers shared by the interpreter's op families: element counts, numpy
//! broadcasting of concrete shapes, strided index lists, and building tensors
//! of a dtype from wide (f64 / i64) values.
//!
//! Every op family works the same way: read operands as wide values, compute,
//! then store through [`from_f64s`] / [`from_i64s`], which round floats to
//! their dtype and wrap integers to theirs. Movement ops compute a list of
//! source indices once per op (never per element) and [`take`] the elements.

use crate::tensor::wrap_int;
use crate::{DType, Data, Tensor};
use half::{bf16, f16};

/// What an op evaluator returns: its result, or a message for the error.
pub(crate) type OpResult<T = Tensor> = Result<T, String>;

/// The largest element count a single result may have. A symbol value or an
/// attribute that would need more is reported instead of exhausting memory.
pub(crate) const MAX_ELEMENTS: usize = 1 << 32;

/// The element count of a shape, or an error when it exceeds [`MAX_ELEMENTS`].
pub(crate) fn numel(shape: &[usize]) -> OpResult<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .filter(|n| *n <= MAX_ELEMENTS)
            .ok_or_else(|| format!("shape {shape:?} has more than {MAX_ELEMENTS} elements"))?;
    }
    Ok(n)
}

/// Row-major strides of a shape.
pub(crate) fn row_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// numpy broadcasting of two concrete shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            if da == db || db == 1 {
                Ok(da)
            } else if da == 1 {
                Ok(db)
            } else {
                Err(format!("shapes {a:?} and {b:?} do not broadcast"))
            }
        })
        .collect()
}

/// The linear indices visited when walking `shape` in row-major order through
/// a strided view (`strides` may be negative or zero) starting at `offset`.
/// The caller guarantees every visited index lies inside the viewed buffer.
pub(crate) fn strided_indices(shape: &[usize], strides: &[isize], offset: isize) -> Vec<usize> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let rank = shape.len();
    let mut counter = vec![0usize; rank];
    let mut lin = offset;
    for _ in 0..n {
        out.push(lin as usize);
        // An odometer: bump the last axis, carrying into earlier ones.
        for ax in (0..rank).rev() {
            counter[ax] += 1;
            lin += strides[ax];
            if counter[ax] < shape[ax] {
                break;
            }
            lin -= strides[ax] * shape[ax] as isize;
            counter[ax] = 0;
        }
    }
    out
}

/// For every element of `out` (row-major), the linear index of the element of
/// a tensor of shape `src` that numpy broadcasting reads. The caller has
/// checked that `src` broadcasts to `out`.
pub(crate) fn broadcast_index(src: &[usize], out: &[usize]) -> Vec<usize> {
    let lead = out.len() - src.len();
    let src_strides = row_strides(src);
    let strides: Vec<isize> = (0..out.len())
        .map(|i| if i < lead || src[i - lead] == 1 { 0 } else { src_strides[i - lead] as isize })
        .collect();
    strided_indices(out, &strides, 0)
}

/// The elements of `data` at the given indices, in order.
pub(crate) fn take(data: &Data, idx: &[usize]) -> Data {
    match data {
        Data::F32(v) => Data::F32(idx.iter().map(|&i| v[i]).collect()),
        Data::F64(v) => Data::F64(idx.iter().map(|&i| v[i]).collect()),
        Data::I64(v) => Data::I64(idx.iter().map(|&i| v[i]).collect()),
        Data::Bool(v) => Data::Bool(idx.iter().map(|&i| v[i]).collect()),
    }
}

/// The elements of several same-dtype tensors laid end to end, so that one
/// index list into the result can pick from any of them.
pub(crate) fn concat_data(parts: &[&Data]) -> OpResult<Data> {
    fn join<T: Copy>(parts: &[&Data], get: impl Fn(&Data) -> Option<&Vec<T>>) -> OpResult<Vec<T>> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(get(p).ok_or("operands hold different element storage")?);
        }
        Ok(out)
    }
    Ok(match parts.first() {
        Some(Data::F32(_)) | None => Data::F32(join(parts, |d| match d {
            Data::F32(v) => Some(v),
            _ => None,
        })?),
        Some(Data::F64(_)) => Data::F64(join(parts, |d| match d {
            Data::F64(v) => Some(v),
            _ => None,
        })?),
        Some(Data::I64(_)) => Data::I64(join(parts, |d| match d {
            Data::I64(v) => Some(v),
            _ => None,
        })?),
        Some(Data::Bool(_)) => Data::Bool(join(parts, |d| match d {
            Data::Bool(v) => Some(v),
            _ => None,
        })?),
    })
}

/// Rounds a wide value to the nearest value of a float dtype (directly from
/// f64, so there is no double rounding for f16 and bf16).
pub(crate) fn round_f64(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F64 => x,
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::BF16 => bf16::from_f64(x).to_f64(),
        _ => x as f32 as f64,
    }
}

/// A tensor of any dtype from wide float values: floats are rounded to the
/// dtype; integers are truncated toward zero (saturating at the i64 range,
/// NaN becomes 0) and then wrapped to the dtype; bools are `x != 0`.
pub(crate) fn from_f64s(dtype: DType, shape: Vec<usize>, v: Vec<f64>) -> Tensor {
    let data = match dtype {
        DType::F64 => Data::F64(v),
        DType::F32 | DType::F16 | DType::BF16 => Data::F32(v.into_iter().map(|x| round_f64(dtype, x) as f32).collect()),
        DType::Bool => Data::Bool(v.into_iter().map(|x| x != 0.0).collect()),
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => {
            Data::I64(v.into_iter().map(|x| wrap_int(dtype, x as i64)).collect())
        }
    };
    Tensor { dtype, shape, data }
}

/// A tensor of any dtype from exact integers: wrapped for integer dtypes,
/// converted (and rounded) for floats, `x != 0` for bool.
pub(crate) fn from_i64s(dtype: DType, shape: Vec<usize>, v: Vec<i64>) -> Tensor {
    match dtype {
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => {
            Tensor { dtype, shape, data: Data::I64(v.into_iter().map(|x| wrap_int(dtype, x)).collect()) }
        }
        DType::Bool => from_bools(shape, v.into_iter().map(|x| x != 0).collect()),
        _ => from_f64s(dtype, shape, v.into_iter().map(|x| x as f64).collect()),
    }
}

pub(crate) fn from_bools(shape: Vec<usize>, v: Vec<bool>) -> Tensor {
    Tensor { dtype: DType::Bool, shape, data: Data::Bool(v) }
}

/// Elements as f64 (exact for every float dtype; bool as 0/1).
pub(crate) fn floats(t: &Tensor) -> Vec<f64> {
    match &t.data {
        Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Data::F64(v) => v.clone(),
        Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
        Data::Bool(v) => v.iter().map(|&b| b as u8 as f64).collect(),
    }
}

/// Elements as i64 (floats truncated toward zero, bool as 0/1).
pub(crate) fn ints(t: &Tensor) -> Vec<i64> {
    t.to_i64_vec()
}

/// Elements as bools (nonzero is true).
pub(crate) fn bools(t: &Tensor) -> Vec<bool> {
    match &t.data {
        Data::Bool(v) => v.clone(),
        Data::I64(v) => v.iter().map(|&x| x != 0).collect(),
        _ => floats(t).into_iter().map(|x| x != 0.0).collect(),
    }
}

/// The smallest and largest value of an integer dtype.
pub(crate) fn int_range(dtype: DType) -> (i64, i64) {
    match dtype {
        DType::I32 => (i32::MIN as i64, i32::MAX as i64),
        DType::I8 => (i8::MIN as i64, i8::MAX as i64),
        DType::U8 => (0, u8::MAX as i64),
        _ => (i64::MIN, i64::MAX),
    }
}

/// Checks that a tensor is well formed: its storage is the one its dtype
/// uses, its length fills its shape, and integer values lie in the dtype's
/// range. Narrow float values are taken as stored.
pub(crate) fn check_tensor(t: &Tensor) -> OpResult<()> {
    let n = numel(&t.shape)?;
    let (len, ok, kind) = match (&t.data, t.dtype) {
        (Data::F32(v), d) => (v.len(), matches!(d, DType::F32 | DType::F16 | DType::BF16), "f32"),
        (Data::F64(v), d) => (v.len(), d == DType::F64, "f64"),
        (Data::I64(v), d) => (v.len(), d.is_int(), "i64"),
        (Data::Bool(v), d) => (v.len(), d == DType::Bool, "bool"),
    };
    if !ok {
        return Err(format!("holds {kind} storage, which is not how {} is stored", t.dtype));
    }
    if len != n {
        return Err(format!("{len} elements do not fill shape {:?} ({n} elements)", t.shape));
    }
    if let Data::I64(v) = &t.data {
        let (lo, hi) = int_range(t.dtype);
        if let Some(x) = v.iter().find(|&&x| x < lo || x > hi) {
            return Err(format!("value {x} is out of range for {}", t.dtype));
        }
    }
    Ok(())
}

/// Normalises a possibly negative axis against a rank.
pub(crate) fn axis(a: i64, rank: usize) -> OpResult<usize> {
    crate::ops::infer::norm_axis(a, rank)
}

/// Product of the dims before `axis`, the dim at `axis`, and the product of the dims after it.
pub(crate) fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_strides() {
        assert_eq!(broadcast_shape(&[2, 1], &[3]).unwrap(), vec![2, 3]);
        assert!(broadcast_shape(&[2], &[3]).is_err());
        assert_eq!(broadcast_index(&[2, 1], &[2, 3]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast_index(&[3], &[2, 3]), vec![0, 1, 2, 0, 1, 2]);
        // A transposed 2x3 view of a 3x2 buffer.
        assert_eq!(strided_indices(&[2, 3], &[1, 2], 0), vec![0, 2, 4, 1, 3, 5]);
        // Reversed axis.
        assert_eq!(strided_indices(&[3], &[-1], 2), vec![2, 1, 0]);
        assert!(strided_indices(&[0, 3], &[3, 1], 0).is_empty());
        assert_eq!(strided_indices(&[], &[], 0), vec![0]);
    }

    #[test]
    fn stores_round_and_wrap() {
        let t = from_f64s(DType::BF16, vec![2], vec![1.001, 3.0]);
        assert_eq!(t.data, Data::F32(vec![1.0, 3.0]));
        let t = from_f64s(DType::I8, vec![3], vec![300.7, -2.9, f64::NAN]);
        assert_eq!(t.data, Data::I64(vec![44, -2, 0]));
        let t = from_i64s(DType::U8, vec![1], vec![-1]);
        assert_eq!(t.data, Data::I64(vec![255]));
    }
}
