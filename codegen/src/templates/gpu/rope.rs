//! Rotary position embedding on a GPU: one thread per output element (the
//! CPU template's one iteration per row would leave a decode step with one
//! thread per head). Same buffers and the same arithmetic per element as
//! `templates::rope` (`x * cos + (partner * sign) * sin`, products rounded
//! separately), so results are bitwise the CPU kernel's.

use crate::kir::{Builder, CmpOp, Expr, Special};
use crate::templates::sym::{self, add, as_const, mul};

/// Declares `x, cos, sin, y` and builds the kernel; the arguments are those
/// of `templates::rope::rope` (x's axes with a constant last one `d`, cos/sin
/// axes right-aligned with x's, each x's size or 1, the last one `r`).
pub fn rope(b: &mut Builder, x_dims: &[Expr], cs_dims: &[Expr], d: usize, r: usize, interleaved: bool, block: u32) {
    let lead = &x_dims[..x_dims.len() - 1];
    let rows = sym::product(lead);
    let total = mul(rows.clone(), Expr::idx(d));
    let x = b.input("x", total.clone());
    let cs_len = sym::product(cs_dims);
    let cos = b.input("cos", cs_len.clone());
    let sin = b.input("sin", cs_len);
    let y = b.output("y", total.clone());
    b.gpu_launch([block, 1, 1], [sym::ceil_div(total.clone(), block as usize), Expr::i64(1), Expr::i64(1)]);
    let cs_strides = sym::strides(cs_dims);
    let skip = x_dims.len() - cs_dims.len();
    let stride_of = |a: usize| -> Option<Expr> {
        if a < skip || as_const(&cs_dims[a - skip]) == Some(1) {
            None
        } else {
            Some(cs_strides[a - skip].clone())
        }
    };
    let tid = Expr::Special(Special::ThreadIdx(0));
    let bid = Expr::Special(Special::BlockIdx(0));
    let e = b.let_("e", add(mul(bid, Expr::idx(block as usize)), tid));
    b.if_(
        Expr::Var(e).lt(total),
        |b| {
            let row = b.let_("row", sym::div(Expr::Var(e), Expr::idx(d)));
            let f = b.let_("f", sym::rem(Expr::Var(e), Expr::idx(d)));
            let used: Vec<usize> = (0..lead.len()).filter(|&a| stride_of(a).is_some()).collect();
            let mut cb = Expr::i64(0);
            if !used.is_empty() {
                let idx = sym::unflatten(b, "ri", Expr::Var(row), lead);
                for a in used {
                    cb = add(cb, mul(idx[a].clone(), stride_of(a).unwrap()));
                }
            }
            let cb = b.let_("cb", cb);
            let xb = b.let_("xb", mul(Expr::Var(row), Expr::idx(d)));
            let (fv, xa, ca) =
                (Expr::Var(f), move |i: Expr| add(Expr::Var(xb), i), move |i: Expr| add(Expr::Var(cb), i));
            // The partner feature and whether it enters with a minus sign.
            let first = if interleaved {
                sym::rem(fv.clone(), Expr::idx(2)).cmp(CmpOp::Eq, Expr::i64(0))
            } else {
                fv.clone().lt(Expr::idx(r / 2))
            };
            let first = b.let_("first", first);
            let (ahead, behind) = if interleaved { (1, 1) } else { (r / 2, r / 2) };
            let partner =
                Expr::select(Expr::Var(first), add(fv.clone(), Expr::idx(ahead)), fv.clone() - Expr::idx(behind));
            let sign = Expr::select(Expr::Var(first), Expr::f32(-1.0), Expr::f32(1.0));
            let rotated = |b: &mut Builder| {
                let p = b.let_("p", partner.clone());
                let xv = Expr::load(x, xa(fv.clone()), 1) * Expr::load(cos, ca(fv.clone()), 1);
                let pv = Expr::load(x, xa(Expr::Var(p)), 1) * sign.clone();
                b.store(y, xa(fv.clone()), xv + pv * Expr::load(sin, ca(fv.clone()), 1));
            };
            if r < d {
                b.if_(fv.clone().lt(Expr::idx(r)), rotated, |b| {
                    b.store(y, xa(fv.clone()), Expr::load(x, xa(fv.clone()), 1))
                });
            } else {
                rotated(b);
            }
        },
        |_| {},
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::gpu::testing::*;
    use smelt_ir::Op;

    /// Bitwise equal to the CPU kernel (same arithmetic per element).
    #[test]
    fn gpu_rope_matches_cpu_exactly() {
        // x, cos/sin, d, r, interleaved, symbols.
        type Case = (&'static str, &'static str, usize, usize, bool, &'static [(&'static str, i64)]);
        let cases: &[Case] = &[
            ("1, 2, s, 8", "1, 1, s, 8", 8, 8, false, &[("s", 3)]),
            ("2, 3, s, 10", "2, 1, s, 6", 10, 6, false, &[("s", 5)]),
            ("1, s, 3, 24", "1, s, 1, 24", 24, 24, true, &[("s", 2)]),
            ("1, 2, s, 12", "1, 1, s, 8", 12, 8, true, &[("s", 1)]),
        ];
        for &(xs, cs, d, r, il, syms) in cases {
            let (cpu, _) = cpu_instance(&Op::Rope { interleaved: il }, &[f(xs), f(cs), f(cs)]);
            let env: std::collections::BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let dims =
                |s: &str| -> Vec<Expr> { f(s).shape.iter().map(|dm| Expr::i64(dm.eval_map(&env).unwrap())).collect() };
            let mut g = Builder::new("rope");
            rope(&mut g, &dims(xs), &dims(cs), d, r, il, 64);
            let g = g.finish().unwrap();
            let sc = scalars(&cpu, syms);
            let bufs = buffers(&cpu.kernel, &sc, 5);
            let want = run_cpu(&cpu.kernel, &bufs, &sc, 2);
            let got = run_gpu(&g, &bufs, &[]);
            assert_same(&format!("rope {xs} {cs}"), &got, &want);
        }
    }
}
