//! Scaled dot-product attention with an online softmax: one parallel
//! iteration per query position and key/value head, for one or more of the
//! query heads that share that key/value head (see `heads_per_item`; one
//! at a time for a single position), and one pass over the visible keys
//! keeping, per query row, the running maximum `m`, the running sum `l`
//! and the output accumulator (vectors over the value dim); each key and
//! value vector is loaded once for all the item's rows. Keys go in chunks (see
//! `score_chunk`): a chunk's scores are computed a vector of keys at a time
//! (a vector of products per key, then all their lane sums at once,
//! `Expr::HSums`) where the head dim is whole vectors of 8 lanes or more,
//! else in blocks of `key_block` keys one by one, and kept in the row's own
//! output until the row is done; the chunk's maximum, its exponentials and
//! their sum are vector operations over keys, and the running state is
//! rescaled once per chunk. Sums accumulate in f32. While a chunk's values
//! are summed, each key's step prefetches the key vector one chunk ahead,
//! so that the key stream keeps loading through the value phase.
//!
//! Over a KV cache kept in place, decode attention is two launches
//! (`decode_partials`, `decode_combine`) that split the keys of a long
//! context between the threads.
//!
//! Visibility follows the reference: query `i` sits at `pos = skv - sq + i`;
//! `causal` limits keys to `j <= pos`, a window `w` to `j > pos - w`, both
//! applied as loop bounds. A bool mask drops keys, a float mask is added to
//! the score; a score of -inf contributes nothing, and a row with no
//! contributing key is zero.

use super::sym::{self, add, as_const, max, min, mul, sub};
use super::{c, widen, LANES};
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, LoopKind, RedOp, Scalar, Space, Var};

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
    let a = Attn::declare(b, s, batch, sq, skv, kv_stride, mask);
    let out = b.output("out", mul(a.rows(), Expr::idx(s.dv)));
    a.rows_loop_any(b, out);
}

/// The most key segments [`decode_partials`] splits a row's keys into.
pub const MAX_SEGMENTS: usize = 16;

/// Keys per segment [`decode_partials`] aims at: a segment is one item of
/// the thread team's parallel loop, and more keys than this make enough
/// work per item for its fixed costs.
const SEGMENT_KEYS: usize = 64;

/// The fewest visible keys for which decode attention is split. With
/// fewer, [`decode_combine`] computes it whole, a query head per item: on
/// a 2-core Zen 5 (smollm2-135m, 9 query heads on 3 key/value heads) that
/// took 7 us per layer at 128 keys against 9.7 split, and 12 against 15 at
/// 256; split took 24 against 24 at 512 and 44 against 60 at 1024.
pub const SPLIT_KEYS: usize = 512;

/// The elements of the partials buffer of [`decode_partials`]: per query
/// row (`batch * hq` of them, one position) and segment, the unnormalized
/// output (`dv`), the maximum and the sum.
pub fn partials_len(s: &AttnSpec) -> usize {
    s.hq * MAX_SEGMENTS * (s.dv + 2)
}

/// The first of the two launches of decode attention split over keys
/// (`flash decoding`): with one query position, each item takes a segment
/// of the keys of one key/value head for the query heads that share it
/// (see `heads_per_item`), so that the team has work for every thread
/// even with few heads, and each key and value vector is loaded once per
/// item; it writes each row's partial result into `partials` (`batch *`
/// [`partials_len`] elements). With more positions, or fewer than 512
/// visible keys (`SPLIT_KEYS`), it does nothing, and [`decode_combine`]
/// computes the whole attention. Declares `q, k, v[, mask], partials`.
pub fn decode_partials(
    b: &mut Builder,
    s: &AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    kv_stride: Expr,
    mask: Option<&AttnMask>,
) {
    let a = Attn::declare(b, s, batch.clone(), sq.clone(), skv, kv_stride, mask);
    let parts = b.output("partials", mul(batch, Expr::idx(partials_len(s))));
    let per = a.per();
    let split = |b: &mut Builder| {
        let nseg = b.let_("nseg", a.segments());
        a.rows_loop(b, per, Sink::Partials { buf: parts, nseg: Expr::Var(nseg) });
    };
    if let Some(cond) = a.split_when() {
        b.if_(cond, split, |_| {});
    }
}

/// The second launch of split decode attention: where [`decode_partials`]
/// split the keys, each row's output from its segments' partials
/// (rescaled to their common maximum, summed, divided by the total sum; a
/// row with no live key is zero); elsewhere the whole attention as
/// [`attention`] computes it. Declares `q, k, v[, mask], partials, out`.
pub fn decode_combine(
    b: &mut Builder,
    s: &AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    kv_stride: Expr,
    mask: Option<&AttnMask>,
) {
    let a = Attn::declare(b, s, batch.clone(), sq.clone(), skv, kv_stride, mask);
    let parts = b.input("partials", mul(batch.clone(), Expr::idx(partials_len(s))));
    let out = b.output("out", mul(a.rows(), Expr::idx(s.dv)));
    let combine = |b: &mut Builder| {
        let nseg = b.let_("nseg", a.segments());
        let dv = s.dv;
        let rows = mul(batch.clone(), Expr::idx(s.hq));
        b.for_("row", Expr::idx(0), rows, 1, LoopKind::Parallel, |b, row| {
            let pb = b.let_("pb", mul(row.clone(), Expr::idx(MAX_SEGMENTS * (dv + 2))));
            let seg_at = |sg: Expr| add(Expr::Var(pb), mul(sg, Expr::idx(dv + 2)));
            let top = b.let_("top", Expr::f32(f32::NEG_INFINITY));
            b.for_("sg", Expr::idx(0), Expr::Var(nseg), 1, LoopKind::Serial, |b, sg| {
                let m = Expr::load(parts, add(seg_at(sg), Expr::idx(dv)), 1);
                b.assign(top, Expr::Var(top).max(m));
            });
            let pieces = chunks(dv, a.lanes);
            let accs: Vec<(usize, u8, Var)> = pieces.iter().map(|&(o, w)| (o, w, b.let_("o", c(0.0, w)))).collect();
            let total = b.let_("l", Expr::f32(0.0));
            // Segments with no live key have maximum -inf and sum 0: their
            // weight is 0 (and the row's, when every segment is so).
            b.if_(
                Expr::Var(top).cmp(CmpOp::Gt, Expr::f32(f32::NEG_INFINITY)),
                |b| {
                    b.for_("sg", Expr::idx(0), Expr::Var(nseg), 1, LoopKind::Serial, |b, sg| {
                        let at = b.let_("at", seg_at(sg));
                        let m = Expr::load(parts, add(Expr::Var(at), Expr::idx(dv)), 1);
                        let wgt = b.let_("w", (m - Expr::Var(top)).exp());
                        let l = Expr::load(parts, add(Expr::Var(at), Expr::idx(dv + 1)), 1);
                        b.assign(total, Expr::Var(total) + Expr::Var(wgt) * l);
                        for &(o, w, acc) in &accs {
                            let x = Expr::load(parts, add(Expr::Var(at), Expr::idx(o)), w);
                            b.assign(acc, widen(Expr::Var(wgt), w).fma(x, Expr::Var(acc)));
                        }
                    });
                },
                |_| {},
            );
            let pos_l = Expr::Var(total).cmp(CmpOp::Gt, Expr::f32(0.0));
            let inv = b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(total), Expr::f32(0.0)));
            let ob = b.let_("ob", mul(row, Expr::idx(dv)));
            for &(o, w, acc) in &accs {
                b.store(out, add(Expr::Var(ob), Expr::idx(o)), Expr::Var(acc) * widen(Expr::Var(inv), w));
            }
        });
    };
    match a.split_when() {
        Some(cond) => b.if_(cond, combine, |b| a.rows_loop_any(b, out)),
        None => a.rows_loop_any(b, out),
    }
}

/// Where an item's rows put their results.
#[derive(Clone)]
enum Sink {
    /// Normalized, in the output (`[rows, dv]`), which also holds each
    /// row's scores of a chunk while the row runs.
    Out(BufId),
    /// Unnormalized with the maximum and the sum, per row and segment, in
    /// a partials buffer (see [`decode_partials`]) whose entries also hold
    /// the segment's scores of a chunk; `nseg` segments per row.
    Partials { buf: BufId, nseg: Expr },
}

/// An attention kernel's operands and what its loops derive from them.
struct Attn<'a> {
    s: &'a AttnSpec,
    batch: Expr,
    sq: Expr,
    skv: Expr,
    kv_stride: Expr,
    q: BufId,
    k: BufId,
    v: BufId,
    mask: Option<&'a AttnMask>,
    mbuf: Option<BufId>,
    /// Mask strides along [batch, hq, sq, skv]; None where it broadcasts.
    mstrides: Vec<Option<Expr>>,
    lanes: u8,
    pieces: Vec<(usize, u8)>,
}

impl<'a> Attn<'a> {
    /// Declares `q, k, v[, mask]`.
    fn declare(
        b: &mut Builder,
        s: &'a AttnSpec,
        batch: Expr,
        sq: Expr,
        skv: Expr,
        kv_stride: Expr,
        mask: Option<&'a AttnMask>,
    ) -> Attn<'a> {
        let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
        let rows = mul(mul(batch.clone(), Expr::idx(hq)), sq.clone());
        let kv_rows = mul(mul(batch.clone(), Expr::idx(hkv)), kv_stride.clone());
        let q = b.input("q", mul(rows, Expr::idx(d)));
        let k = b.input("k", mul(kv_rows.clone(), Expr::idx(d)));
        let v = b.input("v", mul(kv_rows, Expr::idx(dv)));
        let mbuf = mask.map(|m| b.buffer("mask", m.elem, sym::product(&m.dims), Space::Global, Access::Read));
        let mstrides: Vec<Option<Expr>> = match mask {
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
        let lanes = if s.lanes.is_power_of_two() && s.lanes >= LANES { s.lanes } else { LANES };
        let pieces = chunks(dv, lanes);
        Attn { s, batch, sq, skv, kv_stride, q, k, v, mask, mbuf, mstrides, lanes, pieces }
    }

    /// Query rows: `batch * hq * sq`.
    fn rows(&self) -> Expr {
        mul(mul(self.batch.clone(), Expr::idx(self.s.hq)), self.sq.clone())
    }

    /// Query heads per item (see `heads_per_item`).
    fn per(&self) -> usize {
        heads_per_item(self.s.hq / self.s.hkv, self.pieces.len(), self.lanes)
    }

    /// When a call is split over keys: one position and at least
    /// [`SPLIT_KEYS`] visible keys; None when never (a constant position
    /// count other than 1).
    fn split_when(&self) -> Option<Expr> {
        let mut visible = self.skv.clone();
        if let Some(w) = self.s.window {
            visible = min(visible, Expr::i64(w));
        }
        let many = visible.cmp(CmpOp::Ge, Expr::idx(SPLIT_KEYS));
        match as_const(&self.sq) {
            Some(1) => Some(many),
            Some(_) => None,
            None => Some(Expr::select(self.sq.clone().cmp(CmpOp::Eq, Expr::i64(1)), many, Expr::Bool(false))),
        }
    }

    /// Key segments per row of a one-position call: one per
    /// [`SEGMENT_KEYS`] keys it can see, 1 to [`MAX_SEGMENTS`].
    fn segments(&self) -> Expr {
        let mut visible = self.skv.clone();
        if let Some(w) = self.s.window {
            visible = min(visible, Expr::i64(w));
        }
        max(min(sym::ceil_div(visible, SEGMENT_KEYS), Expr::idx(MAX_SEGMENTS)), Expr::i64(1))
    }

    /// The rows loop of the whole attention into `out`: heads in groups
    /// where there are several positions, one at a time for a single one.
    fn rows_loop_any(&self, b: &mut Builder, out: BufId) {
        // A single query position (decode) has too few items for the team
        // when heads go in groups (3 items of 3 heads each for smollm2
        // split 2:1 between 2 threads); its keys are few, and so are its
        // loads. [`decode_partials`] splits its keys instead.
        let per = self.per();
        match as_const(&self.sq) {
            _ if per == 1 => self.rows_loop(b, 1, Sink::Out(out)),
            Some(1) => self.rows_loop(b, 1, Sink::Out(out)),
            Some(_) => self.rows_loop(b, per, Sink::Out(out)),
            None => b.if_(
                self.sq.clone().cmp(CmpOp::Eq, Expr::i64(1)),
                |b| self.rows_loop(b, 1, Sink::Out(out)),
                |b| self.rows_loop(b, per, Sink::Out(out)),
            ),
        }
    }

    /// The parallel loop over items of `per` query heads that share a
    /// key/value head (each key and value vector loaded serves all of
    /// them), at one position, and with [`Sink::Partials`] one segment of
    /// its keys.
    fn rows_loop(&self, b: &mut Builder, per: usize, sink: Sink) {
        let Attn { s, batch, sq, skv, kv_stride, q, k, v, mask, mbuf, mstrides, lanes, .. } = self;
        let (q, k, v, mbuf, lanes) = (*q, *k, *v, *mbuf, *lanes);
        let pieces = &self.pieces;
        let (hq, hkv, d, dv) = (s.hq, s.hkv, s.d, s.dv);
        let group = hq / hkv;
        let (sbuf, nseg, stride) = match &sink {
            Sink::Out(out) => (*out, Expr::i64(1), dv),
            Sink::Partials { buf, nseg } => (*buf, nseg.clone(), dv + 2),
        };
        let subgroups = group / per;
        let items = mul(mul(mul(mul(batch.clone(), Expr::idx(hkv)), Expr::idx(subgroups)), sq.clone()), nseg.clone());
        b.for_("item", Expr::idx(0), items, 1, LoopKind::Parallel, |b, item| {
            // Segments of one row are neighbours, so a thread's run of
            // items reads neighbouring keys.
            let (seg, item) = match &sink {
                Sink::Out(_) => (Expr::i64(0), item),
                Sink::Partials { .. } => (
                    Expr::Var(b.let_("seg", sym::rem(item.clone(), nseg.clone()))),
                    Expr::Var(b.let_("rest", sym::div(item, nseg.clone()))),
                ),
            };
            // Query positions alternate from both ends (`0, sq - 1, 1,
            // sq - 2, ...`): under a causal mask a position's work grows with
            // it, and the team splits the items into contiguous runs, which
            // this way hold as much work each.
            let u = b.let_("u", sym::rem(item.clone(), sq.clone()));
            let half = sym::div(Expr::Var(u), Expr::idx(2));
            let odd = sym::rem(Expr::Var(u), Expr::idx(2)).cmp(CmpOp::Eq, Expr::i64(1));
            let i = b.let_("i", Expr::select(odd, sub(sub(sq.clone(), Expr::i64(1)), half.clone()), half));
            let t = b.let_("t", sym::div(item.clone(), sq.clone()));
            let sg = b.let_("sg", sym::rem(Expr::Var(t), Expr::idx(subgroups)));
            let bkh = b.let_("bkh", sym::div(Expr::Var(t), Expr::idx(subgroups)));
            let bi = b.let_("bi", sym::div(Expr::Var(bkh), Expr::idx(hkv)));
            let kh = sym::rem(Expr::Var(bkh), Expr::idx(hkv));
            let kvb = b.let_("kvb", mul(Expr::Var(bkh), kv_stride.clone()));
            let pos = b.let_("pos", add(sub(skv.clone(), sq.clone()), Expr::Var(i)));
            let mut hi = skv.clone();
            if s.causal {
                hi = min(hi, add(Expr::Var(pos), Expr::idx(1)));
            }
            let mut lo = Expr::i64(0);
            if let Some(w) = s.window {
                lo = max(lo, add(sub(Expr::Var(pos), Expr::i64(w)), Expr::idx(1)));
            }
            if let Sink::Partials { .. } = &sink {
                // Segment `seg` of `nseg` equal runs of the visible keys.
                let lo0 = b.let_("lo0", lo);
                let visible = max(sub(hi.clone(), Expr::Var(lo0)), Expr::i64(0));
                let len = sym::div(sub(add(visible, nseg.clone()), Expr::i64(1)), nseg.clone());
                let len = b.let_("seglen", len);
                let from = b.let_("from", add(Expr::Var(lo0), mul(seg.clone(), Expr::Var(len))));
                hi = min(hi, add(Expr::Var(from), Expr::Var(len)));
                lo = Expr::Var(from);
            }
            // The item's query rows: heads `kh * group + sg * per + r`.
            let first = b.let_("h0", add(mul(kh, Expr::idx(group)), mul(Expr::Var(sg), Expr::idx(per))));
            let members: Vec<Member> = (0..per)
                .map(|r| {
                    let h = b.let_("h", add(Expr::Var(first), Expr::idx(r)));
                    let row = b.let_(
                        "row",
                        add(mul(add(mul(Expr::Var(bi), Expr::idx(hq)), Expr::Var(h)), sq.clone()), Expr::Var(i)),
                    );
                    let qb = b.let_("qb", mul(Expr::Var(row), Expr::idx(d)));
                    // Where the row's scores and results go.
                    let slot = match &sink {
                        Sink::Out(_) => Expr::Var(row),
                        Sink::Partials { .. } => add(mul(Expr::Var(row), Expr::idx(MAX_SEGMENTS)), seg.clone()),
                    };
                    let sb = b.let_("sb", mul(slot, Expr::idx(stride)));
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
                    // The output accumulators: one set, or for a lone row two
                    // (even and odd keys, so that two chains of FMAs overlap
                    // their latencies) when a set is at most 4 vectors.
                    let nsets = if per == 1 && pieces.len() <= 4 { 2 } else { 1 };
                    let sets = (0..nsets)
                        .map(|_| pieces.iter().map(|&(o, w)| (o, w, b.let_("o", c(0.0, w)))).collect())
                        .collect();
                    Member { qb, sb, moff, m, lsum, sets }
                })
                .collect();
            let nsets = members[0].sets.len();
            // Applies the mask, if any, to score `sc` of `mb`'s row for key
            // `j`: -inf where a bool mask drops the key, plus a float mask.
            let apply_mask = |b: &mut Builder, mb: &Member, j: &Expr, sc: Var| {
                if let (Some(mbuf), Some(mo), Some(me)) = (mbuf, mb.moff, mask.map(|m| m.elem)) {
                    let at = match &mstrides[3] {
                        Some(st) => add(Expr::Var(mo), mul(j.clone(), st.clone())),
                        None => Expr::Var(mo),
                    };
                    let mv = Expr::load(mbuf, at, 1);
                    let masked = if me == Scalar::Bool {
                        Expr::select(mv, Expr::Var(sc), Expr::f32(f32::NEG_INFINITY))
                    } else {
                        Expr::Var(sc) + mv
                    };
                    b.assign(sc, masked);
                }
            };
            // The masked, scaled score of `mb`'s row for the key at `kb`
            // (-inf where it is dropped).
            let score_of = |b: &mut Builder, mb: &Member, kb: Var, j: &Expr| -> Var {
                // q . k with two vector accumulators over the full-width
                // pieces of the static d; a narrower piece is reduced on its own.
                let parts = chunks(d, lanes);
                let nvec = parts.iter().filter(|p| p.1 == lanes).count();
                let vaccs: Vec<Var> = (0..nvec.min(2)).map(|_| b.let_("dv", c(0.0, lanes))).collect();
                let mut dot = Expr::f32(0.0);
                let mut vi = 0;
                for (o, w) in parts {
                    let qa = Expr::load(q, add(Expr::Var(mb.qb), Expr::idx(o)), w);
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
                let vsum = vaccs
                    .iter()
                    .skip(1)
                    .fold(vaccs.first().map(|a| Expr::Var(*a)), |s, a| s.map(|s| s + Expr::Var(*a)));
                let mut score = match vsum {
                    Some(vs) => vs.hreduce(RedOp::Add) + dot,
                    None => dot,
                };
                score = score * Expr::f32(s.scale);
                if let Some(cap) = s.softcap {
                    score = Expr::f32(cap) * (score / Expr::f32(cap)).tanh();
                }
                let sc = b.let_("sc", score);
                apply_mask(b, mb, j, sc);
                sc
            };
            // Where key `j`'s key vector starts.
            let key_at = |b: &mut Builder, j: &Expr| b.let_("kb", mul(add(Expr::Var(kvb), j.clone()), Expr::idx(d)));
            let (vl, chunk) = score_chunk(dv, lanes);
            // Adds key `j`, of weight `out[sb + t]` in each row (already
            // relative to the row's `m`), into accumulator set `set`: each
            // value vector is loaded once for all the rows.
            let accumulate = |b: &mut Builder, j: &Expr, t: &Expr, set: usize| {
                let vb = b.let_("vb", mul(add(Expr::Var(kvb), j.clone()), Expr::idx(dv)));
                // The key vector one chunk ahead (the next chunk's, or the
                // next segment's for the thread's next item), so that the
                // key stream keeps loading while the values are summed: at
                // 1024 keys (smollm2-135m decode) 20% less time per layer.
                let kb_next = b.let_("kbn", mul(add(Expr::Var(kvb), add(j.clone(), Expr::idx(chunk))), Expr::idx(d)));
                for line in (0..d).step_by(16) {
                    b.prefetch(k, add(Expr::Var(kb_next), Expr::idx(line)));
                }
                let ps: Vec<Var> = members
                    .iter()
                    .map(|mb| b.let_("p", Expr::load(sbuf, add(Expr::Var(mb.sb), t.clone()), 1)))
                    .collect();
                for (pi, &(o, w)) in pieces.iter().enumerate() {
                    let vv = b.let_("vv", Expr::load(v, add(Expr::Var(vb), Expr::idx(o)), w));
                    for (mb, p) in members.iter().zip(&ps) {
                        let a = mb.sets[set][pi].2;
                        b.assign(a, widen(Expr::Var(*p), w).fma(Expr::Var(vv), Expr::Var(a)));
                    }
                }
            };
            // Keys go in chunks of `chunk`. A chunk's scores are computed
            // first, blocks of `key_block` at a time (independent dot products,
            // whose latencies overlap), and stored in each row's own output,
            // which nothing reads until the row's result is stored over it at
            // the end. Then the chunk's maximum, its exponentials and their sum
            // are taken with vectors over keys, and the running state is
            // rescaled once per chunk. Dropped keys score -inf, so `exp` makes
            // them 0; a row whose chunk has no live key keeps its state (its
            // weights are zeros).
            let key_block = (key_block(lanes) / per).max(1);
            let nkeys = b.let_("nkeys", max(sub(hi.clone(), lo.clone()), Expr::i64(0)));
            let nch = sym::ceil_div(Expr::Var(nkeys), chunk);
            b.for_("ch", Expr::idx(0), nch, 1, LoopKind::Serial, |b, ch| {
                let j0 = b.let_("j0", add(lo.clone(), mul(ch, Expr::idx(chunk))));
                let n = b.let_("n", min(Expr::idx(chunk), sub(hi.clone(), Expr::Var(j0))));
                let at = |mb: &Member, t: Expr| add(Expr::Var(mb.sb), t);
                let score_keys = |b: &mut Builder, ts: &[Expr]| {
                    let js: Vec<Expr> = ts.iter().map(|t| add(Expr::Var(j0), t.clone())).collect();
                    let kbs: Vec<Var> = js.iter().map(|j| key_at(b, j)).collect();
                    let mut scores = vec![];
                    for mb in &members {
                        for (j, kb) in js.iter().zip(&kbs) {
                            scores.push(score_of(b, mb, *kb, j));
                        }
                    }
                    let mut it = scores.into_iter();
                    for mb in &members {
                        for t in ts {
                            b.store(sbuf, at(mb, t.clone()), Expr::Var(it.next().expect("a score per row and key")));
                        }
                    }
                };
                // The scores of the `lanes` keys from `t0` in each row, as
                // one vector: a vector of products per key, and their lane
                // sums all at once (`Expr::HSums`), where summing each key's
                // alone took a tree of shuffles per key.
                let score_vector = |b: &mut Builder, t0: Var| {
                    let l = lanes as usize;
                    // One address for the vector's first key and constant
                    // offsets for the others (which the lowering folds into
                    // each load), rather than an address per key: those
                    // were computed one by one and spilled.
                    let kb0 = key_at(b, &add(Expr::Var(j0), Expr::Var(t0)));
                    for mb in &members {
                        // The row's query, loaded once for the vector's keys.
                        let qs: Vec<Var> = (0..d)
                            .step_by(l)
                            .map(|o| b.let_("qv", Expr::load(q, add(Expr::Var(mb.qb), Expr::idx(o)), lanes)))
                            .collect();
                        let dots: Vec<Expr> = (0..l)
                            .map(|t| {
                                let mut dot: Option<Expr> = None;
                                for (qa, o) in qs.iter().zip((0..d).step_by(l)) {
                                    let ka = Expr::load(k, add(Expr::Var(kb0), Expr::idx(t * d + o)), lanes);
                                    dot = Some(match dot {
                                        None => Expr::Var(*qa) * ka,
                                        Some(acc) => Expr::Var(*qa).fma(ka, acc),
                                    });
                                }
                                Expr::Var(b.let_("dot", dot.expect("d is at least one vector")))
                            })
                            .collect();
                        let mut score = Expr::HSums(dots) * c(s.scale, lanes);
                        if let Some(cap) = s.softcap {
                            score = c(cap, lanes) * (score / c(cap, lanes)).tanh();
                        }
                        b.store(sbuf, at(mb, Expr::Var(t0)), score);
                        // The mask key by key. A bool mask stores only the
                        // keys it drops: rewriting every score one by one
                        // made the next vector load of them wait for the
                        // stores (no store forwarding from many stores).
                        let bool_mask = mask.is_some_and(|m| m.elem == Scalar::Bool);
                        for t in (0..l).filter(|_| mask.is_some()) {
                            let tt = add(Expr::Var(t0), Expr::idx(t));
                            let j = add(Expr::Var(j0), tt.clone());
                            if let (true, Some(mbuf), Some(mo)) = (bool_mask, mbuf, mb.moff) {
                                let mat = match &mstrides[3] {
                                    Some(st) => add(Expr::Var(mo), mul(j, st.clone())),
                                    None => Expr::Var(mo),
                                };
                                let kept = Expr::load(mbuf, mat, 1);
                                let dropped =
                                    |b: &mut Builder| b.store(sbuf, at(mb, tt.clone()), Expr::f32(f32::NEG_INFINITY));
                                b.if_(kept, |_| {}, dropped);
                            } else {
                                let sc = b.let_("sc", Expr::load(sbuf, at(mb, tt.clone()), 1));
                                apply_mask(b, mb, &j, sc);
                                b.store(sbuf, at(mb, tt), Expr::Var(sc));
                            }
                        }
                    }
                };
                // Vectors of keys where the head dim is whole vectors
                // (with 8 lanes or more: the LLVM lowerings), else blocks of
                // `key_block` keys scored one by one.
                let by_vectors = lanes >= 8 && d % lanes as usize == 0 && vl == lanes;
                let per_block = if by_vectors { lanes as usize } else { key_block };
                let blocks = b.let_("nblk", sym::div(Expr::Var(n), Expr::idx(per_block)));
                b.for_("jb", Expr::idx(0), Expr::Var(blocks), 1, LoopKind::Serial, |b, jb| {
                    let t0 = b.let_("t0", mul(jb, Expr::idx(per_block)));
                    if by_vectors {
                        score_vector(b, t0);
                    } else {
                        let ts: Vec<Expr> = (0..key_block).map(|t| add(Expr::Var(t0), Expr::idx(t))).collect();
                        score_keys(b, &ts);
                    }
                });
                let tail = mul(Expr::Var(blocks), Expr::idx(per_block));
                b.for_("t", tail, Expr::Var(n), 1, LoopKind::Serial, |b, t| score_keys(b, &[t]));
                // Whole vectors: the last one padded with dropped keys.
                let nv = b.let_("nv", sym::ceil_div(Expr::Var(n), vl as usize));
                b.for_("t", Expr::Var(n), mul(Expr::Var(nv), Expr::idx(vl as usize)), 1, LoopKind::Serial, |b, t| {
                    for mb in &members {
                        b.store(sbuf, at(mb, t.clone()), Expr::f32(f32::NEG_INFINITY));
                    }
                });
                for mb in &members {
                    let vmax = b.let_("vmax", c(f32::NEG_INFINITY, vl));
                    b.for_("v", Expr::idx(0), Expr::Var(nv), 1, LoopKind::Serial, |b, vi| {
                        let sv = Expr::load(sbuf, at(mb, mul(vi, Expr::idx(vl as usize))), vl);
                        b.assign(vmax, Expr::Var(vmax).max(sv));
                    });
                    let top = if vl > 1 { Expr::Var(vmax).hreduce(RedOp::Max) } else { Expr::Var(vmax) };
                    let mn = b.let_("mn", Expr::Var(mb.m).max(top));
                    let (m, lsum) = (mb.m, mb.lsum);
                    b.if_(
                        Expr::Var(mn).cmp(CmpOp::Gt, Expr::f32(f32::NEG_INFINITY)),
                        |b| {
                            let corr = b.let_("corr", (Expr::Var(m) - Expr::Var(mn)).exp());
                            b.assign(lsum, Expr::Var(lsum) * Expr::Var(corr));
                            for (_, w, a) in mb.sets.iter().flatten() {
                                b.assign(*a, Expr::Var(*a) * widen(Expr::Var(corr), *w));
                            }
                            b.assign(m, Expr::Var(mn));
                            let vsum = b.let_("vsum", c(0.0, vl));
                            b.for_("v", Expr::idx(0), Expr::Var(nv), 1, LoopKind::Serial, |b, vi| {
                                let o = b.let_("o", at(mb, mul(vi, Expr::idx(vl as usize))));
                                let p =
                                    b.let_("p", (Expr::load(sbuf, Expr::Var(o), vl) - widen(Expr::Var(m), vl)).exp());
                                b.store(sbuf, Expr::Var(o), Expr::Var(p));
                                b.assign(vsum, Expr::Var(vsum) + Expr::Var(p));
                            });
                            let total = if vl > 1 { Expr::Var(vsum).hreduce(RedOp::Add) } else { Expr::Var(vsum) };
                            b.assign(lsum, Expr::Var(lsum) + total);
                        },
                        |b| {
                            // No live key in this row's chunk: zero weights.
                            b.for_("v", Expr::idx(0), Expr::Var(nv), 1, LoopKind::Serial, |b, vi| {
                                b.store(sbuf, at(mb, mul(vi, Expr::idx(vl as usize))), c(0.0, vl));
                            });
                        },
                    );
                }
                // Key `t` goes to set `t % nsets`: whole rounds, then the rest.
                let rounds = b.let_("nr", sym::div(Expr::Var(n), Expr::idx(nsets)));
                b.for_("r", Expr::idx(0), Expr::Var(rounds), 1, LoopKind::Serial, |b, r| {
                    for set in 0..nsets {
                        let t = b.let_("t", add(mul(r.clone(), Expr::idx(nsets)), Expr::idx(set)));
                        accumulate(b, &add(Expr::Var(j0), Expr::Var(t)), &Expr::Var(t), set);
                    }
                });
                let done = mul(Expr::Var(rounds), Expr::idx(nsets));
                b.for_("t", done, Expr::Var(n), 1, LoopKind::Serial, |b, t| {
                    accumulate(b, &add(Expr::Var(j0), t.clone()), &t, 0);
                });
            });
            for mb in &members {
                let sums = mb.sets[0].iter().enumerate().map(|(i, (o, w, a))| {
                    (*o, *w, mb.sets[1..].iter().fold(Expr::Var(*a), |s, set| s + Expr::Var(set[i].2)))
                });
                match &sink {
                    Sink::Out(out) => {
                        let pos_l = Expr::Var(mb.lsum).cmp(CmpOp::Gt, Expr::f32(0.0));
                        let inv =
                            b.let_("inv", Expr::select(pos_l, Expr::f32(1.0) / Expr::Var(mb.lsum), Expr::f32(0.0)));
                        for (o, w, sum) in sums {
                            b.store(*out, add(Expr::Var(mb.sb), Expr::idx(o)), sum * widen(Expr::Var(inv), w));
                        }
                    }
                    Sink::Partials { buf, .. } => {
                        for (o, _, sum) in sums {
                            b.store(*buf, add(Expr::Var(mb.sb), Expr::idx(o)), sum);
                        }
                        b.store(*buf, add(Expr::Var(mb.sb), Expr::idx(dv)), Expr::Var(mb.m));
                        b.store(*buf, add(Expr::Var(mb.sb), Expr::idx(dv + 1)), Expr::Var(mb.lsum));
                    }
                }
            }
        });
    }
}

/// One query row of an attention item: where its query and output rows
/// start, its mask offset, and its running softmax state.
struct Member {
    qb: Var,
    sb: Var,
    moff: Option<Var>,
    m: Var,
    lsum: Var,
    /// Accumulator sets, each a vector per piece of the value dim:
    /// `(offset, width, accumulator)`.
    sets: Vec<Vec<(usize, u8, Var)>>,
}

/// How many of a group of `group` query heads sharing a key/value head one
/// parallel item takes: the largest divisor of `group` whose value
/// accumulators (`pieces` vectors per row) fit half the vector registers
/// (16 of AVX-512's 32; 8 of the 16 XMM or YMM ones), at most 4. In
/// 128-key prefill attention, each key's vectors are otherwise read from
/// L2 once per head, which bounds the kernel (L2 gives a core about 64
/// bytes a cycle; a 64-wide key and value are 512 bytes).
fn heads_per_item(group: usize, pieces: usize, lanes: u8) -> usize {
    let budget = if lanes >= 16 { 16 } else { 8 };
    let most = (budget / pieces.max(1)).clamp(1, 4);
    (1..=most.min(group)).rev().find(|r| group.is_multiple_of(*r)).unwrap_or(1)
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

    /// Query heads in groups (4 heads per key/value head: items of 4, 2 or
    /// 1 heads by vector width and head dim), one position and several,
    /// with an additive mask that differs per head: even heads drop the
    /// first 70 keys (whole chunks dropped for some rows of an item and not
    /// others), odd heads a scattering of keys.
    #[test]
    fn grouped_heads_with_per_head_masks() {
        let (hq, hkv, skv) = (8, 2, 150);
        for sq in [1, 5] {
            for d in [64, 32] {
                for lanes in [4, 8, 16] {
                    let pieces = chunks(d, lanes).len();
                    let scale = 1.0 / (d as f32).sqrt();
                    let spec = AttnSpec { hq, hkv, d, dv: d, scale, causal: true, window: None, softcap: None, lanes };
                    let dims = vec![Expr::idx(1), Expr::idx(hq), Expr::idx(sq), Expr::idx(skv)];
                    let mut b = Builder::new("attention");
                    let n = |x: usize| Expr::idx(x);
                    let mask = AttnMask { elem: Scalar::F32, dims };
                    attention(&mut b, &spec, n(1), n(sq), n(skv), n(skv), Some(&mask));
                    let k = b.finish().unwrap();
                    let q = rand(hq * sq * d, 13);
                    let kk: Vec<f32> = rand(hkv * skv * d, 14).into_iter().map(|x| x * 3.0).collect();
                    let v = rand(hkv * skv * d, 15);
                    let drops = rand(hq * sq * skv, 16);
                    let m: Vec<f32> = (0..hq * sq * skv)
                        .map(|e| {
                            let (h, j) = (e / (sq * skv), e % skv);
                            let dropped = if h % 2 == 0 { j < 70 } else { drops[e] > 0.5 };
                            if dropped {
                                f32::NEG_INFINITY
                            } else {
                                drops[e] * 0.1
                            }
                        })
                        .collect();
                    let op = Op::Attention { scale: scale as f64, causal: true, window: None, softcap: None };
                    let want = reference(
                        &op,
                        &[
                            (&q, vec![1, hq, sq, d]),
                            (&kk, vec![1, hkv, skv, d]),
                            (&v, vec![1, hkv, skv, d]),
                            (&m, vec![1, hq, sq, skv]),
                        ],
                    );
                    let per = if sq == 1 { 1 } else { heads_per_item(hq / hkv, pieces, lanes) };
                    for threads in [1, 3] {
                        let got = run_kir(&k, &[&q, &kk, &v, &m], threads);
                        let what = format!("sq {sq}, d {d}, lanes {lanes} ({per} heads per item), {threads} threads");
                        assert_close(&what, &got, &want, 1e-4, 1e-5);
                    }
                }
            }
        }
        // The items the widths above give: AVX-512 takes the whole group.
        assert_eq!([heads_per_item(4, 4, 16), heads_per_item(4, 4, 8), heads_per_item(4, 16, 4)], [4, 2, 1]);
        assert_eq!([heads_per_item(3, 4, 16), heads_per_item(8, 4, 16), heads_per_item(7, 4, 16)], [3, 4, 1]);
    }
    /// Split decode attention (partials, then the combine) against the
    /// reference: 16 and 10 segments (1000 keys, 600 of 700 in a window),
    /// a mask that drops whole segments of some heads and every key of one;
    /// and the combine's own whole attention, with several positions or
    /// too few visible keys (150, 5, 300 of 1000 in a window) to split.
    #[test]
    fn split_decode_matches_the_reference() {
        let (hq, hkv, d) = (8, 2, 32);
        let cases =
            [(1, 150, None), (1, 1000, None), (1, 700, Some(600)), (1, 1000, Some(300)), (4, 600, None), (1, 5, None)];
        for (sq, skv, window) in cases {
            for lanes in [4, 16] {
                let scale = 1.0 / (d as f32).sqrt();
                let spec = AttnSpec { hq, hkv, d, dv: d, scale, causal: true, window, softcap: None, lanes };
                let dims = vec![Expr::idx(1), Expr::idx(hq), Expr::idx(sq), Expr::idx(skv)];
                let mask = AttnMask { elem: Scalar::F32, dims };
                let n = |x: usize| Expr::idx(x);
                let mut b = Builder::new("partials");
                decode_partials(&mut b, &spec, n(1), n(sq), n(skv), n(skv + 7), Some(&mask));
                let kp = b.finish().unwrap();
                let mut b = Builder::new("combine");
                decode_combine(&mut b, &spec, n(1), n(sq), n(skv), n(skv + 7), Some(&mask));
                let kc = b.finish().unwrap();
                let q = rand(hq * sq * d, 23);
                // Keys and values with room for 7 more positions per head.
                let kk: Vec<f32> = rand(hkv * (skv + 7) * d, 24).into_iter().map(|x| x * 3.0).collect();
                let v = rand(hkv * (skv + 7) * d, 25);
                let drops = rand(hq * sq * skv, 26);
                let m: Vec<f32> = (0..hq * sq * skv)
                    .map(|e| {
                        let (h, j) = (e / (sq * skv), e % skv);
                        let dropped = match h {
                            0 => j < skv * 3 / 4,
                            3 => true,
                            _ => drops[e] > 0.6,
                        };
                        if dropped {
                            f32::NEG_INFINITY
                        } else {
                            drops[e] * 0.1
                        }
                    })
                    .collect();
                // The reference reads the first `skv` positions of each head.
                let logical = |x: &[f32]| -> Vec<f32> {
                    x.chunks((skv + 7) * d).flat_map(|blk| blk[..skv * d].to_vec()).collect()
                };
                let (k_ref, v_ref) = (logical(&kk), logical(&v));
                let op = Op::Attention { scale: scale as f64, causal: true, window, softcap: None };
                let want = reference(
                    &op,
                    &[
                        (&q, vec![1, hq, sq, d]),
                        (&k_ref, vec![1, hkv, skv, d]),
                        (&v_ref, vec![1, hkv, skv, d]),
                        (&m, vec![1, hq, sq, skv]),
                    ],
                );
                for threads in [1, 3] {
                    let parts = run_kir(&kp, &[&q, &kk, &v, &m], threads);
                    assert_eq!(parts.len(), partials_len(&spec));
                    let got = run_kir(&kc, &[&q, &kk, &v, &m, &parts], threads);
                    let what = format!("sq {sq}, skv {skv}, window {window:?}, lanes {lanes}, {threads} threads");
                    assert_close(&what, &got, &want, 1e-4, 1e-5);
                    assert!(got[3 * sq * d..4 * sq * d].iter().all(|&x| x == 0.0), "{what}: head 3 sees no key");
                }
            }
        }
    }
}
