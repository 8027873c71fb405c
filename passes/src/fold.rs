//! Stage `fold`: constant folding. A primitive op whose operands are all
//! literal constants, and whose results have constant shapes of at most
//! [`MAX_FOLD`] elements, is evaluated with the reference interpreter and
//! replaced by a constant. Weights are not folded here (that would copy
//! them into the graph); shape arithmetic is already folded into symbolic
//! dims by the frontends, so what is left is literal constants.

use crate::error::PassError;
use smelt_ir::{Category, Graph, Op};
use std::collections::BTreeMap;

/// The largest result folded, in elements.
pub const MAX_FOLD: usize = 1 << 16;

/// Returns how many nodes were folded.
pub fn run(g: &mut Graph) -> Result<usize, PassError> {
    let mut folded = 0;
    for n in g.topo_order()? {
        let node = g.node(n).clone();
        if node.op.category() != Category::Primitive || matches!(node.op, Op::Constant { .. }) {
            continue;
        }
        if node.inputs.is_empty() && !matches!(node.op, Op::Fill { .. } | Op::Range { .. }) {
            continue;
        }
        let mut operands = Vec::with_capacity(node.inputs.len());
        for v in &node.inputs {
            match &g.def(*v).op {
                Op::Constant { value } => operands.push(value.clone()),
                _ => break,
            }
        }
        if operands.len() != node.inputs.len() {
            continue;
        }
        let small = node
            .outputs
            .iter()
            .all(|v| g.ty(*v).const_shape().is_some_and(|s| s.iter().product::<usize>() <= MAX_FOLD));
        if !small {
            continue;
        }
        let refs: Vec<_> = operands.iter().collect();
        let Ok(results) = smelt_ir::interp::eval_op(&node.op, &refs, &BTreeMap::new()) else {
            // Leave anything the interpreter rejects for the verifier to report.
            continue;
        };
        for (old, value) in node.outputs.iter().zip(results) {
            let new = g.add(Op::Constant { value }, &[])?;
            g.replace_all_uses(*old, new);
        }
        folded += 1;
    }
    g.remove_dead();
    Ok(folded)
}
