//! Host tensors with concrete shapes: what the interpreter computes on, what
//! constants hold, and what `smelt run` reads and writes.
//!
//! Storage is deliberately simple: every float dtype is held as `f32`
//! values (f16/bf16 values are rounded to their dtype when stored, so they
//! are exactly representable), f64 as `f64`, every integer dtype as `i64`
//! (wrapped to the dtype's range when stored), bool as `bool`.

use crate::DType;
use half::{bf16, f16};

/// Element storage of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// f32, f16 and bf16 tensors.
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// i64, i32, i8 and u8 tensors.
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

/// Errors building or converting tensors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("{what}: {len} elements do not fill shape {shape:?} ({expected} elements)")]
    Size { what: String, len: usize, shape: Vec<usize>, expected: usize },
    #[error("{what}: byte length {len} is not {expected} ({dtype}{shape:?})")]
    Bytes { what: String, len: usize, expected: usize, dtype: DType, shape: Vec<usize> },
}

/// A dense, row-major tensor with a concrete shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Rounds an f32 to the nearest value representable in `dtype`.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Wraps an integer to the range of `dtype` (two's complement, like a cast in C).
pub fn wrap_int(dtype: DType, x: i64) -> i64 {
    match dtype {
        DType::I32 => x as i32 as i64,
        DType::I8 => x as i8 as i64,
        DType::U8 => x as u8 as i64,
        _ => x,
    }
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn check(what: &str, len: usize, shape: &[usize]) -> Result<(), TensorError> {
        let expected: usize = shape.iter().product();
        if len != expected {
            return Err(TensorError::Size { what: what.to_string(), len, shape: shape.to_vec(), expected });
        }
        Ok(())
    }

    /// A float tensor (f32, f16 or bf16); values are rounded to `dtype`.
    pub fn from_f32(dtype: DType, shape: Vec<usize>, values: Vec<f32>) -> Result<Tensor, TensorError> {
        Tensor::check("tensor", values.len(), &shape)?;
        let data = match dtype {
            // f32 values are already exact: no pass over them (a decode
            // step's logits are 49k values, whose rounding pass took about
            // as long as the step's checks of every buffer and launch).
            DType::F32 => Data::F32(values),
            DType::F16 | DType::BF16 => Data::F32(values.into_iter().map(|v| round_to(dtype, v)).collect()),
            DType::F64 => Data::F64(values.into_iter().map(f64::from).collect()),
            d if d.is_int() => Data::I64(values.into_iter().map(|v| wrap_int(d, v as i64)).collect()),
            _ => Data::Bool(values.into_iter().map(|v| v != 0.0).collect()),
        };
        Ok(Tensor { dtype, shape, data })
    }

    pub fn from_i64(dtype: DType, shape: Vec<usize>, values: Vec<i64>) -> Result<Tensor, TensorError> {
        Tensor::check("tensor", values.len(), &shape)?;
        let data = match dtype {
            d if d.is_int() => Data::I64(values.into_iter().map(|v| wrap_int(d, v)).collect()),
            DType::Bool => Data::Bool(values.into_iter().map(|v| v != 0).collect()),
            DType::F64 => Data::F64(values.into_iter().map(|v| v as f64).collect()),
            d => Data::F32(values.into_iter().map(|v| round_to(d, v as f32)).collect()),
        };
        Ok(Tensor { dtype, shape, data })
    }

    pub fn from_bool(shape: Vec<usize>, values: Vec<bool>) -> Result<Tensor, TensorError> {
        Tensor::check("tensor", values.len(), &shape)?;
        Ok(Tensor { dtype: DType::Bool, shape, data: Data::Bool(values) })
    }

    pub fn from_f64(dtype: DType, shape: Vec<usize>, values: Vec<f64>) -> Result<Tensor, TensorError> {
        if dtype == DType::F64 {
            Tensor::check("tensor", values.len(), &shape)?;
            return Ok(Tensor { dtype, shape, data: Data::F64(values) });
        }
        if dtype.is_int() || dtype == DType::Bool {
            return Tensor::from_i64(dtype, shape, values.into_iter().map(|v| v as i64).collect());
        }
        Tensor::from_f32(dtype, shape, values.into_iter().map(|v| v as f32).collect())
    }

    /// A tensor of `shape` with every element `value` (converted to `dtype`).
    pub fn full(dtype: DType, shape: Vec<usize>, value: f64) -> Tensor {
        let n = shape.iter().product();
        // The length always matches the shape, so this cannot fail.
        Tensor::from_f64(dtype, shape.clone(), vec![value; n]).unwrap_or(Tensor {
            dtype,
            shape,
            data: Data::F64(Vec::new()),
        })
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor { dtype: DType::F32, shape: vec![], data: Data::F32(vec![v]) }
    }

    /// Element `i` as f64 (bool as 0/1).
    pub fn get_f64(&self, i: usize) -> f64 {
        match &self.data {
            Data::F32(v) => v[i] as f64,
            Data::F64(v) => v[i],
            Data::I64(v) => v[i] as f64,
            Data::Bool(v) => v[i] as u8 as f64,
        }
    }

    /// All elements as f64 (bool as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.numel()).map(|i| self.get_f64(i)).collect()
    }

    /// All elements as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            _ => self.to_f64_vec().into_iter().map(|x| x as f32).collect(),
        }
    }

    /// All elements as i64 (floats truncated toward zero, bool as 0/1).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            Data::I64(v) => v.clone(),
            Data::Bool(v) => v.iter().map(|&b| b as i64).collect(),
            Data::F32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::F64(v) => v.iter().map(|&x| x as i64).collect(),
        }
    }

    /// Little-endian bytes in the layout of `self.dtype` (safetensors, ONNX raw_data).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        // The common cases at memory speed (weights are large); the general
        // loop below is the definition.
        match (&self.data, self.dtype) {
            (Data::F32(v), DType::F32) => return v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            (Data::F32(v), DType::BF16) => return v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            (Data::F32(v), DType::F16) => return v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            (Data::I64(v), DType::I64) => return v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => {}
        }
        let mut out = Vec::with_capacity(self.numel() * self.dtype.size_bytes());
        for i in 0..self.numel() {
            let x = self.get_f64(i);
            match self.dtype {
                DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f64(x).to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&bf16::from_f64(x).to_le_bytes()),
                DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
                DType::I64 => out.extend_from_slice(&self.int_at(i).to_le_bytes()),
                DType::I32 => out.extend_from_slice(&(self.int_at(i) as i32).to_le_bytes()),
                DType::I8 => out.push(self.int_at(i) as i8 as u8),
                DType::U8 => out.push(self.int_at(i) as u8),
                DType::Bool => out.push((x != 0.0) as u8),
            }
        }
        out
    }

    fn int_at(&self, i: usize) -> i64 {
        match &self.data {
            Data::I64(v) => v[i],
            _ => self.get_f64(i) as i64,
        }
    }

    /// Reads little-endian bytes laid out as `dtype` (the inverse of [`Tensor::to_le_bytes`]).
    pub fn from_le_bytes(what: &str, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor, TensorError> {
        let n: usize = shape.iter().product();
        let expected = n * dtype.size_bytes();
        if bytes.len() != expected {
            return Err(TensorError::Bytes { what: what.to_string(), len: bytes.len(), expected, dtype, shape });
        }
        let data = match dtype {
            DType::F32 => {
                Data::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            DType::F16 => Data::F32(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            DType::BF16 => {
                Data::F32(bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            DType::F64 => Data::F64(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DType::I64 => Data::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DType::I32 => {
                Data::I64(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect())
            }
            DType::I8 => Data::I64(bytes.iter().map(|&b| b as i8 as i64).collect()),
            DType::U8 => Data::I64(bytes.iter().map(|&b| b as i64).collect()),
            DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Tensor { dtype, shape, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_dtype() {
        for d in DType::ALL {
            let t = Tensor::from_f64(d, vec![2, 2], vec![1.0, 0.0, 3.0, 2.0]).unwrap();
            let b = t.to_le_bytes();
            assert_eq!(b.len(), 4 * d.size_bytes());
            assert_eq!(Tensor::from_le_bytes("t", d, vec![2, 2], &b).unwrap(), t);
        }
    }

    #[test]
    fn narrow_floats_are_rounded_on_store() {
        let t = Tensor::from_f32(DType::BF16, vec![1], vec![1.001]).unwrap();
        assert_eq!(t.to_f32_vec(), vec![1.0]);
        assert!(Tensor::from_f32(DType::F32, vec![3], vec![1.0]).is_err());
    }
}
