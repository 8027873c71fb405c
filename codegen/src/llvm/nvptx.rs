//! KIR GPU kernels to PTX through LLVM's NVPTX backend, for sm_80, sm_90
//! and sm_90a ([`GpuArch`]). The statement and expression lowering is the
//! host's (`lower`, with [`Abi::Ptx`]); this file holds what differs.
//!
//! Kernel ABI: each KIR kernel is a `.entry` named `smelt_<name>`
//! ([`crate::aot::symbol_of`]) whose parameters are each global buffer in
//! [`Kernel::global_buffers`] order, as a pointer to global memory
//! (read-only ones `noalias readonly`, so loads may use the non-coherent
//! cache: the runtime never passes an input that aliases an output), then
//! each scalar parameter as an `i64`. The block is `maxntid` (the KIR
//! launch's block), with `minnctapersm` when the launch asks for a minimum
//! of resident blocks; the grid is the caller's business. LLVM 22 needs both
//! the `ptx_kernel` calling convention and the `nvvm.annotations` kernel
//! metadata to emit a `.entry`.
//!
//! Constructs: thread/block indices and sizes read the `%tid`, `%ctaid`,
//! `%ntid`, `%nctaid` registers; a barrier is `bar.sync 0`; shuffles are
//! `shfl.sync` over the full warp (mask `0xffffffff`, clamp 31), `i64`
//! values as two 32-bit halves and bools as 32-bit integers; shared
//! buffers are module globals in the shared space (16-byte aligned, one per
//! buffer); a tensor-core [`crate::kir::Mma`] is the NVVM intrinsic
//! `llvm.nvvm.mma.m16n8k16.row.col.bf16` (`i32` fragments) or
//! `...row.col.f32.f32` (`<2 x half>` fragments), each fragment register
//! one 4-byte load of its element pair; a `Parallel` loop is an ordinary loop (GPU kernels distribute
//! work with thread and block indices themselves). The libm functions are
//! built from IR (`math`), since no libdevice exists at build time; `exp`
//! and `tanh` are the host's polynomials, `sqrt` is `sqrt.rn`, division
//! `div.rn`, no fast-math anywhere: results match the interpreter to an ulp
//! or two, as on the host.
//!
//! Assumptions the callers must keep (the interpreter does not check them):
//! - a vector access of `n` lanes is aligned to its size (capped at 16
//!   bytes): buffer base addresses are 16-byte aligned (as `cudaMalloc`'s
//!   are) and the element index is a multiple of `n`;
//! - a shuffle's `arg` is in `0..32` (others give the lane's own value, as
//!   the interpreter does, except that a negative `Down` offset reads no
//!   lane above), and every lane of the warp exists and takes part (the
//!   interpreter gives missing lanes' reads the reader's own value; the
//!   hardware gives undefined values);
//! - every thread of a block reaches the same barriers (the interpreter
//!   checks this one);
//! - an MMA's fragment indices are even (4-byte aligned pairs; the
//!   interpreter checks this) and all 32 lanes of the warp execute it.
//!
//! sm_90a: a kernel's [`Kernel::sm90a`] variant replaces it in the sm_90a
//! module (`emit_ptx`), which is how the weight products get a wgmma body
//! there and keep `mma.sync` on sm_80 and sm_90 under the same entry name,
//! parameters and launch. A [`Wgmma`] is inline PTX
//! (`wgmma.mma_async.sync.aligned.m64nNk16.f32.T.T`, LLVM 22 has no
//! intrinsic for it) whose accumulators are tied in/out operands and whose
//! descriptors are computed from the shared buffer's address (a pointer in
//! the shared space is its offset in the shared window); the fence, commit
//! and wait are the `llvm.nvvm.wgmma.*` intrinsics and the proxy fence
//! `llvm.nvvm.fence.proxy.async.shared_cta`, which LLVM treats as touching
//! memory, so shared loads and stores stay on their side. After
//! `wait_group 0` the accumulators pass through an empty volatile asm so
//! that no read of them is scheduled above the wait. Other architectures
//! refuse a kernel whose body uses wgmma.

use super::lower::{backend, unsupported, Lower, NONE, R};
use super::LlvmError;
use crate::kir::{Access, AsyncSync, Kernel, Mma, Scalar, ShuffleKind, SmemMatrix, Space, Special, Wgmma};
use inkwell::llvm_sys::core::*;
use inkwell::llvm_sys::prelude::*;
use inkwell::llvm_sys::{LLVMIntPredicate as IP, LLVMLinkage, LLVMTypeKind};
use inkwell::targets::{CodeModel, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;
use std::ffi::{CStr, CString};

/// The NVIDIA GPU architectures PTX is emitted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuArch {
    /// Ampere (A100), PTX ISA 7.8.
    Sm80,
    /// Hopper (H100, H200) without the architecture-specific features,
    /// PTX ISA 8.0.
    Sm90,
    /// Hopper with its architecture-specific features (wgmma, TMA,
    /// setmaxnreg), PTX ISA 8.0; runs on sm_90 chips only.
    Sm90a,
}

impl GpuArch {
    /// The name `ptxas -arch` and `.target` use: `sm_80`, `sm_90`, `sm_90a`.
    pub fn name(self) -> &'static str {
        match self {
            GpuArch::Sm80 => "sm_80",
            GpuArch::Sm90 => "sm_90",
            GpuArch::Sm90a => "sm_90a",
        }
    }

    pub fn all() -> [GpuArch; 3] {
        [GpuArch::Sm80, GpuArch::Sm90, GpuArch::Sm90a]
    }

    /// The PTX ISA version, as an LLVM feature: the first that knows the
    /// architecture's instructions we may use (sm_90a needs 8.0), and no
    /// newer, so that older drivers can still JIT it.
    fn ptx_feature(self) -> &'static str {
        match self {
            GpuArch::Sm80 => "+ptx78",
            GpuArch::Sm90 | GpuArch::Sm90a => "+ptx80",
        }
    }
}

impl std::fmt::Display for GpuArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// PTX assembly for `kernels` (one module, one `.entry` each), optimised
/// with `default<O3>` for `arch`. Every kernel must be a GPU kernel (have a
/// launch geometry) whose symbol is a PTX identifier.
///
/// For [`GpuArch::Sm90a`] a kernel with an sm_90a variant
/// ([`Kernel::sm90a`]) is lowered as that variant, under its own name;
/// for the other architectures a kernel whose body uses wgmma is refused
/// ([`LlvmError::NeedsArch`]).
pub fn emit_ptx(kernels: &[Kernel], arch: GpuArch) -> Result<String, LlvmError> {
    let module = format!("smelt_{}", arch.name());
    let chosen: Vec<std::borrow::Cow<'_, Kernel>> = kernels
        .iter()
        .map(|k| if arch == GpuArch::Sm90a { k.for_sm90a() } else { std::borrow::Cow::Borrowed(k) })
        .collect();
    let kernels: Vec<Kernel> = chosen.into_iter().map(|k| k.into_owned()).collect();
    for (i, k) in kernels.iter().enumerate() {
        if k.gpu.is_none() {
            return Err(LlvmError::NotGpu { kernel: k.name.clone() });
        }
        if arch != GpuArch::Sm90a && k.uses_wgmma() {
            return Err(LlvmError::NeedsArch { kernel: k.name.clone(), arch: arch.name(), needs: "sm_90a" });
        }
        let symbol = crate::aot::symbol_of(k);
        let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
        if !symbol.chars().all(ok_char) {
            return Err(backend(k, format!("`{symbol}` is not a PTX identifier (letters, digits, `_`, `$`)")));
        }
        if kernels[..i].iter().any(|o| o.name == k.name) {
            return Err(LlvmError::Module { module, message: format!("two kernels are named `{}`", k.name) });
        }
    }
    let tm = machine(arch)?;
    let bytes = super::build(&kernels, &module, &tm, super::lower::Flavor::PTX, super::Output::Assembly)?;
    String::from_utf8(bytes).map_err(|e| LlvmError::Module { module, message: format!("PTX is not UTF-8: {e}") })
}

/// The NVPTX target machine for `arch`.
fn machine(arch: GpuArch) -> Result<TargetMachine, LlvmError> {
    Target::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = Target::from_triple(&triple).map_err(|e| LlvmError::Target(e.to_string()))?;
    target
        .create_target_machine(
            &triple,
            arch.name(),
            arch.ptx_feature(),
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| LlvmError::Target(format!("no NVPTX target machine for {}", arch.name())))
}

/// Declares `k`'s entry function (see the module docs for the ABI).
///
/// # Safety
/// `cx` and `m` are live handles of one context.
pub(super) unsafe fn declare_entry(k: &Kernel, cx: LLVMContextRef, m: LLVMModuleRef, symbol: &CStr) -> LLVMValueRef {
    let gptr = LLVMPointerTypeInContext(cx, 1);
    let i64t = LLVMInt64TypeInContext(cx);
    let mut params: Vec<LLVMTypeRef> = k.global_buffers().map(|_| gptr).chain(k.scalars.iter().map(|_| i64t)).collect();
    let fty = LLVMFunctionType(LLVMVoidTypeInContext(cx), params.as_mut_ptr(), params.len() as u32, 0);
    let f = LLVMAddFunction(m, symbol.as_ptr(), fty);
    LLVMSetFunctionCallConv(f, 71); // PTX_Kernel
    for (i, (_, d)) in k.global_buffers().enumerate() {
        if d.access == Access::Read {
            for attr in ["noalias", "readonly"] {
                let kind = LLVMGetEnumAttributeKindForName(attr.as_ptr().cast(), attr.len());
                LLVMAddAttributeAtIndex(f, i as u32 + 1, LLVMCreateEnumAttribute(cx, kind, 0));
            }
        }
    }
    if let Some(g) = &k.gpu {
        let mut attrs = vec![("nvvm.maxntid", format!("{},{},{}", g.block[0], g.block[1], g.block[2]))];
        if let Some(n) = g.min_blocks_per_sm {
            attrs.push(("nvvm.minctasm", n.to_string()));
        }
        for (key, value) in attrs {
            let a = LLVMCreateStringAttribute(
                cx,
                key.as_ptr().cast(),
                key.len() as u32,
                value.as_ptr().cast(),
                value.len() as u32,
            );
            LLVMAddAttributeAtIndex(f, u32::MAX, a);
        }
    }
    // !nvvm.annotations = !{!{ptr @f, !"kernel", i32 1}}
    let mut md = [
        LLVMValueAsMetadata(f),
        LLVMMDStringInContext2(cx, c"kernel".as_ptr(), 6),
        LLVMValueAsMetadata(LLVMConstInt(LLVMInt32TypeInContext(cx), 1, 0)),
    ];
    let node = LLVMMDNodeInContext2(cx, md.as_mut_ptr(), md.len());
    LLVMAddNamedMetadataOperand(m, c"nvvm.annotations".as_ptr(), LLVMMetadataAsValue(cx, node));
    f
}

// SAFETY (every `unsafe` block below): as in `lower`, the handles are live
// and belong to this context, and the builder is positioned.
impl Lower<'_> {
    /// Binds the parameters (buffers, then scalars) and creates the
    /// kernel's shared buffers.
    pub(super) fn ptx_prologue(&mut self) -> R<()> {
        let k = self.k;
        unsafe {
            let nbufs = k.global_buffers().count();
            for (i, (id, _)) in k.global_buffers().enumerate() {
                self.bufs[id.0 as usize] = Some(LLVMGetParam(self.func, i as u32));
            }
            for (i, v) in k.scalars.iter().enumerate() {
                self.set(*v, LLVMGetParam(self.func, (nbufs + i) as u32));
            }
            for (i, d) in k.buffers.iter().enumerate() {
                if d.space != Space::Shared {
                    continue;
                }
                let len =
                    k.const_len(d).ok_or_else(|| backend(k, format!("shared `{}` has no constant length", d.name)))?;
                let ty = LLVMArrayType2(self.mem_ty(d.elem), len as u64);
                let clean: String = d.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                let name = CString::new(format!("{}__{clean}_{i}", crate::aot::symbol_of(k)))
                    .map_err(|_| backend(k, "buffer name contains NUL".into()))?;
                let g = LLVMAddGlobalInAddressSpace(self.m, ty, name.as_ptr(), 3);
                // Shared memory cannot be initialised.
                LLVMSetInitializer(g, LLVMGetPoison(ty));
                LLVMSetLinkage(g, LLVMLinkage::LLVMInternalLinkage);
                LLVMSetAlignment(g, 16);
                self.bufs[i] = Some(g);
            }
        }
        Ok(())
    }

    /// A launch coordinate as an `i64`.
    pub(super) fn special(&self, s: Special) -> R<LLVMValueRef> {
        let (reg, axis) = match s {
            Special::ThreadIdx(a) => ("tid", a),
            Special::BlockIdx(a) => ("ctaid", a),
            Special::BlockDim(a) => ("ntid", a),
            Special::GridDim(a) => ("nctaid", a),
        };
        let axis = ["x", "y", "z"].get(axis as usize).ok_or_else(|| unsupported(self.k, format!("axis {axis}")))?;
        let v = self.intrinsic(&format!("llvm.nvvm.read.ptx.sreg.{reg}.{axis}"), &[], &[])?;
        Ok(unsafe { LLVMBuildZExt(self.b, v, LLVMInt64TypeInContext(self.cx), NONE) })
    }

    /// `bar.sync 0`: every thread of the block waits for the others.
    pub(super) fn barrier(&self) -> R<()> {
        let zero = unsafe { LLVMConstInt(LLVMInt32TypeInContext(self.cx), 0, 0) };
        self.intrinsic("llvm.nvvm.barrier.cta.sync.aligned.all", &[], &[zero])?;
        Ok(())
    }

    /// `x` as read from the lane that `kind` and the `i64` `arg` name, or
    /// this lane's own `x` when that lane is outside the warp.
    pub(super) fn shuffle_lanes(&self, kind: ShuffleKind, x: LLVMValueRef, arg: LLVMValueRef) -> R<LLVMValueRef> {
        let mode = match kind {
            ShuffleKind::Xor => "bfly",
            ShuffleKind::Down => "down",
            ShuffleKind::Idx => "idx",
        };
        unsafe {
            let b = self.b;
            let i32t = LLVMInt32TypeInContext(self.cx);
            let i64t = LLVMInt64TypeInContext(self.cx);
            let c32 = |v: u64| LLVMConstInt(i32t, v, 0);
            let a = LLVMBuildTrunc(b, arg, i32t, NONE);
            // mask: the full warp; c = 0x1f: clamp at lane 31, one segment.
            let shfl = |v: LLVMValueRef, float: bool| {
                let name = format!("llvm.nvvm.shfl.sync.{mode}.{}", if float { "f32" } else { "i32" });
                self.intrinsic(&name, &[], &[c32(0xffff_ffff), v, a, c32(31)])
            };
            let t = LLVMTypeOf(x);
            let kind = LLVMGetTypeKind(t);
            let width = if kind == LLVMTypeKind::LLVMIntegerTypeKind { LLVMGetIntTypeWidth(t) } else { 0 };
            let y = match (kind, width) {
                (LLVMTypeKind::LLVMFloatTypeKind, _) => shfl(x, true)?,
                (LLVMTypeKind::LLVMIntegerTypeKind, 32) => shfl(x, false)?,
                (LLVMTypeKind::LLVMIntegerTypeKind, 64) => {
                    let lo = shfl(LLVMBuildTrunc(b, x, i32t, NONE), false)?;
                    let hi = LLVMBuildLShr(b, x, LLVMConstInt(i64t, 32, 0), NONE);
                    let hi = shfl(LLVMBuildTrunc(b, hi, i32t, NONE), false)?;
                    let hi = LLVMBuildShl(b, LLVMBuildZExt(b, hi, i64t, NONE), LLVMConstInt(i64t, 32, 0), NONE);
                    LLVMBuildOr(b, hi, LLVMBuildZExt(b, lo, i64t, NONE), NONE)
                }
                (LLVMTypeKind::LLVMIntegerTypeKind, 1) => {
                    let v = shfl(LLVMBuildZExt(b, x, i32t, NONE), false)?;
                    LLVMBuildICmp(b, IP::LLVMIntNE, v, c32(0), NONE)
                }
                _ => return Err(unsupported(self.k, "a shuffle of this type".into())),
            };
            // PTX reads lane `arg & 31`; KIR's lanes past the warp read their own.
            let inside = LLVMBuildICmp(b, IP::LLVMIntULT, arg, LLVMConstInt(i64t, 32, 0), NONE);
            Ok(self.select(inside, y, x))
        }
    }

    /// `D = A · B + C` on the tensor cores (see [`Mma`]): each fragment
    /// register is one 32-bit load of its element pair.
    pub(super) fn mma(&mut self, m: &Mma) -> R<()> {
        unsafe {
            let (name, reg) = match m.elem {
                Scalar::BF16 => ("llvm.nvvm.mma.m16n8k16.row.col.bf16", LLVMInt32TypeInContext(self.cx)),
                Scalar::F16 => {
                    ("llvm.nvvm.mma.m16n8k16.row.col.f32.f32", LLVMVectorType(LLVMHalfTypeInContext(self.cx), 2))
                }
                other => return Err(unsupported(self.k, format!("an mma of {other:?}"))),
            };
            let mut args = vec![];
            let regs = m.a_at.iter().map(|e| (m.a, e)).chain(m.b_at.iter().map(|e| (m.b, e)));
            for (buf, at) in regs {
                let addr = self.addr(buf, at)?;
                let x = LLVMBuildLoad2(self.b, reg, addr, NONE);
                LLVMSetAlignment(x, 4);
                args.push(x);
            }
            for c in &m.c {
                args.push(self.expr(c)?);
            }
            let d = self.intrinsic(name, &[], &args)?;
            // LLVM does not declare the MMA intrinsics convergent, so
            // nothing would stop it from moving one into control flow that
            // only some lanes take (where a use of `D` is conditional, as
            // the edge stores are). Clang marks every call in CUDA code
            // convergent; so does this call site.
            let kind = LLVMGetEnumAttributeKindForName(c"convergent".as_ptr(), 10);
            LLVMAddCallSiteAttribute(d, u32::MAX, LLVMCreateEnumAttribute(self.cx, kind, 0));
            for (i, v) in m.d.iter().enumerate() {
                self.set(*v, LLVMBuildExtractValue(self.b, d, i as u32, NONE));
            }
        }
        Ok(())
    }

    /// The 64-bit matrix descriptor of `m` (no swizzling): the shared
    /// address of its start and the two byte offsets, each `>> 4`.
    fn descriptor(&mut self, m: &SmemMatrix) -> R<LLVMValueRef> {
        let addr = self.addr(m.buf, &m.start)?;
        unsafe {
            let i64t = LLVMInt64TypeInContext(self.cx);
            let c = |v: u64| LLVMConstInt(i64t, v, 0);
            // A pointer into the shared space is the shared-window offset.
            let a = LLVMBuildPtrToInt(self.b, addr, i64t, NONE);
            let a = LLVMBuildLShr(self.b, LLVMBuildAnd(self.b, a, c(0x3ffff), NONE), c(4), NONE);
            let offsets = ((m.lbo as u64 >> 4) << 16) | ((m.sbo as u64 >> 4) << 32);
            Ok(LLVMBuildOr(self.b, a, c(offsets), NONE))
        }
    }

    /// A call of the inline PTX `asm` with `constraints`, returning `ty`:
    /// volatile (never removed or merged) and convergent (never moved into
    /// control flow that only some threads take), like CUDA's `asm volatile`.
    fn inline_asm(&self, ty: LLVMTypeRef, asm: &str, constraints: &str, args: &mut [LLVMValueRef]) -> LLVMValueRef {
        unsafe {
            let mut arg_tys: Vec<LLVMTypeRef> = args.iter().map(|a| LLVMTypeOf(*a)).collect();
            let fty = LLVMFunctionType(ty, arg_tys.as_mut_ptr(), arg_tys.len() as u32, 0);
            let f = LLVMGetInlineAsm(
                fty,
                asm.as_ptr().cast(),
                asm.len(),
                constraints.as_ptr().cast(),
                constraints.len(),
                1,
                0,
                inkwell::llvm_sys::LLVMInlineAsmDialect::LLVMInlineAsmDialectATT,
                0,
            );
            let call = LLVMBuildCall2(self.b, fty, f, args.as_mut_ptr(), args.len() as u32, NONE);
            let kind = LLVMGetEnumAttributeKindForName(c"convergent".as_ptr(), 10);
            LLVMAddCallSiteAttribute(call, u32::MAX, LLVMCreateEnumAttribute(self.cx, kind, 0));
            call
        }
    }

    /// `D += A · B` on Hopper's warpgroup tensor cores (see [`Wgmma`]):
    /// `wgmma.mma_async` as inline PTX (LLVM has no intrinsic for it), the
    /// accumulators tied in and out, both descriptors as `l` registers and
    /// the scale-d predicate set from a register holding 1.
    pub(super) fn wgmma(&mut self, w: &Wgmma) -> R<()> {
        let ty = match w.elem {
            Scalar::BF16 => "bf16",
            Scalar::F16 => "f16",
            other => return Err(unsupported(self.k, format!("a wgmma of {other:?}"))),
        };
        let regs = w.d.len();
        let da = self.descriptor(&w.a)?;
        let db = self.descriptor(&w.b)?;
        let list: Vec<String> = (0..regs).map(|i| format!("${i}")).collect();
        let asm = format!(
            "{{\n.reg .pred p;\nsetp.ne.b32 p, ${}, 0;\nwgmma.mma_async.sync.aligned.m64n{}k16.f32.{ty}.{ty} {{{}}}, ${}, ${}, p, 1, 1, 0, 0;\n}}",
            regs + 2,
            w.n,
            list.join(", "),
            regs,
            regs + 1
        );
        let mut constraints: Vec<String> = (0..regs).map(|_| "=f".to_string()).collect();
        constraints.extend(["l".to_string(), "l".to_string(), "r".to_string()]);
        constraints.extend((0..regs).map(|i| i.to_string()));
        constraints.push("~{memory}".into());
        unsafe {
            let f32t = LLVMFloatTypeInContext(self.cx);
            let mut fields = vec![f32t; regs];
            let sty = LLVMStructTypeInContext(self.cx, fields.as_mut_ptr(), regs as u32, 0);
            let mut args = vec![da, db, LLVMConstInt(LLVMInt32TypeInContext(self.cx), 1, 0)];
            args.extend(w.d.iter().map(|v| self.get(*v)));
            let d = self.inline_asm(sty, &asm, &constraints.join(","), &mut args);
            for (i, v) in w.d.iter().enumerate() {
                self.set(*v, LLVMBuildExtractValue(self.b, d, i as u32, NONE));
            }
        }
        for v in &w.d {
            if !self.wgmma_vars.contains(v) {
                self.wgmma_vars.push(*v);
            }
        }
        Ok(())
    }

    /// The ordering statements of the wgmma protocol (see [`AsyncSync`]),
    /// as NVVM intrinsics (which LLVM treats as touching all memory, so no
    /// load or store moves across them). After `wgmma.wait_group 0` every
    /// accumulator of the wgmmas before it passes through an empty volatile
    /// asm (CUTLASS's `warpgroup_fence_operand`), so that no use of one is
    /// scheduled above the wait.
    pub(super) fn async_sync(&mut self, a: AsyncSync) -> R<()> {
        match a {
            AsyncSync::WgmmaFence => {
                self.intrinsic("llvm.nvvm.wgmma.fence.sync.aligned", &[], &[])?;
            }
            AsyncSync::WgmmaCommit => {
                self.intrinsic("llvm.nvvm.wgmma.commit_group.sync.aligned", &[], &[])?;
            }
            AsyncSync::WgmmaWait(n) => {
                let n64 = unsafe { LLVMConstInt(LLVMInt64TypeInContext(self.cx), n as u64, 0) };
                self.intrinsic("llvm.nvvm.wgmma.wait_group.sync.aligned", &[], &[n64])?;
                if n == 0 {
                    let f32t = unsafe { LLVMFloatTypeInContext(self.cx) };
                    for v in std::mem::take(&mut self.wgmma_vars) {
                        let x = self.get(v);
                        let y = self.inline_asm(f32t, "", "=f,0,~{memory}", &mut [x]);
                        self.set(v, y);
                    }
                }
            }
            AsyncSync::ProxyFenceShared => {
                self.intrinsic("llvm.nvvm.fence.proxy.async.shared_cta", &[], &[])?;
            }
        }
        Ok(())
    }
}
