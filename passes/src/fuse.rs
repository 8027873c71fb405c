//! The fusion stage: lower the graph into an e-graph, run the rule families
//! in phases with explicit limits, extract with the cost model, and build
//! the graph back.
//!
//! Phases (each a bounded egg `Runner` over the same e-graph):
//! 1. `canonical`: algebra and layout, so every spelling has one form;
//! 2. `fuse`: rmsnorm, rope, attention (with softmax and masks), gated_mlp,
//!    with algebra and layout again for what the fusion rules expose
//!    (constant factors of a scale moved out of a matmul);
//! 3. `residual`: residual adds into the norms that follow them.
//!
//! Every phase has an iteration, node and time limit; its stop reason is
//! recorded in the report, and one that stops on a limit is flagged there
//! (fusion then is partial, never wrong). The rules are not commutative or
//! associative in general, so the e-graph grows by a small factor and
//! saturates in a few iterations regardless of the layer count.

use crate::egraph::convert::{count_ops, lower, Materializer};
use crate::egraph::cost::{extract_with, MeasuredCosts};
use crate::egraph::lang::ENode;
use crate::error::PassError;
use crate::report::{Explanation, FusionReport, PhaseReport};
use crate::rules::{self, Family, Rule};
use egg::{Id, Language, Rewrite, Runner, SimpleScheduler, StopReason};
use smelt_ir::{Category, Graph};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bounds of one runner phase.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub iterations: usize,
    /// The e-graph may grow to this many times its initial node count (plus 10 000).
    pub node_factor: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { iterations: 12, node_factor: 4, time: Duration::from_secs(2) }
    }
}

/// What fusion does.
#[derive(Debug, Clone, Default)]
pub struct FusionOptions {
    /// Record egg explanations and report the rewrite chain of every fused op
    /// (slower: only for `--explain`).
    pub explain: bool,
    pub limits: Limits,
    /// Measured kernel times from the tuning database; extraction uses them
    /// to choose between alternatives it has measured (see
    /// `egraph::cost`), the estimate elsewhere.
    pub measured: Option<std::sync::Arc<MeasuredCosts>>,
}

/// The phases and their families, in order.
pub const PHASES: &[(&str, &[Family])] = &[
    ("canonical", &[Family::Algebra, Family::Layout]),
    ("fuse", &[Family::Algebra, Family::Layout, Family::RmsNorm, Family::Rope, Family::Attention, Family::GatedMlp]),
    ("residual", &[Family::Residual]),
];

fn all_rules() -> Result<&'static [Rule], PassError> {
    static RULES: OnceLock<Result<Vec<Rule>, rules::RuleError>> = OnceLock::new();
    match RULES.get_or_init(rules::all) {
        Ok(r) => Ok(r),
        Err(e) => Err(e.clone().into()),
    }
}

/// The rule set, for [`crate::testing`].
pub fn rules_for_tests() -> Result<&'static [Rule], PassError> {
    all_rules()
}

fn stop_text(r: &Option<StopReason>) -> (String, bool) {
    match r {
        Some(StopReason::Saturated) | None => ("saturated".into(), false),
        Some(StopReason::IterationLimit(n)) => (format!("iteration limit ({n})"), true),
        Some(StopReason::NodeLimit(n)) => (format!("node limit ({n})"), true),
        Some(StopReason::TimeLimit(t)) => (format!("time limit ({t:.2} s)"), true),
        Some(StopReason::Other(s)) => (s.clone(), true),
    }
}

/// Fuses the graph in place and reports what happened.
pub fn fuse(g: &mut Graph, opts: &FusionOptions) -> Result<FusionReport, PassError> {
    let rules = all_rules()?;
    let mut report = FusionReport::default();
    let t0 = Instant::now();
    let lowered = lower(g, opts.explain)?;
    report.lower_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut eg = lowered.egraph;
    let initial = eg.total_number_of_nodes();
    let node_limit = initial * opts.limits.node_factor + 10_000;

    let t_run = Instant::now();
    for (name, families) in PHASES {
        let phase: Vec<&Rewrite<ENode, crate::egraph::Analysis>> =
            rules.iter().filter(|r| families.contains(&r.family)).map(|r| &r.rewrite).collect();
        let t = Instant::now();
        let mut runner = Runner::default()
            .with_egraph(eg)
            .with_iter_limit(opts.limits.iterations)
            .with_node_limit(node_limit)
            .with_time_limit(opts.limits.time)
            .with_scheduler(SimpleScheduler);
        if opts.explain {
            runner = runner.with_explanations_enabled();
        }
        let runner = runner.run(phase);
        for it in &runner.iterations {
            for (rule, n) in &it.applied {
                *report.rules.entry(rule.to_string()).or_insert(0) += n;
            }
        }
        let (stop_reason, hit_limit) = stop_text(&runner.stop_reason);
        report.phases.push(PhaseReport {
            name: name.to_string(),
            families: families.iter().map(|f| f.name().to_string()).collect(),
            stop_reason,
            hit_limit,
            iterations: runner.iterations.len(),
            egraph_nodes: runner.egraph.total_number_of_nodes(),
            egraph_classes: runner.egraph.number_of_classes(),
            time_ms: t.elapsed().as_secs_f64() * 1e3,
            search_ms: runner.iterations.iter().map(|i| i.search_time).sum::<f64>() * 1e3,
            apply_ms: runner.iterations.iter().map(|i| i.apply_time).sum::<f64>() * 1e3,
            rebuild_ms: runner.iterations.iter().map(|i| i.rebuild_time).sum::<f64>() * 1e3,
        });
        eg = runner.egraph;
    }
    report.run_ms = t_run.elapsed().as_secs_f64() * 1e3;
    report.ill_typed = std::mem::take(&mut eg.analysis.ill_typed);

    let t_ex = Instant::now();
    let roots: Vec<Id> = g.outputs().iter().map(|(_, v)| lowered.value_ids[v]).collect();
    let choice = extract_with(&eg, &roots, opts.measured.as_deref())?;
    let labels: HashMap<Id, String> = lowered.labels.iter().map(|(id, l)| (eg.find(*id), l.clone())).collect();
    let mut m = Materializer::new(g, &eg, labels);
    let choose = |id: Id| choice.node(&eg, id);
    let mut outputs = Vec::new();
    for (name, v) in g.outputs() {
        let id = lowered.value_ids[v];
        let vals = m.build(id, &choose)?;
        outputs.push((name.clone(), vals[0]));
    }
    let mut out = m.graph;
    for (name, v) in outputs {
        out.set_output(&name, v);
    }
    report.extract_ms = t_ex.elapsed().as_secs_f64() * 1e3;

    if opts.explain {
        report.explanations = explain(&mut eg, &lowered.value_ids, g, &choice, &roots)?;
    }
    *g = out;
    let (fused, unfused) = count_ops(g);
    report.fused = fused;
    report.unfused = unfused;
    Ok(report)
}

/// The rule chain behind each fused op the extraction chose: egg's proof
/// that the source value's class equals the fused node.
fn explain(
    eg: &mut crate::egraph::EGraph,
    value_ids: &HashMap<smelt_ir::ValueId, Id>,
    g: &Graph,
    choice: &crate::egraph::cost::Choice,
    roots: &[Id],
) -> Result<Vec<Explanation>, PassError> {
    // Only the fused ops the extracted graph uses.
    let mut live = HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| eg.find(*r)).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            for c in choice.best[&id].1.children() {
                stack.push(eg.find(*c));
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut values: Vec<_> = value_ids.iter().collect();
    values.sort();
    for (v, &orig) in values {
        let class = eg.find(orig);
        // A result of a multi-result fused op (`add_rms_norm`) is explained
        // through the fused node its class already held (the `rms_norm`),
        // followed by the rule that made the multi-result op.
        let (op_class, through) = match &choice.best[&class] {
            (_, ENode::Get(_, [t])) => (eg.find(*t), true),
            _ => (class, false),
        };
        let (_, node) = &choice.best[&op_class];
        let ENode::Op(kind, _) = node else { continue };
        if kind.info().category != Category::Fused || !live.contains(&op_class) || seen.contains(&op_class) {
            continue;
        }
        // Find a fused e-node's own id among the ids added to the class.
        let canon = |n: &ENode| n.clone().map_children(|c| eg.find(c));
        let want = canon(node);
        let candidates = eg.analysis.fused_ids.clone();
        let Some(fused_id) = candidates
            .into_iter()
            .filter(|id| eg.find(*id) == class && (through || canon(eg.id_to_node(*id)) == want))
            .max()
        else {
            continue;
        };
        seen.insert(op_class);
        let e = eg.explain_id_equivalence(orig, fused_id);
        let mut rules = Vec::new();
        let mut visited = HashSet::new();
        collect_rules(&e.explanation_trees, &mut rules, &mut visited);
        if through {
            rules.push("residual/add-rms-norm".to_string());
        }
        rules.dedup();
        out.push(Explanation { op: kind.name().to_string(), label: g.def(*v).label.clone(), rules });
    }
    Ok(out)
}

fn collect_rules(
    proof: &[Rc<egg::TreeTerm<ENode>>],
    out: &mut Vec<String>,
    visited: &mut HashSet<*const egg::TreeTerm<ENode>>,
) {
    for term in proof {
        if !visited.insert(Rc::as_ptr(term)) {
            continue;
        }
        for child in &term.child_proofs {
            collect_rules(child, out, visited);
        }
        if let Some(r) = term.forward_rule.or(term.backward_rule) {
            out.push(r.to_string());
        }
    }
}

/// Counts of ops (for callers that only want numbers).
pub fn op_counts(g: &Graph) -> BTreeMap<String, usize> {
    let (mut f, p) = count_ops(g);
    f.extend(p);
    f
}
