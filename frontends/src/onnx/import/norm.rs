//! Normalisations: `LayerNormalization`, `RMSNormalization` (opset 23) and
//! ONNX Runtime's `SimplifiedLayerNormalization` (RMS norm),
//! `SkipSimplifiedLayerNormalization` and `SkipLayerNormalization`.
//!
//! The common case (normalising the last axis with a `[d]` scale, only the
//! main output used) maps onto the fused IR ops `layer_norm`, `rms_norm` and
//! `add_rms_norm`. Anything else (several normalised axes, the optional
//! mean / inverse-std outputs, a scale of another shape) is spelled with
//! primitives, computing in f32 for narrower inputs as `stash_type` says.

use super::{Importer, Node, Outs, R};
use smelt_ir::{DType, Dim, Op, ValueId};

fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// A parameter as a `[d]` vector of `dtype`, when it is one (or broadcasts
/// as one: `[1, d]`, `[1, 1, d]`).
fn as_vector(cx: &mut Importer, p: ValueId, d: &Dim, dtype: DType) -> R<Option<ValueId>> {
    let shape = cx.b.shape(p);
    let Some((last, lead)) = shape.split_last() else { return Ok(None) };
    if last != d || lead.iter().any(|x| x.as_const() != Some(1)) {
        return Ok(None);
    }
    let v = cx.b.reshape(p, vec![d.clone()])?;
    Ok(Some(cx.b.cast(v, dtype)?))
}

/// The pieces of a primitive normalisation: returns (y, mean, inv_std), mean
/// only for layer norm.
fn decompose(
    cx: &mut Importer,
    x: ValueId,
    axis: usize,
    eps: f64,
    rms: bool,
    scale: Option<ValueId>,
    bias: Option<ValueId>,
) -> R<(ValueId, Option<ValueId>, ValueId)> {
    let rank = cx.b.rank(x);
    let dtype = cx.b.dtype(x);
    // stash_type: narrow floats are normalised in f32.
    let wide = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
    let b = &mut cx.b;
    let xw = b.cast(x, wide)?;
    let axes: Vec<i64> = (axis..rank).map(|a| a as i64).collect();
    let mean_of =
        |b: &mut super::Builder, v: ValueId| b.add(Op::ReduceMean { axes: axes.clone(), keepdims: true }, &[v]);
    let (centered, mean) = if rms {
        (xw, None)
    } else {
        let m = mean_of(b, xw)?;
        (b.binary(Op::Sub {}, xw, m)?, Some(m))
    };
    let sq = b.binary(Op::Mul {}, centered, centered)?;
    let var = mean_of(b, sq)?;
    let e = b.scalar(wide, eps);
    let ve = b.binary(Op::Add {}, var, e)?;
    let inv = b.unary(Op::Rsqrt {}, ve)?;
    let mut y = b.binary(Op::Mul {}, centered, inv)?;
    y = b.cast(y, dtype)?;
    if let Some(s) = scale {
        let s = b.cast(s, dtype)?;
        y = b.binary(Op::Mul {}, y, s)?;
    }
    if let Some(bb) = bias {
        let bb = b.cast(bb, dtype)?;
        y = b.binary(Op::Add {}, y, bb)?;
    }
    Ok((y, mean, inv))
}

/// `LayerNormalization(X, Scale, B)` with outputs Y, Mean, InvStdDev.
pub(crate) fn layer_norm(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let scale = n.input(1)?;
    let bias = n.opt(2);
    let rank = cx.b.rank(x.id);
    let axis = norm_axis(n.int("axis", -1)?, rank)?;
    let eps = n.float("epsilon", 1e-5)? as f64;
    let dtype = cx.b.dtype(x.id);
    let d = cx.b.shape(x.id)[rank - 1].clone();
    if axis == rank - 1 && !n.wants(1) && !n.wants(2) {
        let w = as_vector(cx, scale.id, &d, dtype)?;
        let bv = match bias {
            Some(bb) => as_vector(cx, bb.id, &d, dtype)?,
            None => Some(cx.b.add(Op::Fill { shape: vec![d.clone()], value: 0.0, dtype }, &[])?),
        };
        if let (Some(w), Some(bv)) = (w, bv) {
            let id = cx.b.add(Op::LayerNorm { eps }, &[x.id, w, bv])?;
            return Ok(vec![Some(cx.same(x, id))]);
        }
    }
    let (y, mean, inv) = decompose(cx, x.id, axis, eps, false, Some(scale.id), bias.map(|b| b.id))?;
    Ok(vec![Some(cx.same(x, y)), mean.map(|m| cx.val(m)), Some(cx.val(inv))])
}

/// `RMSNormalization(X, scale)` and `SimplifiedLayerNormalization(X, scale)`
/// (whose optional second output is the inverse RMS).
pub(crate) fn rms_norm(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let scale = n.input(1)?;
    let rank = cx.b.rank(x.id);
    let axis = norm_axis(n.int("axis", -1)?, rank)?;
    let eps = n.float("epsilon", 1e-5)? as f64;
    let dtype = cx.b.dtype(x.id);
    let d = cx.b.shape(x.id)[rank - 1].clone();
    if axis == rank - 1 && !n.wants(1) {
        if let Some(w) = as_vector(cx, scale.id, &d, dtype)? {
            let id = cx.b.add(Op::RmsNorm { eps }, &[x.id, w])?;
            return Ok(vec![Some(cx.same(x, id))]);
        }
    }
    let (y, _, inv) = decompose(cx, x.id, axis, eps, true, Some(scale.id), None)?;
    Ok(vec![Some(cx.same(x, y)), Some(cx.val(inv))])
}

/// s = input + skip (+ bias): returns s.
fn skip_sum(cx: &mut Importer, n: &Node, bias_input: usize) -> R<ValueId> {
    let (x, skip) = (n.input(0)?, n.input(1)?);
    let mut s = cx.b.binary(Op::Add {}, x.id, skip.id)?;
    if let Some(bias) = n.opt(bias_input) {
        s = cx.b.binary(Op::Add {}, s, bias.id)?;
    }
    Ok(s)
}

/// `SkipSimplifiedLayerNormalization(input, skip, gamma, bias)`: outputs
/// (rms_norm(s), mean (unused), inv_std_var, s) with s = input + skip + bias.
pub(crate) fn skip_rms_norm(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (x, skip, gamma) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let eps = n.float("epsilon", 1e-5)? as f64;
    let rank = cx.b.rank(x.id);
    if rank == 0 {
        return Err("input must have rank >= 1".into());
    }
    let dtype = cx.b.dtype(x.id);
    let d = cx.b.shape(x.id)[rank - 1].clone();
    if n.wants(1) {
        return Err("the mean output is not defined for an RMS norm".into());
    }
    let same = cx.b.ty(x.id) == cx.b.ty(skip.id);
    if !n.wants(2) {
        if let Some(w) = as_vector(cx, gamma.id, &d, dtype)? {
            let (xi, si) = match n.opt(3) {
                Some(bias) if same => (cx.b.binary(Op::Add {}, x.id, bias.id)?, skip.id),
                None if same => (x.id, skip.id),
                _ => {
                    // Broadcast skip: add first, then normalise.
                    let s = skip_sum(cx, n, 3)?;
                    let y = cx.b.add(Op::RmsNorm { eps }, &[s, w])?;
                    return Ok(vec![Some(cx.same(x, y)), None, None, Some(cx.same(x, s))]);
                }
            };
            let outs = cx.b.add_multi(Op::AddRmsNorm { eps }, &[xi, si, w])?;
            let (s, y) = (outs[0], outs[1]);
            return Ok(vec![Some(cx.same(x, y)), None, None, Some(cx.same(x, s))]);
        }
    }
    let s = skip_sum(cx, n, 3)?;
    let (y, _, inv) = decompose(cx, s, rank - 1, eps, true, Some(gamma.id), None)?;
    Ok(vec![Some(cx.same(x, y)), None, Some(cx.val(inv)), Some(cx.same(x, s))])
}

/// `SkipLayerNormalization(input, skip, gamma, beta, bias)`: outputs
/// (layer_norm(s), mean, inv_std_var, s) with s = input + skip + bias.
pub(crate) fn skip_layer_norm(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (x, gamma) = (n.input(0)?, n.input(2)?);
    let beta = n.opt(3);
    let eps = n.float("epsilon", 1e-5)? as f64;
    let rank = cx.b.rank(x.id);
    if rank == 0 {
        return Err("input must have rank >= 1".into());
    }
    let dtype = cx.b.dtype(x.id);
    let d = cx.b.shape(x.id)[rank - 1].clone();
    let s = skip_sum(cx, n, 4)?;
    if !n.wants(1) && !n.wants(2) {
        let w = as_vector(cx, gamma.id, &d, dtype)?;
        let bv = match beta {
            Some(bb) => as_vector(cx, bb.id, &d, dtype)?,
            None => Some(cx.b.add(Op::Fill { shape: vec![d.clone()], value: 0.0, dtype }, &[])?),
        };
        if let (Some(w), Some(bv)) = (w, bv) {
            let y = cx.b.add(Op::LayerNorm { eps }, &[s, w, bv])?;
            return Ok(vec![Some(cx.same(x, y)), None, None, Some(cx.same(x, s))]);
        }
    }
    let (y, mean, inv) = decompose(cx, s, rank - 1, eps, false, Some(gamma.id), beta.map(|b| b.id))?;
    Ok(vec![Some(cx.same(x, y)), mean.map(|m| cx.val(m)), Some(cx.val(inv)), Some(cx.same(x, s))])
}
