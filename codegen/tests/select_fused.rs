//! Differential tests of kernel selection for `matmul` and the fused ops:
//! each case has operand types with symbolic dims and values for the
//! symbols; the selected kernel is run JIT-compiled with Cranelift (whole,
//! and as a team of 3 threads) and, for small cases, in the KIR
//! interpreter, and compared with `smelt_ir::interp::eval_op`.
//!
//! Tolerance: |got - want| <= 1e-4 * |want| + 1e-4 * max|want| per result.
//! The kernels accumulate in f32 (with FMA, in a different order than the
//! reference) while the reference accumulates in f64, so errors grow with
//! the length of a sum relative to the largest output; 1e-4 of the largest
//! output covers sums of a few thousand terms of random inputs in [-1, 1).
//!
//! Also checks that every buffer's declared length equals the element count
//! of its tensor, and prints GEMV and GEMM timings (`--nocapture`).

use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::Scalar;
use smelt_codegen::select::{
    gated_mlp_weight_nk, matmul_weight_nk, select, weight_gated_mlp, weight_gated_mlp_with, weight_matmul,
    weight_matmul_with, Instance, Packing, PanelParams, Selected, WeightKernel,
};
use smelt_codegen::templates::testing::rand;
use smelt_ir::{DType, Data, Dim, Op, Tensor, TensorType};
use std::collections::BTreeMap;
use std::time::Instant;

/// How an operand's values are drawn.
#[derive(Clone, Copy)]
enum Gen {
    /// Uniform in [-1, 1) times the factor.
    F(f32),
    /// Uniform in [0.5, 1.5): norm weights.
    Pos,
    /// True with probability 3/4.
    Bool,
    /// All false: every row fully masked.
    NoneKept,
    /// 0, or -inf with probability 1/4, or a small offset: an additive mask.
    AddMask,
}

fn ty(dtype: DType, dims: &str) -> TensorType {
    TensorType::new(dtype, dims.split(',').map(|d| d.trim().parse::<Dim>().unwrap()).collect())
}

fn f(dims: &str) -> TensorType {
    ty(DType::F32, dims)
}

fn syms(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn shape_of(t: &TensorType, s: &BTreeMap<String, i64>) -> Vec<usize> {
    t.shape.iter().map(|d| d.eval_map(s).unwrap() as usize).collect()
}

fn make(t: &TensorType, g: Gen, s: &BTreeMap<String, i64>, seed: u64) -> Tensor {
    let shape = shape_of(t, s);
    let n: usize = shape.iter().product();
    let r = rand(n, seed);
    match g {
        Gen::F(k) => Tensor::from_f32(t.dtype, shape, r.into_iter().map(|x| x * k).collect()).unwrap(),
        Gen::Pos => Tensor::from_f32(t.dtype, shape, r.into_iter().map(|x| x * 0.5 + 1.0).collect()).unwrap(),
        Gen::Bool => Tensor::from_bool(shape, r.into_iter().map(|x| x > -0.5).collect()).unwrap(),
        Gen::NoneKept => Tensor::from_bool(shape, vec![false; n]).unwrap(),
        Gen::AddMask => {
            let v = r.into_iter().map(|x| if x < -0.5 { f32::NEG_INFINITY } else { x * 0.5 }).collect();
            Tensor::from_f32(t.dtype, shape, v).unwrap()
        }
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    match &t.data {
        Data::F32(v) => v.clone(),
        other => panic!("expected f32 data, found {other:?}"),
    }
}

/// Runs `inst` on `inputs` with the JIT as `threads` threads; the results.
fn run_jit(
    j: &JitKernel,
    inst_scalars: &[i64],
    inputs: &[Tensor],
    out_lens: &[usize],
    threads: usize,
) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = out_lens.iter().map(|&n| vec![f32::NAN; n]).collect();
    for t in 0..threads {
        let mut args: Vec<Arg> = inputs
            .iter()
            .map(|x| match &x.data {
                Data::F32(v) => Arg::F32(v),
                Data::Bool(v) => Arg::Bool(v),
                Data::I64(v) => Arg::I64(v),
                other => panic!("unsupported operand data {other:?}"),
            })
            .collect();
        args.extend(outs.iter_mut().map(|o| Arg::F32Mut(o)));
        j.run_part(&mut args, inst_scalars, t, threads).unwrap_or_else(|e| panic!("{e}"));
    }
    outs
}

fn run_interp(
    inst: &Instance,
    scalars: &[i64],
    inputs: &[Tensor],
    out_lens: &[usize],
    threads: usize,
) -> Vec<Vec<f32>> {
    let mut bufs: Vec<BufData> = inputs
        .iter()
        .map(|x| match &x.data {
            Data::F32(v) => BufData::F32(v.clone()),
            Data::Bool(v) => BufData::Bool(v.clone()),
            Data::I64(v) => BufData::I64(v.clone()),
            other => panic!("unsupported operand data {other:?}"),
        })
        .collect();
    bufs.extend(out_lens.iter().map(|&n| BufData::F32(vec![f32::NAN; n])));
    interp::run(&inst.kernel, &mut bufs, scalars, Mode::Cpu { threads })
        .unwrap_or_else(|e| panic!("{e}\n{}", inst.kernel));
    bufs.split_off(inputs.len()).iter().map(|b| b.f32().to_vec()).collect()
}

/// Largest error seen, relative to the largest reference value.
fn compare(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let ok = err <= 1e-4 * w.abs() + 1e-4 * scale || (g == w);
        assert!(ok, "{what}: element {i}: got {g}, expected {w}");
        worst = worst.max(err / scale.max(1e-30));
    }
    worst
}

/// The selected kernel of a node, or the panic message.
fn kernel_for(op: &Op, inputs: &[TensorType]) -> (Instance, Vec<TensorType>) {
    let refs: Vec<&TensorType> = inputs.iter().collect();
    let outputs = op.infer(&refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    match select(op, inputs, &outputs).unwrap_or_else(|e| panic!("{e}")) {
        Selected::Kernel(i) => (i, outputs),
        other => panic!("{op:?}: not one kernel: {other:?}"),
    }
}

/// Checks `inst` (operands `inputs`, results `outputs`) against `want`.
fn check_instance(
    label: &str,
    inst: &Instance,
    types: &[TensorType],
    inputs: &[Tensor],
    want: &[Vec<f32>],
    s: &BTreeMap<String, i64>,
    use_interp: bool,
) -> f32 {
    let scalars: Vec<i64> = inst.scalars.iter().map(|d| d.eval_map(s).unwrap()).collect();
    // Every buffer's declared length is its tensor's element count.
    let decls: Vec<_> = inst.kernel.global_buffers().map(|(_, d)| d.clone()).collect();
    assert_eq!(decls.len(), types.len(), "{label}: buffer count");
    for (d, t) in decls.iter().zip(types) {
        let n: usize = shape_of(t, s).iter().product();
        assert_eq!(inst.kernel.buffer_len(d, &scalars).unwrap(), n, "{label}: length of `{}`", d.name);
    }
    let out_lens: Vec<usize> = want.iter().map(|w| w.len()).collect();
    let j = JitKernel::compile(&inst.kernel).unwrap_or_else(|e| panic!("{e}\n{}", inst.kernel));
    let mut worst = 0f32;
    for threads in [1, 3] {
        let got = run_jit(&j, &scalars, inputs, &out_lens, threads);
        for (o, (g, w)) in got.iter().zip(want).enumerate() {
            worst = worst.max(compare(&format!("{label} jit x{threads} result {o}"), g, w));
        }
    }
    if use_interp {
        let got = run_interp(inst, &scalars, inputs, &out_lens, 2);
        for (o, (g, w)) in got.iter().zip(want).enumerate() {
            worst = worst.max(compare(&format!("{label} interp result {o}"), g, w));
        }
    }
    worst
}

/// One differential case through `select`.
fn case(op: Op, operands: &[(TensorType, Gen)], symbols: &[(&str, i64)], use_interp: bool) -> f32 {
    let s = syms(symbols);
    let types: Vec<TensorType> = operands.iter().map(|o| o.0.clone()).collect();
    let (inst, outputs) = kernel_for(&op, &types);
    let inputs: Vec<Tensor> =
        operands.iter().enumerate().map(|(i, (t, g))| make(t, *g, &s, 17 + i as u64 * 31)).collect();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let want: Vec<Vec<f32>> = smelt_ir::interp::eval_op(&op, &refs, &s).unwrap().iter().map(f32s).collect();
    let mut all = types.clone();
    all.extend(outputs);
    let label =
        format!("{} {:?} {symbols:?}", inst.kernel.name, types.iter().map(|t| t.to_string()).collect::<Vec<_>>());
    check_instance(&label, &inst, &all, &inputs, &want, &s, use_interp)
}

fn report(what: &str, n: usize, worst: f32) {
    eprintln!("{what}: {n} cases, worst error {worst:.2e} of the largest output");
}

#[test]
fn matmul_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    let mm = || Op::MatMul {};
    let g = Gen::F(1.0);
    // Activations times a 2-D weight: decode, odd and prefill row counts.
    for (b, seq) in [(1, 1), (1, 3), (2, 5), (1, 17), (1, 257)] {
        for (k, nn) in [(64, 128), (13, 7), (5, 33), (64, 6)] {
            let x = f(&format!("batch,seq,{k}"));
            let w = f(&format!("{k},{nn}"));
            let small = b * seq * k * nn < 40_000;
            worst = worst.max(case(mm(), &[(x, g), (w, g)], &[("batch", b), ("seq", seq)], small));
            n += 1;
        }
    }
    // Batched with broadcasting and dynamic k, n: scores · v, q · kᵀ.
    for (s, t) in [(1, 1), (3, 7), (5, 9)] {
        let sy = [("b", 2), ("seq", s), ("total", t)];
        let a = f("b,4,seq,total");
        let v = f("b,4,total,16");
        worst = worst.max(case(mm(), &[(a, g), (v, g)], &sy, true));
        let q = f("b,1,seq,8");
        let kt = f("4,8,total");
        worst = worst.max(case(mm(), &[(q, g), (kt, g)], &sy, true));
        let a2 = f("seq,total");
        let b3 = f("b,total,5");
        worst = worst.max(case(mm(), &[(a2, g), (b3, g)], &sy, true));
        n += 3;
    }
    // 1-D operands.
    worst = worst.max(case(mm(), &[(f("7"), g), (f("7,5"), g)], &[], true));
    n += 1;
    worst = worst.max(case(mm(), &[(f("seq,7"), g), (f("7"), g)], &[("seq", 3)], true));
    n += 1;
    report("matmul", n, worst);
}

/// `matmul_weight_nk` against `matmul(a, transpose(w))`.
#[test]
fn matmul_weight_nk_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    for seq in [1, 2, 3, 5, 257] {
        for (nn, k) in [(128, 64), (7, 13), (33, 5), (6, 64), (9, 3)] {
            let s = syms(&[("seq", seq)]);
            let a = f(&format!("1,seq,{k}"));
            let w = f(&format!("{nn},{k}"));
            let inst = matmul_weight_nk(&a, &w).unwrap();
            let (ta, tw) = (make(&a, Gen::F(1.0), &s, 3), make(&w, Gen::F(1.0), &s, 4));
            let wt = smelt_ir::interp::eval_op(&Op::Transpose { perm: vec![1, 0] }, &[&tw], &s).unwrap().remove(0);
            let want = smelt_ir::interp::eval_op(&Op::MatMul {}, &[&ta, &wt], &s).unwrap();
            let out = f(&format!("1,seq,{nn}"));
            let small = seq * k * nn < 40_000;
            worst = worst.max(check_instance(
                &inst.kernel.name.clone(),
                &inst,
                &[a, w, out],
                &[ta, tw],
                &[f32s(&want[0])],
                &s,
                small,
            ));
            n += 1;
        }
    }
    report("matmul_weight_nk", n, worst);
}

/// `[n, k]` weights and their transposes, for the packed-weight cases.
fn transposed(t: &Tensor, s: &BTreeMap<String, i64>) -> Tensor {
    smelt_ir::interp::eval_op(&Op::Transpose { perm: vec![1, 0] }, &[t], s).unwrap().remove(0)
}

/// A packed weight as the 1-D tensor the kernel's weight buffer holds.
fn packed(p: &Packing, w: &Tensor, n: usize, k: usize) -> (TensorType, Tensor) {
    let v = p.apply(&f32s(w), n, k);
    let len = p.packed_len(n, k);
    assert_eq!(v.len(), len);
    (f(&len.to_string()), Tensor::from_f32(DType::F32, vec![len], v).unwrap())
}

/// The row counts and `(n, k)` sizes of the packed-weight cases: decode,
/// odd and prefill rows (some through two symbolic leading dims), partial
/// and single panels, odd `k`.
const PACKED_ROWS: [(i64, i64); 5] = [(1, 1), (1, 3), (3, 1), (1, 128), (1, 257)];
const PACKED_NK: [(usize, usize); 6] = [(13, 130), (130, 13), (8, 5), (3, 1), (64, 576), (576, 64)];

/// Checks a `weight_matmul` kernel `wk` for `a [.., k]` (result type
/// `out`) against `matmul(a, transpose(w))` on random values from `g`
/// (seeds for `a` and `w`); returns the worst error.
#[allow(clippy::too_many_arguments)]
fn check_weight_matmul(
    label: &str,
    wk: &WeightKernel,
    a: &TensorType,
    out: &TensorType,
    (nn, k): (usize, usize),
    g: Gen,
    seeds: [u64; 2],
    s: &BTreeMap<String, i64>,
    small: bool,
) -> f32 {
    assert_eq!(wk.packs.len(), 1);
    let w = f(&format!("{nn},{k}"));
    let (ta, tw) = (make(a, g, s, seeds[0]), make(&w, g, s, seeds[1]));
    let want = smelt_ir::interp::eval_op(&Op::MatMul {}, &[&ta, &transposed(&tw, s)], s).unwrap();
    let (pty, pw) = packed(&wk.packs[0], &tw, nn, k);
    let types = [a.clone(), pty, out.clone()];
    check_instance(label, &wk.instance, &types, &[ta, pw], &[f32s(&want[0])], s, small)
}

/// Checks a `weight_gated_mlp` kernel `wk` for `x [.., k]` against
/// `gated_mlp(x, transpose(wg), transpose(wu))` with `act`, as
/// [`check_weight_matmul`] (seeds for `x`, `wg` and `wu`).
#[allow(clippy::too_many_arguments)]
fn check_weight_gated_mlp(
    label: &str,
    wk: &WeightKernel,
    act: &str,
    x: &TensorType,
    out: &TensorType,
    (nn, k): (usize, usize),
    g: Gen,
    seeds: [u64; 3],
    s: &BTreeMap<String, i64>,
    small: bool,
) -> f32 {
    assert_eq!(wk.packs.len(), 2);
    let op = Op::GatedMlp { act: act.into() };
    let w = f(&format!("{nn},{k}"));
    let (tx, tg, tu) = (make(x, g, s, seeds[0]), make(&w, g, s, seeds[1]), make(&w, g, s, seeds[2]));
    let want = smelt_ir::interp::eval_op(&op, &[&tx, &transposed(&tg, s), &transposed(&tu, s)], s).unwrap();
    let (pty, pg) = packed(&wk.packs[0], &tg, nn, k);
    let (_, pu) = packed(&wk.packs[1], &tu, nn, k);
    let types = [x.clone(), pty.clone(), pty, out.clone()];
    check_instance(label, &wk.instance, &types, &[tx, pg, pu], &[f32s(&want[0])], s, small)
}

/// `weight_matmul` against `matmul(a, transpose(w))`, `w` given `[n, k]`.
#[test]
fn weight_matmul_cases() {
    let mut worst = 0f32;
    let mut cases = 0;
    for (b, seq) in PACKED_ROWS {
        for (nn, k) in PACKED_NK {
            let s = syms(&[("b", b), ("seq", seq)]);
            let a = f(&format!("b,seq,{k}"));
            let wk = weight_matmul(&a, nn, k, Scalar::F32).unwrap();
            let out = f(&format!("b,seq,{nn}"));
            let small = (b * seq) as usize * k * nn < 40_000;
            let label = format!("{} b={b} seq={seq}", wk.instance.kernel.name);
            let g = Gen::F(1.0);
            worst = worst.max(check_weight_matmul(&label, &wk, &a, &out, (nn, k), g, [3, 4], &s, small));
            cases += 1;
        }
    }
    report("weight_matmul", cases, worst);
}

/// `weight_gated_mlp` against `gated_mlp(x, transpose(wg), transpose(wu))`.
#[test]
fn weight_gated_mlp_cases() {
    let mut worst = 0f32;
    let mut cases = 0;
    for act in ["silu", "gelu_tanh", "gelu"] {
        for (b, seq) in PACKED_ROWS {
            for (nn, k) in PACKED_NK {
                // Every activation at every row count, the big sizes once.
                if nn * k > 20_000 && act != "silu" {
                    continue;
                }
                let s = syms(&[("b", b), ("seq", seq)]);
                let x = f(&format!("b,seq,{k}"));
                let wk = weight_gated_mlp(&x, nn, k, act, Scalar::F32).unwrap();
                let out = f(&format!("b,seq,{nn}"));
                let small = (b * seq) as usize * k * nn < 40_000;
                let label = format!("{} b={b} seq={seq}", wk.instance.kernel.name);
                let (g, seeds) = (Gen::F(2.0), [5, 6, 7]);
                worst = worst.max(check_weight_gated_mlp(&label, &wk, act, &x, &out, (nn, k), g, seeds, &s, small));
                cases += 1;
            }
        }
    }
    report("weight_gated_mlp", cases, worst);
}

/// Single-row tiles read `streams` panels at once (panel `q + s * groups`
/// of stream `s`): every stream count against the reference, with panel
/// counts that divide evenly, leave the last stream a group short, or are
/// too few for the streams asked for (at least 8 groups are kept); decode
/// through a symbolic row count (the kernel's runtime `m == 1` branch) and
/// a static one, and a prefill row count, which visits the panels one at a
/// time.
#[test]
fn weight_products_read_every_panel_in_streams() {
    let mut worst = 0f32;
    let mut cases = 0;
    for streams in 1..=5 {
        let params = PanelParams { streams, ..PanelParams::DEFAULT };
        // nr = 8: 5 panels (one stream), 17 (two streams, the second a
        // group short), 25 (three, a group short), 32 (four, even) and 33
        // (four, the last panel partial and the last stream short).
        for (nn, k) in [(40, 5), (136, 9), (200, 7), (256, 12), (260, 6)] {
            for (rows, seq) in [("seq", 1), ("1", 1), ("seq", 5)] {
                let s = syms(&[("seq", seq)]);
                let x = f(&format!("{rows},{k}"));
                let out = f(&format!("{rows},{nn}"));
                let label = format!("streams={streams} n={nn} k={k} rows={rows} seq={seq}");
                let g = Gen::F(2.0);
                let plain = weight_matmul_with(&x, nn, k, Scalar::F32, params).unwrap();
                let l = format!("wmatmul {label}");
                worst = worst.max(check_weight_matmul(&l, &plain, &x, &out, (nn, k), g, [11, 12], &s, true));
                let gated = weight_gated_mlp_with(&x, nn, k, "silu", Scalar::F32, params).unwrap();
                let l = format!("wgated_mlp {label}");
                let seeds = [11, 12, 13];
                worst = worst.max(check_weight_gated_mlp(&l, &gated, "silu", &x, &out, (nn, k), g, seeds, &s, true));
                cases += 2;
            }
        }
    }
    report("streamed weight products", cases, worst);
}

/// The panel layouts: padding, `apply_kn` of a `[k, n]` weight equals
/// `apply` of its `[n, k]` transpose (and `apply_bytes` of its bytes, of 4
/// and 2 bytes per element), every element is where the layout says, and a
/// static row count needs no scalar parameter.
#[test]
fn packing_layout() {
    let s = syms(&[]);
    let layouts = [
        Packing::Panels { nr: 8 },
        Packing::Panels { nr: 16 },
        Packing::PairedPanels { nr: 8, lanes: 4 },
        Packing::PairedPanels { nr: 32, lanes: 16 },
        Packing::PairedPanels { nr: 64, lanes: 16 },
    ];
    for (nn, k) in [(13, 7), (8, 3), (1, 1), (17, 16), (70, 5)] {
        let wk = weight_matmul(&f(&format!("2,{k}")), nn, k, Scalar::F32).unwrap();
        assert!(wk.instance.scalars.is_empty(), "static rows need no scalar");
        for p in layouts {
            let nr = p.nr();
            assert_eq!(p.packed_len(nn, k), nn.div_ceil(nr) * nr * k);
            let w = make(&f(&format!("{nn},{k}")), Gen::F(1.0), &s, 9);
            let packed = p.apply(&f32s(&w), nn, k);
            let wkn = f32s(&transposed(&w, &s));
            assert_eq!(p.apply_kn(&wkn, nn, k), packed);
            let bytes: Vec<u8> = f32s(&w).iter().flat_map(|x| x.to_le_bytes()).collect();
            let packed_bytes: Vec<u8> = packed.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(p.apply_bytes(&bytes, 4, nn, k), packed_bytes, "{p:?} apply_bytes of [{nn}, {k}]");
            // Two bytes per element: the top halves of the f32 values.
            let halves: Vec<u8> = f32s(&w).iter().flat_map(|x| x.to_le_bytes()[2..].to_vec()).collect();
            let packed_halves: Vec<u8> = packed.iter().flat_map(|x| x.to_le_bytes()[2..].to_vec()).collect();
            assert_eq!(p.apply_bytes(&halves, 2, nn, k), packed_halves, "{p:?} 2-byte apply_bytes of [{nn}, {k}]");
            let wv = f32s(&w);
            let mut seen = vec![0; nn * k];
            for (i, x) in packed.iter().enumerate() {
                let (panel, kk, at) = (i / (nr * k), i / nr % k, i % nr);
                let jj = (0..nr).find(|&j| p.slot(j) == at).expect("every slot holds a column");
                let j = panel * nr + jj;
                let want = if j < nn { wv[j * k + kk] } else { 0.0 };
                assert_eq!(*x, want, "{p:?}: packed element {i} of [{nn}, {k}]");
                if j < nn {
                    seen[j * k + kk] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{p:?}: every weight is packed once");
        }
    }
    // Paired panels: lane i of a word holds columns i and lanes + i.
    let p = Packing::PairedPanels { nr: 8, lanes: 4 };
    assert_eq!((0..8).map(|j| p.slot(j)).collect::<Vec<_>>(), [0, 2, 4, 6, 1, 3, 5, 7]);
    assert!(weight_matmul(&f("seq,5"), 8, 4, Scalar::F32).is_err(), "contraction mismatch is an error");
    assert!(weight_gated_mlp(&f("seq,4"), 8, 4, "relu6", Scalar::F32).is_err(), "unknown act is an error");
}

#[test]
fn gated_mlp_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    for act in ["silu", "gelu_tanh", "gelu"] {
        for (seq, k, nn) in [(1, 64, 96), (3, 13, 7), (5, 16, 33), (257, 24, 10)] {
            let s = syms(&[("seq", seq)]);
            let op = Op::GatedMlp { act: act.into() };
            let x = f(&format!("seq,{k}"));
            let w = f(&format!("{k},{nn}"));
            let small = seq * k * nn < 40_000;
            let g = Gen::F(2.0);
            worst =
                worst.max(case(op.clone(), &[(x.clone(), g), (w.clone(), g), (w.clone(), g)], &[("seq", seq)], small));
            // The [n, k] variant.
            let wnk = f(&format!("{nn},{k}"));
            let inst = gated_mlp_weight_nk(&x, &wnk, &wnk, act).unwrap();
            let (tx, tg, tu) = (make(&x, g, &s, 5), make(&wnk, g, &s, 6), make(&wnk, g, &s, 7));
            let tr = |t: &Tensor| {
                smelt_ir::interp::eval_op(&Op::Transpose { perm: vec![1, 0] }, &[t], &s).unwrap().remove(0)
            };
            let want = smelt_ir::interp::eval_op(&op, &[&tx, &tr(&tg), &tr(&tu)], &s).unwrap();
            let out = f(&format!("seq,{nn}"));
            let label = inst.kernel.name.clone();
            worst = worst.max(check_instance(
                &label,
                &inst,
                &[x, wnk.clone(), wnk, out],
                &[tx, tg, tu],
                &[f32s(&want[0])],
                &s,
                small,
            ));
            n += 2;
        }
    }
    report("gated_mlp", n, worst);
}

#[test]
fn norm_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    for (b, seq) in [(1, 1), (2, 3), (1, 17)] {
        for h in [1, 3, 7, 64, 130] {
            let sy = [("batch", b), ("seq", seq)];
            let x = f(&format!("batch,seq,{h}"));
            let w = f(&format!("{h}"));
            let g = Gen::F(2.0);
            worst = worst.max(case(Op::RmsNorm { eps: 1e-5 }, &[(x.clone(), g), (w.clone(), Gen::Pos)], &sy, true));
            worst = worst.max(case(
                Op::AddRmsNorm { eps: 1e-6 },
                &[(x.clone(), g), (x.clone(), g), (w.clone(), Gen::Pos)],
                &sy,
                true,
            ));
            worst = worst.max(case(
                Op::LayerNorm { eps: 1e-5 },
                &[(x.clone(), g), (w.clone(), Gen::Pos), (w.clone(), g)],
                &sy,
                true,
            ));
            n += 3;
        }
    }
    report("norms", n, worst);
}

#[test]
fn rope_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    let g = Gen::F(1.0);
    for interleaved in [false, true] {
        for (d, r) in [(16, 16), (24, 24), (40, 20), (64, 32), (6, 2), (80, 80)] {
            for (b, seq) in [(1, 1), (2, 5)] {
                let sy = [("b", b), ("seq", seq)];
                let op = Op::Rope { interleaved };
                let x = f(&format!("b,3,seq,{d}"));
                // cos/sin broadcast over heads, and over batch too.
                for cs in [format!("b,1,seq,{r}"), format!("1,1,seq,{r}"), format!("b,3,seq,{r}")] {
                    let c = f(&cs);
                    worst = worst.max(case(op.clone(), &[(x.clone(), g), (c.clone(), g), (c, g)], &sy, true));
                    n += 1;
                }
            }
        }
        // Rank 3 ([b, seq, d] with [b, seq, r]) and a single shared row.
        let x = f("b,seq,10");
        let c = f("b,seq,4");
        let op = Op::Rope { interleaved };
        worst = worst.max(case(op.clone(), &[(x.clone(), g), (c.clone(), g), (c, g)], &[("b", 2), ("seq", 3)], true));
        let c1 = f("1,1,4");
        worst = worst.max(case(op, &[(x, g), (c1.clone(), g), (c1, g)], &[("b", 2), ("seq", 3)], true));
        n += 2;
    }
    report("rope", n, worst);
}

#[test]
fn attention_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    let g = Gen::F(1.0);
    struct A {
        hq: usize,
        hkv: usize,
        d: usize,
        causal: bool,
        window: Option<i64>,
        softcap: Option<f64>,
        mask: Option<(&'static str, Gen)>,
    }
    let cases = [
        A { hq: 4, hkv: 2, d: 16, causal: true, window: None, softcap: None, mask: None },
        A { hq: 2, hkv: 2, d: 24, causal: false, window: None, softcap: None, mask: None },
        A { hq: 6, hkv: 2, d: 40, causal: true, window: Some(3), softcap: None, mask: None },
        A { hq: 2, hkv: 1, d: 48, causal: false, window: Some(4), softcap: Some(5.0), mask: None },
        A {
            hq: 4,
            hkv: 2,
            d: 80,
            causal: true,
            window: None,
            softcap: None,
            mask: Some(("b,1,1,past+seq", Gen::Bool)),
        },
        A {
            hq: 4,
            hkv: 4,
            d: 64,
            causal: true,
            window: None,
            softcap: None,
            mask: Some(("b,4,seq,past+seq", Gen::AddMask)),
        },
        A {
            hq: 4,
            hkv: 2,
            d: 128,
            causal: false,
            window: None,
            softcap: Some(30.0),
            mask: Some(("seq,past+seq", Gen::Bool)),
        },
        A {
            hq: 2,
            hkv: 1,
            d: 10,
            causal: true,
            window: Some(2),
            softcap: None,
            mask: Some(("1,1,1,past+seq", Gen::AddMask)),
        },
        A {
            hq: 2,
            hkv: 2,
            d: 8,
            causal: false,
            window: None,
            softcap: None,
            mask: Some(("b,1,1,past+seq", Gen::NoneKept)),
        },
    ];
    for c in &cases {
        for (b, seq, past) in [(1, 1, 0), (1, 1, 6), (2, 3, 4), (1, 5, 0)] {
            let sy = [("b", b), ("seq", seq), ("past", past)];
            let op = Op::Attention {
                scale: 1.0 / (c.d as f64).sqrt(),
                causal: c.causal,
                window: c.window,
                softcap: c.softcap,
            };
            let q = f(&format!("b,{},seq,{}", c.hq, c.d));
            let kv = f(&format!("b,{},past+seq,{}", c.hkv, c.d));
            let mut ops = vec![(q, Gen::F(2.0)), (kv.clone(), Gen::F(2.0)), (kv, g)];
            if let Some((m, gen)) = c.mask {
                let dt = if matches!(gen, Gen::Bool | Gen::NoneKept) { DType::Bool } else { DType::F32 };
                ops.push((ty(dt, m), gen));
            }
            worst = worst.max(case(op, &ops, &sy, true));
            n += 1;
        }
    }
    // A long prefill (JIT only).
    let op = Op::Attention { scale: 0.125, causal: true, window: None, softcap: None };
    let q = f("b,4,seq,64");
    let kv = f("b,2,past+seq,64");
    worst = worst.max(case(op, &[(q, g), (kv.clone(), g), (kv, g)], &[("b", 1), ("seq", 257), ("past", 3)], false));
    n += 1;
    report("attention", n, worst);
}

#[test]
fn kv_append_cases() {
    let mut worst = 0f32;
    let mut n = 0;
    let g = Gen::F(1.0);
    for (axis, past, seq) in [(2, 0, 1), (2, 5, 3), (-2, 4, 1)] {
        let op = Op::KvAppend { axis };
        let cache = f("b,2,past,6");
        let new = f("b,2,seq,6");
        worst = worst.max(case(op, &[(cache, g), (new, g)], &[("b", 2), ("past", past), ("seq", seq)], true));
        n += 1;
    }
    let op = Op::KvAppend { axis: 1 };
    worst = worst.max(case(op, &[(f("b,past,7"), g), (f("b,seq,7"), g)], &[("b", 3), ("past", 2), ("seq", 5)], true));
    report("kv_append", n + 1, worst);
}

/// Identical nodes give identical kernels; different static dims do not.
#[test]
fn kernels_are_deterministic() {
    let a = [f("batch,seq,64"), f("64,128")];
    let (k1, _) = kernel_for(&Op::MatMul {}, &a);
    let (k2, _) = kernel_for(&Op::MatMul {}, &[f("b2,s2,64"), f("64,128")]);
    assert_eq!(k1.kernel.name, k2.kernel.name);
    assert_eq!(k1.kernel, k2.kernel);
    let (k3, _) = kernel_for(&Op::MatMul {}, &[f("batch,seq,64"), f("64,96")]);
    assert_ne!(k1.kernel.name, k3.kernel.name);
    let at = |causal| {
        let op = Op::Attention { scale: 0.25, causal, window: None, softcap: None };
        kernel_for(&op, &[f("b,4,seq,16"), f("b,2,past+seq,16"), f("b,2,past+seq,16")]).0.kernel.name
    };
    assert_eq!(at(true), at(true));
    assert_ne!(at(true), at(false));
}

/// GFLOP/s of the decode GEMV and a prefill GEMM, for information.
#[test]
fn timings() {
    let time = |label: &str, inst: &Instance, inputs: &[Vec<f32>], out: usize, scalars: &[i64], flops: f64| {
        let j = JitKernel::compile(&inst.kernel).unwrap();
        let mut o = vec![0f32; out];
        let mut run = || {
            let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::F32(v)).collect();
            args.push(Arg::F32Mut(&mut o));
            j.run_part(&mut args, scalars, 0, 1).unwrap();
        };
        run();
        let reps = ((2e9 / flops) as usize).clamp(3, 2000);
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        eprintln!("{label}: {:.3} ms, {:.2} GFLOP/s (1 thread)", s * 1e3, flops / s / 1e9);
    };
    let (k, n) = (576, 1536);
    let x = f("1,seq,576");
    let w_kn = f("576,1536");
    let w_nk = f("1536,576");
    for (m, what) in [(1usize, "gemv"), (128, "gemm")] {
        let flops = 2.0 * (m * k * n) as f64;
        let (kn, _) = kernel_for(&Op::MatMul {}, &[x.clone(), w_kn.clone()]);
        let nk = matmul_weight_nk(&x, &w_nk).unwrap();
        let a = rand(m * k, 1);
        let w = rand(k * n, 2);
        time(&format!("{what} {m}x{k}x{n} [k,n] weight"), &kn, &[a.clone(), w.clone()], m * n, &[m as i64], flops);
        time(&format!("{what} {m}x{k}x{n} [n,k] weight"), &nk, &[a, w], m * n, &[m as i64], flops);
    }
}
