//! Concatenation along an axis (`concat`, `kv_append`) on a GPU: one
//! thread per output element, so appending to a long cache is spread over
//! the whole grid (the CPU kernels copy one outer row per iteration). Same
//! buffers as the CPU kernels: the operands in order, then the result.

use crate::kir::{Access, BufId, Builder, Expr, Scalar, Space, Special};
use crate::templates::sym::{self, add, mul, sub};

/// Declares `in0, in1, ..., out` of element type `elem` and builds the
/// kernel: each of the `outer` rows of the result is a row of `inners[0]`
/// elements of `in0`, then one of `inners[1]` of `in1`, and so on (`i64`
/// expressions over constants and scalar parameters).
pub fn concat(b: &mut Builder, elem: Scalar, outer: Expr, inners: &[Expr], block: u32) {
    let ins: Vec<_> = inners
        .iter()
        .enumerate()
        .map(|(i, n)| b.buffer(&format!("in{i}"), elem, mul(outer.clone(), n.clone()), Space::Global, Access::Read))
        .collect();
    let row = inners.iter().cloned().fold(Expr::i64(0), add);
    let total = mul(outer, row.clone());
    let out = b.buffer("out", elem, total.clone(), Space::Global, Access::Write);
    b.gpu_launch([block, 1, 1], [sym::ceil_div(total.clone(), block as usize), Expr::i64(1), Expr::i64(1)]);
    let e =
        add(mul(Expr::Special(Special::BlockIdx(0)), Expr::idx(block as usize)), Expr::Special(Special::ThreadIdx(0)));
    let e = b.let_("e", e);
    b.if_(
        Expr::Var(e).lt(total),
        |b| {
            let o = b.let_("o", sym::div(Expr::Var(e), row.clone()));
            let i = b.let_("i", sym::rem(Expr::Var(e), row.clone()));
            let mut starts = vec![Expr::i64(0)];
            for n in inners {
                starts.push(add(starts.last().unwrap().clone(), n.clone()));
            }
            let from =
                Source { ins: &ins, inners, starts: &starts, out, e: Expr::Var(e), o: Expr::Var(o), i: Expr::Var(i) };
            from.copy(b, 0);
        },
        |_| {},
    );
}

/// Where a thread's element comes from.
struct Source<'a> {
    ins: &'a [BufId],
    inners: &'a [Expr],
    /// Where each operand's part of a row starts (and, last, the row length).
    starts: &'a [Expr],
    out: BufId,
    e: Expr,
    o: Expr,
    i: Expr,
}

impl Source<'_> {
    /// `if i < end of operand k { copy from k } else { operand k + 1 ... }`.
    fn copy(&self, b: &mut Builder, k: usize) {
        let here = |b: &mut Builder| {
            let at = add(mul(self.o.clone(), self.inners[k].clone()), sub(self.i.clone(), self.starts[k].clone()));
            b.store(self.out, self.e.clone(), Expr::load(self.ins[k], at, 1));
        };
        if k + 1 == self.ins.len() {
            here(b);
        } else {
            b.if_(self.i.clone().lt(self.starts[k + 1].clone()), here, |b| self.copy(b, k + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::gpu::testing::*;
    use smelt_ir::{DType, Op};

    /// Bitwise equal to the CPU kernel, three operands along a middle axis,
    /// bool.
    #[test]
    fn gpu_concat_matches_cpu_exactly() {
        let types = [ty(DType::Bool, "2, s, 3"), ty(DType::Bool, "2, 1, 3"), ty(DType::Bool, "2, 4, 3")];
        let (cpu, _) = cpu_instance(&Op::Concat { axis: 1 }, &types);
        let mut g = Builder::new("concat");
        let s = g.scalar_param("s");
        concat(&mut g, Scalar::Bool, Expr::i64(2), &[s * Expr::i64(3), Expr::i64(3), Expr::i64(12)], 32);
        let g = g.finish().unwrap();
        for s in [0, 1, 5] {
            let sc = scalars(&cpu, &[("s", s)]);
            let bufs = buffers(&cpu.kernel, &sc, 2);
            let want = run_cpu(&cpu.kernel, &bufs, &sc, 2);
            let got = run_gpu(&g, &bufs, &[s]);
            assert_same(&format!("concat s={s}"), &got, &want);
        }
    }

    /// Bitwise equal to the CPU kernel, f32 and i64, empty cache included.
    #[test]
    fn gpu_kv_append_matches_cpu_exactly() {
        for dt in [DType::F32, DType::I64] {
            let (cpu, _) = cpu_instance(&Op::KvAppend { axis: 2 }, &[ty(dt, "2, 3, p, 5"), ty(dt, "2, 3, s, 5")]);
            let mut g = Builder::new("kv");
            let (p, s) = (g.scalar_param("p"), g.scalar_param("s"));
            let elem = crate::select::elem_of(dt);
            concat(&mut g, elem, Expr::i64(6), &[p * Expr::i64(5), s * Expr::i64(5)], 64);
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
