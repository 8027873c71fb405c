//! Scaled dot-product attention on a GPU with the semantics of the CPU
//! `templates::attention` (same buffers, visibility, masks, softcap; a row
//! with no visible key is zero), for prefill and decode alike.
//!
//! One block of `nt` threads per query row `(batch, head, i)`; the visible
//! keys `lo..hi` are taken in tiles of `nt`, one key per thread:
//! 1. thread `t` scores key `lo + tile * nt + t` (`q · k` with q staged in
//!    shared memory, scale, softcap, mask; `-inf` when not visible or
//!    masked) into shared `s[t]`; barrier;
//! 2. every thread scans `s` for the tile maximum (the same value in every
//!    thread), updates the running maximum `m`, and writes its key's weight
//!    `p[t] = exp(s[t] - m)` to shared memory; barrier;
//! 3. every thread rescales its output accumulators by `exp(m_old - m)` and
//!    adds `p[t] * v[key t]` over the tile for the value features it owns
//!    (`tid, tid + nt, ...`), summing the weights into the running sum `l`
//!    on the way (in one order, so every thread's `l` is the same).
//!
//! So a decode step (one query, a long cache) spreads its keys over the
//! block's threads, and value reads are coalesced across threads. Thread
//! `t`'s key row is read whole by that thread (not coalesced; it stays in
//! the cache for the `d` loads). Each block reads its own kv head; query
//! heads sharing one (GQA) read it again, from L2.
//!
//! Sums accumulate in f32 in another order than the CPU kernel (and the
//! running maximum moves per tile rather than per key), so results differ
//! from it by rounding only.

use crate::kir::{Access, Builder, CmpOp, Expr, LoopKind, Scalar, Space, Special, Var};
use crate::templates::attention::{AttnMask, AttnSpec};
use crate::templates::sym::{self, add, as_const, max, min, mul, sub};

/// Threads per block (and keys per tile) by default: enough for a 128-wide
/// value row with one feature per thread.
pub const THREADS: u32 = 128;

/// Declares `q, k, v[, mask], out` (as `templates::attention::attention`)
/// and builds the kernel with `nt` threads per block; `batch`, `sq` and `skv`
/// are `i64` expressions over constants and scalar parameters.
pub fn attention(b: &mut Builder, s: &AttnSpec, batch: Expr, sq: Expr, skv: Expr, mask: Option<&AttnMask>, nt: u32) {
    let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
    let ntu = nt as usize;
    let group = hq / hkv;
    let rows = mul(mul(batch.clone(), Expr::idx(hq)), sq.clone());
    let kv_rows = mul(mul(batch, Expr::idx(hkv)), skv.clone());
    let q = b.input("q", mul(rows.clone(), Expr::idx(d)));
    let k = b.input("k", mul(kv_rows.clone(), Expr::idx(d)));
    let v = b.input("v", mul(kv_rows, Expr::idx(dv)));
    let mbuf = mask.map(|m| b.buffer("mask", m.elem, sym::product(&m.dims), Space::Global, Access::Read));
    let out = b.output("out", mul(rows.clone(), Expr::idx(dv)));
    let sh_q = b.buffer("q_row", Scalar::F32, d, Space::Shared, Access::Write);
    let sh_s = b.buffer("scores", Scalar::F32, ntu, Space::Shared, Access::Write);
    let sh_p = b.buffer("weights", Scalar::F32, ntu, Space::Shared, Access::Write);
    b.gpu_launch([nt, 1, 1], [rows, Expr::i64(1), Expr::i64(1)]);
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

    let tid = b.let_("tid", Expr::Special(Special::ThreadIdx(0)));
    let row = b.let_("row", Expr::Special(Special::BlockIdx(0)));
    let i = b.let_("i", sym::rem(Expr::Var(row), sq.clone()));
    let bh = b.let_("bh", sym::div(Expr::Var(row), sq.clone()));
    let h = b.let_("h", sym::rem(Expr::Var(bh), Expr::idx(hq)));
    let bi = b.let_("bi", sym::div(Expr::Var(bh), Expr::idx(hq)));
    let kh = sym::div(Expr::Var(h), Expr::idx(group));
    let kvb = b.let_("kvb", mul(add(mul(Expr::Var(bi), Expr::idx(hkv)), kh), skv.clone()));
    let pos = b.let_("pos", add(sub(skv.clone(), sq), Expr::Var(i)));
    let mut hi = skv;
    if s.causal {
        hi = min(hi, add(Expr::Var(pos), Expr::idx(1)));
    }
    let hi = b.let_("hi", hi);
    let mut lo = Expr::i64(0);
    if let Some(w) = s.window {
        lo = max(lo, add(sub(Expr::Var(pos), Expr::i64(w)), Expr::idx(1)));
    }
    let lo = b.let_("lo", lo);
    let moff = mbuf.map(|_| {
        let mut o = Expr::i64(0);
        for (a, idx) in [Expr::Var(bi), Expr::Var(h), Expr::Var(i)].into_iter().enumerate() {
            if let Some(st) = &mstrides[a] {
                o = add(o, mul(idx, st.clone()));
            }
        }
        b.let_("moff", o)
    });

    // The query row, staged in shared memory for every thread's dot product.
    let qb = b.let_("qb", mul(Expr::Var(row), Expr::idx(d)));
    b.for_("c", Expr::Var(tid), Expr::idx(d), nt as i64, LoopKind::Serial, |b, c| {
        b.store(sh_q, c.clone(), Expr::load(q, add(Expr::Var(qb), c), 1))
    });
    b.barrier();

    let neg_inf = || Expr::f32(f32::NEG_INFINITY);
    let m = b.let_("m", neg_inf());
    let l = b.let_("l", Expr::f32(0.0));
    // Output features tid + c * nt, c in 0..oc.
    let oc = dv.div_ceil(ntu);
    let accs: Vec<Var> = (0..oc).map(|_| b.let_("acc", Expr::f32(0.0))).collect();
    let visible = b.let_("n", max(sub(Expr::Var(hi), Expr::Var(lo)), Expr::i64(0)));
    let tiles = sym::ceil_div(Expr::Var(visible), ntu);
    b.for_("tile", Expr::i64(0), tiles, 1, LoopKind::Serial, |b, tile| {
        let j0 = b.let_("j0", add(Expr::Var(lo), mul(tile, Expr::idx(ntu))));
        let j = b.let_("j", add(Expr::Var(j0), Expr::Var(tid)));
        let sc = b.let_("s", neg_inf());
        b.if_(
            Expr::Var(j).lt(Expr::Var(hi)),
            |b| {
                let kb = b.let_("kb", mul(add(Expr::Var(kvb), Expr::Var(j)), Expr::idx(d)));
                let dot = b.let_("dot", Expr::f32(0.0));
                b.for_("c", Expr::i64(0), Expr::idx(d), 1, LoopKind::Serial, |b, c| {
                    let qc = Expr::load(sh_q, c.clone(), 1);
                    b.assign(dot, qc.fma(Expr::load(k, add(Expr::Var(kb), c), 1), Expr::Var(dot)));
                });
                let mut score = Expr::Var(dot) * Expr::f32(s.scale);
                if let Some(cap) = s.softcap {
                    score = Expr::f32(cap) * (score / Expr::f32(cap)).tanh();
                }
                b.assign(sc, score);
                if let (Some(mb), Some(mo), Some(me)) = (mbuf, moff, mask.map(|m| m.elem)) {
                    let at = match &mstrides[3] {
                        Some(st) => add(Expr::Var(mo), mul(Expr::Var(j), st.clone())),
                        None => Expr::Var(mo),
                    };
                    let mv = Expr::load(mb, at, 1);
                    let masked = if me == Scalar::Bool {
                        Expr::select(mv, Expr::Var(sc), neg_inf())
                    } else {
                        Expr::Var(sc) + mv
                    };
                    b.assign(sc, masked);
                }
                // A score that is not above -inf (masked, or NaN) drops the key.
                let live = Expr::Var(sc).cmp(CmpOp::Gt, neg_inf());
                b.assign(sc, Expr::select(live, Expr::Var(sc), neg_inf()));
            },
            |_| {},
        );
        b.store(sh_s, Expr::Var(tid), Expr::Var(sc));
        b.barrier();

        let tmax = b.let_("tmax", neg_inf());
        b.for_("t", Expr::i64(0), Expr::idx(ntu), 1, LoopKind::Serial, |b, t| {
            b.assign(tmax, Expr::Var(tmax).max(Expr::load(sh_s, t, 1)));
        });
        let m_new = b.let_("m_new", Expr::Var(m).max(Expr::Var(tmax)));
        let live = Expr::Var(sc).cmp(CmpOp::Gt, neg_inf());
        let p = Expr::select(live, (Expr::Var(sc) - Expr::Var(m_new)).exp(), Expr::f32(0.0));
        b.store(sh_p, Expr::Var(tid), p);
        // Before any key, m is -inf and l and the accumulators are 0.
        let had = Expr::Var(m).cmp(CmpOp::Gt, neg_inf());
        let corr = b.let_("corr", Expr::select(had, (Expr::Var(m) - Expr::Var(m_new)).exp(), Expr::f32(0.0)));
        b.assign(m, Expr::Var(m_new));
        b.barrier();

        for a in &accs {
            b.assign(*a, Expr::Var(*a) * Expr::Var(corr));
        }
        let tsum = b.let_("tsum", Expr::f32(0.0));
        let cnt = min(Expr::idx(ntu), sub(Expr::Var(hi), Expr::Var(j0)));
        b.for_("t", Expr::i64(0), cnt, 1, LoopKind::Serial, |b, t| {
            let pt = b.let_("pt", Expr::load(sh_p, t.clone(), 1));
            b.assign(tsum, Expr::Var(tsum) + Expr::Var(pt));
            let vb = b.let_("vb", mul(add(add(Expr::Var(kvb), Expr::Var(j0)), t), Expr::idx(dv)));
            for (c, a) in accs.iter().enumerate() {
                let o = add(Expr::Var(tid), Expr::idx(c * ntu));
                let fma = |b: &mut Builder| {
                    let vv = Expr::load(v, add(Expr::Var(vb), o.clone()), 1);
                    b.assign(*a, Expr::Var(pt).fma(vv, Expr::Var(*a)));
                };
                if (c + 1) * ntu <= dv {
                    fma(b);
                } else {
                    b.if_(o.clone().lt(Expr::idx(dv)), fma, |_| {});
                }
            }
        });
        b.assign(l, Expr::Var(l) * Expr::Var(corr) + Expr::Var(tsum));
    });

    let pos_l = Expr::Var(l).cmp(CmpOp::Gt, Expr::f32(0.0));
    let inv = b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(l), Expr::f32(0.0)));
    let ob = b.let_("ob", mul(Expr::Var(row), Expr::idx(dv)));
    for (c, a) in accs.iter().enumerate() {
        let o = add(Expr::Var(tid), Expr::idx(c * ntu));
        let store = |b: &mut Builder| b.store(out, add(Expr::Var(ob), o.clone()), Expr::Var(*a) * Expr::Var(inv));
        if (c + 1) * ntu <= dv {
            store(b);
        } else {
            b.if_(o.clone().lt(Expr::idx(dv)), store, |_| {});
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kir::interp::BufData;
    use crate::templates::gpu::testing::*;
    use smelt_ir::{DType, Op};

    struct Case {
        hq: usize,
        hkv: usize,
        d: usize,
        batch: i64,
        sq: i64,
        past: i64,
        causal: bool,
        window: Option<i64>,
        softcap: Option<f64>,
        /// The mask's dtype and dims (`b`, `s`, `t` for batch, queries, keys).
        mask: Option<(DType, &'static str)>,
        nt: u32,
    }

    /// Runs the GPU kernel (all sizes constant, `nt` threads) and the CPU
    /// kernel `select` picks, on the same operands; tolerance
    /// 1e-5 * (1 + |want|).
    fn check(c: &Case, kill_mask: bool) {
        let op =
            Op::Attention { scale: 1.0 / (c.d as f64).sqrt(), causal: c.causal, window: c.window, softcap: c.softcap };
        let mut types = vec![
            f(&format!("b, {}, s, {}", c.hq, c.d)),
            f(&format!("b, {}, t, {}", c.hkv, c.d)),
            f(&format!("b, {}, t, {}", c.hkv, c.d)),
        ];
        if let Some((dt, dims)) = c.mask {
            types.push(ty(dt, dims));
        }
        let (cpu, _) = cpu_instance(&op, &types);
        let syms = [("b", c.batch), ("s", c.sq), ("t", c.past + c.sq)];
        let sc = scalars(&cpu, &syms);
        let mut bufs = buffers(&cpu.kernel, &sc, c.d as u64 + c.past as u64);
        if kill_mask {
            if let BufData::Bool(m) = &mut bufs[3] {
                m.iter_mut().for_each(|x| *x = false);
            }
        }
        if let (Some((DType::F32, _)), BufData::F32(m)) = (c.mask, &mut bufs[3]) {
            m.iter_mut().for_each(|x| *x = if *x < -1.0 { f32::NEG_INFINITY } else { *x * 0.25 });
        }
        let want = run_cpu(&cpu.kernel, &bufs, &sc, 2);

        let spec = AttnSpec {
            hq: c.hq,
            hkv: c.hkv,
            d: c.d,
            dv: c.d,
            scale: (1.0 / (c.d as f64).sqrt()) as f32,
            causal: c.causal,
            window: c.window,
            softcap: c.softcap.map(|x| x as f32),
        };
        let env: std::collections::BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mask = c.mask.map(|(dt, dims)| AttnMask {
            elem: crate::select::elem_of(dt),
            dims: f(dims).shape.iter().map(|d| Expr::i64(d.eval_map(&env).unwrap())).collect(),
        });
        let mut g = Builder::new("attention");
        let (bt, sq, skv) = (Expr::i64(c.batch), Expr::i64(c.sq), Expr::i64(c.past + c.sq));
        attention(&mut g, &spec, bt, sq, skv, mask.as_ref(), c.nt);
        let g = g.finish().unwrap();
        let got = run_gpu(&g, &bufs, &[]);
        let what = format!(
            "attention h{}x{} d{} b{} s{} past{} causal={} window={:?} cap={:?} mask={:?} nt={}",
            c.hq, c.hkv, c.d, c.batch, c.sq, c.past, c.causal, c.window, c.softcap, c.mask, c.nt
        );
        assert_close(&what, &got, &want, 1e-5);
    }

    const BASE: Case = Case {
        hq: 4,
        hkv: 2,
        d: 24,
        batch: 1,
        sq: 1,
        past: 9,
        causal: true,
        window: None,
        softcap: None,
        mask: None,
        nt: 8,
    };

    #[test]
    fn gpu_attention_decode() {
        check(&BASE, false);
        // A long cache over several tiles, one kv head for two query heads.
        check(&Case { hq: 2, hkv: 1, d: 32, past: 39, nt: 16, ..BASE }, false);
        check(&Case { hq: 2, hkv: 1, d: 32, past: 39, nt: 16, window: Some(16), ..BASE }, false);
        // Empty cache.
        check(&Case { past: 0, ..BASE }, false);
    }

    #[test]
    fn gpu_attention_prefill() {
        // GQA of 3, value dim over three features per thread.
        check(&Case { hq: 3, hkv: 1, d: 40, sq: 7, past: 0, nt: 16, ..BASE }, false);
        // Past and a sliding window.
        check(&Case { hq: 2, hkv: 2, d: 48, sq: 5, past: 9, window: Some(4), nt: 32, ..BASE }, false);
        // Not causal, head dim 80.
        check(&Case { hq: 2, hkv: 1, d: 80, sq: 3, past: 2, causal: false, nt: 32, ..BASE }, false);
    }

    #[test]
    fn gpu_attention_masks_and_softcap() {
        let bool_mask =
            Case { hq: 6, hkv: 2, sq: 3, past: 2, causal: false, mask: Some((DType::Bool, "1, 1, s, t")), ..BASE };
        check(&bool_mask, false);
        // Every key masked: rows of zeros.
        check(&bool_mask, true);
        let add_mask = Case {
            hq: 2,
            hkv: 1,
            d: 8,
            batch: 2,
            sq: 4,
            past: 3,
            softcap: Some(5.0),
            mask: Some((DType::F32, "b, 1, s, t")),
            nt: 4,
            ..BASE
        };
        check(&add_mask, false);
        check(&Case { mask: Some((DType::F32, "b, 2, s, t")), window: Some(3), ..add_mask }, false);
    }
}
