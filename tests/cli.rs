//! The `smelt` commands on models no test fixture has: random-weight
//! checkpoints of every architecture written by `smelt make-test-model` with
//! other sizes, head counts, head sizes, dtypes, rope scalings and layer
//! counts. For each:
//! - compile, `inspect --json` and `run` on the artifact agree with the
//!   checkpoint folder compiled in memory;
//! - the KV cache is consistent: running a sequence in two `smelt run` calls
//!   (the second fed the first's `present.*` as `past_key_values.*`, with the
//!   mask and positions left to the runtime's defaults) gives the logits and
//!   key/values of one full-sequence call;
//! - `smelt generate` picks, at every step, a top token of the full-sequence
//!   logits (so the cached decode loop feeds the right past, mask and
//!   positions).
//!
//! Also: the committed `models/tiny-random-llama` is exactly what
//! `make-test-model` writes, and the text paths of `generate` and `inspect`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use smelt_ir::{DType, Tensor};

/// Columns `from..to` of a `[batch, seq, ...]` tensor along axis 1.
fn seq_slice(t: &Tensor, from: usize, to: usize) -> Tensor {
    let (b, s) = (t.shape[0], t.shape[1]);
    let inner: usize = t.shape[2..].iter().product();
    let v = t.to_f64_vec();
    let mut out = Vec::new();
    for i in 0..b {
        out.extend_from_slice(&v[(i * s + from) * inner..(i * s + to) * inner]);
    }
    let mut shape = t.shape.clone();
    shape[1] = to - from;
    Tensor::from_f64(t.dtype, shape, out).unwrap()
}

fn run(art: &Path, inputs: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let (i, o) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    write_tensors(&i, &inputs);
    ok(&[&"run", &art, &"--inputs", &i, &"--outputs", &o]);
    read_tensors(&o)
}

fn check_model(name: &str, flags: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    make_model(&dir, flags);
    let art = tmp.path().join(format!("{name}.smelt"));
    ok(&[&"compile", &dir, &"-o", &art]);

    let info: serde_json::Value = serde_json::from_str(&ok(&[&"inspect", &art, &"--json"])).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = read_tensors(&dir.join("model.safetensors"));
    let params: usize = weights.values().map(Tensor::numel).sum();
    assert_eq!(info["parameters"], params as u64, "{name}: {info}");
    assert_eq!(info["layers"], cfg["num_hidden_layers"], "{name}");
    assert_eq!(info["architecture"], cfg["architectures"][0], "{name}");
    assert_eq!(info["kind"], "artifact");
    assert!(info["ops"]["matmul"].as_u64().unwrap() > 0, "{name}: {info}");
    let vocab = cfg["vocab_size"].as_u64().unwrap() as i64;

    // Batch 2, 7 tokens; long enough to pass the sliding windows used below.
    let (b, s, split) = (2usize, 7usize, 4usize);
    let ids: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 37 + 11) % vocab).collect();
    let ids = Tensor::from_i64(DType::I64, vec![b, s], ids).unwrap();
    let full = run(&art, BTreeMap::from([("input_ids".to_string(), ids.clone())]));
    let from_folder = run(&dir, BTreeMap::from([("input_ids".to_string(), ids.clone())]));
    // The artifact is fused, the folder is run as the frontend built it: the
    // two agree within the fixtures' tolerance, not bit for bit.
    assert_eq!(full.keys().collect::<Vec<_>>(), from_folder.keys().collect::<Vec<_>>(), "{name}");
    for (k, t) in &full {
        let u = &from_folder[k];
        assert_eq!(t.shape, u.shape, "{name}: {k}");
        let err = t.to_f64_vec().iter().zip(u.to_f64_vec()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err <= 1e-3, "{name}: artifact and checkpoint folder disagree on {k} by {err}");
    }

    let first = run(&art, BTreeMap::from([("input_ids".to_string(), seq_slice(&ids, 0, split))]));
    let mut inputs = BTreeMap::from([("input_ids".to_string(), seq_slice(&ids, split, s))]);
    for (k, t) in &first {
        if let Some(rest) = k.strip_prefix("present.") {
            inputs.insert(format!("past_key_values.{rest}"), t.clone());
        }
    }
    let second = run(&art, inputs);
    let tol = 1e-3;
    let e1 = max_abs_err("logits", &first["logits"], &seq_slice(&full["logits"], 0, split));
    let e2 = max_abs_err("logits", &second["logits"], &seq_slice(&full["logits"], split, s));
    assert!(e1 <= tol && e2 <= tol, "{name}: split logits differ by {e1}, {e2}");
    let mut presents = 0;
    for (k, t) in &full {
        if k.starts_with("present.") {
            assert_eq!(t.shape[2], s, "{name}: {k}");
            let e = max_abs_err(k, &second[k], t);
            assert!(e <= tol, "{name}: {k} differs by {e}");
            presents += 1;
        }
    }
    assert_eq!(presents, 2 * cfg["num_hidden_layers"].as_u64().unwrap() as usize);

    // Every generated token is a top token of the full-sequence logits at
    // its position.
    let json =
        ok(&[&"generate", &art, &"--prompt-ids", &"5,9,2", &"--max-new-tokens", &"6", &"--ignore-eos", &"--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let gen: Vec<i64> = v["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(gen.len(), 3 + 6, "{name}: {v}");
    assert_eq!(&gen[..3], &[5, 9, 2]);
    let n = gen.len() - 1;
    let seq = Tensor::from_i64(DType::I64, vec![1, n], gen[..n].to_vec()).unwrap();
    let logits = run(&art, BTreeMap::from([("input_ids".to_string(), seq)]))["logits"].to_f32_vec();
    let vocab = vocab as usize;
    for pos in 2..n {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let best = row.iter().cloned().fold(f32::MIN, f32::max);
        let chosen = row[gen[pos + 1] as usize];
        assert!(
            chosen >= best - 1e-4,
            "{name}: step at position {pos} chose {} with logit {chosen}, best is {best}",
            gen[pos + 1]
        );
    }
}

macro_rules! model_tests {
    ($($test:ident: $flags:expr;)*) => {
        $( #[test] fn $test() { check_model(stringify!($test), $flags); } )*
    };
}

model_tests! {
    llama_bf16_three_layers_mqa: &["--arch", "llama", "--dtype", "bf16", "--layers", "3", "--kv-heads", "1", "--seed", "7"];
    llama_llama3_rope: &["--arch", "llama", "--hidden", "96", "--heads", "3", "--kv-heads", "3", "--rope-scaling",
        r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16}"#];
    llama_linear_rope_f16: &["--arch", "llama", "--dtype", "f16", "--rope-scaling", r#"{"rope_type":"linear","factor":2.0}"#];
    llama_yarn_rope: &["--arch", "llama", "--rope-scaling", r#"{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":64}"#];
    mistral_window_3: &["--arch", "mistral", "--sliding-window", "3", "--layers", "1", "--seed", "3"];
    qwen2_f16_untied: &["--arch", "qwen2", "--dtype", "f16", "--tie-embeddings", "false"];
    qwen3_head_dim_20: &["--arch", "qwen3", "--hidden", "96", "--heads", "6", "--kv-heads", "2", "--head-dim", "20", "--vocab", "300"];
    gemma_bf16: &["--arch", "gemma", "--dtype", "bf16", "--intermediate", "100"];
    phi3_two_kv_heads: &["--arch", "phi3", "--kv-heads", "2", "--layers", "3", "--seed", "11"];
}

#[test]
fn committed_tiny_model_is_what_make_test_model_writes() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed = repo.join("models/tiny-random-llama");
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("m");
    let flags = ["--arch", "llama", "--seed", "0"];
    make_model(&fresh, &flags);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let (a, b) = (std::fs::read(committed.join(f)).unwrap(), std::fs::read(fresh.join(f)).unwrap());
        assert!(
            a == b,
            "models/tiny-random-llama/{f} differs from what `smelt make-test-model models/tiny-random-llama {}` \
             writes now; regenerate it with that command (and --force)",
            flags.join(" ")
        );
    }
}

#[test]
fn text_generation_inspect_and_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir, &["--arch", "llama", "--layers", "1"]);
    // Straight from the folder: compiled in memory.
    let text = ok(&[&"generate", &dir, &"--prompt", &"Hello, smelt!", &"--max-new-tokens", &"5"]);
    assert!(text.starts_with("Hello, smelt!"), "{text:?}");
    assert!(text.ends_with('\n'));
    let json = ok(&[&"generate", &dir, &"--prompt", &"Hello, smelt!", &"--max-new-tokens", &"5", &"--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["prompt_tokens"], 13, "{v}");
    assert!(v["new_tokens"].as_u64().unwrap() <= 5);
    assert!(v["text"].as_str().unwrap().starts_with("Hello, smelt!"));

    let summary = ok(&[&"inspect", &dir]);
    for want in ["LlamaForCausalLM (llama)", "layers        1", "input_ids", "present.0.value", "matmul"] {
        assert!(summary.contains(want), "`{want}` not in:\n{summary}");
    }
    let ir = ok(&[&"inspect", &dir, &"--ir"]);
    let g = smelt_ir::text::parse(&ir).unwrap_or_else(|e| panic!("inspect --ir does not parse back: {e}"));
    smelt_ir::verify::verify(&g).unwrap();

    // A second compile over an artifact replaces it; a non-artifact folder is kept.
    let art = tmp.path().join("m.smelt");
    ok(&[&"compile", &dir, &"-o", &art]);
    ok(&[&"compile", &dir, &"-o", &art]);
    fails(&[&"compile", &dir, &"-o", &dir], &["refusing to overwrite"]);
    assert!(dir.join("config.json").is_file());

    fails(&[&"generate", &art, &"--max-new-tokens", &"3"], &["--prompt"]);
    fails(&[&"compile", &dir, &"-o", &art, &"--target", &"tpu"], &["tpu"]);
    fails(&[&"frobnicate"], &["frobnicate"]);
    fails(&[&"make-test-model", &dir, &"--arch", &"llama"], &["not empty"]);
}

/// `smelt bench` reports what it timed: a decode step after `--ctx` cached
/// positions for an artifact that keeps its cache; several artifacts in
/// turn, with ratios to the first; for an ONNX export
/// without past inputs (no cache to decode against) the forward over all
/// `ctx + 1` tokens that generation runs for each new token, flagged
/// `decode_recomputes`, so it grows with `--ctx` (a one-token call with a
/// longer mask was timed before, and stayed flat).
#[test]
fn bench_reports_what_it_timed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir, &["--arch", "llama", "--layers", "1"]);
    let art = tmp.path().join("m.smelt");
    ok(&[&"compile", &dir, &"-o", &art, &"--target", &"cpu"]);
    let bench = |model: &Path, ctx: usize| -> serde_json::Value {
        let ctx = ctx.to_string();
        let out =
            ok(&[&"bench", &model, &"--prompt", &"3", &"--ctx", &ctx, &"--reps", &"3", &"--threads", &"1", &"--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bench --json printed {out:?}: {e}"))
    };
    let v = bench(&art, 5);
    assert_eq!(
        (v["backend"].as_str(), v["prompt"].as_u64(), v["ctx"].as_u64()),
        (Some("cpu"), Some(3), Some(5)),
        "{v}"
    );
    for key in ["prefill_ms", "decode_ms"] {
        let t: Vec<f64> = v[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        // Median, fastest, slowest.
        assert!(t.len() == 3 && t[1] > 0.0 && t[1] <= t[0] && t[0] <= t[2], "{key}: {t:?}");
    }
    assert!(v.get("decode_recomputes").is_none(), "{v}");
    fails(&[&"bench", &art, &"--prompt", &"0"], &["--prompt must be at least 1 token"]);

    // Two artifacts: timed in turn, each reported, the second also as
    // ratios to the first.
    let bf16 = tmp.path().join("m-bf16.smelt");
    ok(&[&"compile", &dir, &"-o", &bf16, &"--target", &"cpu", &"--weight-dtype", &"bf16"]);
    let out = ok(&[&"bench", &art, &bf16, &"--prompt", &"3", &"--ctx", &"5", &"--reps", &"3", &"--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let models = v["models"].as_array().unwrap_or_else(|| panic!("no `models`: {v}"));
    assert_eq!(models.len(), 2, "{v}");
    assert!(models[1]["model"].as_str().unwrap().ends_with("m-bf16.smelt"), "{v}");
    assert!(models[1]["weight_bytes"].as_u64() < models[0]["weight_bytes"].as_u64(), "{v}");
    for key in ["prefill_ratio", "decode_ratio"] {
        assert!(models[0].get(key).is_none(), "{v}");
        let r = models[1][key].as_f64().unwrap_or_else(|| panic!("no {key}: {v}"));
        assert!(r.is_finite() && r > 0.0, "{key} {r}");
    }

    let Some(fixtures) = fixtures_dir() else {
        println!("skipped the cacheless half: ../shared/fixtures is not here");
        return;
    };
    let onnx = fixtures.join("tiny-llama/model.onnx");
    let cacheless = tmp.path().join("cacheless.smelt");
    ok(&[&"compile", &onnx, &"-o", &cacheless, &"--target", &"cpu"]);
    let (short, long) = (bench(&cacheless, 4), bench(&cacheless, 200));
    assert_eq!(short["decode_recomputes"], true, "{short}");
    // 201 tokens through every layer against 5: many times the work.
    let (s, l) = (short["decode_ms"][1].as_f64().unwrap(), long["decode_ms"][1].as_f64().unwrap());
    assert!(l > 4.0 * s, "decode after 200 positions {l} ms, after 4 {s} ms");
}
