//! Scaled dot-product attention on a GPU with the semantics of the CPU
//! `templates::attention` (same buffers, visibility, masks, softcap; a row
//! with no visible key is zero). Three ways, chosen per node by
//! `select::select_gpu`:
//!
//! **Rows** ([`attention`], used alone when the split path is off): one
//! block of `nt` threads per query row `(batch, head, i)`; the visible keys
//! `lo..hi` are taken in tiles of `nt`, one key per thread:
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
//! **Flash** ([`flash`], and the prefill branch of [`combine`]): a block
//! per `(batch, head, tile of Bq queries)` ([`FlashParams`]; grid `(batch *
//! hq, ceil(sq / Bq))`, the last query tiles first since they see the most
//! keys). The block stages its query rows in shared memory once, then walks
//! only the keys some of its rows see (from the first query's lowest
//! visible key to the last one's highest: key tiles wholly past the causal
//! limit or before the window are never visited) in tiles of `Bk`. Threads
//! form a grid of `threads / row_threads` rows by `row_threads` (adjacent
//! lanes of a warp); a thread owns rows `trow + a * (threads / row_threads)`
//! and keys `tcol + c * row_threads` of each tile. Per tile:
//! 1. the key tile is staged in shared memory (zero past the block's keys;
//!    rows padded by a vector against bank conflicts); barrier;
//! 2. each thread scores its rows against its keys from shared memory
//!    (scale, softcap, mask; `-inf` when not visible), takes each row's tile
//!    maximum across the row's threads by butterfly shuffles (every lane
//!    gets the same value), moves the running maximum, and writes its
//!    weights `exp(s - m)` to shared memory, adding them to its share of
//!    the row sum `l`; barrier;
//! 3. the value tile replaces the key tile; barrier;
//! 4. each thread rescales its accumulators (its rows by the value vectors
//!    `tcol, tcol + row_threads, ...`) and adds every key's weight times
//!    value; barrier (before the next key tile overwrites the values).
//!
//! At the end the row sums' shares are added by shuffles and the rows are
//! normalised (zero when no key was seen). Query heads sharing a kv head
//! (GQA) read it in their own blocks (from L2), and the KV layout is the
//! dense `[batch, hkv, skv, d]` the other kernels read.
//!
//! **Split keys** ("flash-decoding", for up to [`SplitParams::max_queries`]
//! queries): two launches per node.
//! - [`split_partials`]: a block per `(split, batch, kv head, query)`, for
//!   all `g = hq / hkv` query heads of the kv head's group at once, so K and
//!   V are read once per group. The query's visible keys `lo..hi` are cut
//!   into `splits` equal ranges (some empty when there are fewer keys than
//!   splits, or with a window); a block runs the online softmax above over
//!   its range in tiles of `nt` keys, with these layouts: scores by one key
//!   per thread, the key row read with vector loads and dotted with the `g`
//!   staged query rows (one K read serves every head); weights times values
//!   by groups of threads, each group a key at a time, each thread a vector
//!   of value features (coalesced V rows), the groups' sums added through
//!   shared memory at the end. It writes each head's partial result
//!   unnormalised, `(m, l, acc[dv])` with `acc = Σ exp(s - m) v`, to a
//!   scratch buffer ([`SplitParams::scratch_len`]); an empty range writes
//!   `(-inf, 0, 0)`.
//! - [`combine`]: on the flash grid, groups of threads take the block's
//!   query rows, rescale each row's partials to their common maximum and
//!   write `Σ acc_s e^(m_s - M) / Σ l_s e^(m_s - M)` (zero when no split saw
//!   a key). With more queries than `max_queries` the split kernel's blocks
//!   return at once and this kernel runs flash attention instead, so one
//!   plan serves decode and prefill.
//!
//! The split grid is constant in the keys (`splits * batch * hkv *
//! max_queries` blocks, those past the query count returning at once), so
//! the scratch buffer is `batch * hq * max_queries * splits * (dv + 2)`
//! floats whatever the cache length. Vector accesses are at multiples of
//! their width (the split, combine and flash kernels promise aligned
//! vectors; the operands must then be 16-byte aligned, which buffers of
//! their own are).
//!
//! Sums accumulate in f32 in another order than the CPU kernel (and the
//! running maximum moves per tile rather than per key), so results differ
//! from it by rounding only.

use super::vec_width;
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, LoopKind, RedOp, Scalar, ShuffleKind, Space, Special, Ty, Var};
use crate::templates::attention::{AttnMask, AttnSpec};
use crate::templates::sym::{self, add, as_const, ceil_div, div, max, min, mul, rem, sub};

/// Threads per block (and keys per tile) by default: enough for a 128-wide
/// value row with one feature per thread.
pub const THREADS: u32 = 128;

/// The global operands `q, k, v[, mask]` and the mask's strides along
/// `[batch, hq, sq, skv]` (`None` where it broadcasts).
struct Operands {
    q: BufId,
    k: BufId,
    v: BufId,
    mask: Option<(BufId, Scalar)>,
    mstrides: Vec<Option<Expr>>,
}

fn declare(b: &mut Builder, s: &AttnSpec, batch: &Expr, sq: &Expr, skv: &Expr, mask: Option<&AttnMask>) -> Operands {
    let rows = mul(mul(batch.clone(), Expr::idx(s.hq)), sq.clone());
    let kv_rows = mul(mul(batch.clone(), Expr::idx(s.hkv)), skv.clone());
    let q = b.input("q", mul(rows, Expr::idx(s.d)));
    let k = b.input("k", mul(kv_rows.clone(), Expr::idx(s.d)));
    let v = b.input("v", mul(kv_rows, Expr::idx(s.dv)));
    let mbuf = mask.map(|m| (b.buffer("mask", m.elem, sym::product(&m.dims), Space::Global, Access::Read), m.elem));
    let mstrides =
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
    Operands { q, k, v, mask: mbuf, mstrides }
}

impl Operands {
    /// The mask's element offset of `(bi, h, i, j = 0)`, when there is a mask.
    fn mask_row(&self, b: &mut Builder, bi: Expr, h: Expr, i: Expr) -> Option<Var> {
        self.mask.map(|_| {
            let mut o = Expr::i64(0);
            for (a, idx) in [bi, h, i].into_iter().enumerate() {
                if let Some(st) = &self.mstrides[a] {
                    o = add(o, mul(idx, st.clone()));
                }
            }
            b.let_("moff", o)
        })
    }

    /// Turns the raw dot product in `sc` into the score of key `j` for the
    /// row whose mask offset is `moff`: scale, softcap, mask; a score that
    /// is not above -inf (masked, or NaN) becomes -inf, dropping the key.
    fn finish_score(&self, b: &mut Builder, s: &AttnSpec, sc: Var, moff: Option<Expr>, j: Expr) {
        let mut score = Expr::Var(sc) * Expr::f32(s.scale);
        if let Some(cap) = s.softcap {
            score = Expr::f32(cap) * (score / Expr::f32(cap)).tanh();
        }
        b.assign(sc, score);
        if let (Some((mb, me)), Some(mo)) = (self.mask, moff) {
            let at = match &self.mstrides[3] {
                Some(st) => add(mo, mul(j, st.clone())),
                None => mo,
            };
            let mv = Expr::load(mb, at, 1);
            let masked =
                if me == Scalar::Bool { Expr::select(mv, Expr::Var(sc), neg_inf()) } else { Expr::Var(sc) + mv };
            b.assign(sc, masked);
        }
        let live = Expr::Var(sc).cmp(CmpOp::Gt, neg_inf());
        b.assign(sc, Expr::select(live, Expr::Var(sc), neg_inf()));
    }
}

/// `a / d` and `a % d` for `0 <= a < 2^31` and `0 < d < 2^31`: by a
/// constant folded or left to LLVM, by a run-time value in 32 bits (a
/// 64-bit division is a subroutine with a stack frame on NVIDIA GPUs, a
/// 32-bit one is inline).
fn div_rem(b: &mut Builder, a: Expr, d: Expr) -> (Var, Var) {
    if as_const(&d).is_some() {
        return (b.let_("q", div(a.clone(), d.clone())), b.let_("r", rem(a, d)));
    }
    let a32 = b.let_("a32", a.cast(Scalar::I32));
    let d32 = b.let_("d32", d.cast(Scalar::I32));
    let q = b.let_("q", (Expr::Var(a32) / Expr::Var(d32)).cast(Scalar::I64));
    let r = b.let_("r", (Expr::Var(a32) % Expr::Var(d32)).cast(Scalar::I64));
    (q, r)
}

fn neg_inf() -> Expr {
    Expr::f32(f32::NEG_INFINITY)
}

/// `lo` and `hi`, the visible keys `lo..hi` of query `i` of `sq` over `skv`
/// keys (query `i` sits at `skv - sq + i`).
fn visible(b: &mut Builder, s: &AttnSpec, sq: &Expr, skv: &Expr, i: Expr) -> (Var, Var) {
    let pos = b.let_("pos", add(sub(skv.clone(), sq.clone()), i));
    let mut hi = skv.clone();
    if s.causal {
        hi = min(hi, add(Expr::Var(pos), Expr::idx(1)));
    }
    let hi = b.let_("hi", hi);
    let mut lo = Expr::i64(0);
    if let Some(w) = s.window {
        lo = max(lo, add(sub(Expr::Var(pos), Expr::i64(w)), Expr::idx(1)));
    }
    let lo = b.let_("lo", lo);
    (lo, hi)
}

/// Declares `q, k, v[, mask], out` (as `templates::attention::attention`)
/// and builds the row kernel with `nt` threads per block; `batch`, `sq` and
/// `skv` are `i64` expressions over constants and scalar parameters.
pub fn attention(b: &mut Builder, s: &AttnSpec, batch: Expr, sq: Expr, skv: Expr, mask: Option<&AttnMask>, nt: u32) {
    let o = declare(b, s, &batch, &sq, &skv, mask);
    let rows = mul(mul(batch, Expr::idx(s.hq)), sq.clone());
    let out = b.output("out", mul(rows.clone(), Expr::idx(s.dv)));
    b.gpu_launch([nt, 1, 1], [rows, Expr::i64(1), Expr::i64(1)]);
    rows_body(b, s, &o, out, &sq, &skv, nt);
}

/// The row algorithm (see the module docs) for the row `blockIdx.x`.
fn rows_body(b: &mut Builder, s: &AttnSpec, o: &Operands, out: BufId, sq: &Expr, skv: &Expr, nt: u32) {
    let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
    let ntu = nt as usize;
    let group = hq / hkv;
    let sh_q = b.buffer("q_row", Scalar::F32, d, Space::Shared, Access::Write);
    let sh_s = b.buffer("scores", Scalar::F32, ntu, Space::Shared, Access::Write);
    let sh_p = b.buffer("weights", Scalar::F32, ntu, Space::Shared, Access::Write);

    let tid = b.let_("tid", Expr::Special(Special::ThreadIdx(0)));
    let row = b.let_("row", Expr::Special(Special::BlockIdx(0)));
    let (bh, i) = div_rem(b, Expr::Var(row), sq.clone());
    let h = b.let_("h", sym::rem(Expr::Var(bh), Expr::idx(hq)));
    let bi = b.let_("bi", sym::div(Expr::Var(bh), Expr::idx(hq)));
    let kh = sym::div(Expr::Var(h), Expr::idx(group));
    let kvb = b.let_("kvb", mul(add(mul(Expr::Var(bi), Expr::idx(hkv)), kh), skv.clone()));
    let (lo, hi) = visible(b, s, sq, skv, Expr::Var(i));
    let moff = o.mask_row(b, Expr::Var(bi), Expr::Var(h), Expr::Var(i));

    // The query row, staged in shared memory for every thread's dot product.
    let qb = b.let_("qb", mul(Expr::Var(row), Expr::idx(d)));
    b.for_("c", Expr::Var(tid), Expr::idx(d), nt as i64, LoopKind::Serial, |b, c| {
        b.store(sh_q, c.clone(), Expr::load(o.q, add(Expr::Var(qb), c), 1))
    });
    b.barrier();

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
                b.assign(sc, Expr::f32(0.0));
                b.for_("c", Expr::i64(0), Expr::idx(d), 1, LoopKind::Serial, |b, c| {
                    let qc = Expr::load(sh_q, c.clone(), 1);
                    b.assign(sc, qc.fma(Expr::load(o.k, add(Expr::Var(kb), c), 1), Expr::Var(sc)));
                });
                o.finish_score(b, s, sc, moff.map(Expr::Var), Expr::Var(j));
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
                let of = add(Expr::Var(tid), Expr::idx(c * ntu));
                let fma = |b: &mut Builder| {
                    let vv = Expr::load(o.v, add(Expr::Var(vb), of.clone()), 1);
                    b.assign(*a, Expr::Var(pt).fma(vv, Expr::Var(*a)));
                };
                if (c + 1) * ntu <= dv {
                    fma(b);
                } else {
                    b.if_(of.clone().lt(Expr::idx(dv)), fma, |_| {});
                }
            }
        });
        b.assign(l, Expr::Var(l) * Expr::Var(corr) + Expr::Var(tsum));
    });

    let pos_l = Expr::Var(l).cmp(CmpOp::Gt, Expr::f32(0.0));
    let inv = b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(l), Expr::f32(0.0)));
    let ob = b.let_("ob", mul(Expr::Var(row), Expr::idx(dv)));
    for (c, a) in accs.iter().enumerate() {
        let of = add(Expr::Var(tid), Expr::idx(c * ntu));
        let store = |b: &mut Builder| b.store(out, add(Expr::Var(ob), of.clone()), Expr::Var(*a) * Expr::Var(inv));
        if (c + 1) * ntu <= dv {
            store(b);
        } else {
            b.if_(of.clone().lt(Expr::idx(dv)), store, |_| {});
        }
    }
}

/// The shape of the split-keys path (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitParams {
    /// Threads per block of [`split_partials`] (and keys per tile).
    pub threads: u32,
    /// Key ranges per `(batch, kv head, query)`.
    pub splits: usize,
    /// Up to this many queries per call take the split path.
    pub max_queries: usize,
}

/// The most splits [`SplitParams::for_heads`] chooses: the combine reads
/// every split's partials, so more would cost more there than they save.
pub const MAX_SPLITS: usize = 64;

impl SplitParams {
    /// Splits enough for about `blocks` working blocks in a one-query step
    /// of batch 1 (`blocks / hkv`, at least 1 and at most [`MAX_SPLITS`]),
    /// with `threads` per block, for up to `max_queries` queries.
    pub fn for_heads(hkv: usize, blocks: usize, threads: u32, max_queries: usize) -> SplitParams {
        SplitParams { threads, splits: blocks.div_ceil(hkv.max(1)).clamp(1, MAX_SPLITS), max_queries }
    }

    /// Elements of the scratch buffer: every `(batch, head, query < max_queries,
    /// split)`'s `acc[dv]`, then their `(m, l)` pairs.
    pub fn scratch_len(&self, s: &AttnSpec, batch: Expr) -> Expr {
        mul(batch, Expr::idx(self.partials_per_batch(s) * (s.dv + 2)))
    }

    fn partials_per_batch(&self, s: &AttnSpec) -> usize {
        s.hq * self.max_queries * self.splits
    }

    /// Where the `(m, l)` pairs start in the scratch buffer.
    fn ml_base(&self, s: &AttnSpec, batch: Expr) -> Expr {
        mul(batch, Expr::idx(self.partials_per_batch(s) * s.dv))
    }

    fn check(&self, s: &AttnSpec) -> Result<(), String> {
        if self.threads == 0 || self.threads > 1024 || self.splits == 0 || self.max_queries == 0 {
            return Err(format!("split attention of {self:?}"));
        }
        if s.hkv == 0 || !s.hq.is_multiple_of(s.hkv) || s.d == 0 || s.dv == 0 {
            return Err(format!("attention heads {}x{}, dims {}/{}", s.hq, s.hkv, s.d, s.dv));
        }
        Ok(())
    }
}

/// How threads of a block share a row of `dv` value features read as
/// vectors of `w`: `per` threads cover a row (thread `f0` owns vectors
/// `f0, f0 + per, ...`, `fc` of them), and `groups` such groups take keys
/// in turn.
struct ValueLayout {
    w: usize,
    vecs: usize,
    per: usize,
    fc: usize,
    groups: usize,
}

impl ValueLayout {
    fn new(dv: usize, nt: usize) -> ValueLayout {
        let w = vec_width(Scalar::F32, dv) as usize;
        let vecs = dv / w;
        let per = vecs.min(nt);
        ValueLayout { w, vecs, per, fc: vecs.div_ceil(per), groups: nt / per }
    }

    /// Runs `f` for each vector `c` the thread owns, with its index `f0 +
    /// c * per`, guarded when some threads own fewer.
    fn each(&self, b: &mut Builder, f0: Expr, mut f: impl FnMut(&mut Builder, usize, Expr)) {
        for c in 0..self.fc {
            let vi = add(f0.clone(), Expr::idx(c * self.per));
            if (c + 1) * self.per <= self.vecs {
                f(b, c, vi);
            } else {
                b.if_(vi.clone().lt(Expr::idx(self.vecs)), |b| f(b, c, vi), |_| {});
            }
        }
    }
}

fn zeros(w: usize) -> Expr {
    if w > 1 {
        Expr::f32(0.0).splat(w as u8)
    } else {
        Expr::f32(0.0)
    }
}

fn widen(e: Expr, w: usize) -> Expr {
    if w > 1 {
        e.splat(w as u8)
    } else {
        e
    }
}

/// Declares `q, k, v[, mask], partials` and builds the split kernel (see
/// the module docs): grid `(splits, batch * hkv * max_queries)`.
pub fn split_partials(
    b: &mut Builder,
    s: &AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    mask: Option<&AttnMask>,
    p: &SplitParams,
) -> Result<(), String> {
    p.check(s)?;
    let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
    let g = hq / hkv;
    let nt = p.threads as usize;
    let (splits, qmax) = (p.splits, p.max_queries);
    let o = declare(b, s, &batch, &sq, &skv, mask);
    let part = b.output("partials", p.scratch_len(s, batch.clone()));
    let ml = p.ml_base(s, batch.clone());
    let sh_q = b.buffer("q_rows", Scalar::F32, g * d, Space::Shared, Access::Write);
    let sh_s = b.buffer("scores", Scalar::F32, g * nt, Space::Shared, Access::Write);
    let sh_p = b.buffer("weights", Scalar::F32, g * nt, Space::Shared, Access::Write);
    let vl = ValueLayout::new(dv, nt);
    let sh_r = (vl.groups > 1)
        .then(|| b.buffer("group_sums", Scalar::F32, vl.groups * g * (dv + 1), Space::Shared, Access::Write));
    let wk = vec_width(Scalar::F32, d) as usize;
    b.gpu_launch(
        [p.threads, 1, 1],
        [Expr::idx(splits), mul(mul(batch, Expr::idx(hkv)), Expr::idx(qmax)), Expr::i64(1)],
    );
    b.promise_aligned_vectors();

    let tid = b.let_("tid", Expr::Special(Special::ThreadIdx(0)));
    let split = b.let_("split", Expr::Special(Special::BlockIdx(0)));
    let y = b.let_("y", Expr::Special(Special::BlockIdx(1)));
    let i = b.let_("i", rem(Expr::Var(y), Expr::idx(qmax)));
    let bk = b.let_("bk", div(Expr::Var(y), Expr::idx(qmax)));
    let kh = b.let_("kh", rem(Expr::Var(bk), Expr::idx(hkv)));
    let bi = b.let_("bi", div(Expr::Var(bk), Expr::idx(hkv)));
    // Uniform over the block: more queries than the split path takes (the
    // combine kernel then runs the rows), or a query past the last.
    let active = Expr::Var(i).lt(Expr::select(sq.clone().cmp(CmpOp::Le, Expr::idx(qmax)), sq.clone(), Expr::i64(0)));
    b.if_(
        active,
        |b| {
            let (lo, hi) = visible(b, s, &sq, &skv, Expr::Var(i));
            let n = max(sub(Expr::Var(hi), Expr::Var(lo)), Expr::i64(0));
            let chunk = b.let_("chunk", ceil_div(n, splits));
            let s0 = b.let_("s0", add(Expr::Var(lo), mul(Expr::Var(split), Expr::Var(chunk))));
            let kn = b.let_(
                "kn",
                max(sub(min(add(Expr::Var(s0), Expr::Var(chunk)), Expr::Var(hi)), Expr::Var(s0)), Expr::i64(0)),
            );
            let kvb = b.let_("kvb", mul(add(mul(Expr::Var(bi), Expr::idx(hkv)), Expr::Var(kh)), skv.clone()));
            let h0 = b.let_("h0", mul(Expr::Var(kh), Expr::idx(g)));
            // The group's query rows, staged for every thread's dot products.
            let q0 = b.let_(
                "q0",
                mul(
                    add(mul(add(mul(Expr::Var(bi), Expr::idx(hq)), Expr::Var(h0)), sq.clone()), Expr::Var(i)),
                    Expr::idx(d),
                ),
            );
            b.for_("c", Expr::Var(tid), Expr::idx(g * d), nt as i64, LoopKind::Serial, |b, c| {
                let hh = div(c.clone(), Expr::idx(d));
                let at = add(add(Expr::Var(q0), mul(mul(hh, sq.clone()), Expr::idx(d))), rem(c.clone(), Expr::idx(d)));
                b.store(sh_q, c, Expr::load(o.q, at, 1));
            });
            b.barrier();
            let moff = o.mask_row(b, Expr::Var(bi), Expr::Var(h0), Expr::Var(i));
            let mask_of = |hh: usize| {
                moff.map(|mo| match &o.mstrides[1] {
                    Some(st) => add(Expr::Var(mo), mul(Expr::idx(hh), st.clone())),
                    None => Expr::Var(mo),
                })
            };

            let m: Vec<Var> = (0..g).map(|_| b.let_("m", neg_inf())).collect();
            let lp: Vec<Var> = (0..g).map(|_| b.let_("l", Expr::f32(0.0))).collect();
            let acc: Vec<Vec<Var>> = (0..g).map(|_| (0..vl.fc).map(|_| b.let_("acc", zeros(vl.w))).collect()).collect();
            let sc: Vec<Var> = (0..g).map(|_| b.var("s", Ty::F32)).collect();
            let corr: Vec<Var> = (0..g).map(|_| b.var("corr", Ty::F32)).collect();
            let f0 = b.let_("f0", rem(Expr::Var(tid), Expr::idx(vl.per)));
            let kg = b.let_("kg", div(Expr::Var(tid), Expr::idx(vl.per)));
            // Threads past the last whole group sit out steps 3 and 4.
            let grouped = vl.groups * vl.per;
            let in_group = Expr::Var(tid).lt(Expr::idx(grouped));
            b.for_("tile", Expr::i64(0), ceil_div(Expr::Var(kn), nt), 1, LoopKind::Serial, |b, tile| {
                let t0 = b.let_("t0", mul(tile, Expr::idx(nt)));
                let j0 = b.let_("j0", add(Expr::Var(s0), Expr::Var(t0)));
                let cnt = b.let_("cnt", min(Expr::idx(nt), sub(Expr::Var(kn), Expr::Var(t0))));
                for &x in &sc {
                    b.assign(x, neg_inf());
                }
                // 1. Scores: key j0 + tid against every head of the group.
                b.if_(
                    Expr::Var(tid).lt(Expr::Var(cnt)),
                    |b| {
                        let j = b.let_("j", add(Expr::Var(j0), Expr::Var(tid)));
                        let kb = b.let_("kb", mul(add(Expr::Var(kvb), Expr::Var(j)), Expr::idx(d)));
                        let dots: Vec<Var> = (0..g).map(|_| b.let_("dot", zeros(wk))).collect();
                        b.for_("c", Expr::i64(0), Expr::idx(d / wk), 1, LoopKind::Serial, |b, c| {
                            let kv = b.let_(
                                "kv",
                                Expr::load(o.k, add(Expr::Var(kb), mul(c.clone(), Expr::idx(wk))), wk as u8),
                            );
                            for (hh, dot) in dots.iter().enumerate() {
                                let qv =
                                    Expr::load(sh_q, add(Expr::idx(hh * d), mul(c.clone(), Expr::idx(wk))), wk as u8);
                                b.assign(*dot, qv.fma(Expr::Var(kv), Expr::Var(*dot)));
                            }
                        });
                        for (hh, dot) in dots.iter().enumerate() {
                            let full = if wk > 1 { Expr::Var(*dot).hreduce(RedOp::Add) } else { Expr::Var(*dot) };
                            b.assign(sc[hh], full);
                            o.finish_score(b, s, sc[hh], mask_of(hh), Expr::Var(j));
                        }
                    },
                    |_| {},
                );
                for (hh, x) in sc.iter().enumerate() {
                    b.store(sh_s, add(Expr::idx(hh * nt), Expr::Var(tid)), Expr::Var(*x));
                }
                b.barrier();
                // 2. Every thread finds each head's tile maximum; weights.
                for hh in 0..g {
                    let tmax = b.let_("tmax", neg_inf());
                    b.for_("t", Expr::i64(0), Expr::Var(cnt), 1, LoopKind::Serial, |b, t| {
                        b.assign(tmax, Expr::Var(tmax).max(Expr::load(sh_s, add(Expr::idx(hh * nt), t), 1)));
                    });
                    let m_new = b.let_("m_new", Expr::Var(m[hh]).max(Expr::Var(tmax)));
                    let live = Expr::Var(sc[hh]).cmp(CmpOp::Gt, neg_inf());
                    let pw = Expr::select(live, (Expr::Var(sc[hh]) - Expr::Var(m_new)).exp(), Expr::f32(0.0));
                    b.store(sh_p, add(Expr::idx(hh * nt), Expr::Var(tid)), pw);
                    let had = Expr::Var(m[hh]).cmp(CmpOp::Gt, neg_inf());
                    b.assign(corr[hh], Expr::select(had, (Expr::Var(m[hh]) - Expr::Var(m_new)).exp(), Expr::f32(0.0)));
                    b.assign(m[hh], Expr::Var(m_new));
                }
                b.barrier();
                // 3. Weights times values: group kg takes keys kg, kg + groups, ...
                for hh in 0..g {
                    b.assign(lp[hh], Expr::Var(lp[hh]) * Expr::Var(corr[hh]));
                    for a in &acc[hh] {
                        b.assign(*a, Expr::Var(*a) * widen(Expr::Var(corr[hh]), vl.w));
                    }
                }
                let end = if grouped == nt {
                    Expr::Var(cnt)
                } else {
                    Expr::select(in_group.clone(), Expr::Var(cnt), Expr::i64(0))
                };
                b.for_("t", Expr::Var(kg), end, vl.groups as i64, LoopKind::Serial, |b, t| {
                    let vb = b.let_("vb", mul(add(add(Expr::Var(kvb), Expr::Var(j0)), t.clone()), Expr::idx(dv)));
                    let pw: Vec<Var> = (0..g)
                        .map(|hh| b.let_("pw", Expr::load(sh_p, add(Expr::idx(hh * nt), t.clone()), 1)))
                        .collect();
                    for hh in 0..g {
                        b.assign(lp[hh], Expr::Var(lp[hh]) + Expr::Var(pw[hh]));
                    }
                    vl.each(b, Expr::Var(f0), |b, c, vi| {
                        let vv =
                            b.let_("vv", Expr::load(o.v, add(Expr::Var(vb), mul(vi, Expr::idx(vl.w))), vl.w as u8));
                        for hh in 0..g {
                            let a = acc[hh][c];
                            b.assign(a, widen(Expr::Var(pw[hh]), vl.w).fma(Expr::Var(vv), Expr::Var(a)));
                        }
                    });
                });
            });

            // The partials of head h0 + hh: record prow0 + hh * qmax * splits.
            let prow0 = b.let_(
                "prow0",
                add(
                    mul(
                        add(mul(add(mul(Expr::Var(bi), Expr::idx(hq)), Expr::Var(h0)), Expr::idx(qmax)), Expr::Var(i)),
                        Expr::idx(splits),
                    ),
                    Expr::Var(split),
                ),
            );
            let prow = |hh: usize| add(Expr::Var(prow0), Expr::idx(hh * qmax * splits));
            let write_ml = |b: &mut Builder, hh: usize, l: Expr| {
                let at = add(ml.clone(), mul(prow(hh), Expr::idx(2)));
                b.store(part, at.clone(), Expr::Var(m[hh]));
                b.store(part, add(at, Expr::idx(1)), l);
            };
            match sh_r {
                None => {
                    // One group: every thread in it saw every key.
                    b.if_(
                        in_group,
                        |b| {
                            for (hh, a) in acc.iter().enumerate() {
                                vl.each(b, Expr::Var(f0), |b, c, vi| {
                                    let at = add(mul(prow(hh), Expr::idx(dv)), mul(vi, Expr::idx(vl.w)));
                                    b.store(part, at, Expr::Var(a[c]));
                                });
                            }
                        },
                        |_| {},
                    );
                    b.if_(
                        Expr::Var(tid).cmp(CmpOp::Eq, Expr::i64(0)),
                        |b| (0..g).for_each(|hh| write_ml(b, hh, Expr::Var(lp[hh]))),
                        |_| {},
                    );
                }
                Some(red) => {
                    // Groups add up through shared memory (one vector each: fc == 1).
                    let lsum = vl.groups * g * dv;
                    b.if_(
                        Expr::Var(kg).lt(Expr::idx(vl.groups)),
                        |b| {
                            for (hh, a) in acc.iter().enumerate() {
                                let at = add(
                                    mul(add(mul(Expr::Var(kg), Expr::idx(g)), Expr::idx(hh)), Expr::idx(dv)),
                                    mul(Expr::Var(f0), Expr::idx(vl.w)),
                                );
                                b.store(red, at, Expr::Var(a[0]));
                            }
                            b.if_(
                                Expr::Var(f0).cmp(CmpOp::Eq, Expr::i64(0)),
                                |b| {
                                    for (hh, l) in lp.iter().enumerate() {
                                        let at = add(Expr::idx(lsum + hh), mul(Expr::Var(kg), Expr::idx(g)));
                                        b.store(red, at, Expr::Var(*l));
                                    }
                                },
                                |_| {},
                            );
                        },
                        |_| {},
                    );
                    b.barrier();
                    b.for_("it", Expr::Var(tid), Expr::idx(g * vl.vecs), nt as i64, LoopKind::Serial, |b, it| {
                        let hh = b.let_("hh", div(it.clone(), Expr::idx(vl.vecs)));
                        let e = b.let_("e", mul(rem(it, Expr::idx(vl.vecs)), Expr::idx(vl.w)));
                        let at = b.let_("at", add(mul(Expr::Var(hh), Expr::idx(dv)), Expr::Var(e)));
                        let sum = b.let_("sum", zeros(vl.w));
                        for k in 0..vl.groups {
                            let v = Expr::load(red, add(Expr::idx(k * g * dv), Expr::Var(at)), vl.w as u8);
                            b.assign(sum, Expr::Var(sum) + v);
                        }
                        let prow_h = add(Expr::Var(prow0), mul(Expr::Var(hh), Expr::idx(qmax * splits)));
                        b.store(part, add(mul(prow_h, Expr::idx(dv)), Expr::Var(e)), Expr::Var(sum));
                    });
                    b.if_(
                        Expr::Var(tid).cmp(CmpOp::Eq, Expr::i64(0)),
                        |b| {
                            for hh in 0..g {
                                let mut l = Expr::f32(0.0);
                                for k in 0..vl.groups {
                                    l = l + Expr::load(red, Expr::idx(lsum + k * g + hh), 1);
                                }
                                write_ml(b, hh, l);
                            }
                        },
                        |_| {},
                    );
                }
            }
        },
        |_| {},
    );
    Ok(())
}

/// The static shared memory a block may declare without opting in to more.
pub const MAX_SHARED_BYTES: usize = 48 * 1024;

/// The shape of the flash path ([`flash`], and the prefill branch of
/// [`combine`]): a block of `threads` threads per `(batch, head, tile of
/// rows queries)`, keys in tiles of `keys`; `row_threads` threads (a power
/// of two, at most a warp) share each query row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashParams {
    /// Threads per block (a multiple of 32).
    pub threads: u32,
    /// Query rows per block (`Bq`), a multiple of `threads / row_threads`.
    pub rows: usize,
    /// Keys per tile (`Bk`), a multiple of `row_threads`.
    pub keys: usize,
    /// Threads per query row: each scores `keys / row_threads` keys of a
    /// tile and owns every `row_threads`-th value vector of the row.
    pub row_threads: usize,
}

impl FlashParams {
    /// 32 query rows by 32 keys on 128 threads, 8 per row (each thread: two
    /// rows, four keys of a tile, a quarter of the value vectors).
    pub const DEFAULT: FlashParams = FlashParams { threads: THREADS, rows: 32, keys: 32, row_threads: 8 };

    /// These parameters with the tiles halved (keys first while they are at
    /// least the rows) until the shared memory for head dims `d`, `dv` fits
    /// in [`MAX_SHARED_BYTES`], as far as the thread layout allows.
    pub fn fit(mut self, d: usize, dv: usize) -> FlashParams {
        let tr = (self.threads as usize / self.row_threads.max(1)).max(1);
        while self.shared_bytes(d, dv) > MAX_SHARED_BYTES {
            let keys_can = self.keys / 2 >= self.row_threads && (self.keys / 2).is_multiple_of(self.row_threads);
            let rows_can = self.rows / 2 >= tr && (self.rows / 2).is_multiple_of(tr);
            if keys_can && (self.keys >= self.rows || !rows_can) {
                self.keys /= 2;
            } else if rows_can {
                self.rows /= 2;
            } else {
                break;
            }
        }
        self
    }

    /// Bytes of shared memory the flash branch declares for head dims `d`
    /// and `dv`: the query tile, one key or value tile, the weights.
    pub fn shared_bytes(&self, d: usize, dv: usize) -> usize {
        let l = FlashLayout::new(self, d, dv);
        4 * (self.rows * l.qs + self.keys * l.ks.max(dv) + self.rows * l.ps)
    }

    fn check(&self, s: &AttnSpec) -> Result<(), String> {
        let (nt, tc) = (self.threads as usize, self.row_threads);
        let ok = nt > 0
            && nt <= 1024
            && nt.is_multiple_of(32)
            && tc.is_power_of_two()
            && tc <= 32
            && self.rows > 0
            && self.rows.is_multiple_of(nt / tc)
            && self.keys > 0
            && self.keys.is_multiple_of(tc);
        if !ok {
            return Err(format!("flash attention of {self:?}"));
        }
        if s.hkv == 0 || !s.hq.is_multiple_of(s.hkv) || s.d == 0 || s.dv == 0 {
            return Err(format!("attention heads {}x{}, dims {}/{}", s.hq, s.hkv, s.d, s.dv));
        }
        let bytes = self.shared_bytes(s.d, s.dv);
        if bytes > MAX_SHARED_BYTES {
            return Err(format!(
                "flash attention of {self:?} needs {bytes} B of shared memory for dims {}/{}",
                s.d, s.dv
            ));
        }
        Ok(())
    }
}

/// Where things sit in the flash branch's shared memory and threads.
struct FlashLayout {
    /// Vector widths of key and value rows.
    wk: usize,
    wv: usize,
    /// Row strides (in floats) of the staged queries and keys, padded by a
    /// vector so that the threads of a warp reading consecutive rows at the
    /// same column hit different banks; of the weights, padded by one.
    qs: usize,
    ks: usize,
    ps: usize,
    /// Thread rows (`threads / row_threads`), rows per thread, keys per thread.
    tr: usize,
    ra: usize,
    kc: usize,
}

impl FlashLayout {
    fn new(p: &FlashParams, d: usize, dv: usize) -> FlashLayout {
        let wk = vec_width(Scalar::F32, d) as usize;
        let wv = vec_width(Scalar::F32, dv) as usize;
        let tc = p.row_threads.max(1);
        let tr = (p.threads as usize / tc).max(1);
        FlashLayout {
            wk,
            wv,
            qs: d + wk,
            ks: d + wk,
            ps: p.keys + 1,
            tr,
            ra: (p.rows / tr).max(1),
            kc: (p.keys / tc).max(1),
        }
    }
}

/// Declares `q, k, v[, mask], out` (as `templates::attention::attention`)
/// and builds the flash kernel alone (see the module docs): grid `(batch *
/// hq, ceil(sq / rows))`.
#[allow(clippy::too_many_arguments)]
pub fn flash(
    b: &mut Builder,
    s: &AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    mask: Option<&AttnMask>,
    p: &FlashParams,
) -> Result<(), String> {
    p.check(s)?;
    let o = declare(b, s, &batch, &sq, &skv, mask);
    let bh = mul(batch, Expr::idx(s.hq));
    let out = b.output("out", mul(mul(bh.clone(), sq.clone()), Expr::idx(s.dv)));
    b.gpu_launch([p.threads, 1, 1], [bh, ceil_div(sq.clone(), p.rows), Expr::i64(1)]);
    b.promise_aligned_vectors();
    b.min_blocks_per_sm(1);
    flash_body(b, s, &o, out, &sq, &skv, p);
    Ok(())
}

/// The flash algorithm (see the module docs) for the block `(blockIdx.x =
/// batch * hq + head, blockIdx.y)`; every thread runs every barrier and
/// shuffle (the tile count is the block's).
fn flash_body(b: &mut Builder, s: &AttnSpec, o: &Operands, out: BufId, sq: &Expr, skv: &Expr, p: &FlashParams) {
    let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
    let group = hq / hkv;
    let nt = p.threads as usize;
    let (bq, bk, tc) = (p.rows, p.keys, p.row_threads);
    let l = FlashLayout::new(p, d, dv);
    let (wk, wv) = (l.wk, l.wv);
    let sh_q = b.buffer("q_tile", Scalar::F32, bq * l.qs, Space::Shared, Access::Write);
    let sh_kv = b.buffer("kv_tile", Scalar::F32, bk * l.ks.max(dv), Space::Shared, Access::Write);
    let sh_p = b.buffer("weights", Scalar::F32, bq * l.ps, Space::Shared, Access::Write);

    let tid = b.let_("tid", Expr::Special(Special::ThreadIdx(0)));
    let trow = b.let_("trow", div(Expr::Var(tid), Expr::idx(tc)));
    let tcol = b.let_("tcol", rem(Expr::Var(tid), Expr::idx(tc)));
    let bh = b.let_("bh", Expr::Special(Special::BlockIdx(0)));
    let h = b.let_("h", rem(Expr::Var(bh), Expr::idx(hq)));
    let bi = b.let_("bi", div(Expr::Var(bh), Expr::idx(hq)));
    // The last query tiles see the most keys under a causal mask: they go
    // first, so that the short ones fill in at the end.
    let qtiles = ceil_div(sq.clone(), bq);
    let qt = b.let_("qt", sub(sub(qtiles, Expr::i64(1)), Expr::Special(Special::BlockIdx(1))));
    let i0 = b.let_("i0", mul(Expr::Var(qt), Expr::idx(bq)));
    let kvb =
        b.let_("kvb", mul(add(mul(Expr::Var(bi), Expr::idx(hkv)), div(Expr::Var(h), Expr::idx(group))), skv.clone()));
    let qrow0 = b.let_("qrow0", add(mul(Expr::Var(bh), sq.clone()), Expr::Var(i0)));

    // The block's keys: from the first query's lowest visible key to the
    // last query's highest; tiles outside them are never visited.
    let ilast = sub(min(sq.clone(), add(Expr::Var(i0), Expr::idx(bq))), Expr::i64(1));
    let (lo_blk, _) = visible(b, s, sq, skv, Expr::Var(i0));
    let (_, hi_blk) = visible(b, s, sq, skv, ilast);
    let nkeys = b.let_("nkeys", max(sub(Expr::Var(hi_blk), Expr::Var(lo_blk)), Expr::i64(0)));

    // This thread's rows: trow + a * tr. Rows past the last query see no key.
    let mut rows = vec![];
    for a in 0..l.ra {
        let i = b.let_("i", add(Expr::Var(i0), add(Expr::Var(trow), Expr::idx(a * l.tr))));
        let (lo, hi) = visible(b, s, sq, skv, Expr::Var(i));
        b.assign(hi, Expr::select(Expr::Var(i).lt(sq.clone()), Expr::Var(hi), Expr::i64(0)));
        let moff = o.mask_row(b, Expr::Var(bi), Expr::Var(h), Expr::Var(i));
        rows.push((i, lo, hi, moff));
    }

    // The query tile, zero past the last query.
    let qvecs = d / wk;
    b.for_("e", Expr::Var(tid), Expr::idx(bq * qvecs), nt as i64, LoopKind::Serial, |b, e| {
        let r = b.let_("r", div(e.clone(), Expr::idx(qvecs)));
        let c = b.let_("c", mul(rem(e, Expr::idx(qvecs)), Expr::idx(wk)));
        let at = add(mul(Expr::Var(r), Expr::idx(l.qs)), Expr::Var(c));
        b.if_(
            add(Expr::Var(i0), Expr::Var(r)).lt(sq.clone()),
            |b| {
                let src = add(mul(add(Expr::Var(qrow0), Expr::Var(r)), Expr::idx(d)), Expr::Var(c));
                b.store(sh_q, at.clone(), Expr::load(o.q, src, wk as u8));
            },
            |b| b.store(sh_q, at.clone(), zeros(wk)),
        );
    });

    let m: Vec<Var> = (0..l.ra).map(|_| b.let_("m", neg_inf())).collect();
    // Each thread's share of the row sums (its own keys' weights).
    let lsum: Vec<Var> = (0..l.ra).map(|_| b.let_("l", Expr::f32(0.0))).collect();
    let vl = ValueLayout { w: wv, vecs: dv / wv, per: tc, fc: (dv / wv).div_ceil(tc), groups: 1 };
    let acc: Vec<Vec<Var>> = (0..l.ra).map(|_| (0..vl.fc).map(|_| b.let_("acc", zeros(wv))).collect()).collect();
    let sc: Vec<Vec<Var>> = (0..l.ra).map(|_| (0..l.kc).map(|_| b.var("s", Ty::F32)).collect()).collect();
    let corr: Vec<Var> = (0..l.ra).map(|_| b.var("corr", Ty::F32)).collect();
    let other = b.var("other", Ty::F32);

    // A tile of `width`-wide rows of `src` (row `j` at `(kvb + j) * len`)
    // into `sh_kv` at stride `stride`, zero past the block's keys.
    let stage = |b: &mut Builder, j0: Var, src: BufId, len: usize, width: usize, stride: usize| {
        let vecs = len / width;
        b.for_("e", Expr::Var(tid), Expr::idx(bk * vecs), nt as i64, LoopKind::Serial, |b, e| {
            let r = b.let_("r", div(e.clone(), Expr::idx(vecs)));
            let c = b.let_("c", mul(rem(e, Expr::idx(vecs)), Expr::idx(width)));
            let j = b.let_("j", add(Expr::Var(j0), Expr::Var(r)));
            let at = add(mul(Expr::Var(r), Expr::idx(stride)), Expr::Var(c));
            b.if_(
                Expr::Var(j).lt(Expr::Var(hi_blk)),
                |b| {
                    let from = add(mul(add(Expr::Var(kvb), Expr::Var(j)), Expr::idx(len)), Expr::Var(c));
                    b.store(sh_kv, at.clone(), Expr::load(src, from, width as u8));
                },
                |b| b.store(sh_kv, at.clone(), zeros(width)),
            );
        });
    };

    b.for_("tile", Expr::i64(0), ceil_div(Expr::Var(nkeys), bk), 1, LoopKind::Serial, |b, tile| {
        let j0 = b.let_("j0", add(Expr::Var(lo_blk), mul(tile, Expr::idx(bk))));
        // The previous tile's readers of the values and weights are done
        // (and, on the first tile, the query tile is staged).
        b.barrier();
        stage(b, j0, o.k, d, wk, l.ks);
        b.barrier();

        // 1. Scores of this thread's rows against its keys tcol + c * tc.
        // The dot products accumulate lane by lane into the scalar scores
        // (a GPU has no vector FMA, and vector accumulators would hold four
        // times the registers).
        for x in sc.iter().flatten() {
            b.assign(*x, Expr::f32(0.0));
        }
        b.for_("cv", Expr::i64(0), Expr::idx(d / wk), 1, LoopKind::Serial, |b, cv| {
            let col = mul(cv, Expr::idx(wk));
            let qv: Vec<Var> = (0..l.ra)
                .map(|a| {
                    let r = add(Expr::Var(trow), Expr::idx(a * l.tr));
                    b.let_("qv", Expr::load(sh_q, add(mul(r, Expr::idx(l.qs)), col.clone()), wk as u8))
                })
                .collect();
            let lane =
                |v: Var, e: usize| if wk > 1 { Expr::Extract(Box::new(Expr::Var(v)), e as u8) } else { Expr::Var(v) };
            for c in 0..l.kc {
                let kr = add(Expr::Var(tcol), Expr::idx(c * tc));
                let kv = b.let_("kv", Expr::load(sh_kv, add(mul(kr, Expr::idx(l.ks)), col.clone()), wk as u8));
                for e in 0..wk {
                    for (row, q) in sc.iter().zip(&qv) {
                        b.assign(row[c], lane(*q, e).fma(lane(kv, e), Expr::Var(row[c])));
                    }
                }
            }
        });
        for c in 0..l.kc {
            let j = b.let_("j", add(Expr::Var(j0), add(Expr::Var(tcol), Expr::idx(c * tc))));
            for (row, (_, lo, hi, moff)) in sc.iter().zip(&rows) {
                let x = row[c];
                let seen = Expr::select(
                    Expr::Var(j).cmp(CmpOp::Ge, Expr::Var(*lo)),
                    Expr::Var(j).lt(Expr::Var(*hi)),
                    Expr::Bool(false),
                );
                b.if_(seen, |b| o.finish_score(b, s, x, moff.map(Expr::Var), Expr::Var(j)), |b| b.assign(x, neg_inf()));
            }
        }

        // 2. Each row's tile maximum over its threads (adjacent lanes of a
        // warp, so butterfly shuffles: every lane gets the same value), the
        // new running maximum, and the weights into shared memory.
        for a in 0..l.ra {
            let tmax = b.let_("tmax", neg_inf());
            for x in &sc[a] {
                b.assign(tmax, Expr::Var(tmax).max(Expr::Var(*x)));
            }
            let mut off = 1;
            while off < tc {
                b.shuffle(other, ShuffleKind::Xor, Expr::Var(tmax), Expr::idx(off));
                b.assign(tmax, Expr::Var(tmax).max(Expr::Var(other)));
                off *= 2;
            }
            let m_new = b.let_("m_new", Expr::Var(m[a]).max(Expr::Var(tmax)));
            // Before any key, m is -inf and l and the accumulators are 0.
            let had = Expr::Var(m[a]).cmp(CmpOp::Gt, neg_inf());
            b.assign(corr[a], Expr::select(had, (Expr::Var(m[a]) - Expr::Var(m_new)).exp(), Expr::f32(0.0)));
            b.assign(m[a], Expr::Var(m_new));
            let tsum = b.let_("tsum", Expr::f32(0.0));
            let prow = mul(add(Expr::Var(trow), Expr::idx(a * l.tr)), Expr::idx(l.ps));
            for (c, &x) in sc[a].iter().enumerate() {
                let live = Expr::Var(x).cmp(CmpOp::Gt, neg_inf());
                let pw = b.let_("pw", Expr::select(live, (Expr::Var(x) - Expr::Var(m_new)).exp(), Expr::f32(0.0)));
                b.assign(tsum, Expr::Var(tsum) + Expr::Var(pw));
                b.store(sh_p, add(prow.clone(), add(Expr::Var(tcol), Expr::idx(c * tc))), Expr::Var(pw));
            }
            b.assign(lsum[a], Expr::Var(lsum[a]).fma(Expr::Var(corr[a]), Expr::Var(tsum)));
        }
        // Every thread is done with the keys: the values take their place.
        b.barrier();
        stage(b, j0, o.v, dv, wv, dv);
        b.barrier();

        // 3. Weights times values, every key of the tile (weights past the
        // visible keys are 0 and so are the values staged for them).
        for a in 0..l.ra {
            for x in &acc[a] {
                b.assign(*x, Expr::Var(*x) * widen(Expr::Var(corr[a]), wv));
            }
        }
        b.for_("t", Expr::i64(0), Expr::idx(bk), 1, LoopKind::Serial, |b, t| {
            let pw: Vec<Var> = (0..l.ra)
                .map(|a| {
                    let r = add(Expr::Var(trow), Expr::idx(a * l.tr));
                    b.let_("pw", Expr::load(sh_p, add(mul(r, Expr::idx(l.ps)), t.clone()), 1))
                })
                .collect();
            let vrow = mul(t, Expr::idx(dv));
            vl.each(b, Expr::Var(tcol), |b, c, vi| {
                let vv = b.let_("vv", Expr::load(sh_kv, add(vrow.clone(), mul(vi, Expr::idx(wv))), wv as u8));
                for a in 0..l.ra {
                    let x = acc[a][c];
                    b.assign(x, widen(Expr::Var(pw[a]), wv).fma(Expr::Var(vv), Expr::Var(x)));
                }
            });
        });
    });

    // The row sums over the row's threads, then the normalised rows.
    for (a, (i, _, _, _)) in rows.iter().enumerate() {
        let mut off = 1;
        while off < tc {
            b.shuffle(other, ShuffleKind::Xor, Expr::Var(lsum[a]), Expr::idx(off));
            b.assign(lsum[a], Expr::Var(lsum[a]) + Expr::Var(other));
            off *= 2;
        }
        let pos_l = Expr::Var(lsum[a]).cmp(CmpOp::Gt, Expr::f32(0.0));
        let inv = b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(lsum[a]), Expr::f32(0.0)));
        b.if_(
            Expr::Var(*i).lt(sq.clone()),
            |b| {
                let ob = b.let_("ob", mul(add(mul(Expr::Var(bh), sq.clone()), Expr::Var(*i)), Expr::idx(dv)));
                vl.each(b, Expr::Var(tcol), |b, c, vi| {
                    let at = add(Expr::Var(ob), mul(vi, Expr::idx(wv)));
                    b.store(out, at, Expr::Var(acc[a][c]) * widen(Expr::Var(inv), wv));
                });
            },
            |_| {},
        );
    }
}

/// Declares `q, k, v[, mask], partials, out` and builds the combine kernel
/// (see the module docs): grid `(batch * hq, ceil(sq / f.rows))`, `f.threads`
/// threads; with more than `p.max_queries` queries it runs the flash
/// algorithm instead.
#[allow(clippy::too_many_arguments)]
pub fn combine(
    b: &mut Builder,
    s: &AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    mask: Option<&AttnMask>,
    p: &SplitParams,
    f: &FlashParams,
) -> Result<(), String> {
    p.check(s)?;
    f.check(s)?;
    let (hq, dv) = (s.hq, s.dv);
    let (splits, qmax) = (p.splits, p.max_queries);
    let o = declare(b, s, &batch, &sq, &skv, mask);
    let part = b.buffer("partials", Scalar::F32, p.scratch_len(s, batch.clone()), Space::Global, Access::Read);
    let ml = p.ml_base(s, batch.clone());
    let bh = mul(batch, Expr::idx(hq));
    let out = b.output("out", mul(mul(bh.clone(), sq.clone()), Expr::idx(dv)));
    b.gpu_launch([f.threads, 1, 1], [bh, ceil_div(sq.clone(), f.rows), Expr::i64(1)]);
    b.promise_aligned_vectors();
    // The flash branch holds its accumulators and scores in registers:
    // without this ptxas trades a few of them for occupancy and spills.
    b.min_blocks_per_sm(1);
    // Groups of threads take the block's rows in turn; thread f0 of a group
    // owns the row's value vectors f0, f0 + per, ...
    let vl = ValueLayout::new(dv, f.threads as usize);
    b.if_(
        sq.clone().cmp(CmpOp::Le, Expr::idx(qmax)),
        |b| {
            let tid = b.let_("tid", Expr::Special(Special::ThreadIdx(0)));
            let bh = b.let_("bh", Expr::Special(Special::BlockIdx(0)));
            let f0 = b.let_("f0", rem(Expr::Var(tid), Expr::idx(vl.per)));
            let kg = b.let_("kg", div(Expr::Var(tid), Expr::idx(vl.per)));
            let i0 = b.let_("i0", mul(Expr::Special(Special::BlockIdx(1)), Expr::idx(f.rows)));
            let end = min(sq.clone(), add(Expr::Var(i0), Expr::idx(f.rows)));
            // Threads past the last whole group sit out.
            let end = Expr::select(Expr::Var(kg).lt(Expr::idx(vl.groups)), end, Expr::i64(0));
            let first = add(Expr::Var(i0), Expr::Var(kg));
            b.for_("i", first, end, vl.groups as i64, LoopKind::Serial, |b, i| {
                let row = b.let_("row", add(mul(Expr::Var(bh), sq.clone()), i.clone()));
                let prow0 = b.let_("prow0", mul(add(mul(Expr::Var(bh), Expr::idx(qmax)), i), Expr::idx(splits)));
                let mrow = |sp: Expr| add(ml.clone(), mul(add(Expr::Var(prow0), sp), Expr::idx(2)));
                let big = b.let_("big", neg_inf());
                b.for_("sp", Expr::i64(0), Expr::idx(splits), 1, LoopKind::Serial, |b, sp| {
                    b.assign(big, Expr::Var(big).max(Expr::load(part, mrow(sp), 1)));
                });
                let l = b.let_("l", Expr::f32(0.0));
                let acc: Vec<Var> = (0..vl.fc).map(|_| b.let_("acc", zeros(vl.w))).collect();
                b.for_("sp", Expr::i64(0), Expr::idx(splits), 1, LoopKind::Serial, |b, sp| {
                    let ms = b.let_("ms", Expr::load(part, mrow(sp.clone()), 1));
                    let live = Expr::Var(ms).cmp(CmpOp::Gt, neg_inf());
                    let w = b.let_("w", Expr::select(live, (Expr::Var(ms) - Expr::Var(big)).exp(), Expr::f32(0.0)));
                    b.assign(
                        l,
                        Expr::Var(w).fma(Expr::load(part, add(mrow(sp.clone()), Expr::idx(1)), 1), Expr::Var(l)),
                    );
                    let pb = b.let_("pb", mul(add(Expr::Var(prow0), sp), Expr::idx(dv)));
                    vl.each(b, Expr::Var(f0), |b, c, vi| {
                        let pv = Expr::load(part, add(Expr::Var(pb), mul(vi, Expr::idx(vl.w))), vl.w as u8);
                        b.assign(acc[c], widen(Expr::Var(w), vl.w).fma(pv, Expr::Var(acc[c])));
                    });
                });
                let pos_l = Expr::Var(l).cmp(CmpOp::Gt, Expr::f32(0.0));
                let inv = b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(l), Expr::f32(0.0)));
                let ob = b.let_("ob", mul(Expr::Var(row), Expr::idx(dv)));
                vl.each(b, Expr::Var(f0), |b, c, vi| {
                    let at = add(Expr::Var(ob), mul(vi, Expr::idx(vl.w)));
                    b.store(out, at, Expr::Var(acc[c]) * widen(Expr::Var(inv), vl.w));
                });
            });
        },
        |b| flash_body(b, s, &o, out, &sq, &skv, f),
    );
    Ok(())
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
        /// The split-keys kernels (the combine with [`SMALL_FLASH`]), or the
        /// row kernel.
        split: Option<SplitParams>,
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
            lanes: crate::templates::LANES,
        };
        let env: std::collections::BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mask = c.mask.map(|(dt, dims)| AttnMask {
            elem: crate::select::elem_of(dt),
            dims: f(dims).shape.iter().map(|d| Expr::i64(d.eval_map(&env).unwrap())).collect(),
        });
        let (bt, sq, skv) = (Expr::i64(c.batch), Expr::i64(c.sq), Expr::i64(c.past + c.sq));
        let what = format!(
            "attention h{}x{} d{} b{} s{} past{} causal={} window={:?} cap={:?} mask={:?} nt={} split={:?}",
            c.hq, c.hkv, c.d, c.batch, c.sq, c.past, c.causal, c.window, c.softcap, c.mask, c.nt, c.split
        );
        let Some(sp) = c.split else {
            let mut g = Builder::new("attention");
            attention(&mut g, &spec, bt, sq, skv, mask.as_ref(), c.nt);
            let g = g.finish().unwrap();
            let got = run_gpu(&g, &bufs, &[]);
            assert_close(&what, &got, &want, 1e-5);
            return;
        };
        // Split keys: the partials (into scratch that starts as NaN, so
        // one read but never written shows), then the combine.
        let mut g = Builder::new("split");
        split_partials(&mut g, &spec, bt.clone(), sq.clone(), skv.clone(), mask.as_ref(), &sp).unwrap();
        let split = g.finish().unwrap();
        let mut g = Builder::new("combine");
        combine(&mut g, &spec, bt.clone(), sq, skv, mask.as_ref(), &sp, &SMALL_FLASH).unwrap();
        let comb = g.finish().unwrap();
        let n = as_const(&sp.scratch_len(&spec, bt)).unwrap() as usize;
        let out = bufs.len() - 1;
        let mut args: Vec<BufData> = bufs[..out].to_vec();
        args.push(BufData::F32(vec![f32::NAN; n]));
        let scratch = run_gpu(&split, &args, &[]).pop().unwrap();
        let mut args: Vec<BufData> = bufs[..out].to_vec();
        args.push(scratch);
        args.push(bufs[out].clone());
        let mut got = run_gpu(&comb, &args, &[]);
        got.remove(out);
        assert_close(&what, &got, &want, 1e-5);
    }

    /// Flash tiles small enough for the interpreter: 32 threads, 4 per
    /// row, 16 rows (two per thread), 8 keys per tile (two per thread).
    const SMALL_FLASH: FlashParams = FlashParams { threads: 32, rows: 16, keys: 8, row_threads: 4 };

    /// A flash attention case, checked against `smelt_ir`'s interpretation
    /// of the attention op.
    #[derive(Clone, Copy)]
    struct Flash {
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
        /// Every mask element false (a bool mask): rows of zeros.
        kill_mask: bool,
        p: FlashParams,
    }

    const FLASH: Flash = Flash {
        hq: 4,
        hkv: 2,
        d: 24,
        batch: 1,
        sq: 5,
        past: 0,
        causal: true,
        window: None,
        softcap: None,
        mask: None,
        kill_mask: false,
        p: SMALL_FLASH,
    };

    /// Runs the flash kernel (all sizes constant) in the interpreter's GPU
    /// mode and the reference on the same operands; tolerance 1e-5 * (1 +
    /// |want|). Returns the largest absolute error.
    fn check_flash(c: &Flash) -> f32 {
        use smelt_ir::{Tensor, TensorType};
        let scale = 1.0 / (c.d as f64).sqrt();
        let op = Op::Attention { scale, causal: c.causal, window: c.window, softcap: c.softcap };
        let syms = [("b", c.batch), ("s", c.sq), ("t", c.past + c.sq)];
        let env: std::collections::BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mask_ty: Option<TensorType> = c.mask.map(|(dt, dims)| ty(dt, dims));
        let spec = AttnSpec {
            hq: c.hq,
            hkv: c.hkv,
            d: c.d,
            dv: c.d,
            scale: scale as f32,
            causal: c.causal,
            window: c.window,
            softcap: c.softcap.map(|x| x as f32),
            lanes: crate::templates::LANES,
        };
        let mask_dims: Option<Vec<usize>> =
            mask_ty.as_ref().map(|m| m.shape.iter().map(|d| d.eval_map(&env).unwrap() as usize).collect());
        let mask = mask_ty.as_ref().zip(mask_dims.as_ref()).map(|(m, dims)| AttnMask {
            elem: crate::select::elem_of(m.dtype),
            dims: dims.iter().map(|&d| Expr::idx(d)).collect(),
        });
        let mut g = Builder::new("flash");
        flash(&mut g, &spec, Expr::i64(c.batch), Expr::i64(c.sq), Expr::i64(c.past + c.sq), mask.as_ref(), &c.p)
            .unwrap();
        let k = g.finish().unwrap();
        let mut bufs = buffers(&k, &[], c.d as u64 + c.sq as u64 + c.past as u64);
        match &mut bufs[3] {
            BufData::Bool(m) if c.kill_mask => m.iter_mut().for_each(|x| *x = false),
            BufData::F32(m) if c.mask.is_some() => {
                m.iter_mut().for_each(|x| *x = if *x < -1.0 { f32::NEG_INFINITY } else { *x * 0.25 })
            }
            _ => {}
        }
        let (b, t, s) = (c.batch as usize, (c.past + c.sq) as usize, c.sq as usize);
        let tensor = |buf: &BufData, shape: Vec<usize>| match buf {
            BufData::F32(x) => Tensor::from_f32(DType::F32, shape, x.clone()).unwrap(),
            BufData::Bool(x) => Tensor::from_bool(shape, x.clone()).unwrap(),
            other => panic!("operand {other:?}"),
        };
        let mut operands = vec![
            tensor(&bufs[0], vec![b, c.hq, s, c.d]),
            tensor(&bufs[1], vec![b, c.hkv, t, c.d]),
            tensor(&bufs[2], vec![b, c.hkv, t, c.d]),
        ];
        if let Some(dims) = mask_dims {
            operands.push(tensor(&bufs[3], dims));
        }
        let refs: Vec<&Tensor> = operands.iter().collect();
        let want = smelt_ir::interp::eval_op(&op, &refs, &env).unwrap().remove(0).to_f32_vec();
        let got = run_gpu(&k, &bufs, &[]);
        let got = got.last().unwrap().f32();
        let what = format!(
            "flash h{}x{} d{} b{} s{} past{} causal={} window={:?} cap={:?} mask={:?} kill={} {:?}",
            c.hq, c.hkv, c.d, c.batch, c.sq, c.past, c.causal, c.window, c.softcap, c.mask, c.kill_mask, c.p
        );
        assert_close(&what, &[BufData::F32(got.to_vec())], &[BufData::F32(want.clone())], 1e-5);
        let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        eprintln!("{what}: max abs err {err:.2e}");
        err
    }

    /// Causal prefill over query counts (one partial tile, several, with a
    /// partial last one), cached pasts, head dims and GQA groups of 2 and 3.
    #[test]
    fn gpu_flash_causal() {
        for (sq, past) in [(5, 0), (5, 7), (33, 0), (33, 7), (70, 7)] {
            check_flash(&Flash { sq, past, ..FLASH });
        }
        check_flash(&Flash { hq: 3, hkv: 1, d: 40, sq: 33, past: 7, ..FLASH });
        check_flash(&Flash { hq: 3, hkv: 1, d: 64, sq: 70, past: 0, ..FLASH });
        // Batch 2, head dim 40.
        check_flash(&Flash { d: 40, batch: 2, sq: 33, past: 7, ..FLASH });
    }

    /// Sliding windows (narrower than a key tile, wider than a query tile),
    /// not causal, softcap.
    #[test]
    fn gpu_flash_window_noncausal_softcap() {
        check_flash(&Flash { sq: 70, past: 7, window: Some(5), ..FLASH });
        check_flash(&Flash { hq: 3, hkv: 1, d: 40, batch: 2, sq: 33, past: 0, window: Some(20), ..FLASH });
        check_flash(&Flash { d: 64, sq: 33, past: 7, causal: false, ..FLASH });
        check_flash(&Flash {
            hq: 3,
            hkv: 1,
            sq: 5,
            past: 7,
            causal: false,
            window: Some(3),
            softcap: Some(2.0),
            ..FLASH
        });
    }

    /// Explicit masks: bool (padding, broadcast over heads and queries; per
    /// query), additive per head with -inf entries, every key masked.
    #[test]
    fn gpu_flash_masks() {
        let pad = Flash { batch: 2, sq: 33, past: 7, mask: Some((DType::Bool, "b, 1, 1, t")), ..FLASH };
        check_flash(&pad);
        check_flash(&Flash { kill_mask: true, sq: 5, ..pad });
        check_flash(&Flash { hq: 3, hkv: 1, d: 40, sq: 70, past: 0, mask: Some((DType::Bool, "1, 1, s, t")), ..FLASH });
        let add = Flash { d: 64, batch: 2, sq: 5, past: 7, mask: Some((DType::F32, "b, 4, s, t")), ..FLASH };
        check_flash(&add);
        check_flash(&Flash { causal: false, window: Some(9), softcap: Some(5.0), sq: 33, batch: 1, ..add });
    }

    /// Head dims 80 and 128, other thread layouts (8 threads per row, one
    /// row per thread; the default tiles), and the tiles `fit` halves for
    /// wide heads.
    #[test]
    fn gpu_flash_dims_and_layouts() {
        let wide = FlashParams { threads: 64, rows: 16, keys: 16, row_threads: 8 };
        check_flash(&Flash { hq: 2, hkv: 1, d: 80, sq: 33, past: 7, p: wide, ..FLASH });
        check_flash(&Flash { hq: 2, hkv: 1, d: 128, sq: 20, past: 0, window: Some(7), p: wide, ..FLASH });
        check_flash(&Flash { hq: 2, hkv: 1, d: 40, sq: 40, past: 7, p: FlashParams::DEFAULT, ..FLASH });
        let p = FlashParams::DEFAULT.fit(256, 256);
        assert!(p.shared_bytes(256, 256) <= MAX_SHARED_BYTES && p.rows * p.keys >= 16 * 16, "{p:?}");
        assert_eq!(FlashParams::DEFAULT.fit(128, 128), FlashParams::DEFAULT);
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
        split: None,
    };

    const fn sp(threads: u32, splits: usize, max_queries: usize) -> Option<SplitParams> {
        Some(SplitParams { threads, splits, max_queries })
    }

    /// Split keys, decode and a few queries, over the head dims, GQA groups,
    /// past lengths and value layouts (32 threads: one group of 20 threads
    /// over d = 80, 12 idle; two groups of 16 over d = 64; 64 threads: two
    /// groups of 32 over d = 128); several splits, some with no key.
    #[test]
    fn gpu_attention_split_decode() {
        let base = Case { split: sp(32, 4, 4), nt: 16, ..BASE };
        // d 24, groups of 2, 10 keys over 4 splits.
        check(&base, false);
        // One key, 3 of 4 splits empty; groups of 1.
        check(&Case { hq: 2, hkv: 2, d: 40, past: 0, ..base }, false);
        check(&Case { hq: 2, hkv: 2, d: 40, past: 1, sq: 3, ..base }, false);
        // Groups of 4, batch 2, 3 queries, 5 splits, a long cache.
        check(&Case { hq: 4, hkv: 1, d: 64, batch: 2, sq: 3, past: 100, split: sp(32, 5, 4), ..base }, false);
        // d 80 (idle threads), 258 keys over 3 splits of several tiles.
        check(&Case { hq: 2, hkv: 1, d: 80, past: 257, split: sp(32, 3, 4), ..base }, false);
        // d 128, groups of 4, two key groups.
        check(&Case { hq: 4, hkv: 1, d: 128, past: 257, split: sp(64, 4, 4), nt: 32, ..base }, false);
        // Batch 2, 7 splits for 2 keys.
        check(&Case { batch: 2, past: 1, split: sp(32, 7, 4), ..base }, false);
    }

    #[test]
    fn gpu_attention_split_window_masks_softcap() {
        let base = Case { split: sp(32, 8, 4), nt: 16, ..BASE };
        // A window of 16 (2 keys per split) and of 5 (3 splits empty).
        check(&Case { sq: 3, past: 100, window: Some(16), ..base }, false);
        check(&Case { past: 100, window: Some(5), ..base }, false);
        // Not causal.
        check(&Case { hq: 2, hkv: 1, d: 40, sq: 3, past: 1, causal: false, ..base }, false);
        // Bool masks, broadcast over heads; every key masked: zeros.
        let bool_mask = Case { hq: 4, hkv: 1, batch: 2, past: 9, mask: Some((DType::Bool, "b, 1, s, t")), ..base };
        check(&bool_mask, false);
        check(&bool_mask, true);
        // An additive mask per head, softcap, window.
        let add_mask = Case {
            hq: 4,
            hkv: 2,
            d: 64,
            sq: 3,
            past: 9,
            softcap: Some(5.0),
            window: Some(3),
            mask: Some((DType::F32, "b, 4, s, t")),
            split: sp(32, 3, 4),
            ..base
        };
        check(&add_mask, false);
        check(&Case { softcap: Some(2.0), mask: None, window: None, past: 30, ..add_mask }, false);
    }

    /// More queries than the split path takes: the combine kernel runs
    /// flash attention (and the split kernel's blocks all return).
    #[test]
    fn gpu_attention_split_falls_back_to_flash() {
        let base = Case { split: sp(32, 4, 2), nt: 16, ..BASE };
        check(&Case { sq: 3, past: 9, ..base }, false);
        check(&Case { hq: 3, hkv: 1, d: 40, sq: 7, past: 0, window: Some(4), ..base }, false);
        check(&Case { sq: 2, past: 9, mask: Some((DType::Bool, "1, 1, s, t")), ..base }, false);
        // Several query tiles, batch 2, an additive mask per head.
        check(&Case { batch: 2, sq: 19, past: 7, mask: Some((DType::F32, "b, 4, s, t")), ..base }, false);
    }

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
