//! KIR to LLVM IR, one function per kernel, mirroring the Cranelift
//! lowering statement by statement (see the parent module for semantics).
//! One lowering serves both targets: the [`Abi`] decides the function's
//! signature and prologue, how `Parallel` loops run and whether GPU
//! constructs exist (their NVPTX forms are in `nvptx`); [`Libm`] decides
//! whether `sin`, `cos`, `log`, `erf`, `pow` and float `%` call the system
//! libm or self-contained IR (`math`, what NVPTX uses).
//!
//! Every KIR variable lives in an `alloca` of the entry block, zeroed
//! there (Cranelift reads an unassigned variable as zero); `default<O3>`
//! promotes them to SSA values. Scalar bools are `i1` in registers and one
//! byte (0 or 1) in buffers; bool vectors are `<n x i1>`. `bf16` and `f16`
//! buffer elements are `i16` and `half` in memory and `float` in registers
//! (see `load_mem` and `store_mem`). Instructions are built through the
//! LLVM C API (`inkwell::llvm_sys`), which treats scalars and vectors alike.

use super::widen::{self, Plan};
use super::LlvmError;
use crate::kir::{self, BinOp, CmpOp, Expr, Kernel, LoopKind, Pick, RedOp, Scalar, Space, Stmt, Ty, UnOp, Var};
use inkwell::context::Context;
use inkwell::llvm_sys::core::*;
use inkwell::llvm_sys::prelude::*;
use inkwell::llvm_sys::{LLVMIntPredicate as IP, LLVMRealPredicate as RP};
use inkwell::module::Module;
use std::collections::HashMap;
use std::ffi::CString;

/// An empty value name.
pub(super) const NONE: *const std::ffi::c_char = c"".as_ptr();

/// The calling convention and execution model a kernel is lowered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Abi {
    /// The host kernel ABI of the parent module: one call per thread of the
    /// team, the outermost `Parallel` loop split between them.
    Host,
    /// A PTX `.entry` (see `nvptx`): buffers and scalars as parameters,
    /// `Parallel` loops serial, GPU constructs allowed.
    Ptx,
}

/// Where the libm functions (`sinf`, `cosf`, `logf`, `erff`, `powf`,
/// `fmodf`) come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Libm {
    /// Calls to the system's symbols (the host; bit-identical to the
    /// interpreter, which calls the same functions).
    System,
    /// Internal functions built from IR (`math`), for targets without a
    /// libm (NVPTX), and to test those on the host.
    Inline,
}

/// What one lowering is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Flavor {
    pub abi: Abi,
    pub libm: Libm,
}

impl Flavor {
    pub const HOST: Flavor = Flavor { abi: Abi::Host, libm: Libm::System };
    pub const PTX: Flavor = Flavor { abi: Abi::Ptx, libm: Libm::Inline };
}

/// Lowers `k` into `module` as the function `smelt_<name>` (exported for the
/// host, a kernel entry for PTX).
pub(super) fn lower(k: &Kernel, cx: &Context, module: &Module, flavor: Flavor) -> Result<(), LlvmError> {
    if flavor.abi == Abi::Host {
        if let Some(b) = k.buffers.iter().find(|b| b.space == Space::Shared) {
            return Err(unsupported(k, format!("shared buffer `{}`", b.name)));
        }
    }
    let symbol = CString::new(crate::aot::symbol_of(k)).map_err(|_| backend(k, "kernel name contains NUL".into()))?;
    let (cx, m) = (cx.raw(), module.as_mut_ptr());
    // SAFETY: every call below gets live handles of this context and
    // module, values and types created in this context, and a builder that
    // is positioned in a block of the function being built.
    unsafe {
        let func = match flavor.abi {
            Abi::Host => {
                let ptr = LLVMPointerTypeInContext(cx, 0);
                let i64t = LLVMInt64TypeInContext(cx);
                let mut params = [ptr, ptr, i64t, i64t];
                let fty = LLVMFunctionType(LLVMVoidTypeInContext(cx), params.as_mut_ptr(), 4, 0);
                LLVMAddFunction(m, symbol.as_ptr(), fty)
            }
            Abi::Ptx => super::nvptx::declare_entry(k, cx, m, &symbol),
        };
        for attr in ["nounwind", "mustprogress"] {
            add_fn_attr(cx, func, attr);
        }
        let b = LLVMCreateBuilderInContext(cx);
        let entry = LLVMAppendBasicBlockInContext(cx, func, c"entry".as_ptr());
        LLVMPositionBuilderAtEnd(b, entry);
        let (thread, threads) = match flavor.abi {
            Abi::Host => (LLVMGetParam(func, 2), LLVMGetParam(func, 3)),
            Abi::Ptx => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let mut l = Lower {
            k,
            cx,
            m,
            b,
            func,
            flavor,
            vars: vec![],
            bufs: vec![None; k.buffers.len()],
            thread,
            threads,
            parallel_depth: 0,
            wide: None,
            wgmma_vars: vec![],
        };
        let result = l.body();
        LLVMDisposeBuilder(l.b);
        result
    }
}

/// Adds the enum attribute `name` (no argument) to a function.
///
/// # Safety
/// `cx` and `func` are live handles of one context.
pub(super) unsafe fn add_fn_attr(cx: LLVMContextRef, func: LLVMValueRef, name: &str) {
    let kind = LLVMGetEnumAttributeKindForName(name.as_ptr().cast(), name.len());
    LLVMAddAttributeAtIndex(func, u32::MAX, LLVMCreateEnumAttribute(cx, kind, 0));
}

pub(super) fn unsupported(k: &Kernel, what: String) -> LlvmError {
    LlvmError::Unsupported { kernel: k.name.clone(), what }
}

pub(super) fn backend(k: &Kernel, message: String) -> LlvmError {
    LlvmError::Backend { kernel: k.name.clone(), message }
}

/// The widened lowering of a `Vectorized` loop body in progress: vector
/// types of `lanes` lanes become `lanes * factor` lanes, and the variables
/// in `slots` live in those wide slots.
pub(super) struct Wide {
    lanes: u8,
    factor: u8,
    slots: HashMap<Var, LLVMValueRef>,
}

pub(super) struct Lower<'a> {
    pub k: &'a Kernel,
    pub cx: LLVMContextRef,
    pub m: LLVMModuleRef,
    pub b: LLVMBuilderRef,
    pub func: LLVMValueRef,
    pub flavor: Flavor,
    /// Each variable's alloca and value type.
    vars: Vec<(LLVMValueRef, LLVMTypeRef)>,
    /// Each buffer's base address (global buffers from the parameters,
    /// shared ones from module globals).
    pub bufs: Vec<Option<LLVMValueRef>>,
    /// The host ABI's thread index and team size (null for PTX).
    thread: LLVMValueRef,
    threads: LLVMValueRef,
    parallel_depth: usize,
    pub wide: Option<Wide>,
    /// The accumulators of the wgmmas lowered since the last
    /// `wgmma.wait_group 0`, which passes them through an empty asm so that
    /// nothing reads them before the wait (see `nvptx`).
    pub wgmma_vars: Vec<kir::Var>,
}

pub(super) type R<T> = Result<T, LlvmError>;

// SAFETY (every `unsafe` block of this impl): as in `lower`, the handles
// are live and belong to this context; the builder is positioned.
impl Lower<'_> {
    fn body(&mut self) -> R<()> {
        let k = self.k;
        unsafe {
            for d in &k.vars {
                let t = self.ty(d.ty);
                let slot = LLVMBuildAlloca(self.b, t, NONE);
                self.vars.push((slot, t));
            }
            for &(slot, t) in &self.vars {
                LLVMBuildStore(self.b, LLVMConstNull(t), slot);
            }
            if self.flavor.abi == Abi::Host {
                let ptr = LLVMPointerTypeInContext(self.cx, 0);
                let (bufs, scalars) = (LLVMGetParam(self.func, 0), LLVMGetParam(self.func, 1));
                for (slot, (id, _)) in k.global_buffers().enumerate() {
                    let at = self.gep(ptr, bufs, self.i64c(slot as i64));
                    let p = LLVMBuildLoad2(self.b, ptr, at, NONE);
                    LLVMSetAlignment(p, 8);
                    self.bufs[id.0 as usize] = Some(p);
                }
                let i64t = LLVMInt64TypeInContext(self.cx);
                for (i, v) in k.scalars.iter().enumerate() {
                    let at = self.gep(i64t, scalars, self.i64c(i as i64));
                    let x = LLVMBuildLoad2(self.b, i64t, at, NONE);
                    LLVMSetAlignment(x, 8);
                    self.set(*v, x);
                }
            }
        }
        if self.flavor.abi == Abi::Ptx {
            self.ptx_prologue()?;
        }
        self.stmts(&k.body)?;
        unsafe { LLVMBuildRetVoid(self.b) };
        Ok(())
    }

    // ----- types and constants -----

    /// A scalar's type in registers (narrow floats compute as `float`).
    fn scalar_ty(&self, s: Scalar) -> LLVMTypeRef {
        unsafe {
            match s {
                Scalar::F32 | Scalar::BF16 | Scalar::F16 => LLVMFloatTypeInContext(self.cx),
                Scalar::I32 => LLVMInt32TypeInContext(self.cx),
                Scalar::I64 => LLVMInt64TypeInContext(self.cx),
                Scalar::Bool => LLVMInt1TypeInContext(self.cx),
            }
        }
    }

    /// The lanes a KIR vector of `lanes` lanes has in the current lowering.
    fn lanes(&self, lanes: u8) -> u32 {
        match &self.wide {
            Some(w) if lanes > 1 && lanes == w.lanes => lanes as u32 * w.factor as u32,
            _ => lanes as u32,
        }
    }

    fn ty(&self, t: Ty) -> LLVMTypeRef {
        let s = self.scalar_ty(t.elem);
        if t.lanes > 1 {
            unsafe { LLVMVectorType(s, self.lanes(t.lanes)) }
        } else {
            s
        }
    }

    /// A buffer element's type in memory (bools are bytes, `bf16` is its
    /// bits as `i16`, `f16` is `half`).
    pub(super) fn mem_ty(&self, s: Scalar) -> LLVMTypeRef {
        unsafe {
            match s {
                Scalar::Bool => LLVMInt8TypeInContext(self.cx),
                Scalar::BF16 => LLVMInt16TypeInContext(self.cx),
                Scalar::F16 => LLVMHalfTypeInContext(self.cx),
                s => self.scalar_ty(s),
            }
        }
    }

    /// `t` with `lanes` lanes (a vector when `lanes > 1`).
    fn vec_of(&self, t: LLVMTypeRef, lanes: u32) -> LLVMTypeRef {
        if lanes > 1 {
            unsafe { LLVMVectorType(t, lanes) }
        } else {
            t
        }
    }

    fn i64c(&self, x: i64) -> LLVMValueRef {
        unsafe { LLVMConstInt(LLVMInt64TypeInContext(self.cx), x as u64, 1) }
    }

    /// An f32 constant, splat to `lanes` (already widened) lanes.
    pub(super) fn fconst(&self, x: f32, lanes: u32) -> LLVMValueRef {
        unsafe {
            let c = LLVMConstReal(LLVMFloatTypeInContext(self.cx), x as f64);
            self.const_splat(c, lanes)
        }
    }

    fn const_splat(&self, c: LLVMValueRef, lanes: u32) -> LLVMValueRef {
        if lanes == 1 {
            return c;
        }
        let mut v = vec![c; lanes as usize];
        unsafe { LLVMConstVector(v.as_mut_ptr(), lanes) }
    }

    fn lanes_of(&self, v: LLVMValueRef) -> u32 {
        unsafe {
            let t = LLVMTypeOf(v);
            if LLVMGetTypeKind(t) == inkwell::llvm_sys::LLVMTypeKind::LLVMVectorTypeKind {
                LLVMGetVectorSize(t)
            } else {
                1
            }
        }
    }

    // ----- variables and memory -----

    fn slot(&self, v: Var) -> (LLVMValueRef, LLVMTypeRef) {
        if let Some(w) = &self.wide {
            if let Some(&s) = w.slots.get(&v) {
                return (s, self.ty(self.k.var(v).ty));
            }
        }
        self.vars[v.0 as usize]
    }

    pub(super) fn get(&self, v: Var) -> LLVMValueRef {
        let (slot, t) = self.slot(v);
        unsafe { LLVMBuildLoad2(self.b, t, slot, NONE) }
    }

    pub(super) fn set(&self, v: Var, x: LLVMValueRef) {
        let (slot, _) = self.slot(v);
        unsafe { LLVMBuildStore(self.b, x, slot) };
    }

    fn gep(&self, elem: LLVMTypeRef, base: LLVMValueRef, index: LLVMValueRef) -> LLVMValueRef {
        let mut idx = [index];
        unsafe { LLVMBuildInBoundsGEP2(self.b, elem, base, idx.as_mut_ptr(), 1, NONE) }
    }

    /// `llvm.prefetch` (a read, non-temporal) of element `index` of `buf`.
    /// The address is computed without `inbounds`: it may lie outside the
    /// buffer (see [`kir::Stmt::Prefetch`]), which a prefetch tolerates and
    /// an in-bounds GEP would make poison.
    fn prefetch(&mut self, buf: kir::BufId, index: &Expr) -> R<()> {
        let base = self.bufs[buf.0 as usize].ok_or_else(|| unsupported(self.k, "shared buffers".into()))?;
        let i = self.expr(index)?;
        unsafe {
            let mut idx = [i];
            let elem = self.mem_ty(self.k.buf(buf).elem);
            let p = LLVMBuildGEP2(self.b, elem, base, idx.as_mut_ptr(), 1, NONE);
            let i32t = LLVMInt32TypeInContext(self.cx);
            let c = |x: u64| LLVMConstInt(i32t, x, 0);
            // Read, locality 0 (non-temporal: the data is read once), data cache.
            self.intrinsic("llvm.prefetch", &[LLVMTypeOf(p)], &[p, c(0), c(0), c(1)])?;
        }
        Ok(())
    }

    pub(super) fn addr(&mut self, buf: kir::BufId, index: &Expr) -> R<LLVMValueRef> {
        let base = self.bufs[buf.0 as usize].ok_or_else(|| unsupported(self.k, "shared buffers".into()))?;
        let i = self.expr(index)?;
        Ok(self.gep(self.mem_ty(self.k.buf(buf).elem), base, i))
    }

    /// The alignment of an access of `lanes` elements of `elem`. On the
    /// host buffers are aligned to their elements only. On the GPU a vector
    /// access is aligned to its size (capped at 16 bytes), as CUDA's
    /// `float4` loads are, when the kernel promises it
    /// (`GpuLaunch::aligned_vectors`: base pointers are 16-byte aligned and
    /// vector accesses start at a multiple of their lane count, see
    /// `nvptx`); otherwise to its elements only, and the backend splits it.
    fn align(&self, elem: Scalar, lanes: u8) -> u32 {
        let size = elem.size() as u32;
        let promised = self.k.gpu.as_ref().is_some_and(|g| g.aligned_vectors);
        match self.flavor.abi {
            Abi::Host => size,
            Abi::Ptx if !promised => size,
            Abi::Ptx => {
                let bytes = size * lanes as u32;
                (1 << bytes.trailing_zeros()).min(16)
            }
        }
    }

    /// Loads `lanes` (KIR lanes, widened here) elements of `elem` at `addr`
    /// as their register type: bools compare the byte with 0; `bf16` is
    /// widened exactly (its bits are the high half of an `f32`), `f16` by
    /// `fpext`.
    fn load_mem(&mut self, elem: Scalar, addr: LLVMValueRef, lanes: u8) -> R<LLVMValueRef> {
        let n = self.lanes(lanes);
        let mt = self.vec_of(self.mem_ty(elem), n);
        unsafe {
            let x = LLVMBuildLoad2(self.b, mt, addr, NONE);
            LLVMSetAlignment(x, self.align(elem, lanes));
            let f32t = self.vec_of(LLVMFloatTypeInContext(self.cx), n);
            Ok(match elem {
                Scalar::Bool => LLVMBuildICmp(self.b, IP::LLVMIntNE, x, LLVMConstNull(mt), NONE),
                Scalar::BF16 => {
                    let i32t = LLVMInt32TypeInContext(self.cx);
                    let w = LLVMBuildZExt(self.b, x, self.vec_of(i32t, n), NONE);
                    let w = LLVMBuildShl(self.b, w, self.const_splat(LLVMConstInt(i32t, 16, 0), n), NONE);
                    LLVMBuildBitCast(self.b, w, f32t, NONE)
                }
                Scalar::F16 => LLVMBuildFPExt(self.b, x, f32t, NONE),
                _ => x,
            })
        }
    }

    /// The even or odd elements (`pick`) of `2 * lanes` 16-bit floats at
    /// `addr` as `f32` lanes: the pairs are loaded as 32-bit words, and
    /// each word's low half is shifted into its top half (even) or its high
    /// half kept by a mask (odd), which for bf16 is already its f32 (one
    /// load, then a shift or an `and` per vector, where widening loads of
    /// consecutive elements take a shuffle each); f16 halves are moved to
    /// the bottom and converted by `fpext`.
    fn load_pairs(&mut self, elem: Scalar, addr: LLVMValueRef, lanes: u8, pick: Pick) -> R<LLVMValueRef> {
        if !elem.is_narrow_float() {
            return Err(unsupported(self.k, format!("{pick:?} elements of a {elem:?} buffer")));
        }
        let n = self.lanes(lanes);
        unsafe {
            let i32t = LLVMInt32TypeInContext(self.cx);
            let words_t = self.vec_of(i32t, n);
            let x = LLVMBuildLoad2(self.b, words_t, addr, NONE);
            LLVMSetAlignment(x, self.align(elem, 1));
            let sixteen = self.const_splat(LLVMConstInt(i32t, 16, 0), n);
            if elem == Scalar::F16 {
                let x = if pick == Pick::Odd { LLVMBuildLShr(self.b, x, sixteen, NONE) } else { x };
                let h = LLVMBuildTrunc(self.b, x, self.vec_of(LLVMInt16TypeInContext(self.cx), n), NONE);
                let h = LLVMBuildBitCast(self.b, h, self.vec_of(LLVMHalfTypeInContext(self.cx), n), NONE);
                return Ok(LLVMBuildFPExt(self.b, h, self.vec_of(LLVMFloatTypeInContext(self.cx), n), NONE));
            }
            let hi = if pick == Pick::Even {
                LLVMBuildShl(self.b, x, sixteen, NONE)
            } else {
                let mask = self.const_splat(LLVMConstInt(i32t, 0xffff_0000, 0), n);
                LLVMBuildAnd(self.b, x, mask, NONE)
            };
            Ok(LLVMBuildBitCast(self.b, hi, self.vec_of(LLVMFloatTypeInContext(self.cx), n), NONE))
        }
    }

    /// Stores `x` (of `lanes` KIR lanes) as elements of `elem` at `addr`:
    /// bools as bytes, `f32` rounded to `bf16`/`f16` to nearest even.
    fn store_mem(&mut self, elem: Scalar, addr: LLVMValueRef, x: LLVMValueRef, lanes: u8) -> R<()> {
        let n = self.lanes(lanes);
        unsafe {
            let x = match elem {
                Scalar::Bool => LLVMBuildZExt(self.b, x, self.vec_of(LLVMInt8TypeInContext(self.cx), n), NONE),
                Scalar::BF16 => self.f32_to_bf16(x, n),
                Scalar::F16 => LLVMBuildFPTrunc(self.b, x, self.vec_of(LLVMHalfTypeInContext(self.cx), n), NONE),
                _ => x,
            };
            let st = LLVMBuildStore(self.b, x, addr);
            LLVMSetAlignment(st, self.align(elem, lanes));
        }
        Ok(())
    }

    /// `f32` lanes rounded to nearest even `bf16` bits (`i16` lanes), NaN
    /// kept NaN. PTX has the instruction (`cvt.rn.bf16.f32`, sm_80 on);
    /// the host computes it with integers, as the `half` crate (and so the
    /// interpreter) does: NaN becomes its high half with the quiet bit set,
    /// anything else adds `0x7fff` plus the lowest kept bit and truncates.
    fn f32_to_bf16(&self, x: LLVMValueRef, n: u32) -> LLVMValueRef {
        unsafe {
            let i16t = self.vec_of(LLVMInt16TypeInContext(self.cx), n);
            if self.flavor.abi == Abi::Ptx {
                let h = LLVMBuildFPTrunc(self.b, x, self.vec_of(LLVMBFloatTypeInContext(self.cx), n), NONE);
                return LLVMBuildBitCast(self.b, h, i16t, NONE);
            }
            let i32 = LLVMInt32TypeInContext(self.cx);
            let c = |v: u64| self.const_splat(LLVMConstInt(i32, v, 0), n);
            let bits = LLVMBuildBitCast(self.b, x, self.vec_of(i32, n), NONE);
            let hi = LLVMBuildLShr(self.b, bits, c(16), NONE);
            let nan = LLVMBuildOr(self.b, hi, c(0x40), NONE);
            let lsb = LLVMBuildAnd(self.b, hi, c(1), NONE);
            let r = LLVMBuildAdd(self.b, bits, c(0x7fff), NONE);
            let r = LLVMBuildAdd(self.b, r, lsb, NONE);
            let r = LLVMBuildLShr(self.b, r, c(16), NONE);
            let is_nan = self.fcmp(RP::LLVMRealUNO, x, x);
            let r = self.select(is_nan, nan, r);
            LLVMBuildTrunc(self.b, r, i16t, NONE)
        }
    }

    /// Fails unless the kernel is lowered for the GPU.
    fn gpu_only(&self, what: &str) -> R<()> {
        match self.flavor.abi {
            Abi::Ptx => Ok(()),
            Abi::Host => Err(unsupported(self.k, what.into())),
        }
    }

    // ----- instructions -----

    /// Calls the intrinsic `name` overloaded on `tys`.
    pub(super) fn intrinsic(&self, name: &str, tys: &[LLVMTypeRef], args: &[LLVMValueRef]) -> R<LLVMValueRef> {
        unsafe {
            let id = LLVMLookupIntrinsicID(name.as_ptr().cast(), name.len());
            if id == 0 {
                return Err(backend(self.k, format!("unknown intrinsic `{name}`")));
            }
            let mut tys = tys.to_vec();
            let f = LLVMGetIntrinsicDeclaration(self.m, id, tys.as_mut_ptr(), tys.len());
            let fty = LLVMIntrinsicGetType(self.cx, id, tys.as_mut_ptr(), tys.len());
            let mut args = args.to_vec();
            Ok(LLVMBuildCall2(self.b, fty, f, args.as_mut_ptr(), args.len() as u32, NONE))
        }
    }

    /// A unary intrinsic overloaded on its operand's type.
    pub(super) fn un_intr(&self, name: &str, x: LLVMValueRef) -> R<LLVMValueRef> {
        self.intrinsic(name, &[unsafe { LLVMTypeOf(x) }], &[x])
    }

    pub(super) fn bin_intr(&self, name: &str, x: LLVMValueRef, y: LLVMValueRef) -> R<LLVMValueRef> {
        self.intrinsic(name, &[unsafe { LLVMTypeOf(x) }], &[x, y])
    }

    pub(super) fn fma(&self, x: LLVMValueRef, y: LLVMValueRef, z: LLVMValueRef) -> R<LLVMValueRef> {
        self.intrinsic("llvm.fma", &[unsafe { LLVMTypeOf(x) }], &[x, y, z])
    }

    pub(super) fn fadd(&self, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildFAdd(self.b, x, y, NONE) }
    }

    pub(super) fn fmul(&self, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildFMul(self.b, x, y, NONE) }
    }

    pub(super) fn fcmp(&self, p: RP, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildFCmp(self.b, p, x, y, NONE) }
    }

    pub(super) fn select(&self, c: LLVMValueRef, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildSelect(self.b, c, x, y, NONE) }
    }

    fn extract(&self, v: LLVMValueRef, lane: u32) -> LLVMValueRef {
        unsafe { LLVMBuildExtractElement(self.b, v, self.i64c(lane as i64), NONE) }
    }

    /// `lanes` copies of the scalar `x`.
    fn splat(&self, x: LLVMValueRef, lanes: u32) -> LLVMValueRef {
        unsafe {
            let vt = LLVMVectorType(LLVMTypeOf(x), lanes);
            let v = LLVMBuildInsertElement(self.b, LLVMGetPoison(vt), x, self.i64c(0), NONE);
            let mask = LLVMConstNull(LLVMVectorType(LLVMInt32TypeInContext(self.cx), lanes));
            LLVMBuildShuffleVector(self.b, v, LLVMGetPoison(vt), mask, NONE)
        }
    }

    /// Lanes `range` of the vectors `a` and `b` concatenated.
    fn shuffle(&self, a: LLVMValueRef, b: LLVMValueRef, lanes: impl Iterator<Item = u32>) -> LLVMValueRef {
        unsafe {
            let i32t = LLVMInt32TypeInContext(self.cx);
            let mut mask: Vec<LLVMValueRef> = lanes.map(|i| LLVMConstInt(i32t, i as u64, 0)).collect();
            let mask = LLVMConstVector(mask.as_mut_ptr(), mask.len() as u32);
            LLVMBuildShuffleVector(self.b, a, b, mask, NONE)
        }
    }

    /// Calls the libm function `name` on scalars, or lane by lane on
    /// vectors: the system's symbol, or its IR version (see [`Libm`]).
    fn libcall(&mut self, name: &str, args: &[LLVMValueRef]) -> R<LLVMValueRef> {
        let lanes = self.lanes_of(args[0]);
        unsafe {
            let f32t = LLVMFloatTypeInContext(self.cx);
            let mut ps = vec![f32t; args.len()];
            let fty = LLVMFunctionType(f32t, ps.as_mut_ptr(), ps.len() as u32, 0);
            let f = match self.flavor.libm {
                Libm::Inline => self.math_function(name, fty, args.len())?,
                Libm::System => {
                    let cname = CString::new(name).map_err(|_| backend(self.k, "bad libm name".into()))?;
                    let mut f = LLVMGetNamedFunction(self.m, cname.as_ptr());
                    if f.is_null() {
                        f = LLVMAddFunction(self.m, cname.as_ptr(), fty);
                        add_fn_attr(self.cx, f, "nounwind");
                    }
                    f
                }
            };
            let call =
                |xs: &mut Vec<LLVMValueRef>| LLVMBuildCall2(self.b, fty, f, xs.as_mut_ptr(), xs.len() as u32, NONE);
            if lanes == 1 {
                return Ok(call(&mut args.to_vec()));
            }
            let mut out = LLVMGetPoison(LLVMTypeOf(args[0]));
            for lane in 0..lanes {
                let mut xs: Vec<LLVMValueRef> = args.iter().map(|a| self.extract(*a, lane)).collect();
                let y = call(&mut xs);
                out = LLVMBuildInsertElement(self.b, out, y, self.i64c(lane as i64), NONE);
            }
            Ok(out)
        }
    }

    // ----- statements -----

    fn stmts(&mut self, stmts: &[Stmt]) -> R<()> {
        for s in stmts {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> R<()> {
        match s {
            Stmt::Assign(v, e) => {
                let x = self.expr(e)?;
                self.set(*v, x);
            }
            Stmt::Store { buf, index, value } => {
                let addr = self.addr(*buf, index)?;
                let x = self.expr(value)?;
                let lanes = self.kty(value)?.lanes;
                self.store_mem(self.k.buf(*buf).elem, addr, x, lanes)?;
            }
            Stmt::For(l) => self.for_loop(l)?,
            Stmt::If { cond, then, els } => {
                let c = self.expr(cond)?;
                unsafe {
                    let bt = LLVMAppendBasicBlockInContext(self.cx, self.func, c"then".as_ptr());
                    let be = LLVMAppendBasicBlockInContext(self.cx, self.func, c"else".as_ptr());
                    let bm = LLVMAppendBasicBlockInContext(self.cx, self.func, c"endif".as_ptr());
                    LLVMBuildCondBr(self.b, c, bt, be);
                    LLVMPositionBuilderAtEnd(self.b, bt);
                    self.stmts(then)?;
                    LLVMBuildBr(self.b, bm);
                    LLVMPositionBuilderAtEnd(self.b, be);
                    self.stmts(els)?;
                    LLVMBuildBr(self.b, bm);
                    LLVMPositionBuilderAtEnd(self.b, bm);
                }
            }
            Stmt::Barrier => {
                self.gpu_only("barriers")?;
                self.barrier()?;
            }
            Stmt::Shuffle { dst, kind, value, arg } => {
                self.gpu_only("warp shuffles")?;
                let (x, a) = (self.expr(value)?, self.expr(arg)?);
                let y = self.shuffle_lanes(*kind, x, a)?;
                self.set(*dst, y);
            }
            Stmt::Mma(m) => {
                self.gpu_only("tensor-core mma")?;
                self.mma(m)?;
            }
            // GPU kernels stream through their own caches; the hint is for
            // the host's.
            Stmt::Prefetch { buf, index } if self.flavor.abi == Abi::Host => self.prefetch(*buf, index)?,
            Stmt::Prefetch { .. } => {}
            Stmt::Wgmma(w) => {
                self.gpu_only("warpgroup mma (wgmma)")?;
                self.wgmma(w)?;
            }
            Stmt::Async(a) => {
                self.gpu_only("warpgroup mma (wgmma) fences")?;
                self.async_sync(*a)?;
            }
        }
        Ok(())
    }

    fn for_loop(&mut self, l: &kir::Loop) -> R<()> {
        let mut start = self.expr(&l.start)?;
        let mut end = self.expr(&l.end)?;
        // On the GPU a `Parallel` loop is a plain loop: kernels distribute
        // work with thread and block indices themselves.
        let parallel = l.kind == LoopKind::Parallel && self.flavor.abi == Abi::Host;
        if parallel && self.parallel_depth == 0 {
            (start, end) = self.split(start, end, l.step)?;
        }
        // Widening targets the host's vector registers; PTX has none.
        if self.wide.is_none() && self.flavor.abi == Abi::Host {
            if let Some(plan) = widen::plan(self.k, l, widen::host_factor()) {
                return self.wide_loop(l, &plan, start, end);
            }
        }
        if parallel {
            self.parallel_depth += 1;
        }
        let r = self.counted_loop(l.var, start, end, l.step, |me| me.stmts(&l.body));
        if parallel {
            self.parallel_depth -= 1;
        }
        r
    }

    /// `for var in (start..end).step_by(step) { body }`, with `end` already
    /// evaluated.
    fn counted_loop(
        &mut self,
        var: Var,
        start: LLVMValueRef,
        end: LLVMValueRef,
        step: i64,
        body: impl FnOnce(&mut Self) -> R<()>,
    ) -> R<()> {
        self.set(var, start);
        unsafe {
            let header = LLVMAppendBasicBlockInContext(self.cx, self.func, c"loop".as_ptr());
            let bb = LLVMAppendBasicBlockInContext(self.cx, self.func, c"body".as_ptr());
            let exit = LLVMAppendBasicBlockInContext(self.cx, self.func, c"exit".as_ptr());
            LLVMBuildBr(self.b, header);
            LLVMPositionBuilderAtEnd(self.b, header);
            let i = self.get(var);
            let c = LLVMBuildICmp(self.b, IP::LLVMIntSLT, i, end, NONE);
            LLVMBuildCondBr(self.b, c, bb, exit);
            LLVMPositionBuilderAtEnd(self.b, bb);
            body(self)?;
            let i = self.get(var);
            // No overflow: `i < end` held and steps are small.
            let next = LLVMBuildNSWAdd(self.b, i, self.i64c(step), NONE);
            self.set(var, next);
            LLVMBuildBr(self.b, header);
            LLVMPositionBuilderAtEnd(self.b, exit);
        }
        Ok(())
    }

    /// A `Vectorized` loop lowered `plan.factor` times wider: the wide loop
    /// over whole groups of `factor` iterations, the accumulators folded
    /// back to their width, then the (fewer than `factor`) iterations left
    /// at the original width.
    fn wide_loop(&mut self, l: &kir::Loop, plan: &Plan, start: LLVMValueRef, end: LLVMValueRef) -> R<()> {
        let (lanes, factor) = (plan.lanes, plan.factor);
        let n = lanes as u32;
        let wn = n * factor as u32;
        let wide_end = unsafe {
            // Whole groups: iters = max(0, ceil((end - start) / step)).
            let span = LLVMBuildSub(self.b, end, start, NONE);
            let span = LLVMBuildAdd(self.b, span, self.i64c(l.step - 1), NONE);
            let iters = LLVMBuildSDiv(self.b, span, self.i64c(l.step), NONE);
            let iters = self.bin_intr("llvm.smax", iters, self.i64c(0))?;
            let groups = LLVMBuildSDiv(self.b, iters, self.i64c(factor as i64), NONE);
            let wide_span = LLVMBuildMul(self.b, groups, self.i64c(l.step * factor as i64), NONE);
            let wide_end = LLVMBuildAdd(self.b, start, wide_span, NONE);
            // Wide slots: temporaries start as zero, accumulators as their
            // value padded with the reduction's identity.
            let mut slots = HashMap::new();
            let entry = LLVMGetEntryBasicBlock(self.func);
            for &v in plan.temps.iter().chain(plan.accs.iter().map(|(v, _)| v)) {
                let t = LLVMVectorType(self.scalar_ty(self.k.var(v).ty.elem), wn);
                let here = LLVMGetInsertBlock(self.b);
                let first = LLVMGetFirstInstruction(entry);
                LLVMPositionBuilderBefore(self.b, first);
                let slot = LLVMBuildAlloca(self.b, t, NONE);
                LLVMPositionBuilderAtEnd(self.b, here);
                slots.insert(v, slot);
            }
            for &v in &plan.temps {
                let t = LLVMVectorType(self.scalar_ty(self.k.var(v).ty.elem), wn);
                LLVMBuildStore(self.b, LLVMConstNull(t), slots[&v]);
            }
            for &(v, op) in &plan.accs {
                let x = self.get(v);
                let pad = match op {
                    RedOp::Add => LLVMConstNull(LLVMTypeOf(x)),
                    RedOp::Max | RedOp::Min => x,
                };
                let mut w = x;
                let mut width = n;
                while width < wn {
                    let p = if width == n { pad } else { self.shuffle(pad, pad, (0..width).map(|i| i % n)) };
                    w = self.shuffle(w, p, 0..2 * width);
                    width *= 2;
                }
                LLVMBuildStore(self.b, w, slots[&v]);
            }
            self.wide = Some(Wide { lanes, factor, slots });
            let r = self.counted_loop(l.var, start, wide_end, l.step * factor as i64, |me| me.stmts(&l.body));
            let wide = self.wide.take().expect("wide state");
            r?;
            for &(v, op) in &plan.accs {
                let t = LLVMVectorType(self.scalar_ty(Scalar::F32), wn);
                let mut w = LLVMBuildLoad2(self.b, t, wide.slots[&v], NONE);
                let mut width = wn;
                while width > n {
                    let half = width / 2;
                    let lo = self.shuffle(w, w, 0..half);
                    let hi = self.shuffle(w, w, half..width);
                    w = match op {
                        RedOp::Add => self.fadd(lo, hi),
                        RedOp::Max => self.bin_intr("llvm.maxnum", lo, hi)?,
                        RedOp::Min => self.bin_intr("llvm.minnum", lo, hi)?,
                    };
                    width = half;
                }
                self.set(v, w);
            }
            wide_end
        };
        self.counted_loop(l.var, wide_end, end, l.step, |me| me.stmts(&l.body))
    }

    /// This thread's chunk of `start..end`, as `interp::split_range` computes it.
    fn split(&mut self, start: LLVMValueRef, end: LLVMValueRef, step: i64) -> R<(LLVMValueRef, LLVMValueRef)> {
        let (t, n) = (self.thread, self.threads);
        unsafe {
            let b = self.b;
            let span = LLVMBuildSub(b, end, start, NONE);
            let span = LLVMBuildAdd(b, span, self.i64c(step - 1), NONE);
            let iters = LLVMBuildSDiv(b, span, self.i64c(step), NONE);
            let iters = self.bin_intr("llvm.smax", iters, self.i64c(0))?;
            let first = LLVMBuildMul(b, t, iters, NONE);
            let first = LLVMBuildUDiv(b, first, n, NONE);
            let t1 = LLVMBuildAdd(b, t, self.i64c(1), NONE);
            let last = LLVMBuildMul(b, t1, iters, NONE);
            let last = LLVMBuildUDiv(b, last, n, NONE);
            let s = LLVMBuildMul(b, first, self.i64c(step), NONE);
            let s = LLVMBuildAdd(b, start, s, NONE);
            let e = LLVMBuildMul(b, last, self.i64c(step), NONE);
            let e = LLVMBuildAdd(b, start, e, NONE);
            let bound = self.bin_intr("llvm.smax", end, start)?;
            let e = self.bin_intr("llvm.smin", e, bound)?;
            Ok((s, e))
        }
    }

    // ----- expressions -----

    fn kty(&self, e: &Expr) -> R<Ty> {
        self.k.type_of(e).map_err(|m| backend(self.k, m))
    }

    pub(super) fn expr(&mut self, e: &Expr) -> R<LLVMValueRef> {
        let t = self.kty(e)?;
        let b = self.b;
        let lanes = self.lanes(t.lanes);
        unsafe {
            Ok(match e {
                Expr::F32(x) => self.fconst(*x, 1),
                Expr::Int(x, s) => LLVMConstInt(self.scalar_ty(*s), *x as u64, 1),
                Expr::Bool(x) => LLVMConstInt(LLVMInt1TypeInContext(self.cx), *x as u64, 0),
                Expr::Var(v) => self.get(*v),
                Expr::Un(op, a) => {
                    let x = self.expr(a)?;
                    let float = t.elem == Scalar::F32;
                    match (op, float) {
                        (UnOp::Neg, true) => LLVMBuildFNeg(b, x, NONE),
                        (UnOp::Neg, false) => LLVMBuildNeg(b, x, NONE),
                        (UnOp::Abs, true) => self.un_intr("llvm.fabs", x)?,
                        (UnOp::Abs, false) => {
                            let no_poison = LLVMConstInt(LLVMInt1TypeInContext(self.cx), 0, 0);
                            self.intrinsic("llvm.abs", &[LLVMTypeOf(x)], &[x, no_poison])?
                        }
                        (UnOp::Sqrt, _) => self.un_intr("llvm.sqrt", x)?,
                        (UnOp::Rsqrt, _) => {
                            // A true division, not the ~12-bit `rsqrtps` estimate.
                            let s = self.un_intr("llvm.sqrt", x)?;
                            LLVMBuildFDiv(b, self.fconst(1.0, lanes), s, NONE)
                        }
                        (UnOp::Exp, _) => self.exp(x, lanes)?,
                        (UnOp::Tanh, _) => self.tanh(x, lanes)?,
                        (UnOp::Floor, _) => self.un_intr("llvm.floor", x)?,
                        (UnOp::Ceil, _) => self.un_intr("llvm.ceil", x)?,
                        (UnOp::Round, _) => self.un_intr("llvm.roundeven", x)?,
                        (UnOp::Sin, _) => self.libcall("sinf", &[x])?,
                        (UnOp::Cos, _) => self.libcall("cosf", &[x])?,
                        (UnOp::Log, _) => self.libcall("logf", &[x])?,
                        (UnOp::Erf, _) => self.libcall("erff", &[x])?,
                    }
                }
                Expr::Bin(op, a, c) => {
                    let (x, y) = (self.expr(a)?, self.expr(c)?);
                    if t.elem == Scalar::F32 {
                        match op {
                            BinOp::Add => self.fadd(x, y),
                            BinOp::Sub => LLVMBuildFSub(b, x, y, NONE),
                            BinOp::Mul => self.fmul(x, y),
                            BinOp::Div => LLVMBuildFDiv(b, x, y, NONE),
                            BinOp::Max => self.bin_intr("llvm.maxnum", x, y)?,
                            BinOp::Min => self.bin_intr("llvm.minnum", x, y)?,
                            BinOp::Rem => self.libcall("fmodf", &[x, y])?,
                            BinOp::Pow => self.libcall("powf", &[x, y])?,
                        }
                    } else {
                        match op {
                            BinOp::Add => LLVMBuildAdd(b, x, y, NONE),
                            BinOp::Sub => LLVMBuildSub(b, x, y, NONE),
                            BinOp::Mul => LLVMBuildMul(b, x, y, NONE),
                            // Templates divide only by nonzero constants.
                            BinOp::Div => LLVMBuildSDiv(b, x, y, NONE),
                            BinOp::Rem => LLVMBuildSRem(b, x, y, NONE),
                            BinOp::Max => self.bin_intr("llvm.smax", x, y)?,
                            BinOp::Min => self.bin_intr("llvm.smin", x, y)?,
                            BinOp::Pow => return Err(unsupported(self.k, "integer pow".into())),
                        }
                    }
                }
                Expr::Fma(a, c, d) => {
                    let (x, y, z) = (self.expr(a)?, self.expr(c)?, self.expr(d)?);
                    self.fma(x, y, z)?
                }
                Expr::Cmp(op, a, c) => {
                    let at = self.kty(a)?;
                    let (x, y) = (self.expr(a)?, self.expr(c)?);
                    match at.elem {
                        Scalar::F32 => {
                            let p = match op {
                                CmpOp::Eq => RP::LLVMRealOEQ,
                                CmpOp::Ne => RP::LLVMRealUNE,
                                CmpOp::Lt => RP::LLVMRealOLT,
                                CmpOp::Le => RP::LLVMRealOLE,
                                CmpOp::Gt => RP::LLVMRealOGT,
                                CmpOp::Ge => RP::LLVMRealOGE,
                            };
                            self.fcmp(p, x, y)
                        }
                        // false < true, as Rust orders bools.
                        elem => {
                            let signed = elem != Scalar::Bool;
                            let p = match (op, signed) {
                                (CmpOp::Eq, _) => IP::LLVMIntEQ,
                                (CmpOp::Ne, _) => IP::LLVMIntNE,
                                (CmpOp::Lt, true) => IP::LLVMIntSLT,
                                (CmpOp::Le, true) => IP::LLVMIntSLE,
                                (CmpOp::Gt, true) => IP::LLVMIntSGT,
                                (CmpOp::Ge, true) => IP::LLVMIntSGE,
                                (CmpOp::Lt, false) => IP::LLVMIntULT,
                                (CmpOp::Le, false) => IP::LLVMIntULE,
                                (CmpOp::Gt, false) => IP::LLVMIntUGT,
                                (CmpOp::Ge, false) => IP::LLVMIntUGE,
                            };
                            LLVMBuildICmp(b, p, x, y, NONE)
                        }
                    }
                }
                Expr::Select(c, x, y) => {
                    let (m, x, y) = (self.expr(c)?, self.expr(x)?, self.expr(y)?);
                    self.select(m, x, y)
                }
                Expr::Cast(s, a) => {
                    let from = self.kty(a)?.elem;
                    let x = self.expr(a)?;
                    let to = self.scalar_ty(*s);
                    match (from, *s) {
                        (f, s) if f == s => x,
                        (Scalar::I32, Scalar::I64) => LLVMBuildSExt(b, x, to, NONE),
                        (Scalar::I64, Scalar::I32) => LLVMBuildTrunc(b, x, to, NONE),
                        (Scalar::I32 | Scalar::I64, Scalar::F32) => LLVMBuildSIToFP(b, x, to, NONE),
                        (Scalar::F32, Scalar::I32 | Scalar::I64) => {
                            self.intrinsic("llvm.fptosi.sat", &[to, LLVMTypeOf(x)], &[x])?
                        }
                        (Scalar::Bool, Scalar::F32) => LLVMBuildUIToFP(b, x, to, NONE),
                        (Scalar::Bool, _) => LLVMBuildZExt(b, x, to, NONE),
                        // Nonzero (NaN included) is true, as `x != 0.0`.
                        (Scalar::F32, Scalar::Bool) => self.fcmp(RP::LLVMRealUNE, x, LLVMConstNull(LLVMTypeOf(x))),
                        (_, Scalar::Bool) => LLVMBuildICmp(b, IP::LLVMIntNE, x, LLVMConstNull(LLVMTypeOf(x)), NONE),
                        (f, s) => return Err(unsupported(self.k, format!("a cast from {f:?} to {s:?}"))),
                    }
                }
                Expr::Splat(_, a) => {
                    let x = self.expr(a)?;
                    self.splat(x, lanes)
                }
                Expr::Extract(a, i) => {
                    let x = self.expr(a)?;
                    self.extract(x, *i as u32)
                }
                Expr::HSums(vs) => {
                    // The steps of `kir::hsums`, on vectors of the width
                    // LLVM's lanes have here.
                    let mut cur = vs.iter().map(|v| self.expr(v)).collect::<R<Vec<_>>>()?;
                    let n = cur.first().map_or(1, |&x| self.lanes_of(x)) as usize;
                    let mut width = n;
                    while cur.len() > 1 {
                        let (p, q) = kir::hsums_step(n, width);
                        cur = cur
                            .chunks(2)
                            .map(|pair| {
                                let lo = self.shuffle(pair[0], pair[1], p.iter().copied());
                                let hi = self.shuffle(pair[0], pair[1], q.iter().copied());
                                self.fadd(lo, hi)
                            })
                            .collect();
                        width /= 2;
                    }
                    cur[0]
                }
                Expr::HReduce(op, a) => {
                    let mut x = self.expr(a)?;
                    let mut n = self.lanes_of(x);
                    if *op == RedOp::Add && n.is_power_of_two() {
                        // Sums halve the vector until one lane is left:
                        // log2(n) dependent adds instead of n - 1 (a sum in
                        // the inner loop of attention is on its critical
                        // path). The terms are added in another order than
                        // the interpreter's left to right, which tests allow
                        // for sums.
                        while n > 1 {
                            n /= 2;
                            let (lo, hi) = (self.shuffle(x, x, 0..n), self.shuffle(x, x, n..2 * n));
                            x = self.fadd(lo, hi);
                        }
                        return Ok(self.extract(x, 0));
                    }
                    // Left to right, as the interpreter does.
                    let mut acc = self.extract(x, 0);
                    for i in 1..self.lanes_of(x) {
                        let y = self.extract(x, i);
                        acc = match op {
                            RedOp::Add => self.fadd(acc, y),
                            RedOp::Max => self.bin_intr("llvm.maxnum", acc, y)?,
                            RedOp::Min => self.bin_intr("llvm.minnum", acc, y)?,
                        };
                    }
                    acc
                }
                Expr::Load { buf, index, lanes: n, pick: Pick::All } => {
                    let addr = self.addr(*buf, index)?;
                    self.load_mem(self.k.buf(*buf).elem, addr, *n)?
                }
                Expr::Load { buf, index, lanes: n, pick } => {
                    let addr = self.addr(*buf, index)?;
                    self.load_pairs(self.k.buf(*buf).elem, addr, *n, *pick)?
                }
                Expr::Special(s) => {
                    self.gpu_only("thread and block indices")?;
                    self.special(*s)?
                }
            })
        }
    }

    /// Cephes `expf` (as the Cranelift lowering): `2^n * p(r)` with
    /// `n = round(x / ln 2)`; NaN stays NaN, +inf saturates at `exp(88)`.
    #[allow(clippy::excessive_precision)] // Cephes's constants, as published.
    pub(super) fn exp(&self, x0: LLVMValueRef, lanes: u32) -> R<LLVMValueRef> {
        let c = |x: f32| self.fconst(x, lanes);
        // Clamps that keep NaN: `x > hi ? hi : x`.
        let (hi, lo) = (c(88.0), c(-87.336_55));
        let x = self.select(self.fcmp(RP::LLVMRealOGT, x0, hi), hi, x0);
        let x = self.select(self.fcmp(RP::LLVMRealOLT, x, lo), lo, x);
        let t = self.fmul(x, c(std::f32::consts::LOG2_E));
        let n = self.un_intr("llvm.roundeven", t)?;
        let r = self.fma(n, c(-0.693_359_4), x)?;
        let r = self.fma(n, c(2.121_944_4e-4), r)?;
        let coeffs = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
        let mut p = c(coeffs[0]);
        for k in &coeffs[1..] {
            p = self.fma(p, r, c(*k))?;
        }
        let r2 = self.fmul(r, r);
        let p = self.fma(p, r2, r)?;
        let p = self.fadd(p, c(1.0));
        unsafe {
            // 2^n built in the exponent bits: (n + 127) << 23.
            let i32t = LLVMInt32TypeInContext(self.cx);
            let ity = if lanes > 1 { LLVMVectorType(i32t, lanes) } else { i32t };
            // `n` lies in [-126, 127] for every x but NaN, which becomes 0
            // here (its `p` is NaN, so the result stays NaN). A plain
            // `fptosi` of an in-range value then converts a whole vector
            // in one instruction; the saturating intrinsic was scalarized,
            // lane by lane, on x86.
            let ordered = self.fcmp(RP::LLVMRealORD, n, n);
            let n = self.select(ordered, n, c(0.0));
            let ni = LLVMBuildFPToSI(self.b, n, ity, NONE);
            let e = LLVMBuildAdd(self.b, ni, self.const_splat(LLVMConstInt(i32t, 127, 0), lanes), NONE);
            let e = LLVMBuildShl(self.b, e, self.const_splat(LLVMConstInt(i32t, 23, 0), lanes), NONE);
            let scale = LLVMBuildBitCast(self.b, e, LLVMTypeOf(x0), NONE);
            let y = self.fmul(p, scale);
            // Below the clamp the true value is (sub)normal-tiny; return 0.
            let under = self.fcmp(RP::LLVMRealOLT, x0, lo);
            Ok(self.select(under, c(0.0), y))
        }
    }

    /// Cephes `tanhf` (as the Cranelift lowering): an odd polynomial below
    /// |x| = 0.625, `1 - 2 / (exp(2|x|) + 1)` with x's sign above.
    #[allow(clippy::excessive_precision)] // Cephes's constants, as published.
    pub(super) fn tanh(&self, x: LLVMValueRef, lanes: u32) -> R<LLVMValueRef> {
        let c = |v: f32| self.fconst(v, lanes);
        let z = self.fmul(x, x);
        let coeffs = [-5.704_988_7e-3, 2.063_908_9e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328_2e-1];
        let mut p = c(coeffs[0]);
        for k in &coeffs[1..] {
            p = self.fma(p, z, c(*k))?;
        }
        let pz = self.fmul(p, z);
        let small = self.fma(pz, x, x)?;
        let ax = self.un_intr("llvm.fabs", x)?;
        let e = self.exp(self.fadd(ax, ax), lanes)?;
        let d = self.fadd(e, c(1.0));
        let q = unsafe { LLVMBuildFDiv(self.b, c(2.0), d, NONE) };
        let big = unsafe { LLVMBuildFSub(self.b, c(1.0), q, NONE) };
        let big = self.bin_intr("llvm.copysign", big, x)?;
        let is_small = self.fcmp(RP::LLVMRealOLT, ax, c(0.625));
        Ok(self.select(is_small, small, big))
    }
}
