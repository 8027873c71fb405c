//! The IR graph: nodes (an [`Op`] with operand and result values) over SSA
//! values, stored in a petgraph `StableDiGraph` behind the typed ids
//! [`NodeId`] and [`ValueId`]. Nothing outside this module touches petgraph.
//!
//! Invariants kept by every method here: each value is produced by exactly
//! one node; a node's operands are listed in `Node::inputs` and mirrored by
//! one petgraph edge per operand (producer -> consumer) so topological order
//! and use lists come from petgraph; ids stay valid until their node is
//! removed. Types are checked by inference when nodes are added through
//! [`Graph::add`]; [`Graph::add_unchecked`] (used by the text parser) leaves
//! checking to the verifier so that every error is reported at once.

use crate::ops::{Category, Op};
use crate::types::TensorType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::BTreeMap;
use std::fmt;

/// A node of the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex<u32>);

/// An SSA value: one result of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// An operation applied to operand values, producing result values.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Where the node came from (an ONNX node name, `layers.3.attn`), for messages.
    pub label: Option<String>,
    /// The line of the text IR the node was parsed from, for messages.
    pub line: Option<usize>,
}

/// A value's type and the node that defines it.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub ty: TensorType,
    pub def: NodeId,
    /// Which result of `def` this is.
    pub index: usize,
}

/// Inclusive bounds of a shape symbol (the maximum is what planning and
/// tuning size buffers for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolBounds {
    pub min: i64,
    pub max: i64,
}

/// Errors from building a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    #[error("{op}{at}: {message}")]
    Infer { op: String, at: String, message: String },
    #[error("`{op}` declares its type; add it with `add_input`/`add_weight`")]
    Declared { op: String },
    #[error("value {0} does not exist")]
    NoSuchValue(ValueId),
    #[error("the graph has a cycle through `{0}`")]
    Cycle(String),
}

/// A function-like graph: named inputs, weights, nodes, named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, usize>,
    values: Vec<Value>,
    inputs: Vec<ValueId>,
    outputs: Vec<(String, ValueId)>,
    symbols: BTreeMap<String, SymbolBounds>,
}

impl Graph {
    pub fn new(name: &str) -> Graph {
        Graph { name: name.to_string(), ..Graph::default() }
    }

    // ----- symbols -----

    pub fn declare_symbol(&mut self, name: &str, min: i64, max: i64) {
        self.symbols.insert(name.to_string(), SymbolBounds { min, max });
    }

    pub fn symbols(&self) -> &BTreeMap<String, SymbolBounds> {
        &self.symbols
    }

    // ----- building -----

    fn push_node(&mut self, op: Op, inputs: Vec<ValueId>, types: Vec<TensorType>, label: Option<String>) -> NodeId {
        let nid = NodeId(self.g.add_node(Node { op, inputs: inputs.clone(), outputs: Vec::new(), label, line: None }));
        for (i, v) in inputs.iter().enumerate() {
            if let Some(val) = self.values.get(v.index()) {
                let src = val.def.0;
                self.g.add_edge(src, nid.0, i);
            }
        }
        let mut outs = Vec::new();
        for (index, ty) in types.into_iter().enumerate() {
            let vid = ValueId(self.values.len() as u32);
            self.values.push(Value { ty, def: nid, index });
            outs.push(vid);
        }
        self.g[nid.0].outputs = outs;
        nid
    }

    /// Adds a graph input (an `input` node) with its declared type.
    pub fn add_input(&mut self, name: &str, ty: TensorType) -> ValueId {
        let n = self.push_node(Op::Input { name: name.to_string() }, vec![], vec![ty], None);
        let v = self.g[n.0].outputs[0];
        self.inputs.push(v);
        v
    }

    /// Adds a weight reference with its declared type.
    pub fn add_weight(&mut self, name: &str, ty: TensorType) -> ValueId {
        let n = self.push_node(Op::Weight { name: name.to_string() }, vec![], vec![ty], None);
        self.g[n.0].outputs[0]
    }

    /// Adds a node whose output types are inferred; returns its results.
    pub fn add_multi(&mut self, op: Op, inputs: &[ValueId], label: Option<&str>) -> Result<Vec<ValueId>, GraphError> {
        if op.category() == Category::Declared {
            return Err(GraphError::Declared { op: op.name().to_string() });
        }
        let mut tys = Vec::with_capacity(inputs.len());
        for v in inputs {
            tys.push(&self.values.get(v.index()).ok_or(GraphError::NoSuchValue(*v))?.ty);
        }
        let types = op.infer(&tys).map_err(|message| GraphError::Infer {
            op: op.name().to_string(),
            at: label.map(|l| format!(" at `{l}`")).unwrap_or_default(),
            message,
        })?;
        let n = self.push_node(op, inputs.to_vec(), types, label.map(str::to_string));
        Ok(self.g[n.0].outputs.clone())
    }

    /// Adds a single-result node whose output type is inferred.
    pub fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, GraphError> {
        self.add_labeled(op, inputs, None)
    }

    /// Like [`Graph::add`], remembering where the node came from.
    pub fn add_labeled(&mut self, op: Op, inputs: &[ValueId], label: Option<&str>) -> Result<ValueId, GraphError> {
        let name = op.name();
        let outs = self.add_multi(op, inputs, label)?;
        match outs.as_slice() {
            [v] => Ok(*v),
            _ => Err(GraphError::Infer {
                op: name.to_string(),
                at: String::new(),
                message: format!("has {} results; use add_multi", outs.len()),
            }),
        }
    }

    /// Adds a node with the given result types, unchecked (the verifier
    /// checks them). Used by the text parser so all errors surface together.
    pub fn add_unchecked(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        types: Vec<TensorType>,
        line: Option<usize>,
    ) -> Vec<ValueId> {
        let is_input = matches!(op, Op::Input { .. });
        let n = self.push_node(op, inputs.to_vec(), types, None);
        self.g[n.0].line = line;
        let outs = self.g[n.0].outputs.clone();
        if is_input {
            self.inputs.extend(outs.iter().copied());
        }
        outs
    }

    /// Marks a value as a named graph output (replacing an output of the same name).
    pub fn set_output(&mut self, name: &str, v: ValueId) {
        if let Some(o) = self.outputs.iter_mut().find(|(n, _)| n == name) {
            o.1 = v;
        } else {
            self.outputs.push((name.to_string(), v));
        }
    }

    pub fn set_label(&mut self, n: NodeId, label: &str) {
        self.g[n.0].label = Some(label.to_string());
    }

    // ----- reading -----

    pub fn node(&self, n: NodeId) -> &Node {
        &self.g[n.0]
    }

    pub fn contains_node(&self, n: NodeId) -> bool {
        self.g.contains_node(n.0)
    }

    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.index()]
    }

    /// Whether the id names a value (of a node that may since have been removed).
    pub fn has_value(&self, v: ValueId) -> bool {
        v.index() < self.values.len() && self.g.contains_node(self.values[v.index()].def.0)
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.values[v.index()].ty
    }

    /// The node defining a value.
    pub fn def(&self, v: ValueId) -> &Node {
        &self.g[self.values[v.index()].def.0]
    }

    /// Graph inputs in declaration order, with their names.
    pub fn inputs(&self) -> Vec<(String, ValueId)> {
        self.inputs
            .iter()
            .filter(|v| self.has_value(**v))
            .filter_map(|v| match &self.def(*v).op {
                Op::Input { name } => Some((name.clone(), *v)),
                _ => None,
            })
            .collect()
    }

    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    /// Every weight reference, with its name, in node order.
    pub fn weights(&self) -> Vec<(String, ValueId)> {
        self.node_ids()
            .into_iter()
            .filter_map(|n| match &self.node(n).op {
                Op::Weight { name } => Some((name.clone(), self.node(n).outputs[0])),
                _ => None,
            })
            .collect()
    }

    /// All node ids in insertion order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().map(NodeId).collect()
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Nodes in a topological order that is stable: among ready nodes, the
    /// one added first comes first, so printing is deterministic.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, GraphError> {
        let mut indeg: BTreeMap<NodeIndex<u32>, usize> = BTreeMap::new();
        for n in self.g.node_indices() {
            indeg.insert(n, self.g.edges_directed(n, Direction::Incoming).count());
        }
        let mut ready: std::collections::BTreeSet<NodeIndex<u32>> =
            indeg.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut out = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            out.push(NodeId(n));
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        if out.len() != indeg.len() {
            let stuck = indeg.keys().find(|n| !out.contains(&NodeId(**n))).copied();
            let name = stuck.map(|n| self.g[n].op.name().to_string()).unwrap_or_default();
            return Err(GraphError::Cycle(name));
        }
        Ok(out)
    }

    /// The nodes using a value, with the operand position of each use.
    pub fn users(&self, v: ValueId) -> Vec<(NodeId, usize)> {
        let def = self.values[v.index()].def.0;
        let mut out: Vec<(NodeId, usize)> = self
            .g
            .edges_directed(def, Direction::Outgoing)
            .filter(|e| self.g[e.target()].inputs.get(*e.weight()) == Some(&v))
            .map(|e| (NodeId(e.target()), *e.weight()))
            .collect();
        out.sort();
        out
    }

    pub fn is_output(&self, v: ValueId) -> bool {
        self.outputs.iter().any(|(_, o)| *o == v)
    }

    // ----- rewriting -----

    /// Makes every use of `old` (operands and graph outputs) use `new`.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) {
        for (n, i) in self.users(old) {
            self.set_operand(n, i, new);
        }
        for o in &mut self.outputs {
            if o.1 == old {
                o.1 = new;
            }
        }
    }

    /// Replaces operand `i` of node `n`.
    pub fn set_operand(&mut self, n: NodeId, i: usize, v: ValueId) {
        let old = self.g[n.0].inputs[i];
        let old_def = self.values[old.index()].def.0;
        if let Some(e) = self.g.edges_connecting(old_def, n.0).find(|e| *e.weight() == i).map(|e| e.id()) {
            self.g.remove_edge(e);
        }
        self.g[n.0].inputs[i] = v;
        let src = self.values[v.index()].def.0;
        self.g.add_edge(src, n.0, i);
    }

    /// Removes a node; its results must have no remaining uses.
    pub fn remove_node(&mut self, n: NodeId) {
        self.inputs.retain(|v| self.values[v.index()].def != n);
        self.g.remove_node(n.0);
    }

    /// Removes every node that no graph output depends on. Inputs are kept
    /// (they are the signature). Returns how many nodes were removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeIndex<u32>> = self.outputs.iter().map(|(_, v)| self.values[v.index()].def.0).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<_> =
            self.g.node_indices().filter(|n| !live.contains(n) && !matches!(self.g[*n].op, Op::Input { .. })).collect();
        for n in &dead {
            self.g.remove_node(*n);
        }
        dead.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Dim};

    #[test]
    fn build_infer_and_rewrite() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::c(8)]));
        let w = g.add_weight("w", TensorType::fixed(DType::F32, &[8, 4]));
        let y = g.add(Op::MatMul {}, &[x, w]).unwrap();
        assert_eq!(g.ty(y).to_string(), "f32[seq, 4]");
        let z = g.add(Op::Neg {}, &[y]).unwrap();
        g.set_output("z", z);
        let e = g.add(Op::Exp {}, &[y]).unwrap();
        g.set_output("e", e);
        assert_eq!(g.users(y).len(), 2);
        let y2 = g.add(Op::MatMul {}, &[x, w]).unwrap();
        g.replace_all_uses(y, y2);
        assert_eq!(g.users(y2).len(), 2);
        assert!(g.users(y).is_empty());
        assert_eq!(g.remove_dead(), 1);
        assert_eq!(g.topo_order().unwrap().len(), 5);
        assert!(g.add(Op::MatMul {}, &[w, w]).is_err());
        assert_eq!(g.remove_dead(), 0);
        let d = g.add(Op::Neg {}, &[x]).unwrap();
        assert!(g.has_value(d));
        assert_eq!(g.remove_dead(), 1);
        assert!(!g.has_value(d));
    }
}
