//! Differential tests of the LLVM lowering (feature `llvm`): kernels chosen
//! by `select` for matmul (decode and prefill), the fused ops (norms, rope,
//! attention, gated MLP), softmax and elementwise, layout and reduction ops
//! (libm ones included) are compiled by LLVM into one object, linked into a
//! shared library with `cc` (as the artifact's `kernels.so`), loaded with
//! `dlopen` and called as teams of 1 and 3 threads (each thread's share in
//! turn); the results must match the KIR interpreter.
//!
//! Tolerance: integer, bool and exact copies must be equal. Floats: |got -
//! want| <= rtol * |want| + atol * max|want| (NaN matches NaN). The
//! interpreter and the kernels both compute in f32, but LLVM's kernels add
//! the terms of long sums in another order (widened reduction loops), so
//! sums get rtol = atol = 1e-4 (as the other kernel tests); pointwise ops
//! 1e-5 (the same Cephes `exp`/`tanh` polynomials against Rust's `exp`).
//!
//! Also prints GFLOP/s of a 128x576x1536 GEMM through LLVM and through
//! Cranelift, both from a linked library (`--nocapture`), and checks that
//! LLVM's code for it uses 256-bit FMAs where the host has AVX2 and FMA.
#![cfg(feature = "llvm")]

use half::{bf16, f16};
use smelt_codegen::aot;
use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::{Access, Builder, Expr, Kernel, LoopKind, Pick, RedOp, Scalar, Space};
use smelt_codegen::select::{
    gated_mlp_weight_nk, matmul_weight_nk, select, select_in_place, weight_gated_mlp_with, weight_matmul_with,
    CacheInPlace, Instance, Selected,
};
use smelt_codegen::templates::packed::PanelParams;
use smelt_codegen::templates::testing::rand;
use smelt_ir::{DType, Dim, Op, TensorType};
use std::collections::BTreeMap;
use std::time::Instant;

type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// How an operand's values are drawn.
#[derive(Clone, Copy)]
enum Gen {
    /// Uniform in [-1, 1) times the factor (ints in [-5, 5], random bools).
    F(f32),
    /// Uniform in [0.5, 1.5): norm weights, logarithms.
    Pos,
    /// Like `F(k)` with every 7th element NaN and every 11th +-inf.
    Special(f32),
}

fn ty(dtype: DType, dims: &str) -> TensorType {
    TensorType::new(dtype, dims.split(',').map(|d| d.trim().parse::<Dim>().unwrap()).collect())
}

fn f(dims: &str) -> TensorType {
    ty(DType::F32, dims)
}

fn make(elem: Scalar, n: usize, g: Gen, seed: u64) -> BufData {
    let r = rand(n, seed);
    match elem {
        Scalar::BF16 => BufData::BF16(make(Scalar::F32, n, g, seed).f32().iter().map(|x| bf16::from_f32(*x)).collect()),
        Scalar::F16 => BufData::F16(make(Scalar::F32, n, g, seed).f32().iter().map(|x| f16::from_f32(*x)).collect()),
        Scalar::F32 => BufData::F32(match g {
            Gen::F(k) => r.iter().map(|x| x * k).collect(),
            Gen::Pos => r.iter().map(|x| x * 0.5 + 1.0).collect(),
            Gen::Special(k) => r
                .iter()
                .enumerate()
                .map(|(i, x)| match (i % 7, i % 11) {
                    (3, _) => f32::NAN,
                    (_, 5) => f32::INFINITY.copysign(*x),
                    _ => x * k,
                })
                .collect(),
        }),
        Scalar::I64 => BufData::I64(r.iter().map(|x| (x * 5.0).round() as i64).collect()),
        Scalar::I32 => BufData::I32(r.iter().map(|x| (x * 5.0).round() as i32).collect()),
        Scalar::Bool => BufData::Bool(r.iter().map(|x| *x > -0.5).collect()),
    }
}

/// One kernel run: its inputs and the interpreter's outputs.
struct Case {
    label: String,
    kernel: Kernel,
    scalars: Vec<i64>,
    inputs: Vec<BufData>,
    want: Vec<BufData>,
    rtol: f32,
    atol: f32,
}

fn case_of(label: &str, inst: Instance, syms: &[(&str, i64)], gens: &[Gen], tol: f32) -> Case {
    let s: BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let scalars: Vec<i64> = inst.scalars.iter().map(|d| d.eval_map(&s).unwrap()).collect();
    let k = inst.kernel;
    let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
    let mut bufs: Vec<BufData> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let n = k.buffer_len(d, &scalars).unwrap();
            match gens.get(i) {
                Some(g) => make(d.elem, n, *g, 11 + 7 * i as u64),
                None => BufData::zeros(d.elem, n),
            }
        })
        .collect();
    interp::run(&k, &mut bufs, &scalars, Mode::Cpu { threads: 1 }).unwrap_or_else(|e| panic!("{label}: {e}\n{k}"));
    let want = bufs.split_off(gens.len());
    Case { label: format!("{label} {} {syms:?}", k.name), kernel: k, scalars, inputs: bufs, want, rtol: tol, atol: tol }
}

/// The case for `op` on operands `inputs` as `select` picks its kernel.
fn op_case(op: Op, inputs: &[TensorType], syms: &[(&str, i64)], gens: &[Gen], tol: f32) -> Case {
    let refs: Vec<&TensorType> = inputs.iter().collect();
    let outputs = op.infer(&refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    match select(&op, inputs, &outputs).unwrap_or_else(|e| panic!("{e}")) {
        Selected::Kernel(i) => case_of(op.name(), i, syms, gens, tol),
        other => panic!("{op:?}: not one kernel: {other:?}"),
    }
}

/// Compiles every distinct kernel of `cases` with `lowering` into one
/// library in `dir` and loads it.
fn library(kernels: &[&Kernel], dir: &std::path::Path, llvm: bool) -> libloading::Library {
    let mut uniq: Vec<Kernel> = vec![];
    for k in kernels {
        if !uniq.iter().any(|u| u.name == k.name) {
            uniq.push((*k).clone());
        }
    }
    let t = Instant::now();
    let info = if llvm {
        aot::build_library_llvm_with(&uniq, dir, &aot::default_cc())
    } else {
        aot::build_library_with(&uniq, dir, &aot::default_cc())
    }
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} library: {} kernels, {} bytes, built in {:.2} s, features {:?}",
        if llvm { "LLVM" } else { "Cranelift" },
        uniq.len(),
        info.bytes.len(),
        t.elapsed().as_secs_f64(),
        info.cpu_features
    );
    // SAFETY: the library was just linked from our own kernels; loading it
    // runs no initialisers of note.
    unsafe { libloading::Library::new(&info.path) }.unwrap()
}

fn kernel_fn<'l>(lib: &'l libloading::Library, k: &Kernel) -> libloading::Symbol<'l, KernelFn> {
    let name = format!("smelt_{}", k.name);
    // SAFETY: every kernel symbol has the kernel ABI's signature.
    unsafe { lib.get::<KernelFn>(name.as_bytes()) }.unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ptr(b: &mut BufData) -> *mut u8 {
    match b {
        BufData::F32(v) => v.as_mut_ptr().cast(),
        BufData::I32(v) => v.as_mut_ptr().cast(),
        BufData::I64(v) => v.as_mut_ptr().cast(),
        BufData::Bool(v) => v.as_mut_ptr().cast(),
        BufData::BF16(v) => v.as_mut_ptr().cast(),
        BufData::F16(v) => v.as_mut_ptr().cast(),
    }
}

/// Runs a case's kernel as a team of `threads` (each share in turn).
fn run(f: &KernelFn, c: &Case, threads: usize) -> Vec<BufData> {
    let mut ins = c.inputs.clone();
    let mut outs: Vec<BufData> = c
        .want
        .iter()
        .map(|w| match w {
            BufData::F32(v) => BufData::F32(vec![f32::NAN; v.len()]),
            BufData::I32(v) => BufData::I32(vec![-7; v.len()]),
            BufData::I64(v) => BufData::I64(vec![-7; v.len()]),
            BufData::Bool(v) => BufData::Bool(vec![false; v.len()]),
            BufData::BF16(v) => BufData::BF16(vec![bf16::NAN; v.len()]),
            BufData::F16(v) => BufData::F16(vec![f16::NAN; v.len()]),
        })
        .collect();
    let ptrs: Vec<*mut u8> = ins.iter_mut().chain(outs.iter_mut()).map(ptr).collect();
    for t in 0..threads {
        // SAFETY: the buffers have the lengths the kernel declares for
        // these scalars (the interpreter checked every access), are not
        // otherwise borrowed, and outlive the call.
        unsafe { f(ptrs.as_ptr(), c.scalars.as_ptr(), t as i64, threads as i64) };
    }
    outs
}

/// Largest error relative to the largest reference value.
fn compare(what: &str, got: &BufData, want: &BufData, rtol: f32, atol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    match (got, want) {
        (BufData::F32(g), BufData::F32(w)) => {
            let scale = w.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
            let mut worst = 0f32;
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                let err = (g - w).abs();
                let ok = g == w || (g.is_nan() && w.is_nan()) || err <= rtol * w.abs() + atol * scale;
                assert!(ok, "{what}: element {i}: got {g}, expected {w}");
                if err.is_finite() {
                    worst = worst.max(err / scale.max(1e-30));
                }
            }
            worst
        }
        // Narrow floats: the same bits, or NaN for NaN.
        (BufData::BF16(_), BufData::BF16(_)) | (BufData::F16(_), BufData::F16(_)) => {
            let bits = |b: &BufData| -> Vec<(u16, bool)> {
                match b {
                    BufData::BF16(v) => v.iter().map(|x| (x.to_bits(), x.is_nan())).collect(),
                    BufData::F16(v) => v.iter().map(|x| (x.to_bits(), x.is_nan())).collect(),
                    _ => unreachable!(),
                }
            };
            for (i, (g, w)) in bits(got).iter().zip(bits(want)).enumerate() {
                assert!(g.0 == w.0 || (g.1 && w.1), "{what}: element {i}: got {:#06x}, expected {:#06x}", g.0, w.0);
            }
            0.0
        }
        (g, w) => {
            assert_eq!(g, w, "{what}");
            0.0
        }
    }
}

fn check_all(cases: &[Case]) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let kernels: Vec<&Kernel> = cases.iter().map(|c| &c.kernel).collect();
    let lib = library(&kernels, dir.path(), true);
    let mut worst = 0f32;
    for c in cases {
        let f = kernel_fn(&lib, &c.kernel);
        for threads in [1, 3] {
            let got = run(&f, c, threads);
            for (o, (g, w)) in got.iter().zip(&c.want).enumerate() {
                let what = format!("{} x{threads} result {o}", c.label);
                worst = worst.max(compare(&what, g, w, c.rtol, c.atol));
            }
        }
    }
    worst
}

const SUM: f32 = 1e-4;
const POINT: f32 = 1e-5;

#[test]
fn matmul_and_fused_ops() {
    let g = Gen::F(1.0);
    let mut cases = vec![];
    // Matmul with a [k, n] weight and the [n, k] weight of a folded
    // transpose: decode (M=1), odd and prefill (M=257) row counts, odd sizes.
    for seq in [1, 3, 257] {
        for (k, n) in [(64, 128), (13, 7), (96, 40)] {
            let x = f(&format!("1,seq,{k}"));
            cases.push(op_case(Op::MatMul {}, &[x.clone(), f(&format!("{k},{n}"))], &[("seq", seq)], &[g, g], SUM));
            let nk = matmul_weight_nk(&x, &f(&format!("{n},{k}"))).unwrap();
            cases.push(case_of("matmul_nk", nk, &[("seq", seq)], &[g, g], SUM));
        }
    }
    // Packed-panel weight kernels with 8-lane (AVX2) and 16-lane tiles:
    // decode, odd and prefill rows, partial last panels, odd k.
    for params in
        [PanelParams::WIDE, PanelParams { mr: 4, nr: 32, lanes: 16, ksplit: 2, streams: 2, prefetch: 1024, fma: true }]
    {
        for seq in [1, 5, 257] {
            for (k, n) in [(64, 128), (13, 7), (96, 40)] {
                let x = f(&format!("seq,{k}"));
                let wk = weight_matmul_with(&x, n, k, Scalar::F32, params).unwrap();
                cases.push(case_of("wmatmul", wk.instance, &[("seq", seq)], &[g, g], SUM));
                let wk = weight_gated_mlp_with(&x, n, k, "silu", Scalar::BF16, params).unwrap();
                cases.push(case_of("wgated_mlp bf16", wk.instance, &[("seq", seq)], &[Gen::F(2.0); 3], SUM));
            }
        }
    }
    // Batched, with broadcasting and dynamic k and n (q · kᵀ, scores · v).
    let sy = [("b", 2), ("seq", 3), ("total", 7)];
    cases.push(op_case(Op::MatMul {}, &[f("b,4,seq,total"), f("b,4,total,16")], &sy, &[g, g], SUM));
    cases.push(op_case(Op::MatMul {}, &[f("b,1,seq,8"), f("4,8,total")], &sy, &[g, g], SUM));
    // Gated MLPs, both weight layouts, every activation.
    for act in ["silu", "gelu_tanh", "gelu"] {
        for (seq, k, n) in [(1, 64, 96), (5, 16, 33), (257, 24, 10)] {
            let x = f(&format!("seq,{k}"));
            let w = f(&format!("{k},{n}"));
            let gg = Gen::F(2.0);
            let op = Op::GatedMlp { act: act.into() };
            cases.push(op_case(op, &[x.clone(), w.clone(), w], &[("seq", seq)], &[gg; 3], SUM));
            let wnk = f(&format!("{n},{k}"));
            let inst = gated_mlp_weight_nk(&x, &wnk, &wnk, act).unwrap();
            cases.push(case_of("gated_mlp_nk", inst, &[("seq", seq)], &[gg; 3], SUM));
        }
    }
    // Norms.
    for (b, seq) in [(1, 1), (2, 3)] {
        for h in [7, 64, 130] {
            let sy = [("batch", b), ("seq", seq)];
            let x = f(&format!("batch,seq,{h}"));
            let w = f(&format!("{h}"));
            let gg = Gen::F(2.0);
            cases.push(op_case(Op::RmsNorm { eps: 1e-5 }, &[x.clone(), w.clone()], &sy, &[gg, Gen::Pos], SUM));
            let ins = [x.clone(), x.clone(), w.clone()];
            cases.push(op_case(Op::AddRmsNorm { eps: 1e-6 }, &ins, &sy, &[gg, gg, Gen::Pos], SUM));
            let ins = [x, w.clone(), w];
            cases.push(op_case(Op::LayerNorm { eps: 1e-5 }, &ins, &sy, &[gg, Gen::Pos, gg], SUM));
        }
    }
    // Rope, half-split and interleaved, partial rotation, broadcast cos/sin.
    for interleaved in [false, true] {
        for (d, r) in [(16, 16), (40, 20), (64, 32)] {
            let x = f(&format!("b,3,seq,{d}"));
            let c = f(&format!("b,1,seq,{r}"));
            let op = Op::Rope { interleaved };
            cases.push(op_case(op, &[x, c.clone(), c], &[("b", 2), ("seq", 5)], &[g; 3], POINT));
        }
    }
    // Attention: GQA, causal, with a past, windows, softcap, masks.
    let at =
        |causal, window, softcap, d: usize| Op::Attention { scale: 1.0 / (d as f64).sqrt(), causal, window, softcap };
    for (b, seq, past) in [(1, 1, 6), (2, 3, 4), (1, 5, 0), (1, 33, 7)] {
        let sy = [("b", b), ("seq", seq), ("past", past)];
        let q = |h: usize, d: usize| f(&format!("b,{h},seq,{d}"));
        let kv = |h: usize, d: usize| f(&format!("b,{h},past+seq,{d}"));
        let gq = Gen::F(2.0);
        cases.push(op_case(at(true, None, None, 16), &[q(4, 16), kv(2, 16), kv(2, 16)], &sy, &[gq, gq, g], SUM));
        cases.push(op_case(at(true, None, None, 64), &[q(6, 64), kv(2, 64), kv(2, 64)], &sy, &[gq, gq, g], SUM));
        cases.push(op_case(
            at(false, Some(3), Some(5.0), 40),
            &[q(2, 40), kv(1, 40), kv(1, 40)],
            &sy,
            &[gq, gq, g],
            SUM,
        ));
        let mask = ty(DType::Bool, "b,1,1,past+seq");
        let ins = [q(4, 80), kv(2, 80), kv(2, 80), mask];
        cases.push(op_case(at(true, None, None, 80), &ins, &sy, &[gq, gq, g, g], SUM));
    }
    // Attention over a cache kept in place (row stride `cap`), with 4, 8
    // and 16-lane vectors: head dims that are whole vectors, and ones with
    // a 4-lane piece and single lanes left over. It is split decode's two
    // launches: the partials (nothing with more than one position) and the
    // combine (the whole attention with more than one position), which
    // here reads the partials the interpreter wrote.
    let kv = CacheInPlace { capacity: Dim::sym("cap"), copied: Dim::sym("copied") };
    for d in [16, 24, 40, 44, 64, 80] {
        let op = at(true, None, None, d);
        let (q, k) = (f(&format!("b,4,seq,{d}")), f(&format!("b,2,past+seq,{d}")));
        let mask = ty(DType::Bool, "b,1,1,past+seq");
        for lanes in [4, 8, 16] {
            let Selected::Steps(steps) =
                select_in_place(&op, &[q.clone(), k.clone(), k.clone(), mask.clone()], &kv, lanes)
                    .unwrap_or_else(|e| panic!("{e}"))
            else {
                panic!("attention over a cache is split decode's two launches")
            };
            let [partials, combine] = &steps.steps[..] else { panic!("two launches: {steps:?}") };
            // One position over few keys and over several segments of
            // them; several positions over few keys, then over more than
            // one chunk of them (a chunk holds `d` keys or fewer), the last
            // chunk partial.
            for sy in [
                [("b", 2), ("seq", 1), ("past", 5), ("cap", 11)],
                [("b", 1), ("seq", 1), ("past", 700), ("cap", 720)],
                [("b", 2), ("seq", 3), ("past", 5), ("cap", 11)],
                [("b", 1), ("seq", 2), ("past", 149), ("cap", 160)],
            ] {
                let gens = [Gen::F(2.0), Gen::F(2.0), g, g];
                let mut first = case_of("attention partials", partials.instance.clone(), &sy, &gens, SUM);
                // Segments past a call's count are not written: NaN in
                // the reference as in the compiled run's output.
                let n = first.want[0].len();
                let mut bufs = [first.inputs.clone(), vec![BufData::F32(vec![f32::NAN; n])]].concat();
                interp::run(&first.kernel, &mut bufs, &first.scalars, Mode::Cpu { threads: 1 }).unwrap();
                first.want = vec![bufs.pop().unwrap()];
                let mut second = case_of("attention combine", combine.instance.clone(), &sy, &[gens[0]; 5], SUM);
                // The combine reads the partials the interpreter wrote.
                second.inputs = [first.inputs.clone(), first.want.clone()].concat();
                let mut bufs = [second.inputs.clone(), vec![second.want[0].clone()]].concat();
                interp::run(&second.kernel, &mut bufs, &second.scalars, Mode::Cpu { threads: 1 }).unwrap();
                second.want = vec![bufs.pop().unwrap()];
                // It reads no segment the partials left unwritten (NaN).
                assert!(second.want[0].f32().iter().all(|x| x.is_finite()), "{}", second.label);
                cases.push(first);
                cases.push(second);
            }
        }
    }
    // KV append.
    let kva = Op::KvAppend { axis: 2 };
    cases.push(op_case(kva, &[f("b,2,past,6"), f("b,2,seq,6")], &[("b", 2), ("past", 5), ("seq", 3)], &[g, g], 0.0));
    let n = cases.len();
    let worst = check_all(&cases);
    eprintln!("matmul and fused ops: {n} cases, worst error {worst:.2e} of the largest output");
}

#[test]
fn elementwise_layout_reduce() {
    let mut cases = vec![];
    let sy: &[(&str, i64)] = &[("batch", 2), ("seq", 37)];
    let x = f("batch,seq,5");
    let gs = Gen::Special(3.0);
    // Unary float ops, NaN and infinities included (libm: sin, cos, erf).
    for op in [
        Op::Neg {},
        Op::Abs {},
        Op::Relu {},
        Op::Exp {},
        Op::Sin {},
        Op::Cos {},
        Op::Tanh {},
        Op::Sigmoid {},
        Op::Erf {},
        Op::Floor {},
        Op::Ceil {},
        Op::Round {},
        Op::IsNan {},
        Op::IsInf {},
    ] {
        cases.push(op_case(op, std::slice::from_ref(&x), sy, &[gs], POINT));
    }
    for op in [Op::Log {}, Op::Sqrt {}, Op::Rsqrt {}] {
        cases.push(op_case(op, std::slice::from_ref(&x), sy, &[Gen::Pos], POINT));
    }
    // Binary ops with broadcasting (libm: fmodf, powf).
    let y = f("seq,1");
    for op in [Op::Add {}, Op::Sub {}, Op::Mul {}, Op::Div {}, Op::Max {}, Op::Min {}, Op::Mod {}, Op::Rem {}] {
        cases.push(op_case(op, &[x.clone(), y.clone()], sy, &[gs, Gen::F(2.0)], POINT));
    }
    cases.push(op_case(Op::Pow {}, &[x.clone(), y.clone()], sy, &[Gen::Pos, Gen::F(2.0)], POINT));
    // Integer and bool ops, comparisons, where, casts.
    let xi = ty(DType::I64, "batch,seq,5");
    for op in [Op::Add {}, Op::Mul {}, Op::Max {}, Op::Lt {}, Op::Eq {}] {
        cases.push(op_case(op, &[xi.clone(), xi.clone()], sy, &[Gen::F(1.0); 2], 0.0));
    }
    for op in [Op::Lt {}, Op::Ne {}, Op::Ge {}] {
        cases.push(op_case(op, &[x.clone(), y.clone()], sy, &[gs, Gen::F(1.0)], 0.0));
    }
    let c = ty(DType::Bool, "batch,seq,5");
    cases.push(op_case(Op::And {}, &[c.clone(), c.clone()], sy, &[Gen::F(1.0); 2], 0.0));
    cases.push(op_case(Op::Not {}, std::slice::from_ref(&c), sy, &[Gen::F(1.0)], 0.0));
    cases.push(op_case(Op::Where {}, &[c, x.clone(), y.clone()], sy, &[Gen::F(1.0); 3], 0.0));
    for to in [DType::I64, DType::I32, DType::Bool] {
        cases.push(op_case(Op::Cast { to }, std::slice::from_ref(&x), sy, &[Gen::Special(1e3)], 0.0));
    }
    cases.push(op_case(Op::Cast { to: DType::F32 }, std::slice::from_ref(&xi), sy, &[Gen::F(1.0)], 0.0));
    // Layout: transpose, concat, gather, slice.
    let x4 = f("batch,3,seq,4");
    cases.push(op_case(Op::Transpose { perm: vec![0, 2, 1, 3] }, std::slice::from_ref(&x4), sy, &[gs], 0.0));
    cases.push(op_case(Op::Transpose { perm: vec![3, 2, 1, 0] }, std::slice::from_ref(&x4), sy, &[gs], 0.0));
    cases.push(op_case(Op::Concat { axis: 2 }, &[x4.clone(), x4.clone()], sy, &[gs, gs], 0.0));
    let ids = ty(DType::I64, "batch,seq");
    let table = f("50,8");
    cases.push(op_case(Op::Gather { axis: 0 }, &[table, ids], sy, &[Gen::F(1.0), Gen::F(1.0)], 0.0));
    // Reductions, softmax, argmax.
    for h in ["5", "67"] {
        let r = f(&format!("batch,seq,{h}"));
        for op in [
            Op::ReduceSum { axes: vec![-1], keepdims: false },
            Op::ReduceMean { axes: vec![-1], keepdims: true },
            Op::ReduceMax { axes: vec![-1], keepdims: false },
            Op::ReduceMin { axes: vec![1], keepdims: false },
            Op::ReduceSum { axes: vec![0, 2], keepdims: false },
            Op::Softmax { axis: -1 },
            Op::Softmax { axis: 1 },
            Op::ArgMax { axis: -1, keepdims: false },
        ] {
            cases.push(op_case(op.clone(), std::slice::from_ref(&r), sy, &[Gen::F(3.0)], SUM));
        }
        cases.push(op_case(Op::Softmax { axis: -1 }, std::slice::from_ref(&r), sy, &[gs], SUM));
        cases.push(op_case(
            Op::ReduceMax { axes: vec![-1], keepdims: false },
            std::slice::from_ref(&r),
            sy,
            &[gs],
            SUM,
        ));
    }
    let n = cases.len();
    let worst = check_all(&cases);
    eprintln!("elementwise, layout, reduce: {n} cases, worst error {worst:.2e} of the largest output");
}

/// A case for a hand-built kernel: the first `inputs` global buffers are
/// filled by `gens`, the interpreter computes the rest.
fn kernel_case(label: &str, k: Kernel, scalars: &[i64], gens: &[Gen], tol: f32) -> Case {
    let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
    let mut bufs: Vec<BufData> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let n = k.buffer_len(d, scalars).unwrap();
            match gens.get(i) {
                Some(g) => make(d.elem, n, *g, 3 + i as u64),
                None => BufData::zeros(d.elem, n),
            }
        })
        .collect();
    interp::run(&k, &mut bufs, scalars, Mode::Cpu { threads: 1 }).unwrap_or_else(|e| panic!("{label}: {e}\n{k}"));
    let want = bufs.split_off(gens.len());
    Case { label: label.into(), kernel: k, scalars: scalars.to_vec(), inputs: bufs, want, rtol: tol, atol: tol }
}

/// f32 values that exercise rounding to bf16 and f16: ties (to even up and
/// down), NaN, infinities, subnormals of both, overflow, signed zeros.
fn narrow_edge_values(n: usize) -> Vec<f32> {
    let edges = [
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_7fff),
        f32::from_bits(0x3f80_8001),
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::from_bits(0x7f7f_8000),
        1e-40,
        -2e-39,
        65504.0,
        65520.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        6e-8,
        2e-8,
        -0.0,
        0.0,
    ];
    rand(n, 77).iter().enumerate().map(|(i, x)| edges.get(i % 32).copied().unwrap_or(x * 1e3)).collect()
}

/// bf16 and f16 buffers through LLVM on the host: scalar and vector loads
/// (8 x bf16 = 16 bytes, 4 x f16), loads of the even and odd halves of
/// pairs, scalar and vector stores rounding to
/// nearest even (NaN stays NaN), and a widened reduction loop reading
/// bf16; against the interpreter (the `half` crate), bit for bit.
#[test]
fn narrow_float_loads_and_stores() {
    let n = 256;
    let mut cases = vec![];
    for (elem, lanes) in [(Scalar::BF16, 8u8), (Scalar::F16, 4), (Scalar::BF16, 1), (Scalar::F16, 1)] {
        // Loads: y = x (exact), and 2 x via vectors.
        let mut b = Builder::new(&format!("load_{elem:?}_{lanes}").to_lowercase());
        let x = b.buffer("x", elem, n, Space::Global, Access::Read);
        let y = b.output("y", n);
        let y2 = b.output("y2", n);
        b.for_("i", Expr::idx(0), Expr::idx(n / lanes as usize), 1, LoopKind::Parallel, |b, i| {
            let at = i * Expr::idx(lanes as usize);
            let v = b.let_("v", Expr::load(x, at.clone(), lanes));
            b.store(y, at.clone(), Expr::Var(v));
            let two = if lanes > 1 { Expr::f32(2.0).splat(lanes) } else { Expr::f32(2.0) };
            b.store(y2, at, Expr::Var(v) * two);
        });
        cases.push(kernel_case(
            &format!("load {elem:?}x{lanes}"),
            b.finish().unwrap(),
            &[],
            &[Gen::Special(50.0)],
            0.0,
        ));
        // Stores: edge values rounded, scalar and vector.
        let mut b = Builder::new(&format!("store_{elem:?}_{lanes}").to_lowercase());
        let x = b.input("x", n);
        let y = b.buffer("y", elem, n, Space::Global, Access::Write);
        b.for_("i", Expr::idx(0), Expr::idx(n / lanes as usize), 1, LoopKind::Parallel, |b, i| {
            let at = i * Expr::idx(lanes as usize);
            b.store(y, at.clone(), Expr::load(x, at, lanes));
        });
        let mut c = kernel_case(&format!("store {elem:?}x{lanes}"), b.finish().unwrap(), &[], &[Gen::F(1.0)], 0.0);
        c.inputs = vec![BufData::F32(narrow_edge_values(n))];
        let mut bufs = vec![c.inputs[0].clone(), BufData::zeros(elem, n)];
        interp::run(&c.kernel, &mut bufs, &[], Mode::Cpu { threads: 1 }).unwrap();
        c.want = vec![bufs.pop().unwrap()];
        cases.push(c);
    }
    // Pair loads: each block of `2 * lanes` elements stored as its even
    // elements, then its odd ones.
    for (elem, lanes) in
        [(Scalar::BF16, 16u8), (Scalar::BF16, 4), (Scalar::F16, 8), (Scalar::BF16, 1), (Scalar::F16, 1)]
    {
        let mut b = Builder::new(&format!("pairs_{elem:?}_{lanes}").to_lowercase());
        let x = b.buffer("x", elem, n, Space::Global, Access::Read);
        let y = b.output("y", n);
        let l = lanes as usize;
        b.for_("i", Expr::idx(0), Expr::idx(n / (2 * l)), 1, LoopKind::Parallel, |b, i| {
            let at = b.let_("at", i * Expr::idx(2 * l));
            b.store(y, Expr::Var(at), Expr::load_pick(x, Expr::Var(at), lanes, Pick::Even));
            b.store(y, Expr::Var(at) + Expr::idx(l), Expr::load_pick(x, Expr::Var(at), lanes, Pick::Odd));
        });
        cases.push(kernel_case(
            &format!("pairs {elem:?}x{lanes}"),
            b.finish().unwrap(),
            &[],
            &[Gen::Special(50.0)],
            0.0,
        ));
    }
    // Lane sums of `lanes` vectors of `lanes` at 4, 8 and 16 lanes, in the
    // interpreter's order of additions (exact).
    for lanes in [4u8, 8, 16] {
        let l = lanes as usize;
        let blocks = n / (l * l);
        let mut b = Builder::new(&format!("hsums_{lanes}"));
        let x = b.input("x", blocks * l * l);
        let y = b.output("y", blocks * l);
        b.for_("t", Expr::idx(0), Expr::idx(blocks), 1, LoopKind::Parallel, |b, t| {
            let vs = (0..l).map(|i| Expr::load(x, t.clone() * Expr::idx(l * l) + Expr::idx(i * l), lanes)).collect();
            b.store(y, t * Expr::idx(l), Expr::HSums(vs));
        });
        cases.push(kernel_case(&format!("hsums x{lanes}"), b.finish().unwrap(), &[], &[Gen::F(100.0)], 0.0));
    }
    // A Vectorized(4) dot product of bf16 rows with f32 weights (widened
    // on AVX hosts), rounded into an f16 output.
    let (rows, k) = (7usize, 64usize);
    let mut b = Builder::new("dot_bf16");
    let x = b.buffer("x", Scalar::BF16, rows * k, Space::Global, Access::Read);
    let w = b.input("w", k);
    let y = b.buffer("y", Scalar::F16, rows, Space::Global, Access::Write);
    b.for_("r", Expr::idx(0), Expr::idx(rows), 1, LoopKind::Parallel, |b, r| {
        let acc = b.let_("acc", Expr::f32(0.0).splat(4));
        b.for_("j", Expr::idx(0), Expr::idx(k), 4, LoopKind::Vectorized(4), |b, j| {
            let xv = Expr::load(x, r.clone() * Expr::idx(k) + j.clone(), 4);
            b.assign(acc, xv.fma(Expr::load(w, j, 4), Expr::Var(acc)));
        });
        b.store(y, r, Expr::Var(acc).hreduce(RedOp::Add));
    });
    let c = kernel_case("dot bf16", b.finish().unwrap(), &[], &[Gen::F(1.0), Gen::F(1.0)], 0.0);
    // The widened sum may differ in the last f32 bits, which can move the
    // f16 rounding by one step: compare as f32 with a tolerance instead.
    let as_f32 = |b: &BufData| match b {
        BufData::F16(v) => BufData::F32(v.iter().map(|x| x.to_f32()).collect()),
        other => other.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let lib = library(&[&c.kernel], dir.path(), true);
    let f = kernel_fn(&lib, &c.kernel);
    for threads in [1, 3] {
        let got = run(&f, &c, threads);
        compare("dot bf16", &as_f32(&got[0]), &as_f32(&c.want[0]), 2e-3, 2e-3);
    }
    let worst = check_all(&cases);
    eprintln!("narrow loads and stores: {} cases, worst error {worst:.2e}", cases.len());
}

/// GFLOP/s of the 128x576x1536 GEMM with an [n, k] weight (and the [k, n]
/// one) through LLVM and Cranelift libraries, one thread; and on x86-64
/// with AVX2 and FMA, LLVM's code must use 256-bit FMAs.
/// Seconds per call of a GEMM kernel `(a, w, out)` with `m` rows on one
/// thread: one warm-up call, then the mean of 20.
fn time_gemm(f: &KernelFn, a: &mut [f32], w: &mut [f32], o: &mut [f32], m: usize) -> f64 {
    let ptrs = [a.as_mut_ptr().cast::<u8>(), w.as_mut_ptr().cast(), o.as_mut_ptr().cast()];
    let scalars = [m as i64];
    // SAFETY: the caller passes buffers of the kernel's declared lengths
    // for `m` rows.
    let call = || unsafe { f(ptrs.as_ptr(), scalars.as_ptr(), 0, 1) };
    call();
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        call();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

#[test]
fn gemm_timing_and_ymm() {
    let (m, k, n) = (128usize, 576usize, 1536usize);
    let x = f("1,seq,576");
    let nk = matmul_weight_nk(&x, &f("1536,576")).unwrap();
    let refs = [&x, &f("576,1536")];
    let out = Op::MatMul {}.infer(&refs).unwrap();
    let Selected::Kernel(kn) = select(&Op::MatMul {}, &[x.clone(), f("576,1536")], &out).unwrap() else {
        panic!("alias")
    };
    let a = rand(m * k, 1);
    let w = rand(k * n, 2);
    let flops = 2.0 * (m * k * n) as f64;
    // The packed 6x16 tiles of 8-lane vectors (LLVM only: Cranelift lowers
    // 4-lane vectors), timed on the same operands laid out as panels.
    {
        let wide = weight_matmul_with(&f("seq,576"), n, k, Scalar::F32, PanelParams::WIDE).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lib = library(&[&wide.instance.kernel], dir.path(), true);
        let kf = kernel_fn(&lib, &wide.instance.kernel);
        let mut a = a.clone();
        let mut wp = wide.packs[0].apply_kn(&w, n, k);
        let mut o = vec![0f32; m * n];
        let s = time_gemm(&kf, &mut a, &mut wp, &mut o, m);
        eprintln!(
            "gemm {m}x{k}x{n} packed 6x16 f32x8 via LLVM: {:.3} ms, {:.1} GFLOP/s (1 thread)",
            s * 1e3,
            flops / s / 1e9
        );
        // Against the product computed directly (w is [k, n] here).
        let mut worst = 0f32;
        let scale = o.iter().fold(0f32, |m, x| m.max(x.abs()));
        for i in (0..m).step_by(17) {
            for j in (0..n).step_by(13) {
                let want: f32 = (0..k).map(|kk| a[i * k + kk] * w[kk * n + j]).sum();
                worst = worst.max((o[i * n + j] - want).abs() / scale);
            }
        }
        assert!(worst < 1e-4, "packed gemm differs by {worst:.2e} of the largest output");
    }
    for (what, inst) in [("[n,k] weight", &nk), ("[k,n] weight", &kn)] {
        let mut results = vec![];
        for llvm in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let lib = library(&[&inst.kernel], dir.path(), llvm);
            let f = kernel_fn(&lib, &inst.kernel);
            let (mut a, mut w) = (a.clone(), w.clone());
            let mut o = vec![0f32; m * n];
            let s = time_gemm(&f, &mut a, &mut w, &mut o, m);
            let gflops = flops / s / 1e9;
            eprintln!(
                "gemm {m}x{k}x{n} {what} via {}: {:.3} ms, {gflops:.1} GFLOP/s (1 thread)",
                if llvm { "LLVM" } else { "Cranelift" },
                s * 1e3
            );
            results.push(o);
        }
        let worst = compare(
            &format!("gemm {what}: LLVM vs Cranelift"),
            &BufData::F32(results[0].clone()),
            &BufData::F32(results[1].clone()),
            SUM,
            SUM,
        );
        eprintln!("gemm {what}: LLVM vs Cranelift worst error {worst:.2e}");
    }
    // The generated assembly of the [n, k] GEMM.
    let asm =
        smelt_codegen::llvm::compile(std::slice::from_ref(&nk.kernel), "gemm", smelt_codegen::llvm::Output::Assembly)
            .unwrap();
    let asm = String::from_utf8_lossy(&asm);
    let count = |pat: &dyn Fn(&str) -> bool| asm.lines().filter(|l| pat(l.trim())).count();
    let ymm_fma = count(&|l| l.starts_with("vfmadd") && l.contains("ymm"));
    let zmm_fma = count(&|l| l.starts_with("vfmadd") && l.contains("zmm"));
    let xmm_fma = count(&|l| l.starts_with("vfmadd") && l.contains("xmm"));
    eprintln!("LLVM [n,k] gemm: {xmm_fma} xmm, {ymm_fma} ymm, {zmm_fma} zmm FMA instructions");
    #[cfg(target_arch = "x86_64")]
    // `SMELT_LLVM_WIDEN` (an experiment knob) may turn the widening off.
    let widen_default = std::env::var_os("SMELT_LLVM_WIDEN").is_none();
    if widen_default && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert!(ymm_fma + zmm_fma > 0, "no 256/512-bit FMAs in the GEMM:\n{asm}");
    }
}

/// Single-row tiles of the packed weight kernels prefetch every panel
/// they read when `PanelParams::prefetch` asks for it, and only then:
/// LLVM's x86 code has non-temporal `prefetchnta` instructions, for f32
/// and narrow weights alike, and none with `prefetch: 0`. (The kernels'
/// results, prefetches past the panel's end included, are checked in
/// `matmul_and_fused_ops`.)
#[cfg(target_arch = "x86_64")]
#[test]
fn decode_kernels_prefetch_their_panels_when_asked() {
    let x = f("seq,96");
    for elem in [Scalar::BF16, Scalar::F16, Scalar::F32] {
        for prefetch in [0, 2048] {
            let want = prefetch > 0;
            let wk = weight_matmul_with(&x, 40, 96, elem, PanelParams { prefetch, ..PanelParams::WIDE }).unwrap();
            let k = &wk.instance.kernel;
            assert_eq!(k.to_string().contains("prefetch w["), want, "{elem:?} {prefetch}:\n{k}");
            let asm = smelt_codegen::llvm::compile(
                std::slice::from_ref(k),
                "prefetch",
                smelt_codegen::llvm::Output::Assembly,
            )
            .unwrap();
            let asm = String::from_utf8_lossy(&asm);
            let prefetches = asm.lines().filter(|l| l.trim().starts_with("prefetch")).count();
            let nta = asm.lines().filter(|l| l.trim().starts_with("prefetchnta")).count();
            assert_eq!(prefetches > 0, want, "{elem:?} {prefetch}: {prefetches} prefetch instructions");
            assert_eq!(nta, prefetches, "{elem:?} {prefetch}: every prefetch is non-temporal");
        }
    }
}
