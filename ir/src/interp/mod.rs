//! The reference interpreter: deliberately naive and obviously correct. It
//! defines what every op means and is the oracle for every pass and backend.
//!
//! [`run`] validates the inputs against the graph's signature and binds the
//! shape symbols ([`bind_symbols`]), checks the weights against their declared
//! types, then evaluates the nodes the outputs depend on in topological order.
//! Each node is evaluated by [`eval_op`]'s machinery: its symbolic dims are
//! evaluated with the bound symbols, the op's own shape inference is run on
//! the concrete operand types (so malformed graphs from the text parser are
//! reported, not trusted), the op is computed, and the result is checked
//! against both the inferred type and the type the graph declares.
//!
//! Numerics (see each family's module for details): floats compute in f64
//! from their stored values and are rounded once to their dtype (f16/bf16
//! results are rounded to f16/bf16, f64 stays f64); reductions, matmul and
//! the sums inside fused ops accumulate in f64; fused ops compute in f32
//! (f64 for f64 tensors) and round only their results; integers are exact in
//! i64 and wrapped to their dtype; bools are bools. Nothing here panics on
//! bad input: every problem becomes an [`InterpError`] that names the input,
//! weight or node (its label and text line when it has them).

mod common;
mod elementwise;
mod fused;
mod linalg;
mod movement;
mod reduce;

use crate::bind::BindError;
use crate::graph::{GraphError, NodeId, ValueId};
use crate::types::{ShapeDisplay, TensorType};
use crate::{DType, Dim, Graph, Op, Tensor};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Why the interpreter could not run a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    /// A graph input has no tensor.
    #[error("missing input `{name}` (expected {expected})")]
    MissingInput { name: String, expected: TensorType },
    /// A tensor is given for a name that is not a graph input.
    #[error("unknown input `{name}` (the graph's inputs are {})", list(.expected))]
    UnknownInput { name: String, expected: Vec<String> },
    /// An input has the wrong dtype.
    #[error("input `{name}`: expected dtype {expected}, found {found}")]
    InputDType { name: String, expected: DType, found: DType },
    /// An input has the wrong rank.
    #[error("input `{name}`: expected rank {} ({expected}), found rank {} (shape {found:?})", .expected.rank(), .found.len())]
    InputRank { name: String, expected: TensorType, found: Vec<usize> },
    /// An input dim differs from its declared constant, from a symbol bound
    /// elsewhere, or from the value of its expression.
    #[error("input `{name}` axis {axis}: expected {expected}, found {found}")]
    InputDim {
        name: String,
        axis: usize,
        /// The declared dim and, when it has one, its value (`past + seq = 7`).
        expected: String,
        found: usize,
    },
    /// A symbol bound from the inputs lies outside the bounds the graph declares.
    #[error(
        "symbol `{symbol}` = {value} (from input `{name}` axis {axis}) is outside its declared bounds [{min}, {max}]"
    )]
    SymbolOutOfBounds { symbol: String, value: i64, name: String, axis: usize, min: i64, max: i64 },
    /// An input tensor is malformed (storage, length or integer range).
    #[error("input `{name}`: {why}")]
    BadInput { name: String, why: String },
    /// A weight the graph references has no tensor.
    #[error("missing weight `{name}` (expected {expected})")]
    MissingWeight { name: String, expected: TensorType },
    /// A weight differs from its declared type, or is malformed.
    #[error("weight `{name}`: expected {expected}, found {found}")]
    WeightMismatch { name: String, expected: String, found: String },
    /// An op failed while running; `at` names the node (label, text line or value).
    #[error("op `{op}`{at}: {message}")]
    Op { op: String, at: String, message: String },
    /// The graph itself is broken (a cycle, a dangling value).
    #[error(transparent)]
    Graph(#[from] GraphError),
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        return "none".to_string();
    }
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// `f32[2, 3]` for a concrete tensor.
fn describe(t: &Tensor) -> String {
    let dims: Vec<Dim> = t.shape.iter().map(|&d| Dim::from(d)).collect();
    format!("{}{}", t.dtype, ShapeDisplay(&dims))
}

/// Binds every shape symbol from the inputs' shapes, after checking that the
/// inputs match the graph's signature: every input present and no unknown
/// name, dtypes and ranks as declared, constant dims equal, a dim that is a
/// single symbol binding it (the same value everywhere), a dim that is an
/// expression with one still-unknown symbol (`past + seq` when only `seq`
/// is bound elsewhere) solving for it, bounds declared in `g.symbols()`
/// respected, and every remaining expression equal to its value.
pub fn bind_symbols(g: &Graph, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, i64>, InterpError> {
    let declared = g.inputs();
    let names: Vec<String> = declared.iter().map(|(n, _)| n.clone()).collect();
    if let Some(name) = inputs.keys().find(|k| !names.contains(k)) {
        return Err(InterpError::UnknownInput { name: name.clone(), expected: names });
    }
    let mut sigs: Vec<(&str, &TensorType, &Tensor)> = Vec::new();
    for (name, v) in &declared {
        let ty = g.ty(*v);
        let t =
            inputs.get(name).ok_or_else(|| InterpError::MissingInput { name: name.clone(), expected: ty.clone() })?;
        common::check_tensor(t).map_err(|why| InterpError::BadInput { name: name.clone(), why })?;
        if t.dtype != ty.dtype {
            return Err(InterpError::InputDType { name: name.clone(), expected: ty.dtype, found: t.dtype });
        }
        if t.shape.len() != ty.rank() {
            return Err(InterpError::InputRank { name: name.clone(), expected: ty.clone(), found: t.shape.clone() });
        }
        sigs.push((name, ty, t));
    }
    let shapes: Vec<(&str, &[Dim], &[usize])> =
        sigs.iter().map(|&(name, ty, t)| (name, ty.shape.as_slice(), t.shape.as_slice())).collect();
    let bounds = |s: &str| g.symbols().get(s).map(|b| (b.min, b.max));
    crate::bind::bind_shapes(&shapes, &bounds).map_err(|e| match e {
        BindError::Dim { input, axis, expected, found } => InterpError::InputDim { name: input, axis, expected, found },
        BindError::OutOfBounds { symbol, value, input, axis, min, max } => {
            InterpError::SymbolOutOfBounds { symbol, value, name: input, axis, min, max }
        }
    })
}

/// Checks every weight the graph references against its declared type (dims
/// evaluated with the bound symbols). Extra entries in `weights` are ignored.
fn check_weights(
    g: &Graph,
    weights: &BTreeMap<String, Tensor>,
    syms: &BTreeMap<String, i64>,
) -> Result<(), InterpError> {
    for (name, v) in g.weights() {
        let ty = g.ty(v);
        let t = weights
            .get(&name)
            .ok_or_else(|| InterpError::MissingWeight { name: name.clone(), expected: ty.clone() })?;
        let mismatch =
            |expected: String, found: String| InterpError::WeightMismatch { name: name.clone(), expected, found };
        common::check_tensor(t).map_err(|why| mismatch(ty.to_string(), format!("a malformed tensor ({why})")))?;
        let want = concrete_shape(ty, syms).map_err(|e| mismatch(ty.to_string(), e))?;
        if t.dtype != ty.dtype || t.shape != want {
            let dims: Vec<Dim> = want.iter().map(|&d| Dim::from(d)).collect();
            let expected = if ty.const_shape().is_some() {
                ty.to_string()
            } else {
                format!("{ty} = {}{}", ty.dtype, ShapeDisplay(&dims))
            };
            return Err(mismatch(expected, describe(t)));
        }
    }
    Ok(())
}

/// A declared shape evaluated with the bound symbols.
fn concrete_shape(ty: &TensorType, syms: &BTreeMap<String, i64>) -> Result<Vec<usize>, String> {
    ty.shape
        .iter()
        .map(|d| {
            let v = d.eval_map(syms).map_err(|e| format!("cannot evaluate dim `{d}`: {e}"))?;
            usize::try_from(v).map_err(|_| format!("dim `{d}` evaluates to {v}, which is negative"))
        })
        .collect()
}

/// The op with every symbolic dim attribute replaced by its value. Shape
/// attributes must not be negative; slice bounds, range ends and trilu's
/// diagonal may be.
fn specialise<'a>(op: &'a Op, syms: &BTreeMap<String, i64>) -> Result<Cow<'a, Op>, String> {
    let ev = |d: &Dim| -> Result<Dim, String> {
        d.eval_map(syms).map(Dim::c).map_err(|e| format!("cannot evaluate dim `{d}`: {e}"))
    };
    let shape = |ds: &[Dim]| -> Result<Vec<Dim>, String> {
        ds.iter()
            .map(|d| {
                let v = ev(d)?;
                match v.as_const() {
                    Some(c) if c < 0 => Err(format!("dim `{d}` evaluates to {c}, which is negative")),
                    _ => Ok(v),
                }
            })
            .collect()
    };
    let all = |ds: &[Dim]| -> Result<Vec<Dim>, String> { ds.iter().map(ev).collect() };
    Ok(Cow::Owned(match op {
        Op::Fill { shape: s, value, dtype } => Op::Fill { shape: shape(s)?, value: *value, dtype: *dtype },
        Op::Range { start, end, step, dtype } => {
            Op::Range { start: ev(start)?, end: ev(end)?, step: *step, dtype: *dtype }
        }
        Op::Reshape { shape: s } => Op::Reshape { shape: shape(s)? },
        Op::Expand { shape: s } => Op::Expand { shape: shape(s)? },
        Op::Slice { axes, starts, ends, steps } => {
            Op::Slice { axes: axes.clone(), starts: all(starts)?, ends: all(ends)?, steps: steps.clone() }
        }
        Op::Trilu { upper, k } => Op::Trilu { upper: *upper, k: ev(k)? },
        _ => return Ok(Cow::Borrowed(op)),
    }))
}

/// The values of dims that [`specialise`] made constant.
fn consts(ds: &[Dim]) -> Vec<i64> {
    ds.iter().map(konst).collect()
}

fn konst(d: &Dim) -> i64 {
    d.as_const().expect("specialise evaluates every dim attribute")
}

/// Computes one op. Operand count, dtypes and shapes were checked by the
/// op's inference on the concrete types, so indexing operands is safe.
fn dispatch(op: &Op, a: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    use elementwise as ew;
    let one = |t: Result<Tensor, String>| t.map(|t| vec![t]);
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err("inputs and weights are bound by `run`, not evaluated".into()),
        Op::Constant { value } => {
            common::check_tensor(value).map_err(|e| format!("malformed literal: {e}"))?;
            Ok(vec![value.clone()])
        }
        Op::Fill { shape, value, dtype } => one(movement::fill(&consts(shape), *value, *dtype)),
        Op::Range { start, end, step, dtype } => one(movement::range(konst(start), konst(end), *step, *dtype)),
        Op::Neg {}
        | Op::Abs {}
        | Op::Relu {}
        | Op::Sign {}
        | Op::Exp {}
        | Op::Log {}
        | Op::Sqrt {}
        | Op::Rsqrt {}
        | Op::Reciprocal {}
        | Op::Sin {}
        | Op::Cos {}
        | Op::Tanh {}
        | Op::Sigmoid {}
        | Op::Erf {}
        | Op::Floor {}
        | Op::Ceil {}
        | Op::Round {}
        | Op::Not {}
        | Op::IsNan {}
        | Op::IsInf {} => one(ew::unary(op, a[0])),
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
        | Op::Xor {} => one(ew::binary(op, a[0], a[1])),
        Op::Where {} => one(ew::where_(a[0], a[1], a[2])),
        Op::Cast { to } => one(ew::cast(a[0], *to)),
        Op::ReduceSum { axes, keepdims }
        | Op::ReduceMean { axes, keepdims }
        | Op::ReduceMax { axes, keepdims }
        | Op::ReduceMin { axes, keepdims }
        | Op::ReduceProd { axes, keepdims } => one(reduce::reduce(op, a[0], axes, *keepdims)),
        Op::ArgMax { axis, keepdims } => one(reduce::argmax(a[0], *axis, *keepdims)),
        Op::MatMul {} => one(linalg::matmul(a[0], a[1])),
        Op::Reshape { shape } => one(movement::reshape(a[0], &consts(shape))),
        Op::Transpose { perm } => one(movement::transpose(a[0], perm)),
        Op::Slice { axes, starts, ends, steps } => {
            one(movement::slice(a[0], axes, &consts(starts), &consts(ends), steps))
        }
        Op::Concat { axis } => one(movement::concat(a, *axis)),
        Op::Expand { shape } => one(movement::expand(a[0], &consts(shape))),
        Op::Squeeze { axes } => one(movement::squeeze(a[0], axes)),
        Op::Unsqueeze { axes } => one(movement::unsqueeze(a[0], axes)),
        Op::Gather { axis } => one(movement::gather(a[0], a[1], *axis)),
        Op::GatherElements { axis } => one(movement::gather_elements(a[0], a[1], *axis)),
        Op::ScatterElements { axis } => one(movement::scatter_elements(a[0], a[1], a[2], *axis)),
        Op::ScatterNd {} => one(movement::scatter_nd(a[0], a[1], a[2])),
        Op::CumSum { axis, exclusive, reverse } => one(reduce::cumsum(a[0], *axis, *exclusive, *reverse)),
        Op::Trilu { upper, k } => one(movement::trilu(a[0], *upper, konst(k))),
        Op::RmsNorm { eps } => one(fused::rms_norm(a[0], a[1], *eps)),
        Op::LayerNorm { eps } => one(fused::layer_norm(a[0], a[1], a[2], *eps)),
        Op::Rope { interleaved } => one(fused::rope(a[0], a[1], a[2], *interleaved)),
        Op::Attention { scale, causal, window, softcap } => {
            one(fused::attention(a[0], a[1], a[2], a.get(3).copied(), *scale, *causal, *window, *softcap))
        }
        Op::GatedMlp { act } => one(fused::gated_mlp(a[0], a[1], a[2], act)),
        Op::Softmax { axis } => one(fused::softmax(a[0], *axis)),
        Op::AddRmsNorm { eps } => fused::add_rms_norm(a[0], a[1], a[2], *eps),
        Op::KvAppend { axis } => one(movement::concat(a, *axis)),
    }
}

/// Evaluates one op on well-formed operands: specialises its dims, checks it
/// with its own inference on the concrete operand types, computes it, and
/// checks the results against that inference.
fn eval_node(op: &Op, operands: &[&Tensor], syms: &BTreeMap<String, i64>) -> Result<Vec<Tensor>, String> {
    let op = specialise(op, syms)?;
    let types: Vec<TensorType> = operands.iter().map(|t| TensorType::fixed(t.dtype, &t.shape)).collect();
    let expected = op.infer(&types.iter().collect::<Vec<_>>())?;
    let results = dispatch(&op, operands)?;
    if results.len() != expected.len() {
        return Err(format!("computed {} results, inference expects {}", results.len(), expected.len()));
    }
    for (i, (t, ty)) in results.iter().zip(&expected).enumerate() {
        if t.dtype != ty.dtype || ty.const_shape().as_deref() != Some(&t.shape[..]) {
            return Err(format!("result {i} is {}, but inference expects {ty} (an interpreter bug)", describe(t)));
        }
    }
    Ok(results)
}

/// Evaluates one op on concrete operands with the given symbol values (for
/// ops with symbolic dims: fill, range, reshape, expand, slice, trilu). The
/// operands are validated first. Useful for testing a single op or rule.
pub fn eval_op(op: &Op, operands: &[&Tensor], symbols: &BTreeMap<String, i64>) -> Result<Vec<Tensor>, InterpError> {
    let err = |message: String| InterpError::Op { op: op.name().to_string(), at: String::new(), message };
    for (i, t) in operands.iter().enumerate() {
        common::check_tensor(t).map_err(|e| err(format!("operand {i}: {e}")))?;
    }
    eval_node(op, operands, symbols).map_err(err)
}

/// Where a node is, for messages: its label, its text line, or the value it defines.
fn location(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    let mut at = String::new();
    if let Some(l) = &node.label {
        at.push_str(&format!(" at `{l}`"));
    }
    if let Some(line) = node.line {
        at.push_str(&format!(" (line {line})"));
    }
    if at.is_empty() {
        if let Some(v) = node.outputs.first() {
            at = format!(" defining {v}");
        }
    }
    at
}

/// Runs the graph: validates the inputs (see [`bind_symbols`]) and the
/// weights, then evaluates every node the outputs depend on. Returns the
/// outputs by name. Weights the graph does not reference are ignored.
pub fn run(
    g: &Graph,
    weights: &BTreeMap<String, Tensor>,
    inputs: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, InterpError> {
    let syms = bind_symbols(g, inputs)?;
    check_weights(g, weights, &syms)?;
    for (_, v) in g.outputs() {
        if !g.has_value(*v) {
            return Err(GraphError::NoSuchValue(*v).into());
        }
    }

    // Only the nodes the outputs depend on are evaluated, and each value is
    // dropped after its last use.
    let mut live: BTreeSet<NodeId> = BTreeSet::new();
    let mut uses: HashMap<ValueId, usize> = HashMap::new();
    let mut stack: Vec<ValueId> = g.outputs().iter().map(|(_, v)| *v).collect();
    for v in &stack {
        *uses.entry(*v).or_default() += 1;
    }
    while let Some(v) = stack.pop() {
        if !g.has_value(v) {
            return Err(GraphError::NoSuchValue(v).into());
        }
        let def = g.value(v).def;
        if live.insert(def) {
            for &operand in &g.node(def).inputs {
                *uses.entry(operand).or_default() += 1;
                stack.push(operand);
            }
        }
    }

    let mut vals: HashMap<ValueId, Cow<Tensor>> = HashMap::new();
    for n in g.topo_order()? {
        if !live.contains(&n) {
            continue;
        }
        let node = g.node(n);
        let op_err = |message: String| InterpError::Op { op: node.op.name().to_string(), at: location(g, n), message };
        let results: Vec<Cow<Tensor>> = match &node.op {
            // Validation guarantees these are present and well typed.
            Op::Input { name } => {
                vec![Cow::Borrowed(inputs.get(name).ok_or_else(|| op_err(format!("input `{name}` is not bound")))?)]
            }
            Op::Weight { name } => {
                vec![Cow::Borrowed(weights.get(name).ok_or_else(|| op_err(format!("weight `{name}` is not bound")))?)]
            }
            op => {
                let operands = node
                    .inputs
                    .iter()
                    .map(|v| vals.get(v).map(|t| t.as_ref()).ok_or_else(|| op_err(format!("operand {v} has no value"))))
                    .collect::<Result<Vec<&Tensor>, _>>()?;
                let out = eval_node(op, &operands, &syms).map_err(op_err)?;
                for (i, (t, v)) in out.iter().zip(&node.outputs).enumerate() {
                    let ty = g.ty(*v);
                    let want = concrete_shape(ty, &syms).map_err(|e| op_err(format!("result {i}: {e}")))?;
                    if t.dtype != ty.dtype || t.shape != want {
                        let dims: Vec<Dim> = want.iter().map(|&d| Dim::from(d)).collect();
                        return Err(op_err(format!(
                            "result {i} is {}, but the graph declares {ty} = {}{}",
                            describe(t),
                            ty.dtype,
                            ShapeDisplay(&dims)
                        )));
                    }
                }
                out.into_iter().map(Cow::Owned).collect()
            }
        };
        if results.len() != node.outputs.len() {
            return Err(op_err(format!("computed {} results for {} values", results.len(), node.outputs.len())));
        }
        for v in &node.inputs {
            if let Some(u) = uses.get_mut(v) {
                *u -= 1;
                if *u == 0 {
                    vals.remove(v);
                }
            }
        }
        for (v, t) in node.outputs.iter().zip(results) {
            if uses.get(v).copied().unwrap_or(0) > 0 {
                vals.insert(*v, t);
            }
        }
    }

    let mut out = BTreeMap::new();
    for (name, v) in g.outputs() {
        let t = vals.get(v).ok_or_else(|| InterpError::Op {
            op: "output".to_string(),
            at: format!(" `{name}`"),
            message: format!("value {v} was not computed"),
        })?;
        out.insert(name.clone(), t.as_ref().clone());
    }
    Ok(out)
}
