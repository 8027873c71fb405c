//! Op attributes: the Rust types ops declare their attributes with, and the
//! one generic form ([`AttrValue`]) the text format prints and parses.
//!
//! The text parser cannot know whether `[1, 2]` is a list of integers or of
//! dims, or whether `1` is an integer or a float; it produces the most
//! general reading and [`AttrType::from_attr`] converts it to the type the op
//! declared, so every attribute type spells itself one way.

use crate::tensor::Tensor;
use crate::{DType, Dim};

/// An attribute value in its generic, printable form.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    DType(DType),
    Dim(Dim),
    Ints(Vec<i64>),
    Dims(Vec<Dim>),
    Tensor(Tensor),
}

impl AttrValue {
    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            AttrValue::Int(_) => "integer",
            AttrValue::Float(_) => "float",
            AttrValue::Bool(_) => "bool",
            AttrValue::Str(_) => "string",
            AttrValue::DType(_) => "dtype",
            AttrValue::Dim(_) => "dim",
            AttrValue::Ints(_) => "integer list",
            AttrValue::Dims(_) => "dim list",
            AttrValue::Tensor(_) => "tensor literal",
        }
    }
}

/// A Rust type usable as an op attribute.
pub trait AttrType: Sized {
    /// The generic form; `None` means "omitted when printing" (absent options).
    fn to_attr(&self) -> Option<AttrValue>;
    /// Converts the parsed generic form (`None` when the attribute was absent).
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String>;
}

fn required(v: Option<AttrValue>) -> Result<AttrValue, String> {
    v.ok_or_else(|| "missing".to_string())
}

fn expected(what: &str, v: &AttrValue) -> String {
    format!("expected {what}, found {}", v.kind())
}

impl AttrType for i64 {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Int(*self))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Int(i) => Ok(i),
            AttrValue::Dim(d) => d.as_const().ok_or_else(|| format!("expected integer, found dim `{d}`")),
            v => Err(expected("integer", &v)),
        }
    }
}

impl AttrType for f64 {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Float(*self))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Float(f) => Ok(f),
            AttrValue::Int(i) => Ok(i as f64),
            v => Err(expected("float", &v)),
        }
    }
}

impl AttrType for bool {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Bool(*self))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Bool(b) => Ok(b),
            v => Err(expected("true or false", &v)),
        }
    }
}

impl AttrType for String {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Str(self.clone()))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Str(s) => Ok(s),
            v => Err(expected("string", &v)),
        }
    }
}

impl AttrType for DType {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::DType(*self))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::DType(d) => Ok(d),
            AttrValue::Dim(d) => match d.as_sym() {
                Some(s) => s.parse().map_err(|e: crate::dtype::UnknownDType| e.to_string()),
                None => Err(format!("expected dtype, found `{d}`")),
            },
            v => Err(expected("dtype", &v)),
        }
    }
}

impl AttrType for Dim {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Dim(self.clone()))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Dim(d) => Ok(d),
            AttrValue::Int(i) => Ok(Dim::c(i)),
            v => Err(expected("dim", &v)),
        }
    }
}

impl AttrType for Vec<i64> {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Ints(self.clone()))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Ints(v) => Ok(v),
            AttrValue::Dims(ds) => ds
                .iter()
                .map(|d| d.as_const().ok_or_else(|| format!("expected integer list, found dim `{d}`")))
                .collect(),
            v => Err(expected("integer list", &v)),
        }
    }
}

impl AttrType for Vec<Dim> {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Dims(self.clone()))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Dims(ds) => Ok(ds),
            AttrValue::Ints(v) => Ok(v.into_iter().map(Dim::c).collect()),
            v => Err(expected("dim list", &v)),
        }
    }
}

impl AttrType for Tensor {
    fn to_attr(&self) -> Option<AttrValue> {
        Some(AttrValue::Tensor(self.clone()))
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match required(v)? {
            AttrValue::Tensor(t) => Ok(t),
            v => Err(expected("tensor literal", &v)),
        }
    }
}

impl<T: AttrType> AttrType for Option<T> {
    fn to_attr(&self) -> Option<AttrValue> {
        self.as_ref().and_then(|t| t.to_attr())
    }
    fn from_attr(v: Option<AttrValue>) -> Result<Self, String> {
        match v {
            None => Ok(None),
            Some(v) => T::from_attr(Some(v)).map(Some),
        }
    }
}
