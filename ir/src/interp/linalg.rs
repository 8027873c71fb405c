//! `matmul` with numpy semantics: a 1-D left operand is a row vector and a
//! 1-D right operand a column vector (the added axis is dropped from the
//! result), leading dims are batch dims and broadcast. Floats accumulate in
//! f64 (products of f32 values are exact in f64) and are rounded once;
//! integers accumulate in i64 with wrapping.

use super::common::{broadcast_index, broadcast_shape, floats, from_f64s, from_i64s, ints, numel, OpResult};
use crate::Tensor;

pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> OpResult {
    if a.shape.is_empty() || b.shape.is_empty() {
        return Err("operands must have rank >= 1".into());
    }
    let (mut sa, mut sb) = (a.shape.clone(), b.shape.clone());
    let (a1, b1) = (sa.len() == 1, sb.len() == 1);
    if a1 {
        sa.insert(0, 1);
    }
    if b1 {
        sb.push(1);
    }
    let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
    let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
    if k != k2 {
        return Err(format!("contraction dims differ: {:?} · {:?}", a.shape, b.shape));
    }
    let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
    let batch = broadcast_shape(ba, bb)?;
    let nb = numel(&batch)?;
    numel(&[nb, m, n])?;
    // Which matrix of each operand every batch element reads.
    let (ia, ib) = (broadcast_index(ba, &batch), broadcast_index(bb, &batch));
    let mut shape = batch;
    if !a1 {
        shape.push(m);
    }
    if !b1 {
        shape.push(n);
    }
    if a.dtype.is_float() {
        let (x, y) = (floats(a), floats(b));
        let mut out = vec![0.0f64; nb * m * n];
        for bi in 0..nb {
            let (oa, ob, oc) = (ia[bi] * m * k, ib[bi] * k * n, bi * m * n);
            for i in 0..m {
                // Row i accumulates over p = 0..k in order for every column,
                // so each result is the plain left-to-right f64 dot product.
                let row = &mut out[oc + i * n..oc + (i + 1) * n];
                for p in 0..k {
                    let aip = x[oa + i * k + p];
                    let brow = &y[ob + p * n..ob + (p + 1) * n];
                    for (acc, &bpj) in row.iter_mut().zip(brow) {
                        *acc += aip * bpj;
                    }
                }
            }
        }
        Ok(from_f64s(a.dtype, shape, out))
    } else if a.dtype.is_int() {
        let (x, y) = (ints(a), ints(b));
        let mut out = vec![0i64; nb * m * n];
        for bi in 0..nb {
            let (oa, ob, oc) = (ia[bi] * m * k, ib[bi] * k * n, bi * m * n);
            for i in 0..m {
                for p in 0..k {
                    let aip = x[oa + i * k + p];
                    for j in 0..n {
                        let c = &mut out[oc + i * n + j];
                        *c = c.wrapping_add(aip.wrapping_mul(y[ob + p * n + j]));
                    }
                }
            }
        }
        Ok(from_i64s(a.dtype, shape, out))
    } else {
        Err(format!("needs numeric operands, found {}", a.dtype))
    }
}
