//! `smelt inspect MODEL|ARTIFACT [--ir] [--json]`: what a model is
//! (architecture, parameters, layers, stored dtype), its graph (node count,
//! op counts by op name) and its signature (inputs, outputs, symbol bounds);
//! for an artifact also its format, target and files. `--ir` prints the text
//! IR instead (or adds it to the JSON). `--fusion` runs the pass pipeline on
//! a model (or reads an artifact's recorded report) and prints what fused
//! and every primitive op left unfused; `--explain` adds the rewrite chain
//! that produced each fused op.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;
use smelt_runtime::artifact::Signature;

use crate::source::load;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A checkpoint folder, an .onnx file or a .smelt artifact.
    pub model: PathBuf,
    /// Print the text IR.
    #[arg(long)]
    pub ir: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Print the fusion report: fused patterns and primitive ops left unfused.
    #[arg(long)]
    pub fusion: bool,
    /// With --fusion: the rewrite chain (egg explanation) of every fused op.
    #[arg(long, requires = "fusion")]
    pub explain: bool,
}

/// `inspect --fusion`: the artifact's recorded report, or a fresh pipeline run.
fn fusion(args: &Args) -> Result<()> {
    let mut loaded = load(&args.model)?;
    if let Some(m) = &loaded.manifest {
        let Some(report) = &m.fusion else {
            anyhow::bail!("{}: the artifact was compiled without fusion (--no-fuse)", args.model.display());
        };
        if args.explain {
            anyhow::bail!(
                "{}: explanations are computed at compile time only; inspect the model instead",
                args.model.display()
            );
        }
        return crate::out(&format!("{}\n", serde_json::to_string_pretty(report)?));
    }
    let opts = crate::commands::compile::PassArgs::default().options(args.explain)?;
    let report = smelt_passes::pipeline(&mut loaded.graph, &mut loaded.weights, &opts)?.fusion;
    if args.json {
        return crate::out(&format!("{}\n", report.to_json()));
    }
    crate::out(&report.summary())
}

pub fn main(args: Args) -> Result<()> {
    if args.fusion {
        return fusion(&args);
    }
    let loaded = load(&args.model)?;
    let ir = smelt_ir::text::print(&loaded.graph);
    if args.ir && !args.json {
        return crate::out(&ir);
    }
    let mut ops: BTreeMap<&'static str, usize> = BTreeMap::new();
    for n in loaded.graph.node_ids() {
        *ops.entry(loaded.graph.node(n).op.name()).or_default() += 1;
    }
    let sig = Signature::from_graph(&loaded.graph);
    let info = &loaded.info;
    let kind = loaded.kind;

    if args.json {
        let mut v = json!({
            "path": args.model.display().to_string(),
            "kind": kind,
            "architecture": info.architecture,
            "model_type": info.model_type,
            "parameters": info.parameters,
            "layers": info.layers,
            "stored_dtype": info.stored_dtype,
            "nodes": loaded.graph.node_count(),
            "ops": ops,
            "signature": sig,
            "eos_token_ids": loaded.eos_token_ids,
            "tokenizer": loaded.tokenizer.as_ref().map(|p| p.display().to_string()),
        });
        if let Some(m) = &loaded.manifest {
            v["artifact"] = json!({
                "format_version": m.format_version,
                "compiler_version": m.compiler_version,
                "target": m.target,
                "source": m.model.source,
                "files": m.files,
            });
            if let Some(plan) = &m.native {
                v["artifact"]["kernels"] = json!(plan.kernels);
                v["artifact"]["launches"] = json!(plan.launches.len());
                v["artifact"]["cpu_features"] = json!(plan.cpu_features);
                v["artifact"]["constants"] = json!(constant_bytes(plan));
            }
        }
        if args.ir {
            v["ir"] = json!(ir);
        }
        return crate::out(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    }

    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<14}{v}\n"));
    line("model", format!("{} ({kind})", args.model.display()));
    let mt = info.model_type.as_ref().map(|t| format!(" ({t})")).unwrap_or_default();
    line("architecture", format!("{}{mt}", info.architecture));
    line("parameters", format!("{} ({})", info.parameters, human(info.parameters)));
    line("layers", info.layers.to_string());
    if let Some(d) = &info.stored_dtype {
        line("stored dtype", d.clone());
    }
    line("nodes", loaded.graph.node_count().to_string());
    if let Some(m) = &loaded.manifest {
        line("format", format!("version {}, compiler {}", m.format_version, m.compiler_version));
        line("target", m.target.clone());
        line("compiled from", m.model.source.clone());
        let files: Vec<String> = m.files.iter().map(|f| format!("{} ({} B)", f.name, f.size)).collect();
        line("files", files.join(", "));
        if let Some(plan) = &m.native {
            let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
            for k in &plan.kernels {
                *by.entry(k.lowering.as_str()).or_default() += 1;
            }
            let by: Vec<String> = by.iter().map(|(l, n)| format!("{n} {l}")).collect();
            line("kernels", format!("{} ({}), {} launches", plan.kernels.len(), by.join(", "), plan.launches.len()));
            line("cpu features", plan.cpu_features.join(", "));
            let c: Vec<String> =
                constant_bytes(plan).iter().map(|(e, b)| format!("{e} {:.1} MB", *b as f64 / 1e6)).collect();
            line("constants", c.join(", "));
        }
        if let Some(plan) = &m.cuda {
            // Per implementation: generated kernels (`nvptx`) and library
            // calls (`cublas` GEMMs, with `--gpu-gemm cublas`).
            let mut by: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
            for k in &plan.kernels {
                by.entry(k.lowering.as_str()).or_default().0 += 1;
            }
            for l in &plan.launches {
                if let Some(k) = plan.kernels.get(l.kernel) {
                    by.entry(k.lowering.as_str()).or_default().1 += 1;
                }
            }
            let by: Vec<String> = by.iter().map(|(l, (k, n))| format!("{k} {l} ({n} launches)")).collect();
            line("cuda kernels", format!("{}: {}", plan.kernels.len(), by.join(", ")));
            let archs: Vec<&str> = plan.ptx.iter().map(|p| p.arch.as_str()).collect();
            line("cuda ptx", archs.join(", "));
        }
    }
    if let Some(t) = &loaded.tokenizer {
        line("tokenizer", t.display().to_string());
    }
    if !loaded.eos_token_ids.is_empty() {
        let ids: Vec<String> = loaded.eos_token_ids.iter().map(|i| i.to_string()).collect();
        line("eos ids", ids.join(", "));
    }
    let width = sig.inputs.iter().chain(&sig.outputs).map(|t| t.name.len()).max().unwrap_or(0);
    s.push_str("inputs:\n");
    for t in &sig.inputs {
        let opt = if t.optional { "  (optional)" } else { "" };
        s.push_str(&format!("  {:<width$}  {}{opt}\n", t.name, t.type_string()));
    }
    s.push_str("outputs:\n");
    for t in &sig.outputs {
        s.push_str(&format!("  {:<width$}  {}\n", t.name, t.type_string()));
    }
    if !sig.symbols.is_empty() {
        let syms: Vec<String> = sig.symbols.iter().map(|(n, b)| format!("{n} in [{}, {}]", b.min, b.max)).collect();
        s.push_str(&format!("symbols:      {}\n", syms.join(", ")));
    }
    s.push_str("ops:\n");
    let mut by_count: Vec<(&str, usize)> = ops.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    for (op, n) in by_count {
        s.push_str(&format!("  {op:<14}{n}\n"));
    }
    if args.ir {
        s.push_str(&ir);
    }
    crate::out(&s)
}

/// 1234567 -> "1.23M".
fn human(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

/// Bytes of the plan's constants by element type (`bf16` when the weights
/// were compiled with `--weight-dtype bf16`), each stored constant once.
fn constant_bytes(plan: &smelt_runtime::plan::NativePlan) -> BTreeMap<String, u64> {
    use smelt_runtime::plan::Storage;
    let mut seen = std::collections::BTreeSet::new();
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for b in &plan.buffers {
        let Storage::Weight { offset } = b.storage else { continue };
        let n: u64 = b.shape.iter().map(|d| d.parse::<u64>().unwrap_or(0)).product();
        if seen.insert(offset) {
            *by.entry(format!("{:?}", b.elem).to_lowercase()).or_default() += n * b.elem.size() as u64;
        }
    }
    by
}
