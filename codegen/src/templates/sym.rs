//! Helpers for templates whose sizes are `i64` expressions (constants or the
//! kernel's scalar parameters) rather than Rust integers: arithmetic that
//! folds constants (so static sizes stay literal in the kernel text and in
//! the generated code), loops over a dynamic extent with a vector body and a
//! scalar tail, and the decomposition of a flat index into a multi-index.

use super::LANES;
use crate::kir::{BinOp, Builder, Expr, LoopKind};

/// The value of an integer constant expression.
pub fn as_const(e: &Expr) -> Option<i64> {
    match e {
        Expr::Int(x, _) => Some(*x),
        _ => None,
    }
}

fn fold(op: BinOp, a: Expr, b: Expr) -> Expr {
    match (as_const(&a), as_const(&b), op) {
        (Some(x), Some(y), BinOp::Add) => Expr::i64(x + y),
        (Some(x), Some(y), BinOp::Sub) => Expr::i64(x - y),
        (Some(x), Some(y), BinOp::Mul) => Expr::i64(x * y),
        (Some(x), Some(y), BinOp::Div) if y != 0 => Expr::i64(x / y),
        (Some(x), Some(y), BinOp::Rem) if y != 0 => Expr::i64(x % y),
        (Some(x), Some(y), BinOp::Max) => Expr::i64(x.max(y)),
        (Some(x), Some(y), BinOp::Min) => Expr::i64(x.min(y)),
        (Some(0), _, BinOp::Add) => b,
        (_, Some(0), BinOp::Add | BinOp::Sub) => a,
        (Some(1), _, BinOp::Mul) => b,
        (_, Some(1), BinOp::Mul | BinOp::Div) => a,
        (Some(0), _, BinOp::Mul) | (_, Some(0), BinOp::Mul) => Expr::i64(0),
        (_, Some(1), BinOp::Rem) => Expr::i64(0),
        _ => a.bin(op, b),
    }
}

pub fn add(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Add, a, b)
}

pub fn sub(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Sub, a, b)
}

pub fn mul(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Mul, a, b)
}

/// Truncating division; callers divide nonnegative values by positive ones.
pub fn div(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Div, a, b)
}

pub fn rem(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Rem, a, b)
}

pub fn min(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Min, a, b)
}

pub fn max(a: Expr, b: Expr) -> Expr {
    fold(BinOp::Max, a, b)
}

/// `ceil(a / k)` for nonnegative `a` and positive constant `k`.
pub fn ceil_div(a: Expr, k: usize) -> Expr {
    div(add(a, Expr::idx(k - 1)), Expr::idx(k))
}

/// `a` rounded down to a multiple of the constant `k`.
pub fn floor_to(a: Expr, k: usize) -> Expr {
    mul(div(a, Expr::idx(k)), Expr::idx(k))
}

/// The product of several sizes.
pub fn product(dims: &[Expr]) -> Expr {
    dims.iter().cloned().fold(Expr::i64(1), mul)
}

/// Covers `start..end` (expressions) with vector steps of [`LANES`] and then
/// a scalar tail, calling `body(builder, index, width)`. Constant extents
/// emit only the loops that run.
pub fn vec_range(b: &mut Builder, name: &str, start: Expr, end: Expr, body: impl Fn(&mut Builder, Expr, u8)) {
    let l = LANES as usize;
    let span = sub(end.clone(), start.clone());
    let full_end = add(start.clone(), floor_to(span.clone(), l));
    let span_c = as_const(&span);
    if span_c.is_none_or(|s| s >= l as i64) {
        b.for_(name, start, full_end.clone(), l as i64, LoopKind::Vectorized(LANES), |b, i| body(b, i, LANES));
    }
    if span_c.is_none_or(|s| s % l as i64 != 0) {
        b.for_(&format!("{name}_tail"), full_end, end, 1, LoopKind::Serial, |b, i| body(b, i, 1));
    }
}

/// Splits the flat row-major index `flat` over `dims` into one index per
/// axis (the first axis is not reduced modulo its size, so `dims[0]` is
/// never read). Assigns each to a variable.
pub fn unflatten(b: &mut Builder, name: &str, flat: Expr, dims: &[Expr]) -> Vec<Expr> {
    let mut out = vec![Expr::i64(0); dims.len()];
    let mut rest = flat;
    for a in (0..dims.len()).rev() {
        if a == 0 {
            out[0] = rest.clone();
            break;
        }
        let d = dims[a].clone();
        if as_const(&d) == Some(1) {
            out[a] = Expr::i64(0);
            continue;
        }
        let v = b.let_(&format!("{name}{a}"), rem(rest.clone(), d.clone()));
        out[a] = Expr::Var(v);
        let r = b.let_(&format!("{name}_rest{a}"), div(rest, d));
        rest = Expr::Var(r);
    }
    out
}

/// Row-major strides of a shape.
pub fn strides(dims: &[Expr]) -> Vec<Expr> {
    let mut s = vec![Expr::i64(1); dims.len()];
    for a in (0..dims.len().saturating_sub(1)).rev() {
        s[a] = mul(s[a + 1].clone(), dims[a + 1].clone());
    }
    s
}
