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
//! **Measured times** ([`MeasuredCosts`], from the tuning database that
//! `smelt tune` fills) decide between alternatives *within* an e-class that
//! have all been measured. An alternative's measured time is that of the
//! measured kernels it alone pays for: its own time when it is a measured
//! weight product, plus, through primitive ops beneath it, those of the
//! measured products in classes nothing else uses (primitive elementwise
//! ops between them count as free: at these sizes their traffic is a small
//! fraction of a weight product's). So the fused `gated_mlp` and its
//! unfused spelling `mul(silu(x · Wg), x · Wu)` compare by their measured
//! kernels when the tuner timed both (it times a gated site's plain product
//! for this). An alternative with a part of unknown time (a fused op that
//! is not measured) has no measured time. In a class with two or more
//! measured alternatives, each one's cost is the estimate of the
//! measured alternative the estimate likes best, scaled by its time
//! relative to that one's: the faster wins, and the class keeps the
//! estimate's scale against the rest of the graph (measured seconds and the
//! unit estimates are not mixed across classes, where they are not
//! comparable). Everything else is costed by the estimate alone.

use super::analysis::EGraph;
use super::lang::ENode;
use crate::error::PassError;
use egg::Id;
use smelt_ir::{Category, OpKind};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Measured kernel times (seconds) by [`MeasuredCosts::key`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeasuredCosts {
    times: BTreeMap<String, f64>,
}

impl MeasuredCosts {
    /// The key of a weight product: `matmul k=576 n=960` or
    /// `gated_mlp k=576 n=1536` (the weight's static `[k, n]` shape).
    pub fn key(op: &str, k: i64, n: i64) -> String {
        format!("{op} k={k} n={n}")
    }

    pub fn insert(&mut self, key: String, seconds: f64) {
        self.times.insert(key, seconds);
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.times.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// The measured time of an e-node, when it is a weight product the
    /// table has: a `matmul` or `gated_mlp` whose (first) weight operand
    /// is a compile-time constant of a static 2-D type.
    fn of(&self, eg: &EGraph, node: &ENode) -> Option<f64> {
        let (kind, operands, _) = node.split_op()?;
        if !matches!(kind, OpKind::MatMul | OpKind::GatedMlp) || operands.len() < 2 {
            return None;
        }
        let w = &eg[operands[1]].data;
        let ty = w.ty()?;
        if !w.constant || ty.rank() != 2 {
            return None;
        }
        let (k, n) = (ty.shape[0].as_const()?, ty.shape[1].as_const()?);
        self.get(&MeasuredCosts::key(kind.info().name, k, n))
    }
}

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
    extract_with(eg, roots, None)
}

/// [`extract`] with measured kernel times refining the choices within
/// e-classes (see the module docs).
pub fn extract_with(eg: &EGraph, roots: &[Id], measured: Option<&MeasuredCosts>) -> Result<Choice, PassError> {
    let alternatives = measured.map(|m| measured_alternatives(eg, m)).unwrap_or_default();
    let mut uses: HashMap<Id, usize> = HashMap::new();
    for c in eg.classes() {
        for n in &c.nodes {
            for ch in n.children_ids() {
                *uses.entry(eg.find(*ch)).or_insert(0) += 1;
            }
        }
    }
    let mut choice = choose(eg, &uses, &alternatives)?;
    for _round in 0..4 {
        let dag = dag_uses(eg, &choice, roots);
        let next = choose(eg, &dag, &alternatives)?;
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

/// How deep [`measured_subtree`] follows primitive ops below an
/// alternative; a gated MLP's unfused spelling is three levels deep.
const MEASURED_DEPTH: usize = 6;

/// The most nodes one alternative's walk visits.
const WALK_BUDGET: usize = 256;

/// The measured seconds of `node` and what it computes below it down to
/// the `inputs` (classes its alternatives share), each class counted once
/// (`visited`), with the count of measured kernels among them; `None` when
/// a part of it has no known time.
fn measured_subtree(
    eg: &EGraph,
    m: &MeasuredCosts,
    inputs: &HashSet<Id>,
    node: &ENode,
    depth: usize,
    visited: &mut HashSet<Id>,
    budget: &mut usize,
) -> Option<(f64, usize)> {
    // Saturated classes hold many spellings; a walk that would visit more
    // than its budget of nodes gives up (no measured time) rather than
    // slow the compile down.
    *budget = budget.checked_sub(1)?;
    let Some((kind, operands, _)) = node.split_op() else { return Some((0.0, 0)) };
    // A graph input or weight, or computed once when the model is loaded.
    if kind.info().category == Category::Declared
        || (!operands.is_empty() && operands.iter().all(|c| eg[*c].data.constant))
    {
        return Some((0.0, 0));
    }
    if let Some(t) = m.of(eg, node) {
        return Some((t, 1));
    }
    if kind.info().category != Category::Primitive || depth == 0 {
        return None;
    }
    let mut total = (0.0, 0);
    for ch in node.children_ids() {
        let ch = eg.find(*ch);
        if inputs.contains(&ch) || !visited.insert(ch) {
            continue;
        }
        let mut best: Option<((f64, usize), HashSet<Id>)> = None;
        for n in &eg[ch].nodes {
            let mut seen = visited.clone();
            if let Some(t) = measured_subtree(eg, m, inputs, n, depth - 1, &mut seen, budget) {
                if best.as_ref().is_none_or(|(b, _)| t.0 < b.0) {
                    best = Some((t, seen));
                }
            }
        }
        let (t, seen) = best?;
        *visited = seen;
        total = (total.0 + t.0, total.1 + t.1);
    }
    Some(total)
}

/// For each class with two or more alternatives whose measured times are
/// known (each including at least one measured kernel), those times per
/// node, in the class's node order. An alternative's walk stops at the
/// classes the class's other alternatives read, which both pay for alike.
fn measured_alternatives(eg: &EGraph, m: &MeasuredCosts) -> HashMap<Id, Vec<Option<f64>>> {
    let mut out = HashMap::new();
    if m.is_empty() {
        return out;
    }
    for c in eg.classes() {
        // Only a class with a measured product among its own nodes can
        // have measured alternatives worth comparing (and this keeps the
        // walks few).
        if c.nodes.iter().filter(|n| matches!(n, ENode::Op(..))).count() < 2
            || !c.nodes.iter().any(|n| m.of(eg, n).is_some())
        {
            continue;
        }
        let cid = eg.find(c.id);
        let times: Vec<Option<f64>> = c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut inputs: HashSet<Id> = c
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, o)| o.children_ids())
                    .map(|x| eg.find(*x))
                    .collect();
                inputs.insert(cid);
                let mut budget = WALK_BUDGET;
                match measured_subtree(eg, m, &inputs, n, MEASURED_DEPTH, &mut HashSet::new(), &mut budget) {
                    Some((t, found)) if found > 0 && t > 0.0 => Some(t),
                    _ => None,
                }
            })
            .collect();
        if times.iter().flatten().count() >= 2 {
            out.insert(cid, times);
        }
    }
    out
}

fn choose(
    eg: &EGraph,
    uses: &HashMap<Id, usize>,
    alternatives: &HashMap<Id, Vec<Option<f64>>>,
) -> Result<Choice, PassError> {
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
        // The cost of every node whose children are costed.
        let mut costs: Vec<Option<f64>> = eg[cid]
            .nodes
            .iter()
            .map(|n| {
                // A node that uses its own class (`and(true, x)` merged with
                // `x`) is never a way to compute the class.
                let ready = n.children_ids().iter().all(|c| eg.find(*c) != cid && best.contains_key(&eg.find(*c)));
                ready.then(|| node_cost(eg, n, |c| if shared(eg.find(c)) { 0.0 } else { best[&eg.find(c)].0 }))
            })
            .collect();
        if let Some(times) = alternatives.get(&cid) {
            rescale_measured(&mut costs, times);
        }
        let mut improved = false;
        for (n, cost) in eg[cid].nodes.iter().zip(costs) {
            let Some(cost) = cost else { continue };
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

/// Gives each measured alternative among `costs` the estimate of the
/// measured one the estimate likes best, scaled by its measured time over
/// that one's.
fn rescale_measured(costs: &mut [Option<f64>], times: &[Option<f64>]) {
    let reference = costs
        .iter()
        .zip(times)
        .filter_map(|(c, t)| Some((c.as_ref()?, t.as_ref()?)))
        .min_by(|a, b| a.0.total_cmp(b.0))
        .map(|(c, t)| (*c, *t));
    let Some((c_ref, t_ref)) = reference else { return };
    for (c, t) in costs.iter_mut().zip(times) {
        if let (Some(c), Some(t)) = (c.as_mut(), t) {
            *c = c_ref * t / t_ref;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::convert::lower;

    /// Two products of one result type in one class (united by hand): the
    /// estimate ties them, measured times pick the faster.
    #[test]
    fn measured_times_choose_between_measured_alternatives() {
        let g = smelt_ir::text::parse(
            r#"
func @two(%x: f32[seq, 8], %y: f32[seq, 16]) -> (a, b) {
  %w8 = weight name="w8" : f32[8, 4]
  %w16 = weight name="w16" : f32[16, 4]
  %a = matmul %x, %w8 : f32[seq, 4]
  %b = matmul %y, %w16 : f32[seq, 4]
  return a=%a, b=%b
}
"#,
        )
        .unwrap();
        let lowered = lower(&g, false).unwrap();
        let mut eg = lowered.egraph;
        let ids: Vec<Id> = g.outputs().iter().map(|(_, v)| lowered.value_ids[v]).collect();
        eg.union(ids[0], ids[1]);
        eg.rebuild();
        let root = eg.find(ids[0]);
        let k_of = |c: &Choice| {
            let n = c.node(&eg, root);
            let (_, ops, _) = n.split_op().unwrap();
            eg[ops[1]].data.ty().unwrap().shape[0].as_const().unwrap()
        };
        for (t8, t16, want) in [(2.0, 1.0, 16), (1.0, 2.0, 8)] {
            let mut m = MeasuredCosts::default();
            m.insert(MeasuredCosts::key("matmul", 8, 4), t8);
            m.insert(MeasuredCosts::key("matmul", 16, 4), t16);
            let c = extract_with(&eg, &[root], Some(&m)).unwrap();
            assert_eq!(k_of(&c), want, "times {t8} / {t16}");
            // The class keeps the estimate's scale: one primitive, cost 1 at most.
            assert!(c.best[&root].0 <= 1.0, "{}", c.best[&root].0);
        }
        // One alternative unmeasured: the estimate alone (a tie, kept stable).
        let mut m = MeasuredCosts::default();
        m.insert(MeasuredCosts::key("matmul", 8, 4), 0.1);
        let plain = extract(&eg, &[root]).unwrap();
        let partial = extract_with(&eg, &[root], Some(&m)).unwrap();
        assert_eq!(k_of(&plain), k_of(&partial));
    }
}
