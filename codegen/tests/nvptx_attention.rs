//! The GPU attention kernels `select_gpu` picks for real decoders' shapes
//! and a few odd head dims (default `GpuConfig`: split keys for decode, the
//! combine kernel, which runs flash attention for prefill), emitted as PTX
//! for sm_80, sm_90 and sm_90a and assembled by `ptxas` (skipped, saying
//! why, when none is found): no spills on sm_90/sm_90a (at most 16 bytes on
//! sm_80), static shared memory within 48 KiB and at least what the kernels
//! declare. Prints each kernel's registers, spills and shared memory, the
//! grids of a batch-1 decode step and of a 512-token prefill. `cargo test -p smelt-codegen --features llvm --test
//! nvptx_attention -- --nocapture` shows them.
#![cfg(feature = "llvm")]

use smelt_codegen::kir::{Kernel, Space};
use smelt_codegen::select::{select_gpu, GpuConfig, Instance, Selected};
use smelt_codegen::{emit_ptx, ptxas, GpuArch};
use smelt_ir::{DType, Dim, Op, TensorType};
use std::collections::BTreeMap;

fn f(dims: &str) -> TensorType {
    TensorType::new(DType::F32, dims.split(',').map(|d| d.trim().parse::<Dim>().unwrap()).collect())
}

/// (model, query heads, kv heads, head dim, op, with a padding mask).
fn shapes() -> Vec<(&'static str, usize, usize, usize, Op, bool)> {
    let causal =
        |d: usize, window, softcap| Op::Attention { scale: 1.0 / (d as f64).sqrt(), causal: true, window, softcap };
    vec![
        ("llama3.2-1b", 32, 8, 64, causal(64, None, None), false),
        ("llama3.2-1b+mask", 32, 8, 64, causal(64, None, None), true),
        ("llama3.1-8b", 32, 8, 128, causal(128, None, None), false),
        ("qwen2.5-0.5b", 14, 2, 64, causal(64, None, None), false),
        ("gemma2-2b", 8, 4, 256, causal(256, Some(4096), Some(50.0)), false),
        ("phi3-mini", 32, 32, 96, causal(96, None, None), false),
        // Odd head dims: their combine (flash) kernels only.
        ("d24 4:2", 4, 2, 24, causal(24, None, None), false),
        ("d40 3:1+mask", 3, 1, 40, causal(40, Some(64), None), true),
        ("d80 2:1", 2, 1, 80, causal(80, None, None), false),
    ]
}

/// The instances of the node's steps.
fn steps(op: &Op, hq: usize, hkv: usize, d: usize, mask: bool) -> Vec<Instance> {
    let mut inputs = vec![
        f(&format!("batch, {hq}, seq, {d}")),
        f(&format!("batch, {hkv}, past + seq, {d}")),
        f(&format!("batch, {hkv}, past + seq, {d}")),
    ];
    if mask {
        inputs.push(TensorType::new(
            DType::Bool,
            ["batch", "1", "1", "past + seq"].iter().map(|d| d.parse().unwrap()).collect(),
        ));
    }
    let refs: Vec<&TensorType> = inputs.iter().collect();
    let outputs = op.infer(&refs).unwrap();
    match select_gpu(op, &inputs, &outputs).unwrap() {
        Selected::Steps(st) => st.steps.into_iter().map(|s| s.instance).collect(),
        other => panic!("{op:?}: expected split steps, found {other:?}"),
    }
}

fn grid(i: &Instance, syms: &[(&str, i64)]) -> [usize; 3] {
    let env: BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let scalars: Vec<i64> = i.scalars.iter().map(|d| d.eval_map(&env).unwrap()).collect();
    i.kernel.grid(&scalars).unwrap().unwrap()
}

#[test]
fn split_attention_ptx_passes_ptxas() {
    let mut kernels: Vec<Kernel> = vec![];
    for (model, hq, hkv, d, op, mask) in shapes() {
        let st = steps(&op, hq, hkv, d, mask);
        assert_eq!(st.len(), 2, "{model}");
        for past in [511, 4095] {
            let g: Vec<[usize; 3]> = st.iter().map(|i| grid(i, &[("batch", 1), ("seq", 1), ("past", past)])).collect();
            let working = g[0][0] * g[0][1] / GpuConfig::default().split_max_queries;
            eprintln!(
                "{model} decode, {} keys: split grid {:?} x {} threads ({working} working blocks), combine grid {:?} x {} threads",
                past + 1,
                g[0],
                st[0].kernel.gpu.as_ref().unwrap().block[0],
                g[1],
                st[1].kernel.gpu.as_ref().unwrap().block[0],
            );
        }
        let g = grid(&st[1], &[("batch", 1), ("seq", 512), ("past", 0)]);
        eprintln!("{model} prefill, 512 queries: {} grid {g:?}", st[1].kernel.name);
        let flash_only = model.starts_with("d");
        kernels.extend(st.into_iter().skip(usize::from(flash_only)).map(|i| i.kernel));
    }
    let ptxas = ptxas::find_ptxas();
    if ptxas.is_none() {
        eprintln!("SKIPPED the ptxas part: {}", ptxas::PtxasError::NotFound);
    }
    let mut spills = vec![];
    for arch in GpuArch::all() {
        let ptx = emit_ptx(&kernels, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        if let Ok(dir) = std::env::var("SMELT_NVPTX_DUMP") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(format!("{dir}/attention_{}.ptx", arch.name()), &ptx).unwrap();
        }
        let Some(p) = &ptxas else { continue };
        let report = ptxas::check_with(p, &ptx, arch.name()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in &kernels {
            let sym = smelt_codegen::aot::symbol_of(k);
            let f = report.kernel(&sym).unwrap_or_else(|| panic!("{arch}: ptxas said nothing of {sym}"));
            eprintln!(
                "{arch} {sym}: {} registers, {} B spill stores, {} B spill loads, {} B stack, {} B shared",
                f.registers, f.spill_store_bytes, f.spill_load_bytes, f.stack_frame_bytes, f.shared_bytes
            );
            // ptxas for sm_80 caps the split kernels at 80 registers and
            // spills 8 bytes (with `.maxnreg 96` it spills none); allowed
            // there, not on the Hopper targets.
            let spilled = f.spill_store_bytes + f.spill_load_bytes;
            if spilled > 0 && !(arch == GpuArch::Sm80 && spilled <= 16) {
                spills.push(format!("{arch} {sym}"));
            }
            let shared: usize = k
                .buffers
                .iter()
                .filter(|b| b.space == Space::Shared)
                .map(|b| k.const_len(b).unwrap() * b.elem.size())
                .sum();
            assert!(f.shared_bytes as usize >= shared, "{arch} {sym}: {} B shared, want {shared}", f.shared_bytes);
            assert!(f.shared_bytes <= 48 * 1024, "{arch} {sym}: {} B of static shared memory", f.shared_bytes);
        }
    }
    assert!(spills.is_empty(), "spills: {spills:?}");
}
