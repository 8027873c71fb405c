//! Operators that make shapes and constants: `Constant`, `Shape` (with
//! `start`/`end`), `Size`, `Range` and `ConstantOfShape`.
//!
//! `Shape` and `Size` read the input's IR type, so their results are shape
//! values (possibly symbolic) and never runtime reads of a tensor's shape.
//! `Range` with known (possibly symbolic) integer bounds becomes an IR
//! `range`; a float `Range` must have constant operands and is computed here.

use super::dtypes::{self, DataType};
use super::shape::ShapeValue;
use super::{Importer, Node, Outs, Val, NOT_STATIC, R};
use smelt_ir::{DType, Dim, Op, Tensor};

fn one(v: Val) -> R<Outs> {
    Ok(vec![Some(v)])
}

pub(crate) fn constant(cx: &mut Importer, n: &Node) -> R<Outs> {
    let a = &n.attrs;
    let err = |e: crate::onnx::OnnxError| e.to_string();
    if let Some(t) = a.tensor("value").map_err(err)? {
        let (t, ety) = dtypes::decode(cx.model, t)?;
        let id = cx.b.constant(t);
        return one(Val { id, ety });
    }
    if let Some(v) = a.float("value_float").map_err(err)? {
        let id = cx.b.constant(Tensor::scalar_f32(v));
        return one(cx.val(id));
    }
    if let Some(v) = a.floats("value_floats").map_err(err)? {
        let t = Tensor::from_f32(DType::F32, vec![v.len()], v.to_vec()).map_err(|e| e.to_string())?;
        let id = cx.b.constant(t);
        return one(cx.val(id));
    }
    if let Some(v) = a.int("value_int").map_err(err)? {
        let t = Tensor::from_i64(DType::I64, vec![], vec![v]).map_err(|e| e.to_string())?;
        let id = cx.b.constant(t);
        return one(cx.val(id));
    }
    if let Some(v) = a.ints("value_ints").map_err(err)? {
        let id = cx.b.i64s(v);
        return one(cx.val(id));
    }
    if a.has("sparse_value") {
        return Err("sparse constants are not supported".into());
    }
    if a.has("value_string") || a.has("value_strings") {
        return Err("string constants are not supported".into());
    }
    Err("has no value attribute".into())
}

/// `Shape(x)[start:end]`, from x's (symbolic) type.
pub(crate) fn shape(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let dims = cx.b.shape(x.id);
    let r = dims.len() as i64;
    let clamp = |v: i64| {
        let v = if v < 0 { v + r } else { v };
        v.clamp(0, r) as usize
    };
    let start = clamp(n.int("start", 0)?);
    let end = clamp(n.int_opt("end")?.unwrap_or(r));
    let dims = if start < end { dims[start..end].to_vec() } else { vec![] };
    let id = cx.b.materialize(&ShapeValue::vector(dims), DType::I64)?;
    one(cx.val(id))
}

pub(crate) fn size(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let d = Dim::product(&cx.b.shape(x.id));
    let id = cx.b.materialize(&ShapeValue::scalar(d), DType::I64)?;
    one(cx.val(id))
}

/// `Range(start, limit, delta)`: max(ceil((limit - start) / delta), 0) values.
pub(crate) fn range(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (s, l, d) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let dtype = cx.b.dtype(s.id);
    if dtype.is_int() {
        let first = |v: Val, what: &str| -> R<Dim> {
            let d = cx.dims(v, what)?.first().cloned().ok_or_else(|| format!("{what} is empty"))?;
            match d.as_const() {
                Some(c) if c.abs() > super::MAX_DIM => Err(format!("{what} is {c}, too large a range bound")),
                _ => Ok(d),
            }
        };
        let start = first(s, "start")?;
        let limit = first(l, "limit")?;
        let delta = first(d, "delta")?.as_const().ok_or_else(|| format!("delta {NOT_STATIC} as a constant"))?;
        if delta == 0 {
            return Err("delta is 0".into());
        }
        let id = cx.b.add(Op::Range { start, end: limit, step: delta, dtype }, &[])?;
        return one(cx.same(s, id));
    }
    let get = |v: Val, what: &str| -> R<f64> {
        cx.b.konst(v.id)
            .and_then(|t| (t.numel() == 1).then(|| t.get_f64(0)))
            .ok_or_else(|| format!("{what} of a floating-point Range {NOT_STATIC} (a constant)"))
    };
    let (start, limit, delta) = (get(s, "start")?, get(l, "limit")?, get(d, "delta")?);
    if delta == 0.0 || !delta.is_finite() {
        return Err(format!("delta is {delta}"));
    }
    let count = ((limit - start) / delta).ceil().max(0.0);
    if count > 1e8 {
        return Err(format!("Range would have {count} elements"));
    }
    // Each value is start + i * delta computed in the tensor's type, as the
    // ONNX function body accumulates it.
    let vals: Vec<f64> = (0..count as usize).map(|i| start + i as f64 * delta).collect();
    let t = Tensor::from_f64(dtype, vec![vals.len()], vals).map_err(|e| e.to_string())?;
    let id = cx.b.constant(t);
    one(cx.same(s, id))
}

/// `ConstantOfShape(shape)` with its `value` (f32 zero by default).
pub(crate) fn constant_of_shape(cx: &mut Importer, n: &Node) -> R<Outs> {
    let shape = cx.size_dims(n.input(0)?, "the shape")?;
    let (value, ety) = match n.attrs.tensor("value").map_err(|e| e.to_string())? {
        Some(t) => {
            let (t, ety) = dtypes::decode(cx.model, t)?;
            if t.numel() != 1 {
                return Err(format!("value must have one element, found {}", t.numel()));
            }
            (t.get_f64(0), ety)
        }
        None => (0.0, DataType::Float),
    };
    let (dtype, _) = dtypes::carrier(ety).ok_or("value has an unsupported type")?;
    let id = cx.b.add(Op::Fill { shape, value, dtype }, &[])?;
    one(Val { id, ety })
}
