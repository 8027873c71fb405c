//! [`Host`]: the host half of a GPU model's calls, everything a forward
//! call or a decode step does before and between its driver calls. It needs
//! no GPU: [`super::CudaModel`] gives it device memory through
//! [`DeviceMemory`], and tests and the host benchmark
//! (`runtime/examples/cuda_host.rs`) give it made-up addresses.
//!
//! What depends only on the plan is worked out once, when the model opens:
//! the dims parsed and deduplicated ([`CheckedPlan::dims`](crate::native::checked::CheckedPlan::dims)), which roots
//! each kind of call places in the arena, the weights' roots, and where each
//! launch's arguments sit in one flat table. A call then
//!
//! 1. validates and sizes itself ([`CudaPlan::prepare`]: the plan's few dozen
//!    distinct dims evaluated once for the call's symbol values, every
//!    length, `needs` and grid read from them);
//! 2. places the arena, reusing the placement kept for its kind of call
//!    while the sizes fit it ([`CheckedPlan::place_cached`](crate::native::checked::CheckedPlan::place_cached)), and asks
//!    [`DeviceMemory`] for the arena and, in a decode step, the cache slot
//!    each `present.*` root is written to;
//! 3. writes every buffer's device address and every launch's arguments
//!    (buffer addresses, then scalars, 8 bytes each) into the table, and
//!    converts the inputs into one staging buffer kept across calls.
//!
//! The model then copies the staged inputs in ([`Host::uploads`]), launches
//! ([`Host::each_launch`] hands `cuLaunchKernel` its parameter pointers into
//! the table) and reads back what the call returns ([`Read`]). Nothing here
//! synchronises with the device.

use std::collections::BTreeMap;
use std::ffi::c_void;

use smelt_ir::{DType, Tensor};

use super::plan::{CudaPlan, Dim3, Prepared};
use super::CudaError;
use crate::cache::{CacheLayout, CallKind};
use crate::native::arena::{AlignedBuf, ALIGN};
use crate::native::checked::{write_input, Placement};
use crate::native::NativeError;
use crate::plan::{Elem, GemmCall, Storage};

/// Device memory as the host half sees it: addresses.
pub trait DeviceMemory {
    /// The weights' device address.
    fn weights(&self) -> u64;
    /// The arena's device address, once it holds at least `bytes` (its
    /// contents need not be kept when it grows: every call writes its
    /// buffers anew).
    fn arena(&mut self, bytes: usize) -> Result<u64, CudaError>;
    /// The device address of slot `slot` (0 or 1) of present root `k` of
    /// the [`super::plan::CacheLayout`], once it holds at least `bytes` (its
    /// contents need not be kept when it grows: the step writes it whole).
    fn cache_slot(&mut self, k: usize, slot: usize, bytes: usize) -> Result<u64, CudaError>;
}

/// What a prepared call returns: one output, read back from device ranges
/// (address, elements), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub name: String,
    pub buffer: usize,
    pub dtype: DType,
    pub elem: Elem,
    pub shape: Vec<usize>,
    pub ranges: Vec<(u64, usize)>,
}

/// One staged input: `bytes` bytes at offset `at` of the staging buffer go
/// to device address `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Upload {
    /// The input's index in the plan's inputs.
    input: usize,
    addr: u64,
    at: usize,
    bytes: usize,
}

/// The KV cache kept on the device between decode steps (its memory is the
/// [`DeviceMemory`]'s cache slots).
#[derive(Clone, Debug, Default)]
struct Cache {
    /// The slot the cached tensors live in; the next step writes the other.
    cur: usize,
    /// Per cache pair: the cached tensor's device address and shape. Empty
    /// when the cache is.
    entries: Vec<(u64, Vec<usize>)>,
    /// Cached positions.
    len: usize,
}

/// The host half of a GPU model (see the module docs).
pub struct Host {
    plan: CudaPlan,
    /// Per [`CallKind`]: which buffers are arena roots (indexed by buffer), and
    /// the placement kept for it.
    keep: [Vec<bool>; 3],
    placements: [Placement; 3],
    /// Root buffers stored in the weights, with their byte offsets.
    weight_roots: Vec<(usize, u64)>,
    /// Per launch: where its arguments start in `args`, and one past the
    /// last launch's.
    launch_at: Vec<usize>,
    max_args: usize,
    cache: Cache,
    /// The resident inputs' shapes (the cache's, by past input name), kept
    /// to avoid rebuilding the map each step.
    resident: BTreeMap<String, Vec<usize>>,
    /// The `present.*` shapes of the step prepared last.
    presents: Vec<Vec<usize>>,
    // Per-call tables, kept across calls.
    root: Vec<u64>,
    addrs: Vec<u64>,
    grids: Vec<Option<Dim3>>,
    args: Vec<u64>,
    /// Every buffer's length in elements for the call prepared last.
    lens: Vec<usize>,
    /// The staged inputs (None until a call stages any).
    staging: Option<AlignedBuf>,
    uploads: Vec<Upload>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("launches", &self.grids.len()).field("cached", &self.cache.len).finish()
    }
}

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

impl Host {
    /// Works out what the calls of `plan` share.
    pub fn new(plan: CudaPlan) -> Host {
        let c = &plan.checked;
        let n = c.bufs.len();
        let weight_roots = c
            .bufs
            .iter()
            .enumerate()
            .filter_map(|(b, info)| match c.plan.buffers[b].storage {
                Storage::Weight { offset } if info.root == b => Some((b, offset)),
                _ => None,
            })
            .collect();
        let mut launch_at = Vec::with_capacity(c.launches.len() + 1);
        let mut at = 0;
        let mut max_args = 0;
        for (l, launch) in c.launches.iter().zip(&c.plan.launches) {
            launch_at.push(at);
            let count = launch.args.len() + l.scalars.len();
            at += count;
            max_args = max_args.max(count);
        }
        launch_at.push(at);
        let launches = c.launches.len();
        Host {
            keep: CacheLayout::arena_roots(plan.cache_layout(), n, false),
            placements: Default::default(),
            weight_roots,
            launch_at,
            max_args,
            cache: Cache::default(),
            resident: BTreeMap::new(),
            presents: Vec::new(),
            root: vec![0; n],
            addrs: vec![0; n],
            grids: vec![None; launches],
            args: vec![0; at],
            lens: vec![],
            staging: None,
            uploads: Vec::new(),
            plan,
        }
    }

    pub fn plan(&self) -> &CudaPlan {
        &self.plan
    }

    /// How many positions the decode cache holds.
    pub fn cached_len(&self) -> usize {
        self.cache.len
    }

    /// Empties the decode cache (its device memory is kept for reuse).
    pub fn reset_cache(&mut self) {
        self.cache.entries.clear();
        self.cache.len = 0;
    }

    /// How many times each kind of call (forward, first step, step) placed
    /// its arena: a placement is reused while the sizes fit it.
    pub fn placements_computed(&self) -> [u64; 3] {
        [0, 1, 2].map(|k| self.placements[k].computed)
    }

    /// Prepares a forward call (stateless: the decode cache is neither read
    /// nor changed): everything up to the launches. Returns what the call
    /// reads back, every output whole.
    pub fn prepare_run(
        &mut self,
        mut inputs: BTreeMap<String, Tensor>,
        mem: &mut dyn DeviceMemory,
    ) -> Result<Vec<Read>, CudaError> {
        crate::model::fill_defaults(self.plan.signature(), &mut inputs);
        let prep = self.plan.prepare(&inputs, &BTreeMap::new())?;
        self.bind(CallKind::Run, &prep, mem)?;
        self.stage(&inputs, &prep)?;
        let c = &self.plan.checked;
        let mut reads = Vec::with_capacity(c.outputs.len());
        for (name, b, dtype) in &c.outputs {
            let shape = c.shape_in(*b, &prep.sizes)?;
            let ranges = vec![(self.addrs[*b], prep.sizes.lens[*b])];
            reads.push(Read { name: name.clone(), buffer: *b, dtype: *dtype, elem: c.bufs[*b].elem, shape, ranges });
        }
        self.pack(prep);
        Ok(reads)
    }

    /// Prepares a decode step with the cache on the device (see
    /// [`super::model`]): everything up to the launches. Returns the read of
    /// the last position's logits of each sequence. The cache changes only
    /// when [`Host::finish_step`] says the step ran.
    pub fn prepare_step(
        &mut self,
        mut inputs: BTreeMap<String, Tensor>,
        mem: &mut dyn DeviceMemory,
    ) -> Result<Read, CudaError> {
        let Some(layout) = self.plan.cache_layout() else {
            return Err(CudaError::NoDeviceCache("its plan has no past/present pairs in scratch memory".into()));
        };
        if let Some(name) = inputs.keys().find(|k| k.starts_with("past_key_values.")) {
            return Err(CudaError::Native(NativeError::BadInput {
                name: name.clone(),
                why: "a decode step takes no past key/values: the model holds them on the GPU".into(),
            }));
        }
        let resident = !self.cache.entries.is_empty();
        if resident {
            for (p, (_, shape)) in layout.pairs.iter().zip(&self.cache.entries) {
                match self.resident.get_mut(&p.past) {
                    Some(s) => s.clone_from(shape),
                    None => {
                        self.resident.insert(p.past.clone(), shape.clone());
                    }
                }
            }
        } else {
            self.resident.clear();
        }
        let held = resident.then_some(self.cache.len);
        crate::model::fill_defaults_after(self.plan.signature(), &mut inputs, held);
        let prep = self.plan.prepare(&inputs, &self.resident)?;
        let c = &self.plan.checked;
        let logits = layout.logits;
        let shape = c.shape_in(logits, &prep.sizes)?;
        let &[batch, seq, vocab] = shape.as_slice() else {
            return Err(CudaError::NoDeviceCache(format!(
                "`logits` has shape {shape:?}, expected [batch, seq, vocab]"
            )));
        };
        self.presents.clear();
        for p in &layout.pairs {
            self.presents.push(c.shape_in(p.present_buf, &prep.sizes)?);
        }
        let (name, _, dtype) = c
            .outputs
            .iter()
            .find(|(_, b, _)| *b == logits)
            .ok_or_else(|| CudaError::Plan("the plan has no `logits` output".into()))?;
        let (name, dtype, elem) = (name.clone(), *dtype, c.bufs[logits].elem);
        self.bind(if resident { CallKind::Step } else { CallKind::FirstStep }, &prep, mem)?;
        self.stage(&inputs, &prep)?;
        // The last position of each sequence: row b * seq + seq - 1.
        let base = self.addrs[logits];
        let size = elem.size() as u64;
        let ranges: Vec<(u64, usize)> = (0..batch)
            .filter(|_| seq > 0)
            .map(|b| (base + ((b * seq + seq - 1) * vocab) as u64 * size, vocab))
            .collect();
        self.pack(prep);
        Ok(Read { name, buffer: logits, dtype, elem, shape: vec![batch, if seq > 0 { vocab } else { 0 }], ranges })
    }

    /// The step prepared last ran: its `present.*` tensors become the cache.
    pub fn finish_step(&mut self) {
        let Some(layout) = self.plan.cache_layout() else { return };
        self.cache.entries.clear();
        for (p, shape) in layout.pairs.iter().zip(self.presents.drain(..)) {
            self.cache.entries.push((self.addrs[p.present_buf], shape));
        }
        self.cache.len = self.cache.entries.first().and_then(|(_, s)| s.get(2).copied()).unwrap_or(0);
        self.cache.cur = 1 - self.cache.cur;
    }

    /// Places the call's roots and sets every buffer's device address.
    fn bind(&mut self, kind: CallKind, prep: &Prepared, mem: &mut dyn DeviceMemory) -> Result<(), CudaError> {
        let c = &self.plan.checked;
        let k = kind as usize;
        let lens = &prep.sizes.lens;
        c.place_cached(lens, &self.keep[k], &mut self.placements[k])?;
        let placed = &self.placements[k];
        let arena = mem.arena(placed.total())?;
        self.root.fill(0);
        for (b, off) in placed.offsets().iter().enumerate() {
            if let Some(off) = off {
                self.root[b] = arena + *off as u64;
            }
        }
        let weights = mem.weights();
        for &(b, offset) in &self.weight_roots {
            self.root[b] = weights + offset;
        }
        if kind != CallKind::Run {
            if let Some(layout) = self.plan.cache_layout() {
                let write = 1 - self.cache.cur;
                for (i, &r) in layout.present_roots.iter().enumerate() {
                    self.root[r] = mem.cache_slot(i, write, lens[r] * c.bufs[r].elem.size())?;
                }
                if kind == CallKind::Step {
                    for (p, (addr, _)) in layout.pairs.iter().zip(&self.cache.entries) {
                        self.root[p.past_buf] = *addr;
                    }
                }
            }
        }
        for (b, info) in c.bufs.iter().enumerate() {
            self.addrs[b] = self.root[info.root] + (prep.sizes.elem_offsets[b] * info.elem.size()) as u64;
        }
        Ok(())
    }

    /// Converts every input the caller gave (not the resident ones) into
    /// the staging buffer, in its buffer's element type.
    fn stage(&mut self, inputs: &BTreeMap<String, Tensor>, prep: &Prepared) -> Result<(), CudaError> {
        let c = &self.plan.checked;
        self.uploads.clear();
        let mut end = 0;
        for (i, (spec, &b)) in c.specs.iter().zip(&c.input_bufs).enumerate() {
            if !inputs.contains_key(&spec.name) {
                continue;
            }
            let bytes = prep.sizes.lens[b] * c.bufs[b].elem.size();
            if bytes == 0 {
                continue;
            }
            let at = align_up(end);
            self.uploads.push(Upload { input: i, addr: self.addrs[b], at, bytes });
            end = at + bytes;
        }
        let have = self.staging.as_ref().map_or(0, |s| s.len());
        if end > have {
            let bytes = end.max(have.saturating_mul(2));
            self.staging = Some(AlignedBuf::zeroed(bytes).ok_or(NativeError::OutOfMemory { bytes })?);
        }
        let Some(staging) = &self.staging else { return Ok(()) };
        for u in &self.uploads {
            let spec = &c.specs[u.input];
            let b = c.input_bufs[u.input];
            // SAFETY: the staging buffer holds `end` bytes, `u.at` is
            // aligned, and `u.bytes` is the buffer's length in its elements.
            unsafe {
                write_input(
                    &spec.name,
                    &inputs[&spec.name],
                    c.bufs[b].elem,
                    staging.as_ptr().add(u.at),
                    prep.sizes.lens[b],
                )
            }?;
        }
        Ok(())
    }

    /// Writes every launch's arguments into the table.
    fn pack(&mut self, prep: Prepared) {
        let c = &self.plan.checked;
        for (li, (l, launch)) in c.launches.iter().zip(&c.plan.launches).enumerate() {
            let args = &mut self.args[self.launch_at[li]..self.launch_at[li + 1]];
            let (bufs, scalars) = args.split_at_mut(launch.args.len());
            for (a, &b) in bufs.iter_mut().zip(&launch.args) {
                *a = self.addrs[b];
            }
            for (a, &s) in scalars.iter_mut().zip(&prep.sizes.scalars[l.scalar_at..l.scalar_at + l.scalars.len()]) {
                *a = s as u64;
            }
        }
        self.grids = prep.grids;
        self.lens = prep.sizes.lens;
    }

    /// The float buffers a launch of the call prepared last reads or
    /// writes: (argument index, buffer name, element type, device address,
    /// length in elements), for the debugging aids of [`super::debug`].
    pub fn float_args(&self, li: usize) -> Vec<(usize, &str, Elem, u64, usize)> {
        let c = &self.plan.checked;
        c.plan.launches[li]
            .args
            .iter()
            .enumerate()
            .filter(|(_, &b)| matches!(c.bufs[b].elem, Elem::F32 | Elem::BF16 | Elem::F16))
            .map(|(j, &b)| (j, c.bufs[b].name.as_str(), c.bufs[b].elem, self.addrs[b], self.lens[b]))
            .collect()
    }

    /// The prepared call's inputs: (input name, device address, bytes).
    pub fn uploads(&self) -> impl Iterator<Item = (&str, u64, &[u8])> + '_ {
        self.uploads.iter().filter_map(|u| {
            let staging = self.staging.as_ref()?;
            // SAFETY: `stage` wrote `u.bytes` bytes at `u.at`, inside the
            // staging buffer.
            let bytes = unsafe { std::slice::from_raw_parts(staging.as_ptr().add(u.at), u.bytes) };
            Some((self.plan.checked.specs[u.input].name.as_str(), u.addr, bytes))
        })
    }

    /// Every launch's grid (None: empty, not launched) for the prepared call.
    pub fn grids(&self) -> &[Option<Dim3>] {
        &self.grids
    }

    /// Every launch's arguments for the prepared call, one launch after the
    /// other: buffer addresses, then scalars (as `u64`).
    pub fn args(&self) -> &[u64] {
        &self.args
    }

    /// How many launches of the prepared call have a non-empty grid.
    pub fn launched(&self) -> usize {
        self.grids.iter().filter(|g| g.is_some()).count()
    }

    /// Calls `f` for every kernel launch of the prepared call with a
    /// non-empty grid, in order, with what `cuLaunchKernel` takes: the
    /// launch's index, its kernel's index, grid, block, and one pointer per
    /// kernel parameter to its value in the argument table (valid during the
    /// call to `f`; the driver copies the values when it launches). Library
    /// calls are skipped: [`Host::each_issue`] gives both kinds in order.
    pub fn each_launch<E>(
        &mut self,
        mut f: impl FnMut(usize, usize, Dim3, Dim3, &mut [*mut c_void]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.each_issue(|issue| match issue {
            Issue::Kernel { launch, kernel, grid, block, params } => f(launch, kernel, grid, block, params),
            Issue::Gemm { .. } => Ok(()),
        })
    }

    /// Calls `f` for every launch of the prepared call that runs (a kernel
    /// with a non-empty grid, a library call with `m > 0`), in plan order.
    pub fn each_issue<E>(&mut self, mut f: impl FnMut(Issue<'_>) -> Result<(), E>) -> Result<(), E> {
        let c = &self.plan.checked;
        let mut params: Vec<*mut c_void> = Vec::with_capacity(self.max_args);
        for (li, launch) in c.plan.launches.iter().enumerate() {
            let Some(grid) = self.grids[li] else { continue };
            let args = &mut self.args[self.launch_at[li]..self.launch_at[li + 1]];
            if let Some(call) = self.plan.gemms[launch.kernel].as_ref() {
                // Arguments x, w, y, then the scalar m (see `LibraryCall::Gemm`).
                let &[x, w, y, m] = &args[..] else { unreachable!("checked by CudaPlan::new") };
                f(Issue::Gemm { launch: li, call, m, x, w, y })?;
                continue;
            }
            params.clear();
            for v in args {
                params.push(v as *mut u64 as *mut c_void);
            }
            f(Issue::Kernel {
                launch: li,
                kernel: launch.kernel,
                grid,
                block: self.plan.blocks[launch.kernel],
                params: &mut params,
            })?;
        }
        Ok(())
    }
}

/// One launch of a prepared call, as [`Host::each_issue`] gives it.
pub enum Issue<'a> {
    /// A PTX kernel: what `cuLaunchKernel` takes (see [`Host::each_launch`]).
    Kernel { launch: usize, kernel: usize, grid: Dim3, block: Dim3, params: &'a mut [*mut c_void] },
    /// A library GEMM `y[m, n] = x[m, k] · w[n, k]ᵀ` on device addresses
    /// `x`, `w`, `y`, each checked to hold what the call reads or writes.
    Gemm { launch: usize, call: &'a GemmCall, m: u64, x: u64, w: u64, y: u64 },
}
