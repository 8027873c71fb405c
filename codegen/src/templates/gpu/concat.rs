//! Concatenation of two tensors along an axis (`kv_append`) on a GPU: one
//! thread per output element, so appending to a long cache is spread over
//! the whole grid (the CPU template copies one outer row per iteration).
//! Same buffers as `templates::concat::concat2`.

use crate::kir::{Access, Builder, Expr, Scalar, Space, Special};
use crate::templates::sym::{self, add, mul, sub};

/// Declares `a, b, out` of element type `elem` and builds the kernel:
/// `outer` rows of `a_inner` then `b_inner` elements (`i64` expressions over
/// constants and scalar parameters).
pub fn concat2(b: &mut Builder, elem: Scalar, outer: Expr, a_inner: Expr, b_inner: Expr, block: u32) {
    let a = b.buffer("a", elem, mul(outer.clone(), a_inner.clone()), Space::Global, Access::Read);
    let bb = b.buffer("b", elem, mul(outer.clone(), b_inner.clone()), Space::Global, Access::Read);
    let row = add(a_inner.clone(), b_inner.clone());
    let total = mul(outer, row.clone());
    let out = b.buffer("out", elem, total.clone(), Space::Global, Access::Write);
    b.gpu_launch([block, 1, 1], [sym::ceil_div(total.clone(), block as usize), Expr::i64(1), Expr::i64(1)]);
    let e = add(mul(Expr::Special(Special::BlockIdx(0)), Expr::idx(block as usize)), Expr::Special(Special::ThreadIdx(0)));
    let e = b.let_("e", e);
    b.if_(
        Expr::Var(e).lt(total),
        |b| {
            let o = b.let_("o", sym::div(Expr::Var(e), row.clone()));
            let i = b.let_("i", sym::rem(Expr::Var(e), row.clone()));
            b.if_(
                Expr::Var(i).lt(a_inner.clone()),
                |b| b.store(out, Expr::Var(e), Expr::load(a, add(mul(Expr::Var(o), a_inner.clone()), Expr::Var(i)), 1)),
                |b| {
                    let at = add(mul(Expr::Var(o), b_inner.clone()), sub(Expr::Var(i), a_inner.clone()));
                    b.store(out, Expr::Var(e), Expr::load(bb, at, 1))
                },
            );
        },
        |_| {},
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::gpu::testing::*;
    use smelt_ir::{DType, Op};

    /// Bitwise equal to the CPU kernel, f32 and i64, empty cache included.
    #[test]
    fn gpu_kv_append_matches_cpu_exactly() {
        for dt in [DType::F32, DType::I64] {
            let (cpu, _) = cpu_instance(&Op::KvAppend { axis: 2 }, &[ty(dt, "2, 3, p, 5"), ty(dt, "2, 3, s, 5")]);
            let mut g = Builder::new("kv");
            let (p, s) = (g.scalar_param("p"), g.scalar_param("s"));
            let elem = crate::select::elem_of(dt);
            concat2(&mut g, elem, Expr::i64(6), p * Expr::i64(5), s * Expr::i64(5), 64);
            let g = g.finish().unwrap();
            for (p, s) in [(0, 3), (4, 1), (9, 2)] {
                let sc = scalars(&cpu, &[("p", p), ("s", s)]);
                let bufs = buffers(&cpu.kernel, &sc, 9);
                let want = run_cpu(&cpu.kernel, &bufs, &sc, 2);
                let got = run_gpu(&g, &bufs, &[p, s]);
                assert_same(&format!("kv_append {dt:?} p={p} s={s}"), &got, &want);
            }
        }
    }
}
