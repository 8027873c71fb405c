//! ONNX models: protobuf decoding (prost code generated from the official
//! `onnx.proto` by protox at build time), initialisers and external data.
//!
//! - [`model`] holds [`OnnxModel`] (open, opsets, initialisers, attributes,
//!   value types);
//! - [`tensor`] holds [`OnnxTensor`] host tensors and [`read_tensor_pb`];
//! - [`error`] holds [`OnnxError`];
//! - [`proto`] holds the generated protobuf types;
//! - [`import`](mod@import) lowers a model to smelt IR ([`import()`]);
//! - [`check`](mod@check) reports every operator the importer cannot lower ([`check()`]);
//! - [`conformance`] runs ONNX backend-test cases through the importer and
//!   the reference interpreter.

pub mod check;
pub mod conformance;
pub mod error;
pub mod import;
pub mod model;
pub mod proto;
pub mod tensor;

pub use check::{check, CoverageReport, UnsupportedOp};
pub use error::{DataField, OnnxError};
pub use import::{import, import_with, ImportError, ImportOptions, IoSpec, OnnxImport};
pub use model::{NodeAttrs, OnnxDim, OnnxModel, TensorType};
pub use tensor::{read_tensor_pb, Element, OnnxTensor, TensorBytes};
