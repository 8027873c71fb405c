//! JIT compilation of one kernel and a safe way to call it: buffer count,
//! element types, lengths and writability are checked against the kernel's
//! declarations before the unsafe call, and a mismatch is a [`RunError`].

use super::lower::{host_isa, lower, signature, CompileError, IsaInfo};
use crate::kir::{Access, Kernel, Scalar};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
use std::time::{Duration, Instant};

type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// A buffer argument. Writable buffers must be passed as `…Mut`.
pub enum Arg<'a> {
    F32(&'a [f32]),
    F32Mut(&'a mut [f32]),
    I32(&'a [i32]),
    I32Mut(&'a mut [i32]),
    I64(&'a [i64]),
    I64Mut(&'a mut [i64]),
    /// Bools are one byte each, 0 or 1, as the kernels store them.
    Bool(&'a [bool]),
    BoolMut(&'a mut [bool]),
    /// Storage-only narrow floats (see [`Scalar::BF16`]).
    BF16(&'a [half::bf16]),
    BF16Mut(&'a mut [half::bf16]),
    F16(&'a [half::f16]),
    F16Mut(&'a mut [half::f16]),
}

impl Arg<'_> {
    fn describe(&self) -> (Scalar, usize, bool) {
        match self {
            Arg::F32(v) => (Scalar::F32, v.len(), false),
            Arg::F32Mut(v) => (Scalar::F32, v.len(), true),
            Arg::I32(v) => (Scalar::I32, v.len(), false),
            Arg::I32Mut(v) => (Scalar::I32, v.len(), true),
            Arg::I64(v) => (Scalar::I64, v.len(), false),
            Arg::I64Mut(v) => (Scalar::I64, v.len(), true),
            Arg::Bool(v) => (Scalar::Bool, v.len(), false),
            Arg::BoolMut(v) => (Scalar::Bool, v.len(), true),
            Arg::BF16(v) => (Scalar::BF16, v.len(), false),
            Arg::BF16Mut(v) => (Scalar::BF16, v.len(), true),
            Arg::F16(v) => (Scalar::F16, v.len(), false),
            Arg::F16Mut(v) => (Scalar::F16, v.len(), true),
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            Arg::F32(v) => v.as_ptr() as *mut u8,
            Arg::F32Mut(v) => v.as_mut_ptr() as *mut u8,
            Arg::I32(v) => v.as_ptr() as *mut u8,
            Arg::I32Mut(v) => v.as_mut_ptr() as *mut u8,
            Arg::I64(v) => v.as_ptr() as *mut u8,
            Arg::I64Mut(v) => v.as_mut_ptr() as *mut u8,
            Arg::Bool(v) => v.as_ptr() as *mut u8,
            Arg::BoolMut(v) => v.as_mut_ptr() as *mut u8,
            Arg::BF16(v) => v.as_ptr() as *mut u8,
            Arg::BF16Mut(v) => v.as_mut_ptr() as *mut u8,
            Arg::F16(v) => v.as_ptr() as *mut u8,
            Arg::F16Mut(v) => v.as_mut_ptr() as *mut u8,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RunError {
    #[error("kernel `{kernel}`: expected {expected} buffers, found {found}")]
    Count { kernel: String, expected: usize, found: usize },
    #[error("kernel `{kernel}`: buffer `{name}` expects {expected}, found {found}")]
    Buffer { kernel: String, name: String, expected: String, found: String },
    #[error("kernel `{kernel}`: expected {expected} scalar arguments, found {found}")]
    Scalars { kernel: String, expected: usize, found: usize },
    #[error("kernel `{kernel}`: length of buffer `{name}` {message}")]
    Length { kernel: String, name: String, message: String },
    #[error("kernel `{kernel}`: thread {thread} of {threads} is not a valid split")]
    Threads { kernel: String, thread: usize, threads: usize },
}

/// A JIT-compiled kernel. The module (and so the code) lives as long as this.
pub struct JitKernel {
    kernel: Kernel,
    f: KernelFn,
    /// Everything: ISA and JIT module setup, lowering, Cranelift
    /// compilation, finalisation.
    pub compile_time: Duration,
    /// Lowering and Cranelift compilation of this kernel alone (what a
    /// kernel adds when many share one module, as in an object file).
    pub codegen_time: Duration,
    pub isa: IsaInfo,
    _module: JITModule,
}

impl JitKernel {
    pub fn compile(kernel: &Kernel) -> Result<JitKernel, CompileError> {
        let start = Instant::now();
        let backend = |e: String| CompileError::Backend { kernel: kernel.name.clone(), message: e };
        let (isa, info) = host_isa(false)?;
        let mut jb = JITBuilder::with_isa(isa.clone(), cranelift_module::default_libcall_names());
        // The libm functions come from this process, the same ones the
        // interpreter calls.
        for (name, ptr, _) in crate::kir::libm::symbols() {
            jb.symbol(name, ptr);
        }
        let mut module = JITModule::new(jb);
        let mut ctx = module.make_context();
        let codegen_start = Instant::now();
        ctx.func.signature = signature(&isa);
        lower(kernel, &isa, &mut module, &mut ctx.func)?;
        let id = module
            .declare_function(&kernel.name, Linkage::Export, &ctx.func.signature)
            .map_err(|e| backend(e.to_string()))?;
        module.define_function(id, &mut ctx).map_err(|e| backend(format!("{e:?}")))?;
        let codegen_time = codegen_start.elapsed();
        module.clear_context(&mut ctx);
        module.finalize_definitions().map_err(|e| backend(e.to_string()))?;
        let code = module.get_finalized_function(id);
        // SAFETY: the function was defined with `signature`, which is this
        // type's C ABI.
        let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
        Ok(JitKernel {
            kernel: kernel.clone(),
            f,
            compile_time: start.elapsed(),
            codegen_time,
            isa: info,
            _module: module,
        })
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The compiled entry point, for callers that check the buffers
    /// against the kernel's declarations themselves and call it from
    /// several threads (the tuner's timing team). Calling it is unsafe:
    /// every buffer must have the declared element type and length for
    /// the scalars passed, and `self` must outlive every call.
    pub fn entry(&self) -> unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64) {
        self.f
    }

    /// Runs the whole kernel on the calling thread.
    pub fn run(&self, args: &mut [Arg]) -> Result<(), RunError> {
        self.run_part(args, &[], 0, 1)
    }

    /// Runs thread `thread`'s share of the outermost parallel loops, as one
    /// member of a team of `threads`.
    pub fn run_part(&self, args: &mut [Arg], scalars: &[i64], thread: usize, threads: usize) -> Result<(), RunError> {
        let k = &self.kernel;
        if scalars.len() != k.scalars.len() {
            return Err(RunError::Scalars { kernel: k.name.clone(), expected: k.scalars.len(), found: scalars.len() });
        }
        if threads == 0 || thread >= threads {
            return Err(RunError::Threads { kernel: k.name.clone(), thread, threads });
        }
        let decls: Vec<_> = k.global_buffers().map(|(_, d)| d).collect();
        if decls.len() != args.len() {
            return Err(RunError::Count { kernel: k.name.clone(), expected: decls.len(), found: args.len() });
        }
        for (d, a) in decls.iter().zip(args.iter()) {
            let (elem, len, writable) = a.describe();
            let need_mut = d.access == Access::Write;
            let want = k.buffer_len(d, scalars).map_err(|message| RunError::Length {
                kernel: k.name.clone(),
                name: d.name.clone(),
                message,
            })?;
            if elem != d.elem || len != want || (need_mut && !writable) {
                let rw = |m: bool| if m { "writable " } else { "" };
                return Err(RunError::Buffer {
                    kernel: k.name.clone(),
                    name: d.name.clone(),
                    expected: format!("{}{:?}[{want}]", rw(need_mut), d.elem),
                    found: format!("{}{elem:?}[{len}]", rw(writable)),
                });
            }
        }
        let ptrs: Vec<*mut u8> = args.iter_mut().map(|a| a.ptr()).collect();
        // SAFETY: every buffer has the element type and the length the
        // kernel declares for these scalar arguments, and writable buffers
        // are exclusive borrows; kernels index only within their declared
        // lengths (checked by the interpreter on the template tests).
        unsafe { (self.f)(ptrs.as_ptr(), scalars.as_ptr(), thread as i64, threads as i64) };
        Ok(())
    }
}
