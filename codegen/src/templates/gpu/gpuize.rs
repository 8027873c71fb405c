//! Any CPU kernel as a GPU kernel: the iterations of the kernel's one
//! top-level `Parallel` loop (see `select`'s `Instance` contract) are spread
//! over GPU threads, so every op the CPU selects a kernel for also runs on a
//! GPU, computing every element with the very same expressions (results are
//! bitwise those of the CPU kernel).
//!
//! Two mappings:
//! - **one thread per iteration** (group 1): thread `blockIdx.x * block +
//!   threadIdx.x` runs iteration number that of the loop, if it exists.
//! - **a group of `G` threads per iteration** (`G` a power of two up to 32):
//!   the group runs the iteration's scalar code redundantly, and every loop
//!   that stores is split over the group (thread `g` takes the loop's
//!   iterations `g, g + G, ...`). This is what makes the CPU kernels that
//!   walk a whole row or a 1024-element chunk per iteration (elementwise
//!   maps, copies, concat, gather, kv_append) coalesced and `G` times more
//!   parallel. It applies only when it provably keeps the CPU semantics:
//!   every store of the iteration sits in such a loop (reached through `if`s
//!   only, not nested in another loop), no buffer the iteration stores is
//!   also loaded by it, and every variable such a loop assigns is private to
//!   one of its iterations (defined before use in the loop body, used nowhere
//!   else). It relies on one more property of the CPU templates: an
//!   iteration stores each element at most once. Reductions, cumsum, softmax
//!   and norms (loop-carried accumulators) keep one thread per iteration.
//!
//! The grid is `ceil(iterations / (block / G))` blocks: the loop bounds with
//! the `let` values computed before the loop inlined, which must come out as
//! `i64` expressions over constants and scalar parameters using `+ - *` and
//! division by a positive constant (what the scheduler can turn into a
//! symbolic dim). A zero-iteration launch has a zero grid; callers skip it.

use crate::kir::{BinOp, Expr, GpuLaunch, Kernel, Loop, LoopKind, Special, Stmt, Ty, Var, VarDecl};
use crate::templates::sym;
use std::collections::HashMap;

/// How [`gpuize_with`] maps loop iterations to threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuizeOptions {
    /// Threads per block (1..=1024, a multiple of the group).
    pub block: u32,
    /// Threads per loop iteration: `Some(1)` for one thread per iteration,
    /// `Some(g)` to require groups of `g` (a power of two up to 32), `None`
    /// to use groups of up to 32 where they apply (fewer when the split
    /// loops have a small constant trip count) and one thread otherwise.
    pub group: Option<u32>,
}

impl Default for GpuizeOptions {
    fn default() -> Self {
        GpuizeOptions { block: 256, group: None }
    }
}

/// Why a kernel has no GPU form.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("cannot run kernel `{kernel}` on a GPU: {why}")]
pub struct GpuizeError {
    pub kernel: String,
    pub why: String,
}

/// [`gpuize_with`] with the default options (blocks of 256 threads, groups
/// where they apply).
pub fn gpuize(k: &Kernel) -> Result<Kernel, GpuizeError> {
    gpuize_with(k, GpuizeOptions::default())
}

/// The GPU form of the CPU kernel `k` (same buffers and scalar parameters,
/// so an `Instance` keeps its meaning). Named `<k.name>_gpu` (plus the block
/// and group when not the defaults), so distinct kernels keep distinct names.
pub fn gpuize_with(k: &Kernel, opts: GpuizeOptions) -> Result<Kernel, GpuizeError> {
    let fail = |why: String| GpuizeError { kernel: k.name.clone(), why };
    if k.gpu.is_some() || k.uses_gpu_features() {
        return Err(fail("it is already a GPU kernel".into()));
    }
    let block = opts.block;
    if !(1..=1024).contains(&block) {
        return Err(fail(format!("a block of {block} threads (1..=1024 allowed)")));
    }
    if let Some(g) = opts.group {
        if !g.is_power_of_two() || g > 32 || !block.is_multiple_of(g) {
            return Err(fail(format!("a group of {g} threads (a power of two up to 32 dividing the block {block})")));
        }
    }
    // The shape the contract promises: lets, one parallel loop, nothing that
    // stores after it.
    let parallel: Vec<usize> =
        (0..k.body.len()).filter(|&i| matches!(&k.body[i], Stmt::For(l) if l.kind == LoopKind::Parallel)).collect();
    let [p] = parallel[..] else {
        return Err(fail(format!("expected one top-level parallel loop, found {}", parallel.len())));
    };
    let Stmt::For(lp) = &k.body[p] else { unreachable!() };
    if let Some(s) = k.body[..p].iter().find(|s| !matches!(s, Stmt::Assign(..))) {
        let what = match s {
            Stmt::Store { .. } => "a store",
            Stmt::For(_) => "a loop",
            Stmt::If { .. } => "an `if`",
            _ => "a barrier or shuffle",
        };
        return Err(fail(format!("{what} before the parallel loop (only `let`s may precede it)")));
    }
    if k.body[p + 1..].iter().any(stores) {
        return Err(fail("a store after the parallel loop".into()));
    }

    // The iteration count over scalar parameters, for the grid.
    let mut env: HashMap<Var, Expr> = HashMap::new();
    for s in &k.body[..p] {
        if let Stmt::Assign(v, e) = s {
            let e = subst(e, &env);
            env.insert(*v, e);
        }
    }
    let (start, end) = (subst(&lp.start, &env), subst(&lp.end, &env));
    let span = sym::sub(end, start);
    let iters = if lp.step == 1 { span } else { sym::div(sym::add(span, Expr::i64(lp.step - 1)), Expr::i64(lp.step)) };
    if let Err(bad) = grid_expressible(&iters, &k.scalars) {
        return Err(fail(format!(
            "the parallel loop's iteration count {} is not an expression of the scalar parameters with + - * and \
             division by a positive constant ({bad})",
            show(k, &iters)
        )));
    }

    // Threads per iteration.
    let mut out = k.clone();
    let lane_var = Var(out.vars.len() as u32);
    out.vars.push(VarDecl { name: "lane".into(), ty: Ty::I64 });
    let task_var = Var(out.vars.len() as u32);
    out.vars.push(VarDecl { name: "task".into(), ty: Ty::I64 });
    let want = opts.group.unwrap_or(32).min(block);
    let split = if want > 1 { share(k, &lp.body, Expr::Var(lane_var), want as i64) } else { None };
    let (group, body) = match split {
        Some((body, trips)) => {
            let g = match (opts.group, trips) {
                (None, Some(t)) => (t.max(1) as u32).next_power_of_two().min(want),
                _ => want,
            };
            // The split loops were built for `want` threads; rebuild for `g`.
            let body = match g {
                1 => lp.body.clone(),
                g if g == want => body,
                g => share(k, &lp.body, Expr::Var(lane_var), g as i64).unwrap().0,
            };
            (g, body)
        }
        None if opts.group.is_some_and(|g| g > 1) => {
            return Err(fail(format!(
                "its parallel iterations cannot be shared by {want} threads (a store outside a loop, a buffer both \
                 stored and loaded, or a loop-carried variable)"
            )))
        }
        None => (1, lp.body.clone()),
    };
    let body = serial(body);

    let tid = Expr::Special(Special::ThreadIdx(0));
    let bid = Expr::Special(Special::BlockIdx(0));
    let per_block = (block / group) as usize;
    let mut stmts: Vec<Stmt> = k.body[..p].to_vec();
    if group == 1 {
        stmts.push(Stmt::Assign(task_var, bid * Expr::idx(per_block) + tid));
    } else {
        let g = Expr::idx(group as usize);
        stmts.push(Stmt::Assign(task_var, bid * Expr::idx(per_block) + tid.clone() / g.clone()));
        stmts.push(Stmt::Assign(lane_var, tid % g));
    }
    stmts.push(Stmt::Assign(lp.var, lp.start.clone() + Expr::Var(task_var) * Expr::i64(lp.step)));
    stmts.push(Stmt::If { cond: Expr::Var(lp.var).lt(lp.end.clone()), then: body, els: vec![] });
    stmts.extend(k.body[p + 1..].iter().cloned());
    out.body = stmts;
    out.gpu = Some(GpuLaunch {
        block: [block, 1, 1],
        grid: [sym::ceil_div(iters, per_block), Expr::i64(1), Expr::i64(1)],
        aligned_vectors: false,
        min_blocks_per_sm: None,
    });
    out.name = if opts == GpuizeOptions::default() {
        format!("{}_gpu", k.name)
    } else {
        format!("{}_gpu{block}x{}", k.name, opts.group.map_or("a".to_string(), |g| g.to_string()))
    };
    out.verify().map_err(|e| fail(format!("internal error: {e}")))?;
    Ok(out)
}

/// `e` with the variables bound in `env` replaced by their values.
fn subst(e: &Expr, env: &HashMap<Var, Expr>) -> Expr {
    let s = |a: &Expr| Box::new(subst(a, env));
    match e {
        Expr::Var(v) => env.get(v).cloned().unwrap_or_else(|| e.clone()),
        Expr::Un(op, a) => Expr::Un(*op, s(a)),
        Expr::Bin(op, a, b) => Expr::Bin(*op, s(a), s(b)),
        Expr::Fma(a, b, c) => Expr::Fma(s(a), s(b), s(c)),
        Expr::Cmp(op, a, b) => Expr::Cmp(*op, s(a), s(b)),
        Expr::Select(a, b, c) => Expr::Select(s(a), s(b), s(c)),
        Expr::Cast(t, a) => Expr::Cast(*t, s(a)),
        Expr::Splat(n, a) => Expr::Splat(*n, s(a)),
        Expr::Extract(a, i) => Expr::Extract(s(a), *i),
        Expr::HReduce(op, a) => Expr::HReduce(*op, s(a)),
        Expr::HSums(vs) => Expr::HSums(vs.iter().map(|v| *s(v)).collect()),
        Expr::Load { buf, index, lanes, pick } => Expr::Load { buf: *buf, index: s(index), lanes: *lanes, pick: *pick },
        Expr::F32(_) | Expr::Int(..) | Expr::Bool(_) | Expr::Special(_) => e.clone(),
    }
}

/// Whether a grid size uses only integer constants, scalar parameters,
/// `+ - *` and division by a positive constant; else the offending part.
fn grid_expressible(e: &Expr, scalars: &[Var]) -> Result<(), String> {
    match e {
        Expr::Int(..) => Ok(()),
        Expr::Var(v) if scalars.contains(v) => Ok(()),
        Expr::Var(_) => Err("a value computed in the kernel".into()),
        Expr::Bin(BinOp::Add | BinOp::Sub | BinOp::Mul, a, b) => {
            grid_expressible(a, scalars)?;
            grid_expressible(b, scalars)
        }
        Expr::Bin(BinOp::Div, a, b) if matches!(**b, Expr::Int(c, _) if c > 0) => grid_expressible(a, scalars),
        Expr::Bin(op, ..) => Err(format!("{op:?}")),
        Expr::Load { .. } => Err("a load".into()),
        other => Err(format!("{other:?}")),
    }
}

/// An integer expression in the kernel text's style (for messages).
fn show(k: &Kernel, e: &Expr) -> String {
    match e {
        Expr::Int(x, _) => x.to_string(),
        Expr::Var(v) => k.var(*v).name.clone(),
        Expr::Bin(op, a, b) => {
            let o = match op {
                BinOp::Add => "+",
                BinOp::Sub => "-",
                BinOp::Mul => "*",
                BinOp::Div => "/",
                BinOp::Rem => "%",
                BinOp::Max => "max",
                BinOp::Min => "min",
                BinOp::Pow => "pow",
            };
            format!("({} {o} {})", show(k, a), show(k, b))
        }
        other => format!("{other:?}"),
    }
}

fn stores(s: &Stmt) -> bool {
    let mut found = false;
    walk(std::slice::from_ref(s), &mut |s| found |= matches!(s, Stmt::Store { .. }));
    found
}

/// Calls `f` on every statement, nested ones included.
fn walk(stmts: &[Stmt], f: &mut impl FnMut(&Stmt)) {
    for s in stmts {
        f(s);
        match s {
            Stmt::For(l) => walk(&l.body, f),
            Stmt::If { then, els, .. } => {
                walk(then, f);
                walk(els, f);
            }
            _ => {}
        }
    }
}

/// Calls `f` on every expression of the statements, nested ones included.
pub(crate) fn exprs(stmts: &[Stmt], f: &mut impl FnMut(&Expr)) {
    walk(stmts, &mut |s| match s {
        Stmt::Assign(_, e) => e.visit(f),
        Stmt::Store { index, value, .. } => {
            index.visit(f);
            value.visit(f);
        }
        Stmt::For(l) => {
            l.start.visit(f);
            l.end.visit(f);
        }
        Stmt::If { cond, .. } => cond.visit(f),
        Stmt::Shuffle { value, arg, .. } => {
            value.visit(f);
            arg.visit(f);
        }
        Stmt::Mma(m) => m.exprs().for_each(|e| e.visit(f)),
        Stmt::Prefetch { index, .. } => index.visit(f),
        Stmt::Wgmma(w) => w.exprs().for_each(|e| e.visit(f)),
        Stmt::Barrier | Stmt::Async(_) => {}
    })
}

fn expr_mentions(e: &Expr, v: Var) -> bool {
    let mut found = false;
    e.visit(&mut |e| found |= *e == Expr::Var(v));
    found
}

/// Definitions (assignments, loop variables) and uses of `v`.
fn count(stmts: &[Stmt], v: Var) -> usize {
    let mut n = 0;
    walk(stmts, &mut |s| match s {
        Stmt::Assign(x, _) | Stmt::Shuffle { dst: x, .. } if *x == v => n += 1,
        Stmt::Mma(m) => n += m.d.iter().filter(|d| **d == v).count(),
        Stmt::Wgmma(w) => n += w.d.iter().filter(|d| **d == v).count(),
        Stmt::For(l) if l.var == v => n += 1,
        _ => {}
    });
    exprs(stmts, &mut |e| n += (*e == Expr::Var(v)) as usize);
    n
}

fn mentions(s: &Stmt, v: Var) -> bool {
    count(std::slice::from_ref(s), v) > 0
}

/// Whether every path through `stmts` defines `v` before reading it, and
/// nothing after a conditional definition reads it.
fn defined_first(stmts: &[Stmt], v: Var) -> bool {
    let Some(i) = stmts.iter().position(|s| mentions(s, v)) else { return true };
    let later = stmts[i + 1..].iter().any(|s| mentions(s, v));
    match &stmts[i] {
        Stmt::Assign(x, e) if *x == v => !expr_mentions(e, v),
        Stmt::Shuffle { dst, value, arg, .. } if *dst == v => !expr_mentions(value, v) && !expr_mentions(arg, v),
        Stmt::For(l) if l.var == v => !later && !expr_mentions(&l.start, v) && !expr_mentions(&l.end, v),
        Stmt::For(l) => !later && !expr_mentions(&l.start, v) && !expr_mentions(&l.end, v) && defined_first(&l.body, v),
        Stmt::If { cond, then, els } => {
            !later && !expr_mentions(cond, v) && defined_first(then, v) && defined_first(els, v)
        }
        _ => false,
    }
}

/// The iteration body with its storing loops split over `g` threads
/// (`lane` in `0..g`), and the largest constant trip count of a split loop
/// (`None` when one is not constant); `None` when the body cannot be shared
/// (see the module docs).
fn share(k: &Kernel, body: &[Stmt], lane: Expr, g: i64) -> Option<(Vec<Stmt>, Option<i64>)> {
    let mut stored = vec![];
    let mut loaded = vec![];
    walk(body, &mut |s| {
        if let Stmt::Store { buf, .. } = s {
            stored.push(*buf)
        }
    });
    exprs(body, &mut |e| {
        if let Expr::Load { buf, .. } = e {
            loaded.push(*buf)
        }
    });
    if stored.iter().any(|b| loaded.contains(b)) {
        return None;
    }
    let mut trips = Some(0);
    let out = share_stmts(k, body, &lane, g, &mut trips)?;
    Some((out, trips))
}

fn share_stmts(k: &Kernel, stmts: &[Stmt], lane: &Expr, g: i64, trips: &mut Option<i64>) -> Option<Vec<Stmt>> {
    let mut out = vec![];
    for s in stmts {
        out.push(match s {
            Stmt::Store { .. } => return None,
            Stmt::For(l) if stores(s) => {
                if !private(k, l) {
                    return None;
                }
                let trip = match (&l.start, &l.end) {
                    (Expr::Int(a, _), Expr::Int(b, _)) => Some(((b - a).max(0) + l.step - 1) / l.step),
                    _ => None,
                };
                *trips = trips.zip(trip).map(|(a, b)| a.max(b));
                Stmt::For(Loop {
                    var: l.var,
                    start: sym::add(l.start.clone(), sym::mul(lane.clone(), Expr::i64(l.step))),
                    end: l.end.clone(),
                    step: l.step * g,
                    kind: LoopKind::Serial,
                    body: l.body.clone(),
                })
            }
            Stmt::If { cond, then, els } => Stmt::If {
                cond: cond.clone(),
                then: share_stmts(k, then, lane, g, trips)?,
                els: share_stmts(k, els, lane, g, trips)?,
            },
            other => other.clone(),
        });
    }
    Some(out)
}

/// Whether every variable the loop assigns (its own included) is private to
/// one iteration: used nowhere outside the loop body and defined before use.
fn private(k: &Kernel, l: &Loop) -> bool {
    let mut assigned = vec![l.var];
    walk(&l.body, &mut |s| match s {
        Stmt::Assign(v, _) | Stmt::Shuffle { dst: v, .. } => assigned.push(*v),
        Stmt::Mma(m) => assigned.extend(m.d),
        Stmt::Wgmma(w) => assigned.extend(&w.d),
        Stmt::For(inner) => assigned.push(inner.var),
        _ => {}
    });
    assigned.iter().all(|&v| {
        let inside = count(&l.body, v) + (v == l.var) as usize;
        count(&k.body, v) == inside && (v == l.var || defined_first(&l.body, v))
    })
}

/// The statements with every loop made serial (a GPU thread runs its
/// iterations' inner parallel loops itself).
fn serial(stmts: Vec<Stmt>) -> Vec<Stmt> {
    stmts
        .into_iter()
        .map(|s| match s {
            Stmt::For(mut l) => {
                if l.kind == LoopKind::Parallel {
                    l.kind = LoopKind::Serial;
                }
                l.body = serial(l.body);
                Stmt::For(l)
            }
            Stmt::If { cond, then, els } => Stmt::If { cond, then: serial(then), els: serial(els) },
            s => s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::gpu::testing::*;
    use smelt_ir::{DType, Dim, Op, TensorType};

    fn d(s: &str) -> Dim {
        s.parse().unwrap()
    }

    fn i64s(dims: &str) -> TensorType {
        ty(DType::I64, dims)
    }

    /// The node's CPU kernel, gpuized with each option set, gives bitwise
    /// the CPU kernel's results for every symbol binding.
    fn check(op: Op, inputs: &[TensorType], bindings: &[&[(&str, i64)]]) {
        let (inst, _) = cpu_instance(&op, inputs);
        let opts = [GpuizeOptions { block: 64, group: None }, GpuizeOptions { block: 32, group: Some(1) }];
        for o in opts {
            let g = gpuize_with(&inst.kernel, o).unwrap_or_else(|e| panic!("{e}\n{}", inst.kernel));
            for syms in bindings {
                let sc = scalars(&inst, syms);
                let bufs = buffers(&inst.kernel, &sc, 11);
                let want = run_cpu(&inst.kernel, &bufs, &sc, 2);
                let got = run_gpu(&g, &bufs, &sc);
                assert_same(&format!("{op:?} {o:?} {syms:?}\n{g}"), &got, &want);
            }
        }
    }

    const S: &[&[(&str, i64)]] = &[&[("s", 1)], &[("s", 5)]];

    #[test]
    fn gpuize_elementwise() {
        check(Op::Add {}, &[f("s, 7"), f("7")], S);
        check(Op::Mul {}, &[f("2, s, 5"), f("2, 1, 5")], S);
        check(Op::Exp {}, &[f("3, s")], S);
        check(Op::Where {}, &[ty(DType::Bool, "s, 4"), f("s, 4"), f("4")], S);
        check(Op::Cast { to: DType::I64 }, &[f("s, 3")], S);
        check(Op::Lt {}, &[f("s, 3"), f("s, 3")], S);
        check(Op::Add {}, &[i64s("s, 3"), i64s("1")], S);
    }

    #[test]
    fn gpuize_layout() {
        check(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[f("2, s, 3, 5")], S);
        check(Op::Transpose { perm: vec![0, 2, 1] }, &[f("s, 6, 5")], S);
        check(Op::Expand { shape: vec![d("s"), d("5")] }, &[f("1, 5")], S);
        check(Op::Slice { axes: vec![1], starts: vec![d("1")], ends: vec![d("9")], steps: vec![2] }, &[f("s, 10")], S);
        check(Op::Concat { axis: 1 }, &[f("2, s, 3"), f("2, 4, 3")], S);
        check(Op::Gather { axis: 0 }, &[f("10, 6"), i64s("s")], S);
        check(Op::Gather { axis: 1 }, &[f("3, 10, 2"), i64s("2, s")], S);
        // One element per index: groups of one thread.
        check(Op::Gather { axis: 0 }, &[ty(DType::Bool, "10"), i64s("s, 2")], S);
        check(Op::GatherElements { axis: 1 }, &[f("s, 5"), i64s("s, 5")], S);
        check(Op::Trilu { upper: false, k: d("0") }, &[f("s, s")], S);
        check(Op::Range { start: d("0"), end: d("s"), step: 1, dtype: DType::I64 }, &[], S);
        check(Op::Fill { shape: vec![d("s"), d("3")], value: 1.5, dtype: DType::F32 }, &[], S);
        check(
            Op::KvAppend { axis: 2 },
            &[f("1, 2, p, 4"), f("1, 2, s, 4")],
            &[&[("p", 0), ("s", 3)], &[("p", 3), ("s", 1)]],
        );
    }

    #[test]
    fn gpuize_reductions() {
        check(Op::ReduceSum { axes: vec![-1], keepdims: true }, &[f("s, 9")], S);
        check(Op::ReduceMax { axes: vec![0, 2], keepdims: false }, &[f("3, s, 5")], S);
        check(Op::ReduceMean { axes: vec![1], keepdims: false }, &[f("2, s, 6")], S);
        check(Op::ArgMax { axis: -1, keepdims: false }, &[f("s, 7")], S);
        check(Op::CumSum { axis: 1, exclusive: false, reverse: true }, &[f("3, s")], S);
        check(Op::Softmax { axis: -1 }, &[f("2, s, 9")], S);
        check(Op::Softmax { axis: 1 }, &[f("2, s, 3")], S);
    }

    #[test]
    fn gpuize_fused_and_matmul() {
        check(Op::RmsNorm { eps: 1e-5 }, &[f("s, 13"), f("13")], S);
        check(Op::AddRmsNorm { eps: 1e-5 }, &[f("s, 6"), f("s, 6"), f("6")], S);
        check(Op::LayerNorm { eps: 1e-5 }, &[f("s, 7"), f("7"), f("7")], S);
        check(Op::Rope { interleaved: false }, &[f("1, 2, s, 8"), f("1, 1, s, 6"), f("1, 1, s, 6")], S);
        let attn = Op::Attention { scale: 0.5, causal: true, window: None, softcap: None };
        // A constant query count: one loop over items (heads in groups
        // with several positions, one at a time with one).
        check(attn.clone(), &[f("1, 4, 3, 8"), f("1, 2, s, 8"), f("1, 2, s, 8")], S);
        check(attn.clone(), &[f("1, 4, 1, 8"), f("1, 2, s, 8"), f("1, 2, s, 8")], S);
        // A symbolic one chooses between the two loops at run time, which
        // gpuize refuses (the GPU has attention templates of its own).
        let (inst, _) = cpu_instance(&attn, &[f("1, 4, s, 8"), f("1, 2, s, 8"), f("1, 2, s, 8")]);
        let e = gpuize_with(&inst.kernel, GpuizeOptions { block: 64, group: None }).unwrap_err();
        assert!(e.to_string().contains("one top-level parallel loop"), "{e}");
        check(Op::MatMul {}, &[f("s, 5"), f("5, 6")], S);
    }

    /// Groups apply to the kernels that store from loops only.
    #[test]
    fn gpuize_groups_only_where_safe() {
        let group = |op: Op, inputs: &[TensorType]| {
            let (inst, _) = cpu_instance(&op, inputs);
            gpuize_with(&inst.kernel, GpuizeOptions { block: 256, group: Some(32) }).is_ok()
        };
        assert!(group(Op::Add {}, &[f("s, 7"), f("7")]));
        assert!(group(Op::Transpose { perm: vec![1, 0] }, &[f("s, 6")]));
        assert!(group(Op::Concat { axis: 1 }, &[f("2, s, 3"), f("2, 4, 3")]));
        assert!(group(Op::Gather { axis: 0 }, &[f("10, 6"), i64s("s")]));
        assert!(group(Op::KvAppend { axis: 2 }, &[f("1, 2, p, 4"), f("1, 2, s, 4")]));
        assert!(!group(Op::ReduceSum { axes: vec![-1], keepdims: true }, &[f("s, 9")]));
        assert!(!group(Op::CumSum { axis: 1, exclusive: false, reverse: false }, &[f("3, s")]));
        assert!(!group(Op::Softmax { axis: -1 }, &[f("2, s, 9")]));
        // The sum of squares is computed by every thread of the group.
        assert!(group(Op::RmsNorm { eps: 1e-5 }, &[f("s, 13"), f("13")]));
        // `sum` is stored, then loaded back.
        assert!(!group(Op::AddRmsNorm { eps: 1e-5 }, &[f("s, 6"), f("s, 6"), f("6")]));
    }

    #[test]
    fn gpuize_grid_is_over_scalar_params() {
        let (inst, _) = cpu_instance(&Op::Add {}, &[f("s, 3000"), f("3000")]);
        let g = gpuize(&inst.kernel).unwrap();
        let launch = g.gpu.as_ref().unwrap();
        assert_eq!(launch.block, [256, 1, 1]);
        // 3 chunks of 1024 per row, 8 groups of 32 per block.
        let grid = |s: i64| g.grid(&scalars(&inst, &[("s", s)])).unwrap().unwrap();
        assert_eq!(grid(5), [2, 1, 1]);
        assert_eq!(grid(16), [6, 1, 1]);
    }

    #[test]
    fn gpuize_refuses_what_it_cannot_launch() {
        use crate::kir::{Builder, Expr};
        // A loop bound read from memory.
        let mut b = Builder::new("k");
        let n = b.buffer("n", crate::kir::Scalar::I64, 1usize, crate::kir::Space::Global, crate::kir::Access::Read);
        let y = b.output("y", 8usize);
        let len = b.let_("len", Expr::load(n, Expr::i64(0), 1));
        b.for_("i", Expr::i64(0), Expr::Var(len), 1, LoopKind::Parallel, |b, i| b.store(y, i, Expr::f32(1.0)));
        let e = gpuize(&b.finish().unwrap()).unwrap_err();
        assert!(e.why.contains("iteration count"), "{e}");
        // No parallel loop.
        let mut b = Builder::new("k");
        let y = b.output("y", 1usize);
        b.store(y, Expr::i64(0), Expr::f32(1.0));
        let e = gpuize(&b.finish().unwrap()).unwrap_err();
        assert!(e.why.contains("one top-level parallel loop"), "{e}");
    }
}
