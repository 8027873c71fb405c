//! Opening a GPU: the driver library (looked for first, since cudarc
//! panics on the first driver call when it is missing), the device, its
//! primary context and one stream. Every cudarc call made while opening runs
//! under a panic guard, so a driver that is present but unusable (an old
//! one missing a symbol) is an error too.
//!
//! Event tracking is turned off before anything is allocated: the runtime
//! uses one stream, so cudarc's per-allocation events would only cost time
//! (and get in the way of graph capture).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, CudaStream};

use super::{describe, CudaError};

/// What a GPU is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    /// `NVIDIA H200`.
    pub name: String,
    /// Compute capability (major, minor): (9, 0) for Hopper.
    pub compute_capability: (u32, u32),
    /// Global memory in bytes.
    pub memory: usize,
    pub multiprocessors: u32,
    /// The CUDA version the driver supports, as `cuDriverGetVersion`
    /// gives it (12080 for 12.8); 0 when it could not be read.
    pub driver_version: u32,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "GPU {}: {} (sm_{major}{minor}, {} SMs, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.multiprocessors,
            self.memory as f64 / (1u64 << 30) as f64
        )
    }
}

/// An opened GPU: its context and the stream everything runs on.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub info: DeviceInfo,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.info)
    }
}

/// Runs `f`, turning a panic inside cudarc into [`CudaError::NoDriver`].
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a driver call panicked".to_string());
            Err(CudaError::NoDriver(format!("the CUDA driver library is unusable: {msg}")))
        }
    }
}

/// Whether the driver library can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: only tries to `dlopen` the driver library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn no_driver() -> CudaError {
    CudaError::NoDriver(
        "the NVIDIA driver library (libcuda.so) was not found; install the NVIDIA driver, \
         or add the directory holding libcuda.so to LD_LIBRARY_PATH"
            .to_string(),
    )
}

/// Opens GPU `ordinal`: initialises the driver, retains the device's
/// primary context and creates a stream.
pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
    if !driver_present() {
        return Err(no_driver());
    }
    guard(|| {
        let count = CudaContext::device_count().map_err(|e| match e.0 {
            CUresult::CUDA_ERROR_NO_DEVICE => CudaError::NoDevice(describe(&e)),
            _ => CudaError::NoDriver(format!("the driver does not initialise: {}", describe(&e))),
        })?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!("GPU {ordinal} was asked for; this machine has {count}")));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::NoDevice(format!("GPU {ordinal} cannot be opened: {}", describe(&e))))?;
        // SAFETY: nothing has been allocated in this context by this
        // runtime yet, and everything runs on the one stream created below.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a: CUdevice_attribute, what: &str| {
            ctx.attribute(a).map_err(|e| CudaError::Driver {
                what: format!("reading GPU {ordinal}'s {what}"),
                message: describe(&e),
            })
        };
        let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "compute capability")?;
        let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "compute capability")?;
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "multiprocessor count")?;
        let driver = |what: &str| {
            let what = what.to_string();
            move |e: cudarc::driver::DriverError| CudaError::Driver { what, message: describe(&e) }
        };
        let name = ctx.name().map_err(driver("reading the GPU's name"))?;
        let memory = ctx.total_mem().map_err(driver("reading the GPU's memory size"))?;
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        let mut driver_version: std::ffi::c_int = 0;
        // SAFETY: writes one int; the driver is initialised (the context
        // above was created).
        let read = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        if read != CUresult::CUDA_SUCCESS {
            driver_version = 0;
        }
        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            memory,
            multiprocessors: sms.max(0) as u32,
            driver_version: driver_version.max(0) as u32,
        };
        Ok(Gpu { ctx, stream, info })
    })
}

/// What GPU `ordinal` is, or why there is none (no driver, no device).
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    open(ordinal).map(|g| g.info)
}
