//! The libm functions KIR calls (`sinf`, `cosf`, `logf`, `erff`, `powf`,
//! `fmodf`) as self-contained LLVM IR, for targets without a libm (NVPTX,
//! where no libdevice exists at build time). Each is an internal function
//! `__smelt_<name>(float[, float]) -> float` defined once per module on
//! first use and called lane by lane like the system's symbols, and
//! always inlined.
//!
//! The IR uses only target-independent operations that both NVPTX and the
//! host lower exactly (IEEE `+ - * /`, `llvm.fma`, `llvm.sqrt`,
//! `llvm.roundeven`, integer ops, `f64` arithmetic): no `.approx`
//! instructions, no libcalls, and no fast-math flags, so the same IR runs
//! bit for bit the same on the host, which is how it is tested (the unit
//! tests below JIT it and compare with the system libm and `f64` results).
//!
//! Algorithms and accuracy (measured by the tests):
//! - `sin`/`cos`: the argument is reduced in `f64` by Cody-Waite with a
//!   two-part `pi/2` and `fma` below `|x| = 2^32` (rope angles are far
//!   below; accurate to about 2^48), and exactly by Payne-Hanek on the
//!   integer significand above (a rare branch), then musl's
//!   `__sindf`/`__cosdf` `f64` polynomials on `|r| <= pi/4`: within 1 ulp
//!   of the exact result for every `f32`.
//! - `log`: FreeBSD's `logf` (`x = 2^k m`, `m` in `[sqrt(1/2), sqrt(2))`,
//!   `log1p` of `m - 1` by the `s = f / (2 + f)` series), in `f32`, one
//!   formula for all `m`: within 1 ulp.
//! - `erf`: N. Juffa's branch-free `f32` approximation (an odd polynomial
//!   below |x| = 0.9277, `1 - exp(p(|x|))` above): within 2 ulp.
//! - `pow`: `exp(y log|x|)` entirely in `f64` (series for both, error near
//!   1e-15 relative), rounded once to `f32`, with C99's special cases
//!   (signs for odd integer `y`, NaN for a negative base and fractional
//!   `y`, `pow(x, 0) = pow(1, y) = 1`, ...): within 1 ulp.
//! - `fmod`: exact, on the integer significands (`(m_x 2^d) mod m_y` in
//!   steps of 40 bits of `d`, as 64-bit remainders), like musl's `fmodf`.

use super::lower::{add_fn_attr, backend, Lower, NONE, R};
use inkwell::llvm_sys::core::*;
use inkwell::llvm_sys::prelude::*;
use inkwell::llvm_sys::{LLVMIntPredicate as IP, LLVMLinkage, LLVMRealPredicate as RP};
use std::ffi::CString;

/// `m * 2^e` (for constants written as C's hex floats, `0xMp-E`).
fn hexf(m: u64, e: i32) -> f64 {
    m as f64 * 2f64.powi(e)
}

// SAFETY (every `unsafe` block below): as in `lower`, the handles are live
// and belong to this context, and the builder is positioned in a block of
// the function being built.
impl Lower<'_> {
    /// The internal function implementing the libm function `name` (of
    /// type `fty`, `arity` float arguments), defined on first use.
    pub(super) fn math_function(&mut self, name: &str, fty: LLVMTypeRef, arity: usize) -> R<LLVMValueRef> {
        let symbol = CString::new(format!("__smelt_{name}")).map_err(|_| backend(self.k, "bad libm name".into()))?;
        unsafe {
            let f = LLVMGetNamedFunction(self.m, symbol.as_ptr());
            if !f.is_null() {
                return Ok(f);
            }
            let f = LLVMAddFunction(self.m, symbol.as_ptr(), fty);
            LLVMSetLinkage(f, LLVMLinkage::LLVMInternalLinkage);
            // Inlined everywhere, as CUDA's own math functions are: a GPU
            // call costs parameter traffic and blocks register allocation.
            for attr in ["nounwind", "willreturn", "mustprogress", "alwaysinline"] {
                add_fn_attr(self.cx, f, attr);
            }
            // Build the body with a builder of its own, then come back.
            let b = LLVMCreateBuilderInContext(self.cx);
            LLVMPositionBuilderAtEnd(b, LLVMAppendBasicBlockInContext(self.cx, f, c"entry".as_ptr()));
            let saved_b = std::mem::replace(&mut self.b, b);
            let saved_f = std::mem::replace(&mut self.func, f);
            let saved_w = self.wide.take();
            let x = LLVMGetParam(f, 0);
            let y = if arity > 1 { LLVMGetParam(f, 1) } else { x };
            let r = match name {
                "sinf" => self.sin_cos(x, false),
                "cosf" => self.sin_cos(x, true),
                "logf" => self.log_f32(x),
                "erff" => self.erf_f32(x),
                "powf" => self.pow_f32(x, y),
                "fmodf" => self.fmod_f32(x, y),
                other => Err(backend(self.k, format!("no IR version of `{other}`"))),
            };
            if let Ok(v) = r {
                LLVMBuildRet(self.b, v);
            }
            self.b = saved_b;
            self.func = saved_f;
            self.wide = saved_w;
            LLVMDisposeBuilder(b);
            r.map(|_| f)
        }
    }

    // ----- small helpers (scalars) -----

    fn f64c(&self, x: f64) -> LLVMValueRef {
        unsafe { LLVMConstReal(LLVMDoubleTypeInContext(self.cx), x) }
    }

    fn i32c(&self, x: i64) -> LLVMValueRef {
        unsafe { LLVMConstInt(LLVMInt32TypeInContext(self.cx), x as u64, 1) }
    }

    fn f32_bits(&self, x: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildBitCast(self.b, x, LLVMInt32TypeInContext(self.cx), NONE) }
    }

    fn f32_from_bits(&self, x: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildBitCast(self.b, x, LLVMFloatTypeInContext(self.cx), NONE) }
    }

    fn fsub(&self, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildFSub(self.b, x, y, NONE) }
    }

    fn fdiv(&self, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildFDiv(self.b, x, y, NONE) }
    }

    fn icmp(&self, p: IP, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildICmp(self.b, p, x, y, NONE) }
    }

    fn or1(&self, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildOr(self.b, x, y, NONE) }
    }

    fn and1(&self, x: LLVMValueRef, y: LLVMValueRef) -> LLVMValueRef {
        unsafe { LLVMBuildAnd(self.b, x, y, NONE) }
    }

    /// `2^n` as an `f64`, for an `i64` `n` in `[-1022, 1023]`.
    fn pow2_f64(&self, n: LLVMValueRef) -> LLVMValueRef {
        unsafe {
            let i64t = LLVMInt64TypeInContext(self.cx);
            let e = LLVMBuildAdd(self.b, n, LLVMConstInt(i64t, 1023, 0), NONE);
            let e = LLVMBuildShl(self.b, e, LLVMConstInt(i64t, 52, 0), NONE);
            LLVMBuildBitCast(self.b, e, LLVMDoubleTypeInContext(self.cx), NONE)
        }
    }

    // ----- the functions -----

    /// `sinf` (or `cosf`): see the module docs.
    #[allow(clippy::excessive_precision)]
    fn sin_cos(&mut self, x: LLVMValueRef, cos: bool) -> R<LLVMValueRef> {
        unsafe {
            let b = self.b;
            let d = LLVMDoubleTypeInContext(self.cx);
            let i64t = LLVMInt64TypeInContext(self.cx);
            let c = |v: f64| self.f64c(v);
            let xd = LLVMBuildFPExt(b, x, d, NONE);
            let ax = self.un_intr("llvm.fabs", xd)?;
            let k = self.un_intr("llvm.roundeven", self.fmul(xd, c(std::f64::consts::FRAC_2_PI)))?;
            // No reduction below pi/4: keeps sin(-0) = -0.
            let k = self.select(self.fcmp(RP::LLVMRealOLT, ax, c(std::f64::consts::FRAC_PI_4)), c(0.0), k);
            let nk = LLVMBuildFNeg(b, k, NONE);
            // pi/2 = PIO2_HI + PIO2_LO to about 2^-107.
            let r_fast = self.fma(nk, c(std::f64::consts::FRAC_PI_2), xd)?;
            let r_fast = self.fma(nk, c(6.123_233_995_736_766e-17), r_fast)?;
            let q_fast = self.intrinsic("llvm.fptosi.sat", &[i64t, d], &[k])?;
            // From 2^32 on (finite), the exact reduction: rare, so a branch.
            let big = self.and1(
                self.fcmp(RP::LLVMRealOGE, ax, c(4_294_967_296.0)),
                self.fcmp(RP::LLVMRealOLT, ax, c(f64::INFINITY)),
            );
            let fast_bb = LLVMGetInsertBlock(b);
            let slow_bb = LLVMAppendBasicBlockInContext(self.cx, self.func, c"trig.slow".as_ptr());
            let join_bb = LLVMAppendBasicBlockInContext(self.cx, self.func, c"trig.join".as_ptr());
            LLVMBuildCondBr(b, big, slow_bb, join_bb);
            LLVMPositionBuilderAtEnd(b, slow_bb);
            let (q_slow, r_slow) = self.payne_hanek(x)?;
            let slow_end = LLVMGetInsertBlock(b);
            LLVMBuildBr(b, join_bb);
            LLVMPositionBuilderAtEnd(b, join_bb);
            let r = LLVMBuildPhi(b, d, NONE);
            let (mut rv, mut rb) = ([r_fast, r_slow], [fast_bb, slow_end]);
            LLVMAddIncoming(r, rv.as_mut_ptr(), rb.as_mut_ptr(), 2);
            let q = LLVMBuildPhi(b, i64t, NONE);
            let (mut qv, mut qb) = ([q_fast, q_slow], [fast_bb, slow_end]);
            LLVMAddIncoming(q, qv.as_mut_ptr(), qb.as_mut_ptr(), 2);
            let q = if cos { LLVMBuildAdd(b, q, LLVMConstInt(i64t, 1, 0), NONE) } else { q };
            let z = self.fmul(r, r);
            let w = self.fmul(z, z);
            // musl __sindf: (r + s (S1 + z S2)) + s w (S3 + z S4), s = z r.
            let (s1, s2) = (-hexf(0x15555554cbac77, -55), hexf(0x111110896efbb2, -59));
            let (s3, s4) = (-hexf(0x1a00f9e2cae774, -65), hexf(0x16cd878c3b46a7, -71));
            let s = self.fmul(z, r);
            let sin = self.fadd(r, self.fmul(s, self.fadd(c(s1), self.fmul(z, c(s2)))));
            let sin = self.fadd(sin, self.fmul(self.fmul(s, w), self.fadd(c(s3), self.fmul(z, c(s4)))));
            // musl __cosdf: ((1 + z C0) + w C1) + (w z) (C2 + z C3).
            let (c0, c1) = (-hexf(0x1ffffffd0c5e81, -54), hexf(0x155553e1053a42, -57));
            let (c2, c3) = (-hexf(0x16c087e80f1e27, -62), hexf(0x199342e0ee5069, -68));
            let cs = self.fadd(self.fadd(c(1.0), self.fmul(z, c(c0))), self.fmul(w, c(c1)));
            let cs = self.fadd(cs, self.fmul(self.fmul(w, z), self.fadd(c(c2), self.fmul(z, c(c3)))));
            // Quadrant q: sin, cos, -sin, -cos.
            let bit = |m: u64| {
                let x = LLVMBuildAnd(b, q, LLVMConstInt(i64t, m, 0), NONE);
                self.icmp(IP::LLVMIntNE, x, LLVMConstInt(i64t, 0, 0))
            };
            let v = self.select(bit(1), cs, sin);
            let v = self.select(bit(2), LLVMBuildFNeg(b, v, NONE), v);
            let v = LLVMBuildFPTrunc(b, v, LLVMFloatTypeInContext(self.cx), NONE);
            // sin(-0) = -0 (the polynomial gives +0).
            Ok(if cos { v } else { self.select(self.fcmp(RP::LLVMRealOEQ, x, self.fconst(0.0, 1)), x, v) })
        }
    }

    /// The quadrant (an `i64`, meaningful mod 4) and the remainder (an
    /// `f64` in `[-pi/4, pi/4]`) of a finite `f32` `x` with `|x| >= 0.5`
    /// divided by `pi/2`, exactly (Payne-Hanek, after N. Juffa's single
    /// precision version): the 24-bit significand times the 96 bits of
    /// `1/(2 pi)` that matter at its exponent, in 2.62 fixed point.
    fn payne_hanek(&self, x: LLVMValueRef) -> R<(LLVMValueRef, LLVMValueRef)> {
        // 1/(2 pi) in 32-bit words, after a zero word.
        const TABLE: [u32; 9] =
            [0, 0x28be60db, 0x9391054a, 0x7f09d5f4, 0x7d4d3770, 0x36d8a566, 0x4f10e410, 0x7f9458ea, 0xf7aef158];
        unsafe {
            let b = self.b;
            let i32t = LLVMInt32TypeInContext(self.cx);
            let i64t = LLVMInt64TypeInContext(self.cx);
            let c32 = |v: u64| LLVMConstInt(i32t, v, 0);
            let c64 = |v: u64| LLVMConstInt(i64t, v, 0);
            let ux = self.f32_bits(x);
            let ia = LLVMBuildOr(
                b,
                LLVMBuildShl(b, LLVMBuildAnd(b, ux, c32(0x7f_ffff), NONE), c32(8), NONE),
                c32(0x8000_0000),
                NONE,
            );
            let e =
                LLVMBuildSub(b, LLVMBuildAnd(b, LLVMBuildLShr(b, ux, c32(23), NONE), c32(0xff), NONE), c32(126), NONE);
            let i = LLVMBuildLShr(b, e, c32(5), NONE);
            let e = LLVMBuildAnd(b, e, c32(31), NONE);
            // TABLE[i + j] for i in 0..=4, by selects (no memory).
            let word = |j: usize| {
                let mut w = c32(TABLE[j + 4] as u64);
                for k in (0..4).rev() {
                    w = self.select(self.icmp(IP::LLVMIntEQ, i, c32(k as u64)), c32(TABLE[j + k] as u64), w);
                }
                LLVMBuildZExt(b, w, i64t, NONE)
            };
            let (w0, w1, w2, w3) = (word(0), word(1), word(2), word(3));
            // (a:b << e) >> 32: the word `a` shifted left by e, filled from `b`.
            let e64 = LLVMBuildZExt(b, e, i64t, NONE);
            let shift = |a: LLVMValueRef, nb: LLVMValueRef| {
                let ab = LLVMBuildOr(b, LLVMBuildShl(b, a, c64(32), NONE), nb, NONE);
                let s = LLVMBuildLShr(b, LLVMBuildShl(b, ab, e64, NONE), c64(32), NONE);
                LLVMBuildAnd(b, s, c64(0xffff_ffff), NONE)
            };
            let (hi, mid, lo) = (shift(w0, w1), shift(w1, w2), shift(w2, w3));
            let ia64 = LLVMBuildZExt(b, ia, i64t, NONE);
            let p = LLVMBuildMul(b, ia64, lo, NONE);
            let p = LLVMBuildAdd(b, LLVMBuildMul(b, ia64, mid, NONE), LLVMBuildLShr(b, p, c64(32), NONE), NONE);
            let top = LLVMBuildMul(b, ia, LLVMBuildTrunc(b, hi, i32t, NONE), NONE);
            let p = LLVMBuildAdd(b, LLVMBuildShl(b, LLVMBuildZExt(b, top, i64t, NONE), c64(32), NONE), p, NONE);
            // Round the quotient to nearest: q its integer part, p the rest.
            let q = LLVMBuildLShr(b, p, c64(62), NONE);
            let p = LLVMBuildAnd(b, p, c64(0x3fff_ffff_ffff_ffff), NONE);
            let up = self.icmp(IP::LLVMIntNE, LLVMBuildAnd(b, p, c64(0x2000_0000_0000_0000), NONE), c64(0));
            let p = self.select(up, LLVMBuildSub(b, p, c64(0x4000_0000_0000_0000), NONE), p);
            let q = self.select(up, LLVMBuildAdd(b, q, c64(1), NONE), q);
            // r = p 2^-62 pi/2.
            let r = self.fmul(
                LLVMBuildSIToFP(b, p, LLVMDoubleTypeInContext(self.cx), NONE),
                self.f64c(3.406_121_580_086_554_5e-19),
            );
            let neg = self.icmp(IP::LLVMIntSLT, ux, c32(0));
            let r = self.select(neg, LLVMBuildFNeg(b, r, NONE), r);
            let q = self.select(neg, LLVMBuildNeg(b, q, NONE), q);
            Ok((q, r))
        }
    }

    /// `logf`: see the module docs.
    #[allow(clippy::excessive_precision)]
    fn log_f32(&self, x: LLVMValueRef) -> R<LLVMValueRef> {
        unsafe {
            let b = self.b;
            let c = |v: f32| self.fconst(v, 1);
            let i = |v: i64| self.i32c(v);
            // Subnormals: scale by 2^25 first.
            let ix0 = self.f32_bits(x);
            let sub = self.icmp(IP::LLVMIntSLT, ix0, i(0x0080_0000));
            let xs = self.select(sub, self.fmul(x, c(33_554_432.0)), x);
            let k0 = self.select(sub, i(-25), i(0));
            let ix = self.f32_bits(xs);
            let e = LLVMBuildAShr(b, ix, i(23), NONE);
            let k = LLVMBuildAdd(b, k0, LLVMBuildSub(b, e, i(127), NONE), NONE);
            let ix = LLVMBuildAnd(b, ix, i(0x007f_ffff), NONE);
            // m or m/2, whichever lies in [sqrt(1/2), sqrt(2)).
            let t = LLVMBuildAnd(b, LLVMBuildAdd(b, ix, i(0x95f64 << 3), NONE), i(0x0080_0000), NONE);
            let m = self.f32_from_bits(LLVMBuildOr(b, ix, LLVMBuildXor(b, t, i(0x3f80_0000), NONE), NONE));
            let k = LLVMBuildAdd(b, k, LLVMBuildLShr(b, t, i(23), NONE), NONE);
            let f = self.fsub(m, c(1.0));
            let s = self.fdiv(f, self.fadd(c(2.0), f));
            let dk = LLVMBuildSIToFP(b, k, LLVMFloatTypeInContext(self.cx), NONE);
            let z = self.fmul(s, s);
            let w = self.fmul(z, z);
            let lg1 = hexf(0xaaaaaa, -24) as f32;
            let lg2 = hexf(0xccce13, -25) as f32;
            let lg3 = hexf(0x91e9ee, -25) as f32;
            let lg4 = hexf(0xf89e26, -26) as f32;
            let t1 = self.fmul(w, self.fadd(c(lg2), self.fmul(w, c(lg4))));
            let t2 = self.fmul(z, self.fadd(c(lg1), self.fmul(w, c(lg3))));
            let r = self.fadd(t2, t1);
            let hfsq = self.fmul(self.fmul(c(0.5), f), f);
            let (ln2_hi, ln2_lo) = (f32::from_bits(0x3f31_7180), f32::from_bits(0x3717_f7d1));
            // dk ln2_hi - ((hfsq - (s (hfsq + R) + dk ln2_lo)) - f)
            let inner = self.fadd(self.fmul(s, self.fadd(hfsq, r)), self.fmul(dk, c(ln2_lo)));
            let y = self.fsub(self.fmul(dk, c(ln2_hi)), self.fsub(self.fsub(hfsq, inner), f));
            // log(0) = -inf, log(x < 0) = NaN, log(+inf) = +inf, NaN stays.
            let y = self.select(self.fcmp(RP::LLVMRealOEQ, x, c(0.0)), c(f32::NEG_INFINITY), y);
            let y = self.select(self.fcmp(RP::LLVMRealOLT, x, c(0.0)), c(f32::NAN), y);
            let y = self.select(self.fcmp(RP::LLVMRealOEQ, x, c(f32::INFINITY)), x, y);
            Ok(self.select(self.fcmp(RP::LLVMRealUNO, x, x), x, y))
        }
    }

    /// `erff`: see the module docs.
    #[allow(clippy::excessive_precision)]
    fn erf_f32(&self, x: LLVMValueRef) -> R<LLVMValueRef> {
        let c = |v: f32| self.fconst(v, 1);
        let t = self.un_intr("llvm.fabs", x)?;
        let s = self.fmul(x, x);
        // |x| > 0.927734375: 1 - exp(p(t)), with x's sign.
        let r = self.fma(c(-1.728_534_70e-5), t, c(3.831_971_26e-4))?;
        let u = self.fma(c(-3.883_964_38e-3), t, c(2.425_462_19e-2))?;
        let r = self.fma(r, s, u)?;
        let r = self.fma(r, t, c(-1.067_778_77e-1))?;
        let r = self.fma(r, t, c(-6.348_466_87e-1))?;
        let r = self.fma(r, t, c(-1.287_175_12e-1))?;
        let nt = unsafe { LLVMBuildFNeg(self.b, t, NONE) };
        let r = self.fma(r, t, nt)?;
        let big = self.fsub(c(1.0), self.exp(r, 1)?);
        let big = self.bin_intr("llvm.copysign", big, x)?;
        // Below: an odd polynomial.
        let mut p = c(-5.967_617_03e-4);
        for k in [4.991_194_23e-3, -2.676_813_49e-2, 1.128_199_25e-1, -3.761_253_36e-1, 1.283_791_66e-1] {
            p = self.fma(p, s, c(k))?;
        }
        let small = self.fma(p, x, x)?;
        Ok(self.select(self.fcmp(RP::LLVMRealOGT, t, c(0.927_734_375)), big, small))
    }

    /// `powf`: see the module docs.
    #[allow(clippy::excessive_precision)] // fdlibm's constants, as published.
    fn pow_f32(&self, x: LLVMValueRef, y: LLVMValueRef) -> R<LLVMValueRef> {
        unsafe {
            let b = self.b;
            let d = LLVMDoubleTypeInContext(self.cx);
            let i64t = LLVMInt64TypeInContext(self.cx);
            let c = |v: f64| self.f64c(v);
            let cf = |v: f32| self.fconst(v, 1);
            let ci = |v: i64| LLVMConstInt(i64t, v as u64, 1);
            let ax = self.un_intr("llvm.fabs", x)?;
            // log|x| in f64: |x| = 2^e m, m in [sqrt(1/2), sqrt(2)) (an f32
            // is normal as an f64, so the bits give e and m directly).
            let xd = LLVMBuildFPExt(b, ax, d, NONE);
            let bits = LLVMBuildBitCast(b, xd, i64t, NONE);
            let e = LLVMBuildSub(b, LLVMBuildLShr(b, bits, ci(52), NONE), ci(1023), NONE);
            let mbits = LLVMBuildOr(b, LLVMBuildAnd(b, bits, ci((1 << 52) - 1), NONE), ci(1023 << 52), NONE);
            let m = LLVMBuildBitCast(b, mbits, d, NONE);
            let big = self.fcmp(RP::LLVMRealOGT, m, c(std::f64::consts::SQRT_2));
            let m = self.select(big, self.fmul(m, c(0.5)), m);
            let e = self.select(big, LLVMBuildAdd(b, e, ci(1), NONE), e);
            let f = self.fsub(m, c(1.0));
            let s = self.fdiv(f, self.fadd(c(2.0), f));
            let z = self.fmul(s, s);
            // log(1 + f) = 2 s (1 + z/3 + z^2/5 + ... + z^8/17), |s| < 0.172.
            let mut p = c(1.0 / 17.0);
            for k in (0..8).rev() {
                p = self.fma(p, z, c(1.0 / (2 * k + 1) as f64))?;
            }
            let l1p = self.fmul(self.fadd(s, s), p);
            let ed = LLVMBuildSIToFP(b, e, d, NONE);
            let l = self.fma(ed, c(std::f64::consts::LN_2), l1p)?;
            // log 0 = -inf; infinities and NaN are their own logarithm here.
            let l = self.select(self.fcmp(RP::LLVMRealOEQ, xd, c(0.0)), c(f64::NEG_INFINITY), l);
            let l = self.select(self.fcmp(RP::LLVMRealUGE, xd, c(f64::INFINITY)), xd, l);
            // exp(y log|x|) in f64, the argument clamped (NaN kept) so that
            // 2^n stays an f64 while the f32 result over- or underflows.
            let yd = LLVMBuildFPExt(b, y, d, NONE);
            let t = self.fmul(yd, l);
            let t = self.select(self.fcmp(RP::LLVMRealOGT, t, c(200.0)), c(200.0), t);
            let t = self.select(self.fcmp(RP::LLVMRealOLT, t, c(-200.0)), c(-200.0), t);
            let n = self.un_intr("llvm.roundeven", self.fmul(t, c(std::f64::consts::LOG2_E)))?;
            let nn = LLVMBuildFNeg(b, n, NONE);
            // ln 2 = LN2_HI + LN2_LO (fdlibm's split).
            let r = self.fma(nn, c(6.931_471_803_691_238e-1), t)?;
            let r = self.fma(nn, c(1.908_214_929_270_587_7e-10), r)?;
            // Taylor to r^11 (|r| <= 0.35: error below 1e-14).
            let mut fact = [1.0f64; 12];
            for k in 1..12 {
                fact[k] = fact[k - 1] * k as f64;
            }
            let mut q = c(1.0 / fact[11]);
            for k in (0..11).rev() {
                q = self.fma(q, r, c(1.0 / fact[k]))?;
            }
            let ni = self.intrinsic("llvm.fptosi.sat", &[i64t, d], &[n])?;
            let v = self.fmul(q, self.pow2_f64(ni));
            let v = LLVMBuildFPTrunc(b, v, LLVMFloatTypeInContext(self.cx), NONE);
            // Signs and special cases (C99 Annex F).
            let is_int = self.fcmp(RP::LLVMRealOEQ, self.un_intr("llvm.floor", y)?, y);
            let ay = self.un_intr("llvm.fabs", y)?;
            let yi = self.intrinsic("llvm.fptosi.sat", &[i64t, LLVMFloatTypeInContext(self.cx)], &[y])?;
            let odd_bit = self.icmp(IP::LLVMIntNE, LLVMBuildAnd(b, yi, ci(1), NONE), ci(0));
            // |y| >= 2^24 is an even integer.
            let odd = self.and1(self.and1(is_int, self.fcmp(RP::LLVMRealOLT, ay, cf(16_777_216.0))), odd_bit);
            let neg_x = self.icmp(IP::LLVMIntSLT, self.f32_bits(x), self.i32c(0));
            let v = self.select(self.and1(neg_x, odd), LLVMBuildFNeg(b, v, NONE), v);
            // A finite negative base and a fractional (or NaN) exponent.
            let neg_finite =
                self.and1(self.fcmp(RP::LLVMRealOLT, x, cf(0.0)), self.fcmp(RP::LLVMRealOGT, x, cf(f32::NEG_INFINITY)));
            let v = self.select(self.and1(neg_finite, LLVMBuildNot(b, is_int, NONE)), cf(f32::NAN), v);
            // pow(+-1, +-inf) = 1, pow(1, y) = 1 and pow(x, +-0) = 1.
            let one_inf =
                self.and1(self.fcmp(RP::LLVMRealOEQ, ax, cf(1.0)), self.fcmp(RP::LLVMRealOEQ, ay, cf(f32::INFINITY)));
            let one = self
                .or1(one_inf, self.or1(self.fcmp(RP::LLVMRealOEQ, x, cf(1.0)), self.fcmp(RP::LLVMRealOEQ, y, cf(0.0))));
            Ok(self.select(one, cf(1.0), v))
        }
    }

    /// `fmodf`: see the module docs. The one routine with a loop (at most
    /// 7 turns, usually none).
    fn fmod_f32(&mut self, x: LLVMValueRef, y: LLVMValueRef) -> R<LLVMValueRef> {
        unsafe {
            let b = self.b;
            let i64t = LLVMInt64TypeInContext(self.cx);
            let i = |v: i64| self.i32c(v);
            let ci = |v: i64| LLVMConstInt(i64t, v as u64, 1);
            let ax = LLVMBuildAnd(b, self.f32_bits(x), i(0x7fff_ffff), NONE);
            let ay = LLVMBuildAnd(b, self.f32_bits(y), i(0x7fff_ffff), NONE);
            // Significand and exponent: x = m 2^(e - 150), subnormals with e = 1.
            let parts = |a: LLVMValueRef| {
                let e = LLVMBuildLShr(b, a, i(23), NONE);
                let normal = self.icmp(IP::LLVMIntNE, e, i(0));
                let m = LLVMBuildOr(b, LLVMBuildAnd(b, a, i(0x007f_ffff), NONE), i(0x0080_0000), NONE);
                let m = self.select(normal, m, a);
                let e = self.select(normal, e, i(1));
                (LLVMBuildZExt(b, m, i64t, NONE), e)
            };
            let (mx, ex) = parts(ax);
            let (my, ey) = parts(ay);
            // my = 0 (y = 0) is a special case below; divide by 1 meanwhile.
            let my = self.select(self.icmp(IP::LLVMIntEQ, my, ci(0)), ci(1), my);
            let d0 = LLVMBuildSExt(b, LLVMBuildSub(b, ex, ey, NONE), i64t, NONE);
            let r0 = LLVMBuildURem(b, mx, my, NONE);
            let pre = LLVMGetInsertBlock(b);
            let head = LLVMAppendBasicBlockInContext(self.cx, self.func, c"fmod.loop".as_ptr());
            let body = LLVMAppendBasicBlockInContext(self.cx, self.func, c"fmod.step".as_ptr());
            let done = LLVMAppendBasicBlockInContext(self.cx, self.func, c"fmod.done".as_ptr());
            LLVMBuildBr(b, head);
            LLVMPositionBuilderAtEnd(b, head);
            let r = LLVMBuildPhi(b, i64t, NONE);
            let d = LLVMBuildPhi(b, i64t, NONE);
            LLVMBuildCondBr(b, self.icmp(IP::LLVMIntSGT, d, ci(0)), body, done);
            LLVMPositionBuilderAtEnd(b, body);
            // (r 2^s) mod my with s <= 40 bits: r < 2^24, so no overflow.
            let s = self.bin_intr("llvm.smin", d, ci(40))?;
            let r2 = LLVMBuildURem(b, LLVMBuildShl(b, r, s, NONE), my, NONE);
            let d2 = LLVMBuildSub(b, d, s, NONE);
            LLVMBuildBr(b, head);
            let (mut rv, mut rb) = ([r0, r2], [pre, body]);
            LLVMAddIncoming(r, rv.as_mut_ptr(), rb.as_mut_ptr(), 2);
            let (mut dv, mut db) = ([d0, d2], [pre, body]);
            LLVMAddIncoming(d, dv.as_mut_ptr(), db.as_mut_ptr(), 2);
            LLVMPositionBuilderAtEnd(b, done);
            // r 2^(ey - 150), exact (it is below |y| and on its grid).
            let dt = LLVMDoubleTypeInContext(self.cx);
            let scale = self.pow2_f64(LLVMBuildSub(b, LLVMBuildZExt(b, ey, i64t, NONE), ci(150), NONE));
            let v = self.fmul(LLVMBuildUIToFP(b, r, dt, NONE), scale);
            let v = LLVMBuildFPTrunc(b, v, LLVMFloatTypeInContext(self.cx), NONE);
            let v = self.bin_intr("llvm.copysign", v, x)?;
            // |x| < |y|: x; |x| = |y|: 0 with x's sign; y = 0, y NaN, x
            // infinite or NaN: NaN (computed as (x y) / (x y) does).
            let v = self.select(self.icmp(IP::LLVMIntULT, ax, ay), x, v);
            let v = self.select(self.icmp(IP::LLVMIntEQ, ax, ay), self.fmul(self.fconst(0.0, 1), x), v);
            let bad = self.or1(
                self.or1(self.icmp(IP::LLVMIntEQ, ay, i(0)), self.icmp(IP::LLVMIntUGT, ay, i(0x7f80_0000))),
                self.icmp(IP::LLVMIntUGE, ax, i(0x7f80_0000)),
            );
            let xy = self.fmul(x, y);
            Ok(self.select(bad, self.fdiv(xy, xy), v))
        }
    }
}

/// The routines above, lowered for the host with [`super::lower::Libm::Inline`]
/// into a JIT (the very IR NVPTX gets, less the `.entry` wrapper), against
/// `f64` references and the system libm.
#[cfg(test)]
mod tests {
    use super::super::lower::{self, Abi, Flavor, Libm};
    use crate::kir::{BinOp, Builder, Expr, Kernel, LoopKind, UnOp};
    use inkwell::context::Context;
    use inkwell::passes::PassBuilderOptions;
    use inkwell::OptimizationLevel;

    type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

    /// `y[i] = f(x[i])` (or `f(x[i], z[i])`), `lanes` at a time.
    fn kernel(op: Result<UnOp, BinOp>, n: usize, lanes: u8) -> Kernel {
        let mut b = Builder::new("m");
        let x = b.input("x", n);
        let z = b.input("z", n);
        let y = b.output("y", n);
        b.for_("i", Expr::idx(0), Expr::idx(n), lanes as i64, LoopKind::Serial, |b, i| {
            let a = Expr::load(x, i.clone(), lanes);
            let v = match op {
                Ok(u) => a.un(u),
                Err(o) => a.bin(o, Expr::load(z, i.clone(), lanes)),
            };
            b.store(y, i, v);
        });
        b.finish().unwrap()
    }

    /// Runs the kernel for `op` on `x` (and `z`) through the JIT.
    fn run(op: Result<UnOp, BinOp>, x: &[f32], z: &[f32], lanes: u8) -> Vec<f32> {
        let n = x.len();
        assert_eq!(n % lanes as usize, 0);
        let k = kernel(op, n, lanes);
        let (tm, _) = super::super::host_machine().unwrap();
        let cx = Context::create();
        let m = cx.create_module("math_test");
        m.set_triple(&tm.get_triple());
        m.set_data_layout(&tm.get_target_data().get_data_layout());
        lower::lower(&k, &cx, &m, Flavor { abi: Abi::Host, libm: Libm::Inline }).unwrap();
        m.verify().unwrap_or_else(|e| panic!("{e}"));
        m.run_passes("default<O3>", &tm, PassBuilderOptions::create()).unwrap();
        let ir = m.print_to_string().to_string();
        for libm in ["@sinf", "@cosf", "@logf", "@erff", "@powf", "@fmodf", "@llvm.sin", "@llvm.log", "@llvm.exp"] {
            assert!(!ir.contains(libm), "the inline math calls {libm}");
        }
        let ee = m.create_jit_execution_engine(OptimizationLevel::Default).unwrap();
        let mut x = x.to_vec();
        let mut z = if z.is_empty() { vec![0.0; n] } else { z.to_vec() };
        let mut y = vec![0.0f32; n];
        let bufs = [x.as_mut_ptr() as *mut u8, z.as_mut_ptr() as *mut u8, y.as_mut_ptr() as *mut u8];
        // SAFETY: the kernel has the host ABI; the buffers have the
        // declared lengths and element types.
        unsafe {
            let f = ee.get_function::<KernelFn>("smelt_m").unwrap();
            f.call(bufs.as_ptr(), [].as_ptr(), 0, 1);
        }
        y
    }

    /// Error of `got` in units in the last place of the f32 nearest `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        if got.is_nan() || want.is_nan() {
            return if got.is_nan() && want.is_nan() { 0.0 } else { f64::INFINITY };
        }
        // Exact, or the f32 nearest `want` overflows to the same infinity.
        if got as f64 == want || (got.is_infinite() && got == want as f32) {
            return 0.0;
        }
        let w = want as f32;
        let ulp = if w.is_infinite() {
            (f32::MAX - f32::from_bits(f32::MAX.to_bits() - 1)) as f64
        } else {
            let a = w.abs();
            (f32::from_bits(a.to_bits() + 1) - a) as f64
        };
        (got as f64 - want).abs() / ulp
    }

    /// Deterministic values uniform in `[lo, hi)`.
    fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (lo + (hi - lo) * (s >> 11) as f64 / (1u64 << 53) as f64) as f32
            })
            .collect()
    }

    /// `n` values spread over every binade of positive floats (subnormals
    /// included), with both signs when `signed`.
    fn binades(n: usize, signed: bool) -> Vec<f32> {
        uniform(n, 1.0, 2.0, 99)
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let e = (i % 276) as i32 - 149;
                let v = (*m as f64 * 2f64.powi(e)) as f32;
                if signed && i % 2 == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect()
    }

    fn worst(op: &str, xs: &[f32], got: &[f32], want: impl Fn(usize) -> f64) -> (f64, f32) {
        let mut w = (0.0, 0.0);
        for (i, (x, g)) in xs.iter().zip(got).enumerate() {
            let e = ulps(*g, want(i));
            assert!(e.is_finite(), "{op}({x}) = {g}, want {}", want(i));
            if e > w.0 {
                w = (e, *x);
            }
        }
        eprintln!("{op}: max {:.3} ulp at {}", w.0, w.1);
        w
    }

    const SPECIAL: [f32; 8] = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.0, -1.0, f32::MIN_POSITIVE];

    #[test]
    fn sin_cos_within_one_ulp_up_to_1e5_and_beyond() {
        let mut xs = uniform(40_000, -1e5, 1e5, 1);
        xs.extend(uniform(20_000, -10.0, 10.0, 2));
        xs.extend(uniform(4_000, -1e7, 1e7, 3));
        xs.extend(binades(4_000, true));
        xs.extend(SPECIAL);
        // Near multiples of pi/2, where reduction loses the most.
        xs.extend((1..2000).map(|k| (k as f64 * std::f64::consts::FRAC_PI_2) as f32));
        xs.truncate(xs.len() / 4 * 4);
        for (op, f) in [(UnOp::Sin, f64::sin as fn(f64) -> f64), (UnOp::Cos, f64::cos)] {
            let got = run(Ok(op), &xs, &[], 1);
            let (e, _) = worst(&format!("{op:?}"), &xs, &got, |i| f(xs[i] as f64));
            assert!(e <= 1.0, "{op:?}: {e} ulp");
            // The vector path (lane by lane) gives the same bits.
            assert_eq!(
                run(Ok(op), &xs, &[], 4).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        let got = run(Ok(UnOp::Sin), &[-0.0, 0.0, 1e-30, -1e-30], &[], 1);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            [(-0.0f32).to_bits(), 0, 1e-30f32.to_bits(), (-1e-30f32).to_bits()]
        );
    }

    #[test]
    fn log_within_one_ulp() {
        let mut xs = binades(60_000, false);
        xs.extend(uniform(20_000, 0.5, 2.0, 4));
        xs.extend(SPECIAL);
        xs.extend([-2.0, f32::MAX, f32::from_bits(1)]);
        let got = run(Ok(UnOp::Log), &xs, &[], 1);
        let (e, _) = worst("log", &xs, &got, |i| if xs[i] < 0.0 { f64::NAN } else { (xs[i] as f64).ln() });
        assert!(e <= 1.0, "log: {e} ulp");
        for (x, g) in xs.iter().zip(&got) {
            if (1e-3..1e3).contains(x) {
                assert!((*g as f64 - (*x as f64).ln()).abs() <= 1e-6, "log({x}) = {g}");
            }
        }
    }

    #[test]
    fn erf_within_two_ulp() {
        let mut xs = uniform(60_000, -6.0, 6.0, 5);
        xs.extend(binades(8_000, true));
        xs.extend(SPECIAL);
        let got = run(Ok(UnOp::Erf), &xs, &[], 1);
        let (e, _) = worst("erf", &xs, &got, |i| crate::kir::libm::erff(xs[i]) as f64);
        assert!(e <= 2.0, "erf: {e} ulp from the system's erff");
        for (x, g) in xs.iter().zip(&got) {
            assert!(x.is_nan() || (*g - crate::kir::libm::erff(*x)).abs() <= 1e-6, "erf({x}) = {g}");
        }
    }

    #[test]
    fn exp_and_tanh_abs_error() {
        let xs = uniform(40_000, -20.0, 20.0, 6);
        let got = run(Ok(UnOp::Exp), &xs, &[], 1);
        let (e, _) = worst("exp", &xs, &got, |i| (xs[i] as f64).exp());
        assert!(e <= 2.0, "exp: {e} ulp");
        for (x, g) in xs.iter().zip(&got) {
            if x.abs() <= 1.0 {
                assert!((*g as f64 - (*x as f64).exp()).abs() <= 1e-6, "exp({x}) = {g}");
            }
        }
        let got = run(Ok(UnOp::Tanh), &xs, &[], 1);
        for (x, g) in xs.iter().zip(&got) {
            assert!((*g as f64 - (*x as f64).tanh()).abs() <= 1e-6, "tanh({x}) = {g}");
        }
    }

    #[test]
    fn pow_within_one_ulp_and_c99_special_cases() {
        let mut xs = uniform(30_000, 0.0, 10.0, 7);
        let mut ys = uniform(30_000, -12.0, 12.0, 8);
        // Negative bases with integer exponents, huge and tiny results.
        xs.extend(uniform(10_000, -4.0, 0.0, 9));
        ys.extend(uniform(10_000, -20.0, 20.0, 10).iter().map(|y| y.round()));
        xs.extend(uniform(10_000, 0.9, 1.1, 11));
        ys.extend(uniform(10_000, -900.0, 900.0, 12));
        let got = run(Err(BinOp::Pow), &xs, &ys, 1);
        let (e, _) = worst("pow", &xs, &got, |i| (xs[i] as f64).powf(ys[i] as f64));
        assert!(e <= 1.0, "pow: {e} ulp");
        let sp = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -0.5,
            2.0,
            -2.0,
            3.0,
            -3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            2.5,
        ];
        let (mut xs, mut ys) = (vec![], vec![]);
        for x in sp {
            for y in sp {
                xs.push(x);
                ys.push(y);
            }
        }
        let got = run(Err(BinOp::Pow), &xs, &ys, 1);
        for ((x, y), g) in xs.iter().zip(&ys).zip(&got) {
            let want = crate::kir::libm::powf(*x, *y);
            let same = (want.is_nan() && g.is_nan()) || want.to_bits() == g.to_bits();
            assert!(same, "pow({x}, {y}) = {g}, want {want}");
        }
    }

    #[test]
    fn fmod_is_exact() {
        let mut xs = uniform(20_000, -1e4, 1e4, 13);
        let mut ys = uniform(20_000, -10.0, 10.0, 14);
        xs.extend(binades(20_000, true));
        ys.extend(binades(20_000, true).iter().rev());
        for x in SPECIAL {
            for y in SPECIAL {
                xs.push(x);
                ys.push(y);
            }
        }
        xs.extend([f32::MAX, 3e38, 1.0, f32::from_bits(5), 7.0]);
        ys.extend([f32::from_bits(3), 1e-38, 1e-45, f32::from_bits(2), 7.0]);
        let got = run(Err(BinOp::Rem), &xs, &ys, 1);
        for ((x, y), g) in xs.iter().zip(&ys).zip(&got) {
            let want = crate::kir::libm::fmodf(*x, *y);
            let same = (want.is_nan() && g.is_nan()) || want.to_bits() == g.to_bits();
            assert!(same, "fmod({x:e}, {y:e}) = {g:e}, want {want:e}");
        }
    }
}
