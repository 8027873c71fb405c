//! Weight-stationary matrix products over pre-packed weight panels: the
//! kernels for `a · Wᵀ` and the gated MLP when `W` is a compile-time
//! constant, so its layout is ours to choose.
//!
//! **Layout** ([`Packing::Panels`]): the weight `W[n, k]` is cut into panels
//! of `nr` output columns; panel `p` holds, for each `kk` in `0..k`, the `nr`
//! values `W[p * nr + j, kk]` contiguously (`j` fastest). The last panel is
//! padded with zero columns, so every panel is whole and a step of the inner
//! loop loads `nr / 4` full vectors. Reading a panel is one sequential
//! stream, which suits hardware prefetchers, and every weight byte is read
//! once per row block. 16-bit weights (bf16, f16) take
//! [`Packing::PairedPanels`] where a panel holds whole pairs of vectors:
//! each step's columns interleaved two vectors at a time, so that one
//! 32-bit load feeds a lane of both (a shift and a mask take it apart).
//!
//! **Kernel**: with more than one row, the top-level `Parallel` loop runs
//! over `panels x row blocks`, row blocks fastest, so a thread's contiguous
//! chunk covers whole panels and a panel stays in L1/L2 while the row blocks
//! of `a` stream past it. With one row (decode, which reads every weight
//! byte once and is bound by memory), the panels are dealt into `streams`
//! runs (panel `q + s * groups` is group `q`'s panel in stream `s`) and the
//! threads split the groups, so each thread reads `streams` sequential
//! streams at once: one core kept more misses in flight that way (on
//! smollm2's decode here, 4 streams were about 15% faster than 1 with f32
//! weights and 20% with bf16 ones, BENCHMARKS.md; since bf16 panels hold
//! pairs of vectors and take two steps at a time, 2 streams are faster
//! for them, see [`PanelParams::for_weights`]).
//!
//! One iteration computes an `mr x nr` register tile: each step of `k`
//! loads `nr / 4` weight vectors and broadcasts one value of `a` per row
//! into `mr * nr / 4` vector accumulators (6 x 8: 12 accumulators, 2 weight
//! vectors, a broadcast and a product use all 16 XMM registers). The row
//! count of a tile is chosen at run time from the rows left (`m` may be a
//! scalar parameter; `m == 1` takes the streamed loop); single-row tiles
//! (decode) keep `ksplit` sets of accumulators over all their panels
//! (`ksplit / streams` per panel, at least one) so that enough independent
//! FMA chains are in flight. The gated MLP runs the gate weight's tile first
//! and stores `act(gate)` into the output, then the up weight's tile
//! multiplies it in, so each pass has the full register budget. Sums
//! accumulate in f32 (see [`PanelParams::fma`]).
//!
//! The lowering matters as much as the tiling: loads from read-only buffers
//! are pure for Cranelift (see `cranelift::lower`), otherwise every load of
//! an iteration is emitted ahead of its arithmetic and the accumulators
//! spill; and loops over `k` keep their running indices in loop-carried
//! variables, so no per-row offset is recomputed inside them.
//!
//! Assumes `n`, `k` are known when the kernel is built (weights are
//! constants); only `m` may be symbolic.

use super::matmul_dyn::Act;
use super::sym::{self, add, as_const, ceil_div, mul, sub};
use super::{bind, c, LANES};
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, LoopKind, Pick, Scalar, Space, Var};

/// How a constant `[n, k]` weight is laid out in the buffer the kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Packing {
    /// Panels of `nr` columns (a multiple of 4), `k`-major inside a panel,
    /// the last panel zero-padded (see the module docs).
    Panels { nr: usize },
    /// The same panels with each step's `nr` values in pairs of vectors of
    /// `lanes` (`nr` a multiple of `2 * lanes`; for 16-bit weights): of
    /// each `2 * lanes` columns from `c`, column `c + i` is at `c + 2 * i`
    /// and column `c + lanes + i` at `c + 2 * i + 1`. One 32-bit word then
    /// holds lane `i` of both vectors, which a kernel reads with one load
    /// and takes apart with a shift and a mask ([`crate::kir::Pick`]).
    PairedPanels { nr: usize, lanes: usize },
}

impl Packing {
    /// Columns per panel.
    pub fn nr(&self) -> usize {
        match *self {
            Packing::Panels { nr } | Packing::PairedPanels { nr, .. } => nr,
        }
    }

    /// Where column `j` of a panel (`j < nr`) is within one step's `nr`
    /// values.
    pub fn slot(&self, j: usize) -> usize {
        match *self {
            Packing::Panels { .. } => j,
            Packing::PairedPanels { lanes, .. } => {
                let (pair, i) = (j / (2 * lanes), j % (2 * lanes));
                pair * 2 * lanes + if i < lanes { 2 * i } else { 2 * (i - lanes) + 1 }
            }
        }
    }

    /// Elements of the packed buffer for an `[n, k]` weight.
    pub fn packed_len(&self, n: usize, k: usize) -> usize {
        let nr = self.nr();
        n.div_ceil(nr) * nr * k
    }

    /// Packs a weight given as `[n, k]` row-major (the operand of a
    /// `matmul(a, transpose(w))`). `w_nk` must hold `n * k` values (the
    /// caller has the tensor's shape); a shorter slice is a caller bug.
    pub fn apply(&self, w_nk: &[f32], n: usize, k: usize) -> Vec<f32> {
        assert_eq!(w_nk.len(), n * k, "Packing::apply: weight of {} values for [{n}, {k}]", w_nk.len());
        self.pack_with(n, k, |j, kk| w_nk[j * k + kk])
    }

    /// Packs a weight given as `[k, n]` row-major (the right operand of a
    /// plain `matmul(a, w)`); the same layout as [`Packing::apply`] of its
    /// transpose.
    pub fn apply_kn(&self, w_kn: &[f32], n: usize, k: usize) -> Vec<f32> {
        assert_eq!(w_kn.len(), n * k, "Packing::apply_kn: weight of {} values for [{k}, {n}]", w_kn.len());
        self.pack_with(n, k, |j, kk| w_kn[kk * n + j])
    }

    /// [`Packing::apply`] of little-endian elements of `esize` bytes (f32,
    /// bf16, f16 alike), at memory speed on all cores: each panel is a
    /// transpose of `nr` rows of `w_nk`.
    pub fn apply_bytes(&self, w_nk: &[u8], esize: usize, n: usize, k: usize) -> Vec<u8> {
        assert_eq!(w_nk.len(), n * k * esize, "Packing::apply_bytes: {} bytes for [{n}, {k}] x {esize}", w_nk.len());
        let nr = self.nr();
        let mut out = vec![0u8; self.packed_len(n, k) * esize];
        let panel = (nr * k * esize).max(1);
        // Where each column's bytes go within a step, when not in order.
        let slots: Option<Vec<usize>> =
            matches!(self, Packing::PairedPanels { .. }).then(|| (0..nr).map(|j| self.slot(j)).collect());
        smelt_ir::stored::par_chunks_mut(&mut out, panel, |first, dst| {
            let mut step = vec![0u8; nr * esize];
            for (i, dst) in dst.chunks_mut(panel).enumerate() {
                let j0 = (first + i) * nr;
                let rows = nr.min(n - j0);
                let src = &w_nk[j0 * k * esize..(j0 + rows) * k * esize];
                smelt_ir::stored::transpose_into(src, rows, k, esize, dst, nr, 0);
                let Some(slots) = &slots else { continue };
                for row in dst.chunks_mut(nr * esize) {
                    step.copy_from_slice(row);
                    for (j, &at) in slots.iter().enumerate() {
                        row[at * esize..(at + 1) * esize].copy_from_slice(&step[j * esize..(j + 1) * esize]);
                    }
                }
            }
        });
        out
    }

    fn pack_with(&self, n: usize, k: usize, at: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let nr = self.nr();
        let mut out = vec![0.0f32; self.packed_len(n, k)];
        for (p, panel) in out.chunks_mut((nr * k).max(1)).enumerate() {
            for (kk, step) in panel.chunks_mut(nr).enumerate() {
                for jj in 0..nr {
                    let j = p * nr + jj;
                    if j < n {
                        step[self.slot(jj)] = at(j, kk);
                    }
                }
            }
        }
        out
    }
}

/// Tile sizes of [`weight_matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PanelParams {
    /// Rows of a full tile.
    pub mr: usize,
    /// Columns of a panel (a multiple of `lanes`).
    pub nr: usize,
    /// f32 lanes of a vector: 4 (128-bit, what Cranelift lowers), or 8 or
    /// 16 for LLVM on AVX2 / AVX-512 hosts.
    pub lanes: u8,
    /// Accumulator sets of single-row tiles (steps of `k` per iteration of
    /// their inner loop).
    pub ksplit: usize,
    /// Panels a single-row tile reads at once (decode): each is one
    /// sequential stream of the weight, and on the machines measured one
    /// core kept more bytes in flight with two or four streams than with
    /// one (see [`weight_matmul`]). Multi-row tiles (prefill) read one
    /// panel at a time.
    pub streams: usize,
    /// How far ahead (bytes) a single-row tile prefetches each panel it
    /// reads, with a non-temporal hint; 0: no prefetch. Multi-row tiles do
    /// not prefetch (they reuse each panel across rows). See
    /// `Gen::prefetch`.
    pub prefetch: usize,
    /// Whether multi-row tiles use `fma`. Cranelift's x86 `fma` writes its
    /// result over a multiplicand (there is no `vfmadd231` form), so every
    /// shared broadcast is copied first and every accumulator moves back to
    /// its loop register at the back edge; a separate multiply and add (on
    /// Zen 3 on separate pipes, the same peak) keeps each accumulator in
    /// place. Single-row tiles always use `fma`.
    pub fma: bool,
}

impl Default for PanelParams {
    fn default() -> Self {
        PanelParams::DEFAULT
    }
}

impl PanelParams {
    /// 6 x 8 tiles: 12 accumulators, 2 weight vectors, a broadcast and a
    /// product fill the 16 XMM registers Cranelift has on x86-64; single-row
    /// tiles read 2 panels with 2 x 2 x 2 independent FMA chains (4 panels'
    /// 8 weight vectors and 8 accumulators would not fit).
    pub const DEFAULT: PanelParams =
        PanelParams { mr: 6, nr: 8, lanes: 4, ksplit: 4, streams: 2, prefetch: 0, fma: false };

    /// 6 x 16 tiles of 8-lane vectors with `fma`: the same 12 accumulators
    /// in the 16 YMM registers of AVX2, for the LLVM lowering (the classic
    /// Haswell GEMM micro-kernel: two weight loads and six broadcasts feed
    /// twelve FMAs per step of `k`); single-row tiles read 4 panels, each
    /// with 2 FMA chains (LLVM folds the weight loads into the FMAs).
    pub const WIDE: PanelParams =
        PanelParams { mr: 6, nr: 16, lanes: 8, ksplit: 4, streams: 4, prefetch: 0, fma: true };

    /// The same tiles in 16-lane vectors for AVX-512 hosts (LLVM), whose 32
    /// ZMM registers hold them with room to spare: 6 x 32 tiles keep 12
    /// accumulators; single-row tiles read 4 panels, each step of each one
    /// two 64-byte lines of f32 weights (one of bf16, which take 2 panels
    /// of two steps: [`PanelParams::for_weights`]), with 2
    /// FMA chains per panel, and prefetch each 2 KiB ahead (on a 2-core
    /// Zen 5, smollm2-135m's decode 4.7% faster with f32 weights and 2.2%
    /// with bf16; a one-thread C stream of bf16 widening gained 12%).
    pub const WIDE_AVX512: PanelParams =
        PanelParams { mr: 6, nr: 32, lanes: 16, ksplit: 4, streams: 4, prefetch: 2048, fma: true };

    /// These parameters adjusted for weights stored as `w`: with 16-bit
    /// weights in 16-lane vectors, a step of a 32-column panel is one
    /// 64-byte line, and single-row tiles read two steps per iteration
    /// (`ksplit` 2, not 4) of two streams (not 4): one core streams two
    /// lines of each stream at a time faster than four
    /// (`bench/cpu/stream_widen.sh`: 40.9 against 36.8 GB/s on a Zen 5).
    /// smollm2-135m's bf16 decode, `smelt bench` of the artifacts
    /// interleaved: 2-3% less time with `ksplit` 2, and 2-5% less again
    /// with 2 streams (in both of the machine's memory phases); f16
    /// weights' decode 3% less with both (0.569 -> 0.550 of f32); the same
    /// changes left f32 weights (two lines a step already) within 1%.
    pub fn for_weights(self, w: Scalar) -> PanelParams {
        if w.is_narrow_float() && self.lanes >= 16 && self.nr == 2 * self.lanes as usize {
            PanelParams { ksplit: self.ksplit.min(2), streams: self.streams.min(2), ..self }
        } else {
            self
        }
    }

    /// These parameters with the stream count that suits an `n`-column
    /// product on a team of `team` threads. A decode launch lasts as long
    /// as its busiest thread, and the threads split the panel groups (see
    /// [`weight_matmul`]), so a group count the team does not divide
    /// evenly leaves a thread a group more to read: smollm2-135m's 18
    /// panels of 32 columns (576) in 2 streams are 9 groups, 5 for one
    /// thread of two and 4 for the other. Of 1 up to one more than the
    /// asked count (at most 4), this takes the one nearest the asked count
    /// (then the larger) among those whose busiest thread reads at most
    /// [`BALANCE_SLACK`] more panels than the fewest any count gives. On a
    /// 2-core Zen 5, smollm2-135m's 576- and 960-column products took 3
    /// streams (bf16: 2 before; f32: 4 asked, 2 and 3 used to keep 8
    /// groups): their threads' idle share in `SMELT_PROFILE` fell from
    /// 7-12% to 1-3%, and interleaved decode runs took 0.958 (f32) and
    /// 0.976 (bf16) of the time in the fast memory phase, 0.992 in the slow
    /// one (BENCHMARKS.md).
    pub fn balanced(self, n: usize, team: usize) -> PanelParams {
        let p = self.normalized();
        let panels = n.div_ceil(p.nr);
        let wanted = p.streams;
        let shares: Vec<(usize, usize)> =
            (1..=(wanted + 1).min(MAX_STREAMS).max(wanted)).map(|s| (s, busiest_share(panels, s, team))).collect();
        let fewest = shares.iter().map(|&(_, share)| share).min().unwrap_or(0);
        let best = shares
            .iter()
            .filter(|&&(_, share)| share as f64 <= fewest as f64 * (1.0 + BALANCE_SLACK))
            .map(|&(s, _)| s)
            .min_by_key(|&s| (s.abs_diff(wanted), usize::MAX - s))
            .unwrap_or(wanted);
        PanelParams { streams: stream_count(best, panels), ..self }
    }

    /// The layout of weights stored as `w` for these parameters (taken
    /// [`normalized`](Self::normalized)): 16-bit weights in pairs of
    /// vectors where a panel holds whole pairs, others in plain panels.
    pub fn packing(&self, w: Scalar) -> Packing {
        let lanes = self.lanes as usize;
        if w.is_narrow_float() && self.nr.is_multiple_of(2 * lanes) {
            Packing::PairedPanels { nr: self.nr, lanes }
        } else {
            Packing::Panels { nr: self.nr }
        }
    }

    /// The parameters [`weight_matmul`] actually uses: at least one row,
    /// one set and one stream, `nr` rounded down to whole vectors (at
    /// least one).
    pub fn normalized(&self) -> PanelParams {
        let lanes = if self.lanes.is_power_of_two() && self.lanes > 1 { self.lanes } else { LANES };
        let l = lanes as usize;
        PanelParams {
            mr: self.mr.max(1),
            nr: (self.nr.max(l) / l) * l,
            lanes,
            ksplit: self.ksplit.max(1),
            streams: self.streams.max(1),
            prefetch: self.prefetch,
            fma: self.fma,
        }
    }
}

/// Declares the buffers (`a [m * k]`, then one packed weight, or the gate
/// and up weights when `act` is set, then `c [m * n]`) and builds the body
/// of `c = a · Wᵀ` (or `act(a · Wgᵀ) * (a · Wuᵀ)`) into `b`. `m` may be a
/// scalar parameter of `b`. The weights are stored as `w` (`F32`, or
/// `BF16`/`F16` widened to f32 as they are loaded); everything else is f32.
pub fn weight_matmul(b: &mut Builder, m: Expr, n: usize, k: usize, act: Option<Act>, p: PanelParams, w: Scalar) {
    let p = p.normalized();
    let packing = p.packing(w);
    let wlen = Expr::idx(packing.packed_len(n, k));
    let a = b.input("a", mul(m.clone(), Expr::idx(k)));
    let mut weight = |name: &str| b.buffer(name, w, wlen.clone(), Space::Global, Access::Read);
    let ws: Vec<BufId> = if act.is_some() { vec![weight("w_gate"), weight("w_up")] } else { vec![weight("w")] };
    let out = b.output("c", mul(m.clone(), Expr::idx(n)));
    let panels = n.div_ceil(p.nr);
    let streams = stream_count(p.streams, panels);
    let groups = panels.div_ceil(streams);
    let paired = matches!(packing, Packing::PairedPanels { .. });
    let g = Gen { a, ws, out, n, k, act, p, panels, streams, groups, w_size: w.size(), paired };
    // One row (decode): the threads split the panel groups, each reading
    // its groups' panels as `streams` sequential streams at once.
    let streamed = |b: &mut Builder| {
        b.for_("q", Expr::i64(0), Expr::idx(groups), 1, LoopKind::Parallel, |b, q| {
            g.streamed_tile(b, &q);
        });
    };
    // More rows: `panels x row blocks`, row blocks fastest, so a panel
    // stays in cache while the row blocks of `a` stream past it.
    let tiled = |b: &mut Builder| {
        let mblocks = ceil_div(m.clone(), p.mr);
        let total = mul(Expr::idx(panels), mblocks.clone());
        b.for_("t", Expr::i64(0), total, 1, LoopKind::Parallel, |b, t| {
            let ib = bind(b, "ib", sym::rem(t.clone(), mblocks.clone()));
            let pj = bind(b, "pj", sym::div(t, mblocks.clone()));
            let i0 = bind(b, "i0", mul(ib, Expr::idx(p.mr)));
            let rows_left = sub(m.clone(), i0.clone());
            g.rows_from(b, &i0, &pj, &rows_left, p.mr);
        });
    };
    match as_const(&m) {
        _ if streams == 1 => tiled(b),
        Some(1) => streamed(b),
        Some(_) => tiled(b),
        None => b.if_(m.clone().cmp(CmpOp::Eq, Expr::i64(1)), streamed, tiled),
    }
}

/// The most streams [`PanelParams::balanced`] chooses (unless more are
/// asked for).
const MAX_STREAMS: usize = 4;

/// How much more than the evenest split's busiest share (as a fraction)
/// [`PanelParams::balanced`] accepts to keep the asked stream count: a
/// wide product's shares differ by a panel or two in thousands whatever
/// the count (qwen2.5-0.5b's head: 4748 panels, 2376 against 2374 for the
/// busiest thread in 4 and 2 streams), while the asked count was measured
/// 2-20% faster than the others.
const BALANCE_SLACK: f64 = 0.02;

/// How many streams `panels` panels are read in when `wanted` are asked
/// for: at most `wanted`, and every stream holds at least one panel
/// (stream `s` holds the panels `q + s * groups`, so the last stream would
/// be empty when `(streams - 1) * groups` reaches `panels`: 5 panels in 4
/// streams of 2). How many are worth asking for on a team of threads is
/// [`PanelParams::balanced`]'s question.
fn stream_count(wanted: usize, panels: usize) -> usize {
    let mut s = wanted.clamp(1, panels.max(1));
    while s > 1 && (s - 1) * panels.div_ceil(s) >= panels {
        s -= 1;
    }
    s
}

/// The most panels a thread of a team of `team` reads in a single-row
/// launch of `panels` panels in `streams` streams: the threads split the
/// panel groups into consecutive shares (the runtime's team gives thread
/// `t` the groups `t * groups / team ..`), and the last groups of a
/// stream count hold fewer panels where the streams are uneven.
fn busiest_share(panels: usize, streams: usize, team: usize) -> usize {
    let streams = stream_count(streams, panels);
    let groups = panels.div_ceil(streams);
    let in_group = |q: usize| (0..streams).filter(|s| q + s * groups < panels).count();
    let team = team.max(1);
    (0..team).map(|t| (t * groups / team..(t + 1) * groups / team).map(in_group).sum()).max().unwrap_or(0)
}

struct Gen {
    a: BufId,
    ws: Vec<BufId>,
    out: BufId,
    n: usize,
    k: usize,
    act: Option<Act>,
    p: PanelParams,
    panels: usize,
    /// Panel streams (see [`stream_count`]) and panels per stream: group
    /// `q` is the panels `q + s * groups` for `s` in `0..streams`.
    streams: usize,
    groups: usize,
    /// Bytes per weight element.
    w_size: usize,
    /// Whether the weights are in [`Packing::PairedPanels`].
    paired: bool,
}

/// What a store writes for a value `x`: `x`, `act(x)` (the gate sweep) or
/// `c * x` (the up pass).
#[derive(Clone, Copy)]
enum Epilogue {
    Plain,
    Gate(Act),
    Up,
}

impl Gen {
    /// A tile of `rows` rows when at least that many are left, else fewer.
    fn rows_from(&self, b: &mut Builder, i0: &Expr, pj: &Expr, left: &Expr, rows: usize) {
        if rows == 1 || as_const(left).is_some_and(|l| l >= rows as i64) {
            return self.panels_tile(b, i0, std::slice::from_ref(pj), rows);
        }
        if let Some(l) = as_const(left) {
            return self.rows_from(b, i0, pj, left, (l.max(1) as usize).min(rows));
        }
        let cond = left.clone().cmp(CmpOp::Ge, Expr::idx(rows));
        b.if_(
            cond,
            |b| self.panels_tile(b, i0, std::slice::from_ref(pj), rows),
            |b| self.rows_from(b, i0, pj, left, rows - 1),
        );
    }

    /// The single-row tiles of group `q`'s panels, `q + s * groups` for
    /// each stream `s` that has one (the last streams may end a group
    /// before the others), read at once where all of them exist.
    fn streamed_tile(&self, b: &mut Builder, q: &Expr) {
        let i0 = Expr::i64(0);
        let pj = |b: &mut Builder, s: usize| bind(b, "pj", add(q.clone(), Expr::idx(s * self.groups)));
        // Groups below `whole` have a panel in every stream.
        let whole = self.panels - (self.streams - 1) * self.groups;
        let all = |b: &mut Builder| {
            let pjs: Vec<Expr> = (0..self.streams).map(|s| pj(b, s)).collect();
            for pj in &pjs {
                self.prologue_prefetch(b, pj);
            }
            self.panels_tile(b, &i0, &pjs, 1)
        };
        if whole == self.groups {
            return all(b);
        }
        let each = |b: &mut Builder| {
            for s in 0..self.streams {
                let one = |b: &mut Builder| {
                    let pj = pj(b, s);
                    self.prologue_prefetch(b, &pj);
                    self.panels_tile(b, &i0, &[pj], 1)
                };
                b.if_(q.clone().cmp(CmpOp::Lt, Expr::idx(self.panels - s * self.groups)), one, |_| {});
            }
        };
        b.if_(q.clone().cmp(CmpOp::Lt, Expr::idx(whole)), all, each);
    }

    /// Prefetches the first `PanelParams::prefetch` bytes of panel `pj` of
    /// the first weight, before a single-row tile reads it: the loop over
    /// `k` prefetches that far ahead, so without these hints a thread's
    /// first lines of each stream in a launch arrive one demand miss at a
    /// time (later panels were prefetched by the previous panel's last
    /// steps, and the hints find them in flight). smollm2-135m's decode,
    /// artifacts interleaved: bf16 weights 0.5-1.1% faster (8 runs), f32
    /// unchanged (within 0.1%).
    fn prologue_prefetch(&self, b: &mut Builder, pj: &Expr) {
        let ahead = self.p.prefetch;
        let line = 64 / self.w_size;
        let start = mul(pj.clone(), Expr::idx(self.p.nr * self.k));
        for j in 0..ahead.div_ceil(64) {
            b.prefetch(self.ws[0], add(start.clone(), Expr::idx(j * line)));
        }
    }

    /// One `rows x nr` tile in each of the panels `pjs`: every weight's
    /// pass with its epilogue.
    fn panels_tile(&self, b: &mut Builder, i0: &Expr, pjs: &[Expr], rows: usize) {
        match self.act {
            None => self.pass(b, i0, pjs, rows, self.ws[0], Epilogue::Plain, None),
            Some(act) => {
                // The activation is a sweep of its own over the stored gate
                // sums, after the accumulators are dead: applied to them
                // directly, its temporaries make the register allocator
                // spill accumulators inside the loop over `k`.
                // A stream reads gate panel `p`, up panel `p`, then gate
                // panel `p + 1`: near the end of a panel its prefetches
                // go to the start of the panel read next, in the other
                // weight (at the same index less a panel for the up panel,
                // at the same index for the next gate panel).
                let panel = (self.p.nr * self.k) as i64;
                self.pass(b, i0, pjs, rows, self.ws[0], Epilogue::Plain, Some((self.ws[1], -panel)));
                for pj in pjs {
                    self.store(b, i0, pj, rows, None, Epilogue::Gate(act));
                }
                self.pass(b, i0, pjs, rows, self.ws[1], Epilogue::Up, Some((self.ws[0], 0)));
            }
        }
    }

    /// The product of rows `i0..i0 + rows` of `a` with the panels `pjs` of
    /// `w` (several only for single-row tiles), stored through `epi`.
    /// `next` is where a single-row tile's stream goes after each panel,
    /// when not on into `w`'s next panel: a buffer and the shift of its
    /// indices against `w`'s, which the prefetches take once they would
    /// pass the panel's end.
    // Row, panel, vector and set indices address several parallel tables at once.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    fn pass(
        &self,
        b: &mut Builder,
        i0: &Expr,
        pjs: &[Expr],
        rows: usize,
        w: BufId,
        epi: Epilogue,
        next: Option<(BufId, i64)>,
    ) {
        let (lanes, nr, k) = (self.p.lanes, self.p.nr, self.k);
        let l = lanes as usize;
        let nv = nr / l;
        let np = pjs.len();
        // Single-row tiles unroll `k` over `ksplit` steps, shared out over
        // accumulator sets so that every panel has as many independent FMA
        // chains as the budget of `ksplit` sets of one panel allows; wider
        // tiles have enough independent chains already and stay rolled, as
        // Cranelift elaborates pure values at the loop's back edge, chain by
        // chain, so unrolled steps would keep every broadcast live at once.
        let (split, ku) = if rows == 1 { ((self.p.ksplit / np).max(1), self.p.ksplit) } else { (1, 1) };
        // acc[set][row][panel][vector]
        let acc: Vec<Vec<Vec<Vec<Var>>>> = (0..split)
            .map(|_| {
                (0..rows)
                    .map(|_| (0..np).map(|_| (0..nv).map(|_| b.let_("acc", c(0.0, lanes))).collect()).collect())
                    .collect()
            })
            .collect();
        // Running indices into `a` (row i0) and each panel, carried by the
        // loop so that no per-row offset is recomputed in it.
        let ak = b.let_("ak", mul(i0.clone(), Expr::idx(k)));
        let wk: Vec<Var> = pjs.iter().map(|pj| b.let_("wk", mul(pj.clone(), Expr::idx(nr * k)))).collect();
        // One step of `k`, `u` steps past the running indices, into set `set`.
        let step = |b: &mut Builder, u: usize, set: usize| {
            let wv: Vec<Vec<Var>> = wk
                .iter()
                .map(|&wk| {
                    (0..nv)
                        .map(|v| {
                            let value = if self.paired {
                                // Vectors `2t` and `2t + 1` are the two
                                // halves of the words from vector `2t`'s.
                                let at = add(Expr::Var(wk), Expr::idx(u * nr + (v - v % 2) * l));
                                Expr::load_pick(w, at, lanes, if v % 2 == 0 { Pick::Even } else { Pick::Odd })
                            } else {
                                Expr::load(w, add(Expr::Var(wk), Expr::idx(u * nr + v * l)), lanes)
                            };
                            b.let_("wv", value)
                        })
                        .collect()
                })
                .collect();
            for r in 0..rows {
                let at = add(Expr::Var(ak), Expr::idx(r * k + u));
                let av = b.let_("av", Expr::load(self.a, at, 1).splat(lanes));
                for pi in 0..np {
                    for v in 0..nv {
                        let x = acc[set][r][pi][v];
                        let prod = Expr::Var(av) * Expr::Var(wv[pi][v]);
                        let sum = if self.p.fma || rows == 1 {
                            Expr::Var(av).fma(Expr::Var(wv[pi][v]), Expr::Var(x))
                        } else {
                            Expr::Var(x) + prod
                        };
                        b.assign(x, sum);
                    }
                }
            }
        };
        let advance = |b: &mut Builder, by: usize| {
            b.assign(ak, add(Expr::Var(ak), Expr::idx(by)));
            for &wk in &wk {
                b.assign(wk, add(Expr::Var(wk), Expr::idx(by * nr)));
            }
        };
        let kmain = k / ku * ku;
        // Steps from `kswitch` on prefetch into `next` (see above).
        let ahead_steps = (self.p.prefetch / self.w_size).div_ceil(nr);
        let kswitch = match next {
            Some(_) if rows == 1 && self.p.prefetch > 0 => kmain.saturating_sub(ahead_steps) / ku * ku,
            _ => kmain,
        };
        let kind = if ku > 1 { LoopKind::Unroll(ku as u32) } else { LoopKind::Serial };
        for (from, to, target) in [(0, kswitch, (w, 0)), (kswitch, kmain, next.unwrap_or((w, 0)))] {
            if from == to {
                continue;
            }
            b.for_("kk", Expr::idx(from), Expr::idx(to), ku as i64, kind, |b, _| {
                if rows == 1 {
                    for &wk in &wk {
                        self.prefetch(b, target.0, wk, target.1, ku * nr);
                    }
                }
                for u in 0..ku {
                    step(b, u, u % split);
                }
                advance(b, ku);
            });
        }
        if kmain < k {
            b.for_("kt", Expr::idx(kmain), Expr::idx(k), 1, LoopKind::Serial, |b, _| {
                step(b, 0, 0);
                advance(b, 1);
            });
        }
        for (pi, pj) in pjs.iter().enumerate() {
            let sums: Vec<Vec<Expr>> = (0..rows)
                .map(|r| {
                    (0..nv)
                        .map(|v| (1..split).fold(Expr::Var(acc[0][r][pi][v]), |s, u| s + Expr::Var(acc[u][r][pi][v])))
                        .collect()
                })
                .collect();
            self.store(b, i0, pj, rows, Some(sums), epi);
        }
    }

    /// Prefetches, for one step of `step_elems` weights of a single-row
    /// tile, the cache lines of the panel at `wk` that it reads
    /// `PanelParams::prefetch` bytes later, in `w` at indices `shift` from
    /// the panel's own (the stream's next panel; the hint may point past the
    /// panel, or the buffer, harmlessly). On the Zen 5 measured, each core
    /// kept more misses in flight with the hints than its out-of-order
    /// window alone reached; on a Zen 3, tiles reading 4 streams gained
    /// nothing from (temporal) hints, hence a tuning axis. The hint is
    /// non-temporal because a decode step reads each weight once (meant to
    /// keep the weights from evicting the activations and the KV cache;
    /// attention's time did not measurably change).
    fn prefetch(&self, b: &mut Builder, w: BufId, wk: Var, shift: i64, step_elems: usize) {
        let ahead = self.p.prefetch;
        if ahead == 0 {
            return;
        }
        let line = 64 / self.w_size;
        let lines = (step_elems * self.w_size).div_ceil(64);
        for j in 0..lines {
            let at = (ahead / self.w_size + j * line) as i64 + shift;
            b.prefetch(w, add(Expr::Var(wk), Expr::i64(at)));
        }
    }

    /// Stores a tile's sums (`sums[row][vector]`, or with `None` the tile's
    /// current values in `c`) through `epi`: whole vectors in every panel
    /// but a partial last one, whose valid columns are stored one by one.
    fn store(&self, b: &mut Builder, i0: &Expr, pj: &Expr, rows: usize, sums: Option<Vec<Vec<Expr>>>, epi: Epilogue) {
        let (lanes, nr, n) = (self.p.lanes, self.p.nr, self.n);
        let l = lanes as usize;
        let j0 = bind(b, "j0", mul(pj.clone(), Expr::idx(nr)));
        let rem = n % nr;
        // The sums are used on both sides of the partial-panel test.
        let vals: Option<Vec<Vec<Var>>> =
            sums.map(|s| s.into_iter().map(|r| r.into_iter().map(|s| b.let_("sum", s)).collect()).collect());
        let row_at = |r: usize| mul(add(i0.clone(), Expr::idx(r)), Expr::idx(n));
        let value = |r: usize, j: usize, at: &Expr, lanes: u8| match &vals {
            Some(v) if lanes == 1 => Expr::Extract(Box::new(Expr::Var(v[r][j / l])), (j % l) as u8),
            Some(v) => Expr::Var(v[r][j / l]),
            None => Expr::load(self.out, at.clone(), lanes),
        };
        let full = |b: &mut Builder| {
            for r in 0..rows {
                let base = b.let_("crow", add(row_at(r), j0.clone()));
                for v in 0..nr / l {
                    let at = add(Expr::Var(base), Expr::idx(v * l));
                    let y = self.epilogue(b, epi, value(r, v * l, &at, lanes), at.clone(), lanes);
                    b.store(self.out, at, y);
                }
            }
        };
        if rem == 0 {
            return full(b);
        }
        let partial = |b: &mut Builder| {
            for r in 0..rows {
                let base = b.let_("crow", add(row_at(r), j0.clone()));
                for j in 0..rem {
                    let at = add(Expr::Var(base), Expr::idx(j));
                    let y = self.epilogue(b, epi, value(r, j, &at, 1), at.clone(), 1);
                    b.store(self.out, at, y);
                }
            }
        };
        if self.panels == 1 {
            return partial(b);
        }
        b.if_(pj.clone().cmp(CmpOp::Lt, Expr::idx(self.panels - 1)), full, partial);
    }

    /// The value to store at `at` for the sum `x` (of width `lanes`).
    fn epilogue(&self, b: &mut Builder, epi: Epilogue, x: Expr, at: Expr, lanes: u8) -> Expr {
        match epi {
            Epilogue::Plain => x,
            Epilogue::Gate(act) => {
                let g = b.let_("g", x);
                act.apply(b, g, lanes)
            }
            Epilogue::Up => Expr::load(self.out, at, lanes) * x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kir::Stmt;

    /// 16-bit weights in 16-lane panels of 32 columns take two steps of two
    /// streams per iteration; f32 weights, other widths and smaller values
    /// keep theirs.
    #[test]
    fn sixteen_bit_weights_take_two_steps_of_two_streams() {
        let wide = PanelParams::WIDE_AVX512;
        let two = |p: PanelParams| (p.ksplit, p.streams);
        assert_eq!(two(wide.for_weights(Scalar::BF16)), (2, 2));
        assert_eq!(two(wide.for_weights(Scalar::F16)), (2, 2));
        assert_eq!(wide.for_weights(Scalar::F32), wide);
        assert_eq!(PanelParams::WIDE.for_weights(Scalar::BF16), PanelParams::WIDE);
        assert_eq!(two(PanelParams { nr: 64, ..wide }.for_weights(Scalar::BF16)), (4, 4));
        assert_eq!(two(PanelParams { ksplit: 1, streams: 1, ..wide }.for_weights(Scalar::BF16)), (1, 1));
    }

    /// The weight each prefetching loop of `stmts` prefetches from, in
    /// program order.
    fn prefetch_targets(k: &crate::kir::Kernel, stmts: &[Stmt], out: &mut Vec<String>) {
        for s in stmts {
            match s {
                // Loops over `k` (the parallel loop's own hints are the
                // first lines of each stream, before any pass).
                Stmt::For(l) => {
                    let first = l.body.iter().find(|s| matches!(s, Stmt::Prefetch { .. }));
                    if let (Some(Stmt::Prefetch { buf, .. }), false) = (first, l.kind == LoopKind::Parallel) {
                        out.push(k.buf(*buf).name.clone());
                    }
                    prefetch_targets(k, &l.body, out);
                }
                Stmt::If { then, els, .. } => {
                    prefetch_targets(k, then, out);
                    prefetch_targets(k, els, out);
                }
                _ => {}
            }
        }
    }

    /// A single-row tile prefetches the first `prefetch` bytes of each of
    /// its streams before its first loop over `k`.
    #[test]
    fn single_row_tiles_prefetch_each_streams_first_lines() {
        let p = PanelParams { prefetch: 2048, ..PanelParams::WIDE_AVX512 };
        let mut b = Builder::new("gated");
        weight_matmul(&mut b, Expr::i64(1), 1536, 576, Some(Act::Silu), p, Scalar::BF16);
        let k = b.finish().unwrap();
        let text = k.to_string();
        // 2 KiB of bf16 panels: 32 lines per stream, before the first loop
        // over `k` (of each of the tile's cases: every stream, or the ones
        // the last groups have).
        let first_loop = text.find("for kk").expect("a loop over k");
        let before = text[..first_loop].matches("prefetch w_gate").count();
        let streams = p.for_weights(Scalar::BF16).streams;
        assert!(before >= 32 * streams && before.is_multiple_of(32), "{before} prefetches: {text}");
    }

    /// A gated single-row tile reads gate panel `p`, up panel `p`, then the
    /// next gate panel: each pass's last steps prefetch the other weight.
    #[test]
    fn gated_passes_prefetch_the_panel_read_next() {
        let p = PanelParams { prefetch: 2048, ..PanelParams::WIDE_AVX512 };
        for w in [Scalar::F32, Scalar::BF16] {
            let mut b = Builder::new("gated");
            weight_matmul(&mut b, Expr::i64(1), 1536, 576, Some(Act::Silu), p, w);
            let k = b.finish().unwrap();
            let mut seen = vec![];
            prefetch_targets(&k, &k.body, &mut seen);
            assert!(!seen.is_empty() && seen.len() % 4 == 0, "{seen:?}");
            for pass in seen.chunks(4) {
                assert_eq!(pass, ["w_gate", "w_up", "w_up", "w_gate"], "{w:?}: {seen:?}");
            }
        }
    }

    #[test]
    fn no_stream_is_left_empty() {
        for (asked, panels, used) in [(4, 36, 4), (4, 8, 4), (4, 5, 3), (4, 3, 3), (2, 17, 2), (5, 40, 5), (3, 1, 1)] {
            assert_eq!(stream_count(asked, panels), used, "{asked} streams of {panels} panels");
        }
        for panels in 1..200 {
            for asked in 1..=8 {
                let s = stream_count(asked, panels);
                assert!(s >= 1 && s <= asked && (s - 1) * panels.div_ceil(s) < panels, "{asked} of {panels}: {s}");
            }
        }
    }

    #[test]
    fn busiest_thread_counts_the_panels_of_its_groups() {
        // 18 panels in 2 streams: 9 groups, split 4 and 5 between two threads.
        assert_eq!(busiest_share(18, 2, 2), 10);
        assert_eq!(busiest_share(18, 3, 2), 9);
        // 30 panels in 4 streams of 8: the last two groups hold 3 panels,
        // and the first thread has the four whole ones.
        assert_eq!(busiest_share(30, 4, 2), 16);
        // More threads than groups: one thread reads a whole group.
        assert_eq!(busiest_share(8, 4, 4), 4);
        assert_eq!(busiest_share(8, 1, 16), 1);
    }

    #[test]
    fn streams_are_chosen_for_an_even_split_between_threads() {
        let streams = |p: PanelParams, n: usize, team: usize| p.balanced(n, team).streams;
        let bf16 = PanelParams::WIDE_AVX512.for_weights(Scalar::BF16);
        let f32 = PanelParams::WIDE_AVX512;
        // smollm2-135m on two threads: 576 columns (18 panels) take 3
        // streams, 960 (30) take 3, 1536 (48) and the head keep the asked.
        assert_eq!([576, 960, 1536, 49152].map(|n| streams(bf16, n, 2)), [3, 3, 2, 2]);
        assert_eq!([576, 960, 1536, 49152].map(|n| streams(f32, n, 2)), [3, 3, 4, 4]);
        // A wide head keeps the asked count: its shares differ by a panel
        // or two whatever the count.
        assert_eq!(streams(f32, 151936, 2), 4);
        assert_eq!(streams(bf16, 151936, 2), 2);
        // On four threads 18 panels split evenest one at a time.
        assert_eq!(streams(bf16, 576, 4), 1);
        // Narrow products on many threads read one stream.
        assert_eq!(streams(f32, 256, 16), 1);
        // Every choice keeps the other parameters and is a valid count.
        for n in (1..3000).step_by(37) {
            for team in 1..=8 {
                let p = f32.balanced(n, team);
                assert_eq!(PanelParams { streams: 4, ..p }, f32);
                assert_eq!(stream_count(p.streams, n.div_ceil(32)), p.streams, "{n} on {team}");
            }
        }
    }
}
