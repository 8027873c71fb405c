//! Slices read in place by the transposes after them.
//!
//! A fused qkv projection is followed, per layer, by slices of its output
//! (the query, key and value columns), reshapes that split the columns
//! into heads, and transposes to head-major order. A slice that keeps one
//! dense block is a free view already (`select::layout`), but these keep a
//! block per row (`[batch, seq, 960] -> [batch, seq, 576]`), so each was a
//! copy kernel, and its transpose a second copy of the same elements. Here
//! such a slice becomes a [`Strided`] view of its operand's buffer, a
//! reshape that only splits axes carries it, and the transpose copies
//! straight from the operand: one launch instead of two, and one pass
//! over the elements instead of two.
//!
//! Assumes the scheduler asks [`deferrable`] before it defers a slice,
//! which proves that every use of the slice's result is such a transpose
//! (directly or through splitting reshapes), so nothing ever needs the
//! view as a buffer of its own.

use crate::select::elem_of;
use crate::templates::strided::{row_strides, View};
use smelt_ir::ops::infer::norm_axis;
use smelt_ir::{Dim, Graph, NodeId, Op, TensorType};

/// A value that is a strided view of another buffer's elements: `shape`
/// walked with `strides` from `offset`, in a buffer of `len` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Strided {
    pub len: Dim,
    pub offset: Dim,
    pub shape: Vec<Dim>,
    pub strides: Vec<Dim>,
}

/// The view a slice of `x` (with the op's `axes`, `starts` and `steps`)
/// takes of `x`'s elements, producing `out`; an error names an axis out
/// of range or a missing start or step.
pub fn slice(x: &TensorType, out: &TensorType, axes: &[i64], starts: &[Dim], steps: &[i64]) -> Result<Strided, String> {
    let rs = row_strides(&x.shape);
    let mut strides = rs.clone();
    let mut offset = Dim::c(0);
    for (i, &ax) in axes.iter().enumerate() {
        let a = norm_axis(ax, x.rank())?;
        let (Some(start), Some(&step)) = (starts.get(i), steps.get(i)) else {
            return Err(format!("axis {ax} has no start or step"));
        };
        strides[a] = rs[a].clone() * Dim::c(step);
        offset = offset + start.clone() * rs[a].clone();
    }
    Ok(Strided { len: Dim::product(&x.shape), offset, shape: out.shape.clone(), strides })
}

impl Strided {
    /// The same elements seen as `shape`, when that only splits axes of
    /// constant size into constant factors (`[b, s, 576] -> [b, s, 9, 64]`)
    /// and keeps the others as they are; `None` otherwise (merging axes of
    /// a strided view would need strides it does not have).
    pub fn reshape(&self, shape: &[Dim]) -> Option<Strided> {
        let mut strides = Vec::with_capacity(shape.len());
        let mut new = shape.iter();
        for (dim, stride) in self.shape.iter().zip(&self.strides) {
            let first = new.next()?;
            if first == dim {
                strides.push(stride.clone());
                continue;
            }
            // A constant axis split into constant factors, outermost first.
            let total = dim.as_const()?;
            let mut factors = vec![first.as_const()?];
            while factors.iter().product::<i64>() < total {
                factors.push(new.next()?.as_const()?);
            }
            if factors.iter().product::<i64>() != total {
                return None;
            }
            for i in 0..factors.len() {
                strides.push(stride.clone() * Dim::c(factors[i + 1..].iter().product()));
            }
        }
        // Trailing axes of size 1 may follow.
        for d in new {
            if d != &Dim::c(1) {
                return None;
            }
            strides.push(Dim::c(0));
        }
        Some(Strided { shape: shape.to_vec(), strides, ..self.clone() })
    }

    /// These elements as a view of their buffer, for a copy kernel of
    /// `x`'s dtype.
    pub fn view(&self, x: &TensorType) -> View {
        View {
            elem: elem_of(x.dtype),
            len: self.len.clone(),
            offset: self.offset.clone(),
            strides: self.strides.clone(),
        }
    }

    /// The view a transpose by `perm` of these elements reads, for the
    /// copy kernel of `x`'s dtype.
    pub fn transpose(&self, x: &TensorType, perm: &[i64]) -> Option<View> {
        let strides = perm
            .iter()
            .map(|&p| norm_axis(p, self.shape.len()).ok().map(|a| self.strides[a].clone()))
            .collect::<Option<Vec<_>>>()?;
        Some(View { strides, ..self.view(x) })
    }
}

/// Whether slice node `n` may be deferred: its result is no graph output
/// and every use of it is a transpose, or a reshape that [`Strided::reshape`]
/// can carry whose every use is a transpose.
pub fn deferrable(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    let (Op::Slice { axes, starts, steps, .. }, [x], [v]) = (&node.op, &node.inputs[..], &node.outputs[..]) else {
        return false;
    };
    let Ok(view) = slice(g.ty(*x), g.ty(*v), axes, starts, steps) else { return false };
    // No graph output, at least one use, and every use passing `ok`.
    let used_only_by = |v, ok: &dyn Fn(&smelt_ir::Node) -> bool| {
        let users = g.users(v);
        !g.is_output(v) && !users.is_empty() && users.iter().all(|&(u, _)| ok(g.node(u)))
    };
    let transpose = |u: &smelt_ir::Node| matches!(u.op, Op::Transpose { .. });
    used_only_by(*v, &|u| match &u.op {
        Op::Transpose { .. } => true,
        Op::Reshape { .. } => {
            let out = u.outputs[0];
            view.reshape(&g.ty(out).shape).is_some() && used_only_by(out, &transpose)
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::DType;

    fn ty(dims: &[Dim]) -> TensorType {
        TensorType::new(DType::F32, dims.to_vec())
    }

    /// The query columns of a fused qkv output, split into heads and
    /// transposed to head-major order: read from the qkv buffer directly.
    #[test]
    fn a_column_slice_split_into_heads_transposes_from_its_operand() {
        let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
        let qkv = ty(&[b.clone(), s.clone(), Dim::c(960)]);
        let k = ty(&[b.clone(), s.clone(), Dim::c(192)]);
        let view = slice(&qkv, &k, &[-1], &[Dim::c(576)], &[1]).unwrap();
        assert!(slice(&qkv, &k, &[3], &[Dim::c(576)], &[1]).is_err(), "axis 3 of a rank-3 value");
        assert_eq!(view.offset, Dim::c(576));
        let heads = view.reshape(&[b.clone(), s.clone(), Dim::c(3), Dim::c(64)]).unwrap();
        assert_eq!(heads.strides, vec![s.clone() * Dim::c(960), Dim::c(960), Dim::c(64), Dim::c(1)]);
        let t = heads.transpose(&qkv, &[0, 2, 1, 3]).unwrap();
        assert_eq!(t.strides, vec![s.clone() * Dim::c(960), Dim::c(64), Dim::c(960), Dim::c(1)]);
        assert_eq!((t.len, t.offset), (b * s * Dim::c(960), Dim::c(576)));
    }

    #[test]
    fn reshapes_that_merge_or_do_not_factor_are_not_carried() {
        let v = Strided {
            len: Dim::c(960),
            offset: Dim::c(0),
            shape: vec![Dim::c(2), Dim::c(576)],
            strides: vec![Dim::c(960), Dim::c(1)],
        };
        assert!(v.reshape(&[Dim::c(1152)]).is_none(), "merging strided axes");
        assert!(v.reshape(&[Dim::c(2), Dim::c(5), Dim::c(100)]).is_none(), "576 is not 5 x 100");
        assert!(v.reshape(&[Dim::c(2), Dim::c(576), Dim::c(2)]).is_none(), "a trailing axis that is not 1");
        let split = v.reshape(&[Dim::c(2), Dim::c(9), Dim::c(64), Dim::c(1)]).unwrap();
        assert_eq!(split.strides, vec![Dim::c(960), Dim::c(64), Dim::c(1), Dim::c(0)]);
    }
}
