//! One module per `smelt` subcommand: its clap arguments (`Args`) and its
//! `main`, which returns an `anyhow::Result` that `main.rs` prints as one line.

pub mod bench;
pub mod check;
pub mod compile;
pub mod conformance;
pub mod generate;
pub mod inspect;
pub mod make_model;
pub mod run;
pub mod tune;
