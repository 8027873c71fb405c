//! Which KV caches a CPU plan keeps in place: the `kv_append` nodes whose
//! result buffer can be the runtime's resident cache, so a decode step
//! writes only its new positions and attention reads the cache where it is.
//!
//! Such a buffer is laid out `[batch, heads, capacity, head_dim]`, with
//! `capacity` a symbol of the plan: a forward call binds it to the positions
//! held after the call (`past + seq`), which is exactly the dense layout of
//! the `present.*` output, and copies the whole past in; a decode step with
//! a resident cache binds it to the room the runtime allocated and copies
//! nothing (`copied` = 0), because the buffer already holds the past. See
//! [`smelt_runtime::plan::KvCachePlan`].
//!
//! An append qualifies when the layout change is invisible to everyone
//! else: its `cache` operand is a graph input read by nothing but the
//! append, its result is a graph output read by nothing but `attention`
//! (as keys or values, rank 4, along axis 2), and every attention reading
//! one such result reads both its keys and values from such results. Every
//! append of the graph must qualify, and all must agree on the past and
//! filled lengths (one capacity serves every cache buffer); otherwise none
//! is kept in place, and the runtime keeps its cache by swapping buffers.
//! The analysis only reads the graph.

use std::collections::HashSet;

use smelt_ir::{Dim, Graph, NodeId, Op};

use crate::select::CacheInPlace;

/// The in-place caches of a graph.
#[derive(Clone, Debug)]
pub struct InPlace {
    /// The dims kernels read the capacity and copied length from.
    pub kv: CacheInPlace,
    /// The plan's symbol names for them.
    pub capacity: String,
    pub copied: String,
    /// The positions before and after a forward call (`past`, `past + seq`).
    pub past: Dim,
    pub filled: Dim,
    /// The appends writing a cache in place, and the attentions reading one.
    pub appends: HashSet<NodeId>,
    pub attentions: HashSet<NodeId>,
}

/// The caches `graph` can keep in place; `None` when there are none.
pub fn find(graph: &Graph) -> Option<InPlace> {
    let inputs: HashSet<_> = graph.inputs().into_iter().map(|(_, v)| v).collect();
    let mut appends: HashSet<NodeId> = HashSet::new();
    let mut lengths: Option<(Dim, Dim)> = None;
    for n in graph.node_ids() {
        let node = graph.node(n);
        let Op::KvAppend { axis } = node.op else { continue };
        let (cache, out) = (node.inputs[0], node.outputs[0]);
        let (cty, oty) = (graph.ty(cache), graph.ty(out));
        let along_2 = cty.rank() == 4 && (axis == 2 || axis == -2);
        let only_append = graph.users(cache) == [(n, 0)];
        let users = graph.users(out);
        let read_by_attention = !users.is_empty()
            && users.iter().all(|&(u, i)| matches!(graph.node(u).op, Op::Attention { .. }) && (i == 1 || i == 2));
        // One cache the runtime cannot keep in place means it keeps every
        // cache by swapping buffers, so then none is laid out for it.
        if !(along_2 && inputs.contains(&cache) && only_append && graph.is_output(out) && read_by_attention) {
            return None;
        }
        let these = (cty.shape[2].clone(), oty.shape[2].clone());
        match &lengths {
            None => lengths = Some(these),
            Some(l) if *l == these => {}
            Some(_) => return None,
        }
        appends.insert(n);
    }
    // An attention reads its keys and values in one layout, so both must
    // be kept in place.
    let mut attentions: HashSet<NodeId> = HashSet::new();
    for &a in &appends {
        for (u, _) in graph.users(graph.node(a).outputs[0]) {
            let kv = &graph.node(u).inputs[1..3];
            let in_place = |v: &smelt_ir::ValueId| appends.contains(&graph.value(*v).def);
            if !kv.iter().all(in_place) {
                return None;
            }
            attentions.insert(u);
        }
    }
    if appends.is_empty() {
        return None;
    }
    let (past, filled) = lengths?;
    let fresh = |base: &str| {
        let taken = graph.symbols();
        let mut name = base.to_string();
        while taken.contains_key(&name) {
            name.push('_');
        }
        name
    };
    let (capacity, copied) = (fresh("kv_capacity"), fresh("kv_copied"));
    let kv = CacheInPlace { capacity: Dim::sym(&capacity), copied: Dim::sym(&copied) };
    Some(InPlace { kv, capacity, copied, past, filled, appends, attentions })
}
