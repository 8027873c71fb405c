//! `smelt tune MODEL|ARTIFACT [--target cpu|cuda] [--budget SECONDS] [--db PATH]`:
//! schedules the model (or reads an artifact's plan), takes its distinct
//! tunable kernels, and for each searches its template's parameter space
//! on this machine: every variant is checked against the reference
//! interpreter on random inputs (wrong ones are reported and dropped),
//! then timed on the runtime's thread team at one row (decode) and
//! `--prompt` rows (prefill). Kernels are visited by their share of the
//! model's estimated time; the budget is anytime, and each winner is
//! committed to the tuning database as soon as it is found, so an
//! interrupted run keeps what it measured. A later `smelt compile` uses
//! the winners (`--tuning-db`, `--no-tuning`).
//!
//! `--target cuda` tunes the GPU weight products instead, on GPU 0: each
//! variant is scheduled as `smelt compile --target cuda` would build it,
//! checked on the GPU against the reference interpreter, and timed with
//! CUDA events (see `smelt_tune::gpu`); records are keyed by the GPU's
//! fingerprint (name, SM version, driver), so only a compile on the same
//! GPU applies them.
//!
//! `--import FILE` merges another database into `--db`; `--export FILE`
//! writes `--db` to FILE. Both may be given without a model.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use smelt_codegen::tuning::Lowering;
use smelt_runtime::artifact::Artifact;
use smelt_tune::db::{self, Db};
use smelt_tune::device::Device;
use smelt_tune::measure::WallTimer;
use smelt_tune::{jobs_of_plan, Config, Job, Machine, Progress, SiteReport, TuneError};

use crate::commands::compile::{cpu_plan, gpu_plan, WeightDtypeArg};
use crate::source::Source;

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TuneTarget {
    Cpu,
    Cuda,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A checkpoint folder or .onnx file (scheduled here), or an artifact (its plan for the target is read).
    pub model: Option<PathBuf>,
    /// Which kernels to tune.
    #[arg(long, value_enum, default_value_t = TuneTarget::Cpu)]
    pub target: TuneTarget,
    /// Seconds to spend measuring (anytime: stopping early keeps what was measured).
    #[arg(long, default_value_t = 60.0)]
    pub budget: f64,
    /// The tuning database [default: $SMELT_TUNING_DB, else the user's cache folder's smelt/tuning.json].
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Threads the CPU kernels are timed on (default: all cores); part of each record's key.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Rows of the prefill workload each kernel is also timed at (besides one row, decode).
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// The weight storage of the kernels, as `smelt compile --weight-dtype` (MODEL only).
    #[arg(long, value_enum)]
    pub weight_dtype: Option<WeightDtypeArg>,
    /// Merge the records of another tuning database file into --db (before tuning, if a model is given).
    #[arg(long, value_name = "FILE")]
    pub import: Vec<PathBuf>,
    /// Write the tuning database to FILE (after tuning, if a model is given).
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// Also time each gated MLP's plain product (at its default), so that
    /// compiles weigh the fused kernel against its unfused spelling with
    /// measured times (experimental: the unfused spelling's elementwise
    /// kernel and merged product are not timed).
    #[arg(long)]
    pub time_unfused: bool,
}

pub fn main(args: Args) -> Result<()> {
    if args.target == TuneTarget::Cuda && !cfg!(feature = "llvm") {
        return Err(TuneError::CudaNeedsLlvm.into());
    }
    if args.model.is_none() && args.import.is_empty() && args.export.is_none() {
        bail!("smelt tune: give a MODEL to tune, or --import/--export a database (see `smelt tune --help`)");
    }
    if !(args.budget >= 0.0 && args.budget.is_finite()) {
        bail!("--budget: expected a number of seconds >= 0, found {}", args.budget);
    }
    let db_path = match &args.db {
        Some(p) => p.clone(),
        None => db::default_path().context("no tuning database path: set --db, $SMELT_TUNING_DB or $HOME")?,
    };
    for file in &args.import {
        if !file.is_file() {
            bail!("--import {}: no such file", file.display());
        }
        let (other, warnings) = Db::load(file);
        warn(&warnings);
        let n = other.len();
        let c = db::update(&db_path, |d| d.merge(other))?;
        warn(&c.warnings);
        eprintln!(
            "imported {} of {n} records from {} into {} ({} records)",
            c.added,
            file.display(),
            db_path.display(),
            c.total
        );
    }
    if let Some(model) = &args.model {
        tune_model(&args, model, &db_path)?;
    }
    if let Some(out) = &args.export {
        let (d, warnings) = Db::load(&db_path);
        warn(&warnings);
        let n = d.len();
        // Replaces the file atomically under its own lock.
        db::update(out, |f| {
            *f = d;
            n
        })?;
        eprintln!("exported {n} records from {} to {}", db_path.display(), out.display());
    }
    Ok(())
}

fn warn(warnings: &[db::Warning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn tune_model(args: &Args, model: &std::path::Path, db_path: &std::path::Path) -> Result<()> {
    let gpu = args.target == TuneTarget::Cuda;
    // The GPU is looked for before the model is scheduled.
    let gpu_info = match gpu {
        true => Some(smelt_runtime::cuda::probe(0).map_err(|e| TuneError::Gpu(e.to_string()))?),
        false => None,
    };
    let plan = match Source::classify(model)? {
        Source::Artifact(dir) => {
            let a = Artifact::open(&dir)?;
            let (plan, name) = if gpu { (&a.manifest().cuda, "cuda") } else { (&a.manifest().native, "cpu") };
            match plan {
                Some(p) => p.clone(),
                None => bail!("{}: has no `{name}` plan to tune (target `{}`)", dir.display(), a.manifest().target),
            }
        }
        _ if gpu => gpu_plan(model, args.weight_dtype)?,
        _ => cpu_plan(model, args.weight_dtype)?,
    };
    let mut jobs = jobs_of_plan(&plan);
    if args.time_unfused {
        jobs = smelt_tune::with_unfused_companions(jobs);
    }
    if jobs.is_empty() {
        eprintln!(
            "{}: no tunable kernels (an artifact compiled before `smelt tune` existed records none; recompile it)",
            model.display()
        );
        return Ok(());
    }
    // Make sure the database can be written before measuring anything.
    db::update(db_path, |_| 0)?;
    let mut rows = vec![1];
    if args.prompt > 1 {
        rows.push(args.prompt);
    }
    if let Some(info) = gpu_info {
        return tune_gpu(args, model, db_path, jobs, rows, info);
    }
    let threads = crate::source::threads(args.threads);
    eprintln!("probing the machine ({threads} threads)...");
    let probe = crate::probe::measure(threads);
    let device = Device::host_cpu();
    let cfg = Config {
        rows,
        threads,
        budget: Duration::from_secs_f64(args.budget),
        machine: Machine { flop_s: probe.fma_gflop_s * 1e9, read_bytes_s: probe.read_gb_s * 1e9 },
        device: device.clone(),
        // The defaults a compile uses (what "default" times are timed as).
        packed_default: super::compile::cpu_options(Default::default(), None).packed_weights,
        db: Some(db_path.to_path_buf()),
        lowerings: Lowering::available(),
        gpu: None,
    };
    eprintln!(
        "tuning {} kernels of {} for {} s on {} ({}), {threads} threads; read {:.1} GB/s, FMA peak {:.0} GFLOP/s",
        jobs.len(),
        model.display(),
        args.budget,
        device.id,
        device.description,
        probe.read_gb_s,
        probe.fma_gflop_s
    );
    run(jobs, &cfg, db_path)
}

/// Nominal limits of an H100/H200-class GPU (f32 FMA, HBM reads): they
/// only order the kernels by estimated time and fill the records'
/// roofline estimates.
const GPU_NOMINAL: Machine = Machine { flop_s: 60e12, read_bytes_s: 4.0e12 };

fn tune_gpu(
    args: &Args,
    model: &std::path::Path,
    db_path: &std::path::Path,
    jobs: Vec<Job>,
    rows: Vec<usize>,
    info: smelt_runtime::cuda::DeviceInfo,
) -> Result<()> {
    let device = Device::gpu(&info.name, info.compute_capability, info.driver_version);
    let cfg = Config {
        rows,
        threads: 0,
        budget: Duration::from_secs_f64(args.budget),
        machine: GPU_NOMINAL,
        device: device.clone(),
        packed_default: false,
        db: Some(db_path.to_path_buf()),
        lowerings: vec![Lowering::Nvptx],
        gpu: Some(smelt_tune::gpu::GpuExec::Device { ordinal: 0 }),
    };
    eprintln!(
        "tuning {} GPU kernels of {} for {} s on {} ({}, {})",
        jobs.len(),
        model.display(),
        args.budget,
        device.id,
        device.description,
        info
    );
    run(jobs, &cfg, db_path)
}

/// Tunes `jobs` with a progress bar, then prints the table.
fn run(jobs: Vec<Job>, cfg: &Config, db_path: &std::path::Path) -> Result<()> {
    let mut bar = Bar::new(cfg.budget);
    let reports = smelt_tune::tune(jobs, cfg, &mut WallTimer::default(), &mut bar, |_| {})?;
    bar.finish();
    crate::out(&table(&reports, &cfg.rows))?;
    let stored = reports.iter().filter(|r| r.record.is_some()).count();
    eprintln!(
        "{stored} records written to {}; `smelt compile` uses them (--tuning-db to choose the file)",
        db_path.display()
    );
    Ok(())
}

/// The progress line on stderr (redrawn in place on a terminal, one line
/// per kernel otherwise).
struct Bar {
    start: Instant,
    budget: Duration,
    tty: bool,
    site: String,
    index: usize,
    count: usize,
}

impl Bar {
    fn new(budget: Duration) -> Bar {
        Bar {
            start: Instant::now(),
            budget,
            tty: std::io::stderr().is_terminal(),
            site: String::new(),
            index: 0,
            count: 0,
        }
    }

    fn draw(&self, what: &str) {
        let frac = (self.start.elapsed().as_secs_f64() / self.budget.as_secs_f64().max(1e-9)).min(1.0);
        let width = 24;
        let filled = (frac * width as f64).round() as usize;
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
        let line = format!(
            "[{bar}] {:>4.0}/{:.0}s  kernel {}/{} {}: {what}",
            self.start.elapsed().as_secs_f64(),
            self.budget.as_secs_f64(),
            self.index + 1,
            self.count,
            self.site
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Progress for Bar {
    fn site(&mut self, index: usize, count: usize, job: &Job) {
        self.index = index;
        self.count = count;
        self.site = job.site.label();
        if self.tty {
            self.draw("starting");
        }
    }

    fn variant(&mut self, evaluated: usize, best_speedup: f64) {
        if self.tty {
            self.draw(&format!("{evaluated} variants, best {best_speedup:.2}x"));
        }
    }

    fn done(&mut self, r: &SiteReport) {
        let what = match (&r.found, &r.error) {
            (_, Some(e)) => format!("not tuned: {e}"),
            (Some(f), _) => format!(
                "{} variants ({} wrong, {} failed){}",
                f.evaluated,
                f.rejected.len(),
                f.failed.len(),
                if f.complete { "" } else { ", stopped by the budget" }
            ),
            (None, None) => "not reached".into(),
        };
        self.draw(&what);
        if self.tty {
            eprintln!();
        }
        if let Some(f) = &r.found {
            for (v, why) in &f.rejected {
                eprintln!("  wrong result, discarded: {v}: {why}");
            }
        }
    }
}

fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2}s")
    } else if s >= 1e-3 {
        format!("{:.2}ms", s * 1e3)
    } else {
        format!("{:.1}us", s * 1e6)
    }
}

/// The final table: kernel, shape, default and best time per row count,
/// speedup, chosen parameters.
fn table(reports: &[SiteReport], rows: &[usize]) -> String {
    let ms: Vec<String> = rows.iter().map(|m| format!("m={m}")).collect();
    let mut out = format!(
        "{:<26} {:>6} {:>6} {:<28} {:<28} {:<14} parameters\n",
        "kernel",
        "calls",
        "share",
        format!("default ({})", ms.join(" / ")),
        "best",
        "speedup"
    );
    for r in reports {
        let name = if r.job.unfused { format!("{} (unfused)", r.job.site.label()) } else { r.job.site.label() };
        let head = format!("{name:<26} {:>6} {:>5.1}%", r.job.launches, 100.0 * r.share);
        match (&r.found, &r.error) {
            (Some(f), _) => {
                let d: Vec<String> = f.default_times.iter().map(|t| secs(*t)).collect();
                let b: Vec<String> = f.best_times.iter().map(|t| secs(*t)).collect();
                let x: Vec<String> =
                    f.default_times.iter().zip(&f.best_times).map(|(d, b)| format!("{:.2}x", d / b)).collect();
                let params = if f.best == f.default { format!("{} (the default)", f.best) } else { f.best.to_string() };
                out.push_str(&format!(
                    "{head} {:<28} {:<28} {:<14} {params}\n",
                    d.join(" / "),
                    b.join(" / "),
                    x.join(" / ")
                ));
            }
            (None, Some(e)) => out.push_str(&format!("{head} not tuned: {e}\n")),
            (None, None) => out.push_str(&format!("{head} not reached within the budget\n")),
        }
    }
    out
}
