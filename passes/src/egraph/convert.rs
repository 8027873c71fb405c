//! Between the IR graph and the e-graph: [`lower`] adds every node of a graph
//! to a fresh e-graph (sharing is kept: one e-class per value), and
//! [`Materializer`] builds a graph back from one chosen e-node per e-class.
//! [`expr_to_graph`] turns a single expression into a graph, for the rule
//! tests and their interpreter-based property test.
//!
//! Axis attributes are lowered in their negative form (`axes=[-1]` rather
//! than `axes=[2]` on a rank-3 value), so that a rule about the last axis
//! is written once for every rank; negative axes are valid IR, so they are
//! kept when the graph is built back.

use super::analysis::{op_from_attr_data, Analysis, EGraph};
use super::lang::{AttrLit, ENode, Num};
use crate::error::PassError;
use egg::{Id, RecExpr, Symbol};
use smelt_ir::{Category, Graph, Op, OpKind, Tensor, TensorType, ValueId};
use std::collections::{BTreeMap, HashMap};

/// A graph lowered into an e-graph.
pub struct Lowered {
    pub egraph: EGraph,
    /// The e-class of every value of the source graph.
    pub value_ids: HashMap<ValueId, Id>,
    /// The source node's label of each class it defined (by the id it was added with).
    pub labels: HashMap<Id, String>,
}

fn neg_axis(a: i64, rank: usize) -> i64 {
    if a >= 0 {
        a - rank as i64
    } else {
        a
    }
}

fn neg_axes(axes: &[i64], rank: usize) -> Vec<i64> {
    axes.iter().map(|a| neg_axis(*a, rank)).collect()
}

/// The op with its axis attributes in negative form, given the rank of its
/// first operand and of its first result.
pub fn normalize_axes(op: &Op, in_rank: usize, out_rank: usize) -> Op {
    let mut op = op.clone();
    match &mut op {
        Op::Slice { axes, .. } | Op::Squeeze { axes } => *axes = neg_axes(axes, in_rank),
        Op::ReduceSum { axes, .. }
        | Op::ReduceMean { axes, .. }
        | Op::ReduceMax { axes, .. }
        | Op::ReduceMin { axes, .. }
        | Op::ReduceProd { axes, .. } => {
            let mut a = neg_axes(axes, in_rank);
            a.sort_unstable();
            *axes = a;
        }
        Op::Unsqueeze { axes } => {
            let mut a = neg_axes(axes, out_rank);
            a.sort_unstable();
            *axes = a;
        }
        Op::Concat { axis } | Op::KvAppend { axis } | Op::Softmax { axis } | Op::CumSum { axis, .. } => {
            *axis = neg_axis(*axis, in_rank)
        }
        Op::ArgMax { axis, .. } => *axis = neg_axis(*axis, in_rank),
        _ => {}
    }
    op
}

/// The e-node children for an op's attributes, in declaration order, with
/// `none` for absent optional attributes.
pub fn attr_children(eg: &mut EGraph, op: &Op) -> Result<Vec<Id>, PassError> {
    let present = op.attrs();
    let mut out = Vec::new();
    for name in op.info().attrs {
        let lit = match present.iter().find(|(n, _)| n == name) {
            Some((_, v)) => AttrLit::from_value(v).ok_or_else(|| PassError::Lower {
                op: op.name().to_string(),
                why: format!("attribute `{name}` has no literal form"),
            })?,
            None => AttrLit::None,
        };
        out.push(eg.add(ENode::Attr(lit)));
    }
    Ok(out)
}

/// The leaf of a constant tensor: a [`Num`] for rank 0, a `#k` otherwise.
pub fn const_leaf(eg: &mut EGraph, t: &Tensor) -> Id {
    if t.shape.is_empty() {
        return eg.add(ENode::Num(Num::new(t.dtype, t.get_f64(0))));
    }
    let k = eg.analysis.consts.len() as u32;
    eg.analysis.consts.push(t.clone());
    eg.add(ENode::Const(k))
}

/// Adds every node of the graph to a fresh e-graph.
pub fn lower(g: &Graph, explanations: bool) -> Result<Lowered, PassError> {
    let mut eg = EGraph::new(Analysis::default());
    if explanations {
        eg = eg.with_explanations_enabled();
    }
    let mut value_ids = HashMap::new();
    let mut labels = HashMap::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        let id = match &node.op {
            Op::Input { name } | Op::Weight { name } => {
                let prefix = if matches!(node.op, Op::Input { .. }) { "$" } else { "@" };
                let sym = Symbol::from(format!("{prefix}{name}"));
                eg.analysis.leaf_types.insert(sym, g.ty(node.outputs[0]).clone());
                eg.add(ENode::Leaf(sym))
            }
            Op::Constant { value } => const_leaf(&mut eg, value),
            op => {
                let in_rank = node.inputs.first().map(|v| g.ty(*v).rank()).unwrap_or(0);
                let out_rank = node.outputs.first().map(|v| g.ty(*v).rank()).unwrap_or(0);
                let op = normalize_axes(op, in_rank, out_rank);
                let mut children: Vec<Id> = node.inputs.iter().map(|v| value_ids[v]).collect();
                children.extend(attr_children(&mut eg, &op)?);
                eg.add(ENode::op(op.kind(), children))
            }
        };
        if let Some(l) = &node.label {
            labels.insert(id, l.clone());
        }
        if node.outputs.len() == 1 {
            value_ids.insert(node.outputs[0], id);
        } else {
            for (i, v) in node.outputs.iter().enumerate() {
                let gid = eg.add(ENode::Get(i, [id]));
                value_ids.insert(*v, gid);
            }
        }
    }
    eg.rebuild();
    Ok(Lowered { egraph: eg, value_ids, labels })
}

/// Builds graph nodes for chosen e-nodes, one node per e-class, so that the
/// sharing of the e-graph becomes sharing in the graph.
pub struct Materializer<'a> {
    pub graph: Graph,
    eg: &'a EGraph,
    done: HashMap<Id, Vec<ValueId>>,
    inputs: HashMap<Symbol, ValueId>,
    weights: HashMap<Symbol, ValueId>,
    labels: HashMap<Id, String>,
}

impl<'a> Materializer<'a> {
    /// Starts a graph with the source's name, symbols and inputs (in order).
    pub fn new(source: &Graph, eg: &'a EGraph, labels: HashMap<Id, String>) -> Materializer<'a> {
        let mut graph = Graph::new(&source.name);
        for (name, b) in source.symbols() {
            graph.declare_symbol(name, b.min, b.max);
        }
        let mut inputs = HashMap::new();
        for (name, v) in source.inputs() {
            let nv = graph.add_input(&name, source.ty(v).clone());
            inputs.insert(Symbol::from(format!("${name}")), nv);
        }
        Materializer { graph, eg, done: HashMap::new(), inputs, weights: HashMap::new(), labels }
    }

    /// The values of a class, building it and everything it needs with the
    /// node `choose` picks for each class.
    pub fn build(&mut self, root: Id, choose: &dyn Fn(Id) -> ENode) -> Result<Vec<ValueId>, PassError> {
        let root = self.eg.find(root);
        // Iterative post-order: a deep model must not overflow the stack.
        let mut stack: Vec<(Id, bool)> = vec![(root, false)];
        let mut open = std::collections::HashSet::new();
        while let Some((id, expanded)) = stack.pop() {
            if self.done.contains_key(&id) {
                continue;
            }
            let node = choose(id);
            if !expanded {
                if !open.insert(id) {
                    return Err(PassError::Extract(format!("the chosen nodes form a cycle through class {id}")));
                }
                stack.push((id, true));
                if let Some((_, operands, _)) = node.split_op() {
                    for c in operands.iter().rev() {
                        let c = self.eg.find(*c);
                        if !self.done.contains_key(&c) {
                            stack.push((c, false));
                        }
                    }
                } else if let ENode::Get(_, [c]) = node {
                    let c = self.eg.find(c);
                    if !self.done.contains_key(&c) {
                        stack.push((c, false));
                    }
                }
                continue;
            }
            let vals = self.node(id, &node)?;
            self.done.insert(id, vals);
        }
        Ok(self.done[&root].clone())
    }

    fn operand(&self, id: Id) -> Result<ValueId, PassError> {
        match self.done.get(&self.eg.find(id)).map(Vec::as_slice) {
            Some([v]) => Ok(*v),
            _ => Err(PassError::Extract(format!("class {id} is not a single value"))),
        }
    }

    fn node(&mut self, id: Id, node: &ENode) -> Result<Vec<ValueId>, PassError> {
        let ty = |eg: &EGraph, id: Id| -> Result<TensorType, PassError> {
            eg[id].data.ty().cloned().ok_or_else(|| PassError::Extract(format!("leaf {node} has no type")))
        };
        Ok(match node {
            ENode::Leaf(s) => {
                if let Some(v) = self.inputs.get(s) {
                    vec![*v]
                } else if let Some(name) = s.as_str().strip_prefix('@') {
                    let v = match self.weights.get(s) {
                        Some(v) => *v,
                        None => {
                            let v = self.graph.add_weight(name, ty(self.eg, id)?);
                            self.weights.insert(*s, v);
                            v
                        }
                    };
                    vec![v]
                } else {
                    return Err(PassError::Extract(format!("input {s} is not in the signature")));
                }
            }
            ENode::Num(n) => {
                let value = Tensor::full(n.dtype, vec![], n.value());
                vec![self.graph.add(Op::Constant { value }, &[])?]
            }
            ENode::Const(k) => {
                let value = self.eg.analysis.consts[*k as usize].clone();
                vec![self.graph.add(Op::Constant { value }, &[])?]
            }
            ENode::Attr(a) => return Err(PassError::Extract(format!("attribute {a} used as a value"))),
            ENode::Get(i, [c]) => {
                let vals = &self.done[&self.eg.find(*c)];
                let v = *vals
                    .get(*i)
                    .ok_or_else(|| PassError::Extract(format!("result {i} of a {}-result op", vals.len())))?;
                // A multi-result op built by a rule takes the label of the
                // first result class that had one (the norm it replaced).
                let def = self.graph.value(v).def;
                if self.graph.node(def).label.is_none() {
                    if let Some(l) = self.labels.get(&id) {
                        self.graph.set_label(def, l);
                    }
                }
                vec![v]
            }
            ENode::Op(..) => {
                let (kind, operands, attrs) = node.split_op().unwrap_or((OpKind::Neg, &[], &[]));
                let op = op_from_attr_data(kind, attrs.iter().map(|a| self.eg[*a].data.attr.clone()))
                    .map_err(PassError::Extract)?;
                let ins = operands.iter().map(|c| self.operand(*c)).collect::<Result<Vec<_>, _>>()?;
                let label = self.labels.get(&id).cloned();
                self.graph.add_multi(op, &ins, label.as_deref())?
            }
        })
    }
}

/// Builds a graph computing one expression: `$x` leaves become inputs and
/// `@w` leaves weights, typed by `decls`; the result is the output `out`.
pub fn expr_to_graph(expr: &RecExpr<ENode>, decls: &BTreeMap<String, TensorType>) -> Result<Graph, PassError> {
    let mut g = Graph::new("expr");
    let mut vals: Vec<Vec<ValueId>> = Vec::with_capacity(expr.len());
    let mut leaves: HashMap<Symbol, ValueId> = HashMap::new();
    let declared = |s: &str| decls.get(s).cloned().ok_or_else(|| PassError::Extract(format!("{s} is not declared")));
    for node in expr.as_ref() {
        let v = match node {
            ENode::Leaf(s) => {
                if let Some(v) = leaves.get(s) {
                    vec![*v]
                } else {
                    let name = &s.as_str()[1..];
                    let t = declared(s.as_str())?;
                    let v = if s.as_str().starts_with('$') { g.add_input(name, t) } else { g.add_weight(name, t) };
                    leaves.insert(*s, v);
                    vec![v]
                }
            }
            ENode::Num(n) => vec![g.add(Op::Constant { value: Tensor::full(n.dtype, vec![], n.value()) }, &[])?],
            ENode::Const(_) => return Err(PassError::Extract("#k constants need an e-graph".into())),
            ENode::Attr(_) => vec![],
            ENode::Get(i, [c]) => {
                vec![*vals[usize::from(*c)].get(*i).ok_or_else(|| PassError::Extract(format!("no result {i}")))?]
            }
            ENode::Op(..) => {
                let (kind, operands, attrs) = node.split_op().unwrap_or((OpKind::Neg, &[], &[]));
                let lits = attrs.iter().map(|a| match &expr[*a] {
                    ENode::Attr(l) => Some(l.clone()),
                    _ => None,
                });
                let op = op_from_attr_data(kind, lits).map_err(PassError::Extract)?;
                let ins: Vec<ValueId> = operands
                    .iter()
                    .map(|c| vals[usize::from(*c)].first().copied())
                    .collect::<Option<_>>()
                    .ok_or_else(|| PassError::Extract("an attribute used as an operand".into()))?;
                g.add_multi(op, &ins, None)?
            }
        };
        vals.push(v);
    }
    let root =
        vals.last().and_then(|v| v.first()).copied().ok_or_else(|| PassError::Extract("empty expression".into()))?;
    g.set_output("out", root);
    Ok(g)
}

/// Counts the ops of a graph by spelling, split into fused and primitive.
pub fn count_ops(g: &Graph) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let mut fused = BTreeMap::new();
    let mut prim = BTreeMap::new();
    for n in g.node_ids() {
        let op = &g.node(n).op;
        match op.category() {
            Category::Fused => *fused.entry(op.name().to_string()).or_insert(0) += 1,
            Category::Primitive => *prim.entry(op.name().to_string()).or_insert(0) += 1,
            Category::Declared => {}
        }
    }
    (fused, prim)
}
