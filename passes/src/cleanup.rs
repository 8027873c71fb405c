//! Stage `cleanup`: what fusion leaves behind. An `add` that computes the
//! same sum as an `add_rms_norm` reads result 0 of it instead (so one
//! kernel writes the residual stream and the normalised value), then CSE
//! and DCE run again. It also counts the chains of elementwise primitives
//! left over: codegen schedules each chain as one kernel, merged into its
//! producer where it can.

use crate::error::PassError;
use smelt_ir::{Category, Graph, Op, OpKind};
use std::collections::HashMap;

/// Whether an op is an elementwise primitive (codegen fuses chains of them).
pub fn is_elementwise(op: &Op) -> bool {
    use OpKind::*;
    matches!(
        op.kind(),
        Neg | Abs
            | Relu
            | Sign
            | Exp
            | Log
            | Sqrt
            | Rsqrt
            | Reciprocal
            | Sin
            | Cos
            | Tanh
            | Sigmoid
            | Erf
            | Floor
            | Ceil
            | Round
            | Not
            | IsNan
            | IsInf
            | Add
            | Sub
            | Mul
            | Div
            | Pow
            | Max
            | Min
            | Mod
            | Rem
            | Eq
            | Ne
            | Lt
            | Le
            | Gt
            | Ge
            | And
            | Or
            | Xor
            | Where
            | Cast
    )
}

/// Returns the number of leftover elementwise chains (maximal groups of
/// elementwise nodes connected through single-use values).
pub fn run(g: &mut Graph) -> Result<usize, PassError> {
    // Pair `add`s with the `add_rms_norm` computing the same sum.
    let mut sums: HashMap<(smelt_ir::ValueId, smelt_ir::ValueId), smelt_ir::ValueId> = HashMap::new();
    for n in g.node_ids() {
        let node = g.node(n);
        if let Op::AddRmsNorm { .. } = node.op {
            let (a, b) = (node.inputs[0], node.inputs[1]);
            sums.insert((a, b), node.outputs[0]);
            sums.insert((b, a), node.outputs[0]);
        }
    }
    for n in g.topo_order()? {
        let node = g.node(n);
        if let Op::Add {} = node.op {
            if let Some(s) = sums.get(&(node.inputs[0], node.inputs[1])) {
                if g.ty(*s) == g.ty(node.outputs[0]) {
                    let out = node.outputs[0];
                    g.replace_all_uses(out, *s);
                }
            }
        }
    }
    crate::cse::run(g)?;
    g.remove_dead();

    // Count elementwise chains: a node starts a chain unless its only
    // elementwise consumer continues one.
    let mut chains = 0;
    for n in g.node_ids() {
        let node = g.node(n);
        if node.op.category() != Category::Primitive || !is_elementwise(&node.op) {
            continue;
        }
        let continues = node.outputs.iter().all(|v| {
            let users = g.users(*v);
            users.len() == 1 && !g.is_output(*v) && is_elementwise(&g.node(users[0].0).op)
        });
        if !continues {
            chains += 1;
        }
    }
    Ok(chains)
}
