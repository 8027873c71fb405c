//! Residual adds feeding a norm: `rms_norm(a + b, w)` becomes result 1 of
//! `add_rms_norm(a, b, w)`, and the sum itself (which the residual stream
//! reads on) becomes its result 0, so one kernel writes both. Norms without
//! a weight (`rms_norm(x, ones)`) are left alone.

use super::{add_typed, attr, var, Family, Rule, RuleError};
use crate::egraph::lang::ENode;
use egg::Id;
use smelt_ir::OpKind;

const F: Family = Family::Residual;

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    Ok(vec![super::rw_fn(F, "residual/add-rms-norm", "(rms_norm (add ?a ?b) ?w ?eps)", |eg, s| {
        let (a, b, w) = (s[var("?a")], s[var("?b")], s[var("?w")]);
        // The weightless normaliser `rms_norm(x, ones)` is an intermediate
        // of the rmsnorm family; fusing it too would give the sum two
        // `add_rms_norm` producers.
        if eg[w].data.num == Some(1.0) {
            return None;
        }
        let eps = attr(eg, s, "?eps")?.clone();
        let fused = add_typed(eg, OpKind::AddRmsNorm, &[a, b, w], vec![eps])?;
        // The sum is looked up (hash-consed from the bound operands), not
        // re-matched: it is the `add` this match went through.
        let sum: Option<Id> = eg.lookup(ENode::op(OpKind::Add, vec![a, b]));
        let first = eg.add(ENode::Get(0, [fused]));
        if let Some(sum) = sum {
            eg.union_trusted(sum, first, "residual/add-rms-norm");
        }
        let second = eg.add(ENode::Get(1, [fused]));
        Some(second)
    })?])
}
