//! Rotary position embedding over the last axis: the first `r` features of
//! each row are rotated (rotate-half or interleaved pairs) with `cos` and
//! `sin` broadcast to the rotated part, the rest are copied. One parallel
//! iteration per row; the row's position in `cos`/`sin` comes from
//! splitting the row index over the leading axes.

use super::sym::{self, add, as_const, mul};
use super::{vec_loop, widen, LANES};
use crate::kir::{Builder, Expr, LoopKind};

/// Declares `x, cos, sin, y` and builds the body. `x_dims` are x's axes
/// (the last one, `d`, a constant); `cs_dims` are cos/sin's axes, right
/// aligned with x's, each either x's size or the constant 1 (broadcast), the
/// last one `r` a constant.
pub fn rope(b: &mut Builder, x_dims: &[Expr], cs_dims: &[Expr], d: usize, r: usize, interleaved: bool) {
    let lead = &x_dims[..x_dims.len() - 1];
    let rows = sym::product(lead);
    let x = b.input("x", mul(rows.clone(), Expr::idx(d)));
    let cs_len = sym::product(cs_dims);
    let cos = b.input("cos", cs_len.clone());
    let sin = b.input("sin", cs_len);
    let y = b.output("y", mul(rows.clone(), Expr::idx(d)));
    // cos/sin strides per leading axis of x (zero where they broadcast).
    let cs_strides = sym::strides(cs_dims);
    let skip = x_dims.len() - cs_dims.len();
    let stride_of = |a: usize| -> Option<Expr> {
        if a < skip || as_const(&cs_dims[a - skip]) == Some(1) {
            None
        } else {
            Some(cs_strides[a - skip].clone())
        }
    };
    b.for_("row", Expr::idx(0), rows, 1, LoopKind::Parallel, |b, row| {
        let xb = b.let_("xb", mul(row.clone(), Expr::idx(d)));
        let used: Vec<usize> = (0..lead.len()).filter(|&a| stride_of(a).is_some()).collect();
        let mut cb = Expr::i64(0);
        if !used.is_empty() {
            let idx = sym::unflatten(b, "ri", row, lead);
            for a in used {
                cb = add(cb, mul(idx[a].clone(), stride_of(a).unwrap()));
            }
        }
        let cb = b.let_("cb", cb);
        let xa = move |f: Expr| add(Expr::Var(xb), f);
        let ca = move |f: Expr| add(Expr::Var(cb), f);
        // Products rounded separately and then added, as the reference does.
        let rot = |b: &mut Builder, f: Expr, partner: Expr, sign: f32, lanes: u8| {
            let xv = Expr::load(x, xa(f.clone()), lanes) * Expr::load(cos, ca(f.clone()), lanes);
            let pv = Expr::load(x, xa(partner), lanes) * widen(Expr::f32(sign), lanes);
            b.store(y, xa(f.clone()), xv + pv * Expr::load(sin, ca(f), lanes));
        };
        let h = r / 2;
        if interleaved {
            b.for_("i", Expr::idx(0), Expr::idx(h), 1, LoopKind::Serial, |b, i| {
                let f0 = b.let_("f0", i * Expr::idx(2));
                let f1 = Expr::Var(f0) + Expr::idx(1);
                rot(b, Expr::Var(f0), f1.clone(), -1.0, 1);
                rot(b, f1, Expr::Var(f0), 1.0, 1);
            });
        } else {
            vec_loop(b, "f", h, LANES, |b, f, lanes| {
                let g = add(f.clone(), Expr::idx(h));
                rot(b, f.clone(), g.clone(), -1.0, lanes);
                rot(b, g, f, 1.0, lanes);
            });
        }
        if r < d {
            sym::vec_range(b, "pass", Expr::idx(r), Expr::idx(d), |b, f, lanes| {
                b.store(y, xa(f.clone()), Expr::load(x, xa(f), lanes));
            });
        }
    });
}
