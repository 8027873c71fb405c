//! `smelt run ARTIFACT --inputs IN.safetensors --outputs OUT.safetensors`:
//! runs the model once on named input tensors and writes the named outputs.
//! Optional decoder inputs (mask, positions, past key/values) may be left
//! out; wrong names, dtypes or shapes are refused by the interpreter with a
//! message naming the input.

use std::path::PathBuf;

use anyhow::Result;
use smelt_runtime::tensors::{read_tensor_file, write_tensor_file};

use crate::source::{open_runnable, threads, DeviceArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .smelt artifact, or a checkpoint folder or .onnx file (compiled in memory).
    pub artifact: PathBuf,
    /// Named input tensors (input_ids, and optionally attention_mask, position_ids, past_key_values.*).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the named outputs (logits, present.*).
    #[arg(long)]
    pub outputs: PathBuf,
    /// Threads of the CPU runtime (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where a `cpu,cuda` artifact runs (default: the GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

pub fn main(args: Args) -> Result<()> {
    let inputs = read_tensor_file(&args.inputs)?;
    let mut r = open_runnable(&args.artifact, threads(args.threads), args.device)?;
    let outputs = r.model.forward(inputs)?;
    write_tensor_file(&args.outputs, &outputs)?;
    let mut report = String::new();
    for (name, t) in &outputs {
        report.push_str(&format!("{name}: {}{:?}\n", t.dtype, t.shape));
    }
    crate::out(&report)
}
