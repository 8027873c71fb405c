//! The weight kernels with bf16 and f16 weights: the packed-panel family
//! (`weight_matmul`, `weight_gated_mlp`) and the `[n, k]` family
//! (`matmul_weight_nk`, `gated_mlp_weight_nk`), JIT-compiled with Cranelift
//! (teams of 1 and 3) and run in the KIR interpreter, against the IR
//! interpreter's f32 product with the weights rounded to the narrow type.
//!
//! The weights are exactly representable in the narrow type, so the only
//! difference from the reference is the summation order: the tolerance is
//! the f32 one of `select_fused.rs` (1e-4 relative to the largest output).
//! Sizes cover decode and prefill rows (a partial row tile), partial
//! panels and odd `k` (vector tails).

use half::{bf16, f16};
use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::Scalar;
use smelt_codegen::select::{gated_mlp_weight_nk, matmul_weight_nk, weight_gated_mlp, weight_matmul, Instance};
use smelt_codegen::templates::testing::rand;
use smelt_ir::{DType, Dim, Op, Tensor, TensorType};
use std::collections::BTreeMap;

const ROWS: [usize; 3] = [1, 3, 7];
const NK: [(usize, usize); 6] = [(13, 130), (130, 13), (8, 5), (3, 1), (9, 67), (33, 64)];

fn ty(dtype: DType, dims: &str) -> TensorType {
    TensorType::new(dtype, dims.split(',').map(|d| d.trim().parse::<Dim>().unwrap()).collect())
}

/// `v` stored as `elem`, and the f32 values that represents.
fn narrow(elem: Scalar, v: &[f32]) -> (BufData, Vec<f32>) {
    match elem {
        Scalar::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let back = h.iter().map(|x| x.to_f32()).collect();
            (BufData::BF16(h), back)
        }
        Scalar::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let back = h.iter().map(|x| x.to_f32()).collect();
            (BufData::F16(h), back)
        }
        _ => (BufData::F32(v.to_vec()), v.to_vec()),
    }
}

fn arg(b: &BufData) -> Arg<'_> {
    match b {
        BufData::F32(v) => Arg::F32(v),
        BufData::BF16(v) => Arg::BF16(v),
        BufData::F16(v) => Arg::F16(v),
        other => panic!("unexpected operand {other:?}"),
    }
}

/// The IR interpreter's `op` on f32 operands `(values, shape)`.
fn reference(op: &Op, operands: &[(&[f32], Vec<usize>)]) -> Vec<f32> {
    let ts: Vec<Tensor> =
        operands.iter().map(|(v, s)| Tensor::from_f32(DType::F32, s.clone(), v.to_vec()).unwrap()).collect();
    let refs: Vec<&Tensor> = ts.iter().collect();
    smelt_ir::interp::eval_op(op, &refs, &BTreeMap::new()).unwrap()[0].to_f32_vec()
}

/// `[k, n]` of a row-major `[n, k]` matrix.
fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    (0..n * k).map(|t| w[(t % n) * k + t / n]).collect()
}

/// |got - want| <= 1e-4 |want| + 1e-4 max|want|, elementwise.
fn compare(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * w.abs() + 1e-4 * scale, "{what}: element {i}: got {g}, expected {w}");
    }
}

/// Runs `inst` (rows bound to `rows` when its scalar is `seq`) with the JIT
/// on teams of 1 and 3 and in the KIR interpreter; checks each against `want`.
fn check(label: &str, inst: &Instance, rows: usize, inputs: &[BufData], want: &[f32]) {
    let s = BTreeMap::from([("seq".to_string(), rows as i64)]);
    let scalars: Vec<i64> = inst.scalars.iter().map(|d| d.eval_map(&s).unwrap()).collect();
    let k = &inst.kernel;
    let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
    for (d, b) in decls.iter().zip(inputs) {
        assert_eq!(k.buffer_len(d, &scalars).unwrap(), b.len(), "{label}: length of `{}`", d.name);
    }
    let j = JitKernel::compile(k).unwrap_or_else(|e| panic!("{label}: {e}\n{k}"));
    for threads in [1, 3] {
        let mut out = vec![f32::NAN; want.len()];
        for t in 0..threads {
            let mut args: Vec<Arg> = inputs.iter().map(arg).collect();
            args.push(Arg::F32Mut(&mut out));
            j.run_part(&mut args, &scalars, t, threads).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        compare(&format!("{label} jit x{threads}"), &out, want);
    }
    let mut bufs = inputs.to_vec();
    bufs.push(BufData::F32(vec![f32::NAN; want.len()]));
    interp::run(k, &mut bufs, &scalars, Mode::Cpu { threads: 2 }).unwrap_or_else(|e| panic!("{label}: {e}\n{k}"));
    compare(&format!("{label} interp"), bufs.last().unwrap().f32(), want);
}

#[test]
fn packed_weight_kernels_with_narrow_weights() {
    for elem in [Scalar::BF16, Scalar::F16] {
        for rows in ROWS {
            for (n, k) in NK {
                let x = ty(DType::F32, &format!("seq,{k}"));
                let a = rand(rows * k, 3);
                let (_, wg) = narrow(elem, &rand(n * k, 4).iter().map(|v| v * 2.0).collect::<Vec<_>>());
                let (_, wu) = narrow(elem, &rand(n * k, 5));
                // matmul
                let wk = weight_matmul(&x, n, k, elem).unwrap();
                assert!(wk.instance.kernel.global_buffers().nth(1).is_some_and(|(_, d)| d.elem == elem));
                let (pw, _) = narrow(elem, &wk.packs[0].apply(&wg, n, k));
                let want = reference(&Op::MatMul {}, &[(&a, vec![rows, k]), (&transpose(&wg, n, k), vec![k, n])]);
                let label = format!("{} rows={rows}", wk.instance.kernel.name);
                check(&label, &wk.instance, rows, &[BufData::F32(a.clone()), pw], &want);
                // gated MLP
                let act = "silu";
                let wk = weight_gated_mlp(&x, n, k, act, elem).unwrap();
                let (pg, _) = narrow(elem, &wk.packs[0].apply(&wg, n, k));
                let (pu, _) = narrow(elem, &wk.packs[1].apply(&wu, n, k));
                let op = Op::GatedMlp { act: act.into() };
                let want = reference(
                    &op,
                    &[(&a, vec![rows, k]), (&transpose(&wg, n, k), vec![k, n]), (&transpose(&wu, n, k), vec![k, n])],
                );
                let label = format!("{} rows={rows}", wk.instance.kernel.name);
                check(&label, &wk.instance, rows, &[BufData::F32(a), pg, pu], &want);
            }
        }
    }
}

#[test]
fn nk_weight_kernels_with_narrow_weights() {
    for (elem, dtype) in [(Scalar::BF16, DType::BF16), (Scalar::F16, DType::F16)] {
        for rows in ROWS {
            for (n, k) in NK {
                let x = ty(DType::F32, &format!("seq,{k}"));
                let w_ty = ty(dtype, &format!("{n},{k}"));
                let a = rand(rows * k, 6);
                let (bg, wg) = narrow(elem, &rand(n * k, 7).iter().map(|v| v * 2.0).collect::<Vec<_>>());
                let (bu, wu) = narrow(elem, &rand(n * k, 8));
                let inst = matmul_weight_nk(&x, &w_ty).unwrap();
                assert!(inst.kernel.name.contains(&format!("_{}", dtype.name())), "{}", inst.kernel.name);
                let want = reference(&Op::MatMul {}, &[(&a, vec![rows, k]), (&transpose(&wg, n, k), vec![k, n])]);
                let label = format!("{} rows={rows}", inst.kernel.name);
                check(&label, &inst, rows, &[BufData::F32(a.clone()), bg.clone()], &want);
                for act in ["silu", "gelu_tanh"] {
                    let inst = gated_mlp_weight_nk(&x, &w_ty, &w_ty, act).unwrap();
                    let op = Op::GatedMlp { act: act.into() };
                    let want = reference(
                        &op,
                        &[
                            (&a, vec![rows, k]),
                            (&transpose(&wg, n, k), vec![k, n]),
                            (&transpose(&wu, n, k), vec![k, n]),
                        ],
                    );
                    let label = format!("{} rows={rows}", inst.kernel.name);
                    check(&label, &inst, rows, &[BufData::F32(a.clone()), bg.clone(), bu.clone()], &want);
                }
            }
        }
    }
}

/// Mixed weight types in one gated MLP are refused, not miscompiled.
#[test]
fn gated_mlp_weights_must_share_a_type() {
    let x = ty(DType::F32, "seq,8");
    let err = gated_mlp_weight_nk(&x, &ty(DType::BF16, "4,8"), &ty(DType::F32, "4,8"), "silu").unwrap_err();
    assert!(err.to_string().contains("one [n, k] type"), "{err}");
}
