//! Stage `kv_append`: a `concat` that appends a step's new keys or values to
//! a KV cache becomes `kv_append`, so codegen can write the new positions
//! into a cache kept in place instead of copying the whole cache each step.
//!
//! The shape of a cache append, whatever the exporter's names: a two-operand
//! `concat` whose first operand is a graph input (the cache held so far)
//! with a symbolic length along the axis (it grows from call to call), and
//! whose result is a graph output (the cache after the step). Both ops
//! mean the same (`kv_append` is defined as that concat), so the rewrite
//! never changes a result; it only tells the scheduler which copies a
//! resident cache makes unnecessary. Nothing else is assumed: whether a
//! given append can really run in place (who else reads the cache, in which
//! layout) is the scheduler's decision.

use smelt_ir::{Graph, Op};

/// Rewrites every cache-append `concat`; returns how many.
pub fn run(g: &mut Graph) -> Result<usize, crate::PassError> {
    let inputs: Vec<_> = g.inputs().into_iter().map(|(_, v)| v).collect();
    let mut rewritten = 0;
    for n in g.node_ids() {
        let node = g.node(n);
        let Op::Concat { axis } = node.op else { continue };
        let (&[cache, new], &[out]) = (node.inputs.as_slice(), node.outputs.as_slice()) else { continue };
        if !inputs.contains(&cache) || !g.is_output(out) {
            continue;
        }
        let shape = &g.ty(cache).shape;
        let at = if axis < 0 { axis + shape.len() as i64 } else { axis };
        if usize::try_from(at).ok().and_then(|a| shape.get(a)).is_none_or(|d| d.is_const()) {
            continue;
        }
        let label = node.label.clone();
        let appended = g.add_labeled(Op::KvAppend { axis }, &[cache, new], label.as_deref())?;
        g.replace_all_uses(out, appended);
        g.remove_node(n);
        rewritten += 1;
    }
    Ok(rewritten)
}
