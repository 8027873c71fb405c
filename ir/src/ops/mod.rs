//! The op registry: every op is declared exactly once in the `ops!` table
//! below (text spelling, operands, attributes, shape/dtype inference, one doc
//! line). The closed [`Op`] enum, [`OpKind`], the metadata table [`OPS`] (used
//! by the printer, the parser, the verifier and `docs/ops.md`) all come from
//! it; exhaustive `match`es elsewhere make the compiler point at every place
//! a new op must be handled. `docs/add-an-op.md` walks through adding one.

pub mod infer;

use crate::attr::{AttrType, AttrValue};
use crate::tensor::Tensor;
use crate::types::TensorType;
use crate::{DType, Dim};

/// Where an op sits in the compiler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// Values whose type is declared, not inferred: graph inputs and weights.
    Declared,
    /// What frontends emit.
    Primitive,
    /// What fusion produces; each has a reference decomposition into primitives.
    Fused,
}

/// Static facts about one op, from its declaration.
#[derive(Debug)]
pub struct OpInfo {
    pub kind: OpKind,
    /// Text spelling, e.g. `rms_norm`.
    pub name: &'static str,
    pub doc: &'static str,
    pub category: Category,
    /// Names of the fixed operands, in order.
    pub operands: &'static [&'static str],
    /// Name of the trailing variadic operand list, if any.
    pub variadic: Option<&'static str>,
    /// Attribute names, in declaration (and printing) order.
    pub attrs: &'static [&'static str],
}

/// Error building an op from its text spelling and generic attributes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    #[error("op `{op}`: attribute `{attr}`: {why}")]
    BadAttr { op: String, attr: String, why: String },
    #[error("op `{op}` has no attribute `{attr}` (its attributes: {known})")]
    UnknownAttr { op: String, attr: String, known: String },
}

macro_rules! ops {
    ($(
        $(#[doc = $doc:literal])+
        $variant:ident $text:literal $cat:ident
            ( $($operand:ident),* $(; $rest:ident ..)? )
            { $($field:ident : $fty:ty),* $(,)? }
            => $infer:path;
    )*) => {
        /// An operation with its attributes. Operands live on the graph node.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $( $(#[doc = $doc])+ $variant { $( $field: $fty ),* }, )*
        }

        /// The op without its attributes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind { $( $variant, )* }

        /// Every op's metadata, indexed by `OpKind as usize`.
        pub static OPS: &[OpInfo] = &[
            $( OpInfo {
                kind: OpKind::$variant,
                name: $text,
                doc: concat!($($doc),+),
                category: Category::$cat,
                operands: &[$(stringify!($operand)),*],
                variadic: ops!(@opt $($rest)?),
                attrs: &[$(stringify!($field)),*],
            }, )*
        ];

        impl Op {
            pub fn kind(&self) -> OpKind {
                match self { $( Op::$variant { .. } => OpKind::$variant, )* }
            }

            /// The attributes in their generic form, in declaration order;
            /// absent optional attributes are left out.
            #[allow(unused_mut)]
            pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
                match self {
                    $( Op::$variant { $($field),* } => {
                        let mut v = Vec::new();
                        $( if let Some(a) = AttrType::to_attr($field) { v.push((stringify!($field), a)); } )*
                        v
                    } )*
                }
            }

            /// Builds an op from its text spelling and attributes.
            #[allow(unused_mut, unused_variables)]
            pub fn from_parts(name: &str, attrs: Vec<(String, AttrValue)>) -> Result<Op, OpError> {
                let kind = OpKind::from_name(name).ok_or_else(|| OpError::UnknownOp(name.to_string()))?;
                let info = kind.info();
                for (k, _) in &attrs {
                    if !info.attrs.contains(&k.as_str()) {
                        return Err(OpError::UnknownAttr {
                            op: name.to_string(),
                            attr: k.clone(),
                            known: if info.attrs.is_empty() { "none".to_string() } else { info.attrs.join(", ") },
                        });
                    }
                }
                let mut attrs = attrs;
                let mut take = |attr: &str| {
                    attrs.iter().position(|(k, _)| k == attr).map(|i| attrs.swap_remove(i).1)
                };
                let bad = |attr: &str, why: String| OpError::BadAttr { op: name.to_string(), attr: attr.to_string(), why };
                match kind {
                    $( OpKind::$variant => Ok(Op::$variant {
                        $( $field: AttrType::from_attr(take(stringify!($field))).map_err(|w| bad(stringify!($field), w))?, )*
                    }), )*
                }
            }

            /// Output types from operand types, without the arity check
            /// ([`Op::infer`] does that first).
            fn infer_outputs(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
                match self {
                    $( Op::$variant { $($field),* } => $infer(inputs $(, $field)*), )*
                }
            }
        }
    };
    (@opt) => { None };
    (@opt $rest:ident) => { Some(stringify!($rest)) };
}

impl OpKind {
    pub fn info(self) -> &'static OpInfo {
        &OPS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn from_name(name: &str) -> Option<OpKind> {
        OPS.iter().find(|i| i.name == name).map(|i| i.kind)
    }
}

impl Op {
    pub fn info(&self) -> &'static OpInfo {
        self.kind().info()
    }

    pub fn name(&self) -> &'static str {
        self.info().name
    }

    pub fn category(&self) -> Category {
        self.info().category
    }

    /// Checks the operand count, then infers output types. Declared ops
    /// (inputs, weights) return an empty list: their type is stored on the node.
    pub fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let info = self.info();
        let fixed = info.operands.len();
        let ok = if info.variadic.is_some() { inputs.len() >= fixed } else { inputs.len() == fixed };
        if !ok {
            let want = match info.variadic {
                Some(_) => format!("at least {fixed}"),
                None => fixed.to_string(),
            };
            return Err(format!("expects {want} operands ({}), found {}", operand_list(info), inputs.len()));
        }
        self.infer_outputs(inputs)
    }
}

fn operand_list(info: &OpInfo) -> String {
    let mut v: Vec<String> = info.operands.iter().map(|s| s.to_string()).collect();
    if let Some(r) = info.variadic {
        v.push(format!("{r}..."));
    }
    v.join(", ")
}

use infer as i;

ops! {
    // ----- declared sources -----
    /// A graph input, named as in the model's signature.
    Input "input" Declared () { name: String } => i::declared;
    /// A weight, named as in the checkpoint; data lives in the weight store.
    Weight "weight" Declared () { name: String } => i::declared;

    // ----- primitive sources -----
    /// A small literal tensor.
    Constant "constant" Primitive () { value: Tensor } => i::constant;
    /// A tensor of a (possibly symbolic) shape filled with one value.
    Fill "fill" Primitive () { shape: Vec<Dim>, value: f64, dtype: DType } => i::fill;
    /// The 1-D sequence start, start+step, ... below end (above end for a negative step).
    Range "range" Primitive () { start: Dim, end: Dim, step: i64, dtype: DType } => i::range;

    // ----- elementwise unary -----
    /// -x.
    Neg "neg" Primitive (x) {} => i::unary_numeric;
    /// |x|.
    Abs "abs" Primitive (x) {} => i::unary_numeric;
    /// max(x, 0).
    Relu "relu" Primitive (x) {} => i::unary_numeric;
    /// -1, 0 or 1 by the sign of x.
    Sign "sign" Primitive (x) {} => i::unary_numeric;
    /// e^x.
    Exp "exp" Primitive (x) {} => i::unary_float;
    /// Natural logarithm.
    Log "log" Primitive (x) {} => i::unary_float;
    /// Square root.
    Sqrt "sqrt" Primitive (x) {} => i::unary_float;
    /// 1 / sqrt(x).
    Rsqrt "rsqrt" Primitive (x) {} => i::unary_float;
    /// 1 / x.
    Reciprocal "reciprocal" Primitive (x) {} => i::unary_float;
    /// Sine.
    Sin "sin" Primitive (x) {} => i::unary_float;
    /// Cosine.
    Cos "cos" Primitive (x) {} => i::unary_float;
    /// Hyperbolic tangent.
    Tanh "tanh" Primitive (x) {} => i::unary_float;
    /// 1 / (1 + e^-x).
    Sigmoid "sigmoid" Primitive (x) {} => i::unary_float;
    /// The Gauss error function.
    Erf "erf" Primitive (x) {} => i::unary_float;
    /// Round toward -inf.
    Floor "floor" Primitive (x) {} => i::unary_float;
    /// Round toward +inf.
    Ceil "ceil" Primitive (x) {} => i::unary_float;
    /// Round half to even.
    Round "round" Primitive (x) {} => i::unary_float;
    /// Logical not of a bool tensor.
    Not "not" Primitive (x) {} => i::unary_bool;
    /// True where x is NaN.
    IsNan "isnan" Primitive (x) {} => i::float_predicate;
    /// True where x is +inf or -inf.
    IsInf "isinf" Primitive (x) {} => i::float_predicate;

    // ----- elementwise binary (numpy broadcasting) -----
    /// Elementwise addition with numpy broadcasting.
    Add "add" Primitive (a, b) {} => i::binary_numeric;
    /// Elementwise subtraction with numpy broadcasting.
    Sub "sub" Primitive (a, b) {} => i::binary_numeric;
    /// Elementwise multiplication with numpy broadcasting.
    Mul "mul" Primitive (a, b) {} => i::binary_numeric;
    /// Elementwise division with numpy broadcasting (integers truncate toward zero).
    Div "div" Primitive (a, b) {} => i::binary_numeric;
    /// a^b; the result has a's dtype, b may have another numeric dtype.
    Pow "pow" Primitive (a, b) {} => i::pow;
    /// Elementwise maximum (NaN propagates).
    Max "max" Primitive (a, b) {} => i::binary_numeric;
    /// Elementwise minimum (NaN propagates).
    Min "min" Primitive (a, b) {} => i::binary_numeric;
    /// Floored modulo: the result has the sign of b (Python's %).
    Mod "mod" Primitive (a, b) {} => i::binary_numeric;
    /// Truncated remainder: the result has the sign of a (C's fmod).
    Rem "rem" Primitive (a, b) {} => i::binary_numeric;
    /// a == b.
    Eq "eq" Primitive (a, b) {} => i::compare;
    /// a != b.
    Ne "ne" Primitive (a, b) {} => i::compare;
    /// a < b.
    Lt "lt" Primitive (a, b) {} => i::compare;
    /// a <= b.
    Le "le" Primitive (a, b) {} => i::compare;
    /// a > b.
    Gt "gt" Primitive (a, b) {} => i::compare;
    /// a >= b.
    Ge "ge" Primitive (a, b) {} => i::compare;
    /// Logical and of bool tensors.
    And "and" Primitive (a, b) {} => i::logical;
    /// Logical or of bool tensors.
    Or "or" Primitive (a, b) {} => i::logical;
    /// Logical exclusive or of bool tensors.
    Xor "xor" Primitive (a, b) {} => i::logical;
    /// cond ? a : b, with numpy broadcasting of all three.
    Where "where" Primitive (cond, a, b) {} => i::where_;
    /// Converts to another dtype (floats to ints truncate toward zero; nonzero to bool is true).
    Cast "cast" Primitive (x) { to: DType } => i::cast;

    // ----- reductions -----
    /// Sum over axes (f64 accumulation in the interpreter).
    ReduceSum "reduce_sum" Primitive (x) { axes: Vec<i64>, keepdims: bool } => i::reduce;
    /// Mean over axes.
    ReduceMean "reduce_mean" Primitive (x) { axes: Vec<i64>, keepdims: bool } => i::reduce;
    /// Maximum over axes.
    ReduceMax "reduce_max" Primitive (x) { axes: Vec<i64>, keepdims: bool } => i::reduce;
    /// Minimum over axes.
    ReduceMin "reduce_min" Primitive (x) { axes: Vec<i64>, keepdims: bool } => i::reduce;
    /// Product over axes.
    ReduceProd "reduce_prod" Primitive (x) { axes: Vec<i64>, keepdims: bool } => i::reduce;
    /// Index (i64) of the first maximum along an axis.
    ArgMax "argmax" Primitive (x) { axis: i64, keepdims: bool } => i::argmax;

    // ----- linear algebra -----
    /// numpy matmul: batched over leading dims with broadcasting; 1-D operands are promoted.
    MatMul "matmul" Primitive (a, b) {} => i::matmul;

    // ----- movement -----
    /// Same elements, new shape (element counts must be provably equal).
    Reshape "reshape" Primitive (x) { shape: Vec<Dim> } => i::reshape;
    /// Permutes axes: output axis i is input axis perm[i].
    Transpose "transpose" Primitive (x) { perm: Vec<i64> } => i::transpose;
    /// `x[start:end:step]` on each listed axis; starts/ends are already in range (0 <= start <= dim; a negative step may end at -1).
    Slice "slice" Primitive (x) { axes: Vec<i64>, starts: Vec<Dim>, ends: Vec<Dim>, steps: Vec<i64> } => i::slice;
    /// Concatenation along an axis.
    Concat "concat" Primitive (; inputs ..) { axis: i64 } => i::concat;
    /// numpy broadcast of x against a shape.
    Expand "expand" Primitive (x) { shape: Vec<Dim> } => i::expand;
    /// Removes the listed axes, each of size 1.
    Squeeze "squeeze" Primitive (x) { axes: Vec<i64> } => i::squeeze;
    /// Inserts axes of size 1 at the listed output positions.
    Unsqueeze "unsqueeze" Primitive (x) { axes: Vec<i64> } => i::unsqueeze;
    /// Takes slices of data along an axis at the indices (negative indices count from the end).
    Gather "gather" Primitive (data, indices) { axis: i64 } => i::gather;
    /// `out[i][j] = data[indices[i][j]][j]` along the axis (indices has out's shape).
    GatherElements "gather_elements" Primitive (data, indices) { axis: i64 } => i::gather_elements;
    /// Copy of data with `data[indices[i][j]][j] = updates[i][j]` along the axis.
    ScatterElements "scatter_elements" Primitive (data, indices, updates) { axis: i64 } => i::scatter_elements;
    /// Copy of data with the slices addressed by the last axis of indices replaced by updates.
    ScatterNd "scatter_nd" Primitive (data, indices, updates) {} => i::scatter_nd;
    /// Running sum along an axis.
    CumSum "cumsum" Primitive (x) { axis: i64, exclusive: bool, reverse: bool } => i::cumsum;
    /// Keeps the upper (j - i >= k) or lower (j - i <= k) triangle of the last two axes, zeroing the rest.
    Trilu "trilu" Primitive (x) { upper: bool, k: Dim } => i::trilu;

    // ----- fused -----
    /// Root mean square normalisation over the last axis: x * rsqrt(mean(x^2) + eps) * w, in f32.
    RmsNorm "rms_norm" Fused (x, w) { eps: f64 } => i::norm;
    /// Layer normalisation over the last axis: (x - mean) * rsqrt(var + eps) * w + b.
    LayerNorm "layer_norm" Fused (x, w, b) { eps: f64 } => i::norm;
    /// Rotary embedding of the first R features of x (R = last dim of cos/sin): rotate-half, or interleaved pairs.
    Rope "rope" Fused (x, cos, sin) { interleaved: bool } => i::rope;
    /// `softmax(q kᵀ * scale [softcap] + mask) v` over `[b, heads, seq, d]`; grouped-query kv heads; causal/window masks aligned to the end of k.
    Attention "attention" Fused (q, k, v; mask ..) { scale: f64, causal: bool, window: Option<i64>, softcap: Option<f64> } => i::attention;
    /// act(x·w_gate) * (x·w_up), act one of silu, gelu_tanh, gelu.
    GatedMlp "gated_mlp" Fused (x, w_gate, w_up) { act: String } => i::gated_mlp;
    /// exp(x - max) / sum(exp(x - max)) along an axis.
    Softmax "softmax" Fused (x) { axis: i64 } => i::same_float;
    /// s = x + residual; outputs (s, rms_norm(s, w)).
    AddRmsNorm "add_rms_norm" Fused (x, residual, w) { eps: f64 } => i::add_rms_norm;
    /// The cache with new appended along an axis, written in place by backends (the interpreter concatenates).
    KvAppend "kv_append" Fused (cache, new) { axis: i64 } => i::kv_append;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_a_unique_name_and_a_doc_line() {
        let mut names: Vec<_> = OPS.iter().map(|o| o.name).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "duplicate op spellings");
        for (i, o) in OPS.iter().enumerate() {
            assert_eq!(o.kind as usize, i);
            assert!(!o.doc.trim().is_empty(), "{} has no doc", o.name);
            assert_eq!(OpKind::from_name(o.name), Some(o.kind));
        }
    }

    #[test]
    fn attributes_round_trip_through_generic_form() {
        let op = Op::Attention { scale: 0.25, causal: true, window: Some(4), softcap: None };
        let attrs = op.attrs().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(Op::from_parts("attention", attrs).unwrap(), op);
        assert!(matches!(Op::from_parts("rms_norm", vec![]), Err(OpError::BadAttr { .. })));
        assert!(matches!(
            Op::from_parts("add", vec![("axis".into(), AttrValue::Int(1))]),
            Err(OpError::UnknownAttr { .. })
        ));
    }
}
