//! Weight-matmul benchmark (a measurement, not a test): the smollm2-135m
//! projection shapes (hidden 576, intermediate 1536, vocab 49152, 30
//! layers), JIT-compiled with Cranelift and run as a team of OS threads
//! through `JitKernel::run_part`, with a barrier after every kernel as the
//! runtime's team has.
//!
//! Compares the packed-panel kernels (`select::weight_matmul`,
//! `select::weight_gated_mlp`) with the `[n, k]` kernels they replace
//! (`select::matmul_weight_nk`, `select::gated_mlp_weight_nk`):
//! - decode: one token through every layer's weights and the lm_head, each
//!   layer with its own weights (538 MB, far beyond the L3 cache), so the
//!   GB/s are DRAM read bandwidth;
//! - prefill: each shape at `m` rows, GFLOP/s (2 flops per multiply-add;
//!   the gated MLP counts both products).
//!
//! `cargo run --release -p smelt-codegen --example weight_matmul -- [threads] [layers] [m]`
//! (defaults 2, 30, 128). `SMELT_BENCH_WEIGHTS=bf16` (or `f16`) stores the
//! weights narrow, as `smelt compile --weight-dtype` does.

use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::kir::Scalar;
use smelt_codegen::select::{gated_mlp_weight_nk, matmul_weight_nk, weight_gated_mlp, weight_matmul, Instance};
use smelt_codegen::templates::testing::rand;
use smelt_ir::{DType, Dim, TensorType};
use std::sync::Barrier;
use std::time::Instant;

const HIDDEN: usize = 576;
const INTER: usize = 1536;
const QKV: usize = 960;
const VOCAB: usize = 49152;

/// One weight product: its kernel, `n`, `k`, and whether it is gated.
struct Shape {
    name: &'static str,
    n: usize,
    k: usize,
    gated: bool,
}

const SHAPES: [Shape; 5] = [
    Shape { name: "qkv", n: QKV, k: HIDDEN, gated: false },
    Shape { name: "o_proj", n: HIDDEN, k: HIDDEN, gated: false },
    Shape { name: "gated_mlp", n: INTER, k: HIDDEN, gated: true },
    Shape { name: "down", n: HIDDEN, k: INTER, gated: false },
    Shape { name: "lm_head", n: VOCAB, k: HIDDEN, gated: false },
];

/// A weight in the type the kernels read.
enum Weight {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl Weight {
    fn new(elem: Scalar, v: Vec<f32>) -> Weight {
        match elem {
            Scalar::BF16 => Weight::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
            Scalar::F16 => Weight::F16(v.into_iter().map(half::f16::from_f32).collect()),
            _ => Weight::F32(v),
        }
    }

    fn arg(&self) -> Arg<'_> {
        match self {
            Weight::F32(v) => Arg::F32(v),
            Weight::BF16(v) => Arg::BF16(v),
            Weight::F16(v) => Arg::F16(v),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: plain numbers, viewed as their bytes.
        unsafe {
            match self {
                Weight::F32(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4),
                Weight::BF16(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2),
                Weight::F16(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2),
            }
        }
    }
}

/// A compiled kernel with its weights already in the layout it reads.
struct Launch<'a> {
    j: &'a JitKernel,
    scalars: Vec<i64>,
    weights: Vec<&'a Weight>,
    x: &'a [f32],
    out: *mut f32,
    out_len: usize,
}

/// Raw pointers to the launches, shared by the team: each thread writes
/// only its own part of every output (the kernels' parallel split).
struct Team<'a>(Vec<Launch<'a>>);
// SAFETY: the output pointers are written by disjoint threads at disjoint
// elements (kernel contract), and everything else is read-only.
unsafe impl Sync for Team<'_> {}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    /// libc's, which std links on Linux.
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// Nanoseconds the calling thread has run on a CPU
/// (`CLOCK_THREAD_CPUTIME_ID`, exact, unlike schedstat's tick-granular sum).
fn thread_cpu_ns() -> u64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
}

/// Timings of [`run_team`], in seconds per rep.
struct Timing {
    /// The fastest rep, wall clock.
    wall: f64,
    /// The fastest rep by CPU time of its slowest thread: what an unloaded
    /// machine would take. This machine is shared, and a preempted thread
    /// stalls its partner at the next barrier, so wall times overstate.
    cpu: f64,
}

/// Runs the team's launches `reps` times on `threads` threads, with a
/// barrier after each launch as the runtime's team has.
fn run_team(team: &Team, threads: usize, reps: usize) -> Timing {
    let barrier = Barrier::new(threads);
    let per_thread: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let (mut walls, mut cpus) = (vec![], vec![]);
                    for _ in 0..reps {
                        barrier.wait();
                        let (w0, c0) = (Instant::now(), thread_cpu_ns());
                        for l in &team.0 {
                            // SAFETY: see `Team`; the slice outlives the scope.
                            let out = unsafe { std::slice::from_raw_parts_mut(l.out, l.out_len) };
                            let mut args: Vec<Arg> = vec![Arg::F32(l.x)];
                            args.extend(l.weights.iter().map(|w| w.arg()));
                            args.push(Arg::F32Mut(out));
                            l.j.run_part(&mut args, &l.scalars, t, threads).unwrap();
                            barrier.wait();
                        }
                        walls.push(w0.elapsed().as_secs_f64());
                        cpus.push((thread_cpu_ns() - c0) as f64 * 1e-9);
                    }
                    (walls, cpus)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = per_thread[0].0.iter().copied().fold(f64::INFINITY, f64::min);
    let cpu = (0..reps).map(|r| per_thread.iter().map(|(_, c)| c[r]).fold(0.0, f64::max)).fold(f64::INFINITY, f64::min);
    Timing { wall, cpu }
}

/// The memory bandwidth this machine gives right now: every weight of the
/// team's launches read once, each thread summing its half of each buffer
/// as integers (which the compiler vectorises), timed like [`run_team`].
fn read_bandwidth(team: &Team, threads: usize, reps: usize) -> Timing {
    let per_thread: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let (mut walls, mut cpus) = (vec![], vec![]);
                    let mut sink = 0u32;
                    for _ in 0..reps {
                        let (w0, c0) = (Instant::now(), thread_cpu_ns());
                        for l in &team.0 {
                            for w in &l.weights {
                                // SAFETY: any bytes are valid u32s.
                                let (_, w, _) = unsafe { w.bytes().align_to::<u32>() };
                                let part = w.len().div_ceil(threads);
                                let mine = &w[(t * part).min(w.len())..((t + 1) * part).min(w.len())];
                                let mut acc = [0u32; 16];
                                for c in mine.chunks_exact(16) {
                                    for (a, x) in acc.iter_mut().zip(c) {
                                        *a = a.wrapping_add(*x);
                                    }
                                }
                                sink = acc.iter().fold(sink, |s, a| s.wrapping_add(*a));
                            }
                        }
                        walls.push(w0.elapsed().as_secs_f64());
                        cpus.push((thread_cpu_ns() - c0) as f64 * 1e-9);
                    }
                    std::hint::black_box(sink);
                    (walls, cpus)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = per_thread.iter().flat_map(|(w, _)| w.iter().copied()).fold(f64::INFINITY, f64::min);
    let cpu = (0..reps).map(|r| per_thread.iter().map(|(_, c)| c[r]).fold(0.0, f64::max)).fold(f64::INFINITY, f64::min);
    Timing { wall, cpu }
}

/// The instance and packed weights (`layers` copies) of one shape.
fn build(s: &Shape, packed: bool, m_dim: &Dim, layers: usize, elem: Scalar) -> (Instance, Vec<Vec<Weight>>) {
    let x = TensorType::new(DType::F32, vec![m_dim.clone(), Dim::c(s.k as i64)]);
    let wdtype = match elem {
        Scalar::BF16 => DType::BF16,
        Scalar::F16 => DType::F16,
        _ => DType::F32,
    };
    let w = TensorType::new(wdtype, vec![Dim::c(s.n as i64), Dim::c(s.k as i64)]);
    let nw = if s.gated { 2 } else { 1 };
    let (inst, packs) = if packed {
        let wk = if s.gated { weight_gated_mlp(&x, s.n, s.k, "silu", elem) } else { weight_matmul(&x, s.n, s.k, elem) }
            .unwrap();
        (wk.instance, Some(wk.packs))
    } else {
        let i = if s.gated { gated_mlp_weight_nk(&x, &w, &w, "silu") } else { matmul_weight_nk(&x, &w) }.unwrap();
        (i, None)
    };
    let weights = (0..layers)
        .map(|l| {
            (0..nw)
                .map(|i| {
                    let raw = rand(s.n * s.k, (l * 7 + i + 1) as u64);
                    Weight::new(
                        elem,
                        match &packs {
                            Some(p) => p[i].apply(&raw, s.n, s.k),
                            None => raw,
                        },
                    )
                })
                .collect()
        })
        .collect();
    (inst, weights)
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numeric arguments")).collect();
    let threads = args.first().copied().unwrap_or(2);
    let layers = args.get(1).copied().unwrap_or(30);
    let m = args.get(2).copied().unwrap_or(128);
    let seq = Dim::sym("seq");
    eprintln!("threads {threads}, layers {layers}, prefill rows {m}");
    // `SMELT_BENCH_ONLY=packed|gemm` narrows the run for quick comparisons.
    let only = std::env::var("SMELT_BENCH_ONLY").unwrap_or_default();
    let variants: &[bool] = if only.is_empty() { &[false, true] } else { &[true] };
    let elem = match std::env::var("SMELT_BENCH_WEIGHTS").as_deref() {
        Ok("bf16") => Scalar::BF16,
        Ok("f16") => Scalar::F16,
        _ => Scalar::F32,
    };
    eprintln!("weights stored as {elem:?}");
    for &packed in variants {
        let kind = if packed { "packed panels" } else { "[n, k] (before)" };
        // Decode: every layer's own weights, one token.
        let built: Vec<(Instance, Vec<Vec<Weight>>)> =
            SHAPES.iter().map(|s| build(s, packed, &seq, if s.name == "lm_head" { 1 } else { layers }, elem)).collect();
        let jits: Vec<JitKernel> = built.iter().map(|(i, _)| JitKernel::compile(&i.kernel).unwrap()).collect();
        let xs: Vec<Vec<f32>> = SHAPES.iter().map(|s| rand(m * s.k, 99)).collect();
        let mut outs: Vec<Vec<f32>> = SHAPES.iter().map(|s| vec![0.0; m * s.n]).collect();
        let out_ptrs: Vec<*mut f32> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        let launch = |si: usize, layer: usize, rows: usize| Launch {
            j: &jits[si],
            scalars: vec![rows as i64],
            weights: built[si].1[layer].iter().collect(),
            x: &xs[si][..rows * SHAPES[si].k],
            out: out_ptrs[si],
            out_len: rows * SHAPES[si].n,
        };
        if only != "gemm" {
            let mut decode = vec![];
            let mut bytes = 0usize;
            for layer in 0..layers {
                for (si, (_, weights)) in built.iter().enumerate().take(4) {
                    decode.push(launch(si, layer, 1));
                    bytes += weights[layer].iter().map(|w| w.bytes().len()).sum::<usize>();
                }
            }
            decode.push(launch(4, 0, 1));
            bytes += built[4].1[0][0].bytes().len();
            let team = Team(decode);
            run_team(&team, threads, 1);
            let t = run_team(&team, threads, 7);
            eprintln!(
            "{kind}: decode 1 token ({:.0} MB of weights): cpu {:.1} ms = {:.1} GB/s; best wall {:.1} ms = {:.1} GB/s",
            bytes as f64 / 1e6,
            t.cpu * 1e3,
            bytes as f64 / t.cpu / 1e9,
            t.wall * 1e3,
            bytes as f64 / t.wall / 1e9
        );
            if packed {
                let t = read_bandwidth(&team, threads, 7);
                eprintln!(
                    "reference: plain Rust read of the same weights: cpu {:.1} ms = {:.1} GB/s; best wall {:.1} ms = {:.1} GB/s",
                    t.cpu * 1e3,
                    bytes as f64 / t.cpu / 1e9,
                    t.wall * 1e3,
                    bytes as f64 / t.wall / 1e9
                );
            }
            // Each shape alone at one row, weights of one layer (L2/L3-warm).
            for (si, s) in SHAPES.iter().enumerate() {
                let team = Team(vec![launch(si, 0, 1)]);
                run_team(&team, threads, 3);
                let t = run_team(&team, threads, 50);
                let wb: usize = built[si].1[0].iter().map(|w| w.bytes().len()).sum();
                let gbs = |t: f64| wb as f64 / t / 1e9;
                eprintln!(
                    "  gemv {:9} 1x{}x{}: cpu {:8.1} us = {:6.1} GB/s; wall {:8.1} us (cache-warm)",
                    s.name,
                    s.k,
                    s.n,
                    t.cpu * 1e6,
                    gbs(t.cpu),
                    t.wall * 1e6
                );
            }
        }
        // Prefill: each shape at `m` rows.
        let mut flops_total = 0.0;
        let mut time_total = 0.0;
        for (si, s) in SHAPES.iter().enumerate() {
            let team = Team(vec![launch(si, 0, m)]);
            run_team(&team, threads, 1);
            let reps = if !packed {
                3
            } else if only == "gemm" {
                30
            } else {
                9
            };
            let tm = run_team(&team, threads, reps);
            let t = tm.cpu;
            let flops = 2.0 * (m * s.n * s.k) as f64 * if s.gated { 2.0 } else { 1.0 };
            let per_model = if s.name == "lm_head" { 1.0 } else { layers as f64 };
            flops_total += flops * per_model;
            time_total += t * per_model;
            eprintln!(
                "  gemm {:9} {m}x{}x{}: cpu {:8.2} ms = {:6.1} GFLOP/s; wall {:8.2} ms = {:6.1} GFLOP/s",
                s.name,
                s.k,
                s.n,
                t * 1e3,
                flops / t / 1e9,
                tm.wall * 1e3,
                flops / tm.wall / 1e9
            );
        }
        eprintln!(
            "{kind}: prefill {m} tokens, weight products only (cpu): {:.0} ms, {:.1} GFLOP/s",
            time_total * 1e3,
            flops_total / time_total / 1e9
        );
    }
}
