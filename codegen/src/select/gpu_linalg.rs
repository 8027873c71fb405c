//! Kernel selection for the weight products of the GPU target: `x · Wᵀ`
//! and the gated MLP `act(x · Wgᵀ) * (x · Wuᵀ)` for constant weights given
//! `[n, k]` (as checkpoints store them, no packing) in f32, bf16 or f16.
//!
//! The instances follow the contract of [`super`] except the CPU-only
//! clause on `Parallel` loops: a GPU kernel's work is split by its grid.
//! Their buffers are `x [.., k]` (f32, every leading axis folded into the
//! rows `m`), the weight(s) `[n, k]` in their element type, then the result
//! `[.., n]`; their only possible scalar parameter is `m`. A symbolic `m`
//! (decode and prefill share the kernel) gives one kernel that runs the
//! GEMV for `m <= 32` and the tiled GEMM above (on tensor cores for bf16
//! and f16 weights, which rounds the activations to the weights' type for
//! the products), on a constant grid; a
//! constant `m` gives just the one that fits (see
//! [`crate::templates::gpu::weight_product`]).
//!
//! Bias and residual epilogues: the CPU path fuses neither into its weight
//! matmuls today (the scheduler launches `matmul` and a following `add`
//! separately), so the two selectors the scheduler calls ask for none;
//! [`weight_product_gpu`] takes a [`WeightOp`] with them for when it does.

use super::linalg::{dim_name, Params};
use super::{elem_of, Instance, SelectError};
use crate::kir::{Builder, Scalar};
use crate::templates::gpu::{weight_product, WeightOp, WeightProductParams};
use crate::templates::matmul_dyn::Act;
use smelt_ir::{DType, Dim, Op, TensorType};

/// `a · Wᵀ` for a constant weight `W` given `[n, k]` with elements
/// `w_elem`: operands `(a, W)`, result `[.., m, n]` for `a` of shape
/// `[.., m, k]`. The same result as `matmul(a, transpose(W, [1, 0]))`.
pub fn weight_matmul_gpu(a: &TensorType, n: usize, k: usize, w_elem: Scalar) -> Result<Instance, SelectError> {
    let op = WeightOp::plain(w_elem);
    weight_product_gpu(a, n, k, &op, &WeightProductParams::for_shape(&op, n, k))
}

/// [`weight_matmul_gpu`] (`act` `None`) or [`weight_gated_mlp_gpu`], with
/// `params` instead of the shape's defaults when given.
pub fn weight_node_gpu(
    x: &TensorType,
    n: usize,
    k: usize,
    act: Option<&str>,
    w_elem: Scalar,
    params: Option<&WeightProductParams>,
) -> Result<Instance, SelectError> {
    match (act, params) {
        (None, None) => weight_matmul_gpu(x, n, k, w_elem),
        (Some(a), None) => weight_gated_mlp_gpu(x, n, k, a, w_elem),
        (None, Some(p)) => weight_product_gpu(x, n, k, &WeightOp::plain(w_elem), p),
        (Some(a), Some(p)) => {
            let act = Act::parse(a).ok_or_else(|| {
                let op = Op::GatedMlp { act: a.to_string() };
                SelectError::unsupported(&op, std::slice::from_ref(x), format!("unknown act `{a}`"))
            })?;
            weight_product_gpu(x, n, k, &WeightOp::gated(w_elem, act), p)
        }
    }
}

/// `act(x · Wgᵀ) * (x · Wuᵀ)` for constant weights given `[n, k]`:
/// operands `(x, Wg, Wu)`, result `[.., m, n]`. The same result as
/// `gated_mlp(x, transpose(Wg), transpose(Wu))` with `act`.
pub fn weight_gated_mlp_gpu(
    x: &TensorType,
    n: usize,
    k: usize,
    act: &str,
    w_elem: Scalar,
) -> Result<Instance, SelectError> {
    let a = Act::parse(act).ok_or_else(|| {
        let op = Op::GatedMlp { act: act.to_string() };
        SelectError::unsupported(&op, std::slice::from_ref(x), format!("unknown act `{act}`"))
    })?;
    let op = WeightOp::gated(w_elem, a);
    weight_product_gpu(x, n, k, &op, &WeightProductParams::for_shape(&op, n, k))
}

/// The weight product `op` with explicit tuning parameters: operands `x`,
/// the weight(s), the bias(es) `[n]` and the residual `[.., m, n]` when `op`
/// asks for them, then the result `[.., m, n]`.
pub fn weight_product_gpu(
    x: &TensorType,
    n: usize,
    k: usize,
    op: &WeightOp,
    params: &WeightProductParams,
) -> Result<Instance, SelectError> {
    let ir_op = match op.gate {
        None => Op::MatMul {},
        Some(a) => Op::GatedMlp { act: a.name().to_string() },
    };
    let w_dtype = match op.w_elem {
        Scalar::BF16 => DType::BF16,
        Scalar::F16 => DType::F16,
        _ => DType::F32,
    };
    let w = TensorType::new(w_dtype, vec![Dim::c(n as i64), Dim::c(k as i64)]);
    let mut inputs = vec![x.clone()];
    inputs.extend(std::iter::repeat_n(w, op.weights()));
    let fail = |why: String| SelectError::unsupported(&ir_op, &inputs, why);
    if elem_of(x.dtype) != Scalar::F32 {
        return Err(fail("the activations must be floats".into()));
    }
    if x.rank() == 0 || x.shape.last() != Some(&Dim::c(k as i64)) {
        return Err(fail(format!("x's last dim must be the contraction dim {k}")));
    }
    let mut b = Builder::new("gpu_weight_product");
    let mut p = Params::default();
    let rows = &x.shape[..x.rank() - 1];
    let m = p.product(&mut b, rows);
    weight_product(&mut b, m, op, n, k, params).map_err(fail)?;
    let prefix = format!("gpu_wmatmul_{}_m{}_k{k}_n{n}", op.describe(), dim_name(&Dim::product(rows)));
    p.finish(b, &prefix, &ir_op, &inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::gpu::weight_testing::check_product;
    use crate::templates::gpu::{GemmParams, GemvParams, TcParams};

    fn ty(dims: &[&str]) -> TensorType {
        TensorType::new(DType::F32, dims.iter().map(|d| d.parse().unwrap()).collect())
    }

    #[test]
    fn gpu_select_defaults() {
        let x = ty(&["batch", "seq", "896"]);
        let inst = weight_matmul_gpu(&x, 128, 896, Scalar::BF16).unwrap();
        let k = &inst.kernel;
        assert_eq!(inst.scalars, vec![Dim::product(&x.shape[..2])]);
        let bufs: Vec<_> = k.global_buffers().map(|(_, d)| (d.name.as_str(), d.elem)).collect();
        assert_eq!(bufs, [("x", Scalar::F32), ("w", Scalar::BF16), ("y", Scalar::F32)]);
        let g = k.gpu.as_ref().unwrap();
        assert_eq!(g.block, [256, 1, 1]);
        // A constant grid whatever m is.
        assert_eq!(k.grid(&[1]).unwrap().unwrap(), k.grid(&[4096]).unwrap().unwrap());

        let inst = weight_gated_mlp_gpu(&x, 4864, 896, "gelu_tanh", Scalar::F16).unwrap();
        let names: Vec<_> = inst.kernel.global_buffers().map(|(_, d)| d.name.clone()).collect();
        assert_eq!(names, ["x", "w_gate", "w_up", "y"]);
        assert!(weight_gated_mlp_gpu(&x, 8, 896, "relu", Scalar::F16).is_err());
        assert!(weight_matmul_gpu(&x, 8, 64, Scalar::F32).is_err());
        assert!(weight_matmul_gpu(&ty(&["4"]), 8, 4, Scalar::I32).is_err());

        // Static rows: only one path, and a grid that fits it.
        let inst = weight_matmul_gpu(&ty(&["1", "3", "64"]), 100, 64, Scalar::BF16).unwrap();
        assert!(inst.scalars.is_empty());
        assert_eq!(inst.kernel.grid(&[]).unwrap().unwrap(), [7, 1, 1]);
        // 200 rows of bf16 weights: the tensor-core GEMM's 128x64 tiles.
        let inst = weight_matmul_gpu(&ty(&["2", "100", "64"]), 100, 64, Scalar::BF16).unwrap();
        assert_eq!(inst.kernel.grid(&[]).unwrap().unwrap(), [2, 2, 1]);
        assert!(inst.kernel.to_string().contains("mma_m16n8k16_bf16"));
        let inst = weight_matmul_gpu(&ty(&["2", "100", "64"]), 100, 64, Scalar::F32).unwrap();
        assert_eq!(inst.kernel.grid(&[]).unwrap().unwrap(), [2, 4, 1]);
        assert!(!inst.kernel.to_string().contains("mma"));
    }

    /// Instances with small blocks run in the interpreter: a symbolic `m`
    /// on both sides of the branch, and a constant one.
    #[test]
    fn gpu_select_runs() {
        let params = WeightProductParams {
            gemv: GemvParams { groups: 1, warps_per_group: 1, rows_per_group: 2, unroll: 1, m_tile: 2 },
            gemm: GemmParams { bm: 8, bn: 8, bk: 8, tm: 2, tn: 1 },
            tc: TcParams { bm: 16, bn: 8, bk: 16, wm: 16, wn: 8 },
            gemv_max_m: 2,
            blocks: 2,
        };
        let op = WeightOp::gated(Scalar::BF16, Act::Gelu);
        let inst = weight_product_gpu(&ty(&["batch", "seq", "24"]), 3, 24, &op, &params).unwrap();
        for m in [2, 5] {
            check_product(&inst.kernel, &op, &params, m, 3, 24);
        }
        let op = WeightOp::plain(Scalar::F32);
        let inst = weight_product_gpu(&ty(&["2", "24"]), 3, 24, &op, &params).unwrap();
        check_product(&inst.kernel, &op, &params, 2, 3, 24);
        let inst = weight_product_gpu(&ty(&["5", "24"]), 3, 24, &op, &params).unwrap();
        check_product(&inst.kernel, &op, &params, 5, 3, 24);
    }

    /// Narrow activations: `x` and `y` in bf16 or f16 buffers (the
    /// scheduler binds them so), for f32, bf16 and f16 weights, on the GEMV
    /// (2 rows) and the GEMM (5 rows: the tensor-core one for narrow
    /// weights, where staging `x` in the weights' type rounds nothing when
    /// `x` is already of it), plain and gated.
    #[test]
    fn gpu_select_narrow_activations() {
        use crate::templates::gpu::weight_testing::check_product_narrow;
        let params = WeightProductParams {
            gemv: GemvParams { groups: 1, warps_per_group: 1, rows_per_group: 2, unroll: 1, m_tile: 2 },
            gemm: GemmParams { bm: 8, bn: 8, bk: 8, tm: 2, tn: 1 },
            tc: TcParams { bm: 16, bn: 8, bk: 16, wm: 16, wn: 8 },
            gemv_max_m: 2,
            blocks: 2,
        };
        for act in [Scalar::BF16, Scalar::F16] {
            for w in [Scalar::F32, Scalar::BF16, Scalar::F16] {
                for op in [WeightOp::plain(w), WeightOp::gated(w, Act::Silu)] {
                    let inst = weight_product_gpu(&ty(&["batch", "seq", "40"]), 3, 40, &op, &params).unwrap();
                    let last = inst.kernel.global_buffers().count() - 1;
                    let kernel = super::super::narrow_buffers(&inst.kernel, &[(0, act), (last, act)]).unwrap();
                    for m in [2, 5] {
                        check_product_narrow(&kernel, &op, &params, (m, 3, 40), act);
                    }
                }
            }
        }
    }

    /// A narrowed product's sm_90a body (wgmma, what `emit_ptx` lowers for
    /// sm_90a) holds the same narrow buffers and computes the same results
    /// through them: it once kept f32 `x` and `y`, so on an H200 each row
    /// of `y` was written as f32 over its neighbours.
    #[test]
    fn gpu_narrow_activations_reach_the_sm90a_body() {
        use crate::templates::gpu::weight_testing::check_product_narrow;
        let params = WeightProductParams { gemv_max_m: 5, blocks: 3, ..WeightProductParams::ONE_WARPGROUP };
        for op in [WeightOp::plain(Scalar::BF16), WeightOp::gated(Scalar::BF16, Act::Silu)] {
            let inst = weight_product_gpu(&ty(&["batch", "seq", "40"]), 24, 40, &op, &params).unwrap();
            assert!(inst.kernel.sm90a.is_some(), "the product has an sm_90a body");
            let last = inst.kernel.global_buffers().count() - 1;
            let kernel =
                super::super::narrow_buffers(&inst.kernel, &[(0, Scalar::BF16), (last, Scalar::BF16)]).unwrap();
            let body = kernel.for_sm90a();
            assert!(body.uses_wgmma());
            let elems = |k: &crate::kir::Kernel| k.global_buffers().map(|(_, d)| d.elem).collect::<Vec<_>>();
            assert_eq!(elems(&body), elems(&kernel));
            for m in [2, 17] {
                check_product_narrow(&body, &op, &params, (m, 24, 40), Scalar::BF16);
            }
        }
    }
}
