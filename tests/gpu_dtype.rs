//! Narrow activations on the GPU target (`smelt compile --target cuda
//! --dtype bf16|f16`), end to end on the host: a tiny random llama (made
//! by the project's own checkpoint writer: 2 layers, hidden 64, 4 query
//! heads over 2 KV heads) goes through the pass pipeline and the
//! narrowing pass, is scheduled for the GPU with small blocks, and the
//! whole plan runs in the KIR interpreter's GPU mode
//! (`smelt_codegen::simulate`), for a prefill (5 tokens, flash attention)
//! and a decode step on a 6-position cache (split-keys attention).
//!
//! Two comparisons:
//! - (a) with f32 weights, against the narrowed graph run by the reference
//!   interpreter, which rounds every op's result where the kernels do: the
//!   two differ only where an f32 sum (kernels) and an f64 one
//!   (interpreter) round to neighbouring narrow values, one ulp of bf16
//!   (2^-8) or f16 (2^-11) at a few elements, which the later layers
//!   carry on; and `add_rms_norm` normalises the f32 sum where the
//!   interpreter normalises the sum rounded to the narrow type, which
//!   moves about half its outputs by one ulp. Measured (`-- --nocapture`,
//!   prefill and decode): 5.1e-3 and 5.6e-3 (bf16), 6.1e-4 and 7.9e-4
//!   (f16) relative, about what the narrowing itself moves the logits
//!   (6.1e-3 and 8.0e-3, 6.3e-4 and 9.9e-4); the bounds are 1e-2 and
//!   1.5e-3.
//! - (b) with the weights stored in the same narrow type (the default of
//!   `--dtype`), against the f32 model's logits by the reference
//!   interpreter: ||got - ref|| / ||ref|| <= 2e-2, the GPU issue's bound
//!   for bf16 (f16 has to meet it too); measured 5.8e-3 and 8.1e-3 (bf16),
//!   7.5e-4 and 9.3e-4 (f16). Whether the greedy token (the argmax of the
//!   last position) is the f32 model's is printed, not required (it was,
//!   in all four runs).

mod common;

use std::collections::BTreeMap;

use smelt_codegen::schedule::{schedule, Device, GpuGemm, ScheduleOptions, WeightDtype};
use smelt_codegen::select::GpuConfig;
use smelt_codegen::templates::gpu::{GemmParams, GemvParams, TcParams, WeightProductParams};
use smelt_frontends::hf::{load_stored, write_random_checkpoint, Arch, RandomModelSpec};
use smelt_ir::{interp, DType, Graph, StoredTensor, Tensor};
use smelt_passes::narrow::narrow_activations;
use smelt_passes::{pipeline, PipelineOptions};

/// Small blocks, which the interpreter runs much faster (as the
/// scheduler's own tests use): 4 splits per KV head, up to 2 queries on
/// the split path.
const SMALL: GpuConfig = GpuConfig {
    block: 64,
    row_block: 64,
    attention_threads: 32,
    flash_rows: 16,
    flash_keys: 8,
    flash_row_threads: 4,
    split_threads: 32,
    split_blocks: 8,
    split_max_queries: 2,
    weight_products: Some(WeightProductParams {
        gemv: GemvParams { groups: 1, warps_per_group: 1, rows_per_group: 2, unroll: 1, m_tile: 2 },
        gemm: GemmParams { bm: 8, bn: 8, bk: 8, tm: 2, tn: 1 },
        tc: TcParams { bm: 16, bn: 8, bk: 16, wm: 16, wn: 8 },
        gemv_max_m: 2,
        blocks: 2,
    }),
};

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let d: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    d / n
}

/// The argmax of the last row of `[.., vocab]` logits.
fn last_argmax(logits: &Tensor) -> usize {
    let v = logits.to_f32_vec();
    let vocab = *logits.shape.last().unwrap();
    let row = &v[v.len() - vocab..];
    (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap()
}

/// The plan's logits for `graph` with weights stored as `weight_dtype` and
/// weight products computed by `gpu_gemm`.
fn gpu_logits(
    graph: &Graph,
    stored: &BTreeMap<String, StoredTensor>,
    (weight_dtype, gpu_gemm): (WeightDtype, GpuGemm),
    inputs: &BTreeMap<String, Tensor>,
) -> Tensor {
    gpu_logits_with(graph, stored, (weight_dtype, gpu_gemm), inputs, SMALL, false)
}

/// [`gpu_logits`] with the GPU configuration `gpu`, running each kernel's
/// sm_90a body (what `emit_ptx` lowers for sm_90a) when `sm90a`.
fn gpu_logits_with(
    graph: &Graph,
    stored: &BTreeMap<String, StoredTensor>,
    (weight_dtype, gpu_gemm): (WeightDtype, GpuGemm),
    inputs: &BTreeMap<String, Tensor>,
    gpu: GpuConfig,
    sm90a: bool,
) -> Tensor {
    let options = ScheduleOptions { device: Device::Gpu, gpu, weight_dtype, gpu_gemm, ..ScheduleOptions::default() };
    let s = schedule(graph, stored, options).unwrap_or_else(|e| panic!("{e}"));
    let library = s.plan.kernels.iter().filter(|k| k.library.is_some()).count();
    assert_eq!(library > 0, gpu_gemm != GpuGemm::Kernels, "{library} library calls with {gpu_gemm:?}");
    let constants = s.constants.finish().unwrap().read().unwrap();
    let kernels: Vec<_> = match sm90a {
        true => {
            assert!(s.kernels.iter().any(|k| k.sm90a.is_some()), "no kernel has an sm_90a body");
            s.kernels.iter().map(|k| k.for_sm90a().into_owned()).collect()
        }
        false => s.kernels,
    };
    let mut out = smelt_codegen::simulate::run_gpu_plan(graph, &kernels, &s.plan, &constants, inputs)
        .unwrap_or_else(|e| panic!("{e}"));
    out.remove("logits").expect("a logits output")
}

/// The decoder's inputs for `seq` new tokens after `past` cached positions.
fn inputs(g: &Graph, seq: usize, past: usize) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, v) in g.inputs() {
        let ty = g.ty(v);
        let t = match name.as_str() {
            "input_ids" => {
                Tensor::from_i64(DType::I64, vec![1, seq], (0..seq as i64).map(|i| (i * 37 + 11) % 256).collect())
            }
            "attention_mask" => Tensor::from_i64(DType::I64, vec![1, past + seq], vec![1; past + seq]),
            "position_ids" => Tensor::from_i64(DType::I64, vec![1, seq], (past as i64..(past + seq) as i64).collect()),
            n if n.starts_with("past_key_values.") => {
                let (heads, d) = (ty.shape[1].as_const().unwrap() as usize, ty.shape[3].as_const().unwrap() as usize);
                let len = heads * past * d;
                let vals = (0..len).map(|i| ((i * 7919 + name.len() * 31) % 1000) as f32 / 500.0 - 1.0).collect();
                Tensor::from_f32(DType::F32, vec![1, heads, past, d], vals)
            }
            other => panic!("unexpected input `{other}`"),
        };
        out.insert(name, t.unwrap());
    }
    out
}

/// The tiny random llama after the pass pipeline: its graph, stored
/// weights and the weights as tensors (for the reference interpreter).
fn tiny_llama() -> (Graph, BTreeMap<String, StoredTensor>, BTreeMap<String, Tensor>) {
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec { seed: 7, ..RandomModelSpec::tiny(Arch::Llama) };
    write_random_checkpoint(dir.path(), &spec).unwrap();
    let m = load_stored(dir.path()).unwrap();
    let (mut g, mut stored) = (m.graph, m.weights);
    pipeline(&mut g, &mut stored, &PipelineOptions::default()).unwrap();
    let weights = stored.iter().map(|(n, t)| (n.clone(), t.to_tensor())).collect();
    (g, stored, weights)
}

#[test]
fn narrow_activations_whole_model_on_simulated_gpu() {
    let (g, stored, weights) = tiny_llama();
    for (seq, past) in [(5, 0), (1, 6)] {
        let inp = inputs(&g, seq, past);
        let want = interp::run(&g, &weights, &inp).unwrap().remove("logits").unwrap();
        for (dtype, wd, tight) in [(DType::BF16, WeightDtype::BF16, 1e-2), (DType::F16, WeightDtype::F16, 1.5e-3)] {
            let (narrow, count) = narrow_activations(&g, dtype).unwrap();
            smelt_ir::verify::verify(&narrow).unwrap();
            let oracle = interp::run(&narrow, &weights, &inp).unwrap().remove("logits").unwrap();
            let got_a = gpu_logits(&narrow, &stored, (WeightDtype::F32, GpuGemm::Kernels), &inp);
            let a = rel_err(&got_a.to_f32_vec(), &oracle.to_f32_vec());
            let got_b = gpu_logits(&narrow, &stored, (wd, GpuGemm::Kernels), &inp);
            let b = rel_err(&got_b.to_f32_vec(), &want.to_f32_vec());
            // (c): the same with the weight products as cuBLAS GEMMs (in
            // the simulation, reference products of the stored operands).
            let got_c = gpu_logits(&narrow, &stored, (wd, GpuGemm::Cublas), &inp);
            let c = rel_err(&got_c.to_f32_vec(), &want.to_f32_vec());
            let oracle_vs_f32 = rel_err(&oracle.to_f32_vec(), &want.to_f32_vec());
            let same = last_argmax(&got_b) == last_argmax(&want);
            println!(
                "seq {seq} past {past} {dtype}: {count} values narrowed; (a) vs narrowed graph {a:.2e}; \
                 (b) vs f32 model {b:.2e}, (c) with cuBLAS GEMMs {c:.2e} (narrowed graph vs f32 model \
                 {oracle_vs_f32:.2e}); greedy token same: {same}"
            );
            assert!(c <= 2e-2, "{dtype} seq {seq}: (c) relative error {c:e} > 2e-2");
            assert!(a <= tight, "{dtype} seq {seq}: (a) relative error {a:e} > {tight:e}");
            assert!(b <= 2e-2, "{dtype} seq {seq}: (b) relative error {b:e} > 2e-2");
        }
    }
}

/// The sm_90a bodies (wgmma GEMMs) of a narrow-activation plan, run on a
/// 5-token prefill: against the `mma.sync` bodies within bound (a), and
/// against the f32 model within (b) (measured: identical to the `mma.sync`
/// bodies, 5.8e-3 from the f32 model). Before narrowing reached them, these
/// bodies kept f32 `x` and `y`: the simulation refused the plan, and on an
/// H200 each result row was written as f32 over its neighbours (NaN logits).
#[test]
fn narrow_activations_sm90a_bodies_on_simulated_gpu() {
    let (g, stored, weights) = tiny_llama();
    // One warpgroup of m64n16 wgmma tiles; 5 rows take the GEMM path.
    let wgmma = GpuConfig { weight_products: Some(WeightProductParams::ONE_WARPGROUP), ..SMALL };
    let inp = inputs(&g, 5, 0);
    let want = interp::run(&g, &weights, &inp).unwrap().remove("logits").unwrap();
    let (narrow, _) = narrow_activations(&g, DType::BF16).unwrap();
    let bf16 = (WeightDtype::BF16, GpuGemm::Kernels);
    let got = gpu_logits_with(&narrow, &stored, bf16, &inp, wgmma, true);
    let mma_sync = gpu_logits_with(&narrow, &stored, bf16, &inp, wgmma, false);
    let (a, b) = (rel_err(&got.to_f32_vec(), &mma_sync.to_f32_vec()), rel_err(&got.to_f32_vec(), &want.to_f32_vec()));
    println!("sm_90a bodies, bf16 activations and weights: {a:.2e} vs the mma.sync bodies, {b:.2e} vs the f32 model");
    assert!(a <= 1e-2, "sm_90a vs mma.sync bodies: relative error {a:e} > 1e-2");
    assert!(b <= 2e-2, "sm_90a bodies vs the f32 model: relative error {b:e} > 2e-2");
}

/// `--dtype bf16|f16` is for the cuda target only: the cpu and interp
/// targets refuse it with one clear line (before loading the model).
#[test]
fn narrow_dtype_is_refused_for_cpu_and_interp() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    common::make_model(&model, &["--arch", "llama", "--layers", "1"]);
    let out = dir.path().join("a.smelt");
    for target in ["cpu", "interp", "cpu,cuda"] {
        for dtype in ["bf16", "f16"] {
            common::fails(
                &[&"compile", &model, &"-o", &out, &"--target", &target, &"--dtype", &dtype],
                &["--dtype", dtype, "applies to `--target cuda` only"],
            );
        }
    }
    common::ok(&[&"compile", &model, &"-o", &out, &"--target", &"cpu", &"--dtype", &"f32"]);
}
