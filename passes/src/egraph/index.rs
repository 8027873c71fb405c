//! Index facts: what the e-class analysis knows about tensors computed from
//! shapes alone (ranges, fills, constants and the arithmetic, comparisons
//! and movement over them), which is how attention masks are built.
//!
//! - An integer tensor can be an *affine* function of its element index:
//!   `value[i] = offset + Σ coef_k * i_k` over the axes of its own type
//!   (`range(0, seq)` is `0 + 1*i_0`; a position broadcast over a batch has
//!   coefficient 0 on the batch axis). Offsets and coefficients are
//!   symbolic dims. A rank-1 row-major flattening of an affine tensor is
//!   kept as such ([`Fact::Flat`]), so that a `gather` from it at `S*b + j`
//!   (the lowering of `GatherND` exporters write) is the element `[b, j]`,
//!   and a concat of affine parts that do not continue one sequence is kept
//!   as its parts ([`Fact::Parts`]), so a slice taking one back out is it.
//! - A bool tensor can be a *conjunction* of affine inequalities
//!   `A_k(i) <= 0` (`k_pos <= q_pos` is `i_key - i_query <= 0`), or all
//!   false; the empty conjunction is all true.
//! - A float tensor can be an *additive mask*: 0 where a conjunction holds
//!   and a large negative number (<= -1e30, `-inf` included) elsewhere.
//!
//! Facts are computed bottom-up when a node is added and carried through
//! merges, so a rule guard can ask "is this mask causal for this attention"
//! without walking nodes (`rules/README.md`, rule 3). Every fact is exact:
//! an operation whose result is not described exactly gets no fact.
//!
//! Sign reasoning: symbols are sizes, hence non-negative, so a dim whose
//! canonical form has no negative coefficient (its printed form has no
//! `-`) is non-negative. A bound that needs more than that is not proved,
//! and the fact (or the simplification) is not made.

use smelt_ir::{DType, Dim, Op, TensorType};

/// `offset + Σ coefs[k] * i_k` over the axes of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Affine {
    pub offset: Dim,
    pub coefs: Vec<Dim>,
}

/// A conjunction of `A(i) <= 0`; `None` is all false, `Some([])` all true.
pub type Conj = Option<Vec<Affine>>;

/// What is known about a tensor's elements as a function of their index.
#[derive(Clone, Debug, PartialEq)]
pub enum Fact {
    /// An integer tensor equal to an affine function of its index.
    Int(Affine),
    /// A rank-1 integer tensor that is the row-major flattening of an
    /// affine tensor of `shape`.
    Flat { shape: Vec<Dim>, inner: Affine },
    /// An integer tensor concatenated from affine parts that do not continue
    /// one sequence (the `GatherND` lowering stacks index components this
    /// way): `(start, length, part)` along `axis`. A slice that takes one
    /// part back out is that part.
    Parts { axis: usize, parts: Vec<(Dim, Dim, Affine)> },
    /// A bool tensor true exactly where the conjunction holds.
    Bool(Conj),
    /// A float tensor that is 0 where the conjunction holds and at most
    /// -1e30 (or -inf) elsewhere.
    Additive(Conj),
}

/// The threshold below which a float constant masks a score out.
pub const MASKED: f64 = -1e30;

fn zero() -> Dim {
    Dim::c(0)
}

/// Whether a dim is provably non-negative (see the module comment).
pub fn nonneg_dim(d: &Dim) -> bool {
    match d.as_const() {
        Some(c) => c >= 0,
        None => !d.to_string().contains('-'),
    }
}

impl Affine {
    pub fn constant(offset: Dim, rank: usize) -> Affine {
        Affine { offset, coefs: vec![zero(); rank] }
    }

    pub fn is_constant(&self) -> bool {
        self.coefs.iter().all(|c| *c == zero())
    }

    fn neg(&self) -> Affine {
        Affine { offset: -self.offset.clone(), coefs: self.coefs.iter().map(|c| -c.clone()).collect() }
    }

    fn plus(&self, c: i64) -> Affine {
        Affine { offset: self.offset.clone() + Dim::c(c), coefs: self.coefs.clone() }
    }

    /// Right-aligned to a higher rank (numpy broadcasting): new leading axes
    /// have coefficient 0.
    fn widen(&self, rank: usize) -> Option<Affine> {
        let n = rank.checked_sub(self.coefs.len())?;
        let mut coefs = vec![zero(); n];
        coefs.extend(self.coefs.iter().cloned());
        Some(Affine { offset: self.offset.clone(), coefs })
    }

    fn add(&self, other: &Affine, rank: usize) -> Option<Affine> {
        let (a, b) = (self.widen(rank)?, other.widen(rank)?);
        Some(Affine {
            offset: a.offset + b.offset,
            coefs: a.coefs.into_iter().zip(b.coefs).map(|(x, y)| x + y).collect(),
        })
    }

    fn scale(&self, k: &Dim) -> Affine {
        Affine {
            offset: self.offset.clone() * k.clone(),
            coefs: self.coefs.iter().map(|c| c.clone() * k.clone()).collect(),
        }
    }

    /// Axes of size 1 only ever see index 0: their coefficient is set to 0,
    /// so one value has one fact whatever the spelling.
    fn canonical(mut self, shape: &[Dim]) -> Option<Affine> {
        if self.coefs.len() != shape.len() {
            return None;
        }
        for (c, d) in self.coefs.iter_mut().zip(shape) {
            if *d == Dim::c(1) {
                *c = zero();
            }
        }
        Some(self)
    }

    /// A symbolic lower bound of the value over `shape` when one is provable:
    /// each negative constant coefficient contributes `c * (dim - 1)`, a
    /// non-negative one nothing; a coefficient of unknown sign fails.
    fn lower_bound(&self, shape: &[Dim]) -> Option<Dim> {
        let mut lb = self.offset.clone();
        for (c, d) in self.coefs.iter().zip(shape) {
            if nonneg_dim(c) {
                continue;
            }
            if nonneg_dim(&-c.clone()) {
                lb = lb + c.clone() * (d.clone() - Dim::c(1));
            } else {
                return None;
            }
        }
        Some(lb)
    }

    /// Whether the value is >= `k` everywhere on `shape`.
    fn at_least(&self, k: i64, shape: &[Dim]) -> bool {
        self.lower_bound(shape).is_some_and(|lb| nonneg_dim(&(lb - Dim::c(k))))
    }

    /// Whether the value is <= `k` everywhere on `shape`.
    fn at_most(&self, k: i64, shape: &[Dim]) -> bool {
        self.neg().at_least(-k, shape)
    }
}

/// Simplifies a conjunction over `shape`: inequalities that always hold are
/// dropped, one that never holds makes it all false. The outer `None` is
/// failure (an inequality over another rank), not "all false".
fn simplify(c: Conj, shape: &[Dim]) -> Option<Conj> {
    let Some(v) = c else { return Some(None) };
    let mut out = Vec::new();
    for a in v {
        let a = a.canonical(shape)?;
        if a.at_most(0, shape) {
            continue;
        }
        if a.at_least(1, shape) {
            return Some(None);
        }
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out.sort();
    Some(Some(out))
}

/// Both conjunctions, each over `shape` or broadcast to it from a lower rank.
fn conj_and(a: &Conj, b: &Conj, shape: &[Dim]) -> Option<Conj> {
    match (a, b) {
        (None, _) | (_, None) => Some(None),
        (Some(x), Some(y)) => {
            let v = x.iter().chain(y).map(|f| f.widen(shape.len())).collect::<Option<Vec<_>>>()?;
            simplify(Some(v), shape)
        }
    }
}

/// The negation, when it is again a conjunction (all true, all false, or
/// one integer inequality: `not (A <= 0)` is `-A + 1 <= 0`).
fn conj_not(a: &Conj, shape: &[Dim]) -> Option<Conj> {
    match a {
        None => Some(Some(vec![])),
        Some(v) if v.is_empty() => Some(None),
        Some(v) if v.len() == 1 => simplify(Some(vec![v[0].neg().plus(1)]), shape),
        _ => None,
    }
}

/// Applies a change of axes to every affine form of a fact.
fn map_fact(f: &Fact, shape: &[Dim], g: impl Fn(&Affine) -> Option<Affine>) -> Option<Fact> {
    let conj = |c: &Conj| -> Option<Conj> {
        match c {
            None => Some(None),
            Some(v) => simplify(Some(v.iter().map(&g).collect::<Option<Vec<_>>>()?), shape),
        }
    };
    match f {
        Fact::Int(a) => g(a)?.canonical(shape).map(Fact::Int),
        Fact::Bool(c) => conj(c).map(Fact::Bool),
        Fact::Additive(c) => conj(c).map(Fact::Additive),
        Fact::Flat { .. } | Fact::Parts { .. } => None,
    }
}

/// The fact of a rank-0 (or broadcast) constant of a dtype.
pub fn of_number(dtype: DType, value: f64, shape: &[Dim]) -> Option<Fact> {
    let rank = shape.len();
    if dtype.is_bool() {
        return Some(Fact::Bool(if value != 0.0 { Some(vec![]) } else { None }));
    }
    if dtype.is_int() {
        if value.fract() != 0.0 || value.abs() > 9.0e15 {
            return None;
        }
        return Affine::constant(Dim::c(value as i64), rank).canonical(shape).map(Fact::Int);
    }
    if value == 0.0 {
        Some(Fact::Additive(Some(vec![])))
    } else if value <= MASKED {
        Some(Fact::Additive(None))
    } else {
        None
    }
}

/// Normalises an axis against a rank (either sign).
fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    (0..r).contains(&x).then_some(x as usize)
}

fn int(f: Option<&Fact>) -> Option<&Affine> {
    match f {
        Some(Fact::Int(a)) => Some(a),
        _ => None,
    }
}

fn conj(f: Option<&Fact>) -> Option<&Conj> {
    match f {
        Some(Fact::Bool(c)) => Some(c),
        _ => None,
    }
}

/// The fact of an op's single result from its operands' facts and types.
pub fn of_op(op: &Op, facts: &[Option<&Fact>], tys: &[&TensorType], out: &TensorType) -> Option<Fact> {
    let shape = &out.shape;
    let rank = shape.len();
    let int_out = |a: Affine| a.canonical(shape).map(Fact::Int);
    let bool_out = |c: Conj| simplify(c, shape).map(Fact::Bool);
    let first = || facts.first().copied().flatten();
    let second = || facts.get(1).copied().flatten();
    match op {
        Op::Range { start, step, dtype, .. } if dtype.is_int() => {
            int_out(Affine { offset: start.clone(), coefs: vec![Dim::c(*step)] })
        }
        Op::Fill { value, dtype, .. } => of_number(*dtype, *value, shape),
        Op::Unsqueeze { axes } => {
            let new: Vec<usize> = axes.iter().map(|a| axis(*a, rank)).collect::<Option<_>>()?;
            map_fact(first()?, shape, |a| {
                let mut src = a.coefs.iter();
                let coefs = (0..rank)
                    .map(|k| if new.contains(&k) { Some(zero()) } else { src.next().cloned() })
                    .collect::<Option<Vec<_>>>()?;
                src.next().is_none().then(|| Affine { offset: a.offset.clone(), coefs })
            })
        }
        Op::Squeeze { axes } => {
            let in_rank = tys.first()?.rank();
            let gone: Vec<usize> = axes.iter().map(|a| axis(*a, in_rank)).collect::<Option<_>>()?;
            map_fact(first()?, shape, |a| {
                let coefs =
                    a.coefs.iter().enumerate().filter(|(k, _)| !gone.contains(k)).map(|(_, c)| c.clone()).collect();
                Some(Affine { offset: a.offset.clone(), coefs })
            })
        }
        Op::Expand { .. } => map_fact(first()?, shape, |a| a.widen(rank)),
        Op::Reshape { .. } => {
            let in_shape = &tys.first()?.shape;
            let f = first()?;
            if let Fact::Int(a) = f {
                if a.is_constant() {
                    return int_out(Affine::constant(a.offset.clone(), rank));
                }
            }
            let non1 = |s: &[Dim]| s.iter().filter(|d| **d != Dim::c(1)).cloned().collect::<Vec<_>>();
            if non1(in_shape) == non1(shape) {
                // Only axes of size 1 come or go: the coefficients of the
                // other axes keep their order (those of size-1 axes are 0).
                return map_fact(f, shape, |a| {
                    let mut src = a.coefs.iter().zip(in_shape).filter(|(_, d)| **d != Dim::c(1)).map(|(c, _)| c);
                    let coefs = shape
                        .iter()
                        .map(|d| if *d == Dim::c(1) { Some(zero()) } else { src.next().cloned() })
                        .collect::<Option<Vec<_>>>()?;
                    Some(Affine { offset: a.offset.clone(), coefs })
                });
            }
            match f {
                Fact::Int(a) if rank == 1 => Some(Fact::Flat { shape: in_shape.clone(), inner: a.clone() }),
                _ => None,
            }
        }
        Op::Slice { axes, starts, ends, steps } => {
            let in_rank = tys.first()?.rank();
            let ks: Vec<usize> = axes.iter().map(|a| axis(*a, in_rank)).collect::<Option<_>>()?;
            if let Fact::Parts { axis: k, parts } = first()? {
                let ([a], [st], [en], [1]) = (ks.as_slice(), starts.as_slice(), ends.as_slice(), steps.as_slice())
                else {
                    return None;
                };
                let (_, _, p) = parts.iter().find(|(s, n, _)| a == k && s == st && s.clone() + n.clone() == *en)?;
                return int_out(p.clone());
            }
            map_fact(first()?, shape, |a| {
                let mut r = a.clone();
                for ((k, start), step) in ks.iter().zip(starts).zip(steps) {
                    r.offset = r.offset + r.coefs[*k].clone() * start.clone();
                    r.coefs[*k] = r.coefs[*k].clone() * Dim::c(*step);
                }
                Some(r)
            })
        }
        Op::Concat { axis: ax } => {
            // The parts must continue one sequence along the axis: part p
            // starting at position `at` has offset o + c*at, coefficient c
            // (irrelevant for a part of length 1) and the first part's
            // coefficients on the other axes.
            let k = axis(*ax, rank)?;
            let stacked = || {
                let mut at = zero();
                let mut out = Vec::new();
                for (f, t) in facts.iter().zip(tys) {
                    let n = t.shape.get(k)?.clone();
                    out.push((at.clone(), n.clone(), int(*f)?.clone()));
                    at = at + n;
                }
                Some(Fact::Parts { axis: k, parts: out })
            };
            let parts: Vec<(&Affine, Dim)> =
                facts.iter().zip(tys).map(|(f, t)| Some((int(*f)?, t.shape.get(k)?.clone()))).collect::<Option<_>>()?;
            let (p0, _) = parts.first()?;
            let o = p0.offset.clone();
            let c = match parts.iter().find(|(_, n)| *n != Dim::c(1)) {
                Some((a, _)) => a.coefs[k].clone(),
                None => parts.get(1).map(|(a, _)| a.offset.clone() - o.clone()).unwrap_or_else(zero),
            };
            let others = |a: &Affine| {
                a.coefs.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, c)| c.clone()).collect::<Vec<_>>()
            };
            let mut at = zero();
            for (a, n) in &parts {
                let coef_ok = *n == Dim::c(1) || a.coefs[k] == c;
                if !coef_ok || others(a) != others(p0) || a.offset != o.clone() + c.clone() * at.clone() {
                    return stacked();
                }
                at = at + n.clone();
            }
            let mut r = (*p0).clone();
            r.coefs[k] = c;
            int_out(r)
        }
        Op::Add {} | Op::Sub {} => match (first()?, second()?) {
            (Fact::Int(a), Fact::Int(b)) => {
                let b = if matches!(op, Op::Sub {}) { b.neg() } else { b.clone() };
                int_out(a.add(&b, rank)?)
            }
            // Two additive masks add to one that masks where either does.
            (Fact::Additive(a), Fact::Additive(b)) if matches!(op, Op::Add {}) => {
                conj_and(a, b, shape).map(Fact::Additive)
            }
            _ => None,
        },
        Op::Mul {} => {
            let (a, b) = (int(first())?, int(second())?);
            let r = if b.is_constant() {
                a.widen(rank)?.scale(&b.offset)
            } else if a.is_constant() {
                b.widen(rank)?.scale(&a.offset)
            } else {
                return None;
            };
            int_out(r)
        }
        Op::Neg {} => int_out(int(first())?.widen(rank)?.neg()),
        Op::Cast { to } => match first()? {
            Fact::Int(a) if to.is_int() => int_out(a.clone()),
            Fact::Bool(None) if to.is_int() => int_out(Affine::constant(zero(), rank)),
            Fact::Bool(Some(v)) if to.is_int() && v.is_empty() => int_out(Affine::constant(Dim::c(1), rank)),
            Fact::Bool(c) if to.is_bool() => Some(Fact::Bool(c.clone())),
            Fact::Int(a) if to.is_bool() && a.is_constant() => {
                Some(Fact::Bool(if a.offset != zero() { Some(vec![]) } else { None }))
            }
            _ => None,
        },
        Op::Eq {} | Op::Ne {} | Op::Lt {} | Op::Le {} | Op::Gt {} | Op::Ge {} => {
            let (a, b) = (int(first())?, int(second())?);
            let d = a.add(&b.neg(), rank)?;
            match op {
                Op::Le {} => bool_out(Some(vec![d])),
                Op::Lt {} => bool_out(Some(vec![d.plus(1)])),
                Op::Ge {} => bool_out(Some(vec![d.neg()])),
                Op::Gt {} => bool_out(Some(vec![d.neg().plus(1)])),
                Op::Eq {} => bool_out(Some(vec![d.clone(), d.neg()])),
                _ => {
                    let eq = simplify(Some(vec![d.clone(), d.neg()]), shape)?;
                    conj_not(&eq, shape).map(Fact::Bool)
                }
            }
        }
        Op::And {} => conj_and(conj(first())?, conj(second())?, shape).map(Fact::Bool),
        Op::Or {} => {
            let (a, b) = (conj(first())?, conj(second())?);
            let all = |c: &Conj| matches!(c, Some(v) if v.is_empty());
            if all(a) || all(b) {
                Some(Fact::Bool(Some(vec![])))
            } else if a.is_none() {
                map_fact(&Fact::Bool(b.clone()), shape, |x| x.widen(rank))
            } else if b.is_none() {
                map_fact(&Fact::Bool(a.clone()), shape, |x| x.widen(rank))
            } else {
                None
            }
        }
        Op::Not {} => conj_not(conj(first())?, shape).map(Fact::Bool),
        Op::Where {} => {
            let c = conj(first())?;
            let pick = |f: Option<&Fact>| map_fact(f?, shape, |x| x.widen(rank));
            let third = facts.get(2).copied().flatten();
            match c {
                None => pick(third),
                Some(v) if v.is_empty() => pick(second()),
                _ => {
                    let Fact::Bool(c) = map_fact(&Fact::Bool(c.clone()), shape, |x| x.widen(rank))? else {
                        return None;
                    };
                    match (second()?, third?) {
                        (Fact::Additive(Some(z)), Fact::Additive(None)) if z.is_empty() => Some(Fact::Additive(c)),
                        (Fact::Additive(None), Fact::Additive(Some(z))) if z.is_empty() => {
                            conj_not(&c, shape).map(Fact::Additive)
                        }
                        (Fact::Bool(a), Fact::Bool(None)) => conj_and(&c, a, shape).map(Fact::Bool),
                        _ => None,
                    }
                }
            }
        }
        Op::Gather { axis: ax } => {
            let data_rank = tys.first()?.rank();
            if data_rank != 1 || axis(*ax, 1)? != 0 {
                return None;
            }
            let idx = int(second())?;
            let idx_shape = &tys.get(1)?.shape;
            // Negative indices wrap around, so the index must be provably
            // non-negative; one past the end fails at run time anyway.
            if !idx.at_least(0, idx_shape) {
                return None;
            }
            let (dshape, inner) = match first()? {
                Fact::Int(a) => (tys.first()?.shape.clone(), a.clone()),
                Fact::Flat { shape, inner } => (shape.clone(), inner.clone()),
                _ => return None,
            };
            int_out(gather_flat(&dshape, &inner, idx, idx_shape)?)
        }
        Op::CumSum { axis: ax, exclusive, reverse } => {
            let a = int(first())?;
            if !a.is_constant() || *reverse {
                return None;
            }
            // A constant c summed along an axis is c * (i + 1), or c * i
            // when exclusive.
            let k = axis(*ax, rank)?;
            let mut r = Affine::constant(if *exclusive { zero() } else { a.offset.clone() }, rank);
            r.coefs[k] = a.offset.clone();
            int_out(r)
        }
        Op::Trilu { upper, k } => {
            // trilu keeps j - i >= k (upper) or j - i <= k (lower) of the
            // last two axes and zeroes the rest.
            if rank < 2 {
                return None;
            }
            let mut keep = Affine::constant(zero(), rank);
            let (i, j) = (rank - 2, rank - 1);
            if *upper {
                // j - i >= k  <=>  i - j + k <= 0
                keep.coefs[i] = Dim::c(1);
                keep.coefs[j] = Dim::c(-1);
                keep.offset = k.clone();
            } else {
                // j - i <= k  <=>  j - i - k <= 0
                keep.coefs[i] = Dim::c(-1);
                keep.coefs[j] = Dim::c(1);
                keep.offset = -k.clone();
            }
            let kept = simplify(Some(vec![keep]), shape)?;
            match first()? {
                Fact::Bool(Some(v)) if v.is_empty() => Some(Fact::Bool(kept)),
                Fact::Bool(None) => Some(Fact::Bool(None)),
                Fact::Additive(None) => conj_not(&kept, shape).map(Fact::Additive),
                Fact::Additive(Some(v)) if v.is_empty() => Some(Fact::Additive(Some(vec![]))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `data[idx]` where `data` is the flattening of an affine tensor of
/// `dshape` (rank 1 or 2): the index must split as `S*row + col` with
/// `0 <= col < S` provably, `S` the last dim.
fn gather_flat(dshape: &[Dim], inner: &Affine, idx: &Affine, idx_shape: &[Dim]) -> Option<Affine> {
    let rank = idx.coefs.len();
    match dshape {
        [_] => Some(Affine {
            offset: inner.offset.clone() + inner.coefs[0].clone() * idx.offset.clone(),
            coefs: idx.coefs.iter().map(|c| inner.coefs[0].clone() * c.clone()).collect(),
        }),
        [_, s] => {
            let mut row = Affine::constant(zero(), rank);
            let mut col = Affine::constant(idx.offset.clone(), rank);
            for (k, c) in idx.coefs.iter().enumerate() {
                if *c == *s && *s != Dim::c(1) {
                    row.coefs[k] = Dim::c(1);
                } else {
                    col.coefs[k] = c.clone();
                }
            }
            let s_last = s.as_const().map(|x| x - 1);
            let below_s = match s_last {
                Some(m) => col.at_most(m, idx_shape),
                // col <= S - 1  <=>  S - 1 - col >= 0
                None => {
                    let rest = Affine { offset: s.clone() - Dim::c(1) - col.offset.clone(), coefs: col.neg().coefs };
                    rest.at_least(0, idx_shape)
                }
            };
            if !col.at_least(0, idx_shape) || !below_s || !row.at_least(0, idx_shape) {
                return None;
            }
            let r = row.scale(&inner.coefs[0]).add(&col.scale(&inner.coefs[1]), rank)?;
            Some(Affine { offset: r.offset + inner.offset.clone(), coefs: r.coefs })
        }
        _ => None,
    }
}

/// How an allowed-positions conjunction over a `[.., s, t]` mask relates to
/// attention with `s` queries and `t` keys aligned to the end of the keys:
/// `Some(None)` is exactly causal, `Some(Some(w))` causal with a window of
/// `w`, `None` anything else.
pub fn causal_window(allowed: &Conj, mask: &TensorType, s: &Dim, t: &Dim) -> Option<Option<i64>> {
    let allowed = allowed.as_ref()?;
    let r = mask.rank();
    if r < 2 || mask.shape[r - 2] != *s || mask.shape[r - 1] != *t {
        return None;
    }
    let (i, j) = (r - 2, r - 1);
    let off = t.clone() - s.clone();
    let mut causal = false;
    let mut window = None;
    for a in allowed {
        if a.coefs.len() != r || a.coefs.iter().enumerate().any(|(k, c)| k != i && k != j && *c != zero()) {
            return None;
        }
        let (ci, cj) = (a.coefs[i].as_const()?, a.coefs[j].as_const()?);
        match (ci, cj) {
            // j - i - (t - s) <= 0: keys up to the query's position.
            (-1, 1) if a.offset == -off.clone() => causal = true,
            // i + (t - s) - w - j + 1 <= 0: keys after position - w.
            (1, -1) if window.is_none() => {
                let w = (off.clone() + Dim::c(1) - a.offset.clone()).as_const()?;
                if w < 1 {
                    return None;
                }
                window = Some(w);
            }
            _ => return None,
        }
    }
    causal.then_some(window)
}
