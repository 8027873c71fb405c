//! smelt's pass pipeline over the IR: verification, shape-inference check,
//! constant folding, CSE/DCE, canonicalisation, fusion with egg, horizontal
//! fusion and cleanup. [`pipeline()`] runs them all, in one flat list of
//! named stages; each stage is a module here and can also be run alone.
//!
//! Fusion ([`fuse()`]) lowers the graph into an e-graph whose language is
//! derived from the op registry ([`egraph`]), runs the rule families of
//! [`rules`] in bounded phases, and extracts with one documented cost model;
//! [`report::FusionReport`] says what fused, what did not and how the
//! runner stopped.

pub mod canon;
pub mod cleanup;
pub mod cse;
pub mod dce;
pub mod egraph;
pub mod error;
pub mod fold;
pub mod fuse;
pub mod horizontal;
pub mod infer;
pub mod kv_append;
pub mod narrow;
pub mod pipeline;
pub mod report;
pub mod rules;
pub mod testing;
pub mod verify;

pub use error::PassError;
pub use fuse::{fuse, FusionOptions, Limits};
pub use horizontal::WeightStore;
pub use pipeline::{pipeline, DumpSpec, DumpTarget, PipelineOptions, PipelineReport, STAGES};
pub use report::{fusion_report, FusionReport};

/// The weight store passes read and extend: tensors by name.
pub type Weights = std::collections::BTreeMap<String, smelt_ir::Tensor>;
