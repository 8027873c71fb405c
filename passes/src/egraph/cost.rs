//! The one cost model extraction uses, and the extractor.
//!
//! Cost of an e-node = its own cost + the costs of the children it alone
//! pays for:
//! - leaves (inputs, weights, constants, attributes) and result projections
//!   (`get.i`) cost 0;
//! - an op whose operands are all compile-time constants costs 0 (it is
//!   computed once when the model is loaded: `transpose` of a weight);
//! - a primitive op costs 1 (one pass over memory, one kernel launch if it
//!   stays alone);
//! - a fused op costs 0.5: it replaces at least two primitives, so it is
//!   cheaper than any pair, and wins ties against the spelling it replaces;
//! - an attention mask operand adds 0.1 per non-unit dim of the mask (the
//!   part of [batch, heads, q, k] it spans, i.e. the traffic of reading it)
//!   and 0.05 more for an additive float mask, so `causal=true` with a
//!   `[b,1,1,t]` padding mask beats an explicit `[b,1,s,t]` mask.
//!
//! A child class that more than one e-node uses is free to each of them:
//! it is computed once wherever it is, so a choice compares only what it
//! alone pays for. This keeps costs local (tree costs over a 30-layer
//! residual stream would grow like 4^60 and lose every small difference to
//! rounding) and lets a fused op that reuses shared operands win.
//!
//! Later the per-op costs will come from measured kernel times in the
//! tuning database; the shape of the model stays.

use super::analysis::EGraph;
use super::lang::ENode;
use crate::error::PassError;
use egg::Id;
use smelt_ir::{Category, OpKind};
use std::collections::HashMap;

/// The cost of one e-node, given a cost for each child (already zero for
/// shared children).
pub fn node_cost(eg: &EGraph, node: &ENode, child: impl Fn(Id) -> f64) -> f64 {
    let own = match node {
        ENode::Op(kind, _) => op_cost(eg, *kind, node),
        _ => 0.0,
    };
    own + node.children_ids().iter().map(|c| child(*c)).sum::<f64>()
}

fn op_cost(eg: &EGraph, kind: OpKind, node: &ENode) -> f64 {
    let Some((_, operands, _)) = node.split_op() else {
        return 0.0;
    };
    if !operands.is_empty() && operands.iter().all(|c| eg[*c].data.constant) {
        return 0.0;
    }
    let mut cost = match kind.info().category {
        Category::Declared => 0.0,
        Category::Primitive => 1.0,
        Category::Fused => 0.5,
    };
    if kind == OpKind::Attention {
        if let Some(m) = operands.get(3).and_then(|m| eg[*m].data.ty()) {
            let spans = m.shape.iter().filter(|d| **d != smelt_ir::Dim::c(1)).count();
            cost += 0.1 * spans as f64;
            if !m.dtype.is_bool() {
                cost += 0.05;
            }
        }
    }
    cost
}

trait Children {
    fn children_ids(&self) -> &[Id];
}

impl Children for ENode {
    fn children_ids(&self) -> &[Id] {
        egg::Language::children(self)
    }
}

/// The chosen e-node of every e-class.
pub struct Choice {
    pub best: HashMap<Id, (f64, ENode)>,
}

impl Choice {
    pub fn node(&self, eg: &EGraph, id: Id) -> ENode {
        self.best[&eg.find(id)].1.clone()
    }
}

/// Picks the cheapest node of every class under the cost model above.
///
/// Which classes count as shared is first taken from the whole e-graph,
/// then from the graph the previous round extracted (a class both the
/// original spelling and a fused node use is shared in the e-graph, but
/// only one of them survives), until the choice is stable (at most four
/// rounds).
pub fn extract(eg: &EGraph, roots: &[Id]) -> Result<Choice, PassError> {
    let mut uses: HashMap<Id, usize> = HashMap::new();
    for c in eg.classes() {
        for n in &c.nodes {
            for ch in n.children_ids() {
                *uses.entry(eg.find(*ch)).or_insert(0) += 1;
            }
        }
    }
    let mut choice = choose(eg, &uses)?;
    for _round in 0..4 {
        let dag = dag_uses(eg, &choice, roots);
        let next = choose(eg, &dag)?;
        let stable = next.best.iter().all(|(id, (_, n))| choice.best.get(id).map(|(_, m)| m) == Some(n));
        choice = next;
        if stable {
            break;
        }
    }
    Ok(choice)
}

/// How many chosen nodes reachable from the roots use each class.
fn dag_uses(eg: &EGraph, choice: &Choice, roots: &[Id]) -> HashMap<Id, usize> {
    let mut uses: HashMap<Id, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| eg.find(*r)).collect();
    for r in &stack {
        *uses.entry(*r).or_insert(0) += 1;
    }
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for ch in choice.best[&id].1.children_ids() {
            let ch = eg.find(*ch);
            *uses.entry(ch).or_insert(0) += 1;
            stack.push(ch);
        }
    }
    uses
}

fn choose(eg: &EGraph, uses: &HashMap<Id, usize>) -> Result<Choice, PassError> {
    let mut classes: Vec<Id> = eg.classes().map(|c| c.id).collect();
    classes.sort_unstable();
    let shared = |id: Id| uses.get(&id).copied().unwrap_or(0) > 1;
    // Parents of every class, so that an improvement is pushed only to the
    // classes it can improve (a worklist, not repeated sweeps: a sweep per
    // layer would make extraction quadratic in the layer count).
    let mut parents: HashMap<Id, Vec<Id>> = HashMap::with_capacity(classes.len());
    for &cid in &classes {
        for n in &eg[cid].nodes {
            for ch in n.children_ids() {
                parents.entry(eg.find(*ch)).or_default().push(cid);
            }
        }
    }
    let mut best: HashMap<Id, (f64, ENode)> = HashMap::with_capacity(classes.len());
    let mut queue: std::collections::VecDeque<Id> = classes.iter().copied().collect();
    let mut queued: std::collections::HashSet<Id> = classes.iter().copied().collect();
    while let Some(cid) = queue.pop_front() {
        queued.remove(&cid);
        let mut improved = false;
        for n in &eg[cid].nodes {
            // A node that uses its own class (`and(true, x)` merged with `x`)
            // is never a way to compute the class.
            let ready = n.children_ids().iter().all(|c| eg.find(*c) != cid && best.contains_key(&eg.find(*c)));
            if !ready {
                continue;
            }
            let cost = node_cost(eg, n, |c| {
                let c = eg.find(c);
                if shared(c) {
                    0.0
                } else {
                    best[&c].0
                }
            });
            let better = match best.get(&cid) {
                None => true,
                Some((old, _)) => cost < *old - 1e-9,
            };
            if better {
                best.insert(cid, (cost, n.clone()));
                improved = true;
            }
        }
        if improved {
            for p in parents.get(&cid).into_iter().flatten() {
                if queued.insert(*p) {
                    queue.push_back(*p);
                }
            }
        }
    }
    if let Some(c) = classes.iter().find(|c| !best.contains_key(c)) {
        return Err(PassError::Extract(format!("e-class {c} has no finite cost (a cycle with no way out)")));
    }
    Ok(Choice { best })
}
