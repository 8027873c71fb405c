//! The fusion report: what fused (per op and per rule), every primitive op
//! left unfused with its count, how each runner phase stopped and how long
//! it took, and, on request, the rewrite chain behind each fused op. It is
//! plain data, serialisable to JSON for `smelt inspect --fusion --json` and
//! the artifact manifest.

use crate::egraph::convert::count_ops;
use serde::Serialize;
use smelt_ir::Graph;
use std::collections::BTreeMap;

/// How one runner phase went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    pub name: String,
    /// The rule families the phase ran.
    pub families: Vec<String>,
    /// egg's stop reason: `saturated`, or the limit that was hit.
    pub stop_reason: String,
    /// True when a limit (iterations, nodes, time) stopped the phase before
    /// saturation; the result is still correct, possibly less fused.
    pub hit_limit: bool,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub time_ms: f64,
    /// egg's own split of the time: matching, applying, rebuilding.
    pub search_ms: f64,
    pub apply_ms: f64,
    pub rebuild_ms: f64,
}

/// The rewrite chain that produced one fused op.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Explanation {
    /// The fused op's spelling, e.g. `attention`.
    pub op: String,
    /// The label of the source node it replaced (`layer 0 self_attn`).
    pub label: Option<String>,
    /// The names of the rules applied, in proof order, consecutive repeats merged.
    pub rules: Vec<String>,
}

/// One group of elementwise primitives left after fusion (`cleanup::elementwise_groups`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ElementwiseGroup {
    /// The members' op spellings in topological order; the last is the root,
    /// whose value leaves the group.
    pub ops: Vec<String>,
    /// The root's source label.
    pub label: Option<String>,
    /// The root's output shape (every member has it), printed.
    pub shape: String,
}

/// Everything fusion did to one graph.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FusionReport {
    /// Fused ops in the result, by spelling.
    pub fused: BTreeMap<String, usize>,
    /// Primitive ops left in the result, by spelling.
    pub unfused: BTreeMap<String, usize>,
    /// Times each rule was applied (summed over phases).
    pub rules: BTreeMap<String, usize>,
    pub phases: Vec<PhaseReport>,
    /// Matmuls joined by horizontal fusion: groups and members.
    pub horizontal_groups: usize,
    pub horizontal_members: usize,
    /// Groups of elementwise primitives left for codegen to compute as one
    /// kernel each (see `cleanup`): how many, and each one's ops.
    pub elementwise_chains: usize,
    pub elementwise_groups: Vec<ElementwiseGroup>,
    /// Time spent lowering into the e-graph, in the phases, and extracting.
    pub lower_ms: f64,
    pub run_ms: f64,
    pub extract_ms: f64,
    /// Rewrites that built ill-typed nodes (always empty unless a rule is wrong).
    pub ill_typed: Vec<String>,
    /// Rewrite chains of fused ops, when explanations were requested.
    pub explanations: Vec<Explanation>,
}

impl FusionReport {
    /// Whether any phase stopped on a limit.
    pub fn hit_limit(&self) -> bool {
        self.phases.iter().any(|p| p.hit_limit)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A short human-readable summary (what `smelt inspect --fusion` prints).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str("fused:\n");
        for (k, v) in &self.fused {
            s.push_str(&format!("  {k:<14} {v}\n"));
        }
        s.push_str("left unfused:\n");
        for (k, v) in &self.unfused {
            s.push_str(&format!("  {k:<14} {v}\n"));
        }
        s.push_str("phases:\n");
        for p in &self.phases {
            s.push_str(&format!(
                "  {:<12} {:<28} {:>3} iterations {:>7} nodes {:>8.2} ms (search {:.2}, apply {:.2}, rebuild {:.2}){}\n",
                p.name,
                p.stop_reason,
                p.iterations,
                p.egraph_nodes,
                p.time_ms,
                p.search_ms,
                p.apply_ms,
                p.rebuild_ms,
                if p.hit_limit { "  (LIMIT HIT)" } else { "" }
            ));
        }
        if self.horizontal_groups > 0 {
            s.push_str(&format!(
                "horizontal: {} groups of {} matmuls\n",
                self.horizontal_groups, self.horizontal_members
            ));
        }
        if !self.elementwise_groups.is_empty() {
            let mut by_len: BTreeMap<usize, usize> = BTreeMap::new();
            for grp in &self.elementwise_groups {
                *by_len.entry(grp.ops.len()).or_insert(0) += 1;
            }
            let lens: Vec<String> = by_len.iter().map(|(len, n)| format!("{n}x{len}")).collect();
            s.push_str(&format!(
                "elementwise groups for codegen: {} (count x length: {})\n",
                self.elementwise_groups.len(),
                lens.join(", ")
            ));
            for grp in self.elementwise_groups.iter().filter(|g| g.ops.len() > 1) {
                s.push_str(&format!(
                    "  [{}] {} at {}\n",
                    grp.shape,
                    grp.ops.join(" -> "),
                    grp.label.as_deref().unwrap_or("?")
                ));
            }
        }
        for e in &self.explanations {
            s.push_str(&format!("{} at {}: {}\n", e.op, e.label.as_deref().unwrap_or("?"), e.rules.join(" -> ")));
        }
        s
    }
}

/// The op counts of a graph as a report (no runner data): what a fused
/// graph contains, for graphs fused earlier or elsewhere.
pub fn fusion_report(g: &Graph) -> FusionReport {
    let (fused, unfused) = count_ops(g);
    FusionReport { fused, unfused, ..FusionReport::default() }
}
