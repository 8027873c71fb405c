//! [`OnnxModel`]: an ONNX file, memory-mapped and decoded, with typed access to
//! what a graph importer needs: opsets, initialisers (zero-copy, external data
//! included), node attributes and declared value types.
//!
//! Assumptions:
//! - The whole file is memory-mapped and `ModelProto` is decoded from a
//!   `Bytes` handle on the map, so every `raw_data` in the model is a slice of
//!   the map and no weight is copied at load time. The map lives as long as any
//!   tensor borrowed from it.
//! - External data is resolved relative to the model file's folder and must
//!   stay inside it (see [`super::tensor`]).
//! - Opening checks only what every user needs (the bytes decode and there is
//!   a graph); which opsets and operators are supported is the importer's call.
//! - The domains `""` and `"ai.onnx"` are the same default operator set.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use smelt_ir::DType;

use super::error::OnnxError;
use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_shape_proto::dimension::Value as DimValue;
use super::proto::type_proto::Value as TypeValue;
use super::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use super::tensor::{display_name, map_file, onnx_dtype, onnx_type_name, OnnxTensor, TensorStore};

/// An opened ONNX model.
pub struct OnnxModel {
    proto: ModelProto,
    store: TensorStore,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("path", &self.store.file())
            .field("ir_version", &self.ir_version())
            .field("nodes", &self.graph().node.len())
            .field("initializers", &self.graph().initializer.len())
            .finish()
    }
}

impl OnnxModel {
    /// Memory-maps and decodes an `.onnx` file.
    pub fn open(path: impl AsRef<Path>) -> Result<OnnxModel, OnnxError> {
        let path = path.as_ref();
        let data = map_file(path).map_err(|source| OnnxError::Io { file: path.to_path_buf(), source })?;
        OnnxModel::from_bytes(data, path)
    }

    /// Decodes a model from bytes already in memory. `path` names the model in
    /// error messages, and its folder is where external data is looked up
    /// (the file itself need not exist).
    pub fn from_bytes(data: Bytes, path: impl Into<PathBuf>) -> Result<OnnxModel, OnnxError> {
        let path = path.into();
        let proto = ModelProto::decode(data).map_err(|source| OnnxError::Decode {
            file: path.clone(),
            message: "ModelProto",
            source,
        })?;
        if proto.graph.is_none() {
            return Err(OnnxError::InvalidModel { file: path, reason: "ModelProto has no graph".into() });
        }
        Ok(OnnxModel { proto, store: TensorStore::new(path) })
    }

    /// The model file, as given to [`OnnxModel::open`].
    pub fn path(&self) -> &Path {
        self.store.file()
    }

    /// The folder external data is resolved in.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// The decoded protobuf, for anything the accessors do not cover.
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// The main graph (its presence is checked when opening).
    pub fn graph(&self) -> &GraphProto {
        // `from_bytes` refuses a model without a graph, so the empty default
        // is never used; it only avoids an `unwrap`.
        match &self.proto.graph {
            Some(g) => g,
            None => empty_graph(),
        }
    }

    /// `ModelProto.ir_version` (0 when absent).
    pub fn ir_version(&self) -> i64 {
        self.proto.ir_version()
    }

    /// The imported version of an operator-set domain; `""` and `"ai.onnx"`
    /// both name the default domain. `None` when the model does not import it.
    pub fn opset_version(&self, domain: &str) -> Option<i64> {
        let want = canonical_domain(domain);
        self.proto.opset_import.iter().find(|o| canonical_domain(o.domain()) == want).map(|o| o.version())
    }

    /// Every imported `(domain, version)`, with the default domain spelled `""`.
    pub fn opset_imports(&self) -> Vec<(&str, i64)> {
        self.proto.opset_import.iter().map(|o| (canonical_domain(o.domain()), o.version())).collect()
    }

    /// Graph inputs that are real inputs: models with IR version < 4 also list
    /// every initialiser as an input, and those are left out here.
    pub fn graph_inputs(&self) -> Vec<&ValueInfoProto> {
        let g = self.graph();
        let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
        g.input.iter().filter(|i| !inits.contains(i.name())).collect()
    }

    /// Decodes every initialiser of the main graph, in file order.
    pub fn initializers(&self) -> impl Iterator<Item = Result<OnnxTensor, OnnxError>> + '_ {
        self.graph().initializer.iter().map(|t| self.tensor(t))
    }

    /// Decodes the main graph's initialiser with this name, if there is one.
    pub fn initializer(&self, name: &str) -> Option<Result<OnnxTensor, OnnxError>> {
        self.graph().initializer.iter().find(|t| t.name() == name).map(|t| self.tensor(t))
    }

    /// Decodes any `TensorProto` of this model (an initialiser, a `Constant`'s
    /// `value` attribute, a subgraph's initialiser), resolving external data
    /// in the model's folder.
    pub fn tensor(&self, t: &TensorProto) -> Result<OnnxTensor, OnnxError> {
        self.store.decode(t)
    }

    /// Typed access to a node's attributes, with errors that name this file.
    pub fn attrs<'a>(&'a self, node: &'a NodeProto) -> NodeAttrs<'a> {
        NodeAttrs { file: self.path(), node }
    }

    /// The declared tensor type of a graph input, output or value_info.
    pub fn value_type(&self, value: &ValueInfoProto) -> Result<TensorType, OnnxError> {
        value_type(self.path(), value)
    }
}

fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}

/// One dimension of a declared tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OnnxDim {
    /// A known size (`dim_value`).
    Fixed(i64),
    /// A named symbolic size (`dim_param`, such as `batch` or `sequence_length`).
    Param(String),
    /// Neither is set (or `dim_value` is negative, which some exporters write
    /// for "unknown").
    Unknown,
}

/// A declared tensor type: dtype and, when the rank is known, dims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorType {
    pub dtype: DType,
    /// `None` when the value has no shape at all (unknown rank).
    pub shape: Option<Vec<OnnxDim>>,
}

/// The declared tensor type of a `ValueInfoProto`; `file` names the model in
/// errors. Non-tensor types (sequences, maps, optionals, sparse tensors) and
/// element types without a smelt dtype are errors.
pub fn value_type(file: &Path, value: &ValueInfoProto) -> Result<TensorType, OnnxError> {
    let name = display_name(value.name());
    let err = |reason: String| OnnxError::ValueType { file: file.to_path_buf(), value: name.clone(), reason };
    let tensor = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => t,
        Some(TypeValue::SequenceType(_)) => return Err(err("is a sequence, expected a tensor".into())),
        Some(TypeValue::MapType(_)) => return Err(err("is a map, expected a tensor".into())),
        Some(TypeValue::OptionalType(_)) => return Err(err("is an optional, expected a tensor".into())),
        Some(TypeValue::SparseTensorType(_)) => return Err(err("is a sparse tensor, expected a dense tensor".into())),
        Some(TypeValue::OpaqueType(_)) => return Err(err("is opaque, expected a tensor".into())),
        None => return Err(err("has no type".into())),
    };
    let elem = tensor.elem_type();
    if elem == 0 {
        return Err(err("has no element type (UNDEFINED)".into()));
    }
    let dtype = onnx_dtype(elem).ok_or_else(|| OnnxError::UnsupportedDType {
        file: file.to_path_buf(),
        tensor: name.clone(),
        onnx_type_name: onnx_type_name(elem),
    })?;
    let shape = tensor.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) if *v >= 0 => OnnxDim::Fixed(*v),
                Some(DimValue::DimParam(p)) if !p.is_empty() => OnnxDim::Param(p.clone()),
                _ => OnnxDim::Unknown,
            })
            .collect()
    });
    Ok(TensorType { dtype, shape })
}

/// A node's attributes, read by name and type.
///
/// Each getter returns `Ok(None)` when the attribute is absent (callers apply
/// the operator's default), `Ok(Some(_))` when it is present with the asked
/// type, and [`OnnxError::AttributeType`] when it has another type. The
/// `require_*` forms turn absence into [`OnnxError::MissingAttribute`].
#[derive(Clone, Copy)]
pub struct NodeAttrs<'a> {
    file: &'a Path,
    node: &'a NodeProto,
}

impl<'a> NodeAttrs<'a> {
    /// Attributes of a node read outside an [`OnnxModel`]; `file` names the
    /// model in errors.
    pub fn new(file: &'a Path, node: &'a NodeProto) -> Self {
        NodeAttrs { file, node }
    }

    /// The node these attributes belong to.
    pub fn node(&self) -> &'a NodeProto {
        self.node
    }

    /// The raw attribute with this name, if present.
    pub fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name() == name)
    }

    /// Whether the attribute is present (of any type).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Names of all attributes, in file order (to report unknown ones).
    pub fn names(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.node.attribute.iter().map(|a| a.name())
    }

    /// An `INT` attribute.
    pub fn int(&self, name: &str) -> Result<Option<i64>, OnnxError> {
        self.typed(name, AttributeType::Int, |a| Ok(a.i()))
    }

    /// An `INT` attribute, or `default` when absent.
    pub fn int_or(&self, name: &str, default: i64) -> Result<i64, OnnxError> {
        Ok(self.int(name)?.unwrap_or(default))
    }

    /// An `INT` attribute that must be present.
    pub fn require_int(&self, name: &str) -> Result<i64, OnnxError> {
        self.required(name, AttributeType::Int, self.int(name)?)
    }

    /// An `INTS` attribute.
    pub fn ints(&self, name: &str) -> Result<Option<&'a [i64]>, OnnxError> {
        self.typed(name, AttributeType::Ints, |a| Ok(a.ints.as_slice()))
    }

    /// An `INTS` attribute that must be present.
    pub fn require_ints(&self, name: &str) -> Result<&'a [i64], OnnxError> {
        self.required(name, AttributeType::Ints, self.ints(name)?)
    }

    /// A `FLOAT` attribute.
    pub fn float(&self, name: &str) -> Result<Option<f32>, OnnxError> {
        self.typed(name, AttributeType::Float, |a| Ok(a.f()))
    }

    /// A `FLOAT` attribute, or `default` when absent.
    pub fn float_or(&self, name: &str, default: f32) -> Result<f32, OnnxError> {
        Ok(self.float(name)?.unwrap_or(default))
    }

    /// A `FLOAT` attribute that must be present.
    pub fn require_float(&self, name: &str) -> Result<f32, OnnxError> {
        self.required(name, AttributeType::Float, self.float(name)?)
    }

    /// A `FLOATS` attribute.
    pub fn floats(&self, name: &str) -> Result<Option<&'a [f32]>, OnnxError> {
        self.typed(name, AttributeType::Floats, |a| Ok(a.floats.as_slice()))
    }

    /// A `STRING` attribute, which must be UTF-8.
    pub fn string(&self, name: &str) -> Result<Option<&'a str>, OnnxError> {
        self.typed(name, AttributeType::String, |a| self.utf8(name, a.s.as_deref().unwrap_or_default()))
    }

    /// A `STRING` attribute, or `default` when absent.
    pub fn string_or(&self, name: &str, default: &'a str) -> Result<&'a str, OnnxError> {
        Ok(self.string(name)?.unwrap_or(default))
    }

    /// A `STRING` attribute that must be present.
    pub fn require_string(&self, name: &str) -> Result<&'a str, OnnxError> {
        self.required(name, AttributeType::String, self.string(name)?)
    }

    /// A `STRINGS` attribute, each of which must be UTF-8.
    pub fn strings(&self, name: &str) -> Result<Option<Vec<&'a str>>, OnnxError> {
        self.typed(name, AttributeType::Strings, |a| a.strings.iter().map(|s| self.utf8(name, s)).collect())
    }

    /// A `TENSOR` attribute (decode it with [`OnnxModel::tensor`]).
    pub fn tensor(&self, name: &str) -> Result<Option<&'a TensorProto>, OnnxError> {
        self.typed(name, AttributeType::Tensor, |a| Ok(a.t.as_ref().unwrap_or_else(|| empty_tensor())))
    }

    /// A `TENSOR` attribute that must be present.
    pub fn require_tensor(&self, name: &str) -> Result<&'a TensorProto, OnnxError> {
        self.required(name, AttributeType::Tensor, self.tensor(name)?)
    }

    /// A `GRAPH` attribute (the body of `If`, `Loop`, `Scan`).
    pub fn graph(&self, name: &str) -> Result<Option<&'a GraphProto>, OnnxError> {
        self.typed(name, AttributeType::Graph, |a| Ok(a.g.as_ref().unwrap_or_else(|| empty_graph())))
    }

    /// A `GRAPH` attribute that must be present.
    pub fn require_graph(&self, name: &str) -> Result<&'a GraphProto, OnnxError> {
        self.required(name, AttributeType::Graph, self.graph(name)?)
    }

    /// Looks the attribute up, checks its type and extracts the value.
    fn typed<T>(
        &self,
        name: &str,
        want: AttributeType,
        extract: impl FnOnce(&'a AttributeProto) -> Result<T, OnnxError>,
    ) -> Result<Option<T>, OnnxError> {
        let Some(a) = self.get(name) else {
            return Ok(None);
        };
        let found = attribute_type(a);
        if found != want {
            return Err(OnnxError::AttributeType {
                file: self.file.to_path_buf(),
                node: display_name(self.node.name()),
                op_type: self.node.op_type().to_string(),
                attribute: name.to_string(),
                expected: want,
                found,
            });
        }
        extract(a).map(Some)
    }

    fn required<T>(&self, name: &str, want: AttributeType, v: Option<T>) -> Result<T, OnnxError> {
        v.ok_or_else(|| OnnxError::MissingAttribute {
            file: self.file.to_path_buf(),
            node: display_name(self.node.name()),
            op_type: self.node.op_type().to_string(),
            attribute: name.to_string(),
            expected: want,
        })
    }

    fn utf8(&self, name: &str, bytes: &'a [u8]) -> Result<&'a str, OnnxError> {
        std::str::from_utf8(bytes).map_err(|e| OnnxError::AttributeValue {
            file: self.file.to_path_buf(),
            node: display_name(self.node.name()),
            op_type: self.node.op_type().to_string(),
            attribute: name.to_string(),
            reason: format!("string is not valid UTF-8 ({e})"),
        })
    }
}

/// The type of an attribute: its `type` field, or for writers that leave it
/// out (IR version 1 files), the type implied by which value field is set.
fn attribute_type(a: &AttributeProto) -> AttributeType {
    let declared = a.r#type();
    if declared != AttributeType::Undefined {
        return declared;
    }
    if a.i.is_some() {
        AttributeType::Int
    } else if a.f.is_some() {
        AttributeType::Float
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else if !a.graphs.is_empty() {
        AttributeType::Graphs
    } else {
        AttributeType::Undefined
    }
}

// A declared TENSOR or GRAPH attribute whose message field is absent is read
// as the empty message (what protobuf's own getters return), rather than
// inventing an error the spec does not describe; decoding the empty tensor then
// fails with a clear message of its own.
fn empty_tensor() -> &'static TensorProto {
    static EMPTY: OnceLock<TensorProto> = OnceLock::new();
    EMPTY.get_or_init(TensorProto::default)
}

fn empty_graph() -> &'static GraphProto {
    static EMPTY: OnceLock<GraphProto> = OnceLock::new();
    EMPTY.get_or_init(GraphProto::default)
}
