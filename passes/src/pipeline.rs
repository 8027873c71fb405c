//! `pipeline()`: the whole pass pipeline as one flat list of named stages.
//!
//! ```text
//! verify -> infer -> fold -> cse -> dce -> canon -> fuse -> horizontal -> cleanup
//! ```
//!
//! Each stage is a file of this crate and does no IO; the only IO is the
//! optional dump of the IR after a stage ([`DumpSpec`], what the CLI's
//! `--dump-ir STAGE|all` sets), to stdout or to a folder
//! (`NN-STAGE.smir`, with `00-input.smir` the graph before any stage).
//! With `verify_each` (tests) the verifier runs after every stage, so a
//! stage that breaks the graph is named in the error.

use crate::error::PassError;
use crate::fuse::FusionOptions;
use crate::horizontal::WeightStore;
use crate::report::FusionReport;
use smelt_ir::Graph;
use std::path::PathBuf;
use std::time::Instant;

/// The stages, in order (what `--dump-ir` accepts, besides `all`).
pub const STAGES: &[&str] =
    &["verify", "infer", "fold", "cse", "dce", "canon", "fuse", "horizontal", "cleanup", "kv_append"];

/// Where dumps go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpTarget {
    Stdout,
    /// A folder; created if missing.
    Dir(PathBuf),
}

/// Which stages to dump the IR after, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpSpec {
    /// `None` dumps after every stage (and the input); otherwise the listed stages.
    pub stages: Option<Vec<String>>,
    pub target: DumpTarget,
}

impl DumpSpec {
    /// Parses the CLI's `--dump-ir` value: `all`, or stage names separated by commas.
    pub fn parse(what: &str, target: DumpTarget) -> Result<DumpSpec, PassError> {
        if what == "all" {
            return Ok(DumpSpec { stages: None, target });
        }
        let stages: Vec<String> = what.split(',').map(|s| s.trim().to_string()).collect();
        for s in &stages {
            if !STAGES.contains(&s.as_str()) {
                return Err(PassError::UnknownStage(s.clone(), STAGES.join(", ")));
            }
        }
        Ok(DumpSpec { stages: Some(stages), target })
    }

    fn wants(&self, stage: &str) -> bool {
        match &self.stages {
            None => true,
            Some(v) => v.iter().any(|s| s == stage),
        }
    }
}

/// What the pipeline does.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    pub dump: Option<DumpSpec>,
    /// Run the verifier after every stage (tests set it).
    pub verify_each: bool,
    pub fusion: FusionOptions,
    /// Skip horizontal fusion (it rewrites the weight store).
    pub no_horizontal: bool,
}

/// How long one stage took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTiming {
    pub stage: String,
    pub ms: f64,
    pub nodes_after: usize,
}

/// What the pipeline reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PipelineReport {
    pub stages: Vec<StageTiming>,
    pub fusion: FusionReport,
    pub total_ms: f64,
}

fn dump(spec: &Option<DumpSpec>, index: usize, stage: &str, g: &Graph) -> Result<(), PassError> {
    let Some(spec) = spec else { return Ok(()) };
    if stage != "input" && !spec.wants(stage) {
        return Ok(());
    }
    if stage == "input" && spec.stages.is_some() {
        return Ok(());
    }
    let text = smelt_ir::text::print(g);
    match &spec.target {
        DumpTarget::Stdout => {
            println!("# ---- IR after stage `{stage}` ----");
            print!("{text}");
            Ok(())
        }
        DumpTarget::Dir(dir) => {
            let path = dir.join(format!("{index:02}-{stage}.smir"));
            let io = |source| PassError::Dump { path: path.display().to_string(), source };
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::write(&path, text).map_err(io)
        }
    }
}

/// Runs every stage on the graph (and the weight store, which horizontal
/// fusion extends with joined weights).
pub fn pipeline(
    g: &mut Graph,
    weights: &mut impl WeightStore,
    opts: &PipelineOptions,
) -> Result<PipelineReport, PassError> {
    let t_all = Instant::now();
    let mut report = PipelineReport::default();
    dump(&opts.dump, 0, "input", g)?;
    let mut groups = Vec::new();
    for (i, &stage) in STAGES.iter().enumerate() {
        let t = Instant::now();
        match stage {
            "verify" => crate::verify::run(g, "input")?,
            "infer" => crate::infer::run(g)?,
            "fold" => {
                crate::fold::run(g)?;
            }
            "cse" => {
                crate::cse::run(g)?;
            }
            "dce" => {
                crate::dce::run(g);
            }
            "canon" => {
                crate::canon::run(g)?;
            }
            "fuse" => report.fusion = crate::fuse::fuse(g, &opts.fusion)?,
            "horizontal" if !opts.no_horizontal => {
                let (groups, members) = crate::horizontal::run(g, weights)?;
                report.fusion.horizontal_groups = groups;
                report.fusion.horizontal_members = members;
            }
            "horizontal" => {}
            "cleanup" => groups = crate::cleanup::run(g)?,
            "kv_append" => {
                crate::kv_append::run(g)?;
            }
            other => return Err(PassError::Stage { stage: other.to_string(), message: "no such stage".into() }),
        }
        report.stages.push(StageTiming {
            stage: stage.to_string(),
            ms: t.elapsed().as_secs_f64() * 1e3,
            nodes_after: g.node_count(),
        });
        if opts.verify_each {
            crate::verify::run(g, stage)?;
        }
        dump(&opts.dump, i + 1, stage, g)?;
    }
    let (fused, unfused) = crate::egraph::convert::count_ops(g);
    report.fusion.fused = fused;
    report.fusion.unfused = unfused;
    report.fusion.elementwise_chains = groups.len();
    report.fusion.elementwise_groups = groups;
    report.total_ms = t_all.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}
