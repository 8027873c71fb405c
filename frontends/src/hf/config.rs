//! `config.json` of a Hugging Face decoder-only model, read into a typed
//! [`HfConfig`].
//!
//! Supported `model_type`s: llama, mistral, qwen2, qwen3, gemma, phi3. Keys
//! are read the way transformers (5.x) reads them, including its defaults and
//! its backward compatibility: rotary settings come from the transformers-5
//! `rope_parameters` block or from the older top-level `rope_theta` +
//! `rope_scaling` keys (`type` or `rope_type`), and `dtype` falls back to the
//! older `torch_dtype`. [`HfConfig::rope_inv_freq`] reproduces
//! `transformers.modeling_rope_utils` for every supported rope type.
//!
//! Assumptions: the file is UTF-8 JSON with one object at the top; sizes are
//! JSON integers (integral floats such as `64.0` are accepted too). Nothing in
//! here panics on bad input: every problem becomes an [`HfError`] naming the
//! file and key.

use std::f64::consts::PI;
use std::path::Path;

use serde_json::{Map, Value};
use smelt_ir::DType;

use super::error::{describe_json, HfError};

/// The architectures this frontend builds, one per supported `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Phi3,
}

impl Arch {
    /// Every architecture, in the order of [`supported_model_types`].
    pub const ALL: [Arch; 6] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3, Arch::Gemma, Arch::Phi3];

    /// The `model_type` spelling in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma => "gemma",
            Arch::Phi3 => "phi3",
        }
    }

    /// The transformers class name written in `architectures`.
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma => "GemmaForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Parses a `model_type` value.
    pub fn from_model_type(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == s)
    }

    /// Qwen3 normalises q and k per head (`self_attn.q_norm` / `k_norm`).
    pub fn has_qk_norm(self) -> bool {
        self == Arch::Qwen3
    }

    /// Phi-3 stores q, k and v as one `qkv_proj` and gate and up as one
    /// `gate_up_proj`.
    pub fn fused_projections(self) -> bool {
        self == Arch::Phi3
    }

    /// Gemma's RMSNorm multiplies by `1 + w` instead of `w`.
    pub fn norm_adds_one(self) -> bool {
        self == Arch::Gemma
    }

    /// Gemma multiplies the token embeddings by `sqrt(hidden_size)`.
    pub fn scales_embeddings(self) -> bool {
        self == Arch::Gemma
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// The `model_type` values [`HfConfig`] accepts.
pub fn supported_model_types() -> &'static [&'static str] {
    &["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
}

/// The rope types [`HfConfig`] accepts (`su` is the older name of `longrope`).
pub const SUPPORTED_ROPE_TYPES: &[&str] = &["default", "linear", "dynamic", "yarn", "longrope", "llama3"];

/// The MLP activation (of the gate branch in the gated MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` ("silu", "swish").
    Silu,
    /// GELU with the tanh approximation ("gelu_pytorch_tanh", "gelu_tanh",
    /// "gelu_new", "gelu_fast"; Gemma's default).
    GeluTanh,
    /// Exact GELU with erf ("gelu").
    Gelu,
}

impl Activation {
    const SPELLINGS: &'static [&'static str] =
        &["silu", "swish", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast", "gelu"];

    fn parse(s: &str) -> Option<Activation> {
        match s {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }

    /// The canonical transformers spelling.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
        }
    }
}

/// Which attention a layer uses (transformers' `layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    Full,
    Sliding,
}

/// How rotary frequencies are scaled, one variant per transformers rope type.
/// All fields are resolved: defaults filled in, `original_max_position_embeddings`
/// taken from wherever transformers takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/dim)`.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows once the sequence exceeds
    /// `original_max_position_embeddings`. Transformers uses the config's
    /// `max_position_embeddings` here (not a rope-block key), and so do we.
    Dynamic { factor: f64, original_max_position_embeddings: usize },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a
    /// smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// YaRN. `attention_factor`, `mscale` and `mscale_all_dim` are kept as
    /// written; the attention scaling is derived from them in
    /// [`HfConfig::rope_inv_freq`].
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
    /// LongRoPE (Phi-3 long-context models): per-frequency factors, `short`
    /// up to `original_max_position_embeddings`, `long` beyond.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        factor: f64,
        attention_factor: Option<f64>,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The transformers `rope_type` name.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::LongRope { .. } => "longrope",
        }
    }
}

/// A typed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// Where the config came from (a path or a name), used in messages.
    pub source: String,
    pub arch: Arch,
    /// The `architectures` list as written (may be empty).
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` when absent or null.
    pub num_key_value_heads: usize,
    /// Explicit `head_dim`, else `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections have biases (always for qwen2; the
    /// `attention_bias` key for llama, qwen3 and gemma; never for mistral, phi3).
    pub attention_bias: bool,
    /// The o projection has a bias (llama, qwen3, gemma with `attention_bias`).
    pub o_proj_bias: bool,
    /// gate, up and down projections have biases (llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    /// The attention window of sliding layers; `None` when no layer slides.
    pub sliding_window: Option<usize>,
    /// One entry per layer.
    pub layer_types: Vec<LayerAttention>,
    pub bos_token_id: Vec<i64>,
    pub eos_token_id: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The stored dtype (`dtype`, or the older `torch_dtype`), if given.
    pub dtype: Option<DType>,
    pub rope_theta: f64,
    /// Fraction of each head that is rotated (phi3); 1.0 elsewhere.
    pub partial_rotary_factor: f64,
    pub rope_scaling: RopeScaling,
}

impl HfConfig {
    /// Reads and validates a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<HfConfig, HfError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| HfError::io(path, e))?;
        HfConfig::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates config JSON; `source_name` names it in messages.
    pub fn from_json_str(s: &str, source_name: &str) -> Result<HfConfig, HfError> {
        let value: Value = serde_json::from_str(s).map_err(|e| HfError::json(source_name, &e))?;
        let Value::Object(map) = &value else {
            return Err(HfError::invalid(
                source_name,
                format!("the top level is {}, expected a JSON object", describe_json(&value)),
            ));
        };
        parse(source_name, map)
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// The attention window of layer `layer`, `None` for full attention.
    pub fn sliding_window_for_layer(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerAttention::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// Number of rotated dimensions per head: `int(head_dim * partial_rotary_factor)`
    /// as transformers computes it (truncating toward zero).
    pub fn rope_dim(&self) -> usize {
        rope_dim_of(self.head_dim, self.partial_rotary_factor)
    }

    /// The rotary inverse frequencies (`rope_dim() / 2` of them) and the
    /// attention scaling applied to cos and sin, for a sequence of `seq_len`
    /// positions, as `transformers.modeling_rope_utils` computes them.
    ///
    /// Only `dynamic` and `longrope` depend on `seq_len`. Transformers
    /// computes in float32; this computes in f64, so values agree to float32
    /// rounding.
    pub fn rope_inv_freq(&self, seq_len: usize) -> (Vec<f64>, f64) {
        let dim = self.rope_dim();
        let base = self.rope_theta;
        let default =
            |base: f64| -> Vec<f64> { (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f64 / dim as f64)).collect() };
        match &self.rope_scaling {
            RopeScaling::Default => (default(base), 1.0),
            RopeScaling::Linear { factor } => (default(base).into_iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Dynamic { factor, original_max_position_embeddings: omax } => {
                // The base only grows past the original context; below it the
                // expression is exactly 1 and the frequencies are the defaults.
                let seq = seq_len.max(*omax) as f64;
                let omax = *omax as f64;
                let d = dim as f64;
                let scaled = base * ((factor * seq / omax) - (factor - 1.0)).powf(d / (d - 2.0));
                (default(scaled), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: omax,
            } => {
                let old_context = *omax as f64;
                let low_freq_wavelen = old_context / low_freq_factor;
                let high_freq_wavelen = old_context / high_freq_factor;
                let inv = default(base)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth =
                                (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: omax,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    // Python's `if mscale and mscale_all_dim`: both present and non-zero.
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let d = dim as f64;
                let omax = *omax as f64;
                let correction_dim = |rotations: f64| (d * (omax / (rotations * 2.0 * PI)).ln()) / (2.0 * base.ln());
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    // Transformers nudges the ramp end to avoid dividing by zero.
                    high += 0.001;
                }
                let inv = default(base)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extrapolation)| {
                        let interpolation = extrapolation / factor;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv, attention)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                factor,
                attention_factor,
                original_max_position_embeddings: omax,
            } => {
                let attention = match attention_factor {
                    Some(a) => *a,
                    None if *factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (*omax as f64).ln()).sqrt(),
                };
                let ext = if seq_len > *omax { long_factor } else { short_factor };
                let inv = default(base).into_iter().zip(ext.iter()).map(|(f, e)| f / e).collect();
                (inv, attention)
            }
        }
    }
}

fn rope_dim_of(head_dim: usize, partial_rotary_factor: f64) -> usize {
    // Python's int() truncates toward zero; the product is non-negative here.
    (head_dim as f64 * partial_rotary_factor) as usize
}

/// Typed access to one JSON object, with messages naming the file and the
/// full key path (`rope_parameters.factor`).
struct Obj<'a> {
    file: &'a str,
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Obj<'a> {
    fn top(file: &'a str, map: &'a Map<String, Value>) -> Self {
        Obj { file, map, prefix: String::new() }
    }

    fn nested(file: &'a str, map: &'a Map<String, Value>, name: &str) -> Self {
        Obj { file, map, prefix: format!("{name}.") }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// The value of `k`, treating an explicit null like an absent key (as
    /// transformers' `.get(k) or default` and keyword defaults do).
    fn get(&self, k: &str) -> Option<&'a Value> {
        match self.map.get(k) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn has(&self, k: &str) -> bool {
        self.get(k).is_some()
    }

    fn missing(&self, k: &str) -> HfError {
        HfError::MissingKey { file: self.file.to_string(), key: self.key(k) }
    }

    fn bad(&self, k: &str, v: &Value, expected: &str) -> HfError {
        HfError::bad_value(self.file, &self.key(k), describe_json(v), expected)
    }

    fn usize_opt(&self, k: &str) -> Result<Option<usize>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        json_usize(v).map(Some).ok_or_else(|| self.bad(k, v, "a non-negative integer"))
    }

    /// A size: an integer >= 1.
    fn positive_opt(&self, k: &str) -> Result<Option<usize>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        match json_usize(v) {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(self.bad(k, v, "a positive integer")),
        }
    }

    fn positive(&self, k: &str) -> Result<usize, HfError> {
        self.positive_opt(k)?.ok_or_else(|| self.missing(k))
    }

    fn f64_opt(&self, k: &str) -> Result<Option<f64>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(self.bad(k, v, "a finite number")),
        }
    }

    fn positive_f64_opt(&self, k: &str) -> Result<Option<f64>, HfError> {
        match self.f64_opt(k)? {
            Some(x) if x <= 0.0 => Err(HfError::bad_value(self.file, &self.key(k), x.to_string(), "a positive number")),
            other => Ok(other),
        }
    }

    fn bool_opt(&self, k: &str) -> Result<Option<bool>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        v.as_bool().map(Some).ok_or_else(|| self.bad(k, v, "true or false"))
    }

    fn str_opt(&self, k: &str) -> Result<Option<&'a str>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        v.as_str().map(Some).ok_or_else(|| self.bad(k, v, "a string"))
    }

    fn f64_list(&self, k: &str) -> Result<Vec<f64>, HfError> {
        let Some(v) = self.get(k) else {
            return Err(self.missing(k));
        };
        let list = v.as_array().ok_or_else(|| self.bad(k, v, "a list of numbers"))?;
        list.iter()
            .map(|x| x.as_f64().filter(|x| x.is_finite()).ok_or_else(|| self.bad(k, v, "a list of finite numbers")))
            .collect()
    }

    /// A token id given as an integer, a list of integers, or null.
    fn token_ids(&self, k: &str) -> Result<Vec<i64>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(Vec::new());
        };
        let expected = "an integer, a list of integers or null";
        match v {
            Value::Array(items) => items.iter().map(|x| x.as_i64().ok_or_else(|| self.bad(k, v, expected))).collect(),
            _ => v.as_i64().map(|id| vec![id]).ok_or_else(|| self.bad(k, v, expected)),
        }
    }

    fn object_opt(&self, k: &str) -> Result<Option<&'a Map<String, Value>>, HfError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        v.as_object().map(Some).ok_or_else(|| self.bad(k, v, "an object or null"))
    }
}

/// A JSON integer >= 0, also accepting integral floats (`4096.0`), which some
/// exporters write.
fn json_usize(v: &Value) -> Option<usize> {
    if let Some(n) = v.as_u64() {
        return usize::try_from(n).ok();
    }
    let x = v.as_f64()?;
    if x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64 {
        Some(x as usize)
    } else {
        None
    }
}

fn parse_dtype(obj: &Obj) -> Result<Option<DType>, HfError> {
    let key = if obj.has("dtype") { "dtype" } else { "torch_dtype" };
    let Some(name) = obj.str_opt(key)? else {
        return Ok(None);
    };
    let dtype = match name.strip_prefix("torch.").unwrap_or(name) {
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" | "double" => DType::F64,
        // "auto" means "whatever the weights are"; the safetensors headers say.
        "auto" => return Ok(None),
        _ => {
            return Err(HfError::bad_value(
                obj.file,
                key,
                format!("`{name}`"),
                "one of float32, float16, bfloat16, float64, auto",
            ))
        }
    };
    Ok(Some(dtype))
}

fn parse_activation(obj: &Obj, arch: Arch) -> Result<Activation, HfError> {
    // Gemma: `hidden_activation` (when set) wins over `hidden_act`, and the
    // default is the tanh approximation; the original Gemma configs carry
    // `hidden_act: "gelu"` for the legacy key but mean tanh GELU.
    let (key, default) = match arch {
        Arch::Gemma if obj.has("hidden_activation") => ("hidden_activation", "gelu_pytorch_tanh"),
        Arch::Gemma => ("hidden_act", "gelu_pytorch_tanh"),
        _ => ("hidden_act", "silu"),
    };
    let name = obj.str_opt(key)?.unwrap_or(default);
    Activation::parse(name).ok_or_else(|| {
        HfError::bad_value(obj.file, key, format!("`{name}`"), format!("one of {}", Activation::SPELLINGS.join(", ")))
    })
}

/// Transformers' defaults where config.json omits a key, per architecture.
struct ArchDefaults {
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
}

fn defaults(arch: Arch) -> ArchDefaults {
    match arch {
        Arch::Llama => ArchDefaults { rms_norm_eps: 1e-6, max_position_embeddings: 2048, tie_word_embeddings: false },
        Arch::Mistral => {
            ArchDefaults { rms_norm_eps: 1e-6, max_position_embeddings: 4096 * 32, tie_word_embeddings: false }
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            ArchDefaults { rms_norm_eps: 1e-6, max_position_embeddings: 32768, tie_word_embeddings: false }
        }
        Arch::Gemma => ArchDefaults { rms_norm_eps: 1e-6, max_position_embeddings: 8192, tie_word_embeddings: true },
        Arch::Phi3 => ArchDefaults { rms_norm_eps: 1e-5, max_position_embeddings: 4096, tie_word_embeddings: false },
    }
}

fn parse(file: &str, map: &Map<String, Value>) -> Result<HfConfig, HfError> {
    let obj = Obj::top(file, map);
    let model_type = obj.str_opt("model_type")?.ok_or_else(|| obj.missing("model_type"))?;
    let arch = Arch::from_model_type(model_type).ok_or_else(|| HfError::UnknownModelType {
        file: file.to_string(),
        found: model_type.to_string(),
        supported: supported_model_types().to_vec(),
    })?;
    let d = defaults(arch);

    let architectures = match obj.get("architectures") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
            .ok_or_else(|| obj.bad("architectures", v, "a list of class names"))?,
    };

    let vocab_size = obj.positive("vocab_size")?;
    let hidden_size = obj.positive("hidden_size")?;
    let intermediate_size = obj.positive("intermediate_size")?;
    let num_hidden_layers = obj.positive("num_hidden_layers")?;
    let num_attention_heads = obj.positive("num_attention_heads")?;
    let num_key_value_heads = obj.positive_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
    let head_dim = match obj.positive_opt("head_dim")? {
        Some(hd) => hd,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(HfError::invalid(
                    file,
                    format!(
                        "hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}, \
                         and head_dim is not given"
                    ),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(HfError::invalid(
            file,
            format!(
                "num_attention_heads={num_attention_heads} is not divisible by \
                 num_key_value_heads={num_key_value_heads}"
            ),
        ));
    }

    let rms_norm_eps = obj.positive_f64_opt("rms_norm_eps")?.unwrap_or(d.rms_norm_eps);
    let max_position_embeddings = obj.positive_opt("max_position_embeddings")?.unwrap_or(d.max_position_embeddings);
    let tie_word_embeddings = obj.bool_opt("tie_word_embeddings")?.unwrap_or(d.tie_word_embeddings);

    let attention_bias_key = obj.bool_opt("attention_bias")?.unwrap_or(false);
    let (attention_bias, o_proj_bias) = match arch {
        Arch::Qwen2 => (true, false),
        Arch::Llama | Arch::Qwen3 | Arch::Gemma => (attention_bias_key, attention_bias_key),
        Arch::Mistral | Arch::Phi3 => (false, false),
    };
    let mlp_bias = match arch {
        Arch::Llama => obj.bool_opt("mlp_bias")?.unwrap_or(false),
        _ => false,
    };
    let hidden_act = parse_activation(&obj, arch)?;

    let sliding_window = match arch {
        Arch::Llama | Arch::Gemma => None,
        // MistralConfig's keyword default is 4096; an explicit null disables it.
        Arch::Mistral => match map.get("sliding_window") {
            None => Some(4096),
            Some(_) => obj.positive_opt("sliding_window")?,
        },
        Arch::Phi3 => obj.positive_opt("sliding_window")?,
        Arch::Qwen2 | Arch::Qwen3 => {
            if obj.bool_opt("use_sliding_window")?.unwrap_or(false) {
                obj.positive_opt("sliding_window")?
            } else {
                None
            }
        }
    };
    let layer_types = parse_layer_types(&obj, arch, num_hidden_layers, sliding_window)?;

    let (rope_theta, partial_rotary_factor, rope_scaling) = parse_rope(&obj, arch, max_position_embeddings, head_dim)?;

    Ok(HfConfig {
        source: file.to_string(),
        arch,
        architectures,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias,
        o_proj_bias,
        mlp_bias,
        hidden_act,
        sliding_window,
        layer_types,
        bos_token_id: obj.token_ids("bos_token_id")?,
        eos_token_id: obj.token_ids("eos_token_id")?,
        pad_token_id: match obj.get("pad_token_id") {
            None => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| obj.bad("pad_token_id", v, "an integer or null"))?),
        },
        dtype: parse_dtype(&obj)?,
        rope_theta,
        partial_rotary_factor,
        rope_scaling,
    })
}

fn parse_layer_types(
    obj: &Obj,
    arch: Arch,
    num_layers: usize,
    sliding_window: Option<usize>,
) -> Result<Vec<LayerAttention>, HfError> {
    let all = |kind| vec![kind; num_layers];
    match arch {
        Arch::Llama | Arch::Gemma => Ok(all(LayerAttention::Full)),
        Arch::Mistral | Arch::Phi3 => {
            Ok(all(if sliding_window.is_some() { LayerAttention::Sliding } else { LayerAttention::Full }))
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            // Qwen2/3 slide only on layers marked `sliding_attention`: from the
            // explicit `layer_types`, else layers >= `max_window_layers`. The
            // window itself is null unless `use_sliding_window` is set, and
            // then every layer attends fully.
            if let Some(v) = obj.get("layer_types") {
                let expected =
                    format!("a list of {num_layers} entries, each \"full_attention\" or \"sliding_attention\"");
                let list = v.as_array().ok_or_else(|| obj.bad("layer_types", v, &expected))?;
                if list.len() != num_layers {
                    return Err(HfError::bad_value(
                        obj.file,
                        "layer_types",
                        format!("a list of {} entries", list.len()),
                        format!("{num_layers} entries (num_hidden_layers)"),
                    ));
                }
                list.iter()
                    .map(|x| match x.as_str() {
                        Some("full_attention") => Ok(LayerAttention::Full),
                        Some("sliding_attention") => Ok(LayerAttention::Sliding),
                        _ => Err(obj.bad("layer_types", v, &expected)),
                    })
                    .collect()
            } else {
                let max_window_layers = obj.usize_opt("max_window_layers")?.unwrap_or(28);
                Ok((0..num_layers)
                    .map(|i| {
                        if sliding_window.is_some() && i >= max_window_layers {
                            LayerAttention::Sliding
                        } else {
                            LayerAttention::Full
                        }
                    })
                    .collect())
            }
        }
    }
}

fn parse_rope(
    top: &Obj,
    arch: Arch,
    max_position_embeddings: usize,
    head_dim: usize,
) -> Result<(f64, f64, RopeScaling), HfError> {
    let file = top.file;
    // Transformers prefers a non-empty `rope_scaling` (the older key) over
    // `rope_parameters`, then fills in `rope_theta` and
    // `partial_rotary_factor` from the top level when the block lacks them.
    let scaling = top.object_opt("rope_scaling")?.filter(|m| !m.is_empty());
    let params = top.object_opt("rope_parameters")?;
    let (block_name, block) = match (scaling, params) {
        (Some(m), _) => ("rope_scaling", Some(m)),
        (None, Some(m)) => ("rope_parameters", Some(m)),
        (None, None) => ("rope_parameters", None),
    };
    let empty = Map::new();
    let rp = Obj::nested(file, block.unwrap_or(&empty), block_name);
    if let Some(layer_key) =
        ["full_attention", "sliding_attention"].into_iter().find(|k| rp.get(k).is_some_and(Value::is_object))
    {
        return Err(HfError::invalid(
            file,
            format!(
                "`{block_name}.{layer_key}`: rope parameters per layer type are not supported \
                 by {arch} models"
            ),
        ));
    }

    let rope_theta = match rp.positive_f64_opt("rope_theta")? {
        Some(t) => t,
        None => top.positive_f64_opt("rope_theta")?.unwrap_or(10_000.0),
    };
    let (prf_key, prf) = match rp.f64_opt("partial_rotary_factor")? {
        Some(p) => (rp.key("partial_rotary_factor"), p),
        None => ("partial_rotary_factor".to_string(), top.f64_opt("partial_rotary_factor")?.unwrap_or(1.0)),
    };
    if !(prf > 0.0 && prf <= 1.0) {
        return Err(HfError::bad_value(file, &prf_key, prf.to_string(), "a number in (0, 1]"));
    }
    let dim = rope_dim_of(head_dim, prf);
    if dim < 2 || !dim.is_multiple_of(2) {
        return Err(HfError::invalid(
            file,
            format!("rotary dimension int(head_dim={head_dim} x {prf_key}={prf}) = {dim} must be even and at least 2"),
        ));
    }

    let (type_key, rope_type) = if rp.has("rope_type") {
        ("rope_type", rp.str_opt("rope_type")?.unwrap_or("default"))
    } else {
        ("type", rp.str_opt("type")?.unwrap_or("default"))
    };

    // Where `original_max_position_embeddings` comes from for llama3, yarn and
    // longrope: a top-level key wins (Phi-3 keeps it there, and Phi3Config
    // always has one, 4096 by default), then the rope block, then
    // `max_position_embeddings`.
    let original_max = || -> Result<usize, HfError> {
        if let Some(n) = top.positive_opt("original_max_position_embeddings")? {
            return Ok(n);
        }
        if arch == Arch::Phi3 {
            return Ok(4096);
        }
        Ok(rp.positive_opt("original_max_position_embeddings")?.unwrap_or(max_position_embeddings))
    };
    let factor = |required: bool| -> Result<Option<f64>, HfError> {
        match rp.positive_f64_opt("factor")? {
            Some(f) => Ok(Some(f)),
            None if required => Err(rp.missing("factor")),
            None => Ok(None),
        }
    };

    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor(true)?.unwrap_or(1.0) },
        "dynamic" => {
            if dim <= 2 {
                return Err(HfError::invalid(
                    file,
                    format!("dynamic rope needs a rotary dimension above 2, got {dim}"),
                ));
            }
            RopeScaling::Dynamic {
                factor: factor(true)?.unwrap_or(1.0),
                original_max_position_embeddings: max_position_embeddings,
            }
        }
        "llama3" => {
            let low = rp.positive_f64_opt("low_freq_factor")?.ok_or_else(|| rp.missing("low_freq_factor"))?;
            let high = rp.positive_f64_opt("high_freq_factor")?.ok_or_else(|| rp.missing("high_freq_factor"))?;
            if high <= low {
                return Err(HfError::invalid(
                    file,
                    format!(
                        "`{}`={high} must be larger than `{}`={low}",
                        rp.key("high_freq_factor"),
                        rp.key("low_freq_factor")
                    ),
                ));
            }
            RopeScaling::Llama3 {
                factor: factor(true)?.unwrap_or(1.0),
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original_max()?,
            }
        }
        "yarn" => {
            let omax = original_max()?;
            let factor = factor(false)?.unwrap_or(max_position_embeddings as f64 / omax as f64);
            // Python's `get(k) or default`: zero counts as absent.
            let or_default = |k: &str, default: f64| -> Result<f64, HfError> {
                Ok(rp.f64_opt(k)?.filter(|x| *x != 0.0).unwrap_or(default))
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: omax,
                beta_fast: or_default("beta_fast", 32.0)?,
                beta_slow: or_default("beta_slow", 1.0)?,
                mscale: rp.f64_opt("mscale")?,
                mscale_all_dim: rp.f64_opt("mscale_all_dim")?,
                attention_factor: rp.f64_opt("attention_factor")?,
                truncate: rp.bool_opt("truncate")?.unwrap_or(true),
            }
        }
        "longrope" | "su" => {
            let omax = original_max()?;
            let short_factor = rp.f64_list("short_factor")?;
            let long_factor = rp.f64_list("long_factor")?;
            for (k, list) in [("short_factor", &short_factor), ("long_factor", &long_factor)] {
                if list.len() != dim / 2 {
                    return Err(HfError::bad_value(
                        file,
                        &rp.key(k),
                        format!("a list of {} numbers", list.len()),
                        format!("{} numbers (rotary dimension {dim} / 2)", dim / 2),
                    ));
                }
                if list.iter().any(|x| *x <= 0.0) {
                    return Err(HfError::bad_value(
                        file,
                        &rp.key(k),
                        "a list with a non-positive entry",
                        "positive numbers",
                    ));
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                factor: factor(false)?.unwrap_or(max_position_embeddings as f64 / omax as f64),
                attention_factor: rp.f64_opt("attention_factor")?,
                original_max_position_embeddings: omax,
            }
        }
        other => {
            return Err(HfError::UnknownRopeType {
                file: file.to_string(),
                key: rp.key(type_key),
                found: other.to_string(),
                supported: SUPPORTED_ROPE_TYPES.to_vec(),
            })
        }
    };
    Ok((rope_theta, prf, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURES: &str = "/work/shared/fixtures";

    fn cfg(v: Value) -> Result<HfConfig, HfError> {
        HfConfig::from_json_str(&v.to_string(), "config.json")
    }

    fn base(model_type: &str) -> Value {
        json!({
            "model_type": model_type,
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        })
    }

    fn with(mut v: Value, extra: Value) -> Value {
        if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }

    fn err(v: Value) -> String {
        match cfg(v) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "got {got:?} want {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1e-300), "got {got:?} want {want:?}");
        }
    }

    #[test]
    fn fixtures_parse() {
        let root = Path::new(FIXTURES);
        if !root.is_dir() {
            eprintln!("skipping fixtures_parse: {FIXTURES} does not exist");
            return;
        }
        let load = |name: &str| {
            HfConfig::from_file(root.join(name).join("config.json")).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let llama = load("tiny-llama");
        assert_eq!(llama.arch, Arch::Llama);
        assert_eq!((llama.vocab_size, llama.hidden_size, llama.intermediate_size), (256, 64, 176));
        assert_eq!((llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim), (4, 2, 16));
        assert_eq!(llama.rms_norm_eps, 1e-5);
        assert!(!llama.tie_word_embeddings && !llama.attention_bias && !llama.mlp_bias);
        assert_eq!(llama.hidden_act, Activation::Silu);
        assert_eq!(llama.rope_scaling, RopeScaling::Default);
        assert_eq!(llama.dtype, Some(DType::F32));
        assert_eq!((llama.bos_token_id.clone(), llama.eos_token_id.clone()), (vec![1], vec![2]));
        assert_eq!(llama.sliding_window, None);

        let qwen2 = load("tiny-qwen2");
        assert_eq!(qwen2.arch, Arch::Qwen2);
        assert!(qwen2.attention_bias && !qwen2.o_proj_bias && qwen2.tie_word_embeddings);
        assert_eq!(qwen2.rope_theta, 1e6);
        assert_eq!(qwen2.dtype, Some(DType::BF16));
        assert!(qwen2.bos_token_id.is_empty());
        assert_eq!(qwen2.sliding_window, None);
        assert_eq!(qwen2.layer_types, vec![LayerAttention::Full; 2]);

        let mistral = load("tiny-mistral");
        assert_eq!(mistral.sliding_window, Some(4));
        assert_eq!(mistral.sliding_window_for_layer(1), Some(4));
        assert!(!mistral.attention_bias);

        let qwen3 = load("tiny-qwen3");
        assert_eq!(qwen3.head_dim, 24);
        assert!(qwen3.arch.has_qk_norm() && qwen3.tie_word_embeddings);
        assert_eq!(qwen3.rope_dim(), 24);

        let gemma = load("tiny-gemma");
        assert_eq!(gemma.hidden_act, Activation::GeluTanh);
        assert_eq!((gemma.num_key_value_heads, gemma.head_dim), (1, 32));
        assert!(gemma.tie_word_embeddings);

        let phi3 = load("tiny-phi3");
        assert_eq!(phi3.arch, Arch::Phi3);
        assert_eq!(phi3.partial_rotary_factor, 1.0);
        assert_eq!(phi3.rope_dim(), 16);
        assert_eq!(phi3.sliding_window, None);
        assert_eq!(phi3.eos_token_id, vec![32000]);
        assert_eq!(phi3.pad_token_id, Some(0));
    }

    #[test]
    fn older_keys() {
        let c = cfg(with(
            base("llama"),
            json!({
                "rope_theta": 500000.0,
                "rope_scaling": {"type": "linear", "factor": 2.0},
                "torch_dtype": "bfloat16",
                "eos_token_id": [128001, 128009],
            }),
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.dtype, Some(DType::BF16));
        assert_eq!(c.eos_token_id, vec![128001, 128009]);

        // `rope_type` inside `rope_scaling`, theta at the top level.
        let c = cfg(with(
            base("llama"),
            json!({
                "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            }),
        ))
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        assert_eq!(c.rope_theta, 500000.0);

        // A null rope_scaling falls back to rope_parameters; a missing one to defaults.
        let c = cfg(with(base("qwen2"), json!({"rope_scaling": null, "rope_theta": 1e6}))).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (1e6, RopeScaling::Default));
        let c = cfg(base("mistral")).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.sliding_window, Some(4096));
    }

    #[test]
    fn per_arch_defaults_and_flags() {
        let c = cfg(with(base("gemma"), json!({"hidden_act": "gelu"}))).unwrap();
        assert!(c.tie_word_embeddings);
        assert_eq!(c.hidden_act, Activation::Gelu);
        let c =
            cfg(with(base("gemma"), json!({"hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}))).unwrap();
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert_eq!(cfg(base("gemma")).unwrap().hidden_act, Activation::GeluTanh);

        let c = cfg(with(base("llama"), json!({"attention_bias": true, "mlp_bias": true}))).unwrap();
        assert!(c.attention_bias && c.o_proj_bias && c.mlp_bias);
        let c = cfg(with(base("qwen3"), json!({"attention_bias": true}))).unwrap();
        assert!(c.attention_bias && c.o_proj_bias && !c.mlp_bias);
        let c = cfg(with(base("mistral"), json!({"attention_bias": true}))).unwrap();
        assert!(!c.attention_bias);

        // num_key_value_heads and head_dim defaults.
        let mut v = base("llama");
        if let Some(m) = v.as_object_mut() {
            m.remove("num_key_value_heads");
            m.insert("head_dim".into(), Value::Null);
        }
        let c = cfg(v).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim), (4, 16));

        // Qwen sliding windows need use_sliding_window and apply from max_window_layers on.
        let c = cfg(with(base("qwen2"), json!({"sliding_window": 8}))).unwrap();
        assert_eq!(c.sliding_window, None);
        let c =
            cfg(with(base("qwen2"), json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1})))
                .unwrap();
        assert_eq!(c.sliding_window, Some(8));
        assert_eq!(c.layer_types, vec![LayerAttention::Full, LayerAttention::Sliding]);
        assert_eq!(c.sliding_window_for_layer(0), None);
        let c = cfg(with(
            base("qwen3"),
            json!({"sliding_window": 8, "use_sliding_window": true,
                   "layer_types": ["sliding_attention", "full_attention"]}),
        ))
        .unwrap();
        assert_eq!(c.sliding_window_for_layer(0), Some(8));

        // Phi-3's partial rotary factor, at the top level (older) or in the block.
        let c = cfg(with(base("phi3"), json!({"partial_rotary_factor": 0.5}))).unwrap();
        assert_eq!(c.rope_dim(), 8);
        let c = cfg(with(
            base("phi3"),
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}}),
        ))
        .unwrap();
        assert_eq!(c.rope_dim(), 12);
        assert_eq!(c.rope_inv_freq(1).0.len(), 6);
    }

    /// head_dim 8, theta 1e4: the default frequencies are exactly
    /// 1, 0.1, 0.01, 0.001 (theta^(-i/8) for i = 0, 2, 4, 6).
    fn rope_case(block: Value) -> HfConfig {
        let v = with(
            base("llama"),
            json!({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "max_position_embeddings": 256, "rope_parameters": block}),
        );
        cfg(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn rope_default_and_linear() {
        let c = rope_case(json!({"rope_type": "default", "rope_theta": 10000.0}));
        assert_eq!(c.rope_dim(), 8);
        let (f, a) = c.rope_inv_freq(16);
        close(&f, &[1.0, 0.1, 0.01, 0.001]);
        assert_eq!(a, 1.0);

        let c = rope_case(json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}));
        let (f, a) = c.rope_inv_freq(16);
        close(&f, &[0.25, 0.025, 0.0025, 0.00025]);
        assert_eq!(a, 1.0);
    }

    #[test]
    fn rope_dynamic() {
        let c = rope_case(json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}));
        // Within max_position_embeddings (256) the frequencies are the defaults.
        let (f, a) = c.rope_inv_freq(100);
        close(&f, &[1.0, 0.1, 0.01, 0.001]);
        assert_eq!(a, 1.0);
        // At 512 positions: base = 1e4 * (2 * 512 / 256 - 1)^(8 / 6) = 1e4 * 3^(4/3).
        let base: f64 = 1e4 * 3f64.powf(4.0 / 3.0);
        let (f, _) = c.rope_inv_freq(512);
        close(&f, &[1.0, base.powf(-0.25), base.powf(-0.5), base.powf(-0.75)]);
    }

    #[test]
    fn rope_llama3() {
        let c = rope_case(json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}));
        // Wavelengths 2*pi/f: 6.28 (< 64/4, kept), 62.8 (between 16 and 64,
        // blended), 628 and 6283 (> 64, divided by 8).
        let smooth = (64.0 / (2.0 * PI / 0.1) - 1.0) / (4.0 - 1.0);
        let mid = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        let (f, a) = c.rope_inv_freq(16);
        close(&f, &[1.0, mid, 0.01 / 8.0, 0.001 / 8.0]);
        assert_eq!(a, 1.0);
    }

    #[test]
    fn rope_yarn() {
        // correction_dim(r) = 8 ln(64 / (2 pi r)) / (2 ln 1e4): r=32 -> -0.497
        // (floor -1, clamped to 0), r=1 -> 1.008 (ceil 2). The ramp over 4
        // frequencies is [0, 0.5, 1, 1], so extrapolation keeps [1, 0.5, 0, 0].
        let block = json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 64});
        let c = rope_case(block.clone());
        let (f, a) = c.rope_inv_freq(16);
        close(&f, &[1.0, 0.5 * 0.1 / 4.0 + 0.5 * 0.1, 0.01 / 4.0, 0.001 / 4.0]);
        assert!((a - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);

        // Without truncation the ramp ends at 1.008 exactly.
        let mut b = block.clone();
        b["truncate"] = json!(false);
        let high = 8.0 * (64.0 / (2.0 * PI)).ln() / (2.0 * 1e4f64.ln());
        let keep = 1.0 - 1.0 / high;
        let (f, _) = rope_case(b).rope_inv_freq(16);
        close(&f, &[1.0, (1.0 - keep) * 0.1 / 4.0 + keep * 0.1, 0.01 / 4.0, 0.001 / 4.0]);

        // mscale / mscale_all_dim set the attention factor; an explicit one wins.
        let mut b = block.clone();
        b["mscale"] = json!(1.0);
        b["mscale_all_dim"] = json!(0.5);
        let (_, a) = rope_case(b).rope_inv_freq(16);
        let want = (0.1 * 4f64.ln() + 1.0) / (0.05 * 4f64.ln() + 1.0);
        assert!((a - want).abs() < 1e-15);
        let mut b = block;
        b["attention_factor"] = json!(0.5);
        assert_eq!(rope_case(b).rope_inv_freq(16).1, 0.5);

        // Without factor, yarn uses max_position_embeddings / original (256 / 64).
        let c = rope_case(json!({"rope_type": "yarn", "rope_theta": 10000.0,
                                 "original_max_position_embeddings": 64}));
        assert!(matches!(c.rope_scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    }

    #[test]
    fn rope_longrope() {
        let c = rope_case(json!({"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0, 1.0, 2.0, 4.0],
                                 "long_factor": [2.0, 2.0, 4.0, 8.0],
                                 "original_max_position_embeddings": 64}));
        // factor = 256 / 64 = 4; attention = sqrt(1 + ln 4 / ln 64) = sqrt(4/3).
        let (f, a) = c.rope_inv_freq(64);
        close(&f, &[1.0, 0.1, 0.005, 0.00025]);
        assert!((a - (4.0f64 / 3.0).sqrt()).abs() < 1e-15);
        let (f, _) = c.rope_inv_freq(65);
        close(&f, &[0.5, 0.05, 0.0025, 0.000125]);

        // Phi-3 keeps original_max_position_embeddings at the top level; the older "su" name.
        let c = cfg(with(
            base("phi3"),
            json!({"original_max_position_embeddings": 128,
                   "rope_scaling": {"type": "su", "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8]}}),
        ))
        .unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::LongRope { original_max_position_embeddings: 128, factor, .. } if factor == 2.0
        ));
    }

    #[test]
    fn error_messages() {
        let mut v = base("llama");
        if let Some(m) = v.as_object_mut() {
            m.remove("hidden_size");
        }
        assert_eq!(err(v), "config.json: key `hidden_size` missing");

        let e =
            HfConfig::from_json_str("{\n  \"model_type\": \"llama\",\n    ]", "config.json").unwrap_err().to_string();
        assert!(e.starts_with("config.json: malformed JSON at line 3 column 5: "), "{e}");

        assert_eq!(
            err(with(base("llama"), json!({"model_type": "bert"}))),
            "config.json: unknown model_type `bert` (supported: llama, mistral, qwen2, qwen3, gemma, phi3)"
        );
        assert_eq!(
            err(with(base("llama"), json!({"num_attention_heads": 0}))),
            "config.json: key `num_attention_heads` is 0, expected a positive integer"
        );
        assert_eq!(
            err(with(base("llama"), json!({"hidden_size": "64"}))),
            "config.json: key `hidden_size` is \"64\" (a string), expected a positive integer"
        );
        assert_eq!(
            err(with(base("llama"), json!({"hidden_size": 66}))),
            "config.json: hidden_size=66 is not divisible by num_attention_heads=4, and head_dim is not given"
        );
        assert_eq!(
            err(with(base("llama"), json!({"num_key_value_heads": 3}))),
            "config.json: num_attention_heads=4 is not divisible by num_key_value_heads=3"
        );
        assert_eq!(
            err(with(base("llama"), json!({"rope_parameters": {"rope_type": "ntk-by-parts"}}))),
            "config.json: key `rope_parameters.rope_type` is `ntk-by-parts`, an unknown rope type \
             (supported: default, linear, dynamic, yarn, longrope, llama3)"
        );
        assert_eq!(
            err(with(base("llama"), json!({"rope_scaling": {"type": "linear"}}))),
            "config.json: key `rope_scaling.factor` missing"
        );
        assert_eq!(
            err(with(base("llama"), json!({"hidden_act": "relu"}))),
            "config.json: key `hidden_act` is `relu`, expected one of silu, swish, gelu_pytorch_tanh, \
             gelu_tanh, gelu_new, gelu_fast, gelu"
        );
        assert!(err(with(
            base("llama"),
            json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}})
        ))
        .contains("key `rope_scaling.short_factor` is a list of 1 numbers, expected 8 numbers"));
        assert_eq!(err(json!([1, 2])), "config.json: the top level is [1,2] (a list), expected a JSON object");
        let e = HfConfig::from_file("/nonexistent/config.json").unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/config.json: "), "{e}");
    }

    #[test]
    fn supported_types_match_arch() {
        let names: Vec<_> = Arch::ALL.iter().map(|a| a.model_type()).collect();
        assert_eq!(names, supported_model_types());
    }
}
