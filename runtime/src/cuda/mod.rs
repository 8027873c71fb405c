//! The GPU backend: runs a `cuda` launch plan (PTX kernels, a
//! [`NativePlan`] with `ptx` modules, thread blocks and grids) on an NVIDIA
//! GPU through the CUDA driver API (cudarc, loaded at run time: building
//! needs no CUDA toolkit, and a machine without a driver gets
//! [`CudaError::NoDriver`], never a panic).
//!
//! - [`plan`]: [`CudaPlan`], the host half: the plan checked with the CPU
//!   runtime's [`crate::native::checked`] code plus blocks, grids and PTX
//!   architectures, and per call every size, `needs` and grid evaluated
//!   before anything is launched;
//! - [`host`]: [`Host`], the host half of every call, up to the driver
//!   calls (placement kept across calls, every launch's arguments in one
//!   table), which runs and is timed without a GPU;
//! - [`ptx`]: which PTX module a device runs (the newest it can);
//! - [`blas`]: cuBLAS for the plan's library calls (GEMMs), loaded only
//!   when the plan has some;
//! - [`device`]: opening the driver, the device and a stream, guarded;
//! - [`model`]: [`CudaModel`], the [`crate::Forward`] implementation, with
//!   the weights uploaded once, one device arena placed by liveness, and a
//!   device-resident KV cache for decoding ([`crate::CachedDecode`]);
//! - [`debug`]: `SMELT_CHECK_NAN`, `SMELT_DUMP` and `SMELT_WATCH`, which
//!   check or record every launch's buffers.
//!
//! [`NativePlan`]: crate::plan::NativePlan

pub mod blas;
pub mod debug;
pub mod device;
pub mod host;
pub mod model;
pub mod plan;
pub mod ptx;

use std::path::PathBuf;

pub use device::{probe, DeviceInfo};
pub use host::{DeviceMemory, Host, Issue, Read};
pub use model::{CudaModel, CudaStats};
pub use plan::{CudaPlan, Prepared};

use crate::native::NativeError;

/// Everything that can go wrong loading or running a GPU model.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The driver library is missing or cannot initialise.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    /// A vendor library the plan calls (cuBLAS) is missing or unusable.
    #[error("the model's plan calls {library}, which cannot be used: {why}")]
    NoLibrary { library: String, why: String },
    /// The driver works but there is no (usable) GPU.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error(
        "the artifact has no PTX this GPU can run: the GPU is {device}, the PTX modules are for {}; \
         recompile the model for {device} or an older architecture",
        .available.join(", ")
    )]
    NoModule { device: String, available: Vec<String> },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PTX module `{file}` ({arch}) does not load: {message}")]
    LoadModule { file: String, arch: String, message: String },
    #[error("PTX module `{file}` does not define kernel `{symbol}` ({message}); the artifact is corrupt or was built by another version")]
    MissingKernel { file: String, symbol: String, message: String },
    #[error("invalid launch plan: {0}")]
    Plan(String),
    /// Refused inputs, or a plan the shared checks refuse (same messages as
    /// the CPU runtime).
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("out of GPU memory: {what} needs {bytes} bytes")]
    OutOfMemory { what: String, bytes: usize },
    #[error("CUDA error while {what}: {message}")]
    Driver { what: String, message: String },
    #[error("this model cannot keep its KV cache on the GPU: {0}")]
    NoDeviceCache(String),
}

impl From<CudaError> for crate::ForwardError {
    fn from(e: CudaError) -> crate::ForwardError {
        crate::ForwardError::Other(e.to_string())
    }
}

/// `CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)`.
pub(crate) fn describe(e: &cudarc::driver::DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}
