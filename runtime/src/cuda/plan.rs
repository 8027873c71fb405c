//! [`CudaPlan`]: the host half of a GPU model, everything that needs no
//! device. It checks a `cuda` launch plan with the CPU runtime's own
//! [`CheckedPlan`] (same messages, same refusals), then what is GPU-specific:
//! every kernel has a valid thread block, every launch a grid, every PTX
//! module a known architecture. Per call, [`CudaPlan::prepare`] sizes the
//! call (every `needs` against its buffer, before anything is launched) and
//! evaluates the grids.
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
use crate::plan::{NativePlan, PtxModule};

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
        let blocks = plan.kernels.iter().map(|k| check_block(&k.symbol, k.block)).collect::<Result<Vec<_>, _>>()?;
        let checked = CheckedPlan::new(plan, signature, weights_len)?;
        for (li, l) in checked.launches.iter().enumerate() {
            if l.grid.is_none() {
                return Err(plan_err(format!(
                    "launch {li} (`{}`) of kernel `{}` has no grid",
                    checked.plan.launches[li].node,
                    checked.symbol_of(li)
                )));
            }
        }
        let cache = CacheLayout::of(&checked);
        Ok(CudaPlan { checked, blocks, cache })
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
