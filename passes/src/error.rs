//! Errors of the pass pipeline. Each names the stage or rule involved and
//! what was found, so a broken pass is identified by its message alone.

use smelt_ir::{GraphError, VerifyErrors};

/// Why a pass or the pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the graph does not verify after stage `{stage}`:\n{errors}")]
    Verify { stage: String, errors: VerifyErrors },
    #[error("stage `{stage}`: {message}")]
    Stage { stage: String, message: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("lowering `{op}` into the e-graph: {why}")]
    Lower { op: String, why: String },
    #[error("building the graph back from the e-graph: {0}")]
    Extract(String),
    #[error(transparent)]
    Rule(#[from] crate::rules::RuleError),
    #[error("writing the IR dump to {path}: {source}")]
    Dump {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown stage `{0}` in the dump request (stages: {1})")]
    UnknownStage(String, String),
    #[error("weight `{name}`: {why}")]
    Weight { name: String, why: String },
}
