//! GEMV bandwidth baseline (a measurement, not a test): GEMV at a
//! smollm2-135m projection shape, one thread, f32 weights, JIT-compiled with
//! Cranelift; prints the weight-read bandwidth per layout and accumulator
//! count. Run with `cargo run --release -p smelt-codegen --example gemv_bandwidth`.

use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::templates::testing::rand;
use smelt_codegen::templates::*;

fn main() {
    let (k, n) = (576, 1536);
    let (x, w) = (rand(k, 1), rand(k * n, 2));
    for (layout, vecs) in [(WeightLayout::KN, 1), (WeightLayout::KN, 4), (WeightLayout::NK, 1), (WeightLayout::NK, 4)] {
        let j = JitKernel::compile(&gemv(k, n, layout, vecs).unwrap()).unwrap();
        let mut y = vec![0.0; n];
        let reps = 200;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            j.run(&mut [Arg::F32(&x), Arg::F32(&w), Arg::F32Mut(&mut y)]).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        eprintln!("{}: {:.1} us, {:.1} GB/s of weights", j.kernel().name, s * 1e6, (k * n * 4) as f64 / s / 1e9);
    }
}
