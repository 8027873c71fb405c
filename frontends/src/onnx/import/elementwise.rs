//! Elementwise operators: unary math, binary arithmetic with broadcasting,
//! comparisons, logic, `Where`, `Clip`, the variadic `Sum`/`Max`/`Min`/`Mean`,
//! and activations, which are spelled with IR primitives exactly as their
//! ONNX definitions read (so fusion rules see the same spellings as in
//! exported graphs).
//!
//! Arithmetic on emulated narrow integers is wrapped back into the type's
//! range after each op (see [`super::dtypes`]).

use super::{Importer, Node, Outs, Val, NOT_STATIC, R};
use smelt_ir::Op;

fn one(v: Val) -> R<Outs> {
    Ok(vec![Some(v)])
}

pub(crate) fn identity(_cx: &mut Importer, n: &Node) -> R<Outs> {
    one(n.input(0)?)
}

/// `Dropout` at inference: the identity, with an all-true mask output.
/// Training mode draws a random mask, which is refused unless the ratio is
/// 0 (then it is the identity too).
pub(crate) fn dropout(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    if let Some(t) = n.opt(2) {
        let training =
            cx.b.konst(t.id)
                .map(|t| t.to_i64_vec().iter().any(|&v| v != 0))
                .ok_or_else(|| format!("training_mode {NOT_STATIC}"))?;
        let ratio_zero =
            n.opt(1).and_then(|r| cx.b.konst(r.id)).is_some_and(|r| r.to_f64_vec().iter().all(|&v| v == 0.0));
        if training && !ratio_zero {
            return Err("training-mode Dropout draws a random mask, which smelt does not implement".into());
        }
    }
    let mut outs = vec![Some(x)];
    if n.wants(1) {
        let shape = cx.b.shape(x.id);
        let mask = cx.b.add(Op::Fill { shape, value: 1.0, dtype: smelt_ir::DType::Bool }, &[])?;
        outs.push(Some(cx.val(mask)));
    }
    Ok(outs)
}

pub(crate) fn unary(cx: &mut Importer, n: &Node, op: Op) -> R<Outs> {
    let x = n.input(0)?;
    let id = cx.b.unary(op, x.id)?;
    let v = cx.same(x, id);
    one(cx.wrap(v)?)
}

/// `IsInf` with its `detect_negative` / `detect_positive` attributes.
pub(crate) fn is_inf(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let (neg, pos) = (n.int("detect_negative", 1)? != 0, n.int("detect_positive", 1)? != 0);
    let inf = cx.b.unary(Op::IsInf {}, x.id)?;
    let id = match (neg, pos) {
        (true, true) => inf,
        (false, false) => {
            let shape = cx.b.shape(x.id);
            cx.b.add(Op::Fill { shape, value: 0.0, dtype: smelt_ir::DType::Bool }, &[])?
        }
        (neg, _) => {
            let zero = cx.b.like(x.id, 0.0);
            let side = if neg { cx.b.binary(Op::Lt {}, x.id, zero)? } else { cx.b.binary(Op::Gt {}, x.id, zero)? };
            cx.b.binary(Op::And {}, inf, side)?
        }
    };
    one(cx.val(id))
}

/// Binary arithmetic with numpy broadcasting.
pub(crate) fn arith(cx: &mut Importer, n: &Node, op: Op) -> R<Outs> {
    let (a, b) = (n.input(0)?, n.input(1)?);
    let id = cx.b.binary(op, a.id, b.id)?;
    let v = cx.same(a, id);
    one(cx.wrap(v)?)
}

/// `Pow`: the exponent may have another numeric type; the result has the base's.
pub(crate) fn pow(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (a, b) = (n.input(0)?, n.input(1)?);
    let id = cx.b.binary(Op::Pow {}, a.id, b.id)?;
    let v = cx.same(a, id);
    one(cx.wrap(v)?)
}

/// `Mod`: floored (sign of the divisor) by default, truncated with `fmod=1`.
pub(crate) fn modulo(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (a, b) = (n.input(0)?, n.input(1)?);
    let op = if n.int("fmod", 0)? != 0 { Op::Rem {} } else { Op::Mod {} };
    let id = cx.b.binary(op, a.id, b.id)?;
    one(cx.same(a, id))
}

/// `Sum`, `Max`, `Min` over any number of inputs, left to right.
pub(crate) fn variadic(cx: &mut Importer, n: &Node, op: Op) -> R<Outs> {
    let ins: Vec<Val> = n.ins.iter().flatten().copied().collect();
    let first = *ins.first().ok_or("needs at least one input")?;
    let mut acc = first.id;
    for v in &ins[1..] {
        acc = cx.b.binary(op.clone(), acc, v.id)?;
    }
    let v = cx.same(first, acc);
    one(cx.wrap(v)?)
}

/// `Mean`: the sum divided by the input count.
pub(crate) fn mean(cx: &mut Importer, n: &Node) -> R<Outs> {
    let ins: Vec<Val> = n.ins.iter().flatten().copied().collect();
    let first = *ins.first().ok_or("needs at least one input")?;
    let mut acc = first.id;
    for v in &ins[1..] {
        acc = cx.b.binary(Op::Add {}, acc, v.id)?;
    }
    let k = cx.b.like(acc, ins.len() as f64);
    let id = cx.b.binary(Op::Div {}, acc, k)?;
    one(cx.same(first, id))
}

pub(crate) fn compare(cx: &mut Importer, n: &Node, op: Op) -> R<Outs> {
    let (a, b) = (n.input(0)?, n.input(1)?);
    let id = cx.b.binary(op, a.id, b.id)?;
    one(cx.val(id))
}

pub(crate) fn logical(cx: &mut Importer, n: &Node, op: Op) -> R<Outs> {
    let (a, b) = (n.input(0)?, n.input(1)?);
    let id = cx.b.binary(op, a.id, b.id)?;
    one(cx.val(id))
}

pub(crate) fn where_(cx: &mut Importer, n: &Node) -> R<Outs> {
    let (c, a, b) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let id = cx.b.add(Op::Where {}, &[c.id, a.id, b.id])?;
    one(cx.same(a, id))
}

/// `Clip(x, min, max)` = min(max(x, lo), hi), each bound optional.
pub(crate) fn clip(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let mut id = x.id;
    if let Some(lo) = n.opt(1) {
        id = cx.b.binary(Op::Max {}, id, lo.id)?;
    }
    if let Some(hi) = n.opt(2) {
        id = cx.b.binary(Op::Min {}, id, hi.id)?;
    }
    one(cx.same(x, id))
}

/// Activations spelled with primitives.
pub(crate) fn activation(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let xi = x.id;
    let b = &mut cx.b;
    let id = match n.op_type() {
        "LeakyRelu" => {
            let alpha = b.like(xi, n.float("alpha", 0.01)? as f64);
            let zero = b.like(xi, 0.0);
            let neg = b.binary(Op::Lt {}, xi, zero)?;
            let ax = b.binary(Op::Mul {}, xi, alpha)?;
            b.add(Op::Where {}, &[neg, ax, xi])?
        }
        "Elu" => {
            let alpha = b.like(xi, n.float("alpha", 1.0)? as f64);
            let (zero, one_) = (b.like(xi, 0.0), b.like(xi, 1.0));
            let neg = b.binary(Op::Lt {}, xi, zero)?;
            let e = b.unary(Op::Exp {}, xi)?;
            let em1 = b.binary(Op::Sub {}, e, one_)?;
            let y = b.binary(Op::Mul {}, em1, alpha)?;
            b.add(Op::Where {}, &[neg, y, xi])?
        }
        "Selu" => {
            let alpha = b.like(xi, n.float("alpha", 1.673_263_2)? as f64);
            let gamma = b.like(xi, n.float("gamma", 1.050_701)? as f64);
            let zero = b.like(xi, 0.0);
            let le = b.binary(Op::Le {}, xi, zero)?;
            let e = b.unary(Op::Exp {}, xi)?;
            let ae = b.binary(Op::Mul {}, alpha, e)?;
            let neg = b.binary(Op::Sub {}, ae, alpha)?;
            let y = b.add(Op::Where {}, &[le, neg, xi])?;
            b.binary(Op::Mul {}, gamma, y)?
        }
        "Celu" => {
            let alpha = b.like(xi, n.float("alpha", 1.0)? as f64);
            let (zero, one_) = (b.like(xi, 0.0), b.like(xi, 1.0));
            let pos = b.binary(Op::Max {}, xi, zero)?;
            let xa = b.binary(Op::Div {}, xi, alpha)?;
            let e = b.unary(Op::Exp {}, xa)?;
            let em1 = b.binary(Op::Sub {}, e, one_)?;
            let ae = b.binary(Op::Mul {}, alpha, em1)?;
            let neg = b.binary(Op::Min {}, zero, ae)?;
            b.binary(Op::Add {}, pos, neg)?
        }
        "HardSigmoid" | "HardSwish" => {
            let (alpha, beta) = if n.op_type() == "HardSwish" {
                (1.0 / 6.0, 0.5)
            } else {
                (n.float("alpha", 0.2)? as f64, n.float("beta", 0.5)? as f64)
            };
            let (a, bb) = (b.like(xi, alpha), b.like(xi, beta));
            let (zero, one_) = (b.like(xi, 0.0), b.like(xi, 1.0));
            let ax = b.binary(Op::Mul {}, xi, a)?;
            let lin = b.binary(Op::Add {}, ax, bb)?;
            let lo = b.binary(Op::Min {}, lin, one_)?;
            let hs = b.binary(Op::Max {}, lo, zero)?;
            if n.op_type() == "HardSwish" {
                b.binary(Op::Mul {}, xi, hs)?
            } else {
                hs
            }
        }
        "Softplus" => softplus(b, xi)?,
        "Softsign" => {
            let one_ = b.like(xi, 1.0);
            let a = b.unary(Op::Abs {}, xi)?;
            let d = b.binary(Op::Add {}, one_, a)?;
            b.binary(Op::Div {}, xi, d)?
        }
        "ThresholdedRelu" => {
            let alpha = b.like(xi, n.float("alpha", 1.0)? as f64);
            let zero = b.like(xi, 0.0);
            let gt = b.binary(Op::Gt {}, xi, alpha)?;
            b.add(Op::Where {}, &[gt, xi, zero])?
        }
        "Mish" => {
            let sp = softplus(b, xi)?;
            let t = b.unary(Op::Tanh {}, sp)?;
            b.binary(Op::Mul {}, xi, t)?
        }
        "Gelu" => gelu(b, xi, n.string("approximate", "none")? == "tanh")?,
        "Swish" => {
            let alpha = b.like(xi, n.float("alpha", 1.0)? as f64);
            let ax = b.binary(Op::Mul {}, alpha, xi)?;
            let s = b.unary(Op::Sigmoid {}, ax)?;
            b.binary(Op::Mul {}, xi, s)?
        }
        "Sinh" | "Cosh" => {
            let e = b.unary(Op::Exp {}, xi)?;
            let nx = b.unary(Op::Neg {}, xi)?;
            let en = b.unary(Op::Exp {}, nx)?;
            let two = b.like(xi, 2.0);
            let s = if n.op_type() == "Sinh" { b.binary(Op::Sub {}, e, en)? } else { b.binary(Op::Add {}, e, en)? };
            b.binary(Op::Div {}, s, two)?
        }
        "Tan" => {
            let s = b.unary(Op::Sin {}, xi)?;
            let c = b.unary(Op::Cos {}, xi)?;
            b.binary(Op::Div {}, s, c)?
        }
        other => return Err(format!("{other} is not an activation")),
    };
    one(cx.same(x, id))
}

/// log(exp(x) + 1), as ONNX defines Softplus.
fn softplus(b: &mut super::Builder, x: smelt_ir::ValueId) -> R<smelt_ir::ValueId> {
    let one_ = b.like(x, 1.0);
    let e = b.unary(Op::Exp {}, x)?;
    let s = b.binary(Op::Add {}, e, one_)?;
    b.unary(Op::Log {}, s)
}

/// 0.5 * x * (1 + erf(x / sqrt 2)), or with `tanh` the approximation
/// 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))).
pub(crate) fn gelu(b: &mut super::Builder, x: smelt_ir::ValueId, tanh: bool) -> R<smelt_ir::ValueId> {
    let (half, one_) = (b.like(x, 0.5), b.like(x, 1.0));
    let inner = if tanh {
        let c = b.like(x, 0.044715);
        let k = b.like(x, (2.0 / std::f64::consts::PI).sqrt());
        let x2 = b.binary(Op::Mul {}, x, x)?;
        let x3 = b.binary(Op::Mul {}, x2, x)?;
        let cx3 = b.binary(Op::Mul {}, c, x3)?;
        let s = b.binary(Op::Add {}, x, cx3)?;
        let ks = b.binary(Op::Mul {}, k, s)?;
        b.unary(Op::Tanh {}, ks)?
    } else {
        let r2 = b.like(x, std::f64::consts::SQRT_2);
        let d = b.binary(Op::Div {}, x, r2)?;
        b.unary(Op::Erf {}, d)?
    };
    let p = b.binary(Op::Add {}, one_, inner)?;
    let hx = b.binary(Op::Mul {}, half, x)?;
    b.binary(Op::Mul {}, hx, p)
}

/// The `com.microsoft` GELU family: `Gelu` (erf), `BiasGelu` (bias, then
/// erf), `FastGelu` (optional bias, then the tanh approximation) and
/// `QuickGelu` (x * sigmoid(alpha * x)).
pub(crate) fn ms_gelu(cx: &mut Importer, n: &Node) -> R<Outs> {
    let x = n.input(0)?;
    let mut xi = x.id;
    if matches!(n.op_type(), "BiasGelu" | "FastGelu") {
        if let Some(bias) = n.opt(1) {
            xi = cx.b.binary(Op::Add {}, xi, bias.id)?;
        }
    }
    let id = match n.op_type() {
        "FastGelu" => gelu(&mut cx.b, xi, true)?,
        "QuickGelu" => {
            let alpha = cx.b.like(xi, n.float("alpha", 1.702)? as f64);
            let ax = cx.b.binary(Op::Mul {}, alpha, xi)?;
            let s = cx.b.unary(Op::Sigmoid {}, ax)?;
            cx.b.binary(Op::Mul {}, xi, s)?
        }
        _ => gelu(&mut cx.b, xi, false)?,
    };
    one(cx.same(x, id))
}
