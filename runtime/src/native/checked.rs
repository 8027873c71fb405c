//! A launch plan checked once, and sized per call: everything the plan's
//! runners ([`super::NativeModel`] on the CPU, [`crate::cuda::CudaModel`] on
//! a GPU) do before any kernel runs, so both accept and refuse the same
//! plans and inputs with the same messages.
//!
//! [`CheckedPlan::new`] checks the plan statically: kernel and buffer
//! indices, argument counts and element types against the kernel entries,
//! alias chains (same element type, no cycle), weight offsets (64-byte
//! aligned, inside the weights file), every dim parsing (needs, scalars,
//! grids), and the plan's inputs and outputs against the signature.
//!
//! [`CheckedPlan::size_call`] binds the symbols from the inputs and
//! evaluates every buffer's length, every alias's offset (checked to lie
//! inside its target) and weight range, every launch's scalars, and checks
//! that each argument's `needs` fits its buffer. [`CheckedPlan::place_cached`]
//! then gives every scratch root an offset in one arena by liveness, and
//! keeps that placement across calls while the sizes fit it.
//!
//! A plan's thousands of dims (shapes, needs, scalars, grids) are a few
//! dozen distinct expressions: each is parsed once, when the plan is
//! checked, and evaluated once per call ([`CheckedPlan::dims`],
//! [`CallSizes::vals`]); every use reads its value by index.

use std::collections::{BTreeMap, HashMap, HashSet};

use smelt_ir::{DType, Data, Dim, Tensor};

use super::arena::{place, Interval, ALIGN};
use super::bind::{bind_symbols_known, InputSpec};
use super::NativeError;
use crate::artifact::Signature;
use crate::plan::{Elem, NativePlan, Storage};

/// A dim's index in [`CheckedPlan::dims`].
pub type DimId = u32;

/// A buffer with its dims parsed and its alias chain resolved.
#[derive(Clone, Debug)]
pub struct BufInfo {
    pub name: String,
    pub elem: Elem,
    pub shape: Vec<Dim>,
    pub shape_ids: Vec<DimId>,
    /// The buffer owning the memory (itself unless an alias).
    pub root: usize,
    /// For an alias: (its direct target, its offset in elements).
    pub alias: Option<(usize, Dim, DimId)>,
}

/// A launch with its dims parsed.
#[derive(Clone, Debug)]
pub struct LaunchDims {
    pub needs: Vec<Dim>,
    pub scalars: Vec<Dim>,
    /// The GPU grid, when the plan gives one.
    pub grid: Option<[Dim; 3]>,
    pub need_ids: Vec<DimId>,
    pub scalar_ids: Vec<DimId>,
    pub grid_ids: Option<[DimId; 3]>,
    /// [`crate::plan::Launch::work`], parsed.
    pub work_id: Option<DimId>,
    /// Where its arguments and scalars start in the flat per-call tables
    /// (arguments in launch order, then each launch's scalars).
    pub arg_at: usize,
    pub scalar_at: usize,
}

/// One call's sizes, all checked.
#[derive(Clone, Debug)]
pub struct CallSizes {
    pub syms: BTreeMap<String, i64>,
    /// The value of every dim of [`CheckedPlan::dims`] (None where it does
    /// not evaluate: an unbound symbol, an overflow).
    pub vals: Vec<Option<i64>>,
    /// Every buffer's element count.
    pub lens: Vec<usize>,
    /// Every buffer's offset from its root, in elements (0 for roots).
    pub elem_offsets: Vec<usize>,
    /// Every launch's scalars, at [`LaunchDims::scalar_at`].
    pub scalars: Vec<i64>,
}

/// A plan checked against its signature and its weights' length.
#[derive(Clone, Debug)]
pub struct CheckedPlan {
    pub plan: NativePlan,
    pub signature: Signature,
    pub bufs: Vec<BufInfo>,
    pub launches: Vec<LaunchDims>,
    /// The inputs as declared, and the buffer of each.
    pub specs: Vec<InputSpec>,
    pub input_bufs: Vec<usize>,
    /// (name, buffer, dtype of the tensor returned).
    pub outputs: Vec<(String, usize, DType)>,
    pub bounds: BTreeMap<String, (i64, i64)>,
    /// Per root buffer the arena holds (inputs and scratch): its lifetime
    /// (inclusive launch range). None for weights and unused buffers.
    pub lifetimes: Vec<Option<(usize, usize)>>,
    pub weights_len: usize,
    /// Every distinct dim of the plan, indexed by [`DimId`].
    pub dims: Vec<Dim>,
    /// The names of `specs`.
    pub input_names: HashSet<String>,
    /// The same dims in flat tables, for sizing a call in a few passes
    /// over contiguous memory.
    flat: Flat,
    /// The plan's in-place KV caches, their dims parsed.
    pub kv: Option<KvDims>,
}

/// A [`crate::plan::KvCachePlan`] with its dims parsed.
#[derive(Clone, Debug)]
pub struct KvDims {
    pub capacity: String,
    pub copied: String,
    pub past: Dim,
    pub filled: Dim,
}

/// How a call binds the symbols of a plan's in-place KV caches (plans
/// without them ignore it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBinding {
    /// The past comes as inputs and the presents go out dense.
    Dense,
    /// The cache buffers are the runtime's own, with room for `capacity`
    /// positions and the past already in them.
    Resident { capacity: usize },
}

/// A plan's dims by id in flat tables.
#[derive(Clone, Debug, Default)]
struct Flat {
    /// Every buffer's shape, one after the other; buffer `b`'s is
    /// `shape[shape_at[b]..shape_at[b + 1]]`.
    shape: Vec<DimId>,
    shape_at: Vec<usize>,
    /// Every launch's scalars (at [`LaunchDims::scalar_at`]), and its needs
    /// with their buffers (at [`LaunchDims::arg_at`]).
    scalars: Vec<DimId>,
    needs: Vec<(DimId, usize)>,
    /// The buffers that are views of others, and those that are views or
    /// weights, in order.
    aliases: Vec<usize>,
    views: Vec<usize>,
}

impl Flat {
    fn new(plan: &NativePlan, bufs: &[BufInfo], launches: &[LaunchDims]) -> Flat {
        let mut f = Flat::default();
        for (b, info) in bufs.iter().enumerate() {
            f.shape_at.push(f.shape.len());
            f.shape.extend(&info.shape_ids);
            if info.alias.is_some() {
                f.aliases.push(b);
            }
            if info.alias.is_some() || matches!(plan.buffers[b].storage, Storage::Weight { .. }) {
                f.views.push(b);
            }
        }
        f.shape_at.push(f.shape.len());
        for (l, launch) in launches.iter().zip(&plan.launches) {
            f.scalars.extend(&l.scalar_ids);
            f.needs.extend(l.need_ids.iter().copied().zip(launch.args.iter().copied()));
        }
        f
    }
}

/// The plan's distinct dims, each parsed once.
#[derive(Default)]
struct Interner {
    by_text: HashMap<String, DimId>,
    by_dim: HashMap<Dim, DimId>,
    dims: Vec<Dim>,
}

impl Interner {
    fn parse(&mut self, text: &str, what: &dyn Fn() -> String) -> Result<(Dim, DimId), NativeError> {
        if let Some(&id) = self.by_text.get(text) {
            return Ok((self.dims[id as usize].clone(), id));
        }
        let dim = parse_dim(text, what)?;
        let id = match self.by_dim.get(&dim) {
            Some(&id) => id,
            None => {
                let id =
                    DimId::try_from(self.dims.len()).map_err(|_| plan_err("the plan has too many distinct dims"))?;
                self.by_dim.insert(dim.clone(), id);
                self.dims.push(dim.clone());
                id
            }
        };
        self.by_text.insert(text.to_string(), id);
        Ok((dim, id))
    }
}

pub(crate) fn plan_err(msg: impl Into<String>) -> NativeError {
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

/// Refuses a file name that is not a plain name inside the artifact.
pub(crate) fn check_file_name(name: &str) -> Result<(), NativeError> {
    if name.is_empty() || name.contains('/') || name.contains('\\') || name == "." || name == ".." {
        return Err(plan_err(format!("file name `{name}` is not a plain file name inside the artifact")));
    }
    Ok(())
}

impl CheckedPlan {
    /// Checks `plan` against `signature` and a weights file of
    /// `weights_len` bytes.
    pub fn new(plan: NativePlan, signature: Signature, weights_len: usize) -> Result<CheckedPlan, NativeError> {
        let mut dims = Interner::default();
        let (bufs, lifetimes) = check_buffers(&plan, weights_len, &mut dims)?;
        let launches = check_launches(&plan, &bufs, &mut dims)?;
        let (inputs, outputs) = check_io(&plan, &signature, &bufs)?;
        let (specs, input_bufs): (Vec<InputSpec>, Vec<usize>) = inputs.into_iter().unzip();
        let input_names = specs.iter().map(|s| s.name.clone()).collect();
        let flat = Flat::new(&plan, &bufs, &launches);
        let mut bounds: BTreeMap<String, (i64, i64)> =
            signature.symbols.iter().map(|(n, b)| (n.clone(), (b.min, b.max))).collect();
        for (n, min, max) in &plan.symbols {
            bounds.insert(n.clone(), (*min, *max));
        }
        let kv = match &plan.kv_cache {
            None => None,
            Some(k) => {
                let what = |f: &'static str| move || format!("the KV cache plan's `{f}`");
                let declared = |n: &String| plan.symbols.iter().any(|(s, _, _)| s == n);
                if !declared(&k.capacity) || !declared(&k.copied) {
                    return Err(plan_err("the KV cache plan names symbols the plan does not declare"));
                }
                if signature.symbols.contains_key(&k.capacity) || signature.symbols.contains_key(&k.copied) {
                    return Err(plan_err("the KV cache plan's symbols collide with the model's own"));
                }
                Some(KvDims {
                    capacity: k.capacity.clone(),
                    copied: k.copied.clone(),
                    past: parse_dim(&k.past, &what("past"))?,
                    filled: parse_dim(&k.filled, &what("filled"))?,
                })
            }
        };
        Ok(CheckedPlan {
            kv,
            plan,
            signature,
            bufs,
            launches,
            specs,
            input_bufs,
            outputs,
            bounds,
            lifetimes,
            weights_len,
            dims: dims.dims,
            input_names,
            flat,
        })
    }

    /// The kernel symbol of launch `li`.
    pub fn symbol_of(&self, li: usize) -> &str {
        &self.plan.kernels[self.plan.launches[li].kernel].symbol
    }

    /// The error for launch `li`.
    pub fn launch_err(&self, li: usize, why: String) -> NativeError {
        NativeError::Launch {
            launch: li,
            node: self.plan.launches[li].node.clone(),
            kernel: self.symbol_of(li).to_string(),
            why,
        }
    }

    /// Validates the inputs (plus the `resident` ones, given by shape: see
    /// [`super::bind::bind_symbols_with`]), binds the symbols and sizes the call: every
    /// length, alias and weight range, every launch's scalars and needs.
    /// `kv` says how the symbols of in-place KV caches are bound.
    pub fn size_call(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        resident: &BTreeMap<String, Vec<usize>>,
        kv: KvBinding,
    ) -> Result<CallSizes, NativeError> {
        let declared = |name: &str| self.input_names.contains(name);
        let mut syms = bind_symbols_known(&self.specs, &declared, inputs, resident, &self.bounds)?;
        self.bind_kv(&mut syms, kv)?;
        let vals: Vec<Option<i64>> = self.dims.iter().map(|d| d.eval_map(&syms).ok()).collect();
        let v = Vals { vals: &vals, syms: &syms };
        let lens = self.buffer_lens(v)?;
        self.check_views(v, &lens)?;
        let f = &self.flat;
        let mut scalars = Vec::with_capacity(f.scalars.len());
        for (li, l) in self.launches.iter().enumerate() {
            for (j, &id) in f.scalars[l.scalar_at..l.scalar_at + l.scalar_ids.len()].iter().enumerate() {
                let d = &self.dims[id as usize];
                let v = v.get(id, d).map_err(|e| self.launch_err(li, format!("scalar {j} `{d}`: {e}")))?;
                scalars.push(v);
            }
            for (j, &(id, b)) in f.needs[l.arg_at..l.arg_at + l.need_ids.len()].iter().enumerate() {
                let d = &self.dims[id as usize];
                let need = v.get(id, d).map_err(|e| self.launch_err(li, format!("argument {j}: needs `{d}`: {e}")))?;
                if need < 0 || need as u128 > lens[b] as u128 {
                    return Err(self.launch_err(
                        li,
                        format!(
                            "argument {j} needs {need} elements (`{d}`) but buffer `{}` has {}",
                            self.bufs[b].name, lens[b]
                        ),
                    ));
                }
            }
        }
        let elem_offsets = self.alias_offsets(v);
        Ok(CallSizes { syms, vals, lens, elem_offsets, scalars })
    }

    /// Binds the in-place KV cache symbols (see [`KvBinding`]).
    fn bind_kv(&self, syms: &mut BTreeMap<String, i64>, binding: KvBinding) -> Result<(), NativeError> {
        let Some(kv) = &self.kv else { return Ok(()) };
        let eval = |d: &Dim, what: &str| {
            d.eval_map(syms).map_err(|e| plan_err(format!("the KV cache's {what} positions `{d}`: {e}")))
        };
        let (past, filled) = (eval(&kv.past, "past")?, eval(&kv.filled, "filled")?);
        let (capacity, copied) = match binding {
            KvBinding::Dense => (filled, past),
            KvBinding::Resident { capacity } => {
                let capacity = i64::try_from(capacity).unwrap_or(i64::MAX);
                if capacity < filled {
                    return Err(NativeError::CacheFull { capacity: capacity as usize, filled: filled as usize });
                }
                (capacity, 0)
            }
        };
        syms.insert(kv.capacity.clone(), capacity);
        syms.insert(kv.copied.clone(), copied);
        Ok(())
    }

    /// Buffer `b`'s shape for these symbol values.
    pub fn shape_of(&self, b: usize, syms: &BTreeMap<String, i64>) -> Result<Vec<usize>, NativeError> {
        self.bufs[b]
            .shape
            .iter()
            .map(|d| d.eval_map(syms).map(|v| v as usize))
            .collect::<Result<_, _>>()
            .map_err(|e| NativeError::Buffer { buffer: self.bufs[b].name.clone(), why: e.to_string() })
    }

    /// Buffer `b`'s shape in the call `sizes` ([`CheckedPlan::shape_of`]
    /// from the call's dim values).
    pub fn shape_in(&self, b: usize, sizes: &CallSizes) -> Result<Vec<usize>, NativeError> {
        let vals = Vals { vals: &sizes.vals, syms: &sizes.syms };
        let info = &self.bufs[b];
        info.shape
            .iter()
            .zip(&info.shape_ids)
            .map(|(d, &id)| vals.get(id, d).map(|v| v as usize))
            .collect::<Result<_, _>>()
            .map_err(|e| NativeError::Buffer { buffer: info.name.clone(), why: e.to_string() })
    }

    /// Dim `id` of [`CheckedPlan::dims`] in the call `sizes`.
    pub fn dim_in(&self, id: DimId, sizes: &CallSizes) -> Result<i64, smelt_ir::DimError> {
        Vals { vals: &sizes.vals, syms: &sizes.syms }.get(id, &self.dims[id as usize])
    }

    /// Every buffer's element count for these symbol values.
    fn buffer_lens(&self, vals: Vals<'_>) -> Result<Vec<usize>, NativeError> {
        let f = &self.flat;
        let mut lens = Vec::with_capacity(self.bufs.len());
        for (b, info) in self.bufs.iter().enumerate() {
            let err = |why: String| NativeError::Buffer { buffer: info.name.clone(), why };
            let mut n: usize = 1;
            for &id in &f.shape[f.shape_at[b]..f.shape_at[b + 1]] {
                let d = &self.dims[id as usize];
                let v = vals.get(id, d).map_err(|e| err(format!("dim `{d}`: {e}")))?;
                let v = usize::try_from(v).map_err(|_| err(format!("dim `{d}` = {v} is negative")))?;
                n = n.checked_mul(v).ok_or_else(|| err("its length overflows".to_string()))?;
            }
            n.checked_mul(info.elem.size()).ok_or_else(|| err("its size in bytes overflows".to_string()))?;
            lens.push(n);
        }
        Ok(lens)
    }

    /// Every alias's offset from its root, in elements (valid after `check_views`).
    fn alias_offsets(&self, vals: Vals<'_>) -> Vec<usize> {
        let mut offsets = vec![0; self.bufs.len()];
        for &b in &self.flat.aliases {
            let mut at = b;
            let mut total = 0usize;
            while let Some((to, _, id)) = &self.bufs[at].alias {
                total += vals.vals[*id as usize].unwrap_or(0) as usize;
                at = *to;
            }
            offsets[b] = total;
        }
        offsets
    }

    /// Checks that every alias lies inside its target and every weight
    /// inside the weights file.
    fn check_views(&self, vals: Vals<'_>, lens: &[usize]) -> Result<(), NativeError> {
        for &b in &self.flat.views {
            let info = &self.bufs[b];
            let err = |why: String| NativeError::Buffer { buffer: info.name.clone(), why };
            if let Some((to, off, id)) = &info.alias {
                let o = vals.get(*id, off).map_err(|e| err(format!("alias offset `{off}`: {e}")))?;
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
                if end > self.weights_len as u128 {
                    return Err(err(format!(
                        "weight bytes {offset}..{end} lie outside the weights file ({} bytes)",
                        self.weights_len
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The headroom a growing root gets when a kept placement is computed
/// again: half its size, at most this many bytes (so buffers that grow call
/// after call, a decode step's mask, are placed again a logarithmic number
/// of times, and a large one does not reserve much more than it needs).
const HEADROOM_MAX: usize = 1 << 20;

/// A placement kept across calls by [`CheckedPlan::place_cached`]: while
/// every root it holds fits the room it was placed with, the same offsets
/// stay valid (buffers that overlap in time stay disjoint when they shrink),
/// so a call with the same or smaller sizes is placed in O(roots).
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// The roots it holds, per buffer (the `keep` it was computed for).
    keep: Vec<bool>,
    /// Per buffer: the bytes its root was placed for (0 when not held), and
    /// the bytes it needed then.
    room: Vec<usize>,
    need: Vec<usize>,
    offsets: Vec<Option<usize>>,
    total: usize,
    /// How many times it was computed (for tests and profiles).
    pub computed: u64,
}

impl Placement {
    /// Every held root's offset in the arena (None for other buffers).
    pub fn offsets(&self) -> &[Option<usize>] {
        &self.offsets
    }

    /// The arena size the placement needs.
    pub fn total(&self) -> usize {
        self.total
    }
}

impl CheckedPlan {
    /// Root `b`'s size in bytes in a call of buffer lengths `lens`.
    fn root_bytes(&self, b: usize, lens: &[usize]) -> Result<usize, NativeError> {
        let size = self.bufs[b].elem.size();
        lens[b].checked_mul(size).ok_or(NativeError::ArenaTooLarge { bytes: lens[b] as u128 * size as u128 })
    }

    /// Offsets in one arena, by liveness, for the roots `keep` marks
    /// (indexed by buffer), kept in `cache` across calls: reused as it is while it holds
    /// exactly those roots and each fits its room; else placed again, every
    /// root with the room it had or its size when larger (the rooms only
    /// grow), and a root larger than when last placed with some headroom
    /// (see `HEADROOM_MAX`).
    pub fn place_cached(&self, lens: &[usize], keep: &[bool], cache: &mut Placement) -> Result<(), NativeError> {
        if keep.len() != self.bufs.len() {
            return Err(plan_err(format!("a placement keeps {} buffers of {}", keep.len(), self.bufs.len())));
        }
        let same = cache.keep.as_slice() == keep;
        if same {
            let mut fits = true;
            for (b, life) in self.lifetimes.iter().enumerate() {
                if life.is_some() && keep[b] && self.root_bytes(b, lens)? > cache.room[b] {
                    fits = false;
                    break;
                }
            }
            if fits {
                return Ok(());
            }
        }
        // Nothing in `cache` changes unless the new placement succeeds.
        let (mut room, mut need) = match same {
            true => (cache.room.clone(), cache.need.clone()),
            false => (vec![0; self.bufs.len()], vec![0; self.bufs.len()]),
        };
        let mut items = Vec::new();
        let mut roots = Vec::new();
        for (b, life) in self.lifetimes.iter().enumerate() {
            if let Some((first, last)) = *life {
                if keep[b] {
                    let bytes = self.root_bytes(b, lens)?;
                    let grew = same && bytes > need[b];
                    let want = if grew { bytes.saturating_add((bytes / 2).min(HEADROOM_MAX)) } else { bytes };
                    room[b] = room[b].max(want);
                    need[b] = bytes;
                    items.push(Interval { bytes: room[b], first, last });
                    roots.push(b);
                }
            }
        }
        let (offsets, total) = place(&items)
            .ok_or(NativeError::ArenaTooLarge { bytes: items.iter().map(|i| i.bytes as u128 + ALIGN as u128).sum() })?;
        if !same {
            cache.keep = keep.to_vec();
        }
        cache.room = room;
        cache.need = need;
        cache.offsets.clear();
        cache.offsets.resize(self.bufs.len(), None);
        for (k, &b) in roots.iter().enumerate() {
            cache.offsets[b] = Some(offsets[k]);
        }
        cache.total = total;
        cache.computed += 1;
        Ok(())
    }
}

/// One call's dim values, with the symbols they were computed from (to
/// explain a dim that does not evaluate).
#[derive(Clone, Copy)]
struct Vals<'a> {
    vals: &'a [Option<i64>],
    syms: &'a BTreeMap<String, i64>,
}

impl Vals<'_> {
    /// Dim `id` (which is `d`): its value, or why it has none.
    fn get(&self, id: DimId, d: &Dim) -> Result<i64, smelt_ir::DimError> {
        match self.vals[id as usize] {
            Some(v) => Ok(v),
            None => d.eval_map(self.syms),
        }
    }
}

/// Parses the buffers, resolves alias chains, checks weights statically and
/// computes each arena root's lifetime.
#[allow(clippy::type_complexity)]
fn check_buffers(
    plan: &NativePlan,
    weights_len: usize,
    dims: &mut Interner,
) -> Result<(Vec<BufInfo>, Vec<Option<(usize, usize)>>), NativeError> {
    let n = plan.buffers.len();
    let mut bufs = Vec::with_capacity(n);
    for (i, b) in plan.buffers.iter().enumerate() {
        let what = || format!("buffer {i} `{}`", b.name);
        let (shape, shape_ids): (Vec<Dim>, Vec<DimId>) =
            b.shape.iter().map(|s| dims.parse(s, &what)).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
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
                let (off, id) = dims.parse(offset, &what)?;
                Some((*of, off, id))
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
                if end > weights_len as u128 {
                    return Err(plan_err(format!(
                        "{}: bytes {offset}..{end} lie outside the weights file ({weights_len} bytes)",
                        what(),
                    )));
                }
                None
            }
            Storage::Input { .. } | Storage::Arena => None,
        };
        bufs.push(BufInfo { name: b.name.clone(), elem: b.elem, shape, shape_ids, root: i, alias });
    }
    // Resolve roots; a chain longer than the buffer count is a cycle.
    for i in 0..n {
        let mut at = i;
        let mut steps = 0;
        while let Some((to, _, _)) = &bufs[at].alias {
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
fn check_launches(plan: &NativePlan, bufs: &[BufInfo], dims: &mut Interner) -> Result<Vec<LaunchDims>, NativeError> {
    let mut out = Vec::with_capacity(plan.launches.len());
    let (mut arg_at, mut scalar_at) = (0, 0);
    for (li, l) in plan.launches.iter().enumerate() {
        let at = || format!("launch {li} (`{}`)", l.node);
        let k = plan
            .kernels
            .get(l.kernel)
            .ok_or_else(|| plan_err(format!("{}: kernel {} does not exist", at(), l.kernel)))?;
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
        let (needs, need_ids): (Vec<Dim>, Vec<DimId>) =
            l.needs.iter().map(|s| dims.parse(s, &what)).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let (scalars, scalar_ids): (Vec<Dim>, Vec<DimId>) =
            l.scalars.iter().map(|s| dims.parse(s, &what)).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let (grid, grid_ids) = match &l.grid {
            None => (None, None),
            Some(g) => {
                let what = || format!("{}: grid", at());
                let (x, ix) = dims.parse(&g[0], &what)?;
                let (y, iy) = dims.parse(&g[1], &what)?;
                let (z, iz) = dims.parse(&g[2], &what)?;
                (Some([x, y, z]), Some([ix, iy, iz]))
            }
        };
        let work_id = match &l.work {
            None => None,
            Some(w) => Some(dims.parse(w, &|| format!("{}: work", at()))?.1),
        };
        out.push(LaunchDims { needs, scalars, grid, need_ids, scalar_ids, grid_ids, work_id, arg_at, scalar_at });
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
///
/// # Safety
/// `dst` must be aligned for `elem` and have room for `len` elements of it.
pub(crate) unsafe fn write_input(
    name: &str,
    t: &Tensor,
    elem: Elem,
    dst: *mut u8,
    len: usize,
) -> Result<(), NativeError> {
    let bad = |why: String| NativeError::BadInput { name: name.to_string(), why };
    if t.numel() != len {
        return Err(bad(format!("{} elements, its buffer holds {len}", t.numel())));
    }
    // SAFETY (every arm): the caller's contract.
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
///
/// # Safety
/// `src` must point to at least `shape`'s element count of `elem`, aligned.
pub(crate) unsafe fn read_output(
    name: &str,
    dtype: DType,
    elem: Elem,
    src: *const u8,
    shape: Vec<usize>,
) -> Result<Tensor, NativeError> {
    let n: usize = shape.iter().product();
    // SAFETY (every arm): the caller's contract.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{Bounds, TensorSig};
    use crate::plan::{Buffer, KernelEntry, Launch};

    /// A plan over input `x [n]` and `count` scratch buffers of random
    /// sizes (affine in `n`), used by random launches of a two-buffer
    /// kernel, so their lifetimes overlap at random.
    fn random_plan(seed: u64, count: usize) -> CheckedPlan {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut buffers = vec![Buffer {
            name: "x".into(),
            elem: Elem::F32,
            shape: vec!["n".into()],
            storage: Storage::Input { name: "x".into() },
        }];
        for i in 0..count {
            let shape = match rng.usize(0..3) {
                0 => format!("{}*n + {}", rng.usize(1..9), rng.usize(0..100)),
                1 => format!("{}", rng.usize(0..5000)),
                _ => "n".to_string(),
            };
            buffers.push(Buffer {
                name: format!("t{i}"),
                elem: Elem::F32,
                shape: vec![shape],
                storage: Storage::Arena,
            });
        }
        let launches = (0..count * 2)
            .map(|i| Launch {
                kernel: 0,
                args: vec![rng.usize(0..=count), rng.usize(0..=count)],
                needs: vec!["0".into(), "0".into()],
                scalars: vec![],
                node: format!("launch {i}"),
                grid: None,
                work: None,
            })
            .collect();
        let plan = NativePlan {
            library: "k.so".into(),
            weights: "w.bin".into(),
            kernels: vec![KernelEntry {
                symbol: "k".into(),
                lowering: "llvm".into(),
                buffers: vec![Elem::F32, Elem::F32],
                scalars: 0,
                block: None,
                tuning: None,
                library: None,
            }],
            buffers,
            launches,
            symbols: vec![("n".into(), 1, 1 << 20)],
            inputs: vec![("x".into(), 0)],
            outputs: vec![("y".into(), count)],
            arch: String::new(),
            cpu_features: vec![],
            ptx: vec![],
            kv_cache: None,
        };
        let t = |name: &str, shape: &str| TensorSig {
            name: name.into(),
            dtype: "f32".into(),
            shape: vec![shape.into()],
            optional: false,
        };
        let sig = Signature {
            inputs: vec![t("x", "n")],
            outputs: vec![],
            symbols: [("n".to_string(), Bounds { min: 1, max: 1 << 20 })].into_iter().collect(),
        };
        CheckedPlan::new(plan, sig, 0).unwrap()
    }

    fn sizes(c: &CheckedPlan, n: usize) -> CallSizes {
        let x = Tensor::from_f32(DType::F32, vec![n], vec![0.0; n]).unwrap();
        c.size_call(&[("x".to_string(), x)].into_iter().collect(), &BTreeMap::new(), KvBinding::Dense).unwrap()
    }

    /// Every kept root is placed inside the arena, and roots alive at the
    /// same launch do not overlap.
    fn check_placement(c: &CheckedPlan, lens: &[usize], keep: &[bool], p: &Placement) {
        let held: Vec<(usize, usize, (usize, usize))> = (0..c.bufs.len())
            .filter_map(|b| {
                let life = c.lifetimes[b]?;
                if !keep[b] {
                    return None;
                }
                let off = p.offsets()[b].expect("a kept root is placed");
                let bytes = lens[b] * 4;
                assert!(
                    off.is_multiple_of(ALIGN) && off + bytes <= p.total(),
                    "root {b} at {off}+{bytes} of {}",
                    p.total()
                );
                Some((off, bytes, life))
            })
            .collect();
        for (i, a) in held.iter().enumerate() {
            for b in &held[i + 1..] {
                let alive = a.2 .0 <= b.2 .1 && b.2 .0 <= a.2 .1;
                let apart = a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0;
                assert!(!alive || a.1 == 0 || b.1 == 0 || apart, "{a:?} and {b:?} overlap");
            }
        }
    }

    #[test]
    fn kept_placements_stay_valid_and_are_reused() {
        for seed in 0..20 {
            let c = random_plan(seed, 30);
            let mut keep = vec![true; c.bufs.len()];
            keep[seed as usize % c.bufs.len()] = false;
            let mut p = Placement::default();
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..30 {
                let s = sizes(&c, rng.usize(1..3000));
                c.place_cached(&s.lens, &keep, &mut p).unwrap();
                check_placement(&c, &s.lens, &keep, &p);
            }
            // The same or smaller sizes reuse it.
            let before = (p.computed, p.total());
            for n in [1, 2, 5, 100] {
                let s = sizes(&c, n);
                c.place_cached(&s.lens, &keep, &mut p).unwrap();
                check_placement(&c, &s.lens, &keep, &p);
            }
            assert_eq!((p.computed, p.total()), before);
            // Another set of roots is placed anew.
            keep[0] = !keep[0];
            let s = sizes(&c, 7);
            c.place_cached(&s.lens, &keep, &mut p).unwrap();
            check_placement(&c, &s.lens, &keep, &p);
            assert_eq!(p.computed, before.0 + 1);
        }
    }

    #[test]
    fn a_slowly_growing_placement_is_recomputed_rarely() {
        let c = random_plan(7, 30);
        let keep = vec![true; c.bufs.len()];
        let mut p = Placement::default();
        for n in 100..2100 {
            let s = sizes(&c, n);
            c.place_cached(&s.lens, &keep, &mut p).unwrap();
            if n % 97 == 0 {
                check_placement(&c, &s.lens, &keep, &p);
            }
        }
        assert!(p.computed <= 12, "placed {} times for 2000 growing calls", p.computed);
        // What a fresh placement needs for the largest call, plus the headroom.
        let mut once = Placement::default();
        c.place_cached(&sizes(&c, 2099).lens, &keep, &mut once).unwrap();
        let fresh = once.total();
        assert!(p.total() <= fresh * 3 / 2 + 64 * c.bufs.len(), "{} against {fresh}", p.total());
    }

    #[test]
    fn dims_are_parsed_once_and_shared() {
        let c = random_plan(3, 30);
        let distinct: std::collections::HashSet<&Dim> = c.bufs.iter().flat_map(|b| &b.shape).collect();
        assert!(c.dims.len() <= distinct.len() + 1, "{} dims for {} distinct shapes", c.dims.len(), distinct.len());
        let s = sizes(&c, 10);
        for (b, info) in c.bufs.iter().enumerate() {
            assert_eq!(c.shape_in(b, &s).unwrap(), c.shape_of(b, &s.syms).unwrap(), "{}", info.name);
        }
    }
}
