//! Softmax over the last axis, one parallel iteration per row, in three
//! passes: the row maximum, `exp(x - max)` written to the output while
//! summing, then a scale by `1 / sum`.

use super::{vec_loop, widen, LANES};
use crate::kir::{Builder, Expr, Kernel, KirError, LoopKind, RedOp};

/// `x: [rows, n]`, `y: [rows, n]`.
pub fn softmax(rows: usize, n: usize) -> Result<Kernel, KirError> {
    let mut b = Builder::new(&format!("softmax_{rows}x{n}"));
    let x = b.input("x", rows * n);
    let y = b.output("y", rows * n);
    let full = n / LANES as usize * LANES as usize;
    b.for_("r", Expr::idx(0), Expr::idx(rows), 1, LoopKind::Parallel, |b, r| {
        let base = b.let_("base", r * Expr::idx(n));
        let at = move |j: Expr| Expr::Var(base) + j;

        // The maximum: a vector of running maxima, reduced, then the tail.
        let m = b.let_("m", Expr::f32(f32::NEG_INFINITY));
        if full > 0 {
            let vm = b.let_("vm", Expr::f32(f32::NEG_INFINITY).splat(LANES));
            b.for_("j", Expr::idx(0), Expr::idx(full), LANES as i64, LoopKind::Vectorized(LANES), |b, j| {
                b.assign(vm, Expr::Var(vm).max(Expr::load(x, at(j), LANES)));
            });
            b.assign(m, Expr::Var(vm).hreduce(RedOp::Max));
        }
        if full < n {
            b.for_("j_tail", Expr::idx(full), Expr::idx(n), 1, LoopKind::Serial, |b, j| {
                b.assign(m, Expr::Var(m).max(Expr::load(x, at(j), 1)));
            });
        }

        // The exponentials and their sum.
        let sum = b.let_("sum", Expr::f32(0.0));
        if full > 0 {
            let vs = b.let_("vs", Expr::f32(0.0).splat(LANES));
            b.for_("j", Expr::idx(0), Expr::idx(full), LANES as i64, LoopKind::Vectorized(LANES), |b, j| {
                let e = b.let_("e", (Expr::load(x, at(j.clone()), LANES) - Expr::Var(m).splat(LANES)).exp());
                b.store(y, at(j), Expr::Var(e));
                b.assign(vs, Expr::Var(vs) + Expr::Var(e));
            });
            b.assign(sum, Expr::Var(vs).hreduce(RedOp::Add));
        }
        if full < n {
            b.for_("j_tail", Expr::idx(full), Expr::idx(n), 1, LoopKind::Serial, |b, j| {
                let e = b.let_("e", (Expr::load(x, at(j.clone()), 1) - Expr::Var(m)).exp());
                b.store(y, at(j), Expr::Var(e));
                b.assign(sum, Expr::Var(sum) + Expr::Var(e));
            });
        }

        let inv = b.let_("inv", Expr::f32(1.0) / Expr::Var(sum));
        vec_loop(b, "k", n, LANES, |b, j, lanes| {
            b.store(y, at(j.clone()), Expr::load(y, at(j), lanes) * widen(Expr::Var(inv), lanes));
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
    fn softmax_matches_reference() {
        for (rows, n) in [(1, 1), (2, 3), (3, 17), (2, 64), (3, 129)] {
            let x: Vec<f32> = rand(rows * n, 6).into_iter().map(|v| v * 8.0).collect();
            let k = softmax(rows, n).unwrap();
            let want = reference(&Op::Softmax { axis: -1 }, &[(&x, vec![rows, n])]);
            for threads in [1, 2] {
                let got = run_kir(&k, &[&x], threads);
                assert_close(&k.name, &got, &want, 1e-5, 1e-7);
            }
        }
    }
}
