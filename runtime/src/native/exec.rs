//! [`NativeModel`]: a [`NativePlan`], its kernel library and its weights,
//! run on a persistent thread team, as a [`Forward`] model.
//!
//! One call does, in order:
//! 1. fill the optional decoder inputs the caller left out
//!    ([`crate::model::fill_defaults`], the same defaults as the
//!    interpreter backend);
//! 2. validate every input and bind the shape symbols ([`super::bind`]);
//! 3. evaluate every buffer's length, check every alias and weight range,
//!    evaluate every launch's scalars and check that each argument's `needs`
//!    fits its buffer — all before any kernel runs, so a bad input or a plan
//!    that does not fit these symbol values never reaches machine code
//!    ([`CheckedPlan::size_call`]);
//! 4. place the inputs and scratch buffers in the arena by liveness
//!    ([`CheckedPlan::place_cached`], one placement per kind of call, kept
//!    while the sizes fit it), growing the arena (kept across calls) when
//!    it is too small, and copy the inputs in (converted to the buffer's
//!    element type);
//! 5. run every launch on the team, then copy the outputs into tensors of
//!    the signature's dtypes.
//!
//! A decode step ([`CachedDecode::step`]) keeps the KV cache in the model's
//! own memory, outside the arena, as the GPU runtime does on its device
//! ([`crate::cache`] finds the layout for both). Only the token inputs go
//! in and the last position's logits come out. Two ways:
//! - **in place**, when the plan lays its caches out for it
//!   ([`crate::plan::KvCachePlan`]): one buffer per cache with room for
//!   `capacity` positions is both the step's `past_key_values.*` and its
//!   `present.*`; the append kernels write only the new positions and
//!   attention reads the cache where it is. When a step needs more room,
//!   the buffers are reallocated (to twice the room, or what
//!   [`CachedDecode::reserve`] asked for) and the held positions moved to
//!   the new layout once;
//! - otherwise, each `present.*` root is computed into one of two buffers
//!   kept for the purpose, which the next step binds as its
//!   `past_key_values.*` while it writes its own `present.*` into the other
//!   (the kernels copy the past into the present each step). The buffers
//!   grow by doubling.
//!
//! The plan is checked once at construction ([`CheckedPlan::new`]): kernel and buffer indices,
//! argument counts and element types against the kernel entries, alias
//! chains (same element type, no cycle), weight offsets (64-byte aligned,
//! inside the weights file for constant shapes), every dim parsing, and the
//! plan's inputs and outputs against the signature.
//!
//! Weights are mapped copy-on-write: a kernel that wrote to a weight buffer
//! would only change this process's private copy, never the file.

use std::collections::BTreeMap;
use std::path::Path;

use smelt_ir::Tensor;

use super::arena::{AlignedBuf, ALIGN};
use super::checked::{
    check_file_name, plan_err, read_output, write_input, CallSizes, CheckedPlan, KvBinding, Placement,
};
use super::library::{KernelFn, KernelLibrary};
use super::team::Team;
use super::NativeError;
use crate::artifact::Signature;
use crate::cache::{CacheLayout, CallKind};
use crate::generate::{CachedDecode, Forward, ForwardError};
use crate::plan::{NativePlan, Storage};

/// The weights file's bytes, 64-byte aligned at their start.
pub struct Weights {
    data: WeightData,
}

enum WeightData {
    Map(memmap2::MmapMut),
    Owned(AlignedBuf),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({} bytes)", self.len())
    }
}

impl Weights {
    /// Maps the weights file copy-on-write (an empty file needs no mapping).
    pub fn map(path: &Path) -> Result<Weights, NativeError> {
        let io = |source| NativeError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Weights::from_bytes(&[]);
        }
        // SAFETY: a private copy-on-write mapping; the artifact's files are
        // not modified while a model runs (as with every memory-mapped
        // weights file).
        let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.map_err(io)?;
        // Weights are streamed whole every decode step, so 2 MiB pages save
        // page walks (costly in virtual machines). Where the file is not in
        // the page cache yet, this makes the faults read it ahead into huge
        // folios that the kernel maps whole; the compiler writes the file in
        // aligned 2 MiB blocks for the same reason (see `crate::constants`).
        // Only advice: a kernel without transparent huge pages refuses it,
        // and the weights are mapped in small pages as before.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Weights { data: WeightData::Map(map) })
    }

    /// A copy of `bytes` in aligned memory (tests, or weights built in memory).
    pub fn from_bytes(bytes: &[u8]) -> Result<Weights, NativeError> {
        let buf = AlignedBuf::copy_of(bytes).ok_or(NativeError::OutOfMemory { bytes: bytes.len() })?;
        Ok(Weights { data: WeightData::Owned(buf) })
    }

    pub fn len(&self) -> usize {
        match &self.data {
            WeightData::Map(m) => m.len(),
            WeightData::Owned(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            WeightData::Map(m) => m,
            // SAFETY: the buffer holds `len` initialised bytes.
            WeightData::Owned(b) => unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) },
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match &mut self.data {
            WeightData::Map(m) => m.as_mut_ptr(),
            WeightData::Owned(b) => b.as_ptr(),
        }
    }
}

/// The largest argument, in bytes, of a launch that one thread runs whole
/// rather than the team splitting it (see `NativeModel::execute`): 32 KiB
/// is about a microsecond of one core's streaming, which splitting cannot
/// save much of, and a prefill of more than a few tokens passes it (the
/// 960-wide projection of smollm2-135m at 9 tokens).
const SERIAL_BYTES: usize = 32 << 10;

/// One step of the thread team: launches `start..end`, either one launch
/// split into the team's parts or (`serial`) consecutive small launches
/// run whole by one thread.
#[derive(Debug, PartialEq)]
struct Step {
    start: usize,
    end: usize,
    serial: bool,
}

/// Fills `steps` with one step per launch, `serial[i]` saying whether
/// launch `i` runs whole on one thread, consecutive serial launches merged
/// into one step.
fn group_steps(steps: &mut Vec<Step>, serial: impl Iterator<Item = bool>) {
    steps.clear();
    for (i, serial) in serial.enumerate() {
        match steps.last_mut() {
            Some(last) if serial && last.serial => last.end = i + 1,
            _ => steps.push(Step { start: i, end: i + 1, serial }),
        }
    }
}

/// Counters for tests and profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeStats {
    /// Forward calls that ran their launches.
    pub calls: u64,
    /// Launches run (each by every thread of the team).
    pub launches: u64,
    /// The arena's current size in bytes.
    pub arena_bytes: usize,
    /// Memory held for the KV cache between decode steps, in bytes.
    pub cache_bytes: usize,
}

/// The KV cache kept between decode steps (see the module docs).
#[derive(Default)]
struct HostCache {
    /// Per present root of the [`CacheLayout`]: two buffers used in turn
    /// (in place: only the first, with room for `capacity` positions).
    slots: Vec<[Option<AlignedBuf>; 2]>,
    /// In place: the positions the buffers have room for, and the room
    /// the caller asked for ([`CachedDecode::reserve`]).
    capacity: usize,
    reserved: usize,
    /// The slot the cached tensors live in; the next step writes the other.
    cur: usize,
    /// Per cache pair: the cached tensor's address and shape. Empty when
    /// the cache is.
    entries: Vec<(usize, Vec<usize>)>,
    /// Cached positions.
    len: usize,
}

/// A natively compiled model, ready to run. It is `Send` (checked below), so
/// it may be moved to another thread; it is not meant to be shared.
pub struct NativeModel {
    checked: CheckedPlan,
    weights: Weights,
    /// Each launch's kernel.
    fns: Vec<KernelFn>,
    arena: AlignedBuf,
    /// How the plan keeps its KV cache, when it can, and the cache.
    layout: Option<CacheLayout>,
    /// The cache is kept in place (see the module docs).
    in_place: bool,
    cache: HostCache,
    /// Per [`CallKind`]: which buffers are arena roots, and their
    /// placement, kept while the call's sizes fit it (decode steps differ in a few
    /// sizes only; placing every root again took about 0.1 ms a step).
    keep: [Vec<bool>; 3],
    placements: [Placement; 3],
    /// Per-call tables, kept to avoid reallocating them.
    ptrs: Vec<usize>,
    steps: Vec<Step>,
    team: Team,
    stats: NativeStats,
    /// With `SMELT_PROFILE` set: seconds and launch count per kernel symbol,
    /// one table per distinct binding of the shape symbols other than the
    /// KV cache's (so a prefill and a decode step are reported apart),
    /// printed to stderr when the model is dropped. A launch is timed from
    /// the end of the one before it to its own end, in one team run as
    /// without profiling (which adds a clock read per part); its idle time
    /// is how long each thread waited after its last part of it.
    profile: Option<BTreeMap<String, ProfileTable>>,
    /// Declared last: dropped after the team and the tables that point into it.
    library: KernelLibrary,
}

/// One `SMELT_PROFILE` table: seconds and launches per kernel symbol over
/// the calls made with one binding of the shape symbols.
#[derive(Default)]
struct ProfileTable {
    calls: u64,
    kernels: BTreeMap<String, KernelProfile>,
}

/// One kernel's row of a profile table.
#[derive(Default)]
struct KernelProfile {
    /// Seconds its launches took (see `NativeModel::profile`).
    time: f64,
    /// Of those, the seconds an average thread of the team waited (for
    /// the launch's other parts, or while one thread ran a serial step).
    idle: f64,
    launches: u64,
}

impl Drop for NativeModel {
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            for (bindings, table) in profile {
                let mut rows: Vec<_> = table.kernels.iter().collect();
                rows.sort_by(|a, b| b.1.time.total_cmp(&a.1.time));
                let total: f64 = rows.iter().map(|r| r.1.time).sum();
                let idle: f64 = rows.iter().map(|r| r.1.idle).sum();
                eprintln!(
                    "smelt profile [{bindings}]: {:.3} ms per call ({} calls), threads idle {:.1}% of it",
                    total * 1e3 / table.calls.max(1) as f64,
                    table.calls,
                    idle / total.max(f64::MIN_POSITIVE) * 100.0
                );
                eprintln!("{:>12} {:>6} {:>6} {:>8}   kernel", "time", "share", "idle", "launches");
                for (sym, k) in rows {
                    eprintln!(
                        "{:9.2} ms {:5.1}% {:5.1}% {:8}   {sym}",
                        k.time * 1e3,
                        k.time / total * 100.0,
                        k.idle / k.time.max(f64::MIN_POSITIVE) * 100.0,
                        k.launches
                    );
                }
            }
        }
    }
}

impl std::fmt::Debug for NativeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeModel")
            .field("library", &self.library)
            .field("launches", &self.fns.len())
            .field("threads", &self.team.threads())
            .finish()
    }
}

const _: () = {
    fn assert_send<T: Send>() {}
    let _ = assert_send::<NativeModel>;
};

/// The number of threads to use for `threads == 0`: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl NativeModel {
    /// Opens `dir/plan.library` and maps `dir/plan.weights` (an artifact
    /// directory), then see [`NativeModel::new`].
    pub fn open(
        plan: NativePlan,
        signature: Signature,
        dir: &Path,
        threads: usize,
    ) -> Result<NativeModel, NativeError> {
        check_file_name(&plan.library)?;
        check_file_name(&plan.weights)?;
        let weights = Weights::map(&dir.join(&plan.weights))?;
        let lib = dir.join(&plan.library);
        NativeModel::new(plan, signature, &lib, weights, threads)
    }

    /// Checks the plan against the signature and the weights, loads the
    /// library (checking the host's CPU) and starts a team of `threads`
    /// threads (0: one per available core).
    pub fn new(
        plan: NativePlan,
        signature: Signature,
        library: &Path,
        weights: Weights,
        threads: usize,
    ) -> Result<NativeModel, NativeError> {
        let checked = CheckedPlan::new(plan, signature, weights.len())?;
        let plan = &checked.plan;
        let library = KernelLibrary::load(library, &plan.kernels, &plan.arch, &plan.cpu_features)?;
        let fns = plan
            .launches
            .iter()
            .enumerate()
            .map(|(li, l)| {
                library
                    .kernel(l.kernel)
                    .ok_or_else(|| plan_err(format!("launch {li} (`{}`): kernel {} is not loaded", l.node, l.kernel)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let threads = if threads == 0 { default_threads() } else { threads };
        let team = Team::new(threads).map_err(NativeError::Spawn)?;
        let arena = AlignedBuf::zeroed(0).ok_or(NativeError::OutOfMemory { bytes: ALIGN })?;
        let layout = CacheLayout::of(&checked);
        let in_place = match (&layout, &checked.kv) {
            (Some(l), Some(kv)) => l.pairs.iter().all(|p| {
                let info = &checked.bufs[p.present_buf];
                info.root == p.present_buf && info.shape.get(2) == Some(&smelt_ir::Dim::sym(&kv.capacity))
            }),
            _ => false,
        };
        let keep = CacheLayout::arena_roots(layout.as_ref(), checked.bufs.len(), in_place);
        Ok(NativeModel {
            keep,
            placements: Default::default(),
            in_place,
            checked,
            weights,
            fns,
            arena,
            layout,
            cache: HostCache::default(),
            ptrs: Vec::new(),
            steps: Vec::new(),
            team,
            stats: NativeStats::default(),
            profile: std::env::var_os("SMELT_PROFILE").map(|_| BTreeMap::new()),
            library,
        })
    }

    pub fn plan(&self) -> &NativePlan {
        &self.checked.plan
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    /// Whether decode steps keep the KV cache in place (see the module docs).
    pub fn cache_in_place(&self) -> bool {
        self.in_place
    }

    pub fn stats(&self) -> NativeStats {
        let cache_bytes = self.cache.slots.iter().flatten().flatten().map(|s| s.len()).sum();
        NativeStats { arena_bytes: self.arena.len(), cache_bytes, ..self.stats }
    }

    /// Runs the model once (see the module docs); the typed form of
    /// [`Forward::forward`]. It neither reads nor changes the decode cache.
    pub fn run(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, NativeError> {
        self.team.prewake();
        crate::model::fill_defaults(&self.checked.signature, &mut inputs);
        // Every length, alias and weight range, every launch's scalars and
        // needs: all checked before anything runs.
        let sizes = self.checked.size_call(&inputs, &BTreeMap::new(), KvBinding::Dense)?;
        let addrs = self.execute(&inputs, &sizes, false)?;

        // Copy the outputs out.
        let c = &self.checked;
        let mut out = BTreeMap::new();
        for (name, b, dtype) in &c.outputs {
            let shape = c.shape_of(*b, &sizes.syms)?;
            // SAFETY: the buffer holds its shape's elements (checked lengths).
            let t = unsafe { read_output(name, *dtype, c.bufs[*b].elem, addrs[*b], shape) }?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }

    /// One decode step with the cache in the model's memory (see the module
    /// docs); the typed form of [`CachedDecode::step`].
    pub fn step(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<Tensor, NativeError> {
        self.team.prewake();
        let layout = self.layout.as_ref().ok_or_else(|| {
            NativeError::NoCache("its plan has no past/present pairs computed into scratch memory".into())
        })?;
        CacheLayout::refuse_past(&inputs, "in its own memory")?;
        let shapes: Vec<&[usize]> = self.cache.entries.iter().map(|(_, s)| s.as_slice()).collect();
        CacheLayout::check_batch(&inputs, &shapes)?;
        let resident = layout.resident(&shapes);
        let held = (!resident.is_empty()).then_some(self.cache.len);
        crate::model::fill_defaults_after(&self.checked.signature, &mut inputs, held);
        let sizes = if self.in_place {
            let room = |capacity| KvBinding::Resident { capacity };
            match self.checked.size_call(&inputs, &resident, room(self.cache.capacity)) {
                Err(NativeError::CacheFull { filled, .. }) => {
                    let bound = self.capacity_bound();
                    let grown = filled.max(self.cache.reserved).max(self.cache.capacity.saturating_mul(2)).min(bound);
                    self.checked.size_call(&inputs, &resident, room(grown.max(filled)))?
                }
                sizes => sizes?,
            }
        } else {
            self.checked.size_call(&inputs, &resident, KvBinding::Dense)?
        };
        let outs = layout.step_outputs(&self.checked, &sizes)?;
        let addrs = self.execute(&inputs, &sizes, true)?;

        // The last position of each sequence: one row, or a gather of rows.
        let c = &self.checked;
        let (logits, elem) = (addrs[outs.logits_buf], c.bufs[outs.logits_buf].elem);
        let size = elem.size();
        let rows: Vec<usize> = outs.last_rows().collect();
        let shape = outs.returned_shape();
        let (name, dtype) = (&outs.logits_name, outs.logits_dtype);
        let contiguous = rows.windows(2).all(|w| w[1] == w[0] + outs.vocab);
        let t = if contiguous {
            let first = rows.first().copied().unwrap_or(0);
            // SAFETY: rows first.. hold `shape`'s elements inside the logits
            // buffer (its length was checked against [batch, seq, vocab]).
            unsafe { read_output(name, dtype, elem, logits.wrapping_add(first * size), shape) }?
        } else {
            let bytes = rows.len() * outs.vocab * size;
            let host = AlignedBuf::zeroed(bytes).ok_or(NativeError::OutOfMemory { bytes })?;
            for (k, &at) in rows.iter().enumerate() {
                // SAFETY: each row lies inside the logits buffer; `host` has
                // room for every row and does not overlap it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        logits.wrapping_add(at * size),
                        host.as_ptr().add(k * outs.vocab * size),
                        outs.vocab * size,
                    )
                };
            }
            // SAFETY: `host` holds `shape`'s elements of `elem`, aligned.
            unsafe { read_output(name, dtype, elem, host.as_ptr(), shape) }?
        };

        // The step ran: its presents become the cache, and the slot they
        // live in is the one the next step reads.
        let layout = self.layout.as_ref().ok_or_else(|| NativeError::NoCache("its layout is gone".into()))?;
        self.cache.entries =
            layout.pairs.iter().zip(outs.presents).map(|(p, shape)| (addrs[p.present_buf] as usize, shape)).collect();
        self.cache.len = self.cache.entries.first().and_then(|(_, s)| s.get(2).copied()).unwrap_or(0);
        if self.in_place {
            // The presents' shapes say `capacity` positions; the cache
            // holds the filled ones.
            let len = self.cache.len;
            let filled = self.checked.kv.as_ref().map(|kv| kv.filled.eval_map(&sizes.syms));
            self.cache.len = match filled {
                Some(Ok(f)) => f as usize,
                _ => len,
            };
            for (_, shape) in &mut self.cache.entries {
                shape[2] = self.cache.len;
            }
        } else {
            self.cache.cur = 1 - self.cache.cur;
        }
        Ok(t)
    }

    /// The most positions an in-place cache may have room for: the bound
    /// of the plan's capacity symbol.
    fn capacity_bound(&self) -> usize {
        let kv = self.checked.kv.as_ref();
        kv.and_then(|kv| self.checked.bounds.get(&kv.capacity)).map_or(usize::MAX, |&(_, max)| max.max(0) as usize)
    }

    /// Moves the held positions of in-place cache buffer `k` (laid out for
    /// `self.cache.capacity` positions) into `to`, laid out for `capacity`.
    fn relayout(&self, k: usize, to: &AlignedBuf, capacity: usize) {
        let (Some(Some(from)), Some((_, shape))) = (self.cache.slots.get(k).map(|s| &s[0]), self.cache.entries.get(k))
        else {
            return;
        };
        let elem = self.layout.as_ref().map_or(4, |l| self.checked.bufs[l.pairs[k].present_buf].elem.size());
        let &[batch, heads, len, width] = shape.as_slice() else { return };
        let (old, row) = (self.cache.capacity, width * elem);
        for bh in 0..batch * heads {
            // SAFETY: `from` holds `batch * heads` blocks of `old >= len`
            // rows and `to` as many blocks of `capacity >= len` rows, each
            // row `width` elements of `elem` bytes; they do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    from.as_ptr().add(bh * old * row),
                    to.as_ptr().add(bh * capacity * row),
                    len * row,
                )
            };
        }
    }

    /// Places the call's buffers, copies the given inputs in and runs every
    /// launch; returns every buffer's address. For a decode `step`, the
    /// `present.*` roots go to the cache slot the held cache is not in, and
    /// the `past_key_values.*` inputs are the held cache (when it holds any).
    fn execute(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        sizes: &CallSizes,
        step: bool,
    ) -> Result<Vec<*mut u8>, NativeError> {
        let c = &self.checked;
        let lens = &sizes.lens;
        let layout = if step { self.layout.as_ref() } else { None };
        let resident = layout.is_some() && !self.cache.entries.is_empty();

        // Placement of the inputs and scratch buffers.
        let kind = match (layout.is_some(), resident) {
            (false, _) => CallKind::Run,
            (true, false) => CallKind::FirstStep,
            (true, true) => CallKind::Step,
        } as usize;
        c.place_cached(lens, &self.keep[kind], &mut self.placements[kind])?;
        let (offsets, total) = (self.placements[kind].offsets(), self.placements[kind].total());
        if total > self.arena.len() {
            // The old contents are not needed: every call writes its buffers anew.
            self.arena = AlignedBuf::zeroed(total).ok_or(NativeError::OutOfMemory { bytes: total })?;
        }
        let arena = self.arena.as_ptr();
        let weights = self.weights.ptr();
        let mut root_ptr = vec![std::ptr::null_mut::<u8>(); c.bufs.len()];
        for (b, off) in offsets.iter().enumerate() {
            if let Some(off) = off {
                // SAFETY: off + bytes <= total <= arena length.
                root_ptr[b] = unsafe { arena.add(*off) };
            }
        }
        for (b, info) in c.bufs.iter().enumerate() {
            if let Storage::Weight { offset } = c.plan.buffers[b].storage {
                if info.root == b {
                    // SAFETY: checked by `size_call` to lie inside the file.
                    root_ptr[b] = unsafe { weights.add(offset as usize) };
                }
            }
        }
        if let (Some(layout), true) = (layout, self.in_place) {
            let capacity =
                self.checked.kv.as_ref().and_then(|kv| sizes.syms.get(&kv.capacity)).map_or(0, |&c| c as usize);
            self.cache.slots.resize_with(layout.pairs.len(), Default::default);
            for (k, p) in layout.pairs.iter().enumerate() {
                let r = p.present_buf;
                // No overflow: `size_call` checked every buffer's size in bytes.
                let bytes = lens[r] * c.bufs[r].elem.size();
                if capacity != self.cache.capacity || self.cache.slots[k][0].is_none() {
                    let buf = AlignedBuf::zeroed(bytes).ok_or(NativeError::CacheOutOfMemory { bytes })?;
                    if !self.cache.entries.is_empty() {
                        self.relayout(k, &buf, capacity);
                    }
                    self.cache.slots[k][0] = Some(buf);
                }
                let slot = self.cache.slots[k][0].as_ref().map_or(std::ptr::null_mut(), |s| s.as_ptr());
                // The same memory is the past the step reads and the
                // present it writes (the appends copy no past).
                root_ptr[r] = slot;
                root_ptr[p.past_buf] = slot;
            }
            self.cache.capacity = capacity;
        } else if let Some(layout) = layout {
            let write = 1 - self.cache.cur;
            self.cache.slots.resize_with(layout.present_roots.len(), Default::default);
            for (k, &r) in layout.present_roots.iter().enumerate() {
                // No overflow: `size_call` checked every buffer's size in bytes.
                let bytes = lens[r] * c.bufs[r].elem.size();
                let slot = &mut self.cache.slots[k][write];
                let have = slot.as_ref().map_or(0, |s| s.len());
                if slot.is_none() || have < bytes {
                    let grown = bytes.max(have.saturating_mul(2));
                    // Drop the old buffer first, so its memory can be reused.
                    *slot = None;
                    *slot = Some(AlignedBuf::zeroed(grown).ok_or(NativeError::CacheOutOfMemory { bytes: grown })?);
                }
                root_ptr[r] = slot.as_ref().map_or(std::ptr::null_mut(), |s| s.as_ptr());
            }
            if resident {
                for (p, (addr, _)) in layout.pairs.iter().zip(&self.cache.entries) {
                    root_ptr[p.past_buf] = *addr as *mut u8;
                }
            }
        }
        // Every buffer's address: its root's plus its offset in the root
        // (`size_call` proved every alias lies inside its root). Buffers no
        // launch uses keep a meaningless address they are never read at.
        let addrs: Vec<*mut u8> = c
            .bufs
            .iter()
            .enumerate()
            .map(|(b, info)| root_ptr[info.root].wrapping_add(sizes.elem_offsets[b] * info.elem.size()))
            .collect();

        // Copy the inputs in (a step's resident past is already in place).
        for (spec, &b) in c.specs.iter().zip(&c.input_bufs) {
            let Some(t) = inputs.get(&spec.name) else { continue };
            // SAFETY: the buffer is placed for `lens[b]` elements of its type, aligned.
            unsafe { write_input(&spec.name, t, c.bufs[b].elem, addrs[b], lens[b]) }?;
        }

        // The pointer table, one block of arguments per launch.
        self.ptrs.clear();
        for launch in &c.plan.launches {
            for &b in &launch.args {
                self.ptrs.push(addrs[b] as usize);
            }
        }
        // The team runs steps: a launch of its own, split into the team's
        // parts, or a run of consecutive small launches (every argument at
        // most `SERIAL_BYTES`), which one thread runs whole, one after the
        // other. A decode step's slices, transposes, rotations and norms
        // touch a few kilobytes each: split over threads, each paid a
        // synchronisation of the team and moved its data between cores,
        // which cost more than the kernel itself (in smollm2-135m's decode
        // profile these kernels took about three times as long split).
        let threads = self.team.threads();
        // A launch that says how much it moves (an append to a cache kept
        // in place) is judged by that instead of its arguments' sizes.
        let small = |(l, d): (&crate::plan::Launch, &super::checked::LaunchDims)| {
            let work = d.work_id.and_then(|id| sizes.vals[id as usize]);
            match work {
                Some(bytes) => bytes <= SERIAL_BYTES as i64,
                None => l.args.iter().all(|&b| lens[b] * c.bufs[b].elem.size() <= SERIAL_BYTES),
            }
        };
        group_steps(&mut self.steps, c.plan.launches.iter().zip(&c.launches).map(|x| threads > 1 && small(x)));
        // A kernel splits its parallel loop into `parts` shares and computes
        // share `part` (the kernel ABI calls them thread and threads).
        let parts = self.team.parts() as i64;
        let ptrs = self.ptrs.as_ptr() as usize;
        let scalars = sizes.scalars.as_ptr() as usize;
        let launches = &c.launches;
        let fns = &self.fns;
        let call = |i: usize, part: i64, parts: i64| {
            let l = &launches[i];
            let bufs = (ptrs as *const *mut u8).wrapping_add(l.arg_at);
            let sc = (scalars as *const i64).wrapping_add(l.scalar_at);
            // SAFETY: every argument points to a live buffer of the kernel's
            // element type with at least `needs` elements (checked above),
            // the scalars are the ones those needs were computed with, and
            // the library outlives this call.
            unsafe { (fns[i])(bufs, sc, part, parts) };
        };
        let steps = &self.steps;
        // Runs part `part` of step `s`, then `after(launch)` for each launch
        // it ran (profiles time the launches with it).
        let task = |s: usize, part: usize, after: &dyn Fn(usize)| {
            let st = &steps[s];
            if !st.serial {
                call(st.start, part as i64, parts);
                after(st.start);
            } else if part == 0 {
                for i in st.start..st.end {
                    call(i, 0, 1);
                    after(i);
                }
            }
        };
        match &mut self.profile {
            None => self.team.run(steps.len(), &|s, part| task(s, part, &|_| {}))?,
            Some(profile) => {
                // The cache's own symbols (its capacity, how much of it is
                // filled) change every decode step; leaving them out keeps
                // one table per kind of call (a prefill of n tokens, a decode).
                let cache_syms: Vec<String> = self.checked.kv.as_ref().map_or_else(Vec::new, |kv| {
                    let mut v = kv.past.symbols();
                    v.extend([kv.capacity.clone(), kv.copied.clone()]);
                    v
                });
                let bindings: Vec<String> = sizes
                    .syms
                    .iter()
                    .filter(|(k, _)| !cache_syms.contains(k))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let table = profile.entry(bindings.join(" ")).or_default();
                table.calls += 1;
                // The launches run in one team run, as without profiling;
                // each part records when it finished, and a launch's time
                // is from the end of the launch before it (its last part)
                // to its own end. That charges a launch its barrier, not a
                // wake-up of the team per launch, which made small kernels
                // look several microseconds slower than they are.
                use std::sync::atomic::{AtomicU64, Ordering};
                let ends: Vec<AtomicU64> = (0..launches.len()).map(|_| AtomicU64::new(0)).collect();
                let start = std::time::Instant::now();
                // Each thread's last part of each launch ends at
                // `by_thread[launch * threads + thread]`; from then to the
                // launch's end the thread waited (or ran nothing in it).
                let threads = self.team.threads();
                let by_thread: Vec<AtomicU64> = (0..launches.len() * threads).map(|_| AtomicU64::new(0)).collect();
                let end = |i: usize| {
                    let now = start.elapsed().as_nanos() as u64;
                    ends[i].fetch_max(now, Ordering::Relaxed);
                    by_thread[i * threads + super::team::current_thread()].fetch_max(now, Ordering::Relaxed);
                };
                self.team.run(steps.len(), &|s, part| task(s, part, &end))?;
                let mut before = 0;
                for (i, end) in ends.iter().enumerate() {
                    let end = end.load(Ordering::Relaxed).max(before);
                    let idle: u64 = (0..threads)
                        .map(|t| end - by_thread[i * threads + t].load(Ordering::Relaxed).clamp(before, end))
                        .sum();
                    let e = table.kernels.entry(c.symbol_of(i).to_string()).or_default();
                    e.time += (end - before) as f64 * 1e-9;
                    e.idle += idle as f64 * 1e-9 / threads as f64;
                    e.launches += 1;
                    before = end;
                }
            }
        }
        self.stats.calls += 1;
        self.stats.launches += launches.len() as u64;
        Ok(addrs)
    }
}

impl Forward for NativeModel {
    fn signature(&self) -> &Signature {
        &self.checked.signature
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        Ok(self.run(inputs)?)
    }

    fn sleep_when_idle(&mut self, sleep: bool) {
        self.team.set_idle_spin(if sleep { std::time::Duration::ZERO } else { super::team::SLEEP_AFTER });
    }

    fn cache(&mut self) -> Option<&mut dyn CachedDecode> {
        if self.layout.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl CachedDecode for NativeModel {
    fn reset(&mut self) {
        // The slots stay allocated for the next sequence.
        self.cache.entries.clear();
        self.cache.len = 0;
    }

    fn reserve(&mut self, positions: usize) {
        self.cache.reserved = positions;
    }

    fn cached_len(&self) -> usize {
        self.cache.len
    }

    fn step(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Tensor, ForwardError> {
        Ok(NativeModel::step(self, inputs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{group_steps, Step};

    #[test]
    fn consecutive_small_launches_share_a_step_and_others_get_their_own() {
        let mut steps = vec![Step { start: 9, end: 9, serial: true }];
        group_steps(&mut steps, [false, true, true, false, false, true].into_iter());
        let got: Vec<(usize, usize, bool)> = steps.iter().map(|s| (s.start, s.end, s.serial)).collect();
        assert_eq!(got, [(0, 1, false), (1, 3, true), (3, 4, false), (4, 5, false), (5, 6, true)]);
        group_steps(&mut steps, std::iter::empty());
        assert!(steps.is_empty());
    }
}
