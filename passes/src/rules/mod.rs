//! Fusion rules, one file per family. Each rule is named data: a pattern in
//! the text form of [`crate::egraph::lang`], a guard that reads only the
//! analysis facts of the pattern's variables, and a right-hand side (a
//! pattern, or a small function that builds the fused node when an
//! attribute must be computed, such as `eps` read from a constant).
//! `README.md` beside this file holds the authoring rules.

pub mod algebra;
pub mod attention;
pub mod gated_mlp;
pub mod layout;
pub mod residual;
pub mod rmsnorm;
pub mod rope;

use crate::egraph::analysis::{Analysis, EGraph};
use crate::egraph::lang::{AttrLit, ENode, Num};
use egg::{Applier, Id, Language, Pattern, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use smelt_ir::{DType, OpKind, TensorType};
use std::sync::Arc;

/// The families, which are also the unit the runner schedules in phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Family {
    Algebra,
    Layout,
    RmsNorm,
    Rope,
    Attention,
    GatedMlp,
    Residual,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Algebra => "algebra",
            Family::Layout => "layout",
            Family::RmsNorm => "rmsnorm",
            Family::Rope => "rope",
            Family::Attention => "attention",
            Family::GatedMlp => "gated_mlp",
            Family::Residual => "residual",
        }
    }
}

/// One named rewrite.
pub struct Rule {
    pub name: String,
    pub family: Family,
    pub rewrite: Rewrite<ENode, Analysis>,
}

/// Why a rule could not be built (a mistake in a rule's text).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuleError {
    #[error("rule `{rule}`: cannot parse `{text}`: {why}")]
    Parse { rule: String, text: String, why: String },
    #[error("rule `{rule}`: {why}")]
    Build { rule: String, why: String },
}

/// Every rule of every family.
pub fn all() -> Result<Vec<Rule>, RuleError> {
    let mut out = Vec::new();
    out.extend(algebra::rules()?);
    out.extend(layout::rules()?);
    out.extend(rmsnorm::rules()?);
    out.extend(rope::rules()?);
    out.extend(attention::rules()?);
    out.extend(gated_mlp::rules()?);
    out.extend(residual::rules()?);
    Ok(out)
}

// ----- building rules -----

pub(crate) fn pattern(rule: &str, text: &str) -> Result<Pattern<ENode>, RuleError> {
    text.parse().map_err(|e: egg::RecExprParseError<_>| RuleError::Parse {
        rule: rule.to_string(),
        text: text.to_string(),
        why: format!("{e:?}"),
    })
}

/// A guard over the analysis facts of a match.
pub type Guard = Arc<dyn Fn(&EGraph, &Subst) -> bool + Send + Sync>;

/// A right-hand side computed by a function: it adds the replacement and
/// returns its class, or `None` to decline the match.
pub type Build = Arc<dyn Fn(&mut EGraph, &Subst) -> Option<Id> + Send + Sync>;

struct Computed {
    build: Build,
}

impl Applier<ENode, Analysis> for Computed {
    fn apply_one(
        &self,
        eg: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        searcher_ast: Option<&PatternAst<ENode>>,
        rule_name: Symbol,
    ) -> Vec<Id> {
        let Some(id) = (self.build)(eg, subst) else {
            return vec![];
        };
        let changed = match searcher_ast {
            // With explanations on, the union is justified by the matched
            // term and the built node (its children as bound variables), so
            // the proof goes through what the rule actually matched.
            Some(ast) if eg.are_explanations_enabled() => {
                let node = eg.id_to_node(id).clone();
                let mut s2 = subst.clone();
                let mut rhs: PatternAst<ENode> = PatternAst::default();
                let mut kids = Vec::new();
                for (i, c) in egg::Language::children(&node).iter().enumerate() {
                    let v: Var = format!("?__built{i}").parse().unwrap_or_else(|_| var("?__built"));
                    s2.insert(v, *c);
                    kids.push(rhs.add(egg::ENodeOrVar::Var(v)));
                }
                let mut k = kids.into_iter();
                let top = node.map_children(|_| k.next().unwrap_or(Id::from(0)));
                rhs.add(egg::ENodeOrVar::ENode(top));
                eg.union_instantiations(ast, &rhs, &s2, rule_name).1
            }
            _ => eg.union_trusted(eclass, id, rule_name),
        };
        if changed {
            vec![eclass]
        } else {
            vec![]
        }
    }
}

/// A searcher that keeps only the matches its guard accepts, so a guarded
/// pattern right-hand side can be used as is.
struct Guarded {
    pattern: Pattern<ENode>,
    guard: Guard,
}

impl Searcher<ENode, Analysis> for Guarded {
    fn search_eclass_with_limit(&self, eg: &EGraph, eclass: Id, limit: usize) -> Option<SearchMatches<'_, ENode>> {
        let mut m = self.pattern.search_eclass_with_limit(eg, eclass, limit)?;
        m.substs.retain(|s| (self.guard)(eg, s));
        (!m.substs.is_empty()).then_some(m)
    }

    fn search_with_limit(&self, eg: &EGraph, limit: usize) -> Vec<SearchMatches<'_, ENode>> {
        let mut all = self.pattern.search_with_limit(eg, limit);
        for m in &mut all {
            m.substs.retain(|s| (self.guard)(eg, s));
        }
        all.retain(|m| !m.substs.is_empty());
        all
    }

    fn vars(&self) -> Vec<Var> {
        self.pattern.vars()
    }

    fn get_pattern_ast(&self) -> Option<&PatternAst<ENode>> {
        Searcher::<ENode, Analysis>::get_pattern_ast(&self.pattern)
    }
}

/// A rule whose right-hand side is a pattern.
pub(crate) fn rw(
    family: Family,
    name: &str,
    lhs: &str,
    rhs: &str,
    guard: impl Fn(&EGraph, &Subst) -> bool + Send + Sync + 'static,
) -> Result<Rule, RuleError> {
    let searcher = Guarded { pattern: pattern(name, lhs)?, guard: Arc::new(guard) };
    let applier = pattern(name, rhs)?;
    let rewrite =
        Rewrite::new(name, searcher, applier).map_err(|why| RuleError::Build { rule: name.to_string(), why })?;
    Ok(Rule { name: name.to_string(), family, rewrite })
}

/// A rule whose right-hand side is built by a function.
pub(crate) fn rw_fn(
    family: Family,
    name: &str,
    lhs: &str,
    build: impl Fn(&mut EGraph, &Subst) -> Option<Id> + Send + Sync + 'static,
) -> Result<Rule, RuleError> {
    let searcher = Guarded { pattern: pattern(name, lhs)?, guard: Arc::new(|_, _| true) };
    let applier = Computed { build: Arc::new(build) };
    let rewrite =
        Rewrite::new(name, searcher, applier).map_err(|why| RuleError::Build { rule: name.to_string(), why })?;
    Ok(Rule { name: name.to_string(), family, rewrite })
}

// ----- reading analysis facts (guards) -----

/// A pattern variable; `name` includes the `?`.
pub(crate) fn var(name: &str) -> Var {
    name.parse().unwrap_or_else(|_| panic!("`{name}` is not a pattern variable"))
}

/// The single type of a bound class.
pub(crate) fn ty<'a>(eg: &'a EGraph, s: &Subst, v: &str) -> Option<&'a TensorType> {
    eg[s[var(v)]].data.ty()
}

/// The value of a bound rank-0 constant (or `fill`).
pub(crate) fn num(eg: &EGraph, s: &Subst, v: &str) -> Option<f64> {
    let d = &eg[s[var(v)]].data;
    d.num.filter(|_| d.ty().is_some_and(|t| t.rank() == 0 || t.shape.iter().all(|x| *x == smelt_ir::Dim::c(1))))
}

/// A bound constant as a float attribute. Fused ops compute in f32 for
/// f32/f16/bf16 values, so for those the shortest decimal that rounds to
/// the same f32 is used (`1e-5`, not `9.999999747378752e-6`).
pub(crate) fn attr_float(eg: &EGraph, s: &Subst, v: &str) -> Option<f64> {
    let x = num(eg, s, v)?;
    let t = ty(eg, s, v)?;
    Some(match t.dtype {
        DType::F32 | DType::F16 | DType::BF16 => format!("{:?}", x as f32).parse().unwrap_or(x),
        _ => x,
    })
}

/// Whether a bound class is a scalar-like constant equal to `want` (within
/// `tol`, relative).
pub(crate) fn is_num(eg: &EGraph, s: &Subst, v: &str, want: f64, tol: f64) -> bool {
    num(eg, s, v).is_some_and(|x| x == want || (x - want).abs() <= tol * want.abs().max(1e-30))
}

/// The literal of a bound attribute.
pub(crate) fn attr<'a>(eg: &'a EGraph, s: &Subst, v: &str) -> Option<&'a AttrLit> {
    eg[s[var(v)]].data.attr.as_ref()
}

/// A bound dim-list attribute (`[batch,seq,64]` or `[2,4]`) as dims.
pub(crate) fn dims(eg: &EGraph, s: &Subst, v: &str) -> Option<Vec<smelt_ir::Dim>> {
    match attr(eg, s, v)? {
        AttrLit::Ints(v) => Some(v.iter().map(|i| smelt_ir::Dim::c(*i)).collect()),
        AttrLit::Dims(v) => Some(v.clone()),
        _ => None,
    }
}

/// Whether the bound class is a compile-time constant.
pub(crate) fn is_constant(eg: &EGraph, s: &Subst, v: &str) -> bool {
    eg[s[var(v)]].data.constant
}

/// The constant last dim of a bound value.
pub(crate) fn last_dim(eg: &EGraph, s: &Subst, v: &str) -> Option<i64> {
    ty(eg, s, v)?.shape.last()?.as_const()
}

// ----- building right-hand sides -----

pub(crate) fn add_attr(eg: &mut EGraph, lit: AttrLit) -> Id {
    eg.add(ENode::Attr(lit))
}

pub(crate) fn add_num(eg: &mut EGraph, dtype: DType, value: f64) -> Id {
    eg.add(ENode::Num(Num::new(dtype, value)))
}

/// Adds an op node from operand classes and attribute literals.
pub(crate) fn add_op(eg: &mut EGraph, kind: OpKind, operands: &[Id], attrs: Vec<AttrLit>) -> Id {
    let mut ch = operands.to_vec();
    for a in attrs {
        ch.push(add_attr(eg, a));
    }
    eg.add(ENode::op(kind, ch))
}

/// Adds an op node and checks that it type-checks; when it does not (a
/// guard missed a case), declines instead of adding an ill-typed class.
pub(crate) fn add_typed(eg: &mut EGraph, kind: OpKind, operands: &[Id], attrs: Vec<AttrLit>) -> Option<Id> {
    let before = eg.analysis.ill_typed.len();
    let id = add_op(eg, kind, operands, attrs);
    if eg.analysis.ill_typed.len() > before || eg[id].data.tys.is_empty() {
        eg.analysis.ill_typed.truncate(before);
        return None;
    }
    Some(id)
}
