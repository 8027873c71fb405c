//! Runs a GPU launch plan on the host, every kernel in the KIR
//! interpreter's GPU mode: what tests use to check a whole plan (the
//! scheduler's buffers, aliases, scratch and narrow activations included)
//! against the reference interpreter where no GPU is at hand. Slow (one
//! interpreted thread at a time), so for small models and small blocks.
//!
//! Memory is one element array per root buffer of the plan (inputs,
//! constants, arena buffers, each in its plan element type); a view passes
//! its slice of its root's array to a kernel, and the slices a kernel
//! writes are copied back. Arena memory starts as NaN (floats) or zeros,
//! so a value read before it is written shows in the results. The plan is
//! checked and each call sized by the runtime's own `CheckedPlan`.
//!
//! Library calls (the cuBLAS GEMMs of `--gpu-gemm cublas`) run as a
//! reference product: the operands as stored (narrow ones widened, and
//! rounded to TF32 when the call asks for TF32 compute), summed in f64,
//! rounded once to the f32 result. cuBLAS sums in its own order, so this is
//! the result up to f32 summation error, not bitwise.

use std::collections::BTreeMap;

use smelt_ir::{DType, Data, Graph, Tensor};
use smelt_runtime::artifact::Signature;
use smelt_runtime::native::checked::{CheckedPlan, KvBinding};
use smelt_runtime::plan::{Elem, GemmCall, GemmCompute, LibraryCall, NativePlan, Storage};

use crate::kir::interp::{self, BufData, Mode};
use crate::kir::{Access, Kernel};

/// Runs `plan` (whose kernels are `kernels`, its constants `constants`)
/// for `graph`'s signature on `inputs`; the outputs by name, floats as f32
/// tensors of the output's dtype.
pub fn run_gpu_plan(
    graph: &Graph,
    kernels: &[Kernel],
    plan: &NativePlan,
    constants: &[u8],
    inputs: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let checked =
        CheckedPlan::new(plan.clone(), Signature::from_graph(graph), constants.len()).map_err(|e| e.to_string())?;
    let sizes = checked.size_call(inputs, &BTreeMap::new(), KvBinding::Dense).map_err(|e| e.to_string())?;
    let mut mem: BTreeMap<usize, BufData> = BTreeMap::new();
    for (b, buf) in plan.buffers.iter().enumerate() {
        if checked.bufs[b].root != b {
            continue;
        }
        let n = sizes.lens[b];
        let data = match &buf.storage {
            Storage::Input { name } => {
                let t = inputs.get(name).ok_or_else(|| format!("no input `{name}`"))?;
                from_tensor(t, buf.elem)
            }
            Storage::Weight { offset } => {
                let at = *offset as usize;
                let bytes = constants
                    .get(at..at + n * buf.elem.size())
                    .ok_or_else(|| format!("buffer `{}` lies outside the constants", buf.name))?;
                from_bytes(bytes, buf.elem)
            }
            _ => match buf.elem {
                Elem::F32 => BufData::F32(vec![f32::NAN; n]),
                Elem::BF16 => BufData::BF16(vec![half::bf16::NAN; n]),
                Elem::F16 => BufData::F16(vec![half::f16::NAN; n]),
                e => BufData::zeros(crate::schedule::scalar_of_elem(e), n),
            },
        };
        mem.insert(b, data);
    }
    // `SMELT_SIM_PROFILE=1`: the interpreter's time per kernel, on stderr.
    let profile = std::env::var_os("SMELT_SIM_PROFILE").is_some();
    let mut times: BTreeMap<String, f64> = BTreeMap::new();
    for (li, l) in plan.launches.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let ld = &checked.launches[li];
        let scalars = sizes.scalars[ld.scalar_at..ld.scalar_at + ld.scalar_ids.len()].to_vec();
        let view = |b: usize| (checked.bufs[b].root, sizes.elem_offsets[b], sizes.lens[b]);
        if let Some(LibraryCall::Gemm(call)) = &plan.kernels[l.kernel].library {
            let [x, w, y] = l.args[..] else {
                return Err(format!("launch {li} ({}): a GEMM takes 3 buffers", plan.kernels[l.kernel].symbol));
            };
            let operand = |b: usize| {
                let (r, at, n) = view(b);
                widen(&slice(&mem[&r], at, n))
            };
            let m = *scalars.first().ok_or_else(|| format!("launch {li}: a GEMM without its row count"))? as usize;
            let out = gemm(call, m, operand(x)?, operand(w)?)?;
            let (r, at, _) = view(y);
            write(mem.get_mut(&r).expect("every root has memory"), at, &BufData::F32(out));
            *times.entry(plan.kernels[l.kernel].symbol.clone()).or_default() += t0.elapsed().as_secs_f64();
            continue;
        }
        let k = kernels.get(l.kernel).ok_or_else(|| format!("launch {li}: no kernel {}", l.kernel))?;
        let eval = |d: &String| -> Result<usize, String> {
            let dim: smelt_ir::Dim = d.parse().map_err(|e| format!("{e}"))?;
            Ok(dim.eval_map(&sizes.syms).map_err(|e| e.to_string())? as usize)
        };
        let grid = l.grid.as_ref().ok_or_else(|| format!("launch {li} ({}) has no grid", k.name))?;
        let grid = [eval(&grid[0])?, eval(&grid[1])?, eval(&grid[2])?];
        let block = k.gpu.as_ref().ok_or_else(|| format!("{} is not a GPU kernel", k.name))?.block.map(|d| d as usize);
        let mut args: Vec<BufData> = l
            .args
            .iter()
            .map(|&b| {
                let (r, at, n) = view(b);
                slice(&mem[&r], at, n)
            })
            .collect();
        interp::run(k, &mut args, &scalars, Mode::Gpu { grid, block })
            .map_err(|e| format!("launch {li} ({}, node {}): {e}", k.name, l.node))?;
        for ((&b, data), (_, d)) in l.args.iter().zip(args).zip(k.global_buffers()) {
            if d.access == Access::Write {
                let (r, at, _) = view(b);
                write(mem.get_mut(&r).expect("every root has memory"), at, &data);
            }
        }
        *times.entry(k.name.clone()).or_default() += t0.elapsed().as_secs_f64();
    }
    if profile {
        let mut v: Vec<_> = times.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (name, t) in v.iter().take(8) {
            eprintln!("simulate: {t:8.3}s {name}");
        }
    }
    let mut out = BTreeMap::new();
    for (name, b, dtype) in &checked.outputs {
        let (r, at, n) = (checked.bufs[*b].root, sizes.elem_offsets[*b], sizes.lens[*b]);
        let shape = checked.shape_in(*b, &sizes).map_err(|e| e.to_string())?;
        out.insert(name.clone(), to_tensor(&slice(&mem[&r], at, n), *dtype, shape)?);
    }
    Ok(out)
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` as the library call computes it (see the
/// module header for the precision).
fn gemm(call: &GemmCall, m: usize, mut x: Vec<f32>, mut w: Vec<f32>) -> Result<Vec<f32>, String> {
    let (n, k) = (call.n as usize, call.k as usize);
    if x.len() != m * k || w.len() != n * k {
        return Err(format!("GEMM m={m} n={n} k={k} on {} and {} elements", x.len(), w.len()));
    }
    if call.compute == GemmCompute::Tf32 {
        x.iter_mut().chain(w.iter_mut()).for_each(|v| *v = to_tf32(*v));
    }
    Ok((0..m * n)
        .map(|i| {
            let (r, j) = (i / n, i % n);
            (0..k).map(|t| x[r * k + t] as f64 * w[j * k + t] as f64).sum::<f64>() as f32
        })
        .collect())
}

/// `x` rounded to TF32 (10 explicit significand bits), to nearest even.
pub fn to_tf32(x: f32) -> f32 {
    let b = x.to_bits();
    let round = 0xfff + ((b >> 13) & 1);
    f32::from_bits(b.wrapping_add(round) & !0x1fff)
}

/// A float buffer's values as f32 (narrow floats widened exactly).
fn widen(b: &BufData) -> Result<Vec<f32>, String> {
    match b {
        BufData::F32(v) => Ok(v.clone()),
        BufData::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        BufData::F16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        other => Err(format!("a GEMM operand that is not float: {other:?}")),
    }
}

fn from_tensor(t: &Tensor, elem: Elem) -> BufData {
    match (&t.data, elem) {
        (Data::Bool(v), _) => BufData::Bool(v.clone()),
        (Data::I64(v), Elem::I32) => BufData::I32(v.iter().map(|&x| x as i32).collect()),
        (Data::I64(v), _) => BufData::I64(v.clone()),
        (_, Elem::BF16) => BufData::BF16(t.to_f32_vec().iter().map(|&x| half::bf16::from_f32(x)).collect()),
        (_, Elem::F16) => BufData::F16(t.to_f32_vec().iter().map(|&x| half::f16::from_f32(x)).collect()),
        _ => BufData::F32(t.to_f32_vec()),
    }
}

fn from_bytes(b: &[u8], elem: Elem) -> BufData {
    let words = |n: usize| b.chunks_exact(n);
    match elem {
        Elem::F32 => BufData::F32(words(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
        Elem::I32 => BufData::I32(words(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()),
        Elem::I64 => BufData::I64(words(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
        Elem::Bool => BufData::Bool(b.iter().map(|&x| x != 0).collect()),
        Elem::BF16 => BufData::BF16(words(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect()),
        Elem::F16 => BufData::F16(words(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect()),
    }
}

fn slice(d: &BufData, at: usize, n: usize) -> BufData {
    match d {
        BufData::F32(v) => BufData::F32(v[at..at + n].to_vec()),
        BufData::I32(v) => BufData::I32(v[at..at + n].to_vec()),
        BufData::I64(v) => BufData::I64(v[at..at + n].to_vec()),
        BufData::Bool(v) => BufData::Bool(v[at..at + n].to_vec()),
        BufData::BF16(v) => BufData::BF16(v[at..at + n].to_vec()),
        BufData::F16(v) => BufData::F16(v[at..at + n].to_vec()),
    }
}

fn write(d: &mut BufData, at: usize, src: &BufData) {
    match (d, src) {
        (BufData::F32(v), BufData::F32(s)) => v[at..at + s.len()].copy_from_slice(s),
        (BufData::I32(v), BufData::I32(s)) => v[at..at + s.len()].copy_from_slice(s),
        (BufData::I64(v), BufData::I64(s)) => v[at..at + s.len()].copy_from_slice(s),
        (BufData::Bool(v), BufData::Bool(s)) => v[at..at + s.len()].copy_from_slice(s),
        (BufData::BF16(v), BufData::BF16(s)) => v[at..at + s.len()].copy_from_slice(s),
        (BufData::F16(v), BufData::F16(s)) => v[at..at + s.len()].copy_from_slice(s),
        _ => unreachable!("a kernel's buffer keeps its element type"),
    }
}

fn to_tensor(d: &BufData, dtype: DType, shape: Vec<usize>) -> Result<Tensor, String> {
    let t = match d {
        BufData::F32(v) => Tensor::from_f32(dtype, shape, v.clone()),
        BufData::BF16(v) => Tensor::from_f32(dtype, shape, v.iter().map(|x| x.to_f32()).collect()),
        BufData::F16(v) => Tensor::from_f32(dtype, shape, v.iter().map(|x| x.to_f32()).collect()),
        BufData::I32(v) => Tensor::from_i64(dtype, shape, v.iter().map(|&x| x as i64).collect()),
        BufData::I64(v) => Tensor::from_i64(dtype, shape, v.clone()),
        BufData::Bool(v) => return Ok(Tensor { dtype, shape, data: Data::Bool(v.clone()) }),
    };
    t.map_err(|e| e.to_string())
}
