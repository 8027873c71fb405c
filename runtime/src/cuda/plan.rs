//! [`CudaPlan`]: the host half of a GPU model, everything that needs no
//! device. It checks a `cuda` launch plan with the CPU runtime's own
//! [`CheckedPlan`] (same messages, same refusals), then what is GPU-specific:
//! every kernel has a valid thread block, every launch a grid, every PTX
//! module a known architecture. Per call, [`CudaPlan::prepare`] sizes the
//! call (every `needs` against its buffer, before anything is launched) and
//! evaluates the grids.
//!
//! Library calls ([`LibraryCall`]: a GEMM by cuBLAS instead of a PTX
//! kernel) are checked here too: their entries have no block, their
//! launches no grid, and their needs must be exactly `m·k`, `n·k`, `m·n`
//! for the launch's `m` (compared as dims, so a plan whose call would read
//! or write past a buffer is refused before any call, and the per-call
//! check of needs against lengths then covers the library's accesses).
//! Per call a library launch's "grid" is `(1, 1, 1)` when it runs and None
//! when `m` is 0, so the host's launch tables treat both kinds alike.
//!
//! It also finds whether the plan can keep its KV cache on the device
//! ([`CacheLayout::of`], shared with the CPU runtime): every
//! `past_key_values.X` input has a `present.X` output of the same element
//! type computed into scratch memory, and there is a `logits` output.

use std::collections::BTreeMap;

use smelt_ir::Tensor;

use super::ptx::{choose_module, parse_archs};
use super::CudaError;
use crate::artifact::Signature;
pub use crate::cache::{CacheLayout, CachePair};
use crate::native::checked::{CallSizes, CheckedPlan, KvBinding};
use crate::plan::{Elem, GemmCall, GemmCompute, LibraryCall, NativePlan, PtxModule};
use smelt_ir::Dim;

/// The most threads a block may have, per axis and in total (every GPU
/// since compute capability 2.0).
pub const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
pub const MAX_BLOCK_THREADS: u64 = 1024;
/// The largest grid, per axis.
pub const MAX_GRID: [i64; 3] = [(1 << 31) - 1, 65535, 65535];

/// Launch dims: (x, y, z).
pub type Dim3 = (u32, u32, u32);

/// One call, sized and checked: what [`super::CudaModel`] launches.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub sizes: CallSizes,
    /// Per launch: its grid, or None when the grid is empty (not launched).
    pub grids: Vec<Option<Dim3>>,
}

/// A `cuda` plan checked against its signature and weights.
#[derive(Clone, Debug)]
pub struct CudaPlan {
    pub(crate) checked: CheckedPlan,
    /// Per kernel: its threads per block.
    pub(crate) blocks: Vec<Dim3>,
    /// Per kernel: the library GEMM it is, for library entries.
    pub(crate) gemms: Vec<Option<GemmCall>>,
    cache: Option<CacheLayout>,
}

fn plan_err(msg: String) -> CudaError {
    CudaError::Plan(msg)
}

/// A kernel's block, checked against the hardware limits.
pub fn check_block(symbol: &str, block: Option<[u32; 3]>) -> Result<Dim3, CudaError> {
    let b = block.ok_or_else(|| plan_err(format!("kernel `{symbol}` has no thread block (is it a CPU kernel?)")))?;
    let total: u64 = b.iter().map(|&x| x as u64).product();
    let fits = b.iter().zip(MAX_BLOCK).all(|(&x, max)| (1..=max).contains(&x)) && total <= MAX_BLOCK_THREADS;
    if !fits {
        return Err(plan_err(format!(
            "kernel `{symbol}` has thread block {b:?}; each axis must be at least 1 and at most {MAX_BLOCK:?}, \
             with at most {MAX_BLOCK_THREADS} threads in all"
        )));
    }
    Ok((b[0], b[1], b[2]))
}

impl CudaPlan {
    /// Checks `plan` (see the module docs) against `signature` and a
    /// weights file of `weights_len` bytes.
    pub fn new(plan: NativePlan, signature: Signature, weights_len: usize) -> Result<CudaPlan, CudaError> {
        parse_archs(&plan.ptx)?;
        let gemms = plan.kernels.iter().map(check_library).collect::<Result<Vec<_>, _>>()?;
        let blocks = plan
            .kernels
            .iter()
            .zip(&gemms)
            .map(|(k, g)| if g.is_some() { Ok((1, 1, 1)) } else { check_block(&k.symbol, k.block) })
            .collect::<Result<Vec<_>, _>>()?;
        let checked = CheckedPlan::new(plan, signature, weights_len)?;
        for (li, l) in checked.launches.iter().enumerate() {
            if let Some(g) = &gemms[checked.plan.launches[li].kernel] {
                check_gemm_launch(&checked, li, g)?;
                continue;
            }
            if l.grid.is_none() {
                return Err(plan_err(format!(
                    "launch {li} (`{}`) of kernel `{}` has no grid",
                    checked.plan.launches[li].node,
                    checked.symbol_of(li)
                )));
            }
        }
        let cache = CacheLayout::of(&checked);
        Ok(CudaPlan { checked, blocks, gemms, cache })
    }

    /// Whether the plan has library calls (and so needs cuBLAS).
    pub fn has_library_calls(&self) -> bool {
        self.gemms.iter().any(Option::is_some)
    }

    /// The library GEMM kernel `kernel` is, if it is one.
    pub fn gemm(&self, kernel: usize) -> Option<&GemmCall> {
        self.gemms.get(kernel).and_then(Option::as_ref)
    }

    pub fn plan(&self) -> &NativePlan {
        &self.checked.plan
    }

    pub fn signature(&self) -> &Signature {
        &self.checked.signature
    }

    /// How the plan keeps its KV cache on the device, when it can.
    pub fn cache_layout(&self) -> Option<&CacheLayout> {
        self.cache.as_ref()
    }

    /// The PTX module a device of compute capability `major.minor` loads.
    pub fn choose_module(&self, major: u32, minor: u32) -> Result<&PtxModule, CudaError> {
        let ptx = &self.checked.plan.ptx;
        Ok(&ptx[choose_module(ptx, major, minor)?])
    }

    /// Validates the inputs (and the `resident` ones, by shape), sizes the
    /// call, checks every launch's needs and evaluates its grid.
    pub fn prepare(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        resident: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Prepared, CudaError> {
        let c = &self.checked;
        let sizes = c.size_call(inputs, resident, KvBinding::Dense)?;
        let mut grids = Vec::with_capacity(c.launches.len());
        for (li, l) in c.launches.iter().enumerate() {
            if self.gemms[c.plan.launches[li].kernel].is_some() {
                // The launch's one scalar is `m` (checked by `new`).
                let m = sizes.scalars[l.scalar_at];
                if !(0..=i32::MAX as i64).contains(&m) {
                    return Err(CudaError::Native(
                        c.launch_err(li, format!("the GEMM's m = {m} is outside 0..={}", i32::MAX)),
                    ));
                }
                grids.push((m > 0).then_some((1, 1, 1)));
                continue;
            }
            let (Some(dims), Some(ids)) = (&l.grid, &l.grid_ids) else {
                return Err(plan_err(format!("launch {li} has no grid")));
            };
            let mut g = [0u32; 3];
            for (axis, (d, &id)) in dims.iter().zip(ids).enumerate() {
                let v = c.dim_in(id, &sizes).map_err(|e| c.launch_err(li, format!("grid axis {axis} `{d}`: {e}")))?;
                if !(0..=MAX_GRID[axis]).contains(&v) {
                    return Err(CudaError::Native(
                        c.launch_err(li, format!("grid axis {axis} = {v} (`{d}`) is outside 0..={}", MAX_GRID[axis])),
                    ));
                }
                g[axis] = v as u32;
            }
            grids.push(if g.contains(&0) { None } else { Some((g[0], g[1], g[2])) });
        }
        Ok(Prepared { sizes, grids })
    }
}

/// The library call a kernel entry is, checked on its own: a known library
/// and element types it takes, sizes cuBLAS can be given, and buffers and
/// scalars that match the call. None for a PTX kernel.
fn check_library(k: &crate::plan::KernelEntry) -> Result<Option<GemmCall>, CudaError> {
    let Some(LibraryCall::Gemm(g)) = &k.library else { return Ok(None) };
    let bad = |why: String| Err(plan_err(format!("library call `{}`: {why}", k.symbol)));
    if g.library != "cublas" {
        return bad(format!("unknown library `{}` (this runtime calls `cublas`)", g.library));
    }
    if k.block.is_some() {
        return bad("a library call has no thread block".into());
    }
    for (name, v) in [("n", g.n), ("k", g.k)] {
        if !(1..=i32::MAX as u64).contains(&v) {
            return bad(format!("{name} = {v} is outside 1..={}", i32::MAX));
        }
    }
    let operands_ok = g.a == g.b && matches!(g.a, Elem::F32 | Elem::BF16 | Elem::F16) && g.c == Elem::F32;
    if !operands_ok {
        return bad(format!(
            "a GEMM of {:?} x {:?} into {:?}: the operands must be both f32, bf16 or f16 and the result f32",
            g.a, g.b, g.c
        ));
    }
    if g.compute == GemmCompute::Tf32 && g.a != Elem::F32 {
        return bad("TF32 compute applies to f32 operands only".into());
    }
    if k.buffers != [g.a, g.b, g.c] || k.scalars != 1 {
        return bad(format!(
            "the entry takes buffers {:?} and {} scalars; a GEMM takes [{:?}, {:?}, {:?}] and one (m)",
            k.buffers, k.scalars, g.a, g.b, g.c
        ));
    }
    Ok(Some(g.clone()))
}

/// A library GEMM's launch: no grid, and needs of exactly `m·k`, `n·k`,
/// `m·n` (as dims) for its scalar `m`.
fn check_gemm_launch(c: &CheckedPlan, li: usize, g: &GemmCall) -> Result<(), CudaError> {
    let l = &c.launches[li];
    let at = || format!("launch {li} (`{}`) of library call `{}`", c.plan.launches[li].node, c.symbol_of(li));
    if l.grid.is_some() {
        return Err(plan_err(format!("{}: a library call has no grid", at())));
    }
    let m = &l.scalars[0];
    let (n, k) = (Dim::c(g.n as i64), Dim::c(g.k as i64));
    let want = [m.clone() * k.clone(), n.clone() * k, m.clone() * n];
    for (j, ((need, want), what)) in l.needs.iter().zip(&want).zip(["x", "w", "y"]).enumerate() {
        if need != want {
            return Err(plan_err(format!(
                "{}: argument {j} ({what}) needs `{need}` elements, but a GEMM with m = `{m}`, n = {}, k = {} \
                 reads or writes `{want}`",
                at(),
                g.n,
                g.k
            )));
        }
    }
    Ok(())
}
