//! Every template JIT-compiled with Cranelift and run, against the KIR
//! interpreter, at odd sizes and split over simulated thread teams; plus the
//! safe wrapper's checks and object emission. Prints compile times (run
//! with `--nocapture` to see them).

use smelt_codegen::cranelift::{emit_object, Arg, JitKernel, RunError};
use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::Kernel;
use smelt_codegen::templates::testing::rand;
use smelt_codegen::templates::*;

fn interp_out(k: &Kernel, inputs: &[Vec<f32>]) -> Vec<f32> {
    let mut bufs: Vec<BufData> = inputs.iter().map(|v| BufData::F32(v.clone())).collect();
    let out = k.global_buffers().last().unwrap().1;
    bufs.push(BufData::zeros(out.elem, k.const_len(out).unwrap()));
    interp::run(k, &mut bufs, &[], Mode::Cpu { threads: 1 }).unwrap();
    bufs.pop().unwrap().f32().to_vec()
}

fn jit_out(j: &JitKernel, inputs: &[Vec<f32>], threads: usize) -> Vec<f32> {
    let k = j.kernel();
    let out_len = k.const_len(k.global_buffers().last().unwrap().1).unwrap();
    let mut out = vec![f32::NAN; out_len];
    for t in 0..threads {
        let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::F32(v)).collect();
        args.push(Arg::F32Mut(&mut out));
        j.run_part(&mut args, &[], t, threads).unwrap();
    }
    out
}

/// Compiles `k`, runs it whole and as teams of 2 and 3, and compares with
/// the interpreter: |got - want| <= 1e-5 * |want| + atol.
fn check(k: &Kernel, inputs: &[Vec<f32>], atol: f32, times: &mut Vec<(String, f64, f64)>) {
    let j = JitKernel::compile(k).unwrap_or_else(|e| panic!("{e}\n{k}"));
    times.push((k.name.clone(), j.compile_time.as_secs_f64() * 1e3, j.codegen_time.as_secs_f64() * 1e3));
    let want = interp_out(k, inputs);
    for threads in [1, 2, 3] {
        let got = jit_out(&j, inputs, threads);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs() + atol,
                "{}: {threads} threads: element {i}: jit {g}, interpreter {w}",
                k.name
            );
        }
    }
}

/// Mean and maximum of the total compile time and of the codegen part.
fn report(what: &str, times: &[(String, f64, f64)]) {
    let n = times.len() as f64;
    let mean = |f: fn(&(String, f64, f64)) -> f64| times.iter().map(f).sum::<f64>() / n;
    let max = |f: fn(&(String, f64, f64)) -> f64| times.iter().map(f).fold(0.0, f64::max);
    eprintln!(
        "{what}: {} kernels; per kernel total mean {:.2} ms (max {:.2}), codegen mean {:.2} ms (max {:.2})",
        times.len(),
        mean(|t| t.1),
        max(|t| t.1),
        mean(|t| t.2),
        max(|t| t.2)
    );
}

const SIZES: [usize; 5] = [1, 3, 17, 64, 129];

#[test]
fn elementwise_matches_interpreter() {
    let mut times = vec![];
    let unary_ops = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Relu,
        UnaryOp::Sigmoid,
    ];
    for op in unary_ops {
        for n in SIZES {
            let positive = matches!(op, UnaryOp::Sqrt | UnaryOp::Rsqrt);
            // Wide inputs exercise exp's clamps and both tanh branches.
            let x: Vec<f32> = rand(n, 1).into_iter().map(|v| if positive { v + 1.5 } else { v * 12.0 }).collect();
            check(&unary(op, n, 1).unwrap(), &[x], 1e-6, &mut times);
        }
    }
    // Exp over its whole range, including the clamps and underflow.
    let x: Vec<f32> = (0..401).map(|i| -100.0 + i as f32 * 0.47).collect();
    check(&unary(UnaryOp::Exp, 401, 1).unwrap(), std::slice::from_ref(&x), 1e-30, &mut times);
    let t: Vec<f32> = (0..401).map(|i| -10.0 + i as f32 * 0.05).collect();
    check(&unary(UnaryOp::Tanh, 401, 1).unwrap(), &[t], 1e-7, &mut times);
    let binary_ops = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min];
    for op in binary_ops {
        for cols in SIZES {
            for bcast in [Bcast::Full, Bcast::Row, Bcast::Col, Bcast::Scalar] {
                let rows = 3;
                let blen = match bcast {
                    Bcast::Full => rows * cols,
                    Bcast::Row => cols,
                    Bcast::Col => rows,
                    Bcast::Scalar => 1,
                };
                let b: Vec<f32> = rand(blen, 3).into_iter().map(|v| v + 2.0).collect();
                check(&binary(op, rows, cols, bcast).unwrap(), &[rand(rows * cols, 2), b], 1e-6, &mut times);
            }
        }
    }
    report("elementwise", &times);
}

#[test]
fn rows_kernels_match_interpreter() {
    let mut times = vec![];
    for n in SIZES {
        check(&rms_norm(5, n, 1e-5).unwrap(), &[rand(5 * n, 4), rand(n, 5)], 1e-6, &mut times);
    }
    report("rms_norm", &times);
    let mut times = vec![];
    for n in SIZES {
        let x: Vec<f32> = rand(4 * n, 6).into_iter().map(|v| v * 10.0).collect();
        check(&softmax(4, n).unwrap(), &[x], 1e-7, &mut times);
    }
    report("softmax", &times);
}

#[test]
fn matmuls_match_interpreter() {
    let mut times = vec![];
    for k in SIZES {
        for n in SIZES {
            for (layout, vecs) in
                [(WeightLayout::KN, 1), (WeightLayout::KN, 4), (WeightLayout::NK, 1), (WeightLayout::NK, 4)]
            {
                check(&gemv(k, n, layout, vecs).unwrap(), &[rand(k, 7), rand(k * n, 8)], 1e-5, &mut times);
            }
        }
    }
    report("gemv", &times);
    let mut times = vec![];
    for (m, k, n) in [(1, 1, 1), (3, 17, 5), (7, 33, 129), (17, 64, 17), (64, 64, 64)] {
        for p in [GemmParams::default(), GemmParams { mr: 3, nv: 3 }] {
            check(&gemm(m, k, n, p).unwrap(), &[rand(m * k, 9), rand(k * n, 10)], 1e-5, &mut times);
        }
    }
    report("gemm", &times);
}

#[test]
fn wrapper_rejects_bad_buffers() {
    let j = JitKernel::compile(&rms_norm(2, 3, 1e-5).unwrap()).unwrap();
    let (x, w) = (vec![1.0; 6], vec![1.0; 3]);
    let mut y = vec![0.0; 6];
    let err = j.run(&mut [Arg::F32(&x), Arg::F32(&w)]).unwrap_err();
    assert!(matches!(err, RunError::Count { expected: 3, found: 2, .. }), "{err}");
    let short = vec![1.0; 5];
    let err = j.run(&mut [Arg::F32(&short), Arg::F32(&w), Arg::F32Mut(&mut y)]).unwrap_err();
    assert_eq!(err.to_string(), "kernel `rms_norm_2x3`: buffer `x` expects F32[6], found F32[5]");
    let y2 = vec![0.0; 6];
    let err = j.run(&mut [Arg::F32(&x), Arg::F32(&w), Arg::F32(&y2)]).unwrap_err();
    assert_eq!(err.to_string(), "kernel `rms_norm_2x3`: buffer `y` expects writable F32[6], found F32[6]");
    let ints = vec![1i64; 3];
    let err = j.run(&mut [Arg::F32(&x), Arg::I64(&ints), Arg::F32Mut(&mut y)]).unwrap_err();
    assert!(matches!(err, RunError::Buffer { .. }), "{err}");
    assert!(matches!(j.run_part(&mut [], &[], 2, 2).unwrap_err(), RunError::Threads { .. }));
    j.run(&mut [Arg::F32(&x), Arg::F32(&w), Arg::F32Mut(&mut y)]).unwrap();
    assert!((y[0] - 1.0).abs() < 1e-5);
}

#[test]
fn fma_is_enabled_when_the_host_has_it() {
    let j = JitKernel::compile(&gemv(4, 4, WeightLayout::KN, 1).unwrap()).unwrap();
    eprintln!("isa: {:?}", j.isa);
    if std::is_x86_feature_detected!("fma") {
        assert!(j.isa.has_fma);
    }
}

#[test]
fn emits_a_shared_library_object() {
    let kernels =
        [rms_norm(2, 17, 1e-5).unwrap(), softmax(2, 17).unwrap(), gemm(5, 7, 9, GemmParams::default()).unwrap()];
    let obj = emit_object(&kernels, "smelt_kernels").unwrap();
    assert_eq!(&obj[..4], b"\x7fELF");
    // For trying the object by hand (`cc -shared`, then load it).
    if let Ok(path) = std::env::var("SMELT_WRITE_OBJECT") {
        std::fs::write(path, &obj).unwrap();
    }
    for k in &kernels {
        let sym = format!("smelt_{}", k.name);
        assert!(obj.windows(sym.len()).any(|w| w == sym.as_bytes()), "{sym} missing");
    }
}

/// A kernel whose buffer lengths depend on a scalar parameter runs for any
/// value of it, and the wrapper checks the lengths that value implies.
#[test]
fn symbolic_lengths_are_checked_per_call() {
    use smelt_codegen::kir::{Builder, Expr, LoopKind};
    let mut b = Builder::new("double_rows");
    let n = b.scalar_param("n");
    let len = n.clone() * Expr::idx(3);
    let x = b.input("x", len.clone());
    let y = b.output("y", len.clone());
    b.for_("i", Expr::idx(0), len, 1, LoopKind::Parallel, |b, i| {
        b.store(y, i.clone(), Expr::load(x, i, 1) * Expr::f32(2.0))
    });
    let k = b.finish().unwrap();
    let j = JitKernel::compile(&k).unwrap();
    for rows in [1usize, 5, 257] {
        let xs = rand(rows * 3, rows as u64);
        let mut out = vec![0.0; rows * 3];
        for t in 0..2 {
            j.run_part(&mut [Arg::F32(&xs), Arg::F32Mut(&mut out)], &[rows as i64], t, 2).unwrap();
        }
        assert!(out.iter().zip(&xs).all(|(o, x)| *o == 2.0 * x), "rows {rows}");
        let mut bufs = vec![BufData::F32(xs.clone()), BufData::zeros(smelt_codegen::kir::Scalar::F32, rows * 3)];
        interp::run(&k, &mut bufs, &[rows as i64], Mode::Cpu { threads: 1 }).unwrap();
        assert_eq!(bufs[1].f32(), &out[..]);
    }
    let xs = rand(6, 0);
    let mut out = vec![0.0; 6];
    let err = j.run_part(&mut [Arg::F32(&xs), Arg::F32Mut(&mut out)], &[3], 0, 1).unwrap_err();
    assert!(matches!(err, RunError::Buffer { .. }), "{err}");
    let err = j.run_part(&mut [Arg::F32(&xs), Arg::F32Mut(&mut out)], &[-2], 0, 1).unwrap_err();
    assert!(err.to_string().contains("negative"), "{err}");
    let err = j.run_part(&mut [Arg::F32(&xs), Arg::F32Mut(&mut out)], &[], 0, 1).unwrap_err();
    assert!(matches!(err, RunError::Scalars { expected: 1, found: 0, .. }), "{err}");
}

/// `y[i] = x[i]` over `n` elements from an `from` buffer into a `to` buffer,
/// in 4-lane steps and a scalar tail, so both widths of narrow loads and
/// stores are exercised.
fn convert_kernel(from: smelt_codegen::kir::Scalar, to: smelt_codegen::kir::Scalar, n: usize) -> Kernel {
    use smelt_codegen::kir::{Access, Builder, Expr, LoopKind, Space};
    let mut b = Builder::new(&format!("convert_{from:?}_{to:?}_{n}"));
    let x = b.buffer("x", from, n, Space::Global, Access::Read);
    let y = b.buffer("y", to, n, Space::Global, Access::Write);
    let full = n / 4;
    b.for_("t", Expr::idx(0), Expr::idx(full + n % 4), 1, LoopKind::Parallel, |b, t| {
        b.if_(
            t.clone().lt(Expr::idx(full)),
            |b| {
                let i = b.let_("i", t.clone() * Expr::idx(4));
                b.store(y, Expr::Var(i), Expr::load(x, Expr::Var(i), 4));
            },
            |b| {
                let i = b.let_("i", t.clone() + Expr::idx(full * 3));
                b.store(y, Expr::Var(i), Expr::load(x, Expr::Var(i), 1));
            },
        );
    });
    b.finish().unwrap()
}

/// `y` = the `n` (even) elements of `x` deinterleaved by pair loads: each
/// block of 8 is its even elements then its odd ones (4-lane loads), and
/// each pair left over is its even element then its odd one (scalars).
fn pairs_kernel(from: smelt_codegen::kir::Scalar, n: usize) -> Kernel {
    use smelt_codegen::kir::{Access, Builder, Expr, LoopKind, Pick, Space};
    let mut b = Builder::new(&format!("pairs_{from:?}_{n}"));
    let x = b.buffer("x", from, n, Space::Global, Access::Read);
    let y = b.output("y", n);
    let full = n / 8;
    b.for_("t", Expr::idx(0), Expr::idx(full + n % 8 / 2), 1, LoopKind::Parallel, |b, t| {
        b.if_(
            t.clone().lt(Expr::idx(full)),
            |b| {
                let i = b.let_("i", t.clone() * Expr::idx(8));
                b.store(y, Expr::Var(i), Expr::load_pick(x, Expr::Var(i), 4, Pick::Even));
                b.store(y, Expr::Var(i) + Expr::idx(4), Expr::load_pick(x, Expr::Var(i), 4, Pick::Odd));
            },
            |b| {
                let i = b.let_("i", (t.clone() - Expr::idx(full)) * Expr::idx(2) + Expr::idx(full * 8));
                b.store(y, Expr::Var(i), Expr::load_pick(x, Expr::Var(i), 1, Pick::Even));
                b.store(y, Expr::Var(i) + Expr::idx(1), Expr::load_pick(x, Expr::Var(i), 1, Pick::Odd));
            },
        );
    });
    b.finish().unwrap()
}

/// Bit patterns are equal, or both are NaN (the lowering keeps a NaN's
/// payload but does not quiet it on loads, as the `half` crate does).
fn same_bits(what: &str, i: usize, got: u32, want: u32, nan: bool) {
    assert!(got == want || nan, "{what}: element {i}: jit {got:#010x}, interpreter {want:#010x}");
}

/// Every bf16 and f16 bit pattern loads (as 4 lanes and as scalars) to the
/// f32 the interpreter gives (`half`'s exact widening), on teams of 1 and 3.
#[test]
fn narrow_loads_match_interpreter_for_every_bit_pattern() {
    use smelt_codegen::kir::Scalar;
    // 65536 patterns and 3 more, so the scalar tail runs too.
    let bits: Vec<u16> = (0..=u16::MAX).chain([0x7f80, 0x3c00, 0x8001]).collect();
    for elem in [Scalar::BF16, Scalar::F16] {
        jit_widens_like_the_interpreter(&convert_kernel(elem, Scalar::F32, bits.len()), elem, &bits);
    }
}

/// Runs `k` (a 16-bit float buffer of `bits` in, f32 out) in the
/// interpreter and JIT-compiled on teams of 1 and 3, asserts the results
/// bit for bit, and returns the interpreter's.
fn jit_widens_like_the_interpreter(k: &Kernel, elem: smelt_codegen::kir::Scalar, bits: &[u16]) -> Vec<f32> {
    use smelt_codegen::kir::Scalar;
    let n = bits.len();
    let j = JitKernel::compile(k).unwrap_or_else(|e| panic!("{e}\n{k}"));
    let data = match elem {
        Scalar::BF16 => BufData::BF16(bits.iter().map(|&b| half::bf16::from_bits(b)).collect()),
        _ => BufData::F16(bits.iter().map(|&b| half::f16::from_bits(b)).collect()),
    };
    let mut bufs = vec![data.clone(), BufData::zeros(Scalar::F32, n)];
    interp::run(k, &mut bufs, &[], Mode::Cpu { threads: 1 }).unwrap();
    let want = bufs[1].f32().to_vec();
    for threads in [1, 3] {
        let mut got = vec![0.0f32; n];
        for t in 0..threads {
            let x = match &data {
                BufData::BF16(v) => Arg::BF16(v),
                BufData::F16(v) => Arg::F16(v),
                _ => unreachable!(),
            };
            j.run_part(&mut [x, Arg::F32Mut(&mut got)], &[], t, threads).unwrap();
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            same_bits(&k.name, i, g.to_bits(), w.to_bits(), g.is_nan() && w.is_nan());
        }
    }
    want
}

/// Every bf16 and f16 bit pattern, loaded as the even and odd halves of
/// pairs (4 lanes and scalars), gives the f32 the interpreter gives, in
/// the interpreter's order.
#[test]
fn pair_loads_match_interpreter_for_every_bit_pattern() {
    use smelt_codegen::kir::Scalar;
    // 65536 patterns and 6 more, so the scalar pairs run too.
    let bits: Vec<u16> = (0..=u16::MAX).chain([0x7f80, 0x3c00, 0x8001, 0x0001, 0xffff, 0x4000]).collect();
    for elem in [Scalar::BF16, Scalar::F16] {
        let want = jit_widens_like_the_interpreter(&pairs_kernel(elem, bits.len()), elem, &bits);
        // The interpreter's order: block 0's even elements, then its odd ones.
        let widen = |b: u16| match elem {
            Scalar::BF16 => half::bf16::from_bits(b).to_f32(),
            _ => half::f16::from_bits(b).to_f32(),
        };
        assert_eq!((want[1], want[4]), (widen(2), widen(1)), "{elem:?}: y[1] is x[2], y[4] is x[1]");
    }
}

/// `y[4t..4t + 4]` = the lane sums of the 4 vectors in `x[16t..16t + 16]`.
fn hsums_kernel(blocks: usize) -> Kernel {
    use smelt_codegen::kir::{Builder, Expr, LoopKind};
    let mut b = Builder::new("hsums");
    let x = b.input("x", Expr::idx(16 * blocks));
    let y = b.output("y", Expr::idx(4 * blocks));
    b.for_("t", Expr::idx(0), Expr::idx(blocks), 1, LoopKind::Parallel, |b, t| {
        let vs = (0..4).map(|i| Expr::load(x, t.clone() * Expr::idx(16) + Expr::idx(4 * i), 4)).collect();
        b.store(y, t * Expr::idx(4), Expr::HSums(vs));
    });
    b.finish().unwrap()
}

/// Lane sums: the JIT adds in the interpreter's order (bit for bit), and
/// that order is `kir::hsums`'s (checked against plain sums too).
#[test]
fn lane_sums_match_the_interpreter() {
    let blocks = 37;
    let k = hsums_kernel(blocks);
    let x: Vec<f32> = (0..16 * blocks).map(|i| ((i * 7919) % 1000) as f32 * 0.37 - 150.0).collect();
    let want = interp_out(&k, std::slice::from_ref(&x));
    let j = JitKernel::compile(&k).unwrap_or_else(|e| panic!("{e}\n{k}"));
    for threads in [1, 3] {
        let got = jit_out(&j, std::slice::from_ref(&x), threads);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            same_bits("hsums", i, g.to_bits(), w.to_bits(), false);
        }
    }
    for (i, w) in want.iter().enumerate() {
        let plain: f32 = x[4 * i..4 * i + 4].iter().sum();
        assert!((w - plain).abs() <= 1e-4 * plain.abs().max(1.0), "sum {i}: {w} against {plain}");
    }
}

/// f32 values stored into bf16 and f16 buffers round to nearest even as
/// the `half` crate (the interpreter) rounds, bit for bit: ties both ways,
/// overflow to infinity, f16 subnormals and underflow to zero, signed
/// zeros, infinities and NaNs (which stay NaN, quieted, payload truncated).
#[test]
fn narrow_stores_round_like_the_interpreter() {
    use smelt_codegen::kir::Scalar;
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN, low payload
        f32::from_bits(0xffa0_1234),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),  // smallest subnormal
        65504.0,            // f16 max
        65519.99,           // rounds down to f16 max
        65520.0,            // rounds up to infinity in f16
        6.1035156e-5,       // f16 min normal
        5.9604645e-8,       // f16 min subnormal
        2.9802322e-8,       // half of it: ties to even (zero)
        2.9802326e-8,       // just above: rounds up
        1.0 + 1.0 / 256.0,  // bf16 tie, to even (down)
        1.0 + 3.0 / 256.0,  // bf16 tie, to even (up)
        1.0 + 1.0 / 2048.0, // f16 tie
        1.0 + 3.0 / 2048.0,
        f32::from_bits(0x7f7f_ffff), // bf16 overflow to infinity
    ];
    // Random bit patterns over every exponent, and values around f16's range.
    let mut s = 0x1234_5678u64;
    for i in 0..40_000 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = (s >> 32) as u32;
        xs.push(if i % 2 == 0 { f32::from_bits(r) } else { f32::from_bits(0x3000_0000 + r % 0x1800_0000) });
    }
    xs.extend([3.0, -7.25, 1e-3]); // a length that is not a multiple of 4
    let n = xs.len();
    for elem in [Scalar::BF16, Scalar::F16] {
        let k = convert_kernel(Scalar::F32, elem, n);
        let j = JitKernel::compile(&k).unwrap_or_else(|e| panic!("{e}\n{k}"));
        let mut bufs = vec![BufData::F32(xs.clone()), BufData::zeros(elem, n)];
        interp::run(&k, &mut bufs, &[], Mode::Cpu { threads: 1 }).unwrap();
        let want: Vec<u16> = match &bufs[1] {
            BufData::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
            BufData::F16(v) => v.iter().map(|x| x.to_bits()).collect(),
            _ => unreachable!(),
        };
        for threads in [1, 2] {
            let got: Vec<u16> = match elem {
                Scalar::BF16 => {
                    let mut out = vec![half::bf16::ZERO; n];
                    for t in 0..threads {
                        j.run_part(&mut [Arg::F32(&xs), Arg::BF16Mut(&mut out)], &[], t, threads).unwrap();
                    }
                    out.iter().map(|x| x.to_bits()).collect()
                }
                _ => {
                    let mut out = vec![half::f16::ZERO; n];
                    for t in 0..threads {
                        j.run_part(&mut [Arg::F32(&xs), Arg::F16Mut(&mut out)], &[], t, threads).unwrap();
                    }
                    out.iter().map(|x| x.to_bits()).collect()
                }
            };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                same_bits(&format!("{} (x = {:e})", k.name, xs[i]), i, *g as u32, *w as u32, false);
            }
        }
    }
}
