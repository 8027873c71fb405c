//! Small probes of the machine's limits, measured in the same run as a
//! benchmark (machines drift, so figures from different runs are not
//! compared): streaming read bandwidth (four streams per thread), and f32
//! FMA peak with FMAs in enough independent chains to cover the latency.
//! Both use the widest vectors the host has: 512-bit with AVX-512 (where
//! the kernels use them too, so a 256-bit probe would report half the FMA
//! peak), else 256-bit with AVX2 and FMA. On machines with neither the
//! probes fall back to portable code, whose figures are then what plain
//! Rust reaches, not the hardware's peak.

use std::time::Instant;

pub struct Machine {
    pub read_gb_s: f64,
    pub fma_gflop_s: f64,
}

/// Runs both probes on `threads` threads.
pub fn measure(threads: usize) -> Machine {
    Machine { read_gb_s: read_bandwidth(threads), fma_gflop_s: fma_peak(threads) }
}

/// Best of several passes summing a 512 MiB buffer split across threads.
fn read_bandwidth(threads: usize) -> f64 {
    let n = 128 << 20; // f32 elements: 512 MiB, far beyond any cache
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = n / threads;
    let mut best = 0.0f64;
    for _ in 0..4 {
        let start = Instant::now();
        let sums: f32 = std::thread::scope(|s| {
            let handles: Vec<_> =
                data.chunks(chunk).map(|c| s.spawn(move || sum(c))).collect::<Vec<_>>().into_iter().collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        best = best.max((n * 4) as f64 / secs / 1e9);
    }
    best
}

/// Sums `c`, read as [`STREAMS`] sequential streams at once (its quarters,
/// side by side): on the machines measured, one core kept more misses in
/// flight reading several streams than one, as the decode kernels do
/// (`templates::packed` in smelt-codegen), and a probe that reads one
/// stream per thread reported less than those kernels reached.
fn sum(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { sum_avx512(c) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        return unsafe { sum_avx2(c) };
    }
    c.iter().sum()
}

/// Sequential streams per thread of the read probe.
const STREAMS: usize = 4;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 2 * STREAMS];
    // Each stream reads `blocks` blocks of 16 floats from its own quarter.
    let blocks = c.len() / (16 * STREAMS);
    let len = blocks * 16;
    let p = c.as_ptr();
    for i in 0..blocks {
        for s in 0..STREAMS {
            for j in 0..2 {
                // SAFETY: s * len + i * 16 + j * 8 + 8 <= STREAMS * len <= c.len().
                let v = unsafe { _mm256_loadu_ps(p.add(s * len + i * 16 + j * 8)) };
                acc[2 * s + j] = _mm256_add_ps(acc[2 * s + j], v);
            }
        }
    }
    let mut total = _mm256_setzero_ps();
    for a in acc {
        total = _mm256_add_ps(total, a);
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
    out.iter().sum::<f32>() + c[STREAMS * len..].iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * STREAMS];
    // Each stream reads `blocks` blocks of 32 floats (two cache lines)
    // from its own quarter.
    let blocks = c.len() / (32 * STREAMS);
    let len = blocks * 32;
    let p = c.as_ptr();
    for i in 0..blocks {
        for s in 0..STREAMS {
            for j in 0..2 {
                // SAFETY: s * len + i * 32 + j * 16 + 16 <= STREAMS * len <= c.len().
                let v = unsafe { _mm512_loadu_ps(p.add(s * len + i * 32 + j * 16)) };
                acc[2 * s + j] = _mm512_add_ps(acc[2 * s + j], v);
            }
        }
    }
    let mut total = _mm512_setzero_ps();
    for a in acc {
        total = _mm512_add_ps(total, a);
    }
    _mm512_reduce_add_ps(total) + c[STREAMS * len..].iter().sum::<f32>()
}

/// Best of several timed runs of independent FMA chains on every thread.
fn fma_peak(threads: usize) -> f64 {
    let iters = 20_000_000u64;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let flops: f64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || fma_chains(iters))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        best = best.max(flops / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Runs the chains and returns the flops done.
fn fma_chains(iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { fma_avx512(iters) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { fma_avx2(iters) };
    }
    let mut acc = [1.0f32; 8];
    for _ in 0..iters / 8 {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (iters / 8 * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    // Twelve independent chains: two FMA ports with a latency of four cycles
    // need at least eight in flight.
    let mut acc = [_mm256_set1_ps(1.0); 12];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters / 12 {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    std::hint::black_box(acc);
    (iters / 12 * 12 * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    // Twelve independent chains, as with AVX2: two 512-bit FMA pipes with a
    // latency of four cycles need at least eight in flight.
    let mut acc = [_mm512_set1_ps(1.0); 12];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters / 12 {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    std::hint::black_box(acc);
    (iters / 12 * 12 * 16 * 2) as f64
}
