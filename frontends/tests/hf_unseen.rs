//! Models no fixture covers: random checkpoints of every architecture with
//! other sizes, head counts, head dims, layer counts, dtypes, rope scalings,
//! windows, biases and partial rotary, run through the graph builder and the
//! interpreter and compared with an independent, loop-by-loop implementation
//! of the transformers forward pass written here from the Python modelling
//! code (it shares only the config parser and its rope frequency math with
//! the code under test).

use smelt_frontends::hf::{self, write_random_checkpoint, Activation, Arch, Checkpoint, HfConfig, RandomModelSpec};
use smelt_ir::tensor::round_to;
use smelt_ir::{DType, Tensor};
use std::collections::BTreeMap;

/// A tiny seeded generator for inputs (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn normal(&mut self) -> f32 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * (u + 1e-12).ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// Row-major [rows, cols] weight in f32.
struct W {
    v: Vec<f32>,
    cols: usize,
}

impl W {
    fn load(ck: &Checkpoint, name: &str) -> W {
        let t = ck.get(name).unwrap_or_else(|e| panic!("{e}"));
        let cols = *t.shape.last().unwrap();
        W { v: t.to_f32_vec().unwrap(), cols }
    }
    /// y = x Wᵀ for W [out, in].
    fn linear(&self, x: &[f32]) -> Vec<f32> {
        self.v
            .chunks(self.cols)
            .map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32)
            .collect()
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64, add_one: bool) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| (*v as f64 * r * if add_one { 1.0 + *w as f64 } else { *w as f64 }) as f32).collect()
}

fn act(a: Activation, x: f32) -> f32 {
    let x = x as f64;
    (match a {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
    }) as f32
}

/// Abramowitz-Stegun 7.1.26 is too coarse; use the series/continued-fraction-free
/// approximation via libm-quality `erf` from the complementary function below.
fn erf(x: f64) -> f64 {
    // W. J. Cody's rational approximation is overkill here: exact GELU is not
    // used by any architecture in this test, so a simple, accurate Taylor sum suffices.
    let mut sum = 0.0;
    let mut term = x;
    for n in 0..60 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// Rotates one head vector in place with rotate-half on the first `rot` dims.
fn rope(x: &mut [f32], pos: i64, inv_freq: &[f32], scaling: f64) {
    let half = inv_freq.len();
    let orig = x.to_vec();
    for j in 0..2 * half {
        let f = inv_freq[j % half];
        let ang = (pos as f32 * f) as f64;
        let (c, s) = ((ang.cos() * scaling) as f32, (ang.sin() * scaling) as f32);
        let rh = if j < half { -orig[j + half] } else { orig[j - half] };
        x[j] = orig[j] * c + rh * s;
    }
}

struct Case {
    batch: usize,
    past: usize,
    seq: usize,
    /// (batch row, key index) pairs masked out by attention_mask.
    padding: Vec<(usize, usize)>,
}

/// The transformers forward pass, one position and head at a time.
fn reference(
    cfg: &HfConfig,
    ck: &Checkpoint,
    inputs: &BTreeMap<String, Tensor>,
    c: &Case,
    rope_cast: Option<DType>,
) -> BTreeMap<String, Vec<f32>> {
    let (h, nh, kvh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (b, past, seq) = (c.batch, c.past, c.seq);
    let total = past + seq;
    let ids = inputs["input_ids"].to_i64_vec();
    let pos = inputs["position_ids"].to_i64_vec();
    let mask = inputs["attention_mask"].to_i64_vec();
    // Exact frequencies as `from_pretrained` computes them, or rounded as
    // in a model cast to `rope_cast` (`hf::HfOptions::rope_cast`).
    let stored = rope_cast.unwrap_or(DType::F32);
    let max_pos = *pos.iter().max().unwrap() as usize + 1;
    let (inv_freq, scaling) = cfg.rope_inv_freq(max_pos);
    let inv_freq: Vec<f32> = inv_freq
        .iter()
        .map(|&f| {
            if matches!(cfg.rope_scaling, hf::RopeScaling::Dynamic { .. }) {
                f as f32
            } else {
                round_to(stored, f as f32)
            }
        })
        .collect();
    let add_one = cfg.arch == Arch::Gemma;
    let embed = W::load(ck, "model.embed_tokens.weight");
    let mut x: Vec<Vec<f32>> = (0..b * seq)
        .map(|i| {
            let row = &embed.v[ids[i] as usize * h..(ids[i] as usize + 1) * h];
            let s = if add_one { (h as f64).sqrt() as f32 } else { 1.0 };
            row.iter().map(|v| v * s).collect()
        })
        .collect();
    let mut out = BTreeMap::new();
    let rot = cfg.rope_dim();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let ln = W::load(ck, &format!("{p}.input_layernorm.weight")).v;
        let bias = |n: &str| -> Option<Vec<f32>> { ck.contains(n).then(|| W::load(ck, n).v) };
        let proj = |n: &str, x: &[f32]| -> Vec<f32> {
            let mut y = W::load(ck, &format!("{p}.self_attn.{n}.weight")).linear(x);
            if let Some(bv) = bias(&format!("{p}.self_attn.{n}.bias")) {
                y.iter_mut().zip(bv).for_each(|(a, b)| *a += b);
            }
            y
        };
        // Keys/values of the whole sequence, [b][kv head][t][d].
        let mut keys = vec![vec![vec![vec![0f32; hd]; total]; kvh]; b];
        let mut vals = keys.clone();
        let pk = inputs[&format!("past_key_values.{l}.key")].to_f32_vec();
        let pv = inputs[&format!("past_key_values.{l}.value")].to_f32_vec();
        for bi in 0..b {
            for kh in 0..kvh {
                for t in 0..past {
                    let o = ((bi * kvh + kh) * past + t) * hd;
                    keys[bi][kh][t].copy_from_slice(&pk[o..o + hd]);
                    vals[bi][kh][t].copy_from_slice(&pv[o..o + hd]);
                }
            }
        }
        let mut queries = vec![vec![vec![vec![0f32; hd]; seq]; nh]; b];
        for bi in 0..b {
            for s in 0..seq {
                let xn = rms_norm(&x[bi * seq + s], &ln, cfg.rms_norm_eps, add_one);
                let (q, k, v) = if cfg.arch == Arch::Phi3 {
                    let qkv = W::load(ck, &format!("{p}.self_attn.qkv_proj.weight")).linear(&xn);
                    (qkv[..nh * hd].to_vec(), qkv[nh * hd..(nh + kvh) * hd].to_vec(), qkv[(nh + kvh) * hd..].to_vec())
                } else {
                    (proj("q_proj", &xn), proj("k_proj", &xn), proj("v_proj", &xn))
                };
                let ps = pos[bi * seq + s];
                for hh in 0..nh {
                    let mut qh = q[hh * hd..(hh + 1) * hd].to_vec();
                    if cfg.arch == Arch::Qwen3 {
                        qh = rms_norm(
                            &qh,
                            &W::load(ck, &format!("{p}.self_attn.q_norm.weight")).v,
                            cfg.rms_norm_eps,
                            false,
                        );
                    }
                    rope(&mut qh[..rot], ps, &inv_freq, scaling);
                    queries[bi][hh][s] = qh;
                }
                for kh in 0..kvh {
                    let mut kk = k[kh * hd..(kh + 1) * hd].to_vec();
                    if cfg.arch == Arch::Qwen3 {
                        kk = rms_norm(
                            &kk,
                            &W::load(ck, &format!("{p}.self_attn.k_norm.weight")).v,
                            cfg.rms_norm_eps,
                            false,
                        );
                    }
                    rope(&mut kk[..rot], ps, &inv_freq, scaling);
                    keys[bi][kh][past + s] = kk;
                    vals[bi][kh][past + s] = v[kh * hd..(kh + 1) * hd].to_vec();
                }
            }
        }
        let mut pk_out = Vec::new();
        let mut pv_out = Vec::new();
        for bi in 0..b {
            for kh in 0..kvh {
                for t in 0..total {
                    pk_out.extend_from_slice(&keys[bi][kh][t]);
                    pv_out.extend_from_slice(&vals[bi][kh][t]);
                }
            }
        }
        out.insert(format!("present.{l}.key"), pk_out);
        out.insert(format!("present.{l}.value"), pv_out);
        let window = cfg.sliding_window_for_layer(l);
        let o_w = W::load(ck, &format!("{p}.self_attn.o_proj.weight"));
        let post = W::load(ck, &format!("{p}.post_attention_layernorm.weight")).v;
        for bi in 0..b {
            for s in 0..seq {
                let qpos = past + s;
                let mut attn = vec![0f32; nh * hd];
                for hh in 0..nh {
                    let kh = hh / (nh / kvh);
                    let allowed =
                        |t: usize| t <= qpos && mask[bi * total + t] != 0 && window.is_none_or(|w| t + w > qpos);
                    let scores: Vec<f64> = (0..total)
                        .map(|t| {
                            let d: f64 = queries[bi][hh][s]
                                .iter()
                                .zip(&keys[bi][kh][t])
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum();
                            d * (hd as f64).powf(-0.5)
                        })
                        .collect();
                    let mx = (0..total).filter(|t| allowed(*t)).map(|t| scores[t]).fold(f64::MIN, f64::max);
                    let e: Vec<f64> =
                        (0..total).map(|t| if allowed(t) { (scores[t] - mx).exp() } else { 0.0 }).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        attn[hh * hd + d] =
                            ((0..total).map(|t| e[t] * vals[bi][kh][t][d] as f64).sum::<f64>() / z) as f32;
                    }
                }
                let mut o = o_w.linear(&attn);
                if let Some(bv) = bias(&format!("{p}.self_attn.o_proj.bias")) {
                    o.iter_mut().zip(bv).for_each(|(a, b)| *a += b);
                }
                let xi = &mut x[bi * seq + s];
                xi.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let xn = rms_norm(xi, &post, cfg.rms_norm_eps, add_one);
                let i = cfg.intermediate_size;
                let (gate, up) = if cfg.arch == Arch::Phi3 {
                    let gu = W::load(ck, &format!("{p}.mlp.gate_up_proj.weight")).linear(&xn);
                    (gu[..i].to_vec(), gu[i..].to_vec())
                } else {
                    let lin = |n: &str| {
                        let mut y = W::load(ck, &format!("{p}.mlp.{n}.weight")).linear(&xn);
                        if let Some(bv) = bias(&format!("{p}.mlp.{n}.bias")) {
                            y.iter_mut().zip(bv).for_each(|(a, b)| *a += b);
                        }
                        y
                    };
                    (lin("gate_proj"), lin("up_proj"))
                };
                let prod: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| act(cfg.hidden_act, *g) * u).collect();
                let mut d = W::load(ck, &format!("{p}.mlp.down_proj.weight")).linear(&prod);
                if let Some(bv) = bias(&format!("{p}.mlp.down_proj.bias")) {
                    d.iter_mut().zip(bv).for_each(|(a, b)| *a += b);
                }
                xi.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            }
        }
    }
    let norm = W::load(ck, "model.norm.weight").v;
    let head = if ck.contains("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
    let head = W::load(ck, head);
    let logits: Vec<f32> =
        x.iter().flat_map(|xi| head.linear(&rms_norm(xi, &norm, cfg.rms_norm_eps, add_one))).collect();
    out.insert("logits".into(), logits);
    out
}

fn inputs(cfg: &HfConfig, c: &Case, rng: &mut Rng) -> BTreeMap<String, Tensor> {
    let (b, past, seq) = (c.batch, c.past, c.seq);
    let total = past + seq;
    let mut m = BTreeMap::new();
    let ids: Vec<i64> = (0..b * seq).map(|_| (rng.next() % cfg.vocab_size as u64) as i64).collect();
    m.insert("input_ids".into(), Tensor::from_i64(DType::I64, vec![b, seq], ids).unwrap());
    let mut mask = vec![1i64; b * total];
    for &(bi, t) in &c.padding {
        mask[bi * total + t] = 0;
    }
    m.insert("attention_mask".into(), Tensor::from_i64(DType::I64, vec![b, total], mask).unwrap());
    let pos: Vec<i64> = (0..b).flat_map(|_| (past..total).map(|p| p as i64)).collect();
    m.insert("position_ids".into(), Tensor::from_i64(DType::I64, vec![b, seq], pos).unwrap());
    let n = b * cfg.num_key_value_heads * past * cfg.head_dim;
    for l in 0..cfg.num_hidden_layers {
        for kv in ["key", "value"] {
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let shape = vec![b, cfg.num_key_value_heads, past, cfg.head_dim];
            m.insert(format!("past_key_values.{l}.{kv}"), Tensor::from_f32(DType::F32, shape, v).unwrap());
        }
    }
    m
}

fn check(name: &str, spec: RandomModelSpec, c: Case) {
    check_with(name, spec, c, &hf::HfOptions::default());
}

/// The graph built with `options` against the loop reference with the same
/// RoPE frequencies; returns the largest difference from the reference
/// with the other choice of frequencies (exact against rounded).
fn check_with(name: &str, spec: RandomModelSpec, c: Case, options: &hf::HfOptions) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &spec).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = hf::load_stored_with(dir.path(), options).unwrap_or_else(|e| panic!("{name}: {e}")).into_tensors();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut rng = Rng(spec.seed.wrapping_mul(7919) + 17);
    let ins = inputs(&model.config, &c, &mut rng);
    let got = smelt_ir::interp::run(&model.graph, &model.weights, &ins).unwrap_or_else(|e| panic!("{name}: {e}"));
    let max_err = |want: &BTreeMap<String, Vec<f32>>| {
        let mut worst = 0f32;
        for (k, w) in want {
            let g = got[k].to_f32_vec();
            assert_eq!(g.len(), w.len(), "{name}: {k} length");
            worst = worst.max(g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
        }
        worst
    };
    let err = max_err(&reference(&model.config, &ck, &ins, &c, options.rope_cast));
    assert!(err <= 1e-3, "{name}: differs from the loop reference by {err}");
    let other = if options.rope_cast.is_some() { None } else { Some(DType::BF16) };
    max_err(&reference(&model.config, &ck, &ins, &c, other))
}

fn spec(arch: Arch, f: impl FnOnce(&mut RandomModelSpec)) -> RandomModelSpec {
    let mut s = RandomModelSpec::tiny(arch);
    f(&mut s);
    s
}

fn case() -> Case {
    Case { batch: 2, past: 3, seq: 4, padding: vec![] }
}

#[test]
fn llama_bf16_llama3_rope_three_layers_six_heads() {
    let s = spec(Arch::Llama, |s| {
        (s.hidden_size, s.num_heads, s.num_kv_heads, s.num_layers, s.intermediate_size) = (96, 6, 2, 3, 80);
        s.dtype = DType::BF16;
        s.seed = 1;
        s.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}));
    });
    check("llama3", s, Case { padding: vec![(1, 0), (1, 1)], ..case() });
}

#[test]
fn llama_with_biases_tied_embeddings_and_one_layer() {
    let s = spec(Arch::Llama, |s| {
        (s.attention_bias, s.mlp_bias, s.tie_word_embeddings, s.num_layers) = (true, true, true, 1);
        s.seed = 2;
    });
    check("llama-bias", s, case());
}

#[test]
fn mistral_f16_window_three_linear_rope_head_dim_24() {
    let s = spec(Arch::Mistral, |s| {
        (s.sliding_window, s.head_dim, s.dtype, s.seed) = (Some(3), Some(24), DType::F16, 3);
        s.rope_scaling = Some(serde_json::json!({"rope_type": "linear", "factor": 2.0}));
    });
    check("mistral", s, case());
}

#[test]
fn qwen2_full_heads_yarn_rope() {
    let s = spec(Arch::Qwen2, |s| {
        (s.num_heads, s.num_kv_heads, s.seed) = (4, 4, 4);
        s.rope_scaling =
            Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}));
    });
    check("qwen2-yarn", s, case());
}

#[test]
fn qwen3_head_dim_40_single_kv_head_dynamic_rope_past_the_original_context() {
    let s = spec(Arch::Qwen3, |s| {
        (s.num_heads, s.num_kv_heads, s.head_dim, s.seed) = (2, 1, Some(40), 5);
        s.max_position_embeddings = 8;
        s.rope_scaling = Some(serde_json::json!({"rope_type": "dynamic", "factor": 2.0}));
    });
    // Positions reach 10 > 8, so the dynamic base is in effect.
    check("qwen3-dynamic", s, Case { batch: 1, past: 6, seq: 5, padding: vec![] });
}

#[test]
fn gemma_bf16_eight_heads_of_8() {
    let s = spec(Arch::Gemma, |s| {
        (s.num_heads, s.num_kv_heads, s.head_dim, s.dtype, s.seed) = (8, 1, Some(8), DType::BF16, 6);
    });
    check("gemma", s, case());
}

#[test]
fn phi3_partial_rotary_half() {
    let s = spec(Arch::Phi3, |s| {
        (s.partial_rotary_factor, s.seed) = (Some(0.5), 7);
    });
    check("phi3-partial", s, Case { batch: 1, past: 0, seq: 5, padding: vec![] });
}

/// A bf16 checkpoint's RoPE frequencies are exact, as transformers'
/// `from_pretrained` computes them; `rope_cast` rounds them as a model cast
/// in memory has them. Thirty positions in, the two differ by more than
/// the tolerance, so each check tells them apart.
#[test]
fn bf16_checkpoints_get_exact_rope_frequencies_unless_cast() {
    let s = spec(Arch::Llama, |s| {
        (s.hidden_size, s.num_heads, s.num_kv_heads, s.num_layers, s.intermediate_size) = (64, 4, 2, 2, 96);
        (s.dtype, s.seed) = (DType::BF16, 8);
    });
    let c = || Case { batch: 1, past: 30, seq: 3, padding: vec![] };
    let exact = check_with("exact", s.clone(), c(), &hf::HfOptions::default());
    assert!(exact > 1e-3, "exact frequencies are within {exact} of rounded ones: the check cannot tell them apart");
    let cast = check_with("cast", s, c(), &hf::HfOptions { rope_cast: Some(DType::BF16) });
    assert!(cast > 1e-3, "rounded frequencies are within {cast} of exact ones");
}
