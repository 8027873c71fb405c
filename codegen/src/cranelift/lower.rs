//! KIR to Cranelift IR, and the ISA setup shared by the JIT and object
//! emission.

use crate::kir::{self, BinOp, CmpOp, Expr, Kernel, LoopKind, RedOp, Scalar, Space, Stmt, Ty, UnOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, Endianness, FuncRef, Function, InstBuilder, MemFlagsData, Signature, Type, Value,
};
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_module::{Linkage, Module};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("kernel `{kernel}`: the Cranelift lowering does not support {what}")]
    Unsupported { kernel: String, what: String },
    #[error("kernel `{kernel}`: {message}")]
    Backend { kernel: String, message: String },
    #[error("host ISA: {0}")]
    Isa(String),
}

/// What the host ISA was configured with, for reports and manifests.
#[derive(Clone, Debug)]
pub struct IsaInfo {
    pub triple: String,
    pub has_fma: bool,
    pub has_avx: bool,
    pub has_avx2: bool,
}

/// The host ISA with its detected features (`has_fma`, `has_avx`, ...,
/// read by `cranelift_native`; without `has_fma` an `fma` becomes a libcall
/// per lane). `pic` must be false for the JIT and true for objects that go
/// into a shared library.
pub fn host_isa(pic: bool) -> Result<(OwnedTargetIsa, IsaInfo), CompileError> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| f.set(k, v).map_err(|e| CompileError::Isa(e.to_string()));
    // `SMELT_CL_OPT=none` is an experiment knob (see codegen/README.md on
    // Cranelift sinking loop invariants into loops); `speed` by default.
    set(&mut flags, "opt_level", &std::env::var("SMELT_CL_OPT").unwrap_or("speed".into()))?;
    set(&mut flags, "is_pic", if pic { "true" } else { "false" })?;
    set(&mut flags, "use_colocated_libcalls", "false")?;
    let builder = cranelift_native::builder().map_err(|e| CompileError::Isa(e.to_string()))?;
    let isa = builder.finish(settings::Flags::new(flags)).map_err(|e| CompileError::Isa(e.to_string()))?;
    let flag = |name: &str| isa.isa_flags().iter().any(|v| v.name == name && v.as_bool() == Some(true));
    let info = IsaInfo {
        triple: isa.triple().to_string(),
        has_fma: flag("has_fma"),
        has_avx: flag("has_avx"),
        has_avx2: flag("has_avx2"),
    };
    Ok((isa, info))
}

/// The kernel ABI's signature (see the module docs).
pub(crate) fn signature(isa: &OwnedTargetIsa) -> Signature {
    let ptr = isa.pointer_type();
    let mut sig = Signature::new(CallConv::triple_default(isa.triple()));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(types::I64));
    sig
}

/// The libm function (see [`crate::kir::libm`]) an op calls, if it has no
/// instruction.
fn libm_name(e: &Expr) -> Option<&'static str> {
    match e {
        Expr::Un(UnOp::Sin, _) => Some("sinf"),
        Expr::Un(UnOp::Cos, _) => Some("cosf"),
        Expr::Un(UnOp::Log, _) => Some("logf"),
        Expr::Un(UnOp::Erf, _) => Some("erff"),
        Expr::Bin(BinOp::Pow, _, _) => Some("powf"),
        // Integer remainders have an instruction; only float ones call fmodf.
        Expr::Bin(BinOp::Rem, _, _) => Some("fmodf"),
        _ => None,
    }
}

/// Every libm function the kernel's expressions may call, each once.
fn libm_calls(k: &Kernel) -> Vec<&'static str> {
    fn stmts(s: &[Stmt], out: &mut Vec<&'static str>) {
        let expr = |e: &Expr, out: &mut Vec<&'static str>| {
            e.visit(&mut |e| {
                if let Some(n) = libm_name(e) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            })
        };
        for s in s {
            match s {
                Stmt::Assign(_, e) => expr(e, out),
                Stmt::Store { index, value, .. } => {
                    expr(index, out);
                    expr(value, out);
                }
                Stmt::For(l) => {
                    expr(&l.start, out);
                    expr(&l.end, out);
                    stmts(&l.body, out);
                }
                Stmt::If { cond, then, els } => {
                    expr(cond, out);
                    stmts(then, out);
                    stmts(els, out);
                }
                Stmt::Barrier => {}
                Stmt::Shuffle { value, arg, .. } => {
                    expr(value, out);
                    expr(arg, out);
                }
                Stmt::Mma(m) => m.exprs().for_each(|e| expr(e, out)),
                Stmt::Prefetch { index, .. } => expr(index, out),
                Stmt::Wgmma(w) => w.exprs().for_each(|e| expr(e, out)),
                Stmt::Async(_) => {}
            }
        }
    }
    let mut out = vec![];
    stmts(&k.body, &mut out);
    out
}

/// Lowers `k` into `func` (which must have [`signature`]); libm functions
/// the kernel calls are imported through `module`.
pub(crate) fn lower<M: Module + ?Sized>(
    k: &Kernel,
    isa: &OwnedTargetIsa,
    module: &mut M,
    func: &mut Function,
) -> Result<(), CompileError> {
    if let Some(b) = k.buffers.iter().find(|b| b.space == Space::Shared) {
        return Err(unsupported(k, format!("shared buffer `{}`", b.name)));
    }
    let mut libm = vec![];
    for name in libm_calls(k) {
        let mut sig = Signature::new(CallConv::triple_default(isa.triple()));
        let arity = if matches!(name, "powf" | "fmodf") { 2 } else { 1 };
        for _ in 0..arity {
            sig.params.push(AbiParam::new(types::F32));
        }
        sig.returns.push(AbiParam::new(types::F32));
        let id = module
            .declare_function(name, Linkage::Import, &sig)
            .map_err(|e| CompileError::Backend { kernel: k.name.clone(), message: e.to_string() })?;
        libm.push((name, module.declare_func_in_func(id, func)));
    }
    let mut ctx = FunctionBuilderContext::new();
    let mut fb = FunctionBuilder::new(func, &mut ctx);
    let entry = fb.create_block();
    fb.append_block_params_for_function_params(entry);
    fb.switch_to_block(entry);
    fb.seal_block(entry);
    let params = fb.block_params(entry).to_vec();
    let ptr = isa.pointer_type();
    let vars: Vec<Variable> = k.vars.iter().map(|d| fb.declare_var(cl_type(d.ty))).collect();
    let mut bufs = vec![None; k.buffers.len()];
    for (slot, (id, _)) in k.global_buffers().enumerate() {
        let p = fb.ins().load(ptr, MemFlagsData::trusted(), params[0], (slot * ptr.bytes() as usize) as i32);
        bufs[id.0 as usize] = Some(p);
    }
    for (i, v) in k.scalars.iter().enumerate() {
        let x = fb.ins().load(types::I64, MemFlagsData::trusted(), params[1], (i * 8) as i32);
        fb.def_var(vars[v.0 as usize], x);
    }
    let mut l = Lower { k, fb, vars, bufs, thread: params[2], threads: params[3], parallel_depth: 0, libm };
    l.stmts(&k.body)?;
    l.fb.ins().return_(&[]);
    l.fb.seal_all_blocks();
    l.fb.finalize(isa.frontend_config());
    Ok(())
}

/// Emits an object file (for a shared library: `is_pic=true`) defining each
/// kernel as the exported symbol `smelt_<name>`.
pub fn emit_object(kernels: &[Kernel], name: &str) -> Result<Vec<u8>, CompileError> {
    let (isa, _) = host_isa(true)?;
    let isa: Arc<dyn cranelift_codegen::isa::TargetIsa> = isa;
    let builder = cranelift_object::ObjectBuilder::new(isa.clone(), name, cranelift_module::default_libcall_names())
        .map_err(|e| CompileError::Isa(e.to_string()))?;
    let mut module = cranelift_object::ObjectModule::new(builder);
    let mut ctx = module.make_context();
    for k in kernels {
        let backend =
            |e: &dyn std::fmt::Display| CompileError::Backend { kernel: k.name.clone(), message: e.to_string() };
        ctx.func.signature = signature(&isa);
        lower(k, &isa, &mut module, &mut ctx.func)?;
        let id = module
            .declare_function(&format!("smelt_{}", k.name), Linkage::Export, &ctx.func.signature)
            .map_err(|e| backend(&e))?;
        module.define_function(id, &mut ctx).map_err(|e| backend(&format!("{e:?}")))?;
        module.clear_context(&mut ctx);
    }
    module.finish().emit().map_err(|e| CompileError::Backend { kernel: name.to_string(), message: e.to_string() })
}

fn unsupported(k: &Kernel, what: String) -> CompileError {
    CompileError::Unsupported { kernel: k.name.clone(), what }
}

fn cl_type(t: Ty) -> Type {
    let s = match t.elem {
        Scalar::F32 => types::F32,
        Scalar::I32 => types::I32,
        Scalar::I64 => types::I64,
        // Scalar bools are 0/1 bytes; bool vectors are lane masks as wide as
        // the f32 lanes they select between.
        Scalar::Bool if t.lanes == 1 => types::I8,
        Scalar::Bool => types::I32,
        // Narrow floats are storage-only; loads and stores convert.
        Scalar::BF16 | Scalar::F16 => types::I16,
    };
    if t.lanes > 1 {
        s.by(t.lanes as u32).expect("vector type")
    } else {
        s
    }
}

struct Lower<'a, 'f> {
    k: &'a Kernel,
    fb: FunctionBuilder<'f>,
    vars: Vec<Variable>,
    bufs: Vec<Option<Value>>,
    thread: Value,
    threads: Value,
    parallel_depth: usize,
    /// Imported libm functions by symbol.
    libm: Vec<(&'static str, FuncRef)>,
}

impl Lower<'_, '_> {
    /// Calls the libm function `name` on scalars, or lane by lane on vectors.
    fn libcall(&mut self, name: &str, args: &[Value], lanes: u8) -> Result<Value, CompileError> {
        let f = self.libm.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).ok_or_else(|| CompileError::Backend {
            kernel: self.k.name.clone(),
            message: format!("libm function `{name}` was not imported"),
        })?;
        if lanes == 1 {
            let call = self.fb.ins().call(f, args);
            return Ok(self.fb.inst_results(call)[0]);
        }
        let mut out = args[0];
        for lane in 0..lanes {
            let xs: Vec<Value> = args.iter().map(|a| self.fb.ins().extractlane(*a, lane)).collect();
            let call = self.fb.ins().call(f, &xs);
            let y = self.fb.inst_results(call)[0];
            out = self.fb.ins().insertlane(out, y, lane);
        }
        Ok(out)
    }

    fn ty(&self, e: &Expr) -> Result<Ty, CompileError> {
        self.k.type_of(e).map_err(|m| CompileError::Backend { kernel: self.k.name.clone(), message: m })
    }

    fn stmts(&mut self, stmts: &[Stmt]) -> Result<(), CompileError> {
        for s in stmts {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), CompileError> {
        match s {
            Stmt::Assign(v, e) => {
                let x = self.expr(e)?;
                self.fb.def_var(self.vars[v.0 as usize], x);
            }
            Stmt::Store { buf, index, value } => {
                let (addr, disp) = self.addr(*buf, index)?;
                let x = self.expr(value)?;
                let elem = self.k.buf(*buf).elem;
                if elem.is_narrow_float() {
                    let lanes = self.ty(value)?.lanes;
                    self.store_narrow(elem, x, lanes, addr, disp)?;
                } else {
                    self.fb.ins().store(mem_flags(), x, addr, disp);
                }
            }
            Stmt::For(l) => self.for_loop(l)?,
            Stmt::If { cond, then, els } => {
                let c = self.expr(cond)?;
                let (bt, be, bm) = (self.fb.create_block(), self.fb.create_block(), self.fb.create_block());
                self.fb.ins().brif(c, bt, &[], be, &[]);
                self.fb.switch_to_block(bt);
                self.stmts(then)?;
                self.fb.ins().jump(bm, &[]);
                self.fb.switch_to_block(be);
                self.stmts(els)?;
                self.fb.ins().jump(bm, &[]);
                self.fb.switch_to_block(bm);
            }
            Stmt::Barrier => return Err(unsupported(self.k, "barriers".into())),
            Stmt::Shuffle { .. } => return Err(unsupported(self.k, "warp shuffles".into())),
            Stmt::Mma(_) => return Err(unsupported(self.k, "tensor-core mma".into())),
            // Cranelift has no prefetch instruction; the hint is dropped.
            Stmt::Prefetch { .. } => {}
            Stmt::Wgmma(_) | Stmt::Async(_) => return Err(unsupported(self.k, "warpgroup mma (wgmma)".into())),
        }
        Ok(())
    }

    fn for_loop(&mut self, l: &kir::Loop) -> Result<(), CompileError> {
        let mut start = self.expr(&l.start)?;
        let mut end = self.expr(&l.end)?;
        let parallel = l.kind == LoopKind::Parallel;
        if parallel && self.parallel_depth == 0 {
            (start, end) = self.split(start, end, l.step);
        }
        let var = self.vars[l.var.0 as usize];
        self.fb.def_var(var, start);
        let (header, body, exit) = (self.fb.create_block(), self.fb.create_block(), self.fb.create_block());
        self.fb.ins().jump(header, &[]);
        self.fb.switch_to_block(header);
        let i = self.fb.use_var(var);
        let c = self.fb.ins().icmp(IntCC::SignedLessThan, i, end);
        self.fb.ins().brif(c, body, &[], exit, &[]);
        self.fb.switch_to_block(body);
        if parallel {
            self.parallel_depth += 1;
        }
        self.stmts(&l.body)?;
        if parallel {
            self.parallel_depth -= 1;
        }
        let i = self.fb.use_var(var);
        let next = self.fb.ins().iadd_imm_s(i, l.step);
        self.fb.def_var(var, next);
        self.fb.ins().jump(header, &[]);
        self.fb.switch_to_block(exit);
        Ok(())
    }

    /// This thread's chunk of `start..end`, as `interp::split_range` computes it.
    fn split(&mut self, start: Value, end: Value, step: i64) -> (Value, Value) {
        let (t, n) = (self.thread, self.threads);
        let span = self.fb.ins().isub(end, start);
        let span = self.fb.ins().iadd_imm_s(span, step - 1);
        let iters = self.fb.ins().sdiv_imm_s(span, step);
        let zero = self.fb.ins().iconst(types::I64, 0);
        let iters = self.fb.ins().smax(iters, zero);
        let first = self.fb.ins().imul(t, iters);
        let first = self.fb.ins().udiv(first, n);
        let t1 = self.fb.ins().iadd_imm_s(t, 1);
        let last = self.fb.ins().imul(t1, iters);
        let last = self.fb.ins().udiv(last, n);
        let s = self.fb.ins().imul_imm_s(first, step);
        let s = self.fb.ins().iadd(start, s);
        let e = self.fb.ins().imul_imm_s(last, step);
        let e = self.fb.ins().iadd(start, e);
        let bound = self.fb.ins().smax(end, start);
        let e = self.fb.ins().smin(e, bound);
        (s, e)
    }

    /// The address of element `index` of `buf`, as a base and a constant
    /// byte offset: an index `e + c` puts `c` in the offset, so the x86
    /// addressing mode carries it instead of an add per access.
    fn addr(&mut self, buf: kir::BufId, index: &Expr) -> Result<(Value, i32), CompileError> {
        let base = self.bufs[buf.0 as usize].ok_or_else(|| unsupported(self.k, "non-global buffers".into()))?;
        let size = self.k.buf(buf).elem.size() as i64;
        let (index, disp) = match index {
            Expr::Bin(BinOp::Add, e, c) => match **c {
                Expr::Int(c, _) => match c.checked_mul(size).and_then(|d| i32::try_from(d).ok()) {
                    Some(d) => (&**e, d),
                    None => (index, 0),
                },
                _ => (index, 0),
            },
            _ => (index, 0),
        };
        let i = self.expr(index)?;
        let off = self.fb.ins().imul_imm_s(i, size);
        Ok((self.fb.ins().iadd(base, off), disp))
    }

    fn fconst(&mut self, x: f32, lanes: u8) -> Value {
        let c = self.fb.ins().f32const(x);
        if lanes > 1 {
            self.fb.ins().splat(types::F32.by(lanes as u32).unwrap(), c)
        } else {
            c
        }
    }

    fn expr(&mut self, e: &Expr) -> Result<Value, CompileError> {
        let t = self.ty(e)?;
        Ok(match e {
            Expr::F32(x) => self.fb.ins().f32const(*x),
            Expr::Int(x, s) => self.fb.ins().iconst(cl_type(Ty::scalar(*s)), *x),
            Expr::Bool(b) => self.fb.ins().iconst(types::I8, *b as i64),
            Expr::Var(v) => self.fb.use_var(self.vars[v.0 as usize]),
            Expr::Un(op, a) => {
                let x = self.expr(a)?;
                let float = t.elem == Scalar::F32;
                match (op, float) {
                    (UnOp::Neg, true) => self.fb.ins().fneg(x),
                    (UnOp::Neg, false) => self.fb.ins().ineg(x),
                    (UnOp::Abs, true) => self.fb.ins().fabs(x),
                    (UnOp::Abs, false) => self.fb.ins().iabs(x),
                    (UnOp::Sqrt, _) => self.fb.ins().sqrt(x),
                    (UnOp::Rsqrt, _) => {
                        // A true division, not the ~12-bit `rsqrtps` estimate.
                        let s = self.fb.ins().sqrt(x);
                        let one = self.fconst(1.0, t.lanes);
                        self.fb.ins().fdiv(one, s)
                    }
                    (UnOp::Exp, _) => self.exp(x, t.lanes),
                    (UnOp::Tanh, _) => self.tanh(x, t.lanes),
                    (UnOp::Floor, _) => self.fb.ins().floor(x),
                    (UnOp::Ceil, _) => self.fb.ins().ceil(x),
                    (UnOp::Round, _) => self.fb.ins().nearest(x),
                    (UnOp::Sin | UnOp::Cos | UnOp::Log | UnOp::Erf, _) => {
                        let name = libm_name(e).expect("libm op");
                        self.libcall(name, &[x], t.lanes)?
                    }
                }
            }
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.expr(a)?, self.expr(b)?);
                if t.elem == Scalar::F32 && matches!(op, BinOp::Rem | BinOp::Pow) {
                    let name = libm_name(e).expect("libm op");
                    return self.libcall(name, &[x, y], t.lanes);
                }
                let ins = self.fb.ins();
                if t.elem == Scalar::F32 {
                    match op {
                        BinOp::Add => ins.fadd(x, y),
                        BinOp::Sub => ins.fsub(x, y),
                        BinOp::Mul => ins.fmul(x, y),
                        BinOp::Div => ins.fdiv(x, y),
                        BinOp::Max => ins.fmax(x, y),
                        BinOp::Min => ins.fmin(x, y),
                        BinOp::Rem | BinOp::Pow => unreachable!("libm calls are lowered above"),
                    }
                } else {
                    match op {
                        BinOp::Add => ins.iadd(x, y),
                        BinOp::Sub => ins.isub(x, y),
                        BinOp::Mul => ins.imul(x, y),
                        // Division by zero traps; templates divide only by
                        // nonzero constants.
                        BinOp::Div => ins.sdiv(x, y),
                        BinOp::Rem => ins.srem(x, y),
                        BinOp::Max => ins.smax(x, y),
                        BinOp::Min => ins.smin(x, y),
                        BinOp::Pow => return Err(unsupported(self.k, "integer pow".into())),
                    }
                }
            }
            Expr::Fma(a, b, c) => {
                let (x, y, z) = (self.expr(a)?, self.expr(b)?, self.expr(c)?);
                self.fb.ins().fma(x, y, z)
            }
            Expr::Cmp(op, a, b) => {
                let at = self.ty(a)?;
                let (x, y) = (self.expr(a)?, self.expr(b)?);
                if at.elem == Scalar::F32 {
                    let cc = match op {
                        CmpOp::Eq => FloatCC::Equal,
                        CmpOp::Ne => FloatCC::NotEqual,
                        CmpOp::Lt => FloatCC::LessThan,
                        CmpOp::Le => FloatCC::LessThanOrEqual,
                        CmpOp::Gt => FloatCC::GreaterThan,
                        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                    };
                    self.fb.ins().fcmp(cc, x, y)
                } else {
                    let cc = match op {
                        CmpOp::Eq => IntCC::Equal,
                        CmpOp::Ne => IntCC::NotEqual,
                        CmpOp::Lt => IntCC::SignedLessThan,
                        CmpOp::Le => IntCC::SignedLessThanOrEqual,
                        CmpOp::Gt => IntCC::SignedGreaterThan,
                        CmpOp::Ge => IntCC::SignedGreaterThanOrEqual,
                    };
                    self.fb.ins().icmp(cc, x, y)
                }
            }
            Expr::Select(c, a, b) => {
                let ct = self.ty(c)?;
                let (m, x, y) = (self.expr(c)?, self.expr(a)?, self.expr(b)?);
                if ct.lanes > 1 {
                    self.bitselect(m, x, y, t)
                } else {
                    self.fb.ins().select(m, x, y)
                }
            }
            Expr::Cast(s, a) => {
                let from = self.ty(a)?.elem;
                let x = self.expr(a)?;
                let to = cl_type(Ty::scalar(*s));
                match (from, *s) {
                    (f, s) if f == s => x,
                    (Scalar::I32, Scalar::I64) => self.fb.ins().sextend(to, x),
                    (Scalar::I64, Scalar::I32) => self.fb.ins().ireduce(to, x),
                    (Scalar::I32 | Scalar::I64, Scalar::F32) => self.fb.ins().fcvt_from_sint(to, x),
                    (Scalar::F32, Scalar::I32 | Scalar::I64) => self.fb.ins().fcvt_to_sint_sat(to, x),
                    (f, s) => return Err(unsupported(self.k, format!("a cast from {f:?} to {s:?}"))),
                }
            }
            Expr::Splat(_, a) => {
                let x = self.expr(a)?;
                self.fb.ins().splat(cl_type(t), x)
            }
            Expr::Extract(a, i) => {
                let x = self.expr(a)?;
                self.fb.ins().extractlane(x, *i)
            }
            Expr::HSums(vs) => {
                // The steps of `kir::hsums` on f32x4 (bytes of both
                // vectors picked by `shuffle`).
                let mut cur = vs.iter().map(|v| self.expr(v)).collect::<Result<Vec<_>, _>>()?;
                if cur.len() != 4 {
                    return Err(unsupported(self.k, format!("lane sums of {} vectors", cur.len())));
                }
                let le = MemFlagsData::new().with_endianness(Endianness::Little);
                let mut width = 4;
                while cur.len() > 1 {
                    let (p, q) = kir::hsums_step(4, width);
                    let bytes = |lanes: &[u32]| -> Vec<u8> {
                        lanes.iter().flat_map(|&l| (0..4).map(move |b| (4 * l + b) as u8)).collect()
                    };
                    let (pm, qm) = (bytes(&p), bytes(&q));
                    let mut next = vec![];
                    for pair in cur.chunks(2) {
                        let x = self.fb.ins().bitcast(types::I8X16, le, pair[0]);
                        let y = self.fb.ins().bitcast(types::I8X16, le, pair[1]);
                        let pmask = self.fb.func.dfg.immediates.push(pm.clone().into());
                        let qmask = self.fb.func.dfg.immediates.push(qm.clone().into());
                        let lo = self.fb.ins().shuffle(x, y, pmask);
                        let hi = self.fb.ins().shuffle(x, y, qmask);
                        let lo = self.fb.ins().bitcast(types::F32X4, le, lo);
                        let hi = self.fb.ins().bitcast(types::F32X4, le, hi);
                        next.push(self.fb.ins().fadd(lo, hi));
                    }
                    cur = next;
                    width /= 2;
                }
                cur[0]
            }
            Expr::HReduce(op, a) => {
                let at = self.ty(a)?;
                let x = self.expr(a)?;
                // Left to right, as the interpreter does.
                let mut acc = self.fb.ins().extractlane(x, 0);
                for i in 1..at.lanes {
                    let y = self.fb.ins().extractlane(x, i);
                    acc = match op {
                        RedOp::Add => self.fb.ins().fadd(acc, y),
                        RedOp::Max => self.fb.ins().fmax(acc, y),
                        RedOp::Min => self.fb.ins().fmin(acc, y),
                    };
                }
                acc
            }
            Expr::Load { buf, index, lanes, pick } => {
                let (addr, disp) = self.addr(*buf, index)?;
                let flags = if self.k.buf(*buf).access == kir::Access::Read { pure_load_flags() } else { mem_flags() };
                let elem = self.k.buf(*buf).elem;
                if *pick != kir::Pick::All {
                    self.load_pairs(elem, flags, addr, disp, *lanes, *pick)?
                } else if elem.is_narrow_float() {
                    self.load_narrow(elem, flags, addr, disp, *lanes)?
                } else {
                    self.fb.ins().load(cl_type(t), flags, addr, disp)
                }
            }
            Expr::Special(_) => return Err(unsupported(self.k, "thread and block indices".into())),
        })
    }

    /// `lanes` values of a `BF16`/`F16` buffer as `f32` lanes. The loads
    /// are plain `load`s (an `i16`, or the 4 lanes' 8 bytes as an `i64`
    /// moved into a vector), which Cranelift treats as pure when they read
    /// a read-only buffer and so places at their use; a widening load
    /// (`uload16x4`) would stay in program order, and an unrolled loop's
    /// loads would then all be issued first and spill registers. Each
    /// 16-bit value is put in the top half of a 32-bit lane (for vectors by
    /// interleaving zero words below them, `punpcklwd`), which for bf16 is
    /// already its f32; see [`Lower::widen_bits`] for f16.
    fn load_narrow(
        &mut self,
        elem: Scalar,
        flags: MemFlagsData,
        addr: Value,
        disp: i32,
        lanes: u8,
    ) -> Result<Value, CompileError> {
        let le = MemFlagsData::new().with_endianness(Endianness::Little);
        let hi = match lanes {
            1 => {
                let h = self.fb.ins().load(types::I16, flags, addr, disp);
                let h = self.fb.ins().uextend(types::I32, h);
                self.fb.ins().ishl_imm_s(h, 16)
            }
            4 => {
                let q = self.fb.ins().load(types::I64, flags, addr, disp);
                let v = self.fb.ins().scalar_to_vector(types::I64X2, q);
                let v = self.fb.ins().bitcast(types::I8X16, le, v);
                let zero = self.fb.func.dfg.constants.insert(vec![0u8; 16].into());
                let zero = self.fb.ins().vconst(types::I8X16, zero);
                // Byte i of the result: a zero word, then word i of `v`.
                let mask: Vec<u8> = (0..4u8).flat_map(|i| [2 * i, 2 * i + 1, 16 + 2 * i, 17 + 2 * i]).collect();
                let mask = self.fb.func.dfg.immediates.push(mask.into());
                let w = self.fb.ins().shuffle(zero, v, mask);
                self.fb.ins().bitcast(types::I32X4, le, w)
            }
            n => return Err(unsupported(self.k, format!("a {n}-lane load from a {elem:?} buffer"))),
        };
        Ok(self.widen_bits(elem, hi, lanes))
    }

    /// The even or odd elements (`pick`) of `2 * lanes` of a `BF16`/`F16`
    /// buffer as `f32` lanes: the pairs are loaded as 32-bit words, and
    /// each word's low half is shifted into its top half (even) or its
    /// high half kept by a mask (odd), which for bf16 is already its f32.
    fn load_pairs(
        &mut self,
        elem: Scalar,
        flags: MemFlagsData,
        addr: Value,
        disp: i32,
        lanes: u8,
        pick: kir::Pick,
    ) -> Result<Value, CompileError> {
        let ty = match lanes {
            1 => types::I32,
            4 => types::I32X4,
            n => return Err(unsupported(self.k, format!("a {n}-lane load of pairs from a {elem:?} buffer"))),
        };
        let words = self.fb.ins().load(ty, flags, addr, disp);
        let hi = if pick == kir::Pick::Even {
            self.fb.ins().ishl_imm_s(words, 16)
        } else {
            let mask = self.iconst32(0xffff_0000, lanes);
            self.fb.ins().band(words, mask)
        };
        Ok(self.widen_bits(elem, hi, lanes))
    }

    /// Stores `f32` lanes into a `BF16`/`F16` buffer, rounded to nearest
    /// even (see [`Lower::narrow_bits`]); 4 lanes are packed to 16 bits
    /// (`packusdw`, exact as every lane is in 0..=0xffff) and stored as
    /// one 8-byte value.
    fn store_narrow(&mut self, elem: Scalar, x: Value, lanes: u8, addr: Value, disp: i32) -> Result<(), CompileError> {
        let bits = self.narrow_bits(elem, x, lanes);
        match lanes {
            1 => {
                self.fb.ins().istore16(mem_flags(), bits, addr, disp);
            }
            4 => {
                let packed = self.fb.ins().unarrow(bits, bits);
                let le = MemFlagsData::new().with_endianness(Endianness::Little);
                let q = self.fb.ins().bitcast(types::I64X2, le, packed);
                let lo = self.fb.ins().extractlane(q, 0);
                self.fb.ins().store(mem_flags(), lo, addr, disp);
            }
            n => return Err(unsupported(self.k, format!("a {n}-lane store into a {elem:?} buffer"))),
        }
        Ok(())
    }

    /// An `i32` constant (as its bit pattern) in every lane.
    fn iconst32(&mut self, x: u32, lanes: u8) -> Value {
        let c = self.fb.ins().iconst(types::I32, x as i64);
        if lanes > 1 {
            self.fb.ins().splat(types::I32.by(lanes as u32).unwrap(), c)
        } else {
            c
        }
    }

    /// Reinterprets `i32` lanes as `f32` lanes or back.
    fn reinterpret(&mut self, x: Value, to: Scalar, lanes: u8) -> Value {
        let ty = cl_type(Ty::scalar(to).with_lanes(lanes));
        self.fb.ins().bitcast(ty, MemFlagsData::new().with_endianness(Endianness::Little), x)
    }

    /// Lanewise `c ? x : y` for a compare result `c` (a lane mask for vectors).
    fn pick(&mut self, c: Value, x: Value, y: Value, lanes: u8) -> Value {
        if lanes > 1 {
            let t = self.fb.func.dfg.value_type(x);
            let m = if self.fb.func.dfg.value_type(c) != t {
                self.fb.ins().bitcast(t, MemFlagsData::new().with_endianness(Endianness::Little), c)
            } else {
                c
            };
            self.fb.ins().bitselect(m, x, y)
        } else {
            self.fb.ins().select(c, x, y)
        }
    }

    /// Exact `f32` lanes of 16-bit patterns held in the top half of `i32`
    /// lanes `x` (low half zero). That is a bf16's f32. f16 needs no F16C:
    /// the exponent and mantissa shifted into f32 position and multiplied
    /// by 2^112 rebias normals and renormalise subnormals exactly (ryg's
    /// `half_to_float` with a magic multiply); a product >= 2^16 was an
    /// infinity or NaN, whose exponent is then set to all ones. A NaN stays
    /// a NaN with its payload, but unlike the `half` crate a signalling NaN
    /// is not quieted (that would cost a compare and select per load).
    fn widen_bits(&mut self, elem: Scalar, x: Value, lanes: u8) -> Value {
        if elem == Scalar::BF16 {
            return self.reinterpret(x, Scalar::F32, lanes);
        }
        let sm = self.iconst32(0x8000_0000, lanes);
        let sign = self.fb.ins().band(x, sm);
        let em = self.fb.ins().bxor(x, sign);
        let em = self.fb.ins().ushr_imm_s(em, 3);
        let f = self.reinterpret(em, Scalar::F32, lanes);
        let magic = self.fconst(f32::from_bits(0x7780_0000), lanes); // 2^112
        let f = self.fb.ins().fmul(f, magic);
        let big = self.fconst(65536.0, lanes);
        let infnan = self.fb.ins().fcmp(FloatCC::GreaterThanOrEqual, f, big);
        let exp = self.iconst32(0x7f80_0000, lanes);
        let exp = if lanes > 1 {
            // The compare's lane mask selects the exponent bits.
            self.fb.ins().band(infnan, exp)
        } else {
            let none = self.iconst32(0, 1);
            self.fb.ins().select(infnan, exp, none)
        };
        let bits = self.reinterpret(f, Scalar::I32, lanes);
        let bits = self.fb.ins().bor(bits, exp);
        let bits = self.fb.ins().bor(bits, sign);
        self.reinterpret(bits, Scalar::F32, lanes)
    }

    /// The 16-bit patterns (in `i32` lanes) of `f32` lanes `x` rounded to
    /// nearest even, as the `half` crate rounds: NaN stays NaN (quieted,
    /// payload truncated), overflow gives infinity, f16 subnormals are
    /// rounded by an f32 addition (ryg's `float_to_half_fast3_rtne`).
    fn narrow_bits(&mut self, elem: Scalar, x: Value, lanes: u8) -> Value {
        let u = self.reinterpret(x, Scalar::I32, lanes);
        let is_nan = self.fb.ins().fcmp(FloatCC::Unordered, x, x);
        if elem == Scalar::BF16 {
            // u + 0x7fff + (bit 16 of u), then the top half: ties to even.
            let hi = self.fb.ins().ushr_imm_s(u, 16);
            let one = self.iconst32(1, lanes);
            let odd = self.fb.ins().band(hi, one);
            let bias = self.iconst32(0x7fff, lanes);
            let r = self.fb.ins().iadd(u, bias);
            let r = self.fb.ins().iadd(r, odd);
            let r = self.fb.ins().ushr_imm_s(r, 16);
            let q = self.iconst32(0x40, lanes);
            let nan = self.fb.ins().bor(hi, q);
            return self.pick(is_nan, nan, r, lanes);
        }
        let sm = self.iconst32(0x8000_0000, lanes);
        let sign = self.fb.ins().band(u, sm);
        let a = self.fb.ins().bxor(u, sign);
        // Normal results: rebias the exponent, round the 13 dropped bits.
        let a13 = self.fb.ins().ushr_imm_s(a, 13);
        let one = self.iconst32(1, lanes);
        let odd = self.fb.ins().band(a13, one);
        let bias = self.iconst32(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff), lanes);
        let r = self.fb.ins().iadd(a, bias);
        let r = self.fb.ins().iadd(r, odd);
        let normal = self.fb.ins().ushr_imm_s(r, 13);
        // Subnormal results: adding 0.5 aligns the 10 mantissa bits at the
        // bottom, rounded by the float addition.
        let af = self.reinterpret(a, Scalar::F32, lanes);
        let half = self.fconst(0.5, lanes);
        let s = self.fb.ins().fadd(af, half);
        let s = self.reinterpret(s, Scalar::I32, lanes);
        let hb = self.iconst32(0x3f00_0000, lanes);
        let sub = self.fb.ins().isub(s, hb);
        let min_normal = self.iconst32(113 << 23, lanes);
        let is_sub = self.fb.ins().icmp(IntCC::SignedLessThan, a, min_normal);
        let r = self.pick(is_sub, sub, normal, lanes);
        let f16_max = self.iconst32((127 + 16) << 23, lanes);
        let is_inf = self.fb.ins().icmp(IntCC::SignedGreaterThanOrEqual, a, f16_max);
        let inf = self.iconst32(0x7c00, lanes);
        let r = self.pick(is_inf, inf, r, lanes);
        let mant = self.iconst32(0x007f_ffff, lanes);
        let payload = self.fb.ins().band(a, mant);
        let payload = self.fb.ins().ushr_imm_s(payload, 13);
        let qnan = self.iconst32(0x7e00, lanes);
        let nan = self.fb.ins().bor(payload, qnan);
        let r = self.pick(is_nan, nan, r, lanes);
        let sign = self.fb.ins().ushr_imm_s(sign, 16);
        self.fb.ins().bor(r, sign)
    }

    /// Lanewise `m ? x : y` for a lane mask `m` (from a vector compare).
    fn bitselect(&mut self, m: Value, x: Value, y: Value, t: Ty) -> Value {
        let ty = cl_type(t);
        let m = if self.fb.func.dfg.value_type(m) != ty {
            self.fb.ins().bitcast(ty, MemFlagsData::new().with_endianness(Endianness::Little), m)
        } else {
            m
        };
        self.fb.ins().bitselect(m, x, y)
    }

    fn select_lanes(&mut self, c: Value, x: Value, y: Value, lanes: u8) -> Value {
        if lanes > 1 {
            self.bitselect(c, x, y, Ty::F32.with_lanes(lanes))
        } else {
            self.fb.ins().select(c, x, y)
        }
    }

    /// Cephes `expf`: `2^n * p(r)` with `n = round(x / ln 2)`.
    #[allow(clippy::excessive_precision)] // Cephes's constants, as published.
    fn exp(&mut self, x0: Value, lanes: u8) -> Value {
        let hi = self.fconst(88.0, lanes);
        let lo = self.fconst(-87.336_55, lanes);
        let x = self.fb.ins().fmin(x0, hi);
        let x = self.fb.ins().fmax(x, lo);
        let log2e = self.fconst(std::f32::consts::LOG2_E, lanes);
        let t = self.fb.ins().fmul(x, log2e);
        let n = self.fb.ins().nearest(t);
        let c1 = self.fconst(-0.693_359_4, lanes);
        let c2 = self.fconst(2.121_944_4e-4, lanes);
        let r = self.fb.ins().fma(n, c1, x);
        let r = self.fb.ins().fma(n, c2, r);
        let coeffs = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
        let mut p = self.fconst(coeffs[0], lanes);
        for c in &coeffs[1..] {
            let c = self.fconst(*c, lanes);
            p = self.fb.ins().fma(p, r, c);
        }
        let r2 = self.fb.ins().fmul(r, r);
        let p = self.fb.ins().fma(p, r2, r);
        let one = self.fconst(1.0, lanes);
        let p = self.fb.ins().fadd(p, one);
        // 2^n built in the exponent bits: (n + 127) << 23.
        let ity = if lanes > 1 { types::I32.by(lanes as u32).unwrap() } else { types::I32 };
        let ni = self.fb.ins().fcvt_to_sint_sat(ity, n);
        let bias = self.fb.ins().iconst(types::I32, 127);
        let bias = if lanes > 1 { self.fb.ins().splat(ity, bias) } else { bias };
        let e = self.fb.ins().iadd(ni, bias);
        let e = self.fb.ins().ishl_imm_s(e, 23);
        let fty = if lanes > 1 { types::F32.by(lanes as u32).unwrap() } else { types::F32 };
        let flags = MemFlagsData::new().with_endianness(Endianness::Little);
        let scale = self.fb.ins().bitcast(fty, flags, e);
        let y = self.fb.ins().fmul(p, scale);
        // Below the clamp the true value is (sub)normal-tiny; return 0.
        let under = self.fb.ins().fcmp(FloatCC::LessThan, x0, lo);
        let zero = self.fconst(0.0, lanes);
        self.select_lanes(under, zero, y, lanes)
    }

    /// Cephes `tanhf`: an odd polynomial below |x| = 0.625, where
    /// `1 - 2 / (exp(2|x|) + 1)` would lose relative precision, that formula above.
    #[allow(clippy::excessive_precision)] // Cephes's constants, as published.
    fn tanh(&mut self, x: Value, lanes: u8) -> Value {
        let z = self.fb.ins().fmul(x, x);
        let coeffs = [-5.704_988_7e-3, 2.063_908_9e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328_2e-1];
        let mut p = self.fconst(coeffs[0], lanes);
        for c in &coeffs[1..] {
            let c = self.fconst(*c, lanes);
            p = self.fb.ins().fma(p, z, c);
        }
        let pz = self.fb.ins().fmul(p, z);
        let small = self.fb.ins().fma(pz, x, x);
        let ax = self.fb.ins().fabs(x);
        let two_ax = self.fb.ins().fadd(ax, ax);
        let e = self.exp(two_ax, lanes);
        let one = self.fconst(1.0, lanes);
        let two = self.fconst(2.0, lanes);
        let d = self.fb.ins().fadd(e, one);
        let q = self.fb.ins().fdiv(two, d);
        let big = self.fb.ins().fsub(one, q);
        // `big` is nonnegative, so xor-ing in the sign bit of x is copysign
        // (Cranelift has no vector fcopysign on x86-64).
        let big = if lanes > 1 {
            let mask = self.fconst(-0.0, lanes);
            let sign = self.fb.ins().band(x, mask);
            self.fb.ins().bxor(big, sign)
        } else {
            self.fb.ins().fcopysign(big, x)
        };
        let cut = self.fconst(0.625, lanes);
        let is_small = self.fb.ins().fcmp(FloatCC::LessThan, ax, cut);
        self.select_lanes(is_small, small, big, lanes)
    }
}

/// Buffers are not necessarily vector-aligned, so the flags say `notrap`
/// only (an `aligned` flag would let x86 fold loads into SSE operands that
/// fault when unaligned).
/// Loads from buffers the kernel never writes are pure for Cranelift
/// (`readonly`, `notrap`, `can_move`): they are placed at their use, not in
/// program order ahead of every pure instruction, which for register-tiled
/// loops otherwise puts all of an iteration's loads first and spills the
/// accumulators. `can_move` lets Cranelift hoist a loop-invariant load out
/// of a loop (even one that runs zero times) and past an `if` inside that
/// loop; that is sound because the kernel's read-only buffers are valid for
/// the whole call and are never written by it, and templates never guard an
/// out-of-bounds, loop-invariant load by a condition.
fn pure_load_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly().with_can_move()
}

fn mem_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}
