//! Softmax over a contiguous last axis on a GPU, with the semantics of the
//! CPU kernel (`select::reduce`): the row maximum (NaN propagates), then
//! `exp(x - max)` summed, then `exp(x - max) * (1 / sum)`. Each row is owned
//! by a group of threads (see [`super::rows`]); the exponentials are
//! recomputed in the last pass rather than read back, so no thread reads
//! what another wrote. The row length may be symbolic.

use super::rows::{launch_rows, reduce_scratch, row_loop, row_reduce, RowLayout};
use crate::kir::{Builder, CmpOp, Expr};
use crate::templates::sym::{add, mul};

/// `a` or `b`, whichever is larger, NaN if either is (the CPU kernel's
/// combination).
fn nan_max(a: Expr, b: Expr) -> Expr {
    let m = a.clone().max(b.clone());
    Expr::select(a.clone().cmp(CmpOp::Ne, a.clone()), a, Expr::select(b.clone().cmp(CmpOp::Ne, b.clone()), b, m))
}

/// Declares `x, out` (`rows * n` f32 each) and builds the kernel; `rows`
/// and `n` are `i64` expressions over constants and scalar parameters.
pub fn softmax_rows(b: &mut Builder, rows: Expr, n: Expr, layout: RowLayout) {
    let len = mul(rows.clone(), n.clone());
    let x = b.input("x", len.clone());
    let y = b.output("out", len);
    let rt = launch_rows(b, layout, rows);
    let scratch = reduce_scratch(b, layout, "partials");
    let base = b.let_("base", mul(Expr::Var(rt.row), n.clone()));
    let at = move |j: Expr| add(Expr::Var(base), j);

    let m = b.let_("m", Expr::f32(f32::NEG_INFINITY));
    b.if_(
        rt.ok.clone(),
        |b| row_loop(b, layout, &rt, n.clone(), |b, j| b.assign(m, nan_max(Expr::Var(m), Expr::load(x, at(j), 1)))),
        |_| {},
    );
    let m = row_reduce(b, layout, &rt, m, scratch, &nan_max);
    let sum = b.let_("sum", Expr::f32(0.0));
    b.if_(
        rt.ok.clone(),
        |b| {
            row_loop(b, layout, &rt, n.clone(), |b, j| {
                b.assign(sum, Expr::Var(sum) + (Expr::load(x, at(j), 1) - Expr::Var(m)).exp())
            })
        },
        |_| {},
    );
    let sum = row_reduce(b, layout, &rt, sum, scratch, &|a, b| a + b);
    let inv = b.let_("inv", Expr::f32(1.0) / Expr::Var(sum));
    b.if_(
        rt.ok.clone(),
        |b| {
            row_loop(b, layout, &rt, n.clone(), |b, j| {
                b.store(y, at(j.clone()), (Expr::load(x, at(j), 1) - Expr::Var(m)).exp() * Expr::Var(inv))
            })
        },
        |_| {},
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::gpu::testing::*;
    use smelt_ir::Op;

    /// Against the CPU kernel `select` picks for a last-axis softmax with
    /// symbolic rows and length; tolerance 1e-5 * (1 + |want|).
    #[test]
    fn gpu_softmax_matches_cpu() {
        let (cpu, _) = cpu_instance(&Op::Softmax { axis: -1 }, &[f("r, n")]);
        for layout in
            [RowLayout { block: 64, tpr: 32 }, RowLayout { block: 64, tpr: 64 }, RowLayout { block: 32, tpr: 4 }]
        {
            let mut g = Builder::new("softmax");
            let rows = g.scalar_param("rows");
            let n = g.scalar_param("n");
            softmax_rows(&mut g, rows, n, layout);
            let g = g.finish().unwrap();
            for (r, n) in [(1, 1), (3, 7), (2, 40), (5, 65)] {
                let sc = scalars(&cpu, &[("r", r), ("n", n)]);
                let mut bufs = buffers(&cpu.kernel, &sc, 3);
                if let crate::kir::interp::BufData::F32(v) = &mut bufs[0] {
                    v.iter_mut().for_each(|x| *x *= 4.0);
                }
                let want = run_cpu(&cpu.kernel, &bufs, &sc, 1);
                let got = run_gpu(&g, &bufs, &[r, n]);
                assert_close(&format!("softmax {r}x{n} {layout:?}"), &got, &want, 1e-5);
            }
        }
    }
}
