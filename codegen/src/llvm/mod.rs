//! The LLVM lowering of KIR (cargo feature `llvm`, LLVM 22 through
//! inkwell), for the host CPU and, through [`emit_ptx`], NVIDIA GPUs.
//!
//! For the host: the same kernels, ABI and semantics as the Cranelift
//! lowering ([`crate::cranelift`]), compiled by LLVM's `default<O3>`
//! pipeline for the host CPU with all its features, so the loop and SLP
//! vectorizers can use 256-bit (AVX2/FMA), 512-bit (AVX-512) or NEON
//! vectors where Cranelift stops at 128 bits.
//!
//! Kernel ABI (identical to Cranelift's, see [`crate::cranelift`]):
//! `extern "C" fn(bufs: *const *mut u8, scalars: *const i64, thread: i64, threads: i64)`,
//! exported as `smelt_<name>`; the outermost `Parallel` loop on a path
//! takes this thread's contiguous chunk ([`crate::kir::interp::split_range`]).
//!
//! Semantics, op by op, follow the Cranelift lowering: `exp` and `tanh` are
//! the same inlined Cephes polynomials, `sin`, `cos`, `log`, `erf`, `pow`
//! and float `%` call the libm symbols of [`crate::kir::libm`] (lane by lane
//! for vectors; the object leaves them undefined for `-lm`), `rsqrt` is a
//! true division, float-to-int casts saturate. Float `max`/`min` are
//! `llvm.maxnum`/`llvm.minnum`, which is what the interpreter computes
//! (Rust's `f32::max`); templates that must propagate NaN test for it
//! explicitly. No fast-math flags are set, so LLVM never reassociates a sum
//! on its own; the one reassociation is deliberate: `Vectorized` reduction
//! loops are widened to twice their width (see `widen`), which sums the
//! same terms in another order (like a `ksplit` of the templates).
//!
//! GPU constructs (thread indices, barriers, shuffles, shared buffers) are
//! rejected with [`LlvmError::Unsupported`] for the host; [`emit_ptx`]
//! lowers GPU kernels through the same code to PTX (see `nvptx`).
//! `bf16`/`f16` buffers are read as `f32` exactly and written rounded to
//! nearest even, on both targets.

mod lower;
mod math;
mod nvptx;
mod widen;

pub use nvptx::{emit_ptx, GpuArch};

use crate::kir::Kernel;
use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::OptimizationLevel;

#[derive(Debug, thiserror::Error)]
pub enum LlvmError {
    #[error("kernel `{kernel}`: the LLVM lowering does not support {what}")]
    Unsupported { kernel: String, what: String },
    #[error("kernel `{kernel}`: {message}")]
    Backend { kernel: String, message: String },
    #[error("LLVM host target: {0}")]
    Target(String),
    #[error("LLVM module `{module}`: {message}")]
    Module { module: String, message: String },
    #[error("kernel `{kernel}` is a CPU kernel (it has no GPU launch geometry); only GPU kernels lower to PTX")]
    NotGpu { kernel: String },
    #[error("kernel `{kernel}` uses instructions of {needs} (wgmma), which {arch} lacks")]
    NeedsArch { kernel: String, arch: &'static str, needs: &'static str },
}

/// The host as LLVM sees it, for reports and manifests.
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub triple: String,
    /// LLVM's name of the host CPU (`znver3`, `sapphirerapids`, ...).
    pub cpu: String,
    /// The host's features in LLVM's spelling, `+avx2,+fma,-avx512f,...`.
    pub features: String,
}

impl HostInfo {
    /// The enabled features, without the `+` (LLVM's spelling).
    pub fn enabled_features(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.features.split(',').filter_map(|f| f.strip_prefix('+')).map(str::to_string).collect();
        out.sort();
        out
    }
}

/// The host target machine: host triple, CPU and features, PIC (the
/// object goes into a shared library), aggressive code generation.
fn host_machine() -> Result<(TargetMachine, HostInfo), LlvmError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(LlvmError::Target)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| LlvmError::Target(e.to_string()))?;
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    let tm = target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| LlvmError::Target(format!("no target machine for {triple} ({cpu})")))?;
    let info = HostInfo { triple: triple.as_str().to_string_lossy().into_owned(), cpu, features };
    Ok((tm, info))
}

/// What the host target machine is configured with.
pub fn host_info() -> Result<HostInfo, LlvmError> {
    host_machine().map(|(_, info)| info)
}

/// What [`compile`] emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// A relocatable object file.
    Object,
    /// Assembly text (for inspection).
    Assembly,
    /// The optimised LLVM IR text (for inspection).
    Ir,
}

/// Lowers every kernel into one module named `name`, optimises it with
/// `default<O3>` for the host and emits `what`.
pub fn compile(kernels: &[Kernel], name: &str, what: Output) -> Result<Vec<u8>, LlvmError> {
    let (tm, _) = host_machine()?;
    build(kernels, name, &tm, lower::Flavor::HOST, what)
}

/// Lowers every kernel for `flavor` into one module named `name` for the
/// target machine `tm`, optimises it with `default<O3>` and emits `what`.
fn build(
    kernels: &[Kernel],
    name: &str,
    tm: &TargetMachine,
    flavor: lower::Flavor,
    what: Output,
) -> Result<Vec<u8>, LlvmError> {
    let cx = Context::create();
    let module = cx.create_module(name);
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let merr = |message: String| LlvmError::Module { module: name.to_string(), message };
    for k in kernels {
        lower::lower(k, &cx, &module, flavor)?;
    }
    module.verify().map_err(|e| merr(format!("invalid IR: {e}")))?;
    module.run_passes("default<O3>", tm, PassBuilderOptions::create()).map_err(|e| merr(e.to_string()))?;
    match what {
        Output::Ir => Ok(module.print_to_string().to_bytes().to_vec()),
        Output::Object | Output::Assembly => {
            let ft = if what == Output::Object { FileType::Object } else { FileType::Assembly };
            let buf = tm.write_to_memory_buffer(&module, ft).map_err(|e| merr(e.to_string()))?;
            Ok(buf.as_slice().to_vec())
        }
    }
}

/// Emits an object file (position-independent, for a shared library)
/// defining each kernel as the exported symbol `smelt_<name>`.
pub fn emit_object(kernels: &[Kernel], name: &str) -> Result<Vec<u8>, LlvmError> {
    compile(kernels, name, Output::Object)
}
