//! Sources with a computed shape (`fill`, `range`) and movement ops: reshape,
//! transpose, slice, concat, expand, squeeze/unsqueeze, gather,
//! gather_elements, scatter_elements, scatter_nd and trilu.
//!
//! Dims arrive already evaluated with the bound symbols (see
//! `interp::specialise`). Data is never converted here: each op computes the
//! list of source indices once and takes the elements, so movement is exact
//! for every dtype. Index operands are bounds-checked and reported, never
//! trusted; negative indices count from the end where the op allows them.

use super::common::{
    axis, broadcast_index, broadcast_shape, concat_data, from_f64s, from_i64s, ints, numel, row_strides, split_at_axis,
    strided_indices, take, OpResult,
};
use crate::{DType, Data, Tensor};

fn dims(name: &str, v: &[i64]) -> OpResult<Vec<usize>> {
    v.iter().map(|&d| usize::try_from(d).map_err(|_| format!("{name} {v:?} has a negative dim"))).collect()
}

pub(crate) fn fill(shape: &[i64], value: f64, dtype: DType) -> OpResult {
    let shape = dims("shape", shape)?;
    let n = numel(&shape)?;
    Ok(from_f64s(dtype, shape, vec![value; n]))
}

/// start, start+step, ... below end (above it for a negative step).
pub(crate) fn range(start: i64, end: i64, step: i64, dtype: DType) -> OpResult {
    if step == 0 {
        return Err("step must not be 0".into());
    }
    // i128 keeps the length computation free of overflow for any i64 inputs.
    let (s, e, st) = (start as i128, end as i128, step as i128);
    let span = if st > 0 { e - s } else { s - e };
    let len = ((span + st.abs() - 1).div_euclid(st.abs())).max(0);
    let len = usize::try_from(len).map_err(|_| format!("range {start}..{end} by {step} is too long"))?;
    numel(&[len])?;
    let v = (0..len as i128).map(|i| (s + i * st) as i64).collect();
    Ok(from_i64s(dtype, vec![len], v))
}

pub(crate) fn reshape(x: &Tensor, shape: &[i64]) -> OpResult {
    let shape = dims("shape", shape)?;
    if numel(&shape)? != x.numel() {
        return Err(format!("cannot reshape {:?} ({} elements) to {shape:?}", x.shape, x.numel()));
    }
    Ok(Tensor { dtype: x.dtype, shape, data: x.data.clone() })
}

pub(crate) fn transpose(x: &Tensor, perm: &[i64]) -> OpResult {
    let rank = x.shape.len();
    if perm.len() != rank {
        return Err(format!("perm {perm:?} does not fit rank {rank}"));
    }
    let src = row_strides(&x.shape);
    let mut seen = vec![false; rank];
    let mut shape = Vec::with_capacity(rank);
    let mut strides = Vec::with_capacity(rank);
    for &p in perm {
        let a = axis(p, rank)?;
        if std::mem::replace(&mut seen[a], true) {
            return Err(format!("perm {perm:?} is not a permutation"));
        }
        shape.push(x.shape[a]);
        strides.push(src[a] as isize);
    }
    let idx = strided_indices(&shape, &strides, 0);
    Ok(Tensor { dtype: x.dtype, shape, data: take(&x.data, &idx) })
}

/// x[start:end:step] on each listed axis. As the op documents, starts and
/// ends are already in range: for a positive step 0 <= start, end <= dim; for
/// a negative step 0 <= start < dim and -1 <= end < dim (end -1 means "through
/// element 0"). Anything else is an error rather than being clamped.
pub(crate) fn slice(x: &Tensor, axes: &[i64], starts: &[i64], ends: &[i64], steps: &[i64]) -> OpResult {
    let rank = x.shape.len();
    if starts.len() != axes.len() || ends.len() != axes.len() || steps.len() != axes.len() {
        return Err("axes, starts, ends and steps need equal lengths".into());
    }
    let src = row_strides(&x.shape);
    let mut shape = x.shape.clone();
    let mut strides: Vec<isize> = src.iter().map(|&s| s as isize).collect();
    let mut offset: isize = 0;
    let mut seen = vec![false; rank];
    for (i, &ax) in axes.iter().enumerate() {
        let a = axis(ax, rank)?;
        if std::mem::replace(&mut seen[a], true) {
            return Err(format!("axis {ax} is listed twice"));
        }
        let (s, e, st, d) = (starts[i], ends[i], steps[i], x.shape[a] as i64);
        let bad = || format!("slice {s}:{e}:{st} is out of range for axis {a} of size {d}");
        let len = match st {
            0 => return Err("step must not be 0".into()),
            st if st > 0 => {
                if !(0..=d).contains(&s) || !(0..=d).contains(&e) {
                    return Err(bad());
                }
                ceil_div((e - s).max(0), st)
            }
            st => {
                if !(0..d.max(1)).contains(&s) || !(-1..d).contains(&e) {
                    return Err(bad());
                }
                ceil_div((s - e).max(0), st)
            }
        };
        // Both ends of a non-empty slice must address real elements (this
        // also rejects e.g. 0:-1:-1 on an empty axis).
        if len > 0 && !(0..d).contains(&s) {
            return Err(bad());
        }
        shape[a] = len as usize;
        offset += s as isize * src[a] as isize;
        strides[a] = st as isize * src[a] as isize;
    }
    let idx = strided_indices(&shape, &strides, offset);
    Ok(Tensor { dtype: x.dtype, shape, data: take(&x.data, &idx) })
}

pub(crate) fn concat(parts: &[&Tensor], ax: i64) -> OpResult {
    let first = parts.first().ok_or("needs at least one operand")?;
    let rank = first.shape.len();
    let a = axis(ax, rank)?;
    let mut shape = first.shape.clone();
    shape[a] = 0;
    for p in parts {
        let same_outside = p.shape.len() == rank && (0..rank).all(|i| i == a || p.shape[i] == first.shape[i]);
        if p.dtype != first.dtype || !same_outside {
            return Err(format!(
                "operands differ outside axis {a}: {}{:?} vs {}{:?}",
                first.dtype, first.shape, p.dtype, p.shape
            ));
        }
        shape[a] += p.shape[a];
    }
    numel(&shape)?;
    let (outer, _, inner) = split_at_axis(&shape, a);
    // Start of each part in the joined storage, and its chunk per outer index.
    let mut bases = Vec::with_capacity(parts.len());
    let mut base = 0;
    for p in parts {
        bases.push(base);
        base += p.numel();
    }
    let mut idx = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for (p, b) in parts.iter().zip(&bases) {
            let chunk = p.shape[a] * inner;
            idx.extend(b + o * chunk..b + (o + 1) * chunk);
        }
    }
    let joined = concat_data(&parts.iter().map(|p| &p.data).collect::<Vec<_>>())?;
    Ok(Tensor { dtype: first.dtype, shape, data: take(&joined, &idx) })
}

/// numpy broadcast of x against a shape (either side may supply the larger dim).
pub(crate) fn expand(x: &Tensor, shape: &[i64]) -> OpResult {
    let target = dims("shape", shape)?;
    let out = broadcast_shape(&x.shape, &target)?;
    numel(&out)?;
    let idx = broadcast_index(&x.shape, &out);
    Ok(Tensor { dtype: x.dtype, shape: out, data: take(&x.data, &idx) })
}

pub(crate) fn squeeze(x: &Tensor, axes: &[i64]) -> OpResult {
    let rank = x.shape.len();
    let mut drop = vec![false; rank];
    for &ax in axes {
        let a = axis(ax, rank)?;
        if x.shape[a] != 1 {
            return Err(format!("axis {a} of shape {:?} is not 1", x.shape));
        }
        drop[a] = true;
    }
    let shape = (0..rank).filter(|&i| !drop[i]).map(|i| x.shape[i]).collect();
    Ok(Tensor { dtype: x.dtype, shape, data: x.data.clone() })
}

pub(crate) fn unsqueeze(x: &Tensor, axes: &[i64]) -> OpResult {
    let rank = x.shape.len() + axes.len();
    let mut ins = vec![false; rank];
    for &ax in axes {
        let a = axis(ax, rank)?;
        if std::mem::replace(&mut ins[a], true) {
            return Err(format!("axis {ax} is listed twice"));
        }
    }
    let mut src = x.shape.iter();
    let shape = (0..rank).map(|i| if ins[i] { 1 } else { src.next().copied().unwrap_or(1) }).collect();
    Ok(Tensor { dtype: x.dtype, shape, data: x.data.clone() })
}

/// ceil(span / |step|) for a non-negative span, in i128 so no step overflows.
fn ceil_div(span: i64, step: i64) -> i64 {
    let (a, b) = (span as i128, (step as i128).abs());
    ((a + b - 1) / b) as i64
}

/// Normalises an index against a dim (negative counts from the end).
fn index(i: i64, dim: usize, what: &str) -> OpResult<usize> {
    let d = dim as i64;
    let j = if i < 0 { i + d } else { i };
    if j < 0 || j >= d {
        return Err(format!("{what} {i} is out of range for a dim of size {dim}"));
    }
    Ok(j as usize)
}

pub(crate) fn gather(data: &Tensor, indices: &Tensor, ax: i64) -> OpResult {
    let a = axis(ax, data.shape.len())?;
    let (outer, dim, inner) = split_at_axis(&data.shape, a);
    let iv = ints(indices)
        .into_iter()
        .map(|i| index(i, dim, &format!("index along axis {a}")))
        .collect::<OpResult<Vec<_>>>()?;
    let mut shape = data.shape[..a].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&data.shape[a + 1..]);
    numel(&shape)?;
    let mut idx = Vec::with_capacity(outer * iv.len() * inner);
    for o in 0..outer {
        for &i in &iv {
            let b = (o * dim + i) * inner;
            idx.extend(b..b + inner);
        }
    }
    Ok(Tensor { dtype: data.dtype, shape, data: take(&data.data, &idx) })
}

/// For each element of `indices` (row-major), the linear index into data of
/// the element it addresses: the same coordinates, with the one on `axis`
/// replaced by the index value. Indices may be smaller than data on every axis.
fn element_targets(data: &[usize], indices: &Tensor, a: usize, what: &str) -> OpResult<Vec<usize>> {
    let ishape = &indices.shape;
    if ishape.len() != data.len() {
        return Err(format!("indices {ishape:?} must have the rank of data {data:?}"));
    }
    if let Some(i) = (0..data.len()).find(|&i| i != a && ishape[i] > data[i]) {
        return Err(format!("indices {ishape:?} exceed data {data:?} on axis {i}"));
    }
    let ds = row_strides(data);
    // Everything but the indexed axis follows the indices' own coordinates.
    let strides: Vec<isize> = (0..data.len()).map(|i| if i == a { 0 } else { ds[i] as isize }).collect();
    let base = strided_indices(ishape, &strides, 0);
    let iv = ints(indices);
    base.iter().zip(&iv).map(|(&b, &i)| Ok(b + index(i, data[a], what)? * ds[a])).collect()
}

pub(crate) fn gather_elements(data: &Tensor, indices: &Tensor, ax: i64) -> OpResult {
    let a = axis(ax, data.shape.len())?;
    let idx = element_targets(&data.shape, indices, a, &format!("index along axis {a}"))?;
    Ok(Tensor { dtype: data.dtype, shape: indices.shape.clone(), data: take(&data.data, &idx) })
}

/// A copy of data with the addressed elements taken from updates. When two
/// updates address one element, the later one in row-major order wins.
pub(crate) fn scatter_elements(data: &Tensor, indices: &Tensor, updates: &Tensor, ax: i64) -> OpResult {
    let a = axis(ax, data.shape.len())?;
    if updates.shape != indices.shape || updates.dtype != data.dtype {
        return Err(format!(
            "updates {}{:?} must match indices {:?} and data's dtype {}",
            updates.dtype, updates.shape, indices.shape, data.dtype
        ));
    }
    let targets = element_targets(&data.shape, indices, a, &format!("index along axis {a}"))?;
    let n = data.numel();
    // Picks from data followed by updates in one joined storage.
    let mut idx: Vec<usize> = (0..n).collect();
    for (j, &t) in targets.iter().enumerate() {
        idx[t] = n + j;
    }
    let joined = concat_data(&[&data.data, &updates.data])?;
    Ok(Tensor { dtype: data.dtype, shape: data.shape.clone(), data: take(&joined, &idx) })
}

/// A copy of data where each index tuple (the last axis of indices, k long,
/// negative entries counting from the end) selects a slice data[i0, .., ik-1]
/// that is replaced by the matching slice of updates. Later tuples win.
pub(crate) fn scatter_nd(data: &Tensor, indices: &Tensor, updates: &Tensor) -> OpResult {
    let k = *indices.shape.last().ok_or("indices must have rank >= 1")?;
    if k > data.shape.len() || updates.dtype != data.dtype {
        return Err(format!("indices {:?} do not address data {:?}", indices.shape, data.shape));
    }
    let tuples: usize = indices.shape[..indices.shape.len() - 1].iter().product();
    let slice: usize = data.shape[k..].iter().product();
    let mut want = indices.shape[..indices.shape.len() - 1].to_vec();
    want.extend_from_slice(&data.shape[k..]);
    if updates.shape != want {
        return Err(format!("updates must have shape {want:?}, found {:?}", updates.shape));
    }
    let ds = row_strides(&data.shape);
    let iv = ints(indices);
    let n = data.numel();
    let mut idx: Vec<usize> = (0..n).collect();
    for t in 0..tuples {
        let mut base = 0;
        for (j, &i) in iv[t * k..(t + 1) * k].iter().enumerate() {
            base += index(i, data.shape[j], &format!("index on axis {j}"))? * ds.get(j).copied().unwrap_or(1);
        }
        for e in 0..slice {
            idx[base + e] = n + t * slice + e;
        }
    }
    let joined = concat_data(&[&data.data, &updates.data])?;
    Ok(Tensor { dtype: data.dtype, shape: data.shape.clone(), data: take(&joined, &idx) })
}

/// Keeps the upper (j - i >= k) or lower (j - i <= k) triangle of the last two
/// axes and zeroes (or sets false) the rest.
pub(crate) fn trilu(x: &Tensor, upper: bool, k: i64) -> OpResult {
    let r = x.shape.len();
    if r < 2 {
        return Err(format!("needs rank >= 2, found {:?}", x.shape));
    }
    let (rows, cols) = (x.shape[r - 2], x.shape[r - 1]);
    let n = x.numel();
    let zero = match x.data {
        Data::F32(_) => Data::F32(vec![0.0]),
        Data::F64(_) => Data::F64(vec![0.0]),
        Data::I64(_) => Data::I64(vec![0]),
        Data::Bool(_) => Data::Bool(vec![false]),
    };
    let idx: Vec<usize> = (0..n)
        .map(|e| {
            let (i, j) = ((e / cols.max(1)) % rows.max(1), e % cols.max(1));
            let d = j as i64 - i as i64;
            let keep = if upper { d >= k } else { d <= k };
            if keep {
                e
            } else {
                n
            }
        })
        .collect();
    let joined = concat_data(&[&x.data, &zero])?;
    Ok(Tensor { dtype: x.dtype, shape: x.shape.clone(), data: take(&joined, &idx) })
}
