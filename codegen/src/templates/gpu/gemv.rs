//! GEMV for decode: `y[m, n] = x[m, k] · W[n, k]ᵀ` (or the gated pair) for
//! a few rows `m`, where the time is the time to stream `W` once.
//!
//! Each row `j` of `W` (one output column) belongs to `warps_per_row` warps
//! of a block that owns `rows_per_block` rows. Lane `l` loads the vectors
//! `l, l + 32 * warps_per_row, ...` of the row, each 16 bytes (when `k`
//! allows, see [`vec_width`]), so a warp reads 512 contiguous bytes per
//! load, and issues `unroll` of them before using any, to keep bytes in
//! flight. Each weight vector is used for `m_tile` rows of `x` (which is
//! small and stays in L1/L2) before the next is loaded, so up to `m_tile`
//! rows cost one pass over `W`. The lanes' partial sums meet through a
//! shuffle butterfly, then (with several warps per row) in shared memory;
//! one thread adds the epilogue and stores.
//!
//! Blocks walk the row blocks with a grid-stride loop, so any grid works
//! (the combined kernel launches more blocks than a GEMV needs). The number
//! of rows of `x` in a pass is chosen by a chain of `if`s on the rows left
//! and the rows of `W` past `n` in the last block are clamped for loading,
//! so control flow around shuffles and barriers is uniform over the block.

use super::{block_x, declare, epilogue, thread_x, vec_width, Operands, WeightOp};
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, LoopKind, RedOp, ShuffleKind, Space, Ty, Var};
use crate::templates::c;

/// Tuning parameters of [`gemv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvParams {
    /// Rows of `W` (output columns) per block.
    pub rows_per_block: usize,
    /// Warps sharing one row of `W`; their sums meet in shared memory.
    pub warps_per_row: usize,
    /// Vector loads of `W` each lane issues before using them.
    pub unroll: usize,
    /// Rows of `x` computed per pass over `W` (at most 32).
    pub m_tile: usize,
}

impl GemvParams {
    /// 8 rows of one warp each: 256 threads.
    pub const DEFAULT: GemvParams = GemvParams { rows_per_block: 8, warps_per_row: 1, unroll: 4, m_tile: 4 };

    pub fn threads(&self) -> usize {
        32 * self.rows_per_block * self.warps_per_row
    }

    /// Blocks that cover `n` rows of `W` once.
    pub fn blocks(&self, n: usize) -> usize {
        n.div_ceil(self.rows_per_block.max(1))
    }

    pub fn check(&self) -> Result<(), String> {
        if self.rows_per_block == 0 || self.warps_per_row == 0 || self.unroll == 0 || self.m_tile == 0 {
            return Err(format!("GEMV parameters must be positive: {self:?}"));
        }
        if self.m_tile > 32 {
            return Err(format!("GEMV rows of x per pass must be at most 32 (one per lane): {self:?}"));
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
    body(b, &o, op, &m, n, k, p, blocks, red);
    Ok(())
}

/// The shared buffer where the warps of a row meet (none with one warp).
pub(super) fn shared(b: &mut Builder, op: &WeightOp, p: &GemvParams) -> Option<BufId> {
    (p.warps_per_row > 1).then(|| {
        let len = p.rows_per_block * p.warps_per_row * op.weights() * p.m_tile;
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
    let group = 32 * p.warps_per_row;
    let t = b.let_("t", thread_x());
    let tg = b.let_("tg", Expr::Var(t) % Expr::idx(group));
    let slot = b.let_("slot", Expr::Var(t) / Expr::idx(group));
    b.for_("rb", block_x(), Expr::idx(p.blocks(n)), grid as i64, LoopKind::Serial, |b, rb| {
        let j = b.let_("j", rb * Expr::idx(p.rows_per_block) + Expr::Var(slot));
        let wrow = b.let_("wrow", Expr::Var(j).min(Expr::idx(n - 1)) * Expr::idx(k));
        let g = Gemv { o, op, n, k, p, red, tg, slot, j, wrow };
        b.for_("i0", Expr::idx(0), m.clone(), p.m_tile as i64, LoopKind::Serial, |b, i0| {
            let i0 = b.let_("i0", i0);
            let left = b.let_("left", m.clone() - Expr::Var(i0));
            g.rows_left(b, i0, left, p.m_tile);
        });
    });
}

/// What a pass over one row of `W` needs.
struct Gemv<'a> {
    o: &'a Operands,
    op: &'a WeightOp,
    n: usize,
    k: usize,
    p: &'a GemvParams,
    red: Option<BufId>,
    /// This thread's index among the threads of its row.
    tg: Var,
    /// The block's row this thread works on.
    slot: Var,
    /// The row of `W` (may be past `n` in the last block).
    j: Var,
    /// Where the row starts in `W` (clamped to the last row).
    wrow: Var,
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

    /// Rows `i0 .. i0 + rows` of `y` for row `j` of `W`.
    fn pass(&self, b: &mut Builder, i0: Var, rows: usize) {
        let (k, p) = (self.k, self.p);
        let vw = vec_width(self.op.w_elem, k);
        let lanes = vw as usize;
        let group = 32 * p.warps_per_row;
        let nvec = k / lanes;
        let per_step = group * p.unroll;
        let main = nvec / per_step * per_step;
        let xrows: Vec<Var> =
            (0..rows).map(|r| b.let_("xrow", (Expr::Var(i0) + Expr::idx(r)) * Expr::idx(k))).collect();
        let accs: Vec<Vec<Var>> =
            self.o.w.iter().map(|_| (0..rows).map(|_| b.let_("acc", c(0.0, vw))).collect()).collect();
        let tv = b.let_("tv", Expr::Var(self.tg) * Expr::idx(lanes));
        // `unroll` vectors of each weight, all loaded before any is used.
        let step = |b: &mut Builder, base: Var, unroll: usize| {
            let at = |u: usize| Expr::Var(base) + Expr::idx(u * group * lanes);
            let wv: Vec<Vec<Var>> = self
                .o
                .w
                .iter()
                .map(|&w| (0..unroll).map(|u| b.let_("wv", Expr::load(w, Expr::Var(self.wrow) + at(u), vw))).collect())
                .collect();
            for u in 0..unroll {
                for (r, xrow) in xrows.iter().enumerate() {
                    let xv = b.let_("xv", Expr::load(self.o.x, Expr::Var(*xrow) + at(u), vw));
                    for (acc, wv) in accs.iter().zip(&wv) {
                        b.assign(acc[r], Expr::Var(xv).fma(Expr::Var(wv[u]), Expr::Var(acc[r])));
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
        let sums: Vec<Vec<Expr>> = (0..rows)
            .map(|r| {
                accs.iter()
                    .map(|acc| if vw > 1 { Expr::Var(acc[r]).hreduce(RedOp::Add) } else { Expr::Var(acc[r]) })
                    .collect()
            })
            .collect();
        let (own, row, sums) = self.reduce(b, sums);
        let Some(red) = self.red else {
            self.store(b, i0, own, row, |_, w| Expr::Var(sums[w]));
            return;
        };
        // Several warps per row: each publishes its sums, then thread `r`
        // of the row adds row `r`'s in warp order.
        let (wpr, nw, mt) = (p.warps_per_row, self.o.w.len(), p.m_tile);
        let slot_at = |warp: Expr, w: usize, r: Expr| {
            ((Expr::Var(self.slot) * Expr::idx(wpr) + warp) * Expr::idx(nw) + Expr::idx(w)) * Expr::idx(mt) + r
        };
        b.if_(
            own,
            |b| {
                let warp = Expr::Var(self.tg) / Expr::idx(32);
                for (w, s) in sums.iter().enumerate() {
                    b.store(red, slot_at(warp.clone(), w, Expr::Var(row)), Expr::Var(*s));
                }
            },
            |_| {},
        );
        b.barrier();
        let mine = Expr::Var(self.tg).lt(Expr::idx(rows));
        self.store(b, i0, mine, self.tg, |_, w| {
            (1..wpr).fold(Expr::load(red, slot_at(Expr::idx(0), w, Expr::Var(self.tg)), 1), |acc, q| {
                acc + Expr::load(red, slot_at(Expr::idx(q), w, Expr::Var(self.tg)), 1)
            })
        });
        // The next pass overwrites the partial sums.
        b.barrier();
    }

    /// Sums `vals[r][w]` (one per row and weight, each lane's partial sum)
    /// over the warp, in `(rows - 1) * weights + 5 * weights` shuffles
    /// rather than `5 * rows * weights`: while more than one row is left,
    /// each step pairs lanes `16, 8, ...` apart, the lower lane keeps the
    /// first half of the rows and the upper the second, each adding the
    /// half its partner sent (a transposing butterfly); then a plain
    /// butterfly finishes the last row. Lane `l` ends with the sums of row
    /// `l / (32 / rows')` (`rows'` the rows rounded up to a power of two),
    /// every weight. Returns whether this lane is the first holding a real
    /// row, that row, and its sums (one per weight).
    fn reduce(&self, b: &mut Builder, mut vals: Vec<Vec<Expr>>) -> (Expr, Var, Vec<Var>) {
        let nw = vals[0].len();
        let padded = vals.len().next_power_of_two();
        let rows = vals.len();
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
        let row = b.let_("row", Expr::Var(lane) / Expr::idx(span));
        let first = Expr::Var(lane) % Expr::idx(span);
        let mut own = first.cmp(CmpOp::Eq, Expr::idx(0));
        if rows < padded {
            own = Expr::select(own, Expr::Var(row).lt(Expr::idx(rows)), Expr::Bool(false));
        }
        (own, row, sums)
    }

    /// Where `mine` holds, stores row `i0 + r` of column `j` (if `j < n`),
    /// `dot(b, w)` giving weight `w`'s dot product.
    fn store(&self, b: &mut Builder, i0: Var, mine: Expr, r: Var, dot: impl Fn(&mut Builder, usize) -> Expr) {
        let inside = Expr::Var(self.j).lt(Expr::idx(self.n));
        b.if_(
            Expr::select(mine, inside, Expr::Bool(false)),
            |b| {
                let dots: Vec<Expr> = (0..self.o.w.len()).map(|w| dot(b, w)).collect();
                let at = b.let_("at", (Expr::Var(i0) + Expr::Var(r)) * Expr::idx(self.n) + Expr::Var(self.j));
                let v = epilogue(b, self.o, self.op, dots, &Expr::Var(at), &Expr::Var(self.j), 1);
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

    /// One warp per row, 2 rows per block (64 threads): odd `k` (scalar
    /// loads), vector loads in the remainder loop only (`k = 40`) and in
    /// whole unrolled steps plus the remainder (`k = 1040`), `m` below and
    /// above `m_tile`, a last block with a row past `n`.
    #[test]
    fn gpu_gemv_one_warp_per_row() {
        let p = GemvParams { rows_per_block: 2, warps_per_row: 1, unroll: 2, m_tile: 4 };
        for elem in [Scalar::F32, Scalar::BF16] {
            let op = WeightOp::plain(elem);
            for (m, n, k) in [(1, 33, 129), (5, 3, 40), (2, 3, 7), (1, 1, 1), (2, 3, 1040)] {
                check(&kernel(&op, n, k, &p, None), &op, m, n, k);
            }
        }
        // A constant m.
        let op = WeightOp::plain(Scalar::F16);
        check(&kernel(&op, 3, 24, &p, Some(2)), &op, 2, 3, 24);
    }

    /// Two warps per row meeting in shared memory, with bias and residual.
    #[test]
    fn gpu_gemv_warps_per_row_epilogue() {
        let p = GemvParams { rows_per_block: 1, warps_per_row: 2, unroll: 1, m_tile: 2 };
        let op = WeightOp { bias: true, residual: true, ..WeightOp::plain(Scalar::BF16) };
        for (m, n, k) in [(1, 3, 129), (5, 3, 24), (2, 1, 1024)] {
            check(&kernel(&op, n, k, &p, None), &op, m, n, k);
        }
    }

    /// The gated pair streamed in one pass, every activation.
    #[test]
    fn gpu_gated_gemv() {
        let p = GemvParams { rows_per_block: 1, warps_per_row: 1, unroll: 2, m_tile: 2 };
        for (act, elem) in [(Act::Silu, Scalar::BF16), (Act::Gelu, Scalar::F32), (Act::GeluTanh, Scalar::BF16)] {
            let op = WeightOp::gated(elem, act);
            for (m, n, k) in [(1, 3, 40), (3, 2, 7)] {
                check(&kernel(&op, n, k, &p, None), &op, m, n, k);
            }
        }
        let p = GemvParams { rows_per_block: 1, warps_per_row: 2, unroll: 1, m_tile: 2 };
        let op = WeightOp { bias: true, residual: true, ..WeightOp::gated(Scalar::BF16, Act::Silu) };
        check(&kernel(&op, 2, 129, &p, None), &op, 2, 2, 129);
    }
}
