//! The e-class analysis: every class knows its result types (dtype and
//! symbolic shape, inferred by the op registry exactly as the graph does),
//! the value of an attribute or rank-0 constant it holds, and whether it is
//! computable at compile time (it depends only on weights and constants).
//! Rule guards read these facts and nothing else; they never look at the
//! nodes of a class (see `rules/README.md`).

use super::index::{self, Fact};
use super::lang::{AttrLit, ENode};
use egg::{DidMerge, Id, Symbol};
use smelt_ir::{Op, Tensor, TensorType};
use std::collections::HashMap;

/// The e-graph of smelt's language and analysis.
pub type EGraph = egg::EGraph<ENode, Analysis>;

/// Facts shared by the whole e-graph: the declared types of leaves and the
/// constant tensors, plus a record of anything a rule built that does not
/// type-check (a rule bug; tests assert there is none).
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    /// Types of `$input` and `@weight` leaves.
    pub leaf_types: HashMap<Symbol, TensorType>,
    /// Constant tensors of rank >= 1, referenced by `#k` leaves.
    pub consts: Vec<Tensor>,
    /// One message per op node whose types did not infer.
    pub ill_typed: Vec<String>,
    /// The id each fused e-node was added with (for explanations).
    pub fused_ids: Vec<Id>,
}

/// What an e-class is known to be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Data {
    /// Result types: one for most ops, several for multi-result ops, none
    /// for attributes (and for ill-typed nodes).
    pub tys: Vec<TensorType>,
    /// The value, when the class is an attribute.
    pub attr: Option<AttrLit>,
    /// The value, when the class is a rank-0 constant (or a `fill`).
    pub num: Option<f64>,
    /// Whether the value depends only on weights, constants and attributes,
    /// so that it can be computed once when the model is loaded.
    pub constant: bool,
    /// What the elements are as a function of their index, for values built
    /// from shapes alone (ranges, masks): see [`super::index`].
    pub index: Option<Fact>,
}

impl Data {
    /// The type of a single-result class.
    pub fn ty(&self) -> Option<&TensorType> {
        match self.tys.as_slice() {
            [t] => Some(t),
            _ => None,
        }
    }
}

/// Rebuilds the registry op of an op node from its attribute children.
pub fn op_of(eg: &EGraph, node: &ENode) -> Result<Op, String> {
    let (kind, _, attrs) = node.split_op().ok_or("not an op node")?;
    op_from_attr_data(kind, attrs.iter().map(|a| eg[*a].data.attr.clone()))
}

/// Builds an op from its kind and its attribute literals (in declaration order).
pub fn op_from_attr_data(kind: smelt_ir::OpKind, attrs: impl Iterator<Item = Option<AttrLit>>) -> Result<Op, String> {
    let info = kind.info();
    let mut parts = Vec::with_capacity(info.attrs.len());
    for (name, lit) in info.attrs.iter().zip(attrs) {
        let lit = lit.ok_or_else(|| format!("attribute `{name}` of `{}` is not a literal", info.name))?;
        if let Some(v) = lit.to_value() {
            parts.push((name.to_string(), v));
        }
    }
    Op::from_parts(info.name, parts).map_err(|e| e.to_string())
}

impl egg::Analysis<ENode> for Analysis {
    type Data = Data;

    fn make(eg: &mut EGraph, enode: &ENode, id: Id) -> Data {
        if let ENode::Op(k, _) = enode {
            if k.info().category == smelt_ir::Category::Fused {
                eg.analysis.fused_ids.push(id);
            }
        }
        match enode {
            ENode::Attr(a) => Data { attr: Some(a.clone()), constant: true, ..Data::default() },
            ENode::Num(n) => Data {
                tys: vec![TensorType::scalar(n.dtype)],
                num: Some(n.value()),
                constant: true,
                index: index::of_number(n.dtype, n.value(), &[]),
                ..Data::default()
            },
            ENode::Leaf(s) => Data {
                tys: eg.analysis.leaf_types.get(s).cloned().into_iter().collect(),
                constant: s.as_str().starts_with('@'),
                ..Data::default()
            },
            ENode::Const(i) => {
                let t = eg.analysis.consts.get(*i as usize);
                let num = t.and_then(|t| {
                    let first = (t.numel() > 0).then(|| t.get_f64(0))?;
                    (0..t.numel()).all(|k| t.get_f64(k).to_bits() == first.to_bits()).then_some(first)
                });
                let ty = t.map(|t| TensorType::fixed(t.dtype, &t.shape));
                let fact = ty.as_ref().zip(num).and_then(|(t, x)| index::of_number(t.dtype, x, &t.shape));
                Data { tys: ty.into_iter().collect(), num, constant: true, index: fact, ..Data::default() }
            }
            ENode::Get(i, [c]) => {
                let d = &eg[*c].data;
                Data { tys: d.tys.get(*i).cloned().into_iter().collect(), constant: d.constant, ..Data::default() }
            }
            ENode::Op(..) => {
                let (_, operands, _) = enode.split_op().unwrap_or((smelt_ir::OpKind::Neg, &[], &[]));
                let op = op_of(eg, enode);
                let mut tys = Vec::with_capacity(operands.len());
                let mut constant = true;
                for c in operands {
                    let d = &eg[*c].data;
                    constant &= d.constant;
                    if let Some(t) = d.ty() {
                        tys.push(t.clone());
                    }
                }
                let result = match &op {
                    Ok(op) if tys.len() == operands.len() => op.infer(&tys.iter().collect::<Vec<_>>()),
                    Ok(_) => Err("an operand has no single type".to_string()),
                    Err(e) => Err(e.clone()),
                };
                let num = match &op {
                    Ok(Op::Fill { value, .. }) => Some(*value),
                    _ => None,
                };
                match result {
                    Ok(out) => {
                        // Values computed at run time from shapes (a `range`
                        // over `past + seq`) are not compile-time constants.
                        constant &= out.iter().all(|t| t.const_shape().is_some());
                        let fact = match (&op, out.as_slice()) {
                            (Ok(op), [t]) => {
                                let facts: Vec<Option<&Fact>> =
                                    operands.iter().map(|c| eg[*c].data.index.as_ref()).collect();
                                index::of_op(op, &facts, &tys.iter().collect::<Vec<_>>(), t)
                            }
                            _ => None,
                        };
                        Data { tys: out, num, constant, index: fact, ..Data::default() }
                    }
                    Err(e) => {
                        let msg = format!("{}: {e}", enode);
                        eg.analysis.ill_typed.push(msg);
                        Data::default()
                    }
                }
            }
        }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        let mut changed_a = false;
        let mut changed_b = false;
        if a.tys.is_empty() && !b.tys.is_empty() {
            a.tys = b.tys.clone();
            changed_a = true;
        } else if !a.tys.is_empty() && b.tys.is_empty() {
            changed_b = true;
        }
        if a.attr.is_none() && b.attr.is_some() {
            a.attr = b.attr.clone();
            changed_a = true;
        } else if a.attr.is_some() && b.attr.is_none() {
            changed_b = true;
        }
        if a.num.is_none() && b.num.is_some() {
            a.num = b.num;
            changed_a = true;
        } else if a.num.is_some() && b.num.is_none() {
            changed_b = true;
        }
        if !a.constant && b.constant {
            a.constant = true;
            changed_a = true;
        } else if a.constant && !b.constant {
            changed_b = true;
        }
        if a.index.is_none() && b.index.is_some() {
            a.index = b.index;
            changed_a = true;
        } else if a.index.is_some() && b.index.is_none() {
            changed_b = true;
        }
        DidMerge(changed_a, changed_b)
    }
}
