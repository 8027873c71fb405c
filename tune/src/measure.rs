//! Running one kernel variant in this process: built from its site,
//! lowered (Cranelift JIT, or LLVM into a shared library when the build
//! has it), checked against the reference interpreter on random inputs,
//! then timed by a [`Timer`] on the runtime's own thread team.
//!
//! Timing is meant to match what a model run sees:
//! - the kernel runs on `threads` threads of a `smelt_runtime` [`Team`],
//!   with the team's barrier after every call, as the runtime runs a plan;
//! - the inputs, weights and outputs are rotated through enough copies to
//!   exceed the last-level cache four times over (at least 128 MiB), so a
//!   memory-bound kernel (a decode GEMV) is timed from memory, as it is in
//!   a model whose weights do not fit in the cache;
//! - each call is timed alone (a run of the team of its own) after a sweep
//!   over [`SPACER_BYTES`] of other memory, as in a model other kernels'
//!   streams run between two calls of one kernel. Timed back to back, the
//!   hardware prefetchers stayed trained on the kernel's own streams, and
//!   decode variants without software prefetch looked as fast as the
//!   default or faster (smollm2-135m's qkv product 1.14x in a tune) where
//!   in the model they were slower (decode 1.6% slower with that record);
//!   after a sweep, the same pair times about 4% slower alone as well
//!   (BENCHMARKS.md, 2026-11-30);
//! - [`WallTimer`] warms up, then takes the median of several samples, each
//!   long enough (a few milliseconds) for the clock's resolution, or
//!   [`MAX_SPACED_CALLS`] calls.
//!
//! A variant whose result differs from the reference is [`Outcome::Wrong`]:
//! it is reported and never timed or stored.

use std::collections::BTreeMap;
use std::time::Instant;

use smelt_codegen::cranelift::JitKernel;
use smelt_codegen::kir::{Access, Kernel, Scalar};
use smelt_codegen::select::Packing;
use smelt_codegen::tuning::{Built, Lowering, Site, Variant};
use smelt_ir::{DType, Op, Tensor};
use smelt_runtime::native::Team;

use crate::TuneError;

/// How a variant's run time is measured: the real clock, or (in tests) a
/// deterministic function of the variant.
pub trait Timer {
    /// Seconds per call of `variant` of `site` with `m` rows. `run(calls)`
    /// returns the wall seconds `calls` calls take (on the CPU: up to
    /// `MAX_SPACED_CALLS` of them timed one by one on the thread team,
    /// each after a sweep of other memory, inputs rotated; on the GPU,
    /// back to back).
    fn seconds(&mut self, site: &Site, variant: &Variant, m: usize, run: &mut dyn FnMut(usize) -> f64) -> f64;
}

/// The real clock: a warm-up, then the median of `samples` samples of at
/// least `sample_seconds` each (fewer samples for calls over 50 ms).
#[derive(Clone, Debug)]
pub struct WallTimer {
    pub samples: usize,
    pub sample_seconds: f64,
}

impl Default for WallTimer {
    fn default() -> WallTimer {
        WallTimer { samples: 7, sample_seconds: 0.01 }
    }
}

impl Timer for WallTimer {
    fn seconds(&mut self, _: &Site, _: &Variant, _: usize, run: &mut dyn FnMut(usize) -> f64) -> f64 {
        // The first call touches fresh pages and cold code.
        let first = run(1).max(1e-7);
        let calls = ((self.sample_seconds / first).ceil() as usize).clamp(1, 10_000);
        let warm = run(calls) / calls as f64;
        let samples = if warm > 0.05 { 3 } else { self.samples.max(1) };
        let mut s: Vec<f64> = (0..samples).map(|_| run(calls) / calls as f64).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
}

/// A deterministic timer for tests: `f(variant, m)` seconds, the kernel
/// is not run.
pub struct FnTimer<F: FnMut(&Variant, usize) -> f64>(pub F);

impl<F: FnMut(&Variant, usize) -> f64> Timer for FnTimer<F> {
    fn seconds(&mut self, _: &Site, variant: &Variant, m: usize, _: &mut dyn FnMut(usize) -> f64) -> f64 {
        (self.0)(variant, m)
    }
}

/// Checks and times variants of one site on one device (the host's
/// thread team, [`Bench`], or a GPU, [`crate::gpu::GpuBench`]).
pub trait Evaluate {
    /// Checks `v` on random inputs, then times it at every row count.
    fn evaluate(&mut self, v: &Variant, timer: &mut dyn Timer) -> Outcome;
    /// Makes `v` wrong on purpose, to test that the check rejects it.
    #[doc(hidden)]
    fn seed_wrong(&mut self, v: Variant);
}

/// What evaluating a variant gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Correct; seconds per call for each timed row count.
    Timed(Vec<f64>),
    /// Its result differs from the reference: discarded.
    Wrong(String),
    /// It could not be built or lowered: skipped.
    Failed(String),
}

/// 64-byte aligned memory (what the runtime gives constants and arena
/// buffers).
#[derive(Clone)]
struct Aligned {
    lines: Vec<Line>,
    bytes: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Aligned {
    fn from_bytes(b: &[u8]) -> Aligned {
        let mut a = Aligned { lines: vec![Line([0; 64]); b.len().div_ceil(64)], bytes: b.len() };
        a.as_bytes_mut().copy_from_slice(b);
        a
    }

    fn from_f32(v: &[f32]) -> Aligned {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Aligned::from_bytes(&bytes)
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `lines` holds at least `bytes` bytes of plain data.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.bytes) }
    }

    fn ptr(&mut self) -> *mut u8 {
        self.lines.as_mut_ptr() as *mut u8
    }

    fn f32s(&self) -> Vec<f32> {
        // SAFETY: as above, read only.
        let b = unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.bytes) };
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

/// A lowered kernel this process can call.
enum Exe {
    Jit(Box<JitKernel>),
    #[cfg(feature = "llvm")]
    Lib {
        f: smelt_runtime::native::KernelFn,
        _lib: libloading::Library,
        _dir: tempfile::TempDir,
    },
}

type Entry = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

impl Exe {
    fn new(k: &Kernel, lowering: Lowering) -> Result<Exe, String> {
        match lowering {
            Lowering::Cranelift => JitKernel::compile(k).map(|j| Exe::Jit(Box::new(j))).map_err(|e| e.to_string()),
            #[cfg(feature = "llvm")]
            Lowering::Llvm => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let info = smelt_codegen::aot::build_library_llvm_with(
                    std::slice::from_ref(k),
                    dir.path(),
                    &smelt_codegen::aot::default_cc(),
                )
                .map_err(|e| e.to_string())?;
                // SAFETY: a library smelt just built; its initialisers are the linker's.
                let lib = unsafe { libloading::Library::new(&info.path) }.map_err(|e| e.to_string())?;
                let sym = smelt_codegen::aot::symbol_of(k);
                let f: smelt_runtime::native::KernelFn = {
                    // SAFETY: the symbol is a kernel with the kernel ABI; the
                    // pointer is used only while `lib` is loaded (it is kept
                    // beside it).
                    let s = unsafe { lib.get::<smelt_runtime::native::KernelFn>(sym.as_bytes()) }
                        .map_err(|e| e.to_string())?;
                    *s
                };
                Ok(Exe::Lib { f, _lib: lib, _dir: dir })
            }
            #[cfg(not(feature = "llvm"))]
            Lowering::Llvm => Err("this smelt was built without the `llvm` feature".into()),
            Lowering::Nvptx => Err("a GPU kernel does not run on the host (see `crate::gpu`)".into()),
        }
    }

    fn entry(&self) -> Entry {
        match self {
            Exe::Jit(j) => j.entry(),
            #[cfg(feature = "llvm")]
            Exe::Lib { f, .. } => *f,
        }
    }
}

/// Buffers for one call: pointers in the kernel's argument order.
struct CallBufs {
    bufs: Vec<Aligned>,
    /// Index of the output buffer in `bufs`.
    out: usize,
}

impl CallBufs {
    fn ptrs(&mut self) -> Vec<*mut u8> {
        self.bufs.iter_mut().map(Aligned::ptr).collect()
    }
}

/// Raw pointers shared with the team: each thread writes only its own
/// part of the output (the kernel's parallel split), the rest is read.
struct Shared {
    ptrs: Vec<Vec<*mut u8>>,
    scalars: Vec<i64>,
    f: Entry,
    base: usize,
}
// SAFETY: see the type's docs; the buffers outlive every call.
unsafe impl Sync for Shared {}

/// Timing buffers kept between variants of one weight layout: the layout
/// and, by row count, the rotated copies.
type Cached = (Option<Packing>, BTreeMap<usize, Vec<CallBufs>>);

/// A site's test bench: random weights, reference results, the team.
pub struct Bench {
    site: Site,
    team: Team,
    /// Row counts timed.
    rows: Vec<usize>,
    /// Each weight `[n, k]` as stored (f32, bf16 or f16 bytes).
    weights: Vec<Vec<u8>>,
    /// Row counts checked, with their inputs and reference results.
    checks: Vec<(usize, Vec<f32>, Vec<f32>)>,
    /// Bytes the rotated copies of one workload should exceed.
    rotate_bytes: usize,
    /// The layout the cached weights are in, and the cached copies by
    /// row count.
    cache: Option<Cached>,
    /// A variant to build wrong on purpose (tests of the check).
    wrong: Option<Variant>,
    /// The memory swept before each timed call ([`SPACER_BYTES`]).
    spacer: Vec<u64>,
}

/// Bytes of other memory read before each timed call (see the module
/// docs): a megabyte moved the measured choice as much as 8 or 32 did.
pub const SPACER_BYTES: usize = 1 << 20;

/// The most calls one timing sample makes: each is timed alone after a
/// sweep of [`SPACER_BYTES`], which costs tens of microseconds, so the
/// smallest kernels' samples stop at this many calls rather than at the
/// sample's length.
pub const MAX_SPACED_CALLS: usize = 64;

/// Reads one word of every 64-byte line of `spacer`.
fn sweep(spacer: &[u64]) {
    let sum: u64 = spacer.iter().step_by(8).fold(0, |a, &x| a.wrapping_add(x));
    std::hint::black_box(sum);
}

/// Deterministic uniform values in [-1, 1) (xorshift64*).
pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let x = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (x as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `v` stored as `w` (rounded to nearest even), and the stored values
/// widened back to f32.
fn store(v: &[f32], w: Scalar) -> (Vec<u8>, Vec<f32>) {
    match w {
        Scalar::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|x| half::bf16::from_f32(*x)).collect();
            (h.iter().flat_map(|x| x.to_le_bytes()).collect(), h.iter().map(|x| x.to_f32()).collect())
        }
        Scalar::F16 => {
            let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
            (h.iter().flat_map(|x| x.to_le_bytes()).collect(), h.iter().map(|x| x.to_f32()).collect())
        }
        _ => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), v.to_vec()),
    }
}

/// The least a call's rotated copies span: caches do not evict strictly
/// least recently used, so copies only twice the last-level cache still
/// hit it now and then, which a model's decode step (hundreds of MB of
/// weights per token) never does.
const ROTATE_MIN_BYTES: usize = 128 << 20;
/// The most copies of one call's buffers.
const MAX_COPIES: usize = 128;

/// The row counts every variant is checked at: one row (decode) and a
/// count that leaves a partial tile for every tile height in the space.
pub const CHECK_ROWS: [usize; 2] = [1, 13];

impl Bench {
    /// A bench timing `site` at each of `rows` on `threads` threads.
    pub fn new(site: Site, rows: &[usize], threads: usize) -> Result<Bench, TuneError> {
        if site.is_gpu() {
            return Err(TuneError::Target { site: site.to_string(), target: "cpu" });
        }
        let (n, k, act, w) = site.product();
        let team = Team::new(threads).map_err(TuneError::Team)?;
        let mut weights = vec![];
        let mut widened = vec![];
        for i in 0..site.weights() {
            let (bytes, vals) = store(&random(n * k, 17 + i as u64), w);
            weights.push(bytes);
            widened.push(vals);
        }
        // The reference: the interpreter's matmul (or gated MLP) with the
        // weights transposed to `[k, n]`, as the graph has them.
        let kn: Vec<Tensor> = widened
            .iter()
            .map(|wv| {
                let mut t = vec![0f32; n * k];
                for j in 0..n {
                    for p in 0..k {
                        t[p * n + j] = wv[j * k + p];
                    }
                }
                Tensor::from_f32(DType::F32, vec![k, n], t).expect("sizes match")
            })
            .collect();
        let op = match act {
            None => Op::MatMul {},
            Some(a) => Op::GatedMlp { act: a.name().to_string() },
        };
        let mut checks = vec![];
        for (i, &m) in CHECK_ROWS.iter().enumerate() {
            let a = random(m * k, 101 + i as u64);
            let at = Tensor::from_f32(DType::F32, vec![m, k], a.clone()).expect("sizes match");
            let mut operands = vec![&at];
            operands.extend(kn.iter());
            let want = smelt_ir::interp::eval_op(&op, &operands, &BTreeMap::new())
                .map_err(|e| TuneError::Reference { site: site.to_string(), message: e.to_string() })?;
            checks.push((m, a, want[0].to_f32_vec()));
        }
        let rotate_bytes = (4 * crate::device::last_level_cache_bytes()).max(ROTATE_MIN_BYTES);
        let spacer = vec![1u64; SPACER_BYTES / 8];
        Ok(Bench { site, team, rows: rows.to_vec(), weights, checks, rotate_bytes, cache: None, wrong: None, spacer })
    }

    pub fn site(&self) -> &Site {
        &self.site
    }

    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The weights in the layout `packing` wants (`None`: `[n, k]`).
    fn laid_out(&self, packing: Option<Packing>) -> Vec<Vec<u8>> {
        let (n, k, _, w) = self.site.product();
        self.weights
            .iter()
            .map(|b| match packing {
                Some(p) => p.apply_bytes(b, w.size(), n, k),
                None => b.clone(),
            })
            .collect()
    }

    /// Buffers for one call with `m` rows: `a`, the weights, `c` (NaN).
    fn call_bufs(&self, weights: &[Vec<u8>], a: &[f32], m: usize) -> CallBufs {
        let (n, ..) = self.site.product();
        let mut bufs = vec![Aligned::from_f32(a)];
        bufs.extend(weights.iter().map(|w| Aligned::from_bytes(w)));
        bufs.push(Aligned::from_f32(&vec![f32::NAN; m * n]));
        let out = bufs.len() - 1;
        CallBufs { bufs, out }
    }

    /// The kernel of `v`, with the layout its weights must be given in.
    fn build(&self, v: &Variant) -> Result<Built, String> {
        let mut built = self.site.build(&self.site.rows_type(), v).map_err(|e| e.to_string())?;
        if self.wrong == Some(*v) {
            // Same buffer sizes whenever n is a multiple of both widths.
            let other = |nr: usize| if nr == 8 { 16 } else { 8 };
            built.packing = match built.packing {
                Some(Packing::Panels { nr }) => Some(Packing::Panels { nr: other(nr) }),
                // Plain panels of the same width: the pairs come apart.
                Some(Packing::PairedPanels { nr, .. }) => Some(Packing::Panels { nr }),
                none => none,
            };
        }
        Ok(built)
    }
}

impl Evaluate for Bench {
    /// Builds `v` wrong on purpose (its weights laid out for other panels
    /// than the kernel reads).
    fn seed_wrong(&mut self, v: Variant) {
        self.wrong = Some(v);
    }

    fn evaluate(&mut self, v: &Variant, timer: &mut dyn Timer) -> Outcome {
        let built = match self.build(v) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(format!("building: {e}")),
        };
        let kernel = &built.instance.kernel;
        if built.instance.scalars.len() != 1 || kernel.scalars.len() != 1 {
            return Outcome::Failed(format!("expected one scalar (the rows), found {}", kernel.scalars.len()));
        }
        let exe = match Exe::new(kernel, built.lowering) {
            Ok(e) => e,
            Err(e) => return Outcome::Failed(format!("lowering: {e}")),
        };
        if self.cache.as_ref().is_none_or(|(p, _)| *p != built.packing) {
            self.cache = Some((built.packing, BTreeMap::new()));
        }
        let weights = self.laid_out(built.packing);
        // The check, on the same team the timing uses.
        for ci in 0..self.checks.len() {
            let (m, a, want) = &self.checks[ci];
            let (m, a, want) = (*m, a.clone(), want.clone());
            let mut cb = self.call_bufs(&weights, &a, m);
            if let Err(e) = lengths_match(kernel, &cb, m) {
                return Outcome::Failed(e);
            }
            let shared = Shared { ptrs: vec![cb.ptrs()], scalars: vec![m as i64], f: exe.entry(), base: 0 };
            if let Err(e) = run(&mut self.team, &shared, 1) {
                return Outcome::Failed(e);
            }
            let got = cb.bufs[cb.out].f32s();
            if let Some(e) = compare(&got, &want) {
                return Outcome::Wrong(format!("{m} rows: {e}"));
            }
        }
        // The timing.
        let mut times = vec![];
        for ri in 0..self.rows.len() {
            let m = self.rows[ri];
            let mut copies = match self.cache.as_mut().and_then(|(_, c)| c.remove(&m)) {
                Some(c) => c,
                None => {
                    let (n, k, ..) = self.site.product();
                    let per_call: usize = weights.iter().map(Vec::len).sum::<usize>() + 4 * m * (n + k);
                    let count = self.rotate_bytes.div_ceil(per_call.max(1)).clamp(1, MAX_COPIES);
                    let a = random(m * k, 7);
                    (0..count).map(|_| self.call_bufs(&weights, &a, m)).collect()
                }
            };
            let mut shared = Shared {
                ptrs: copies.iter_mut().map(CallBufs::ptrs).collect(),
                scalars: vec![m as i64],
                f: exe.entry(),
                base: 0,
            };
            let team = &mut self.team;
            let spacer = &self.spacer;
            let mut failed = None;
            // `calls` calls' worth of time: up to `MAX_SPACED_CALLS` of them
            // timed one by one, each after the sweep (see the module docs).
            let mut go = |calls: usize| -> f64 {
                let timed = calls.clamp(1, MAX_SPACED_CALLS);
                let mut t = 0.0;
                for _ in 0..timed {
                    sweep(spacer);
                    let start = Instant::now();
                    if let Err(e) = run(team, &shared, 1) {
                        failed = Some(e);
                    }
                    t += start.elapsed().as_secs_f64();
                    shared.base += 1;
                }
                t * calls as f64 / timed as f64
            };
            let t = timer.seconds(&self.site, v, m, &mut go);
            if let Some(e) = failed {
                return Outcome::Failed(e);
            }
            if let Some((_, c)) = self.cache.as_mut() {
                c.insert(m, copies);
            }
            times.push(t);
        }
        Outcome::Timed(times)
    }
}

/// Every buffer has the element count the kernel declares for `m` rows.
fn lengths_match(k: &Kernel, cb: &CallBufs, m: usize) -> Result<(), String> {
    let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
    if decls.len() != cb.bufs.len() {
        return Err(format!("kernel `{}` takes {} buffers, the bench has {}", k.name, decls.len(), cb.bufs.len()));
    }
    for (i, (d, b)) in decls.iter().zip(&cb.bufs).enumerate() {
        let want = k.buffer_len(d, &[m as i64])? * d.elem.size();
        if want != b.bytes || (d.access == Access::Write) != (i == cb.out) {
            return Err(format!(
                "kernel `{}`: buffer `{}` needs {want} bytes, the bench has {}",
                k.name, d.name, b.bytes
            ));
        }
    }
    Ok(())
}

/// Runs `calls` calls of the shared kernel on the team (copy `base + i`
/// for call `i`).
fn run(team: &mut Team, s: &Shared, calls: usize) -> Result<(), String> {
    // The kernel splits its loop into the team's parts, as the runtime
    // calls it (`thread`, `threads` in the kernel ABI).
    let parts = team.parts() as i64;
    let task = |call: usize, part: usize| {
        let ptrs = &s.ptrs[(s.base + call) % s.ptrs.len()];
        // SAFETY: every buffer was checked against the kernel's
        // declarations for these scalars (`lengths_match`), they outlive
        // the run, and parts write disjoint parts of the output.
        unsafe { (s.f)(ptrs.as_ptr(), s.scalars.as_ptr(), part as i64, parts) };
    };
    team.run(calls, &task).map_err(|e| e.to_string())
}

/// `None` when every element of `got` is within `1e-4 * (1 + |want|)` of
/// the reference (sums of up to thousands of products, added in another
/// order in f32), else the first difference.
pub fn compare(got: &[f32], want: &[f32]) -> Option<String> {
    compare_with_slack(got, want, &[])
}

/// [`compare`], each element allowed `slack[i]` more (none past `slack`'s
/// end): the error bound of an arithmetic the reference does not model
/// (see [`crate::gpu`]'s tensor-core checks).
pub fn compare_with_slack(got: &[f32], want: &[f32], slack: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} results, expected {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // NaN (an element never written) fails too.
        let close = (g - w).abs() <= 1e-4 * (1.0 + w.abs()) + slack.get(i).copied().unwrap_or(0.0);
        if !close {
            return Some(format!("element {i} is {g}, the reference is {w}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_codegen::select::PanelParams;

    #[test]
    fn a_correct_variant_is_timed_and_a_miswired_one_is_wrong() {
        let site = Site::weight_product(48, 40, Some("silu"), Scalar::F32).unwrap();
        let mut b = Bench::new(site, &[1, 5], 2).unwrap();
        let v = Variant::Panels { p: PanelParams::DEFAULT, lowering: Lowering::Cranelift };
        let mut calls = 0;
        let mut timer = FnTimer(|_: &Variant, m: usize| {
            calls += 1;
            m as f64
        });
        assert_eq!(b.evaluate(&v, &mut timer), Outcome::Timed(vec![1.0, 5.0]));
        let mut wall = WallTimer { samples: 3, sample_seconds: 0.0005 };
        match b.evaluate(&v, &mut wall) {
            Outcome::Timed(t) => assert!(t.iter().all(|x| *x > 0.0 && *x < 0.1), "{t:?}"),
            other => panic!("{other:?}"),
        }
        b.seed_wrong(v);
        match b.evaluate(&v, &mut timer) {
            Outcome::Wrong(why) => assert!(why.contains("the reference is"), "{why}"),
            other => panic!("{other:?}"),
        }
        let rows = Variant::Rows {
            t: smelt_codegen::templates::matmul_dyn::TileParams { mr: 3, nc: 2, ksplit: 2 },
            lowering: Lowering::Cranelift,
        };
        assert!(matches!(b.evaluate(&rows, &mut timer), Outcome::Timed(_)));
    }

    #[test]
    fn narrow_weights_are_checked_against_their_stored_values() {
        for w in [Scalar::BF16, Scalar::F16] {
            let site = Site::weight_product(20, 24, None, w).unwrap();
            let mut b = Bench::new(site, &[3], 1).unwrap();
            let v = Variant::Panels {
                p: PanelParams { mr: 3, nr: 12, ksplit: 2, fma: true, lanes: 4, streams: 1, prefetch: 0 },
                lowering: Lowering::Cranelift,
            };
            assert!(matches!(b.evaluate(&v, &mut FnTimer(|_: &Variant, _| 1.0)), Outcome::Timed(_)));
        }
    }
}
