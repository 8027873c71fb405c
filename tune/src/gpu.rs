//! Checking and timing GPU weight-product variants
//! (`Site::GpuWeightProduct`).
//!
//! A variant is run the way a model runs it: the bench holds a small
//! graph of `copies` products `y_i = x · W_iᵀ` (or gated MLPs) sharing
//! `x`, each with its own weights, and schedules it for the GPU with a
//! tuning table that names the variant, so the scheduler builds, places
//! and records the kernel exactly as a compile would (the bench checks
//! that the plan says so). Then:
//! - **check**: the plan runs on random rows (1, 3 and 67: both the GEMV
//!   and, past every `gemv_max_m`, the tiled GEMM) and `y_0` is compared
//!   with the reference interpreter's result; with bf16/f16 weights the
//!   tiled GEMM multiplies on tensor cores, which round `x` to the
//!   weights' type, so its reference rounds `x` too. The tolerance is
//!   [`crate::measure::compare`]'s, and for tensor cores also the bound of
//!   their accumulation, which is not IEEE: each k-step of 16 products is
//!   added to the f32 accumulator aligned and truncated, not rounded, so
//!   its error is up to about two units in the last place of the partial
//!   sum per step, and biased (Fasi et al. 2021; Khattak and Mikaitis
//!   2025). An element of `y = x · Wᵀ` may then be off by
//!   `2 · ⌈k/16⌉ · 2⁻²³ · Σ|x||w|` (`TC_STEP`; on an H200, the default
//!   GEMM at k = 8192 was 1.6e-4 from the exact sum of -0.5033), and a gated
//!   product by that bound carried through `act(g) · u`;
//! - **time**: [`CudaModel::time_launches`](smelt_runtime::cuda::CudaModel::time_launches) (CUDA events around the
//!   launches alone, replayed as a CUDA graph) for each timed row count;
//!   one call runs all the copies, whose weights together exceed the GPU's
//!   L2 cache several times ([`ROTATE_BYTES`]), so a memory-bound GEMV is
//!   timed from HBM as in a model.
//!
//! Without a GPU, [`GpuExec::Simulated`] still schedules the graph (and
//! checks the plan), then runs the variant's kernel in the KIR
//! interpreter's GPU mode for the check, built with a grid of one block
//! (both of the template's paths walk their work with a loop striding by
//! the grid's size, so the size changes no result, and the interpreter
//! runs a block's threads one by one), and leaves the timing to the
//! [`Timer`] alone: tests use it with a deterministic timer.

use std::collections::BTreeMap;
use std::sync::Arc;

use smelt_codegen::schedule::{schedule, Device, Schedule, ScheduleOptions, WeightDtype};
use smelt_codegen::tuning::{Site, Tuning, Variant};
use smelt_ir::{DType, Graph, Op, StoredTensor, Tensor};
use smelt_runtime::plan::TuningSource;

use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::Scalar;
use smelt_codegen::templates::gpu::WeightProductParams;

use crate::measure::{compare_with_slack, random, Evaluate, Outcome, Timer};
use crate::TuneError;

/// Bytes the copies' weights should exceed together: four times the 50
/// MiB L2 cache of an H100/H200 and then some.
pub const ROTATE_BYTES: usize = 256 << 20;
/// At most this many copies (small products have many launches per call).
const MAX_COPIES: usize = 64;
/// Rows checked: decode, a few rows, and past every `gemv_max_m`.
pub const CHECK_ROWS: [usize; 3] = [1, 3, 67];

/// Where GPU variants run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuExec {
    /// A GPU, by its ordinal, through the CUDA runtime.
    Device { ordinal: usize },
    /// The KIR interpreter's GPU mode on the host: the check only (for
    /// tests; timings come from the [`Timer`] alone).
    Simulated,
}

/// One checked row count: its input and reference results for `y_0`
/// (exact, and with `x` rounded to the weights' type).
struct Check {
    m: usize,
    x: Tensor,
    exact: Vec<f32>,
    rounded: Vec<f32>,
    /// Per checked element: what tensor-core accumulation may add to the
    /// error of `rounded` (empty for f32 weights, which never use them).
    tc_slack: Vec<f32>,
}

/// Units of `Σ|x||w|` a tensor-core product may be off by per k-step of
/// 16 (two units in the last place of an f32 partial sum).
const TC_STEP: f32 = 2.0 * f32::EPSILON;
/// A bound of `|act'|` and of `|act(g)| / |g|` for the gated activations
/// (SiLU's derivative peaks at 1.1, GELU's at 1.13).
const ACT_SLOPE: f32 = 1.2;

/// Checks and times the variants of one GPU site.
pub struct GpuBench {
    site: Site,
    rows: Vec<usize>,
    exec: GpuExec,
    graph: Graph,
    weights: BTreeMap<String, StoredTensor>,
    copies: usize,
    checks: Vec<Check>,
    /// The output columns the checks compare ([`checked_columns`]).
    cols: Vec<usize>,
    /// Copy 0's weights as stored, for the simulated check.
    stored: Vec<BufData>,
    wrong: Option<Variant>,
    /// The site's signature (the tuning table key the plans are built with).
    signature: String,
    /// The device's compute capability (`GpuExec::Device`), read once
    /// (only the llvm build emits PTX for it).
    #[cfg_attr(not(feature = "llvm"), allow(dead_code))]
    capability: Option<(u32, u32)>,
}

impl GpuBench {
    /// A bench for `site` timing each of `rows` on `exec`; `copies` of the
    /// product by default enough to exceed [`ROTATE_BYTES`].
    pub fn new(site: Site, rows: &[usize], exec: GpuExec, copies: Option<usize>) -> Result<GpuBench, TuneError> {
        if !site.is_gpu() {
            return Err(TuneError::Target { site: site.to_string(), target: "cuda" });
        }
        // The PTX's architecture is the device's: read once, here.
        let capability = match exec {
            GpuExec::Device { ordinal } => {
                Some(smelt_runtime::cuda::probe(ordinal).map_err(|e| TuneError::Gpu(e.to_string()))?.compute_capability)
            }
            GpuExec::Simulated => None,
        };
        let (n, k, act, w) = site.product();
        let per_copy = site.weights() * n * k * w.size();
        let copies = copies.unwrap_or_else(|| ROTATE_BYTES.div_ceil(per_copy.max(1)).clamp(1, MAX_COPIES)).max(1);
        let graph =
            product_graph(&site, copies).map_err(|message| TuneError::Reference { site: site.to_string(), message })?;
        // Copy 0's weights are random; the others are the same values
        // rotated by their index, so no two copies share bytes.
        let base: Vec<Vec<f32>> = (0..site.weights()).map(|i| random(n * k, 17 + i as u64)).collect();
        let mut weights = BTreeMap::new();
        for c in 0..copies {
            for (i, b) in base.iter().enumerate() {
                let mut v = b.clone();
                let by = c % v.len().max(1);
                v.rotate_left(by);
                let t = Tensor::from_f32(DType::F32, vec![n, k], v).expect("sizes match");
                weights.insert(weight_name(c, i), StoredTensor::from_tensor(&t));
            }
        }
        // The reference sees the weights as stored (rounded to `w`).
        let stored: Vec<Vec<f32>> = base.iter().map(|b| b.iter().map(|x| round_to(*x, w)).collect()).collect();
        let stored_bufs = base
            .iter()
            .map(|b| match w {
                Scalar::BF16 => BufData::BF16(b.iter().map(|x| half::bf16::from_f32(*x)).collect()),
                Scalar::F16 => BufData::F16(b.iter().map(|x| half::f16::from_f32(*x)).collect()),
                _ => BufData::F32(b.clone()),
            })
            .collect();
        let op = match act {
            None => Op::MatMul {},
            Some(a) => Op::GatedMlp { act: a.name().to_string() },
        };
        // The reference covers a sample of the output columns (all of a
        // narrow product), so a wide output head is checked in seconds.
        let cols = checked_columns(n);
        let kn: Vec<Tensor> = stored.iter().map(|wv| transposed_columns(wv, &cols, k)).collect();
        let reference = |x: &[f32], m: usize| -> Result<Vec<f32>, TuneError> {
            let xt = Tensor::from_f32(DType::F32, vec![m, k], x.to_vec()).expect("sizes match");
            let mut operands = vec![&xt];
            operands.extend(kn.iter());
            let out = smelt_ir::interp::eval_op(&op, &operands, &BTreeMap::new())
                .map_err(|e| TuneError::Reference { site: site.to_string(), message: e.to_string() })?;
            Ok(out[0].to_f32_vec())
        };
        // Plain products `x · W_iᵀ` over the checked columns, for the
        // tensor-core bound: of |x| and |W_i| (Σ|x||w|), and for a gated
        // product, of x and W_i (its two halves).
        let abs_kn: Vec<Tensor> = stored
            .iter()
            .map(|wv| transposed_columns(&wv.iter().map(|v| v.abs()).collect::<Vec<_>>(), &cols, k))
            .collect();
        let product = |x: &[f32], m: usize, kn: &Tensor| -> Result<Vec<f32>, TuneError> {
            let xt = Tensor::from_f32(DType::F32, vec![m, k], x.to_vec()).expect("sizes match");
            let out = smelt_ir::interp::eval_op(&Op::MatMul {}, &[&xt, kn], &BTreeMap::new())
                .map_err(|e| TuneError::Reference { site: site.to_string(), message: e.to_string() })?;
            Ok(out[0].to_f32_vec())
        };
        let unit = TC_STEP * k.div_ceil(16) as f32;
        let mut checks = vec![];
        for (i, &m) in CHECK_ROWS.iter().enumerate() {
            let x = random(m * k, 101 + i as u64);
            let exact = reference(&x, m)?;
            let (rounded, tc_slack) = if w == Scalar::F32 {
                (exact.clone(), vec![])
            } else {
                let xr: Vec<f32> = x.iter().map(|v| round_to(*v, w)).collect();
                let xa: Vec<f32> = xr.iter().map(|v| v.abs()).collect();
                let mut bounds = vec![];
                for a in &abs_kn {
                    bounds.push(product(&xa, m, a)?.into_iter().map(|s| unit * s).collect::<Vec<f32>>());
                }
                let slack = match act {
                    None => bounds.swap_remove(0),
                    // y = act(g) · u, g and u each off by their bound:
                    // |Δy| ≤ S·|u|·Δg + S·|g|·Δu + S·Δg·Δu, with either
                    // half as the gate.
                    Some(_) => {
                        let (a, b) = (product(&xr, m, &kn[0])?, product(&xr, m, &kn[1])?);
                        let (da, db) = (&bounds[0], &bounds[1]);
                        (0..a.len())
                            .map(|j| ACT_SLOPE * ((a[j].abs() + da[j]) * db[j] + (b[j].abs() + db[j]) * da[j]))
                            .collect()
                    }
                };
                (reference(&xr, m)?, slack)
            };
            let x = Tensor::from_f32(DType::F32, vec![m, k], x).expect("sizes match");
            checks.push(Check { m, x, exact, rounded, tc_slack });
        }
        Ok(GpuBench {
            site,
            rows: rows.to_vec(),
            exec,
            graph,
            weights,
            copies,
            checks,
            stored: stored_bufs,
            cols,
            wrong: None,
            signature: site.signature(&[]),
            capability,
        })
    }

    /// How many products one call runs.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// The graph scheduled with `v` as the site's measured winner, after
    /// checking that the plan builds `v` for every product.
    fn schedule(&self, v: &Variant) -> Result<Schedule, String> {
        let (_, _, _, w) = self.site.product();
        let mut tuning = Tuning::default();
        tuning.insert(&self.signature, *v, "smelt-tune");
        let weight_dtype = match w {
            Scalar::BF16 => WeightDtype::BF16,
            Scalar::F16 => WeightDtype::F16,
            _ => WeightDtype::F32,
        };
        let options = ScheduleOptions {
            device: Device::Gpu,
            weight_dtype,
            tuning: Some(Arc::new(tuning)),
            ..ScheduleOptions::default()
        };
        let s = schedule(&self.graph, &self.weights, options).map_err(|e| e.to_string())?;
        let want = v.to_string();
        let products = s
            .plan
            .launches
            .iter()
            .filter(|l| {
                s.plan.kernels[l.kernel]
                    .tuning
                    .as_ref()
                    .is_some_and(|t| t.source == TuningSource::Measured && t.params == want)
            })
            .count();
        // A product is one launch of the variant (a generated kernel, or a
        // plain product's GEMM) or two (a gated product's two GEMMs).
        if products < self.copies {
            return Err(format!("the plan runs the variant in {products} launches for {} products", self.copies));
        }
        Ok(s)
    }

    /// Why `got` (`y_0` of a run on `c`'s rows) is wrong, if it is.
    fn check_outcome(&self, v: &Variant, mut got: Vec<f32>, c: &Check) -> Option<String> {
        let (n, _, _, w) = self.site.product();
        // Where the products round `x` to the weights' type: the tiled
        // GEMM on tensor cores, and cuBLAS (one type for both operands).
        let rounds_x = match v {
            Variant::Gpu { p } => c.m > p.gemv_max_m,
            Variant::Cublas => true,
            _ => return Some("not a GPU variant".into()),
        };
        let tensor_cores = rounds_x && w != Scalar::F32;
        let (want, slack) = if tensor_cores { (&c.rounded, &c.tc_slack[..]) } else { (&c.exact, &[][..]) };
        if self.wrong == Some(*v) {
            // The seeded fault: one result off.
            if let Some(first) = got.first_mut() {
                *first = -*first - 1.0;
            }
        }
        if got.len() != c.m * n {
            return Some(format!("{} rows: {} results, expected {}", c.m, got.len(), c.m * n));
        }
        let got: Vec<f32> =
            (0..c.m).flat_map(|i| self.cols.iter().map(move |&j| (i, j))).map(|(i, j)| got[i * n + j]).collect();
        compare_with_slack(&got, want, slack).map(|e| format!("{} rows: {e} (of the checked columns)", c.m))
    }

    fn simulated(&self, v: &Variant, s: Schedule, timer: &mut dyn Timer) -> Outcome {
        let (n, k, act, w) = self.site.product();
        let times = |timer: &mut dyn Timer| -> Vec<f64> {
            self.rows.iter().map(|&m| timer.seconds(&self.site, v, m, &mut |_| 0.0)).collect()
        };
        let Variant::Gpu { p } = v else {
            // cuBLAS: the whole plan, its GEMMs as reference products.
            let constants = match constant_bytes(s.constants) {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(e),
            };
            for c in &self.checks {
                let inputs = BTreeMap::from([("x".to_string(), c.x.clone())]);
                let out = match smelt_codegen::simulate::run_gpu_plan(
                    &self.graph,
                    &s.kernels,
                    &s.plan,
                    &constants,
                    &inputs,
                ) {
                    Ok(o) => o,
                    Err(e) => return Outcome::Failed(format!("{} rows: {e}", c.m)),
                };
                if let Some(e) = self.check_outcome(v, out["y0"].to_f32_vec(), c) {
                    return Outcome::Wrong(e);
                }
            }
            return Outcome::Timed(times(timer));
        };
        let params = match p.resolve(n) {
            Ok(params) => WeightProductParams { blocks: 1, ..params },
            Err(e) => return Outcome::Failed(format!("building: {e}")),
        };
        let x = self.site.rows_type();
        let built = match smelt_codegen::select::weight_node_gpu(&x, n, k, act.map(|a| a.name()), w, Some(&params)) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(format!("building: {e}")),
        };
        let kernel = &built.kernel;
        let Some(block) = kernel.gpu.as_ref().map(|g| g.block.map(|d| d as usize)) else {
            return Outcome::Failed(format!("`{}` is not a GPU kernel", kernel.name));
        };
        for c in &self.checks {
            let mut bufs = vec![BufData::F32(c.x.to_f32_vec())];
            bufs.extend(self.stored.iter().cloned());
            bufs.push(BufData::F32(vec![f32::NAN; c.m * n]));
            let run = interp::run(kernel, &mut bufs, &[c.m as i64], Mode::Gpu { grid: [1, 1, 1], block });
            if let Err(e) = run {
                return Outcome::Failed(format!("{} rows: {e}", c.m));
            }
            let Some(BufData::F32(got)) = bufs.pop() else {
                return Outcome::Failed("the result is not f32".into());
            };
            if let Some(e) = self.check_outcome(v, got, c) {
                return Outcome::Wrong(e);
            }
        }
        Outcome::Timed(times(timer))
    }

    #[cfg(feature = "llvm")]
    fn on_device(&self, v: &Variant, s: Schedule, ordinal: usize, timer: &mut dyn Timer) -> Outcome {
        use smelt_codegen::llvm::{emit_ptx, GpuArch};
        use smelt_runtime::artifact::Signature;
        use smelt_runtime::cuda::{CudaModel, CudaPlan};
        use smelt_runtime::native::Weights;
        use smelt_runtime::plan::PtxModule;

        let arch = match self.capability {
            Some((9, 0)) => GpuArch::Sm90a,
            Some((9.., _)) => GpuArch::Sm90,
            _ => GpuArch::Sm80,
        };
        let ptx = match emit_ptx(&s.kernels, arch) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(format!("emitting PTX: {e}")),
        };
        let Schedule { mut plan, constants, .. } = s;
        for e in plan.kernels.iter_mut().filter(|e| e.library.is_none()) {
            e.lowering = "nvptx".into();
        }
        plan.ptx = vec![PtxModule { arch: arch.name().into(), file: "tune.ptx".into() }];
        let bytes = match constant_bytes(constants) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
        };
        let opened = Weights::from_bytes(&bytes).map_err(|e| e.to_string()).and_then(|w| {
            let plan = CudaPlan::new(plan, Signature::from_graph(&self.graph), w.len()).map_err(|e| e.to_string())?;
            CudaModel::with_plan(plan, &w, &|_| Ok(ptx.clone()), ordinal).map_err(|e| e.to_string())
        });
        let mut model = match opened {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(format!("loading the variant: {e}")),
        };
        for c in &self.checks {
            let inputs = BTreeMap::from([("x".to_string(), c.x.clone())]);
            let out = match model.run(inputs) {
                Ok(o) => o,
                Err(e) => return Outcome::Failed(format!("{} rows: {e}", c.m)),
            };
            if let Some(e) = self.check_outcome(v, out["y0"].to_f32_vec(), c) {
                return Outcome::Wrong(e);
            }
        }
        let (_, k, _, _) = self.site.product();
        let mut times = vec![];
        for &m in &self.rows {
            let x = Tensor::from_f32(DType::F32, vec![m, k], random(m * k, 7)).expect("sizes match");
            let mut failed = None;
            let copies = self.copies;
            // The timer asks for `calls` products; one call of the plan
            // runs every copy, so it runs enough plan calls to cover them
            // and scales their time to `calls` products.
            let mut go = |calls: usize| -> f64 {
                let inputs = BTreeMap::from([("x".to_string(), x.clone())]);
                let plan_calls = calls.div_ceil(copies).max(1);
                match model.time_launches(inputs, plan_calls) {
                    Ok(t) => t / (plan_calls * copies) as f64 * calls as f64,
                    Err(e) => {
                        failed = Some(e.to_string());
                        1.0
                    }
                }
            };
            let t = timer.seconds(&self.site, v, m, &mut go);
            if let Some(e) = failed {
                return Outcome::Failed(format!("timing {m} rows: {e}"));
            }
            times.push(t);
        }
        Outcome::Timed(times)
    }

    #[cfg(not(feature = "llvm"))]
    fn on_device(&self, _: &Variant, _: Schedule, _: usize, _: &mut dyn Timer) -> Outcome {
        Outcome::Failed(TuneError::CudaNeedsLlvm.to_string())
    }
}

impl Evaluate for GpuBench {
    /// Makes `v`'s first result wrong after it runs.
    fn seed_wrong(&mut self, v: Variant) {
        self.wrong = Some(v);
    }

    fn evaluate(&mut self, v: &Variant, timer: &mut dyn Timer) -> Outcome {
        // The plan is built even when simulating: that checks the
        // scheduler takes the variant.
        let s = match self.schedule(v) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(format!("building: {e}")),
        };
        match self.exec {
            GpuExec::Simulated => self.simulated(v, s, timer),
            GpuExec::Device { ordinal } => self.on_device(v, s, ordinal, timer),
        }
    }
}

/// The bytes a schedule's constants writer holds.
fn constant_bytes(c: smelt_runtime::constants::ConstantsWriter) -> Result<Vec<u8>, String> {
    let read = c.finish().map_err(|e| e.to_string()).and_then(|d| d.read().map_err(|e| e.to_string()));
    read.map_err(|e| format!("reading the constants: {e}"))
}

fn weight_name(copy: usize, i: usize) -> String {
    format!("w{copy}_{i}")
}

/// `copies` products of `site` on one `x [m, k]`: outputs `y0`, `y1`, ...
fn product_graph(site: &Site, copies: usize) -> Result<Graph, String> {
    let (n, k, act, _) = site.product();
    let outs: Vec<String> = (0..copies).map(|c| format!("y{c}")).collect();
    let mut text = format!("func @tune(%x: f32[m, {k}]) -> ({}) {{\n", outs.join(", "));
    for c in 0..copies {
        for i in 0..site.weights() {
            let w = weight_name(c, i);
            text.push_str(&format!("  %{w} = weight name=\"{w}\" : f32[{n}, {k}]\n"));
            text.push_str(&format!("  %{w}t = transpose %{w} perm=[1, 0] : f32[{k}, {n}]\n"));
        }
        let (w0, w1) = (weight_name(c, 0), weight_name(c, 1));
        text.push_str(&match act {
            None => format!("  %y{c} = matmul %x, %{w0}t : f32[m, {n}]\n"),
            Some(a) => format!("  %y{c} = gated_mlp %x, %{w0}t, %{w1}t act=\"{}\" : f32[m, {n}]\n", a.name()),
        });
    }
    let rets: Vec<String> = outs.iter().map(|o| format!("{o}=%{o}")).collect();
    text.push_str(&format!("  return {}\n}}\n", rets.join(", ")));
    smelt_ir::text::parse(&text).map_err(|e| e.to_string())
}

/// The output columns a check compares: all of up to 512, else 448
/// spread evenly and the last 64 (where tiles end short).
pub fn checked_columns(n: usize) -> Vec<usize> {
    if n <= 512 {
        return (0..n).collect();
    }
    let mut cols: Vec<usize> = (0..448).map(|i| i * (n - 64) / 448).collect();
    cols.extend(n - 64..n);
    cols
}

/// Columns `cols` of `[n, k]` values (rows of `W`), as the graph's
/// `[k, cols]` transpose.
fn transposed_columns(w: &[f32], cols: &[usize], k: usize) -> Tensor {
    let c = cols.len();
    let mut t = vec![0f32; c * k];
    for (jj, &j) in cols.iter().enumerate() {
        for p in 0..k {
            t[p * c + jj] = w[j * k + p];
        }
    }
    Tensor::from_f32(DType::F32, vec![k, c], t).expect("sizes match")
}

/// `x` as a weight of type `w` holds it.
fn round_to(x: f32, w: smelt_codegen::kir::Scalar) -> f32 {
    match w {
        Scalar::BF16 => half::bf16::from_f32(x).to_f32(),
        Scalar::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::{compare, FnTimer};
    use smelt_codegen::tuning::GpuParams;

    #[test]
    fn wide_outputs_check_a_sample_of_columns_with_the_tail() {
        assert_eq!(checked_columns(24), (0..24).collect::<Vec<_>>());
        let c = checked_columns(49152);
        assert_eq!(c.len(), 512);
        assert!(c.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert_eq!((c[0], c[447] < 49152 - 64, c[511]), (0, true, 49151));
    }

    #[test]
    fn the_simulated_bench_checks_variants_and_rejects_a_wrong_one() {
        let site = Site::gpu_weight_product(24, 40, None, Scalar::F32).unwrap();
        let mut b = GpuBench::new(site, &[1, 128], GpuExec::Simulated, Some(2)).unwrap();
        assert_eq!(b.copies(), 2);
        // A small block keeps the interpreter quick.
        let p = GpuParams { threads: 128, wpg: 1, rpg: 1, unroll: 1, mtile: 4, gemv_max_m: 4, tile: 0, bk: 16, bps: 1 };
        let v = Variant::Gpu { p };
        let mut timer = FnTimer(|_: &Variant, m: usize| m as f64);
        assert_eq!(b.evaluate(&v, &mut timer), Outcome::Timed(vec![1.0, 128.0]));
        b.seed_wrong(v);
        match b.evaluate(&v, &mut timer) {
            Outcome::Wrong(why) => assert!(why.contains("the reference is"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A point the template refuses fails to build.
        let bad = Variant::Gpu { p: GpuParams { threads: 128, wpg: 8, ..p } };
        assert!(matches!(b.evaluate(&bad, &mut timer), Outcome::Failed(_)));
        // cuBLAS is scheduled as library calls and checked too.
        assert_eq!(b.evaluate(&Variant::Cublas, &mut timer), Outcome::Timed(vec![1.0, 128.0]));
    }

    /// cuBLAS with bf16 weights converts `x` to bf16 first: checked
    /// against the reference with `x` rounded, plain and gated.
    #[test]
    fn cublas_with_narrow_weights_is_checked_against_rounded_rows() {
        for act in [None, Some("silu")] {
            let site = Site::gpu_weight_product(16, 32, act, Scalar::BF16).unwrap();
            let mut b = GpuBench::new(site, &[1], GpuExec::Simulated, Some(2)).unwrap();
            let mut timer = FnTimer(|_: &Variant, _| 1.0);
            assert_eq!(b.evaluate(&Variant::Cublas, &mut timer), Outcome::Timed(vec![1.0]), "{act:?}");
            b.seed_wrong(Variant::Cublas);
            assert!(matches!(b.evaluate(&Variant::Cublas, &mut timer), Outcome::Wrong(_)), "{act:?}");
        }
    }

    /// A tensor core's product as the hardware sums it (see the module
    /// docs): each k-step of 16 exact products is added to the f32
    /// accumulator and the sum truncated toward zero; `drop` leaves one
    /// step out (a wrong variant).
    fn tensor_core_rows(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, drop: Option<usize>) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for s in (0..k.div_ceil(16)).filter(|s| Some(*s) != drop) {
                    let block: f64 =
                        (s * 16..(s * 16 + 16).min(k)).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                    let total = acc as f64 + block;
                    let mut t = total as f32;
                    if (t as f64).abs() > total.abs() {
                        t = f32::from_bits(t.to_bits() - 1);
                    }
                    acc = t;
                }
                y[r * n + j] = acc;
            }
        }
        y
    }

    /// At k = 8192 a tiled GEMM's truncating accumulation is within the
    /// check's tensor-core bound, plain and gated, though not within the
    /// plain tolerance; a product missing one k-step of 512 is not.
    #[test]
    fn tensor_core_accumulation_passes_the_check_and_a_dropped_k_step_does_not() {
        let (n, k) = (8, 8192);
        let p = GpuParams { threads: 128, wpg: 1, rpg: 1, unroll: 1, mtile: 4, gemv_max_m: 4, tile: 0, bk: 16, bps: 1 };
        let v = Variant::Gpu { p };
        for act in [None, Some("silu")] {
            let site = Site::gpu_weight_product(n, k, act, Scalar::BF16).unwrap();
            let b = GpuBench::new(site, &[1], GpuExec::Simulated, Some(1)).unwrap();
            let c = b.checks.iter().find(|c| c.m > p.gemv_max_m).unwrap();
            let x: Vec<f32> = c.x.to_f32_vec().iter().map(|v| round_to(*v, Scalar::BF16)).collect();
            let ws: Vec<Vec<f32>> = b
                .stored
                .iter()
                .map(|s| match s {
                    BufData::BF16(v) => v.iter().map(|h| h.to_f32()).collect(),
                    other => panic!("{other:?}"),
                })
                .collect();
            let run = |drop| -> Vec<f32> {
                let halves: Vec<Vec<f32>> = ws.iter().map(|w| tensor_core_rows(&x, w, c.m, n, k, drop)).collect();
                match act {
                    None => halves[0].clone(),
                    Some(_) => halves[0].iter().zip(&halves[1]).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect(),
                }
            };
            let got = run(None);
            assert_eq!(b.check_outcome(&v, got.clone(), c), None, "{act:?}");
            assert!(compare(&got, &c.rounded).is_some(), "{act:?}: the plain tolerance would reject it");
            let wrong = b.check_outcome(&v, run(Some(100)), c);
            assert!(wrong.as_ref().is_some_and(|e| e.contains("the reference is")), "{act:?}: {wrong:?}");
        }
    }
}
