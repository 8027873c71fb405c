//! Normalisations over the last axis on a GPU (`rms_norm`, `add_rms_norm`,
//! `layer_norm`), with the buffers and the semantics of the CPU
//! `templates::norm_rows`: each row is owned by a group of threads (see
//! [`super::rows`]) that sums its strided share of the row, combines the
//! partial sums, and writes its share of the result.
//!
//! - `rms_norm`: `y = x * rsqrt(mean(x^2) + eps) * w`, rounded as
//!   `(x * scale) * w`.
//! - `add_rms_norm`: `sum = x + residual` is stored and normalised as above
//!   (the normalisation recomputes `x + residual`, the same f32 value, rather
//!   than reading back what other threads stored).
//! - `layer_norm`: `(x - mean) * rsqrt(var + eps) * w + bias`, the variance
//!   from a second pass over the deviations, as the reference computes it.
//!
//! Sums accumulate in f32 in a different order than the CPU kernel, so
//! results differ from it by rounding only.

use super::rows::{launch_rows, reduce_scratch, row_loop, row_reduce, RowLayout};
use crate::kir::{Builder, Expr};
use crate::templates::sym::{add, mul};
use crate::templates::NormKind;

/// Declares the buffers of `kind` (as `templates::norm_rows` does) and builds
/// a GPU kernel normalising `rows` rows (an `i64` expression over constants
/// and scalar parameters) of `n` elements.
pub fn norm_rows(b: &mut Builder, kind: NormKind, rows: Expr, n: usize, eps: f32, layout: RowLayout) {
    let len = mul(rows.clone(), Expr::idx(n));
    let x = b.input("x", len.clone());
    let res = (kind == NormKind::AddRms).then(|| b.input("residual", len.clone()));
    let w = b.input("w", n);
    let bias = (kind == NormKind::Layer).then(|| b.input("bias", n));
    let sum_out = (kind == NormKind::AddRms).then(|| b.output("sum", len.clone()));
    let y = b.output("y", len);
    let rt = launch_rows(b, layout, rows);
    let scratch = reduce_scratch(b, layout, "partials");
    let base = b.let_("base", mul(Expr::Var(rt.row), Expr::idx(n)));
    let at = move |j: Expr| add(Expr::Var(base), j);
    let src = move |j: Expr| match res {
        Some(r) => Expr::load(x, at(j.clone()), 1) + Expr::load(r, at(j), 1),
        None => Expr::load(x, at(j), 1),
    };
    let nf = Expr::f32(n as f32);
    let plus = |a: Expr, b: Expr| a + b;

    // First pass: the sum of squares (or of values, for the mean), storing
    // `sum` on the way.
    let acc = b.let_("acc", Expr::f32(0.0));
    b.if_(
        rt.ok.clone(),
        |b| {
            row_loop(b, layout, &rt, Expr::idx(n), |b, j| {
                let v = b.let_("v", src(j.clone()));
                if let Some(s) = sum_out {
                    b.store(s, at(j), Expr::Var(v));
                }
                let term = if kind == NormKind::Layer { Expr::Var(v) } else { Expr::Var(v) * Expr::Var(v) };
                b.assign(acc, Expr::Var(acc) + term);
            });
        },
        |_| {},
    );
    let total = row_reduce(b, layout, &rt, acc, scratch, &plus);
    let (mean, scale) = if kind == NormKind::Layer {
        let mean = b.let_("mean", Expr::Var(total) / nf.clone());
        let dev = b.let_("dev", Expr::f32(0.0));
        b.if_(
            rt.ok.clone(),
            |b| {
                row_loop(b, layout, &rt, Expr::idx(n), |b, j| {
                    let d = b.let_("d", src(j) - Expr::Var(mean));
                    b.assign(dev, Expr::Var(dev) + Expr::Var(d) * Expr::Var(d));
                });
            },
            |_| {},
        );
        let var = row_reduce(b, layout, &rt, dev, scratch, &plus);
        (Some(mean), b.let_("scale", (Expr::Var(var) / nf + Expr::f32(eps)).rsqrt()))
    } else {
        (None, b.let_("scale", (Expr::Var(total) / nf + Expr::f32(eps)).rsqrt()))
    };

    // Second pass: the result.
    b.if_(
        rt.ok.clone(),
        |b| {
            row_loop(b, layout, &rt, Expr::idx(n), |b, j| {
                let mut v = src(j.clone());
                if let Some(m) = mean {
                    v = v - Expr::Var(m);
                }
                let mut v = v * Expr::Var(scale) * Expr::load(w, j.clone(), 1);
                if let Some(bias) = bias {
                    v = v + Expr::load(bias, j.clone(), 1);
                }
                b.store(y, at(j), v);
            });
        },
        |_| {},
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kir::Kernel;
    use crate::templates::gpu::testing::*;

    /// The GPU kernel and the CPU kernel for the same norm; `rows` is the
    /// scalar parameter of both.
    fn kernels(kind: NormKind, n: usize, layout: RowLayout) -> (Kernel, Kernel) {
        let mut g = Builder::new("gpu");
        let rows = g.scalar_param("rows");
        norm_rows(&mut g, kind, rows, n, 1e-5, layout);
        let mut c = Builder::new("cpu");
        let rows = c.scalar_param("rows");
        crate::templates::norm_rows(&mut c, kind, rows, n, 1e-5);
        (g.finish().unwrap(), c.finish().unwrap())
    }

    /// Tolerance 1e-5 * (1 + |want|) against the CPU kernel: f32 sums of at
    /// most a few hundred terms in another order.
    #[test]
    fn gpu_norms_match_cpu() {
        let warp = RowLayout { block: 64, tpr: 32 };
        let two_warps = RowLayout { block: 64, tpr: 64 };
        let eighth = RowLayout { block: 32, tpr: 8 };
        for kind in [NormKind::Rms, NormKind::AddRms, NormKind::Layer] {
            for (n, rows, layout) in [
                (1, 3, warp),
                (5, 1, eighth),
                (13, 5, eighth),
                (24, 3, warp),
                (67, 3, two_warps),
                (300, 2, two_warps),
                (130, 5, warp),
            ] {
                let (g, c) = kernels(kind, n, layout);
                let sc = [rows];
                let bufs = buffers(&c, &sc, n as u64);
                let want = run_cpu(&c, &bufs, &sc, 1);
                let got = run_gpu(&g, &bufs, &sc);
                assert_close(&format!("{kind:?} n={n} rows={rows} {layout:?}"), &got, &want, 1e-5);
            }
        }
    }

    #[test]
    fn gpu_norm_layout_grows_with_the_row() {
        assert_eq!(RowLayout::for_len(Some(24), 256).tpr, 32);
        assert_eq!(RowLayout::for_len(Some(896), 256).tpr, 128);
        assert_eq!(RowLayout::for_len(Some(4096), 256).tpr, 256);
        assert_eq!(RowLayout::for_len(None, 256).tpr, 256);
        assert_eq!(RowLayout::for_len(Some(4096), 64).tpr, 64);
        assert_eq!(RowLayout::for_len(Some(4096), 96).tpr, 32);
    }
}
