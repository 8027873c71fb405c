//! Coverage before failure: which operators of a model the importer cannot
//! lower, all of them in one report.
//!
//! [`check`] reads a model, flattens it (model-local functions inlined) and
//! looks every node's (domain, op_type, opset) up in the importer's support
//! table ([`support`]). The [`CoverageReport`] lists each unsupported triple
//! once, with how many nodes use it and the first node names, plus any
//! imported operator set newer than smelt knows. `import` runs the same check
//! first and fails with the whole report, so a user learns everything that is
//! missing at once, never one operator at a time.

use super::import::{self, ImportError};
use super::proto::NodeProto;
use super::OnnxModel;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The contrib domain of ONNX Runtime.
pub const MS_DOMAIN: &str = "com.microsoft";

/// The newest default-domain operator set whose semantics smelt implements.
pub const MAX_OPSET: i64 = 28;

/// The oldest default-domain operator set accepted for most operators (a few
/// whose semantics never changed are accepted from earlier, see [`support`]).
pub const MIN_OPSET: i64 = 13;

/// `""` and `"ai.onnx"` both name the default domain; this returns `""` for both.
pub fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}

/// Whether the importer lowers an operator at an opset, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Yes,
    /// The operator (or its domain) is unknown to the importer.
    UnknownOp,
    /// The operator is known from this opset on.
    OpsetTooOld {
        min: i64,
    },
}

/// Default-domain operators and the oldest opset whose semantics the
/// importer implements for each (`None` means [`MIN_OPSET`]). Operators
/// whose semantics did not change since an older opset list that one, so
/// older test models of them are accepted too.
const DEFAULT_OPS: &[(&str, Option<i64>)] = &[
    ("Abs", None),
    ("Add", None),
    ("And", Some(7)),
    ("ArgMax", None),
    ("ArgMin", None),
    ("Attention", Some(23)),
    ("Cast", None),
    ("CastLike", Some(15)),
    ("Ceil", None),
    ("Celu", Some(12)),
    ("Clip", None),
    ("Concat", None),
    ("Constant", None),
    ("ConstantOfShape", None),
    ("Cos", Some(7)),
    ("Cosh", Some(9)),
    ("CumSum", None),
    ("Div", None),
    ("Dropout", Some(7)),
    ("Einsum", Some(12)),
    ("Elu", None),
    ("Equal", None),
    ("Erf", None),
    ("Exp", None),
    ("Expand", None),
    ("Flatten", None),
    ("Floor", None),
    ("Gather", None),
    ("GatherElements", None),
    ("GatherND", None),
    ("Gelu", Some(20)),
    ("Gemm", None),
    ("Greater", None),
    ("GreaterOrEqual", Some(12)),
    ("HardSigmoid", None),
    ("HardSwish", Some(14)),
    ("Identity", None),
    ("IsInf", Some(10)),
    ("IsNaN", None),
    ("LayerNormalization", Some(17)),
    ("LeakyRelu", None),
    ("Less", None),
    ("LessOrEqual", Some(12)),
    ("Log", None),
    ("LogSoftmax", None),
    ("MatMul", None),
    ("Max", None),
    ("Mean", None),
    ("Min", None),
    ("Mish", Some(18)),
    ("Mod", None),
    ("Mul", None),
    ("Neg", None),
    ("Not", Some(1)),
    ("Or", Some(7)),
    ("Pow", None),
    ("RMSNormalization", Some(23)),
    ("Range", Some(11)),
    ("Reciprocal", None),
    ("ReduceL1", None),
    ("ReduceL2", None),
    ("ReduceLogSum", None),
    ("ReduceLogSumExp", None),
    ("ReduceMax", None),
    ("ReduceMean", None),
    ("ReduceMin", None),
    ("ReduceProd", None),
    ("ReduceSum", None),
    ("ReduceSumSquare", None),
    ("Relu", None),
    ("Reshape", None),
    ("RotaryEmbedding", Some(23)),
    ("Round", Some(11)),
    ("ScatterElements", None),
    ("ScatterND", None),
    ("Selu", None),
    ("Shape", None),
    ("Sigmoid", None),
    ("Sign", None),
    ("SimplifiedLayerNormalization", Some(1)),
    ("Sin", Some(7)),
    ("Sinh", Some(9)),
    ("Size", None),
    ("Slice", None),
    ("Softmax", None),
    ("Softplus", None),
    ("Softsign", None),
    ("Split", None),
    ("Sqrt", None),
    ("Squeeze", None),
    ("Sub", None),
    ("Sum", None),
    ("Swish", Some(24)),
    ("Tan", Some(7)),
    ("Tanh", None),
    ("ThresholdedRelu", Some(10)),
    ("Tile", None),
    ("TopK", None),
    ("Transpose", None),
    ("Trilu", Some(14)),
    ("Unsqueeze", None),
    ("Where", None),
    ("Xor", Some(7)),
];

/// `com.microsoft` operators (version 1).
const MS_OPS: &[&str] = &[
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "GroupQueryAttention",
    "MultiHeadAttention",
    "QuickGelu",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
];

/// Whether the importer lowers `domain:op_type` when the model imports
/// `opset` of that domain.
pub fn support(domain: &str, op_type: &str, opset: i64) -> Support {
    match canonical_domain(domain) {
        "" => match DEFAULT_OPS.iter().find(|(n, _)| *n == op_type) {
            None => Support::UnknownOp,
            Some((_, min)) => {
                let min = min.unwrap_or(MIN_OPSET);
                if opset < min {
                    Support::OpsetTooOld { min }
                } else {
                    Support::Yes
                }
            }
        },
        MS_DOMAIN if MS_OPS.contains(&op_type) => Support::Yes,
        _ => Support::UnknownOp,
    }
}

/// One unsupported (domain, op_type, opset) of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnsupportedOp {
    /// `ai.onnx` for the default domain.
    pub domain: String,
    pub op_type: String,
    pub opset: i64,
    /// How many nodes use it.
    pub count: usize,
    /// The first few node names (at most [`FIRST_NODES`]).
    pub first_nodes: Vec<String>,
    /// Why, when it is not simply unknown (`supported from opset 13`).
    pub note: Option<String>,
}

/// How many node names a report keeps per unsupported operator.
pub const FIRST_NODES: usize = 3;

/// Every operator of a model the importer cannot lower.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoverageReport {
    pub file: PathBuf,
    /// Nodes in the flattened graph.
    pub nodes: usize,
    pub unsupported: Vec<UnsupportedOp>,
    /// Imported operator sets newer than smelt implements.
    pub opset_errors: Vec<String>,
}

impl CoverageReport {
    /// Whether the importer can lower every node.
    pub fn is_supported(&self) -> bool {
        self.unsupported.is_empty() && self.opset_errors.is_empty()
    }
}

impl fmt::Display for CoverageReport {
    /// ```text
    /// model.onnx: 3 unsupported operators (nothing was compiled):
    ///        com.microsoft:QuickGelu (opset 1)  x4  first at node /mlp/act
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if self.is_supported() {
            return write!(f, "{file}: all {} nodes are supported", self.nodes);
        }
        let n = self.unsupported.len() + self.opset_errors.len();
        let noun = if n == 1 { "problem" } else { "problems" };
        if self.opset_errors.is_empty() {
            let noun = if n == 1 { "operator" } else { "operators" };
            write!(f, "{file}: {n} unsupported {noun} (nothing was compiled):")?;
        } else {
            write!(f, "{file}: {n} unsupported {noun} (nothing was compiled):")?;
        }
        let heads: Vec<String> =
            self.unsupported.iter().map(|u| format!("{}:{} (opset {})", u.domain, u.op_type, u.opset)).collect();
        let counts: Vec<String> = self.unsupported.iter().map(|u| format!("x{}", u.count)).collect();
        let w1 = heads.iter().map(String::len).max().unwrap_or(0);
        let w2 = counts.iter().map(String::len).max().unwrap_or(0);
        for e in &self.opset_errors {
            write!(f, "\n       {e}")?;
        }
        for ((u, h), c) in self.unsupported.iter().zip(&heads).zip(&counts) {
            let at = if u.first_nodes.len() == 1 {
                format!("first at node {}", u.first_nodes[0])
            } else {
                format!("first at nodes {}", u.first_nodes.join(", "))
            };
            write!(f, "\n       {h:<w1$}  {c:<w2$}  {at}")?;
            if let Some(note) = &u.note {
                write!(f, " ({note})")?;
            }
        }
        Ok(())
    }
}

/// Reads a model and reports every operator the importer cannot lower.
pub fn check(path: &Path) -> Result<CoverageReport, ImportError> {
    let model = OnnxModel::open(path)?;
    check_model(&model)
}

/// The coverage report of an opened model.
pub fn check_model(model: &OnnxModel) -> Result<CoverageReport, ImportError> {
    let nodes = import::flatten(model)?;
    Ok(check_nodes(model, &nodes))
}

/// The coverage report of a model's flattened nodes.
pub(crate) fn check_nodes(model: &OnnxModel, nodes: &[NodeProto]) -> CoverageReport {
    let mut found: BTreeMap<(String, String, i64), UnsupportedOp> = BTreeMap::new();
    let mut order: Vec<(String, String, i64)> = Vec::new();
    for n in nodes {
        let domain = canonical_domain(n.domain());
        let opset = model.opset_version(domain).unwrap_or(1);
        let note = match support(domain, n.op_type(), opset) {
            Support::Yes => continue,
            Support::UnknownOp => None,
            Support::OpsetTooOld { min } => Some(format!("supported from opset {min}")),
        };
        let shown = if domain.is_empty() { "ai.onnx" } else { domain };
        let key = (shown.to_string(), n.op_type().to_string(), opset);
        let entry = found.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            UnsupportedOp {
                domain: shown.to_string(),
                op_type: n.op_type().to_string(),
                opset,
                count: 0,
                first_nodes: Vec::new(),
                note,
            }
        });
        entry.count += 1;
        if entry.first_nodes.len() < FIRST_NODES {
            entry.first_nodes.push(import::node_name(n));
        }
    }
    let mut opset_errors = Vec::new();
    for (domain, version) in model.opset_imports() {
        if domain.is_empty() && version > MAX_OPSET {
            opset_errors
                .push(format!("ai.onnx opset {version} is newer than the newest smelt implements ({MAX_OPSET})"));
        }
    }
    CoverageReport {
        file: model.path().to_path_buf(),
        nodes: nodes.len(),
        // Report in the order the graph first uses each operator.
        unsupported: order.into_iter().filter_map(|k| found.remove(&k)).collect(),
        opset_errors,
    }
}
