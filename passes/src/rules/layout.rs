//! Layout: movement that gets in the way of matching. A slice of a matmul's
//! output columns is the matmul with the weight's columns sliced (the slice
//! of a constant weight is computed at load time), which splits Phi-3's
//! fused `gate_up_proj` and `qkv_proj` into the separate projections the
//! other families match; horizontal fusion joins projections that share
//! an input again after fusion, on the graph.

use super::{is_constant, rw, ty, Family, Rule, RuleError};

const F: Family = Family::Layout;

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    Ok(vec![rw(
        F,
        "layout/slice-columns-of-matmul",
        "(slice (matmul ?x ?w) [-1] ?s ?e [1])",
        "(matmul ?x (slice ?w [-1] ?s ?e [1]))",
        |eg, s| is_constant(eg, s, "?w") && ty(eg, s, "?w").is_some_and(|t| t.rank() == 2),
    )?])
}
