//! Stage `cleanup`: what fusion leaves behind. An `add` that computes the
//! same sum as an `add_rms_norm` reads result 0 of it instead (so one
//! kernel writes the residual stream and the normalised value), then CSE
//! and DCE run again. It then groups the elementwise primitives left over
//! ([`elementwise_groups`]): codegen schedules each group as one kernel,
//! merged into its producer where it can.
//!
//! A group is an in-tree of elementwise primitives: every member but the
//! root has exactly one user, that user is a member of the group, the value
//! is not a graph output, and it has the root's output shape (so one loop
//! over the root's elements computes the whole group without recomputing
//! or broadcasting an intermediate). Values from outside the group (a
//! scale, a weight, a broadcast mask) are read, never written. Groups are
//! maximal and disjoint; a lone elementwise node is a group of one. The
//! grouping is a deterministic function of the graph, so a scheduler
//! recomputes it from the artifact's IR with the same call; the fusion
//! report lists each group's ops ([`crate::report::ElementwiseGroup`]).

use crate::error::PassError;
use crate::report::ElementwiseGroup;
use smelt_ir::{Category, Graph, NodeId, Op, OpKind};
use std::collections::{BTreeMap, HashMap};

/// Whether an op is an elementwise primitive (codegen fuses chains of them).
pub fn is_elementwise(op: &Op) -> bool {
    use OpKind::*;
    matches!(
        op.kind(),
        Neg | Abs
            | Relu
            | Sign
            | Exp
            | Log
            | Sqrt
            | Rsqrt
            | Reciprocal
            | Sin
            | Cos
            | Tanh
            | Sigmoid
            | Erf
            | Floor
            | Ceil
            | Round
            | Not
            | IsNan
            | IsInf
            | Add
            | Sub
            | Mul
            | Div
            | Pow
            | Max
            | Min
            | Mod
            | Rem
            | Eq
            | Ne
            | Lt
            | Le
            | Gt
            | Ge
            | And
            | Or
            | Xor
            | Where
            | Cast
    )
}

/// Rewires residual adds, re-runs CSE/DCE, and returns the elementwise
/// groups left over (as the report lists them).
pub fn run(g: &mut Graph) -> Result<Vec<ElementwiseGroup>, PassError> {
    // Pair `add`s with the `add_rms_norm` computing the same sum.
    let mut sums: HashMap<(smelt_ir::ValueId, smelt_ir::ValueId), smelt_ir::ValueId> = HashMap::new();
    for n in g.node_ids() {
        let node = g.node(n);
        if let Op::AddRmsNorm { .. } = node.op {
            let (a, b) = (node.inputs[0], node.inputs[1]);
            sums.insert((a, b), node.outputs[0]);
            sums.insert((b, a), node.outputs[0]);
        }
    }
    for n in g.topo_order()? {
        let node = g.node(n);
        if let Op::Add {} = node.op {
            if let Some(s) = sums.get(&(node.inputs[0], node.inputs[1])) {
                if g.ty(*s) == g.ty(node.outputs[0]) {
                    let out = node.outputs[0];
                    g.replace_all_uses(out, *s);
                }
            }
        }
    }
    crate::cse::run(g)?;
    g.remove_dead();
    let groups = elementwise_groups(g)?;
    Ok(groups
        .iter()
        .map(|nodes| {
            let root = g.node(*nodes.last().unwrap_or(&nodes[0]));
            ElementwiseGroup {
                ops: nodes.iter().map(|n| g.node(*n).op.name().to_string()).collect(),
                label: root.label.clone(),
                shape: g.ty(root.outputs[0]).shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
            }
        })
        .collect())
}

fn is_group_member(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    node.op.category() == Category::Primitive && is_elementwise(&node.op) && node.outputs.len() == 1
}

/// The node a member's value flows into within its group, if any.
fn successor(g: &Graph, n: NodeId) -> Option<NodeId> {
    let v = g.node(n).outputs[0];
    let users = g.users(v);
    let [(user, _)] = users.as_slice() else { return None };
    if g.is_output(v) || !is_group_member(g, *user) || g.ty(v).shape != g.ty(g.node(*user).outputs[0]).shape {
        return None;
    }
    Some(*user)
}

/// The maximal groups of elementwise primitives (see the module comment),
/// each in topological order with its root last; groups are ordered by
/// their root's position in topological order.
pub fn elementwise_groups(g: &Graph) -> Result<Vec<Vec<NodeId>>, PassError> {
    let order = g.topo_order()?;
    let members: Vec<NodeId> = order.iter().copied().filter(|n| is_group_member(g, *n)).collect();
    // Follow each member to its root; memoise along the way.
    let mut root_of: HashMap<NodeId, NodeId> = HashMap::new();
    for &n in members.iter().rev() {
        let r = match successor(g, n) {
            Some(s) => *root_of.get(&s).unwrap_or(&s),
            None => n,
        };
        root_of.insert(n, r);
    }
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut groups: BTreeMap<usize, Vec<NodeId>> = BTreeMap::new();
    for &n in &members {
        let r = root_of[&n];
        groups.entry(position[&r]).or_default().push(n);
    }
    Ok(groups.into_values().collect())
}
