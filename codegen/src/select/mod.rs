//! Kernel selection: the KIR kernel that computes one IR node, for every
//! value of the graph's symbols.
//!
//! Contract of every [`Instance`] (the scheduler and the runtime rely on it):
//! - the kernel's global buffers are the node's operands in order, then its
//!   results in order, each dense row-major in the element type of its IR
//!   dtype (f32, i64, bool as one byte; narrower floats are computed as f32);
//! - `scalars` gives, as dims over the graph's symbols, the value of each of
//!   the kernel's scalar parameters; a kernel is the same for every value of
//!   them, so identical nodes in different layers share one kernel;
//! - every buffer's declared length, with `scalars` substituted, is exactly
//!   the element count of the IR value bound to it;
//! - all stores sit in one top-level `Parallel` loop (see `templates`);
//!   GPU kernels instead carry their launch shape.
//!
//! A node may instead be computed by [`Steps`]: several kernel launches in
//! order (GPU split-keys attention: partials, then their combination),
//! sharing scratch buffers that live for the node's launches only. Each
//! step binds its kernel's global buffers to the node's operands, results
//! and scratch buffers explicitly, and the length contract holds for each
//! (a scratch buffer's length is a dim over the graph's symbols).
//!
//! One file per op family returns `Ok(None)` for ops it does not handle;
//! [`select`] tries them in turn.

mod elementwise;
mod fused;
mod gpu;
pub mod gpu_library;
mod gpu_linalg;
mod layout;
mod linalg;
mod reduce;

pub use fused::{select_in_place, CacheInPlace};
pub use gpu::{select_gpu, select_gpu_with, GpuConfig};
pub use gpu_linalg::{weight_gated_mlp_gpu, weight_matmul_gpu, weight_node_gpu, weight_product_gpu};
pub use layout::{gather_packed, gather_stored};
pub use linalg::{
    gated_mlp_weight_nk, matmul_weight_nk, weight_gated_mlp, weight_gated_mlp_with, weight_matmul, weight_matmul_with,
    weight_product_panels, weight_product_rows, Packing, PanelParams, WeightKernel,
};

use crate::kir::{Kernel, Scalar};
use smelt_ir::{DType, Dim, Op, TensorType};

/// A kernel plus the values of its scalar parameters.
#[derive(Clone, Debug)]
pub struct Instance {
    pub kernel: Kernel,
    pub scalars: Vec<Dim>,
}

/// How a node is computed.
// A selection is short-lived (one per node while scheduling), so the
// kernel is kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Selected {
    /// By a kernel launch.
    Kernel(Instance),
    /// By no code: the (single) result is a view of operand 0 starting
    /// `offset` elements in, with the result's shape (reshape, squeeze,
    /// unsqueeze, a slice that keeps a contiguous block).
    Alias { offset: Dim },
    /// By several launches in order, with scratch memory.
    Steps(Steps),
}

/// Kernel launches that together compute one node (see the module docs).
#[derive(Clone, Debug)]
pub struct Steps {
    pub scratch: Vec<Scratch>,
    pub steps: Vec<Step>,
}

/// A buffer only the node's own launches use.
#[derive(Clone, Debug, PartialEq)]
pub struct Scratch {
    /// A suffix for the buffer's name in the plan.
    pub name: String,
    pub elem: Scalar,
    /// Its element count, over the graph's symbols.
    pub len: Dim,
}

/// One launch of [`Steps`]: `args[i]` is what the kernel's `i`-th global
/// buffer is bound to.
#[derive(Clone, Debug)]
pub struct Step {
    pub instance: Instance,
    pub args: Vec<Arg>,
    /// Bytes the launch moves, over the graph's symbols, where that is far
    /// less than its arguments hold (the launch's `work` in the plan; the
    /// CPU runtime runs a small one on one thread, without a barrier of
    /// the team of its own). None: judged by its arguments.
    pub work: Option<Dim>,
}

/// What a global buffer of a [`Step`]'s kernel is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    Operand(usize),
    Result(usize),
    Scratch(usize),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectError {
    #[error("no CPU kernel for `{op}` with operands {operands}: {why}")]
    Unsupported { op: String, operands: String, why: String },
}

impl SelectError {
    pub fn unsupported(op: &Op, inputs: &[TensorType], why: impl Into<String>) -> SelectError {
        let operands = inputs.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
        SelectError::Unsupported { op: op.name().to_string(), operands, why: why.into() }
    }
}

/// A node's operands as a selection checks them; each refusal names the op
/// and its operands.
struct Operands<'a> {
    op: &'a Op,
    inputs: &'a [TensorType],
}

impl Operands<'_> {
    fn unsupported(&self, why: &str) -> SelectError {
        SelectError::unsupported(self.op, self.inputs, why)
    }

    /// Every operand is a float (f32 at run time).
    fn floats(&self) -> Result<(), SelectError> {
        if self.inputs.iter().all(|t| elem_of(t.dtype) == Scalar::F32) {
            Ok(())
        } else {
            Err(self.unsupported("needs float operands"))
        }
    }

    /// The constant last dim of `t` (`what` names it in the error).
    fn last_const(&self, t: &TensorType, what: &str) -> Result<usize, SelectError> {
        t.shape
            .last()
            .and_then(|d| d.as_const())
            .map(|c| c as usize)
            .ok_or_else(|| self.unsupported(&format!("{what}'s last dim must be a constant")))
    }
}

/// The KIR element type that holds an IR dtype at run time.
pub fn elem_of(d: DType) -> Scalar {
    match d {
        DType::Bool => Scalar::Bool,
        DType::I32 => Scalar::I32,
        d if d.is_int() => Scalar::I64,
        _ => Scalar::F32,
    }
}

/// The KIR element type that holds an IR dtype in a GPU plan: like
/// [`elem_of`], except that bf16 and f16 values (narrow activations, see
/// `smelt_passes::narrow`) live in bf16/f16 buffers.
pub fn gpu_elem_of(d: DType) -> Scalar {
    match d {
        DType::BF16 => Scalar::BF16,
        DType::F16 => Scalar::F16,
        d => elem_of(d),
    }
}

/// Why a kernel cannot take a narrow buffer in place of an f32 one.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NarrowError {
    #[error("buffer `{0}` is not an f32 global buffer")]
    NotF32(String),
    #[error("the kernel reads back its result `{0}`, which would then be rounded between its own steps")]
    ReadsResult(String),
}

/// The kernel with its `i`-th global buffer stored as `elem` (`BF16` or
/// `F16`) for each `(i, elem)` of `narrow`, instead of f32: loads from it
/// widen exactly and stores into it round to nearest even, so the kernel
/// computes in f32 what it did before and reads narrow operands or rounds
/// its results as it stores them. A result the kernel also loads is
/// refused (its own intermediate reads would see rounded values). The
/// kernel's name gains a suffix that says which buffers are narrow.
pub fn narrow_buffers(kernel: &Kernel, narrow: &[(usize, Scalar)]) -> Result<Kernel, NarrowError> {
    let mut k = kernel.clone();
    if narrow.is_empty() {
        return Ok(k);
    }
    let globals: Vec<crate::kir::BufId> = kernel.global_buffers().map(|(id, _)| id).collect();
    let mut suffix = String::new();
    for &(i, elem) in narrow {
        let Some(&id) = globals.get(i) else { return Err(NarrowError::NotF32(format!("#{i}"))) };
        let decl = kernel.buf(id);
        if decl.elem != Scalar::F32 || !elem.is_narrow_float() {
            return Err(NarrowError::NotF32(decl.name.clone()));
        }
        if decl.access == crate::kir::Access::Write && loads(kernel, id) {
            return Err(NarrowError::ReadsResult(decl.name.clone()));
        }
        k.buffers[id.0 as usize].elem = elem;
        suffix.push_str(&format!("_{}{}", i, if elem == Scalar::BF16 { "b" } else { "h" }));
    }
    k.name = format!("{}_n{suffix}", k.name);
    // The sm_90a body (what `emit_ptx` lowers for sm_90a) reads and writes
    // the same buffers: narrowed alike, or its stores would write f32
    // elements over a narrow buffer's neighbours.
    if let Some(v) = &kernel.sm90a {
        k.sm90a = Some(Box::new(narrow_buffers(v, narrow)?));
    }
    Ok(k)
}

/// Whether any expression of `k` loads from `buf` (MMAs read shared
/// buffers only).
fn loads(k: &Kernel, buf: crate::kir::BufId) -> bool {
    let mut found = false;
    crate::templates::gpu::gpuize::exprs(&k.body, &mut |e| {
        found |= matches!(e, crate::kir::Expr::Load { buf: b, .. } if *b == buf);
    });
    found
}

/// Selects the kernel (or alias) for one node.
pub fn select(op: &Op, inputs: &[TensorType], outputs: &[TensorType]) -> Result<Selected, SelectError> {
    type Family = fn(&Op, &[TensorType], &[TensorType]) -> Result<Option<Selected>, SelectError>;
    let families: &[Family] = &[elementwise::select, layout::select, reduce::select, linalg::select, fused::select];
    for f in families {
        if let Some(s) = f(op, inputs, outputs)? {
            return Ok(s);
        }
    }
    Err(SelectError::unsupported(op, inputs, "no kernel family handles this op yet"))
}
