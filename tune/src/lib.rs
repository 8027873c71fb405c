//! `smelt tune`: measures kernel variants on the machine at hand and keeps
//! the winners in a tuning database that later compiles use.
//!
//! - [`jobs_of_plan`]: a model's distinct tunable kernels (sites, see
//!   `smelt_codegen::tuning`) from its CPU launch plan, with how often each
//!   runs;
//! - [`measure`]: builds, checks (against the reference interpreter, on
//!   random inputs) and times one variant on the runtime's thread team;
//!   [`gpu`]: the same for a GPU kernel, scheduled as a compile would and
//!   timed on the GPU with CUDA events;
//! - [`search`]: coordinate descent over a site's space;
//! - [`tune`]: visits the sites by their share of the model's estimated
//!   time within an anytime budget, confirms each winner by re-timing it
//!   alternately with the default, and commits it to the database as soon
//!   as its site is done;
//! - [`db`]: the database file (versioned JSON, locked, atomically
//!   replaced, tolerant of damage); [`device`]: the device fingerprint.
//!
//! **Dependencies:** this crate sits above `smelt-codegen` (it builds
//! kernels) and the runtime (its thread team times them); nothing below
//! depends on it. The compiler takes only a `smelt_codegen::tuning::Tuning`
//! from it.

pub mod db;
pub mod device;
pub mod gpu;
pub mod measure;
pub mod search;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use smelt_codegen::tuning::{Lowering, Site, Variant};
use smelt_runtime::plan::NativePlan;

use crate::db::{Key, Record, Timing};
use crate::device::Device;
use crate::gpu::{GpuBench, GpuExec};
use crate::measure::{Bench, Evaluate, Outcome, Timer};
use crate::search::{score, Found};

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("tuning GPU kernels needs LLVM's NVPTX backend: this smelt was built without the `llvm` feature (cargo build --features llvm)")]
    CudaNeedsLlvm,
    #[error("{site}: not a kernel of target `{target}`")]
    Target { site: String, target: &'static str },
    #[error("opening the GPU: {0}")]
    Gpu(String),
    #[error("starting the timing thread team: {0}")]
    Team(#[source] std::io::Error),
    #[error("{site}: computing the reference result failed: {message}")]
    Reference { site: String, message: String },
    #[error(transparent)]
    Db(#[from] db::DbError),
}

/// 16 hex digits of a stable hash (FNV-1a).
pub(crate) fn fnv_hex(bytes: &[u8]) -> String {
    format!("{:012x}", smelt_codegen::tuning::fnv1a(bytes) >> 16)
}

/// One distinct tunable kernel of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub site: Site,
    /// The kernel's name in the plan (its default-parameter build, or
    /// whichever variant the plan holds).
    pub kernel: String,
    /// How many launches of one forward call run it.
    pub launches: usize,
    /// A plain product the plan does not run: half of a gated site's
    /// unfused spelling (`kernel` names the gated kernel), timed at its
    /// default parameters only, so that the fusion cost model can weigh the
    /// fused kernel against the products it replaces.
    pub unfused: bool,
}

/// The distinct tunable kernels of a CPU plan (from each kernel's
/// recorded site), with their launch counts; kernels without parameters
/// are left out. Sites that do not parse (a newer compiler's) are left
/// out too.
pub fn jobs_of_plan(plan: &NativePlan) -> Vec<Job> {
    let mut counts = vec![0usize; plan.kernels.len()];
    for l in &plan.launches {
        if let Some(c) = counts.get_mut(l.kernel) {
            *c += 1;
        }
    }
    let mut by_site: BTreeMap<String, Job> = BTreeMap::new();
    for (k, count) in plan.kernels.iter().zip(counts) {
        let Some(t) = &k.tuning else { continue };
        let Ok(site) = t.site.parse::<Site>() else { continue };
        let name = k.symbol.strip_prefix("smelt_").unwrap_or(&k.symbol).to_string();
        by_site.entry(t.site.clone()).or_insert(Job { site, kernel: name, launches: 0, unfused: false }).launches +=
            count;
    }
    by_site.into_values().filter(|j| j.launches > 0).collect()
}

/// `jobs` and, for each gated site, its plain product when `jobs` has none
/// of that shape: a companion (`Job::unfused`) whose time lets the fusion
/// cost model weigh the gated kernel against the two products of its
/// unfused spelling. Opt-in (`smelt tune --time-unfused`): the unfused
/// spelling also runs an elementwise kernel, and the horizontal pass
/// merges its two products into one of twice the width, neither of which
/// the companion times, so on smollm2 the extraction it led to was 4%
/// slower end to end than the fused kernel (BENCHMARKS.md).
pub fn with_unfused_companions(mut jobs: Vec<Job>) -> Vec<Job> {
    let mut companions: Vec<Job> = vec![];
    for j in &jobs {
        let Site::WeightProduct { n, k, act: Some(_), w } = j.site else { continue };
        let plain = Site::WeightProduct { n, k, act: None, w };
        if !jobs.iter().chain(&companions).any(|o| o.site == plain) {
            companions.push(Job { site: plain, kernel: j.kernel.clone(), launches: 2 * j.launches, unfused: true });
        }
    }
    jobs.extend(companions);
    jobs
}

/// The machine's limits, for roofline estimates.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    pub flop_s: f64,
    pub read_bytes_s: f64,
}

impl Machine {
    /// Seconds one call of `site` with `m` rows takes at the roofline.
    pub fn estimate(&self, site: &Site, m: usize) -> f64 {
        let (flops, bytes) = site.work(m);
        (flops / self.flop_s).max(bytes / self.read_bytes_s)
    }
}

/// What a tuning run does.
#[derive(Clone, Debug)]
pub struct Config {
    /// Row counts each kernel is timed at (decode 1, prefill the prompt).
    pub rows: Vec<usize>,
    /// Threads of the CPU timing team (0 on a GPU run).
    pub threads: usize,
    pub budget: Duration,
    pub machine: Machine,
    pub device: Device,
    /// Whether the compiler's default for this build is packed panels.
    pub packed_default: bool,
    /// Where winners are committed as they are found (none: not stored).
    pub db: Option<PathBuf>,
    pub lowerings: Vec<Lowering>,
    /// Where GPU sites run (`None`: the run has none).
    pub gpu: Option<GpuExec>,
}

/// What happened to one site.
#[derive(Clone, Debug)]
pub struct SiteReport {
    pub job: Job,
    /// Its share of the tunable kernels' estimated time.
    pub share: f64,
    pub estimates: Vec<f64>,
    /// `None` when it was not reached before the budget ran out.
    pub found: Option<Found>,
    /// Why it could not be tuned (its default is wrong or fails).
    pub error: Option<String>,
    /// The record committed (or that would be, without a database).
    pub record: Option<Record>,
}

/// Progress of a run, for a progress bar.
pub trait Progress {
    /// Site `index` of `count` starts.
    fn site(&mut self, _index: usize, _count: usize, _job: &Job) {}
    /// A variant was evaluated (`evaluated` so far for this site).
    fn variant(&mut self, _evaluated: usize, _best_speedup: f64) {}
    /// A site is done.
    fn done(&mut self, _report: &SiteReport) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// Tunes `jobs` within `cfg.budget`: sites in order of estimated time,
/// each given a slice of what is left in proportion to its share (so an
/// early finish passes time on), then the companions (`Job::unfused`),
/// each timed at its default once; each site's confirmed winner is
/// committed to the database when the site is done, so interrupting a run
/// keeps every finished site (the confirmation may run a few seconds past
/// the budget). `seed` sees each site's bench before the search (tests
/// seed a wrong variant there).
pub fn tune(
    jobs: Vec<Job>,
    cfg: &Config,
    timer: &mut dyn Timer,
    progress: &mut dyn Progress,
    mut seed: impl FnMut(&mut dyn Evaluate),
) -> Result<Vec<SiteReport>, TuneError> {
    let start = Instant::now();
    let end = start + cfg.budget;
    let mut work: Vec<(Job, Vec<f64>, f64)> = jobs
        .into_iter()
        .map(|j| {
            let est: Vec<f64> = cfg.rows.iter().map(|&m| cfg.machine.estimate(&j.site, m)).collect();
            let total = j.launches as f64 * est.iter().sum::<f64>();
            (j, est, total)
        })
        .collect();
    // Companions (timed once, see `Job::unfused`) go last and take no share.
    work.sort_by(|a, b| {
        a.0.unfused.cmp(&b.0.unfused).then_with(|| b.2.total_cmp(&a.2)).then_with(|| a.0.kernel.cmp(&b.0.kernel))
    });
    let all: f64 = work.iter().filter(|w| !w.0.unfused).map(|w| w.2).sum::<f64>().max(1e-12);
    let mut left_share = 1.0;
    let count = work.len();
    let mut reports = vec![];
    for (i, (job, estimates, total)) in work.into_iter().enumerate() {
        let share = if job.unfused { 0.0 } else { total / all };
        let now = Instant::now();
        let mut report = SiteReport {
            job: job.clone(),
            share,
            estimates: estimates.clone(),
            found: None,
            error: None,
            record: None,
        };
        // Companions are timed even when the budget is spent: one default
        // evaluation each, a few seconds at most.
        if now >= end && !job.unfused {
            reports.push(report);
            continue;
        }
        progress.site(i, count, &job);
        let slice = (end - now).mul_f64((share / left_share).clamp(0.0, 1.0));
        left_share -= share;
        // A companion's deadline has passed: the search times its default.
        let deadline = if job.unfused { now } else { (now + slice).min(end) };
        let mut bench: Box<dyn Evaluate> = match (&cfg.gpu, job.site.is_gpu()) {
            (Some(exec), true) => Box::new(GpuBench::new(job.site, &cfg.rows, exec.clone(), None)?),
            (None, true) => return Err(TuneError::Target { site: job.site.to_string(), target: "cpu" }),
            (_, false) => Box::new(Bench::new(job.site, &cfg.rows, cfg.threads)?),
        };
        seed(bench.as_mut());
        let space = job.site.space(&cfg.lowerings);
        let default = job.site.default_variant(cfg.packed_default, &cfg.lowerings);
        let signature = job.site.signature(&cfg.lowerings);
        let mut evaluated = 0usize;
        let best_ratio = std::cell::Cell::new(1.0f64);
        let result = {
            let mut eval = |v: &Variant| {
                let o = bench.evaluate(v, timer);
                evaluated += 1;
                progress.variant(evaluated, 1.0 / best_ratio.get());
                o
            };
            let mut on_best = |f: &Found| best_ratio.set(score(&f.best_times, &f.default_times));
            search::search(&job.site, &space, default, deadline, &mut eval, &mut on_best)
        };
        match result {
            Err(e) => report.error = Some(e.to_string()),
            Ok(mut found) => {
                confirm(bench.as_mut(), &mut found, timer);
                let r = record(&signature, &job, &found, &estimates, cfg);
                if let Some(path) = &cfg.db {
                    db::commit(path, vec![r.clone()])?;
                }
                report.record = Some(r);
                report.found = Some(found);
            }
        }
        progress.done(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// How many times the winner and the default are re-timed, alternately,
/// before the winner is kept.
pub const CONFIRM_ROUNDS: usize = 5;
/// The gain a winner must show in confirmation, at one row count at least.
pub const MIN_ACCEPT: f64 = 0.03;

/// Re-times the default and the winner alternately [`CONFIRM_ROUNDS`]
/// times, so each winner timing has a default timing taken right beside
/// it (a shared machine's load drifts over seconds), and keeps the winner
/// only if, per row count, the median of those paired ratios is at most 1
/// (within [`search::TIE`]), and at one row count at least [`MIN_ACCEPT`]
/// below 1; otherwise the default is the winner. (A mean gain over the
/// row counts was asked before, which kept out every variant faster at
/// one row count only, by less than twice that: the decode-only
/// parameters' usual case.) The search's own timings do not count: the
/// default's was taken when the site's search began and the winner's
/// whenever the search reached it, seconds apart, and on a machine whose
/// memory changes speed they once made an LM head variant look 11%
/// faster that was 0-3% slower timed side by side (BENCHMARKS.md,
/// 2026-11-30). The recorded times are the re-timings' medians. This
/// costs a few evaluations past the site's deadline when the search used
/// all of its time.
fn confirm(bench: &mut dyn Evaluate, f: &mut Found, timer: &mut dyn Timer) {
    if f.best == f.default {
        return;
    }
    let mut ds = vec![];
    let mut bs = vec![];
    for _ in 0..CONFIRM_ROUNDS {
        let (Outcome::Timed(d), Outcome::Timed(b)) =
            (bench.evaluate(&f.default, timer), bench.evaluate(&f.best, timer))
        else {
            // Timing failed this time: keep the default.
            bs.clear();
            break;
        };
        ds.push(d);
        bs.push(b);
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let rows = f.default_times.len();
    if ds.is_empty() {
        // Timing failed at once: keep the default and its search timing.
        f.best = f.default;
        f.best_times = f.default_times.clone();
        return;
    }
    let d: Vec<f64> = (0..rows).map(|i| median(ds.iter().map(|t| t[i]).collect())).collect();
    let keep = !bs.is_empty() && {
        let ratios: Vec<f64> =
            (0..rows).map(|i| median(ds.iter().zip(&bs).map(|(d, b)| b[i] / d[i]).collect())).collect();
        ratios.iter().all(|r| *r <= 1.0 + search::TIE) && ratios.iter().any(|r| *r <= 1.0 - MIN_ACCEPT)
    };
    if keep {
        f.best_times = (0..rows).map(|i| median(bs.iter().map(|t| t[i]).collect())).collect();
    } else {
        f.best = f.default;
        f.best_times = d.clone();
    }
    f.default_times = d;
}

/// The database record of a site's winner.
fn record(signature: &str, job: &Job, f: &Found, estimates: &[f64], cfg: &Config) -> Record {
    let (unix_time, date) = db::now();
    Record {
        key: Key {
            signature: signature.to_string(),
            bucket: match cfg.gpu {
                Some(_) => db::gpu_bucket(&cfg.rows),
                None => db::bucket(&cfg.rows, cfg.threads),
            },
            device: cfg.device.id.clone(),
        },
        site: job.site.to_string(),
        params: f.best.to_string(),
        default_params: f.default.to_string(),
        timings: cfg
            .rows
            .iter()
            .enumerate()
            .map(|(i, &m)| Timing {
                m,
                seconds: f.best_times[i],
                default_seconds: f.default_times[i],
                estimate_seconds: estimates[i],
            })
            .collect(),
        threads: cfg.threads,
        device: cfg.device.description.clone(),
        smelt_version: env!("CARGO_PKG_VERSION").to_string(),
        date,
        unix_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Outcome;
    use crate::search::Found;
    use smelt_codegen::kir::Scalar;
    use smelt_codegen::select::PanelParams;

    /// Times from a table: the default's and the winner's, per row count
    /// (decode, prefill), the same every call.
    struct Table {
        default: Variant,
        times: [Vec<f64>; 2],
    }

    impl Evaluate for Table {
        fn evaluate(&mut self, v: &Variant, _: &mut dyn Timer) -> Outcome {
            Outcome::Timed(self.times[(*v != self.default) as usize].clone())
        }
        fn seed_wrong(&mut self, _: Variant) {}
    }

    struct NoClock;
    impl Timer for NoClock {
        fn seconds(&mut self, _: &Site, _: &Variant, _: usize, _: &mut dyn FnMut(usize) -> f64) -> f64 {
            unreachable!("the table times every variant")
        }
    }

    /// Whether `confirm` keeps a winner with `best` times against a
    /// default's `[1.0, 1.0]`.
    fn kept(best: &[f64]) -> bool {
        let site = Site::weight_product(64, 32, None, Scalar::F32).unwrap();
        let default = site.default_variant(true, &[Lowering::Cranelift]);
        let winner =
            Variant::Panels { p: PanelParams { ksplit: 2, ..PanelParams::DEFAULT }, lowering: Lowering::Cranelift };
        assert_ne!(default, winner);
        let d = vec![1.0, 1.0];
        let mut f = Found {
            default,
            default_times: d.clone(),
            best: winner,
            best_times: best.to_vec(),
            evaluated: 2,
            rejected: vec![],
            failed: vec![],
            complete: true,
        };
        confirm(&mut Table { default, times: [d, best.to_vec()] }, &mut f, &mut NoClock);
        f.best == winner
    }

    /// Re-times a winner from a list (one entry per evaluation of it),
    /// the default always at `[1.0, 1.0]`.
    struct Seq {
        default: Variant,
        best: Vec<Vec<f64>>,
    }

    impl Evaluate for Seq {
        fn evaluate(&mut self, v: &Variant, _: &mut dyn Timer) -> Outcome {
            if *v == self.default {
                return Outcome::Timed(vec![1.0, 1.0]);
            }
            Outcome::Timed(self.best.remove(0))
        }
        fn seed_wrong(&mut self, _: Variant) {}
    }

    /// Only timings taken side by side decide: a search that timed the
    /// winner 20% faster than the default (seconds apart) does not keep
    /// it when its re-timings beside the default are mostly no faster,
    /// and one that saw no gain keeps a winner its re-timings show 4%
    /// faster.
    #[test]
    fn confirmation_counts_only_side_by_side_timings() {
        let site = Site::weight_product(64, 32, None, Scalar::F32).unwrap();
        let default = site.default_variant(true, &[Lowering::Cranelift]);
        let winner =
            Variant::Panels { p: PanelParams { ksplit: 2, ..PanelParams::DEFAULT }, lowering: Lowering::Cranelift };
        let found = |search: f64| Found {
            default,
            default_times: vec![1.0, 1.0],
            best: winner,
            best_times: vec![search, 1.0],
            evaluated: 2,
            rejected: vec![],
            failed: vec![],
            complete: true,
        };
        let retimed =
            |decode: [f64; CONFIRM_ROUNDS]| Seq { default, best: decode.iter().map(|&t| vec![t, 1.0]).collect() };
        let mut f = found(0.8);
        confirm(&mut retimed([0.96, 1.0, 0.96, 1.0, 1.0]), &mut f, &mut NoClock);
        assert_eq!(f.best, default, "two of five side-by-side timings faster, the search's own one aside");
        let mut f = found(1.0);
        confirm(&mut retimed([0.96, 0.96, 1.0, 0.96, 1.0]), &mut f, &mut NoClock);
        assert_eq!((f.best, f.best_times.clone()), (winner, vec![0.96, 1.0]));
    }

    /// A decode-only parameter (a single-row tile's `ksplit`, streams or
    /// prefetch) changes one row count's time: 5% faster there and the
    /// same, or slower within noise, on the other is a win; slower beyond
    /// noise anywhere, or too small a gain, is not.
    #[test]
    fn confirmation_keeps_a_gain_at_one_row_count() {
        assert!(kept(&[0.95, 1.0]));
        assert!(kept(&[0.95, 1.004]));
        assert!(kept(&[1.0, 0.9]));
        assert!(!kept(&[0.95, 1.01]), "1% slower on prefill");
        assert!(!kept(&[0.98, 1.0]), "2% is within what the machine drifts");
        assert!(!kept(&[0.5, 1.02]));
    }
}
