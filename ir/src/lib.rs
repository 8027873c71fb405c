//! smelt's tensor IR: element types, symbolic shapes, the op registry, the
//! graph, the text format, the verifier and the reference interpreter.
//!
//! This crate is deliberately light (petgraph, half, thiserror): the runtime
//! may depend on it for tensors and the interpreter without linking any
//! compiler machinery.

pub mod dtype;

pub use dtype::DType;
