//! Attention. Canonicalisation first moves every softmax scale onto the
//! scores (`(q*s)·kᵀ`, `q·(k*s)ᵀ` and the split `sqrt` form all become
//! `(q·kᵀ)*s`, with the algebra family merging constant factors) and turns
//! `exp(x - max) / sum(...)` into `softmax`. The fusion then matches
//! `softmax(scores [+ mask | where(mask, scores, -inf)]) · v`, with or
//! without the `isnan -> where` guard exporters put around the softmax.
//!
//! Gemma-2's logit softcap `tanh(scores / cap) * cap` before the mask and
//! softmax (the division merged with the scale by the algebra family into
//! `tanh(q·kᵀ * (s / cap)) * cap`) becomes `softcap=cap` with `scale=s`.
//!
//! Masks are then simplified on the `attention` node itself: an additive
//! `where(allowed, 0, -big)` becomes the boolean `allowed`; the causal and
//! sliding-window structure built from `range`/`unsqueeze`/`le`/`gt`
//! becomes `causal=true` / `window=w`, leaving only the padding mask (if
//! any) as an explicit boolean operand. Beyond these spellings, any mask
//! whose index fact (`egraph/index.rs`: ranges, compares, `trilu`,
//! `where`, `GatherND` lowerings of position ids, additive `-inf` masks and
//! their sums) says it allows exactly the causal, or causal sliding-window,
//! positions becomes `causal=true` / `window=w` (`mask/known-causal`), on
//! its own or combined with a padding mask by `and` or `add`. Grouped-query heads expanded with
//! `unsqueeze + expand + reshape` fold into the op's kv-head grouping.
//!
//! Numerics: a row whose keys are all masked gives zeros in `attention`;
//! an additive mask of a large negative number gives the mean of v there.
//! Such rows are padding query positions, whose outputs nothing reads.

use super::{add_typed, attr, attr_float, dims, is_num, num, rw, rw_fn, ty, var, Family, Rule, RuleError};
use crate::egraph::index::{causal_window, Conj, Fact};
use crate::egraph::lang::AttrLit;
use crate::egraph::EGraph;
use egg::{Id, Subst};
use smelt_ir::{Dim, OpKind};

const F: Family = Family::Attention;

fn scalar(eg: &EGraph, s: &Subst, v: &str) -> bool {
    num(eg, s, v).is_some() && ty(eg, s, v).is_some_and(|t| t.rank() == 0)
}

fn softmax(eg: &mut EGraph, s: &Subst) -> Option<Id> {
    let ax = match attr(eg, s, "?ax")?.as_ints()? {
        [a] => *a,
        _ => return None,
    };
    add_typed(eg, OpKind::Softmax, &[s[var("?x")]], vec![AttrLit::Int(ax)])
}

/// How the scores of a core match are spelled.
#[derive(Clone, Copy, PartialEq)]
enum Scores {
    /// `q·kᵀ * s`.
    Scaled,
    /// `q·kᵀ`.
    Unscaled,
    /// `tanh(q·kᵀ * a) * c`: Gemma-2's logit softcap `c * tanh(q·kᵀ * s / c)`
    /// with `s / c` already merged into one factor `a`, so `s = a * c`.
    Capped,
}

/// Builds `attention(q, k, v [, m])` for a core match.
fn core(eg: &mut EGraph, s: &Subst, scores: Scores, mask: &str, guarded: bool) -> Option<Id> {
    let mut softcap = AttrLit::None;
    let scale = match scores {
        Scores::Unscaled => 1.0,
        Scores::Scaled => {
            if !scalar(eg, s, "?s") {
                return None;
            }
            attr_float(eg, s, "?s")?
        }
        Scores::Capped => {
            if !scalar(eg, s, "?s") || !scalar(eg, s, "?c") {
                return None;
            }
            let (a, c) = (num(eg, s, "?s")?, attr_float(eg, s, "?c")?);
            if !(c > 0.0 && c.is_finite()) {
                return None;
            }
            softcap = AttrLit::float(c);
            // The same shortest-decimal rounding as `attr_float`.
            let prod = a * c;
            format!("{:?}", prod as f32).parse().unwrap_or(prod)
        }
    };
    if mask == "where" && !num(eg, s, "?ninf").is_some_and(|x| x <= -1e30) {
        return None;
    }
    if guarded && !is_num(eg, s, "?zero", 0.0, 0.0) {
        return None;
    }
    let mut ops = vec![s[var("?q")], s[var("?k")], s[var("?v")]];
    if mask != "none" {
        ops.push(s[var("?m")]);
    }
    add_typed(eg, OpKind::Attention, &ops, vec![AttrLit::float(scale), AttrLit::Bool(false), AttrLit::None, softcap])
}

/// Whether `?z`..`?t` (keys) and `?p`..`?t` (queries) step 1 are the key
/// and query positions of this attention: keys 0..t, queries the last s.
fn positions_fit(eg: &EGraph, s: &Subst) -> bool {
    let (Some(q), Some(k)) = (ty(eg, s, "?q"), ty(eg, s, "?k")) else {
        return false;
    };
    let get = |v: &str| attr(eg, s, v).and_then(AttrLit::as_dim);
    let (Some(z), Some(t), Some(one), Some(p)) = (get("?z"), get("?t"), get("?one"), get("?p")) else {
        return false;
    };
    q.rank() == 4
        && k.rank() == 4
        && z == Dim::c(0)
        && one == Dim::c(1)
        && t == k.shape[2]
        && t.clone() - p == q.shape[2]
}

/// `(attention q k v [pad] s true window cap)` for a recognised mask.
fn masked(eg: &mut EGraph, s: &Subst, pad: bool, window: bool) -> Option<Id> {
    if !positions_fit(eg, s) {
        return None;
    }
    let w = if window {
        let w = num(eg, s, "?w")?;
        if w < 1.0 || w.fract() != 0.0 {
            return None;
        }
        AttrLit::Int(w as i64)
    } else {
        AttrLit::None
    };
    let mut ops = vec![s[var("?q")], s[var("?k")], s[var("?v")]];
    if pad {
        if !ty(eg, s, "?pad")?.dtype.is_bool() {
            return None;
        }
        ops.push(s[var("?pad")]);
    }
    let (scale, cap) = (attr(eg, s, "?s")?.clone(), attr(eg, s, "?cap")?.clone());
    add_typed(eg, OpKind::Attention, &ops, vec![scale, AttrLit::Bool(true), w, cap])
}

/// The positions a mask operand is known to allow, from its index fact: a
/// bool mask's conjunction, or where an additive mask is 0.
fn allowed(eg: &EGraph, s: &Subst, v: &str) -> Option<Conj> {
    match eg[s[var(v)]].data.index.as_ref()? {
        Fact::Bool(c) | Fact::Additive(c) => Some(c.clone()),
        _ => None,
    }
}

/// `(attention q k v [pad] s true window cap)` when the index fact of `?m`
/// says it allows exactly the causal (or causal sliding-window) positions,
/// whatever ops spelled it; `pad` is what it was combined with.
fn known_mask(eg: &mut EGraph, s: &Subst, pad: bool) -> Option<Id> {
    let (q, k, m) = (ty(eg, s, "?q")?, ty(eg, s, "?k")?, ty(eg, s, "?m")?);
    if q.rank() != 4 || k.rank() != 4 {
        return None;
    }
    let w = causal_window(&allowed(eg, s, "?m")?, m, &q.shape[2], &k.shape[2])?;
    let mut ops = vec![s[var("?q")], s[var("?k")], s[var("?v")]];
    if pad {
        ops.push(s[var("?pad")]);
    }
    let w = w.map_or(AttrLit::None, AttrLit::Int);
    let (scale, cap) = (attr(eg, s, "?s")?.clone(), attr(eg, s, "?cap")?.clone());
    add_typed(eg, OpKind::Attention, &ops, vec![scale, AttrLit::Bool(true), w, cap])
}

pub fn rules() -> Result<Vec<Rule>, RuleError> {
    let mut out = vec![
        rw_fn(
            F,
            "softmax/stable",
            "(div (exp (sub ?x (reduce_max ?x ?ax true))) (reduce_sum (exp (sub ?x (reduce_max ?x ?ax true))) ?ax true))",
            softmax,
        )?,
        rw_fn(F, "softmax/naive", "(div (exp ?x) (reduce_sum (exp ?x) ?ax true))", softmax)?,
        rw(F, "attention/scale-on-q", "(matmul (mul ?q ?s) ?kt)", "(mul (matmul ?q ?kt) ?s)", |eg, s| {
            scalar(eg, s, "?s")
        })?,
        rw(F, "attention/scale-on-k", "(matmul ?q (mul ?kt ?s))", "(mul (matmul ?q ?kt) ?s)", |eg, s| {
            scalar(eg, s, "?s")
        })?,
        rw(
            F,
            "attention/scale-out-of-transpose",
            "(transpose (mul ?k ?s) ?perm)",
            "(mul (transpose ?k ?perm) ?s)",
            |eg, s| scalar(eg, s, "?s"),
        )?,
    ];

    let kt = "(transpose ?k [0,1,3,2])";
    for form in [Scores::Scaled, Scores::Unscaled, Scores::Capped] {
        let scores = match form {
            Scores::Scaled => format!("(mul (matmul ?q {kt}) ?s)"),
            Scores::Unscaled => format!("(matmul ?q {kt})"),
            Scores::Capped => format!("(mul (tanh (mul (matmul ?q {kt}) ?s)) ?c)"),
        };
        for mask in ["none", "add", "where"] {
            let x = match mask {
                "none" => scores.clone(),
                "add" => format!("(add {scores} ?m)"),
                _ => format!("(where ?m {scores} ?ninf)"),
            };
            for guarded in [false, true] {
                let sm = format!("(softmax {x} -1)");
                let p = if guarded { format!("(where (isnan {sm}) ?zero {sm})") } else { sm };
                let name = format!(
                    "attention/core#{}{}{}",
                    match form {
                        Scores::Scaled => "scaled",
                        Scores::Unscaled => "unscaled",
                        Scores::Capped => "softcapped",
                    },
                    match mask {
                        "none" => "",
                        "add" => "-additive-mask",
                        _ => "-bool-mask",
                    },
                    if guarded { "-nan-guard" } else { "" }
                );
                out.push(rw_fn(F, &name, &format!("(matmul {p} ?v)"), move |eg, s| core(eg, s, form, mask, guarded))?);
            }
        }
    }

    out.push(rw(
        F,
        "mask/additive-where-is-bool",
        "(attention ?q ?k ?v (where ?c ?zero ?ninf) ?s ?causal ?w ?cap)",
        "(attention ?q ?k ?v ?c ?s ?causal ?w ?cap)",
        |eg, s| is_num(eg, s, "?zero", 0.0, 0.0) && num(eg, s, "?ninf").is_some_and(|x| x <= -1e30),
    )?);

    let kpos = "(unsqueeze (range ?z ?t ?one ?dt) [-2])";
    let qpos = "(unsqueeze (range ?p ?t ?one ?dt) [-1])";
    let causal = [format!("(le {kpos} {qpos})"), format!("(ge {qpos} {kpos})")];
    for (i, c) in causal.iter().enumerate() {
        let c4 = format!("(unsqueeze {c} [-4,-3])");
        let w4 = format!("(unsqueeze (and {c} (gt {kpos} (sub {qpos} ?w))) [-4,-3])");
        for (kind, m, window) in [("causal", &c4, false), ("sliding-window", &w4, true)] {
            let head = "(attention ?q ?k ?v";
            let tail = "?s false none ?cap)";
            out.push(rw_fn(
                F,
                &format!("mask/{kind}#padded-{i}"),
                &format!("{head} (and ?pad {m}) {tail}"),
                move |eg, s| masked(eg, s, true, window),
            )?);
            out.push(rw_fn(
                F,
                &format!("mask/{kind}#padded-after-{i}"),
                &format!("{head} (and {m} ?pad) {tail}"),
                move |eg, s| masked(eg, s, true, window),
            )?);
            out.push(rw_fn(F, &format!("mask/{kind}#unpadded-{i}"), &format!("{head} {m} {tail}"), move |eg, s| {
                masked(eg, s, false, window)
            })?);
        }
    }

    // The same masks compared directly in 4-D (what the ONNX exporter
    // writes), with the window test before or after the causal one.
    let k4 = "(unsqueeze (range ?z ?t ?one ?dt) [-4,-3,-2])";
    let q4 = "(unsqueeze (range ?p ?t ?one ?dt) [-4,-3,-1])";
    let c4 = format!("(le {k4} {q4})");
    let g4 = format!("(gt {k4} (sub {q4} ?w))");
    let forms = [
        ("causal", c4.clone(), false),
        ("sliding-window", format!("(and {c4} {g4})"), true),
        ("sliding-window", format!("(and {g4} {c4})"), true),
    ];
    for (i, (kind, m, window)) in forms.into_iter().enumerate() {
        let head = "(attention ?q ?k ?v";
        let tail = "?s false none ?cap)";
        out.push(rw_fn(
            F,
            &format!("mask/{kind}#4d-padded-{i}"),
            &format!("{head} (and ?pad {m}) {tail}"),
            move |eg, s| masked(eg, s, true, window),
        )?);
        out.push(rw_fn(
            F,
            &format!("mask/{kind}#4d-padded-after-{i}"),
            &format!("{head} (and {m} ?pad) {tail}"),
            move |eg, s| masked(eg, s, true, window),
        )?);
        out.push(rw_fn(F, &format!("mask/{kind}#4d-unpadded-{i}"), &format!("{head} {m} {tail}"), move |eg, s| {
            masked(eg, s, false, window)
        })?);
    }

    // Any spelling whose index fact is causal (a `trilu` of -inf, a
    // `GatherND` of position ids, `where`-based additive masks, ...), alone
    // or combined with a padding mask by `and` (bool) or `add` (additive).
    let head = "(attention ?q ?k ?v";
    let tail = "?s false none ?cap)";
    out.push(rw_fn(F, "mask/known-causal#bare", &format!("{head} ?m {tail}"), |eg, s| known_mask(eg, s, false))?);
    for (variant, m) in [
        ("and-pad-first", "(and ?pad ?m)"),
        ("and-pad-after", "(and ?m ?pad)"),
        ("add-pad-first", "(add ?pad ?m)"),
        ("add-pad-after", "(add ?m ?pad)"),
    ] {
        out.push(rw_fn(F, &format!("mask/known-causal#{variant}"), &format!("{head} {m} {tail}"), |eg, s| {
            known_mask(eg, s, true)
        })?);
    }

    let rep = |x: &str| format!("(reshape (expand (unsqueeze ?{x} [-3]) ?e{x}) ?r{x})");
    let gqa_fits = |eg: &EGraph, s: &Subst| -> bool {
        let fits = |x: &str| -> Option<bool> {
            let t = ty(eg, s, &format!("?{x}"))?;
            let (e, r) = (dims(eg, s, &format!("?e{x}"))?, dims(eg, s, &format!("?r{x}"))?);
            if t.rank() != 4 || e.len() != 5 || r.len() != 4 {
                return Some(false);
            }
            let n = e[2].clone();
            Some(
                e[0] == t.shape[0]
                    && e[1] == t.shape[1]
                    && e[3] == t.shape[2]
                    && e[4] == t.shape[3]
                    && r[0] == t.shape[0]
                    && r[1] == t.shape[1].clone() * n
                    && r[2] == t.shape[2]
                    && r[3] == t.shape[3],
            )
        };
        let group = |x: &str| dims(eg, s, x).and_then(|e| e.get(2).cloned());
        fits("k") == Some(true) && fits("v") == Some(true) && group("?ek") == group("?ev")
    };
    let (k, v) = (rep("k"), rep("v"));
    out.push(rw(
        F,
        "attention/grouped-query-heads",
        &format!("(attention ?q {k} {v} ?s ?c ?w ?cap)"),
        "(attention ?q ?k ?v ?s ?c ?w ?cap)",
        gqa_fits,
    )?);
    out.push(rw(
        F,
        "attention/grouped-query-heads#masked",
        &format!("(attention ?q {k} {v} ?m ?s ?c ?w ?cap)"),
        "(attention ?q ?k ?v ?m ?s ?c ?w ?cap)",
        gqa_fits,
    )?);
    Ok(out)
}
