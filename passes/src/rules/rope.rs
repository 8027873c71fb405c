//! Rotary position embedding. The rotate-half form
//! `x*cos + concat(-x[h:d], x[0:h])*sin` (transformers' `rotate_half`) and
//! the interleaved GPT-J form (pairs (2i, 2i+1) rotated, written with
//! strided slices, an unsqueeze-concat stack and a reshape) become `rope`.
//! cos and sin are whatever the graph computes (any frequencies, any
//! scaling); the op's type inference checks that they fit x. Partial
//! rotary (`concat(rope(x[..r]), x[r..])`) folds into one `rope` over x.
//! The commuted spellings of the sum and products are listed as targeted
//! variants, never as a general commutativity rule.

use super::{add_typed, attr, dims, last_dim, rw_fn, ty, var, Family, Rule, RuleError};
use crate::egraph::lang::AttrLit;
use crate::egraph::EGraph;
use egg::{Id, Subst};
use smelt_ir::OpKind;

const F: Family = Family::Rope;

fn ints(eg: &EGraph, s: &Subst, v: &str) -> Option<Vec<i64>> {
    attr(eg, s, v)?.as_ints().map(<[i64]>::to_vec)
}

fn build(eg: &mut EGraph, s: &Subst, interleaved: bool) -> Option<Id> {
    let d = last_dim(eg, s, "?x")?;
    if interleaved {
        if ints(eg, s, "?d")? != [d] || dims(eg, s, "?shape")? != ty(eg, s, "?x")?.shape {
            return None;
        }
    } else if ints(eg, s, "?h")? != [d / 2] || ints(eg, s, "?d")? != [d] || d % 2 != 0 {
        return None;
    }
    let (c, sn) = (ty(eg, s, "?cos")?, ty(eg, s, "?sin")?);
    if c.shape.last()?.as_const()? != d || sn.shape != c.shape {
        return None;
    }
    add_typed(eg, OpKind::Rope, &[s[var("?x")], s[var("?cos")], s[var("?sin")]], vec![AttrLit::Bool(interleaved)])
}

/// The eight orderings of `a*cos + r*sin`.
fn sums(rot: &str) -> Vec<String> {
    let mut out = Vec::new();
    for xc in ["(mul ?x ?cos)", "(mul ?cos ?x)"] {
        for rs in [format!("(mul {rot} ?sin)"), format!("(mul ?sin {rot})")] {
            out.push(format!("(add {xc} {rs})"));
            out.push(format!("(add {rs} {xc})"));
        }
    }
    out
}

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    let mut out = Vec::new();
    let half = "(concat (neg (slice ?x [-1] ?h ?d [1])) (slice ?x [-1] [0] ?h [1]) -1)";
    for (i, lhs) in sums(half).into_iter().enumerate() {
        out.push(rw_fn(F, &format!("rope/rotate-half#{i}"), &lhs, |eg, s| build(eg, s, false))?);
    }
    let pairs = "(reshape (concat (unsqueeze (neg (slice ?x [-1] [1] ?d [2])) [-1]) \
                 (unsqueeze (slice ?x [-1] [0] ?d [2]) [-1]) -1) ?shape)";
    for (i, lhs) in sums(pairs).into_iter().enumerate() {
        out.push(rw_fn(F, &format!("rope/interleaved#{i}"), &lhs, |eg, s| build(eg, s, true))?);
    }
    out.push(rw_fn(
        F,
        "rope/partial-rotary",
        "(concat (rope (slice ?x [-1] [0] ?r [1]) ?cos ?sin ?il) (slice ?x [-1] ?r ?d [1]) -1)",
        |eg, s| {
            let d = last_dim(eg, s, "?x")?;
            let r = ty(eg, s, "?cos")?.shape.last()?.as_const()?;
            if ints(eg, s, "?r")? != [r] || ints(eg, s, "?d")? != [d] {
                return None;
            }
            let il = attr(eg, s, "?il")?.clone();
            add_typed(eg, OpKind::Rope, &[s[var("?x")], s[var("?cos")], s[var("?sin")]], vec![il])
        },
    )?);
    Ok(out)
}
