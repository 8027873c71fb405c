//! The egg language of smelt's IR, derived from the op registry rather than
//! written by hand: one generic [`ENode::Op`] node carries any registry op by
//! its [`OpKind`], with its operands followed by one child per declared
//! attribute. Attributes are children (leaf [`ENode::Attr`] nodes) so that a
//! rule can bind them to pattern variables (`(slice ?x [-1] ?h ?d [1])`) and
//! guard on their values through the analysis. Adding an op to the registry
//! therefore needs no change here.
//!
//! Text form (what patterns and one-line rule tests are written in):
//! - an op is its registry spelling: `(rms_norm $x @w 1e-5)`;
//! - graph inputs are `$name`, weights `@name`, other constant tensors `#k`
//!   (`$` rather than the text IR's `%`, which s-expressions would quote);
//! - a rank-0 constant is `value:dtype` (`2.0:f32`, `0:i64`);
//! - attributes: integers `3`, floats `1e-5` (always with a `.` or exponent),
//!   `true`/`false`, dtypes `f32`, strings in single quotes `'silu'`,
//!   `none` for an absent optional attribute, symbolic dims without spaces
//!   (`past+seq`, with `<>` for parentheses), and lists `[0,2,1,3]` /
//!   `[batch,seq,64]`;
//! - result `i` of a multi-result op is `(get.i node)`.

use egg::{Id, Symbol};
use smelt_ir::{AttrValue, DType, Dim, OpKind};
use std::fmt;
use std::str::FromStr;

/// An attribute value in a hashable, canonical form. Constant dims are
/// stored as integers and all-constant dim lists as integer lists, so one
/// value has one spelling whichever form the frontend used.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttrLit {
    Int(i64),
    /// The f64's bits, so that equality is exact and hashing is possible.
    Float(u64),
    Bool(bool),
    Str(Symbol),
    DType(DType),
    Dim(Dim),
    Ints(Vec<i64>),
    Dims(Vec<Dim>),
    /// An optional attribute that is absent.
    None,
}

impl AttrLit {
    /// The canonical literal of an attribute value (tensor literals have no
    /// literal form: constants are leaves of their own).
    pub fn from_value(v: &AttrValue) -> Option<AttrLit> {
        Some(match v {
            AttrValue::Int(i) => AttrLit::Int(*i),
            AttrValue::Float(f) => AttrLit::Float(f.to_bits()),
            AttrValue::Bool(b) => AttrLit::Bool(*b),
            AttrValue::Str(s) => AttrLit::Str(Symbol::from(s.as_str())),
            AttrValue::DType(d) => AttrLit::DType(*d),
            AttrValue::Dim(d) => match d.as_const() {
                Some(c) => AttrLit::Int(c),
                None => AttrLit::Dim(d.clone()),
            },
            AttrValue::Ints(v) => AttrLit::Ints(v.clone()),
            AttrValue::Dims(ds) => match ds.iter().map(Dim::as_const).collect::<Option<Vec<i64>>>() {
                Some(v) => AttrLit::Ints(v),
                None => AttrLit::Dims(ds.clone()),
            },
            AttrValue::Tensor(_) => return None,
        })
    }

    /// The generic attribute value (`None` for an absent optional attribute).
    pub fn to_value(&self) -> Option<AttrValue> {
        Some(match self {
            AttrLit::Int(i) => AttrValue::Int(*i),
            AttrLit::Float(b) => AttrValue::Float(f64::from_bits(*b)),
            AttrLit::Bool(b) => AttrValue::Bool(*b),
            AttrLit::Str(s) => AttrValue::Str(s.as_str().to_string()),
            AttrLit::DType(d) => AttrValue::DType(*d),
            AttrLit::Dim(d) => AttrValue::Dim(d.clone()),
            AttrLit::Ints(v) => AttrValue::Ints(v.clone()),
            AttrLit::Dims(v) => AttrValue::Dims(v.clone()),
            AttrLit::None => return None,
        })
    }

    pub fn float(x: f64) -> AttrLit {
        AttrLit::Float(x.to_bits())
    }

    /// An integer or a constant dim.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            AttrLit::Int(i) => Some(*i),
            AttrLit::Dim(d) => d.as_const(),
            _ => None,
        }
    }

    /// An integer or a dim, as a dim.
    pub fn as_dim(&self) -> Option<Dim> {
        match self {
            AttrLit::Int(i) => Some(Dim::c(*i)),
            AttrLit::Dim(d) => Some(d.clone()),
            _ => None,
        }
    }

    /// An integer list, or a one-element list's single integer.
    pub fn as_ints(&self) -> Option<&[i64]> {
        match self {
            AttrLit::Ints(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_float(&self) -> Option<f64> {
        match self {
            AttrLit::Float(b) => Some(f64::from_bits(*b)),
            AttrLit::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

/// Prints a dim with no spaces and braces for parentheses, so that it is one
/// s-expression token.
fn dim_token(d: &Dim) -> String {
    d.to_string()
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| match c {
            '(' => '<',
            ')' => '>',
            c => c,
        })
        .collect()
}

fn parse_dim_token(s: &str) -> Option<Dim> {
    let s: String = s
        .chars()
        .map(|c| match c {
            '<' => '(',
            '>' => ')',
            c => c,
        })
        .collect();
    Dim::from_str(&s).ok()
}

impl fmt::Display for AttrLit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrLit::Int(i) => write!(f, "{i}"),
            AttrLit::Float(b) => write!(f, "{:?}", f64::from_bits(*b)),
            AttrLit::Bool(b) => write!(f, "{b}"),
            AttrLit::Str(s) => write!(f, "'{s}'"),
            AttrLit::DType(d) => write!(f, "{d}"),
            AttrLit::Dim(d) => f.write_str(&dim_token(d)),
            AttrLit::Ints(v) => {
                let parts: Vec<String> = v.iter().map(|i| i.to_string()).collect();
                write!(f, "[{}]", parts.join(","))
            }
            AttrLit::Dims(v) => {
                let parts: Vec<String> = v.iter().map(dim_token).collect();
                write!(f, "[{}]", parts.join(","))
            }
            AttrLit::None => f.write_str("none"),
        }
    }
}

impl AttrLit {
    /// Reads the spelling [`AttrLit`]'s `Display` writes.
    pub fn parse(s: &str) -> Option<AttrLit> {
        if s == "none" {
            return Some(AttrLit::None);
        }
        if s == "true" || s == "false" {
            return Some(AttrLit::Bool(s == "true"));
        }
        if let Ok(d) = s.parse::<DType>() {
            return Some(AttrLit::DType(d));
        }
        if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
            return Some(AttrLit::Str(Symbol::from(&s[1..s.len() - 1])));
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            if inner.is_empty() {
                return Some(AttrLit::Ints(vec![]));
            }
            let dims: Option<Vec<Dim>> = inner.split(',').map(parse_dim_token).collect();
            let dims = dims?;
            return AttrLit::from_value(&AttrValue::Dims(dims));
        }
        if let Ok(i) = s.parse::<i64>() {
            return Some(AttrLit::Int(i));
        }
        if s.contains(['.', 'e', 'E']) || s == "inf" || s == "-inf" || s == "nan" {
            if let Ok(x) = s.parse::<f64>() {
                return Some(AttrLit::float(x));
            }
        }
        parse_dim_token(s).map(|d| match d.as_const() {
            Some(c) => AttrLit::Int(c),
            None => AttrLit::Dim(d),
        })
    }
}

/// A rank-0 constant: its dtype and value (as the f64's bits, so that NaN
/// constants hash and compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Num {
    pub dtype: DType,
    pub bits: u64,
}

impl Num {
    pub fn new(dtype: DType, value: f64) -> Num {
        Num { dtype, bits: value.to_bits() }
    }

    pub fn value(self) -> f64 {
        f64::from_bits(self.bits)
    }
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.value();
        if self.dtype.is_float() {
            write!(f, "{v:?}:{}", self.dtype)
        } else {
            write!(f, "{}:{}", v as i64, self.dtype)
        }
    }
}

/// One e-node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ENode {
    /// A registry op: operands (fixed, then variadic), then one attribute
    /// child per declared attribute, in declaration order.
    Op(OpKind, Box<[Id]>),
    /// Result `index` of a multi-result op.
    Get(usize, [Id; 1]),
    /// An attribute value.
    Attr(AttrLit),
    /// A rank-0 constant.
    Num(Num),
    /// A graph input (`$name`) or weight (`@name`); its type is in the analysis.
    Leaf(Symbol),
    /// A constant tensor of rank >= 1, by its index in the analysis' table.
    Const(u32),
}

/// What two e-nodes must share to match in a pattern: the head and the arity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Discriminant {
    Op(OpKind, usize),
    Get(usize),
    Leaf(ENode),
}

impl ENode {
    pub fn op(kind: OpKind, children: Vec<Id>) -> ENode {
        ENode::Op(kind, children.into_boxed_slice())
    }

    /// For an op node: (operands, attribute children).
    pub fn split_op(&self) -> Option<(OpKind, &[Id], &[Id])> {
        match self {
            ENode::Op(k, ch) => {
                let n_attrs = k.info().attrs.len();
                let split = ch.len().saturating_sub(n_attrs);
                Some((*k, &ch[..split], &ch[split..]))
            }
            _ => None,
        }
    }
}

impl egg::Language for ENode {
    type Discriminant = Discriminant;

    fn discriminant(&self) -> Discriminant {
        match self {
            ENode::Op(k, ch) => Discriminant::Op(*k, ch.len()),
            ENode::Get(i, _) => Discriminant::Get(*i),
            leaf => Discriminant::Leaf(leaf.clone()),
        }
    }

    fn matches(&self, other: &Self) -> bool {
        self.discriminant() == other.discriminant()
    }

    fn children(&self) -> &[Id] {
        match self {
            ENode::Op(_, ch) => ch,
            ENode::Get(_, ch) => ch,
            _ => &[],
        }
    }

    fn children_mut(&mut self) -> &mut [Id] {
        match self {
            ENode::Op(_, ch) => ch,
            ENode::Get(_, ch) => ch,
            _ => &mut [],
        }
    }
}

impl fmt::Display for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ENode::Op(k, _) => f.write_str(k.name()),
            ENode::Get(i, _) => write!(f, "get.{i}"),
            ENode::Attr(a) => write!(f, "{a}"),
            ENode::Num(n) => write!(f, "{n}"),
            ENode::Leaf(s) => write!(f, "{s}"),
            ENode::Const(i) => write!(f, "#{i}"),
        }
    }
}

/// Why a token could not be read as an e-node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LangError {
    #[error("`{op}` takes {want} children (operands then attributes), found {found}")]
    Arity { op: String, want: String, found: usize },
    #[error("`{0}` is not an op, an input ($x), a weight (@w), a constant (2.0:f32, #3) or an attribute")]
    Unknown(String),
}

impl egg::FromOp for ENode {
    type Error = LangError;

    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, LangError> {
        if let Some(kind) = OpKind::from_name(op) {
            let info = kind.info();
            let fixed = info.operands.len() + info.attrs.len();
            let ok = match info.variadic {
                Some(_) => children.len() >= fixed,
                None => children.len() == fixed,
            };
            if !ok {
                return Err(LangError::Arity {
                    op: op.to_string(),
                    want: if info.variadic.is_some() { format!("at least {fixed}") } else { fixed.to_string() },
                    found: children.len(),
                });
            }
            return Ok(ENode::op(kind, children));
        }
        if let Some(i) = op.strip_prefix("get.").and_then(|i| i.parse::<usize>().ok()) {
            return match <[Id; 1]>::try_from(children) {
                Ok(ch) => Ok(ENode::Get(i, ch)),
                Err(ch) => Err(LangError::Arity { op: op.to_string(), want: "1".into(), found: ch.len() }),
            };
        }
        if !children.is_empty() {
            return Err(LangError::Unknown(op.to_string()));
        }
        if op.starts_with('$') || op.starts_with('@') {
            return Ok(ENode::Leaf(Symbol::from(op)));
        }
        if let Some(i) = op.strip_prefix('#').and_then(|i| i.parse::<u32>().ok()) {
            return Ok(ENode::Const(i));
        }
        if let Some((v, d)) = op.rsplit_once(':') {
            if let Ok(dtype) = d.parse::<DType>() {
                let value = if v == "true" {
                    Some(1.0)
                } else if v == "false" {
                    Some(0.0)
                } else {
                    v.parse::<f64>().ok()
                };
                if let Some(value) = value {
                    return Ok(ENode::Num(Num::new(dtype, value)));
                }
            }
        }
        AttrLit::parse(op).map(ENode::Attr).ok_or_else(|| LangError::Unknown(op.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egg::RecExpr;

    #[test]
    fn expressions_round_trip_through_text() {
        for s in [
            "(rms_norm $x @w 1e-5)",
            "(slice $x [-1] [0] [32] [1])",
            "(reshape $x [batch,seq,4,16])",
            "(range 0 past+seq 1 i64)",
            "(attention $q $k $v $m 0.125 true none none)",
            "(gated_mlp $x @g @u 'silu')",
            "(mul $x -3.4028234663852886e38:f32)",
            "(get.1 (add_rms_norm $x $r @w 1e-6))",
            "(concat $a $b #2 -1)",
        ] {
            let e: RecExpr<ENode> = s.parse().unwrap_or_else(|e| panic!("{s}: {e:?}"));
            assert_eq!(e.to_string(), s);
        }
        assert!("(rms_norm $x)".parse::<RecExpr<ENode>>().is_err());
    }

    #[test]
    fn attribute_literals_are_canonical() {
        assert_eq!(AttrLit::from_value(&AttrValue::Dims(vec![Dim::c(1), Dim::c(2)])), Some(AttrLit::Ints(vec![1, 2])));
        assert_eq!(AttrLit::parse("[1,2]"), Some(AttrLit::Ints(vec![1, 2])));
        assert_eq!(AttrLit::parse("1.0"), Some(AttrLit::float(1.0)));
        assert_eq!(AttrLit::parse("1"), Some(AttrLit::Int(1)));
        assert_eq!(AttrLit::parse("past+seq"), Some(AttrLit::Dim(Dim::sym("past") + Dim::sym("seq"))));
        let d = Dim::sym("seq").floor_div(2);
        let lit = AttrLit::Dim(d.clone());
        assert_eq!(AttrLit::parse(&lit.to_string()), Some(lit));
    }
}
