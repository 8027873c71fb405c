//! Stage `horizontal`: matmuls that share their left operand and whose right
//! operands are weights (seen through movement and casts: `transpose(w)`,
//! `cast(w)`, `slice(w)`) become one matmul against the concatenated
//! weight, followed by a slice per original result: q/k/v projections
//! become one `qkv` matmul. The concatenated weight is computed here, at
//! compile time, in the stored dtype (a cast after it keeps the graph's
//! compute dtype), and added to the weight store; weights no longer
//! referenced afterwards are removed from the store.

use crate::error::PassError;
use crate::Weights;
use smelt_ir::{DType, Dim, Graph, NodeId, Op, Tensor, TensorType, ValueId};
use std::collections::{BTreeMap, HashSet};

/// A matmul's right operand traced back to a weight.
struct WeightView {
    /// The weight's name.
    name: String,
    /// The movement ops from the weight to the operand, innermost first
    /// (casts left out: they commute with movement and are applied after).
    chain: Vec<Op>,
    /// The compute dtype the operand has in the graph.
    dtype: DType,
}

fn trace(g: &Graph, mut v: ValueId) -> Option<WeightView> {
    let dtype = g.ty(v).dtype;
    let mut chain = Vec::new();
    loop {
        let node = g.def(v);
        match &node.op {
            Op::Weight { name } => {
                chain.reverse();
                return Some(WeightView { name: name.clone(), chain, dtype });
            }
            Op::Cast { to } if to.is_float() => v = node.inputs[0],
            op @ (Op::Transpose { .. } | Op::Slice { .. } | Op::Reshape { .. }) => {
                chain.push(op.clone());
                v = node.inputs[0];
            }
            _ => return None,
        }
    }
}

fn eval(view: &WeightView, weights: &Weights) -> Option<Tensor> {
    let mut t = weights.get(&view.name)?.clone();
    for op in &view.chain {
        t = smelt_ir::interp::eval_op(op, &[&t], &BTreeMap::new()).ok()?.pop()?;
    }
    Some(t)
}

/// A short name for the joined weight: the common prefix, then the parts.
fn joined_name(names: &[String]) -> String {
    let first = &names[0];
    let mut prefix = first.len();
    for n in &names[1..] {
        prefix = prefix.min(first.bytes().zip(n.bytes()).take_while(|(a, b)| a == b).count());
    }
    let prefix = first[..prefix].rfind('.').map(|i| i + 1).unwrap_or(0);
    let parts: Vec<&str> = names.iter().map(|n| &n[prefix..]).collect();
    format!("{}{{{}}}", &first[..prefix], parts.join(","))
}

/// Returns (groups, matmuls joined).
pub fn run(g: &mut Graph, weights: &mut Weights) -> Result<(usize, usize), PassError> {
    // Group by left operand, in topological order so the result is stable.
    let mut groups: BTreeMap<ValueId, Vec<(NodeId, WeightView)>> = BTreeMap::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        if !matches!(node.op, Op::MatMul {}) {
            continue;
        }
        let (x, w) = (node.inputs[0], node.inputs[1]);
        if g.ty(w).rank() != 2 {
            continue;
        }
        if let Some(view) = trace(g, w) {
            groups.entry(x).or_default().push((n, view));
        }
    }
    let (mut n_groups, mut n_members) = (0, 0);
    let mut replaced: HashSet<String> = HashSet::new();
    for (x, members) in groups {
        if members.len() < 2 {
            continue;
        }
        let dtype = members[0].1.dtype;
        if members.iter().any(|(_, v)| v.dtype != dtype) {
            continue;
        }
        let Some(tensors) = members.iter().map(|(_, v)| eval(v, weights)).collect::<Option<Vec<Tensor>>>() else {
            continue;
        };
        let stored = tensors[0].dtype;
        let rows = tensors[0].shape[0];
        if tensors.iter().any(|t| t.dtype != stored || t.shape.len() != 2 || t.shape[0] != rows) {
            continue;
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let joined = smelt_ir::interp::eval_op(&Op::Concat { axis: 1 }, &refs, &BTreeMap::new())
            .map_err(|e| PassError::Stage { stage: "horizontal".into(), message: e.to_string() })?
            .remove(0);
        let names: Vec<String> = members.iter().map(|(_, v)| v.name.clone()).collect();
        let name = joined_name(&names);
        let cols = joined.shape[1];
        let mut w = g.add_weight(&name, TensorType::fixed(stored, &[rows, cols]));
        weights.insert(name, joined);
        if stored != dtype {
            w = g.add(Op::Cast { to: dtype }, &[w])?;
        }
        let label = g.node(members[0].0).label.clone();
        let mm = g.add_labeled(Op::MatMul {}, &[x, w], label.as_deref())?;
        let mut offset = 0;
        for ((n, _), t) in members.iter().zip(&tensors) {
            let width = t.shape[1];
            let part = g.add_labeled(
                Op::Slice {
                    axes: vec![-1],
                    starts: vec![Dim::from(offset)],
                    ends: vec![Dim::from(offset + width)],
                    steps: vec![1],
                },
                &[mm],
                g.node(*n).label.clone().as_deref(),
            )?;
            offset += width;
            let old = g.node(*n).outputs[0];
            g.replace_all_uses(old, part);
        }
        replaced.extend(names);
        n_groups += 1;
        n_members += members.len();
    }
    g.remove_dead();
    let live: HashSet<String> = g.weights().into_iter().map(|(n, _)| n).collect();
    weights.retain(|n, _| !replaced.contains(n) || live.contains(n));
    Ok((n_groups, n_members))
}
