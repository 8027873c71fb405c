//! smelt's tensor IR: element types, symbolic shapes, the op registry, the
//! graph, the text format, the verifier and the reference interpreter.
//!
//! This crate is deliberately light (petgraph, half, thiserror): the runtime
//! may depend on it for tensors and the interpreter without linking any
//! compiler machinery (no egg, Cranelift or LLVM).

pub mod attr;
pub mod bind;
pub mod decompose;
pub mod dim;
pub mod dtype;
pub mod graph;
pub mod interp;
pub mod ops;
pub mod stored;
pub mod tensor;
pub mod text;
pub mod types;
pub mod verify;

pub use attr::{AttrType, AttrValue};
pub use dim::{Dim, DimError};
pub use dtype::DType;
pub use graph::{Graph, GraphError, Node, NodeId, SymbolBounds, Value, ValueId};
pub use ops::{Category, Op, OpKind, OPS};
pub use stored::StoredTensor;
pub use tensor::{Data, Tensor};
pub use text::ParseError;
pub use types::TensorType;
pub use verify::{VerifyError, VerifyErrors};
