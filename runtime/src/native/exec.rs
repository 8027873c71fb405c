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
//!    ([`CheckedPlan::place`]), growing the arena (kept across calls) when
//!    it is too small, and copy the inputs in (converted to the buffer's
//!    element type);
//! 5. run every launch on the team, then copy the outputs into tensors of
//!    the signature's dtypes.
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
use super::checked::{check_file_name, plan_err, read_output, write_input, CheckedPlan};
use super::library::{KernelFn, KernelLibrary};
use super::team::Team;
use super::NativeError;
use crate::artifact::Signature;
use crate::generate::{Forward, ForwardError};
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

/// Counters for tests and profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeStats {
    /// Forward calls that ran their launches.
    pub calls: u64,
    /// Launches run (each by every thread of the team).
    pub launches: u64,
    /// The arena's current size in bytes.
    pub arena_bytes: usize,
}

/// A natively compiled model, ready to run. It is `Send` (checked below), so
/// it may be moved to another thread; it is not meant to be shared.
pub struct NativeModel {
    checked: CheckedPlan,
    weights: Weights,
    /// Each launch's kernel.
    fns: Vec<KernelFn>,
    arena: AlignedBuf,
    /// Per-call table, kept to avoid reallocating it.
    ptrs: Vec<usize>,
    team: Team,
    stats: NativeStats,
    /// With `SMELT_PROFILE` set: seconds and launch count per kernel symbol,
    /// printed to stderr when the model is dropped. Profiling runs launches
    /// one at a time, so the total is a little slower than a normal run.
    profile: Option<BTreeMap<String, (f64, u64)>>,
    /// Declared last: dropped after the team and the tables that point into it.
    library: KernelLibrary,
}

impl Drop for NativeModel {
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            let mut rows: Vec<_> = profile.iter().collect();
            rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
            let total: f64 = rows.iter().map(|r| r.1 .0).sum();
            eprintln!("smelt profile: {:.1} ms in {} calls", total * 1e3, self.stats.calls);
            for (sym, (secs, n)) in rows {
                eprintln!("{:9.2} ms {:5.1}% {n:6} x {sym}", secs * 1e3, secs / total * 100.0);
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
        Ok(NativeModel {
            checked,
            weights,
            fns,
            arena,
            ptrs: Vec::new(),
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

    pub fn stats(&self) -> NativeStats {
        NativeStats { arena_bytes: self.arena.len(), ..self.stats }
    }

    /// Runs the model once (see the module docs); the typed form of
    /// [`Forward::forward`].
    pub fn run(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, NativeError> {
        let c = &self.checked;
        crate::model::fill_defaults(&c.signature, &mut inputs);
        // Every length, alias and weight range, every launch's scalars and
        // needs: all checked before anything runs.
        let sizes = c.size_call(&inputs, &BTreeMap::new())?;
        let lens = &sizes.lens;

        // Placement of the inputs and scratch buffers.
        let (offsets, total) = c.place(lens, &|_| true)?;
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
        let ptr_of = |b: usize| -> *mut u8 {
            let info = &c.bufs[b];
            // SAFETY: `size_call` proved every alias lies inside its root.
            unsafe { root_ptr[info.root].add(sizes.elem_offsets[b] * info.elem.size()) }
        };

        // Copy the inputs in.
        for (spec, &b) in c.specs.iter().zip(&c.input_bufs) {
            let t = &inputs[&spec.name];
            // SAFETY: the buffer is placed for `lens[b]` elements of its type, aligned.
            unsafe { write_input(&spec.name, t, c.bufs[b].elem, ptr_of(b), lens[b]) }?;
        }

        // The pointer table, one block of arguments per launch.
        self.ptrs.clear();
        for launch in &c.plan.launches {
            for &b in &launch.args {
                self.ptrs.push(ptr_of(b) as usize);
            }
        }
        let threads = self.team.threads() as i64;
        let ptrs = self.ptrs.as_ptr() as usize;
        let scalars = sizes.scalars.as_ptr() as usize;
        let launches = &c.launches;
        let fns = &self.fns;
        let task = |i: usize, t: usize| {
            let l = &launches[i];
            let bufs = (ptrs as *const *mut u8).wrapping_add(l.arg_at);
            let sc = (scalars as *const i64).wrapping_add(l.scalar_at);
            // SAFETY: every argument points to a live buffer of the kernel's
            // element type with at least `needs` elements (checked above),
            // the scalars are the ones those needs were computed with, and
            // the library outlives this call.
            unsafe { (fns[i])(bufs, sc, t as i64, threads) };
        };
        match &mut self.profile {
            None => self.team.run(launches.len(), &task)?,
            Some(profile) => {
                for i in 0..launches.len() {
                    let start = std::time::Instant::now();
                    self.team.run(1, &|_, t| task(i, t))?;
                    let e = profile.entry(c.symbol_of(i).to_string()).or_default();
                    e.0 += start.elapsed().as_secs_f64();
                    e.1 += 1;
                }
            }
        }
        self.stats.calls += 1;
        self.stats.launches += launches.len() as u64;

        // Copy the outputs out.
        let mut out = BTreeMap::new();
        for (name, b, dtype) in &c.outputs {
            let shape = c.shape_of(*b, &sizes.syms)?;
            // SAFETY: the buffer holds its shape's elements (checked lengths).
            let t = unsafe { read_output(name, *dtype, c.bufs[*b].elem, ptr_of(*b), shape) }?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}

impl Forward for NativeModel {
    fn signature(&self) -> &Signature {
        &self.checked.signature
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        Ok(self.run(inputs)?)
    }
}
