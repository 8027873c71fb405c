//! GEMV for decode: `y[n] = x[k] · W`, with `W` stored `[k, n]` (vectorised
//! over `n`: each parallel iteration owns a block of output columns) or
//! transposed `[n, k]` (vectorised over `k`: each parallel iteration owns
//! one output and reduces a dot product).

use super::LANES;
use crate::kir::{Builder, Expr, Kernel, KirError, LoopKind, RedOp, Var};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `W[k, n]`, row-major: consecutive outputs are contiguous.
    KN,
    /// `W[n, k]`: each output's weights are contiguous.
    NK,
}

/// `x: [k]`, `w` as `layout` says, `y: [n]`. `vecs` is the number of
/// independent vector accumulators (they hide FMA latency): with `KN` each
/// parallel iteration computes `vecs` vectors of outputs and the last one
/// also does the columns left over; with `NK` one output's dot product is
/// split over `vecs` accumulators.
pub fn gemv(k: usize, n: usize, layout: WeightLayout, vecs: usize) -> Result<Kernel, KirError> {
    let layout_name = format!("{layout:?}").to_lowercase();
    let mut b = Builder::new(&format!("gemv_{k}x{n}_{layout_name}_{vecs}"));
    let x = b.input("x", k);
    let w = b.input("w", k * n);
    let y = b.output("y", n);
    let l = LANES as usize;
    match layout {
        WeightLayout::KN => {
            let vecs = vecs.max(1);
            let block = l * vecs;
            let blocks = n / block;
            let rest = n - blocks * block;
            let iters = blocks + usize::from(rest > 0);
            b.for_("jb", Expr::idx(0), Expr::idx(iters), 1, LoopKind::Parallel, |b, jb| {
                let j0 = b.let_("j0", jb.clone() * Expr::idx(block));
                let full = |b: &mut Builder| columns(b, x, w, y, k, n, j0, &vec![LANES; vecs]);
                if rest == 0 {
                    full(b);
                } else {
                    // The last block: whole vectors, then single columns.
                    let mut widths = vec![LANES; rest / l];
                    widths.extend(std::iter::repeat_n(1, rest % l));
                    b.if_(jb.lt(Expr::idx(blocks)), full, |b| columns(b, x, w, y, k, n, j0, &widths));
                }
            });
        }
        WeightLayout::NK => {
            let full = k / l * l;
            b.for_("j", Expr::idx(0), Expr::idx(n), 1, LoopKind::Parallel, |b, j| {
                let row = b.let_("row", j.clone() * Expr::idx(k));
                let sum = b.let_("sum", Expr::f32(0.0));
                if full > 0 {
                    // `vecs` independent accumulators over blocks of
                    // `vecs` vectors hide the FMA latency; one accumulator
                    // takes the whole vectors left over.
                    let vecs = vecs.clamp(1, full / l);
                    let block = l * vecs;
                    let blocked = full / block * block;
                    let accs: Vec<Var> = (0..vecs).map(|_| b.let_("acc", Expr::f32(0.0).splat(LANES))).collect();
                    b.for_("i", Expr::idx(0), Expr::idx(blocked), block as i64, LoopKind::Vectorized(LANES), |b, i| {
                        for (u, acc) in accs.iter().enumerate() {
                            let at = i.clone() + Expr::idx(u * l);
                            let wv = Expr::load(w, Expr::Var(row) + at.clone(), LANES);
                            b.assign(*acc, Expr::load(x, at, LANES).fma(wv, Expr::Var(*acc)));
                        }
                    });
                    if blocked < full {
                        let acc = accs[0];
                        b.for_(
                            "i_vec",
                            Expr::idx(blocked),
                            Expr::idx(full),
                            l as i64,
                            LoopKind::Vectorized(LANES),
                            |b, i| {
                                let wv = Expr::load(w, Expr::Var(row) + i.clone(), LANES);
                                b.assign(acc, Expr::load(x, i, LANES).fma(wv, Expr::Var(acc)));
                            },
                        );
                    }
                    let total = accs[1..].iter().fold(Expr::Var(accs[0]), |t, a| t + Expr::Var(*a));
                    b.assign(sum, total.hreduce(RedOp::Add));
                }
                if full < k {
                    b.for_("i_tail", Expr::idx(full), Expr::idx(k), 1, LoopKind::Serial, |b, i| {
                        let wv = Expr::load(w, Expr::Var(row) + i.clone(), 1);
                        b.assign(sum, Expr::load(x, i, 1).fma(wv, Expr::Var(sum)));
                    });
                }
                b.store(y, j, Expr::Var(sum));
            });
        }
    }
    b.finish()
}

/// Outputs `j0 .. j0 + sum(widths)` of the `KN` layout, one accumulator per
/// entry of `widths` (each a vector width or 1).
#[allow(clippy::too_many_arguments)]
fn columns(
    b: &mut Builder,
    x: crate::kir::BufId,
    w: crate::kir::BufId,
    y: crate::kir::BufId,
    k: usize,
    n: usize,
    j0: Var,
    widths: &[u8],
) {
    let offsets: Vec<usize> = widths
        .iter()
        .scan(0, |o, w| {
            let at = *o;
            *o += *w as usize;
            Some(at)
        })
        .collect();
    let accs: Vec<Var> = widths.iter().map(|&lanes| b.let_("acc", super::c(0.0, lanes))).collect();
    b.for_("i", Expr::idx(0), Expr::idx(k), 1, LoopKind::Serial, |b, i| {
        let xi = b.let_("xi", Expr::load(x, i.clone(), 1));
        let row = b.let_("wrow", i * Expr::idx(n) + Expr::Var(j0));
        for ((acc, &lanes), off) in accs.iter().zip(widths).zip(&offsets) {
            let wv = Expr::load(w, Expr::Var(row) + Expr::idx(*off), lanes);
            b.assign(*acc, super::widen(Expr::Var(xi), lanes).fma(wv, Expr::Var(*acc)));
        }
    });
    for (acc, off) in accs.iter().zip(&offsets) {
        b.store(y, Expr::Var(j0) + Expr::idx(*off), Expr::Var(*acc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::testing::*;
    use smelt_ir::Op;

    pub(crate) fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
        (0..n * k).map(|t| w[(t % k) * n + t / k]).collect()
    }

    #[test]
    fn gemv_matches_reference() {
        for (k, n) in [(1, 1), (3, 5), (17, 3), (64, 64), (129, 17), (5, 129)] {
            let x = rand(k, 7);
            let w = rand(k * n, 8);
            let want = reference(&Op::MatMul {}, &[(&x, vec![1, k]), (&w, vec![k, n])]);
            for vecs in [1, 2, 4] {
                let kern = gemv(k, n, WeightLayout::KN, vecs).unwrap();
                for threads in [1, 3] {
                    assert_close(&kern.name, &run_kir(&kern, &[&x, &w], threads), &want, 1e-5, 1e-5);
                }
            }
            for vecs in [1, 3] {
                let kern = gemv(k, n, WeightLayout::NK, vecs).unwrap();
                assert_close(&kern.name, &run_kir(&kern, &[&x, &transpose(&w, k, n)], 2), &want, 1e-5, 1e-5);
            }
        }
    }
}
