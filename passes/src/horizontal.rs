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
use smelt_ir::{DType, Dim, Graph, NodeId, Op, StoredTensor, Tensor, TensorType, ValueId};
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
    /// The dtype the graph declares the weight stored in.
    stored: DType,
    /// The operand's shape (`[k, n]`).
    shape: [usize; 2],
}

fn trace(g: &Graph, mut v: ValueId) -> Option<WeightView> {
    let ty = g.ty(v);
    let dtype = ty.dtype;
    let shape = match ty.const_shape()?[..] {
        [k, n] => [k, n],
        _ => return None,
    };
    let mut chain = Vec::new();
    loop {
        let node = g.def(v);
        match &node.op {
            Op::Weight { name } => {
                chain.reverse();
                let stored = g.ty(v).dtype;
                return Some(WeightView { name: name.clone(), chain, dtype, stored, shape });
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

/// One weight of a join: the weight, the movement ops applied to it
/// (innermost first) and the `[k, n]` shape they give.
pub struct JoinPart<'a> {
    pub weight: &'a str,
    pub chain: &'a [Op],
    pub shape: [usize; 2],
}

/// What horizontal fusion needs of a weight store: adding a joined weight
/// and dropping the weights no longer referenced. Implemented for
/// [`Weights`] (tensors) and for [`StoredTensor`]s (what a compile reads,
/// kept in their stored bytes).
pub trait WeightStore {
    /// Adds the weight `name`: each part evaluated, and the results
    /// concatenated along axis 1. Returns false, adding nothing, when a part
    /// is missing, is not stored as `dtype` or does not evaluate to its shape.
    fn join(&mut self, name: &str, dtype: DType, parts: &[JoinPart<'_>]) -> bool;

    /// Keeps only the weights for which `keep` is true.
    fn retain_weights(&mut self, keep: &dyn Fn(&str) -> bool);
}

/// A part evaluated with the reference interpreter.
fn eval(t: &Tensor, part: &JoinPart<'_>) -> Option<Tensor> {
    let mut t = t.clone();
    for op in part.chain {
        t = smelt_ir::interp::eval_op(op, &[&t], &BTreeMap::new()).ok()?.pop()?;
    }
    Some(t)
}

impl WeightStore for Weights {
    fn join(&mut self, name: &str, dtype: DType, parts: &[JoinPart<'_>]) -> bool {
        let mut tensors = Vec::with_capacity(parts.len());
        for p in parts {
            match self.get(p.weight).filter(|t| t.dtype == dtype).and_then(|t| eval(t, p)) {
                Some(t) if t.shape == p.shape => tensors.push(t),
                _ => return false,
            }
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        match smelt_ir::interp::eval_op(&Op::Concat { axis: 1 }, &refs, &BTreeMap::new()) {
            Ok(mut joined) => {
                self.insert(name.to_string(), joined.remove(0));
                true
            }
            Err(_) => false,
        }
    }

    fn retain_weights(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.retain(|n, _| keep(n));
    }
}

impl WeightStore for BTreeMap<String, StoredTensor> {
    fn join(&mut self, name: &str, dtype: DType, parts: &[JoinPart<'_>]) -> bool {
        let rows = parts[0].shape[0];
        let cols: usize = parts.iter().map(|p| p.shape[1]).sum();
        let esize = dtype.size_bytes();
        let mut out = vec![0u8; rows * cols * esize];
        let mut at = 0;
        for p in parts {
            let Some(w) = self.get(p.weight).filter(|t| t.dtype == dtype) else { return false };
            let [k, n] = p.shape;
            if k != rows {
                return false;
            }
            if matches!(p.chain, [Op::Transpose { perm }] if perm[..] == [1, 0]) && w.shape == [n, k] {
                // The usual case, `transpose(w)` of a checkpoint's `[n, k]`
                // weight: transposed straight into its columns.
                smelt_ir::stored::transpose_into(w.bytes(), n, k, esize, &mut out, cols, at);
            } else {
                let Some(t) = eval(&w.to_tensor(), p).filter(|t| t.shape == p.shape) else { return false };
                let bytes = t.to_le_bytes();
                for (r, row) in bytes.chunks_exact(n * esize).enumerate() {
                    out[(r * cols + at) * esize..][..n * esize].copy_from_slice(row);
                }
            }
            at += n;
        }
        match StoredTensor::from_bytes(name, dtype, vec![rows, cols], out) {
            Ok(t) => {
                self.insert(name.to_string(), t);
                true
            }
            Err(_) => false,
        }
    }

    fn retain_weights(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.retain(|n, _| keep(n));
    }
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
pub fn run(g: &mut Graph, weights: &mut impl WeightStore) -> Result<(usize, usize), PassError> {
    // Group by left operand, in topological order so the result is stable.
    let mut groups: BTreeMap<ValueId, Vec<(NodeId, WeightView)>> = BTreeMap::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        if !matches!(node.op, Op::MatMul {}) {
            continue;
        }
        let (x, w) = (node.inputs[0], node.inputs[1]);
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
        let (dtype, stored, rows) = (members[0].1.dtype, members[0].1.stored, members[0].1.shape[0]);
        if members.iter().any(|(_, v)| v.dtype != dtype || v.stored != stored || v.shape[0] != rows) {
            continue;
        }
        let names: Vec<String> = members.iter().map(|(_, v)| v.name.clone()).collect();
        let name = joined_name(&names);
        let parts: Vec<JoinPart<'_>> =
            members.iter().map(|(_, v)| JoinPart { weight: &v.name, chain: &v.chain, shape: v.shape }).collect();
        if !weights.join(&name, stored, &parts) {
            continue;
        }
        let cols = members.iter().map(|(_, v)| v.shape[1]).sum::<usize>();
        let mut w = g.add_weight(&name, TensorType::fixed(stored, &[rows, cols]));
        if stored != dtype {
            w = g.add(Op::Cast { to: dtype }, &[w])?;
        }
        let label = g.node(members[0].0).label.clone();
        let mm = g.add_labeled(Op::MatMul {}, &[x, w], label.as_deref())?;
        let mut offset = 0;
        for (n, v) in &members {
            let width = v.shape[1];
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
    weights.retain_weights(&|n| !replaced.contains(n) || live.contains(n));
    Ok((n_groups, n_members))
}
