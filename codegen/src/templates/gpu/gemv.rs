//! GEMV for decode: `y[m, n] = x[m, k] · W[n, k]ᵀ` (or the gated pair) for
//! a few rows `m`, where the time is the time to stream `W` once.
//!
//! A block is `groups` thread groups of `warps_per_group` warps; each group
//! owns `rows_per_group` rows of `W` (output columns) and streams them side
//! by side. Lane `l` of a group loads vectors `l, l + 32 * warps_per_group,
//! ...` of each row, 16 bytes each (when `k` allows, see [`vec_width`]), so
//! a warp reads 512 contiguous bytes per load, `unroll` loads per row
//! issued before any is used. Each load of `x` (small, it stays in L1/L2)
//! serves every row of the group, and each weight vector serves `m_tile`
//! rows of `x`, so up to `m_tile` rows cost one pass over `W`. Sums are
//! scalar FMA chains over the vector's lanes. The lanes' partial sums meet
//! through a transposing shuffle butterfly (see `reduce`), then, with
//! several warps per group, in shared memory; the lanes (or threads) that
//! end with a total add the epilogue and store.
//!
//! Measured on an H200 with a CUDA C++ mirror of this structure (bf16,
//! `k = 4096`, `n = 14336`): 3.4 TB/s at m = 1 and 1.6 TB/s at m = 4 with
//! one row per group, 3.7 and 2.8 TB/s with two, because with one row the
//! `x` loads (32 bytes per row of `x` for every 16 bytes of `W`) saturate
//! L1 before HBM; with `n = 1024` four warps per group double the
//! bandwidth (0.9 to 1.5-1.6 TB/s at m = 1) by putting more loads in
//! flight. See [`super::WeightProductParams::for_shape`].
//!
//! Blocks walk the row blocks with a grid-stride loop, so any grid works
//! (the combined kernel launches more blocks than a GEMV needs). The number
//! of rows of `x` in a pass is chosen by a chain of `if`s on the rows left
//! and the rows of `W` past `n` in the last block are clamped for loading,
//! so control flow around shuffles and barriers is uniform over the block.

use super::{block_x, declare, epilogue, lane, thread_x, vec_width, Operands, WeightOp};
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, LoopKind, ShuffleKind, Space, Ty, Var};

/// Tuning parameters of [`gemv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvParams {
    /// Thread groups per block.
    pub groups: usize,
    /// Warps per group: they split `k`, their sums meet in shared memory.
    pub warps_per_group: usize,
    /// Rows of `W` (output columns) a group streams side by side.
    pub rows_per_group: usize,
    /// Vector loads per row of `W` each lane issues before using them.
    pub unroll: usize,
    /// Rows of `x` computed per pass over `W`.
    pub m_tile: usize,
}

impl GemvParams {
    /// 8 groups of one warp and 2 rows each: 256 threads, 16 rows per block.
    pub const DEFAULT: GemvParams =
        GemvParams { groups: 8, warps_per_group: 1, rows_per_group: 2, unroll: 1, m_tile: 4 };

    pub fn threads(&self) -> usize {
        32 * self.groups * self.warps_per_group
    }

    /// Rows of `W` per block.
    pub fn rows_per_block(&self) -> usize {
        self.groups * self.rows_per_group
    }

    /// Blocks that cover `n` rows of `W` once.
    pub fn blocks(&self, n: usize) -> usize {
        n.div_ceil(self.rows_per_block().max(1))
    }

    pub fn check(&self) -> Result<(), String> {
        let GemvParams { groups, warps_per_group, rows_per_group, unroll, m_tile } = *self;
        if groups == 0 || warps_per_group == 0 || rows_per_group == 0 || unroll == 0 || m_tile == 0 {
            return Err(format!("GEMV parameters must be positive: {self:?}"));
        }
        if rows_per_group * m_tile > 32 {
            return Err(format!("GEMV sums per pass (rows_per_group x m_tile) must fit the 32 lanes: {self:?}"));
        }
        if self.threads() > 1024 {
            return Err(format!("GEMV block of {} threads (at most 1024): {self:?}", self.threads()));
        }
        Ok(())
    }
}

/// Declares the operands of `op` for `m` rows (a constant or a scalar
/// parameter of `b`) and builds the GEMV into `b`, launched on one block
/// per `rows_per_block` rows of `W`.
pub fn gemv(b: &mut Builder, m: Expr, op: &WeightOp, n: usize, k: usize, p: &GemvParams) -> Result<(), String> {
    op.check(n, k)?;
    p.check()?;
    let o = declare(b, op, &m, n, k);
    let red = shared(b, op, p);
    let blocks = p.blocks(n);
    b.gpu_launch([p.threads() as u32, 1, 1], [Expr::idx(blocks), Expr::idx(1), Expr::idx(1)]);
    b.promise_aligned_vectors();
    body(b, &o, op, &m, n, k, p, blocks, red);
    Ok(())
}

/// The shared buffer where the warps of a group meet (none with one warp).
pub(super) fn shared(b: &mut Builder, op: &WeightOp, p: &GemvParams) -> Option<BufId> {
    (p.warps_per_group > 1).then(|| {
        let len = p.groups * p.warps_per_group * op.weights() * p.rows_per_group * p.m_tile;
        b.buffer("gemv_red", crate::kir::Scalar::F32, Expr::idx(len), Space::Shared, Access::Write)
    })
}

/// The GEMV body for a grid of `grid` blocks.
#[allow(clippy::too_many_arguments)]
pub(super) fn body(
    b: &mut Builder,
    o: &Operands,
    op: &WeightOp,
    m: &Expr,
    n: usize,
    k: usize,
    p: &GemvParams,
    grid: usize,
    red: Option<BufId>,
) {
    let group = 32 * p.warps_per_group;
    let t = b.let_("t", thread_x());
    let tg = b.let_("tg", Expr::Var(t) % Expr::idx(group));
    let slot = b.let_("slot", Expr::Var(t) / Expr::idx(group));
    b.for_("rb", block_x(), Expr::idx(p.blocks(n)), grid as i64, LoopKind::Serial, |b, rb| {
        let j0 = b.let_("j0", (rb * Expr::idx(p.groups) + Expr::Var(slot)) * Expr::idx(p.rows_per_group));
        let wrows = (0..p.rows_per_group)
            .map(|c| b.let_("wrow", (Expr::Var(j0) + Expr::idx(c)).min(Expr::idx(n - 1)) * Expr::idx(k)))
            .collect();
        let g = Gemv { o, op, n, k, p, red, tg, slot, j0, wrows };
        b.for_("i0", Expr::idx(0), m.clone(), p.m_tile as i64, LoopKind::Serial, |b, i0| {
            let i0 = b.let_("i0", i0);
            let left = b.let_("left", m.clone() - Expr::Var(i0));
            g.rows_left(b, i0, left, p.m_tile);
        });
    });
}

/// What a pass over a group's rows of `W` needs.
struct Gemv<'a> {
    o: &'a Operands,
    op: &'a WeightOp,
    n: usize,
    k: usize,
    p: &'a GemvParams,
    red: Option<BufId>,
    /// This thread's index in its group.
    tg: Var,
    /// The group of this thread in its block.
    slot: Var,
    /// The group's first row of `W` (its rows may run past `n` in the
    /// last block).
    j0: Var,
    /// Where each of the group's rows starts in `W` (clamped to the last).
    wrows: Vec<Var>,
}

impl Gemv<'_> {
    /// `rows` rows of `x` from `i0` if that many are left, else fewer.
    fn rows_left(&self, b: &mut Builder, i0: Var, left: Var, rows: usize) {
        if rows == 1 {
            self.pass(b, i0, 1);
        } else {
            b.if_(
                Expr::Var(left).cmp(CmpOp::Ge, Expr::idx(rows)),
                |b| self.pass(b, i0, rows),
                |b| self.rows_left(b, i0, left, rows - 1),
            );
        }
    }

    /// Rows `i0 .. i0 + rows` of `y` for the group's columns.
    fn pass(&self, b: &mut Builder, i0: Var, rows: usize) {
        let (k, p) = (self.k, self.p);
        let vw = vec_width(self.op.w_elem, k);
        let lanes = vw as usize;
        let group = 32 * p.warps_per_group;
        let nvec = k / lanes;
        let per_step = group * p.unroll;
        let main = nvec / per_step * per_step;
        let xrows: Vec<Var> =
            (0..rows).map(|r| b.let_("xrow", (Expr::Var(i0) + Expr::idx(r)) * Expr::idx(k))).collect();
        // accs[w][c][r]: weight w, column c of the group, row r of x.
        let accs: Vec<Vec<Vec<Var>>> = self
            .o
            .w
            .iter()
            .map(|_| self.wrows.iter().map(|_| (0..rows).map(|_| b.let_("acc", Expr::f32(0.0))).collect()).collect())
            .collect();
        let tv = b.let_("tv", Expr::Var(self.tg) * Expr::idx(lanes));
        // `unroll` vectors of each row of each weight, all loaded before any
        // is used; one load of `x` per row of `x` serves all of them.
        let step = |b: &mut Builder, base: Var, unroll: usize| {
            let at = |u: usize| Expr::Var(base) + Expr::idx(u * group * lanes);
            let wv: Vec<Vec<Vec<Var>>> = self
                .o
                .w
                .iter()
                .map(|&w| {
                    self.wrows
                        .iter()
                        .map(|wrow| {
                            (0..unroll).map(|u| b.let_("wv", Expr::load(w, Expr::Var(*wrow) + at(u), vw))).collect()
                        })
                        .collect()
                })
                .collect();
            for u in 0..unroll {
                for (r, xrow) in xrows.iter().enumerate() {
                    let xv = b.let_("xv", Expr::load(self.o.x, Expr::Var(*xrow) + at(u), vw));
                    for (acc_w, wv_w) in accs.iter().zip(&wv) {
                        for (acc_c, wv_c) in acc_w.iter().zip(wv_w) {
                            let mut sum = Expr::Var(acc_c[r]);
                            for i in 0..vw {
                                sum = lane(Expr::Var(xv), i, vw).fma(lane(Expr::Var(wv_c[u]), i, vw), sum);
                            }
                            b.assign(acc_c[r], sum);
                        }
                    }
                }
            }
        };
        if main > 0 {
            let stride = (per_step * lanes) as i64;
            b.for_("e0", Expr::idx(0), Expr::idx(main * lanes), stride, LoopKind::Serial, |b, e0| {
                let base = b.let_("base", e0 + Expr::Var(tv));
                step(b, base, p.unroll);
            });
        }
        if main < nvec {
            let start = Expr::idx(main * lanes) + Expr::Var(tv);
            b.for_("e", start, Expr::idx(k), (group * lanes) as i64, LoopKind::Serial, |b, e| {
                let base = b.let_("base", e);
                step(b, base, 1);
            });
        }
        // The sums to reduce, column-major: entry `c * rows + r`.
        let sums: Vec<Vec<Expr>> = (0..self.wrows.len())
            .flat_map(|c| (0..rows).map(move |r| (c, r)))
            .map(|(c, r)| accs.iter().map(|acc| Expr::Var(acc[c][r])).collect())
            .collect();
        let count = sums.len();
        let (own, idx, sums) = self.reduce(b, sums);
        let Some(red) = self.red else {
            self.store(b, i0, rows, own, idx, |_, w| Expr::Var(sums[w]));
            return;
        };
        // Several warps per group: each publishes its sums, then thread `i`
        // of the group adds entry `i`'s in warp order.
        let (wpg, nw, per_warp) = (p.warps_per_group, self.o.w.len(), p.rows_per_group * p.m_tile);
        let slot_at = |warp: Expr, w: usize, i: Expr| {
            ((Expr::Var(self.slot) * Expr::idx(wpg) + warp) * Expr::idx(nw) + Expr::idx(w)) * Expr::idx(per_warp) + i
        };
        b.if_(
            own,
            |b| {
                let warp = Expr::Var(self.tg) / Expr::idx(32);
                for (w, s) in sums.iter().enumerate() {
                    b.store(red, slot_at(warp.clone(), w, Expr::Var(idx)), Expr::Var(*s));
                }
            },
            |_| {},
        );
        b.barrier();
        let mine = Expr::Var(self.tg).lt(Expr::idx(count));
        self.store(b, i0, rows, mine, self.tg, |_, w| {
            (1..wpg).fold(Expr::load(red, slot_at(Expr::idx(0), w, Expr::Var(self.tg)), 1), |acc, q| {
                acc + Expr::load(red, slot_at(Expr::idx(q), w, Expr::Var(self.tg)), 1)
            })
        });
        // The next pass overwrites the partial sums.
        b.barrier();
    }

    /// Sums `vals[i][w]` (entry `i`, weight `w`, each lane's partial sum)
    /// over the warp in `(entries - 1 + 5) * weights` shuffles or so,
    /// rather than `5 * entries * weights`: while more than one entry is
    /// left, each step pairs lanes `16, 8, ...` apart, the lower lane keeps
    /// the first half of the entries and the upper the second, each adding
    /// the half its partner sent (a transposing butterfly); then a plain
    /// butterfly finishes the last one. Lane `l` ends with the sums of
    /// entry `l / (32 / entries')` (`entries'` the count rounded up to a
    /// power of two), every weight. Returns whether this lane is the first
    /// holding a real entry, that entry, and its sums (one per weight).
    fn reduce(&self, b: &mut Builder, mut vals: Vec<Vec<Expr>>) -> (Expr, Var, Vec<Var>) {
        let nw = vals[0].len();
        let padded = vals.len().next_power_of_two();
        let entries = vals.len();
        vals.resize(padded, vec![Expr::f32(0.0); nw]);
        let lane = b.let_("lane", Expr::Var(self.tg) % Expr::idx(32));
        let tmp = b.var("shfl", Ty::F32);
        let mut off = 16;
        while vals.len() > 1 {
            let half = vals.len() / 2;
            let upper = b.let_("upper", (Expr::Var(lane) / Expr::idx(off) % Expr::idx(2)).cmp(CmpOp::Eq, Expr::idx(1)));
            let (low, high) = vals.split_at(half);
            let mut next = vec![];
            for (lo_row, hi_row) in low.iter().zip(high) {
                let mut row = vec![];
                for (lo, hi) in lo_row.iter().zip(hi_row) {
                    let keep = Expr::select(Expr::Var(upper), hi.clone(), lo.clone());
                    let send = Expr::select(Expr::Var(upper), lo.clone(), hi.clone());
                    b.shuffle(tmp, ShuffleKind::Xor, send, Expr::idx(off));
                    row.push(Expr::Var(b.let_("sum", keep + Expr::Var(tmp))));
                }
                next.push(row);
            }
            vals = next;
            off /= 2;
        }
        let sums: Vec<Var> = vals[0].iter().map(|v| b.let_("sum", v.clone())).collect();
        while off >= 1 {
            for s in &sums {
                b.shuffle(tmp, ShuffleKind::Xor, Expr::Var(*s), Expr::idx(off));
                b.assign(*s, Expr::Var(*s) + Expr::Var(tmp));
            }
            off /= 2;
        }
        let span = 32 / padded;
        let entry = b.let_("entry", Expr::Var(lane) / Expr::idx(span));
        let first = Expr::Var(lane) % Expr::idx(span);
        let mut own = first.cmp(CmpOp::Eq, Expr::idx(0));
        if entries < padded {
            own = Expr::select(own, Expr::Var(entry).lt(Expr::idx(entries)), Expr::Bool(false));
        }
        (own, entry, sums)
    }

    /// Where `mine` holds, stores entry `i` of a pass over `rows` rows of
    /// `x` (column `j0 + i / rows`, row `i0 + i % rows`, if the column is
    /// below `n`), `dot(b, w)` giving weight `w`'s dot product.
    fn store(
        &self,
        b: &mut Builder,
        i0: Var,
        rows: usize,
        mine: Expr,
        i: Var,
        dot: impl Fn(&mut Builder, usize) -> Expr,
    ) {
        let j = b.let_("j", Expr::Var(self.j0) + Expr::Var(i) / Expr::idx(rows));
        let inside = Expr::Var(j).lt(Expr::idx(self.n));
        b.if_(
            Expr::select(mine, inside, Expr::Bool(false)),
            |b| {
                let dots: Vec<Expr> = (0..self.o.w.len()).map(|w| dot(b, w)).collect();
                let row = Expr::Var(i0) + Expr::Var(i) % Expr::idx(rows);
                let at = b.let_("at", row * Expr::idx(self.n) + Expr::Var(j));
                let v = epilogue(b, self.o, self.op, dots, &Expr::Var(at), &Expr::Var(j), 1);
                b.store(self.o.y, Expr::Var(at), v);
            },
            |_| {},
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::weight_testing::check;
    use super::*;
    use crate::kir::Scalar;
    use crate::templates::matmul_dyn::Act;

    fn kernel(op: &WeightOp, n: usize, k: usize, p: &GemvParams, m: Option<usize>) -> crate::kir::Kernel {
        let mut b = Builder::new(&format!("gemv_{}", op.describe()));
        let m = match m {
            Some(m) => Expr::idx(m),
            None => b.scalar_param("m"),
        };
        gemv(&mut b, m, op, n, k, p).unwrap();
        b.finish().unwrap()
    }

    /// Groups of one warp, 2 groups per block (64 threads), 1 and 3 rows
    /// per group: odd `k` (scalar loads), vector loads in the remainder
    /// loop only (`k = 40`) and in whole unrolled steps plus the remainder
    /// (`k = 1040`), `m` below and above `m_tile`, last blocks with rows
    /// past `n`.
    #[test]
    fn gpu_gemv_one_warp_per_group() {
        for rows_per_group in [1, 3] {
            let p = GemvParams { groups: 2, warps_per_group: 1, rows_per_group, unroll: 2, m_tile: 4 };
            for elem in [Scalar::F32, Scalar::BF16] {
                let op = WeightOp::plain(elem);
                for (m, n, k) in [(1, 33, 129), (5, 3, 40), (2, 7, 7), (1, 1, 1), (2, 3, 1040)] {
                    check(&kernel(&op, n, k, &p, None), &op, m, n, k);
                }
            }
        }
        // A constant m.
        let p = GemvParams::DEFAULT;
        let op = WeightOp::plain(Scalar::F16);
        check(&kernel(&op, 3, 24, &p, Some(2)), &op, 2, 3, 24);
    }

    /// Two warps per group meeting in shared memory, with bias and residual.
    #[test]
    fn gpu_gemv_warps_per_group_epilogue() {
        let op = WeightOp { bias: true, residual: true, ..WeightOp::plain(Scalar::BF16) };
        for rows_per_group in [1, 2] {
            let p = GemvParams { groups: 1, warps_per_group: 2, rows_per_group, unroll: 1, m_tile: 2 };
            for (m, n, k) in [(1, 3, 129), (5, 3, 24), (2, 1, 1024)] {
                check(&kernel(&op, n, k, &p, None), &op, m, n, k);
            }
        }
    }

    /// The gated pair streamed in one pass, every activation.
    #[test]
    fn gpu_gated_gemv() {
        let p = GemvParams { groups: 1, warps_per_group: 1, rows_per_group: 2, unroll: 2, m_tile: 2 };
        for (act, elem) in [(Act::Silu, Scalar::BF16), (Act::Gelu, Scalar::F32), (Act::GeluTanh, Scalar::BF16)] {
            let op = WeightOp::gated(elem, act);
            for (m, n, k) in [(1, 3, 40), (3, 2, 7)] {
                check(&kernel(&op, n, k, &p, None), &op, m, n, k);
            }
        }
        let p = GemvParams { groups: 1, warps_per_group: 2, rows_per_group: 1, unroll: 1, m_tile: 2 };
        let op = WeightOp { bias: true, residual: true, ..WeightOp::gated(Scalar::BF16, Act::Silu) };
        check(&kernel(&op, 2, 129, &p, None), &op, 2, 2, 129);
    }
}
