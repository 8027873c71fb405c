//! Helpers for rule tests and tools: rewrite one expression with the whole
//! rule set (text in, text out) and evaluate expressions with the reference
//! interpreter. Declarations give the leaves' types:
//! `"$x: f32[2, 8]; @w: f32[8]"`.

use crate::egraph::convert::expr_to_graph;
use crate::egraph::cost::extract;
use crate::egraph::{Analysis, EGraph, ENode};
use crate::fuse::PHASES;
use egg::{Id, Language, RecExpr, Runner, SimpleScheduler, Symbol};
use smelt_ir::{DType, Dim, Graph, TensorType};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

/// Parses `"$x: f32[2, seq]; @w: f32[8]"`.
pub fn parse_decls(decls: &str) -> Result<BTreeMap<String, TensorType>, String> {
    let mut out = BTreeMap::new();
    for d in decls.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let (name, ty) = d.split_once(':').ok_or_else(|| format!("`{d}`: expected `name: type`"))?;
        out.insert(name.trim().to_string(), parse_type(ty.trim())?);
    }
    Ok(out)
}

/// Parses `f32[2, seq]`.
pub fn parse_type(s: &str) -> Result<TensorType, String> {
    let (dt, rest) = s.split_once('[').ok_or_else(|| format!("`{s}`: expected dtype[dims]"))?;
    let dtype = DType::from_str(dt.trim()).map_err(|e| e.to_string())?;
    let dims = rest.strip_suffix(']').ok_or_else(|| format!("`{s}`: missing `]`"))?;
    let shape = if dims.trim().is_empty() {
        vec![]
    } else {
        dims.split(',').map(|d| Dim::from_str(d.trim()).map_err(|e| e.to_string())).collect::<Result<_, _>>()?
    };
    Ok(TensorType::new(dtype, shape))
}

/// The result of rewriting one expression.
#[derive(Debug)]
pub struct Rewritten {
    /// The cheapest equivalent expression, by the cost model.
    pub best: RecExpr<ENode>,
    /// How often each rule applied.
    pub applied: BTreeMap<String, usize>,
    /// Ill-typed nodes rules built (a rule bug when not empty).
    pub ill_typed: Vec<String>,
}

/// Runs every phase of fusion on one expression and extracts the best form.
pub fn rewrite(decls: &str, input: &str) -> Result<Rewritten, String> {
    let types = parse_decls(decls)?;
    let expr: RecExpr<ENode> = input.parse().map_err(|e| format!("{e:?}"))?;
    let mut eg = EGraph::new(Analysis::default());
    for (k, t) in &types {
        eg.analysis.leaf_types.insert(Symbol::from(k.as_str()), t.clone());
    }
    let root = eg.add_expr(&expr);
    eg.rebuild();
    let rules = crate::fuse::rules_for_tests().map_err(|e| e.to_string())?;
    let mut applied = BTreeMap::new();
    for (_, families) in PHASES {
        let phase: Vec<_> = rules.iter().filter(|r| families.contains(&r.family)).map(|r| &r.rewrite).collect();
        let runner = Runner::default()
            .with_egraph(eg)
            .with_iter_limit(20)
            .with_node_limit(10_000)
            .with_scheduler(SimpleScheduler)
            .run(phase);
        for it in &runner.iterations {
            for (r, n) in &it.applied {
                *applied.entry(r.to_string()).or_insert(0) += n;
            }
        }
        eg = runner.egraph;
    }
    let choice = extract(&eg, &[root]).map_err(|e| e.to_string())?;
    let mut best = RecExpr::default();
    let mut memo = HashMap::new();
    build_expr(&eg, &choice, root, &mut best, &mut memo);
    Ok(Rewritten { best, applied, ill_typed: eg.analysis.ill_typed.clone() })
}

fn build_expr(
    eg: &EGraph,
    choice: &crate::egraph::cost::Choice,
    id: Id,
    out: &mut RecExpr<ENode>,
    memo: &mut HashMap<Id, Id>,
) -> Id {
    let id = eg.find(id);
    if let Some(x) = memo.get(&id) {
        return *x;
    }
    let node = choice.node(eg, id);
    let node = node.map_children(|c| build_expr(eg, choice, c, out, memo));
    let new = out.add(node);
    memo.insert(id, new);
    new
}

/// The graph computing an expression (see [`expr_to_graph`]).
pub fn graph_of(decls: &str, expr: &RecExpr<ENode>) -> Result<Graph, String> {
    let types = parse_decls(decls)?;
    expr_to_graph(expr, &types).map_err(|e| e.to_string())
}
