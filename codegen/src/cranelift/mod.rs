//! The Cranelift lowering of KIR for CPUs: `f32x4` vectors, FMA when the
//! host has it, a JIT for tests and object files for the artifact's shared
//! library.
//!
//! Kernel ABI (what the future runtime's thread team calls):
//! `extern "C" fn(bufs: *const *mut u8, scalars: *const i64, thread: i64, threads: i64)`,
//! where `bufs` holds the global buffers in declaration order. Every thread
//! of the team calls the kernel with its index; the outermost `Parallel`
//! loop takes that thread's chunk (the split of
//! [`crate::kir::interp::split_range`]).
//!
//! `exp` and `tanh` are inlined polynomials (Cephes `expf`/`tanhf`), the
//! same for scalars and vectors: `exp` is within 2 ulp for inputs in
//! [-87.3, 88], gives 0 below and saturates above (`exp(88)`). `floor`,
//! `ceil` and `round` are instructions. `sin`, `cos`, `log`, `erf`, `pow`
//! and float `%` call libm (`sinf`, ..., `fmodf`; lane by lane for
//! vectors) as imported symbols: the JIT resolves them to
//! [`crate::kir::libm`]'s, objects leave them undefined for `-lm`.
//!
//! Storage-only `BF16`/`F16` buffers: a load (scalar, or 4 lanes with
//! `pmovzxwd`) widens exactly to `f32` with integer and float bit
//! manipulation (no F16C needed); a store rounds to nearest even as the
//! `half` crate does, NaNs included.
//!
//! GPU constructs (thread indices, barriers, shuffles, tensor-core MMAs,
//! shared buffers) are
//! rejected with [`CompileError::Unsupported`].

mod jit;
mod lower;

pub use jit::{Arg, JitKernel, RunError};
pub use lower::{emit_object, host_isa, CompileError, IsaInfo};
