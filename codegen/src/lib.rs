//! Code generation: kernels for the fused IR.
//!
//! What exists (the foundation of the CPU backend, issue 5):
//! - [`kir`]: the kernel IR, its printer, type checker and interpreter (with a
//!   GPU thread-block simulation);
//! - [`templates`]: KIR builders for elementwise ops, `rms_norm`, GEMV,
//!   softmax and a blocked GEMM, from shapes and tuning parameters;
//! - [`cranelift`]: the CPU lowering (f32x4, FMA), a JIT with a safe calling
//!   wrapper, and object-file emission for the future shared library;
//! - [`tuning`]: the parameter spaces of the tunable kernels (CPU weight
//!   products), their variants and signatures, and the measured winners
//!   the scheduler builds (`smelt tune` measures them, in `smelt-tune`);
//! - [`aot`]: every kernel in one object, linked with the system `cc` into
//!   the artifact's shared library (what `smelt_runtime::native` loads), and
//!   the plan entries and CPU features that describe it.
//!
//! Next steps, in order: scheduling the fused graph into template
//! instances and wiring `aot` into `smelt compile --target cpu`; the LLVM
//! lowering of the same KIR (256-bit vectors for GEMM, NVPTX for GPUs); more
//! templates (attention, rope, gather, argmax, packed-panel GEMM).

pub mod aot;
pub mod constants;
pub mod cranelift;
pub mod kir;
pub mod kv_in_place;
#[cfg(feature = "llvm")]
pub mod llvm;
pub mod ptxas;
pub mod schedule;
pub mod select;
pub mod simulate;
pub mod strided_slices;
pub mod templates;
pub mod tuning;

#[cfg(feature = "llvm")]
pub use llvm::{emit_ptx, GpuArch};
