//! Tiled SIMT GEMM for prefill: `y[m, n] = x[m, k] · W[n, k]ᵀ` (or the
//! gated pair) for many rows, with shared-memory tiles and a register
//! micro-tile per thread. Tensor cores are a later step.
//!
//! A block computes a `bm x bn` tile of `y`. For each `bk`-wide slice of
//! `k` its threads copy the `bm x bk` slice of `x` and the `bn x bk` slice
//! of each weight into shared memory, transposed to `[bk][bm + tm]` and
//! `[bk][bn + tn]` (so the compute loop reads a thread's `tm` rows and `tn`
//! columns as one vector each; the padding keeps those vectors aligned and
//! spreads the transposing stores over banks). Both operands are `k`-major
//! in global memory, so consecutive threads load consecutive vectors along
//! `k` (16 bytes when `k` allows, see [`vec_width`]): coalesced. Each thread
//! then accumulates its `tm x tn` micro-tile (`tm` vectors of `tn` lanes)
//! with one broadcast FMA per row and `k`. Loads past `m`, `n` or `k` give
//! zeros and stores past `m` or `n` are skipped, so any shape works; the
//! barriers are reached by every thread.

use super::{block_x, declare, epilogue, lane, thread_x, vec_width, Operands, WeightOp};
use crate::kir::{Access, BufId, Builder, Expr, LoopKind, Scalar, Space, Special, Ty, Var};
use crate::templates::sym::ceil_div;
use crate::templates::{c, widen};

/// Tuning parameters of [`gemm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmParams {
    /// Rows of `y` per block tile.
    pub bm: usize,
    /// Columns of `y` per block tile.
    pub bn: usize,
    /// The slice of `k` staged in shared memory per step (a multiple of 8).
    pub bk: usize,
    /// Rows of the per-thread micro-tile (1, 2, 4 or 8).
    pub tm: usize,
    /// Columns of the per-thread micro-tile (1, 2, 4 or 8).
    pub tn: usize,
}

impl GemmParams {
    /// 64x64 tiles, 4x4 per thread: 256 threads, 16 accumulators each;
    /// 17 KiB of shared memory (26 KiB gated). A CUDA C++ mirror of this
    /// kernel ran at 26-29 TFLOP/s on an H200 (bf16 weights, k = 4096,
    /// m = 512..2048; f32 FMA peak about 67); 128x128 tiles of 8x8 (also
    /// 256 threads) reached 35 at m = 2048 but 22 at m = 512, where there
    /// are too few tiles.
    pub const DEFAULT: GemmParams = GemmParams { bm: 64, bn: 64, bk: 32, tm: 4, tn: 4 };

    pub fn threads(&self) -> usize {
        (self.bm / self.tm.max(1)) * (self.bn / self.tn.max(1))
    }

    pub fn check(&self) -> Result<(), String> {
        let micro = |x: usize| matches!(x, 1 | 2 | 4 | 8);
        if !micro(self.tm) || !micro(self.tn) {
            return Err(format!("GEMM micro-tile must be 1, 2, 4 or 8 each way: {self:?}"));
        }
        if self.bm == 0 || self.bn == 0 || !self.bm.is_multiple_of(self.tm) || !self.bn.is_multiple_of(self.tn) {
            return Err(format!("GEMM tile must be a positive multiple of the micro-tile: {self:?}"));
        }
        if self.bk == 0 || !self.bk.is_multiple_of(8) {
            return Err(format!("GEMM k-slice must be a positive multiple of 8: {self:?}"));
        }
        if self.threads() > 1024 {
            return Err(format!("GEMM block of {} threads (at most 1024): {self:?}", self.threads()));
        }
        Ok(())
    }

    fn lda(&self) -> usize {
        self.bm + self.tm
    }

    fn ldb(&self) -> usize {
        self.bn + self.tn
    }
}

/// The shared tiles: `x`'s and one per weight.
pub(super) struct Tiles {
    a: BufId,
    w: Vec<BufId>,
}

pub(super) fn shared(b: &mut Builder, op: &WeightOp, p: &GemmParams) -> Tiles {
    let mut tile = |name: &str, len: usize| b.buffer(name, Scalar::F32, Expr::idx(len), Space::Shared, Access::Write);
    let a = tile("x_tile", p.bk * p.lda());
    let names: &[&str] = if op.gate.is_some() { &["w_gate_tile", "w_up_tile"] } else { &["w_tile"] };
    let w = names.iter().map(|name| tile(name, p.bk * p.ldb())).collect();
    Tiles { a, w }
}

/// Declares the operands of `op` for `m` rows (a constant or a scalar
/// parameter of `b`) and builds the GEMM into `b`, launched on a
/// `ceil(n / bn) x ceil(m / bm)` grid.
pub fn gemm(b: &mut Builder, m: Expr, op: &WeightOp, n: usize, k: usize, p: &GemmParams) -> Result<(), String> {
    op.check(n, k)?;
    p.check()?;
    let o = declare(b, op, &m, n, k);
    let tiles = shared(b, op, p);
    b.gpu_launch([p.threads() as u32, 1, 1], [Expr::idx(n.div_ceil(p.bn)), ceil_div(m.clone(), p.bm), Expr::idx(1)]);
    b.promise_aligned_vectors();
    let m0 = Expr::Special(Special::BlockIdx(1)) * Expr::idx(p.bm);
    let n0 = block_x() * Expr::idx(p.bn);
    tile(b, &o, op, &m, n, k, p, &tiles, m0, n0);
    Ok(())
}

/// `a && b` for scalar bools (KIR has no logical operators).
pub(super) fn and(a: Expr, b: Expr) -> Expr {
    Expr::select(a, b, Expr::Bool(false))
}

/// The tile of `y` at rows `m0..`, columns `n0..`.
#[allow(clippy::too_many_arguments)]
pub(super) fn tile(
    b: &mut Builder,
    o: &Operands,
    op: &WeightOp,
    m: &Expr,
    n: usize,
    k: usize,
    p: &GemmParams,
    tiles: &Tiles,
    m0: Expr,
    n0: Expr,
) {
    let (tm, tn) = (p.tm as u8, p.tn as u8);
    let m0 = b.let_("m0", m0);
    let n0 = b.let_("n0", n0);
    let t = b.let_("t", thread_x());
    let cols = p.bn / p.tn;
    let tx = b.let_("tx", Expr::Var(t) % Expr::idx(cols));
    let ty = b.let_("ty", Expr::Var(t) / Expr::idx(cols));
    let accs: Vec<Vec<Var>> = o.w.iter().map(|_| (0..p.tm).map(|_| b.let_("acc", c(0.0, tn))).collect()).collect();
    let copy = Stage { t, threads: p.threads(), k, bk: p.bk };
    b.for_("k0", Expr::idx(0), Expr::idx(k), p.bk as i64, LoopKind::Serial, |b, k0| {
        let k0 = b.let_("k0", k0);
        copy.slice(b, o.x, vec_width(Scalar::F32, k), m.clone(), m0, k0, tiles.a, p.bm, p.lda());
        for (&w, &dst) in o.w.iter().zip(&tiles.w) {
            copy.slice(b, w, vec_width(op.w_elem, k), Expr::idx(n), n0, k0, dst, p.bn, p.ldb());
        }
        b.barrier();
        b.for_("kk", Expr::idx(0), Expr::idx(p.bk), 1, LoopKind::Unroll(p.bk as u32), |b, kk| {
            let a_at = kk.clone() * Expr::idx(p.lda()) + Expr::Var(ty) * Expr::idx(p.tm);
            let av = b.let_("av", Expr::load(tiles.a, a_at, tm));
            for (acc, &wt) in accs.iter().zip(&tiles.w) {
                let w_at = kk.clone() * Expr::idx(p.ldb()) + Expr::Var(tx) * Expr::idx(p.tn);
                let wv = b.let_("wv", Expr::load(wt, w_at, tn));
                for (i, acc) in acc.iter().enumerate() {
                    let ai = widen(lane(Expr::Var(av), i as u8, tm), tn);
                    b.assign(*acc, ai.fma(Expr::Var(wv), Expr::Var(*acc)));
                }
            }
        });
        // The next slice overwrites the tiles.
        b.barrier();
    });
    for i in 0..p.tm {
        let row = b.let_("row", Expr::Var(m0) + Expr::Var(ty) * Expr::idx(p.tm) + Expr::idx(i));
        let col = b.let_("col", Expr::Var(n0) + Expr::Var(tx) * Expr::idx(p.tn));
        b.if_(
            Expr::Var(row).lt(m.clone()),
            |b| {
                let at = b.let_("at", Expr::Var(row) * Expr::idx(n) + Expr::Var(col));
                if n.is_multiple_of(p.tn) {
                    // Whole aligned vectors: `col < n` means all of it is.
                    b.if_(
                        Expr::Var(col).lt(Expr::idx(n)),
                        |b| {
                            let dots = accs.iter().map(|a| Expr::Var(a[i])).collect();
                            let v = epilogue(b, o, op, dots, &Expr::Var(at), &Expr::Var(col), tn);
                            b.store(o.y, Expr::Var(at), v);
                        },
                        |_| {},
                    );
                } else {
                    for jj in 0..tn {
                        let cj = Expr::Var(col) + Expr::idx(jj as usize);
                        b.if_(
                            cj.clone().lt(Expr::idx(n)),
                            |b| {
                                let dots = accs.iter().map(|a| lane(Expr::Var(a[i]), jj, tn)).collect();
                                let at = Expr::Var(at) + Expr::idx(jj as usize);
                                let v = epilogue(b, o, op, dots, &at, &cj, 1);
                                b.store(o.y, at, v);
                            },
                            |_| {},
                        );
                    }
                }
            },
            |_| {},
        );
    }
}

/// Copies slices of `k`-major operands into shared tiles, each thread a
/// strided share of the slice's vectors (also the tensor-core GEMM's).
pub(super) struct Stage {
    pub t: Var,
    pub threads: usize,
    pub k: usize,
    pub bk: usize,
}

impl Stage {
    /// Rows `row0 .. row0 + rows` (those below `total`) of `src [total, k]`,
    /// columns `k0 .. k0 + bk` (those below `k`), loaded as `vw`-wide
    /// vectors (zeros outside) and handed to `store(b, r, c, value)` with
    /// the vector's row and first column within the slice.
    #[allow(clippy::too_many_arguments)]
    pub fn slice_with(
        &self,
        b: &mut Builder,
        src: BufId,
        vw: u8,
        total: Expr,
        row0: Var,
        k0: Var,
        rows: usize,
        store: impl Fn(&mut Builder, Var, Var, Var),
    ) {
        let lanes = vw as usize;
        let per_row = self.bk / lanes;
        let count = rows * per_row;
        let val = b.var("ld", Ty::F32.with_lanes(vw));
        for l in 0..count.div_ceil(self.threads) {
            let v = b.let_("v", Expr::Var(self.t) + Expr::idx(l * self.threads));
            let copy_one = |b: &mut Builder| {
                let r = b.let_("r", Expr::Var(v) / Expr::idx(per_row));
                let cc = b.let_("c", Expr::Var(v) % Expr::idx(per_row) * Expr::idx(lanes));
                let gr = Expr::Var(row0) + Expr::Var(r);
                let gk = Expr::Var(k0) + Expr::Var(cc);
                let mut inside = gr.clone().lt(total.clone());
                if !self.k.is_multiple_of(self.bk) {
                    // `vw` divides `k`, so a vector is wholly in or out.
                    inside = and(inside, gk.clone().lt(Expr::idx(self.k)));
                }
                b.if_(
                    inside,
                    |b| b.assign(val, Expr::load(src, gr * Expr::idx(self.k) + gk, vw)),
                    |b| b.assign(val, c(0.0, vw)),
                );
                store(b, r, cc, val);
            };
            if (l + 1) * self.threads > count {
                b.if_(Expr::Var(v).lt(Expr::idx(count)), copy_one, |_| {});
            } else {
                copy_one(b);
            }
        }
    }

    /// [`Stage::slice_with`] into `dst[c * ld + r]`: transposed, lane by lane.
    #[allow(clippy::too_many_arguments)]
    fn slice(
        &self,
        b: &mut Builder,
        src: BufId,
        vw: u8,
        total: Expr,
        row0: Var,
        k0: Var,
        dst: BufId,
        rows: usize,
        ld: usize,
    ) {
        self.slice_with(b, src, vw, total, row0, k0, rows, |b, r, cc, val| {
            for e in 0..vw {
                let at = (Expr::Var(cc) + Expr::idx(e as usize)) * Expr::idx(ld) + Expr::Var(r);
                b.store(dst, at, lane(Expr::Var(val), e, vw));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::weight_testing::check;
    use super::*;
    use crate::templates::matmul_dyn::Act;

    fn kernel(op: &WeightOp, n: usize, k: usize, p: &GemmParams) -> crate::kir::Kernel {
        let mut b = Builder::new(&format!("gemm_{}", op.describe()));
        let m = b.scalar_param("m");
        gemm(&mut b, m, op, n, k, p).unwrap();
        b.finish().unwrap()
    }

    /// 16x16 tiles of 4x4 (16 threads): edges in m, n and k, scalar and
    /// vector loads, f32 and bf16.
    #[test]
    fn gpu_gemm_edges() {
        let p = GemmParams { bm: 16, bn: 16, bk: 8, tm: 4, tn: 4 };
        for elem in [Scalar::F32, Scalar::BF16] {
            let op = WeightOp::plain(elem);
            for (m, n, k) in [(1, 1, 1), (17, 33, 7), (5, 3, 40), (2, 96, 24), (17, 3, 129)] {
                check(&kernel(&op, n, k, &p), &op, m, n, k);
            }
        }
    }

    /// Rectangular micro-tiles, more threads than a slice has vectors, and
    /// the bias/residual epilogue.
    #[test]
    fn gpu_gemm_shapes_epilogue() {
        let op = WeightOp { bias: true, residual: true, ..WeightOp::plain(Scalar::BF16) };
        for p in [GemmParams { bm: 8, bn: 32, bk: 8, tm: 2, tn: 8 }, GemmParams { bm: 16, bn: 8, bk: 16, tm: 8, tn: 1 }]
        {
            for (m, n, k) in [(70, 33, 24), (2, 3, 40)] {
                check(&kernel(&op, n, k, &p), &op, m, n, k);
            }
        }
    }

    #[test]
    fn gpu_gated_gemm() {
        let p = GemmParams { bm: 16, bn: 16, bk: 8, tm: 4, tn: 4 };
        for (act, elem) in [(Act::Silu, Scalar::BF16), (Act::Gelu, Scalar::F32), (Act::GeluTanh, Scalar::F16)] {
            let op = WeightOp { residual: true, ..WeightOp::gated(elem, act) };
            check(&kernel(&op, 33, 24, &p), &op, 17, 33, 24);
        }
        let op = WeightOp { bias: true, ..WeightOp::gated(Scalar::BF16, Act::Silu) };
        check(&kernel(&op, 3, 7, &p), &op, 5, 3, 7);
    }

    #[test]
    fn gpu_gemm_default_params() {
        let op = WeightOp::plain(Scalar::BF16);
        let p = GemmParams::DEFAULT;
        assert_eq!(p.threads(), 256);
        check(&kernel(&op, 33, 40, &p), &op, 70, 33, 40);
    }
}
