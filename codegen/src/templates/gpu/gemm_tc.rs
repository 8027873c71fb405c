//! Tensor-core GEMM for prefill: `y[m, n] = x[m, k] · W[n, k]ᵀ` (or the
//! gated pair) with `W` in bf16 or f16, on `mma.sync.m16n8k16` ([`Mma`])
//! with f32 accumulation.
//!
//! **Precision:** the activations `x` (f32 in global memory) are rounded
//! to the weights' element type (to nearest even) when they are staged in
//! shared memory, so this path computes `round(x) · W` exactly in its
//! products and in f32 in its sums. That is the usual mixed-precision
//! contract of bf16/f16 inference; f32 weights never come here (they keep
//! the SIMT [`super::gemm`], whose products are f32).
//!
//! A block computes a `bm x bn` tile of `y` with `bm / wm * bn / wn` warps,
//! each owning a `wm x wn` warp tile of `wm / 16 x wn / 8` MMA tiles (one
//! `f32` accumulator fragment of 4 per thread each). For each `bk`-wide
//! slice of `k` the block copies the `bm x bk` slice of `x` and the
//! `bn x bk` slice of each weight into shared memory, both `k`-major as in
//! global memory (`[row][bk + 8]`: the padding of 8 elements, 16 bytes,
//! puts the 8 rows a fragment load touches in different banks), with
//! vector loads along `k` (consecutive threads, consecutive vectors:
//! coalesced) and zeros past `m`, `n` or `k`. Then each warp runs `bk / 16`
//! steps of MMAs whose fragments are 32-bit loads from those tiles (the
//! `A` fragments of an MMA row and the `B` fragments of a column are
//! shared by the MMAs that repeat their indices; the lowering's CSE merges
//! the loads). Stores past `m` or `n` are skipped; the barriers are reached
//! by every thread. Not yet done: `ldmatrix`, `cp.async` double buffering
//! and 2-wide stores.
//!
//! On sm_90a the weight products replace this GEMM with
//! [`super::gemm_wgmma`] (same contract and launch for the same
//! [`TcParams`]) through the kernel's sm_90a variant; sm_80 and sm_90 run
//! this one.

use super::gemm::Stage;
use super::{block_x, declare, store_cell, thread_x, vec_width, Operands, WeightOp};
use crate::kir::{Access, BufId, Builder, Expr, LoopKind, Mma, Scalar, Space, Special, Var};
use crate::templates::c;
use crate::templates::sym::ceil_div;

/// Tuning parameters of [`gemm_tc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcParams {
    /// Rows of `y` per block tile (a multiple of `wm`).
    pub bm: usize,
    /// Columns of `y` per block tile (a multiple of `wn`).
    pub bn: usize,
    /// The slice of `k` staged in shared memory per step (a multiple of 16).
    pub bk: usize,
    /// Rows of a warp's tile (a multiple of 16).
    pub wm: usize,
    /// Columns of a warp's tile (a multiple of 8).
    pub wn: usize,
}

impl TcParams {
    /// 128x64 block tiles of 8 warps (256 threads, the GEMV's block), each
    /// warp 32x32 (2 x 4 MMA tiles, 32 accumulators per thread and
    /// weight), `k` slices of 32: 15 KiB of shared memory (20 KiB gated).
    pub const DEFAULT: TcParams = TcParams { bm: 128, bn: 64, bk: 32, wm: 32, wn: 32 };

    pub fn warps(&self) -> usize {
        (self.bm / self.wm.max(1)) * (self.bn / self.wn.max(1))
    }

    pub fn threads(&self) -> usize {
        32 * self.warps()
    }

    pub fn check(&self) -> Result<(), String> {
        if self.wm == 0 || !self.wm.is_multiple_of(16) || self.wn == 0 || !self.wn.is_multiple_of(8) {
            return Err(format!("tensor-core warp tile must be a multiple of 16 x 8: {self:?}"));
        }
        if self.bm == 0 || self.bn == 0 || !self.bm.is_multiple_of(self.wm) || !self.bn.is_multiple_of(self.wn) {
            return Err(format!("tensor-core block tile must be a positive multiple of the warp tile: {self:?}"));
        }
        if self.bk == 0 || !self.bk.is_multiple_of(16) {
            return Err(format!("tensor-core k-slice must be a positive multiple of 16: {self:?}"));
        }
        if self.threads() > 1024 {
            return Err(format!("tensor-core GEMM block of {} threads (at most 1024): {self:?}", self.threads()));
        }
        Ok(())
    }

    /// The row stride of the shared tiles, in elements.
    fn ld(&self) -> usize {
        self.bk + 8
    }
}

/// The shared tiles: `x`'s and one per weight, in the weights' type.
pub(super) struct Tiles {
    a: BufId,
    w: Vec<BufId>,
}

pub(super) fn shared(b: &mut Builder, op: &WeightOp, p: &TcParams) -> Tiles {
    let mut tile =
        |name: &str, rows: usize| b.buffer(name, op.w_elem, Expr::idx(rows * p.ld()), Space::Shared, Access::Write);
    let a = tile("x_tile", p.bm);
    let names: &[&str] = if op.gate.is_some() { &["w_gate_tile", "w_up_tile"] } else { &["w_tile"] };
    let w = names.iter().map(|name| tile(name, p.bn)).collect();
    Tiles { a, w }
}

/// Whether `op` can run on the tensor cores here (bf16 or f16 weights).
pub fn supports(op: &WeightOp) -> bool {
    op.w_elem.is_narrow_float()
}

/// Declares the operands of `op` for `m` rows (a constant or a scalar
/// parameter of `b`) and builds the tensor-core GEMM into `b`, launched on
/// a `ceil(n / bn) x ceil(m / bm)` grid.
pub fn gemm_tc(b: &mut Builder, m: Expr, op: &WeightOp, n: usize, k: usize, p: &TcParams) -> Result<(), String> {
    op.check(n, k)?;
    p.check()?;
    if !supports(op) {
        return Err(format!("tensor-core GEMM of {:?} weights (bf16 or f16 only)", op.w_elem));
    }
    let o = declare(b, op, &m, n, k);
    let tiles = shared(b, op, p);
    b.gpu_launch([p.threads() as u32, 1, 1], [Expr::idx(n.div_ceil(p.bn)), ceil_div(m.clone(), p.bm), Expr::idx(1)]);
    b.promise_aligned_vectors();
    let m0 = Expr::Special(Special::BlockIdx(1)) * Expr::idx(p.bm);
    let n0 = block_x() * Expr::idx(p.bn);
    tile(b, &o, op, &m, n, k, p, &tiles, m0, n0);
    Ok(())
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
    p: &TcParams,
    tiles: &Tiles,
    m0: Expr,
    n0: Expr,
) {
    let ld = p.ld();
    let (mt, nt) = (p.wm / 16, p.wn / 8);
    let m0 = b.let_("m0", m0);
    let n0 = b.let_("n0", n0);
    let t = b.let_("t", thread_x());
    let warp = b.let_("warp", Expr::Var(t) / Expr::idx(32));
    let lane = b.let_("lane", Expr::Var(t) % Expr::idx(32));
    let g = b.let_("g", Expr::Var(lane) / Expr::idx(4));
    let tq = b.let_("tq", Expr::Var(lane) % Expr::idx(4));
    let wr = b.let_("wr", Expr::Var(warp) / Expr::idx(p.bn / p.wn) * Expr::idx(p.wm));
    let wc = b.let_("wc", Expr::Var(warp) % Expr::idx(p.bn / p.wn) * Expr::idx(p.wn));
    // This lane's first fragment element in the tiles: A's row `wr + g`,
    // B's (W's) row `wc + g`, both at `k` offset `2 tq`.
    let a0 = b.let_("a0", (Expr::Var(wr) + Expr::Var(g)) * Expr::idx(ld) + Expr::Var(tq) * Expr::idx(2));
    let b0 = b.let_("b0", (Expr::Var(wc) + Expr::Var(g)) * Expr::idx(ld) + Expr::Var(tq) * Expr::idx(2));
    // accs[weight][i][j]: the fragment of MMA tile (i, j), 4 f32.
    let accs: Vec<Vec<Vec<[Var; 4]>>> =
        o.w.iter()
            .map(|_| (0..mt).map(|_| (0..nt).map(|_| [(); 4].map(|_| b.let_("acc", c(0.0, 1)))).collect()).collect())
            .collect();
    let copy = Stage { t, threads: p.threads(), k, bk: p.bk };
    b.for_("k0", Expr::idx(0), Expr::idx(k), p.bk as i64, LoopKind::Serial, |b, k0| {
        let k0 = b.let_("k0", k0);
        slice(&copy, b, o.x, vec_width(Scalar::F32, k), m.clone(), m0, k0, tiles.a, p.bm, ld);
        for (&w, &dst) in o.w.iter().zip(&tiles.w) {
            slice(&copy, b, w, vec_width(op.w_elem, k), Expr::idx(n), n0, k0, dst, p.bn, ld);
        }
        b.barrier();
        let steps = (p.bk / 16) as u32;
        b.for_("kk", Expr::idx(0), Expr::idx(p.bk), 16, LoopKind::Unroll(steps), |b, kk| {
            for (acc, &wt) in accs.iter().zip(&tiles.w) {
                for (i, row) in acc.iter().enumerate() {
                    for (j, d) in row.iter().enumerate() {
                        let at = |base: Var, off: usize| Expr::Var(base) + kk.clone() + Expr::idx(off);
                        let a_at = [0, 1, 2, 3].map(|r| at(a0, (i * 16 + 8 * (r % 2)) * ld + 8 * (r / 2)));
                        let b_at = [0, 1].map(|r| at(b0, j * 8 * ld + 8 * r));
                        b.mma(Mma { elem: op.w_elem, d: *d, a: tiles.a, a_at, b: wt, b_at, c: d.map(Expr::Var) });
                    }
                }
            }
        });
        // The next slice overwrites the tiles.
        b.barrier();
    });
    for i in 0..mt {
        for j in 0..nt {
            for e in 0..4 {
                let row = Expr::Var(m0) + Expr::Var(wr) + Expr::Var(g) + Expr::idx(i * 16 + 8 * (e / 2));
                let col = Expr::Var(n0) + Expr::Var(wc) + Expr::Var(tq) * Expr::idx(2) + Expr::idx(j * 8 + e % 2);
                let dots = accs.iter().map(|a| Expr::Var(a[i][j][e])).collect();
                store_cell(b, o, op, m, n, row, col, dots);
            }
        }
    }
}

/// [`Stage::slice_with`] into `dst[r * ld + c]`, row-major as the
/// fragments read it (rounded to `dst`'s type by the store).
#[allow(clippy::too_many_arguments)]
fn slice(
    stage: &Stage,
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
    stage.slice_with(b, src, vw, total, row0, k0, rows, |b, r, cc, val| {
        b.store(dst, Expr::Var(r) * Expr::idx(ld) + Expr::Var(cc), Expr::Var(val));
    });
}

#[cfg(test)]
mod tests {
    use super::super::weight_testing::check_rounded;
    use super::*;
    use crate::kir::interp::{self, BufData, Mode};
    use crate::kir::{Kernel, Ty};
    use crate::templates::matmul_dyn::Act;
    use crate::templates::testing::rand;

    fn kernel(op: &WeightOp, n: usize, k: usize, p: &TcParams) -> Kernel {
        let mut b = Builder::new(&format!("gemm_tc_{}", op.describe()));
        let m = b.scalar_param("m");
        gemm_tc(&mut b, m, op, n, k, p).unwrap();
        b.finish().unwrap()
    }

    /// Small blocks (2 warps of 16x16, block 32x16): edges in m, n and k
    /// (n not a multiple of 8, k not of 16), several k slices, both types.
    #[test]
    fn gpu_gemm_tc_edges() {
        let p = TcParams { bm: 32, bn: 16, bk: 16, wm: 16, wn: 16 };
        for elem in [Scalar::BF16, Scalar::F16] {
            let op = WeightOp::plain(elem);
            for (m, n, k) in [(1, 24, 40), (5, 37, 52), (17, 24, 52), (70, 37, 40)] {
                check_rounded(&kernel(&op, n, k, &p), &op, m, n, k);
            }
        }
    }

    /// The bias/residual and gated epilogues, and a 2x2 warp grid of 16x8
    /// warp tiles with 32-wide k slices.
    #[test]
    fn gpu_gemm_tc_epilogues() {
        let p = TcParams { bm: 32, bn: 16, bk: 32, wm: 16, wn: 8 };
        for elem in [Scalar::BF16, Scalar::F16] {
            let op = WeightOp { bias: true, residual: true, ..WeightOp::plain(elem) };
            for (m, n, k) in [(17, 37, 40), (5, 24, 52)] {
                check_rounded(&kernel(&op, n, k, &p), &op, m, n, k);
            }
            let op = WeightOp::gated(elem, Act::Silu);
            check_rounded(&kernel(&op, 37, 52, &p), &op, 17, 37, 52);
            let op = WeightOp { bias: true, residual: true, ..WeightOp::gated(elem, Act::Silu) };
            check_rounded(&kernel(&op, 24, 40, &p), &op, 5, 24, 40);
        }
    }

    #[test]
    fn gpu_gemm_tc_default_params() {
        let p = TcParams::DEFAULT;
        assert_eq!(p.threads(), 256);
        p.check().unwrap();
        let op = WeightOp::plain(Scalar::BF16);
        check_rounded(&kernel(&op, 24, 40, &p), &op, 5, 24, 40);
        assert!(gemm_tc(&mut Builder::new("f32"), Expr::idx(4), &WeightOp::plain(Scalar::F32), 8, 8, &p).is_err());
        assert!(TcParams { wm: 8, ..p }.check().is_err());
        assert!(TcParams { bk: 24, ..p }.check().is_err());
    }

    /// One warp, one `Mma` on a 16x8x16 tile loaded from shared memory by
    /// the PTX ISA's fragment layout, against a naive matmul of the same
    /// values; C is a nonzero input.
    #[test]
    fn gpu_mma_statement_matches_naive_matmul() {
        for elem in [Scalar::BF16, Scalar::F16] {
            let mut b = Builder::new("mma_one");
            let ga = b.buffer("a", elem, Expr::idx(16 * 16), Space::Global, Access::Read);
            let gb = b.buffer("b", elem, Expr::idx(8 * 16), Space::Global, Access::Read);
            let gc = b.input("c", Expr::idx(16 * 8));
            let y = b.output("y", Expr::idx(16 * 8));
            b.gpu_launch([32, 1, 1], [Expr::idx(1), Expr::idx(1), Expr::idx(1)]);
            let lane = b.let_("lane", thread_x());
            let g = b.let_("g", Expr::Var(lane) / Expr::idx(4));
            let tq = b.let_("tq", Expr::Var(lane) % Expr::idx(4));
            // A row-major [16][16]; B given as [n][k] (column-major 16x8).
            let a_at = [0, 1, 2, 3].map(|r| {
                (Expr::Var(g) + Expr::idx(8 * (r % 2))) * Expr::idx(16)
                    + Expr::Var(tq) * Expr::idx(2)
                    + Expr::idx(8 * (r / 2))
            });
            let b_at = [0, 1].map(|r| Expr::Var(g) * Expr::idx(16) + Expr::Var(tq) * Expr::idx(2) + Expr::idx(8 * r));
            let cell = |e: usize| {
                (Expr::Var(g) + Expr::idx(8 * (e / 2))) * Expr::idx(8) + Expr::Var(tq) * Expr::idx(2) + Expr::idx(e % 2)
            };
            let c_in = [0, 1, 2, 3].map(|e| Expr::load(gc, cell(e), 1));
            let d = [(); 4].map(|_| b.var("d", Ty::F32));
            b.mma(Mma { elem, d, a: ga, a_at, b: gb, b_at, c: c_in });
            for (e, dv) in d.iter().enumerate() {
                b.store(y, cell(e), Expr::Var(*dv));
            }
            let k = b.finish().unwrap();
            assert!(k.to_string().contains("mma_m16n8k16"), "{k}");
            let round = |v: Vec<f32>| -> (Vec<f32>, BufData) {
                match elem {
                    Scalar::BF16 => {
                        let h: Vec<half::bf16> = v.iter().map(|x| half::bf16::from_f32(*x)).collect();
                        (h.iter().map(|x| x.to_f32()).collect(), BufData::BF16(h))
                    }
                    _ => {
                        let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
                        (h.iter().map(|x| x.to_f32()).collect(), BufData::F16(h))
                    }
                }
            };
            let (av, abuf) = round(rand(256, 1));
            let (bv, bbuf) = round(rand(128, 2));
            let cv = rand(128, 3);
            let mut bufs = vec![abuf, bbuf, BufData::F32(cv.clone()), BufData::F32(vec![0.0; 128])];
            interp::run(&k, &mut bufs, &[], Mode::Gpu { grid: [1, 1, 1], block: [32, 1, 1] }).unwrap();
            let got = bufs[3].f32();
            for r in 0..16 {
                for col in 0..8 {
                    let want: f64 = cv[r * 8 + col] as f64
                        + (0..16).map(|kk| av[r * 16 + kk] as f64 * bv[col * 16 + kk] as f64).sum::<f64>();
                    let g = got[r * 8 + col] as f64;
                    // The interpreter rounds the exact sum once.
                    assert!(
                        (g - want).abs() <= want.abs() * 2f64.powi(-24),
                        "{elem:?} d[{r}][{col}] = {g}, want {want}"
                    );
                }
            }
            // Short warps and CPU mode are refused.
            let mut bufs2 = bufs.clone();
            let err = interp::run(&k, &mut bufs2, &[], Mode::Gpu { grid: [1, 1, 1], block: [16, 1, 1] });
            assert!(err.unwrap_err().to_string().contains("32 needed"));
            let err = interp::run(&k, &mut bufs, &[], Mode::Cpu { threads: 1 });
            assert!(err.is_err());
        }
    }
}
