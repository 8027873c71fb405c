//! A simple blocked GEMM, `C[m, n] = A[m, k] · B[k, n]`, all row-major. Each
//! parallel iteration owns `mr` rows of `C` and walks them in tiles of
//! `mr x (4 * nv)` held in `mr * nv` vector accumulators; the `k` loop
//! broadcasts one element of `A` per row against `nv` vectors of `B`.
//! Leftover rows get a smaller tile, leftover columns single vectors and
//! then scalars. This is the baseline the packed-panel, cache-blocked GEMM
//! will replace (next step: pre-packed B panels, a `kc` block of `k`).

use super::{c, widen, LANES};
use crate::kir::{BufId, Builder, Expr, Kernel, KirError, LoopKind, Var};

/// Tuning parameters of [`gemm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmParams {
    /// Rows of the register tile.
    pub mr: usize,
    /// Vectors of 4 columns in the register tile.
    pub nv: usize,
}

impl Default for GemmParams {
    fn default() -> Self {
        // 4 x 8 columns = 8 accumulators of the 16 xmm registers.
        GemmParams { mr: 4, nv: 2 }
    }
}

pub fn gemm(m: usize, k: usize, n: usize, p: GemmParams) -> Result<Kernel, KirError> {
    let (mr, nv) = (p.mr.max(1), p.nv.max(1));
    let mut b = Builder::new(&format!("gemm_{m}x{k}x{n}_{mr}x{nv}"));
    let a = b.input("a", m * k);
    let bm = b.input("b", k * n);
    let cm = b.output("c", m * n);
    let g = Gemm { a, b: bm, c: cm, k, n };
    let blocks = m / mr;
    let rest = m % mr;
    let iters = blocks + usize::from(rest > 0);
    b.for_("ib", Expr::idx(0), Expr::idx(iters), 1, LoopKind::Parallel, |b, ib| {
        let i0 = b.let_("i0", ib.clone() * Expr::idx(mr));
        if rest == 0 {
            g.rows(b, i0, mr, nv);
        } else {
            b.if_(ib.lt(Expr::idx(blocks)), |b| g.rows(b, i0, mr, nv), |b| g.rows(b, i0, rest, nv));
        }
    });
    b.finish()
}

struct Gemm {
    a: BufId,
    b: BufId,
    c: BufId,
    k: usize,
    n: usize,
}

impl Gemm {
    /// All columns of rows `i0 .. i0 + rows`.
    fn rows(&self, b: &mut Builder, i0: Var, rows: usize, nv: usize) {
        let l = LANES as usize;
        let block = l * nv;
        let full = self.n / block * block;
        if full > 0 {
            b.for_("jb", Expr::idx(0), Expr::idx(full), block as i64, LoopKind::Serial, |b, j| {
                let j0 = b.let_("j0", j);
                self.tile(b, i0, rows, j0, &vec![LANES; nv]);
            });
        }
        let mut widths = vec![LANES; (self.n - full) / l];
        widths.extend(std::iter::repeat_n(1, (self.n - full) % l));
        if !widths.is_empty() {
            let j0 = b.let_("j0", Expr::idx(full));
            self.tile(b, i0, rows, j0, &widths);
        }
    }

    /// The `rows x sum(widths)` tile at `(i0, j0)`.
    fn tile(&self, b: &mut Builder, i0: Var, rows: usize, j0: Var, widths: &[u8]) {
        let (k, n) = (self.k, self.n);
        let offsets: Vec<usize> = widths
            .iter()
            .scan(0, |o, w| {
                let at = *o;
                *o += *w as usize;
                Some(at)
            })
            .collect();
        let acc: Vec<Vec<Var>> =
            (0..rows).map(|_| widths.iter().map(|&w| b.let_("acc", c(0.0, w))).collect()).collect();
        b.for_("p", Expr::idx(0), Expr::idx(k), 1, LoopKind::Serial, |b, p| {
            let brow = b.let_("brow", p.clone() * Expr::idx(n) + Expr::Var(j0));
            let bv: Vec<Var> = widths
                .iter()
                .zip(&offsets)
                .map(|(&w, off)| b.let_("bv", Expr::load(self.b, Expr::Var(brow) + Expr::idx(*off), w)))
                .collect();
            for (r, row_acc) in acc.iter().enumerate() {
                let ai = (Expr::Var(i0) + Expr::idx(r)) * Expr::idx(k) + p.clone();
                let av = b.let_("av", Expr::load(self.a, ai, 1));
                for ((acc, &w), bvar) in row_acc.iter().zip(widths).zip(&bv) {
                    b.assign(*acc, widen(Expr::Var(av), w).fma(Expr::Var(*bvar), Expr::Var(*acc)));
                }
            }
        });
        for (r, row_acc) in acc.iter().enumerate() {
            for (acc, off) in row_acc.iter().zip(&offsets) {
                let ci = (Expr::Var(i0) + Expr::idx(r)) * Expr::idx(n) + Expr::Var(j0) + Expr::idx(*off);
                b.store(self.c, ci, Expr::Var(*acc));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::testing::*;
    use smelt_ir::Op;

    #[test]
    fn gemm_matches_reference() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 3), (5, 17, 9), (8, 64, 64), (7, 33, 129), (17, 3, 17)] {
            let a = rand(m * k, 9);
            let bm = rand(k * n, 10);
            let want = reference(&Op::MatMul {}, &[(&a, vec![m, k]), (&bm, vec![k, n])]);
            for p in [GemmParams::default(), GemmParams { mr: 1, nv: 1 }, GemmParams { mr: 3, nv: 3 }] {
                let kern = gemm(m, k, n, p).unwrap();
                for threads in [1, 2] {
                    assert_close(&kern.name, &run_kir(&kern, &[&a, &bm], threads), &want, 1e-5, 1e-5);
                }
            }
        }
    }
}
