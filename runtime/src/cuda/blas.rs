//! cuBLAS for a plan's library calls ([`crate::plan::LibraryCall::Gemm`]),
//! loaded at run time like the driver: a plan without library calls never
//! touches it, and a machine without `libcublas` gets
//! [`CudaError::NoLibrary`] naming it when a plan that needs it opens, never
//! a panic (cudarc panics on the first call into a missing library or
//! symbol, so both are looked for first).
//!
//! Why `cublasGemmEx` and not cuBLASLt: one call per GEMM with no
//! descriptors, layouts or heuristic queries to create and keep per shape;
//! it takes bf16/f16 operands with an f32 result and f32 compute (the
//! mixed-type case the weight products need), picks tensor-core kernels by
//! itself (in cuBLAS 12 it goes through the same heuristics as cuBLASLt),
//! and is captured in a CUDA graph once the handle has a workspace of its
//! own. cuBLASLt's one advantage here, fused epilogues, does not cover the
//! gated MLP's `act(g) * u` anyway.
//!
//! The handle runs on the model's one stream, with a workspace it owns set
//! by `cublasSetWorkspace` (32 MiB, what NVIDIA recommends for Hopper), so
//! that no call allocates memory, which a graph capture would not allow.
//!
//! Row-major to column-major: cuBLAS sees a row-major `R [r, c]` with
//! leading dimension `c` as the column-major `c × r` matrix `Rᵀ`. We want
//! `y[m, n] = x[m, k] · w[n, k]ᵀ`, i.e. `yᵀ (n × m) = w (n × k) · xᵀ (k × m)`
//! in column-major terms, and `yᵀ` column-major with `ldc = n` is exactly
//! `y`'s row-major memory. `w`'s memory is the column-major `k × n` matrix
//! `wᵀ`, so `op(A) = w` takes `transa = T` with `lda = k`; `x`'s memory is
//! the column-major `k × m` matrix `xᵀ`, which is `op(B)` as it is:
//! `transb = N`, `ldb = k`. So the call is
//! `cublasGemmEx(h, T, N, n, m, k, 1, w, k, x, k, 0, y, n)` (cuBLAS's
//! `m, n, k` = our `n, m, k`): the "TN" layout, cuBLAS's fastest.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{result as blas, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::guard;
use super::CudaError;
use crate::plan::{Elem, GemmCall, GemmCompute};

/// The workspace cuBLAS gets: 32 MiB, NVIDIA's recommendation for Hopper
/// (4 MiB for older GPUs).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// The cuBLAS entry points the runtime calls, looked for before the first
/// call (cudarc panics on a missing one).
const SYMBOLS: &[&str] =
    &["cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2", "cublasGemmEx"];

/// A cuBLAS handle on one stream, with its workspace.
pub struct Blas {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blas")
    }
}

fn no_library(why: impl Into<String>) -> CudaError {
    CudaError::NoLibrary { library: "cuBLAS (libcublas.so)".into(), why: why.into() }
}

/// Whether `libcublas` can be loaded at all.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to `dlopen` the library by its usual names.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// The cudarc element type of a GEMM operand.
fn data_type(e: Elem) -> cudaDataType {
    match e {
        Elem::BF16 => cudaDataType::CUDA_R_16BF,
        Elem::F16 => cudaDataType::CUDA_R_16F,
        // Checked by `CudaPlan::new`: operands and results are floats.
        _ => cudaDataType::CUDA_R_32F,
    }
}

/// Whether `libcublas` loads and has every entry point the runtime calls;
/// [`CudaError::NoLibrary`], naming it, when not. Needs no GPU.
pub fn check_cublas() -> Result<(), CudaError> {
    if !cublas_present() {
        return Err(no_library(
            "it was not found; install the CUDA toolkit's cuBLAS (e.g. PyPI's nvidia-cublas-cu12) and add the \
             directory holding libcublas.so.12 to LD_LIBRARY_PATH, or recompile the model with --gpu-gemm kernels",
        ));
    }
    // SAFETY: loads the library found above; `get` only looks symbols up.
    let lib = unsafe { cudarc::cublas::sys::culib() };
    for s in SYMBOLS {
        // SAFETY: the symbol is only looked up, never called through this type.
        if let Err(e) = unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) } {
            return Err(no_library(format!("it lacks `{s}` ({e}); it is older than this runtime needs")));
        }
    }
    Ok(())
}

impl Blas {
    /// Loads cuBLAS, creates a handle on `stream` and gives it a workspace.
    pub fn open(stream: &Arc<CudaStream>) -> Result<Blas, CudaError> {
        check_cublas()?;
        guard(|| {
            let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver {
                what: "creating a cuBLAS handle".into(),
                message: format!("{e:?}"),
            })?;
            let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| CudaError::Driver {
                what: "allocating cuBLAS's workspace".into(),
                message: super::describe(&e),
            })?;
            let (ptr, _) = workspace.device_ptr(stream);
            // SAFETY: the workspace is device memory of that size, owned by
            // the `Blas` with the handle, so it outlives every call on it.
            unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut c_void, WORKSPACE_BYTES) }
                .result()
                .map_err(|e| CudaError::Driver {
                    what: "setting cuBLAS's workspace".into(),
                    message: format!("{e:?}"),
                })?;
            Ok(Blas { blas, _workspace: workspace })
        })
    }

    /// Enqueues `y[m, n] = x[m, k] · w[n, k]ᵀ` on the handle's stream (see
    /// the module docs for the column-major mapping).
    ///
    /// # Safety
    /// `x`, `w` and `y` must be device addresses holding at least `m·k`,
    /// `n·k` and `m·n` elements of the call's types, `m` must fit an `i32`,
    /// and the handle's context must be current.
    pub unsafe fn gemm(&self, call: &GemmCall, m: u64, x: u64, w: u64, y: u64) -> Result<(), String> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (n, k) = (call.n as i32, call.k as i32);
        let compute = match call.compute {
            GemmCompute::F32 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
            GemmCompute::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        // SAFETY: the caller's contract; alpha and beta are host f32s (the
        // handle's default pointer mode), read before the call returns.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m as i32,
                k,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                data_type(call.b),
                k,
                x as *const c_void,
                data_type(call.a),
                k,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                data_type(call.c),
                n,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cublasGemmEx: {e:?}"))
    }
}
