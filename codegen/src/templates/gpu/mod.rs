//! GPU kernel templates: KIR with thread and block indices, shared memory,
//! barriers and warp shuffles, for the GPU lowering (KIR to NVPTX).
//!
//! This file owns what the weight-product templates share, `y = x · Wᵀ`
//! with `W` given `[n, k]` (how checkpoints store Linear weights), plain or
//! gated, with an optional bias and residual epilogue: the operands
//! ([`WeightOp`], `declare`), the epilogue, the vector width, and the one
//! kernel the scheduler uses for a symbolic number of rows
//! ([`weight_product`]), which branches at run time between [`gemv`] (decode)
//! and a GEMM (prefill): the tensor-core [`gemm_tc`] for bf16 and f16
//! weights, the SIMT [`gemm`] for f32 weights.
//!
//! **sm_90a:** a weight product whose GEMM path is [`gemm_tc`] also gets
//! an sm_90a body ([`crate::kir::Kernel::sm90a`], built from a fork of the
//! same builder) whose GEMM path is [`gemm_wgmma`] (Hopper's warpgroup
//! MMA), when the tensor-core parameters allow a 64 x N warpgroup tiling
//! with the same threads ([`gemm_wgmma::fits`], true of the defaults). Both
//! bodies share the kernel's name, buffers, scalars and launch, so the one
//! launch plan serves every PTX module; `emit_ptx` lowers the variant for
//! sm_90a only.
//!
//! **Precision of the prefill path with bf16/f16 weights:** the tensor
//! cores multiply bf16/f16 operands, so there the activations are rounded
//! to the weights' element type (to nearest even) before the products
//! (f32 accumulation); the GEMV path and f32 weights keep f32 activations
//! (f32 weights promise 1e-3 logits, which rounding `x` would break).
//!
//! Conventions of these templates, which the GPU lowering may rely on:
//! - global buffers: activations `x [m, k]` (f32), the weights `[n, k]`
//!   (f32, bf16 or f16), a bias `[n]` per weight if asked, a residual
//!   `[m, n]` if asked, the result `y [m, n]` (f32); then the scalar `m`
//!   when it is symbolic;
//! - every vector load or store is at an element index that is a multiple
//!   of its lane count, so it is naturally aligned when the buffer is: the
//!   templates choose the vector width from `k` ([`vec_width`]) instead of
//!   emitting loads that straddle rows, because a misaligned 16-byte load
//!   faults on a GPU;
//! - control flow that contains a barrier or a shuffle is uniform over the
//!   block (out-of-range rows are clamped for loading and skipped only at
//!   the store), as the interpreter's `Mode::Gpu` and `__syncthreads`
//!   require;
//! - sums accumulate in f32 with FMA.

pub mod attention;
pub mod concat;
pub mod gemm;
pub mod gemm_tc;
pub mod gemm_wgmma;
pub mod gemv;
pub mod gpuize;
pub mod norm;
pub mod rope;
pub mod rows;
pub mod softmax;
#[cfg(test)]
pub(crate) mod testing;

use crate::kir::{Access, BufId, Builder, CmpOp, Expr, Scalar, Space, Special};
use crate::templates::matmul_dyn::Act;
use crate::templates::sym::{as_const, ceil_div, mul};
pub use gemm::GemmParams;
pub use gemm_tc::TcParams;
pub use gemv::GemvParams;

/// Streaming multiprocessors of the target (an H200 has 132); sizes the
/// grid of [`weight_product`] so that its tiled path fills the machine.
pub const SMS: usize = 132;

/// What a weight product computes: `x · Wᵀ` (plus `bias`), or with `gate`
/// `act(x · Wgᵀ + bg) * (x · Wuᵀ + bu)`, then plus `residual`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightOp {
    /// The weights' element type: `F32`, `BF16` or `F16`.
    pub w_elem: Scalar,
    /// The gated product over two weights (gate, then up) with this
    /// activation.
    pub gate: Option<Act>,
    /// One bias `[n]` per weight, added to its dot products.
    pub bias: bool,
    /// A residual `[m, n]` added to the result.
    pub residual: bool,
}

impl WeightOp {
    pub fn plain(w_elem: Scalar) -> WeightOp {
        WeightOp { w_elem, gate: None, bias: false, residual: false }
    }

    pub fn gated(w_elem: Scalar, act: Act) -> WeightOp {
        WeightOp { w_elem, gate: Some(act), bias: false, residual: false }
    }

    /// Number of weight operands (1, or 2 when gated).
    pub fn weights(&self) -> usize {
        if self.gate.is_some() {
            2
        } else {
            1
        }
    }

    /// A short description for kernel names, e.g. `bf16_silu_bias`.
    pub fn describe(&self) -> String {
        let mut s = format!("{:?}", self.w_elem).to_lowercase();
        if let Some(a) = self.gate {
            s += "_";
            s += a.name();
        }
        if self.bias {
            s += "_bias";
        }
        if self.residual {
            s += "_res";
        }
        s
    }

    fn check(&self, n: usize, k: usize) -> Result<(), String> {
        if !matches!(self.w_elem, Scalar::F32 | Scalar::BF16 | Scalar::F16) {
            return Err(format!("weights of element type {:?} (f32, bf16 or f16 expected)", self.w_elem));
        }
        if n == 0 || k == 0 {
            return Err(format!("empty weights [{n}, {k}]"));
        }
        Ok(())
    }
}

/// The global buffers of a weight product, in call order.
pub(crate) struct Operands {
    pub x: BufId,
    /// One per weight (gate, then up).
    pub w: Vec<BufId>,
    /// One per weight when the op has a bias.
    pub bias: Vec<BufId>,
    pub residual: Option<BufId>,
    pub y: BufId,
}

/// Declares the global buffers of `op` for `m` rows (see the module docs).
pub(crate) fn declare(b: &mut Builder, op: &WeightOp, m: &Expr, n: usize, k: usize) -> Operands {
    let suffixes: &[&str] = if op.gate.is_some() { &["_gate", "_up"] } else { &[""] };
    let x = b.input("x", mul(m.clone(), Expr::idx(k)));
    let w = suffixes
        .iter()
        .map(|s| b.buffer(&format!("w{s}"), op.w_elem, Expr::idx(n * k), Space::Global, Access::Read))
        .collect();
    let bias =
        if op.bias { suffixes.iter().map(|s| b.input(&format!("bias{s}"), Expr::idx(n))).collect() } else { vec![] };
    let residual = op.residual.then(|| b.input("residual", mul(m.clone(), Expr::idx(n))));
    let y = b.output("y", mul(m.clone(), Expr::idx(n)));
    Operands { x, w, bias, residual, y }
}

/// Stores one element of a tensor-core accumulator tile: `y[row, col]`
/// through the [`epilogue`] of its dot products `dots` (one per weight),
/// skipped past `m` rows or `n` columns (the tiles are whole, `y` is not).
#[allow(clippy::too_many_arguments)]
pub(super) fn store_cell(
    b: &mut Builder,
    o: &Operands,
    op: &WeightOp,
    m: &Expr,
    n: usize,
    row: Expr,
    col: Expr,
    dots: Vec<Expr>,
) {
    let row = b.let_("row", row);
    let col = b.let_("col", col);
    b.if_(
        gemm::and(Expr::Var(row).lt(m.clone()), Expr::Var(col).lt(Expr::idx(n))),
        |b| {
            let at = b.let_("at", Expr::Var(row) * Expr::idx(n) + Expr::Var(col));
            let v = epilogue(b, o, op, dots, &Expr::Var(at), &Expr::Var(col), 1);
            b.store(o.y, Expr::Var(at), v);
        },
        |_| {},
    );
}

/// The value of `y[at .. at + lanes]` (`at = row * n + col`) from the dot
/// products `dots`, one per weight, each `lanes` wide.
pub(crate) fn epilogue(
    b: &mut Builder,
    o: &Operands,
    op: &WeightOp,
    dots: Vec<Expr>,
    at: &Expr,
    col: &Expr,
    lanes: u8,
) -> Expr {
    let mut v: Vec<Expr> = dots;
    for (d, bias) in v.iter_mut().zip(&o.bias) {
        *d = d.clone() + Expr::load(*bias, col.clone(), lanes);
    }
    let mut out = match op.gate {
        None => v.swap_remove(0),
        Some(act) => {
            let g = b.let_("gate", v[0].clone());
            act.apply(b, g, lanes) * v[1].clone()
        }
    };
    if let Some(r) = o.residual {
        out = out + Expr::load(r, at.clone(), lanes);
    }
    out
}

/// The widest vector of at most 16 bytes of `elem` whose lane count
/// divides `k`: loads of that width along rows of length `k` never straddle
/// a row and stay naturally aligned. 4 for f32 and 8 for bf16/f16 when `k`
/// allows (real models' `k` always does), down to 1.
pub fn vec_width(elem: Scalar, k: usize) -> u8 {
    let mut w = 16 / elem.size();
    while w > 1 && !k.is_multiple_of(w) {
        w /= 2;
    }
    w as u8
}

pub(crate) fn thread_x() -> Expr {
    Expr::Special(Special::ThreadIdx(0))
}

pub(crate) fn block_x() -> Expr {
    Expr::Special(Special::BlockIdx(0))
}

/// Lane `i` of `e`, or `e` itself when it is a scalar.
pub(crate) fn lane(e: Expr, i: u8, lanes: u8) -> Expr {
    if lanes > 1 {
        Expr::Extract(Box::new(e), i)
    } else {
        e
    }
}

/// Tuning parameters of [`weight_product`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightProductParams {
    pub gemv: GemvParams,
    pub gemm: GemmParams,
    /// The tensor-core GEMM, which replaces `gemm` for bf16/f16 weights.
    pub tc: TcParams,
    /// Up to this many rows the GEMV path runs, above it the tiled GEMM.
    pub gemv_max_m: usize,
    /// Blocks in the (constant, one-dimensional) grid; both paths walk
    /// their work with a grid-stride loop.
    pub blocks: usize,
}

impl WeightProductParams {
    /// The smallest parameters whose tensor-core GEMM has an sm_90a
    /// (wgmma) body: one warpgroup of m64n16 tiles, and 4 GEMV warps to
    /// match its 128 threads; above 2 rows the GEMM runs. Small enough for
    /// tests that run both bodies in the interpreter.
    pub const ONE_WARPGROUP: WeightProductParams = WeightProductParams {
        gemv: GemvParams { groups: 4, warps_per_group: 1, rows_per_group: 2, unroll: 2, m_tile: 2 },
        gemm: GemmParams::DEFAULT,
        tc: TcParams { bm: 64, bn: 16, bk: 16, wm: 16, wn: 16 },
        gemv_max_m: 2,
        blocks: 2,
    };

    /// Defaults for an H200, by shape (the GEMV choices measured with a
    /// CUDA C++ mirror of the GEMV, see [`gemv`]):
    /// - the GEMV path uses 256-thread blocks (the GEMM's 64x64 tile with
    ///   4x4 per thread), groups of one warp streaming 2 rows of `W` each,
    ///   one load per row in flight per lane (more measured no faster), 4
    ///   rows of `x` per pass; a group gets more warps while `n` is too
    ///   small to give every SM two blocks, as long as each lane still has
    ///   two vectors of `k`;
    /// - up to 32 rows take the GEMV path: with `n / 64` tiles the tiled
    ///   kernel cannot fill 132 SMs, and on an H200 (CUDA mirrors, bf16
    ///   4096 x 4096) it took 199 us at m = 16 and 231 us at m = 64, where
    ///   a 4-row GEMV pass took 16 us (about 64 us and 250 us);
    /// - the grid is the GEMV's row blocks, or 4 blocks per SM if more, so
    ///   the tiled path runs as many tiles at once as the SMs hold.
    pub fn for_shape(op: &WeightOp, n: usize, k: usize) -> WeightProductParams {
        let gemm = GemmParams::DEFAULT;
        let warps = gemm.threads() / 32;
        let vw = vec_width(op.w_elem, k) as usize;
        let mut gemv = GemvParams { groups: warps, ..GemvParams::DEFAULT };
        while gemv.warps_per_group < warps && gemv.blocks(n) < 2 * SMS && k / vw >= 2 * 32 * 2 * gemv.warps_per_group {
            gemv.warps_per_group *= 2;
            gemv.groups /= 2;
        }
        let blocks = gemv.blocks(n).max(4 * SMS);
        WeightProductParams { gemv, gemm, tc: TcParams::DEFAULT, gemv_max_m: 32, blocks }
    }
}

/// Declares the operands of `op` for `m` rows (a constant or a scalar
/// parameter of `b`) and builds the kernel into `b`.
///
/// With a constant `m` the kernel is a plain [`gemv`] (m up to
/// `gemv_max_m`) or [`gemm`]. With a symbolic `m` it is one kernel with both
/// paths and a run-time branch on `m`, launched on a constant grid of
/// `blocks` blocks of the (common) block size: the GEMV path walks its
/// blocks of rows of `W`, the tiled path its `64 x 64` tiles, each with a
/// grid-stride loop. One kernel (rather than two launches chosen by the
/// runtime) keeps the launch plan static; the constant grid (rather than
/// one that grows with `m`) is what lets both paths share a launch, since
/// the GEMV wants `n / rows_per_block` blocks for any `m` and the tiled
/// path wants the SMs full.
pub fn weight_product(
    b: &mut Builder,
    m: Expr,
    op: &WeightOp,
    n: usize,
    k: usize,
    p: &WeightProductParams,
) -> Result<(), String> {
    // The sm_90a body, where the GEMM path runs on the tensor cores.
    let gemv_only = as_const(&m).is_some_and(|mc| mc <= p.gemv_max_m as i64);
    let sm90a = (gemm_tc::supports(op) && gemm_wgmma::fits(&p.tc).is_some() && !gemv_only).then(|| b.fork());
    build(b, m.clone(), op, n, k, p, false)?;
    if let Some(mut v) = sm90a {
        build(&mut v, m, op, n, k, p, true)?;
        b.set_sm90a(v);
    }
    Ok(())
}

/// [`weight_product`]'s body, with [`gemm_wgmma`] as its tensor-core GEMM
/// when `wgmma`.
fn build(
    b: &mut Builder,
    m: Expr,
    op: &WeightOp,
    n: usize,
    k: usize,
    p: &WeightProductParams,
    wgmma: bool,
) -> Result<(), String> {
    op.check(n, k)?;
    p.gemv.check()?;
    let tc = gemm_tc::supports(op);
    if tc {
        p.tc.check()?;
    } else {
        p.gemm.check()?;
    }
    if let Some(mc) = as_const(&m) {
        return if mc <= p.gemv_max_m as i64 {
            gemv::gemv(b, m, op, n, k, &p.gemv)
        } else if tc && wgmma {
            gemm_wgmma::gemm_wgmma(b, m, op, n, k, &p.tc)
        } else if tc {
            gemm_tc::gemm_tc(b, m, op, n, k, &p.tc)
        } else {
            gemm::gemm(b, m, op, n, k, &p.gemm)
        };
    }
    let threads = p.gemv.threads();
    let gemm_threads = if tc { p.tc.threads() } else { p.gemm.threads() };
    if threads != gemm_threads {
        return Err(format!("the GEMV uses {threads} threads per block and the GEMM {gemm_threads}"));
    }
    if p.blocks == 0 {
        return Err("a grid of 0 blocks".into());
    }
    let o = declare(b, op, &m, n, k);
    let red = gemv::shared(b, op, &p.gemv);
    // Only the GEMM that runs gets shared tiles.
    enum Tiles {
        Simt(gemm::Tiles),
        Tc(gemm_tc::Tiles),
        Wgmma(gemm_wgmma::Tiles),
    }
    let tiles = match (tc, wgmma) {
        (true, true) => Tiles::Wgmma(gemm_wgmma::shared(b, op, &p.tc)),
        (true, false) => Tiles::Tc(gemm_tc::shared(b, op, &p.tc)),
        _ => Tiles::Simt(gemm::shared(b, op, &p.gemm)),
    };
    b.gpu_launch([threads as u32, 1, 1], [Expr::idx(p.blocks), Expr::idx(1), Expr::idx(1)]);
    b.promise_aligned_vectors();
    let small = m.clone().cmp(CmpOp::Le, Expr::idx(p.gemv_max_m));
    b.if_(
        small,
        |b| gemv::body(b, &o, op, &m, n, k, &p.gemv, p.blocks, red),
        |b| {
            let (bm, bn) = if tc { (p.tc.bm, p.tc.bn) } else { (p.gemm.bm, p.gemm.bn) };
            let cols = n.div_ceil(bn);
            let count = mul(ceil_div(m.clone(), bm), Expr::idx(cols));
            b.for_("tile", block_x(), count, p.blocks as i64, crate::kir::LoopKind::Serial, |b, t| {
                let m0 = t.clone() / Expr::idx(cols) * Expr::idx(bm);
                let n0 = t % Expr::idx(cols) * Expr::idx(bn);
                match &tiles {
                    Tiles::Tc(tiles) => gemm_tc::tile(b, &o, op, &m, n, k, &p.tc, tiles, m0, n0),
                    Tiles::Wgmma(tiles) => gemm_wgmma::tile(b, &o, op, &m, n, k, &p.tc, tiles, m0, n0),
                    Tiles::Simt(tiles) => gemm::tile(b, &o, op, &m, n, k, &p.gemm, tiles, m0, n0),
                }
            });
        },
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod weight_testing {
    //! Checks a weight-product kernel in the interpreter's GPU mode against
    //! a plain f64 reference.
    //!
    //! Tolerance: the reference uses the weights as the kernel sees them
    //! (rounded to bf16/f16 first), so only f32 arithmetic differs. A dot
    //! product of `k` terms accumulated in f32 (any order, FMA or not) is
    //! within `k * 2^-24 * S` of the exact value, `S = Σ |x w| + |bias|`;
    //! with `k <= 129` that is below `1e-5 * S` ([`DOT_RTOL`]). The gated
    //! product propagates those errors through `act` (slope at most 1.2
    //! for silu and both gelus) and adds the activation's own f32 error
    //! (the erf approximation's 1.5e-7, exp and tanh, [`ACT_ATOL`] absolute
    //! plus [`ACT_RTOL`] relative); the residual adds one rounding.

    use super::*;
    use crate::kir::interp::{self, BufData, Mode};
    use crate::kir::Kernel;
    use crate::templates::testing::rand;

    pub const DOT_RTOL: f64 = 1e-5;
    pub const ACT_RTOL: f64 = 1e-6;
    pub const ACT_ATOL: f64 = 1e-6;

    #[link(name = "m")]
    extern "C" {
        fn erf(x: f64) -> f64;
    }

    fn act_f64(a: Act, x: f64) -> f64 {
        match a {
            Act::Silu => x / (1.0 + (-x).exp()),
            // SAFETY: C's erf is pure and defined for every double.
            Act::Gelu => 0.5 * x * (1.0 + unsafe { erf(x / std::f64::consts::SQRT_2) }),
            Act::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }

    /// The weights as the kernel sees them, and as its buffer.
    fn weights(elem: Scalar, v: &[f32]) -> (Vec<f32>, BufData) {
        match elem {
            Scalar::F32 => (v.to_vec(), BufData::F32(v.to_vec())),
            Scalar::BF16 => {
                let h: Vec<half::bf16> = v.iter().map(|x| half::bf16::from_f32(*x)).collect();
                (h.iter().map(|x| x.to_f32()).collect(), BufData::BF16(h))
            }
            Scalar::F16 => {
                let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
                (h.iter().map(|x| x.to_f32()).collect(), BufData::F16(h))
            }
            other => panic!("weights of {other:?}"),
        }
    }

    /// Runs `kernel` (built by a template for `op`, whose only possible
    /// scalar is `m`) on deterministic inputs of `m x k` by `n x k` and
    /// checks every output against the f64 reference.
    pub fn check(kernel: &Kernel, op: &WeightOp, m: usize, n: usize, k: usize) {
        check_impl(kernel, op, m, n, k, false, Scalar::F32)
    }

    /// [`check`] for a kernel that rounds `x` to the weights' type before
    /// its products (the tensor-core path): the reference rounds `x` too,
    /// so the products are exact and only the f32 sums differ, and the
    /// same tolerance holds.
    pub fn check_rounded(kernel: &Kernel, op: &WeightOp, m: usize, n: usize, k: usize) {
        check_impl(kernel, op, m, n, k, true, Scalar::F32)
    }

    /// [`check`] or [`check_rounded`], as `weight_product` with `p` runs
    /// `m` rows of `op`.
    pub fn check_product(kernel: &Kernel, op: &WeightOp, p: &WeightProductParams, m: usize, n: usize, k: usize) {
        let rounded = m > p.gemv_max_m && super::gemm_tc::supports(op);
        check_impl(kernel, op, m, n, k, rounded, Scalar::F32)
    }

    /// [`check_product`] for narrow activations: `kernel`'s `x` and `y`
    /// buffers hold `act` (bf16 or f16, see `select::narrow_buffers`), so
    /// `x` is rounded to `act` before the kernel sees it and the reference
    /// is rounded to `act` too; the tolerance gains one ulp of `act`.
    pub fn check_product_narrow(
        kernel: &Kernel,
        op: &WeightOp,
        p: &WeightProductParams,
        (m, n, k): (usize, usize, usize),
        act: Scalar,
    ) {
        let rounded = m > p.gemv_max_m && super::gemm_tc::supports(op);
        check_impl(kernel, op, m, n, k, rounded, act)
    }

    fn check_impl(kernel: &Kernel, op: &WeightOp, m: usize, n: usize, k: usize, rounded: bool, act: Scalar) {
        let what = format!("{} (m={m}, n={n}, k={k})", kernel.name);
        let seed = (m * 1000 + n * 10 + k) as u64;
        let (x, x_buf) = if act == Scalar::F32 {
            let x = rand(m * k, seed);
            (x.clone(), BufData::F32(x))
        } else {
            weights(act, &rand(m * k, seed))
        };
        // The activations as the products see them.
        let xr: Vec<f32> = if rounded { weights(op.w_elem, &x).0 } else { x.clone() };
        let mut bufs = vec![x_buf];
        let mut ws = vec![];
        for i in 0..op.weights() {
            let (w, buf) = weights(op.w_elem, &rand(n * k, seed + 1 + i as u64));
            ws.push(w);
            bufs.push(buf);
        }
        let mut biases = vec![];
        if op.bias {
            for i in 0..op.weights() {
                let v = rand(n, seed + 10 + i as u64);
                bufs.push(BufData::F32(v.clone()));
                biases.push(v);
            }
        }
        let res = if op.residual { rand(m * n, seed + 20) } else { vec![] };
        if op.residual {
            bufs.push(BufData::F32(res.clone()));
        }
        bufs.push(if act == Scalar::F32 { BufData::F32(vec![0.0; m * n]) } else { weights(act, &vec![0.0; m * n]).1 });
        let scalars: Vec<i64> = kernel.scalars.iter().map(|_| m as i64).collect();
        let grid = kernel.grid(&scalars).expect("a GPU kernel").expect("a valid grid");
        let block = kernel.gpu.as_ref().unwrap().block.map(|d| d as usize);
        interp::run(kernel, &mut bufs, &scalars, Mode::Gpu { grid, block })
            .unwrap_or_else(|e| panic!("{what}: {e}\n{kernel}"));
        let got = match bufs.pop().unwrap() {
            BufData::F32(v) => v,
            BufData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            BufData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            other => panic!("{what}: y holds {other:?}"),
        };
        // One ulp of a narrow result (the kernel rounds its f32 value).
        let ulp = match act {
            Scalar::BF16 => 1.0 / 128.0,
            Scalar::F16 => 1.0 / 1024.0,
            _ => 0.0,
        };
        for i in 0..m {
            for j in 0..n {
                // (value, bound on its f32 error) per weight.
                let dots: Vec<(f64, f64)> = (0..op.weights())
                    .map(|wi| {
                        let (mut s, mut a) = (0.0f64, 0.0f64);
                        for p in 0..k {
                            let t = xr[i * k + p] as f64 * ws[wi][j * k + p] as f64;
                            s += t;
                            a += t.abs();
                        }
                        if op.bias {
                            s += biases[wi][j] as f64;
                            a += (biases[wi][j] as f64).abs();
                        }
                        (s, DOT_RTOL * a)
                    })
                    .collect();
                let (mut want, mut tol) = match op.gate {
                    None => dots[0],
                    Some(act) => {
                        let ((g, eg), (u, eu)) = (dots[0], dots[1]);
                        let ag = act_f64(act, g);
                        let v = ag * u;
                        (v, 1.2 * eg * (u.abs() + eu) + ag.abs() * eu + ACT_RTOL * v.abs() + ACT_ATOL * u.abs())
                    }
                };
                if op.residual {
                    want += res[i * n + j] as f64;
                    tol += 1e-7 * want.abs();
                }
                tol += ulp * want.abs();
                let g = got[i * n + j] as f64;
                assert!(
                    (g - want).abs() <= tol + 1e-7,
                    "{what}: y[{i}, {j}] = {g}, expected {want} (tolerance {tol:e})\n{kernel}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::weight_testing::check_product;
    use super::*;

    fn kernel(op: &WeightOp, n: usize, k: usize, p: &WeightProductParams) -> crate::kir::Kernel {
        let mut b = Builder::new(&format!("weight_product_{}", op.describe()));
        let m = b.scalar_param("m");
        weight_product(&mut b, m, op, n, k, p).unwrap();
        b.finish().unwrap()
    }

    /// Small blocks (64 threads: 2 groups of 1 warp, a 16x16 tile of 2x2,
    /// or 2 warps of 16x16 MMA tiles) and 3 blocks, so the grid-stride loops
    /// of every path take several steps; m = 2 and 5 take the GEMV path, 17
    /// and 70 the tiled one (tensor cores for the bf16 and f16 weights).
    #[test]
    fn gpu_weight_product_branches_on_m() {
        let p = WeightProductParams {
            gemv: GemvParams { groups: 2, warps_per_group: 1, rows_per_group: 2, unroll: 2, m_tile: 2 },
            gemm: GemmParams { bm: 16, bn: 16, bk: 8, tm: 2, tn: 2 },
            tc: TcParams { bm: 32, bn: 16, bk: 16, wm: 16, wn: 16 },
            gemv_max_m: 5,
            blocks: 3,
        };
        let plain = WeightOp::plain(Scalar::BF16);
        let gated = WeightOp { bias: true, residual: true, ..WeightOp::gated(Scalar::F32, Act::Silu) };
        let gated16 = WeightOp { bias: true, ..WeightOp::gated(Scalar::F16, Act::Silu) };
        for (op, m, n, k) in [
            (plain, 2, 7, 40),
            (plain, 17, 33, 24),
            (plain, 70, 37, 40),
            (gated, 5, 7, 24),
            (gated, 70, 3, 7),
            (gated16, 17, 37, 52),
        ] {
            check_product(&kernel(&op, n, k, &p), &op, &p, m, n, k);
        }
    }

    /// The sm_90a body (wgmma for the GEMM path) of a symbolic-m product
    /// with 128-thread blocks (one warpgroup of m64n16, or 4 GEMV warps),
    /// 3 blocks: both paths, against the reference, and the same launch as
    /// the `mma.sync` body.
    #[test]
    fn gpu_weight_product_sm90a_variant() {
        let p = WeightProductParams { gemv_max_m: 5, blocks: 3, ..WeightProductParams::ONE_WARPGROUP };
        let plain = WeightOp::plain(Scalar::F16);
        let gated = WeightOp { bias: true, residual: true, ..WeightOp::gated(Scalar::BF16, Act::Silu) };
        for (op, m, n, k) in [(plain, 2, 37, 40), (plain, 70, 37, 52), (gated, 17, 24, 40)] {
            let kern = kernel(&op, n, k, &p);
            let v = kern.sm90a.as_deref().expect("an sm_90a variant");
            assert_eq!(v.gpu, kern.gpu);
            assert!(v.uses_wgmma() && !kern.uses_wgmma());
            check_product(&kern.for_sm90a(), &op, &p, m, n, k);
        }
        // f32 weights and tilings without warpgroups get no variant.
        let f32_op = WeightOp::plain(Scalar::F32);
        let p32 = WeightProductParams { gemm: GemmParams { bm: 32, bn: 16, bk: 8, tm: 2, tn: 2 }, ..p };
        assert!(p32.gemm.threads() == p32.gemv.threads() && kernel(&f32_op, 8, 8, &p32).sm90a.is_none());
    }

    #[test]
    fn gpu_weight_product_defaults_build() {
        for (n, k) in [(1, 1), (128, 896), (896, 896), (4096, 4096), (14336, 4096)] {
            for op in [WeightOp::plain(Scalar::BF16), WeightOp::gated(Scalar::F16, Act::GeluTanh)] {
                let p = WeightProductParams::for_shape(&op, n, k);
                assert_eq!(p.gemv.threads(), p.gemm.threads(), "{p:?}");
                let kern = kernel(&op, n, k, &p);
                assert!(kern.uses_gpu_features());
                assert!(kern.sm90a.as_ref().is_some_and(|v| v.uses_wgmma()), "{p:?}");
            }
        }
    }

    #[test]
    fn gpu_vec_width_divides_k() {
        assert_eq!(vec_width(Scalar::F32, 4096), 4);
        assert_eq!(vec_width(Scalar::BF16, 4096), 8);
        assert_eq!(vec_width(Scalar::BF16, 12), 4);
        assert_eq!(vec_width(Scalar::F16, 6), 2);
        assert_eq!(vec_width(Scalar::F32, 129), 1);
    }
}
