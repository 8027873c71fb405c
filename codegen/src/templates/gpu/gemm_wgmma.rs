//! Tensor-core GEMM for prefill on Hopper's warpgroup MMA (sm_90a):
//! `y[m, n] = x[m, k] · W[n, k]ᵀ` (or the gated pair) with `W` in bf16 or
//! f16, on `wgmma.mma_async.m64nNk16` ([`Wgmma`]) with f32 accumulation.
//!
//! It is the sm_90a body of the kernels whose prefill path is
//! [`super::gemm_tc`] (`mma.sync`): same buffers, epilogues, precision
//! (activations rounded to the weights' type when staged, products exact,
//! sums in f32) and, above all, the same launch for the same
//! [`TcParams`] (block of `tc.threads()` threads, the same `bm x bn` block
//! tile and `bk` slices), so that one launch plan serves the sm_80, sm_90
//! and sm_90a modules. [`super::weight_product`] builds both bodies and
//! attaches this one as the kernel's [`crate::kir::Kernel::sm90a`] variant,
//! which `emit_ptx` lowers for sm_90a only.
//!
//! Mapping: the block's `threads / 128` warpgroups split the block tile
//! into `bm / 64` rows by the rest along `n`, each warpgroup owning a
//! `64 x nw` tile (`nw = bn * 64 * 128 / (bm * threads)`, a multiple of 8
//! up to 256: [`fits`] says whether the parameters allow it). The default
//! 128 x 64 tile of 256 threads is two warpgroups of `m64n64`, 32
//! accumulators per thread and weight, as in the `mma.sync` kernel.
//!
//! Each `bk` slice of `x` and of the weights is staged in shared memory in
//! the no-swizzle ("interleave") K-major layout of 8 x 8 core matrices
//! (row `r`, column `c` at element
//! `(r / 8) (8 bk) + (c / 8) 64 + (r % 8) 8 + c % 8`: the core matrices along `k` are adjacent, 128 bytes apart, the
//! next 8 rows `16 bk` bytes further), with zeros past `m`, `n` or `k`, by
//! the same coalesced vector loads as the `mma.sync` kernel. Then every
//! thread fences its stores for the async proxy, the block synchronises,
//! and each warpgroup issues `bk / 16` wgmmas per weight
//! (`wgmma.fence`, the MMAs, `commit`, `wait 0`) before the barrier that
//! lets the next slice overwrite the tiles. Not yet done: swizzled layouts
//! (the no-swizzle one has bank conflicts), TMA or `cp.async` staging and a
//! multi-stage pipeline that overlaps the copies with the MMAs.

use super::gemm::Stage;
use super::{block_x, declare, store_cell, thread_x, vec_width, Operands, TcParams, WeightOp};
use crate::kir::{Access, AsyncSync, BufId, Builder, Expr, Scalar, SmemMatrix, Space, Special, Var, Wgmma};
use crate::templates::c;
use crate::templates::sym::ceil_div;

/// The warpgroup tiling of a block for `p`: warpgroups along `m` and `n`,
/// and each warpgroup's `N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgTiling {
    pub groups_m: usize,
    pub groups_n: usize,
    pub nw: usize,
}

/// The warpgroup tiling of the `mma.sync` kernel's block for `p`, or
/// `None` when its block cannot be cut into `64 x N` warpgroup tiles with
/// the same thread count (then the kernel keeps `mma.sync` on sm_90a too).
pub fn fits(p: &TcParams) -> Option<WgTiling> {
    let threads = p.threads();
    if p.check().is_err() || !threads.is_multiple_of(128) || !p.bm.is_multiple_of(64) {
        return None;
    }
    let groups = threads / 128;
    let groups_m = p.bm / 64;
    if groups_m == 0 || !groups.is_multiple_of(groups_m) {
        return None;
    }
    let groups_n = groups / groups_m;
    if !p.bn.is_multiple_of(groups_n) {
        return None;
    }
    let nw = p.bn / groups_n;
    (nw.is_multiple_of(8) && (8..=256).contains(&nw)).then_some(WgTiling { groups_m, groups_n, nw })
}

/// The shared tiles: `x`'s and one per weight, in the weights' type and
/// the core-matrix layout.
pub(super) struct Tiles {
    a: BufId,
    w: Vec<BufId>,
}

pub(super) fn shared(b: &mut Builder, op: &WeightOp, p: &TcParams) -> Tiles {
    let mut tile =
        |name: &str, rows: usize| b.buffer(name, op.w_elem, Expr::idx(rows * p.bk), Space::Shared, Access::Write);
    let a = tile("x_tile", p.bm);
    let names: &[&str] = if op.gate.is_some() { &["w_gate_tile", "w_up_tile"] } else { &["w_tile"] };
    let w = names.iter().map(|name| tile(name, p.bn)).collect();
    Tiles { a, w }
}

/// Declares the operands of `op` for `m` rows and builds the wgmma GEMM
/// into `b`, launched like [`super::gemm_tc::gemm_tc`] with the same `p`.
pub fn gemm_wgmma(b: &mut Builder, m: Expr, op: &WeightOp, n: usize, k: usize, p: &TcParams) -> Result<(), String> {
    op.check(n, k)?;
    p.check()?;
    if !super::gemm_tc::supports(op) {
        return Err(format!("wgmma GEMM of {:?} weights (bf16 or f16 only)", op.w_elem));
    }
    if fits(p).is_none() {
        return Err(format!("no 64 x N warpgroup tiling of the block for {p:?}"));
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

/// The element index of row `r`, column `c` of a staged slice `bk` wide.
fn core_index(r: Expr, c: Expr, bk: usize) -> Expr {
    r.clone() / Expr::idx(8) * Expr::idx(8 * bk)
        + c.clone() / Expr::idx(8) * Expr::idx(64)
        + r % Expr::idx(8) * Expr::idx(8)
        + c % Expr::idx(8)
}

/// The tile of `y` at rows `m0..`, columns `n0..` (`p` must [`fits`]).
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
    let Some(wt) = fits(p) else { unreachable!("gemm_wgmma::tile without a warpgroup tiling") };
    let bk = p.bk;
    let m0 = b.let_("m0", m0);
    let n0 = b.let_("n0", n0);
    let t = b.let_("t", thread_x());
    let wg = b.let_("wg", Expr::Var(t) / Expr::idx(128));
    let wtid = b.let_("wtid", Expr::Var(t) % Expr::idx(128));
    let warp = b.let_("warp", Expr::Var(wtid) / Expr::idx(32));
    let lane = b.let_("lane", Expr::Var(wtid) % Expr::idx(32));
    let g = b.let_("g", Expr::Var(lane) / Expr::idx(4));
    let tq = b.let_("tq", Expr::Var(lane) % Expr::idx(4));
    let wr = b.let_("wr", Expr::Var(wg) / Expr::idx(wt.groups_n) * Expr::idx(64));
    let wc = b.let_("wc", Expr::Var(wg) % Expr::idx(wt.groups_n) * Expr::idx(wt.nw));
    // accs[weight][i]: register i of this thread's fragment of D.
    let accs: Vec<Vec<Var>> = o.w.iter().map(|_| (0..wt.nw / 2).map(|_| b.let_("acc", c(0.0, 1))).collect()).collect();
    let copy = Stage { t, threads: p.threads(), k, bk };
    b.for_("k0", Expr::idx(0), Expr::idx(k), bk as i64, crate::kir::LoopKind::Serial, |b, k0| {
        let k0 = b.let_("k0", k0);
        slice(&copy, b, o.x, vec_width(Scalar::F32, k), m.clone(), m0, k0, tiles.a, p.bm, bk);
        for (&w, &dst) in o.w.iter().zip(&tiles.w) {
            slice(&copy, b, w, vec_width(op.w_elem, k), Expr::idx(n), n0, k0, dst, p.bn, bk);
        }
        // This thread's generic stores, then everyone's, before the async
        // proxy reads the tiles.
        b.async_sync(AsyncSync::ProxyFenceShared);
        b.barrier();
        b.async_sync(AsyncSync::WgmmaFence);
        for kk in (0..bk).step_by(16) {
            for (acc, &w_tile) in accs.iter().zip(&tiles.w) {
                let desc = |buf: BufId, row0: Var| SmemMatrix {
                    buf,
                    // Row `row0` (a multiple of 8) and column `kk`.
                    start: Expr::Var(row0) * Expr::idx(bk) + Expr::idx(kk * 8),
                    lbo: 128,
                    sbo: (16 * bk) as u32,
                };
                b.wgmma(Wgmma {
                    elem: op.w_elem,
                    n: wt.nw as u32,
                    d: acc.clone(),
                    a: desc(tiles.a, wr),
                    b: desc(w_tile, wc),
                });
            }
        }
        b.async_sync(AsyncSync::WgmmaCommit);
        b.async_sync(AsyncSync::WgmmaWait(0));
        // The next slice overwrites the tiles.
        b.barrier();
    });
    for i in 0..wt.nw / 2 {
        // Wgmma::d_cell, with the warp and lane known at run time only.
        let row = Expr::Var(m0)
            + Expr::Var(wr)
            + Expr::Var(warp) * Expr::idx(16)
            + Expr::Var(g)
            + Expr::idx(8 * ((i / 2) % 2));
        let col = Expr::Var(n0) + Expr::Var(wc) + Expr::Var(tq) * Expr::idx(2) + Expr::idx(8 * (i / 4) + i % 2);
        let dots = accs.iter().map(|a| Expr::Var(a[i])).collect();
        store_cell(b, o, op, m, n, row, col, dots);
    }
}

/// [`Stage::slice_with`] into `dst` in the core-matrix layout (rounded to
/// `dst`'s type by the store). A vector of `vw <= 8` lanes starts at a
/// column that is a multiple of `vw`, so it stays inside one 16-byte row
/// of a core matrix and keeps its alignment.
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
    bk: usize,
) {
    stage.slice_with(b, src, vw, total, row0, k0, rows, |b, r, cc, val| {
        b.store(dst, core_index(Expr::Var(r), Expr::Var(cc), bk), Expr::Var(val));
    });
}

#[cfg(test)]
mod tests {
    use super::super::weight_testing::check_rounded;
    use super::*;
    use crate::kir::interp::{self, BufData, Mode};
    use crate::kir::Kernel;
    use crate::templates::matmul_dyn::Act;
    use crate::templates::testing::rand;

    fn kernel(op: &WeightOp, n: usize, k: usize, p: &TcParams) -> Kernel {
        let mut b = Builder::new(&format!("gemm_wgmma_{}", op.describe()));
        let m = b.scalar_param("m");
        gemm_wgmma(&mut b, m, op, n, k, p).unwrap();
        b.finish().unwrap()
    }

    /// One warpgroup of m64n16 (128 threads, the block 64 x 16): edges in
    /// m, n and k (n not a multiple of 8, k not of 16), several k slices and
    /// row blocks, the types taking turns (the simulation is slow).
    #[test]
    fn gpu_gemm_wgmma_edges() {
        let p = TcParams { bm: 64, bn: 16, bk: 16, wm: 16, wn: 16 };
        assert_eq!(fits(&p), Some(WgTiling { groups_m: 1, groups_n: 1, nw: 16 }));
        for (i, (m, n, k)) in
            [(1, 24, 40), (5, 37, 52), (17, 72, 40), (70, 37, 52), (130, 24, 40)].into_iter().enumerate()
        {
            let op = WeightOp::plain([Scalar::BF16, Scalar::F16][i % 2]);
            check_rounded(&kernel(&op, n, k, &p), &op, m, n, k);
        }
    }

    /// Two warpgroups side by side along n (m64n16 each, 256 threads), 32
    /// wide k slices: the gated and bias/residual epilogues.
    #[test]
    fn gpu_gemm_wgmma_epilogues() {
        let p = TcParams { bm: 64, bn: 32, bk: 32, wm: 32, wn: 8 };
        assert_eq!(fits(&p), Some(WgTiling { groups_m: 1, groups_n: 2, nw: 16 }));
        let op = WeightOp::gated(Scalar::F16, Act::Silu);
        check_rounded(&kernel(&op, 37, 52, &p), &op, 17, 37, 52);
        let op = WeightOp { bias: true, residual: true, ..WeightOp::plain(Scalar::BF16) };
        check_rounded(&kernel(&op, 72, 40, &p), &op, 5, 72, 40);
        let op = WeightOp { bias: true, residual: true, ..WeightOp::gated(Scalar::BF16, Act::GeluTanh) };
        check_rounded(&kernel(&op, 24, 40, &p), &op, 70, 24, 40);
    }

    /// The default parameters: two warpgroups of m64n64 stacked along m, the
    /// launch of the `mma.sync` kernel.
    #[test]
    fn gpu_gemm_wgmma_default_params() {
        let p = TcParams::DEFAULT;
        assert_eq!(fits(&p), Some(WgTiling { groups_m: 2, groups_n: 1, nw: 64 }));
        let op = WeightOp::plain(Scalar::BF16);
        let k = kernel(&op, 72, 40, &p);
        let mut tc = Builder::new("tc");
        let m = tc.scalar_param("m");
        super::super::gemm_tc::gemm_tc(&mut tc, m, &op, 72, 40, &p).unwrap();
        assert_eq!(tc.finish().unwrap().gpu, k.gpu, "the same launch as mma.sync");
        check_rounded(&k, &op, 130, 72, 40);
        let op = WeightOp::gated(Scalar::F16, Act::Silu);
        check_rounded(&kernel(&op, 24, 52, &p), &op, 5, 24, 52);
        // Blocks that cannot be cut into 64 x N warpgroup tiles.
        assert_eq!(fits(&TcParams { bm: 32, bn: 16, bk: 16, wm: 16, wn: 16 }), None);
        assert_eq!(fits(&TcParams { bm: 128, bn: 8, bk: 16, wm: 32, wn: 8 }), None);
        assert!(gemm_wgmma(&mut Builder::new("f32"), Expr::idx(4), &WeightOp::plain(Scalar::F32), 8, 8, &p).is_err());
    }

    /// The element values of `v` rounded to `elem`, and as its buffer.
    fn narrow(elem: Scalar, v: Vec<f32>) -> (Vec<f32>, BufData) {
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
    }

    /// One warpgroup, one `m64nNk16` wgmma with `D` starting from a nonzero
    /// C, A and B copied into shared memory in the core-matrix layout (with
    /// core matrices along k *not* adjacent, to exercise both offsets),
    /// against a naive product of the same values.
    #[test]
    fn gpu_wgmma_statement_matches_naive_matmul() {
        for (elem, nn) in [(Scalar::BF16, 24usize), (Scalar::F16, 8), (Scalar::BF16, 256)] {
            let mut b = Builder::new("wgmma_one");
            let ga = b.buffer("a", elem, Expr::idx(64 * 16), Space::Global, Access::Read);
            let gb = b.buffer("b", elem, Expr::idx(nn * 16), Space::Global, Access::Read);
            let gc = b.input("c", Expr::idx(64 * nn));
            let y = b.output("y", Expr::idx(64 * nn));
            // A: sbo 128 bytes (consecutive row groups), lbo 8 x 128 bytes
            // (the second k half after all row groups), plus one 16-byte
            // pad at the start; B: lbo 128, sbo 256 (k halves adjacent).
            let (a_lbo, a_sbo, a_pad) = (8 * 128u32, 128u32, 8usize);
            let (b_lbo, b_sbo) = (128u32, 256u32);
            let sa = b.buffer("sa", elem, Expr::idx(a_pad + 64 * 16), Space::Shared, Access::Write);
            let sb = b.buffer("sb", elem, Expr::idx(nn * 16), Space::Shared, Access::Write);
            b.gpu_launch([128, 1, 1], [Expr::idx(1), Expr::idx(1), Expr::idx(1)]);
            let t = b.let_("t", thread_x());
            let am = SmemMatrix { buf: sa, start: Expr::idx(a_pad), lbo: a_lbo, sbo: a_sbo };
            let bm = SmemMatrix { buf: sb, start: Expr::idx(0), lbo: b_lbo, sbo: b_sbo };
            // Thread t copies row t % 64 (its half of k) of A and, while
            // rows remain, of B, element by element.
            for (src, mat, rows) in [(ga, &am, 64usize), (gb, &bm, nn)] {
                for r in (0..rows).step_by(128) {
                    let row = b.let_("row", Expr::Var(t) + Expr::idx(r));
                    b.if_(
                        Expr::Var(row).lt(Expr::idx(rows)),
                        |b| {
                            for cc in 0..16 {
                                // offset(row, cc) with row known at run time.
                                let at = mat.start.clone()
                                    + Expr::Var(row) / Expr::idx(8) * Expr::idx(mat.sbo as usize / 2)
                                    + Expr::idx((cc / 8) * (mat.lbo as usize / 2) + cc % 8)
                                    + Expr::Var(row) % Expr::idx(8) * Expr::idx(8);
                                let v = Expr::load(src, Expr::Var(row) * Expr::idx(16) + Expr::idx(cc), 1);
                                b.store(mat.buf, at, v);
                            }
                        },
                        |_| {},
                    );
                }
            }
            b.async_sync(AsyncSync::ProxyFenceShared);
            b.barrier();
            let cell = |i: usize| {
                // Wgmma::d_cell at run time.
                let w = Expr::Var(t) / Expr::idx(32);
                let lane = Expr::Var(t) % Expr::idx(32);
                let row = w * Expr::idx(16) + lane.clone() / Expr::idx(4) + Expr::idx(8 * ((i / 2) % 2));
                let col = lane % Expr::idx(4) * Expr::idx(2) + Expr::idx(8 * (i / 4) + i % 2);
                row * Expr::idx(nn) + col
            };
            let d: Vec<Var> = (0..nn / 2).map(|i| b.let_("d", Expr::load(gc, cell(i), 1))).collect();
            b.async_sync(AsyncSync::WgmmaFence);
            b.wgmma(Wgmma { elem, n: nn as u32, d: d.clone(), a: am.clone(), b: bm.clone() });
            b.async_sync(AsyncSync::WgmmaCommit);
            b.async_sync(AsyncSync::WgmmaWait(0));
            for (i, v) in d.iter().enumerate() {
                b.store(y, cell(i), Expr::Var(*v));
            }
            let k = b.finish().unwrap();
            assert!(k.to_string().contains(&format!("wgmma_m64n{nn}k16")), "{k}");
            let (av, abuf) = narrow(elem, rand(64 * 16, 1));
            let (bv, bbuf) = narrow(elem, rand(nn * 16, 2));
            let cv = rand(64 * nn, 3);
            let mut bufs = vec![abuf, bbuf, BufData::F32(cv.clone()), BufData::F32(vec![0.0; 64 * nn])];
            interp::run(&k, &mut bufs, &[], Mode::Gpu { grid: [1, 1, 1], block: [128, 1, 1] }).unwrap();
            let got = bufs[3].f32();
            let mut worst = 0f64;
            for r in 0..64 {
                for col in 0..nn {
                    let want: f64 = cv[r * nn + col] as f64
                        + (0..16).map(|kk| av[r * 16 + kk] as f64 * bv[col * 16 + kk] as f64).sum::<f64>();
                    let g = got[r * nn + col] as f64;
                    let rel = (g - want).abs() / want.abs().max(f64::MIN_POSITIVE);
                    worst = worst.max(rel);
                    assert!(rel <= 2f64.powi(-24), "{elem:?} n{nn} d[{r}][{col}] = {g}, want {want}");
                }
            }
            eprintln!("wgmma m64n{nn}k16 {elem:?}: max relative error {worst:e}");
            // Short warpgroups and CPU mode are refused.
            let mut bufs2 = bufs.clone();
            let err = interp::run(&k, &mut bufs2, &[], Mode::Gpu { grid: [1, 1, 1], block: [64, 1, 1] });
            assert!(err.is_err());
            let err = interp::run(&k, &mut bufs, &[], Mode::Cpu { threads: 1 });
            assert!(err.is_err());
        }
    }

    /// The interpreter enforces the asynchronous protocol: each broken rule
    /// is an error that names it.
    #[test]
    fn gpu_wgmma_protocol_is_checked() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Break {
            None,
            NoProxyFence,
            NoWgmmaFence,
            ReadBeforeWait,
            StoreBeforeWait,
            NoWait,
            DescriptorsDiffer,
        }
        for case in [
            Break::None,
            Break::NoProxyFence,
            Break::NoWgmmaFence,
            Break::ReadBeforeWait,
            Break::StoreBeforeWait,
            Break::NoWait,
            Break::DescriptorsDiffer,
        ] {
            let mut b = Builder::new("wgmma_protocol");
            let y = b.output("y", Expr::idx(128));
            let s = b.buffer("s", Scalar::BF16, Expr::idx(64 * 16 + 8), Space::Shared, Access::Write);
            b.gpu_launch([128, 1, 1], [Expr::idx(1), Expr::idx(1), Expr::idx(1)]);
            let t = b.let_("t", thread_x());
            b.store(s, Expr::Var(t), c(1.0, 1));
            if case != Break::NoProxyFence {
                b.async_sync(AsyncSync::ProxyFenceShared);
            }
            b.barrier();
            let d: Vec<Var> = (0..4).map(|_| b.let_("d", c(0.0, 1))).collect();
            if case != Break::NoWgmmaFence {
                b.async_sync(AsyncSync::WgmmaFence);
            }
            let start = if case == Break::DescriptorsDiffer {
                Expr::Var(t) / Expr::idx(64) * Expr::idx(8)
            } else {
                Expr::idx(0)
            };
            let mat = SmemMatrix { buf: s, start, lbo: 128, sbo: 256 };
            b.wgmma(Wgmma { elem: Scalar::BF16, n: 8, d: d.clone(), a: mat.clone(), b: mat });
            b.async_sync(AsyncSync::WgmmaCommit);
            match case {
                Break::ReadBeforeWait => b.store(y, Expr::Var(t), Expr::Var(d[0])),
                Break::StoreBeforeWait => b.store(s, Expr::Var(t), c(2.0, 1)),
                _ => {}
            }
            if case != Break::NoWait {
                b.async_sync(AsyncSync::WgmmaWait(0));
            }
            b.store(y, Expr::Var(t), Expr::Var(d[0]) + Expr::Var(d[3]));
            let k = b.finish().unwrap();
            let mut bufs = vec![BufData::F32(vec![0.0; 128])];
            let r = interp::run(&k, &mut bufs, &[], Mode::Gpu { grid: [1, 1, 1], block: [128, 1, 1] });
            let want = match case {
                Break::None => None,
                Break::NoProxyFence => Some("fence.proxy.async"),
                Break::NoWgmmaFence => Some("wgmma.fence"),
                Break::ReadBeforeWait | Break::NoWait => Some("in flight"),
                Break::StoreBeforeWait => Some("in flight reads it"),
                Break::DescriptorsDiffer => Some("descriptors differ"),
            };
            match (want, r) {
                (None, Ok(())) => {
                    // Row 0 of A (64 ones then zeros) times column 0 of B
                    // (the same matrix): 16 ones; thread 0 holds D[0][0].
                    assert_eq!(bufs[0].f32()[0], 16.0);
                }
                (Some(w), Err(e)) => assert!(e.to_string().contains(w), "{case:?}: {e}"),
                (w, r) => panic!("{case:?}: expected {w:?}, got {r:?}"),
            }
        }
    }
}
