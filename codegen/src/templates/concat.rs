//! Concatenation of two tensors along an axis (the reference semantics of
//! `kv_append`): each of the `outer` rows of the result is a row of the
//! first operand followed by a row of the second. One parallel iteration per
//! outer row; f32 rows are copied with vectors.
//!
//! [`append_rows`] is the general form, which also serves a KV cache kept in
//! place: the result's rows may be longer than the two parts (room for
//! positions not yet written), and only a prefix of the first operand's row
//! may be copied (none, when the result already holds it).

use super::sym::{self, add, mul};
use crate::kir::{Access, Builder, Expr, LoopKind, Scalar, Space};

/// Declares `a, b, out` of element type `elem` and builds the body: `outer`
/// rows of `a_inner` then `b_inner` elements (all `i64` expressions).
pub fn concat2(b: &mut Builder, elem: Scalar, outer: Expr, a_inner: Expr, b_inner: Expr) {
    let row = add(a_inner.clone(), b_inner.clone());
    append_rows(b, elem, outer, a_inner.clone(), a_inner, b_inner, row);
}

/// Declares `a, b, out` of element type `elem` and builds the body: for each
/// of the `outer` rows, the first `a_copy` elements of `a`'s row (rows of
/// `a_inner`) go to the start of `out`'s row (rows of `out_row`), and `b`'s
/// row (`b_inner`) goes to `a_inner` elements into it. The caller makes
/// sure `a_copy <= a_inner` and `a_inner + b_inner <= out_row`; elements of
/// `out` past them, and the first `a_inner` of a row when `a_copy` is 0, are
/// left as they are.
pub fn append_rows(
    b: &mut Builder,
    elem: Scalar,
    outer: Expr,
    a_inner: Expr,
    a_copy: Expr,
    b_inner: Expr,
    out_row: Expr,
) {
    let a = b.buffer("a", elem, mul(outer.clone(), a_inner.clone()), Space::Global, Access::Read);
    let bb = b.buffer("b", elem, mul(outer.clone(), b_inner.clone()), Space::Global, Access::Read);
    let out = b.buffer("out", elem, mul(outer.clone(), out_row.clone()), Space::Global, Access::Write);
    b.for_("o", Expr::i64(0), outer, 1, LoopKind::Parallel, |b, o| {
        let ob = b.let_("ob", mul(o.clone(), out_row.clone()));
        let ab = b.let_("ab", mul(o.clone(), a_inner.clone()));
        let bbase = b.let_("bb", mul(o, b_inner.clone()));
        let copy = |b: &mut Builder, src, sb: Expr, db: Expr, n: Expr| {
            let body = |b: &mut Builder, i: Expr, lanes: u8| {
                b.store(out, add(db.clone(), i.clone()), Expr::load(src, add(sb.clone(), i), lanes));
            };
            if elem == Scalar::F32 {
                sym::vec_range(b, "i", Expr::i64(0), n, body);
            } else {
                b.for_("i", Expr::i64(0), n, 1, LoopKind::Serial, |b, i| body(b, i, 1));
            }
        };
        copy(b, a, Expr::Var(ab), Expr::Var(ob), a_copy.clone());
        copy(b, bb, Expr::Var(bbase), add(Expr::Var(ob), a_inner.clone()), b_inner.clone());
    });
}
