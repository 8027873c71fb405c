//! ONNX element types and how the importer carries each in an IR dtype.
//!
//! The nine ONNX types with a smelt [`DType`] are carried as themselves. The
//! others that arithmetic can be defined on are *emulated*:
//! - narrow integers (INT16, UINT16, UINT32, UINT64, INT4, UINT4, INT2,
//!   UINT2) are carried in a wider IR integer; every arithmetic result is
//!   wrapped back to the type's range (two's complement for signed types), so
//!   values are exactly the type's. UINT64 is carried in i64 by bit pattern:
//!   `+ - *` are exact modulo 2^64, comparisons and division are exact below
//!   2^63;
//! - narrow floats (the FLOAT8 variants, FLOAT4E2M1, FLOAT6E2M3/E3M2) are
//!   carried in f32 holding only values of the format: a cast to one rounds
//!   (round to nearest even, with the format's saturation and NaN/Inf rules),
//!   and every value of the format is exact in f32. This is the same
//!   convention the IR itself uses for f16/bf16 tensors stored as f32.
//!
//! FLOAT8E8M0 (powers of two) is a narrow float too. STRING and
//! COMPLEX64/128 have no carrier; a model using them
//! is refused with a message naming the type.

use crate::onnx::proto::TensorProto;
use crate::onnx::OnnxModel;
use smelt_ir::{DType, Tensor};

pub use crate::onnx::proto::tensor_proto::DataType;

/// How the IR carries one ONNX element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// The IR dtype is the ONNX type.
    Native,
    /// An integer of `bits` bits in a wider IR integer.
    WideInt { bits: u32, signed: bool },
    /// A narrow float format in f32.
    NarrowFloat(FloatFormat),
}

/// The IR dtype and carrier of an ONNX element type, or `None` when smelt
/// cannot represent it.
pub fn carrier(t: DataType) -> Option<(DType, Carrier)> {
    use DataType as T;
    let wide = |ir, bits, signed| Some((ir, Carrier::WideInt { bits, signed }));
    let narrow = |f| Some((DType::F32, Carrier::NarrowFloat(f)));
    match t {
        T::Float => Some((DType::F32, Carrier::Native)),
        T::Float16 => Some((DType::F16, Carrier::Native)),
        T::Bfloat16 => Some((DType::BF16, Carrier::Native)),
        T::Double => Some((DType::F64, Carrier::Native)),
        T::Int64 => Some((DType::I64, Carrier::Native)),
        T::Int32 => Some((DType::I32, Carrier::Native)),
        T::Int8 => Some((DType::I8, Carrier::Native)),
        T::Uint8 => Some((DType::U8, Carrier::Native)),
        T::Bool => Some((DType::Bool, Carrier::Native)),
        T::Int16 => wide(DType::I32, 16, true),
        T::Uint16 => wide(DType::I32, 16, false),
        T::Uint32 => wide(DType::I64, 32, false),
        T::Uint64 => wide(DType::I64, 64, false),
        T::Int4 => wide(DType::I8, 4, true),
        T::Uint4 => wide(DType::I8, 4, false),
        T::Int2 => wide(DType::I8, 2, true),
        T::Uint2 => wide(DType::I8, 2, false),
        T::Float8e4m3fn => narrow(FloatFormat::E4M3FN),
        T::Float8e4m3fnuz => narrow(FloatFormat::E4M3FNUZ),
        T::Float8e5m2 => narrow(FloatFormat::E5M2),
        T::Float8e5m2fnuz => narrow(FloatFormat::E5M2FNUZ),
        T::Float4e2m1 => narrow(FloatFormat::E2M1),
        T::Float6e2m3 => narrow(FloatFormat::E2M3),
        T::Float6e3m2 => narrow(FloatFormat::E3M2),
        T::Float8e8m0 => narrow(FloatFormat::E8M0),
        T::Undefined | T::String | T::Complex64 | T::Complex128 => None,
    }
}

/// The ONNX type an IR dtype stands for when nothing else is known.
pub fn native(d: DType) -> DataType {
    match d {
        DType::F32 => DataType::Float,
        DType::F16 => DataType::Float16,
        DType::BF16 => DataType::Bfloat16,
        DType::F64 => DataType::Double,
        DType::I64 => DataType::Int64,
        DType::I32 => DataType::Int32,
        DType::I8 => DataType::Int8,
        DType::U8 => DataType::Uint8,
        DType::Bool => DataType::Bool,
    }
}

/// The ONNX spelling of a type code (`FLOAT8E4M3FN`), for messages.
pub fn type_name(code: i32) -> String {
    match DataType::try_from(code) {
        Ok(t) => t.as_str_name().to_string(),
        Err(_) => format!("element type {code}"),
    }
}

/// How NaN and infinity are encoded in a narrow float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Specials {
    /// IEEE style: the all-ones exponent holds inf (mantissa 0) and NaN.
    Ieee,
    /// No inf; only the all-ones exponent and mantissa is NaN (E4M3FN).
    NanOnly,
    /// No inf and no negative zero; the code 0x80 is NaN (the FNUZ types).
    Fnuz,
    /// Every code is a finite number (FLOAT4, FLOAT6).
    Finite,
    /// FLOAT8E8M0: no sign and no mantissa; code c is 2^(c - 127) and 0xFF
    /// is NaN.
    ExponentOnly,
}

/// A narrow binary float format (with a sign bit, except FLOAT8E8M0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloatFormat {
    pub ebits: u32,
    pub mbits: u32,
    pub bias: i32,
    pub specials: Specials,
}

impl FloatFormat {
    pub const E4M3FN: FloatFormat = FloatFormat { ebits: 4, mbits: 3, bias: 7, specials: Specials::NanOnly };
    pub const E4M3FNUZ: FloatFormat = FloatFormat { ebits: 4, mbits: 3, bias: 8, specials: Specials::Fnuz };
    pub const E5M2: FloatFormat = FloatFormat { ebits: 5, mbits: 2, bias: 15, specials: Specials::Ieee };
    pub const E5M2FNUZ: FloatFormat = FloatFormat { ebits: 5, mbits: 2, bias: 16, specials: Specials::Fnuz };
    pub const E8M0: FloatFormat = FloatFormat { ebits: 8, mbits: 0, bias: 127, specials: Specials::ExponentOnly };
    pub const E2M1: FloatFormat = FloatFormat { ebits: 2, mbits: 1, bias: 1, specials: Specials::Finite };
    pub const E2M3: FloatFormat = FloatFormat { ebits: 2, mbits: 3, bias: 1, specials: Specials::Finite };
    pub const E3M2: FloatFormat = FloatFormat { ebits: 3, mbits: 2, bias: 3, specials: Specials::Finite };

    /// Bits per element (sign included).
    pub fn bits(self) -> u32 {
        if self.specials == Specials::ExponentOnly {
            return 8;
        }
        1 + self.ebits + self.mbits
    }

    /// The value of a code (the low `bits()` bits of `code`).
    pub fn decode(self, code: u32) -> f32 {
        if self.specials == Specials::ExponentOnly {
            let c = code & 0xff;
            return if c == 0xff { f32::NAN } else { 2f64.powi(c as i32 - self.bias) as f32 };
        }
        let bits = self.bits();
        let code = code & ((1 << bits) - 1);
        let sign_bit = 1 << (bits - 1);
        let neg = code & sign_bit != 0;
        let mag = code & (sign_bit - 1);
        let e = mag >> self.mbits;
        let m = mag & ((1 << self.mbits) - 1);
        let emax = (1 << self.ebits) - 1;
        match self.specials {
            Specials::Fnuz if code == sign_bit => return f32::NAN,
            Specials::NanOnly if e == emax && m == (1 << self.mbits) - 1 => return f32::NAN,
            Specials::Ieee if e == emax => {
                return if m != 0 {
                    f32::NAN
                } else if neg {
                    f32::NEG_INFINITY
                } else {
                    f32::INFINITY
                }
            }
            _ => {}
        }
        let v = if e == 0 {
            m as f64 * 2f64.powi(1 - self.bias - self.mbits as i32)
        } else {
            (1.0 + m as f64 / (1u32 << self.mbits) as f64) * 2f64.powi(e as i32 - self.bias)
        };
        (if neg { -v } else { v }) as f32
    }

    /// Every finite non-negative value of the format, ascending (the codes
    /// 0, 1, 2, ... up to the largest finite one).
    pub fn positive_values(self) -> Vec<f32> {
        if self.specials == Specials::ExponentOnly {
            return (0..0xff).map(|c| self.decode(c)).collect();
        }
        let n = 1u32 << (self.bits() - 1);
        (0..n).map(|c| self.decode(c)).take_while(|v| v.is_finite()).collect()
    }

    /// The largest finite value.
    pub fn max(self) -> f32 {
        self.positive_values().last().copied().unwrap_or(0.0)
    }
}

/// Reads the raw element codes of an emulated-type tensor stored inline
/// (`raw_data` or the typed field the type uses), as unsigned integers of
/// the type's bit width. `numel` is the element count from the dims.
fn codes(t: &TensorProto, dt: DataType, numel: usize) -> Result<Vec<u64>, String> {
    use DataType as T;
    let bits: usize = match dt {
        T::Int4 | T::Uint4 | T::Float4e2m1 => 4,
        T::Int2 | T::Uint2 => 2,
        T::Float6e2m3 | T::Float6e3m2 => 6,
        T::Int16 | T::Uint16 => 16,
        T::Uint32 => 32,
        T::Uint64 => 64,
        _ => 8,
    };
    if let Some(raw) = &t.raw_data {
        let need = (numel * bits).div_ceil(8);
        if raw.len() != need {
            return Err(format!("raw_data has {} bytes, expected {need}", raw.len()));
        }
        let mut out = Vec::with_capacity(numel);
        if bits >= 8 {
            for c in raw.chunks_exact(bits / 8) {
                let mut v = 0u64;
                for (i, b) in c.iter().enumerate() {
                    v |= u64::from(*b) << (8 * i);
                }
                out.push(v);
            }
        } else {
            // Sub-byte types are an LSB-first bit stream.
            for i in 0..numel {
                let mut v = 0u64;
                for k in 0..bits {
                    let bit = i * bits + k;
                    if raw[bit / 8] >> (bit % 8) & 1 == 1 {
                        v |= 1 << k;
                    }
                }
                out.push(v);
            }
        }
        return Ok(out);
    }
    if matches!(dt, T::Uint32 | T::Uint64) {
        if t.uint64_data.len() != numel {
            return Err(format!("uint64_data has {} values, expected {numel}", t.uint64_data.len()));
        }
        return Ok(t.uint64_data.clone());
    }
    // int32_data: one element per value from 8 bits up, packed below that.
    let per = if bits < 8 { 32 / bits.max(1) } else { 1 };
    let per = if matches!(dt, T::Float6e2m3 | T::Float6e3m2) { 1 } else { per };
    let need = numel.div_ceil(per);
    if t.int32_data.len() != need {
        return Err(format!("int32_data has {} values, expected {need}", t.int32_data.len()));
    }
    let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let mut out = Vec::with_capacity(numel);
    for i in 0..numel {
        let word = t.int32_data[i / per] as u32 as u64;
        out.push(if per == 1 { word & mask } else { (word >> ((i % per) * bits)) & mask });
    }
    Ok(out)
}

/// An integer code of `bits` bits read as the signed or unsigned value it holds.
pub fn int_value(code: u64, bits: u32, signed: bool) -> i64 {
    if bits >= 64 {
        return code as i64;
    }
    let code = code & ((1u64 << bits) - 1);
    if signed && code >> (bits - 1) == 1 {
        code as i64 - (1i64 << bits)
    } else {
        code as i64
    }
}

/// Wraps an integer to `bits` bits (two's complement for signed types).
pub fn wrap(v: i64, bits: u32, signed: bool) -> i64 {
    if bits >= 64 {
        return v;
    }
    int_value((v as u64) & ((1u64 << bits) - 1), bits, signed)
}

/// Decodes any `TensorProto` of the model into an IR tensor in its carrier
/// dtype, with the ONNX type it stands for. Native types go through
/// [`OnnxModel::tensor`] (zero-copy, external data); emulated types must be
/// stored inline.
pub fn decode(model: &OnnxModel, t: &TensorProto) -> Result<(Tensor, DataType), String> {
    let dt = DataType::try_from(t.data_type()).map_err(|_| format!("unknown element type {}", t.data_type()))?;
    let (ir, carrier) = carrier(dt).ok_or_else(|| {
        format!("tensor `{}` has ONNX element type {}, which smelt cannot represent", t.name(), dt.as_str_name())
    })?;
    if carrier == Carrier::Native {
        let o = model.tensor(t).map_err(|e| e.to_string())?;
        let tensor = Tensor::from_le_bytes(&o.name, o.dtype, o.dims.clone(), o.bytes()).map_err(|e| e.to_string())?;
        return Ok((tensor, dt));
    }
    decode_inline(t, dt, ir, carrier).map(|x| (x, dt))
}

/// Decodes a standalone `TensorProto` read from `file` (a backend-test
/// `.pb`), any carried type; external data is looked up next to `file`.
pub fn decode_standalone(file: &std::path::Path, t: &TensorProto) -> Result<(Tensor, DataType), String> {
    let dt = DataType::try_from(t.data_type()).map_err(|_| format!("unknown element type {}", t.data_type()))?;
    let (ir, carrier) =
        carrier(dt).ok_or_else(|| format!("ONNX element type {} is not supported", dt.as_str_name()))?;
    if carrier == Carrier::Native {
        let store = crate::onnx::tensor::TensorStore::new(file.to_path_buf());
        let o = store.decode(t).map_err(|e| e.to_string())?;
        let tensor = Tensor::from_le_bytes(&o.name, o.dtype, o.dims.clone(), o.bytes()).map_err(|e| e.to_string())?;
        return Ok((tensor, dt));
    }
    decode_inline(t, dt, ir, carrier).map(|x| (x, dt))
}

fn decode_inline(t: &TensorProto, dt: DataType, ir: DType, carrier: Carrier) -> Result<Tensor, String> {
    if t.external_data.iter().any(|e| e.key() == "location") {
        return Err(format!("tensor `{}`: external data of type {} is not supported", t.name(), dt.as_str_name()));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor `{}` has a negative dim", t.name())))
        .collect::<Result<_, _>>()?;
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor `{}`: dims overflow", t.name()))?;
    let codes = codes(t, dt, numel).map_err(|e| format!("tensor `{}`: {e}", t.name()))?;
    match carrier {
        Carrier::WideInt { bits, signed } => {
            let v = codes.into_iter().map(|c| int_value(c, bits, signed)).collect();
            Tensor::from_i64(ir, dims, v).map_err(|e| e.to_string())
        }
        Carrier::NarrowFloat(f) => {
            let v = codes.into_iter().map(|c| f.decode(c as u32)).collect();
            Tensor::from_f32(ir, dims, v).map_err(|e| e.to_string())
        }
        Carrier::Native => Err("native types are decoded elsewhere".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float8_tables() {
        assert_eq!(FloatFormat::E4M3FN.max(), 448.0);
        assert_eq!(FloatFormat::E4M3FNUZ.max(), 240.0);
        assert_eq!(FloatFormat::E5M2.max(), 57344.0);
        assert_eq!(FloatFormat::E5M2FNUZ.max(), 57344.0);
        assert_eq!(FloatFormat::E2M1.max(), 6.0);
        assert!(FloatFormat::E4M3FN.decode(0x7f).is_nan());
        assert!(FloatFormat::E4M3FNUZ.decode(0x80).is_nan());
        assert_eq!(FloatFormat::E5M2.decode(0x7c), f32::INFINITY);
        assert_eq!(FloatFormat::E4M3FN.decode(0x01), 2f32.powi(-9));
        assert_eq!(FloatFormat::E2M1.decode(0b1111), -6.0);
        assert_eq!(FloatFormat::E8M0.decode(127), 1.0);
        assert_eq!(FloatFormat::E8M0.decode(0), 2f32.powi(-127));
        assert!(FloatFormat::E8M0.decode(255).is_nan());
        assert_eq!(FloatFormat::E8M0.max(), 2f32.powi(127));
    }

    #[test]
    fn integer_wrapping() {
        assert_eq!(wrap(65536 + 5, 16, false), 5);
        assert_eq!(wrap(32768, 16, true), -32768);
        assert_eq!(int_value(0b1111, 4, true), -1);
        assert_eq!(int_value(0b1111, 4, false), 15);
    }
}
