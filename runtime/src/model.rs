//! [`InterpModel`]: a graph and its weights run by the reference interpreter
//! (`smelt_ir::interp::run`), as a [`Forward`] model.
//!
//! Decoder graphs built by the frontends require every input of the
//! decoder-with-past signature; callers may leave out the optional ones and
//! get the obvious defaults here:
//! - no `past_key_values.*` at all: an empty cache, `[batch, kv_heads, 0,
//!   head_dim]` zeros (`kv_heads` and `head_dim` are the graph's constants);
//! - no `attention_mask`: all ones, `[batch, past + seq]`;
//! - no `position_ids`: `past..past + seq` for every row.
//!
//! Here `batch` and `seq` come from `input_ids`, and `past` from axis 2 of
//! the past key/values given (or is 0). Defaults are only filled when they
//! can be: if `input_ids` is missing or malformed, or only some past tensors
//! are given, nothing is invented and the interpreter's own validation names
//! the problem (missing input, wrong dtype or shape, unknown name).

use std::collections::BTreeMap;

use smelt_ir::{DType, Graph, Tensor};

use crate::artifact::{check_weights, Artifact, ArtifactError, Signature};
use crate::generate::{Forward, ForwardError};

/// A model run by the reference interpreter.
#[derive(Debug, Clone)]
pub struct InterpModel {
    graph: Graph,
    weights: BTreeMap<String, Tensor>,
    signature: Signature,
}

impl InterpModel {
    /// Wraps a verified graph and the weights it references.
    pub fn new(graph: Graph, weights: BTreeMap<String, Tensor>) -> Result<InterpModel, ArtifactError> {
        check_weights(&graph, &weights)?;
        let signature = Signature::from_graph(&graph);
        Ok(InterpModel { graph, weights, signature })
    }

    /// Loads an `interp` artifact (its graph is parsed and verified).
    pub fn from_artifact(a: &Artifact) -> Result<InterpModel, ArtifactError> {
        InterpModel::new(a.graph()?, a.weights()?)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Adds the defaults for the optional decoder inputs the caller left out
    /// (see the module docs and [`fill_defaults`]).
    pub fn fill_defaults(&self, inputs: &mut BTreeMap<String, Tensor>) {
        fill_defaults(&self.signature, inputs);
    }
}

/// Adds to `inputs` the defaults for the optional decoder inputs of `sig`
/// that the caller left out (see the module docs). Shared by every backend,
/// so they all fill the same defaults.
pub fn fill_defaults(sig: &Signature, inputs: &mut BTreeMap<String, Tensor>) {
    fill_defaults_after(sig, inputs, None);
}

/// [`fill_defaults`] for a model that holds `resident_past` cached
/// positions itself (a GPU model's device-resident KV cache): no past
/// tensors are added, and the mask and positions cover the cached
/// positions. With `None`, exactly [`fill_defaults`].
pub fn fill_defaults_after(sig: &Signature, inputs: &mut BTreeMap<String, Tensor>, resident_past: Option<usize>) {
    let Some(ids) = inputs.get("input_ids") else {
        return;
    };
    let &[batch, seq] = ids.shape.as_slice() else {
        return;
    };
    let past_inputs: Vec<_> = sig.inputs.iter().filter(|t| t.name.starts_with("past_key_values.")).collect();
    let given_past: Vec<&Tensor> = past_inputs.iter().filter_map(|t| inputs.get(&t.name)).collect();
    let past_len = match (resident_past, given_past.first()) {
        (Some(n), _) => n,
        (None, Some(t)) => match t.shape.get(2) {
            Some(&n) => n,
            None => return,
        },
        (None, None) => 0,
    };
    if given_past.is_empty() && resident_past.is_none() {
        for past in &past_inputs {
            let Ok(ty) = past.tensor_type() else { return };
            // [batch, kv_heads, past, head_dim] with constant heads and size.
            let (Some(h), Some(d)) =
                (ty.shape.get(1).and_then(|d| d.as_const()), ty.shape.get(3).and_then(|d| d.as_const()))
            else {
                return;
            };
            if ty.shape.len() != 4 || h < 0 || d < 0 {
                return;
            }
            let empty = Tensor::full(ty.dtype, vec![batch, h as usize, 0, d as usize], 0.0);
            inputs.insert(past.name.clone(), empty);
        }
    }
    let int_dtype = |name: &str| sig.input(name).and_then(|s| s.dtype.parse::<DType>().ok()).unwrap_or(DType::I64);
    if sig.input("attention_mask").is_some() && !inputs.contains_key("attention_mask") {
        let n = past_len + seq;
        if let Ok(t) = Tensor::from_i64(int_dtype("attention_mask"), vec![batch, n], vec![1; batch * n]) {
            inputs.insert("attention_mask".to_string(), t);
        }
    }
    if sig.input("position_ids").is_some() && !inputs.contains_key("position_ids") {
        let row = (past_len..past_len + seq).map(|p| p as i64);
        let values: Vec<i64> = (0..batch).flat_map(|_| row.clone()).collect();
        if let Ok(t) = Tensor::from_i64(int_dtype("position_ids"), vec![batch, seq], values) {
            inputs.insert("position_ids".to_string(), t);
        }
    }
}

impl Forward for InterpModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn forward(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        self.fill_defaults(&mut inputs);
        Ok(smelt_ir::interp::run(&self.graph, &self.weights, &inputs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::{Dim, Op, TensorType};

    /// A decoder-shaped toy: logits = embed(ids) + mean(mask) + mean(pos),
    /// present = concat(past, k) where k = embed(ids) as one head of size 2.
    fn toy() -> InterpModel {
        let mut g = Graph::new("toy");
        g.declare_symbol("batch", 1, 8);
        g.declare_symbol("seq", 1, 16);
        g.declare_symbol("past", 0, 16);
        let (b, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
        let ids = g.add_input("input_ids", TensorType::new(DType::I64, vec![b.clone(), s.clone()]));
        let mask = g.add_input("attention_mask", TensorType::new(DType::I64, vec![b.clone(), p.clone() + s.clone()]));
        let pos = g.add_input("position_ids", TensorType::new(DType::I64, vec![b.clone(), s.clone()]));
        let past =
            g.add_input("past_key_values.0.key", TensorType::new(DType::F32, vec![b.clone(), Dim::c(1), p, Dim::c(2)]));
        let table = g.add_weight("embed", TensorType::fixed(DType::F32, &[4, 2]));
        let e = g.add(Op::Gather { axis: 0 }, &[table, ids]).unwrap();
        let mf = g.add(Op::Cast { to: DType::F32 }, &[mask]).unwrap();
        let mm = g.add(Op::ReduceSum { axes: vec![1], keepdims: true }, &[mf]).unwrap();
        let pf = g.add(Op::Cast { to: DType::F32 }, &[pos]).unwrap();
        let pm = g.add(Op::ReduceSum { axes: vec![1], keepdims: true }, &[pf]).unwrap();
        let mm3 = g.add(Op::Unsqueeze { axes: vec![2] }, &[mm]).unwrap();
        let pm3 = g.add(Op::Unsqueeze { axes: vec![2] }, &[pm]).unwrap();
        let l0 = g.add(Op::Add {}, &[e, mm3]).unwrap();
        let logits = g.add(Op::Add {}, &[l0, pm3]).unwrap();
        g.set_output("logits", logits);
        let k = g.add(Op::Unsqueeze { axes: vec![1] }, &[e]).unwrap();
        let present = g.add(Op::Concat { axis: 2 }, &[past, k]).unwrap();
        g.set_output("present.0.key", present);
        let mut w = BTreeMap::new();
        w.insert(
            "embed".to_string(),
            Tensor::from_f32(DType::F32, vec![4, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]).unwrap(),
        );
        InterpModel::new(g, w).unwrap()
    }

    fn ids(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        Tensor::from_i64(DType::I64, shape, v).unwrap()
    }

    #[test]
    fn input_ids_alone_is_a_plain_forward() {
        let mut m = toy();
        let mut inputs = BTreeMap::new();
        inputs.insert("input_ids".to_string(), ids(vec![2, 3], vec![0, 1, 2, 3, 2, 1]));
        let filled = {
            let mut i = inputs.clone();
            m.fill_defaults(&mut i);
            i
        };
        assert_eq!(filled["attention_mask"].to_i64_vec(), vec![1; 6]);
        assert_eq!(filled["position_ids"].to_i64_vec(), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(filled["past_key_values.0.key"].shape, vec![2, 1, 0, 2]);
        let out = m.forward(inputs).unwrap();
        // Row 0, token 0: embed [0, 1] + mask sum 3 + position sum 3.
        assert_eq!(&out["logits"].to_f32_vec()[..2], &[6.0, 7.0]);
        assert_eq!(out["present.0.key"].shape, vec![2, 1, 3, 2]);
    }

    #[test]
    fn defaults_follow_the_given_past() {
        let m = toy();
        let mut inputs = BTreeMap::new();
        inputs.insert("input_ids".to_string(), ids(vec![1, 2], vec![0, 1]));
        inputs.insert("past_key_values.0.key".to_string(), Tensor::full(DType::F32, vec![1, 1, 5, 2], 0.5));
        m.fill_defaults(&mut inputs);
        assert_eq!(inputs["attention_mask"].shape, vec![1, 7]);
        assert_eq!(inputs["position_ids"].to_i64_vec(), vec![5, 6]);
    }

    #[test]
    fn bad_inputs_get_the_interpreters_message() {
        let mut m = toy();
        let mut inputs = BTreeMap::new();
        inputs.insert("input_id".to_string(), ids(vec![1, 2], vec![0, 1]));
        let e = m.forward(inputs).unwrap_err().to_string();
        assert!(e.contains("input_ids"), "{e}");
        let mut inputs = BTreeMap::new();
        inputs.insert("input_ids".to_string(), Tensor::from_f32(DType::F32, vec![1, 2], vec![0.0, 1.0]).unwrap());
        let e = m.forward(inputs).unwrap_err().to_string();
        assert_eq!(e, "input `input_ids`: expected dtype i64, found f32");
    }
}
