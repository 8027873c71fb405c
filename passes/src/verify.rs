//! Stage `verify`: the IR verifier of `smelt-ir`, as a stage. The pipeline
//! runs it first, and after every stage when `verify_each` is set (tests),
//! so that a pass that breaks the graph is named by the error.

use crate::error::PassError;
use smelt_ir::Graph;

pub fn run(g: &Graph, after_stage: &str) -> Result<(), PassError> {
    smelt_ir::verify::verify(g).map_err(|errors| PassError::Verify { stage: after_stage.to_string(), errors })
}
