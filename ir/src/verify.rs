//! The verifier: checks that a graph is well formed and reports every
//! problem at once, each located by the node's text line when the graph was
//! parsed, else its label, else its printed head (`%4 = matmul`, using the
//! canonical names of [`crate::text::print()`]).
//!
//! What it checks:
//! - every operand and output names a value that exists, and there is no cycle;
//! - every op's operand count and types are accepted by `Op::infer`, and the
//!   stored result types are exactly the inferred ones (count and types);
//! - declared ops (`input`, `weight`) have no operands and exactly one result;
//!   a weight name is used with one type only;
//! - input names and output names are unique;
//! - symbol bounds satisfy `0 <= min <= max`, and, **when the graph declares
//!   any symbol**, every symbol used in a type or a dim attribute is declared.
//!   A graph that declares no symbols at all is not checked for them, so
//!   small tests and hand-built graphs need not declare bounds; frontends
//!   and compiled models declare them, and then the check is strict.

use crate::attr::AttrValue;
use crate::graph::{Graph, NodeId};
use crate::ops::Op;
use crate::tensor::Data;
use crate::text::Names;
use crate::types::{ShapeDisplay, TensorType};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Where an error is.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// A node: its text line and label when known, and its printed head (`%4 = matmul`).
    Node { line: Option<usize>, label: Option<String>, head: String },
    /// The function signature (inputs).
    Signature,
    /// The `return` (outputs).
    Return,
    /// A symbol declaration.
    Symbol(String),
    /// The graph as a whole.
    Graph,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Node { line: Some(l), head, .. } => write!(f, "line {l}: {head}"),
            Location::Node { label: Some(l), head, .. } => write!(f, "at {l:?}: {head}"),
            Location::Node { head, .. } => f.write_str(head),
            Location::Signature => f.write_str("signature"),
            Location::Return => f.write_str("return"),
            Location::Symbol(s) => write!(f, "sym {s}"),
            Location::Graph => f.write_str("graph"),
        }
    }
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyErrorKind {
    /// `Op::infer` rejected the operands (count, dtypes, shapes, attributes).
    #[error("{0}")]
    Infer(String),
    #[error("expected {expected} result(s), found {found}")]
    ResultCount { expected: usize, found: usize },
    #[error("result {index}: expected {expected}, found {found}")]
    ResultType { index: usize, expected: TensorType, found: TensorType },
    #[error("operand {index} refers to value {value}, which does not exist")]
    MissingOperand { index: usize, value: String },
    #[error("input name `{0}` is used more than once")]
    DuplicateInput(String),
    #[error("output name `{0}` is used more than once")]
    DuplicateOutput(String),
    #[error("output `{name}` refers to value {value}, which does not exist")]
    MissingOutput { name: String, value: String },
    #[error("weight `{name}` is used as {first} and as {second}")]
    WeightType { name: String, first: TensorType, second: TensorType },
    #[error("symbol `{symbol}` in {used_in} is not declared (declared: {declared}){more}")]
    UndeclaredSymbol { symbol: String, used_in: String, declared: String, more: String },
    #[error("bounds [{min}, {max}] are not 0 <= min <= max")]
    BadBounds { min: i64, max: i64 },
    #[error("the graph has a cycle ({0})")]
    Cycle(String),
    #[error("constant literal: {0}")]
    BadConstant(String),
}

/// One verifier finding.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{location}: {kind}")]
pub struct VerifyError {
    pub location: Location,
    pub kind: VerifyErrorKind,
}

/// Every finding of one [`verify`] run, in node order; displays one per line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct VerifyErrors(pub Vec<VerifyError>);

impl fmt::Display for VerifyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Checks a graph; `Err` lists every problem found (see the module docs).
pub fn verify(g: &Graph) -> Result<(), VerifyErrors> {
    let mut errs = Vec::new();
    let push = |errs: &mut Vec<VerifyError>, location: Location, kind: VerifyErrorKind| {
        errs.push(VerifyError { location, kind });
    };

    for (name, b) in g.symbols() {
        if b.min < 0 || b.min > b.max {
            push(&mut errs, Location::Symbol(name.clone()), VerifyErrorKind::BadBounds { min: b.min, max: b.max });
        }
    }

    let order = match g.topo_order() {
        Ok(o) => o,
        Err(e) => {
            push(&mut errs, Location::Graph, VerifyErrorKind::Cycle(e.to_string()));
            g.node_ids()
        }
    };
    let names = Names::new(g, &order);
    let loc = |n: NodeId| {
        let node = g.node(n);
        Location::Node { line: node.line, label: node.label.clone(), head: names.head(g, n) }
    };

    let mut seen_inputs = HashSet::new();
    for (name, _) in g.inputs() {
        if !seen_inputs.insert(name.clone()) {
            push(&mut errs, Location::Signature, VerifyErrorKind::DuplicateInput(name));
        }
    }

    // Symbols are checked when any are declared; the first use of each
    // undeclared symbol is reported, with a count of the others, so one
    // missing declaration does not produce thousands of lines.
    let declared = g.symbols();
    let check_symbols = !declared.is_empty();
    let mut undeclared: BTreeMap<String, (Location, String, usize)> = BTreeMap::new();
    let mut note_symbols = |dims: &[crate::Dim], used_in: &dyn Fn() -> String, at: &dyn Fn() -> Location| {
        if !check_symbols {
            return;
        }
        for d in dims {
            for s in d.symbols() {
                if !declared.contains_key(&s) {
                    undeclared.entry(s).and_modify(|e| e.2 += 1).or_insert_with(|| (at(), used_in(), 0));
                }
            }
        }
    };

    let mut weights: HashMap<&str, &TensorType> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        let mut operand_types = Vec::with_capacity(node.inputs.len());
        let mut missing = false;
        for (index, v) in node.inputs.iter().enumerate() {
            if g.has_value(*v) {
                operand_types.push(g.ty(*v));
            } else {
                missing = true;
                push(&mut errs, loc(n), VerifyErrorKind::MissingOperand { index, value: v.to_string() });
            }
        }
        for v in &node.outputs {
            let t = g.ty(*v);
            note_symbols(&t.shape, &|| t.to_string(), &|| loc(n));
        }
        for (k, a) in node.op.attrs() {
            match &a {
                AttrValue::Dim(d) => note_symbols(std::slice::from_ref(d), &|| format!("{k}={d}"), &|| loc(n)),
                AttrValue::Dims(ds) => note_symbols(ds, &|| format!("{k}={}", ShapeDisplay(ds)), &|| loc(n)),
                _ => {}
            }
        }
        if let Op::Constant { value } = &node.op {
            if let Some(why) = constant_problem(value) {
                push(&mut errs, loc(n), VerifyErrorKind::BadConstant(why));
                continue;
            }
        }
        if missing {
            continue;
        }
        let expected = match node.op.infer(&operand_types) {
            Ok(t) => t,
            Err(msg) => {
                push(&mut errs, loc(n), VerifyErrorKind::Infer(msg));
                continue;
            }
        };
        let found: Vec<&TensorType> = node.outputs.iter().map(|v| g.ty(*v)).collect();
        if node.op.category() == crate::ops::Category::Declared {
            // Inputs and weights declare their type; there is nothing to infer.
            if found.len() != 1 {
                push(&mut errs, loc(n), VerifyErrorKind::ResultCount { expected: 1, found: found.len() });
            }
            if let (Op::Weight { name }, [t]) = (&node.op, found.as_slice()) {
                match weights.get(name.as_str()) {
                    Some(first) if *first != *t => push(
                        &mut errs,
                        loc(n),
                        VerifyErrorKind::WeightType {
                            name: name.clone(),
                            first: (*first).clone(),
                            second: (*t).clone(),
                        },
                    ),
                    Some(_) => {}
                    None => {
                        weights.insert(name, t);
                    }
                }
            }
            continue;
        }
        if expected.len() != found.len() {
            push(&mut errs, loc(n), VerifyErrorKind::ResultCount { expected: expected.len(), found: found.len() });
            continue;
        }
        for (index, (e, f)) in expected.into_iter().zip(found).enumerate() {
            if e != *f {
                push(&mut errs, loc(n), VerifyErrorKind::ResultType { index, expected: e, found: f.clone() });
            }
        }
    }

    let mut seen_outputs = HashSet::new();
    for (name, v) in g.outputs() {
        if !seen_outputs.insert(name) {
            push(&mut errs, Location::Return, VerifyErrorKind::DuplicateOutput(name.clone()));
        }
        if !g.has_value(*v) {
            push(
                &mut errs,
                Location::Return,
                VerifyErrorKind::MissingOutput { name: name.clone(), value: v.to_string() },
            );
        }
    }

    let declared_list = declared.keys().cloned().collect::<Vec<_>>().join(", ");
    for (symbol, (location, used_in, more)) in undeclared {
        let more = if more > 0 { format!(" (and {more} more use(s))") } else { String::new() };
        push(
            &mut errs,
            location,
            VerifyErrorKind::UndeclaredSymbol { symbol, used_in, declared: declared_list.clone(), more },
        );
    }

    if errs.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors(errs))
    }
}

/// A constant built in Rust may hold data that does not fit its shape or dtype.
fn constant_problem(t: &crate::tensor::Tensor) -> Option<String> {
    let n = match &t.data {
        Data::F32(v) => v.len(),
        Data::F64(v) => v.len(),
        Data::I64(v) => v.len(),
        Data::Bool(v) => v.len(),
    };
    let want = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want != Some(n) {
        return Some(format!("{n} elements do not fill shape {:?}", t.shape));
    }
    let storage_ok = match &t.data {
        Data::F32(_) => matches!(t.dtype, crate::DType::F32 | crate::DType::F16 | crate::DType::BF16),
        Data::F64(_) => t.dtype == crate::DType::F64,
        Data::I64(_) => t.dtype.is_int(),
        Data::Bool(_) => t.dtype.is_bool(),
    };
    if !storage_ok {
        return Some(format!("{} data stored in the wrong element type", t.dtype));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Dim};

    #[test]
    fn collects_every_error_with_locations() {
        let mut g = Graph::new("t");
        g.declare_symbol("seq", 1, 16);
        let x = g.add_input("x", TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::c(64)]));
        let x2 = g.add_input("x", TensorType::fixed(DType::F32, &[4]));
        let w = g.add_weight("w", TensorType::fixed(DType::F32, &[32, 128]));
        let bad = g.add_unchecked(Op::MatMul {}, &[x, w], vec![TensorType::fixed(DType::F32, &[1])], Some(7));
        let n = g.add_unchecked(Op::Neg {}, &[x2], vec![TensorType::new(DType::F32, vec![Dim::sym("heads")])], None);
        g.set_label(g.value(n[0]).def, "layers.0.neg");
        g.set_output("y", bad[0]);
        let errs = verify(&g).unwrap_err();
        let text = errs.to_string();
        assert!(
            text.contains("line 7: %0 = matmul: contraction dims differ: f32[seq, 64] · f32[32, 128] (64 vs 32)"),
            "{text}"
        );
        assert!(text.contains("signature: input name `x` is used more than once"), "{text}");
        assert!(text.contains("at \"layers.0.neg\": %1 = neg: result 0: expected f32[4], found f32[heads]"), "{text}");
        assert!(text.contains("symbol `heads` in f32[heads] is not declared (declared: seq)"), "{text}");
        assert_eq!(errs.0.len(), 4, "{text}");
    }

    #[test]
    fn declared_ops_need_one_result_and_weights_one_type() {
        let mut g = Graph::new("t");
        let a = g.add_weight("w", TensorType::fixed(DType::F32, &[2]));
        let b = g.add_weight("w", TensorType::fixed(DType::F32, &[3]));
        g.add_unchecked(Op::Weight { name: "v".into() }, &[], vec![], None);
        g.set_output("a", a);
        g.set_output("b", b);
        let text = verify(&g).unwrap_err().to_string();
        assert!(text.contains("weight `w` is used as f32[2] and as f32[3]"), "{text}");
        assert!(text.contains("() = weight: expected 1 result(s), found 0"), "{text}");
    }

    #[test]
    fn symbols_unchecked_when_none_declared() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::new(DType::F32, vec![Dim::sym("seq")]));
        let y = g.add(Op::Neg {}, &[x]).unwrap();
        g.set_output("y", y);
        assert!(verify(&g).is_ok());
        g.declare_symbol("batch", 5, 2);
        let text = verify(&g).unwrap_err().to_string();
        assert!(text.contains("sym batch: bounds [5, 2] are not 0 <= min <= max"), "{text}");
        assert!(text.contains("symbol `seq` in f32[seq] is not declared (declared: batch) (and 1 more use(s))"));
    }
}
