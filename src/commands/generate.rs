//! `smelt generate ARTIFACT|MODEL (--prompt TEXT | --prompt-ids 1,2,3)
//! --max-new-tokens N [--temperature T --top-k K --top-p P --seed S]
//! [--stop ID,..] [--threads N] [--json]`: decoding with the KV cache,
//! greedy unless a temperature is given; tokens/s go to stderr.
//!
//! `--prompt` needs the model's `tokenizer.json` (copied into artifacts at
//! compile time); the text is encoded with the tokenizer's special tokens,
//! as transformers does. Plain output streams the decoded text (prompt and
//! continuation) as tokens are chosen, or the ids when there is no
//! tokenizer; `--json` prints `{"ids": [...], "text": ...}` where `ids`
//! includes the prompt (like the fixtures' `greedy_ids`) and `text` is the
//! decoded ids, or null without a tokenizer.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use smelt_runtime::generate::{generate, GenerateOptions, Generation, Sampling};
use tokenizers::Tokenizer;

use crate::source::{open_runnable, threads, tokenizer, DeviceArg};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct Args {
    /// A .smelt artifact, or a checkpoint folder or .onnx file (compiled in memory).
    pub model: PathBuf,
    /// The prompt text (encoded with the model's tokenizer.json).
    #[arg(long)]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// How many tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// More token ids that end generation, e.g. 2,7 (besides the model's end-of-sequence ids).
    #[arg(long, value_name = "IDS")]
    pub stop: Option<String>,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probability reaches P (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler, for reproducible runs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads of the CPU runtime (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where a `cpu,cuda` artifact runs (default: the GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Print {"ids": [...], "text": ...} instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1,2,3` (spaces allowed).
fn parse_ids(s: &str) -> Result<Vec<i64>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<i64>().with_context(|| format!("--prompt-ids: `{t}` is not a token id (expected e.g. 1,2,3)"))
        })
        .collect()
}

fn decode(tok: &Tokenizer, ids: &[i64]) -> Result<String> {
    let ids: Vec<u32> = ids.iter().map(|&i| u32::try_from(i).unwrap_or(u32::MAX)).collect();
    tok.decode(&ids, true).map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
}

/// Shows control characters (other than newline and tab) as escapes, so
/// text from a random-weight model cannot send terminal control sequences.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\n' && c != '\t' { c.escape_unicode().to_string() } else { c.to_string() })
        .collect()
}

/// `N tokens in X s (prefill ..., decode ... tokens/s)` on stderr.
fn report_speed(g: &Generation) {
    let new = g.ids.len() - g.prompt_len;
    let decode_rate = if new > 1 && g.decode_secs > 0.0 { (new - 1) as f64 / g.decode_secs } else { 0.0 };
    eprintln!(
        "{new} new tokens in {:.2} s: prefill {} tokens in {:.1} ms, decode {decode_rate:.1} tokens/s",
        g.prefill_secs + g.decode_secs,
        g.prompt_len,
        g.prefill_secs * 1e3
    );
}

pub fn main(args: Args) -> Result<()> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], found {}", args.top_p);
    }
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!("--temperature must be a finite number >= 0, found {}", args.temperature);
    }
    let loaded = open_runnable(&args.model, threads(args.threads), args.device)?;
    let tok = match &loaded.tokenizer {
        Some(p) => Some(tokenizer(p)?),
        None => None,
    };
    let prompt: Vec<i64> = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => {
            let Some(tok) = &tok else {
                bail!(
                    "{}: has no tokenizer.json, so --prompt cannot be encoded (use --prompt-ids)",
                    args.model.display()
                );
            };
            let enc = tok.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("cannot encode the prompt: {e}"))?;
            enc.get_ids().iter().map(|&i| i as i64).collect()
        }
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty (it encodes to no tokens)");
    }
    let mut eos = if args.ignore_eos { Vec::new() } else { loaded.eos_token_ids.clone() };
    if let Some(stop) = &args.stop {
        eos.extend(parse_ids(stop).context("--stop")?);
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: eos,
        sampling: Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
    };
    let mut model = loaded.model;

    if args.json {
        let g = generate(model.as_mut(), &prompt, &opts, &mut |_| {})?;
        let text = match &tok {
            Some(t) => Some(decode(t, &g.ids)?),
            None => None,
        };
        let json = serde_json::json!({
            "ids": g.ids,
            "text": text,
            "prompt_tokens": g.prompt_len,
            "new_tokens": g.ids.len() - g.prompt_len,
            "stop": g.stop.as_str(),
            "prefill_ms": g.prefill_secs * 1e3,
            "decode_tokens_per_s": if g.ids.len() > g.prompt_len + 1 && g.decode_secs > 0.0 {
                (g.ids.len() - g.prompt_len - 1) as f64 / g.decode_secs
            } else {
                0.0
            },
        });
        return crate::out(&format!("{json}\n"));
    }

    match &tok {
        Some(t) => {
            // Stream: after each token, print whatever the decoded text has
            // gained. A byte-level tokenizer may end mid-character (U+FFFD);
            // that tail is held back until the character is complete.
            let mut ids = prompt.clone();
            let mut printed = String::new();
            let mut failure: Option<anyhow::Error> = None;
            let emit = |ids: &[i64], printed: &mut String, last: bool| -> Result<()> {
                let text = decode(t, ids)?;
                if !last && text.ends_with('\u{FFFD}') {
                    return Ok(());
                }
                match text.strip_prefix(printed.as_str()) {
                    Some(new) => crate::out(&printable(new))?,
                    None => crate::out(&format!("\n{}", printable(&text)))?,
                }
                *printed = text;
                Ok(())
            };
            emit(&ids, &mut printed, false)?;
            let g = generate(model.as_mut(), &prompt, &opts, &mut |next| {
                ids.push(next);
                if failure.is_none() {
                    failure = emit(&ids, &mut printed, false).err();
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            emit(&ids, &mut printed, true)?;
            crate::out("\n")?;
            report_speed(&g);
            Ok(())
        }
        None => {
            let g = generate(model.as_mut(), &prompt, &opts, &mut |_| {})?;
            let ids: Vec<String> = g.ids.iter().map(|i| i.to_string()).collect();
            crate::out(&format!("{}\n", ids.join(",")))?;
            report_speed(&g);
            Ok(())
        }
    }
}
