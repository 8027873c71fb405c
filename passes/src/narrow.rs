//! Narrow activations: the values that carry the hidden state become
//! `bf16` or `f16` (`smelt compile --target cuda --dtype bf16|f16`), every
//! other value keeps its type. Not a pipeline stage: the GPU compile runs it
//! on the fused graph just before scheduling, and the reference interpreter
//! runs the result as the oracle of the narrow kernels.
//!
//! Which values narrow ("hidden"): values computed by a node (not inputs,
//! weights or constants) that depend on a float graph input or on an
//! embedding lookup (a `gather` from a float table with indices computed
//! from the `input_ids` graph input), propagated forward through every op
//! with a float result. Values computed only from integer inputs and
//! constants stay f32: rope's cos/sin (from positions: rounding
//! `position * inv_freq` to bf16 would ruin long positions), masks, and a
//! rotary table gathered by positions. Graph inputs and outputs keep their
//! types: the logits stay f32, and so do the KV caches (`past`/`present`;
//! a narrow KV cache is a follow-up).
//!
//! Semantics: every op computes in f32 (the interpreter's fused ops compute
//! in f32, its primitives in f64) and rounds its result to the result's
//! type. Where an op's operands would then mix narrow and f32 values (a
//! matmul with an f32 weight, rope with f32 tables, a KV append of a narrow
//! key to an f32 cache, attention on f32 caches), the narrow operands are
//! widened with an explicit `cast` to f32 (exact), the op runs on f32 values
//! and its result is cast back to the narrow type when it carries the hidden
//! state. So the narrowed graph is ordinary IR: it verifies, and the
//! interpreter rounds exactly where the kernels do. The GPU scheduler makes
//! those casts free: a widening cast is a view of the narrow buffer (kernels
//! widen as they load), and a narrowing cast of a kernel's only result is
//! the kernel storing narrow (rounding as it stores).
//!
//! Assumes a verified graph whose float values are f32 (what the frontends
//! and the pipeline produce); other float types are left as they are.

use std::collections::{HashMap, HashSet};

use smelt_ir::{DType, Graph, Op, ValueId};

use crate::PassError;

/// The name of the token ids input whose embedding lookups seed the hidden
/// state (the fixtures' and the HF frontend's convention).
pub const TOKEN_IDS: &str = "input_ids";

/// The graph with its hidden-state values in `to` (`BF16` or `F16`), and
/// how many values were narrowed.
pub fn narrow_activations(g: &Graph, to: DType) -> Result<(Graph, usize), PassError> {
    let stage = |message: String| PassError::Stage { stage: "narrow".into(), message };
    if !matches!(to, DType::BF16 | DType::F16) {
        return Err(stage(format!("activations narrow to bf16 or f16, not {to}")));
    }
    let order = g.topo_order()?;
    let hidden = hidden_values(g, &order);
    let mut out = Graph::new(&g.name);
    for (name, b) in g.symbols() {
        out.declare_symbol(name, b.min, b.max);
    }
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let mut narrowed = 0;
    for n in order {
        let node = g.node(n);
        let label = node.label.as_deref();
        match &node.op {
            Op::Input { name } => {
                map.insert(node.outputs[0], out.add_input(name, g.ty(node.outputs[0]).clone()));
                continue;
            }
            Op::Weight { name } => {
                map.insert(node.outputs[0], out.add_weight(name, g.ty(node.outputs[0]).clone()));
                continue;
            }
            _ => {}
        }
        let operands: Vec<ValueId> = node.inputs.iter().map(|v| map[v]).collect();
        // The type each result should have.
        let target = |v: ValueId| -> DType {
            let d = g.ty(v).dtype;
            if d == DType::F32 && hidden.contains(&v) && !g.is_output(v) {
                to
            } else {
                d
            }
        };
        let results = match &node.op {
            // A float cast of a hidden value casts to the value's new type.
            Op::Cast { to: t } if t.is_float() && hidden.contains(&node.outputs[0]) => {
                let want = target(node.outputs[0]);
                let want = if *t == DType::F32 { want } else { *t };
                let x = operands[0];
                vec![if out.ty(x).dtype == want { x } else { out.add_labeled(Op::Cast { to: want }, &[x], label)? }]
            }
            op => match out.add_multi(op.clone(), &operands, label) {
                Ok(r) => r,
                Err(_) => {
                    // Mixed operands: widen the narrow ones (exactly).
                    let mut wide = Vec::with_capacity(operands.len());
                    for &v in &operands {
                        wide.push(if out.ty(v).dtype == to {
                            out.add_labeled(Op::Cast { to: DType::F32 }, &[v], label)?
                        } else {
                            v
                        });
                    }
                    out.add_multi(op.clone(), &wide, label)?
                }
            },
        };
        for (&old, new) in node.outputs.iter().zip(results) {
            let want = target(old);
            let have = out.ty(new).dtype;
            let new = if have != want && have.is_float() && want.is_float() {
                out.add_labeled(Op::Cast { to: want }, &[new], label)?
            } else {
                new
            };
            if want == to {
                narrowed += 1;
            }
            map.insert(old, new);
        }
    }
    for (name, v) in g.outputs() {
        out.set_output(name, map[v]);
    }
    Ok((out, narrowed))
}

/// The values that carry the hidden state (see the module docs).
fn hidden_values(g: &Graph, order: &[smelt_ir::NodeId]) -> HashSet<ValueId> {
    let mut from_tokens: HashSet<ValueId> = HashSet::new();
    let mut hidden: HashSet<ValueId> = HashSet::new();
    for &n in order {
        let node = g.node(n);
        match &node.op {
            Op::Input { name } => {
                let v = node.outputs[0];
                if g.ty(v).dtype.is_float() {
                    hidden.insert(v);
                } else if name == TOKEN_IDS {
                    from_tokens.insert(v);
                }
            }
            Op::Weight { .. } | Op::Constant { .. } => {}
            op => {
                if node.inputs.iter().any(|v| from_tokens.contains(v)) {
                    from_tokens.extend(node.outputs.iter().copied());
                }
                let lookup = matches!(op, Op::Gather { .. })
                    && g.ty(node.inputs[0]).dtype.is_float()
                    && from_tokens.contains(&node.inputs[1]);
                if lookup || node.inputs.iter().any(|v| hidden.contains(v)) {
                    hidden.extend(node.outputs.iter().copied().filter(|v| g.ty(*v).dtype.is_float()));
                }
            }
        }
    }
    hidden
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::{interp, Tensor};
    use std::collections::BTreeMap;

    const LM: &str = r#"
func @lm(%input_ids: i64[1, seq], %pos: i64[1, seq], %past: f32[1, seq2, 4]) -> (logits, present) {
  %e = weight name="embed" : f32[11, 4]
  %h = gather %e, %input_ids axis=0 : f32[1, seq, 4]
  %w = weight name="norm" : f32[4]
  %hn = rms_norm %h, %w eps=0.000001 : f32[1, seq, 4]
  %pf = cast %pos to=f32 : f32[1, seq]
  %pu = unsqueeze %pf axes=[2] : f32[1, seq, 1]
  %c = cos %pu : f32[1, seq, 1]
  %hc = mul %hn, %c : f32[1, seq, 4]
  %present = concat %past, %hc axis=1 : f32[1, seq2 + seq, 4]
  %s = reduce_sum %present axes=[1] keepdims=true : f32[1, 1, 4]
  %x = add %hc, %s : f32[1, seq, 4]
  %et = transpose %e perm=[1, 0] : f32[4, 11]
  %logits = matmul %x, %et : f32[1, seq, 11]
  return logits=%logits, present=%present
}
"#;

    fn weights() -> BTreeMap<String, Tensor> {
        let embed: Vec<f32> = (0..44).map(|i| (i as f32 * 0.731).sin() * 1.7).collect();
        BTreeMap::from([
            ("embed".to_string(), Tensor::from_f32(DType::F32, vec![11, 4], embed).unwrap()),
            ("norm".to_string(), Tensor::from_f32(DType::F32, vec![4], vec![0.9, 1.1, 1.3, 0.7]).unwrap()),
        ])
    }

    /// Hidden values narrow, the cos of positions, the inputs and outputs
    /// keep f32, the narrowed graph verifies and runs, and its logits are
    /// near the f32 graph's.
    #[test]
    fn narrows_the_hidden_state_only() {
        let g = smelt_ir::text::parse(LM).unwrap();
        for to in [DType::BF16, DType::F16] {
            let (n, count) = narrow_activations(&g, to).unwrap();
            smelt_ir::verify::verify(&n).unwrap_or_else(|e| panic!("{e}\n{}", smelt_ir::text::print(&n)));
            let text = smelt_ir::text::print(&n);
            let narrow = to.name();
            assert!(count >= 4, "{count}\n{text}");
            assert!(text.contains("rms_norm %") && text.contains(&format!(": {narrow}[1, seq, 4]")), "{text}");
            assert!(text.contains("cos %") && text.contains(": f32[1, seq, 1]"), "{text}");
            for (name, v) in n.outputs() {
                assert_eq!(n.ty(*v).dtype, DType::F32, "{name}");
            }
            let inputs = BTreeMap::from([
                ("input_ids".to_string(), Tensor::from_i64(DType::I64, vec![1, 3], vec![3, 9, 0]).unwrap()),
                ("pos".to_string(), Tensor::from_i64(DType::I64, vec![1, 3], vec![5, 6, 7]).unwrap()),
                ("past".to_string(), Tensor::from_f32(DType::F32, vec![1, 2, 4], vec![0.3; 8]).unwrap()),
            ]);
            let want = interp::run(&g, &weights(), &inputs).unwrap()["logits"].to_f32_vec();
            let got = interp::run(&n, &weights(), &inputs).unwrap()["logits"].to_f32_vec();
            let err: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
            let norm: f32 = want.iter().map(|b| b * b).sum::<f32>().sqrt();
            assert!(err <= 2e-2 * norm, "{to}: relative error {}", err / norm);
            assert_ne!(got, want, "{to}: nothing was rounded");
        }
    }

    #[test]
    fn refuses_wide_types() {
        let g = smelt_ir::text::parse(LM).unwrap();
        assert!(narrow_activations(&g, DType::F32).is_err());
    }
}
