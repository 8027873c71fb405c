//! `rms_norm` over the last axis: `y = x * rsqrt(mean(x^2) + eps) * w`, one
//! parallel iteration per row, f32 accumulation in a vector register and a
//! scalar tail.

use super::{vec_loop, widen, LANES};
use crate::kir::{Builder, Expr, Kernel, KirError, LoopKind, RedOp};

/// `x: [rows, n]`, `w: [n]`, `y: [rows, n]`.
pub fn rms_norm(rows: usize, n: usize, eps: f32) -> Result<Kernel, KirError> {
    let mut b = Builder::new(&format!("rms_norm_{rows}x{n}"));
    let x = b.input("x", rows * n);
    let w = b.input("w", n);
    let y = b.output("y", rows * n);
    let full = n / LANES as usize * LANES as usize;
    b.for_("r", Expr::idx(0), Expr::idx(rows), 1, LoopKind::Parallel, |b, r| {
        let base = b.let_("base", r * Expr::idx(n));
        let sum = b.let_("sum", Expr::f32(0.0));
        if full > 0 {
            let acc = b.let_("acc", Expr::f32(0.0).splat(LANES));
            b.for_("j", Expr::idx(0), Expr::idx(full), LANES as i64, LoopKind::Vectorized(LANES), |b, j| {
                let v = b.let_("v", Expr::load(x, Expr::Var(base) + j, LANES));
                b.assign(acc, Expr::Var(v).fma(Expr::Var(v), Expr::Var(acc)));
            });
            b.assign(sum, Expr::Var(acc).hreduce(RedOp::Add));
        }
        if full < n {
            b.for_("j_tail", Expr::idx(full), Expr::idx(n), 1, LoopKind::Serial, |b, j| {
                let v = b.let_("v", Expr::load(x, Expr::Var(base) + j, 1));
                b.assign(sum, Expr::Var(v).fma(Expr::Var(v), Expr::Var(sum)));
            });
        }
        let scale = b.let_("scale", (Expr::Var(sum) / Expr::f32(n as f32) + Expr::f32(eps)).rsqrt());
        vec_loop(b, "k", n, LANES, |b, j, lanes| {
            let i = Expr::Var(base) + j.clone();
            let v = Expr::load(x, i.clone(), lanes) * widen(Expr::Var(scale), lanes);
            b.store(y, i, v * Expr::load(w, j, lanes));
        });
    });
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::testing::*;
    use smelt_ir::Op;

    #[test]
    fn rms_norm_matches_reference() {
        for (rows, n) in [(1, 1), (2, 3), (3, 17), (2, 64), (5, 129)] {
            let x = rand(rows * n, 4);
            let w = rand(n, 5);
            let k = rms_norm(rows, n, 1e-5).unwrap();
            let want = reference(&Op::RmsNorm { eps: 1e-5 }, &[(&x, vec![rows, n]), (&w, vec![n])]);
            for threads in [1, 2, 3] {
                let got = run_kir(&k, &[&x, &w], threads);
                assert_close(&k.name, &got, &want, 1e-5, 1e-6);
            }
        }
    }
}

#[cfg(test)]
mod print_tests {
    /// The whole text form of a small kernel, as documentation of KIR's
    /// printer and of the template's shape.
    #[test]
    fn rms_norm_text() {
        let k = super::rms_norm(2, 6, 1e-5).unwrap();
        assert_eq!(k.to_string(), EXPECTED, "\n{k}");
    }

    const EXPECTED: &str = r"kernel @rms_norm_2x6(x: f32[12], w: f32[6], y: mut f32[12]) {
  for r.0 in 0..2 parallel {
    base.1: i64 = (r.0 * 6)
    sum.2: f32 = 0.0
    acc.3: f32x4 = splat4(0.0)
    for j.4 in 0..4 step 4 vectorized(4) {
      v.5: f32x4 = x[(base.1 + j.4)..+4]
      acc.3: f32x4 = fma(v.5, v.5, acc.3)
    }
    sum.2: f32 = hreduce_add(acc.3)
    for j_tail.6 in 4..6 {
      v.7: f32 = x[(base.1 + j_tail.6)]
      sum.2: f32 = fma(v.7, v.7, sum.2)
    }
    scale.8: f32 = rsqrt(((sum.2 / 6.0) + 1e-5))
    for k.9 in 0..4 step 4 vectorized(4) {
      y[(base.1 + k.9)..+4] = ((x[(base.1 + k.9)..+4] * splat4(scale.8)) * w[k.9..+4])
    }
    for k_tail.10 in 4..6 {
      y[(base.1 + k_tail.10)] = ((x[(base.1 + k_tail.10)] * scale.8) * w[k_tail.10])
    }
  }
}
";
}

/// Which normalisation [`norm_rows`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// Buffers `x, w, y`.
    Rms,
    /// Buffers `x, residual, w, sum, y`: `sum = x + residual` is stored and
    /// normalised.
    AddRms,
    /// Buffers `x, w, bias, y`, with the population variance of the
    /// deviations from the mean (two passes, as the reference computes it).
    Layer,
}

/// Declares the buffers and builds the body of a normalisation over the
/// last axis (`n`, static) of `rows` rows (any `i64` expression, usually a
/// scalar parameter of `b`), one parallel iteration per row.
pub fn norm_rows(b: &mut Builder, kind: NormKind, rows: Expr, n: usize, eps: f32) {
    use super::sym::{add, mul};
    let len = mul(rows.clone(), Expr::idx(n));
    let x = b.input("x", len.clone());
    let res = (kind == NormKind::AddRms).then(|| b.input("residual", len.clone()));
    let w = b.input("w", n);
    let bias = (kind == NormKind::Layer).then(|| b.input("bias", n));
    let sum_out = (kind == NormKind::AddRms).then(|| b.output("sum", len.clone()));
    let y = b.output("y", len);
    b.for_("r", Expr::idx(0), rows, 1, LoopKind::Parallel, |b, r| {
        let base = b.let_("base", mul(r, Expr::idx(n)));
        let at = move |j: Expr| add(Expr::Var(base), j);
        // The source row: x, or x + residual written to `sum` first.
        let src = match (res, sum_out) {
            (Some(res), Some(s)) => {
                vec_loop(b, "s", n, LANES, |b, j, lanes| {
                    b.store(s, at(j.clone()), Expr::load(x, at(j.clone()), lanes) + Expr::load(res, at(j), lanes));
                });
                s
            }
            _ => x,
        };
        let total = |b: &mut Builder, name: &str, term: &dyn Fn(Expr, u8) -> Expr| {
            let sum = b.let_(name, Expr::f32(0.0));
            let acc = b.let_("acc", Expr::f32(0.0).splat(LANES));
            vec_loop(b, name, n, LANES, |b, j, lanes| {
                let v = term(j, lanes);
                if lanes > 1 {
                    b.assign(acc, Expr::Var(acc) + v);
                } else {
                    b.assign(sum, Expr::Var(sum) + v);
                }
            });
            b.assign(sum, Expr::Var(sum) + Expr::Var(acc).hreduce(RedOp::Add));
            sum
        };
        let (mean, scale) = if kind == NormKind::Layer {
            let s = total(b, "sx", &|j, lanes| Expr::load(src, at(j), lanes));
            let mean = b.let_("mean", Expr::Var(s) / Expr::f32(n as f32));
            let var = total(b, "sd", &|j, lanes| {
                let d = Expr::load(src, at(j), lanes) - widen(Expr::Var(mean), lanes);
                d.clone() * d
            });
            let scale = b.let_("scale", (Expr::Var(var) / Expr::f32(n as f32) + Expr::f32(eps)).rsqrt());
            (Some(mean), scale)
        } else {
            let s = total(b, "ss", &|j, lanes| {
                let v = Expr::load(src, at(j), lanes);
                v.clone() * v
            });
            (None, b.let_("scale", (Expr::Var(s) / Expr::f32(n as f32) + Expr::f32(eps)).rsqrt()))
        };
        vec_loop(b, "k", n, LANES, |b, j, lanes| {
            let mut v = Expr::load(src, at(j.clone()), lanes);
            if let Some(m) = mean {
                v = v - widen(Expr::Var(m), lanes);
            }
            let mut v = v * widen(Expr::Var(scale), lanes) * Expr::load(w, j.clone(), lanes);
            if let Some(bias) = bias {
                v = v + Expr::load(bias, j.clone(), lanes);
            }
            b.store(y, at(j), v);
        });
    });
}
