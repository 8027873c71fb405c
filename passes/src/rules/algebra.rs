//! Algebra: canonical spellings of the small expressions the fusion rules
//! are written against. Each rule moves toward one form (`mul x (rsqrt y)`
//! for every spelling of a reciprocal square root, scalar constants on the
//! right of `mul`/`add`, `x*x` for `x^2`) and never introduces work.
//! There is no general commutativity or associativity here: each variant is
//! targeted at a spelling exporters are known to write.

use super::{add_num, add_op, is_num, num, rw, rw_fn, ty, Family, Rule, RuleError};
use smelt_ir::OpKind;

const F: Family = Family::Algebra;

/// Whether `?v` is a scalar-like constant (rank 0, or all dims 1).
fn scalar(eg: &crate::egraph::EGraph, s: &egg::Subst, v: &str) -> bool {
    num(eg, s, v).is_some()
}

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    Ok(vec![
        rw(F, "algebra/pow2-is-square", "(pow ?x ?c)", "(mul ?x ?x)", |eg, s| {
            is_num(eg, s, "?c", 2.0, 0.0) && ty(eg, s, "?x").is_some_and(|t| t.dtype.is_float())
        })?,
        rw(F, "algebra/pow3-is-cube", "(pow ?x ?c)", "(mul (mul ?x ?x) ?x)", |eg, s| {
            is_num(eg, s, "?c", 3.0, 0.0) && ty(eg, s, "?x").is_some_and(|t| t.dtype.is_float())
        })?,
        rw(F, "algebra/pow-neg-half-is-rsqrt", "(pow ?x ?c)", "(rsqrt ?x)", |eg, s| {
            is_num(eg, s, "?c", -0.5, 0.0) && ty(eg, s, "?x").is_some_and(|t| t.dtype.is_float())
        })?,
        rw(F, "algebra/div-sqrt-is-mul-rsqrt", "(div ?x (sqrt ?y))", "(mul ?x (rsqrt ?y))", |_, _| true)?,
        rw(F, "algebra/reciprocal-sqrt-is-rsqrt", "(reciprocal (sqrt ?y))", "(rsqrt ?y)", |_, _| true)?,
        rw(F, "algebra/one-over-sqrt-is-rsqrt", "(div ?one (sqrt ?y))", "(rsqrt ?y)", |eg, s| {
            is_num(eg, s, "?one", 1.0, 0.0) && ty(eg, s, "?one").is_some_and(|t| t.rank() == 0)
        })?,
        rw_fn(F, "algebra/div-by-constant-is-mul", "(div ?x ?c)", |eg, s| {
            let c = num(eg, s, "?c")?;
            let t = ty(eg, s, "?c")?;
            if c == 0.0 || !c.is_finite() || t.rank() != 0 || !t.dtype.is_float() {
                return None;
            }
            let dtype = t.dtype;
            let r = add_num(eg, dtype, 1.0 / c);
            Some(add_op(eg, OpKind::Mul, &[s[super::var("?x")], r], vec![]))
        })?,
        rw(F, "algebra/mul-scalar-right", "(mul ?c ?x)", "(mul ?x ?c)", |eg, s| {
            scalar(eg, s, "?c") && !scalar(eg, s, "?x") && ty(eg, s, "?c").is_some_and(|t| t.rank() == 0)
        })?,
        rw(F, "algebra/add-scalar-right", "(add ?c ?x)", "(add ?x ?c)", |eg, s| {
            scalar(eg, s, "?c") && !scalar(eg, s, "?x") && ty(eg, s, "?c").is_some_and(|t| t.rank() == 0)
        })?,
        rw(F, "algebra/sigmoid-after-x", "(mul (sigmoid ?x) ?x)", "(mul ?x (sigmoid ?x))", |_, _| true)?,
        rw(F, "algebra/and-true", "(and ?t ?x)", "?x", |eg, s| {
            is_num(eg, s, "?t", 1.0, 0.0)
                && ty(eg, s, "?t").is_some_and(|t| t.rank() == 0 && t.dtype.is_bool())
                && ty(eg, s, "?x").is_some_and(|t| t.dtype.is_bool())
        })?,
        rw_fn(
            F,
            "algebra/range-plus-offset",
            "(add (range ?z ?n ?one ?dt) (squeeze (range ?p ?p1 ?one ?dt) [-1]))",
            |eg, s| {
                let get = |v: &str| super::attr(eg, s, v).and_then(crate::egraph::AttrLit::as_dim);
                let (z, n, one, p, p1) = (get("?z")?, get("?n")?, get("?one")?, get("?p")?, get("?p1")?);
                if z != smelt_ir::Dim::c(0) || one != smelt_ir::Dim::c(1) || p1 != p.clone() + smelt_ir::Dim::c(1) {
                    return None;
                }
                let lit = |d: smelt_ir::Dim| crate::egraph::AttrLit::from_value(&smelt_ir::AttrValue::Dim(d));
                let dt = super::attr(eg, s, "?dt")?.clone();
                let end = p.clone() + n;
                super::add_typed(eg, OpKind::Range, &[], vec![lit(p)?, lit(end)?, crate::egraph::AttrLit::Int(1), dt])
            },
        )?,
        rw_fn(F, "algebra/merge-scalar-muls", "(mul (mul ?x ?a) ?b)", |eg, s| {
            let (a, b) = (num(eg, s, "?a")?, num(eg, s, "?b")?);
            let (ta, tb) = (ty(eg, s, "?a")?, ty(eg, s, "?b")?);
            if ta.rank() != 0 || tb.rank() != 0 || ta.dtype != tb.dtype || !ta.dtype.is_float() {
                return None;
            }
            let dtype = ta.dtype;
            let c = add_num(eg, dtype, a * b);
            Some(add_op(eg, OpKind::Mul, &[s[super::var("?x")], c], vec![]))
        })?,
    ])
}
