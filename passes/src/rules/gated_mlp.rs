//! Gated MLPs: `act(x·w_gate) * (x·w_up)` becomes `gated_mlp`, for SiLU
//! (spelled `g * sigmoid(g)` after the algebra family orders it), the tanh
//! GELU (`0.5*g*(1 + tanh(sqrt(2/pi)*(g + 0.044715*g^3)))`) and the exact
//! GELU (`0.5*g*(1 + erf(g/sqrt(2)))`). The activation spellings are
//! listed after scalar constants have moved to the right of `mul`/`add`;
//! both product orders (`act * up`, Phi-3's `up * act`) are targeted
//! variants.

use super::{add_typed, is_num, rw_fn, ty, var, Family, Rule, RuleError};
use crate::egraph::lang::AttrLit;
use crate::egraph::EGraph;
use egg::Symbol;
use egg::{Id, Subst};
use smelt_ir::OpKind;

const F: Family = Family::GatedMlp;

fn build(eg: &mut EGraph, s: &Subst, act: &str) -> Option<Id> {
    let ok = match act {
        "gelu_tanh" => {
            is_num(eg, s, "?half", 0.5, 1e-6)
                && is_num(eg, s, "?one", 1.0, 1e-6)
                && is_num(eg, s, "?k", 0.044715, 1e-4)
                && is_num(eg, s, "?c", (2.0 / std::f64::consts::PI).sqrt(), 1e-5)
        }
        "gelu" => {
            is_num(eg, s, "?half", 0.5, 1e-6)
                && is_num(eg, s, "?one", 1.0, 1e-6)
                && is_num(eg, s, "?r", std::f64::consts::FRAC_1_SQRT_2, 1e-5)
        }
        _ => true,
    };
    let (wg, wu) = (ty(eg, s, "?wg")?, ty(eg, s, "?wu")?);
    if !ok || wg != wu || wg.rank() != 2 {
        return None;
    }
    add_typed(
        eg,
        OpKind::GatedMlp,
        &[s[var("?x")], s[var("?wg")], s[var("?wu")]],
        vec![AttrLit::Str(Symbol::from(act))],
    )
}

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    let g = "(matmul ?x ?wg)";
    let u = "(matmul ?x ?wu)";
    let tanh = format!("(tanh (mul (add {g} (mul (mul (mul {g} {g}) {g}) ?k)) ?c))");
    let erf = format!("(erf (mul {g} ?r))");
    let acts: Vec<(&str, &str, String)> = vec![
        ("silu", "silu", format!("(mul {g} (sigmoid {g}))")),
        ("gelu_tanh", "gelu-tanh", format!("(mul (mul {g} ?half) (add {tanh} ?one))")),
        ("gelu_tanh", "gelu-tanh#half-last", format!("(mul (mul {g} (add {tanh} ?one)) ?half)")),
        ("gelu", "gelu", format!("(mul (mul {g} ?half) (add {erf} ?one))")),
        ("gelu", "gelu#half-last", format!("(mul (mul {g} (add {erf} ?one)) ?half)")),
    ];
    let mut out = Vec::new();
    for (act, name, a) in acts {
        for (order, lhs) in [("", format!("(mul {a} {u})")), ("#up-first", format!("(mul {u} {a})"))] {
            out.push(rw_fn(F, &format!("gated_mlp/{name}{order}"), &lhs, move |eg, s| build(eg, s, act))?);
        }
    }
    Ok(out)
}
