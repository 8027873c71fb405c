//! Attention and rotary embeddings onto the fused IR ops `attention` and
//! `rope`: ONNX `Attention` and `RotaryEmbedding` (opset 23), and ONNX
//! Runtime's `RotaryEmbedding`, `GroupQueryAttention` and
//! `MultiHeadAttention` (`com.microsoft`).
//!
//! Conventions the IR ops fix, and how each ONNX form maps onto them:
//! - `attention` takes `[batch, heads, seq, dim]` q/k/v; 3-D `[batch, seq,
//!   heads*dim]` inputs are split into heads and the output merged back.
//!   Grouped-query heads map as ONNX's repeat-interleave does (query head h
//!   reads kv head h / group).
//! - the IR's causal and sliding-window masks align the last query with the
//!   last key (query i sits at position `kv_len - q_len + i`). That is ONNX
//!   `Attention`'s rule when there is a past cache (offset = past length) and
//!   when q and kv lengths are equal; otherwise (cross-length causal without
//!   a cache, or `nonpad_kv_seqlen`) the causal mask is built explicitly.
//! - a fully masked row yields zeros, in the IR op and in ONNX; graphs that
//!   ask for the attention scores (`qk_matmul_output`) are spelled with
//!   primitives.
//! - `left_window_size` / `right_window_size` (opset 25) keep keys
//!   `p - left <= j <= p + right` for a query at position p; a causal left
//!   window of w is the IR window w + 1.
//! - `rope` takes full-width cos/sin (`[.., R]`) with rotate-half or
//!   interleaved pairing; ONNX's half-width caches are duplicated
//!   (`concat(c, c)`) or repeated pairwise to match.
//! - `GroupQueryAttention` assumes unpadded batches: every row's
//!   `seqlens_k + 1` equals the key length, so `seqlens_k` and
//!   `total_sequence_length` are not read. Its `local_window_size` w keeps
//!   keys `j >= pos - w`, an IR window of w + 1.

use super::{Importer, Node, Outs, R};
use smelt_ir::{DType, Dim, Op, ValueId};

/// [b, s, h*d] -> [b, h, s, d].
fn split_heads(cx: &mut Importer, x: ValueId, heads: i64) -> R<ValueId> {
    let s = cx.b.shape(x);
    if s.len() != 3 {
        return Err(format!("expected a 3-D [batch, seq, hidden] input, found rank {}", s.len()));
    }
    let hidden = s[2].as_const().ok_or("the hidden size must be a constant")?;
    if heads <= 0 || hidden % heads != 0 {
        return Err(format!("hidden size {hidden} does not split into {heads} heads"));
    }
    let r = cx.b.reshape(x, vec![s[0].clone(), s[1].clone(), Dim::c(heads), Dim::c(hidden / heads)])?;
    cx.b.transpose(r, vec![0, 2, 1, 3])
}

/// [b, h, s, d] -> [b, s, h*d].
fn merge_heads(cx: &mut Importer, x: ValueId) -> R<ValueId> {
    let t = cx.b.transpose(x, vec![0, 2, 1, 3])?;
    let s = cx.b.shape(t);
    cx.b.reshape(t, vec![s[0].clone(), s[1].clone(), s[2].clone() * s[3].clone()])
}

/// Combines two attention masks into one operand the IR accepts: bool and
/// bool with `and`, bool and additive with `where(keep, add, -inf)`,
/// additive and additive with `+`.
fn combine_masks(cx: &mut Importer, a: Option<ValueId>, b: Option<ValueId>, dtype: DType) -> R<Option<ValueId>> {
    let (a, b) = match (a, b) {
        (None, m) | (m, None) => return Ok(m),
        (Some(a), Some(b)) => (a, b),
    };
    let (ab, bb) = (cx.b.dtype(a) == DType::Bool, cx.b.dtype(b) == DType::Bool);
    Ok(Some(match (ab, bb) {
        (true, true) => cx.b.binary(Op::And {}, a, b)?,
        (false, false) => cx.b.binary(Op::Add {}, a, b)?,
        (true, false) | (false, true) => {
            let (keep, add) = if ab { (a, b) } else { (b, a) };
            let ninf = cx.b.scalar(dtype, f64::NEG_INFINITY);
            cx.b.add(Op::Where {}, &[keep, add, ninf])?
        }
    }))
}

/// Where query i sits among the keys: `offset + i`.
enum Offset {
    /// The same for every row.
    Dim(Dim),
    /// Per batch row, shaped [b, 1, 1, 1].
    PerRow(ValueId),
}

/// A bool mask ([q_len, kv_len], or [b, 1, q_len, kv_len] with a per-row
/// offset) keeping key j for query i at position p = offset + i when
/// `j <= p` (causal), `j >= p - left` (left >= 0) and `j <= p + right`
/// (right >= 0).
fn positional_mask(
    cx: &mut Importer,
    q_len: &Dim,
    kv_len: &Dim,
    offset: &Offset,
    causal: bool,
    left: i64,
    right: i64,
) -> R<ValueId> {
    let off = match offset {
        Offset::Dim(d) => cx.b.materialize(&super::shape::ShapeValue::scalar(d.clone()), DType::I64)?,
        Offset::PerRow(v) => *v,
    };
    let b = &mut cx.b;
    let range = |b: &mut super::Builder, n: &Dim| {
        b.add(Op::Range { start: Dim::c(0), end: n.clone(), step: 1, dtype: DType::I64 }, &[])
    };
    let i = range(b, q_len)?;
    let j = range(b, kv_len)?;
    let i = b.unsqueeze(i, vec![1])?;
    let j = b.unsqueeze(j, vec![0])?;
    let pos = b.binary(Op::Add {}, i, off)?;
    let mut conds = Vec::new();
    if causal {
        conds.push(b.binary(Op::Le {}, j, pos)?);
    }
    if left >= 0 {
        let l = b.scalar(DType::I64, left as f64);
        let lo = b.binary(Op::Sub {}, pos, l)?;
        conds.push(b.binary(Op::Ge {}, j, lo)?);
    }
    if right >= 0 && !causal {
        let r = b.scalar(DType::I64, right as f64);
        let hi = b.binary(Op::Add {}, pos, r)?;
        conds.push(b.binary(Op::Le {}, j, hi)?);
    }
    let mut keep = match conds.first() {
        Some(c) => *c,
        None => {
            return b.add(Op::Fill { shape: vec![q_len.clone(), kv_len.clone()], value: 1.0, dtype: DType::Bool }, &[])
        }
    };
    for c in &conds[1..] {
        keep = b.binary(Op::And {}, keep, *c)?;
    }
    Ok(keep)
}

/// Attention over [b, h, s, d] operands with everything resolved.
struct Core {
    q: ValueId,
    k: ValueId,
    v: ValueId,
    mask: Option<ValueId>,
    scale: f64,
    causal: bool,
    window: Option<i64>,
    softcap: Option<f64>,
}

fn fused(cx: &mut Importer, c: Core) -> R<ValueId> {
    let dtype = cx.b.dtype(c.q);
    let mut ins = vec![c.q, c.k, c.v];
    if let Some(m) = c.mask {
        let m = if cx.b.dtype(m) == DType::Bool { m } else { cx.b.cast(m, dtype)? };
        ins.push(m);
    }
    cx.b.add(Op::Attention { scale: c.scale, causal: c.causal, window: c.window, softcap: c.softcap }, &ins)
}

/// Repeats kv heads to the query heads: [b, hk, t, d] -> [b, hq, t, d] with
/// head h holding kv head h / (hq / hk).
fn repeat_kv(cx: &mut Importer, k: ValueId, hq: &Dim) -> R<ValueId> {
    let s = cx.b.shape(k);
    if &s[1] == hq {
        return Ok(k);
    }
    let hk = s[1].as_const().ok_or("kv heads must be a constant")?;
    let hqc = hq.as_const().ok_or("query heads must be a constant")?;
    if hk <= 0 || hqc % hk != 0 {
        return Err(format!("{hqc} query heads are not a multiple of {hk} kv heads"));
    }
    let g = hqc / hk;
    let u = cx.b.unsqueeze(k, vec![2])?;
    let e = cx.b.expand(u, vec![s[0].clone(), s[1].clone(), Dim::c(g), s[2].clone(), s[3].clone()])?;
    cx.b.reshape(e, vec![s[0].clone(), hq.clone(), s[2].clone(), s[3].clone()])
}

/// ONNX `Attention` spelled with primitives, returning (y, qk output) for
/// `qk_matmul_output_mode` (0/1: scores after softcap, 2: after the mask, 3:
/// after softmax).
fn primitive(cx: &mut Importer, c: &Core, mode: i64) -> R<(ValueId, ValueId)> {
    let hq = cx.b.shape(c.q)[1].clone();
    let k = repeat_kv(cx, c.k, &hq)?;
    let v = repeat_kv(cx, c.v, &hq)?;
    let b = &mut cx.b;
    let kt = b.transpose(k, vec![0, 1, 3, 2])?;
    let s = b.binary(Op::MatMul {}, c.q, kt)?;
    let sc = b.like(s, c.scale);
    let mut s = b.binary(Op::Mul {}, s, sc)?;
    if let Some(cap) = c.softcap {
        let capv = b.like(s, cap);
        let d = b.binary(Op::Div {}, s, capv)?;
        let t = b.unary(Op::Tanh {}, d)?;
        s = b.binary(Op::Mul {}, t, capv)?;
    }
    let after_cap = s;
    if let Some(m) = c.mask {
        s = if b.dtype(m) == DType::Bool {
            let ninf = b.like(s, f64::NEG_INFINITY);
            let zero = b.like(s, 0.0);
            let bias = b.add(Op::Where {}, &[m, zero, ninf])?;
            b.binary(Op::Add {}, s, bias)?
        } else {
            let m = b.cast(m, b.dtype(s))?;
            b.binary(Op::Add {}, s, m)?
        };
    }
    let after_mask = s;
    let p = b.add(Op::Softmax { axis: -1 }, &[s])?;
    // A fully masked row has no distribution: ONNX defines its
    // probabilities (and so its output) as zeros, as the fused op does.
    let nan = b.unary(Op::IsNan {}, p)?;
    let zero = b.like(p, 0.0);
    let p = b.add(Op::Where {}, &[nan, zero, p])?;
    let y = b.binary(Op::MatMul {}, p, v)?;
    let qk = match mode {
        2 => after_mask,
        3 => p,
        _ => after_cap,
    };
    Ok((y, qk))
}

/// ONNX `Attention` (opset 23/24).
pub(crate) fn attention(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (q, k, v) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let (mask, past_k, past_v, nonpad) = (n.opt(3), n.opt(4), n.opt(5), n.opt(6));
    let ranks = [cx.b.rank(q.id), cx.b.rank(k.id), cx.b.rank(v.id)];
    if !(ranks == [3, 3, 3] || ranks == [4, 4, 4]) {
        return Err(format!("Q, K and V must all be 3-D or all 4-D, found ranks {ranks:?}"));
    }
    for p in [past_k, past_v].into_iter().flatten() {
        if cx.b.rank(p.id) != 4 {
            return Err("past_key and past_value must be 4-D".into());
        }
    }
    let three_d = ranks[0] == 3;
    let dtype = cx.b.dtype(q.id);
    let (mut qi, mut ki, mut vi) = (q.id, k.id, v.id);
    if three_d {
        let qh = n.int_opt("q_num_heads")?.ok_or("3-D inputs need q_num_heads")?;
        let kh = n.int_opt("kv_num_heads")?.ok_or("3-D inputs need kv_num_heads")?;
        qi = split_heads(cx, qi, qh)?;
        ki = split_heads(cx, ki, kh)?;
        vi = split_heads(cx, vi, kh)?;
    }
    if let Some(pk) = past_k {
        ki = cx.b.add(Op::Concat { axis: 2 }, &[pk.id, ki])?;
    }
    if let Some(pv) = past_v {
        vi = cx.b.add(Op::Concat { axis: 2 }, &[pv.id, vi])?;
    }
    let qs = cx.b.shape(qi);
    let ks = cx.b.shape(ki);
    let hd = qs[3].as_const().ok_or("the head size must be a constant")?;
    let scale = match n.float_opt("scale")? {
        Some(s) => s as f64,
        None => 1.0 / (hd as f64).sqrt(),
    };
    let softcap = n.float("softcap", 0.0)?;
    let softcap = (softcap > 0.0).then_some(softcap as f64);
    let (q_len, kv_len) = (qs[2].clone(), ks[2].clone());

    // The user mask, padded with "masked" up to the key length when shorter.
    let mut m = match mask {
        Some(m) => {
            let ms = cx.b.shape(m.id);
            let last = ms.last().cloned().unwrap_or(Dim::c(1));
            if last != kv_len && last.as_const() != Some(1) {
                let mut pad = ms.clone();
                let rank = pad.len();
                pad[rank - 1] = kv_len.clone() - last;
                let is_bool = cx.b.dtype(m.id) == DType::Bool;
                let fill = cx.b.add(
                    Op::Fill {
                        shape: pad,
                        value: if is_bool { 0.0 } else { f64::NEG_INFINITY },
                        dtype: cx.b.dtype(m.id),
                    },
                    &[],
                )?;
                Some(cx.b.add(Op::Concat { axis: -1 }, &[m.id, fill])?)
            } else {
                Some(m.id)
            }
        }
        None => None,
    };
    let is_causal = n.int("is_causal", 0)? != 0;
    let left = n.int("left_window_size", -1)?;
    let right = n.int("right_window_size", -1)?;
    // Where query i sits among the keys: past length + i with a cache,
    // (valid length - q_len) + i per row with `nonpad_kv_seqlen`, else i.
    let offset = match (past_k, nonpad) {
        (Some(pk), _) => Offset::Dim(cx.b.shape(pk.id)[2].clone()),
        (None, Some(np)) => {
            let npv = cx.b.cast(np.id, DType::I64)?;
            let lim = cx.b.unsqueeze(npv, vec![1])?; // [b, 1]
                                                     // Keys at or beyond each row's valid length are masked.
            let j = cx.b.add(Op::Range { start: Dim::c(0), end: kv_len.clone(), step: 1, dtype: DType::I64 }, &[])?;
            let j = cx.b.unsqueeze(j, vec![0])?; // [1, t]
            let keep = cx.b.binary(Op::Lt {}, j, lim)?; // [b, t]
            let keep = cx.b.unsqueeze(keep, vec![1, 2])?; // [b, 1, 1, t]
            m = combine_masks(cx, m, Some(keep), dtype)?;
            let ql = cx.b.materialize(&super::shape::ShapeValue::scalar(q_len.clone()), DType::I64)?;
            let o = cx.b.binary(Op::Sub {}, npv, ql)?;
            let b0 = cx.b.shape(npv)[0].clone();
            Offset::PerRow(cx.b.reshape(o, vec![b0, Dim::c(1), Dim::c(1), Dim::c(1)])?)
        }
        (None, None) => Offset::Dim(Dim::c(0)),
    };
    // The IR's own causal / window flags put query i at kv_len - q_len + i;
    // they are used when that is where ONNX puts it.
    let aligned = matches!(&offset, Offset::Dim(d) if *d == kv_len.clone() - q_len.clone());
    let wants_qk = n.wants(3);
    let (mut causal, mut window) = (false, None);
    if aligned && (right < 0 || is_causal) && !wants_qk {
        causal = is_causal;
        window = (left >= 0).then_some(left + 1);
    } else if is_causal || left >= 0 || right >= 0 {
        let pm = positional_mask(cx, &q_len, &kv_len, &offset, is_causal, left, right)?;
        m = combine_masks(cx, m, Some(pm), dtype)?;
    }
    let core = Core { q: qi, k: ki, v: vi, mask: m, scale, causal, window, softcap };
    let mode = n.int("qk_matmul_output_mode", 0)?;
    let (mut y, qk) = if wants_qk {
        let (y, qk) = primitive(cx, &core, mode)?;
        (y, Some(qk))
    } else {
        (fused(cx, core)?, None)
    };
    if three_d {
        y = merge_heads(cx, y)?;
    }
    let present_k = n.wants(1).then(|| cx.same(k, ki));
    let present_v = n.wants(2).then(|| cx.same(v, vi));
    Ok(vec![Some(cx.same(q, y)), present_k, present_v, qk.map(|id| cx.same(q, id))])
}

/// Full-width rotary tables from half-width ones: [.., R/2] -> [.., R],
/// duplicated halves (rotate-half) or each entry twice (interleaved).
fn widen(cx: &mut Importer, c: ValueId, interleaved: bool) -> R<ValueId> {
    if !interleaved {
        return cx.b.add(Op::Concat { axis: -1 }, &[c, c]);
    }
    let mut s = cx.b.shape(c);
    let u = cx.b.unsqueeze(c, vec![-1])?;
    let mut e = s.clone();
    e.push(Dim::c(2));
    let x = cx.b.expand(u, e)?;
    let last = s.pop().unwrap_or(Dim::c(1));
    s.push(last * Dim::c(2));
    cx.b.reshape(x, s)
}

/// Applies rope to [b, h, s, d] with half-width cos/sin of shape [b|1, s, R/2].
fn rope_heads(cx: &mut Importer, x: ValueId, cos: ValueId, sin: ValueId, interleaved: bool) -> R<ValueId> {
    let dtype = cx.b.dtype(x);
    let c = widen(cx, cos, interleaved)?;
    let s = widen(cx, sin, interleaved)?;
    let c = cx.b.cast(c, dtype)?;
    let s = cx.b.cast(s, dtype)?;
    let c = cx.b.unsqueeze(c, vec![1])?;
    let s = cx.b.unsqueeze(s, vec![1])?;
    cx.b.add(Op::Rope { interleaved }, &[x, c, s])
}

/// Half-width cos/sin rows for positions: caches [max, R/2] gathered at
/// `pos` ([b, s] or [1, s]).
fn gather_cache(cx: &mut Importer, cos: ValueId, sin: ValueId, pos: ValueId) -> R<(ValueId, ValueId)> {
    let c = cx.b.add(Op::Gather { axis: 0 }, &[cos, pos])?;
    let s = cx.b.add(Op::Gather { axis: 0 }, &[sin, pos])?;
    Ok((c, s))
}

/// Rotary embedding of a 3-D [b, s, h*d] or 4-D [b, h, s, d] input.
fn rotary_any(
    cx: &mut Importer,
    x: ValueId,
    cos: ValueId,
    sin: ValueId,
    interleaved: bool,
    num_heads: i64,
    rot_dim: i64,
) -> R<ValueId> {
    let shape = cx.b.shape(x);
    let x4 = match shape.len() {
        4 => x,
        3 => {
            let hidden = shape[2].as_const().ok_or("the hidden size must be a constant")?;
            let heads = if num_heads > 0 {
                num_heads
            } else {
                let half = cx.b.shape(cos).last().and_then(Dim::as_const).ok_or("cos must have a constant last dim")?;
                let hd = if rot_dim > 0 { rot_dim } else { 2 * half };
                if hd <= 0 || hidden % hd != 0 {
                    return Err("3-D input needs num_heads".into());
                }
                hidden / hd
            };
            split_heads(cx, x, heads)?
        }
        r => return Err(format!("input must be 3-D or 4-D, found rank {r}")),
    };
    let hd = cx.b.shape(x4)[3].as_const().ok_or("the head size must be a constant")?;
    let r = if rot_dim > 0 { rot_dim } else { hd };
    let half = cx.b.shape(cos).last().and_then(Dim::as_const).ok_or("cos must have a constant last dim")?;
    if half * 2 != r {
        return Err(format!("cos/sin have {half} columns for a rotary dim of {r}"));
    }
    let y = rope_heads(cx, x4, cos, sin, interleaved)?;
    if shape.len() == 3 {
        merge_heads(cx, y)
    } else {
        Ok(y)
    }
}

/// ONNX `RotaryEmbedding(X, cos_cache, sin_cache, position_ids)` (opset 23).
pub(crate) fn rotary(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (x, cos, sin) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let (c, s) = match n.opt(3) {
        Some(pos) => gather_cache(cx, cos.id, sin.id, pos.id)?,
        None => (cos.id, sin.id),
    };
    let y = rotary_any(
        cx,
        x.id,
        c,
        s,
        n.int("interleaved", 0)? != 0,
        n.int("num_heads", 0)?,
        n.int("rotary_embedding_dim", 0)?,
    )?;
    Ok(vec![Some(cx.same(x, y))])
}

/// Position ids of ORT's contrib ops: [b, s] as given, or a [1] offset
/// meaning positions offset..offset+s.
fn positions(cx: &mut Importer, pos: ValueId, seq: &Dim) -> R<ValueId> {
    if cx.b.rank(pos) == 2 {
        return Ok(pos);
    }
    let iota = cx.b.add(Op::Range { start: Dim::c(0), end: seq.clone(), step: 1, dtype: cx.b.dtype(pos) }, &[])?;
    let off = cx.b.reshape(pos, vec![Dim::c(1), Dim::c(1)])?;
    let iota = cx.b.unsqueeze(iota, vec![0])?;
    cx.b.binary(Op::Add {}, off, iota)
}

/// `com.microsoft.RotaryEmbedding(input, position_ids, cos_cache, sin_cache)`.
pub(crate) fn rotary_ms(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (x, pos, cos, sin) = (n.input(0)?, n.input(1)?, n.input(2)?, n.input(3)?);
    if n.int("is_packed_batching", 0)? != 0 {
        return Err("is_packed_batching is not supported".into());
    }
    let shape = cx.b.shape(x.id);
    let seq = match shape.len() {
        4 => shape[2].clone(),
        3 => shape[1].clone(),
        r => return Err(format!("input must be 3-D or 4-D, found rank {r}")),
    };
    let p = positions(cx, pos.id, &seq)?;
    let (c, s) = gather_cache(cx, cos.id, sin.id, p)?;
    let y = rotary_any(
        cx,
        x.id,
        c,
        s,
        n.int("interleaved", 0)? != 0,
        n.int("num_heads", 0)?,
        n.int("rotary_embedding_dim", 0)?,
    )?;
    Ok(vec![Some(cx.same(x, y))])
}

/// `com.microsoft.GroupQueryAttention`.
pub(crate) fn group_query_attention(cx: &mut Importer, n: &Node) -> R<Outs> {
    let q = n.input(0)?;
    let nh = n.attrs.require_int("num_heads").map_err(|e| e.to_string())?;
    let kvh = n.attrs.require_int("kv_num_heads").map_err(|e| e.to_string())?;
    if n.int("smooth_softmax", 0)? != 0 || n.opt(11).is_some() {
        return Err("smooth_softmax / head_sink are not supported".into());
    }
    if n.int("qk_output", 0)? != 0 || n.wants(3) {
        return Err("the output_qk output is not supported".into());
    }
    if n.ins.len() > 12 && n.ins[12..].iter().any(Option::is_some) {
        return Err("quantized KV caches and q/k norm inputs are not supported".into());
    }
    let qs = cx.b.shape(q.id);
    if qs.len() != 3 {
        return Err("query must be 3-D [batch, seq, hidden]".into());
    }
    let (qi, ki, vi) = match (n.opt(1), n.opt(2)) {
        (Some(k), Some(v)) => (q.id, k.id, v.id),
        (None, None) => {
            // Packed QKV: [b, s, (nh + 2 kvh) * hd].
            let width = qs[2].as_const().ok_or("the packed width must be a constant")?;
            let hd = width / (nh + 2 * kvh);
            let (a, bb) = (nh * hd, kvh * hd);
            let qq = cx.b.slice(q.id, 2, Dim::c(0), Dim::c(a))?;
            let kk = cx.b.slice(q.id, 2, Dim::c(a), Dim::c(a + bb))?;
            let vv = cx.b.slice(q.id, 2, Dim::c(a + bb), Dim::c(a + 2 * bb))?;
            (qq, kk, vv)
        }
        _ => return Err("key and value must both be given or both omitted".into()),
    };
    let q4 = split_heads(cx, qi, nh)?;
    let mut k4 = split_heads(cx, ki, kvh)?;
    let v4 = split_heads(cx, vi, kvh)?;
    let hd = cx.b.shape(q4)[3].as_const().ok_or("the head size must be a constant")?;
    let seq = qs[1].clone();
    let past_k = n.opt(3);
    let past_v = n.opt(4);
    for p in [past_k, past_v].into_iter().flatten() {
        if cx.b.rank(p.id) != 4 {
            return Err("past_key and past_value must be 4-D [batch, kv_heads, past, head_size]".into());
        }
    }
    let mut q4 = q4;
    if n.int("do_rotary", 0)? != 0 {
        let (cos, sin) = (n.opt(7).ok_or("do_rotary needs cos_cache")?, n.opt(8).ok_or("do_rotary needs sin_cache")?);
        let p = match n.opt(9) {
            Some(p) => p.id,
            None => {
                let past = match past_k {
                    Some(pk) => cx.b.shape(pk.id)[2].clone(),
                    None => Dim::c(0),
                };
                let r = cx
                    .b
                    .add(Op::Range { start: past.clone(), end: past + seq.clone(), step: 1, dtype: DType::I64 }, &[])?;
                cx.b.unsqueeze(r, vec![0])?
            }
        };
        let (c, s) = gather_cache(cx, cos.id, sin.id, p)?;
        let il = n.int("rotary_interleaved", 0)? != 0;
        q4 = rope_heads(cx, q4, c, s, il)?;
        k4 = rope_heads(cx, k4, c, s, il)?;
    }
    let kp = match past_k {
        Some(pk) => cx.b.add(Op::Concat { axis: 2 }, &[pk.id, k4])?,
        None => k4,
    };
    let vp = match past_v {
        Some(pv) => cx.b.add(Op::Concat { axis: 2 }, &[pv.id, v4])?,
        None => v4,
    };
    let scale = match n.float_opt("scale")? {
        Some(s) if s != 0.0 => s as f64,
        _ => 1.0 / (hd as f64).sqrt(),
    };
    let softcap = n.float("softcap", 0.0)?;
    let w = n.int("local_window_size", -1)?;
    let causal = n.int("causal", 1)? != 0;
    let core = Core {
        q: q4,
        k: kp,
        v: vp,
        mask: n.opt(10).map(|m| m.id),
        scale,
        causal,
        window: (w > 0).then_some(w + 1),
        softcap: (softcap > 0.0).then_some(softcap as f64),
    };
    let y = fused(cx, core)?;
    let y = merge_heads(cx, y)?;
    Ok(vec![Some(cx.same(q, y)), Some(cx.same(q, kp)), Some(cx.same(q, vp))])
}

/// `com.microsoft.MultiHeadAttention` with separate query, key and value.
pub(crate) fn multi_head_attention(cx: &mut Importer, n: &Node) -> R<Outs> {
    let q = n.input(0)?;
    let nh = n.attrs.require_int("num_heads").map_err(|e| e.to_string())?;
    let (k, v) = (
        n.opt(1).ok_or("packed QKV (no key input) is not supported")?,
        n.opt(2).ok_or("packed KV (no value input) is not supported")?,
    );
    if n.wants(3) {
        return Err("the qk output is not supported".into());
    }
    let dtype = cx.b.dtype(q.id);
    let (mut qi, mut ki, mut vi) = (q.id, k.id, v.id);
    if cx.b.rank(qi) != 3 {
        return Err("query must be 3-D [batch, seq, hidden]".into());
    }
    let kv_3d = cx.b.rank(ki) == 3;
    if !kv_3d && (cx.b.rank(ki) != 4 || cx.b.rank(vi) != 4) {
        return Err("key and value must be 3-D, or 4-D [batch, heads, kv_seq, head_size]".into());
    }
    for p in [n.opt(6), n.opt(7)].into_iter().flatten() {
        if cx.b.rank(p.id) != 4 {
            return Err("past_key and past_value must be 4-D".into());
        }
    }
    if let Some(bias) = n.opt(3) {
        // Bias for q, k and v, concatenated: [hidden + hidden + v_hidden].
        let hq = cx.b.shape(qi)[2].as_const().ok_or("hidden size must be a constant")?;
        let hv = cx.b.shape(vi).last().and_then(Dim::as_const).ok_or("v hidden size must be a constant")?;
        let hv = if kv_3d { hv } else { hv * nh };
        let bq = cx.b.slice(bias.id, 0, Dim::c(0), Dim::c(hq))?;
        let bk = cx.b.slice(bias.id, 0, Dim::c(hq), Dim::c(2 * hq))?;
        let bv = cx.b.slice(bias.id, 0, Dim::c(2 * hq), Dim::c(2 * hq + hv))?;
        qi = cx.b.binary(Op::Add {}, qi, bq)?;
        if kv_3d {
            ki = cx.b.binary(Op::Add {}, ki, bk)?;
            vi = cx.b.binary(Op::Add {}, vi, bv)?;
        }
    }
    let q4 = split_heads(cx, qi, nh)?;
    let (mut k4, mut v4) = if kv_3d { (split_heads(cx, ki, nh)?, split_heads(cx, vi, nh)?) } else { (ki, vi) };
    if kv_3d {
        if let Some(pk) = n.opt(6) {
            k4 = cx.b.add(Op::Concat { axis: 2 }, &[pk.id, k4])?;
        }
        if let Some(pv) = n.opt(7) {
            v4 = cx.b.add(Op::Concat { axis: 2 }, &[pv.id, v4])?;
        }
    }
    let hd = cx.b.shape(q4)[3].as_const().ok_or("the head size must be a constant")?;
    let scale = match n.float_opt("scale")? {
        Some(s) if s != 0.0 => s as f64,
        _ => 1.0 / (hd as f64).sqrt(),
    };
    let filter = n.float("mask_filter_value", -10000.0)? as f64;
    let mut mask = n.opt(5).map(|m| m.id);
    if let Some(kpm) = n.opt(4) {
        // key_padding_mask [b, t]: 1 keeps a key, 0 adds mask_filter_value.
        if cx.b.rank(kpm.id) != 2 {
            return Err("only a 2-D [batch, total] key_padding_mask is supported".into());
        }
        let zero = cx.b.scalar(cx.b.dtype(kpm.id), 0.0);
        let keep = cx.b.binary(Op::Ne {}, kpm.id, zero)?;
        let z = cx.b.scalar(dtype, 0.0);
        let f = cx.b.scalar(dtype, filter);
        let add = cx.b.add(Op::Where {}, &[keep, z, f])?;
        let add = cx.b.unsqueeze(add, vec![1, 2])?;
        mask = combine_masks(cx, mask, Some(add), dtype)?;
    }
    let core = Core {
        q: q4,
        k: k4,
        v: v4,
        mask,
        scale,
        causal: n.int("unidirectional", 0)? != 0,
        window: None,
        softcap: None,
    };
    let y = fused(cx, core)?;
    let y = merge_heads(cx, y)?;
    Ok(vec![Some(cx.same(q, y)), Some(cx.same(q, k4)), Some(cx.same(q, v4))])
}
