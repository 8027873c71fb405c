//! [`OnnxError`], the one error type of the ONNX file-reading layer.
//!
//! Every message is a single line that starts with the file it is about and
//! names the tensor, node, attribute or value concerned, with what was expected
//! and what was found, so that a user can fix the model (or report the bug)
//! without a debugger. Nothing in this layer panics on bad input: truncated
//! files, garbage bytes and lying lengths all end up here.

use std::path::PathBuf;

pub use super::proto::attribute_proto::AttributeType;

// The variants keep their fields small (enums rather than strings where the
// set of values is closed) so that `Result<_, OnnxError>` stays under clippy's
// large-error threshold without boxing.

/// Everything that can go wrong while reading an ONNX model, a standalone
/// `TensorProto` file, an initialiser, its external data, a node attribute or a
/// value's declared type.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file could not be opened, memory-mapped or read.
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a valid protobuf encoding of the expected message.
    #[error("{}: not a valid ONNX {message} (protobuf decoding failed: {source})", file.display())]
    Decode {
        file: PathBuf,
        /// The message the file should hold (`ModelProto`, `TensorProto`).
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },

    /// The file decoded, but is not a usable model (for example it has no graph).
    #[error("{}: invalid model: {reason}", file.display())]
    InvalidModel { file: PathBuf, reason: String },

    /// A tensor (or a declared value type) uses an ONNX element type that smelt
    /// has no dtype for.
    #[error(
        "{}: tensor `{tensor}` has ONNX element type {onnx_type_name}, which smelt does not support \
         (supported: FLOAT, FLOAT16, BFLOAT16, DOUBLE, INT64, INT32, INT8, UINT8, BOOL)",
        file.display()
    )]
    UnsupportedDType { file: PathBuf, tensor: String, onnx_type_name: String },

    /// A tensor's data does not have the size its dtype and dims call for.
    #[error(
        "{}: tensor `{tensor}` ({dtype}{dims:?}) has {found} {} in {field}, expected {expected}",
        file.display(),
        field.unit()
    )]
    DataSize {
        file: PathBuf,
        tensor: String,
        dtype: smelt_ir::DType,
        dims: Vec<usize>,
        /// Where the data came from.
        field: DataField,
        /// Bytes for raw and external data, values for typed fields.
        expected: usize,
        found: usize,
    },

    /// A tensor is malformed in a way other than its data size (negative
    /// dims, a size that overflows, segments, missing external-data keys...).
    #[error("{}: tensor `{tensor}`: {reason}", file.display())]
    InvalidTensor { file: PathBuf, tensor: String, reason: String },

    /// An external-data `location` that would read outside the model's
    /// folder: absolute, containing `..`, or a symlink that points elsewhere.
    #[error(
        "{}: tensor `{tensor}`: external data location `{location}` is not allowed: {reason}",
        file.display()
    )]
    ExternalPath { file: PathBuf, tensor: String, location: String, reason: String },

    /// External data that cannot be read: a missing file, an offset or length
    /// past the end of the file, unparsable keys.
    #[error("{}: tensor `{tensor}`: external data `{location}`: {reason}", file.display())]
    ExternalData { file: PathBuf, tensor: String, location: String, reason: String },

    /// A node attribute exists but has another type than the one asked for.
    #[error(
        "{}: node `{node}` ({op_type}): attribute `{attribute}` has type {}, expected {}",
        file.display(),
        found.as_str_name(),
        expected.as_str_name()
    )]
    AttributeType {
        file: PathBuf,
        node: String,
        op_type: String,
        attribute: String,
        expected: AttributeType,
        found: AttributeType,
    },

    /// A required node attribute is absent.
    #[error(
        "{}: node `{node}` ({op_type}): required attribute `{attribute}` ({}) is missing",
        file.display(),
        expected.as_str_name()
    )]
    MissingAttribute { file: PathBuf, node: String, op_type: String, attribute: String, expected: AttributeType },

    /// A node attribute has the right type but an unusable value (a string
    /// that is not UTF-8).
    #[error(
        "{}: node `{node}` ({op_type}): attribute `{attribute}`: {reason}",
        file.display()
    )]
    AttributeValue { file: PathBuf, node: String, op_type: String, attribute: String, reason: String },

    /// A graph input, output or value_info whose declared type smelt cannot
    /// use (not a tensor, no element type, ...).
    #[error("{}: value `{value}`: {reason}", file.display())]
    ValueType { file: PathBuf, value: String, reason: String },
}

/// The `TensorProto` field a tensor's data was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataField {
    RawData,
    ExternalData,
    FloatData,
    Int32Data,
    Int64Data,
    DoubleData,
}

impl DataField {
    /// What the field's length counts: bytes for raw and external data,
    /// values for the typed fields.
    pub fn unit(self) -> &'static str {
        match self {
            DataField::RawData | DataField::ExternalData => "bytes",
            _ => "values",
        }
    }
}

impl std::fmt::Display for DataField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataField::RawData => "raw_data",
            DataField::ExternalData => "external data",
            DataField::FloatData => "float_data",
            DataField::Int32Data => "int32_data",
            DataField::Int64Data => "int64_data",
            DataField::DoubleData => "double_data",
        })
    }
}
