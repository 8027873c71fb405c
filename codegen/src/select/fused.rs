//! Kernel selection for the fused ops other than the gated MLP (which lives
//! with the matrix products in `linalg`): `rms_norm`, `add_rms_norm`,
//! `layer_norm`, `rope`, `attention` and `kv_append`.
//!
//! Assumes the node's types passed inference (shapes fit together); checks
//! only what the kernels themselves need: a constant last axis for the
//! norms and rope, constant heads and head dims for attention.

use super::linalg::{dim_name, Params};
use super::{elem_of, Arg, Instance, Scratch, SelectError, Selected, Step, Steps};
use crate::kir::{Builder, Expr, Scalar};
use crate::templates::attention::{self, AttnMask, AttnSpec};
use crate::templates::{concat, norm_rows, rope, NormKind};
use smelt_ir::{Dim, Op, TensorType};

/// A KV cache kept in place between decode steps (see
/// [`crate::schedule`]): each `(batch, head)` block of a cache buffer has
/// room for `capacity` positions, and an append copies the first `copied`
/// positions of its `cache` operand (all of them in a call that is given
/// the past as an input, none when the buffer already holds it).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheInPlace {
    pub capacity: Dim,
    pub copied: Dim,
}

pub fn select(op: &Op, inputs: &[TensorType], _outputs: &[TensorType]) -> Result<Option<Selected>, SelectError> {
    select_with(op, inputs, None, crate::templates::LANES)
}

/// The kernel of an `attention` whose keys and values, or of a `kv_append`
/// whose result, is a cache kept in place as `kv` says; attention's vectors
/// have `lanes` f32 lanes (4, or 8 for a lowering with 256-bit vectors).
pub fn select_in_place(op: &Op, inputs: &[TensorType], kv: &CacheInPlace, lanes: u8) -> Result<Selected, SelectError> {
    match op {
        Op::Attention { .. } | Op::KvAppend { .. } => select_with(op, inputs, Some(kv), lanes)?
            .ok_or_else(|| SelectError::unsupported(op, inputs, "no in-place cache kernel (internal error)")),
        _ => Err(SelectError::unsupported(op, inputs, "only attention and kv_append read or write a cache in place")),
    }
}

fn select_with(
    op: &Op,
    inputs: &[TensorType],
    kv: Option<&CacheInPlace>,
    lanes: u8,
) -> Result<Option<Selected>, SelectError> {
    let ops = super::Operands { op, inputs };
    let unsupported = |why: &str| ops.unsupported(why);
    let floats = || ops.floats();
    let last_const = |t: &TensorType, what: &str| ops.last_const(t, what);
    let mut b = Builder::new("k");
    let mut p = Params::default();
    let prefix = match op {
        Op::RmsNorm { eps } | Op::LayerNorm { eps } | Op::AddRmsNorm { eps } => {
            floats()?;
            let x = &inputs[0];
            let n = last_const(x, "x")?;
            let kind = match op {
                Op::RmsNorm { .. } => NormKind::Rms,
                Op::LayerNorm { .. } => NormKind::Layer,
                _ => NormKind::AddRms,
            };
            let rows = p.product(&mut b, &x.shape[..x.rank() - 1]);
            norm_rows(&mut b, kind, rows, n, *eps as f32);
            format!("{}_n{n}", op.name())
        }
        Op::Rope { interleaved } => {
            floats()?;
            let (x, cos) = (&inputs[0], &inputs[1]);
            let d = last_const(x, "x")?;
            let r = last_const(cos, "cos")?;
            if r % 2 != 0 || r == 0 || r > d || cos.rank() > x.rank() || inputs[2].shape != cos.shape {
                return Err(unsupported("cos/sin must match, with an even last dim no larger than x's"));
            }
            let x_dims: Vec<Expr> = x.shape.iter().map(|dm| p.get(&mut b, dm)).collect();
            let cs_dims: Vec<Expr> = cos.shape.iter().map(|dm| p.get(&mut b, dm)).collect();
            rope::rope(&mut b, &x_dims, &cs_dims, d, r, *interleaved);
            format!("rope_d{d}_r{r}{}", if *interleaved { "_il" } else { "" })
        }
        Op::Attention { .. } => return attention_node(op, inputs, kv, lanes).map(Some),
        Op::KvAppend { axis } => {
            let (cache, new) = (&inputs[0], &inputs[1]);
            if cache.dtype != new.dtype || cache.rank() != new.rank() || cache.rank() == 0 {
                return Err(unsupported("cache and new must share dtype and rank"));
            }
            let r = cache.rank() as i64;
            let a = if *axis < 0 { axis + r } else { *axis };
            if !(0..r).contains(&a) {
                return Err(unsupported("axis out of range"));
            }
            let a = a as usize;
            let outer = p.product(&mut b, &cache.shape[..a]);
            let ci = p.product(&mut b, &cache.shape[a..]);
            let ni = p.product(&mut b, &new.shape[a..]);
            let elem = elem_of(cache.dtype);
            let row = Dim::product(&cache.shape[a + 1..]);
            match kv {
                None => concat::concat2(&mut b, elem, outer, ci, ni),
                Some(kv) => {
                    let copied = p.get(&mut b, &(kv.copied.clone() * row.clone()));
                    let out_row = p.get(&mut b, &(kv.capacity.clone() * row.clone()));
                    concat::append_rows(&mut b, elem, outer, ci, copied, ni, out_row);
                }
            }
            let kind = if kv.is_some() { "kv_append_cache" } else { "kv_append" };
            format!("{kind}_{elem:?}_{}", dim_name(&row)).to_lowercase()
        }
        _ => return Ok(None),
    };
    p.finish(b, &prefix, op, inputs).map(|i| Some(Selected::Kernel(i)))
}

/// Which kernel of a CPU attention node to build.
#[derive(Clone, Copy, PartialEq)]
enum AttnKernel {
    /// The whole attention, one launch.
    Whole,
    /// Split decode attention's partials, then its combine (which computes
    /// the whole attention in calls with more than one position).
    Partials,
    Combine,
}

/// A CPU attention node: over a cache kept in place (the decode steps of
/// generation), two launches, `decode_partials` into a scratch buffer and
/// `decode_combine`; otherwise one kernel.
fn attention_node(
    op: &Op,
    inputs: &[TensorType],
    kv: Option<&CacheInPlace>,
    lanes: u8,
) -> Result<Selected, SelectError> {
    let spec = attention_spec(op, inputs, lanes)?;
    let (hq, hkv, d) = (spec.hq, spec.hkv, spec.d);
    let cache = if kv.is_some() { "_cache" } else { "" };
    let v = if lanes != crate::templates::LANES { format!("_v{lanes}") } else { String::new() };
    let name = format!("attention_h{hq}x{hkv}_d{d}{cache}{v}{}", attention_tags(op, inputs));
    let build = |kind: AttnKernel| -> Result<Instance, SelectError> {
        let mut b = Builder::new("k");
        let mut p = Params::default();
        let (batch, sq, skv, mask) = attention_operands(&mut b, &mut p, inputs);
        let kv_stride = match kv {
            Some(kv) => p.get(&mut b, &kv.capacity),
            None => skv.clone(),
        };
        let prefix = match kind {
            AttnKernel::Whole => {
                attention::attention(&mut b, &spec, batch, sq, skv, kv_stride, mask.as_ref());
                name.clone()
            }
            AttnKernel::Partials => {
                attention::decode_partials(&mut b, &spec, batch, sq, skv, kv_stride, mask.as_ref());
                format!("{name}_split")
            }
            AttnKernel::Combine => {
                attention::decode_combine(&mut b, &spec, batch, sq, skv, kv_stride, mask.as_ref());
                format!("{name}_combine")
            }
        };
        p.finish(b, &prefix, op, inputs)
    };
    if kv.is_none() {
        return build(AttnKernel::Whole).map(Selected::Kernel);
    }
    let len = inputs[0].shape[0].clone() * Dim::c(attention::partials_len(&spec) as i64);
    let operands: Vec<Arg> = (0..inputs.len()).map(Arg::Operand).collect();
    Ok(Selected::Steps(Steps {
        scratch: vec![Scratch { name: "partials".into(), elem: Scalar::F32, len }],
        steps: vec![
            Step {
                instance: build(AttnKernel::Partials)?,
                args: [operands.clone(), vec![Arg::Scratch(0)]].concat(),
                work: Some(partials_work(&spec, inputs)),
            },
            Step {
                instance: build(AttnKernel::Combine)?,
                args: [operands, vec![Arg::Scratch(0), Arg::Result(0)]].concat(),
                work: None,
            },
        ],
    }))
}

/// The bytes [`attention::decode_partials`] moves, as its launch's `work`:
/// the keys and values it reads when it splits (at least
/// [`attention::SPLIT_KEYS`] visible keys), else nothing. Below that the
/// launch only finds it has nothing to do, and a work of 0 lets the CPU
/// runtime run it on one thread with the small launches before it rather
/// than as a launch of the whole team: on smollm2-135m's decode at 128
/// keys that empty launch, a synchronisation of the team, took 1.3 us a
/// layer. The factor `floor(keys / SPLIT_KEYS)` is 0 below the threshold
/// and at least 1 from it on (more than the bytes read, which only says
/// "large"); calls of several positions, which never split, still count
/// as large from there on, as before.
fn partials_work(spec: &attention::AttnSpec, inputs: &[TensorType]) -> Dim {
    let split_keys = attention::SPLIT_KEYS as i64;
    if spec.window.is_some_and(|w| w < split_keys) {
        return Dim::c(0);
    }
    let (k, v) = (&inputs[1], &inputs[2]);
    let bytes = |t: &TensorType| Dim::product(&t.shape) * Dim::c(t.dtype.size_bytes() as i64);
    k.shape[2].floor_div(split_keys) * (bytes(k) + bytes(v))
}

/// The suffix of an attention kernel's name for its variant: `_causal`,
/// `_win`, `_cap` and `_bmask` or `_fmask` as they apply (CPU and GPU).
pub(super) fn attention_tags(op: &Op, inputs: &[TensorType]) -> String {
    let Op::Attention { causal, window, softcap, .. } = op else { return String::new() };
    let mut tags = String::new();
    for (on, tag) in [(*causal, "_causal"), (window.is_some(), "_win"), (softcap.is_some(), "_cap")] {
        if on {
            tags.push_str(tag);
        }
    }
    if let Some(m) = inputs.get(3) {
        tags.push_str(if m.dtype.is_bool() { "_bmask" } else { "_fmask" });
    }
    tags
}

/// An attention kernel's symbolic sizes as scalars of `b`: batch, query
/// positions, key positions, and the mask's dims (CPU and GPU).
pub(super) fn attention_operands(
    b: &mut Builder,
    p: &mut Params,
    inputs: &[TensorType],
) -> (Expr, Expr, Expr, Option<AttnMask>) {
    let (q, k) = (&inputs[0], &inputs[1]);
    let batch = p.get(b, &q.shape[0]);
    let sq = p.get(b, &q.shape[2]);
    let skv = p.get(b, &k.shape[2]);
    let mask = inputs
        .get(3)
        .map(|m| AttnMask { elem: elem_of(m.dtype), dims: m.shape.iter().map(|dm| p.get(b, dm)).collect() });
    (batch, sq, skv, mask)
}

/// The static part of an attention node's kernel, for the CPU and GPU
/// templates alike, after checking what they need: float q, k, v of rank 4
/// and at most one bool or float mask of rank <= 4, constant heads and head
/// dims, query heads a multiple of kv heads. `lanes` is the CPU vector width.
pub(super) fn attention_spec(op: &Op, inputs: &[TensorType], lanes: u8) -> Result<AttnSpec, SelectError> {
    let unsupported = |why: &str| SelectError::unsupported(op, inputs, why);
    let Op::Attention { scale, causal, window, softcap } = op else {
        return Err(unsupported("not an attention node"));
    };
    let floats = inputs.len() >= 3 && inputs[..3].iter().all(|t| elem_of(t.dtype) == Scalar::F32);
    if !floats || inputs.get(3).is_some_and(|m| !matches!(elem_of(m.dtype), Scalar::F32 | Scalar::Bool)) {
        return Err(unsupported("q, k, v must be floats and the mask bool or float"));
    }
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(unsupported("q, k and v must have rank 4"));
    }
    if inputs.len() > 4 || inputs.get(3).is_some_and(|m| m.rank() > 4) {
        return Err(unsupported("at most one mask of rank <= 4"));
    }
    let c = |d: &Dim, what: &str| {
        d.as_const().map(|c| c as usize).ok_or_else(|| unsupported(&format!("{what} must be a constant")))
    };
    let (hq, hkv, d, dv) = (
        c(&q.shape[1], "heads")?,
        c(&k.shape[1], "kv heads")?,
        c(&q.shape[3], "head dim")?,
        c(&v.shape[3], "value dim")?,
    );
    if hkv == 0 || hq % hkv != 0 {
        return Err(unsupported("query heads must be a multiple of kv heads"));
    }
    Ok(AttnSpec {
        hq,
        hkv,
        d,
        dv,
        scale: *scale as f32,
        causal: *causal,
        window: *window,
        softcap: softcap.map(|c| c as f32),
        lanes,
    })
}
