//! `smelt check MODEL.onnx`: lists every operator the ONNX frontend does not
//! support (domain, op type, opset) with node counts and the first node
//! names, in one report, before any compile is attempted. Exits 1 when
//! anything is unsupported.

use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .onnx file to check.
    pub model: PathBuf,
}

pub fn main(args: Args) -> Result<()> {
    let report = smelt_frontends::onnx::check(&args.model)?;
    if report.is_supported() {
        return crate::out(&format!("{}: all {} nodes are supported\n", args.model.display(), report.nodes));
    }
    bail!("{report}")
}
