//! Widening of `Vectorized` reduction loops to the host's vector width.
//!
//! KIR templates are written with `f32x4` (what Cranelift can lower), and
//! LLVM's loop vectorizer does not widen loops whose body already computes
//! on vectors. So a `Vectorized(L)` loop whose body is a reduction (the
//! dot products of a GEMM tile, the sum of squares of a norm, the maximum
//! of a softmax row) is lowered `factor` times wider: each iteration of the
//! wide loop does `factor` consecutive iterations at once in vectors of
//! `L * factor` lanes, each accumulator keeps `factor` partial results side
//! by side (the extra lanes start at the reduction's identity), they are
//! folded back to `L` lanes after the loop, and the iterations left over
//! (fewer than `factor`) run at width `L`. That changes only the order in
//! which a sum's terms are added, as the templates' own `ksplit` does.
//!
//! A loop is widened only when that is certainly equivalent otherwise:
//! - its step equals its width `L`, and its body is assignments only (no
//!   stores, loops or branches), each variable assigned once;
//! - every vector in it has `L` lanes; a vector load reads `L` elements at
//!   `var + (invariant)`, so the wide load reads the next iterations'
//!   elements too;
//! - every scalar in it is loop-invariant (no use of the loop variable or
//!   of a variable the body assigns), except in those load indices;
//! - an assigned variable is either a temporary (assigned before any read
//!   in the body, never read outside the loop) or an accumulator `x` with
//!   the single update `x = fma(a, b, x)`, `x + e`, `max(x, e)` or
//!   `min(x, e)` and no other read in the body.

use crate::kir::{BinOp, Expr, Kernel, Loop, LoopKind, Pick, RedOp, Scalar, Stmt, Ty, Var};
use std::sync::OnceLock;

/// How to widen one loop.
pub(super) struct Plan {
    pub lanes: u8,
    pub factor: u8,
    pub temps: Vec<Var>,
    pub accs: Vec<(Var, RedOp)>,
}

/// How many 128-bit vectors the host's widest vector holds: 4 with
/// AVX-512, 2 with AVX, else 1 (no widening). `SMELT_LLVM_WIDEN` (1, 2, 4)
/// overrides it, for experiments.
pub(super) fn host_factor() -> u8 {
    static FACTOR: OnceLock<u8> = OnceLock::new();
    *FACTOR.get_or_init(|| {
        if let Some(f) = std::env::var("SMELT_LLVM_WIDEN").ok().and_then(|s| s.parse::<u8>().ok()) {
            return f.clamp(1, 8);
        }
        let features = inkwell::targets::TargetMachine::get_host_cpu_features().to_string();
        let has = |f: &str| features.split(',').any(|x| x == f);
        if has("+avx512f") {
            4
        } else if has("+avx") {
            2
        } else {
            1
        }
    })
}

/// The plan for widening `l` by `factor`, if it qualifies.
pub(super) fn plan(k: &Kernel, l: &Loop, factor: u8) -> Option<Plan> {
    let LoopKind::Vectorized(lanes) = l.kind else { return None };
    if factor < 2 || !factor.is_power_of_two() || lanes < 2 || l.step != lanes as i64 {
        return None;
    }
    let mut assigned = vec![];
    for s in &l.body {
        match s {
            Stmt::Assign(v, _) if !assigned.contains(v) && *v != l.var => assigned.push(*v),
            _ => return None,
        }
    }
    let c = Check { k, p: l.var, lanes, assigned: &assigned };
    let mut temps: Vec<Var> = vec![];
    let mut accs = vec![];
    for s in &l.body {
        let Stmt::Assign(v, e) = s else { return None };
        let vt = k.var(*v).ty;
        if vt.lanes != lanes {
            return None;
        }
        if let Some((op, rest)) = acc_form(e, *v) {
            if vt != Ty::F32.with_lanes(lanes) || !rest.iter().all(|r| c.lanewise(r, &temps)) {
                return None;
            }
            // The update must be the accumulator's only read in the body.
            let mut reads = 0;
            for s in &l.body {
                if let Stmt::Assign(_, e) = s {
                    e.visit(&mut |x| reads += matches!(x, Expr::Var(u) if u == v) as usize);
                }
            }
            if reads != 1 {
                return None;
            }
            accs.push((*v, op));
        } else {
            if !c.lanewise(e, &temps) || reads_outside(k, l, *v) {
                return None;
            }
            temps.push(*v);
        }
    }
    // Accumulators are not temporaries: a temporary may not read one.
    if accs.is_empty() {
        return None;
    }
    Some(Plan { lanes, factor, temps, accs })
}

/// `x = fma(a, b, x)`, `x + e`, `e + x`, `max(x, e)`, ...: the reduction
/// and the other operands.
fn acc_form(e: &Expr, x: Var) -> Option<(RedOp, Vec<&Expr>)> {
    let is_x = |e: &Expr| matches!(e, Expr::Var(v) if *v == x);
    match e {
        Expr::Fma(a, b, c) if is_x(c) => Some((RedOp::Add, vec![&**a, &**b])),
        Expr::Bin(op @ (BinOp::Add | BinOp::Max | BinOp::Min), a, b) => {
            let red = match op {
                BinOp::Add => RedOp::Add,
                BinOp::Max => RedOp::Max,
                _ => RedOp::Min,
            };
            if is_x(a) {
                Some((red, vec![&**b]))
            } else if is_x(b) {
                Some((red, vec![&**a]))
            } else {
                None
            }
        }
        _ => None,
    }
}

struct Check<'a> {
    k: &'a Kernel,
    p: Var,
    lanes: u8,
    assigned: &'a [Var],
}

impl Check<'_> {
    /// Neither the loop variable nor a variable the body assigns.
    fn invariant(&self, e: &Expr) -> bool {
        let mut ok = true;
        e.visit(&mut |x| match x {
            Expr::Var(v) if *v == self.p || self.assigned.contains(v) => ok = false,
            Expr::Special(_) => ok = false,
            _ => {}
        });
        ok
    }

    /// The coefficient of the loop variable in `e` when `e` is the loop
    /// variable plus and minus invariant terms.
    fn coef(&self, e: &Expr) -> Option<i64> {
        match e {
            Expr::Var(v) if *v == self.p => Some(1),
            Expr::Bin(BinOp::Add, a, b) => Some(self.coef(a)? + self.coef(b)?),
            Expr::Bin(BinOp::Sub, a, b) => Some(self.coef(a)? - self.coef(b)?),
            e if self.invariant(e) => Some(0),
            _ => None,
        }
    }

    /// Whether `e` computes lane by lane on `lanes`-wide vectors (see the
    /// module docs); `temps` are the temporaries assigned so far.
    fn lanewise(&self, e: &Expr, temps: &[Var]) -> bool {
        let Ok(t) = self.k.type_of(e) else { return false };
        if t.lanes == 1 {
            return self.invariant(e);
        }
        if t.lanes != self.lanes {
            return false;
        }
        if t.elem != Scalar::F32 && t.elem != Scalar::Bool {
            return false;
        }
        let go = |e: &Expr| self.lanewise(e, temps);
        match e {
            Expr::Var(v) => temps.contains(v),
            // Pairs read twice the elements per lane, which a wider load
            // would not lay out lane by lane.
            Expr::Load { index, lanes, pick: Pick::All, .. } => *lanes == self.lanes && self.coef(index) == Some(1),
            Expr::Splat(_, a) => self.invariant(a),
            Expr::Un(_, a) => go(a),
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => go(a) && go(b),
            Expr::Fma(a, b, c) | Expr::Select(a, b, c) => go(a) && go(b) && go(c),
            _ => false,
        }
    }
}

/// Whether any expression of `k` outside the loop `l` reads `v`.
fn reads_outside(k: &Kernel, l: &Loop, v: Var) -> bool {
    fn expr(e: &Expr, v: Var) -> bool {
        let mut found = false;
        e.visit(&mut |x| found |= matches!(x, Expr::Var(u) if *u == v));
        found
    }
    fn stmts(s: &[Stmt], l: &Loop, v: Var) -> bool {
        s.iter().any(|s| match s {
            Stmt::For(x) if std::ptr::eq(x, l) => false,
            Stmt::For(x) => expr(&x.start, v) || expr(&x.end, v) || stmts(&x.body, l, v),
            Stmt::Assign(_, e) => expr(e, v),
            Stmt::Store { index, value, .. } => expr(index, v) || expr(value, v),
            Stmt::If { cond, then, els } => expr(cond, v) || stmts(then, l, v) || stmts(els, l, v),
            Stmt::Barrier => false,
            Stmt::Shuffle { value, arg, .. } => expr(value, v) || expr(arg, v),
            Stmt::Mma(m) => m.exprs().any(|e| expr(e, v)),
            Stmt::Prefetch { index, .. } => expr(index, v),
            Stmt::Wgmma(w) => w.d.contains(&v) || w.exprs().any(|e| expr(e, v)),
            Stmt::Async(_) => false,
        })
    }
    stmts(&k.body, l, v)
}
