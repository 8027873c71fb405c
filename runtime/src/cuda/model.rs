//! [`CudaModel`]: a `cuda` plan, its PTX and its weights on one GPU, as a
//! [`Forward`] model.
//!
//! Opening checks the plan on the host first ([`CudaPlan::new`]: a bad plan
//! is refused the same way on a machine without a GPU), then opens the
//! driver and the device ([`super::device`]), loads the best PTX module for
//! the device ([`super::ptx`]) and every kernel by symbol, and uploads the
//! weights file once.
//!
//! One call does, in order, on the host ([`Host`], which needs no GPU):
//! fill the optional decoder inputs; validate them, size every buffer,
//! check every launch's `needs` and evaluate every grid
//! ([`CudaPlan::prepare`]); place the inputs and scratch buffers in one
//! device arena by liveness (the placement kept across calls while the
//! sizes fit it, the arena grown when too small); write every launch's
//! arguments into one table and stage the inputs. Then on the device: copy
//! the inputs in; launch every kernel with a non-empty grid on one stream
//! (one raw `cuLaunchKernel` each, its parameters pointing into the table:
//! buffers as device pointers, then scalars as `i64`); copy the outputs
//! back, the one point where the host waits for the device.
//!
//! A decode step ([`CachedDecode::step`]) keeps the KV cache on the device:
//! each `present.*` root is computed into one of two allocations kept for
//! the purpose, which the next step binds as its `past_key_values.*` while
//! it writes its own `present.*` into the other (no copy, no transfer);
//! only the token inputs go in and the last position's logits come out.
//! Those allocations grow by doubling, so a long decode reallocates a
//! logarithmic number of times.
//!
//! Calls whose launches repeat exactly (same grids, device addresses and
//! scalars: the same input shapes on a warm arena, as in a benchmark loop)
//! are captured as a CUDA graph on the second occurrence and replayed from
//! then on, one driver call instead of one per kernel. A decode step never
//! repeats (its scalars and grids follow the cache's length, and its cache
//! buffers alternate), so it pays one `cuLaunchKernel` per launch.
//! TODO(cuda-graph-decode): replay decode steps too: capture one step's
//! launches as a graph once, keep the kernel nodes in launch order, and per
//! step update with `cuGraphExecKernelNodeSetParams` only the nodes whose
//! grid or arguments changed (the table tells which: a few per layer),
//! recapturing when a grid becomes empty or non-empty; or give the cache a
//! fixed capacity whose length the kernels read from device memory, so
//! that every step's launches repeat exactly.
//!
//! A plan with library calls (GEMMs by cuBLAS, `--gpu-gemm cublas`) also
//! opens cuBLAS ([`super::blas`]) on the model's stream when it opens; its
//! calls are issued in plan order between the kernel launches, in eager
//! calls and in graph captures alike (a capture only ever follows an eager
//! call with the same launches, so cuBLAS has chosen and loaded its kernels
//! for those shapes before it is captured). A plan without them never
//! loads cuBLAS.
//!
//! With `SMELT_PROFILE` set, every launch is timed with CUDA events and the
//! totals per kernel are printed to stderr when the model is dropped;
//! `SMELT_CHECK_NAN`, `SMELT_DUMP` and `SMELT_WATCH` check or record every
//! launch's buffers ([`super::debug`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use smelt_ir::Tensor;

use super::blas::Blas;
use super::debug::LaunchDebug;
use super::device::{self, guard, DeviceInfo, Gpu};
use super::host::{DeviceMemory, Host, Issue, Read};
use super::plan::{CudaPlan, Dim3};
use super::{describe, CudaError};
use crate::artifact::Signature;
use crate::generate::{CachedDecode, Forward, ForwardError};
use crate::native::arena::AlignedBuf;
use crate::native::checked::{check_file_name, read_output};
use crate::native::{NativeError, Weights};
use crate::plan::NativePlan;

/// The smallest device allocation made (so no pointer is ever null and a
/// zero-byte buffer still has an address).
const MIN_ALLOC: usize = 256;

/// Counters for tests and profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaStats {
    /// Calls that ran their launches (forward calls and decode steps).
    pub calls: u64,
    /// Kernels launched.
    pub launches: u64,
    /// Launches skipped because their grid was empty.
    pub skipped: u64,
    /// The device arena's size in bytes.
    pub arena_bytes: usize,
    /// Device memory held for the KV cache between decode steps.
    pub cache_bytes: usize,
    /// Calls whose launches ran as one CUDA graph.
    pub graph_replays: u64,
}

/// What a call's launches depend on: every grid and every argument (device
/// addresses and scalars).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LaunchKey {
    grids: Vec<Option<Dim3>>,
    args: Vec<u64>,
}

impl LaunchKey {
    fn is(&self, grids: &[Option<Dim3>], args: &[u64]) -> bool {
        self.grids == grids && self.args == args
    }

    fn set(&mut self, grids: &[Option<Dim3>], args: &[u64]) {
        self.grids.clear();
        self.grids.extend_from_slice(grids);
        self.args.clear();
        self.args.extend_from_slice(args);
    }
}

/// A CUDA graph of one call's launches, and the launch key it was captured
/// with: it is replayed only for calls with exactly that key.
struct Graph {
    key: LaunchKey,
    exec: cudarc::driver::CudaGraph,
}

// SAFETY: the graph is owned by one model and used only through `&mut`
// access to it, so never from two threads at once (what CUDA requires of
// graph objects); it has no thread affinity.
unsafe impl Send for Graph {}

/// The device memory of a model: what [`Host`] asks for.
struct Memory<'a> {
    stream: &'a Arc<CudaStream>,
    weights: u64,
    arena: &'a mut CudaSlice<u8>,
    /// Per present root of the cache layout: two allocations used in turn.
    slots: &'a mut Vec<[Option<CudaSlice<u8>>; 2]>,
}

impl DeviceMemory for Memory<'_> {
    fn weights(&self) -> u64 {
        self.weights
    }

    fn arena(&mut self, bytes: usize) -> Result<u64, CudaError> {
        if bytes > self.arena.len() {
            *self.arena = guard(|| alloc(self.stream, bytes, "the scratch arena"))?;
        }
        Ok(addr_of(self.arena, self.stream))
    }

    fn cache_slot(&mut self, k: usize, slot: usize, bytes: usize) -> Result<u64, CudaError> {
        if self.slots.len() <= k {
            self.slots.resize_with(k + 1, Default::default);
        }
        let s = &mut self.slots[k][slot];
        let have = s.as_ref().map_or(0, |s| s.len());
        if have < bytes {
            // Doubling: a long decode reallocates a logarithmic number of
            // times. The old allocation goes first, so its memory can be reused.
            let grown = bytes.max(have.saturating_mul(2));
            *s = None;
            *s = Some(guard(|| alloc(self.stream, grown, "the KV cache"))?);
        }
        Ok(s.as_ref().map_or(0, |s| addr_of(s, self.stream)))
    }
}

/// A model compiled for the GPU, ready to run. It is `Send` (checked below):
/// it may be moved to another thread, not shared.
pub struct CudaModel {
    host: Host,
    gpu: Gpu,
    /// The PTX module loaded: (arch, file).
    module_arch: String,
    module_file: String,
    /// Per kernel of the plan (None for library calls).
    functions: Vec<Option<CudaFunction>>,
    /// cuBLAS, when the plan has library calls.
    blas: Option<Blas>,
    /// The weights' device memory, at `weights_addr`.
    _weights: CudaSlice<u8>,
    weights_addr: u64,
    arena: CudaSlice<u8>,
    /// The KV cache's device memory (see [`Memory::slots`]).
    slots: Vec<[Option<CudaSlice<u8>>; 2]>,
    /// Whether repeated launch sequences are replayed as a CUDA graph.
    graphs: bool,
    /// The previous call's launch key, and the graph captured from the
    /// last launches that repeated.
    last_key: Option<LaunchKey>,
    graph: Option<Graph>,
    stats: CudaStats,
    /// With `SMELT_PROFILE` set: milliseconds and launch count per kernel.
    profile: Option<BTreeMap<String, (f64, u64)>>,
    /// The debugging aids the environment asks for ([`super::debug`]).
    debug: Option<LaunchDebug>,
    /// Keeps the module loaded while the functions are used.
    _module: Arc<CudaModule>,
}

const _: () = {
    fn assert_send<T: Send>() {}
    let _ = assert_send::<CudaModel>;
};

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("device", &self.gpu.info)
            .field("ptx", &self.module_arch)
            .field("launches", &self.plan().launches.len())
            .finish()
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            let mut rows: Vec<_> = profile.iter().collect();
            rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
            let total: f64 = rows.iter().map(|r| r.1 .0).sum();
            eprintln!("smelt profile (GPU time): {total:.1} ms in {} calls", self.stats.calls);
            for (sym, (ms, n)) in rows {
                eprintln!("{ms:9.2} ms {:5.1}% {n:6} x {sym}", ms / total.max(1e-12) * 100.0);
            }
        }
    }
}

fn driver_err(what: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    let what = what.into();
    move |e| CudaError::Driver { what, message: describe(&e) }
}

/// `bytes` of zeroed device memory (at least [`MIN_ALLOC`]).
fn alloc(stream: &Arc<CudaStream>, bytes: usize, what: &str) -> Result<CudaSlice<u8>, CudaError> {
    let n = bytes.max(MIN_ALLOC);
    stream.alloc_zeros::<u8>(n).map_err(|e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            CudaError::OutOfMemory { what: what.to_string(), bytes: n }
        }
        _ => CudaError::Driver { what: format!("allocating {n} bytes for {what}"), message: describe(&e) },
    })
}

fn addr_of(s: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

impl CudaModel {
    /// Opens a `cuda` artifact's plan on GPU 0: maps `dir/plan.weights`,
    /// checks the plan, opens the device, loads `dir/<module file>` for the
    /// device's architecture, and uploads the weights.
    pub fn open(plan: NativePlan, signature: Signature, dir: &Path) -> Result<CudaModel, CudaError> {
        CudaModel::open_on(plan, signature, dir, 0)
    }

    /// [`CudaModel::open`] on GPU `ordinal`.
    pub fn open_on(plan: NativePlan, signature: Signature, dir: &Path, ordinal: usize) -> Result<CudaModel, CudaError> {
        check_file_name(&plan.weights)?;
        for m in &plan.ptx {
            check_file_name(&m.file)?;
        }
        let weights = Weights::map(&dir.join(&plan.weights))?;
        let plan = CudaPlan::new(plan, signature, weights.len())?;
        CudaModel::with_plan(
            plan,
            &weights,
            &|file| {
                let path = dir.join(file);
                std::fs::read_to_string(&path).map_err(|source| CudaError::Io { path, source })
            },
            ordinal,
        )
    }

    /// Opens a checked plan on GPU `ordinal`, with the weights given and each
    /// PTX module's text read by `ptx_text` (from its file name).
    pub fn with_plan(
        plan: CudaPlan,
        weights: &Weights,
        ptx_text: &dyn Fn(&str) -> Result<String, CudaError>,
        ordinal: usize,
    ) -> Result<CudaModel, CudaError> {
        let gpu = device::open(ordinal)?;
        let (major, minor) = gpu.info.compute_capability;
        let module = plan.choose_module(major, minor)?.clone();
        let text = ptx_text(&module.file)?;
        if text.contains('\0') {
            return Err(CudaError::LoadModule {
                file: module.file,
                arch: module.arch,
                message: "the PTX text holds a NUL byte".into(),
            });
        }
        guard(|| {
            let loaded = gpu.ctx.load_module(Ptx::from_src(text)).map_err(|e| CudaError::LoadModule {
                file: module.file.clone(),
                arch: module.arch.clone(),
                message: describe(&e),
            })?;
            let mut functions = Vec::with_capacity(plan.plan().kernels.len());
            for (i, k) in plan.plan().kernels.iter().enumerate() {
                if plan.gemm(i).is_some() {
                    functions.push(None);
                    continue;
                }
                let missing = |message: String| CudaError::MissingKernel {
                    file: module.file.clone(),
                    symbol: k.symbol.clone(),
                    message,
                };
                if k.symbol.contains('\0') {
                    return Err(missing("the name holds a NUL byte".into()));
                }
                functions.push(Some(loaded.load_function(&k.symbol).map_err(|e| missing(describe(&e)))?));
            }
            let stream = &gpu.stream;
            let blas = if plan.has_library_calls() { Some(Blas::open(stream)?) } else { None };
            let bytes = weights.as_bytes();
            let mut dev_weights = alloc(stream, bytes.len(), "the weights")?;
            if !bytes.is_empty() {
                let mut view = dev_weights
                    .try_slice_mut(..bytes.len())
                    .ok_or_else(|| CudaError::Plan("the weights allocation is too small".into()))?;
                stream.memcpy_htod(bytes, &mut view).map_err(driver_err("uploading the weights"))?;
            }
            let arena = alloc(stream, 0, "the arena")?;
            stream.synchronize().map_err(driver_err("uploading the weights"))?;
            let weights_addr = addr_of(&dev_weights, stream);
            Ok(CudaModel {
                host: Host::new(plan),
                module_arch: module.arch.clone(),
                module_file: module.file.clone(),
                functions,
                blas,
                _weights: dev_weights,
                weights_addr,
                arena,
                slots: Vec::new(),
                graphs: true,
                last_key: None,
                graph: None,
                stats: CudaStats::default(),
                profile: std::env::var_os("SMELT_PROFILE").map(|_| BTreeMap::new()),
                debug: LaunchDebug::from_env(),
                _module: loaded,
                gpu,
            })
        })
    }

    /// The GPU's name (`NVIDIA H200`).
    pub fn device_name(&self) -> &str {
        &self.gpu.info.name
    }

    /// The GPU.
    pub fn device(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// The architecture of the PTX module loaded (`sm_90a`) and its file.
    pub fn ptx_arch(&self) -> &str {
        &self.module_arch
    }

    pub fn ptx_file(&self) -> &str {
        &self.module_file
    }

    pub fn plan(&self) -> &NativePlan {
        self.host.plan().plan()
    }

    pub fn stats(&self) -> CudaStats {
        let cache_bytes = self.slots.iter().flatten().flatten().map(|s| s.len()).sum();
        CudaStats { arena_bytes: self.arena.len(), cache_bytes, ..self.stats }
    }

    /// The device memory, as [`Host`] asks for it.
    fn memory(&mut self) -> (&mut Host, Memory<'_>) {
        let mem = Memory {
            stream: &self.gpu.stream,
            weights: self.weights_addr,
            arena: &mut self.arena,
            slots: &mut self.slots,
        };
        (&mut self.host, mem)
    }

    /// Runs the model once (stateless: the decode cache is neither read nor
    /// changed); the typed form of [`Forward::forward`].
    pub fn run(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let (host, mut mem) = self.memory();
        let reads = host.prepare_run(inputs, &mut mem)?;
        guard(|| {
            self.upload_inputs()?;
            self.launch_all()?;
            self.download(reads)
        })
    }

    /// Copies the staged inputs to their buffers.
    fn upload_inputs(&self) -> Result<(), CudaError> {
        for (name, addr, bytes) in self.host.uploads() {
            // SAFETY: the input's buffer was placed for at least these bytes
            // at this address (sizes checked by `prepare`), and the staged
            // bytes stay untouched until the next call, after this one
            // synchronised.
            unsafe { cudarc::driver::result::memcpy_htod_async(addr, bytes, self.gpu.stream.cu_stream()) }
                .map_err(driver_err(format!("copying input `{name}` to the GPU")))?;
        }
        Ok(())
    }

    /// Launches every kernel with a non-empty grid, in order: from the
    /// captured graph when this call's launches repeat those it was
    /// captured from, else one by one (capturing them into a graph when
    /// they repeat the previous call's).
    fn launch_all(&mut self) -> Result<(), CudaError> {
        let launched = self.host.launched() as u64;
        self.stats.calls += 1;
        self.stats.launches += launched;
        self.stats.skipped += self.host.grids().len() as u64 - launched;
        if !self.graphs || self.profile.is_some() || self.debug.is_some() {
            return self.issue();
        }
        let (grids, args) = (self.host.grids(), self.host.args());
        if let Some(g) = self.graph.as_ref().filter(|g| g.key.is(grids, args)) {
            g.exec.launch().map_err(driver_err("launching the captured CUDA graph"))?;
            self.stats.graph_replays += 1;
            return Ok(());
        }
        if !self.last_key.as_ref().is_some_and(|k| k.is(grids, args)) {
            self.last_key.get_or_insert_with(LaunchKey::default).set(grids, args);
            return self.issue();
        }
        // The same launches twice in a row: capture them, then replay.
        self.graph = None;
        let stream = self.gpu.stream.clone();
        stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("starting a CUDA graph capture"))?;
        let issued = self.issue();
        let captured = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        issued?;
        let exec = captured.map_err(driver_err("capturing the launches as a CUDA graph"))?.ok_or_else(|| {
            CudaError::Driver {
                what: "capturing the launches as a CUDA graph".into(),
                message: "the capture holds nothing".into(),
            }
        })?;
        exec.launch().map_err(driver_err("launching the captured CUDA graph"))?;
        self.stats.graph_replays += 1;
        let key = self.last_key.clone().unwrap_or_default();
        self.graph = Some(Graph { key, exec });
        Ok(())
    }

    /// Launches every kernel with a non-empty grid on the stream, straight
    /// from the host's argument table (timing each with `SMELT_PROFILE`).
    fn issue(&mut self) -> Result<(), CudaError> {
        let stream = &self.gpu.stream;
        // Once per call: the launches below are raw driver calls.
        self.gpu.ctx.bind_to_thread().map_err(driver_err("making the GPU's context current"))?;
        let functions = &self.functions;
        let profiling = self.profile.is_some();
        let mut timings = Vec::new();
        let blas = self.blas.as_ref();
        let mut debug = self.debug.as_mut();
        if let Some(d) = debug.as_mut() {
            d.begin(&self.host);
        }
        let launched = self.host.each_issue(|issue| {
            let li = match &issue {
                Issue::Kernel { launch, .. } | Issue::Gemm { launch, .. } => *launch,
            };
            let fail = |e: &cudarc::driver::DriverError| (li, describe(e));
            let event = || stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT));
            let start = if profiling { Some(event().map_err(|e| fail(&e))?) } else { None };
            match issue {
                Issue::Kernel { kernel, grid, block, params, .. } => {
                    let Some(function) = &functions[kernel] else {
                        return Err((li, "the kernel was not loaded".to_string()));
                    };
                    // SAFETY: every pointer argument addresses device memory
                    // of the kernel's element type holding at least `needs`
                    // elements for these scalars (checked by `prepare` before
                    // any launch), the scalars are the ones those needs were
                    // computed with, the parameters are the kernel entry's
                    // buffers then scalars, 8 bytes each (counts and types
                    // checked by `CheckedPlan::new`), the memory outlives the
                    // launch (it is owned by this model and freed on this
                    // stream), and the context is current.
                    unsafe {
                        cudarc::driver::result::launch_kernel(
                            function.cu_function(),
                            grid,
                            block,
                            0,
                            stream.cu_stream(),
                            params,
                        )
                    }
                    .map_err(|e| fail(&e))?;
                }
                Issue::Gemm { call, m, x, w, y, .. } => {
                    let Some(blas) = blas else { return Err((li, "cuBLAS was not opened".to_string())) };
                    // SAFETY: x, w and y hold at least m·k, n·k and m·n
                    // elements of the call's types (the needs, checked by
                    // `CudaPlan::new` to be exactly those and by `prepare`
                    // against the buffers), m fits an i32 (`prepare`), the
                    // handle runs on this stream and the context is current.
                    unsafe { blas.gemm(call, m, x, w, y) }.map_err(|e| (li, e))?;
                }
            }
            if let Some(start) = start {
                timings.push((li, start, event().map_err(|e| fail(&e))?));
            }
            if let Some(d) = debug.as_mut() {
                d.after(li, stream).map_err(|e| (li, e))?;
            }
            Ok(())
        });
        if let Some(d) = debug {
            d.report(&self.host.plan().checked);
        }
        if let Err((li, why)) = launched {
            let c = &self.host.plan().checked;
            return Err(CudaError::Native(c.launch_err(li, format!("the launch failed: {why}"))));
        }
        if let Some(profile) = &mut self.profile {
            let c = &self.host.plan().checked;
            for (li, start, end) in timings {
                let ms = start.elapsed_ms(&end).map_err(driver_err("timing a kernel"))? as f64;
                let e = profile.entry(c.symbol_of(li).to_string()).or_default();
                e.0 += ms;
                e.1 += 1;
            }
        }
        Ok(())
    }

    /// GPU seconds of `calls` back-to-back runs of the plan's launches on
    /// `inputs` (checked and uploaded once, as [`CudaModel::run`] does),
    /// measured by CUDA events around the launches alone: no copies, and
    /// (after one warm-up call that captures them) replayed as a CUDA graph
    /// unless profiling. Nothing is read back. This is how `smelt tune`
    /// times a GPU kernel variant.
    pub fn time_launches(&mut self, inputs: BTreeMap<String, Tensor>, calls: usize) -> Result<f64, CudaError> {
        let (host, mut mem) = self.memory();
        let _reads = host.prepare_run(inputs, &mut mem)?;
        guard(|| {
            self.upload_inputs()?;
            // Two calls: the second repeats the first, so it captures the
            // graph that the timed calls replay.
            self.launch_all()?;
            self.launch_all()?;
            let stream = self.gpu.stream.clone();
            let event = || {
                stream
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(driver_err("recording a timing event"))
            };
            let start = event()?;
            for _ in 0..calls {
                self.launch_all()?;
            }
            let end = event()?;
            let ms = start.elapsed_ms(&end).map_err(driver_err("timing the launches"))?;
            Ok(ms as f64 / 1e3)
        })
    }

    /// Whether calls whose launches repeat are replayed as a CUDA graph (on
    /// by default; always off with `SMELT_PROFILE`, which times each launch, and with the
    /// debugging aids of [`super::debug`], which read back after each).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.graph = None;
            self.last_key = None;
        }
    }

    /// Copies device ranges back and reads them as tensors; the one place
    /// a call waits for the device.
    fn download(&self, reads: Vec<Read>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let stream = &self.gpu.stream;
        let mut hosts = Vec::with_capacity(reads.len());
        for r in &reads {
            let size = r.elem.size();
            let bytes: usize = r.ranges.iter().map(|r| r.1 * size).sum();
            let host = AlignedBuf::zeroed(bytes).ok_or(NativeError::OutOfMemory { bytes })?;
            let mut at = 0;
            for &(addr, n) in &r.ranges {
                if n == 0 {
                    continue;
                }
                // SAFETY: `host` has room for every range; each range lies in
                // the buffer (sizes checked by `prepare`).
                let dst = unsafe { std::slice::from_raw_parts_mut(host.as_ptr().add(at), n * size) };
                unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, addr, stream.cu_stream()) }
                    .map_err(driver_err(format!("copying output `{}` from the GPU", r.name)))?;
                at += n * size;
            }
            hosts.push(host);
        }
        stream.synchronize().map_err(driver_err("running the model's kernels"))?;
        let mut out = BTreeMap::new();
        for (r, host) in reads.into_iter().zip(hosts) {
            // SAFETY: `host` holds the shape's elements of the buffer's type.
            let t = unsafe { read_output(&r.name, r.dtype, r.elem, host.as_ptr(), r.shape) }?;
            out.insert(r.name, t);
        }
        Ok(out)
    }

    /// One decode step with the cache on the device (see the module docs).
    pub fn step(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Tensor, CudaError> {
        let (host, mut mem) = self.memory();
        let read = host.prepare_step(inputs, &mut mem)?;
        let out = guard(|| {
            self.upload_inputs()?;
            self.launch_all()?;
            self.download(vec![read])
        })?;
        // The step ran: its presents become the cache.
        self.host.finish_step();
        out.into_values().next().ok_or_else(|| CudaError::Plan("the step returned no logits".into()))
    }
}

impl Forward for CudaModel {
    fn signature(&self) -> &Signature {
        self.host.plan().signature()
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        Ok(self.run(inputs)?)
    }

    fn cache(&mut self) -> Option<&mut dyn CachedDecode> {
        if self.host.plan().cache_layout().is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl CachedDecode for CudaModel {
    fn reset(&mut self) {
        self.host.reset_cache();
    }

    fn cached_len(&self) -> usize {
        self.host.cached_len()
    }

    fn step(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Tensor, ForwardError> {
        Ok(CudaModel::step(self, inputs)?)
    }
}
