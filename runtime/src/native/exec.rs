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
//!    that does not fit these symbol values never reaches machine code;
//! 4. place the inputs and scratch buffers in the arena by liveness
//!    ([`super::arena::place`]), growing the arena (kept across calls) when
//!    it is too small, and copy the inputs in (converted to the buffer's
//!    element type);
//! 5. run every launch on the team, then copy the outputs into tensors of
//!    the signature's dtypes.
//!
//! The plan is checked once at construction: kernel and buffer indices,
//! argument counts and element types against the kernel entries, alias
//! chains (same element type, no cycle), weight offsets (64-byte aligned,
//! inside the weights file for constant shapes), every dim parsing, and the
//! plan's inputs and outputs against the signature.
//!
//! Weights are mapped copy-on-write: a kernel that wrote to a weight buffer
//! would only change this process's private copy, never the file.

use std::collections::BTreeMap;
use std::path::Path;

use smelt_ir::{DType, Data, Dim, Tensor};

use super::arena::{place, AlignedBuf, Interval, ALIGN};
use super::bind::{bind_symbols, InputSpec};
use super::library::{KernelFn, KernelLibrary};
use super::team::Team;
use super::NativeError;
use crate::artifact::Signature;
use crate::generate::{Forward, ForwardError};
use crate::plan::{Elem, NativePlan, Storage};

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

/// A buffer with its dims parsed and its alias chain resolved.
#[derive(Clone, Debug)]
struct BufInfo {
    name: String,
    elem: Elem,
    shape: Vec<Dim>,
    /// The buffer owning the memory (itself unless an alias).
    root: usize,
    /// For an alias: (its direct target, its offset in elements).
    alias: Option<(usize, Dim)>,
}

#[derive(Clone, Debug)]
struct LaunchInfo {
    f: KernelFn,
    needs: Vec<Dim>,
    scalars: Vec<Dim>,
    /// Where its arguments and scalars start in the flat per-call tables.
    arg_at: usize,
    scalar_at: usize,
}

/// A natively compiled model, ready to run. It is `Send` (checked below), so
/// it may be moved to another thread; it is not meant to be shared.
pub struct NativeModel {
    plan: NativePlan,
    signature: Signature,
    weights: Weights,
    bufs: Vec<BufInfo>,
    launches: Vec<LaunchInfo>,
    /// The inputs as declared, and the buffer of each.
    specs: Vec<InputSpec>,
    input_bufs: Vec<usize>,
    /// (name, buffer, dtype of the tensor returned).
    outputs: Vec<(String, usize, DType)>,
    bounds: BTreeMap<String, (i64, i64)>,
    /// Per root buffer placed in the arena: its lifetime (inclusive launch
    /// range). None for weights and for buffers the arena does not hold.
    lifetimes: Vec<Option<(usize, usize)>>,
    arena: AlignedBuf,
    /// Per-call tables, kept to avoid reallocating them.
    ptrs: Vec<usize>,
    scalars: Vec<i64>,
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
            .field("launches", &self.launches.len())
            .field("threads", &self.team.threads())
            .finish()
    }
}

const _: () = {
    fn assert_send<T: Send>() {}
    let _ = assert_send::<NativeModel>;
};

fn plan_err(msg: impl Into<String>) -> NativeError {
    NativeError::Plan(msg.into())
}

fn parse_dim(text: &str, what: &dyn Fn() -> String) -> Result<Dim, NativeError> {
    text.parse::<Dim>().map_err(|e| plan_err(format!("{}: {e}", what())))
}

/// The dtype a buffer of `elem` is returned as when the signature does not say.
fn natural_dtype(elem: Elem) -> DType {
    match elem {
        Elem::F32 => DType::F32,
        Elem::I32 => DType::I32,
        Elem::I64 => DType::I64,
        Elem::Bool => DType::Bool,
        Elem::BF16 => DType::BF16,
        Elem::F16 => DType::F16,
    }
}

/// Whether tensors of `dtype` can be passed in a buffer of `elem`.
fn convertible(dtype: DType, elem: Elem) -> bool {
    match elem {
        Elem::F32 => dtype.is_float(),
        Elem::I32 | Elem::I64 => dtype.is_int(),
        Elem::Bool => dtype == DType::Bool,
        // Narrow buffers hold constants only; inputs are never passed in them.
        Elem::BF16 | Elem::F16 => false,
    }
}

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
        for name in [&plan.library, &plan.weights] {
            if name.is_empty() || name.contains('/') || name.contains('\\') || name == "." || name == ".." {
                return Err(plan_err(format!("file name `{name}` is not a plain file name inside the artifact")));
            }
        }
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
        let (bufs, lifetimes) = check_buffers(&plan, &weights)?;
        let library = KernelLibrary::load(library, &plan.kernels, &plan.arch, &plan.cpu_features)?;
        let launches = check_launches(&plan, &bufs, &library)?;
        let (inputs, outputs) = check_io(&plan, &signature, &bufs)?;
        let (specs, input_bufs) = inputs.into_iter().unzip();
        let mut bounds: BTreeMap<String, (i64, i64)> =
            signature.symbols.iter().map(|(n, b)| (n.clone(), (b.min, b.max))).collect();
        for (n, min, max) in &plan.symbols {
            bounds.insert(n.clone(), (*min, *max));
        }
        let threads = if threads == 0 { default_threads() } else { threads };
        let team = Team::new(threads).map_err(NativeError::Spawn)?;
        let arena = AlignedBuf::zeroed(0).ok_or(NativeError::OutOfMemory { bytes: ALIGN })?;
        Ok(NativeModel {
            plan,
            signature,
            weights,
            bufs,
            launches,
            specs,
            input_bufs,
            outputs,
            bounds,
            lifetimes,
            arena,
            ptrs: Vec::new(),
            scalars: Vec::new(),
            team,
            stats: NativeStats::default(),
            profile: std::env::var_os("SMELT_PROFILE").map(|_| BTreeMap::new()),
            library,
        })
    }

    pub fn plan(&self) -> &NativePlan {
        &self.plan
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
        crate::model::fill_defaults(&self.signature, &mut inputs);
        let syms = bind_symbols(&self.specs, &inputs, &self.bounds)?;

        // Every length, alias and weight range, every launch's scalars and
        // needs: all checked before anything runs.
        let lens = self.buffer_lens(&syms)?;
        self.check_views(&syms, &lens)?;
        self.scalars.clear();
        for (li, l) in self.launches.iter().enumerate() {
            let launch = &self.plan.launches[li];
            let err = |why: String| NativeError::Launch {
                launch: li,
                node: launch.node.clone(),
                kernel: self.plan.kernels[launch.kernel].symbol.clone(),
                why,
            };
            for (j, d) in l.scalars.iter().enumerate() {
                let v = d.eval_map(&syms).map_err(|e| err(format!("scalar {j} `{d}`: {e}")))?;
                self.scalars.push(v);
            }
            for (j, (d, &b)) in l.needs.iter().zip(&launch.args).enumerate() {
                let need = d.eval_map(&syms).map_err(|e| err(format!("argument {j}: needs `{d}`: {e}")))?;
                if need < 0 || need as u128 > lens[b] as u128 {
                    return Err(err(format!(
                        "argument {j} needs {need} elements (`{d}`) but buffer `{}` has {}",
                        self.bufs[b].name, lens[b]
                    )));
                }
            }
        }

        // Placement of the inputs and scratch buffers.
        let mut items = Vec::new();
        let mut placed_roots = Vec::new();
        for (b, life) in self.lifetimes.iter().enumerate() {
            if let Some((first, last)) = *life {
                let bytes = lens[b]
                    .checked_mul(self.bufs[b].elem.size())
                    .ok_or(NativeError::ArenaTooLarge { bytes: lens[b] as u128 * self.bufs[b].elem.size() as u128 })?;
                items.push(Interval { bytes, first, last });
                placed_roots.push(b);
            }
        }
        let (offsets, total) = place(&items)
            .ok_or(NativeError::ArenaTooLarge { bytes: items.iter().map(|i| i.bytes as u128 + ALIGN as u128).sum() })?;
        if total > self.arena.len() {
            // The old contents are not needed: every call writes its buffers anew.
            self.arena = AlignedBuf::zeroed(total).ok_or(NativeError::OutOfMemory { bytes: total })?;
        }
        let arena = self.arena.as_ptr();
        let weights = self.weights.ptr();
        let mut root_ptr = vec![std::ptr::null_mut::<u8>(); self.bufs.len()];
        for (k, &b) in placed_roots.iter().enumerate() {
            // SAFETY: offsets[k] + bytes <= total <= arena length.
            root_ptr[b] = unsafe { arena.add(offsets[k]) };
        }
        for (b, info) in self.bufs.iter().enumerate() {
            if let Storage::Weight { offset } = self.plan.buffers[b].storage {
                if info.root == b {
                    // SAFETY: checked by `check_views` to lie inside the file.
                    root_ptr[b] = unsafe { weights.add(offset as usize) };
                }
            }
        }
        let ptr_of = |b: usize, elem_offsets: &[usize]| -> *mut u8 {
            let info = &self.bufs[b];
            // SAFETY: `check_views` proved every alias lies inside its root.
            unsafe { root_ptr[info.root].add(elem_offsets[b] * info.elem.size()) }
        };
        let elem_offsets = self.alias_offsets(&syms);

        // Copy the inputs in.
        for (spec, &b) in self.specs.iter().zip(&self.input_bufs) {
            let t = &inputs[&spec.name];
            write_input(&spec.name, t, self.bufs[b].elem, ptr_of(b, &elem_offsets), lens[b])?;
        }

        // The pointer table, one block of arguments per launch.
        self.ptrs.clear();
        for launch in &self.plan.launches {
            for &b in &launch.args {
                self.ptrs.push(ptr_of(b, &elem_offsets) as usize);
            }
        }
        let threads = self.team.threads() as i64;
        let ptrs = self.ptrs.as_ptr() as usize;
        let scalars = self.scalars.as_ptr() as usize;
        let launches = &self.launches;
        let task = |i: usize, t: usize| {
            let l = &launches[i];
            let bufs = (ptrs as *const *mut u8).wrapping_add(l.arg_at);
            let sc = (scalars as *const i64).wrapping_add(l.scalar_at);
            // SAFETY: every argument points to a live buffer of the kernel's
            // element type with at least `needs` elements (checked above),
            // the scalars are the ones those needs were computed with, and
            // the library outlives this call.
            unsafe { (l.f)(bufs, sc, t as i64, threads) };
        };
        match &mut self.profile {
            None => self.team.run(launches.len(), &task)?,
            Some(profile) => {
                for i in 0..launches.len() {
                    let start = std::time::Instant::now();
                    self.team.run(1, &|_, t| task(i, t))?;
                    let e = profile.entry(self.plan.kernels[self.plan.launches[i].kernel].symbol.clone()).or_default();
                    e.0 += start.elapsed().as_secs_f64();
                    e.1 += 1;
                }
            }
        }
        self.stats.calls += 1;
        self.stats.launches += launches.len() as u64;

        // Copy the outputs out.
        let mut out = BTreeMap::new();
        for (name, b, dtype) in &self.outputs {
            let shape: Vec<usize> = self.bufs[*b]
                .shape
                .iter()
                .map(|d| d.eval_map(&syms).map(|v| v as usize))
                .collect::<Result<_, _>>()
                .map_err(|e| NativeError::Buffer { buffer: self.bufs[*b].name.clone(), why: e.to_string() })?;
            out.insert(name.clone(), read_output(name, *dtype, self.bufs[*b].elem, ptr_of(*b, &elem_offsets), shape)?);
        }
        Ok(out)
    }

    /// Every buffer's element count for these symbol values.
    fn buffer_lens(&self, syms: &BTreeMap<String, i64>) -> Result<Vec<usize>, NativeError> {
        self.bufs
            .iter()
            .map(|info| {
                let err = |why: String| NativeError::Buffer { buffer: info.name.clone(), why };
                let mut n: usize = 1;
                for d in &info.shape {
                    let v = d.eval_map(syms).map_err(|e| err(format!("dim `{d}`: {e}")))?;
                    let v = usize::try_from(v).map_err(|_| err(format!("dim `{d}` = {v} is negative")))?;
                    n = n.checked_mul(v).ok_or_else(|| err("its length overflows".to_string()))?;
                }
                n.checked_mul(info.elem.size()).ok_or_else(|| err("its size in bytes overflows".to_string()))?;
                Ok(n)
            })
            .collect()
    }

    /// Every alias's offset from its root, in elements (valid after `check_views`).
    fn alias_offsets(&self, syms: &BTreeMap<String, i64>) -> Vec<usize> {
        (0..self.bufs.len())
            .map(|b| {
                let mut at = b;
                let mut total = 0usize;
                while let Some((to, off)) = &self.bufs[at].alias {
                    total += off.eval_map(syms).unwrap_or(0) as usize;
                    at = *to;
                }
                total
            })
            .collect()
    }

    /// Checks that every alias lies inside its target and every weight
    /// inside the weights file.
    fn check_views(&self, syms: &BTreeMap<String, i64>, lens: &[usize]) -> Result<(), NativeError> {
        for (b, info) in self.bufs.iter().enumerate() {
            let err = |why: String| NativeError::Buffer { buffer: info.name.clone(), why };
            if let Some((to, off)) = &info.alias {
                let o = off.eval_map(syms).map_err(|e| err(format!("alias offset `{off}`: {e}")))?;
                let fits = o >= 0 && (o as u128 + lens[b] as u128) <= lens[*to] as u128;
                if !fits {
                    return Err(err(format!(
                        "a view of {} elements at offset {o} does not fit in `{}` ({} elements)",
                        lens[b], self.bufs[*to].name, lens[*to]
                    )));
                }
            }
            if let Storage::Weight { offset } = self.plan.buffers[b].storage {
                let end = offset as u128 + (lens[b] * info.elem.size()) as u128;
                if end > self.weights.len() as u128 {
                    return Err(err(format!(
                        "weight bytes {offset}..{end} lie outside the weights file ({} bytes)",
                        self.weights.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Forward for NativeModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        Ok(self.run(inputs)?)
    }
}

/// Parses the buffers, resolves alias chains, checks weights statically and
/// computes each arena root's lifetime.
#[allow(clippy::type_complexity)]
fn check_buffers(
    plan: &NativePlan,
    weights: &Weights,
) -> Result<(Vec<BufInfo>, Vec<Option<(usize, usize)>>), NativeError> {
    let n = plan.buffers.len();
    let mut bufs = Vec::with_capacity(n);
    for (i, b) in plan.buffers.iter().enumerate() {
        let what = || format!("buffer {i} `{}`", b.name);
        let shape = b.shape.iter().map(|s| parse_dim(s, &what)).collect::<Result<Vec<_>, _>>()?;
        let alias = match &b.storage {
            Storage::Alias { of, offset } => {
                if *of >= n {
                    return Err(plan_err(format!("{} is a view of buffer {of}, which does not exist", what())));
                }
                if plan.buffers[*of].elem != b.elem {
                    return Err(plan_err(format!(
                        "{} ({:?}) is a view of `{}` ({:?}); views keep the element type",
                        what(),
                        b.elem,
                        plan.buffers[*of].name,
                        plan.buffers[*of].elem
                    )));
                }
                Some((*of, parse_dim(offset, &what)?))
            }
            Storage::Weight { offset } => {
                if offset % ALIGN as u64 != 0 {
                    return Err(plan_err(format!("{}: weight offset {offset} is not {ALIGN}-byte aligned", what())));
                }
                let len: Option<i64> = shape.iter().try_fold(1i64, |a, d| d.as_const().and_then(|c| a.checked_mul(c)));
                let Some(len) = len.filter(|&l| l >= 0) else {
                    return Err(plan_err(format!("{}: a weight needs a constant shape, found {:?}", what(), b.shape)));
                };
                let end = *offset as u128 + len as u128 * b.elem.size() as u128;
                if end > weights.len() as u128 {
                    return Err(plan_err(format!(
                        "{}: bytes {offset}..{end} lie outside the weights file ({} bytes)",
                        what(),
                        weights.len()
                    )));
                }
                None
            }
            Storage::Input { .. } | Storage::Arena => None,
        };
        bufs.push(BufInfo { name: b.name.clone(), elem: b.elem, shape, root: i, alias });
    }
    // Resolve roots; a chain longer than the buffer count is a cycle.
    for i in 0..n {
        let mut at = i;
        let mut steps = 0;
        while let Some((to, _)) = &bufs[at].alias {
            at = *to;
            steps += 1;
            if steps > n {
                return Err(plan_err(format!("buffer {i} `{}` is part of a cycle of views", bufs[i].name)));
            }
        }
        bufs[i].root = at;
    }
    // Lifetimes of the roots the arena holds.
    let mut life: Vec<Option<(usize, usize)>> = vec![None; n];
    let mut extend = |b: usize, first: usize, last: usize| {
        let e = life[b].get_or_insert((first, last));
        e.0 = e.0.min(first);
        e.1 = e.1.max(last);
    };
    for (li, l) in plan.launches.iter().enumerate() {
        for &a in &l.args {
            if a < n {
                extend(bufs[a].root, li, li);
            }
        }
    }
    let end = plan.launches.len();
    for (_, b) in &plan.outputs {
        if *b < n {
            extend(bufs[*b].root, 0, end);
        }
    }
    for (_, b) in &plan.inputs {
        if *b < n {
            extend(bufs[*b].root, 0, 0);
        }
    }
    for (i, b) in plan.buffers.iter().enumerate() {
        if !matches!(b.storage, Storage::Input { .. } | Storage::Arena) {
            life[i] = None;
        } else if let Some(l) = &mut life[i] {
            // Inputs are written before launch 0.
            if matches!(b.storage, Storage::Input { .. }) {
                l.0 = 0;
            }
        }
    }
    Ok((bufs, life))
}

/// Checks every launch against its kernel entry and the buffers.
fn check_launches(plan: &NativePlan, bufs: &[BufInfo], lib: &KernelLibrary) -> Result<Vec<LaunchInfo>, NativeError> {
    let mut out = Vec::with_capacity(plan.launches.len());
    let (mut arg_at, mut scalar_at) = (0, 0);
    for (li, l) in plan.launches.iter().enumerate() {
        let at = || format!("launch {li} (`{}`)", l.node);
        let k = plan
            .kernels
            .get(l.kernel)
            .ok_or_else(|| plan_err(format!("{}: kernel {} does not exist", at(), l.kernel)))?;
        let f = lib.kernel(l.kernel).ok_or_else(|| plan_err(format!("{}: kernel {} is not loaded", at(), l.kernel)))?;
        if l.args.len() != k.buffers.len() || l.needs.len() != l.args.len() {
            return Err(plan_err(format!(
                "{}: kernel `{}` takes {} buffers, the launch gives {} arguments and {} needs",
                at(),
                k.symbol,
                k.buffers.len(),
                l.args.len(),
                l.needs.len()
            )));
        }
        if l.scalars.len() != k.scalars {
            return Err(plan_err(format!(
                "{}: kernel `{}` takes {} scalars, the launch gives {}",
                at(),
                k.symbol,
                k.scalars,
                l.scalars.len()
            )));
        }
        for (j, (&b, &want)) in l.args.iter().zip(&k.buffers).enumerate() {
            let info = bufs
                .get(b)
                .ok_or_else(|| plan_err(format!("{}: argument {j} is buffer {b}, which does not exist", at())))?;
            if info.elem != want {
                return Err(plan_err(format!(
                    "{}: argument {j} of kernel `{}` is {want:?}, buffer `{}` is {:?}",
                    at(),
                    k.symbol,
                    info.name,
                    info.elem
                )));
            }
        }
        let what = || at();
        let needs = l.needs.iter().map(|s| parse_dim(s, &what)).collect::<Result<Vec<_>, _>>()?;
        let scalars = l.scalars.iter().map(|s| parse_dim(s, &what)).collect::<Result<Vec<_>, _>>()?;
        out.push(LaunchInfo { f, needs, scalars, arg_at, scalar_at });
        arg_at += l.args.len();
        scalar_at += l.scalars.len();
    }
    Ok(out)
}

/// The plan's inputs and outputs against the signature.
#[allow(clippy::type_complexity)]
fn check_io(
    plan: &NativePlan,
    sig: &Signature,
    bufs: &[BufInfo],
) -> Result<(Vec<(InputSpec, usize)>, Vec<(String, usize, DType)>), NativeError> {
    let mut inputs = Vec::with_capacity(plan.inputs.len());
    for (name, b) in &plan.inputs {
        let info =
            bufs.get(*b).ok_or_else(|| plan_err(format!("input `{name}` is buffer {b}, which does not exist")))?;
        match &plan.buffers[*b].storage {
            Storage::Input { name: n } if n == name => {}
            other => return Err(plan_err(format!("input `{name}` is buffer `{}` with storage {other:?}", info.name))),
        }
        let ts = sig.input(name).ok_or_else(|| plan_err(format!("input `{name}` is not in the model's signature")))?;
        let ty = ts.tensor_type().map_err(plan_err)?;
        if !convertible(ty.dtype, info.elem) {
            return Err(plan_err(format!("input `{name}` is {} but its buffer holds {:?}", ty.dtype, info.elem)));
        }
        if ty.shape != info.shape {
            return Err(plan_err(format!(
                "input `{name}` has shape {:?} in the signature but {:?} in the plan",
                ts.shape, plan.buffers[*b].shape
            )));
        }
        inputs.push((InputSpec { name: name.clone(), dtype: ty.dtype, shape: ty.shape }, *b));
    }
    for (i, b) in plan.buffers.iter().enumerate() {
        if let Storage::Input { name } = &b.storage {
            if !plan.inputs.iter().any(|(n, j)| n == name && *j == i) {
                return Err(plan_err(format!(
                    "buffer {i} `{}` is input `{name}`, which the plan's inputs do not list",
                    b.name
                )));
            }
        }
    }
    if let Some(t) = sig.inputs.iter().find(|t| !plan.inputs.iter().any(|(n, _)| n == &t.name)) {
        return Err(plan_err(format!("the signature's input `{}` is not in the plan", t.name)));
    }
    let mut outputs = Vec::with_capacity(plan.outputs.len());
    for (name, b) in &plan.outputs {
        let info =
            bufs.get(*b).ok_or_else(|| plan_err(format!("output `{name}` is buffer {b}, which does not exist")))?;
        let dtype = match sig.output(name) {
            Some(ts) => ts.dtype.parse::<DType>().map_err(|e| plan_err(format!("output `{name}`: {e}")))?,
            None => natural_dtype(info.elem),
        };
        outputs.push((name.clone(), *b, dtype));
    }
    Ok((inputs, outputs))
}

/// Writes a validated input tensor into its buffer, converted to `elem`.
fn write_input(name: &str, t: &Tensor, elem: Elem, dst: *mut u8, len: usize) -> Result<(), NativeError> {
    let bad = |why: String| NativeError::BadInput { name: name.to_string(), why };
    if t.numel() != len {
        return Err(bad(format!("{} elements, its buffer holds {len}", t.numel())));
    }
    // SAFETY (every arm): `dst` is aligned for `elem` (arena offsets are
    // 64-byte aligned) and has room for `len` elements of it.
    match (elem, &t.data) {
        (Elem::F32, Data::F32(v)) => unsafe { std::slice::from_raw_parts_mut(dst as *mut f32, len) }.copy_from_slice(v),
        (Elem::F32, Data::F64(v)) => {
            let d = unsafe { std::slice::from_raw_parts_mut(dst as *mut f32, len) };
            d.iter_mut().zip(v).for_each(|(d, &x)| *d = x as f32);
        }
        (Elem::I64, Data::I64(v)) => unsafe { std::slice::from_raw_parts_mut(dst as *mut i64, len) }.copy_from_slice(v),
        (Elem::I32, Data::I64(v)) => {
            let d = unsafe { std::slice::from_raw_parts_mut(dst as *mut i32, len) };
            for (i, (d, &x)) in d.iter_mut().zip(v).enumerate() {
                *d = i32::try_from(x).map_err(|_| bad(format!("element {i} = {x} does not fit the kernels' i32")))?;
            }
        }
        (Elem::Bool, Data::Bool(v)) => {
            let d = unsafe { std::slice::from_raw_parts_mut(dst, len) };
            d.iter_mut().zip(v).for_each(|(d, &x)| *d = x as u8);
        }
        (e, _) => return Err(bad(format!("dtype {} cannot be passed as {e:?}", t.dtype))),
    }
    Ok(())
}

/// Reads an output buffer into a tensor of `dtype`.
fn read_output(name: &str, dtype: DType, elem: Elem, src: *const u8, shape: Vec<usize>) -> Result<Tensor, NativeError> {
    let n: usize = shape.iter().product();
    // SAFETY (every arm): `src` points to a live buffer of at least `n`
    // elements of `elem`, aligned (lengths were checked before the run).
    let t = match elem {
        Elem::F32 => {
            Tensor::from_f32(dtype, shape, unsafe { std::slice::from_raw_parts(src as *const f32, n) }.to_vec())
        }
        Elem::I64 => {
            Tensor::from_i64(dtype, shape, unsafe { std::slice::from_raw_parts(src as *const i64, n) }.to_vec())
        }
        Elem::I32 => Tensor::from_i64(
            dtype,
            shape,
            unsafe { std::slice::from_raw_parts(src as *const i32, n) }.iter().map(|&x| x as i64).collect(),
        ),
        Elem::Bool => Tensor::from_i64(
            dtype,
            shape,
            unsafe { std::slice::from_raw_parts(src, n) }.iter().map(|&x| (x != 0) as i64).collect(),
        ),
        Elem::BF16 | Elem::F16 => {
            return Err(NativeError::Buffer {
                buffer: name.to_string(),
                why: format!("is stored as {elem:?}, which outputs cannot be"),
            })
        }
    };
    t.map_err(|e| NativeError::Buffer { buffer: name.to_string(), why: e.to_string() })
}
