//! Scaled dot-product attention with an online softmax: one parallel
//! iteration per query row `(batch, head, i)`, one pass over the visible
//! keys keeping the running maximum `m`, the running sum `l` and the output
//! accumulator (vectors over the value dim). Keys go in chunks (see
//! `score_chunk`): a chunk's scores are computed in blocks of
//! `key_block` keys and kept in the row's own output until the row is
//! done; the chunk's maximum, its exponentials and their sum are vector
//! operations over keys, and the running state is rescaled once per chunk.
//! Sums accumulate in f32.
//!
//! Visibility follows the reference: query `i` sits at `pos = skv - sq + i`;
//! `causal` limits keys to `j <= pos`, a window `w` to `j > pos - w`, both
//! applied as loop bounds. A bool mask drops keys, a float mask is added to
//! the score; a score of -inf contributes nothing, and a row with no
//! contributing key is zero.

use super::sym::{self, add, as_const, max, min, mul, sub};
use super::{c, widen, LANES};
use crate::kir::{Access, Builder, CmpOp, Expr, LoopKind, RedOp, Scalar, Space, Var};

/// The static part of an attention kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnSpec {
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
    pub causal: bool,
    pub window: Option<i64>,
    pub softcap: Option<f32>,
    /// f32 lanes of the CPU kernel's vectors: 4 (Cranelift's 128 bits), or
    /// 8 for LLVM on AVX2, where the value accumulators of a 64-wide head
    /// then fit the 16 vector registers instead of spilling. GPU templates
    /// ignore it.
    pub lanes: u8,
}

/// A mask operand: its element type (bool keeps, f32 adds) and its axes,
/// right-aligned to `[batch, hq, sq, skv]`, each that size or the constant 1.
#[derive(Clone, Debug)]
pub struct AttnMask {
    pub elem: Scalar,
    pub dims: Vec<Expr>,
}

/// Declares `q, k, v[, mask], out` and builds the body; `batch`, `sq` and
/// `skv` are any `i64` expressions (usually scalar parameters of `b`).
/// `kv_stride` is the number of positions each `(batch, kv head)` block of
/// `k` and `v` holds: `skv` for tensors of their logical shape, more for a
/// KV cache kept in place with room to grow (only the first `skv` are read).
pub fn attention(
    b: &mut Builder,
    s: &AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    kv_stride: Expr,
    mask: Option<&AttnMask>,
) {
    let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
    let group = hq / hkv;
    let rows = mul(mul(batch.clone(), Expr::idx(hq)), sq.clone());
    let kv_rows = mul(mul(batch.clone(), Expr::idx(hkv)), kv_stride.clone());
    let q = b.input("q", mul(rows.clone(), Expr::idx(d)));
    let k = b.input("k", mul(kv_rows.clone(), Expr::idx(d)));
    let v = b.input("v", mul(kv_rows, Expr::idx(dv)));
    let mbuf = mask.map(|m| b.buffer("mask", m.elem, sym::product(&m.dims), Space::Global, Access::Read));
    let out = b.output("out", mul(rows.clone(), Expr::idx(dv)));
    // Mask strides along [batch, hq, sq, skv]; None where it broadcasts.
    let mstrides: Vec<Option<Expr>> =
        match mask {
            None => vec![None; 4],
            Some(m) => {
                let st = sym::strides(&m.dims);
                let skip = 4 - m.dims.len();
                (0..4)
                    .map(|a| {
                        if a < skip || as_const(&m.dims[a - skip]) == Some(1) {
                            None
                        } else {
                            Some(st[a - skip].clone())
                        }
                    })
                    .collect()
            }
        };
    b.for_("row", Expr::idx(0), rows, 1, LoopKind::Parallel, |b, row| {
        let i = b.let_("i", sym::rem(row.clone(), sq.clone()));
        let bh = b.let_("bh", sym::div(row.clone(), sq.clone()));
        let h = b.let_("h", sym::rem(Expr::Var(bh), Expr::idx(hq)));
        let bi = b.let_("bi", sym::div(Expr::Var(bh), Expr::idx(hq)));
        let kh = sym::div(Expr::Var(h), Expr::idx(group));
        let kvb = b.let_("kvb", mul(add(mul(Expr::Var(bi), Expr::idx(hkv)), kh), kv_stride.clone()));
        let qb = b.let_("qb", mul(row.clone(), Expr::idx(d)));
        let pos = b.let_("pos", add(sub(skv.clone(), sq.clone()), Expr::Var(i)));
        let mut hi = skv.clone();
        if s.causal {
            hi = min(hi, add(Expr::Var(pos), Expr::idx(1)));
        }
        let mut lo = Expr::i64(0);
        if let Some(w) = s.window {
            lo = max(lo, add(sub(Expr::Var(pos), Expr::i64(w)), Expr::idx(1)));
        }
        let moff = mbuf.map(|_| {
            let mut o = Expr::i64(0);
            for (a, idx) in [Expr::Var(bi), Expr::Var(h), Expr::Var(i)].into_iter().enumerate() {
                if let Some(st) = &mstrides[a] {
                    o = add(o, mul(idx, st.clone()));
                }
            }
            b.let_("moff", o)
        });
        let m = b.let_("m", Expr::f32(f32::NEG_INFINITY));
        let lsum = b.let_("l", Expr::f32(0.0));
        let lanes = if s.lanes.is_power_of_two() && s.lanes >= LANES { s.lanes } else { LANES };
        // The output accumulators: one set, or two (even and odd keys, so
        // that two chains of FMAs overlap their latencies) when a set is
        // at most 4 vectors and both fit the registers.
        let pieces = chunks(dv, lanes);
        let nsets = if pieces.len() <= 4 { 2 } else { 1 };
        let sets: Vec<Vec<(usize, u8, Var)>> =
            (0..nsets).map(|_| pieces.iter().map(|&(o, w)| (o, w, b.let_("o", c(0.0, w)))).collect()).collect();
        // The masked, scaled score of key `j` (-inf where it is dropped).
        let score_of = |b: &mut Builder, j: &Expr| -> Var {
            let kb = b.let_("kb", mul(add(Expr::Var(kvb), j.clone()), Expr::idx(d)));
            // q . k with two vector accumulators over the full-width
            // pieces of the static d; a narrower piece is reduced on its own.
            let parts = chunks(d, lanes);
            let nvec = parts.iter().filter(|p| p.1 == lanes).count();
            let vaccs: Vec<Var> = (0..nvec.min(2)).map(|_| b.let_("dv", c(0.0, lanes))).collect();
            let mut dot = Expr::f32(0.0);
            let mut vi = 0;
            for (o, w) in parts {
                let qa = Expr::load(q, add(Expr::Var(qb), Expr::idx(o)), w);
                let ka = Expr::load(k, add(Expr::Var(kb), Expr::idx(o)), w);
                if w == lanes && w > 1 {
                    let a = vaccs[vi % vaccs.len()];
                    b.assign(a, qa.fma(ka, Expr::Var(a)));
                    vi += 1;
                } else if w > 1 {
                    dot = (qa * ka).hreduce(RedOp::Add) + dot;
                } else {
                    dot = qa.fma(ka, dot);
                }
            }
            let vsum =
                vaccs.iter().skip(1).fold(vaccs.first().map(|a| Expr::Var(*a)), |s, a| s.map(|s| s + Expr::Var(*a)));
            let mut score = match vsum {
                Some(vs) => vs.hreduce(RedOp::Add) + dot,
                None => dot,
            };
            score = score * Expr::f32(s.scale);
            if let Some(cap) = s.softcap {
                score = Expr::f32(cap) * (score / Expr::f32(cap)).tanh();
            }
            let sc = b.let_("sc", score);
            if let (Some(mb), Some(mo), Some(me)) = (mbuf, moff, mask.map(|m| m.elem)) {
                let at = match &mstrides[3] {
                    Some(st) => add(Expr::Var(mo), mul(j.clone(), st.clone())),
                    None => Expr::Var(mo),
                };
                let mv = Expr::load(mb, at, 1);
                let masked = if me == Scalar::Bool {
                    Expr::select(mv, Expr::Var(sc), Expr::f32(f32::NEG_INFINITY))
                } else {
                    Expr::Var(sc) + mv
                };
                b.assign(sc, masked);
            }
            sc
        };
        // Adds key `j` with weight `p` (already relative to `m`).
        let accumulate = |b: &mut Builder, j: &Expr, p: Var, accs: &[(usize, u8, Var)]| {
            let vb = b.let_("vb", mul(add(Expr::Var(kvb), j.clone()), Expr::idx(dv)));
            for (o, w, a) in accs {
                let vv = Expr::load(v, add(Expr::Var(vb), Expr::idx(*o)), *w);
                b.assign(*a, widen(Expr::Var(p), *w).fma(vv, Expr::Var(*a)));
            }
        };
        // Keys go in chunks of `chunk`. A chunk's scores are computed
        // first, blocks of `key_block` at a time (independent dot products,
        // whose latencies overlap), and stored in the row's own output,
        // which nothing reads until the row's result is stored over it at
        // the end. Then the chunk's maximum, its exponentials and their sum
        // are taken with vectors over keys, and the running state is
        // rescaled once per chunk. Dropped keys score -inf, so `exp` makes
        // them 0; a chunk with no live key leaves the state as it is.
        let (vl, chunk) = score_chunk(dv, lanes);
        let key_block = key_block(lanes);
        let sb = b.let_("sb", mul(row.clone(), Expr::idx(dv)));
        let nkeys = b.let_("nkeys", max(sub(hi.clone(), lo.clone()), Expr::i64(0)));
        let nch = sym::ceil_div(Expr::Var(nkeys), chunk);
        b.for_("ch", Expr::idx(0), nch, 1, LoopKind::Serial, |b, ch| {
            let j0 = b.let_("j0", add(lo.clone(), mul(ch, Expr::idx(chunk))));
            let n = b.let_("n", min(Expr::idx(chunk), sub(hi.clone(), Expr::Var(j0))));
            let at = |t: Expr| add(Expr::Var(sb), t);
            let blocks = b.let_("nblk", sym::div(Expr::Var(n), Expr::idx(key_block)));
            b.for_("jb", Expr::idx(0), Expr::Var(blocks), 1, LoopKind::Serial, |b, jb| {
                let t0 = b.let_("t0", mul(jb, Expr::idx(key_block)));
                let ts: Vec<Expr> = (0..key_block).map(|t| add(Expr::Var(t0), Expr::idx(t))).collect();
                let scores: Vec<Var> = ts.iter().map(|t| score_of(b, &add(Expr::Var(j0), t.clone()))).collect();
                for (t, sc) in ts.into_iter().zip(scores) {
                    b.store(out, at(t), Expr::Var(sc));
                }
            });
            let tail = mul(Expr::Var(blocks), Expr::idx(key_block));
            b.for_("t", tail, Expr::Var(n), 1, LoopKind::Serial, |b, t| {
                let sc = score_of(b, &add(Expr::Var(j0), t.clone()));
                b.store(out, at(t), Expr::Var(sc));
            });
            // Whole vectors: the last one padded with dropped keys.
            let nv = b.let_("nv", sym::ceil_div(Expr::Var(n), vl as usize));
            b.for_("t", Expr::Var(n), mul(Expr::Var(nv), Expr::idx(vl as usize)), 1, LoopKind::Serial, |b, t| {
                b.store(out, at(t), Expr::f32(f32::NEG_INFINITY));
            });
            let vmax = b.let_("vmax", c(f32::NEG_INFINITY, vl));
            b.for_("v", Expr::idx(0), Expr::Var(nv), 1, LoopKind::Serial, |b, vi| {
                let sv = Expr::load(out, at(mul(vi, Expr::idx(vl as usize))), vl);
                b.assign(vmax, Expr::Var(vmax).max(sv));
            });
            let top = if vl > 1 { Expr::Var(vmax).hreduce(RedOp::Max) } else { Expr::Var(vmax) };
            let mn = b.let_("mn", Expr::Var(m).max(top));
            b.if_(
                Expr::Var(mn).cmp(CmpOp::Gt, Expr::f32(f32::NEG_INFINITY)),
                |b| {
                    let corr = b.let_("corr", (Expr::Var(m) - Expr::Var(mn)).exp());
                    b.assign(lsum, Expr::Var(lsum) * Expr::Var(corr));
                    for (_, w, a) in sets.iter().flatten() {
                        b.assign(*a, Expr::Var(*a) * widen(Expr::Var(corr), *w));
                    }
                    b.assign(m, Expr::Var(mn));
                    let vsum = b.let_("vsum", c(0.0, vl));
                    b.for_("v", Expr::idx(0), Expr::Var(nv), 1, LoopKind::Serial, |b, vi| {
                        let o = b.let_("o", at(mul(vi, Expr::idx(vl as usize))));
                        let p = b.let_("p", (Expr::load(out, Expr::Var(o), vl) - widen(Expr::Var(m), vl)).exp());
                        b.store(out, Expr::Var(o), Expr::Var(p));
                        b.assign(vsum, Expr::Var(vsum) + Expr::Var(p));
                    });
                    let total = if vl > 1 { Expr::Var(vsum).hreduce(RedOp::Add) } else { Expr::Var(vsum) };
                    b.assign(lsum, Expr::Var(lsum) + total);
                    // Key `t` goes to set `t % nsets`: whole rounds, then the rest.
                    let rounds = b.let_("nr", sym::div(Expr::Var(n), Expr::idx(nsets)));
                    b.for_("r", Expr::idx(0), Expr::Var(rounds), 1, LoopKind::Serial, |b, r| {
                        for (i, set) in sets.iter().enumerate() {
                            let t = b.let_("t", add(mul(r.clone(), Expr::idx(nsets)), Expr::idx(i)));
                            let p = b.let_("p", Expr::load(out, at(Expr::Var(t)), 1));
                            accumulate(b, &add(Expr::Var(j0), Expr::Var(t)), p, set);
                        }
                    });
                    let done = mul(Expr::Var(rounds), Expr::idx(nsets));
                    b.for_("t", done, Expr::Var(n), 1, LoopKind::Serial, |b, t| {
                        let p = b.let_("p", Expr::load(out, at(t.clone()), 1));
                        accumulate(b, &add(Expr::Var(j0), t), p, &sets[0]);
                    });
                },
                |_| {},
            );
        });
        let pos_l = Expr::Var(lsum).cmp(CmpOp::Gt, Expr::f32(0.0));
        let inv = b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(lsum), Expr::f32(0.0)));
        for (i, (o, w, a)) in sets[0].iter().enumerate() {
            let sum = sets[1..].iter().fold(Expr::Var(*a), |s, set| s + Expr::Var(set[i].2));
            b.store(out, add(Expr::Var(sb), Expr::idx(*o)), sum * widen(Expr::Var(inv), *w));
        }
    });
}

/// Keys scored together per step of the CPU kernel's main loop.
const KEY_BLOCK: usize = 4;

/// The vector width of a chunk's maximum and exponentials, and the keys
/// per chunk: the widest of `lanes`, [`LANES`] and 1 that fits the value
/// dim `dv`, and the most whole vectors of it that fit `dv` (each row's
/// output, `dv` wide, holds one chunk's scores).
fn score_chunk(dv: usize, lanes: u8) -> (u8, usize) {
    let vl = [lanes, LANES, 1].into_iter().find(|&w| w as usize <= dv).unwrap_or(1);
    (vl, dv / vl as usize * vl as usize)
}

/// Keys per block for vectors of `lanes`: twice [`KEY_BLOCK`] with 16-lane
/// vectors (AVX-512's 32 registers hold the extra scores; on a Zen 5 the
/// decode attention of smollm2-135m took about 5% less time, its prefill
/// attention more), [`KEY_BLOCK`] otherwise (Cranelift's 16 XMM registers
/// and AVX2's 16 YMM ones).
fn key_block(lanes: u8) -> usize {
    if lanes >= 16 {
        2 * KEY_BLOCK
    } else {
        KEY_BLOCK
    }
}

/// `0..n` as (offset, width) pieces: vectors of `lanes`, then one of
/// [`LANES`] when `lanes` is wider and it fits, then scalars.
fn chunks(n: usize, lanes: u8) -> Vec<(usize, u8)> {
    let l = lanes as usize;
    let mut v: Vec<(usize, u8)> = (0..n / l).map(|i| (i * l, lanes)).collect();
    let mut at = n / l * l;
    if lanes > LANES && n - at >= LANES as usize {
        v.push((at, LANES));
        at += LANES as usize;
    }
    v.extend((at..n).map(|o| (o, 1)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::testing::*;
    use smelt_ir::Op;

    /// Rows over many chunks of keys (the last partial), at every vector
    /// width, head dims that are whole vectors and ones that are not,
    /// against the reference interpreter; the KIR interpreter runs the
    /// kernel on 1 and 3 threads.
    #[test]
    fn chunked_rows_match_the_reference() {
        let (hq, hkv, sq, skv) = (6, 2, 3, 150);
        for (d, causal, window, softcap) in
            [(64, true, None, None), (24, false, Some(70), Some(20.0)), (10, true, None, None)]
        {
            for lanes in [4, 8, 16] {
                let scale = 1.0 / (d as f32).sqrt();
                let spec = AttnSpec { hq, hkv, d, dv: d, scale, causal, window, softcap, lanes };
                let mut b = Builder::new("attention");
                let n = |x: usize| Expr::idx(x);
                attention(&mut b, &spec, n(1), n(sq), n(skv), n(skv), None);
                let k = b.finish().unwrap();
                let q: Vec<f32> = rand(hq * sq * d, 3).into_iter().map(|x| x * 2.0).collect();
                let kk: Vec<f32> = rand(hkv * skv * d, 4).into_iter().map(|x| x * 2.0).collect();
                let v = rand(hkv * skv * d, 5);
                let op = Op::Attention { scale: scale as f64, causal, window, softcap: softcap.map(|c| c as f64) };
                let want = reference(
                    &op,
                    &[(&q, vec![1, hq, sq, d]), (&kk, vec![1, hkv, skv, d]), (&v, vec![1, hkv, skv, d])],
                );
                for threads in [1, 3] {
                    let got = run_kir(&k, &[&q, &kk, &v], threads);
                    assert_close(&format!("d {d}, lanes {lanes}, {threads} threads"), &got, &want, 1e-4, 1e-5);
                }
            }
        }
    }
}
