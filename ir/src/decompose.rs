//! Reference decompositions of every fused op into primitive ops.
//!
//! [`decompose`] adds primitive nodes that compute a fused node's results from
//! its operands; [`decompose_all`] replaces every fused node of a graph that
//! way. Nodes are added with [`Graph::add`], so their types are inferred, and
//! shapes come from the operands' (possibly symbolic) types: the causal and
//! sliding-window masks are built with `range` and comparisons over the
//! symbolic query and key lengths, grouped-query heads with
//! unsqueeze/expand/reshape.
//!
//! Precision: a fused op computes in f32 (f64 for f64 tensors) and rounds only
//! its results, so for f16/bf16 operands the decompositions cast up to f32 at
//! the start and back at the end. Each step rounds exactly where the
//! interpreter's fused implementation rounds, which is what lets the property
//! tests demand agreement to 1e-5.

use crate::graph::{Graph, GraphError, NodeId, ValueId};
use crate::ops::{Category, Op};
use crate::types::TensorType;
use crate::{DType, Dim, Tensor};

/// Adds nodes to the graph on behalf of one fused node (with its label).
struct Builder<'g> {
    g: &'g mut Graph,
    op: &'static str,
    label: Option<String>,
}

impl Builder<'_> {
    fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, GraphError> {
        self.g.add_labeled(op, inputs, self.label.as_deref())
    }

    fn fail(&self, message: String) -> GraphError {
        GraphError::Infer {
            op: self.op.to_string(),
            at: self.label.as_ref().map(|l| format!(" at `{l}`")).unwrap_or_default(),
            message,
        }
    }

    fn ty(&self, v: ValueId) -> &TensorType {
        self.g.ty(v)
    }

    fn scalar(&mut self, dtype: DType, x: f64) -> Result<ValueId, GraphError> {
        self.add(Op::Constant { value: Tensor::full(dtype, vec![], x) }, &[])
    }

    fn cast(&mut self, v: ValueId, to: DType) -> Result<ValueId, GraphError> {
        if self.ty(v).dtype == to {
            return Ok(v);
        }
        self.add(Op::Cast { to }, &[v])
    }

    fn un(&mut self, op: Op, a: ValueId) -> Result<ValueId, GraphError> {
        self.add(op, &[a])
    }

    fn bin(&mut self, op: Op, a: ValueId, b: ValueId) -> Result<ValueId, GraphError> {
        self.add(op, &[a, b])
    }

    /// `x[start:end]` along one axis.
    fn slice(&mut self, x: ValueId, axis: usize, start: i64, end: i64) -> Result<ValueId, GraphError> {
        self.add(
            Op::Slice { axes: vec![axis as i64], starts: vec![Dim::c(start)], ends: vec![Dim::c(end)], steps: vec![1] },
            &[x],
        )
    }

    fn reduce_last(&mut self, op: fn(Vec<i64>, bool) -> Op, x: ValueId) -> Result<ValueId, GraphError> {
        self.add(op(vec![-1], true), &[x])
    }

    fn const_dim(&self, d: &Dim, what: &str) -> Result<i64, GraphError> {
        d.as_const().ok_or_else(|| self.fail(format!("{what} must be constant, found `{d}`")))
    }
}

/// The dtype a fused op computes in for a tensor dtype.
fn compute_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn mean(axes: Vec<i64>, keepdims: bool) -> Op {
    Op::ReduceMean { axes, keepdims }
}
fn sum(axes: Vec<i64>, keepdims: bool) -> Op {
    Op::ReduceSum { axes, keepdims }
}
fn max(axes: Vec<i64>, keepdims: bool) -> Op {
    Op::ReduceMax { axes, keepdims }
}

/// x * rsqrt(mean(x*x) + eps) * w in the compute dtype.
fn rms_norm(b: &mut Builder, x: ValueId, w: ValueId, eps: f64) -> Result<ValueId, GraphError> {
    let dt = b.ty(x).dtype;
    let cd = compute_dtype(dt);
    let (x, w) = (b.cast(x, cd)?, b.cast(w, cd)?);
    let sq = b.bin(Op::Mul {}, x, x)?;
    let ms = b.reduce_last(mean, sq)?;
    let e = b.scalar(cd, eps)?;
    let t = b.bin(Op::Add {}, ms, e)?;
    let inv = b.un(Op::Rsqrt {}, t)?;
    let y = b.bin(Op::Mul {}, x, inv)?;
    let y = b.bin(Op::Mul {}, y, w)?;
    b.cast(y, dt)
}

/// (x - mean) * rsqrt(mean((x - mean)^2) + eps) * w + b.
fn layer_norm(b: &mut Builder, x: ValueId, w: ValueId, bias: ValueId, eps: f64) -> Result<ValueId, GraphError> {
    let dt = b.ty(x).dtype;
    let cd = compute_dtype(dt);
    let (x, w, bias) = (b.cast(x, cd)?, b.cast(w, cd)?, b.cast(bias, cd)?);
    let mu = b.reduce_last(mean, x)?;
    let d = b.bin(Op::Sub {}, x, mu)?;
    let sq = b.bin(Op::Mul {}, d, d)?;
    let var = b.reduce_last(mean, sq)?;
    let e = b.scalar(cd, eps)?;
    let t = b.bin(Op::Add {}, var, e)?;
    let inv = b.un(Op::Rsqrt {}, t)?;
    let y = b.bin(Op::Mul {}, d, inv)?;
    let y = b.bin(Op::Mul {}, y, w)?;
    let y = b.bin(Op::Add {}, y, bias)?;
    b.cast(y, dt)
}

/// x*cos + rotate(x)*sin on the first R features, the rest concatenated back.
fn rope(b: &mut Builder, x: ValueId, cos: ValueId, sin: ValueId, interleaved: bool) -> Result<ValueId, GraphError> {
    let dt = b.ty(x).dtype;
    let cd = compute_dtype(dt);
    let (x, cos, sin) = (b.cast(x, cd)?, b.cast(cos, cd)?, b.cast(sin, cd)?);
    let xs = b.ty(x).shape.clone();
    let last = xs.len() - 1;
    let d = b.const_dim(&xs[last], "x's last dim")?;
    let cs = b.ty(cos).shape.clone();
    let r = b.const_dim(&cs[cs.len() - 1], "cos's last dim")?;
    let xr = if r < d { b.slice(x, last, 0, r)? } else { x };
    let lead = xs[..last].to_vec();
    let rot = if interleaved {
        // View the rotated part as pairs, swap each pair to (-odd, even), flatten.
        let mut pairs = lead.clone();
        pairs.extend([Dim::c(r / 2), Dim::c(2)]);
        let x2 = b.add(Op::Reshape { shape: pairs }, &[xr])?;
        let even = b.slice(x2, last + 1, 0, 1)?;
        let odd = b.slice(x2, last + 1, 1, 2)?;
        let neg = b.un(Op::Neg {}, odd)?;
        let swapped = b.add(Op::Concat { axis: last as i64 + 1 }, &[neg, even])?;
        let mut flat = lead;
        flat.push(Dim::c(r));
        b.add(Op::Reshape { shape: flat }, &[swapped])?
    } else {
        let h = r / 2;
        let x1 = b.slice(xr, last, 0, h)?;
        let x2 = b.slice(xr, last, h, r)?;
        let neg = b.un(Op::Neg {}, x2)?;
        b.add(Op::Concat { axis: last as i64 }, &[neg, x1])?
    };
    let a = b.bin(Op::Mul {}, xr, cos)?;
    let c = b.bin(Op::Mul {}, rot, sin)?;
    let mut out = b.bin(Op::Add {}, a, c)?;
    if r < d {
        let pass = b.slice(x, last, r, d)?;
        out = b.add(Op::Concat { axis: last as i64 }, &[out, pass])?;
    }
    b.cast(out, dt)
}

/// Repeats each kv head `group` times: [b, hkv, t, d] -> [b, hkv*group, t, d].
fn repeat_heads(b: &mut Builder, x: ValueId, group: i64, heads: &Dim) -> Result<ValueId, GraphError> {
    if group == 1 {
        return Ok(x);
    }
    let s = b.ty(x).shape.clone();
    let u = b.add(Op::Unsqueeze { axes: vec![2] }, &[x])?;
    let e =
        b.add(Op::Expand { shape: vec![s[0].clone(), s[1].clone(), Dim::c(group), s[2].clone(), s[3].clone()] }, &[u])?;
    b.add(Op::Reshape { shape: vec![s[0].clone(), heads.clone(), s[2].clone(), s[3].clone()] }, &[e])
}

fn attention(
    b: &mut Builder,
    ins: &[ValueId],
    scale: f64,
    causal: bool,
    window: Option<i64>,
    softcap: Option<f64>,
) -> Result<ValueId, GraphError> {
    let dt = b.ty(ins[0]).dtype;
    let cd = compute_dtype(dt);
    let (q, k, v) = (b.cast(ins[0], cd)?, b.cast(ins[1], cd)?, b.cast(ins[2], cd)?);
    let (qs, ks) = (b.ty(q).shape.clone(), b.ty(k).shape.clone());
    let hq = b.const_dim(&qs[1], "query heads")?;
    let hkv = b.const_dim(&ks[1], "kv heads")?;
    if hkv <= 0 || hq % hkv != 0 {
        return Err(b.fail(format!("query heads {hq} are not a multiple of kv heads {hkv}")));
    }
    let k = repeat_heads(b, k, hq / hkv, &qs[1])?;
    let v = repeat_heads(b, v, hq / hkv, &qs[1])?;
    let kt = b.add(Op::Transpose { perm: vec![0, 1, 3, 2] }, &[k])?;
    let mut sc = b.bin(Op::MatMul {}, q, kt)?;
    let sc_scale = b.scalar(cd, scale)?;
    sc = b.bin(Op::Mul {}, sc, sc_scale)?;
    if let Some(c) = softcap {
        let cc = b.scalar(cd, c)?;
        let t = b.bin(Op::Div {}, sc, cc)?;
        let t = b.un(Op::Tanh {}, t)?;
        sc = b.bin(Op::Mul {}, cc, t)?;
    }
    let ninf = b.scalar(cd, f64::NEG_INFINITY)?;
    if let Some(&m) = ins.get(3) {
        if b.ty(m).dtype == DType::Bool {
            sc = b.add(Op::Where {}, &[m, sc, ninf])?;
        } else {
            let m = b.cast(m, cd)?;
            sc = b.bin(Op::Add {}, sc, m)?;
        }
    }
    if causal || window.is_some() {
        // Query i sits at absolute position t - s + i; key j at position j.
        let (s, t) = (qs[2].clone(), ks[2].clone());
        let qpos = b.add(Op::Range { start: t.clone() - s, end: t.clone(), step: 1, dtype: DType::I64 }, &[])?;
        let qcol = b.add(Op::Unsqueeze { axes: vec![1] }, &[qpos])?;
        let kpos = b.add(Op::Range { start: Dim::c(0), end: t, step: 1, dtype: DType::I64 }, &[])?;
        let mut keep = None;
        if causal {
            keep = Some(b.bin(Op::Le {}, kpos, qcol)?);
        }
        if let Some(w) = window {
            let wc = b.scalar(DType::I64, w as f64)?;
            let lo = b.bin(Op::Sub {}, qcol, wc)?;
            let inside = b.bin(Op::Gt {}, kpos, lo)?;
            keep = Some(match keep {
                Some(k) => b.bin(Op::And {}, k, inside)?,
                None => inside,
            });
        }
        if let Some(keep) = keep {
            sc = b.add(Op::Where {}, &[keep, sc, ninf])?;
        }
    }
    // Softmax over keys; a row whose maximum is -inf saw no key and yields zeros.
    let m = b.reduce_last(max, sc)?;
    let d = b.bin(Op::Sub {}, sc, m)?;
    let e = b.un(Op::Exp {}, d)?;
    let total = b.reduce_last(sum, e)?;
    let p = b.bin(Op::Div {}, e, total)?;
    let dead = b.bin(Op::Eq {}, m, ninf)?;
    let zero = b.scalar(cd, 0.0)?;
    let p = b.add(Op::Where {}, &[dead, zero, p])?;
    let o = b.bin(Op::MatMul {}, p, v)?;
    b.cast(o, dt)
}

/// act(x·w_gate) * (x·w_up), the activation spelled in primitives.
fn gated_mlp(b: &mut Builder, x: ValueId, wg: ValueId, wu: ValueId, act: &str) -> Result<ValueId, GraphError> {
    let dt = b.ty(x).dtype;
    let cd = compute_dtype(dt);
    let (x, wg, wu) = (b.cast(x, cd)?, b.cast(wg, cd)?, b.cast(wu, cd)?);
    let g = b.bin(Op::MatMul {}, x, wg)?;
    let u = b.bin(Op::MatMul {}, x, wu)?;
    let a = match act {
        "silu" => {
            let s = b.un(Op::Sigmoid {}, g)?;
            b.bin(Op::Mul {}, g, s)?
        }
        "gelu_tanh" => {
            // 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
            let g2 = b.bin(Op::Mul {}, g, g)?;
            let g3 = b.bin(Op::Mul {}, g2, g)?;
            let c = b.scalar(cd, 0.044715)?;
            let cg3 = b.bin(Op::Mul {}, c, g3)?;
            let inner = b.bin(Op::Add {}, g, cg3)?;
            let k = b.scalar(cd, (2.0 / std::f64::consts::PI).sqrt())?;
            let ki = b.bin(Op::Mul {}, k, inner)?;
            let t = b.un(Op::Tanh {}, ki)?;
            let (half, one) = (b.scalar(cd, 0.5)?, b.scalar(cd, 1.0)?);
            let hg = b.bin(Op::Mul {}, half, g)?;
            let onet = b.bin(Op::Add {}, one, t)?;
            b.bin(Op::Mul {}, hg, onet)?
        }
        "gelu" => {
            // 0.5 g (1 + erf(g / sqrt 2))
            let r2 = b.scalar(cd, std::f64::consts::SQRT_2)?;
            let z = b.bin(Op::Div {}, g, r2)?;
            let e = b.un(Op::Erf {}, z)?;
            let (half, one) = (b.scalar(cd, 0.5)?, b.scalar(cd, 1.0)?);
            let hg = b.bin(Op::Mul {}, half, g)?;
            let onee = b.bin(Op::Add {}, one, e)?;
            b.bin(Op::Mul {}, hg, onee)?
        }
        other => return Err(b.fail(format!("unknown activation `{other}`"))),
    };
    let o = b.bin(Op::Mul {}, a, u)?;
    b.cast(o, dt)
}

/// exp(x - max) / sum(exp(x - max)) along an axis.
fn softmax(b: &mut Builder, x: ValueId, axis: i64) -> Result<ValueId, GraphError> {
    let dt = b.ty(x).dtype;
    let cd = compute_dtype(dt);
    let x = b.cast(x, cd)?;
    let m = b.add(max(vec![axis], true), &[x])?;
    let d = b.bin(Op::Sub {}, x, m)?;
    let e = b.un(Op::Exp {}, d)?;
    let s = b.add(sum(vec![axis], true), &[e])?;
    let p = b.bin(Op::Div {}, e, s)?;
    b.cast(p, dt)
}

/// Adds primitive nodes computing the fused node's results from its operands
/// and returns them (in the node's result order), or `None` when the node is
/// not a fused op. The fused node itself is left in place; the new results
/// are checked to have exactly the node's result types.
pub fn decompose(g: &mut Graph, node: NodeId) -> Result<Option<Vec<ValueId>>, GraphError> {
    if !g.contains_node(node) {
        return Err(GraphError::Infer {
            op: "decompose".into(),
            at: String::new(),
            message: format!("node {} does not exist", node.index()),
        });
    }
    let n = g.node(node).clone();
    if n.op.category() != Category::Fused {
        return Ok(None);
    }
    let mut b = Builder { g, op: n.op.name(), label: n.label.clone() };
    for v in &n.inputs {
        if !b.g.has_value(*v) {
            return Err(GraphError::NoSuchValue(*v));
        }
    }
    // The node's own inference checks operand count, dtypes and shapes, so
    // the decompositions below may index operands and rely on ranks.
    let types: Vec<&TensorType> = n.inputs.iter().map(|v| b.g.ty(*v)).collect();
    n.op.infer(&types).map_err(|m| b.fail(m))?;
    let i = &n.inputs;
    let outs = match &n.op {
        Op::RmsNorm { eps } => vec![rms_norm(&mut b, i[0], i[1], *eps)?],
        Op::LayerNorm { eps } => vec![layer_norm(&mut b, i[0], i[1], i[2], *eps)?],
        Op::Rope { interleaved } => vec![rope(&mut b, i[0], i[1], i[2], *interleaved)?],
        Op::Attention { scale, causal, window, softcap } => {
            vec![attention(&mut b, i, *scale, *causal, *window, *softcap)?]
        }
        Op::GatedMlp { act } => vec![gated_mlp(&mut b, i[0], i[1], i[2], act)?],
        Op::Softmax { axis } => vec![softmax(&mut b, i[0], *axis)?],
        Op::AddRmsNorm { eps } => {
            let s = b.bin(Op::Add {}, i[0], i[1])?;
            vec![s, rms_norm(&mut b, s, i[2], *eps)?]
        }
        Op::KvAppend { axis } => vec![b.add(Op::Concat { axis: *axis }, &[i[0], i[1]])?],
        other => return Err(b.fail(format!("`{}` is fused but has no decomposition", other.name()))),
    };
    if outs.len() != n.outputs.len() {
        return Err(b.fail(format!("decomposition has {} results, the node {}", outs.len(), n.outputs.len())));
    }
    for (old, new) in n.outputs.iter().zip(&outs) {
        let (want, got) = (b.g.ty(*old), b.g.ty(*new));
        if want != got {
            return Err(b.fail(format!("decomposition computes {got}, the node declares {want}")));
        }
    }
    Ok(Some(outs))
}

/// Replaces every fused node by its decomposition (uses and graph outputs
/// are redirected, the fused node removed). Returns how many were replaced.
pub fn decompose_all(g: &mut Graph) -> Result<usize, GraphError> {
    let fused: Vec<NodeId> =
        g.topo_order()?.into_iter().filter(|n| g.node(*n).op.category() == Category::Fused).collect();
    for &n in &fused {
        let outs = decompose(g, n)?.unwrap_or_default();
        let old = g.node(n).outputs.clone();
        for (o, v) in old.into_iter().zip(outs) {
            g.replace_all_uses(o, v);
        }
        g.remove_node(n);
    }
    Ok(fused.len())
}
