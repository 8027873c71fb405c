//! Symbolic shape values: what the importer knows about small integer tensors
//! whose elements are (possibly symbolic) dims, and reasoning about dims.
//!
//! A *shape value* is an integer tensor of rank 0 or 1 whose every element is
//! a known [`Dim`]: the result of `Shape`, a `Gather`/`Slice` of it, a
//! `Concat` of such pieces with constants, arithmetic on them. The builder
//! records one for every IR value it can prove one for, and evaluates the
//! ops of shape subgraphs on them symbolically ([`eval`]), so that a reshape
//! target computed as `Concat(Shape(x)[0:2], [4, 16])` becomes the dim list
//! `[batch, seq, 4, 16]` and the subgraph folds away.
//!
//! Comparisons and `Max`/`Min` of symbolic dims are decided with the
//! symbols' declared bounds: a difference whose sign is the same at every
//! corner of the bounds box is taken to have that sign everywhere (exact for
//! the multilinear expressions shapes are made of). Anything undecided is left
//! to run time: [`eval`] returns `None` and the op stays a runtime op.

use smelt_ir::graph::SymbolBounds;
use smelt_ir::{DType, Dim, Op, Tensor};
use std::collections::BTreeMap;

/// The elements of a rank-0 or rank-1 integer tensor, as dims.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ShapeValue {
    pub dims: Vec<Dim>,
    /// Rank 0 (one element) rather than rank 1.
    pub scalar: bool,
}

impl ShapeValue {
    pub fn vector(dims: Vec<Dim>) -> ShapeValue {
        ShapeValue { dims, scalar: false }
    }

    pub fn scalar(d: Dim) -> ShapeValue {
        ShapeValue { dims: vec![d], scalar: true }
    }

    /// The constant elements, when no element is symbolic.
    pub fn consts(&self) -> Option<Vec<i64>> {
        self.dims.iter().map(Dim::as_const).collect()
    }

    /// The value of a constant integer tensor of rank 0 or 1.
    pub fn from_tensor(t: &Tensor) -> Option<ShapeValue> {
        if !t.dtype.is_int() || t.shape.len() > 1 {
            return None;
        }
        let dims = t.to_i64_vec().into_iter().map(Dim::c).collect();
        Some(ShapeValue { dims, scalar: t.shape.is_empty() })
    }
}

/// The sign of a dim over the bounds box of its symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sign {
    Neg,
    Zero,
    Pos,
}

/// Decides the sign of `d` when it is the same at every corner of the box
/// spanned by its symbols' bounds (symbols without declared bounds are taken
/// to be in `[0, 2^16]`). Returns `None` when the sign varies or the dim
/// cannot be evaluated.
pub(crate) fn sign(d: &Dim, bounds: &BTreeMap<String, SymbolBounds>) -> Option<Sign> {
    let of = |v: i64| match v.cmp(&0) {
        std::cmp::Ordering::Less => Sign::Neg,
        std::cmp::Ordering::Equal => Sign::Zero,
        std::cmp::Ordering::Greater => Sign::Pos,
    };
    if let Some(c) = d.as_const() {
        return Some(of(c));
    }
    let syms = d.symbols();
    // More than 8 symbols would make 256+ corners; shapes never need that.
    if syms.len() > 8 {
        return None;
    }
    let range = |s: &str| bounds.get(s).map(|b| (b.min, b.max)).unwrap_or((0, 1 << 16));
    let mut seen: Option<Sign> = None;
    for mask in 0..(1u32 << syms.len()) {
        let env: BTreeMap<String, i64> = syms
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (lo, hi) = range(s);
                (s.clone(), if mask & (1 << i) == 0 { lo } else { hi })
            })
            .collect();
        let s = of(d.eval_map(&env).ok()?);
        match seen {
            None => seen = Some(s),
            Some(p) if p == s => {}
            // A zero at one corner and a positive value at another is
            // "non-negative", which no caller can use as a sign.
            Some(_) => return None,
        }
    }
    seen
}

/// `a - b` compared with zero (see [`sign`]).
pub(crate) fn compare(a: &Dim, b: &Dim, bounds: &BTreeMap<String, SymbolBounds>) -> Option<std::cmp::Ordering> {
    let s = sign(&(a.clone() - b.clone()), bounds)?;
    Some(match s {
        Sign::Neg => std::cmp::Ordering::Less,
        Sign::Zero => std::cmp::Ordering::Equal,
        Sign::Pos => std::cmp::Ordering::Greater,
    })
}

/// Whether `a <= b` can be proved; `a < 0` never holds for a dim of a shape.
fn known_le(a: &Dim, b: &Dim, bounds: &BTreeMap<String, SymbolBounds>) -> Option<bool> {
    match compare(a, b, bounds)? {
        std::cmp::Ordering::Greater => Some(false),
        _ => Some(true),
    }
}

/// Whether every element of a non-constant dim is provably non-negative.
fn non_negative(d: &Dim, bounds: &BTreeMap<String, SymbolBounds>) -> bool {
    matches!(sign(d, bounds), Some(Sign::Pos | Sign::Zero))
        || d.symbols().iter().all(|s| bounds.get(s).is_some_and(|b| b.min >= 0)) && d.as_const().is_none_or(|c| c >= 0)
}

/// An operand of a symbolic evaluation: a shape value or a constant of any shape.
#[derive(Clone, Debug)]
pub(crate) enum Operand<'a> {
    Shape(&'a ShapeValue),
    Const(&'a Tensor),
}

impl Operand<'_> {
    fn shape_value(&self) -> Option<ShapeValue> {
        match self {
            Operand::Shape(s) => Some((*s).clone()),
            Operand::Const(t) => ShapeValue::from_tensor(t),
        }
    }
}

/// What a symbolic evaluation produced.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// A shape value of the op's integer result dtype.
    Shape(ShapeValue),
    /// A fully known result of another kind (bool comparisons).
    Const(Tensor),
}

/// Broadcasts two shape values elementwise (rank 0/1 numpy rules).
fn zip(a: &ShapeValue, b: &ShapeValue) -> Option<(Vec<(Dim, Dim)>, bool)> {
    let (la, lb) = (a.dims.len(), b.dims.len());
    let n = if la == lb {
        la
    } else if la == 1 {
        lb
    } else if lb == 1 {
        la
    } else {
        return None;
    };
    let pick = |v: &ShapeValue, i: usize| if v.dims.len() == 1 { v.dims[0].clone() } else { v.dims[i].clone() };
    let pairs = (0..n).map(|i| (pick(a, i), pick(b, i))).collect();
    Some((pairs, a.scalar && b.scalar))
}

/// Evaluates `op` on shape values and constants, when every operand is one
/// and the op is one shape subgraphs are made of. `out_dtype` is the op's
/// inferred result dtype. Returns `None` when the result is not known at
/// import time (it then stays a runtime op).
pub(crate) fn eval(
    op: &Op,
    ins: &[Operand<'_>],
    out_dtype: DType,
    bounds: &BTreeMap<String, SymbolBounds>,
) -> Option<Outcome> {
    let sv = |i: usize| ins.get(i).and_then(Operand::shape_value);
    let shape = |dims: Vec<Dim>, scalar: bool| Some(Outcome::Shape(ShapeValue { dims, scalar }));
    match op {
        Op::Add {} | Op::Sub {} | Op::Mul {} | Op::Div {} | Op::Max {} | Op::Min {} if out_dtype.is_int() => {
            let (a, b) = (sv(0)?, sv(1)?);
            let (pairs, scalar) = zip(&a, &b)?;
            let mut out = Vec::with_capacity(pairs.len());
            for (x, y) in pairs {
                out.push(match op {
                    Op::Add {} => x + y,
                    Op::Sub {} => x - y,
                    Op::Mul {} => x * y,
                    Op::Div {} => {
                        // Integer division truncates toward zero; for a
                        // non-negative dividend and positive divisor that is
                        // floor division, which dims can express.
                        let k = y.as_const().filter(|k| *k > 0)?;
                        if let Some(c) = x.as_const() {
                            Dim::c(c / k)
                        } else if non_negative(&x, bounds) {
                            x.floor_div(k)
                        } else {
                            return None;
                        }
                    }
                    Op::Max {} => match compare(&x, &y, bounds)? {
                        std::cmp::Ordering::Less => y,
                        _ => x,
                    },
                    _ => match compare(&x, &y, bounds)? {
                        std::cmp::Ordering::Greater => y,
                        _ => x,
                    },
                });
            }
            shape(out, scalar)
        }
        Op::Neg {} if out_dtype.is_int() => {
            let a = sv(0)?;
            shape(a.dims.into_iter().map(|d| -d).collect(), a.scalar)
        }
        Op::Eq {} | Op::Ne {} | Op::Lt {} | Op::Le {} | Op::Gt {} | Op::Ge {} => {
            let (a, b) = (sv(0)?, sv(1)?);
            let (pairs, scalar) = zip(&a, &b)?;
            let mut out = Vec::with_capacity(pairs.len());
            for (x, y) in pairs {
                let ord = compare(&x, &y, bounds);
                let v = match op {
                    Op::Eq {} => ord? == std::cmp::Ordering::Equal,
                    Op::Ne {} => ord? != std::cmp::Ordering::Equal,
                    Op::Lt {} => !known_le(&y, &x, bounds)?,
                    Op::Le {} => known_le(&x, &y, bounds)?,
                    Op::Gt {} => !known_le(&x, &y, bounds)?,
                    _ => known_le(&y, &x, bounds)?,
                };
                out.push(v);
            }
            let shape = if scalar { vec![] } else { vec![out.len()] };
            Tensor::from_bool(shape, out).ok().map(Outcome::Const)
        }
        Op::Where {} => {
            let Operand::Const(c) = ins.first()? else { return None };
            if c.dtype != DType::Bool || c.shape.len() > 1 {
                return None;
            }
            let cond: Vec<bool> = c.to_i64_vec().into_iter().map(|v| v != 0).collect();
            let (a, b) = (sv(1)?, sv(2)?);
            let lens = [cond.len(), a.dims.len(), b.dims.len()];
            let n = lens.iter().copied().max().unwrap_or(1);
            if lens.iter().any(|&l| l != n && l != 1) {
                return None;
            }
            let at = |l: usize, i: usize| if l == 1 { 0 } else { i };
            let dims = (0..n)
                .map(|i| {
                    if cond[at(cond.len(), i)] {
                        a.dims[at(a.dims.len(), i)].clone()
                    } else {
                        b.dims[at(b.dims.len(), i)].clone()
                    }
                })
                .collect();
            shape(dims, c.shape.is_empty() && a.scalar && b.scalar)
        }
        Op::Cast { to } if to.is_int() => {
            let a = sv(0)?;
            shape(a.dims, a.scalar)
        }
        Op::Concat { .. } => {
            let mut dims = Vec::new();
            for i in 0..ins.len() {
                let a = sv(i)?;
                if a.scalar {
                    return None;
                }
                dims.extend(a.dims);
            }
            shape(dims, false)
        }
        Op::Gather { axis } => {
            let a = sv(0)?;
            if a.scalar || !matches!(axis, 0 | -1) {
                return None;
            }
            let idx = sv(1)?.consts().map(|v| (v, sv(1).map(|s| s.scalar).unwrap_or(false)))?;
            let n = a.dims.len() as i64;
            let mut dims = Vec::with_capacity(idx.0.len());
            for i in idx.0 {
                let j = if i < 0 { i + n } else { i };
                dims.push(a.dims.get(usize::try_from(j).ok()?)?.clone());
            }
            shape(dims, idx.1)
        }
        Op::Slice { axes, starts, ends, steps } => {
            let a = sv(0)?;
            if a.scalar || axes.len() != 1 || !matches!(axes[0], 0 | -1) {
                return None;
            }
            let (s, e, st) = (starts[0].as_const()?, ends[0].as_const()?, steps[0]);
            let mut dims = Vec::new();
            let mut i = s;
            while (st > 0 && i < e) || (st < 0 && i > e) {
                dims.push(a.dims.get(usize::try_from(i).ok()?)?.clone());
                i += st;
            }
            shape(dims, false)
        }
        Op::Unsqueeze { axes } => {
            let a = sv(0)?;
            if a.scalar && axes.len() == 1 && matches!(axes[0], 0 | -1) {
                shape(a.dims, false)
            } else {
                None
            }
        }
        Op::Squeeze { axes } => {
            let a = sv(0)?;
            if !a.scalar && a.dims.len() == 1 && (axes.is_empty() || matches!(axes[0], 0 | -1)) {
                shape(a.dims, true)
            } else {
                None
            }
        }
        Op::Reshape { shape: target } => {
            let a = sv(0)?;
            match target.as_slice() {
                [] if a.dims.len() == 1 => shape(a.dims, true),
                [n] if n.as_const() == Some(a.dims.len() as i64) => shape(a.dims, false),
                _ => None,
            }
        }
        Op::Expand { shape: target } => {
            let a = sv(0)?;
            match target.as_slice() {
                [n] if a.dims.len() == 1 => {
                    let n = usize::try_from(n.as_const()?).ok()?;
                    shape(vec![a.dims[0].clone(); n], false)
                }
                _ => None,
            }
        }
        Op::ReduceProd { axes, keepdims } | Op::ReduceSum { axes, keepdims } => {
            let a = sv(0)?;
            if a.scalar || !(axes.is_empty() || axes.as_slice() == [0] || axes.as_slice() == [-1]) {
                return None;
            }
            let d = if matches!(op, Op::ReduceProd { .. }) {
                Dim::product(&a.dims)
            } else {
                a.dims.iter().fold(Dim::c(0), |acc, d| acc + d.clone())
            };
            shape(vec![d], !keepdims)
        }
        _ => None,
    }
}

/// When `op` failed to type-check on operand types `tys` because a dim
/// that is a single declared symbol meets a different dim where ONNX
/// requires equality (broadcasting, concatenation, contraction), the
/// substitution that makes them equal: the symbol and the dim it must be.
/// Exporters declare such dims independently (an attention mask's `total`
/// that the graph then adds to scores of length `past + seq`); ONNX
/// semantics make them equal, so the importer adopts the equation.
pub(crate) fn unification(
    op: &Op,
    tys: &[&smelt_ir::TensorType],
    symbols: &BTreeMap<String, SymbolBounds>,
) -> Option<(String, Dim)> {
    let right_aligned = |a: &[Dim], b: &[Dim], out: &mut Vec<(Dim, Dim)>| {
        for (x, y) in a.iter().rev().zip(b.iter().rev()) {
            out.push((x.clone(), y.clone()));
        }
    };
    let mut pairs: Vec<(Dim, Dim)> = Vec::new();
    match op {
        Op::Add {}
        | Op::Sub {}
        | Op::Mul {}
        | Op::Div {}
        | Op::Pow {}
        | Op::Max {}
        | Op::Min {}
        | Op::Mod {}
        | Op::Rem {}
        | Op::Eq {}
        | Op::Ne {}
        | Op::Lt {}
        | Op::Le {}
        | Op::Gt {}
        | Op::Ge {}
        | Op::And {}
        | Op::Or {}
        | Op::Xor {}
        | Op::Where {} => {
            for i in 0..tys.len() {
                for j in i + 1..tys.len() {
                    right_aligned(&tys[i].shape, &tys[j].shape, &mut pairs);
                }
            }
        }
        Op::Expand { shape } => right_aligned(&tys.first()?.shape, shape, &mut pairs),
        Op::Concat { axis } => {
            let first = tys.first()?;
            let r = first.rank() as i64;
            let a = if *axis < 0 { axis + r } else { *axis };
            for t in &tys[1..] {
                for (i, (x, y)) in first.shape.iter().zip(&t.shape).enumerate() {
                    if i as i64 != a {
                        pairs.push((x.clone(), y.clone()));
                    }
                }
            }
        }
        Op::MatMul {} => {
            let (a, b) = (&tys.first()?.shape, &tys.get(1)?.shape);
            if a.len() >= 2 && b.len() >= 2 {
                pairs.push((a[a.len() - 1].clone(), b[b.len() - 2].clone()));
                right_aligned(&a[..a.len() - 2], &b[..b.len() - 2], &mut pairs);
            }
        }
        Op::Attention { .. } => {
            let (q, k, v) = (&tys.first()?.shape, &tys.get(1)?.shape, &tys.get(2)?.shape);
            if q.len() == 4 && k.len() == 4 && v.len() == 4 {
                pairs.push((q[0].clone(), k[0].clone()));
                pairs.push((k[2].clone(), v[2].clone()));
                pairs.push((q[3].clone(), k[3].clone()));
                if let Some(m) = tys.get(3) {
                    let want = [q[0].clone(), q[1].clone(), q[2].clone(), k[2].clone()];
                    right_aligned(&m.shape, &want, &mut pairs);
                }
            }
        }
        _ => {}
    }
    let one = Dim::c(1);
    for (a, b) in pairs {
        if a == b || a == one || b == one {
            continue;
        }
        for (x, y) in [(&a, &b), (&b, &a)] {
            if let Some(s) = x.as_sym() {
                if symbols.contains_key(s) && !y.symbols().iter().any(|t| t == s) {
                    return Some((s.to_string(), y.clone()));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> BTreeMap<String, SymbolBounds> {
        [
            ("seq".to_string(), SymbolBounds { min: 1, max: 100 }),
            ("past".to_string(), SymbolBounds { min: 0, max: 100 }),
        ]
        .into()
    }

    #[test]
    fn signs_use_bounds() {
        let b = bounds();
        assert_eq!(sign(&Dim::sym("seq"), &b), Some(Sign::Pos));
        assert_eq!(sign(&Dim::sym("past"), &b), None);
        assert_eq!(sign(&(Dim::sym("past") + Dim::c(1)), &b), Some(Sign::Pos));
        assert_eq!(compare(&Dim::sym("seq"), &Dim::c(-1), &b), Some(std::cmp::Ordering::Greater));
        assert_eq!(compare(&Dim::sym("seq"), &Dim::c(1), &b), None);
    }

    #[test]
    fn evaluates_shape_arithmetic() {
        let b = bounds();
        let s = ShapeValue::vector(vec![Dim::sym("seq"), Dim::c(64)]);
        let two = Tensor::from_i64(DType::I64, vec![], vec![2]).unwrap();
        let out = eval(&Op::Div {}, &[Operand::Shape(&s), Operand::Const(&two)], DType::I64, &b);
        let Some(Outcome::Shape(v)) = out else { panic!("{out:?}") };
        assert_eq!(v.dims, vec![Dim::sym("seq").floor_div(2), Dim::c(32)]);
        let idx = Tensor::from_i64(DType::I64, vec![], vec![-1]).unwrap();
        let out = eval(&Op::Gather { axis: 0 }, &[Operand::Shape(&s), Operand::Const(&idx)], DType::I64, &b);
        let Some(Outcome::Shape(v)) = out else { panic!("{out:?}") };
        assert_eq!(v, ShapeValue::scalar(Dim::c(64)));
    }
}
