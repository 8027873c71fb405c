//! Constant folding: evaluates an op whose operands are all constants with the
//! reference interpreter (`smelt_ir::interp::eval_op`), so folding means
//! exactly what running the graph would compute.
//!
//! Only ops whose results have constant shapes and at most
//! [`super::builder::FOLD_LIMIT`] elements in total are folded; larger
//! results stay runtime ops rather than becoming large literals.

use super::builder::FOLD_LIMIT;
use smelt_ir::{Op, Tensor, TensorType};
use std::collections::BTreeMap;

/// Folds `op` applied to constant `operands` (their types gave `out_tys`).
/// `Ok(None)` means "not folded" (too large, or a symbolic shape); an error
/// means the op cannot succeed on these constants at all, which would also
/// fail at run time, so it is reported at import.
pub(crate) fn try_fold<'a>(
    op: &Op,
    operands: impl Iterator<Item = &'a Tensor>,
    out_tys: &[TensorType],
) -> Result<Option<Vec<Tensor>>, String> {
    if matches!(op, Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. }) {
        return Ok(None);
    }
    let mut total = 0usize;
    for t in out_tys {
        let Some(shape) = t.const_shape() else { return Ok(None) };
        let Some(n) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else { return Ok(None) };
        total = total.saturating_add(n);
    }
    if total > FOLD_LIMIT {
        return Ok(None);
    }
    let operands: Vec<&Tensor> = operands.collect();
    // Folding one op must not cost more than running it would; an input
    // that is itself huge (not possible for constants we create, but
    // possible for literals in a file) is left to run time.
    if operands.iter().map(|t| t.numel()).sum::<usize>() > 16 * FOLD_LIMIT {
        return Ok(None);
    }
    smelt_ir::interp::eval_op(op, &operands, &BTreeMap::new())
        .map(Some)
        .map_err(|e| format!("evaluating constant operands: {e}"))
}
