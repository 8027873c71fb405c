//! Fused ops, computed directly from their doc lines (not through their
//! decompositions, so that comparing the two tests both).
//!
//! Precision: a fused op computes in f32 for f32, f16 and bf16 tensors and in
//! f64 for f64 tensors, with f64 accumulation for every sum (dot products,
//! softmax and norm sums); only the op's results are rounded to the tensor
//! dtype. The rounding points in f32 follow the op's reference decomposition
//! step by step (each primitive rounds its result), so the fused op and its
//! decomposition agree to the last bit in f32 on ordinary inputs.

use super::common::{axis, bools, broadcast_index, broadcast_shape, floats, from_f64s, split_at_axis, OpResult};
use super::elementwise::{binary, sigmoid};
use super::linalg::matmul;
use crate::{DType, Data, Op, Tensor};

/// The precision a fused op computes in for a tensor dtype.
#[derive(Clone, Copy)]
pub(crate) struct Prec {
    wide: bool,
}

impl Prec {
    pub(crate) fn of(dtype: DType) -> Prec {
        Prec { wide: dtype == DType::F64 }
    }

    /// Rounds a value to the compute precision (a no-op for f64).
    pub(crate) fn r(self, x: f64) -> f64 {
        if self.wide {
            x
        } else {
            x as f32 as f64
        }
    }

    /// The compute dtype itself.
    fn dtype(self) -> DType {
        if self.wide {
            DType::F64
        } else {
            DType::F32
        }
    }
}

/// The last dim of a float tensor of rank >= 1 and the number of rows before it.
fn rows(x: &Tensor) -> OpResult<(usize, usize)> {
    if !x.dtype.is_float() {
        return Err(format!("needs a float operand, found {}", x.dtype));
    }
    let d = *x.shape.last().ok_or("needs rank >= 1")?;
    Ok((x.numel().checked_div(d).unwrap_or(0), d))
}

fn param(p: &Tensor, d: usize, what: &str) -> OpResult<Vec<f64>> {
    if p.shape != [d] {
        return Err(format!("{what} must have shape [{d}], found {:?}", p.shape));
    }
    Ok(floats(p))
}

/// x * rsqrt(mean(x^2) + eps) * w over the last axis. Squares are rounded to
/// the compute precision and summed in f64.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> OpResult {
    let (n, d) = rows(x)?;
    let wv = param(w, d, "w")?;
    let p = Prec::of(x.dtype);
    let (xv, eps) = (floats(x), p.r(eps));
    let mut out = vec![0.0; xv.len()];
    for r in 0..n {
        let row = &xv[r * d..(r + 1) * d];
        let sum: f64 = row.iter().map(|&v| p.r(v * v)).sum();
        let mean = p.r(sum / d as f64);
        let inv = p.r(1.0 / p.r(mean + eps).sqrt());
        for (c, &v) in row.iter().enumerate() {
            out[r * d + c] = p.r(p.r(v * inv) * wv[c]);
        }
    }
    Ok(from_f64s(x.dtype, x.shape.clone(), out))
}

/// (x - mean) * rsqrt(var + eps) * w + b over the last axis, with the biased
/// (population) variance.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> OpResult {
    let (n, d) = rows(x)?;
    let (wv, bv) = (param(w, d, "w")?, param(b, d, "b")?);
    let p = Prec::of(x.dtype);
    let (xv, eps) = (floats(x), p.r(eps));
    let mut out = vec![0.0; xv.len()];
    for r in 0..n {
        let row = &xv[r * d..(r + 1) * d];
        let mean = p.r(row.iter().sum::<f64>() / d as f64);
        let dev: Vec<f64> = row.iter().map(|&v| p.r(v - mean)).collect();
        let var = p.r(dev.iter().map(|&e| p.r(e * e)).sum::<f64>() / d as f64);
        let inv = p.r(1.0 / p.r(var + eps).sqrt());
        for (c, &e) in dev.iter().enumerate() {
            out[r * d + c] = p.r(p.r(p.r(e * inv) * wv[c]) + bv[c]);
        }
    }
    Ok(from_f64s(x.dtype, x.shape.clone(), out))
}

/// out = x*cos + rotate(x)*sin on the first R = cos.last_dim features, the
/// rest passed through. rotate_half(x1, x2) = (-x2, x1) over the two halves
/// of the rotated part; the interleaved variant rotates pairs (2i, 2i+1):
/// (-x[2i+1], x[2i]). cos and sin broadcast to x's rotated part.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> OpResult {
    let (n, d) = rows(x)?;
    let r = *cos.shape.last().ok_or("cos needs rank >= 1")?;
    if sin.shape != cos.shape || r % 2 != 0 || r == 0 || r > d {
        return Err(format!(
            "cos {:?} and sin {:?} must match, with an even last dim in 1..={d}",
            cos.shape, sin.shape
        ));
    }
    let mut part = x.shape.clone();
    if let Some(l) = part.last_mut() {
        *l = r;
    }
    if broadcast_shape(&cos.shape, &part)? != part {
        return Err(format!("cos {:?} does not broadcast to x's rotated part {part:?}", cos.shape));
    }
    let ci = broadcast_index(&cos.shape, &part);
    let p = Prec::of(x.dtype);
    let (xv, cv, sv) = (floats(x), floats(cos), floats(sin));
    let mut out = xv.clone();
    let h = r / 2;
    for row in 0..n {
        let xr = &xv[row * d..row * d + r];
        for f in 0..r {
            let rot = if interleaved {
                if f % 2 == 0 {
                    -xr[f + 1]
                } else {
                    xr[f - 1]
                }
            } else if f < h {
                -xr[f + h]
            } else {
                xr[f - h]
            };
            let k = ci[row * r + f];
            out[row * d + f] = p.r(p.r(xr[f] * cv[k]) + p.r(rot * sv[k]));
        }
    }
    Ok(from_f64s(x.dtype, x.shape.clone(), out))
}

/// What a mask operand contributes to one score.
enum Mask {
    Keep(Vec<bool>),
    Add(Vec<f64>),
}

/// Scaled dot-product attention over [batch, heads, seq, dim] (see the op's
/// doc line). Query head h reads kv head h / (hq / hkv). Query i sits at
/// absolute position t - s + i; `causal` lets it see keys j <= that position
/// and `window` w (with or without `causal`) only keys j > position - w. A
/// bool mask keeps the true entries; a float mask is added. A row with no
/// visible key, or whose visible scores are all -inf, yields zeros.
// The operands and attributes are the op's own; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    causal: bool,
    window: Option<i64>,
    softcap: Option<f64>,
) -> OpResult {
    let (qs, ks, vs) = (&q.shape, &k.shape, &v.shape);
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        return Err("q, k and v must have rank 4".into());
    }
    let (b, hq, s, dq) = (qs[0], qs[1], qs[2], qs[3]);
    let (hkv, t, dv) = (ks[1], ks[2], vs[3]);
    if ks[0] != b || vs[0] != b || vs[1] != hkv || vs[2] != t || ks[3] != dq || hkv == 0 || hq % hkv != 0 {
        return Err(format!("q {qs:?}, k {ks:?} and v {vs:?} do not fit together"));
    }
    let group = hq / hkv;
    let full = [b, hq, s, t];
    let mask = match mask {
        None => None,
        Some(m) => {
            if broadcast_shape(&m.shape, &full)? != full {
                return Err(format!("mask {:?} does not broadcast to {full:?}", m.shape));
            }
            let idx = broadcast_index(&m.shape, &full);
            Some(match m.data {
                Data::Bool(_) => {
                    let mv = bools(m);
                    Mask::Keep(idx.iter().map(|&i| mv[i]).collect())
                }
                _ => {
                    let mv = floats(m);
                    Mask::Add(idx.iter().map(|&i| mv[i]).collect())
                }
            })
        }
    };
    let p = Prec::of(q.dtype);
    let (qv, kv, vv) = (floats(q), floats(k), floats(v));
    let (scale, cap) = (p.r(scale), softcap.map(|c| p.r(c)));
    let mut out = vec![0.0; b * hq * s * dv];
    let mut scores = vec![0.0; t];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..s {
                let pos = t as i64 - s as i64 + i as i64;
                let qrow = &qv[((bi * hq + h) * s + i) * dq..][..dq];
                for (j, score) in scores.iter_mut().enumerate() {
                    let krow = &kv[((bi * hkv + kh) * t + j) * dq..][..dq];
                    let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    let mut sc = p.r(p.r(dot) * scale);
                    if let Some(c) = cap {
                        sc = p.r(c * p.r(p.r(sc / c).tanh()));
                    }
                    let mut keep = true;
                    let at = ((bi * hq + h) * s + i) * t + j;
                    match &mask {
                        Some(Mask::Keep(m)) => keep = m[at],
                        Some(Mask::Add(m)) => sc = p.r(sc + m[at]),
                        None => {}
                    }
                    let j = j as i64;
                    if causal && j > pos {
                        keep = false;
                    }
                    if matches!(window, Some(w) if j <= pos - w) {
                        keep = false;
                    }
                    *score = if keep { sc } else { f64::NEG_INFINITY };
                }
                let m =
                    scores.iter().fold(
                        f64::NEG_INFINITY,
                        |m, &x| {
                            if m.is_nan() || x.is_nan() {
                                f64::NAN
                            } else {
                                m.max(x)
                            }
                        },
                    );
                if m == f64::NEG_INFINITY {
                    // Fully masked: the output row stays zero.
                    continue;
                }
                let e: Vec<f64> = scores.iter().map(|&x| p.r(p.r(x - m).exp())).collect();
                let sum = p.r(e.iter().sum::<f64>());
                let probs: Vec<f64> = e.iter().map(|&x| p.r(x / sum)).collect();
                let orow = &mut out[((bi * hq + h) * s + i) * dv..][..dv];
                for (c, o) in orow.iter_mut().enumerate() {
                    let acc: f64 =
                        probs.iter().enumerate().map(|(j, &pj)| pj * vv[((bi * hkv + kh) * t + j) * dv + c]).sum();
                    *o = p.r(acc);
                }
            }
        }
    }
    Ok(from_f64s(q.dtype, vec![b, hq, s, dv], out))
}

/// One activation of `gated_mlp`, rounded after every step like the
/// primitive spelling in its decomposition.
pub(crate) fn activation(act: &str, x: f64, p: Prec) -> OpResult<f64> {
    let r = |v: f64| p.r(v);
    Ok(match act {
        "silu" => r(x * r(sigmoid(x))),
        "gelu_tanh" => {
            let x3 = r(r(x * x) * x);
            let inner = r(x + r(r(0.044715) * x3));
            let t = r(r(r((2.0 / std::f64::consts::PI).sqrt()) * inner).tanh());
            r(r(0.5 * x) * r(1.0 + t))
        }
        "gelu" => {
            let e = r(libm::erf(r(x / r(std::f64::consts::SQRT_2))));
            r(r(0.5 * x) * r(1.0 + e))
        }
        _ => return Err(format!("unknown activation `{act}` (expected silu, gelu_tanh or gelu)")),
    })
}

/// act(x·w_gate) * (x·w_up), the products computed like `matmul`.
pub(crate) fn gated_mlp(x: &Tensor, w_gate: &Tensor, w_up: &Tensor, act: &str) -> OpResult {
    let p = Prec::of(x.dtype);
    // The products are rounded to the compute precision, not to a narrow dtype.
    let widen = |t: &Tensor| Tensor {
        dtype: p.dtype(),
        shape: t.shape.clone(),
        data: match (&t.data, p.wide) {
            (Data::F32(v), true) => Data::F64(v.iter().map(|&x| x as f64).collect()),
            (d, _) => d.clone(),
        },
    };
    let (xw, gw, uw) = (widen(x), widen(w_gate), widen(w_up));
    let g = floats(&matmul(&xw, &gw)?);
    let u = matmul(&xw, &uw)?;
    let out =
        g.iter().zip(floats(&u)).map(|(&g, u)| Ok(p.r(activation(act, g, p)? * u))).collect::<OpResult<Vec<f64>>>()?;
    Ok(from_f64s(x.dtype, u.shape, out))
}

/// exp(x - max) / sum(exp(x - max)) along an axis (NaN when a slice is all
/// -inf, as the formula says).
pub(crate) fn softmax(x: &Tensor, ax: i64) -> OpResult {
    if !x.dtype.is_float() {
        return Err(format!("needs a float operand, found {}", x.dtype));
    }
    let a = axis(ax, x.shape.len())?;
    let (outer, dim, inner) = split_at_axis(&x.shape, a);
    let p = Prec::of(x.dtype);
    let xv = floats(x);
    let mut out = vec![0.0; xv.len()];
    for o in 0..outer {
        for n in 0..inner {
            let at = |k: usize| (o * dim + k) * inner + n;
            let m = (0..dim).fold(f64::NEG_INFINITY, |m, k| {
                let v = xv[at(k)];
                if m.is_nan() || v.is_nan() {
                    f64::NAN
                } else {
                    m.max(v)
                }
            });
            let e: Vec<f64> = (0..dim).map(|k| p.r(p.r(xv[at(k)] - m).exp())).collect();
            let sum = p.r(e.iter().sum::<f64>());
            for (k, &ek) in e.iter().enumerate() {
                out[at(k)] = p.r(ek / sum);
            }
        }
    }
    Ok(from_f64s(x.dtype, x.shape.clone(), out))
}

/// s = x + residual (rounded to the dtype, as it is a result), then rms_norm(s, w).
pub(crate) fn add_rms_norm(x: &Tensor, residual: &Tensor, w: &Tensor, eps: f64) -> OpResult<Vec<Tensor>> {
    if x.shape != residual.shape {
        return Err(format!("x {:?} and residual {:?} differ", x.shape, residual.shape));
    }
    let s = binary(&Op::Add {}, x, residual)?;
    let n = rms_norm(&s, w, eps)?;
    Ok(vec![s, n])
}
