//! `smelt bench MODEL... --prompt P --ctx C [--threads N] [--reps R] [--json]`:
//! times one prefill over P tokens (empty cache) and one decode step (one
//! token after C cached positions; for a model without past inputs, which
//! has no cache, the forward over all C + 1 tokens that generation runs for
//! each new token, flagged `decode_recomputes`), each as the median of R
//! timed calls (at least) after warm-up calls (the prefill's for 0.2 s,
//! which also warms the thread team up). Several models are timed in turn,
//! and each one after the first also reports the median over rounds of
//! its time over the first model's in the same round (`prefill_ratio`,
//! `decode_ratio`): a machine whose memory changes speed within seconds
//! moves both alike. A prefill round is one call of each model; a decode
//! round is a block of calls of each model in turn, as generation makes
//! them (see [`decode_blocks`]). `--machine` measures the machine's
//! streaming read bandwidth and f32 FMA peak with small probes, so results
//! can be put against the hardware's limits in the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use smelt_runtime::generate::{cached_step_inputs, step_inputs, takes_past};

use crate::source::{open_runnable, threads, DeviceArg, Runnable};
use smelt_ir::Tensor;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .smelt artifact (or a checkpoint folder / .onnx file, run by the
    /// interpreter); several are timed in turn (prefill call by call,
    /// decode steps in blocks of one model's calls), each reported with
    /// its times as a ratio of the first's (`models` in the report).
    pub models: Vec<PathBuf>,
    /// Prompt length of the timed prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// Cached positions before the timed decode step.
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Threads of the CPU runtime (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where a `cpu,cuda` artifact runs (default: the GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Timed repetitions of each measurement (the median is reported;
    /// decode steps are timed in blocks of 3, so it may take up to 2 more).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also measure read bandwidth and FMA peak of this machine.
    #[arg(long)]
    pub machine: bool,
}

/// How long the prefill's warm-up keeps calling before it times anything.
/// Right after the thread team starts, a worker can share the caller's core
/// until the scheduler moves it, and every barrier then waits for a context
/// switch: after a single warm-up call, a 4-token prefill of a tiny model
/// measured 90 us instead of 10 in about half the processes.
const WARM_UP: Duration = Duration::from_millis(200);

/// One model being timed, with the inputs of its calls prepared.
struct Subject {
    path: PathBuf,
    r: Runnable,
    /// The prefill's inputs (token inputs only with a cache of the model's own).
    prefill: BTreeMap<String, Tensor>,
    /// Without a cache of the model's own: the decode call's inputs.
    decode: Option<BTreeMap<String, Tensor>>,
    /// With one: the positions it holds.
    at: usize,
    report: serde_json::Map<String, serde_json::Value>,
}

impl Subject {
    fn open(path: &Path, args: &Args, threads: usize) -> Result<Subject> {
        let mut r = open_runnable(path, threads, args.device)?;
        let mut report = serde_json::Map::new();
        report.insert("backend".into(), r.backend.into());
        if let Some(bytes) = weight_bytes(path, r.backend) {
            report.insert("weight_bytes".into(), bytes.into());
        }
        let sig = r.model.signature().clone();
        let (prefill, decode) = if r.model.cache().is_some() {
            // A model that keeps its KV cache (the CPU and GPU runtimes do)
            // is timed the way generation runs it: only token inputs go in
            // (building and dropping past tensors in the timed calls would
            // time the benchmark), one row of logits comes out.
            (cached_step_inputs(&sig, &tokens(args.prompt), 0)?, None)
        } else if takes_past(&sig)? {
            (step_inputs(&sig, &tokens(args.prompt), 0)?, Some(step_inputs(&sig, &[1], args.ctx)?))
        } else {
            // Without past inputs there is no cache to decode against:
            // generation runs the whole sequence again for each new token,
            // so a decode step after `ctx` positions is a forward over
            // `ctx + 1` tokens (a step of one token with a longer mask would
            // time a call generation never makes).
            report.insert("decode_recomputes".into(), true.into());
            (step_inputs(&sig, &tokens(args.prompt), 0)?, Some(step_inputs(&sig, &tokens(args.ctx + 1), 0)?))
        };
        Ok(Subject { path: path.to_path_buf(), r, prefill, decode, at: 0, report })
    }

    fn prefill(&mut self) -> Result<()> {
        match self.r.model.cache() {
            Some(cache) => {
                cache.reset();
                cache.step(self.prefill.clone())?;
            }
            None => {
                self.r.model.forward(self.prefill.clone())?;
            }
        }
        Ok(())
    }

    /// Fills the model's own cache with `ctx` positions (nothing without one).
    fn fill(&mut self, ctx: usize) -> Result<()> {
        let sig = self.r.model.signature().clone();
        if let Some(cache) = self.r.model.cache() {
            cache.reset();
            if ctx > 0 {
                cache.step(cached_step_inputs(&sig, &tokens(ctx), 0)?)?;
            }
            self.at = ctx;
        }
        Ok(())
    }

    /// A block of [`decode_blocks`]: the cache refilled to `ctx - warm`
    /// positions, `warm` untimed decode steps, then [`DECODE_BLOCK`] timed
    /// ones (milliseconds).
    fn decode_block(&mut self, ctx: usize, warm: usize) -> Result<Vec<f64>> {
        self.fill(ctx - warm)?;
        for _ in 0..warm {
            self.decode()?;
        }
        let mut block = Vec::with_capacity(DECODE_BLOCK);
        for _ in 0..DECODE_BLOCK {
            let start = Instant::now();
            self.decode()?;
            block.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(block)
    }

    /// One decode step: appends a position to the model's own cache, or
    /// runs the prepared call.
    fn decode(&mut self) -> Result<()> {
        match &self.decode {
            Some(inputs) => {
                self.r.model.forward(inputs.clone())?;
            }
            None => {
                let step = cached_step_inputs(self.r.model.signature(), &[1], self.at)?;
                let Some(cache) = self.r.model.cache() else {
                    bail!("the model has neither a cache nor decode inputs")
                };
                cache.step(step)?;
                self.at += 1;
            }
        }
        Ok(())
    }
}

/// Token ids for `n` positions.
fn tokens(n: usize) -> Vec<i64> {
    (0..n as i64).map(|i| (i * 7919 + 1) % 100).collect()
}

/// Times prefill calls: `reps` rounds of one call of every subject in
/// turn, after untimed rounds until [`WARM_UP`] has passed (at least
/// one). A prefill starts from an empty cache, so its calls leave nothing
/// behind that the next one sees. Milliseconds, `[subject][round]`.
fn time_prefill(subjects: &mut [Subject], reps: usize) -> Result<Vec<Vec<f64>>> {
    let warm = Instant::now();
    loop {
        for s in subjects.iter_mut() {
            s.prefill().with_context(|| s.path.display().to_string())?;
        }
        if warm.elapsed() >= WARM_UP {
            break;
        }
    }
    let mut t = vec![Vec::with_capacity(reps); subjects.len()];
    for _ in 0..reps.max(1) {
        for (s, ts) in subjects.iter_mut().zip(&mut t) {
            let start = Instant::now();
            s.prefill().with_context(|| s.path.display().to_string())?;
            ts.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(t)
}

/// Untimed decode calls of a model before each block of timed ones.
const DECODE_WARM: usize = 4;

/// Timed decode calls in a block.
const DECODE_BLOCK: usize = 3;

/// Times decode steps: rounds of one block per subject in turn, until
/// every subject has at least `reps` timed calls. A block refills the
/// subject's cache to `ctx - DECODE_WARM` positions (at least 0), makes
/// up to [`DECODE_WARM`] untimed calls that bring it to `ctx`, then
/// [`DECODE_BLOCK`] timed ones (after `ctx`, `ctx + 1`, ... cached). With
/// `several` subjects, the subject's threads keep spinning between the
/// calls of its block and sleep after it, as they do in generation, which
/// makes one model's calls back to back.
///
/// Why blocks: timed call by call in turn, a model's every call came
/// right after another model's, and measured a steady loop of its own
/// calls badly. On a 2-core Zen 5 (smollm2-135m, bf16 weights, decode
/// after 128 positions), the first of a model's calls after the other
/// model's took about 6.0 ms and the next ones 5.6, 5.5, 5.5, then
/// 5.3-5.4, as one process running that model alone measured: the first
/// call paid the sleeping team's wake-up and the next ones a cache the
/// other model had filled with its own data, a fixed cost that weighs
/// more on a shorter call (BENCHMARKS.md, 2026-11-30).
///
/// Milliseconds, `[subject][call]`, and the rounds' ratios: per round,
/// each subject's median over the first subject's.
fn decode_blocks(subjects: &mut [Subject], reps: usize, ctx: usize, several: bool) -> Result<DecodeTimes> {
    let warm = DECODE_WARM.min(ctx);
    let rounds = reps.max(1).div_ceil(DECODE_BLOCK);
    let mut times = vec![Vec::with_capacity(rounds * DECODE_BLOCK); subjects.len()];
    let mut ratios = vec![Vec::with_capacity(rounds); subjects.len()];
    for _ in 0..rounds {
        let mut medians = Vec::with_capacity(subjects.len());
        for (s, ts) in subjects.iter_mut().zip(&mut times) {
            if several {
                s.r.model.sleep_when_idle(false);
            }
            let block = s.decode_block(ctx, warm).with_context(|| s.path.display().to_string())?;
            if several {
                s.r.model.sleep_when_idle(true);
            }
            ts.extend_from_slice(&block);
            medians.push(median(block));
        }
        for (r, m) in ratios.iter_mut().zip(&medians) {
            r.push(m / medians[0]);
        }
    }
    Ok(DecodeTimes { times, ratios })
}

/// What [`decode_blocks`] measured.
struct DecodeTimes {
    times: Vec<Vec<f64>>,
    ratios: Vec<Vec<f64>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median, min and max.
fn summary(t: &[f64]) -> serde_json::Value {
    let lo = t.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    serde_json::json!([median(t.to_vec()), lo, hi])
}

pub fn main(args: Args) -> Result<()> {
    let threads = threads(args.threads);
    let mut report = serde_json::Map::new();
    report.insert("threads".into(), threads.into());
    if args.machine {
        let m = crate::probe::measure(threads);
        report.insert("read_gb_s".into(), m.read_gb_s.into());
        report.insert("fma_gflop_s".into(), m.fma_gflop_s.into());
    }
    if !args.models.is_empty() {
        if args.prompt == 0 {
            bail!("--prompt must be at least 1 token");
        }
        let mut subjects = args.models.iter().map(|p| Subject::open(p, &args, threads)).collect::<Result<Vec<_>>>()?;
        let several = subjects.len() > 1;
        if several {
            // Each model's threads rest between its calls, so the team
            // running has the cores to itself.
            for s in &mut subjects {
                s.r.model.sleep_when_idle(true);
            }
        }
        let prefill = time_prefill(&mut subjects, args.reps)?;
        let decode = decode_blocks(&mut subjects, args.reps, args.ctx, several)?;
        let mut reports = vec![];
        for (i, s) in subjects.into_iter().enumerate() {
            let mut r = s.report;
            r.insert("prompt".into(), args.prompt.into());
            r.insert("ctx".into(), args.ctx.into());
            r.insert("prefill_ms".into(), summary(&prefill[i]));
            r.insert("decode_ms".into(), summary(&decode.times[i]));
            if i > 0 {
                // Per round against the first model's time in the same
                // round (the call right before, or the block before): a
                // drifting machine moves both.
                let ratio = median(prefill[i].iter().zip(&prefill[0]).map(|(a, b)| a / b).collect());
                r.insert("prefill_ratio".into(), ratio.into());
                r.insert("decode_ratio".into(), median(decode.ratios[i].clone()).into());
            }
            reports.push(r);
        }
        if reports.len() == 1 {
            report.extend(reports.pop().expect("one report"));
        } else {
            for (r, p) in reports.iter_mut().zip(&args.models) {
                r.insert("model".into(), p.display().to_string().into());
            }
            report.insert("models".into(), reports.into_iter().map(serde_json::Value::Object).collect());
        }
    }
    if args.json {
        return crate::out(&format!("{}\n", serde_json::Value::Object(report)));
    }
    let mut text = String::new();
    for (k, v) in &report {
        text.push_str(&format!("{k}: {v}\n"));
    }
    crate::out(&text)
}

/// The size of the constants file the running plan of an artifact reads
/// (its weights, as stored): what one decode step streams at least once.
fn weight_bytes(path: &std::path::Path, backend: &str) -> Option<u64> {
    let a = smelt_runtime::artifact::Artifact::open(path).ok()?;
    let m = a.manifest();
    let plan = match backend {
        "cuda" => m.cuda.as_ref()?,
        "cpu" => m.native.as_ref()?,
        _ => return None,
    };
    m.files.iter().find(|f| f.name == plan.weights).map(|f| f.size)
}
