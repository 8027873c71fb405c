//! The canonical printer. It never fails: a graph that does not verify
//! (a cycle, a missing operand) still prints, so that dumps help debugging;
//! only valid graphs are promised to read back. Printing is one pass over
//! `Graph::topo_order()` with one small string per value: a 3000-node graph
//! (a 30-layer model) prints in a few milliseconds.

use super::{fmt_f64, fmt_narrow, is_bare_ident, is_bare_ref, is_reserved_word, write_name, write_quoted};
use crate::attr::AttrValue;
use crate::graph::{Graph, NodeId, ValueId};
use crate::ops::Op;
use crate::tensor::{Data, Tensor};
use crate::types::TensorType;
use crate::Dim;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Lines longer than this put their list (parameters, outputs) one item per line.
const WIDTH: usize = 120;

/// The canonical printed name (`%3`, `%w0`, `%input_ids`) of every value.
///
/// Inputs keep their own names; other values are numbered in print order,
/// skipping any number an input already uses, so names never collide and a
/// re-parsed graph numbers its values the same way.
pub(crate) struct Names {
    map: HashMap<ValueId, String>,
}

impl Names {
    pub(crate) fn new(g: &Graph, order: &[NodeId]) -> Names {
        let params = params(g);
        let taken: HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let mut map = HashMap::with_capacity(order.len() + params.len());
        for (name, v) in &params {
            map.insert(*v, ref_text(name));
        }
        let (mut next, mut next_w) = (0usize, 0usize);
        let fresh = |prefix: &str, counter: &mut usize| loop {
            let name = format!("{prefix}{counter}");
            *counter += 1;
            if !taken.contains(name.as_str()) {
                return format!("%{name}");
            }
        };
        for &n in order {
            let node = g.node(n);
            for &v in &node.outputs {
                if map.contains_key(&v) {
                    continue;
                }
                let name = match node.op {
                    Op::Weight { .. } => fresh("w", &mut next_w),
                    _ => fresh("", &mut next),
                };
                map.insert(v, name);
            }
        }
        Names { map }
    }

    /// The printed name, or a marker the parser rejects for a value that
    /// does not exist (so a broken graph still prints).
    pub(crate) fn get(&self, v: ValueId) -> String {
        self.map.get(&v).cloned().unwrap_or_else(|| format!("%!{v}"))
    }

    /// `%4 = matmul`, `%5, %6 = add_rms_norm`: how messages name a node.
    pub(crate) fn head(&self, g: &Graph, n: NodeId) -> String {
        let node = g.node(n);
        let mut s = String::new();
        write_results(&mut s, self, &node.outputs);
        s.push_str(" = ");
        s.push_str(node.op.name());
        s
    }
}

/// The inputs printed as function parameters: every `input` node with one
/// result, in `Graph::inputs()` order. (An `input` node with another result
/// count is invalid; it prints in the body so the verifier's message has
/// something to point at.)
fn params(g: &Graph) -> Vec<(String, ValueId)> {
    g.inputs().into_iter().filter(|(_, v)| g.def(*v).outputs.len() == 1).collect()
}

fn ref_text(name: &str) -> String {
    let mut s = String::from("%");
    write_name(&mut s, name, is_bare_ref);
    s
}

fn write_results(out: &mut String, names: &Names, outputs: &[ValueId]) {
    if outputs.is_empty() {
        out.push_str("()");
    }
    for (i, v) in outputs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&names.get(*v));
    }
}

/// Prints a graph in the canonical text form (see the module docs of
/// [`crate::text`] for the grammar).
pub fn print(g: &Graph) -> String {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    let names = Names::new(g, &order);
    let params = params(g);
    let param_set: HashSet<ValueId> = params.iter().map(|(_, v)| *v).collect();
    let mut out = String::with_capacity(80 * (order.len() + 4));

    for (name, b) in g.symbols() {
        let _ = writeln!(out, "sym {name} in [{}, {}]", b.min, b.max);
    }

    // Signature: one line when it fits, one parameter per line otherwise.
    let mut head = String::from("func @");
    write_name(&mut head, &g.name, is_bare_ref);
    let items: Vec<String> = params
        .iter()
        .map(|(_, v)| {
            let mut s = format!("{}: {}", names.get(*v), g.ty(*v));
            write_label(&mut s, g.def(*v).label.as_deref());
            s
        })
        .collect();
    write_list(&mut head, "(", &items, ")");
    let outs: Vec<String> = g
        .outputs()
        .iter()
        .map(|(n, _)| {
            let mut s = String::new();
            write_name(&mut s, n, is_bare_ident);
            s
        })
        .collect();
    write_list(&mut head, " -> (", &outs, ")");
    head.push_str(" {\n");
    out.push_str(&head);

    let mut line = String::new();
    for &n in &order {
        let node = g.node(n);
        if matches!(node.op, Op::Input { .. }) && node.outputs.iter().all(|v| param_set.contains(v)) {
            continue;
        }
        line.clear();
        line.push_str("  ");
        write_results(&mut line, &names, &node.outputs);
        line.push_str(" = ");
        line.push_str(node.op.name());
        for (i, v) in node.inputs.iter().enumerate() {
            line.push_str(if i == 0 { " " } else { ", " });
            line.push_str(&names.get(*v));
        }
        for (k, v) in node.op.attrs() {
            line.push(' ');
            line.push_str(k);
            line.push('=');
            write_attr(&mut line, &v);
        }
        line.push_str(" : ");
        write_types(&mut line, node.outputs.iter().map(|v| g.ty(*v)));
        write_label(&mut line, node.label.as_deref());
        line.push('\n');
        out.push_str(&line);
    }

    let rets: Vec<String> = g
        .outputs()
        .iter()
        .map(|(name, v)| {
            let mut s = String::new();
            write_name(&mut s, name, is_bare_ident);
            s.push('=');
            s.push_str(&names.get(*v));
            s
        })
        .collect();
    let one_line = 9 + rets.iter().map(|r| r.len() + 2).sum::<usize>();
    if rets.is_empty() {
        out.push_str("  return\n");
    } else if one_line <= WIDTH {
        let _ = writeln!(out, "  return {}", rets.join(", "));
    } else {
        out.push_str("  return\n");
        for r in &rets {
            let _ = writeln!(out, "    {r},");
        }
    }
    out.push_str("}\n");
    out
}

/// Writes `open item, item close` when the line stays within [`WIDTH`],
/// else one item per line with a trailing comma.
fn write_list(out: &mut String, open: &str, items: &[String], close: &str) {
    let line_start = out.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let flat = open.len() + items.iter().map(|s| s.len() + 2).sum::<usize>() + close.len();
    let fits = out.len() - line_start + flat <= WIDTH;
    out.push_str(open);
    if items.is_empty() || fits {
        out.push_str(&items.join(", "));
    } else {
        for it in items {
            let _ = write!(out, "\n    {it},");
        }
        out.push('\n');
    }
    out.push_str(close);
}

fn write_label(out: &mut String, label: Option<&str>) {
    if let Some(l) = label {
        out.push_str(" @");
        write_quoted(out, l);
    }
}

fn write_types<'a>(out: &mut String, tys: impl Iterator<Item = &'a TensorType>) {
    let mut any = false;
    for (i, t) in tys.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{t}");
        any = true;
    }
    if !any {
        out.push_str("()");
    }
}

/// A lone dim in an attribute: integers and plain symbols bare, anything
/// with spaces or operators (or a symbol spelled like a keyword) in
/// parentheses so the attribute list stays unambiguous.
fn write_dim_attr(out: &mut String, d: &Dim) {
    if let Some(c) = d.as_const() {
        let _ = write!(out, "{c}");
    } else if let Some(s) = d.as_sym().filter(|s| !is_reserved_word(s)) {
        out.push_str(s);
    } else {
        let _ = write!(out, "({d})");
    }
}

pub(crate) fn write_attr(out: &mut String, v: &AttrValue) {
    match v {
        AttrValue::Int(i) => {
            let _ = write!(out, "{i}");
        }
        AttrValue::Float(f) => out.push_str(&fmt_f64(*f)),
        AttrValue::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        AttrValue::Str(s) => write_quoted(out, s),
        AttrValue::DType(d) => out.push_str(d.name()),
        AttrValue::Dim(d) => write_dim_attr(out, d),
        AttrValue::Ints(v) => {
            out.push('[');
            for (i, x) in v.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{x}");
            }
            out.push(']');
        }
        AttrValue::Dims(v) => {
            out.push('[');
            for (i, d) in v.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{d}");
            }
            out.push(']');
        }
        AttrValue::Tensor(t) => write_tensor(out, t),
    }
}

/// `dense<[1.0, 2.0] : f32[2]>`, or `dense<0.0 : f32[4, 4]>` when every
/// element has the same bits (a splat).
fn write_tensor(out: &mut String, t: &Tensor) {
    let n = match &t.data {
        Data::F32(v) => v.len(),
        Data::F64(v) => v.len(),
        Data::I64(v) => v.len(),
        Data::Bool(v) => v.len(),
    };
    let elem = |i: usize| -> String {
        match &t.data {
            Data::F32(v) => fmt_narrow(v[i], t.dtype),
            Data::F64(v) => fmt_f64(v[i]),
            Data::I64(v) => v[i].to_string(),
            Data::Bool(v) => v[i].to_string(),
        }
    };
    let splat = n > 1
        && match &t.data {
            Data::F32(v) => v.iter().all(|x| x.to_bits() == v[0].to_bits()),
            Data::F64(v) => v.iter().all(|x| x.to_bits() == v[0].to_bits()),
            Data::I64(v) => v.iter().all(|x| *x == v[0]),
            Data::Bool(v) => v.iter().all(|x| *x == v[0]),
        };
    out.push_str("dense<");
    if splat {
        out.push_str(&elem(0));
    } else {
        out.push('[');
        for i in 0..n {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&elem(i));
        }
        out.push(']');
    }
    let ty = TensorType::fixed(t.dtype, &t.shape);
    let _ = write!(out, " : {ty}>");
}
