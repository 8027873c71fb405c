//! Stage `cse`: common subexpression elimination. Two nodes with the same
//! op, attributes and operands compute the same values; the later one's
//! uses move to the earlier one (inputs are never merged: each is part of
//! the signature). Constants compare by dtype, shape and bytes.

use crate::error::PassError;
use smelt_ir::{Graph, Op, ValueId};
use std::collections::HashMap;

/// The identity of a node for CSE.
fn key(g: &Graph, n: smelt_ir::NodeId) -> Option<(String, Vec<ValueId>)> {
    let node = g.node(n);
    let head = match &node.op {
        Op::Input { .. } => return None,
        Op::Constant { value } => format!("constant {:?} {:?} {:?}", value.dtype, value.shape, value.to_le_bytes()),
        op => format!("{} {:?}", op.name(), op.attrs()),
    };
    Some((head, node.inputs.clone()))
}

/// Returns how many nodes were merged into others.
pub fn run(g: &mut Graph) -> Result<usize, PassError> {
    let mut seen: HashMap<(String, Vec<ValueId>), Vec<ValueId>> = HashMap::new();
    let mut merged = 0;
    for n in g.topo_order()? {
        if !g.contains_node(n) {
            continue;
        }
        // Operands may have been redirected by earlier merges, so the key is
        // computed now, in topological order.
        let Some(k) = key(g, n) else { continue };
        let outs = g.node(n).outputs.clone();
        match seen.get(&k) {
            Some(prev) if prev.len() == outs.len() => {
                for (o, p) in outs.iter().zip(prev.clone()) {
                    g.replace_all_uses(*o, p);
                }
                merged += 1;
            }
            _ => {
                seen.insert(k, outs);
            }
        }
    }
    g.remove_dead();
    Ok(merged)
}
