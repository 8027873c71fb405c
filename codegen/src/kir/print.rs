//! The text form of KIR, for debugging and tests. One statement per line,
//! loops and ifs indented; variables print as `name.N` so that names may
//! repeat.

use super::*;

pub(super) fn ty(t: Ty) -> String {
    let s = match t.elem {
        Scalar::F32 => "f32",
        Scalar::I32 => "i32",
        Scalar::I64 => "i64",
        Scalar::Bool => "bool",
        Scalar::BF16 => "bf16",
        Scalar::F16 => "f16",
    };
    if t.is_vector() {
        format!("{s}x{}", t.lanes)
    } else {
        s.to_string()
    }
}

fn var(k: &Kernel, v: Var) -> String {
    match k.vars.get(v.0 as usize) {
        Some(d) => format!("{}.{}", d.name, v.0),
        None => format!("?{}", v.0),
    }
}

fn buf(k: &Kernel, b: BufId) -> String {
    k.buffers.get(b.0 as usize).map_or_else(|| format!("?buf{}", b.0), |d| d.name.clone())
}

pub(super) fn expr(k: &Kernel, e: &Expr) -> String {
    let axis = |a: u8| ["x", "y", "z"].get(a as usize).copied().unwrap_or("?");
    match e {
        Expr::F32(x) => format!("{x:?}"),
        Expr::Int(x, Scalar::I32) => format!("{x}i32"),
        Expr::Int(x, _) => x.to_string(),
        Expr::Bool(b) => b.to_string(),
        Expr::Var(v) => var(k, *v),
        Expr::Un(op, a) => format!("{}({})", format!("{op:?}").to_lowercase(), expr(k, a)),
        Expr::Bin(op, a, b) => {
            let sym = match op {
                BinOp::Add => "+",
                BinOp::Sub => "-",
                BinOp::Mul => "*",
                BinOp::Div => "/",
                BinOp::Rem => "%",
                BinOp::Max => return format!("max({}, {})", expr(k, a), expr(k, b)),
                BinOp::Min => return format!("min({}, {})", expr(k, a), expr(k, b)),
                BinOp::Pow => return format!("pow({}, {})", expr(k, a), expr(k, b)),
            };
            format!("({} {sym} {})", expr(k, a), expr(k, b))
        }
        Expr::Fma(a, b, c) => format!("fma({}, {}, {})", expr(k, a), expr(k, b), expr(k, c)),
        Expr::Cmp(op, a, b) => {
            let sym = match op {
                CmpOp::Eq => "==",
                CmpOp::Ne => "!=",
                CmpOp::Lt => "<",
                CmpOp::Le => "<=",
                CmpOp::Gt => ">",
                CmpOp::Ge => ">=",
            };
            format!("({} {sym} {})", expr(k, a), expr(k, b))
        }
        Expr::Select(c, a, b) => format!("select({}, {}, {})", expr(k, c), expr(k, a), expr(k, b)),
        Expr::Cast(s, a) => format!("{}({})", ty(Ty::scalar(*s)), expr(k, a)),
        Expr::Splat(n, a) => format!("splat{n}({})", expr(k, a)),
        Expr::Extract(a, i) => format!("{}[lane {i}]", expr(k, a)),
        Expr::HReduce(op, a) => format!("hreduce_{}({})", format!("{op:?}").to_lowercase(), expr(k, a)),
        Expr::HSums(vs) => format!("hsums({})", vs.iter().map(|v| expr(k, v)).collect::<Vec<_>>().join(", ")),
        Expr::Load { buf: b, index, lanes, pick: pick @ (Pick::Even | Pick::Odd) } => {
            let which = if *pick == Pick::Even { "even" } else { "odd" };
            format!("{}[{}..+{}].{which}", buf(k, *b), expr(k, index), 2 * *lanes as u32)
        }
        Expr::Load { buf: b, index, lanes, pick: Pick::All } => {
            if *lanes > 1 {
                format!("{}[{}..+{lanes}]", buf(k, *b), expr(k, index))
            } else {
                format!("{}[{}]", buf(k, *b), expr(k, index))
            }
        }
        Expr::Special(s) => match s {
            Special::ThreadIdx(a) => format!("thread.{}", axis(*a)),
            Special::BlockIdx(a) => format!("block.{}", axis(*a)),
            Special::BlockDim(a) => format!("block_dim.{}", axis(*a)),
            Special::GridDim(a) => format!("grid_dim.{}", axis(*a)),
        },
    }
}

/// The first line of a statement (a loop prints its header only).
pub(super) fn stmt_line(k: &Kernel, s: &Stmt) -> String {
    let mut out = String::new();
    stmt(k, s, 0, &mut out);
    out.lines().next().unwrap_or("").trim().to_string()
}

fn stmt(k: &Kernel, s: &Stmt, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth + 1);
    match s {
        Stmt::Assign(v, e) => out.push_str(&format!("{pad}{}: {} = {}\n", var(k, *v), ty(k.var(*v).ty), expr(k, e))),
        Stmt::Store { buf: b, index, value } => {
            let lanes = k.type_of(value).map(|t| t.lanes).unwrap_or(1);
            let range = if lanes > 1 { format!("..+{lanes}") } else { String::new() };
            out.push_str(&format!("{pad}{}[{}{range}] = {}\n", buf(k, *b), expr(k, index), expr(k, value)));
        }
        Stmt::For(l) => {
            let kind = match l.kind {
                LoopKind::Serial => String::new(),
                LoopKind::Parallel => " parallel".into(),
                LoopKind::Unroll(n) => format!(" unroll({n})"),
                LoopKind::Vectorized(n) => format!(" vectorized({n})"),
            };
            let step = if l.step != 1 { format!(" step {}", l.step) } else { String::new() };
            out.push_str(&format!(
                "{pad}for {} in {}..{}{step}{kind} {{\n",
                var(k, l.var),
                expr(k, &l.start),
                expr(k, &l.end)
            ));
            for s in &l.body {
                stmt(k, s, depth + 1, out);
            }
            out.push_str(&format!("{pad}}}\n"));
        }
        Stmt::If { cond, then, els } => {
            out.push_str(&format!("{pad}if {} {{\n", expr(k, cond)));
            for s in then {
                stmt(k, s, depth + 1, out);
            }
            if !els.is_empty() {
                out.push_str(&format!("{pad}}} else {{\n"));
                for s in els {
                    stmt(k, s, depth + 1, out);
                }
            }
            out.push_str(&format!("{pad}}}\n"));
        }
        Stmt::Barrier => out.push_str(&format!("{pad}barrier\n")),
        Stmt::Prefetch { buf, index } => {
            out.push_str(&format!("{pad}prefetch {}[{}]\n", k.buf(*buf).name, expr(k, index)))
        }
        Stmt::Shuffle { dst, kind, value, arg } => out.push_str(&format!(
            "{pad}{} = shuffle_{}({}, {})\n",
            var(k, *dst),
            format!("{kind:?}").to_lowercase(),
            expr(k, value),
            expr(k, arg)
        )),
        Stmt::Mma(m) => {
            let list = |es: &[Expr]| es.iter().map(|e| expr(k, e)).collect::<Vec<_>>().join(", ");
            let d: Vec<String> = m.d.iter().map(|v| var(k, *v)).collect();
            out.push_str(&format!(
                "{pad}{} = mma_m16n8k16_{}(a: {}[{}], b: {}[{}], c: {})\n",
                d.join(", "),
                ty(Ty::scalar(m.elem)),
                buf(k, m.a),
                list(&m.a_at),
                buf(k, m.b),
                list(&m.b_at),
                list(&m.c)
            ))
        }
        Stmt::Wgmma(w) => {
            let d: Vec<String> = w.d.iter().map(|v| var(k, *v)).collect();
            let desc = |m: &SmemMatrix| format!("{}[{}] lbo {} sbo {}", buf(k, m.buf), expr(k, &m.start), m.lbo, m.sbo);
            out.push_str(&format!(
                "{pad}[{}] += wgmma_m64n{}k16_{}(a: {}, b: {})\n",
                d.join(", "),
                w.n,
                ty(Ty::scalar(w.elem)),
                desc(&w.a),
                desc(&w.b)
            ))
        }
        Stmt::Async(a) => out.push_str(&format!(
            "{pad}{}\n",
            match a {
                AsyncSync::WgmmaFence => "wgmma_fence".to_string(),
                AsyncSync::WgmmaCommit => "wgmma_commit".to_string(),
                AsyncSync::WgmmaWait(n) => format!("wgmma_wait {n}"),
                AsyncSync::ProxyFenceShared => "fence_proxy_async_shared".to_string(),
            }
        )),
    }
}

pub(super) fn kernel(k: &Kernel) -> String {
    let mut out = format!("kernel @{}(", k.name);
    let mut params: Vec<String> = k
        .buffers
        .iter()
        .filter(|b| b.space == Space::Global)
        .map(|b| {
            let rw = if b.access == Access::Write { "mut " } else { "" };
            format!("{}: {rw}{}[{}]", b.name, ty(Ty::scalar(b.elem)), expr(k, &b.len))
        })
        .collect();
    params.extend(k.scalars.iter().map(|v| format!("{}: i64", var(k, *v))));
    out.push_str(&params.join(", "));
    out.push_str(") {\n");
    for b in k.buffers.iter().filter(|b| b.space == Space::Shared) {
        out.push_str(&format!("  shared {}: {}[{}]\n", b.name, ty(Ty::scalar(b.elem)), expr(k, &b.len)));
    }
    for s in &k.body {
        stmt(k, s, 0, &mut out);
    }
    out.push_str("}\n");
    if let Some(v) = &k.sm90a {
        out.push_str("sm_90a variant:\n");
        out.push_str(&kernel(v));
    }
    out
}
