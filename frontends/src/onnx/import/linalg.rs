//! Linear algebra: `MatMul` (numpy semantics, the IR's own), `Gemm`
//! (transposes, alpha, beta, bias) and `Einsum`.
//!
//! `Einsum` is lowered generically: diagonals of repeated labels are taken
//! with an identity mask, every operand is transposed and unsqueezed onto
//! one shared label order, the operands are multiplied with broadcasting,
//! summed over the labels the output drops, and transposed to the output
//! order. That is exact (it adds the same products a direct loop would) and
//! spells every equation, at the cost of materialising the full product;
//! the fusion passes may turn common equations into matmuls later.

use super::{Importer, Node, Outs, Val, R};
use smelt_ir::{DType, Dim, Op, ValueId};
use std::collections::BTreeMap;

pub(crate) fn matmul(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (a, b) = (n.input(0)?, n.input(1)?);
    let id = cx.b.binary(Op::MatMul {}, a.id, b.id)?;
    let v = cx.same(a, id);
    Ok(vec![Some(cx.wrap(v)?)])
}

/// `Gemm`: alpha * A' B' + beta * C with A' = A or Aᵀ, B' = B or Bᵀ.
pub(crate) fn gemm(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (a, bv) = (n.input(0)?, n.input(1)?);
    let alpha = n.float("alpha", 1.0)? as f64;
    let beta = n.float("beta", 1.0)? as f64;
    let b = &mut cx.b;
    let mut ai = a.id;
    let mut bi = bv.id;
    if n.int("transA", 0)? != 0 {
        ai = b.transpose(ai, vec![1, 0])?;
    }
    if n.int("transB", 0)? != 0 {
        bi = b.transpose(bi, vec![1, 0])?;
    }
    let mut y = b.binary(Op::MatMul {}, ai, bi)?;
    if alpha != 1.0 {
        let k = b.like(y, alpha);
        y = b.binary(Op::Mul {}, y, k)?;
    }
    if let Some(c) = n.opt(2) {
        let mut ci = c.id;
        if beta != 1.0 {
            let k = b.like(ci, beta);
            ci = b.binary(Op::Mul {}, ci, k)?;
        }
        y = b.binary(Op::Add {}, y, ci)?;
    }
    Ok(vec![Some(cx.same(a, y))])
}

/// One operand's labels; ellipsis dims get labels from 1000 up, aligned
/// right across operands like numpy broadcasting.
type Labels = Vec<u32>;

fn parse_term(term: &str) -> R<(Vec<u32>, bool)> {
    let mut labels = Vec::new();
    let mut ell = false;
    let mut rest = term;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("...") {
            if ell {
                return Err(format!("einsum term `{term}` has two ellipses"));
            }
            ell = true;
            labels.push(u32::MAX);
            rest = r;
            continue;
        }
        let c = rest.chars().next().unwrap_or(' ');
        if !c.is_ascii_alphabetic() {
            return Err(format!("einsum term `{term}` has an invalid character `{c}`"));
        }
        labels.push(c as u32);
        rest = &rest[c.len_utf8()..];
    }
    Ok((labels, ell))
}

/// Expands the ellipsis marker of a term to `k` labels (the last `k` of `max`).
fn expand_ellipsis(term: &[u32], k: usize, max: usize) -> Labels {
    let mut out = Vec::new();
    for &l in term {
        if l == u32::MAX {
            out.extend((max - k..max).map(|i| 1000 + i as u32));
        } else {
            out.push(l);
        }
    }
    out
}

pub(crate) fn einsum(cx: &mut Importer, n: &Node) -> R<Outs> {
    let eq: String =
        n.attrs.require_string("equation").map_err(|e| e.to_string())?.chars().filter(|c| !c.is_whitespace()).collect();
    let ins: Vec<Val> = n.ins.iter().flatten().copied().collect();
    let first = *ins.first().ok_or("needs at least one input")?;
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != ins.len() {
        return Err(format!("equation `{eq}` has {} terms for {} inputs", terms.len(), ins.len()));
    }
    // Ellipsis widths.
    let mut parsed = Vec::new();
    let mut ell_max = 0;
    for (t, v) in terms.iter().zip(&ins) {
        let (labels, ell) = parse_term(t)?;
        let named = labels.iter().filter(|&&l| l != u32::MAX).count();
        let rank = cx.b.rank(v.id);
        let k = if ell {
            rank.checked_sub(named)
                .ok_or_else(|| format!("term `{t}` has more labels than its operand's rank {rank}"))?
        } else if named != rank {
            return Err(format!("term `{t}` has {named} labels for an operand of rank {rank}"));
        } else {
            0
        };
        ell_max = ell_max.max(k);
        parsed.push((labels, k));
    }
    let operand_labels: Vec<Labels> = parsed.iter().map(|(l, k)| expand_ellipsis(l, *k, ell_max)).collect();
    // Output labels: explicit, or the labels used once, in alphabetical
    // order after the ellipsis dims.
    let out_labels: Labels = match &rhs {
        Some(r) => {
            let (labels, _) = parse_term(r)?;
            expand_ellipsis(&labels, ell_max, ell_max)
        }
        None => {
            let mut count: BTreeMap<u32, usize> = BTreeMap::new();
            for l in operand_labels.iter().flatten() {
                *count.entry(*l).or_default() += 1;
            }
            let mut out: Labels = (0..ell_max).map(|i| 1000 + i as u32).collect();
            out.extend(count.iter().filter(|(l, c)| **c == 1 && **l < 1000).map(|(l, _)| *l));
            out
        }
    };

    // Sizes of each label, and each operand with diagonals taken.
    let mut sizes: BTreeMap<u32, Dim> = BTreeMap::new();
    let mut operands: Vec<(ValueId, Labels)> = Vec::new();
    for (v, labels) in ins.iter().zip(&operand_labels) {
        let shape = cx.b.shape(v.id);
        let mut id = v.id;
        let mut labels = labels.clone();
        for (l, d) in labels.iter().zip(&shape) {
            // Broadcast ellipsis dims of size 1 do not fix the size.
            if *l >= 1000 && d.as_const() == Some(1) {
                continue;
            }
            sizes.entry(*l).or_insert_with(|| d.clone());
        }
        // Repeated labels in one term select a diagonal.
        while let Some((p, q)) = repeated(&labels) {
            id = diagonal(cx, id, p, q)?;
            labels.remove(q);
        }
        operands.push((id, labels));
    }
    let mut all: Labels = Vec::new();
    for (_, ls) in &operands {
        for l in ls {
            if !all.contains(l) {
                all.push(*l);
            }
        }
    }
    for l in &out_labels {
        if !all.contains(l) {
            return Err(format!("output label `{}` is not an input label", char::from_u32(*l).unwrap_or('?')));
        }
    }
    // Align every operand to `all` and multiply.
    let mut acc: Option<ValueId> = None;
    for (id, labels) in operands {
        let mut order: Vec<usize> = Vec::new();
        for l in &all {
            if let Some(p) = labels.iter().position(|x| x == l) {
                order.push(p);
            }
        }
        let perm: Vec<i64> = order.iter().map(|&p| p as i64).collect();
        let t = cx.b.transpose(id, perm)?;
        let missing: Vec<i64> =
            all.iter().enumerate().filter(|(_, l)| !labels.contains(l)).map(|(i, _)| i as i64).collect();
        let t = cx.b.unsqueeze(t, missing)?;
        acc = Some(match acc {
            None => t,
            Some(a) => cx.b.binary(Op::Mul {}, a, t)?,
        });
    }
    let mut y = acc.ok_or("einsum has no operands")?;
    // Sum the dropped labels, then order the kept ones as the output says.
    let dropped: Vec<i64> =
        all.iter().enumerate().filter(|(_, l)| !out_labels.contains(l)).map(|(i, _)| i as i64).collect();
    let kept: Labels = all.iter().copied().filter(|l| out_labels.contains(l)).collect();
    if !dropped.is_empty() {
        y = cx.b.add(Op::ReduceSum { axes: dropped, keepdims: false }, &[y])?;
    }
    // Labels present in every operand only as size-1 broadcasts still have
    // their full size in the output.
    let perm: Vec<i64> =
        out_labels.iter().map(|l| kept.iter().position(|k| k == l).map(|p| p as i64).unwrap_or(0)).collect();
    y = cx.b.transpose(y, perm)?;
    let want: Vec<Dim> = out_labels.iter().map(|l| sizes.get(l).cloned().unwrap_or(Dim::c(1))).collect();
    y = cx.b.expand(y, want)?;
    Ok(vec![Some(cx.same(first, y))])
}

fn repeated(labels: &[u32]) -> Option<(usize, usize)> {
    for p in 0..labels.len() {
        for q in p + 1..labels.len() {
            if labels[p] == labels[q] {
                return Some((p, q));
            }
        }
    }
    None
}

/// The diagonal of axes p < q (equal sizes), keeping axis p and dropping q:
/// x times the identity on (p, q), summed over q.
fn diagonal(cx: &mut Importer, x: ValueId, p: usize, q: usize) -> R<ValueId> {
    let shape = cx.b.shape(x);
    let rank = shape.len();
    let d = shape[p].clone();
    let b = &mut cx.b;
    let iota = b.add(Op::Range { start: Dim::c(0), end: d, step: 1, dtype: DType::I64 }, &[])?;
    let ra: Vec<i64> = (0..rank).filter(|&i| i != p).map(|i| i as i64).collect();
    let rb: Vec<i64> = (0..rank).filter(|&i| i != q).map(|i| i as i64).collect();
    let a = b.unsqueeze(iota, ra)?;
    let c = b.unsqueeze(iota, rb)?;
    let eye = b.binary(Op::Eq {}, a, c)?;
    let dt = b.dtype(x);
    let eye = b.cast(eye, dt)?;
    let m = b.binary(Op::Mul {}, x, eye)?;
    b.add(Op::ReduceSum { axes: vec![q as i64], keepdims: false }, &[m])
}
