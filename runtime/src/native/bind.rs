//! Validating a native model's inputs and binding the shape symbols from
//! their shapes, with the same rules (and messages) as the reference
//! interpreter's `bind_symbols`: every input present and no unknown name,
//! well-formed tensors, dtypes and ranks as declared, constant dims equal, a
//! dim that is one symbol binding it (the same value everywhere), a dim that
//! is an expression with one still-unknown symbol (`past + seq` once `seq`
//! is bound) solving for it, symbol bounds respected, and every dim equal to
//! its value at the end.

use std::collections::BTreeMap;

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
    if let Some(name) = inputs.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
        return Err(NativeError::UnknownInput {
            name: name.clone(),
            expected: specs.iter().map(|s| s.name.clone()).collect(),
        });
    }
    let mut given: Vec<(&InputSpec, &Tensor)> = Vec::with_capacity(specs.len());
    for spec in specs {
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
        given.push((spec, t));
    }
    let dim_err = |name: &str, axis: usize, expected: String, found: usize| NativeError::InputDim {
        name: name.to_string(),
        axis,
        expected,
        found,
    };

    // Constants and single symbols first: they fix the symbols' values.
    let mut syms: BTreeMap<String, i64> = BTreeMap::new();
    let mut origin: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for &(spec, t) in &given {
        for (axis, (dim, &found)) in spec.shape.iter().zip(&t.shape).enumerate() {
            if let Some(c) = dim.as_const() {
                if c != found as i64 {
                    return Err(dim_err(&spec.name, axis, c.to_string(), found));
                }
            } else if let Some(s) = dim.as_sym() {
                match syms.get(s) {
                    Some(&v) if v != found as i64 => {
                        let (n0, a0) = &origin[s];
                        let why = format!("{s} = {v} (bound by input `{n0}` axis {a0})");
                        return Err(dim_err(&spec.name, axis, why, found));
                    }
                    Some(_) => {}
                    None => {
                        syms.insert(s.to_string(), found as i64);
                        origin.insert(s.to_string(), (spec.name.clone(), axis));
                    }
                }
            }
        }
    }

    // Then expressions with exactly one unknown symbol, solved as linear
    // equations and verified (so a non-linear dim never binds a wrong
    // value), repeated while that binds something new.
    loop {
        let mut progress = false;
        for &(spec, t) in &given {
            for (axis, (dim, &found)) in spec.shape.iter().zip(&t.shape).enumerate() {
                let unknown: Vec<String> = dim.symbols().into_iter().filter(|s| !syms.contains_key(s)).collect();
                let [s] = unknown.as_slice() else { continue };
                let at = |x: i64| dim.eval(&|n: &str| if n == s { Some(x) } else { syms.get(n).copied() }).ok();
                let found = found as i64;
                let (Some(r0), Some(r1)) = (at(0), at(1)) else { continue };
                let Some((a, rest)) = r1.checked_sub(r0).zip(found.checked_sub(r0)) else { continue };
                if a != 0 && rest.checked_rem(a) == Some(0) {
                    let Some(x) = rest.checked_div(a) else { continue };
                    if at(x) == Some(found) {
                        syms.insert(s.clone(), x);
                        origin.insert(s.clone(), (spec.name.clone(), axis));
                        progress = true;
                    }
                }
            }
        }
        if !progress {
            break;
        }
    }

    for (s, &value) in &syms {
        if let Some(&(min, max)) = bounds.get(s) {
            if value < min || value > max {
                let (name, axis) = origin[s].clone();
                return Err(NativeError::SymbolOutOfBounds { symbol: s.clone(), value, name, axis, min, max });
            }
        }
    }

    for &(spec, t) in &given {
        for (axis, (dim, &found)) in spec.shape.iter().zip(&t.shape).enumerate() {
            match dim.eval_map(&syms) {
                Ok(v) if v == found as i64 => {}
                Ok(v) => return Err(dim_err(&spec.name, axis, format!("{dim} = {v}"), found)),
                Err(e) => return Err(dim_err(&spec.name, axis, format!("{dim} ({e})"), found)),
            }
        }
    }
    Ok(syms)
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
