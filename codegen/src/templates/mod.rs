//! Kernel templates: functions that build a KIR kernel from concrete shapes
//! and tuning parameters.
//!
//! Conventions every template follows, which the lowerings and the future
//! thread team rely on:
//! - buffers are dense row-major f32, inputs first, the output last;
//! - every store sits inside the kernel's one top-level `Parallel` loop, so
//!   splitting that loop over threads splits all the work (code outside it
//!   would run on every thread);
//! - vector loops cover the largest multiple of the vector width and a
//!   scalar loop finishes the tail, so any size works, 1 included;
//! - sums accumulate in f32 with FMA.

pub mod attention;
pub mod concat;
mod elementwise;
mod gemm;
mod gemv;
pub mod gpu;
pub mod matmul_dyn;
mod norm;
pub mod packed;
pub mod rope;
mod softmax;
pub mod strided;
pub mod sym;

pub use elementwise::{binary, unary, Bcast, BinaryOp, UnaryOp};
pub use gemm::{gemm, GemmParams};
pub use gemv::{gemv, WeightLayout};
pub use norm::{norm_rows, rms_norm, NormKind};
pub use softmax::softmax;

use crate::kir::{Builder, Expr, LoopKind};

/// The vector width of the Cranelift lowering (128-bit f32x4).
pub const LANES: u8 = 4;

/// A float constant of the given width.
pub(crate) fn c(x: f32, lanes: u8) -> Expr {
    if lanes > 1 {
        Expr::f32(x).splat(lanes)
    } else {
        Expr::f32(x)
    }
}

/// `e` itself when it is a constant or a variable, else a new variable, so
/// a template can use a size expression many times without recomputing it.
pub(crate) fn bind(b: &mut Builder, name: &str, e: Expr) -> Expr {
    match e {
        Expr::Int(..) | Expr::Var(_) => e,
        e => Expr::Var(b.let_(name, e)),
    }
}

/// Splats a scalar when `lanes > 1`.
pub(crate) fn widen(x: Expr, lanes: u8) -> Expr {
    if lanes > 1 {
        x.splat(lanes)
    } else {
        x
    }
}

/// Covers `0..n` with vector steps of `lanes` and then a scalar tail,
/// calling `body(builder, index, width)` in each loop.
pub(crate) fn vec_loop(b: &mut Builder, name: &str, n: usize, lanes: u8, body: impl Fn(&mut Builder, Expr, u8)) {
    let full = n / lanes as usize * lanes as usize;
    if full > 0 && lanes > 1 {
        b.for_(name, Expr::idx(0), Expr::idx(full), lanes as i64, LoopKind::Vectorized(lanes), |b, i| {
            body(b, i, lanes)
        });
    }
    let start = if lanes > 1 { full } else { 0 };
    if start < n {
        b.for_(&format!("{name}_tail"), Expr::idx(start), Expr::idx(n), 1, LoopKind::Serial, |b, i| body(b, i, 1));
    }
}

pub mod testing;
