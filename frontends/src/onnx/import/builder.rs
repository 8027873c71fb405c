//! [`Builder`]: adds IR nodes for the importer, folding as it goes.
//!
//! Every node the importer creates goes through [`Builder::add_multi`], which
//! 1. folds it when all operands are constants (and sources such as `fill`
//!    and `range` with constant dims), evaluating it with the reference
//!    interpreter (see [`super::fold`]), so constant-only subgraphs collapse
//!    into `constant` nodes;
//! 2. otherwise evaluates it symbolically when every operand is a constant or
//!    a shape value (see [`super::shape`]), recording the result's dims, so
//!    shape subgraphs fold into dim lists that reshape and expand targets are
//!    read from;
//! 3. otherwise adds it as a runtime node.
//!
//! Nodes left unused by folding are removed at the end of the import
//! (`Graph::remove_dead`), so a shape subgraph that only fed a reshape target
//! leaves nothing behind.

use super::fold;
use super::shape::{self, Operand, Outcome, ShapeValue};
use smelt_ir::{DType, Dim, Graph, Op, Tensor, TensorType, ValueId};
use std::collections::HashMap;

/// Outputs larger than this many elements are not folded into constants, so
/// the IR never grows a large literal (a folded causal mask of a long fixed
/// sequence, say); they are computed at run time instead.
pub(crate) const FOLD_LIMIT: usize = 1 << 16;

pub(crate) struct Builder {
    pub g: Graph,
    shapes: HashMap<ValueId, ShapeValue>,
    /// The ONNX node being lowered, used as every new node's label.
    pub label: Option<String>,
    /// Set when a node failed to type-check because an input symbol must
    /// equal another dim (`total` vs `past + seq`); the importer then starts
    /// over with that substitution (see [`shape::unification`]).
    pub unify: Option<(String, Dim)>,
}

impl Builder {
    pub fn new(g: Graph) -> Builder {
        Builder { g, shapes: HashMap::new(), label: None, unify: None }
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        self.g.ty(v)
    }

    pub fn dtype(&self, v: ValueId) -> DType {
        self.g.ty(v).dtype
    }

    pub fn shape(&self, v: ValueId) -> Vec<Dim> {
        self.g.ty(v).shape.clone()
    }

    pub fn rank(&self, v: ValueId) -> usize {
        self.g.ty(v).rank()
    }

    /// The value of a constant node.
    pub fn konst(&self, v: ValueId) -> Option<&Tensor> {
        match &self.g.def(v).op {
            Op::Constant { value } => Some(value),
            _ => None,
        }
    }

    /// The elements of a rank-0/1 integer value known at import time.
    pub fn shape_value(&self, v: ValueId) -> Option<ShapeValue> {
        if let Some(t) = self.konst(v) {
            return ShapeValue::from_tensor(t);
        }
        self.shapes.get(&v).cloned()
    }

    /// The known elements of a rank-0/1 integer value, as dims.
    pub fn dims_of(&self, v: ValueId) -> Option<Vec<Dim>> {
        self.shape_value(v).map(|s| s.dims)
    }

    /// The known elements of a rank-0/1 integer value, when all are constants.
    pub fn ints_of(&self, v: ValueId) -> Option<Vec<i64>> {
        self.shape_value(v).and_then(|s| s.consts())
    }

    /// A constant node.
    pub fn constant(&mut self, t: Tensor) -> ValueId {
        let label = self.label.clone();
        // Inference of a constant only reads its literal's type: it cannot fail.
        match self.g.add_labeled(Op::Constant { value: t }, &[], label.as_deref()) {
            Ok(v) => v,
            Err(e) => unreachable!("constant inference failed: {e}"),
        }
    }

    pub fn scalar(&mut self, dtype: DType, v: f64) -> ValueId {
        self.constant(Tensor::full(dtype, vec![], v))
    }

    pub fn i64s(&mut self, v: &[i64]) -> ValueId {
        let t = Tensor { dtype: DType::I64, shape: vec![v.len()], data: smelt_ir::Data::I64(v.to_vec()) };
        self.constant(t)
    }

    /// An integer tensor holding a shape value: constants as literals,
    /// symbolic elements as one-element `range d..d+1` pieces, concatenated.
    pub fn materialize(&mut self, sv: &ShapeValue, dtype: DType) -> Result<ValueId, String> {
        let mut pieces = Vec::new();
        let mut run: Vec<i64> = Vec::new();
        let flush = |b: &mut Builder, run: &mut Vec<i64>, pieces: &mut Vec<ValueId>| {
            if !run.is_empty() {
                let t = Tensor::from_i64(dtype, vec![run.len()], std::mem::take(run)).map_err(|e| e.to_string())?;
                pieces.push(b.constant(t));
            }
            Ok::<(), String>(())
        };
        for d in &sv.dims {
            match d.as_const() {
                Some(c) => run.push(c),
                None => {
                    flush(self, &mut run, &mut pieces)?;
                    let r =
                        self.raw(Op::Range { start: d.clone(), end: d.clone() + Dim::c(1), step: 1, dtype }, &[])?;
                    pieces.push(r);
                }
            }
        }
        flush(self, &mut run, &mut pieces)?;
        let mut v = match pieces.as_slice() {
            [] => {
                let t = Tensor::from_i64(dtype, vec![0], vec![]).map_err(|e| e.to_string())?;
                self.constant(t)
            }
            [one] => *one,
            _ => self.raw(Op::Concat { axis: 0 }, &pieces)?,
        };
        if sv.scalar {
            v = self.raw(Op::Reshape { shape: vec![] }, &[v])?;
        }
        self.shapes.insert(v, sv.clone());
        Ok(v)
    }

    /// Adds a node without folding.
    fn raw(&mut self, op: Op, ins: &[ValueId]) -> Result<ValueId, String> {
        let label = self.label.clone();
        self.g.add_labeled(op, ins, label.as_deref()).map_err(|e| e.to_string())
    }

    /// Adds a single-result node (folding it when possible).
    pub fn add(&mut self, op: Op, ins: &[ValueId]) -> Result<ValueId, String> {
        let name = op.name();
        let outs = self.add_multi(op, ins)?;
        match outs.as_slice() {
            [v] => Ok(*v),
            _ => Err(format!("`{name}` has {} results", outs.len())),
        }
    }

    /// Adds a node (folding or evaluating it symbolically when possible).
    pub fn add_multi(&mut self, op: Op, ins: &[ValueId]) -> Result<Vec<ValueId>, String> {
        let tys: Vec<&TensorType> = ins.iter().map(|v| self.g.ty(*v)).collect();
        let out_tys = match op.infer(&tys) {
            Ok(t) => t,
            Err(m) => {
                self.unify = shape::unification(&op, &tys, self.g.symbols());
                return Err(format!("{}: {m}", op.name()));
            }
        };

        let all_const = ins.iter().all(|v| self.konst(*v).is_some());
        let is_source = matches!(op, Op::Fill { .. } | Op::Range { .. });
        if (all_const && !ins.is_empty()) || is_source {
            if let Some(results) = fold::try_fold(&op, ins.iter().filter_map(|v| self.konst(*v)), &out_tys)? {
                return Ok(results.into_iter().map(|t| self.constant(t)).collect());
            }
        }

        if !ins.is_empty() && out_tys.len() == 1 {
            let operands: Option<Vec<Operand<'_>>> = ins
                .iter()
                .map(|v| match self.konst(*v) {
                    Some(t) => Some(Operand::Const(t)),
                    None => self.shapes.get(v).map(Operand::Shape),
                })
                .collect();
            if let Some(operands) = operands {
                let bounds = self.g.symbols().clone();
                match shape::eval(&op, &operands, out_tys[0].dtype, &bounds) {
                    Some(Outcome::Const(t)) => return Ok(vec![self.constant(t)]),
                    Some(Outcome::Shape(sv)) => {
                        let ty = &out_tys[0];
                        let want_len = if sv.scalar { 0 } else { 1 };
                        if ty.rank() == want_len {
                            if let Some(c) = sv.consts() {
                                let shape = if sv.scalar { vec![] } else { vec![c.len()] };
                                let t = Tensor::from_i64(ty.dtype, shape, c).map_err(|e| e.to_string())?;
                                return Ok(vec![self.constant(t)]);
                            }
                            // Keep the runtime node (it computes the same
                            // numbers) and remember what it holds; it is
                            // removed later if nothing reads it at run time.
                            let v = self.raw(op, ins)?;
                            self.shapes.insert(v, sv);
                            return Ok(vec![v]);
                        }
                    }
                    None => {}
                }
            }
        }

        let label = self.label.clone();
        self.g.add_multi(op, ins, label.as_deref()).map_err(|e| e.to_string())
    }

    // ----- helpers for lowering code -----

    pub fn cast(&mut self, x: ValueId, to: DType) -> Result<ValueId, String> {
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.add(Op::Cast { to }, &[x])
    }

    pub fn reshape(&mut self, x: ValueId, shape: Vec<Dim>) -> Result<ValueId, String> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.add(Op::Reshape { shape }, &[x])
    }

    pub fn transpose(&mut self, x: ValueId, perm: Vec<i64>) -> Result<ValueId, String> {
        if perm.iter().enumerate().all(|(i, &p)| p == i as i64) {
            return Ok(x);
        }
        self.add(Op::Transpose { perm }, &[x])
    }

    pub fn unsqueeze(&mut self, x: ValueId, axes: Vec<i64>) -> Result<ValueId, String> {
        if axes.is_empty() {
            return Ok(x);
        }
        self.add(Op::Unsqueeze { axes }, &[x])
    }

    pub fn binary(&mut self, op: Op, a: ValueId, b: ValueId) -> Result<ValueId, String> {
        self.add(op, &[a, b])
    }

    pub fn unary(&mut self, op: Op, a: ValueId) -> Result<ValueId, String> {
        self.add(op, &[a])
    }

    /// A scalar constant of `x`'s dtype.
    pub fn like(&mut self, x: ValueId, v: f64) -> ValueId {
        let d = self.dtype(x);
        self.scalar(d, v)
    }

    /// `x[start:end]` along one axis (bounds already in range).
    pub fn slice(&mut self, x: ValueId, axis: usize, start: Dim, end: Dim) -> Result<ValueId, String> {
        self.add(Op::Slice { axes: vec![axis as i64], starts: vec![start], ends: vec![end], steps: vec![1] }, &[x])
    }

    /// Numpy broadcasting of a value to a shape (no-op when it already has it).
    pub fn expand(&mut self, x: ValueId, shape: Vec<Dim>) -> Result<ValueId, String> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.add(Op::Expand { shape }, &[x])
    }
}
