//! Validating a native model's inputs (every input present and no unknown
//! name, well-formed tensors, dtypes and ranks as declared) and binding the
//! shape symbols from their shapes with `smelt_ir::bind::bind_shapes`, the
//! algorithm the reference interpreter uses too.

use std::collections::BTreeMap;

use smelt_ir::bind::{bind_shapes, BindError};
use smelt_ir::{DType, Data, Dim, Tensor};

use super::NativeError;

/// What the model declares for one input.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl InputSpec {
    /// `i64[batch, seq]`.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.dtype, dims.join(", "))
    }
}

/// Why a tensor's storage does not hold its dtype and shape, if it does not.
pub fn malformed(t: &Tensor) -> Option<String> {
    let (len, ok) = match &t.data {
        Data::F32(v) => (v.len(), matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16)),
        Data::F64(v) => (v.len(), t.dtype == DType::F64),
        Data::I64(v) => (v.len(), t.dtype.is_int()),
        Data::Bool(v) => (v.len(), t.dtype == DType::Bool),
    };
    if !ok {
        return Some(format!("its storage does not hold dtype {}", t.dtype));
    }
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel != Some(len) {
        return Some(format!("{len} elements do not fill shape {:?}", t.shape));
    }
    None
}

/// Checks `inputs` against `specs` and returns the symbol values.
pub fn bind_symbols(
    specs: &[InputSpec],
    inputs: &BTreeMap<String, Tensor>,
    bounds: &BTreeMap<String, (i64, i64)>,
) -> Result<BTreeMap<String, i64>, NativeError> {
    bind_symbols_with(specs, inputs, &BTreeMap::new(), bounds)
}

/// [`bind_symbols`] where some inputs are already in place (a GPU model's
/// device-resident KV cache): `resident` gives their shapes, their dtype is
/// the declared one, and they bind symbols like the tensors given.
pub fn bind_symbols_with(
    specs: &[InputSpec],
    inputs: &BTreeMap<String, Tensor>,
    resident: &BTreeMap<String, Vec<usize>>,
    bounds: &BTreeMap<String, (i64, i64)>,
) -> Result<BTreeMap<String, i64>, NativeError> {
    bind_symbols_known(specs, &|name| specs.iter().any(|s| s.name == name), inputs, resident, bounds)
}

/// [`bind_symbols_with`], with `declared` saying whether a name is one of
/// `specs`' (a caller that binds often looks it up in a set made once).
pub fn bind_symbols_known(
    specs: &[InputSpec],
    declared: &dyn Fn(&str) -> bool,
    inputs: &BTreeMap<String, Tensor>,
    resident: &BTreeMap<String, Vec<usize>>,
    bounds: &BTreeMap<String, (i64, i64)>,
) -> Result<BTreeMap<String, i64>, NativeError> {
    if let Some(name) = inputs.keys().chain(resident.keys()).find(|k| !declared(k)) {
        return Err(NativeError::UnknownInput {
            name: name.clone(),
            expected: specs.iter().map(|s| s.name.clone()).collect(),
        });
    }
    if let Some(name) = inputs.keys().find(|k| resident.contains_key(*k)) {
        return Err(NativeError::BadInput {
            name: name.clone(),
            why: "the model already holds it (its cache is on the device); do not pass it".to_string(),
        });
    }
    let mut given: Vec<(&InputSpec, &[usize])> = Vec::with_capacity(specs.len());
    let mut last_resident: Option<(&InputSpec, &[usize])> = None;
    for spec in specs {
        if let Some(shape) = resident.get(&spec.name) {
            if shape.len() != spec.shape.len() {
                return Err(NativeError::InputRank {
                    name: spec.name.clone(),
                    expected: spec.describe(),
                    rank: spec.shape.len(),
                    found: shape.clone(),
                });
            }
            // A device cache's keys and values follow each other with the
            // same declared dims and the same shape: binding one of them
            // binds the same symbols and fails the same checks as binding
            // each, for a fraction of the work.
            if last_resident.is_some_and(|(s, sh)| sh == shape.as_slice() && s.shape == spec.shape) {
                continue;
            }
            last_resident = Some((spec, shape));
            given.push((spec, shape));
            continue;
        }
        let t = inputs
            .get(&spec.name)
            .ok_or_else(|| NativeError::MissingInput { name: spec.name.clone(), expected: spec.describe() })?;
        if let Some(why) = malformed(t) {
            return Err(NativeError::BadInput { name: spec.name.clone(), why });
        }
        if t.dtype != spec.dtype {
            return Err(NativeError::InputDType {
                name: spec.name.clone(),
                expected: spec.dtype.to_string(),
                found: t.dtype.to_string(),
            });
        }
        if t.shape.len() != spec.shape.len() {
            return Err(NativeError::InputRank {
                name: spec.name.clone(),
                expected: spec.describe(),
                rank: spec.shape.len(),
                found: t.shape.clone(),
            });
        }
        given.push((spec, &t.shape));
    }
    let shapes: Vec<(&str, &[Dim], &[usize])> =
        given.iter().map(|&(spec, shape)| (spec.name.as_str(), spec.shape.as_slice(), shape)).collect();
    let bounds = |s: &str| bounds.get(s).copied();
    bind_shapes(&shapes, &bounds).map_err(|e| match e {
        BindError::Dim { input, axis, expected, found } => NativeError::InputDim { name: input, axis, expected, found },
        BindError::OutOfBounds { symbol, value, input, axis, min, max } => {
            NativeError::SymbolOutOfBounds { symbol, value, name: input, axis, min, max }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[&str]) -> InputSpec {
        InputSpec { name: name.into(), dtype, shape: shape.iter().map(|s| s.parse().unwrap()).collect() }
    }

    fn t(dtype: DType, shape: Vec<usize>) -> Tensor {
        Tensor::full(dtype, shape, 1.0)
    }

    fn specs() -> Vec<InputSpec> {
        vec![
            spec("mask", DType::I64, &["batch", "past + seq"]),
            spec("ids", DType::I64, &["batch", "seq"]),
            spec("past", DType::F32, &["batch", "2", "past", "4"]),
        ]
    }

    fn bounds() -> BTreeMap<String, (i64, i64)> {
        [("batch", (1, 4)), ("seq", (1, 8)), ("past", (0, 8))].into_iter().map(|(n, b)| (n.to_string(), b)).collect()
    }

    #[test]
    fn expressions_are_checked_after_symbols_bind() {
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), t(DType::I64, vec![2, 3]));
        inputs.insert("mask".to_string(), t(DType::I64, vec![2, 8]));
        inputs.insert("past".to_string(), t(DType::F32, vec![2, 2, 5, 4]));
        let syms = bind_symbols(&specs(), &inputs, &bounds()).unwrap();
        assert_eq!(syms.get("past"), Some(&5));
        inputs.insert("mask".to_string(), t(DType::I64, vec![2, 7]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert_eq!(e, "input `mask` axis 1: expected past + seq = 8, found 7");
        // Without `past`'s own shape, the mask solves for it.
        let specs2 = &specs()[..2];
        inputs.remove("past");
        let syms = bind_symbols(specs2, &inputs, &bounds()).unwrap();
        assert_eq!(syms.get("past"), Some(&4));
    }

    #[test]
    fn resident_inputs_bind_by_shape() {
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), t(DType::I64, vec![1, 1]));
        inputs.insert("mask".to_string(), t(DType::I64, vec![1, 6]));
        let resident: BTreeMap<String, Vec<usize>> = [("past".to_string(), vec![1, 2, 5, 4])].into_iter().collect();
        let syms = bind_symbols_with(&specs(), &inputs, &resident, &bounds()).unwrap();
        assert_eq!(syms.get("past"), Some(&5));
        inputs.insert("mask".to_string(), t(DType::I64, vec![1, 5]));
        let e = bind_symbols_with(&specs(), &inputs, &resident, &bounds()).unwrap_err().to_string();
        assert_eq!(e, "input `mask` axis 1: expected past + seq = 6, found 5");
        inputs.insert("mask".to_string(), t(DType::I64, vec![1, 6]));
        inputs.insert("past".to_string(), t(DType::F32, vec![1, 2, 5, 4]));
        let e = bind_symbols_with(&specs(), &inputs, &resident, &bounds()).unwrap_err().to_string();
        assert!(e.contains("the model already holds it"), "{e}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), t(DType::I64, vec![2, 3]));
        inputs.insert("mask".to_string(), t(DType::I64, vec![2, 8]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert_eq!(e, "missing input `past` (expected f32[batch, 2, past, 4])");
        inputs.insert("past".to_string(), t(DType::F32, vec![2, 3, 5, 4]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert_eq!(e, "input `past` axis 1: expected 2, found 3");
        inputs.insert("past".to_string(), t(DType::F32, vec![2, 2, 5]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert!(e.starts_with("input `past`: expected rank 4"), "{e}");
        inputs.insert("past".to_string(), t(DType::I64, vec![2, 2, 5, 4]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert_eq!(e, "input `past`: expected dtype f32, found i64");
        inputs.insert("past".to_string(), t(DType::F32, vec![2, 2, 5, 4]));
        inputs.insert("ids".to_string(), t(DType::I64, vec![2, 9]));
        inputs.insert("mask".to_string(), t(DType::I64, vec![2, 14]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert!(e.starts_with("symbol `seq` = 9"), "{e}");
        inputs.insert("idz".to_string(), t(DType::I64, vec![2, 9]));
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert!(e.starts_with("unknown input `idz`"), "{e}");
        inputs.remove("idz");
        let bad = Tensor { dtype: DType::F32, shape: vec![2, 2, 5, 4], data: Data::F32(vec![0.0; 3]) };
        inputs.insert("past".to_string(), bad);
        let e = bind_symbols(&specs(), &inputs, &bounds()).unwrap_err().to_string();
        assert!(e.contains("do not fill"), "{e}");
    }
}
