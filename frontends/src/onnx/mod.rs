//! ONNX models: protobuf decoding (prost code generated from the official
//! `onnx.proto` by protox at build time), initialisers and external data.
//!
//! - [`model`] holds [`OnnxModel`] (open, opsets, initialisers, attributes,
//!   value types);
//! - [`tensor`] holds [`OnnxTensor`] host tensors and [`read_tensor_pb`];
//! - [`error`] holds [`OnnxError`];
//! - [`proto`] holds the generated protobuf types.

pub mod error;
pub mod model;
pub mod proto;
pub mod tensor;

pub use error::{DataField, OnnxError};
pub use model::{NodeAttrs, OnnxDim, OnnxModel, TensorType};
pub use tensor::{read_tensor_pb, Element, OnnxTensor, TensorBytes};
