//! The GPU weight product's tunable parameters
//! ([`crate::templates::gpu::weight_product`]): what a
//! [`super::Variant::Gpu`] holds, the axes of its space, and how a point
//! becomes the template's [`WeightProductParams`] for one shape.
//!
//! One kernel serves decode and prefill (a run-time branch on the rows
//! `m`), so a variant sets both paths at once, on one block size:
//! - the GEMV (`m <= gemv_max_m`): warps per thread group, rows of `W` per
//!   group, loads in flight per row, rows of `x` per pass;
//! - the tiled GEMM above it: a block tile and per-thread (SIMT, f32
//!   weights) or per-warp (tensor cores, bf16/f16 weights) tile from a
//!   short list per block size ([`simt_tiles`], [`tc_tiles`]), and the
//!   `k` slice staged in shared memory;
//! - the grid: at least `bps` blocks per SM (more when the GEMV has more
//!   row blocks), which both paths walk with a grid-stride loop.
//!
//! Assumes the template's rules (checked again when a variant is built):
//! both paths use `threads` threads per block, the GEMV's sums per pass
//! fit a warp's lanes. A point that breaks them fails to build and the
//! tuner skips it.

use crate::kir::Scalar;
use crate::templates::gpu::gemm::GemmParams;
use crate::templates::gpu::gemm_tc::TcParams;
use crate::templates::gpu::gemv::GemvParams;
use crate::templates::gpu::{WeightOp, WeightProductParams, SMS};
use crate::templates::matmul_dyn::Act;

/// One point of the GPU weight product's space, as its axes hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuParams {
    /// Threads per block of both paths.
    pub threads: usize,
    /// GEMV: warps per thread group (they split `k`).
    pub wpg: usize,
    /// GEMV: rows of `W` a group streams side by side.
    pub rpg: usize,
    /// GEMV: vector loads per row each lane issues before using them.
    pub unroll: usize,
    /// GEMV: rows of `x` per pass over `W`.
    pub mtile: usize,
    /// Up to this many rows the GEMV runs, above it the tiled GEMM.
    pub gemv_max_m: usize,
    /// The GEMM's tile: an index into `simt_tiles` or `tc_tiles` for
    /// `threads`.
    pub tile: usize,
    /// The GEMM's `k` slice per shared-memory stage.
    pub bk: usize,
    /// At least this many blocks per SM in the grid.
    pub bps: usize,
}

/// The axes of the space, in [`GpuParams`] field order.
pub const AXES: [(&str, &[usize]); 9] = [
    ("threads", &[128, 256, 512]),
    ("wpg", &[1, 2, 4, 8]),
    ("rpg", &[1, 2, 4]),
    ("unroll", &[1, 2, 4]),
    ("mtile", &[1, 2, 4, 8]),
    ("gemv_max_m", &[4, 8, 16, 32, 64]),
    ("tile", &[0, 1, 2]),
    ("bk", &[16, 32, 64]),
    ("bps", &[1, 2, 4, 8]),
];

/// SIMT GEMM tiles `(bm, bn, tm, tn)` by threads per block (index 0 is
/// the default's shape for 256 threads, `GemmParams::DEFAULT`).
pub fn simt_tiles(threads: usize) -> Option<[(usize, usize, usize, usize); 3]> {
    match threads {
        128 => Some([(64, 32, 4, 4), (64, 64, 8, 4), (128, 64, 8, 8)]),
        256 => Some([(64, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 8)]),
        512 => Some([(128, 64, 4, 4), (128, 128, 8, 4), (64, 64, 2, 4)]),
        _ => None,
    }
}

/// Tensor-core GEMM tiles `(bm, bn, wm, wn)` by threads per block (index
/// 0 for 256 threads is `TcParams::DEFAULT`'s shape).
pub fn tc_tiles(threads: usize) -> Option<[(usize, usize, usize, usize); 3]> {
    match threads {
        128 => Some([(64, 64, 32, 32), (128, 64, 64, 32), (64, 128, 32, 64)]),
        256 => Some([(128, 64, 32, 32), (128, 128, 64, 32), (64, 128, 32, 32)]),
        512 => Some([(128, 128, 32, 32), (256, 128, 64, 32), (128, 256, 32, 64)]),
        _ => None,
    }
}

impl GpuParams {
    /// The point of `WeightProductParams::for_shape` (the estimated
    /// defaults) for a product of `n x k` weights.
    pub fn default_for(n: usize, k: usize, w: Scalar, act: Option<Act>) -> GpuParams {
        let d = WeightProductParams::for_shape(&op(w, act), n, k);
        GpuParams {
            threads: d.gemv.threads(),
            wpg: d.gemv.warps_per_group,
            rpg: d.gemv.rows_per_group,
            unroll: d.gemv.unroll,
            mtile: d.gemv.m_tile,
            gemv_max_m: d.gemv_max_m,
            tile: 0,
            bk: d.gemm.bk,
            bps: 4,
        }
    }

    /// The values in [`AXES`] order.
    pub fn values(&self) -> [usize; 9] {
        [self.threads, self.wpg, self.rpg, self.unroll, self.mtile, self.gemv_max_m, self.tile, self.bk, self.bps]
    }

    /// The point from values in [`AXES`] order.
    pub fn from_values(v: [usize; 9]) -> GpuParams {
        let [threads, wpg, rpg, unroll, mtile, gemv_max_m, tile, bk, bps] = v;
        GpuParams { threads, wpg, rpg, unroll, mtile, gemv_max_m, tile, bk, bps }
    }

    /// The template's parameters for a product with `n` output columns, or
    /// why this point has none (the template checks the rest when it
    /// builds).
    pub fn resolve(&self, n: usize) -> Result<WeightProductParams, String> {
        let warps = self.threads / 32;
        if !self.threads.is_multiple_of(32) || self.wpg == 0 || !warps.is_multiple_of(self.wpg) {
            return Err(format!("{} threads do not split into groups of {} warps", self.threads, self.wpg));
        }
        let (Some(simt), Some(tc)) = (simt_tiles(self.threads), tc_tiles(self.threads)) else {
            return Err(format!("no GEMM tiles for {} threads per block", self.threads));
        };
        let (Some(&(bm, bn, tm, tn)), Some(&(cm, cn, wm, wn))) = (simt.get(self.tile), tc.get(self.tile)) else {
            return Err(format!("no GEMM tile {} for {} threads per block", self.tile, self.threads));
        };
        let gemv = GemvParams {
            groups: warps / self.wpg,
            warps_per_group: self.wpg,
            rows_per_group: self.rpg,
            unroll: self.unroll,
            m_tile: self.mtile,
        };
        Ok(WeightProductParams {
            gemv,
            gemm: GemmParams { bm, bn, bk: self.bk, tm, tn },
            tc: TcParams { bm: cm, bn: cn, bk: self.bk, wm, wn },
            gemv_max_m: self.gemv_max_m,
            blocks: gemv.blocks(n).max(self.bps * SMS),
        })
    }
}

fn op(w: Scalar, act: Option<Act>) -> WeightOp {
    match act {
        None => WeightOp::plain(w),
        Some(a) => WeightOp::gated(w, a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_point_resolves_to_the_templates_defaults() {
        for (n, k) in [(960, 576), (576, 1536), (49152, 576), (64, 64), (4096, 4096), (128, 14336)] {
            for w in [Scalar::F32, Scalar::BF16, Scalar::F16] {
                for act in [None, Some(Act::Silu)] {
                    let p = GpuParams::default_for(n, k, w, act);
                    assert_eq!(
                        p.resolve(n).unwrap(),
                        WeightProductParams::for_shape(&op(w, act), n, k),
                        "{n}x{k} {w:?} {act:?}"
                    );
                    for (i, (name, values)) in AXES.iter().enumerate() {
                        assert!(values.contains(&p.values()[i]), "{name}={} is not on its axis", p.values()[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn every_tile_matches_its_block_size() {
        for t in [128, 256, 512] {
            for (bm, bn, tm, tn) in simt_tiles(t).unwrap() {
                let g = GemmParams { bm, bn, bk: 32, tm, tn };
                assert_eq!(g.threads(), t, "{g:?}");
                g.check().unwrap();
            }
            for (bm, bn, wm, wn) in tc_tiles(t).unwrap() {
                let c = TcParams { bm, bn, bk: 32, wm, wn };
                assert_eq!(c.threads(), t, "{c:?}");
                c.check().unwrap();
            }
        }
        let bad = GpuParams { threads: 128, wpg: 8, ..GpuParams::default_for(960, 576, Scalar::F32, None) };
        assert!(bad.resolve(960).is_err());
    }

    /// Every value of every axis, one axis at a time from the default (the
    /// points a coordinate search visits first), builds a kernel that
    /// computes the product in the interpreter's GPU mode on the rows its
    /// axis matters for (decode rows and a few for the GEMV's, rows past
    /// every `gemv_max_m` for the tiled GEMM's); for f32 and tensor-core
    /// (bf16) weights, plain and gated.
    #[test]
    fn each_axis_value_builds_a_correct_kernel() {
        use crate::templates::gpu::weight_testing::check_product;
        let (n, k) = (24, 48);
        let mut built = 0;
        for (w, act) in [(Scalar::F32, None), (Scalar::BF16, Some(Act::Silu))] {
            let site = super::super::Site::GpuWeightProduct { n, k, act, w };
            let default = GpuParams::default_for(n, k, w, act);
            for (axis, (name, values)) in AXES.iter().enumerate() {
                for &value in values.iter() {
                    let mut v = default.values();
                    v[axis] = value;
                    let p = GpuParams::from_values(v);
                    // From the default (256 threads) every one-axis move
                    // is a point the template takes.
                    site.build(&site.rows_type(), &super::super::Variant::Gpu { p })
                        .unwrap_or_else(|e| panic!("{name}={value}: {e}"));
                    built += 1;
                    // The grid's size changes no result (both paths stride
                    // by it), so the interpreter runs a one-block grid.
                    let params = WeightProductParams { blocks: 1, ..p.resolve(n).unwrap() };
                    let x = site.rows_type();
                    let small = crate::select::weight_node_gpu(&x, n, k, act.map(Act::name), w, Some(&params))
                        .unwrap_or_else(|e| panic!("{name}={value}: {e}"));
                    // Each axis on the rows its path runs.
                    let rows: &[usize] = match *name {
                        "wpg" | "rpg" | "unroll" | "mtile" => &[1, 5],
                        "tile" | "bk" => &[70],
                        "gemv_max_m" => &[5, 70],
                        "threads" => &[1, 70],
                        _ => &[1],
                    };
                    for &m in rows {
                        check_product(&small.kernel, &op(w, act), &params, m, n, k);
                    }
                }
            }
        }
        assert_eq!(built, 2 * AXES.iter().map(|a| a.1.len()).sum::<usize>());
    }

    /// Two points far from the default, every axis moved (small blocks:
    /// the interpreter runs a GPU block's threads one by one), compute the
    /// product in the interpreter's GPU mode on both paths: decode rows, a
    /// few rows and rows past `gemv_max_m` for the tiled GEMM.
    #[test]
    fn far_points_compute_the_product() {
        use crate::templates::gpu::weight_testing::check_product;
        let (n, k) = (24, 48);
        let a = GpuParams { threads: 128, wpg: 2, rpg: 4, unroll: 2, mtile: 2, gemv_max_m: 4, tile: 1, bk: 16, bps: 1 };
        let b = GpuParams { threads: 128, wpg: 1, rpg: 1, unroll: 4, mtile: 8, gemv_max_m: 8, tile: 2, bk: 64, bps: 2 };
        for (p, w, act, rows) in [(a, Scalar::F32, None, &[1, 5][..]), (b, Scalar::BF16, Some(Act::Silu), &[5, 70][..])]
        {
            let site = super::super::Site::GpuWeightProduct { n, k, act, w };
            // The grid's size changes no result (both paths walk their
            // work with a grid-stride loop), so the interpreter runs one
            // block.
            let params = WeightProductParams { blocks: 1, ..p.resolve(n).unwrap() };
            let small = crate::select::weight_node_gpu(&site.rows_type(), n, k, act.map(Act::name), w, Some(&params))
                .unwrap_or_else(|e| panic!("{p:?}: {e}"));
            for &m in rows {
                check_product(&small.kernel, &op(w, act), &params, m, n, k);
            }
        }
    }
}
