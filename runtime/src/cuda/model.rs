//! [`CudaModel`]: a `cuda` plan, its PTX and its weights on one GPU, as a
//! [`Forward`] model.
//!
//! Opening checks the plan on the host first ([`CudaPlan::new`]: a bad plan
//! is refused the same way on a machine without a GPU), then opens the
//! driver and the device ([`super::device`]), loads the best PTX module for
//! the device ([`super::ptx`]) and every kernel by symbol, and uploads the
//! weights file once.
//!
//! One call does, in order: fill the optional decoder inputs; validate them,
//! size every buffer, check every launch's `needs` and evaluate every grid
//! ([`CudaPlan::prepare`]); place the inputs and scratch buffers in one
//! device arena by liveness (kept across calls, grown when too small); copy
//! the inputs in; launch every kernel with a non-empty grid on one stream,
//! its buffers as device pointers then its scalars as `i64`; copy the
//! outputs back.
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
//! repeats (the cache grows, and its buffers alternate), so
//! TODO(cuda-graph-decode): replay decode steps too, by updating the
//! captured graph's kernel parameters (`cuGraphExecKernelNodeSetParams`)
//! or with a fixed-capacity cache whose length the kernels read on device.
//!
//! With `SMELT_PROFILE` set, every launch is timed with CUDA events and the
//! totals per kernel are printed to stderr when the model is dropped.

use std::collections::BTreeMap;
use std::path::Path;

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use smelt_ir::Tensor;

use super::device::{self, guard, DeviceInfo, Gpu};
use super::plan::{CacheLayout, CudaPlan, Prepared};
use super::{describe, CudaError};
use crate::artifact::Signature;
use crate::generate::{CachedDecode, Forward, ForwardError};
use crate::native::arena::AlignedBuf;
use crate::native::checked::{check_file_name, read_output, write_input};
use crate::native::{NativeError, Weights};
use crate::plan::{NativePlan, Storage};

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

/// A CUDA graph of one call's launches, and the launch key (grids,
/// addresses, scalars) it was captured with: it is replayed only for calls
/// with exactly that key.
struct Graph {
    key: Vec<u64>,
    exec: cudarc::driver::CudaGraph,
}

// SAFETY: the graph is owned by one model and used only through `&mut`
// access to it, so never from two threads at once (what CUDA requires of
// graph objects); it has no thread affinity.
unsafe impl Send for Graph {}

/// The KV cache kept on the device between decode steps.
#[derive(Default)]
struct DeviceCache {
    /// Per present root of the [`CacheLayout`]: two allocations used in turn.
    slots: Vec<[Option<CudaSlice<u8>>; 2]>,
    /// The slot the cached tensors live in; the next step writes the other.
    cur: usize,
    /// Per cache pair: the cached tensor's device address and shape. Empty
    /// when the cache is.
    entries: Vec<(u64, Vec<usize>)>,
    /// Cached positions.
    len: usize,
}

/// A model compiled for the GPU, ready to run. It is `Send` (checked below):
/// it may be moved to another thread, not shared.
pub struct CudaModel {
    plan: CudaPlan,
    gpu: Gpu,
    /// The PTX module loaded: (arch, file).
    module_arch: String,
    module_file: String,
    /// Per kernel of the plan.
    functions: Vec<CudaFunction>,
    weights: CudaSlice<u8>,
    arena: CudaSlice<u8>,
    cache: DeviceCache,
    /// Per-call table of argument addresses, kept to avoid reallocating it.
    ptrs: Vec<u64>,
    /// Whether repeated launch sequences are replayed as a CUDA graph.
    graphs: bool,
    /// The previous call's launch key, and the graph captured from the
    /// last launches that repeated.
    last_key: Option<Vec<u64>>,
    graph: Option<Graph>,
    stats: CudaStats,
    /// With `SMELT_PROFILE` set: milliseconds and launch count per kernel.
    profile: Option<BTreeMap<String, (f64, u64)>>,
    /// Keeps the module loaded while the functions are used.
    _module: std::sync::Arc<CudaModule>,
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
            .field("launches", &self.plan.plan().launches.len())
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
fn alloc(stream: &std::sync::Arc<CudaStream>, bytes: usize, what: &str) -> Result<CudaSlice<u8>, CudaError> {
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
            for k in &plan.plan().kernels {
                let missing = |message: String| CudaError::MissingKernel {
                    file: module.file.clone(),
                    symbol: k.symbol.clone(),
                    message,
                };
                if k.symbol.contains('\0') {
                    return Err(missing("the name holds a NUL byte".into()));
                }
                functions.push(loaded.load_function(&k.symbol).map_err(|e| missing(describe(&e)))?);
            }
            let stream = &gpu.stream;
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
            Ok(CudaModel {
                plan,
                module_arch: module.arch.clone(),
                module_file: module.file.clone(),
                functions,
                weights: dev_weights,
                arena,
                cache: DeviceCache::default(),
                ptrs: Vec::new(),
                graphs: true,
                last_key: None,
                graph: None,
                stats: CudaStats::default(),
                profile: std::env::var_os("SMELT_PROFILE").map(|_| BTreeMap::new()),
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
        self.plan.plan()
    }

    pub fn stats(&self) -> CudaStats {
        let cache_bytes = self.cache.slots.iter().flatten().flatten().map(|s| s.len()).sum();
        CudaStats { arena_bytes: self.arena.len(), cache_bytes, ..self.stats }
    }

    /// Runs the model once (stateless: the decode cache is neither read nor
    /// changed); the typed form of [`Forward::forward`].
    pub fn run(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, CudaError> {
        crate::model::fill_defaults(self.plan.signature(), &mut inputs);
        let prep = self.plan.prepare(&inputs, &BTreeMap::new())?;
        let roots = self.bind_roots(&prep, None)?;
        guard(|| {
            self.upload_inputs(&inputs, &prep, &roots)?;
            self.launch_all(&prep, &roots)?;
            let c = &self.plan.checked;
            let mut reads = Vec::with_capacity(c.outputs.len());
            for (name, b, dtype) in &c.outputs {
                let shape = c.shape_of(*b, &prep.sizes.syms)?;
                let addr = roots.addr(*b);
                reads.push((name.clone(), *b, *dtype, shape, vec![(addr, prep.sizes.lens[*b])]));
            }
            self.download(reads)
        })
    }

    /// Where every root lives this call: places the arena (growing it), and
    /// in a decode step the present roots in their slots and the past
    /// inputs at the cached tensors.
    fn bind_roots(&mut self, prep: &Prepared, step: Option<&CacheLayout>) -> Result<Roots, CudaError> {
        // The model may have moved to another thread since the last call;
        // the raw copies below need its context current on this one.
        guard(|| self.gpu.ctx.bind_to_thread().map_err(driver_err("making the GPU's context current")))?;
        let c = &self.plan.checked;
        let lens = &prep.sizes.lens;
        let resident = step.is_some() && !self.cache.entries.is_empty();
        let outside = |b: usize| match step {
            None => false,
            Some(l) => l.present_roots.contains(&b) || (resident && l.pairs.iter().any(|p| p.past_buf == b)),
        };
        let (offsets, total) = c.place(lens, &|b| !outside(b))?;
        if total > self.arena.len() {
            // The old contents are not needed: every call writes its buffers anew.
            self.arena = guard(|| alloc(&self.gpu.stream, total, "the scratch arena"))?;
        }
        let stream = &self.gpu.stream;
        let arena = addr_of(&self.arena, stream);
        let weights = addr_of(&self.weights, stream);
        let mut root = vec![0u64; c.bufs.len()];
        for (b, off) in offsets.iter().enumerate() {
            if let Some(off) = off {
                root[b] = arena + *off as u64;
            }
        }
        for (b, info) in c.bufs.iter().enumerate() {
            if let Storage::Weight { offset } = c.plan.buffers[b].storage {
                if info.root == b {
                    root[b] = weights + offset;
                }
            }
        }
        if let Some(layout) = step {
            let write = 1 - self.cache.cur;
            self.cache.slots.resize_with(layout.present_roots.len(), Default::default);
            for (k, &r) in layout.present_roots.iter().enumerate() {
                let bytes = lens[r] * c.bufs[r].elem.size();
                let slot = &mut self.cache.slots[k][write];
                let have = slot.as_ref().map_or(0, |s| s.len());
                if have < bytes {
                    let grown = bytes.max(have.saturating_mul(2));
                    // Drop the old allocation first, so its memory can be reused.
                    *slot = None;
                    *slot = Some(guard(|| alloc(&self.gpu.stream, grown, "the KV cache"))?);
                }
                root[r] = slot.as_ref().map_or(0, |s| addr_of(s, stream));
            }
            if resident {
                for (p, (addr, _)) in layout.pairs.iter().zip(&self.cache.entries) {
                    root[p.past_buf] = *addr;
                }
            }
        }
        let addrs = c
            .bufs
            .iter()
            .enumerate()
            .map(|(b, info)| root[info.root] + (prep.sizes.elem_offsets[b] * info.elem.size()) as u64)
            .collect();
        Ok(Roots { addrs })
    }

    /// Copies every input the caller gave (not the resident ones) into its
    /// buffer, converted to the buffer's element type.
    fn upload_inputs(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        prep: &Prepared,
        roots: &Roots,
    ) -> Result<(), CudaError> {
        let c = &self.plan.checked;
        for (spec, &b) in c.specs.iter().zip(&c.input_bufs) {
            let Some(t) = inputs.get(&spec.name) else { continue };
            let len = prep.sizes.lens[b];
            let bytes = len * c.bufs[b].elem.size();
            if bytes == 0 {
                continue;
            }
            let host = AlignedBuf::zeroed(bytes).ok_or(NativeError::OutOfMemory { bytes })?;
            // SAFETY: `host` is aligned and holds `len` elements.
            unsafe { write_input(&spec.name, t, c.bufs[b].elem, host.as_ptr(), len) }?;
            // SAFETY: the buffer's root was placed for at least `len`
            // elements at this address (sizes checked by `prepare`).
            let src = unsafe { std::slice::from_raw_parts(host.as_ptr(), bytes) };
            unsafe { cudarc::driver::result::memcpy_htod_async(roots.addr(b), src, self.gpu.stream.cu_stream()) }
                .map_err(driver_err(format!("copying input `{}` to the GPU", spec.name)))?;
        }
        Ok(())
    }

    /// Launches every kernel with a non-empty grid, in order: from the
    /// captured graph when this call's launches repeat those it was
    /// captured from, else one by one (capturing them into a graph when
    /// they repeat the previous call's).
    fn launch_all(&mut self, prep: &Prepared, roots: &Roots) -> Result<(), CudaError> {
        let c = &self.plan.checked;
        self.ptrs.clear();
        for launch in &c.plan.launches {
            for &b in &launch.args {
                self.ptrs.push(roots.addr(b));
            }
        }
        let launched = prep.grids.iter().filter(|g| g.is_some()).count() as u64;
        self.stats.calls += 1;
        self.stats.launches += launched;
        self.stats.skipped += prep.grids.len() as u64 - launched;
        if !self.graphs || self.profile.is_some() {
            return self.issue(prep);
        }
        // Everything a launch depends on: grids, device addresses, scalars.
        let mut key: Vec<u64> = Vec::with_capacity(3 * prep.grids.len() + self.ptrs.len() + prep.sizes.scalars.len());
        for g in &prep.grids {
            key.extend(g.map_or([0; 3], |(x, y, z)| [x as u64, y as u64, z as u64]));
        }
        key.extend(&self.ptrs);
        key.extend(prep.sizes.scalars.iter().map(|&s| s as u64));
        if let Some(g) = self.graph.as_ref().filter(|g| g.key == key) {
            g.exec.launch().map_err(driver_err("launching the captured CUDA graph"))?;
            self.stats.graph_replays += 1;
            return Ok(());
        }
        if self.last_key.as_ref() != Some(&key) {
            self.last_key = Some(key);
            return self.issue(prep);
        }
        // The same launches twice in a row: capture them, then replay.
        self.graph = None;
        let stream = self.gpu.stream.clone();
        stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("starting a CUDA graph capture"))?;
        let issued = self.issue(prep);
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
        self.graph = Some(Graph { key, exec });
        Ok(())
    }

    /// Launches every kernel with a non-empty grid on the stream (timing
    /// each with `SMELT_PROFILE`).
    fn issue(&mut self, prep: &Prepared) -> Result<(), CudaError> {
        let c = &self.plan.checked;
        let stream = &self.gpu.stream;
        let mut timings = Vec::new();
        for (li, (l, launch)) in c.launches.iter().zip(&c.plan.launches).enumerate() {
            let Some(grid) = prep.grids[li] else { continue };
            let f = &self.functions[launch.kernel];
            let mut args = stream.launch_builder(f);
            for p in &self.ptrs[l.arg_at..l.arg_at + launch.args.len()] {
                args.arg(p);
            }
            for s in &prep.sizes.scalars[l.scalar_at..l.scalar_at + l.scalars.len()] {
                args.arg(s);
            }
            if self.profile.is_some() {
                args.record_kernel_launch(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            }
            let cfg = LaunchConfig { grid_dim: grid, block_dim: self.plan.blocks[launch.kernel], shared_mem_bytes: 0 };
            // SAFETY: every pointer argument addresses device memory of the
            // kernel's element type holding at least `needs` elements for
            // these scalars (checked by `prepare` before any launch), the
            // scalars are the ones those needs were computed with, the
            // argument count and types are the kernel entry's (checked by
            // `CheckedPlan::new`), and the memory outlives the launch (it is
            // owned by this model and freed on this stream).
            let events = unsafe { args.launch(cfg) }
                .map_err(|e| CudaError::Native(c.launch_err(li, format!("the launch failed: {}", describe(&e)))))?;
            if let Some(ev) = events {
                timings.push((li, ev));
            }
        }
        if let Some(profile) = &mut self.profile {
            for (li, (start, end)) in timings {
                let ms = start.elapsed_ms(&end).map_err(driver_err("timing a kernel"))? as f64;
                let e = profile.entry(c.symbol_of(li).to_string()).or_default();
                e.0 += ms;
                e.1 += 1;
            }
        }
        Ok(())
    }

    /// Whether calls whose launches repeat are replayed as a CUDA graph (on
    /// by default; always off with `SMELT_PROFILE`, which times each launch).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.graph = None;
            self.last_key = None;
        }
    }

    /// Copies device ranges back and reads them as tensors: per output
    /// (name, buffer, dtype, shape, [(address, elements)] in order).
    #[allow(clippy::type_complexity)]
    fn download(
        &self,
        reads: Vec<(String, usize, smelt_ir::DType, Vec<usize>, Vec<(u64, usize)>)>,
    ) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let c = &self.plan.checked;
        let stream = &self.gpu.stream;
        let mut hosts = Vec::with_capacity(reads.len());
        for (name, b, _, _, ranges) in &reads {
            let size = c.bufs[*b].elem.size();
            let bytes: usize = ranges.iter().map(|r| r.1 * size).sum();
            let host = AlignedBuf::zeroed(bytes).ok_or(NativeError::OutOfMemory { bytes })?;
            let mut at = 0;
            for &(addr, n) in ranges {
                if n == 0 {
                    continue;
                }
                // SAFETY: `host` has room for every range; each range lies in
                // the buffer (sizes checked by `prepare`).
                let dst = unsafe { std::slice::from_raw_parts_mut(host.as_ptr().add(at), n * size) };
                unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, addr, stream.cu_stream()) }
                    .map_err(driver_err(format!("copying output `{name}` from the GPU")))?;
                at += n * size;
            }
            hosts.push(host);
        }
        stream.synchronize().map_err(driver_err("running the model's kernels"))?;
        let mut out = BTreeMap::new();
        for ((name, b, dtype, shape, _), host) in reads.into_iter().zip(hosts) {
            // SAFETY: `host` holds the shape's elements of the buffer's type.
            let t = unsafe { read_output(&name, dtype, c.bufs[b].elem, host.as_ptr(), shape) }?;
            out.insert(name, t);
        }
        Ok(out)
    }

    /// One decode step with the cache on the device (see the module docs).
    pub fn step(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<Tensor, CudaError> {
        let layout =
            self.plan.cache_layout().cloned().ok_or_else(|| {
                CudaError::NoDeviceCache("its plan has no past/present pairs in scratch memory".into())
            })?;
        if let Some(name) = inputs.keys().find(|k| k.starts_with("past_key_values.")) {
            return Err(CudaError::Native(NativeError::BadInput {
                name: name.clone(),
                why: "a decode step takes no past key/values: the model holds them on the GPU".into(),
            }));
        }
        let resident: BTreeMap<String, Vec<usize>> = layout
            .pairs
            .iter()
            .zip(&self.cache.entries)
            .map(|(p, (_, shape))| (p.past.clone(), shape.clone()))
            .collect();
        let held = (!resident.is_empty()).then_some(self.cache.len);
        crate::model::fill_defaults_after(self.plan.signature(), &mut inputs, held);
        let prep = self.plan.prepare(&inputs, &resident)?;
        let c = &self.plan.checked;
        let logits = layout.logits;
        let shape = c.shape_of(logits, &prep.sizes.syms)?;
        let &[batch, seq, vocab] = shape.as_slice() else {
            return Err(CudaError::NoDeviceCache(format!(
                "`logits` has shape {shape:?}, expected [batch, seq, vocab]"
            )));
        };
        let mut entries = Vec::with_capacity(layout.pairs.len());
        for p in &layout.pairs {
            entries.push(c.shape_of(p.present_buf, &prep.sizes.syms)?);
        }
        let (name, _, dtype) = c
            .outputs
            .iter()
            .find(|(_, b, _)| *b == logits)
            .cloned()
            .ok_or_else(|| CudaError::Plan("the plan has no `logits` output".into()))?;
        let roots = self.bind_roots(&prep, Some(&layout))?;
        let out = guard(|| {
            self.upload_inputs(&inputs, &prep, &roots)?;
            self.launch_all(&prep, &roots)?;
            // The last position of each sequence: row b * seq + seq - 1.
            let base = roots.addr(logits);
            let size = self.plan.checked.bufs[logits].elem.size() as u64;
            let rows: Vec<(u64, usize)> = (0..batch)
                .filter(|_| seq > 0)
                .map(|b| (base + ((b * seq + seq - 1) * vocab) as u64 * size, vocab))
                .collect();
            self.download(vec![(name.clone(), logits, dtype, vec![batch, if seq > 0 { vocab } else { 0 }], rows)])
        })?;
        // The step ran: its presents become the cache.
        self.cache.entries =
            layout.pairs.iter().zip(entries).map(|(p, shape)| (roots.addr(p.present_buf), shape)).collect();
        self.cache.len = self.cache.entries.first().and_then(|(_, s)| s.get(2).copied()).unwrap_or(0);
        self.cache.cur = 1 - self.cache.cur;
        out.into_values().next().ok_or_else(|| CudaError::Plan("the step returned no logits".into()))
    }
}

/// Every buffer's device address this call.
struct Roots {
    addrs: Vec<u64>,
}

impl Roots {
    /// Buffer `b`'s device address (its root's plus its alias offset).
    fn addr(&self, b: usize) -> u64 {
        self.addrs[b]
    }
}

impl Forward for CudaModel {
    fn signature(&self) -> &Signature {
        self.plan.signature()
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        Ok(self.run(inputs)?)
    }

    fn cache(&mut self) -> Option<&mut dyn CachedDecode> {
        if self.plan.cache_layout().is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl CachedDecode for CudaModel {
    fn reset(&mut self) {
        self.cache.entries.clear();
        self.cache.len = 0;
    }

    fn cached_len(&self) -> usize {
        self.cache.len
    }

    fn step(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Tensor, ForwardError> {
        Ok(CudaModel::step(self, inputs)?)
    }
}
