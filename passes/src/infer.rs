//! Stage `infer`: shape inference as a check. Every node's result types are
//! inferred again from its operands and compared with the types the graph
//! holds, so that later stages can trust the stored types (the verifier
//! reports the same mismatches with more context; this stage is the cheap
//! guarantee the fusion analysis relies on).

use crate::error::PassError;
use smelt_ir::{Category, Graph};

pub fn run(g: &Graph) -> Result<(), PassError> {
    for n in g.topo_order()? {
        let node = g.node(n);
        if node.op.category() == Category::Declared {
            continue;
        }
        let tys: Vec<_> = node.inputs.iter().map(|v| g.ty(*v)).collect();
        let out = node
            .op
            .infer(&tys)
            .map_err(|m| PassError::Stage { stage: "infer".into(), message: format!("`{}`: {m}", node.op.name()) })?;
        let held: Vec<_> = node.outputs.iter().map(|v| g.ty(*v).clone()).collect();
        if out != held {
            let show = |v: &[smelt_ir::TensorType]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
            return Err(PassError::Stage {
                stage: "infer".into(),
                message: format!(
                    "`{}`{} infers {} but the graph holds {}",
                    node.op.name(),
                    node.label.as_ref().map(|l| format!(" at `{l}`")).unwrap_or_default(),
                    show(&out),
                    show(&held)
                ),
            });
        }
    }
    Ok(())
}
