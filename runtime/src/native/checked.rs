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
//! that each argument's `needs` fits its buffer. [`CheckedPlan::place`]
//! then gives every scratch root an offset in one arena by liveness.

use std::collections::BTreeMap;

use smelt_ir::{DType, Data, Dim, Tensor};

use super::arena::{place, Interval, ALIGN};
use super::bind::{bind_symbols_with, InputSpec};
use super::NativeError;
use crate::artifact::Signature;
use crate::plan::{Elem, NativePlan, Storage};

/// A buffer with its dims parsed and its alias chain resolved.
#[derive(Clone, Debug)]
pub struct BufInfo {
    pub name: String,
    pub elem: Elem,
    pub shape: Vec<Dim>,
    /// The buffer owning the memory (itself unless an alias).
    pub root: usize,
    /// For an alias: (its direct target, its offset in elements).
    pub alias: Option<(usize, Dim)>,
}

/// A launch with its dims parsed.
#[derive(Clone, Debug)]
pub struct LaunchDims {
    pub needs: Vec<Dim>,
    pub scalars: Vec<Dim>,
    /// The GPU grid, when the plan gives one.
    pub grid: Option<[Dim; 3]>,
    /// Where its arguments and scalars start in the flat per-call tables
    /// (arguments in launch order, then each launch's scalars).
    pub arg_at: usize,
    pub scalar_at: usize,
}

/// One call's sizes, all checked.
#[derive(Clone, Debug)]
pub struct CallSizes {
    pub syms: BTreeMap<String, i64>,
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
        let (bufs, lifetimes) = check_buffers(&plan, weights_len)?;
        let launches = check_launches(&plan, &bufs)?;
        let (inputs, outputs) = check_io(&plan, &signature, &bufs)?;
        let (specs, input_bufs) = inputs.into_iter().unzip();
        let mut bounds: BTreeMap<String, (i64, i64)> =
            signature.symbols.iter().map(|(n, b)| (n.clone(), (b.min, b.max))).collect();
        for (n, min, max) in &plan.symbols {
            bounds.insert(n.clone(), (*min, *max));
        }
        Ok(CheckedPlan { plan, signature, bufs, launches, specs, input_bufs, outputs, bounds, lifetimes, weights_len })
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
    /// [`bind_symbols_with`]), binds the symbols and sizes the call: every
    /// length, alias and weight range, every launch's scalars and needs.
    pub fn size_call(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        resident: &BTreeMap<String, Vec<usize>>,
    ) -> Result<CallSizes, NativeError> {
        let syms = bind_symbols_with(&self.specs, inputs, resident, &self.bounds)?;
        let lens = self.buffer_lens(&syms)?;
        self.check_views(&syms, &lens)?;
        let mut scalars = Vec::with_capacity(self.launches.last().map_or(0, |l| l.scalar_at + l.scalars.len()));
        for (li, l) in self.launches.iter().enumerate() {
            let launch = &self.plan.launches[li];
            for (j, d) in l.scalars.iter().enumerate() {
                let v = d.eval_map(&syms).map_err(|e| self.launch_err(li, format!("scalar {j} `{d}`: {e}")))?;
                scalars.push(v);
            }
            for (j, (d, &b)) in l.needs.iter().zip(&launch.args).enumerate() {
                let need =
                    d.eval_map(&syms).map_err(|e| self.launch_err(li, format!("argument {j}: needs `{d}`: {e}")))?;
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
        let elem_offsets = self.alias_offsets(&syms);
        Ok(CallSizes { syms, lens, elem_offsets, scalars })
    }

    /// Offsets in one arena for every root with a lifetime that `keep`
    /// accepts (None for the others), and the arena size they need.
    pub fn place(
        &self,
        lens: &[usize],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<(Vec<Option<usize>>, usize), NativeError> {
        let mut items = Vec::new();
        let mut roots = Vec::new();
        for (b, life) in self.lifetimes.iter().enumerate() {
            if let Some((first, last)) = *life {
                if !keep(b) {
                    continue;
                }
                let size = self.bufs[b].elem.size();
                let bytes = lens[b]
                    .checked_mul(size)
                    .ok_or(NativeError::ArenaTooLarge { bytes: lens[b] as u128 * size as u128 })?;
                items.push(Interval { bytes, first, last });
                roots.push(b);
            }
        }
        let (offsets, total) = place(&items)
            .ok_or(NativeError::ArenaTooLarge { bytes: items.iter().map(|i| i.bytes as u128 + ALIGN as u128).sum() })?;
        let mut at = vec![None; self.bufs.len()];
        for (k, &b) in roots.iter().enumerate() {
            at[b] = Some(offsets[k]);
        }
        Ok((at, total))
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

/// Parses the buffers, resolves alias chains, checks weights statically and
/// computes each arena root's lifetime.
#[allow(clippy::type_complexity)]
fn check_buffers(
    plan: &NativePlan,
    weights_len: usize,
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
fn check_launches(plan: &NativePlan, bufs: &[BufInfo]) -> Result<Vec<LaunchDims>, NativeError> {
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
        let needs = l.needs.iter().map(|s| parse_dim(s, &what)).collect::<Result<Vec<_>, _>>()?;
        let scalars = l.scalars.iter().map(|s| parse_dim(s, &what)).collect::<Result<Vec<_>, _>>()?;
        let grid = match &l.grid {
            None => None,
            Some(g) => {
                let what = || format!("{}: grid", at());
                Some([parse_dim(&g[0], &what)?, parse_dim(&g[1], &what)?, parse_dim(&g[2], &what)?])
            }
        };
        out.push(LaunchDims { needs, scalars, grid, arg_at, scalar_at });
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
