//! Rust types for the ONNX protobuf schema (`ModelProto`, `GraphProto`,
//! `NodeProto`, `TensorProto`, `AttributeProto`, `ValueInfoProto`,
//! `TypeProto`, ...), generated at build time by `prost-build` from the vendored
//! official `frontends/proto/onnx.proto` (onnx 1.23.2, protobuf package `onnx`).
//!
//! Assumptions worth knowing when reading the generated code:
//! - every protobuf `bytes` field is a `bytes::Bytes`, so a message decoded from
//!   a memory-mapped `Bytes` buffer borrows `raw_data` from the map instead of
//!   copying it;
//! - the schema is proto2, so optional scalars are `Option<T>` with getters of
//!   the same name (`tensor.name()`, `tensor.data_type()`) that return the
//!   default when the field is absent;
//! - nested enums live in snake-case modules (`tensor_proto::DataType`,
//!   `attribute_proto::AttributeType`).

// The generated code follows prost's conventions, not this workspace's lints,
// and its doc comments are prose copied from the schema.
#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
