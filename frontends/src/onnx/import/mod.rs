//! The ONNX importer: an [`OnnxModel`] becomes a smelt IR [`Graph`] of
//! primitive and fused ops, plus its weights.
//!
//! What it does, in order:
//! 1. flattens the graph: model-local functions are inlined, nodes are put in
//!    topological order (a cycle or an undefined input name is an error);
//! 2. checks coverage first ([`super::check()`]): if any node's (domain, op,
//!    opset) is unsupported, the import fails with the whole report and
//!    builds nothing;
//! 3. declares the graph inputs: every `dim_param` becomes an IR symbol (a
//!    `dim_param` that is itself an expression such as `past + seq` becomes
//!    that expression), unnamed dims get fresh symbols, all with bounds;
//! 4. turns initialisers into `weight` nodes named as in the file (small ones
//!    into `constant`s, so shape arithmetic on them folds);
//! 5. lowers each node through the op families (one module each), with
//!    symbolic shape inference and constant folding done by the
//!    `builder::Builder` every node goes through;
//! 6. names the graph outputs as in the file and removes dead nodes.
//!
//! Assumptions: the default domain at opset 13 or later (a few ops whose
//! semantics never changed are accepted from older opsets, see
//! [`support`](super::check::support)); `com.microsoft` contrib ops at version 1. Sequence, map and
//! optional values, and control flow (`If`, `Loop`, `Scan`), are not
//! supported. ONNX element types without a smelt dtype are carried as
//! described in [`dtypes`].

mod attention;
mod builder;
mod cast;
pub mod dtypes;
mod elementwise;
mod fold;
mod linalg;
mod movement;
mod norm;
mod reduce;
mod shape;
mod shape_ops;

use super::check::{self, CoverageReport};
use super::error::OnnxError;
use super::model::NodeAttrs;
use super::proto::tensor_shape_proto::dimension::Value as DimValue;
use super::proto::type_proto::Value as TypeValue;
use super::proto::{AttributeProto, FunctionProto, NodeProto, ValueInfoProto};
use super::OnnxModel;
use builder::Builder;
use dtypes::{Carrier, DataType};
use smelt_ir::{Dim, Graph, Op, Tensor, TensorType, ValueId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// An imported model: the IR graph and the weights its `weight` nodes name.
#[derive(Debug, Clone)]
pub struct OnnxImport {
    pub graph: Graph,
    pub weights: BTreeMap<String, Tensor>,
    /// The graph inputs with the ONNX element types they stand for, in order.
    pub inputs: Vec<IoSpec>,
    /// The graph outputs with the ONNX element types they stand for, in order.
    pub outputs: Vec<IoSpec>,
}

/// A graph input or output and the ONNX element type its IR value carries
/// (see [`dtypes`]: a UINT16 output is an IR `i32` holding UINT16 values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    pub onnx_type: DataType,
}

/// Knobs of [`import_with`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Graph inputs to treat as constants with these values (in their carrier
    /// dtype); they are not inputs of the imported graph. This specialises a
    /// model whose shape operands (a reshape target, `Tile` repeats) are graph
    /// inputs, as in some operator tests.
    pub constant_inputs: BTreeMap<String, Tensor>,
    /// The upper bound declared for every symbol from the model's inputs.
    pub symbol_max: i64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { constant_inputs: BTreeMap::new(), symbol_max: 65536 }
    }
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read or decoded.
    #[error(transparent)]
    File(#[from] OnnxError),
    /// Operators smelt does not support; the report lists every one of them.
    #[error("{0}")]
    Unsupported(Box<CoverageReport>),
    /// A node could not be lowered.
    #[error("{}: node `{node}` ({op_type}): {message}", file.display())]
    Node { file: PathBuf, node: String, op_type: String, message: String },
    /// The graph as a whole is malformed or unsupported.
    #[error("{}: {message}", file.display())]
    Model { file: PathBuf, message: String },
}

impl ImportError {
    /// Whether the failure is a shape operand that is not known at import
    /// time (a graph input used as a reshape target, say), which
    /// [`ImportOptions::constant_inputs`] can resolve.
    pub fn needs_constant_inputs(&self) -> bool {
        matches!(self, ImportError::Node { message, .. } if message.contains(NOT_STATIC))
    }
}

/// The phrase every "operand must be known at import" error contains.
pub(crate) const NOT_STATIC: &str = "must be known at import time";

/// Imports an `.onnx` file.
pub fn import(path: &Path) -> Result<OnnxImport, ImportError> {
    import_with(path, &ImportOptions::default())
}

/// Imports an `.onnx` file with options.
pub fn import_with(path: &Path, opts: &ImportOptions) -> Result<OnnxImport, ImportError> {
    let model = OnnxModel::open(path)?;
    import_model(&model, opts)
}

/// Imports an opened model.
pub fn import_model(model: &OnnxModel, opts: &ImportOptions) -> Result<OnnxImport, ImportError> {
    let nodes = flatten(model)?;
    let report = check::check_nodes(model, &nodes);
    if !report.is_supported() {
        return Err(ImportError::Unsupported(Box::new(report)));
    }
    // Input symbols that the graph forces to equal other dims; each failed
    // attempt that reveals one more starts the import over.
    let mut subst: BTreeMap<String, Dim> = BTreeMap::new();
    'attempt: for _ in 0..=MAX_UNIFICATIONS {
        let mut imp = Importer {
            model,
            b: Builder::new(Graph::new(&graph_name(model))),
            env: HashMap::new(),
            weights: BTreeMap::new(),
            inputs: Vec::new(),
        };
        imp.declare_inputs(opts, &subst)?;
        imp.initializers()?;
        for n in &nodes {
            if let Err(e) = imp.node(n) {
                match imp.b.unify.take() {
                    Some((s, d)) if !subst.contains_key(&s) => {
                        // Earlier substitutions may mention the symbol too.
                        for v in subst.values_mut() {
                            *v = v.substitute(&|x| (x == s).then(|| d.clone()));
                        }
                        subst.insert(s, d);
                        continue 'attempt;
                    }
                    _ => return Err(e),
                }
            }
        }
        return imp.finish();
    }
    Err(ImportError::Model {
        file: model.path().to_path_buf(),
        message: format!("more than {MAX_UNIFICATIONS} input dims had to be unified with other dims"),
    })
}

/// The largest product of constant dims accepted in a shape: 2^48, so that
/// element counts (times symbols of bounded size) stay far from overflow.
pub(crate) const MAX_ELEMENTS: i64 = 1 << 48;

/// Whether the product of some dims stays within [`MAX_ELEMENTS`].
pub(crate) fn small_product(dims: impl IntoIterator<Item = i64>) -> bool {
    let mut p: i64 = 1;
    for d in dims {
        match p.checked_mul(d.max(1)) {
            Some(q) if q <= MAX_ELEMENTS => p = q,
            _ => return false,
        }
    }
    true
}

/// How many input symbols an import may unify with other dims.
const MAX_UNIFICATIONS: usize = 16;

/// The largest constant dim accepted in a shape (larger ones would overflow
/// element counts): 2^40.
pub(crate) const MAX_DIM: i64 = 1 << 40;

fn graph_name(model: &OnnxModel) -> String {
    let n = model.graph().name();
    if n.is_empty() {
        "main".to_string()
    } else {
        n.to_string()
    }
}

/// An ONNX value as the importer holds it: the IR value and the ONNX element
/// type it stands for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Val {
    pub id: ValueId,
    pub ety: DataType,
}

/// A node being lowered: its proto, attributes, resolved inputs and opset.
pub(crate) struct Node<'a> {
    pub proto: &'a NodeProto,
    pub attrs: NodeAttrs<'a>,
    /// One entry per input name; `None` for an omitted optional input (`""`).
    pub ins: Vec<Option<Val>>,
    /// The imported version of the node's domain.
    pub opset: i64,
}

/// What lowering a node produced: one entry per output name.
pub(crate) type Outs = Vec<Option<Val>>;

/// A lowering result; the message is wrapped with the node's name and op.
pub(crate) type R<T> = Result<T, String>;

impl<'a> Node<'a> {
    pub fn op_type(&self) -> &str {
        self.proto.op_type()
    }

    /// A required input.
    pub fn input(&self, i: usize) -> R<Val> {
        self.opt(i).ok_or_else(|| format!("input {i} is required"))
    }

    /// An optional input.
    pub fn opt(&self, i: usize) -> Option<Val> {
        self.ins.get(i).copied().flatten()
    }

    /// Whether output `i` is requested (named, non-empty).
    pub fn wants(&self, i: usize) -> bool {
        self.proto.output.get(i).is_some_and(|s| !s.is_empty())
    }

    pub fn int(&self, name: &str, default: i64) -> R<i64> {
        self.attrs.int_or(name, default).map_err(|e| e.to_string())
    }

    pub fn int_opt(&self, name: &str) -> R<Option<i64>> {
        self.attrs.int(name).map_err(|e| e.to_string())
    }

    pub fn float(&self, name: &str, default: f32) -> R<f32> {
        self.attrs.float_or(name, default).map_err(|e| e.to_string())
    }

    pub fn float_opt(&self, name: &str) -> R<Option<f32>> {
        self.attrs.float(name).map_err(|e| e.to_string())
    }

    pub fn ints(&self, name: &str) -> R<Option<Vec<i64>>> {
        self.attrs.ints(name).map(|v| v.map(<[i64]>::to_vec)).map_err(|e| e.to_string())
    }

    pub fn string(&self, name: &str, default: &'a str) -> R<&'a str> {
        self.attrs.string_or(name, default).map_err(|e| e.to_string())
    }
}

/// The importer's state.
pub(crate) struct Importer<'m> {
    pub model: &'m OnnxModel,
    pub b: Builder,
    /// ONNX value name -> its IR value.
    env: HashMap<String, Val>,
    weights: BTreeMap<String, Tensor>,
    inputs: Vec<IoSpec>,
}

/// Initialisers at most this large become `constant`s (so arithmetic on them
/// folds and fusion rules see literal epsilons and scales); larger ones are
/// weights. Integer initialisers are shape-like far more often than weights,
/// so they get a larger allowance.
const SMALL_FLOAT_INIT: usize = 8;
const SMALL_INT_INIT: usize = 4096;

impl Importer<'_> {
    fn file(&self) -> PathBuf {
        self.model.path().to_path_buf()
    }

    fn model_err(&self, message: String) -> ImportError {
        ImportError::Model { file: self.file(), message }
    }

    /// A value with the ONNX type its IR dtype natively stands for.
    pub fn val(&self, id: ValueId) -> Val {
        Val { id, ety: dtypes::native(self.b.dtype(id)) }
    }

    /// Declares the graph inputs and their symbols.
    fn declare_inputs(&mut self, opts: &ImportOptions, subst: &BTreeMap<String, Dim>) -> Result<(), ImportError> {
        let inits: HashSet<&str> = self.model.graph().initializer.iter().map(|t| t.name()).collect();
        let inputs: Vec<&ValueInfoProto> =
            self.model.graph().input.iter().filter(|i| !inits.contains(i.name())).collect();
        // Symbols first: their bounds are needed by shape reasoning, and an
        // expression dim (`past + seq`) names symbols declared elsewhere.
        let mut symbols: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let mut typed: Vec<(String, DataType, Vec<Dim>)> = Vec::new();
        for vi in inputs {
            let name = vi.name().to_string();
            if name.is_empty() {
                return Err(self.model_err("a graph input has no name".into()));
            }
            let (ety, dims) = self.input_type(vi)?;
            let mut shape = Vec::with_capacity(dims.len());
            for (axis, d) in dims.into_iter().enumerate() {
                let dim = match d {
                    InDim::Fixed(n) if n > MAX_DIM => {
                        return Err(self.model_err(format!(
                            "graph input `{name}` axis {axis} has size {n}, larger than smelt accepts ({MAX_DIM})"
                        )))
                    }
                    InDim::Fixed(n) => Dim::c(n),
                    InDim::Param(p) => param_dim(&p),
                    InDim::Unknown => Dim::sym(&format!("{}_{axis}", sanitize(&name))),
                };
                let dim = dim.substitute(&|s| subst.get(s).cloned());
                for s in dim.symbols() {
                    let min = if s.contains("past") || s.contains("cache") { 0 } else { 1 };
                    symbols.entry(s).or_insert((min, opts.symbol_max));
                }
                shape.push(dim);
            }
            if !small_product(shape.iter().filter_map(Dim::as_const)) {
                return Err(self.model_err(format!("graph input `{name}` has more than {MAX_ELEMENTS} elements")));
            }
            typed.push((name.clone(), ety, shape));
        }
        for (s, (min, max)) in &symbols {
            self.b.g.declare_symbol(s, *min, *max);
        }
        for (name, ety, shape) in typed {
            if let Some(t) = opts.constant_inputs.get(&name) {
                let id = self.b.constant(t.clone());
                self.env.insert(name, Val { id, ety });
                continue;
            }
            let (dtype, _) = dtypes::carrier(ety).ok_or_else(|| {
                self.model_err(format!(
                    "graph input `{name}` has ONNX element type {}, which smelt cannot represent",
                    ety.as_str_name()
                ))
            })?;
            let id = self.b.g.add_input(&name, TensorType::new(dtype, shape));
            self.inputs.push(IoSpec { name: name.clone(), onnx_type: ety });
            self.env.insert(name, Val { id, ety });
        }
        Ok(())
    }

    /// The element type and dims of a graph input, any element type.
    fn input_type(&self, vi: &ValueInfoProto) -> Result<(DataType, Vec<InDim>), ImportError> {
        let name = vi.name();
        let err = |m: String| self.model_err(format!("graph input `{name}`: {m}"));
        let t = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(TypeValue::TensorType(t)) => t,
            Some(_) => return Err(err("is not a tensor (sequences, maps and optionals are not supported)".into())),
            None => return Err(err("has no type".into())),
        };
        let ety = DataType::try_from(t.elem_type())
            .ok()
            .filter(|d| *d != DataType::Undefined)
            .ok_or_else(|| err(format!("has element type {}", dtypes::type_name(t.elem_type()))))?;
        let shape = t.shape.as_ref().ok_or_else(|| err("has no shape (its rank must be known)".into()))?;
        let dims = shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) if *v >= 0 => InDim::Fixed(*v),
                Some(DimValue::DimParam(p)) if !p.is_empty() => InDim::Param(p.clone()),
                _ => InDim::Unknown,
            })
            .collect();
        Ok((ety, dims))
    }

    /// Initialisers become weights or constants.
    fn initializers(&mut self) -> Result<(), ImportError> {
        for t in &self.model.graph().initializer {
            let name = t.name().to_string();
            if self.env.contains_key(&name) {
                // A graph input of the same name overrides its default.
                continue;
            }
            let (tensor, ety) =
                dtypes::decode(self.model, t).map_err(|m| self.model_err(format!("initialiser: {m}")))?;
            let small = if tensor.dtype.is_float() {
                tensor.numel() <= SMALL_FLOAT_INIT
            } else {
                tensor.numel() <= SMALL_INT_INIT
            };
            let id = if small {
                self.b.constant(tensor)
            } else {
                let ty = TensorType::fixed(tensor.dtype, &tensor.shape);
                let id = self.b.g.add_weight(&name, ty);
                self.weights.insert(name.clone(), tensor);
                id
            };
            self.env.insert(name, Val { id, ety });
        }
        Ok(())
    }

    /// Lowers one node and binds its outputs.
    fn node(&mut self, proto: &NodeProto) -> Result<(), ImportError> {
        let domain = check::canonical_domain(proto.domain());
        let opset = self.model.opset_version(domain).unwrap_or(1);
        let mut ins = Vec::with_capacity(proto.input.len());
        for name in &proto.input {
            if name.is_empty() {
                ins.push(None);
                continue;
            }
            let v = self.env.get(name).copied().ok_or_else(|| ImportError::Node {
                file: self.file(),
                node: node_name(proto),
                op_type: proto.op_type().to_string(),
                message: format!("input `{name}` is not defined by any node, initialiser or graph input"),
            })?;
            ins.push(Some(v));
        }
        let model = self.model;
        let n = Node { proto, attrs: NodeAttrs::new(model.path(), proto), ins, opset };
        self.b.label = Some(node_name(proto));
        let outs = self.lower(&n, domain).map_err(|message| ImportError::Node {
            file: self.file(),
            node: node_name(proto),
            op_type: proto.op_type().to_string(),
            message,
        })?;
        for (i, name) in proto.output.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            match outs.get(i).copied().flatten() {
                Some(v) => {
                    self.env.insert(name.clone(), v);
                }
                None => {
                    return Err(ImportError::Node {
                        file: self.file(),
                        node: node_name(proto),
                        op_type: proto.op_type().to_string(),
                        message: format!("output {i} (`{name}`) is not supported"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Dispatches a node to its op family.
    fn lower(&mut self, n: &Node, domain: &str) -> R<Outs> {
        use elementwise as ew;
        let op = n.op_type();
        if domain == check::MS_DOMAIN {
            return match op {
                "SimplifiedLayerNormalization" => norm::rms_norm(self, n),
                "SkipSimplifiedLayerNormalization" => norm::skip_rms_norm(self, n),
                "SkipLayerNormalization" => norm::skip_layer_norm(self, n),
                "RotaryEmbedding" => attention::rotary_ms(self, n),
                "GroupQueryAttention" => attention::group_query_attention(self, n),
                "MultiHeadAttention" => attention::multi_head_attention(self, n),
                "Gelu" | "FastGelu" | "QuickGelu" | "BiasGelu" => ew::ms_gelu(self, n),
                _ => Err(format!("com.microsoft:{op} is not supported")),
            };
        }
        match op {
            "Identity" => ew::identity(self, n),
            "Dropout" => ew::dropout(self, n),
            "Abs" => ew::unary(self, n, Op::Abs {}),
            "Neg" => ew::unary(self, n, Op::Neg {}),
            "Relu" => ew::unary(self, n, Op::Relu {}),
            "Sign" => ew::unary(self, n, Op::Sign {}),
            "Exp" => ew::unary(self, n, Op::Exp {}),
            "Log" => ew::unary(self, n, Op::Log {}),
            "Sqrt" => ew::unary(self, n, Op::Sqrt {}),
            "Reciprocal" => ew::unary(self, n, Op::Reciprocal {}),
            "Sin" => ew::unary(self, n, Op::Sin {}),
            "Cos" => ew::unary(self, n, Op::Cos {}),
            "Tanh" => ew::unary(self, n, Op::Tanh {}),
            "Sigmoid" => ew::unary(self, n, Op::Sigmoid {}),
            "Erf" => ew::unary(self, n, Op::Erf {}),
            "Floor" => ew::unary(self, n, Op::Floor {}),
            "Ceil" => ew::unary(self, n, Op::Ceil {}),
            "Round" => ew::unary(self, n, Op::Round {}),
            "Not" => ew::unary(self, n, Op::Not {}),
            "IsNaN" => ew::unary(self, n, Op::IsNan {}),
            "IsInf" => ew::is_inf(self, n),
            "Add" => ew::arith(self, n, Op::Add {}),
            "Sub" => ew::arith(self, n, Op::Sub {}),
            "Mul" => ew::arith(self, n, Op::Mul {}),
            "Div" => ew::arith(self, n, Op::Div {}),
            "Pow" => ew::pow(self, n),
            "Mod" => ew::modulo(self, n),
            "Max" => ew::variadic(self, n, Op::Max {}),
            "Min" => ew::variadic(self, n, Op::Min {}),
            "Sum" => ew::variadic(self, n, Op::Add {}),
            "Mean" => ew::mean(self, n),
            "Equal" => ew::compare(self, n, Op::Eq {}),
            "Less" => ew::compare(self, n, Op::Lt {}),
            "LessOrEqual" => ew::compare(self, n, Op::Le {}),
            "Greater" => ew::compare(self, n, Op::Gt {}),
            "GreaterOrEqual" => ew::compare(self, n, Op::Ge {}),
            "And" => ew::logical(self, n, Op::And {}),
            "Or" => ew::logical(self, n, Op::Or {}),
            "Xor" => ew::logical(self, n, Op::Xor {}),
            "Where" => ew::where_(self, n),
            "Clip" => ew::clip(self, n),
            "LeakyRelu" | "Elu" | "Selu" | "Celu" | "HardSigmoid" | "HardSwish" | "Softplus" | "Softsign"
            | "ThresholdedRelu" | "Mish" | "Gelu" | "Swish" | "Sinh" | "Cosh" | "Tan" => ew::activation(self, n),
            "Cast" => cast::cast(self, n),
            "CastLike" => cast::cast_like(self, n),
            "Softmax" | "LogSoftmax" => reduce::softmax(self, n),
            "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
            | "ReduceSumSquare" | "ReduceLogSum" | "ReduceLogSumExp" => reduce::reduce(self, n),
            "ArgMax" | "ArgMin" => reduce::arg(self, n),
            "CumSum" => reduce::cumsum(self, n),
            "TopK" => reduce::top_k(self, n),
            "MatMul" => linalg::matmul(self, n),
            "Gemm" => linalg::gemm(self, n),
            "Einsum" => linalg::einsum(self, n),
            "Reshape" => movement::reshape(self, n),
            "Flatten" => movement::flatten(self, n),
            "Transpose" => movement::transpose(self, n),
            "Squeeze" => movement::squeeze(self, n),
            "Unsqueeze" => movement::unsqueeze(self, n),
            "Concat" => movement::concat(self, n),
            "Split" => movement::split(self, n),
            "Slice" => movement::slice(self, n),
            "Expand" => movement::expand(self, n),
            "Tile" => movement::tile(self, n),
            "Gather" => movement::gather(self, n),
            "GatherElements" => movement::gather_elements(self, n),
            "GatherND" => movement::gather_nd(self, n),
            "ScatterElements" => movement::scatter_elements(self, n),
            "ScatterND" => movement::scatter_nd(self, n),
            "Trilu" => movement::trilu(self, n),
            "Constant" => shape_ops::constant(self, n),
            "Shape" => shape_ops::shape(self, n),
            "Size" => shape_ops::size(self, n),
            "Range" => shape_ops::range(self, n),
            "ConstantOfShape" => shape_ops::constant_of_shape(self, n),
            "LayerNormalization" => norm::layer_norm(self, n),
            "RMSNormalization" | "SimplifiedLayerNormalization" => norm::rms_norm(self, n),
            "Attention" => attention::attention(self, n),
            "RotaryEmbedding" => attention::rotary(self, n),
            _ => Err(format!("{op} is not supported")),
        }
    }

    /// Sets the outputs, removes dead nodes and returns the import.
    fn finish(mut self) -> Result<OnnxImport, ImportError> {
        let mut outputs = Vec::new();
        let mut seen = HashSet::new();
        for o in &self.model.graph().output {
            let name = o.name().to_string();
            let v = self
                .env
                .get(&name)
                .copied()
                .ok_or_else(|| self.model_err(format!("graph output `{name}` is not computed by any node")))?;
            if !seen.insert(name.clone()) {
                return Err(self.model_err(format!("graph output `{name}` is listed twice")));
            }
            self.b.g.set_output(&name, v.id);
            outputs.push(IoSpec { name, onnx_type: v.ety });
        }
        self.b.g.remove_dead();
        let used: HashSet<String> = self.b.g.weights().into_iter().map(|(n, _)| n).collect();
        self.weights.retain(|k, _| used.contains(k));
        Ok(OnnxImport { graph: self.b.g, weights: self.weights, inputs: self.inputs, outputs })
    }
}

/// A declared input dim.
enum InDim {
    Fixed(i64),
    Param(String),
    Unknown,
}

/// The dim a `dim_param` stands for: the expression it spells when it is one
/// (`past + seq`, as torch writes derived dims), else a symbol of its name
/// made into an identifier (`batch size` -> `batch_size`).
fn param_dim(p: &str) -> Dim {
    match p.parse::<Dim>() {
        Ok(d) if !d.is_const() => d,
        _ => Dim::sym(&sanitize(p)),
    }
}

/// A name made into an identifier: `[A-Za-z_][A-Za-z0-9_]*`.
fn sanitize(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A node's name for messages (its outputs when it has no name).
pub(crate) fn node_name(n: &NodeProto) -> String {
    if !n.name().is_empty() {
        n.name().to_string()
    } else if let Some(o) = n.output.iter().find(|o| !o.is_empty()) {
        format!("<{} -> {o}>", n.op_type())
    } else {
        format!("<unnamed {}>", n.op_type())
    }
}

/// The main graph's nodes with model-local functions inlined, in
/// topological order.
pub(crate) fn flatten(model: &OnnxModel) -> Result<Vec<NodeProto>, ImportError> {
    let funcs: HashMap<(String, String), &FunctionProto> = model
        .proto()
        .functions
        .iter()
        .map(|f| ((check::canonical_domain(f.domain()).to_string(), f.name().to_string()), f))
        .collect();
    let mut out = Vec::new();
    let mut counter = 0usize;
    for n in &model.graph().node {
        inline(n, &funcs, &mut out, &mut counter, 0)
            .map_err(|message| ImportError::Model { file: model.path().to_path_buf(), message })?;
    }
    toposort(model, out)
}

fn inline(
    n: &NodeProto,
    funcs: &HashMap<(String, String), &FunctionProto>,
    out: &mut Vec<NodeProto>,
    counter: &mut usize,
    depth: usize,
) -> Result<(), String> {
    let key = (check::canonical_domain(n.domain()).to_string(), n.op_type().to_string());
    let Some(f) = funcs.get(&key) else {
        out.push(n.clone());
        return Ok(());
    };
    if depth > 32 {
        return Err(format!("function `{}` is recursive (or nested more than 32 deep)", f.name()));
    }
    *counter += 1;
    let prefix = format!("{}/{}#{}/", node_name(n), f.name(), counter);
    // Formal names map to actual names; everything else inside is renamed.
    let mut rename: HashMap<String, String> = HashMap::new();
    for (i, formal) in f.input.iter().enumerate() {
        rename.insert(formal.clone(), n.input.get(i).cloned().unwrap_or_default());
    }
    for (i, formal) in f.output.iter().enumerate() {
        rename.insert(formal.clone(), n.output.get(i).cloned().unwrap_or_default());
    }
    let map = |s: &String, rename: &HashMap<String, String>| -> String {
        if s.is_empty() {
            return String::new();
        }
        rename.get(s).cloned().unwrap_or_else(|| format!("{prefix}{s}"))
    };
    // Attribute values: the caller's, else the function's defaults.
    let mut attr_values: HashMap<String, AttributeProto> =
        f.attribute_proto.iter().map(|a| (a.name().to_string(), a.clone())).collect();
    for a in &n.attribute {
        attr_values.insert(a.name().to_string(), a.clone());
    }
    for inner in &f.node {
        let mut m = inner.clone();
        m.input = inner.input.iter().map(|s| map(s, &rename)).collect();
        m.output = inner.output.iter().map(|s| map(s, &rename)).collect();
        m.name = Some(format!("{prefix}{}", inner.name()));
        let mut attrs = Vec::new();
        for a in &inner.attribute {
            if a.ref_attr_name().is_empty() {
                attrs.push(a.clone());
            } else if let Some(v) = attr_values.get(a.ref_attr_name()) {
                let mut v = v.clone();
                v.name = a.name.clone();
                attrs.push(v);
            }
        }
        m.attribute = attrs;
        inline(&m, funcs, out, counter, depth + 1)?;
    }
    Ok(())
}

/// Orders nodes so every input is defined before use (ONNX requires this,
/// but not every writer complies), reporting cycles and undefined names.
fn toposort(model: &OnnxModel, nodes: Vec<NodeProto>) -> Result<Vec<NodeProto>, ImportError> {
    let mut defined: HashSet<String> = model.graph().input.iter().map(|i| i.name().to_string()).collect();
    defined.extend(model.graph().initializer.iter().map(|t| t.name().to_string()));
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().filter(|o| !o.is_empty()).map(move |o| (o.as_str(), i)))
        .collect();
    for n in &nodes {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i) && !producer.contains_key(i.as_str()) {
                return Err(ImportError::Node {
                    file: model.path().to_path_buf(),
                    node: node_name(n),
                    op_type: n.op_type().to_string(),
                    message: format!("input `{i}` is not defined by any node, initialiser or graph input"),
                });
            }
        }
    }
    // Kahn's algorithm, keeping file order among ready nodes.
    let mut indeg = vec![0usize; nodes.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (j, n) in nodes.iter().enumerate() {
        for i in n.input.iter().filter(|i| !i.is_empty() && !defined.contains(*i)) {
            if let Some(&p) = producer.get(i.as_str()) {
                indeg[j] += 1;
                users[p].push(j);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..nodes.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != nodes.len() {
        let stuck = (0..nodes.len()).find(|i| indeg[*i] > 0).map(|i| node_name(&nodes[i]));
        return Err(ImportError::Model {
            file: model.path().to_path_buf(),
            message: format!("the graph has a cycle through node `{}`", stuck.unwrap_or_default()),
        });
    }
    let mut slots: Vec<Option<NodeProto>> = nodes.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// The carrier of a value's ONNX type (`Native` when it has none).
pub(crate) fn carrier_of(v: Val) -> Carrier {
    dtypes::carrier(v.ety).map(|c| c.1).unwrap_or(Carrier::Native)
}

impl Importer<'_> {
    /// A value of `x`'s ONNX type computed by `id` (an op that keeps the type).
    pub fn same(&self, x: Val, id: ValueId) -> Val {
        if dtypes::carrier(x.ety).map(|c| c.0) == Some(self.b.dtype(id)) {
            Val { id, ety: x.ety }
        } else {
            self.val(id)
        }
    }

    /// Wraps an emulated narrow integer back into its range after arithmetic
    /// (a no-op for every other type).
    pub fn wrap(&mut self, v: Val) -> R<Val> {
        let Carrier::WideInt { bits, signed } = carrier_of(v) else {
            return Ok(v);
        };
        if bits >= 64 {
            return Ok(v);
        }
        let m = self.b.like(v.id, (1i64 << bits) as f64);
        let id = if signed {
            let h = self.b.like(v.id, (1i64 << (bits - 1)) as f64);
            let s = self.b.binary(Op::Add {}, v.id, h)?;
            let r = self.b.binary(Op::Mod {}, s, m)?;
            self.b.binary(Op::Sub {}, r, h)?
        } else {
            self.b.binary(Op::Mod {}, v.id, m)?
        };
        Ok(Val { id, ety: v.ety })
    }

    /// The known integer elements of an operand (a constant or shape value).
    pub fn ints(&self, v: Val, what: &str) -> R<Vec<i64>> {
        self.b.ints_of(v.id).ok_or_else(|| format!("{what} {NOT_STATIC} (it is computed from runtime data)"))
    }

    /// The known elements of a rank-0/1 integer operand, as dims.
    pub fn dims(&self, v: Val, what: &str) -> R<Vec<Dim>> {
        self.b.dims_of(v.id).ok_or_else(|| format!("{what} {NOT_STATIC} (it is computed from runtime data)"))
    }

    /// Like [`Importer::dims`], for operands that are sizes (reshape and
    /// expand targets, repeats): constants must lie in `[-1, MAX_DIM]` so
    /// that element counts cannot overflow.
    pub fn size_dims(&self, v: Val, what: &str) -> R<Vec<Dim>> {
        let d = self.dims(v, what)?;
        if let Some(c) = d.iter().filter_map(Dim::as_const).find(|c| *c < -1 || *c > MAX_DIM) {
            return Err(format!("{what} holds {c}, outside the sizes smelt accepts (-1..={MAX_DIM})"));
        }
        if !small_product(d.iter().filter_map(Dim::as_const)) {
            return Err(format!("{what} has more than {MAX_ELEMENTS} elements"));
        }
        Ok(d)
    }
}

/// The `DataType` an ONNX attribute names (`Cast`'s `to`).
pub(crate) fn data_type(code: i64) -> R<DataType> {
    i32::try_from(code)
        .ok()
        .and_then(|c| DataType::try_from(c).ok())
        .filter(|d| *d != DataType::Undefined)
        .ok_or_else(|| format!("unknown element type {code}"))
}
