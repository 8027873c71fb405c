//! `smelt bench MODEL --prompt P --ctx C [--threads N] [--reps R] [--json]`:
//! times one prefill over P tokens (empty cache) and one decode step (one
//! token after C cached positions; for a model without past inputs, which
//! has no cache, the forward over all C + 1 tokens that generation runs for
//! each new token, flagged `decode_recomputes`), each as the median of R timed calls
//! after warm-up calls (the prefill's for 0.2 s, which also warms the
//! thread team up for the decode), and `--machine` measures the machine's streaming
//! read bandwidth and f32 FMA peak with small probes, so results can be put
//! against the hardware's limits in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use smelt_runtime::generate::{cached_step_inputs, step_inputs, takes_past};

use crate::source::{open_runnable, threads, DeviceArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .smelt artifact (or a checkpoint folder / .onnx file, run by the interpreter).
    pub model: Option<PathBuf>,
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
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also measure read bandwidth and FMA peak of this machine.
    #[arg(long)]
    pub machine: bool,
}

/// How long the first measurement keeps calling before it times anything.
/// Right after the thread team starts, a worker can share the caller's core
/// until the scheduler moves it, and every barrier then waits for a context
/// switch: after a single warm-up call, a 4-token prefill of a tiny model
/// measured 90 us instead of 10 in about half the processes.
const WARM_UP: Duration = Duration::from_millis(200);

/// Median, min and max of `reps` timed runs of `f`, in milliseconds, after
/// untimed warm-up runs: one, and more until `warm_up` has passed (only for
/// an `f` that leaves no state behind: a decode step grows the cache).
fn time_ms(reps: usize, warm_up: Duration, mut f: impl FnMut() -> Result<()>) -> Result<[f64; 3]> {
    let warm = Instant::now();
    f()?;
    while warm.elapsed() < warm_up {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok([t[t.len() / 2], t[0], t[t.len() - 1]])
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
    if let Some(path) = &args.model {
        if args.prompt == 0 {
            bail!("--prompt must be at least 1 token");
        }
        let mut r = open_runnable(path, threads, args.device)?;
        report.insert("backend".into(), r.backend.into());
        if let Some(bytes) = weight_bytes(path, r.backend) {
            report.insert("weight_bytes".into(), bytes.into());
        }
        let sig = r.model.signature().clone();
        let prompt: Vec<i64> = (0..args.prompt as i64).map(|i| (i * 7919 + 1) % 100).collect();
        let (p, d) = match r.model.cache() {
            // A model that keeps its KV cache (the CPU and GPU runtimes do)
            // is timed the way generation runs it: only token inputs go in,
            // one row of logits comes out. Each timed decode step appends to
            // a cache filled with `ctx` positions first.
            Some(cache) => {
                // Only token inputs are built in the timed calls: building
                // (and dropping) past tensors there would time the benchmark.
                let tokens = |feed: &[i64], past: usize| cached_step_inputs(&sig, feed, past);
                let prefill = tokens(&prompt, 0)?;
                let p = time_ms(args.reps, WARM_UP, || {
                    cache.reset();
                    Ok(cache.step(prefill.clone()).map(|_| ())?)
                })?;
                cache.reset();
                if args.ctx > 0 {
                    let ctx: Vec<i64> = (0..args.ctx as i64).map(|i| (i * 7919 + 1) % 100).collect();
                    cache.step(tokens(&ctx, 0)?)?;
                }
                let mut at = args.ctx;
                let d = time_ms(args.reps, Duration::ZERO, || {
                    let step = tokens(&[1], at)?;
                    at += 1;
                    Ok(cache.step(step).map(|_| ())?)
                })?;
                (p, d)
            }
            None => {
                let prefill = step_inputs(&sig, &prompt, 0)?;
                // Without past inputs there is no cache to decode against:
                // generation runs the whole sequence again for each new
                // token, so a decode step after `ctx` positions is a forward
                // over `ctx + 1` tokens (a step of one token with a longer
                // mask would time a call generation never makes).
                let decode = if takes_past(&sig)? {
                    step_inputs(&sig, &[1], args.ctx)?
                } else {
                    report.insert("decode_recomputes".into(), true.into());
                    let seq: Vec<i64> = (0..args.ctx as i64 + 1).map(|i| (i * 7919 + 1) % 100).collect();
                    step_inputs(&sig, &seq, 0)?
                };
                (
                    time_ms(args.reps, WARM_UP, || Ok(r.model.forward(prefill.clone()).map(|_| ())?))?,
                    time_ms(args.reps, Duration::ZERO, || Ok(r.model.forward(decode.clone()).map(|_| ())?))?,
                )
            }
        };
        report.insert("prompt".into(), args.prompt.into());
        report.insert("ctx".into(), args.ctx.into());
        report.insert("prefill_ms".into(), serde_json::json!(p));
        report.insert("decode_ms".into(), serde_json::json!(d));
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
