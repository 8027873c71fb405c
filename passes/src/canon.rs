//! Stage `canon`: graph-level canonicalisation that needs no search, done
//! before fusion so the e-graph starts small. Movement and casts that do
//! nothing are removed (a reshape or expand to the value's own shape, a
//! cast to its own dtype, an identity transpose, a slice covering whole
//! axes, a one-operand concat, squeeze/unsqueeze of no axes), and a reshape
//! of a reshape reads the original value.

use crate::error::PassError;
use smelt_ir::{Dim, Graph, Op, ValueId};

/// The value a node's single result is identical to, if any.
fn identity_of(g: &Graph, n: smelt_ir::NodeId) -> Option<ValueId> {
    let node = g.node(n);
    let (&x, &out) = (node.inputs.first()?, node.outputs.first()?);
    let (tx, to) = (g.ty(x), g.ty(out));
    let same = tx == to;
    match &node.op {
        Op::Reshape { .. } | Op::Expand { .. } | Op::Cast { .. } if same => Some(x),
        Op::Transpose { perm } if perm.iter().enumerate().all(|(i, p)| *p == i as i64) => Some(x),
        Op::Slice { starts, steps, .. }
            if same && starts.iter().all(|s| *s == Dim::c(0)) && steps.iter().all(|s| *s == 1) =>
        {
            Some(x)
        }
        Op::Concat { .. } if node.inputs.len() == 1 => Some(x),
        Op::Squeeze { axes } | Op::Unsqueeze { axes } if axes.is_empty() => Some(x),
        _ => None,
    }
}

/// Returns how many nodes were bypassed.
pub fn run(g: &mut Graph) -> Result<usize, PassError> {
    let mut changed = 0;
    for n in g.topo_order()? {
        if let Some(x) = identity_of(g, n) {
            let out = g.node(n).outputs[0];
            g.replace_all_uses(out, x);
            changed += 1;
            continue;
        }
        let node = g.node(n);
        if let (Op::Reshape { .. }, Some(&x)) = (&node.op, node.inputs.first()) {
            if let Op::Reshape { .. } = g.def(x).op {
                let inner = g.def(x).inputs[0];
                g.set_operand(n, 0, inner);
                changed += 1;
            }
        }
    }
    g.remove_dead();
    Ok(changed)
}
