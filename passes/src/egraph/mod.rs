//! The e-graph side of fusion: the language derived from the op registry
//! ([`lang`]), the shape/dtype analysis ([`analysis`]), lowering a graph
//! into an e-graph and building it back ([`convert`]), and the cost model
//! with its extractor ([`cost`]), and the index facts the analysis keeps
//! about values built from shapes ([`index`]).

pub mod analysis;
pub mod convert;
pub mod cost;
pub mod index;
pub mod lang;

pub use analysis::{Analysis, Data, EGraph};
pub use lang::{AttrLit, ENode, Num};
