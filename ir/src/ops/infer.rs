//! Shape and dtype inference, one function per family of ops. Each takes
//! the operand types (the arity is already checked) and the op's attributes,
//! and returns the output types or a message saying what was expected and
//! what was found. Symbolic dims are compared by canonical form; a symbol is
//! never assumed to be 1, so broadcasting `seq` against `1` works but `seq`
//! against `past` does not.

use crate::tensor::Tensor;
use crate::types::{ShapeDisplay, TensorType};
use crate::{DType, Dim};

type R = Result<Vec<TensorType>, String>;

fn one(t: TensorType) -> R {
    Ok(vec![t])
}

/// Normalises a possibly negative axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// numpy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, String> {
    let n = a.len().max(b.len());
    let one = Dim::c(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n { &a[i + a.len() - n] } else { &one };
        let db = if i + b.len() >= n { &b[i + b.len() - n] } else { &one };
        out.push(if da == db || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else {
            return Err(format!(
                "shapes {} and {} do not broadcast (dim {da} vs {db})",
                ShapeDisplay(a),
                ShapeDisplay(b)
            ));
        });
    }
    Ok(out)
}

pub fn declared(_inputs: &[&TensorType], _name: &str) -> R {
    Ok(Vec::new())
}

pub fn constant(_inputs: &[&TensorType], value: &Tensor) -> R {
    one(TensorType::fixed(value.dtype, &value.shape))
}

pub fn fill(_inputs: &[&TensorType], shape: &[Dim], _value: &f64, dtype: &DType) -> R {
    one(TensorType::new(*dtype, shape.to_vec()))
}

pub fn range(_inputs: &[&TensorType], start: &Dim, end: &Dim, step: &i64, dtype: &DType) -> R {
    if *step == 0 {
        return Err("step must not be 0".into());
    }
    if !(dtype.is_int() || dtype.is_float()) {
        return Err(format!("dtype must be numeric, found {dtype}"));
    }
    let span = end.clone() - start.clone();
    let len = if *step > 0 { span.ceil_div(*step) } else { (-span).ceil_div(-step) };
    if let Some(n) = len.as_const() {
        if n < 0 {
            return one(TensorType::fixed(*dtype, &[0]));
        }
    }
    one(TensorType::new(*dtype, vec![len]))
}

/// Trilu keeps its operand's type; it is defined on numbers and bools alike.
pub fn trilu(inputs: &[&TensorType], _upper: &bool, _k: &Dim) -> R {
    if inputs[0].rank() < 2 {
        return Err(format!("needs rank >= 2, found {}", inputs[0]));
    }
    one(inputs[0].clone())
}

pub fn unary_numeric(inputs: &[&TensorType]) -> R {
    let x = inputs[0];
    if x.dtype.is_bool() {
        return Err(format!("needs a numeric operand, found {x}"));
    }
    one(x.clone())
}

pub fn unary_float(inputs: &[&TensorType]) -> R {
    let x = inputs[0];
    if !x.dtype.is_float() {
        return Err(format!("needs a float operand, found {x}"));
    }
    one(x.clone())
}

pub fn unary_bool(inputs: &[&TensorType]) -> R {
    let x = inputs[0];
    if !x.dtype.is_bool() {
        return Err(format!("needs a bool operand, found {x}"));
    }
    one(x.clone())
}

pub fn float_predicate(inputs: &[&TensorType]) -> R {
    let x = inputs[0];
    if !x.dtype.is_float() {
        return Err(format!("needs a float operand, found {x}"));
    }
    one(x.with_dtype(DType::Bool))
}

fn same_dtype(a: &TensorType, b: &TensorType) -> Result<(), String> {
    if a.dtype != b.dtype {
        return Err(format!("operand dtypes differ: {a} vs {b}"));
    }
    Ok(())
}

pub fn binary_numeric(inputs: &[&TensorType]) -> R {
    let (a, b) = (inputs[0], inputs[1]);
    same_dtype(a, b)?;
    if a.dtype.is_bool() {
        return Err(format!("needs numeric operands, found {a}"));
    }
    one(TensorType::new(a.dtype, broadcast_shapes(&a.shape, &b.shape)?))
}

pub fn pow(inputs: &[&TensorType]) -> R {
    let (a, b) = (inputs[0], inputs[1]);
    if a.dtype.is_bool() || b.dtype.is_bool() {
        return Err(format!("needs numeric operands, found {a} and {b}"));
    }
    one(TensorType::new(a.dtype, broadcast_shapes(&a.shape, &b.shape)?))
}

pub fn compare(inputs: &[&TensorType]) -> R {
    let (a, b) = (inputs[0], inputs[1]);
    same_dtype(a, b)?;
    one(TensorType::new(DType::Bool, broadcast_shapes(&a.shape, &b.shape)?))
}

pub fn logical(inputs: &[&TensorType]) -> R {
    let (a, b) = (inputs[0], inputs[1]);
    if !a.dtype.is_bool() || !b.dtype.is_bool() {
        return Err(format!("needs bool operands, found {a} and {b}"));
    }
    one(TensorType::new(DType::Bool, broadcast_shapes(&a.shape, &b.shape)?))
}

pub fn where_(inputs: &[&TensorType]) -> R {
    let (c, a, b) = (inputs[0], inputs[1], inputs[2]);
    if !c.dtype.is_bool() {
        return Err(format!("condition must be bool, found {c}"));
    }
    same_dtype(a, b)?;
    let s = broadcast_shapes(&c.shape, &a.shape)?;
    one(TensorType::new(a.dtype, broadcast_shapes(&s, &b.shape)?))
}

pub fn cast(inputs: &[&TensorType], to: &DType) -> R {
    one(inputs[0].with_dtype(*to))
}

fn axes_set(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for &a in axes {
        let n = norm_axis(a, rank)?;
        if out.contains(&n) {
            return Err(format!("axis {a} is listed twice"));
        }
        out.push(n);
    }
    Ok(out)
}

pub fn reduce(inputs: &[&TensorType], axes: &[i64], keepdims: &bool) -> R {
    let x = inputs[0];
    if x.dtype.is_bool() {
        return Err(format!("needs a numeric operand, found {x}"));
    }
    let ax = axes_set(axes, x.rank())?;
    let mut shape = Vec::new();
    for (i, d) in x.shape.iter().enumerate() {
        if ax.contains(&i) {
            if *keepdims {
                shape.push(Dim::c(1));
            }
        } else {
            shape.push(d.clone());
        }
    }
    one(TensorType::new(x.dtype, shape))
}

pub fn argmax(inputs: &[&TensorType], axis: &i64, keepdims: &bool) -> R {
    let x = inputs[0];
    let t = reduce(&[x], &[*axis], keepdims)?;
    one(t[0].with_dtype(DType::I64))
}

pub fn matmul(inputs: &[&TensorType]) -> R {
    let (a, b) = (inputs[0], inputs[1]);
    same_dtype(a, b)?;
    if a.dtype.is_bool() || a.rank() == 0 || b.rank() == 0 {
        return Err(format!("needs numeric operands of rank >= 1, found {a} and {b}"));
    }
    let mut sa = a.shape.clone();
    let mut sb = b.shape.clone();
    let (a1, b1) = (sa.len() == 1, sb.len() == 1);
    if a1 {
        sa.insert(0, Dim::c(1));
    }
    if b1 {
        sb.push(Dim::c(1));
    }
    let (m, k) = (&sa[sa.len() - 2], &sa[sa.len() - 1]);
    let (k2, n) = (&sb[sb.len() - 2], &sb[sb.len() - 1]);
    if k != k2 {
        return Err(format!("contraction dims differ: {a} · {b} ({k} vs {k2})"));
    }
    let mut shape = broadcast_shapes(&sa[..sa.len() - 2], &sb[..sb.len() - 2])?;
    if !a1 {
        shape.push(m.clone());
    }
    if !b1 {
        shape.push(n.clone());
    }
    one(TensorType::new(a.dtype, shape))
}

pub fn reshape(inputs: &[&TensorType], shape: &[Dim]) -> R {
    let x = inputs[0];
    let from = Dim::product(&x.shape);
    let to = Dim::product(shape);
    if from != to {
        return Err(format!(
            "element counts differ: {} has {from}, target {} has {to}",
            ShapeDisplay(&x.shape),
            ShapeDisplay(shape)
        ));
    }
    one(TensorType::new(x.dtype, shape.to_vec()))
}

pub fn transpose(inputs: &[&TensorType], perm: &[i64]) -> R {
    let x = inputs[0];
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() {
        return Err(format!("perm {perm:?} has {} entries for rank {}", perm.len(), x.rank()));
    }
    let mut shape = Vec::new();
    for &p in perm {
        let a = norm_axis(p, x.rank())?;
        if std::mem::replace(&mut seen[a], true) {
            return Err(format!("perm {perm:?} is not a permutation"));
        }
        shape.push(x.shape[a].clone());
    }
    one(TensorType::new(x.dtype, shape))
}

/// Length of `start..end` by `step` (both already in range).
pub fn slice_len(start: &Dim, end: &Dim, step: i64) -> Dim {
    let span = end.clone() - start.clone();
    let len = if step > 0 { span.ceil_div(step) } else { (-span).ceil_div(-step) };
    match len.as_const() {
        Some(n) if n < 0 => Dim::c(0),
        _ => len,
    }
}

pub fn slice(inputs: &[&TensorType], axes: &[i64], starts: &[Dim], ends: &[Dim], steps: &[i64]) -> R {
    let x = inputs[0];
    if starts.len() != axes.len() || ends.len() != axes.len() || steps.len() != axes.len() {
        return Err(format!(
            "axes, starts, ends and steps need equal lengths, found {}, {}, {}, {}",
            axes.len(),
            starts.len(),
            ends.len(),
            steps.len()
        ));
    }
    let ax = axes_set(axes, x.rank())?;
    let mut shape = x.shape.clone();
    for (i, &a) in ax.iter().enumerate() {
        let (s, e, st) = (&starts[i], &ends[i], steps[i]);
        if st == 0 {
            return Err("step must not be 0".into());
        }
        if let (Some(s), Some(e), Some(d)) = (s.as_const(), e.as_const(), x.shape[a].as_const()) {
            let ok =
                if st > 0 { 0 <= s && s <= d && 0 <= e && e <= d } else { 0 <= s && s < d.max(1) && -1 <= e && e < d };
            if !ok {
                return Err(format!("slice {s}:{e}:{st} is out of range for axis {a} of size {d}"));
            }
        }
        shape[a] = slice_len(s, e, st);
    }
    one(TensorType::new(x.dtype, shape))
}

pub fn concat(inputs: &[&TensorType], axis: &i64) -> R {
    let first = inputs.first().ok_or("needs at least one operand")?;
    let a = norm_axis(*axis, first.rank())?;
    let mut total = Dim::c(0);
    for t in inputs {
        if t.dtype != first.dtype || t.rank() != first.rank() {
            return Err(format!("operands differ: {first} vs {t}"));
        }
        for (i, (x, y)) in first.shape.iter().zip(&t.shape).enumerate() {
            if i != a && x != y {
                return Err(format!("operands differ outside axis {a}: {first} vs {t}"));
            }
        }
        total = total + t.shape[a].clone();
    }
    let mut shape = first.shape.clone();
    shape[a] = total;
    one(TensorType::new(first.dtype, shape))
}

pub fn expand(inputs: &[&TensorType], shape: &[Dim]) -> R {
    let x = inputs[0];
    one(TensorType::new(x.dtype, broadcast_shapes(&x.shape, shape)?))
}

pub fn squeeze(inputs: &[&TensorType], axes: &[i64]) -> R {
    let x = inputs[0];
    let ax = axes_set(axes, x.rank())?;
    for &a in &ax {
        if x.shape[a] != Dim::c(1) {
            return Err(format!("axis {a} of {x} is not 1"));
        }
    }
    let shape = x.shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, d)| d.clone()).collect();
    one(TensorType::new(x.dtype, shape))
}

pub fn unsqueeze(inputs: &[&TensorType], axes: &[i64]) -> R {
    let x = inputs[0];
    let rank = x.rank() + axes.len();
    let ax = axes_set(axes, rank)?;
    let mut src = x.shape.iter();
    let shape =
        (0..rank).map(|i| if ax.contains(&i) { Dim::c(1) } else { src.next().cloned().unwrap_or(Dim::c(1)) }).collect();
    one(TensorType::new(x.dtype, shape))
}

fn int_indices(t: &TensorType) -> Result<(), String> {
    if !matches!(t.dtype, DType::I64 | DType::I32) {
        return Err(format!("indices must be i64 or i32, found {t}"));
    }
    Ok(())
}

pub fn gather(inputs: &[&TensorType], axis: &i64) -> R {
    let (d, idx) = (inputs[0], inputs[1]);
    int_indices(idx)?;
    let a = norm_axis(*axis, d.rank())?;
    let mut shape = d.shape[..a].to_vec();
    shape.extend(idx.shape.iter().cloned());
    shape.extend(d.shape[a + 1..].iter().cloned());
    one(TensorType::new(d.dtype, shape))
}

pub fn gather_elements(inputs: &[&TensorType], axis: &i64) -> R {
    let (d, idx) = (inputs[0], inputs[1]);
    int_indices(idx)?;
    norm_axis(*axis, d.rank())?;
    if idx.rank() != d.rank() {
        return Err(format!("indices rank must equal data rank: {idx} vs {d}"));
    }
    one(TensorType::new(d.dtype, idx.shape.clone()))
}

pub fn scatter_elements(inputs: &[&TensorType], axis: &i64) -> R {
    let (d, idx, u) = (inputs[0], inputs[1], inputs[2]);
    int_indices(idx)?;
    norm_axis(*axis, d.rank())?;
    if idx.shape != u.shape || u.dtype != d.dtype || idx.rank() != d.rank() {
        return Err(format!("indices and updates must match each other and data's rank: {d}, {idx}, {u}"));
    }
    one(d.clone())
}

pub fn scatter_nd(inputs: &[&TensorType]) -> R {
    let (d, idx, u) = (inputs[0], inputs[1], inputs[2]);
    int_indices(idx)?;
    let k = idx
        .shape
        .last()
        .and_then(|k| k.as_const())
        .ok_or_else(|| format!("indices' last dim must be constant, found {idx}"))?;
    if idx.rank() == 0 || k < 0 || k as usize > d.rank() {
        return Err(format!("indices {idx} do not address data {d}"));
    }
    let mut want = idx.shape[..idx.rank() - 1].to_vec();
    want.extend(d.shape[k as usize..].iter().cloned());
    if u.shape != want || u.dtype != d.dtype {
        return Err(format!("updates must be {}{}, found {u}", d.dtype, ShapeDisplay(&want)));
    }
    one(d.clone())
}

pub fn cumsum(inputs: &[&TensorType], axis: &i64, _exclusive: &bool, _reverse: &bool) -> R {
    let x = inputs[0];
    norm_axis(*axis, x.rank())?;
    unary_numeric(inputs)
}

pub fn norm(inputs: &[&TensorType], _eps: &f64) -> R {
    let x = inputs[0];
    if !x.dtype.is_float() || x.rank() == 0 {
        return Err(format!("needs a float operand of rank >= 1, found {x}"));
    }
    let last = x.shape.last().cloned().unwrap_or(Dim::c(1));
    for p in &inputs[1..] {
        if p.shape != [last.clone()] {
            return Err(format!("parameters must be [{last}], found {p}"));
        }
    }
    one(x.clone())
}

pub fn add_rms_norm(inputs: &[&TensorType], eps: &f64) -> R {
    let (x, r) = (inputs[0], inputs[1]);
    if x != r {
        return Err(format!("x and residual must have one type, found {x} and {r}"));
    }
    let n = norm(&[x, inputs[2]], eps)?;
    Ok(vec![x.clone(), n[0].clone()])
}

pub fn rope(inputs: &[&TensorType], _interleaved: &bool) -> R {
    let (x, c, s) = (inputs[0], inputs[1], inputs[2]);
    if !x.dtype.is_float() || c.dtype != x.dtype || s.dtype != x.dtype {
        return Err(format!("x, cos and sin must share a float dtype, found {x}, {c}, {s}"));
    }
    if c.shape != s.shape || c.rank() != x.rank() || x.rank() == 0 {
        return Err(format!("cos and sin must match each other and x's rank, found {x}, {c}, {s}"));
    }
    let rot = c
        .shape
        .last()
        .and_then(|d| d.as_const())
        .ok_or_else(|| format!("cos's last dim must be constant, found {c}"))?;
    let d =
        x.shape.last().and_then(|d| d.as_const()).ok_or_else(|| format!("x's last dim must be constant, found {x}"))?;
    if rot % 2 != 0 || rot > d || rot == 0 {
        return Err(format!("rotary dim {rot} must be even, positive and at most x's last dim {d}"));
    }
    let mut xs = x.shape.clone();
    *xs.last_mut().unwrap_or(&mut Dim::c(0)) = Dim::c(rot);
    let b = broadcast_shapes(&xs, &c.shape)?;
    if b != xs {
        return Err(format!("cos/sin {c} do not broadcast to x's rotated part {}", ShapeDisplay(&xs)));
    }
    one(x.clone())
}

pub fn attention(
    inputs: &[&TensorType],
    _scale: &f64,
    _causal: &bool,
    window: &Option<i64>,
    softcap: &Option<f64>,
) -> R {
    let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
    if inputs.len() > 4 {
        return Err(format!("takes at most one mask, found {}", inputs.len() - 3));
    }
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(format!("q, k and v must be [batch, heads, seq, dim], found {q}, {k}, {v}"));
    }
    if !q.dtype.is_float() || k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(format!("q, k and v must share a float dtype, found {q}, {k}, {v}"));
    }
    if q.shape[0] != k.shape[0]
        || k.shape[0] != v.shape[0]
        || k.shape[1] != v.shape[1]
        || k.shape[2] != v.shape[2]
        || q.shape[3] != k.shape[3]
    {
        return Err(format!("q, k and v do not fit together: {q}, {k}, {v}"));
    }
    match (q.shape[1].as_const(), k.shape[1].as_const()) {
        (Some(hq), Some(hk)) if hk > 0 && hq % hk == 0 => {}
        _ => return Err(format!("query heads {} must be a constant multiple of kv heads {}", q.shape[1], k.shape[1])),
    }
    if matches!(window, Some(w) if *w <= 0) || matches!(softcap, Some(c) if *c <= 0.0) {
        return Err("window and softcap must be positive".into());
    }
    if let Some(m) = inputs.get(3) {
        let want = [q.shape[0].clone(), q.shape[1].clone(), q.shape[2].clone(), k.shape[2].clone()];
        let b = broadcast_shapes(&m.shape, &want)?;
        if b != want || !(m.dtype.is_bool() || m.dtype == q.dtype) {
            return Err(format!("mask {m} must be bool or {} and broadcast to {}", q.dtype, ShapeDisplay(&want)));
        }
    }
    let mut shape = q.shape.clone();
    shape[3] = v.shape[3].clone();
    one(TensorType::new(q.dtype, shape))
}

pub fn gated_mlp(inputs: &[&TensorType], act: &str) -> R {
    if !matches!(act, "silu" | "gelu_tanh" | "gelu") {
        return Err(format!("act must be silu, gelu_tanh or gelu, found `{act}`"));
    }
    let (x, g, u) = (inputs[0], inputs[1], inputs[2]);
    if g != u || g.rank() != 2 {
        return Err(format!("w_gate and w_up must be one [in, out] type, found {g} and {u}"));
    }
    matmul(&[x, g])
}

pub fn same_float(inputs: &[&TensorType], axis: &i64) -> R {
    norm_axis(*axis, inputs[0].rank())?;
    unary_float(inputs)
}

pub fn kv_append(inputs: &[&TensorType], axis: &i64) -> R {
    concat(inputs, axis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TensorType {
        // "f32 batch,seq,64"
        let (d, sh) = s.split_once(' ').unwrap_or((s, ""));
        let shape = if sh.is_empty() { vec![] } else { sh.split(',').map(|x| x.parse().unwrap()).collect() };
        TensorType::new(d.parse().unwrap(), shape)
    }

    #[test]
    fn broadcasting_with_symbols() {
        assert_eq!(binary_numeric(&[&t("f32 batch,seq,64"), &t("f32 64")]).unwrap()[0], t("f32 batch,seq,64"));
        assert_eq!(binary_numeric(&[&t("f32 batch,1,64"), &t("f32 seq,1")]).unwrap()[0], t("f32 batch,seq,64"));
        assert!(binary_numeric(&[&t("f32 seq"), &t("f32 past")]).is_err());
        assert!(binary_numeric(&[&t("f32 seq"), &t("i64 seq")]).is_err());
    }

    #[test]
    fn matmul_and_reshape() {
        assert_eq!(matmul(&[&t("f32 batch,seq,64"), &t("f32 64,128")]).unwrap()[0], t("f32 batch,seq,128"));
        assert!(matmul(&[&t("f32 batch,seq,64"), &t("f32 32,128")]).is_err());
        let r = reshape(&[&t("f32 batch,seq,64")], &[Dim::sym("batch"), Dim::sym("seq"), Dim::c(4), Dim::c(16)]);
        assert_eq!(r.unwrap()[0], t("f32 batch,seq,4,16"));
        assert!(reshape(&[&t("f32 batch,seq,64")], &[Dim::sym("seq"), Dim::c(64)]).is_err());
    }

    #[test]
    fn concat_adds_symbolic_lengths() {
        let r = concat(&[&t("f32 b,2,past,16"), &t("f32 b,2,seq,16")], &2).unwrap();
        assert_eq!(r[0], t("f32 b,2,past+seq,16"));
    }

    #[test]
    fn slice_and_range_lengths() {
        let r = slice(&[&t("f32 4,10")], &[1], &[Dim::c(2)], &[Dim::c(9)], &[3]).unwrap();
        assert_eq!(r[0], t("f32 4,3"));
        assert!(slice(&[&t("f32 4,10")], &[1], &[Dim::c(2)], &[Dim::c(11)], &[1]).is_err());
        let r = range(&[], &Dim::sym("past"), &(Dim::sym("past") + Dim::sym("seq")), &1, &DType::I64).unwrap();
        assert_eq!(r[0], t("i64 seq"));
    }

    #[test]
    fn attention_checks_gqa_and_mask() {
        let q = t("f32 b,4,seq,16");
        let k = t("f32 b,2,past+seq,16");
        let m = t("bool 1,1,seq,past+seq");
        let r = attention(&[&q, &k, &k, &m], &0.25, &false, &None, &None).unwrap();
        assert_eq!(r[0], q);
        assert!(attention(&[&q, &t("f32 b,3,seq,16"), &t("f32 b,3,seq,16")], &0.25, &true, &None, &None).is_err());
    }
}
