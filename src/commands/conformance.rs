//! `smelt conformance DIR [--json]`: runs ONNX backend-test cases under DIR
//! (`model.onnx` + `test_data_set_*/{input,output}_*.pb`) through the ONNX
//! importer and the reference interpreter, and prints a per-op table ending
//! in `N passed, M failed` over the in-scope cases (the transformer operator
//! set; see `conformance/` in the repository for the recorded count).

use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A folder of backend-test cases (e.g. ../shared/conformance/onnx-node).
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: Args) -> Result<()> {
    if !args.dir.is_dir() {
        bail!("{}: not a folder of conformance cases", args.dir.display());
    }
    let report = smelt_frontends::onnx::conformance::run_dir(&args.dir);
    if args.json {
        return crate::out(&format!("{}\n", report.to_json()));
    }
    crate::out(&format!("{report}\n"))
}
