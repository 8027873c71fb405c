//! Test helpers shared by the template tests: deterministic inputs, the IR
//! reference, the KIR interpreter and a tolerance check.

use crate::kir::interp::{self, BufData, Mode};
use crate::kir::Kernel;
use smelt_ir::{DType, Data, Op, Tensor};
use std::collections::BTreeMap;

/// Deterministic values in [-1, 1) (a small LCG, so tests need no crate).
pub fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Deterministic values in [0.5, 1.5).
pub fn rand_pos(n: usize, seed: u64) -> Vec<f32> {
    rand(n, seed).into_iter().map(|x| x * 0.5 + 1.0).collect()
}

/// `smelt_ir::interp::eval_op` on f32 operands; the first output, flattened.
pub fn reference(op: &Op, operands: &[(&[f32], Vec<usize>)]) -> Vec<f32> {
    let ts: Vec<Tensor> =
        operands.iter().map(|(v, s)| Tensor::from_f32(DType::F32, s.clone(), v.to_vec()).unwrap()).collect();
    let refs: Vec<&Tensor> = ts.iter().collect();
    let out = smelt_ir::interp::eval_op(op, &refs, &BTreeMap::new()).unwrap();
    match &out[0].data {
        Data::F32(v) => v.clone(),
        other => panic!("reference output is not f32: {other:?}"),
    }
}

/// Runs `k` in the interpreter with the given inputs (the global buffers
/// before the output) and returns the output buffer. `threads > 0` runs it
/// as that many CPU threads, to check the parallel split.
pub fn run_kir(k: &Kernel, inputs: &[&[f32]], threads: usize) -> Vec<f32> {
    let mut bufs: Vec<BufData> = inputs.iter().map(|v| BufData::F32(v.to_vec())).collect();
    let out = k.global_buffers().last().unwrap().1;
    bufs.push(BufData::zeros(out.elem, k.const_len(out).expect("run_kir needs a kernel without scalar parameters")));
    interp::run(k, &mut bufs, &[], Mode::Cpu { threads: threads.max(1) }).unwrap_or_else(|e| panic!("{e}\n{k}"));
    bufs.pop().unwrap().f32().to_vec()
}

/// |got - want| <= rtol * |want| + atol, elementwise, with a message naming
/// the first bad element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= rtol * w.abs() + atol || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: element {i}: got {g}, expected {w} (rtol {rtol}, atol {atol})");
    }
}
