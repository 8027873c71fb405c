//! Differential tests of the elementwise, layout and reduction kernel
//! families: for each op, operand types with symbolic dims, several symbol
//! bindings (1, odd sizes, 257), random inputs; the selected kernel runs in
//! the KIR interpreter and JIT-compiled by Cranelift, as teams of 1 and 3
//! threads, and must match `smelt_ir::interp::eval_op`.
//!
//! Tolerances: integer, bool and copied results must be exact. Float maths
//! must satisfy |got - want| <= rtol * |want| + atol with rtol 1e-5 and a
//! small atol (1e-6 unless a case says otherwise); the interpreter computes
//! in f64 and rounds once, the kernels compute in f32 (libm functions are
//! called in f32, `exp`/`tanh` are Cephes polynomials within 2 ulp).
//! Reductions accumulate in f32 where the interpreter uses f64, so their
//! atol grows with the reduced count n: 1e-6 * n * max|x| (a loose bound on
//! f32 summation error, n * 2^-24 * sum|x|).

use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::Scalar;
use smelt_codegen::select::{select, Instance, Selected};
use smelt_codegen::templates::testing::rand;
use smelt_ir::{DType, Data, Dim, Op, Tensor, TensorType};
use std::collections::BTreeMap;

/// How a test fills an operand.
#[derive(Clone, Copy)]
enum Gen {
    /// Uniform in [-scale, scale) for floats; integers in [-5, 5]; random bools.
    Uniform(f32),
    /// Floats in [0.5, 1.5) * scale.
    Positive(f32),
    /// Integers in [lo, hi].
    Ints(i64, i64),
    /// Like `Uniform(scale)`, with every 7th element NaN and every 11th +-inf.
    Special(f32),
}

fn ty(dtype: DType, dims: &[&str]) -> TensorType {
    TensorType::new(dtype, dims.iter().map(|d| d.parse::<Dim>().unwrap()).collect())
}

fn make(t: &TensorType, syms: &BTreeMap<String, i64>, gen: Gen, seed: u64) -> Tensor {
    let shape: Vec<usize> = t.shape.iter().map(|d| d.eval_map(syms).unwrap() as usize).collect();
    let n: usize = shape.iter().product();
    let r = rand(n, seed);
    if t.dtype.is_float() {
        let v: Vec<f32> = match gen {
            Gen::Uniform(s) => r.iter().map(|x| x * s).collect(),
            Gen::Positive(s) => r.iter().map(|x| (x * 0.5 + 1.0) * s).collect(),
            Gen::Ints(lo, hi) => {
                r.iter().map(|x| (lo + ((x + 1.0) * 0.5 * (hi - lo + 1) as f32) as i64) as f32).collect()
            }
            Gen::Special(s) => r
                .iter()
                .enumerate()
                .map(|(i, x)| match (i % 7, i % 11) {
                    (3, _) => f32::NAN,
                    (_, 5) => f32::INFINITY.copysign(*x),
                    _ => x * s,
                })
                .collect(),
        };
        Tensor::from_f32(t.dtype, shape, v).unwrap()
    } else if t.dtype == DType::Bool {
        Tensor::from_bool(shape, r.iter().map(|x| *x > 0.0).collect()).unwrap()
    } else {
        let (lo, hi) = match gen {
            Gen::Ints(lo, hi) => (lo, hi),
            _ => (-5, 5),
        };
        let v = r.iter().map(|x| (lo + ((x + 1.0) * 0.5 * (hi - lo + 1) as f32) as i64).min(hi)).collect();
        Tensor::from_i64(t.dtype, shape, v).unwrap()
    }
}

fn to_buf(t: &Tensor, elem: Scalar) -> BufData {
    match elem {
        Scalar::F32 => BufData::F32(t.to_f32_vec()),
        Scalar::I64 => BufData::I64(t.to_i64_vec()),
        Scalar::I32 => BufData::I32(t.to_i64_vec().into_iter().map(|x| x as i32).collect()),
        Scalar::Bool => BufData::Bool(t.to_i64_vec().into_iter().map(|x| x != 0).collect()),
        Scalar::BF16 => BufData::BF16(t.to_f32_vec().into_iter().map(half::bf16::from_f32).collect()),
        Scalar::F16 => BufData::F16(t.to_f32_vec().into_iter().map(half::f16::from_f32).collect()),
    }
}

/// Values as f64 for comparison (bools as 0/1).
fn values(b: &BufData) -> Vec<f64> {
    match b {
        BufData::F32(v) => v.iter().map(|x| *x as f64).collect(),
        BufData::I32(v) => v.iter().map(|x| *x as f64).collect(),
        BufData::I64(v) => v.iter().map(|x| *x as f64).collect(),
        BufData::Bool(v) => v.iter().map(|x| *x as u8 as f64).collect(),
        BufData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        BufData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
    }
}

fn tensor_values(t: &Tensor) -> Vec<f64> {
    match &t.data {
        Data::F32(v) => v.iter().map(|x| *x as f64).collect(),
        Data::F64(v) => v.clone(),
        Data::I64(v) => v.iter().map(|x| *x as f64).collect(),
        Data::Bool(v) => v.iter().map(|x| *x as u8 as f64).collect(),
    }
}

fn compare(what: &str, got: &[f64], want: &[f64], exact: bool, rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if exact {
            g == w || (g.is_nan() && w.is_nan())
        } else {
            (g - w).abs() <= rtol * w.abs() + atol || (g.is_nan() && w.is_nan()) || g == w
        };
        assert!(ok, "{what}: element {i}: got {g}, expected {w}");
    }
}

/// Runs one instance through the interpreter and the JIT (teams of 1 and 3)
/// and returns each run's output buffers.
fn run_instance(
    inst: &Instance,
    inputs: &[Tensor],
    out_lens: &[usize],
    scalars: &[i64],
) -> Vec<(String, Vec<BufData>)> {
    let k = &inst.kernel;
    let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
    let ins: Vec<BufData> = inputs.iter().zip(&decls).map(|(t, d)| to_buf(t, d.elem)).collect();
    let outs: Vec<BufData> =
        decls[inputs.len()..].iter().zip(out_lens).map(|(d, n)| BufData::zeros(d.elem, *n)).collect();
    let mut results = vec![];
    for threads in [1, 3] {
        let mut all: Vec<BufData> = ins.iter().cloned().chain(outs.iter().cloned()).collect();
        interp::run(k, &mut all, scalars, Mode::Cpu { threads }).unwrap_or_else(|e| panic!("{e}\n{k}"));
        results.push((format!("interp/{threads}"), all.split_off(ins.len())));
    }
    let j = JitKernel::compile(k).unwrap_or_else(|e| panic!("{e}\n{k}"));
    for threads in [1, 3] {
        let mut outs = outs.clone();
        for t in 0..threads {
            let mut args: Vec<Arg> = ins
                .iter()
                .map(|b| match b {
                    BufData::F32(v) => Arg::F32(v),
                    BufData::I32(v) => Arg::I32(v),
                    BufData::I64(v) => Arg::I64(v),
                    BufData::Bool(v) => Arg::Bool(v),
                    BufData::BF16(v) => Arg::BF16(v),
                    BufData::F16(v) => Arg::F16(v),
                })
                .collect();
            for b in outs.iter_mut() {
                args.push(match b {
                    BufData::F32(v) => Arg::F32Mut(v),
                    BufData::I32(v) => Arg::I32Mut(v),
                    BufData::I64(v) => Arg::I64Mut(v),
                    BufData::Bool(v) => Arg::BoolMut(v),
                    BufData::BF16(v) => Arg::BF16Mut(v),
                    BufData::F16(v) => Arg::F16Mut(v),
                });
            }
            j.run_part(&mut args, scalars, t, threads).unwrap_or_else(|e| panic!("{e}\n{k}"));
        }
        results.push((format!("jit/{threads}"), outs));
    }
    results
}

struct Check {
    rtol: f64,
    atol: f64,
    gens: Vec<Gen>,
    /// Whether the result must be a view of operand 0.
    alias: Option<bool>,
}

impl Check {
    fn new() -> Check {
        Check { rtol: 1e-5, atol: 1e-6, gens: vec![], alias: None }
    }
    fn tol(mut self, rtol: f64, atol: f64) -> Check {
        self.rtol = rtol;
        self.atol = atol;
        self
    }
    fn gens(mut self, g: &[Gen]) -> Check {
        self.gens = g.to_vec();
        self
    }
    fn alias(mut self, a: bool) -> Check {
        self.alias = Some(a);
        self
    }
}

/// Selects `op` for `inputs` and checks it against the interpreter under
/// every binding in `bindings`. Returns the number of runs compared.
fn check(op: &Op, inputs: &[TensorType], bindings: &[&[(&str, i64)]], c: &Check) -> usize {
    let refs: Vec<&TensorType> = inputs.iter().collect();
    let outputs = op.infer(&refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    let sel = select(op, inputs, &outputs).unwrap_or_else(|e| panic!("{e}"));
    let what = format!("{} {:?}", op.name(), inputs.iter().map(|t| t.to_string()).collect::<Vec<_>>());
    if let Some(a) = c.alias {
        assert_eq!(matches!(sel, Selected::Alias { .. }), a, "{what}: alias expected {a}");
    }
    let mut runs = 0;
    for (bi, binding) in bindings.iter().enumerate() {
        let syms: BTreeMap<String, i64> = binding.iter().map(|(s, v)| (s.to_string(), *v)).collect();
        let tensors: Vec<Tensor> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| make(t, &syms, c.gens.get(i).copied().unwrap_or(Gen::Uniform(3.0)), (bi * 10 + i) as u64 + 1))
            .collect();
        let trefs: Vec<&Tensor> = tensors.iter().collect();
        let want = smelt_ir::interp::eval_op(op, &trefs, &syms).unwrap_or_else(|e| panic!("{what}: {e}"));
        let exact = !outputs[0].dtype.is_float();
        let what = format!("{what} with {binding:?}");
        match &sel {
            Selected::Alias { offset } => {
                let off = offset.eval_map(&syms).unwrap() as usize;
                let src = tensor_values(&tensors[0]);
                let w = tensor_values(&want[0]);
                compare(&what, &src[off..off + w.len()], &w, true, 0.0, 0.0);
            }
            Selected::Kernel(inst) => {
                let scalars: Vec<i64> = inst.scalars.iter().map(|d| d.eval_map(&syms).unwrap()).collect();
                let k = &inst.kernel;
                // Declared lengths equal the bound tensors' element counts.
                let lens: Vec<usize> = tensors.iter().chain(&want).map(|t| t.numel()).collect();
                let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
                assert_eq!(decls.len(), lens.len(), "{what}: buffer count");
                for (d, n) in decls.iter().zip(&lens) {
                    assert_eq!(k.buffer_len(d, &scalars).unwrap(), *n, "{what}: length of `{}`", d.name);
                }
                let out_lens: Vec<usize> = want.iter().map(|t| t.numel()).collect();
                for (how, outs) in run_instance(inst, &tensors, &out_lens, &scalars) {
                    for (o, w) in outs.iter().zip(&want) {
                        let atol = c.atol;
                        compare(
                            &format!("{what} [{how}] {}", k.name),
                            &values(o),
                            &tensor_values(w),
                            exact,
                            c.rtol,
                            atol,
                        );
                    }
                    runs += 1;
                }
            }
            Selected::Steps(_) => panic!("{what}: the CPU selection has no steps"),
        }
    }
    runs
}

const B3: &[&[(&str, i64)]] = &[&[("batch", 1), ("seq", 1)], &[("batch", 2), ("seq", 3)], &[("batch", 3), ("seq", 5)]];
const B4: &[&[(&str, i64)]] = &[
    &[("batch", 1), ("seq", 1)],
    &[("batch", 2), ("seq", 3)],
    &[("batch", 3), ("seq", 5)],
    &[("batch", 1), ("seq", 257)],
];

#[test]
fn unary_ops_match_interpreter() {
    let mut runs = 0;
    let x = ty(DType::F32, &["batch", "seq", "7"]);
    let plain = [
        Op::Neg {},
        Op::Abs {},
        Op::Relu {},
        Op::Sign {},
        Op::Exp {},
        Op::Reciprocal {},
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
    ];
    for op in &plain {
        runs += check(op, std::slice::from_ref(&x), B4, &Check::new().gens(&[Gen::Uniform(6.0)]));
    }
    // Half-way cases for round, and sigmoid/exp far out.
    runs += check(&Op::Round {}, std::slice::from_ref(&x), B3, &Check::new().gens(&[Gen::Ints(-6, 6)]));
    let half = ty(DType::F32, &["seq"]);
    runs += check(&Op::Round {}, std::slice::from_ref(&half), B3, &Check::new().gens(&[Gen::Uniform(2.5)]));
    runs += check(
        &Op::Sigmoid {},
        std::slice::from_ref(&x),
        B3,
        &Check::new().gens(&[Gen::Uniform(120.0)]).tol(1e-5, 1e-30),
    );
    for op in [Op::Log {}, Op::Sqrt {}, Op::Rsqrt {}] {
        runs += check(&op, std::slice::from_ref(&x), B4, &Check::new().gens(&[Gen::Positive(4.0)]));
    }
    let i = ty(DType::I64, &["batch", "seq"]);
    let i32t = ty(DType::I32, &["seq", "3"]);
    for op in [Op::Neg {}, Op::Abs {}, Op::Relu {}, Op::Sign {}] {
        runs += check(&op, std::slice::from_ref(&i), B3, &Check::new());
        runs += check(&op, std::slice::from_ref(&i32t), B3, &Check::new());
    }
    runs += check(&Op::Not {}, &[ty(DType::Bool, &["batch", "seq", "5"])], B3, &Check::new());
    eprintln!("unary: {runs} runs");
}

#[test]
fn binary_ops_broadcast_and_match_interpreter() {
    let mut runs = 0;
    let shapes: &[(&[&str], &[&str])] = &[
        (&["batch", "seq", "64"], &["batch", "seq", "64"]),
        (&["batch", "seq", "64"], &["64"]),
        (&["batch", "seq", "64"], &["batch", "seq", "1"]),
        (&["batch", "1", "seq"], &["batch", "seq", "1"]),
        (&["seq"], &[]),
        (&["1", "seq", "3", "1", "2", "5"], &["batch", "1", "3", "4", "1", "5"]),
    ];
    for (sa, sb) in shapes {
        let (a, b) = (ty(DType::F32, sa), ty(DType::F32, sb));
        for op in [Op::Add {}, Op::Sub {}, Op::Mul {}, Op::Div {}, Op::Max {}, Op::Min {}] {
            runs +=
                check(&op, &[a.clone(), b.clone()], B3, &Check::new().gens(&[Gen::Uniform(3.0), Gen::Positive(2.0)]));
        }
        for op in [Op::Mod {}, Op::Rem {}] {
            runs +=
                check(&op, &[a.clone(), b.clone()], B3, &Check::new().gens(&[Gen::Uniform(9.0), Gen::Uniform(3.0)]));
        }
        runs += check(
            &Op::Pow {},
            &[a.clone(), b.clone()],
            B3,
            &Check::new().gens(&[Gen::Positive(2.0), Gen::Uniform(3.0)]),
        );
        for dt in [DType::I64, DType::I32] {
            let (a, b) = (ty(dt, sa), ty(dt, sb));
            for op in [Op::Add {}, Op::Sub {}, Op::Mul {}, Op::Max {}, Op::Min {}, Op::Div {}, Op::Mod {}, Op::Rem {}] {
                let nonzero = Gen::Ints(1, 7);
                let gens = if matches!(op, Op::Div {} | Op::Mod {} | Op::Rem {}) {
                    [Gen::Ints(-20, 20), nonzero]
                } else {
                    [Gen::Ints(-20, 20), Gen::Ints(-20, 20)]
                };
                runs += check(&op, &[a.clone(), b.clone()], B3, &Check::new().gens(&gens));
                // Negative divisors too.
                if matches!(op, Op::Div {} | Op::Mod {} | Op::Rem {}) {
                    runs += check(
                        &op,
                        &[a.clone(), b.clone()],
                        &B3[2..],
                        &Check::new().gens(&[Gen::Ints(-20, 20), Gen::Ints(-7, -1)]),
                    );
                }
            }
        }
    }
    // Pow with an integer exponent.
    let a = ty(DType::F32, &["batch", "seq"]);
    runs += check(
        &Op::Pow {},
        &[a.clone(), ty(DType::I64, &["seq"])],
        B3,
        &Check::new().gens(&[Gen::Uniform(2.0), Gen::Ints(-3, 3)]),
    );
    eprintln!("binary: {runs} runs");
}

#[test]
fn compares_logic_where_and_casts_match_interpreter() {
    let mut runs = 0;
    for dt in [DType::F32, DType::I64, DType::I32, DType::Bool] {
        let (a, b) = (ty(dt, &["batch", "seq", "3"]), ty(dt, &["seq", "1"]));
        for op in [Op::Eq {}, Op::Ne {}, Op::Lt {}, Op::Le {}, Op::Gt {}, Op::Ge {}] {
            // Few distinct values, so equal pairs occur.
            let g = Gen::Ints(-2, 2);
            runs += check(&op, &[a.clone(), b.clone()], B3, &Check::new().gens(&[g, g]));
        }
    }
    let (a, b) = (ty(DType::Bool, &["batch", "seq", "5"]), ty(DType::Bool, &["batch", "1", "5"]));
    for op in [Op::And {}, Op::Or {}, Op::Xor {}] {
        runs += check(&op, &[a.clone(), b.clone()], B3, &Check::new());
    }
    for dt in [DType::F32, DType::I64, DType::Bool, DType::I32] {
        let c = ty(DType::Bool, &["batch", "1", "seq"]);
        let (x, y) = (ty(dt, &["seq", "1"]), ty(dt, &["batch", "seq", "seq"]));
        runs += check(&Op::Where {}, &[c, x, y], B3, &Check::new());
    }
    let all = [DType::F32, DType::F16, DType::I64, DType::I32, DType::Bool];
    for from in all {
        for to in all {
            // f32 -> f16 rounds in the interpreter; the kernels keep f32 (see elementwise.rs).
            if from == DType::F32 && to == DType::F16 {
                continue;
            }
            let x = ty(from, &["batch", "seq", "9"]);
            let g = if from.is_float() { Gen::Uniform(300.0) } else { Gen::Ints(-300, 300) };
            runs += check(&Op::Cast { to }, &[x], B3, &Check::new().gens(&[g]));
        }
    }
    // f32 -> i32 beyond the i32 range wraps through i64, as the interpreter does.
    runs +=
        check(&Op::Cast { to: DType::I32 }, &[ty(DType::F32, &["seq"])], B3, &Check::new().gens(&[Gen::Uniform(6e9)]));
    eprintln!("compare/logic/where/cast: {runs} runs");
}

#[test]
fn identical_nodes_share_a_kernel() {
    let sel = |op: &Op, ins: &[TensorType]| {
        let refs: Vec<&TensorType> = ins.iter().collect();
        match select(op, ins, &op.infer(&refs).unwrap()).unwrap() {
            Selected::Kernel(i) => i,
            other => panic!("not one kernel: {other:?}"),
        }
    };
    let a = sel(&Op::Add {}, &[ty(DType::F32, &["batch", "seq", "64"]), ty(DType::F32, &["64"])]);
    let b = sel(&Op::Add {}, &[ty(DType::F32, &["b", "past + seq", "64"]), ty(DType::F32, &["64"])]);
    assert_eq!(a.kernel.name, b.kernel.name);
    assert_eq!(a.kernel.to_string(), b.kernel.to_string());
    assert_ne!(a.scalars, b.scalars);
    let c = sel(&Op::Mul {}, &[ty(DType::F32, &["batch", "seq", "64"]), ty(DType::F32, &["64"])]);
    assert_ne!(a.kernel.name, c.kernel.name);
    let d = sel(&Op::Add {}, &[ty(DType::F32, &["batch", "seq", "32"]), ty(DType::F32, &["32"])]);
    assert_ne!(a.kernel.name, d.kernel.name);
}

fn dims(v: &[&str]) -> Vec<Dim> {
    v.iter().map(|d| d.parse::<Dim>().unwrap()).collect()
}

#[test]
fn layout_ops_match_interpreter() {
    let mut runs = 0;
    let x = ty(DType::F32, &["batch", "seq", "6"]);
    let views = [
        Op::Reshape { shape: dims(&["batch * seq", "2", "3"]) },
        Op::Unsqueeze { axes: vec![1] },
        Op::Squeeze { axes: vec![] },
    ];
    for op in &views {
        runs += check(op, std::slice::from_ref(&x), B3, &Check::new().alias(true));
    }
    runs += check(&Op::Squeeze { axes: vec![0] }, &[ty(DType::I64, &["1", "seq"])], B3, &Check::new().alias(true));
    for dt in [DType::F32, DType::I64, DType::Bool, DType::I32] {
        let x = ty(dt, &["batch", "seq", "5", "3"]);
        for perm in [vec![0, 2, 1, 3], vec![3, 2, 1, 0], vec![1, 0, 2, 3], vec![0, 1, 3, 2]] {
            runs += check(&Op::Transpose { perm }, std::slice::from_ref(&x), B4, &Check::new());
        }
        runs += check(
            &Op::Expand { shape: dims(&["batch", "3", "seq", "4"]) },
            &[ty(dt, &["batch", "1", "seq", "1"])],
            B3,
            &Check::new(),
        );
        runs += check(&Op::Expand { shape: dims(&["seq", "2", "1"]) }, &[ty(dt, &["1", "5"])], B3, &Check::new());
    }
    // Slices: contiguous blocks are views, the rest copies (steps of any sign).
    let x = ty(DType::F32, &["batch", "seq", "8"]);
    type SliceCase<'a> = (Vec<i64>, Vec<&'a str>, Vec<&'a str>, Vec<i64>, Option<bool>);
    let slices: &[SliceCase] = &[
        (vec![0], vec!["0"], vec!["1"], vec![1], Some(true)),
        (vec![2], vec!["2"], vec!["6"], vec![1], Some(false)),
        (vec![1], vec!["0"], vec!["seq"], vec![2], Some(false)),
        (vec![-1], vec!["7"], vec!["-1"], vec![-1], Some(false)),
        (vec![1, 2], vec!["seq - 1", "1"], vec!["-1", "8"], vec![-1, 3], Some(false)),
    ];
    for (axes, starts, ends, steps, alias) in slices {
        let op = Op::Slice { axes: axes.clone(), starts: dims(starts), ends: dims(ends), steps: steps.clone() };
        let mut c = Check::new();
        c.alias = *alias;
        runs += check(&op, std::slice::from_ref(&x), B4, &c);
    }
    // The last token of a [1, seq, 8] tensor is a view at a symbolic offset.
    let last = Op::Slice { axes: vec![1], starts: dims(&["seq - 1"]), ends: dims(&["seq"]), steps: vec![1] };
    runs += check(&last, &[ty(DType::F32, &["1", "seq", "8"])], B4, &Check::new().alias(true));
    for dt in [DType::F32, DType::I64, DType::Bool] {
        for axis in [0, 1, 2, -1] {
            let ins =
                vec![ty(dt, &["batch", "seq", "3"]), ty(dt, &["batch", "seq", "3"]), ty(dt, &["batch", "seq", "3"])];
            runs += check(&Op::Concat { axis }, &ins, B3, &Check::new());
        }
        let ins = vec![ty(dt, &["batch", "past", "4"]), ty(dt, &["batch", "seq", "4"])];
        let kv: &[&[(&str, i64)]] =
            &[&[("batch", 2), ("past", 0), ("seq", 3)], &[("batch", 1), ("past", 7), ("seq", 1)]];
        runs += check(&Op::Concat { axis: 1 }, &ins, kv, &Check::new());
        runs += check(&Op::Concat { axis: 0 }, &[ty(dt, &["seq", "2"])], B3, &Check::new());
    }
    // Gather: the embedding lookup, other axes, negative and i32 indices.
    for (data, idx, axis) in [
        (vec!["11", "6"], vec!["batch", "seq"], 0),
        (vec!["batch", "5", "3"], vec!["seq"], 1),
        (vec!["batch", "4", "5"], vec!["2", "seq"], -1),
        (vec!["7"], vec![], 0),
    ] {
        for (dt, it) in [(DType::F32, DType::I64), (DType::I64, DType::I32), (DType::Bool, DType::I64)] {
            let ins = vec![ty(dt, &data), ty(it, &idx)];
            let lim = if axis == 0 { 5 } else { 4 };
            runs += check(
                &Op::Gather { axis },
                &ins,
                B3,
                &Check::new().gens(&[Gen::Uniform(3.0), Gen::Ints(-lim, lim - 1)]),
            );
        }
    }
    for axis in [0, 1, -1] {
        let ins = vec![ty(DType::F32, &["batch", "seq", "4"]), ty(DType::I64, &["batch", "seq", "3"])];
        runs +=
            check(&Op::GatherElements { axis }, &ins, B3, &Check::new().gens(&[Gen::Uniform(3.0), Gen::Ints(-1, 0)]));
    }
    for (upper, k) in [(true, "0"), (false, "0"), (true, "2"), (false, "-1"), (false, "past")] {
        let op = Op::Trilu { upper, k: k.parse().unwrap() };
        let b: &[&[(&str, i64)]] = &[&[("seq", 1), ("past", 0)], &[("seq", 5), ("past", 2)]];
        runs += check(&op, &[ty(DType::F32, &["2", "seq", "seq"])], b, &Check::new());
        runs += check(&op, &[ty(DType::Bool, &["seq", "7"])], b, &Check::new());
    }
    for dtype in [DType::I64, DType::F32, DType::I32] {
        for (start, end, step) in [("0", "seq", 1), ("past", "past + seq", 1), ("seq", "0", -2)] {
            let op = Op::Range { start: start.parse().unwrap(), end: end.parse().unwrap(), step, dtype };
            let b: &[&[(&str, i64)]] =
                &[&[("seq", 1), ("past", 0)], &[("seq", 5), ("past", 3)], &[("seq", 257), ("past", 9)]];
            runs += check(&op, &[], b, &Check::new());
        }
    }
    for (dtype, value) in
        [(DType::F32, -1.5), (DType::I64, 7.9), (DType::Bool, 1.0), (DType::F16, 0.1), (DType::I32, -3.0)]
    {
        let op = Op::Fill { shape: dims(&["batch", "seq", "5"]), value, dtype };
        runs += check(&op, &[], B4, &Check::new());
    }
    eprintln!("layout: {runs} runs");
}

#[test]
fn reductions_match_interpreter() {
    let mut runs = 0;
    let x = ty(DType::F32, &["batch", "seq", "6", "5"]);
    let axes_sets: &[&[i64]] = &[&[-1], &[1], &[0, 1], &[1, 3], &[2, 3], &[0, 1, 2, 3], &[0, 2]];
    for axes in axes_sets {
        for keepdims in [false, true] {
            let ops = [
                Op::ReduceSum { axes: axes.to_vec(), keepdims },
                Op::ReduceMean { axes: axes.to_vec(), keepdims },
                Op::ReduceMax { axes: axes.to_vec(), keepdims },
                Op::ReduceMin { axes: axes.to_vec(), keepdims },
                Op::ReduceProd { axes: axes.to_vec(), keepdims },
            ];
            for op in &ops {
                // Products stay near 1 so they neither overflow nor vanish.
                let g = if matches!(op, Op::ReduceProd { .. }) { Gen::Positive(1.0) } else { Gen::Uniform(1.0) };
                // n * max|x| with n up to 3 * 257 * 30 elements.
                runs +=
                    check(op, std::slice::from_ref(&x), B4, &Check::new().gens(&[g]).tol(1e-5, 1e-6 * 30.0 * 771.0));
                runs += check(
                    op,
                    &[ty(DType::I64, &["batch", "seq", "6", "5"])],
                    B3,
                    &Check::new().gens(&[Gen::Ints(-3, 3)]),
                );
                if !matches!(op, Op::ReduceProd { .. }) {
                    runs += check(op, &[ty(DType::I32, &["batch", "seq", "6", "5"])], B3, &Check::new());
                }
            }
        }
    }
    runs +=
        check(&Op::ReduceSum { axes: vec![], keepdims: true }, std::slice::from_ref(&x), B3, &Check::new().alias(true));
    // A long contiguous row (the vector path) with n = 2048.
    let row = ty(DType::F32, &["seq", "2048"]);
    runs += check(
        &Op::ReduceMean { axes: vec![-1], keepdims: true },
        std::slice::from_ref(&row),
        B3,
        &Check::new().tol(1e-5, 1e-6 * 2048.0),
    );
    runs += check(&Op::ReduceMax { axes: vec![-1], keepdims: false }, &[row], B3, &Check::new());
    for axis in [0, 1, -1] {
        for keepdims in [false, true] {
            for dt in [DType::F32, DType::I64, DType::I32] {
                // Few distinct values, so ties (first maximum wins) happen.
                let g = Gen::Ints(-2, 2);
                runs += check(
                    &Op::ArgMax { axis, keepdims },
                    &[ty(dt, &["batch", "seq", "7"])],
                    B4,
                    &Check::new().gens(&[g]),
                );
            }
        }
    }
    for axis in [0, 1, -1] {
        for (exclusive, reverse) in [(false, false), (true, false), (false, true), (true, true)] {
            let op = Op::CumSum { axis, exclusive, reverse };
            runs +=
                check(&op, &[ty(DType::F32, &["batch", "seq", "7"])], B4, &Check::new().tol(1e-5, 1e-6 * 257.0 * 3.0));
            runs += check(&op, &[ty(DType::I64, &["batch", "seq", "7"])], B3, &Check::new());
        }
    }
    for axis in [-1, 0, 1, 2] {
        for shape in [&["batch", "seq", "9"][..], &["batch", "3", "seq"][..]] {
            runs += check(
                &Op::Softmax { axis },
                &[ty(DType::F32, shape)],
                B4,
                &Check::new().gens(&[Gen::Uniform(10.0)]).tol(1e-5, 1e-7),
            );
        }
    }
    runs += check(
        &Op::Softmax { axis: -1 },
        &[ty(DType::F32, &["seq", "1000"])],
        B3,
        &Check::new().gens(&[Gen::Uniform(30.0)]).tol(1e-5, 1e-8),
    );
    eprintln!("reductions: {runs} runs");
}

#[test]
fn nan_and_infinity_follow_the_interpreter() {
    let mut runs = 0;
    let x = ty(DType::F32, &["batch", "seq", "9"]);
    let sp = Check::new().gens(&[Gen::Special(3.0), Gen::Special(2.0)]);
    for op in
        [Op::Relu {}, Op::Sign {}, Op::Abs {}, Op::IsNan {}, Op::IsInf {}, Op::Floor {}, Op::Sigmoid {}, Op::Tanh {}]
    {
        runs += check(&op, std::slice::from_ref(&x), B3, &sp);
    }
    for op in [Op::Max {}, Op::Min {}, Op::Add {}, Op::Mod {}, Op::Rem {}, Op::Lt {}, Op::Ne {}, Op::Eq {}] {
        runs += check(&op, &[x.clone(), ty(DType::F32, &["9"])], B3, &sp);
    }
    for to in [DType::I64, DType::I32, DType::Bool] {
        runs += check(&Op::Cast { to }, std::slice::from_ref(&x), B3, &sp);
    }
    for axes in [vec![-1], vec![1]] {
        runs += check(&Op::ReduceMax { axes: axes.clone(), keepdims: false }, std::slice::from_ref(&x), B3, &sp);
        runs += check(&Op::ReduceMin { axes, keepdims: true }, std::slice::from_ref(&x), B3, &sp);
    }
    for axis in [1, -1] {
        runs += check(&Op::ArgMax { axis, keepdims: false }, std::slice::from_ref(&x), B3, &sp);
        runs += check(&Op::Softmax { axis }, std::slice::from_ref(&x), B3, &sp);
    }
    eprintln!("nan/inf: {runs} runs");
}

/// The common cases get the fast paths: contiguous (or row-broadcast) f32
/// operands are read as f32x4 vectors, softmax over the last axis too.
#[test]
fn fast_paths_are_vectorised() {
    let text = |op: &Op, ins: &[TensorType]| {
        let refs: Vec<&TensorType> = ins.iter().collect();
        match select(op, ins, &op.infer(&refs).unwrap()).unwrap() {
            Selected::Kernel(i) => i.kernel.to_string(),
            other => panic!("not one kernel: {other:?}"),
        }
    };
    let a = ty(DType::F32, &["batch", "seq", "64"]);
    for (op, ins) in [
        (Op::Add {}, vec![a.clone(), a.clone()]),
        (Op::Mul {}, vec![a.clone(), ty(DType::F32, &["64"])]),
        (Op::Sigmoid {}, vec![a.clone()]),
        (Op::Softmax { axis: -1 }, vec![a.clone()]),
        (Op::ReduceSum { axes: vec![-1], keepdims: true }, vec![a.clone()]),
        (Op::Gather { axis: 0 }, vec![ty(DType::F32, &["100", "64"]), ty(DType::I64, &["batch", "seq"])]),
        (Op::Concat { axis: 1 }, vec![a.clone(), a.clone()]),
    ] {
        let t = text(&op, &ins);
        assert!(t.contains("vectorized(4)"), "{}: {t}", op.name());
    }
}

/// Kernels that call libm go into an object file with the functions as
/// undefined symbols, for the shared library's `-lm`.
#[test]
fn libm_calls_become_imports_in_objects() {
    let x = ty(DType::F32, &["seq", "8"]);
    let mut kernels = vec![];
    for op in [Op::Sin {}, Op::Erf {}, Op::Pow {}] {
        let ins = if matches!(op, Op::Pow {}) { vec![x.clone(), x.clone()] } else { vec![x.clone()] };
        let refs: Vec<&TensorType> = ins.iter().collect();
        if let Selected::Kernel(i) = select(&op, &ins, &op.infer(&refs).unwrap()).unwrap() {
            kernels.push(i.kernel);
        }
    }
    let obj = smelt_codegen::cranelift::emit_object(&kernels, "libm_test").unwrap();
    for sym in ["sinf", "erff", "powf"] {
        assert!(obj.windows(sym.len()).any(|w| w == sym.as_bytes()), "{sym} missing");
    }
}
