//! Differential test of the native CPU target against the reference
//! interpreter, on random checkpoints no fixture has: every architecture,
//! head sizes 24, 40, 48, 50 and 80, hidden sizes that are not a multiple of
//! 4 (90, 150) and differ from heads x head_dim, GQA ratios 1, 2 and 3, odd
//! intermediate and vocabulary sizes, tied and untied embeddings, bf16
//! weights and a sliding window.
//!
//! Each model is compiled twice (`--target interp` and `--target cpu`) and
//! both artifacts are run with `smelt run` on the same inputs:
//! - a prefill of one token;
//! - a prefill of 257 tokens (the models are written with
//!   `--max-positions 512`, so the sequence fits their context);
//! - a decode step (seq 1) after a random past of 9 positions, and one
//!   after 300 (past the sliding window and the default context of 256);
//! - a batch of 2 continuing a random past of 4 positions with 3 tokens, the
//!   second row's mask hiding its first past position.
//!
//! The native artifact runs with `--threads 1` and `--threads 2`. Every
//! output (`logits` and `present.*`) must match the interpreter's within the
//! fixtures' tolerance, max |native - interp| <= 1e-3; the errors seen are
//! printed (`cargo test --test native -- --nocapture`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use smelt_ir::{DType, Tensor};

const TOL: f64 = 1e-3;

/// A small deterministic generator (64-bit LCG), so the inputs are the same
/// on every run without a dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() % (1 << 24)) as f64 / (1 << 23) as f64 - 1.0
    }
}

/// The sizes of one call: (batch, seq, past).
type Sizes = (usize, usize, usize);

/// Evaluates a signature dim (`16`, `past`, `past + seq`) for the given
/// symbol values.
fn dim(text: &str, syms: &BTreeMap<&str, usize>) -> usize {
    text.split('+')
        .map(|t| {
            let t = t.trim();
            t.parse().unwrap_or_else(|_| *syms.get(t).unwrap_or_else(|| panic!("unexpected dim `{text}`")))
        })
        .sum()
}

/// The model's inputs for one call: `input_ids` of [batch, seq], random
/// `past_key_values.*` of `past` positions (shapes from the manifest's
/// signature), and `mask` as the attention mask when given.
fn inputs(
    manifest: &serde_json::Value,
    vocab: i64,
    (batch, seq, past): Sizes,
    mask: Option<Vec<i64>>,
    rng: &mut Lcg,
) -> BTreeMap<String, Tensor> {
    let syms = BTreeMap::from([("batch", batch), ("seq", seq), ("past", past)]);
    let ids: Vec<i64> = (0..batch * seq).map(|_| (rng.next() % vocab as u64) as i64).collect();
    let mut out =
        BTreeMap::from([("input_ids".to_string(), Tensor::from_i64(DType::I64, vec![batch, seq], ids).unwrap())]);
    if let Some(mask) = mask {
        assert_eq!(mask.len(), batch * (past + seq));
        out.insert("attention_mask".into(), Tensor::from_i64(DType::I64, vec![batch, past + seq], mask).unwrap());
    }
    if past > 0 {
        for sig in manifest["signature"]["inputs"].as_array().unwrap() {
            let name = sig["name"].as_str().unwrap();
            if !name.starts_with("past_key_values.") {
                continue;
            }
            assert_eq!(sig["dtype"], "f32", "{name}");
            let shape: Vec<usize> =
                sig["shape"].as_array().unwrap().iter().map(|d| dim(d.as_str().unwrap(), &syms)).collect();
            let n = shape.iter().product();
            let v: Vec<f64> = (0..n).map(|_| 2.0 * rng.unit()).collect();
            out.insert(name.to_string(), Tensor::from_f64(DType::F32, shape, v).unwrap());
        }
        assert!(out.len() > 2, "no past_key_values.* inputs in the signature");
    }
    out
}

/// `smelt run ART` on `inputs`, with `extra` flags.
fn run(art: &Path, inputs: &Path, extra: &[&str]) -> BTreeMap<String, Tensor> {
    let out = inputs.with_file_name("out.safetensors");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"run", &art, &"--inputs", &inputs, &"--outputs", &out];
    for e in extra {
        args.push(e);
    }
    ok(&args);
    read_tensors(&out)
}

/// Compiles `flags`' model for both targets and compares them on every
/// input set; returns the worst error seen.
fn check_model(name: &str, flags: &str) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    let mut flags: Vec<&str> = flags.split_whitespace().collect();
    flags.extend(["--max-positions", "512"]);
    make_model(&dir, &flags);
    let interp = tmp.path().join(format!("{name}.interp.smelt"));
    let cpu = tmp.path().join(format!("{name}.cpu.smelt"));
    ok(&[&"compile", &dir, &"-o", &interp, &"--target", &"interp"]);
    ok(&[&"compile", &dir, &"-o", &cpu, &"--target", &"cpu"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cpu.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["target"], "cpu", "{name}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vocab = cfg["vocab_size"].as_i64().unwrap();

    let mut rng = Lcg(0x5eed ^ name.len() as u64);
    // Batch 2, past 4, seq 3: the second row's first past position is padding.
    let chunk_mask: Vec<i64> = (0..2 * 7).map(|i| i64::from(i != 7)).collect();
    let cases: [(&str, Sizes, Option<Vec<i64>>); 5] = [
        ("prefill seq 1", (1, 1, 0), None),
        ("prefill seq 257", (1, 257, 0), None),
        ("decode past 9", (1, 1, 9), None),
        ("decode past 300", (1, 1, 300), None),
        ("batch 2 past 4 seq 3 masked", (2, 3, 4), Some(chunk_mask)),
    ];
    let mut worst_model = 0.0f64;
    for (label, shape, mask) in cases {
        let inp = tmp.path().join("in.safetensors");
        write_tensors(&inp, &inputs(&manifest, vocab, shape, mask, &mut rng));
        let want = run(&interp, &inp, &[]);
        // Outputs that are all zero would agree trivially.
        let spread = want["logits"].to_f64_vec().iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(spread > 1e-3, "{name}, {label}: the interpreter's logits are all (near) zero");
        for threads in ["1", "2"] {
            let got = run(&cpu, &inp, &["--threads", threads]);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{name}, {label}: output names"
            );
            assert!(want.contains_key("logits") && want.keys().any(|k| k.starts_with("present.")), "{name}");
            let (mut worst, mut at) = (0.0f64, "");
            for (k, w) in &want {
                let e = max_abs_err(k, &got[k], w);
                if e >= worst {
                    (worst, at) = (e, k.as_str());
                }
            }
            println!("{name}, {label}, {threads} thread(s): max abs err {worst:.2e} (at {at})");
            assert!(worst <= TOL, "{name}, {label}, {threads} thread(s): `{at}` differs by {worst} > {TOL}");
            worst_model = worst_model.max(worst);
        }
    }
    worst_model
}

#[test]
fn llama_head_dim_24_hidden_90_gqa_2_tied() {
    check_model(
        "llama",
        "--arch llama --seed 11 --layers 2 --hidden 90 --intermediate 70 \
         --heads 4 --kv-heads 2 --head-dim 24 --vocab 260 --tie-embeddings true",
    );
}

#[test]
fn mistral_head_dim_40_hidden_150_gqa_3_window_4() {
    check_model(
        "mistral",
        "--arch mistral --seed 12 --layers 1 --hidden 150 --intermediate 130 \
         --heads 3 --kv-heads 1 --head-dim 40 --vocab 300",
    );
}

#[test]
fn qwen2_head_dim_48_hidden_90_gqa_1() {
    check_model(
        "qwen2",
        "--arch qwen2 --seed 13 --layers 1 --hidden 90 --intermediate 200 \
         --heads 2 --kv-heads 2 --head-dim 48 --vocab 256",
    );
}

#[test]
fn qwen3_head_dim_80_hidden_150_gqa_2_bf16() {
    check_model(
        "qwen3",
        "--arch qwen3 --seed 14 --layers 1 --hidden 150 --intermediate 100 \
         --heads 2 --kv-heads 1 --head-dim 80 --vocab 270 --dtype bf16",
    );
}

#[test]
fn gemma_head_dim_24_hidden_90_gqa_3() {
    check_model(
        "gemma",
        "--arch gemma --seed 15 --layers 1 --hidden 90 --intermediate 66 \
         --heads 6 --kv-heads 2 --head-dim 24 --vocab 256",
    );
}

#[test]
fn phi3_head_dim_50_hidden_150_gqa_3_untied() {
    check_model(
        "phi3",
        "--arch phi3 --seed 16 --layers 1 --hidden 150 --intermediate 94 \
         --heads 3 --kv-heads 1 --vocab 256 --tie-embeddings false",
    );
}
