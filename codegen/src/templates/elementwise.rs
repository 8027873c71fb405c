//! Elementwise templates: unary ops over a flat buffer and binary ops on a
//! `[rows, cols]` operand with the other operand broadcast along a
//! contiguous inner dimension (full, a row vector, a column, a scalar).

use super::{c, vec_loop, widen, LANES};
use crate::kir::{Builder, Expr, Kernel, KirError, LoopKind, UnOp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Sqrt,
    Rsqrt,
    Tanh,
    Relu,
    Sigmoid,
}

impl UnaryOp {
    /// The op applied to `x` of width `lanes`.
    pub fn apply(self, x: Expr, lanes: u8) -> Expr {
        match self {
            UnaryOp::Neg => x.un(UnOp::Neg),
            UnaryOp::Abs => x.un(UnOp::Abs),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => x.rsqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Relu => x.max(c(0.0, lanes)),
            UnaryOp::Sigmoid => c(1.0, lanes) / (c(1.0, lanes) + (-x).exp()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

impl BinaryOp {
    pub fn apply(self, a: Expr, b: Expr) -> Expr {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
        }
    }
}

/// How the second operand of a binary op is laid out against `[rows, cols]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bcast {
    /// `[rows, cols]`, same as the first operand.
    Full,
    /// `[cols]`, the same row for every row.
    Row,
    /// `[rows]` (a `[rows, 1]` tensor), one value per row.
    Col,
    /// One value.
    Scalar,
}

/// `y = op(x)` over `n` elements, split into `rows` parallel rows of
/// `n / rows` (`rows` must divide `n`; it is the unit of thread work).
pub fn unary(op: UnaryOp, n: usize, rows: usize) -> Result<Kernel, KirError> {
    assert!(rows > 0 && n.is_multiple_of(rows), "rows must divide n");
    let cols = n / rows;
    let mut b = Builder::new(&format!("{}_{n}", format!("{op:?}").to_lowercase()));
    let x = b.input("x", n);
    let y = b.output("y", n);
    b.for_("r", Expr::idx(0), Expr::idx(rows), 1, LoopKind::Parallel, |b, r| {
        let base = b.let_("base", r * Expr::idx(cols));
        vec_loop(b, "j", cols, LANES, |b, j, w| {
            let i = Expr::Var(base) + j;
            b.store(y, i.clone(), op.apply(Expr::load(x, i, w), w));
        });
    });
    b.finish()
}

/// `y = op(a, b)` with `a: [rows, cols]` and `b` laid out as `bcast` says.
pub fn binary(op: BinaryOp, rows: usize, cols: usize, bcast: Bcast) -> Result<Kernel, KirError> {
    let blen = match bcast {
        Bcast::Full => rows * cols,
        Bcast::Row => cols,
        Bcast::Col => rows,
        Bcast::Scalar => 1,
    };
    let name = format!("{}_{rows}x{cols}_{}", format!("{op:?}").to_lowercase(), format!("{bcast:?}").to_lowercase());
    let mut k = Builder::new(&name);
    let a = k.input("a", rows * cols);
    let bb = k.input("b", blen);
    let y = k.output("y", rows * cols);
    k.for_("r", Expr::idx(0), Expr::idx(rows), 1, LoopKind::Parallel, |k, r| {
        let base = k.let_("base", r.clone() * Expr::idx(cols));
        // A per-row operand is loaded once per row, outside the inner loop.
        let per_row = match bcast {
            Bcast::Col => Some(k.let_("bv", Expr::load(bb, r, 1))),
            Bcast::Scalar => Some(k.let_("bv", Expr::load(bb, Expr::idx(0), 1))),
            _ => None,
        };
        vec_loop(k, "j", cols, LANES, |k, j, w| {
            let i = Expr::Var(base) + j.clone();
            let rhs = match (bcast, per_row) {
                (Bcast::Full, _) => Expr::load(bb, i.clone(), w),
                (Bcast::Row, _) => Expr::load(bb, j, w),
                (_, Some(v)) => widen(Expr::Var(v), w),
                _ => unreachable!(),
            };
            k.store(y, i.clone(), op.apply(Expr::load(a, i, w), rhs));
        });
    });
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::testing::*;
    use smelt_ir::Op;

    #[test]
    fn unary_matches_reference() {
        let ops = [
            (UnaryOp::Neg, Op::Neg {}),
            (UnaryOp::Abs, Op::Abs {}),
            (UnaryOp::Exp, Op::Exp {}),
            (UnaryOp::Sqrt, Op::Sqrt {}),
            (UnaryOp::Rsqrt, Op::Rsqrt {}),
            (UnaryOp::Tanh, Op::Tanh {}),
            (UnaryOp::Relu, Op::Relu {}),
            (UnaryOp::Sigmoid, Op::Sigmoid {}),
        ];
        for (op, irop) in ops {
            for (n, rows) in [(1, 1), (3, 1), (17, 1), (64, 4), (129, 3)] {
                let positive = matches!(op, UnaryOp::Sqrt | UnaryOp::Rsqrt);
                let x = if positive { rand_pos(n, 1) } else { rand(n, 1) };
                let k = unary(op, n, rows).unwrap();
                let want = reference(&irop, &[(&x, vec![n])]);
                let got = run_kir(&k, &[&x], 0);
                assert_close(&k.name, &got, &want, 1e-5, 1e-6);
            }
        }
    }

    #[test]
    fn binary_matches_reference() {
        let ops = [
            (BinaryOp::Add, Op::Add {}),
            (BinaryOp::Sub, Op::Sub {}),
            (BinaryOp::Mul, Op::Mul {}),
            (BinaryOp::Div, Op::Div {}),
            (BinaryOp::Max, Op::Max {}),
            (BinaryOp::Min, Op::Min {}),
        ];
        for (op, irop) in ops {
            for (rows, cols) in [(1, 1), (1, 3), (2, 17), (3, 64), (2, 129)] {
                for bcast in [Bcast::Full, Bcast::Row, Bcast::Col, Bcast::Scalar] {
                    let a = rand(rows * cols, 2);
                    let bshape = match bcast {
                        Bcast::Full => vec![rows, cols],
                        Bcast::Row => vec![cols],
                        Bcast::Col => vec![rows, 1],
                        Bcast::Scalar => vec![1],
                    };
                    let bv = rand_pos(bshape.iter().product(), 3);
                    let k = binary(op, rows, cols, bcast).unwrap();
                    let want = reference(&irop, &[(&a, vec![rows, cols]), (&bv, bshape)]);
                    let got = run_kir(&k, &[&a, &bv], 0);
                    assert_close(&k.name, &got, &want, 1e-5, 1e-6);
                }
            }
        }
    }

    #[test]
    fn prints_readably() {
        let k = binary(BinaryOp::Add, 2, 6, Bcast::Row).unwrap();
        let text = k.to_string();
        assert!(text.starts_with("kernel @add_2x6_row(a: f32[12], b: f32[6], y: mut f32[12]) {"), "{text}");
        assert!(text.contains("for r.0 in 0..2 parallel {"), "{text}");
        assert!(text.contains("step 4 vectorized(4)"), "{text}");
        assert!(text.contains("y[(base.1 + j.2)..+4] = (a[(base.1 + j.2)..+4] + b[j.2..+4])"), "{text}");
    }
}
