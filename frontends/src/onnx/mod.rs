//! ONNX models: protobuf decoding (prost code generated from the official
//! `onnx.proto` by protox at build time), initialisers and external data.

pub mod model;
pub mod proto;
pub mod tensor;
