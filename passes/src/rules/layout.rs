//! Layout: movement that gets in the way of matching. A slice of a matmul's
//! output columns is the matmul with the weight's columns sliced (the slice
//! of a constant weight is computed at load time), which splits Phi-3's
//! fused `gate_up_proj` and `qkv_proj` into the separate projections the
//! other families match; horizontal fusion joins projections that share
//! an input again after fusion, on the graph.
//!
//! Exporters also transpose the keys of a 4-D attention through a 3-D
//! batched form: `reshape(transpose(reshape(x, [b*h, t, d]), [0, 2, 1]),
//! [b, h, d, t])`, which is `transpose(reshape(x, [b, h, t, d]), [0, 1, 3, 2])`
//! for any x with trailing dims [t, d] (a reshape to the same element order).
//! Two unsqueezes in a row are one unsqueeze.

use super::{add_op, add_typed, dims, is_constant, rw, rw_fn, ty, var, Family, Rule, RuleError};
use crate::egraph::lang::AttrLit;
use smelt_ir::{Dim, OpKind};

const F: Family = Family::Layout;

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    let batched =
        rw_fn(F, "layout/batched-key-transpose", "(reshape (transpose (reshape ?x ?s1) [0,2,1]) ?s2)", |eg, s| {
            let x = ty(eg, s, "?x")?.clone();
            let (s1, s2) = (dims(eg, s, "?s1")?, dims(eg, s, "?s2")?);
            let r = x.rank();
            if r < 3 || s1.len() != 3 || s2.len() != 4 {
                return None;
            }
            let (t, d) = (x.shape[r - 2].clone(), x.shape[r - 1].clone());
            let lead = Dim::product(&x.shape[..r - 2]);
            if s1 != [lead.clone(), t.clone(), d.clone()] || s2[2] != d || s2[3] != t {
                return None;
            }
            if s2[0].clone() * s2[1].clone() != lead {
                return None;
            }
            let shape = vec![s2[0].clone(), s2[1].clone(), t, d];
            let four = add_typed(
                eg,
                OpKind::Reshape,
                &[s[var("?x")]],
                vec![AttrLit::from_value(&smelt_ir::AttrValue::Dims(shape))?],
            )?;
            Some(add_op(eg, OpKind::Transpose, &[four], vec![AttrLit::Ints(vec![0, 1, 3, 2])]))
        })?;
    let unsqueezes = rw_fn(F, "layout/unsqueeze-unsqueeze", "(unsqueeze (unsqueeze ?x ?a) ?b)", |eg, s| {
        let r0 = ty(eg, s, "?x")?.rank() as i64;
        let a = super::attr(eg, s, "?a")?.as_ints()?.to_vec();
        let b = super::attr(eg, s, "?b")?.as_ints()?.to_vec();
        let (r1, r2) = (r0 + a.len() as i64, r0 + (a.len() + b.len()) as i64);
        let norm = |v: &[i64], r: i64| -> Vec<i64> { v.iter().map(|x| if *x < 0 { x + r } else { *x }).collect() };
        let (a, b) = (norm(&a, r1), norm(&b, r2));
        // Walk the final axes: b's are new; the others are the middle
        // value's axes in order, of which a's are new.
        let mut axes = Vec::new();
        let mut j = 0;
        for pos in 0..r2 {
            if b.contains(&pos) {
                axes.push(pos - r2);
            } else {
                if a.contains(&j) {
                    axes.push(pos - r2);
                }
                j += 1;
            }
        }
        add_typed(eg, OpKind::Unsqueeze, &[s[var("?x")]], vec![AttrLit::Ints(axes)])
    })?;
    Ok(vec![
        batched,
        unsqueezes,
        rw(
            F,
            "layout/slice-columns-of-matmul",
            "(slice (matmul ?x ?w) [-1] ?s ?e [1])",
            "(matmul ?x (slice ?w [-1] ?s ?e [1]))",
            |eg, s| is_constant(eg, s, "?w") && ty(eg, s, "?w").is_some_and(|t| t.rank() == 2),
        )?,
    ])
}
