//! Writes Hugging Face checkpoint folders with seeded random weights: smelt's
//! own way to make small models of any supported architecture and shape, for
//! the README demo and for tests of shapes no fixture has.
//!
//! A folder holds `config.json` in the transformers-5 layout (`model_type`,
//! `architectures`, a `rope_parameters` block, ...), `model.safetensors` with
//! the tensor names and shapes transformers uses for the architecture, and a
//! byte-level BPE `tokenizer.json` (the 256 byte tokens of GPT-2's byte
//! alphabet, no merges) that the Hugging Face `tokenizers` library loads.
//!
//! Weights follow the fixture generator (`fixtures/gen/gen_fixtures.py`,
//! `reinit`) so activations and logits have O(1) spread: linear weights
//! ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ 1 + 0.1 N(0, 1)
//! (Gemma: 0.1 N(0, 1), because Gemma's norm multiplies by 1 + w), biases
//! ~ 0.1 N(0, 1). The same spec and seed always give the same bytes.
//!
//! The tensor list comes from [`expected_tensors`] applied to the config as
//! [`HfConfig`] reads it back, so what is written is by construction what the
//! reader expects.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use serde_json::{json, Map, Value};
use smelt_ir::DType;

use super::checkpoint::{dtype_to_safetensors, SAFETENSORS_FILE};
use super::config::{Activation, Arch, HfConfig};
use super::error::HfError;

/// What a tensor is, which decides how it is initialised (and what a reader
/// does with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// Token embeddings (and an untied `lm_head`): N(0, 1).
    Embedding,
    /// A linear layer's `[out, in]` weight: N(0, 1/in).
    Linear,
    /// An RMSNorm weight.
    Norm,
    /// A linear layer's bias.
    Bias,
}

/// One tensor of a checkpoint: its Hugging Face name, shape and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

/// The tensors transformers stores for `cfg`, in model order.
pub fn expected_tensors(cfg: &HfConfig) -> Vec<TensorSpec> {
    let (v, h, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (nh, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, role| {
        out.push(TensorSpec { name, shape, role });
    };
    add("model.embed_tokens.weight".into(), vec![v, h], TensorRole::Embedding);
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        add(format!("{p}.input_layernorm.weight"), vec![h], TensorRole::Norm);
        if cfg.arch.fused_projections() {
            add(format!("{p}.self_attn.qkv_proj.weight"), vec![(nh + 2 * kv) * hd, h], TensorRole::Linear);
        } else {
            for (proj, rows) in [("q_proj", nh * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)] {
                add(format!("{p}.self_attn.{proj}.weight"), vec![rows, h], TensorRole::Linear);
                if cfg.attention_bias {
                    add(format!("{p}.self_attn.{proj}.bias"), vec![rows], TensorRole::Bias);
                }
            }
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, nh * hd], TensorRole::Linear);
        if cfg.o_proj_bias {
            add(format!("{p}.self_attn.o_proj.bias"), vec![h], TensorRole::Bias);
        }
        if cfg.arch.has_qk_norm() {
            add(format!("{p}.self_attn.q_norm.weight"), vec![hd], TensorRole::Norm);
            add(format!("{p}.self_attn.k_norm.weight"), vec![hd], TensorRole::Norm);
        }
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], TensorRole::Norm);
        if cfg.arch.fused_projections() {
            add(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h], TensorRole::Linear);
        } else {
            for proj in ["gate_proj", "up_proj"] {
                add(format!("{p}.mlp.{proj}.weight"), vec![i, h], TensorRole::Linear);
                if cfg.mlp_bias {
                    add(format!("{p}.mlp.{proj}.bias"), vec![i], TensorRole::Bias);
                }
            }
        }
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i], TensorRole::Linear);
        if cfg.mlp_bias {
            add(format!("{p}.mlp.down_proj.bias"), vec![h], TensorRole::Bias);
        }
    }
    add("model.norm.weight".into(), vec![h], TensorRole::Norm);
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), vec![v, h], TensorRole::Embedding);
    }
    out
}

/// The shape and settings of a random model.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomModelSpec {
    pub arch: Arch,
    /// At least 256: the tokenizer has one token per byte.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// `None`: `hidden_size / num_heads`.
    pub head_dim: Option<usize>,
    /// The stored dtype: f32, f16 or bf16.
    pub dtype: DType,
    pub tie_word_embeddings: bool,
    /// A sliding window on every layer (mistral, qwen2, qwen3, phi3).
    pub sliding_window: Option<usize>,
    pub rope_theta: f64,
    /// Rope scaling keys (`rope_type`/`type`, `factor`, ...) merged into the
    /// written `rope_parameters` block.
    pub rope_scaling: Option<Value>,
    /// Rotated fraction of each head (phi3).
    pub partial_rotary_factor: Option<f64>,
    /// q/k/v/o biases (llama, qwen3, gemma; qwen2 always has q/k/v biases).
    pub attention_bias: bool,
    /// MLP biases (llama).
    pub mlp_bias: bool,
    /// `None`: the architecture's default (silu; gelu tanh for gemma).
    pub hidden_act: Option<Activation>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub seed: u64,
}

impl RandomModelSpec {
    /// A tiny model of `arch` shaped like the matching fixture in
    /// `fixtures/` (vocab 256, hidden 64, 2 layers, 4 heads, 2 KV heads;
    /// mistral with window 4, qwen3 with head_dim 24, gemma with 1 KV head of
    /// 32, qwen2 with theta 1e6), stored in f32.
    pub fn tiny(arch: Arch) -> RandomModelSpec {
        let mut spec = RandomModelSpec {
            arch,
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 176,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: None,
            dtype: DType::F32,
            tie_word_embeddings: false,
            sliding_window: None,
            rope_theta: 10_000.0,
            rope_scaling: None,
            partial_rotary_factor: None,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 256,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            seed: 0,
        };
        match arch {
            Arch::Llama | Arch::Phi3 => {}
            Arch::Mistral => spec.sliding_window = Some(4),
            Arch::Qwen2 => {
                spec.rope_theta = 1e6;
                spec.tie_word_embeddings = true;
            }
            Arch::Qwen3 => {
                spec.head_dim = Some(24);
                spec.tie_word_embeddings = true;
            }
            Arch::Gemma => {
                spec.num_kv_heads = 1;
                spec.head_dim = Some(32);
                spec.tie_word_embeddings = true;
            }
        }
        spec
    }

    /// The `config.json` this spec writes (transformers-5 layout).
    pub fn config_json(&self) -> Result<Value, HfError> {
        let arch = self.arch;
        let invalid = |msg: String| Err(HfError::InvalidSpec { msg });
        let dtype_name = match self.dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            other => return invalid(format!("dtype {other} cannot store weights; use f32, f16 or bf16")),
        };
        if self.sliding_window.is_some() && matches!(arch, Arch::Llama | Arch::Gemma) {
            return invalid(format!("{arch} models have no sliding window attention"));
        }
        if self.attention_bias && matches!(arch, Arch::Mistral | Arch::Phi3 | Arch::Qwen2) {
            return invalid(format!("{arch} models have no attention_bias option (qwen2 always has q/k/v biases)"));
        }
        if self.mlp_bias && arch != Arch::Llama {
            return invalid(format!("{arch} models have no mlp_bias option"));
        }

        let mut rope = Map::new();
        rope.insert("rope_type".into(), json!("default"));
        rope.insert("rope_theta".into(), json!(self.rope_theta));
        if let Some(scaling) = &self.rope_scaling {
            let Some(keys) = scaling.as_object() else {
                return invalid(format!("rope_scaling must be a JSON object, got {scaling}"));
            };
            for (k, v) in keys {
                // Written in the transformers-5 spelling.
                let k = if k == "type" { "rope_type" } else { k.as_str() };
                rope.insert(k.to_string(), v.clone());
            }
        }
        if let Some(p) = self.partial_rotary_factor {
            rope.insert("partial_rotary_factor".into(), json!(p));
        }

        let act = self.hidden_act.unwrap_or(match arch {
            Arch::Gemma => Activation::GeluTanh,
            _ => Activation::Silu,
        });
        let mut c = Map::new();
        let mut set = |k: &str, v: Value| {
            c.insert(k.to_string(), v);
        };
        set("architectures", json!([arch.causal_lm_class()]));
        set("model_type", json!(arch.model_type()));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_layers));
        set("num_attention_heads", json!(self.num_heads));
        set("num_key_value_heads", json!(self.num_kv_heads));
        let default_head_dim = self.hidden_size.checked_div(self.num_heads);
        match self.head_dim {
            Some(hd) => set("head_dim", json!(hd)),
            // Transformers writes the derived head_dim for these architectures.
            None if matches!(arch, Arch::Llama | Arch::Mistral | Arch::Qwen3 | Arch::Gemma)
                && self.num_heads > 0
                && self.hidden_size.is_multiple_of(self.num_heads) =>
            {
                set("head_dim", json!(default_head_dim))
            }
            None => {}
        }
        set("hidden_act", json!(act.hf_name()));
        set("max_position_embeddings", json!(self.max_position_embeddings));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("rope_parameters", Value::Object(rope.clone()));
        set("bos_token_id", json!(self.bos_token_id));
        set("eos_token_id", json!(self.eos_token_id));
        // No padding token: transformers' defaults (32000 for phi3) may lie
        // outside a small vocabulary, and its embedding then refuses to load.
        set("pad_token_id", Value::Null);
        set("dtype", json!(dtype_name));
        set("attention_dropout", json!(0.0));
        set("initializer_range", json!(0.02));
        set("use_cache", json!(true));
        match arch {
            Arch::Llama => {
                set("attention_bias", json!(self.attention_bias));
                set("mlp_bias", json!(self.mlp_bias));
                set("pretraining_tp", json!(1));
            }
            Arch::Gemma => set("attention_bias", json!(self.attention_bias)),
            // An explicit null: MistralConfig's default would be 4096.
            Arch::Mistral => set("sliding_window", json!(self.sliding_window)),
            Arch::Qwen2 | Arch::Qwen3 => {
                if arch == Arch::Qwen3 {
                    set("attention_bias", json!(self.attention_bias));
                }
                let sliding = self.sliding_window.is_some();
                set("sliding_window", json!(self.sliding_window));
                set("use_sliding_window", json!(sliding));
                // Sliding from layer 0 on, so the window applies to every layer
                // as for the other architectures.
                set("max_window_layers", json!(if sliding { 0 } else { self.num_layers }));
                let kind = if sliding { "sliding_attention" } else { "full_attention" };
                set("layer_types", json!(vec![kind; self.num_layers]));
            }
            Arch::Phi3 => {
                set("sliding_window", json!(self.sliding_window));
                // Phi-3 reads original_max_position_embeddings at the top level
                // (and defaults it to 4096), so write it there.
                let omax = rope
                    .get("original_max_position_embeddings")
                    .cloned()
                    .unwrap_or(json!(self.max_position_embeddings));
                set("original_max_position_embeddings", omax);
            }
        }
        Ok(Value::Object(c))
    }
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` for `spec`
/// into `dir` (created if needed; existing files are replaced).
pub fn write_random_checkpoint(dir: impl AsRef<Path>, spec: &RandomModelSpec) -> Result<(), HfError> {
    let dir = dir.as_ref();
    if spec.vocab_size < 256 {
        return Err(HfError::InvalidSpec {
            msg: format!(
                "vocab_size={} is below 256; the byte-level tokenizer needs one token per byte",
                spec.vocab_size
            ),
        });
    }
    let config = spec.config_json()?;
    let config_text = serde_json::to_string_pretty(&config)
        .map_err(|e| HfError::InvalidSpec { msg: format!("cannot serialise config.json: {e}") })?;
    // Reading the config back validates the sizes with the reader's own
    // messages and gives the tensor list the reader will expect.
    let cfg = HfConfig::from_json_str(&config_text, "config.json (generated)")?;

    std::fs::create_dir_all(dir).map_err(|e| HfError::io(dir, e))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config_text + "\n").map_err(|e| HfError::io(&config_path, e))?;

    let weights_path = dir.join(SAFETENSORS_FILE);
    let tensors = random_tensors(&cfg, spec.dtype, spec.seed);
    let st_dtype = dtype_to_safetensors(spec.dtype);
    let views = tensors
        .iter()
        .map(|(t, bytes)| {
            TensorView::new(st_dtype, t.shape.clone(), bytes).map(|v| (t.name.clone(), v)).map_err(|e| {
                HfError::SafetensorsWrite { path: weights_path.clone(), msg: format!("tensor `{}`: {e}", t.name) }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // transformers refuses safetensors files without format metadata.
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize_to_file(views, metadata, &weights_path)
        .map_err(|e| HfError::SafetensorsWrite { path: weights_path.clone(), msg: e.to_string() })?;

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = serde_json::to_string_pretty(&byte_level_tokenizer_json())
        .map_err(|e| HfError::InvalidSpec { msg: format!("cannot serialise tokenizer.json: {e}") })?;
    std::fs::write(&tokenizer_path, tokenizer + "\n").map_err(|e| HfError::io(&tokenizer_path, e))?;
    Ok(())
}

/// Every tensor of `cfg` with random values, encoded in `dtype`.
fn random_tensors(cfg: &HfConfig, dtype: DType, seed: u64) -> Vec<(TensorSpec, Vec<u8>)> {
    let mut normal = Normal::new(seed);
    let norm_offset = if cfg.arch.norm_adds_one() { 0.0 } else { 1.0 };
    expected_tensors(cfg)
        .into_iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let (offset, scale) = match t.role {
                TensorRole::Embedding => (0.0, 1.0),
                TensorRole::Linear => (0.0, 1.0 / (t.shape[1] as f64).sqrt()),
                TensorRole::Norm => (norm_offset, 0.1),
                TensorRole::Bias => (0.0, 0.1),
            };
            let mut bytes = Vec::with_capacity(n * dtype.size_bytes());
            for _ in 0..n {
                let x = (offset + scale * normal.sample()) as f32;
                match dtype {
                    DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    // config_json() admits only f32, f16 and bf16.
                    _ => bytes.extend_from_slice(&x.to_le_bytes()),
                }
            }
            (t, bytes)
        })
        .collect()
}

/// Standard normal samples by the Box-Muller transform (rand without
/// rand_distr), deterministic for a seed.
struct Normal {
    rng: StdRng,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Normal {
        Normal { rng: StdRng::seed_from_u64(seed), spare: None }
    }

    fn sample(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.rng.random::<f64>();
        let u2 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// GPT-2's `bytes_to_unicode`: every byte gets a printable character;
/// printable Latin-1 bytes map to themselves, the rest to U+0100 onward.
pub fn byte_level_alphabet() -> [char; 256] {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        // Every code is below U+0200, so it is a valid char.
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    out
}

/// A Hugging Face tokenizers JSON for a byte-level BPE with the 256 byte
/// tokens (token id = byte value) and no merges.
pub fn byte_level_tokenizer_json() -> Value {
    let vocab: Map<String, Value> =
        byte_level_alphabet().iter().enumerate().map(|(id, c)| (c.to_string(), json!(id))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::checkpoint::Checkpoint;
    use crate::hf::config::{LayerAttention, RopeScaling};

    fn write(spec: &RandomModelSpec) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        write_random_checkpoint(dir.path(), spec).unwrap_or_else(|e| panic!("{e}"));
        let ckpt = Checkpoint::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        (dir, ckpt)
    }

    fn mean_std(xs: &[f32]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn every_arch_round_trips() {
        for arch in Arch::ALL {
            let spec = RandomModelSpec::tiny(arch);
            let (_dir, ckpt) = write(&spec);
            let cfg = ckpt.config();
            assert_eq!(cfg.arch, arch);
            assert_eq!(cfg.vocab_size, 256);
            assert_eq!(cfg.tie_word_embeddings, spec.tie_word_embeddings);
            assert_eq!(cfg.sliding_window, spec.sliding_window, "{arch}");
            assert_eq!(cfg.rope_theta, spec.rope_theta);
            assert_eq!(cfg.dtype, Some(DType::F32));
            let expected = expected_tensors(cfg);
            for t in &expected {
                ckpt.expect(&t.name, &t.shape, "expected_tensors").unwrap_or_else(|e| panic!("{arch}: {e}"));
            }
            assert_eq!(ckpt.tensor_names().len(), expected.len(), "{arch}");

            // Spot-check names and shapes against the transformers layout.
            let hd = cfg.head_dim;
            match arch {
                Arch::Phi3 => {
                    ckpt.expect("model.layers.1.self_attn.qkv_proj.weight", &[(4 + 4) * 16, 64], "").unwrap();
                    ckpt.expect("model.layers.1.mlp.gate_up_proj.weight", &[352, 64], "").unwrap();
                }
                _ => {
                    ckpt.expect("model.layers.1.self_attn.q_proj.weight", &[4 * hd, 64], "").unwrap();
                    ckpt.expect("model.layers.1.self_attn.o_proj.weight", &[64, 4 * hd], "").unwrap();
                    ckpt.expect("model.layers.0.mlp.down_proj.weight", &[64, 176], "").unwrap();
                }
            }
            assert_eq!(ckpt.contains("model.layers.0.self_attn.q_proj.bias"), arch == Arch::Qwen2);
            assert!(!ckpt.contains("model.layers.0.self_attn.o_proj.bias"));
            assert_eq!(ckpt.contains("model.layers.0.self_attn.q_norm.weight"), arch == Arch::Qwen3);
            assert_eq!(ckpt.contains("lm_head.weight"), !spec.tie_word_embeddings);

            // Initialisation scales.
            let norm = ckpt.get("model.norm.weight").unwrap().to_f32_vec().unwrap();
            let (m, _) = mean_std(&norm);
            let want = if arch == Arch::Gemma { 0.0 } else { 1.0 };
            assert!((m - want).abs() < 0.05, "{arch} norm mean {m}");
            let emb = ckpt.get("model.embed_tokens.weight").unwrap().to_f32_vec().unwrap();
            let (m, s) = mean_std(&emb);
            assert!(m.abs() < 0.05 && (s - 1.0).abs() < 0.05, "{arch} embedding {m} {s}");
            let down = ckpt.get("model.layers.0.mlp.down_proj.weight").unwrap().to_f32_vec().unwrap();
            let (_, s) = mean_std(&down);
            assert!((s * 176f64.sqrt() - 1.0).abs() < 0.05, "{arch} linear std {s}");
        }
    }

    #[test]
    fn deterministic_per_seed_and_dtypes() {
        let mut spec = RandomModelSpec::tiny(Arch::Llama);
        let (a, _) = write(&spec);
        let (b, _) = write(&spec);
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(SAFETENSORS_FILE)).unwrap();
        assert_eq!(read(&a), read(&b));
        spec.seed = 1;
        let (c, _) = write(&spec);
        assert_ne!(read(&a), read(&c));

        for dtype in [DType::F16, DType::BF16] {
            spec.dtype = dtype;
            let (_d, ckpt) = write(&spec);
            assert_eq!(ckpt.config().dtype, Some(dtype));
            let t = ckpt.get("model.norm.weight").unwrap();
            assert_eq!(t.dtype, dtype);
            assert_eq!(t.to_f32_vec().unwrap().len(), 64);
        }
    }

    #[test]
    fn options_are_written_and_read_back() {
        let mut spec = RandomModelSpec::tiny(Arch::Llama);
        spec.rope_scaling = Some(json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}));
        spec.attention_bias = true;
        spec.mlp_bias = true;
        let (_d, ckpt) = write(&spec);
        let cfg = ckpt.config();
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { original_max_position_embeddings: 64, .. }));
        for name in ["self_attn.k_proj.bias", "self_attn.o_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"] {
            assert!(ckpt.contains(&format!("model.layers.1.{name}")), "{name}");
        }

        let mut spec = RandomModelSpec::tiny(Arch::Phi3);
        spec.partial_rotary_factor = Some(0.5);
        spec.rope_scaling = Some(json!({"rope_type": "longrope", "short_factor": vec![1.0; 4],
                                        "long_factor": vec![2.0; 4], "original_max_position_embeddings": 128}));
        let (_d, ckpt) = write(&spec);
        assert_eq!(ckpt.config().rope_dim(), 8);
        assert!(matches!(
            ckpt.config().rope_scaling,
            RopeScaling::LongRope { original_max_position_embeddings: 128, .. }
        ));

        let mut spec = RandomModelSpec::tiny(Arch::Qwen2);
        spec.sliding_window = Some(3);
        spec.num_kv_heads = 4;
        spec.vocab_size = 300;
        let (_d, ckpt) = write(&spec);
        assert_eq!(ckpt.config().layer_types, vec![LayerAttention::Sliding; 2]);
        assert_eq!(ckpt.config().sliding_window_for_layer(0), Some(3));
        ckpt.expect("model.embed_tokens.weight", &[300, 64], "").unwrap();
        ckpt.expect("model.layers.0.self_attn.v_proj.bias", &[64], "").unwrap();
    }

    #[test]
    fn bad_specs() {
        let dir = tempfile::tempdir().unwrap();
        let try_write = |f: &dyn Fn(&mut RandomModelSpec)| {
            let mut spec = RandomModelSpec::tiny(Arch::Llama);
            f(&mut spec);
            write_random_checkpoint(dir.path(), &spec).unwrap_err().to_string()
        };
        assert_eq!(
            try_write(&|s| s.vocab_size = 100),
            "random model spec: vocab_size=100 is below 256; the byte-level tokenizer needs one token per byte"
        );
        assert_eq!(
            try_write(&|s| s.dtype = DType::I32),
            "random model spec: dtype i32 cannot store weights; use f32, f16 or bf16"
        );
        assert_eq!(
            try_write(&|s| s.num_kv_heads = 3),
            "config.json (generated): num_attention_heads=4 is not divisible by num_key_value_heads=3"
        );
        assert_eq!(
            try_write(&|s| s.sliding_window = Some(4)),
            "random model spec: llama models have no sliding window attention"
        );
        assert!(try_write(&|s| s.rope_scaling = Some(json!({"rope_type": "bogus"}))).contains("unknown rope type"));
    }

    #[test]
    fn tokenizer_loads_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        write_random_checkpoint(dir.path(), &RandomModelSpec::tiny(Arch::Gemma)).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tok.get_vocab_size(false), 256);
        for text in ["Hello, world!", "naïve ünïcödé\n\ttabs  and spaces", ""] {
            let enc = tok.encode(text, false).unwrap_or_else(|e| panic!("{e}"));
            let ids: Vec<u32> = text.bytes().map(u32::from).collect();
            assert_eq!(enc.get_ids(), ids.as_slice(), "{text:?}");
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
    }

    #[test]
    fn alphabet_matches_gpt2() {
        let a = byte_level_alphabet();
        assert_eq!(a[b'!' as usize], '!');
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[0], 'Ā');
        assert_eq!(a[0xAD], '\u{143}');
        let unique: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(unique.len(), 256);
    }
}
