//! RMSNorm. After the algebra rules every spelling of the normaliser is
//! `x * rsqrt(mean(x*x) + eps)` over the last axis; it becomes
//! `rms_norm(x, ones, eps)`, and a following multiply by a `[d]` weight
//! (including Gemma's `w + 1`) folds into the weight operand. Casts to f32
//! and back around the normaliser (how f16/bf16 models are written) fold
//! into the op, which computes in f32 by definition.

use super::{add_op, add_typed, attr, attr_float, last_dim, rw_fn, ty, var, Family, Rule, RuleError};
use crate::egraph::lang::AttrLit;
use crate::egraph::EGraph;
use egg::{Id, Subst};
use smelt_ir::{DType, OpKind};

const F: Family = Family::RmsNorm;

/// `rms_norm(?x, ones, ?eps)` for a match binding `?x` and `?eps`.
fn normaliser(eg: &mut EGraph, s: &Subst, dtype: Option<DType>) -> Option<Id> {
    let eps = attr_float(eg, s, "?eps")?;
    let t = ty(eg, s, "?x")?.clone();
    let d = last_dim(eg, s, "?x")?;
    let dtype = dtype.unwrap_or(t.dtype);
    if !t.dtype.is_float() || !(0.0..1.0).contains(&eps) {
        return None;
    }
    let ones = add_op(eg, OpKind::Fill, &[], vec![AttrLit::Ints(vec![d]), AttrLit::float(1.0), AttrLit::DType(dtype)]);
    add_typed(eg, OpKind::RmsNorm, &[s[var("?x")], ones], vec![AttrLit::float(eps)])
}

/// Whether `?ones` is a `[d]` tensor of ones.
fn is_ones(eg: &EGraph, s: &Subst) -> bool {
    eg[s[var("?ones")]].data.num == Some(1.0)
}

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    let core = "(rsqrt (add (reduce_mean (mul ?x ?x) [-1] true) ?eps))";
    let mut out = vec![
        rw_fn(F, "rmsnorm/normaliser", &format!("(mul ?x {core})"), |eg, s| normaliser(eg, s, None))?,
        rw_fn(F, "rmsnorm/normaliser#rsqrt-first", &format!("(mul {core} ?x)"), |eg, s| normaliser(eg, s, None))?,
    ];
    for (name, lhs) in [
        ("rmsnorm/weight#left", "(mul ?w (rms_norm ?x ?ones ?eps))"),
        ("rmsnorm/weight#right", "(mul (rms_norm ?x ?ones ?eps) ?w)"),
    ] {
        out.push(rw_fn(F, name, lhs, |eg, s| {
            if !is_ones(eg, s) {
                return None;
            }
            let (x, w) = (ty(eg, s, "?x")?, ty(eg, s, "?w")?);
            let d = x.shape.last()?.clone();
            if w.shape != [d] || w.dtype != x.dtype {
                return None;
            }
            let eps = attr(eg, s, "?eps")?.clone();
            add_typed(eg, OpKind::RmsNorm, &[s[var("?x")], s[var("?w")]], vec![eps])
        })?);
    }
    // An f16/bf16 value normalised in f32 and cast back: the op computes in
    // f32 and rounds its result once, exactly like the cast.
    out.push(rw_fn(F, "rmsnorm/cast-around", "(cast (rms_norm (cast ?x f32) ?ones ?eps) ?to)", |eg, s| {
        if !is_ones(eg, s) {
            return None;
        }
        let x = ty(eg, s, "?x")?.clone();
        let to = match attr(eg, s, "?to")? {
            AttrLit::DType(d) => *d,
            _ => return None,
        };
        if x.dtype != to || !to.is_float() {
            return None;
        }
        let d = x.shape.last()?.as_const()?;
        let ones = add_op(eg, OpKind::Fill, &[], vec![AttrLit::Ints(vec![d]), AttrLit::float(1.0), AttrLit::DType(to)]);
        let eps = attr(eg, s, "?eps")?.clone();
        add_typed(eg, OpKind::RmsNorm, &[s[var("?x")], ones], vec![eps])
    })?);
    Ok(out)
}
