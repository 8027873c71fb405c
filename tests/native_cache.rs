//! The CPU runtime's own KV cache ([`CachedDecode`] on [`NativeModel`])
//! against stateless forward calls that pass the cache in and out, on
//! random checkpoints compiled with `smelt compile --target cpu`.
//!
//! The reference for every step is [`NativeModel::run`] on the same tokens
//! with the previous reference call's `present.*` as `past_key_values.*`
//! (the path generation took before the model kept its cache). Both run the
//! same kernels on the same values, so the logits must be equal; the test
//! allows 1e-6 and prints whether they were bitwise equal. Covered: a
//! prefill, single-token steps and a multi-token chunk, `reset`, steps that
//! fail (and leave the cache as it was), a forward call between steps, a
//! batch of 2 with a padded row, and greedy generation through the cache;
//! and a decode step over 600 cached positions (split decode attention)
//! against a prefill of all its tokens.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use smelt_ir::{DType, Tensor};
use smelt_runtime::artifact::{Artifact, Signature};
use smelt_runtime::native::NativeModel;
use smelt_runtime::{generate, CachedDecode, Forward, ForwardError, GenerateOptions};

const TOL: f32 = 1e-6;

/// A random checkpoint compiled for the CPU: (its temp dir, the artifact).
fn compiled(name: &str, flags: &str, compile_flags: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    make_model(&dir, &flags.split_whitespace().collect::<Vec<_>>());
    let art = tmp.path().join(format!("{name}.smelt"));
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"compile", &dir, &"-o", &art, &"--target", &"cpu"];
    for f in compile_flags {
        args.push(f);
    }
    ok(&args);
    (tmp, art)
}

fn open(art: &Path, threads: usize) -> NativeModel {
    let a = Artifact::open(art).unwrap_or_else(|e| panic!("{e}"));
    let m = a.manifest();
    let plan = m.native.clone().expect("a cpu plan");
    NativeModel::open(plan, m.signature.clone(), art, threads).unwrap_or_else(|e| panic!("{e}"))
}

fn ids(batch: usize, v: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I64, vec![batch, v.len() / batch], v.to_vec()).unwrap()
}

/// Token inputs: `input_ids`, and the mask when given.
fn tokens(batch: usize, v: &[i64], mask: Option<Vec<i64>>) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::from([("input_ids".to_string(), ids(batch, v))]);
    if let Some(mask) = mask {
        let n = mask.len() / batch;
        m.insert("attention_mask".into(), Tensor::from_i64(DType::I64, vec![batch, n], mask).unwrap());
    }
    m
}

/// The reference: forward calls with the cache passed in and out.
#[derive(Default)]
struct Reference {
    past: BTreeMap<String, Tensor>,
}

impl Reference {
    /// Runs `inputs` after the held past; returns each sequence's last
    /// logits row, `[batch, vocab]`, and keeps the presents.
    fn step(&mut self, m: &mut NativeModel, mut inputs: BTreeMap<String, Tensor>) -> Tensor {
        for (name, t) in &self.past {
            inputs.insert(name.clone(), t.clone());
        }
        let out = m.run(inputs).unwrap_or_else(|e| panic!("{e}"));
        self.past = out
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("present.").map(|rest| (format!("past_key_values.{rest}"), t.clone())))
            .collect();
        let logits = &out["logits"];
        let (batch, seq, vocab) = (logits.shape[0], logits.shape[1], logits.shape[2]);
        let all = logits.to_f32_vec();
        let rows: Vec<f32> =
            (0..batch).flat_map(|b| all[(b * seq + seq - 1) * vocab..(b * seq + seq) * vocab].to_vec()).collect();
        Tensor::from_f32(DType::F32, vec![batch, vocab], rows).unwrap()
    }
}

/// Asserts the cached step's logits equal the reference's; true when bitwise.
fn same(what: &str, got: &Tensor, want: &Tensor) -> bool {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert_eq!(got.dtype, want.dtype, "{what}: dtype");
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let worst =
        g.iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) });
    assert!(worst <= TOL, "{what}: the cached step's logits differ by {worst} > {TOL}");
    assert!(w.iter().any(|x| x.abs() > 1e-3), "{what}: the logits are all (near) zero");
    g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// Steps through a prefill, single tokens and a chunk, with a failed step,
/// a forward call and a reset in between, against the reference.
fn check_steps(name: &str, flags: &str, compile_flags: &[&str], in_place: bool) {
    let (_tmp, art) = compiled(name, flags, compile_flags);
    let mut m = open(&art, 2);
    assert!(m.cache().is_some(), "{name}: the plan keeps no cache");
    assert_eq!(m.cache_in_place(), in_place, "{name}: whether the cache is kept in place");
    // Appends into a cache kept in place say how little they move (so a
    // decode step runs them on one thread), and so does the first launch of
    // split decode attention, which moves nothing below 512 visible keys
    // and the cache's keys and values from there on; no other launch does.
    let plan = m.plan();
    for l in &plan.launches {
        let symbol = &plan.kernels[l.kernel].symbol;
        let append = symbol.contains("kv_append_cache");
        let split = symbol.contains("_cache") && symbol.contains("_split");
        assert_eq!(l.work.is_some(), append || split, "{name}: launch `{}` work {:?}", l.node, l.work);
        if let (true, Some(work)) = (split, &l.work) {
            let work: smelt_ir::Dim = work.parse().unwrap_or_else(|e| panic!("{name}: work `{work}`: {e}"));
            let at = |past: i64| {
                let env =
                    BTreeMap::from([("batch".to_string(), 1), ("past".to_string(), past), ("seq".to_string(), 1)]);
                work.eval_map(&env).unwrap_or_else(|e| panic!("{name}: work `{work}` at past {past}: {e}"))
            };
            assert_eq!(at(127), 0, "{name}: the split launch's work at 128 keys");
            assert_eq!(at(510), 0, "{name}: the split launch's work at 511 keys");
            assert!(at(511) >= 32 << 10, "{name}: the split launch's work at 512 keys is {}", at(511));
        }
    }
    assert_eq!(plan.launches.iter().any(|l| l.work.is_some()), in_place, "{name}: appends with a work dim");
    let mut reference = Reference::default();
    let mut bitwise = true;
    let mut check = |m: &mut NativeModel, r: &mut Reference, label: &str, inputs: BTreeMap<String, Tensor>| {
        let got = CachedDecode::step(m, inputs.clone()).unwrap_or_else(|e| panic!("{name}, {label}: {e}"));
        let want = r.step(m, inputs);
        bitwise &= same(&format!("{name}, {label}"), &got, &want);
    };
    check(&mut m, &mut reference, "prefill 5", tokens(1, &[3, 1, 4, 1, 5], None));
    assert_eq!(m.cached_len(), 5);
    for (k, t) in [9, 2, 6, 5, 3].into_iter().enumerate() {
        check(&mut m, &mut reference, &format!("decode {k}"), tokens(1, &[t], None));
    }
    assert_eq!(m.cached_len(), 10);
    check(&mut m, &mut reference, "chunk of 3", tokens(1, &[5, 8, 9], None));
    assert_eq!(m.cached_len(), 13);

    // Failed steps leave the cache as it was.
    let fails = |m: &mut NativeModel, inputs: BTreeMap<String, Tensor>, want: &str| {
        let e = CachedDecode::step(m, inputs).unwrap_err().to_string();
        println!("{name}: refused: {e}");
        assert!(e.contains(want), "{name}: `{e}` does not say `{want}`");
        assert_eq!(m.cached_len(), 13, "{name}: a failed step changed the cache");
    };
    let mut with_past = tokens(1, &[7], None);
    with_past.insert("past_key_values.0.key".into(), Tensor::full(DType::F32, vec![1, 1, 0, 1], 0.0));
    fails(&mut m, with_past, "takes no past key/values");
    let f32_ids = BTreeMap::from([("input_ids".to_string(), Tensor::full(DType::F32, vec![1, 1], 7.0))]);
    fails(&mut m, f32_ids, "expected dtype i64, found f32");
    fails(&mut m, tokens(1, &[7], Some(vec![1; 13])), "`attention_mask` axis 1: expected past + seq = 14, found 13");
    fails(&mut m, tokens(2, &[7, 7], None), "batch 2, but the cache holds 1 sequence(s)");
    // A forward call in between neither reads nor changes the cache.
    let alone = m.run(tokens(1, &[2, 7], None)).unwrap();
    assert_eq!(alone["logits"].shape[1], 2);
    assert_eq!(m.cached_len(), 13);
    check(&mut m, &mut reference, "after the failures", tokens(1, &[7], None));
    check(&mut m, &mut reference, "and one more", tokens(1, &[1], None));
    assert_eq!(m.cached_len(), 15);
    let stats = m.stats();
    assert!(stats.cache_bytes > 0, "{stats:?}");

    // A reset starts a new sequence.
    m.reset();
    assert_eq!(m.cached_len(), 0);
    let mut fresh = Reference::default();
    check(&mut m, &mut fresh, "prefill after reset", tokens(1, &[2, 7, 1], None));
    check(&mut m, &mut fresh, "decode after reset", tokens(1, &[8], None));
    assert_eq!(m.cached_len(), 4);
    println!("{name}: cached steps equal forward calls ({})", if bitwise { "bitwise" } else { "within 1e-6" });
}

#[test]
fn cached_steps_equal_forward_calls_llama_gqa() {
    check_steps(
        "llama",
        "--arch llama --seed 21 --layers 2 --hidden 90 --intermediate 70 \
         --heads 4 --kv-heads 2 --head-dim 24 --vocab 260",
        &[],
        true,
    );
}

/// Without fusion the caches are plain concats read by primitive ops, so
/// the runtime keeps them by swapping buffers instead.
#[test]
fn cached_steps_equal_forward_calls_unfused() {
    check_steps(
        "llama_unfused",
        "--arch llama --seed 25 --layers 2 --hidden 64 --intermediate 70          --heads 4 --kv-heads 2 --head-dim 16 --vocab 260",
        &["--no-fuse"],
        false,
    );
}

/// With room reserved up front, an in-place cache is allocated once and
/// never moved, however many steps follow.
#[test]
fn a_reserved_cache_is_allocated_once() {
    let (_tmp, art) = compiled(
        "llama_reserved",
        "--arch llama --seed 26 --layers 2 --hidden 64 --intermediate 70          --heads 4 --kv-heads 2 --head-dim 16 --vocab 260",
        &[],
    );
    let mut m = open(&art, 2);
    assert!(m.cache_in_place());
    m.reserve(40);
    let mut reference = Reference::default();
    let mut bytes = None;
    for k in 0..30 {
        let v = if k == 0 { vec![1, 2, 3, 4, 5, 6] } else { vec![(k * 7 % 250) as i64] };
        let inputs = tokens(1, &v, None);
        let got = CachedDecode::step(&mut m, inputs.clone()).unwrap_or_else(|e| panic!("step {k}: {e}"));
        same(&format!("reserved, step {k}"), &got, &reference.step(&mut m, inputs));
        let now = m.stats().cache_bytes;
        assert_eq!(*bytes.get_or_insert(now), now, "step {k}: the cache was reallocated");
    }
    // 2 layers x (keys, values) x 2 kv heads x 40 positions x 16 x 4 bytes.
    assert_eq!(bytes, Some(2 * 2 * 2 * 40 * 16 * 4));
    assert_eq!(m.cached_len(), 35);
}

#[test]
fn cached_steps_equal_forward_calls_qwen3_bf16_weights() {
    check_steps(
        "qwen3",
        "--arch qwen3 --seed 22 --layers 2 --hidden 64 --intermediate 100 \
         --heads 2 --kv-heads 1 --head-dim 32 --vocab 270",
        &["--weight-dtype", "bf16"],
        true,
    );
}

#[test]
fn a_batch_of_two_with_a_padded_row() {
    let (_tmp, art) = compiled(
        "mistral",
        "--arch mistral --seed 23 --layers 2 --hidden 64 --intermediate 96 \
         --heads 4 --kv-heads 2 --head-dim 16 --vocab 256",
        &[],
    );
    let mut m = open(&art, 2);
    let mut reference = Reference::default();
    // Row 1's first position is padding, for every later step too.
    let mask = |n: usize| (0..2 * n).map(|i| i64::from(i != n)).collect::<Vec<_>>();
    let mut n = 0;
    let mut bitwise = true;
    let steps: [&[i64]; 4] = [&[1, 2, 3, 4, 0, 5, 6, 7], &[9, 8], &[4, 4], &[1, 2, 3, 4]];
    for (k, v) in steps.into_iter().enumerate() {
        n += v.len() / 2;
        let inputs = tokens(2, v, Some(mask(n)));
        let got = CachedDecode::step(&mut m, inputs.clone()).unwrap_or_else(|e| panic!("step {k}: {e}"));
        assert_eq!(got.shape[0], 2);
        bitwise &= same(&format!("batch 2, step {k}"), &got, &reference.step(&mut m, inputs));
        assert_eq!(m.cached_len(), n);
    }
    println!("batch 2: cached steps equal forward calls ({})", if bitwise { "bitwise" } else { "within 1e-6" });
}

/// Hides the model's cache, so generation moves it through `forward`.
struct HostCache<'a>(&'a mut NativeModel);

impl Forward for HostCache<'_> {
    fn signature(&self) -> &Signature {
        self.0.signature()
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        self.0.forward(inputs)
    }
}

#[test]
fn greedy_generation_goes_through_the_cache() {
    let (_tmp, art) = compiled(
        "gemma",
        "--arch gemma --seed 24 --layers 2 --hidden 64 --intermediate 66 \
         --heads 2 --kv-heads 1 --head-dim 32 --vocab 256",
        &[],
    );
    let mut m = open(&art, 2);
    let opts = GenerateOptions { max_new_tokens: 12, eos_token_ids: vec![], ..Default::default() };
    let prompt = [5, 17, 200, 3];
    let through_forward = generate(&mut HostCache(&mut m), &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(m.cached_len(), 0, "forward calls do not fill the cache");
    let calls = m.stats().calls;
    let cached = generate(&mut m, &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(cached.ids, through_forward.ids);
    assert_eq!(m.cached_len(), prompt.len() + 11);
    assert_eq!(m.stats().calls - calls, 12, "one call per token");
}

/// A decode step over 600 cached positions takes split decode attention
/// (keys in segments over the team, then a combine launch); its logits
/// equal, within float rounding, those of one prefill over all 601
/// tokens, whose attention is computed whole.
#[test]
fn a_long_context_decode_step_matches_a_prefill() {
    let (_tmp, art) = compiled(
        "llama_long",
        "--arch llama --seed 27 --layers 2 --hidden 64 --intermediate 70 \
         --heads 4 --kv-heads 2 --head-dim 32 --vocab 260 --max-positions 1024",
        &[],
    );
    let mut m = open(&art, 2);
    assert!(m.cache_in_place());
    let plan = m.plan();
    assert!(plan.kernels.iter().any(|k| k.symbol.contains("_split")), "no split decode attention in the plan");
    let prompt: Vec<i64> = (0..601).map(|i| (i * 37 % 250 + 3) as i64).collect();
    CachedDecode::step(&mut m, tokens(1, &prompt[..600], None)).unwrap_or_else(|e| panic!("{e}"));
    let stepped = CachedDecode::step(&mut m, tokens(1, &prompt[600..], None)).unwrap_or_else(|e| panic!("{e}"));
    m.reset();
    let whole = CachedDecode::step(&mut m, tokens(1, &prompt, None)).unwrap_or_else(|e| panic!("{e}"));
    let (g, w) = (stepped.to_f32_vec(), whole.to_f32_vec());
    let scale = w.iter().fold(0f32, |s, x| s.max(x.abs()));
    let worst = g.iter().zip(&w).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
    assert!(scale > 1e-3 && worst <= 1e-4 * scale, "logits differ by {worst} (largest {scale})");
    println!("decode over 600 positions against a 601-token prefill: largest difference {worst:.2e} of {scale:.2e}");
}
