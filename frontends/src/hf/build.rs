//! Builds the smelt IR of a Hugging Face decoder from its typed config and
//! its checkpoint, from **primitive ops only**, in the order and spelling the
//! transformers Python code computes (eager attention, float32 math). The
//! fusion passes must then find RMSNorm, RoPE, attention and the gated MLP in
//! this graph exactly as they find them in exported ONNX graphs.
//!
//! The signature is the decoder-with-past convention of the fixtures'
//! `model-kv.onnx`: inputs `input_ids [batch, seq]`, `attention_mask
//! [batch, past + seq]`, `position_ids [batch, seq]`,
//! `past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]`; outputs
//! `logits [batch, seq, vocab]` and `present.{i}.key/value`. Every input is
//! required by the graph; callers that want defaults (all-ones mask,
//! positions `past..past+seq`, an empty cache) fill them in (the runtime does).
//!
//! Assumes a validated [`HfConfig`]: sizes positive and divisible as the
//! config parser checks. Every checkpoint tensor is checked for shape and
//! dtype before use, with messages naming the tensor and the config keys the
//! expected shape comes from.

use super::config::{Activation, Arch, HfConfig, RopeScaling};
use super::{Checkpoint, HfError};
use smelt_ir::{DType, Dim, Graph, GraphError, Op, StoredTensor, Tensor, TensorType, ValueId};
use std::collections::BTreeMap;
use std::path::Path;

/// A Hugging Face model as smelt IR plus the weights the graph references
/// (in their stored dtype; the graph casts them to f32 where it computes):
/// as [`Tensor`]s (what the interpreter runs on), or as [`StoredTensor`]s
/// sharing the checkpoint's mapped bytes (what a compile reads).
#[derive(Debug, Clone)]
pub struct HfModel<W = Tensor> {
    pub graph: Graph,
    pub weights: BTreeMap<String, W>,
    pub config: HfConfig,
}

impl HfModel {
    /// Total number of weight elements (what model cards call parameters).
    pub fn parameter_count(&self) -> usize {
        self.weights.values().map(Tensor::numel).sum()
    }
}

impl HfModel<StoredTensor> {
    /// Total number of weight elements (what model cards call parameters).
    pub fn parameter_count(&self) -> usize {
        self.weights.values().map(StoredTensor::numel).sum()
    }

    /// The weights read into [`Tensor`]s.
    pub fn into_tensors(self) -> HfModel {
        let weights = self.weights.into_iter().map(|(n, t)| (n, t.to_tensor())).collect();
        HfModel { graph: self.graph, weights, config: self.config }
    }
}

/// Opens a checkpoint folder and builds its graph.
pub fn load(dir: &Path) -> Result<HfModel, HfError> {
    Ok(load_stored(dir)?.into_tensors())
}

/// Opens a checkpoint folder and builds its graph, leaving the weights in
/// the mapped files.
pub fn load_stored(dir: &Path) -> Result<HfModel<StoredTensor>, HfError> {
    load_stored_with(dir, &HfOptions::default())
}

/// [`load_stored`] with options.
pub fn load_stored_with(dir: &Path, options: &HfOptions) -> Result<HfModel<StoredTensor>, HfError> {
    let ckpt = Checkpoint::open(dir)?;
    build_stored_with(&ckpt, options)
}

/// How a checkpoint becomes a graph where transformers itself computes
/// differently depending on how the model was made.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HfOptions {
    /// Round the RoPE inverse frequencies to this dtype (bf16 or f16),
    /// as a transformers model cast in memory (`model.to(torch.bfloat16)`)
    /// does with its `inv_freq` buffer, which stays rounded when cast back
    /// to float32. `None` (the default): exact float32 frequencies, as
    /// `from_pretrained` computes them for any checkpoint, bf16 ones
    /// included. The rounding changes a rotation angle by up to 2^-9 of
    /// itself, so the two disagree more the longer the sequence (checked
    /// with transformers 5.24: on the bf16 `tiny-qwen2` fixture,
    /// `from_pretrained` is 3.6e-3 from the fixture's reference logits,
    /// made from a cast model, and 1.3e-5 with rounded frequencies).
    /// Frequencies computed per call from the positions (dynamic NTK,
    /// longrope's choice of factors) stay exact either way, as before.
    pub rope_cast: Option<DType>,
}

impl HfOptions {
    /// The options that reproduce a model cast in memory to the
    /// checkpoint's stored dtype and back (how the fixtures' references
    /// were made): RoPE frequencies rounded to it when it is bf16 or f16.
    pub fn cast_to_stored(cfg: &HfConfig) -> HfOptions {
        HfOptions { rope_cast: cfg.dtype.filter(|d| matches!(d, DType::BF16 | DType::F16)) }
    }
}

/// Builds the graph of an opened checkpoint.
pub fn build(ckpt: &Checkpoint) -> Result<HfModel, HfError> {
    Ok(build_stored(ckpt)?.into_tensors())
}

/// Builds the graph of an opened checkpoint; the weights share its mapped
/// bytes.
pub fn build_stored(ckpt: &Checkpoint) -> Result<HfModel<StoredTensor>, HfError> {
    build_stored_with(ckpt, &HfOptions::default())
}

/// [`build_stored`] with options.
pub fn build_stored_with(ckpt: &Checkpoint, options: &HfOptions) -> Result<HfModel<StoredTensor>, HfError> {
    let cfg = ckpt.config().clone();
    if let Some(d) = options.rope_cast.filter(|d| !matches!(d, DType::BF16 | DType::F16 | DType::F32)) {
        return Err(HfError::invalid(
            &cfg.source,
            format!("RoPE frequencies can be rounded to bf16 or f16 (a model cast to that dtype), not {d}"),
        ));
    }
    let mut b = Builder {
        g: Graph::new(cfg.arch.causal_lm_class()),
        cfg: &cfg,
        options,
        ckpt,
        weights: BTreeMap::new(),
        weight_values: BTreeMap::new(),
        context: String::new(),
    };
    b.decoder()?;
    Ok(HfModel { graph: b.g, weights: b.weights, config: cfg })
}

/// The float32 value of `torch.finfo(torch.float32).min`, which transformers
/// adds to masked attention scores (not -inf, so fully masked rows stay finite).
const F32_MIN: f32 = f32::MIN;

struct Builder<'a> {
    g: Graph,
    cfg: &'a HfConfig,
    options: &'a HfOptions,
    ckpt: &'a Checkpoint,
    weights: BTreeMap<String, StoredTensor>,
    /// Weight name -> its f32 value in the graph, so tied weights are read once.
    weight_values: BTreeMap<String, ValueId>,
    /// What is being built, for messages ("layer 3 self_attn").
    context: String,
}

fn dims(v: &[Dim]) -> Vec<Dim> {
    v.to_vec()
}

impl Builder<'_> {
    fn err(&self, e: GraphError) -> HfError {
        HfError::invalid(
            &self.cfg.source,
            format!("building {}: {e} (the config's sizes do not fit together)", self.context),
        )
    }

    fn op(&mut self, op: Op, ins: &[ValueId]) -> Result<ValueId, HfError> {
        let label = self.context.clone();
        self.g.add_labeled(op, ins, Some(&label)).map_err(|e| self.err(e))
    }

    fn scalar(&mut self, v: f32) -> Result<ValueId, HfError> {
        self.op(Op::Constant { value: Tensor::scalar_f32(v) }, &[])
    }

    fn vector(&mut self, values: Vec<f32>) -> Result<ValueId, HfError> {
        let n = values.len();
        let value = Tensor::from_f32(DType::F32, vec![n], values)
            .map_err(|e| HfError::invalid(&self.cfg.source, e.to_string()))?;
        self.op(Op::Constant { value }, &[])
    }

    fn binary(&mut self, op: Op, a: ValueId, b: ValueId) -> Result<ValueId, HfError> {
        self.op(op, &[a, b])
    }

    fn mul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, HfError> {
        self.binary(Op::Mul {}, a, b)
    }

    fn add(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, HfError> {
        self.binary(Op::Add {}, a, b)
    }

    fn reshape(&mut self, x: ValueId, shape: Vec<Dim>) -> Result<ValueId, HfError> {
        self.op(Op::Reshape { shape }, &[x])
    }

    fn transpose(&mut self, x: ValueId, perm: &[i64]) -> Result<ValueId, HfError> {
        self.op(Op::Transpose { perm: perm.to_vec() }, &[x])
    }

    fn slice_last(&mut self, x: ValueId, start: usize, end: usize) -> Result<ValueId, HfError> {
        self.op(
            Op::Slice { axes: vec![-1], starts: vec![Dim::from(start)], ends: vec![Dim::from(end)], steps: vec![1] },
            &[x],
        )
    }

    /// A checkpoint tensor of the expected shape as an f32 graph value: a
    /// `weight` node in the stored dtype, cast to f32 when stored narrower
    /// (the reference computes in f32 on the stored values).
    fn weight(&mut self, name: &str, shape: &[usize], why: &str) -> Result<ValueId, HfError> {
        if let Some(v) = self.weight_values.get(name) {
            return Ok(*v);
        }
        self.ckpt.expect(name, shape, why)?;
        let tensor = self.ckpt.get_stored(name)?;
        let dtype = tensor.dtype;
        self.weights.insert(name.to_string(), tensor);
        let mut v = self.g.add_weight(name, TensorType::fixed(dtype, shape));
        if dtype != DType::F32 {
            v = self.op(Op::Cast { to: DType::F32 }, &[v])?;
        }
        self.weight_values.insert(name.to_string(), v);
        Ok(v)
    }

    /// `nn.Linear`: x @ Wᵀ (+ b), with W stored [out, in].
    fn linear(
        &mut self,
        x: ValueId,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        why: &str,
    ) -> Result<ValueId, HfError> {
        let w = self.weight(&format!("{name}.weight"), &[out, inp], why)?;
        let wt = self.transpose(w, &[1, 0])?;
        let mut y = self.op(Op::MatMul {}, &[x, wt])?;
        if bias {
            let b = self.weight(&format!("{name}.bias"), &[out], why)?;
            y = self.add(y, b)?;
        }
        Ok(y)
    }

    /// RMSNorm over the last axis, spelled as `LlamaRMSNorm.forward`:
    /// `w * (x * rsqrt(mean(x^2) + eps))`; Gemma multiplies by `(1 + w)`.
    fn rms_norm(&mut self, x: ValueId, name: &str, dim: usize, why: &str) -> Result<ValueId, HfError> {
        let w = self.weight(&format!("{name}.weight"), &[dim], why)?;
        let two = self.scalar(2.0)?;
        let sq = self.binary(Op::Pow {}, x, two)?;
        let var = self.op(Op::ReduceMean { axes: vec![-1], keepdims: true }, &[sq])?;
        let eps = self.scalar(self.cfg.rms_norm_eps as f32)?;
        let var_eps = self.add(var, eps)?;
        let inv = self.op(Op::Rsqrt {}, &[var_eps])?;
        let normed = self.mul(x, inv)?;
        if self.cfg.arch.norm_adds_one() {
            let one = self.scalar(1.0)?;
            let w1 = self.add(one, w)?;
            self.mul(normed, w1)
        } else {
            self.mul(w, normed)
        }
    }

    fn activation(&mut self, x: ValueId) -> Result<ValueId, HfError> {
        match self.cfg.hidden_act {
            Activation::Silu => {
                let s = self.op(Op::Sigmoid {}, &[x])?;
                self.mul(x, s)
            }
            // transformers' GELUTanh / PytorchGELUTanh:
            // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).
            Activation::GeluTanh => {
                let three = self.scalar(3.0)?;
                let cube = self.binary(Op::Pow {}, x, three)?;
                let k = self.scalar(0.044715)?;
                let t = self.mul(k, cube)?;
                let inner = self.add(x, t)?;
                let c = self.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32)?;
                let scaled = self.mul(c, inner)?;
                let th = self.op(Op::Tanh {}, &[scaled])?;
                let one = self.scalar(1.0)?;
                let onep = self.add(one, th)?;
                let half = self.scalar(0.5)?;
                let hx = self.mul(half, x)?;
                self.mul(hx, onep)
            }
            // Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))).
            Activation::Gelu => {
                let r = self.scalar(std::f32::consts::SQRT_2)?;
                let xs = self.binary(Op::Div {}, x, r)?;
                let e = self.op(Op::Erf {}, &[xs])?;
                let one = self.scalar(1.0)?;
                let onep = self.add(one, e)?;
                let half = self.scalar(0.5)?;
                let hx = self.mul(half, x)?;
                self.mul(hx, onep)
            }
        }
    }

    fn decoder(&mut self) -> Result<(), HfError> {
        let cfg = self.cfg;
        let (h, v, layers) = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers);
        let (kvh, hd) = (cfg.num_key_value_heads, cfg.head_dim);
        // The context bound: the config's maximum, except that dynamic NTK
        // scaling exists to run past it (by up to its factor).
        let max_ctx = match cfg.rope_scaling {
            RopeScaling::Dynamic { factor, .. } => (cfg.max_position_embeddings as f64 * factor.max(1.0)) as i64,
            _ => cfg.max_position_embeddings as i64,
        };
        self.g.declare_symbol("batch", 1, 1024);
        self.g.declare_symbol("seq", 1, max_ctx);
        self.g.declare_symbol("past", 0, max_ctx);
        let (batch, seq, past) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
        let total = past.clone() + seq.clone();

        let input_ids = self.g.add_input("input_ids", TensorType::new(DType::I64, dims(&[batch.clone(), seq.clone()])));
        let attention_mask =
            self.g.add_input("attention_mask", TensorType::new(DType::I64, dims(&[batch.clone(), total.clone()])));
        let position_ids =
            self.g.add_input("position_ids", TensorType::new(DType::I64, dims(&[batch.clone(), seq.clone()])));
        let kv_ty = |len: Dim| TensorType::new(DType::F32, vec![batch.clone(), Dim::from(kvh), len, Dim::from(hd)]);
        let mut pasts = Vec::new();
        for i in 0..layers {
            let k = self.g.add_input(&format!("past_key_values.{i}.key"), kv_ty(past.clone()));
            let vv = self.g.add_input(&format!("past_key_values.{i}.value"), kv_ty(past.clone()));
            pasts.push((k, vv));
        }

        self.context = "embed_tokens".into();
        let embed = self.weight("model.embed_tokens.weight", &[v, h], "vocab_size x hidden_size from config.json")?;
        let mut hidden = self.op(Op::Gather { axis: 0 }, &[embed, input_ids])?;
        if cfg.arch.scales_embeddings() {
            // Gemma: `hidden * torch.tensor(hidden_size**0.5, dtype=hidden.dtype)`.
            let norm = self.scalar((h as f64).sqrt() as f32)?;
            hidden = self.mul(hidden, norm)?;
        }

        self.context = "rotary_emb".into();
        let (cos, sin) = self.rope_tables(position_ids)?;
        self.context = "causal_mask".into();
        let full_mask = self.attention_mask_bias(attention_mask, None)?;
        let mut sliding_mask = None;
        let mut presents = Vec::new();

        for (i, &past_kv) in pasts.iter().enumerate() {
            self.context = format!("layer {i}");
            let window = cfg.sliding_window_for_layer(i);
            let mask = match window {
                None => full_mask,
                Some(w) => match sliding_mask {
                    Some(m) => m,
                    None => {
                        let m = self.attention_mask_bias(attention_mask, Some(w))?;
                        sliding_mask = Some(m);
                        m
                    }
                },
            };
            let p = format!("model.layers.{i}");
            let residual = hidden;
            let normed = self.rms_norm(hidden, &format!("{p}.input_layernorm"), h, "hidden_size from config.json")?;
            self.context = format!("layer {i} self_attn");
            let (attn, k_all, v_all) = self.attention(i, normed, cos, sin, mask, past_kv)?;
            presents.push((format!("present.{i}.key"), k_all));
            presents.push((format!("present.{i}.value"), v_all));
            hidden = self.add(residual, attn)?;
            self.context = format!("layer {i} mlp");
            let residual = hidden;
            let normed =
                self.rms_norm(hidden, &format!("{p}.post_attention_layernorm"), h, "hidden_size from config.json")?;
            let mlp = self.mlp(&p, normed)?;
            hidden = self.add(residual, mlp)?;
        }

        self.context = "norm".into();
        let normed = self.rms_norm(hidden, "model.norm", h, "hidden_size from config.json")?;
        self.context = "lm_head".into();
        let head = if cfg.tie_word_embeddings && !self.ckpt.contains("lm_head.weight") {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        let logits = self.linear(normed, head, v, h, false, "vocab_size x hidden_size from config.json")?;
        // Outputs in the fixtures' order: logits first, then present.*.
        self.g.set_output("logits", logits);
        for (name, v) in presents {
            self.g.set_output(&name, v);
        }
        Ok(())
    }

    /// cos and sin `[batch, seq, rope_dim]`, spelled as `LlamaRotaryEmbedding.forward`:
    /// `freqs = (inv_freq[None, :, None] @ position_ids[:, None, :]).T`,
    /// `emb = cat(freqs, freqs)`, `cos = emb.cos() * attention_scaling`.
    fn rope_tables(&mut self, position_ids: ValueId) -> Result<(ValueId, ValueId), HfError> {
        let cfg = self.cfg;
        let half = cfg.rope_dim() / 2;
        let batch = Dim::sym("batch");
        let (inv_freq, scaling) = match &cfg.rope_scaling {
            // Dynamic NTK rescales the base from the longest position seen:
            // seq_len = max(position_ids) + 1 (transformers' `dynamic_rope_update`
            // for a growing sequence), so the frequencies are computed in the graph.
            RopeScaling::Dynamic { factor, original_max_position_embeddings } => {
                (self.dynamic_inv_freq(position_ids, *factor, *original_max_position_embeddings)?, 1.0)
            }
            RopeScaling::LongRope { original_max_position_embeddings, .. } => {
                // Short factors up to the original context, long factors beyond,
                // chosen at run time from the longest position.
                let omax = *original_max_position_embeddings;
                let (short, scaling) = cfg.rope_inv_freq(omax);
                let (long, _) = cfg.rope_inv_freq(omax + 1);
                let short = self.vector(short.iter().map(|&x| x as f32).collect())?;
                let long = self.vector(long.iter().map(|&x| x as f32).collect())?;
                let longer = self.longest_position_exceeds(position_ids, omax)?;
                (self.op(Op::Where {}, &[longer, long, short])?, scaling)
            }
            _ => {
                let (f, scaling) = cfg.rope_inv_freq(cfg.max_position_embeddings);
                // Exact, as `from_pretrained` computes them, unless asked
                // to match a model cast in memory (see `HfOptions`).
                let stored = self.options.rope_cast.unwrap_or(DType::F32);
                let f = f.iter().map(|&x| smelt_ir::tensor::round_to(stored, x as f32)).collect();
                (self.vector(f)?, scaling)
            }
        };
        let inv = self.reshape(inv_freq, vec![Dim::c(1), Dim::from(half), Dim::c(1)])?;
        let inv = self.op(Op::Expand { shape: vec![batch, Dim::from(half), Dim::c(1)] }, &[inv])?;
        let pos = self.op(Op::Unsqueeze { axes: vec![1] }, &[position_ids])?;
        let pos = self.op(Op::Cast { to: DType::F32 }, &[pos])?;
        let freqs = self.op(Op::MatMul {}, &[inv, pos])?;
        let freqs = self.transpose(freqs, &[0, 2, 1])?;
        let emb = self.op(Op::Concat { axis: -1 }, &[freqs, freqs])?;
        let mut cos = self.op(Op::Cos {}, &[emb])?;
        let mut sin = self.op(Op::Sin {}, &[emb])?;
        if scaling != 1.0 {
            let s = self.scalar(scaling as f32)?;
            cos = self.mul(cos, s)?;
            sin = self.mul(sin, s)?;
        }
        Ok((cos, sin))
    }

    /// A bool scalar: max(position_ids) + 1 > `limit`.
    fn longest_position_exceeds(&mut self, position_ids: ValueId, limit: usize) -> Result<ValueId, HfError> {
        let mx = self.op(Op::ReduceMax { axes: vec![0, 1], keepdims: false }, &[position_ids])?;
        let lim = self.op(
            Op::Constant {
                value: Tensor::from_i64(DType::I64, vec![], vec![limit as i64 - 1])
                    .map_err(|e| HfError::invalid(&self.cfg.source, e.to_string()))?,
            },
            &[],
        )?;
        self.binary(Op::Gt {}, mx, lim)
    }

    /// `_compute_dynamic_ntk_parameters` in the graph: when the sequence is
    /// longer than the original context, `base * ((factor * L / omax) - (factor - 1)) ** (d / (d - 2))`.
    fn dynamic_inv_freq(&mut self, position_ids: ValueId, factor: f64, omax: usize) -> Result<ValueId, HfError> {
        let d = self.cfg.rope_dim() as f64;
        let mx = self.op(Op::ReduceMax { axes: vec![0, 1], keepdims: false }, &[position_ids])?;
        let len = self.op(Op::Cast { to: DType::F32 }, &[mx])?;
        let one = self.scalar(1.0)?;
        let len = self.add(len, one)?;
        let ratio = self.scalar((factor / omax as f64) as f32)?;
        let t = self.mul(len, ratio)?;
        let sub = self.scalar((factor - 1.0) as f32)?;
        let t = self.binary(Op::Sub {}, t, sub)?;
        let ex = self.scalar((d / (d - 2.0)) as f32)?;
        let t = self.binary(Op::Pow {}, t, ex)?;
        let theta = self.scalar(self.cfg.rope_theta as f32)?;
        let scaled_base = self.mul(theta, t)?;
        let longer = self.longest_position_exceeds(position_ids, omax)?;
        let base = self.op(Op::Where {}, &[longer, scaled_base, theta])?;
        // inv_freq = 1 / base ** (arange(0, d, 2) / d)
        let exps: Vec<f32> = (0..self.cfg.rope_dim()).step_by(2).map(|i| (i as f64 / d) as f32).collect();
        let exps = self.vector(exps)?;
        let p = self.binary(Op::Pow {}, base, exps)?;
        self.op(Op::Reciprocal {}, &[p])
    }

    /// The additive attention bias `[batch, 1, seq, past + seq]` that
    /// transformers' `create_causal_mask` builds: 0 where query i (at cache
    /// position past + i) may see key j (j <= past + i, inside the window if
    /// any, and attention_mask[b, j] == 1), float32 min elsewhere.
    fn attention_mask_bias(&mut self, attention_mask: ValueId, window: Option<usize>) -> Result<ValueId, HfError> {
        let (past, seq) = (Dim::sym("past"), Dim::sym("seq"));
        let total = past.clone() + seq.clone();
        let q_pos = self.op(Op::Range { start: past.clone(), end: total.clone(), step: 1, dtype: DType::I64 }, &[])?;
        let k_pos = self.op(Op::Range { start: Dim::c(0), end: total, step: 1, dtype: DType::I64 }, &[])?;
        let q_col = self.op(Op::Unsqueeze { axes: vec![1] }, &[q_pos])?;
        let k_row = self.op(Op::Unsqueeze { axes: vec![0] }, &[k_pos])?;
        let mut allowed = self.binary(Op::Le {}, k_row, q_col)?;
        if let Some(w) = window {
            // Sliding window: kv_idx > q_idx - window.
            let wc = self.op(
                Op::Constant {
                    value: Tensor::from_i64(DType::I64, vec![], vec![w as i64])
                        .map_err(|e| HfError::invalid(&self.cfg.source, e.to_string()))?,
                },
                &[],
            )?;
            let lo = self.binary(Op::Sub {}, q_col, wc)?;
            let inside = self.binary(Op::Gt {}, k_row, lo)?;
            allowed = self.binary(Op::And {}, allowed, inside)?;
        }
        let pad = self.op(Op::Cast { to: DType::Bool }, &[attention_mask])?;
        let pad = self.op(Op::Unsqueeze { axes: vec![1, 2] }, &[pad])?;
        let allowed = self.op(Op::Unsqueeze { axes: vec![0, 1] }, &[allowed])?;
        let allowed = self.binary(Op::And {}, pad, allowed)?;
        let zero = self.scalar(0.0)?;
        let neg = self.scalar(F32_MIN)?;
        self.op(Op::Where {}, &[allowed, zero, neg])
    }

    /// Projects q/k/v, applies rope, appends to the cache, runs eager
    /// attention and the output projection. Returns (output, present key, present value).
    fn attention(
        &mut self,
        layer: usize,
        x: ValueId,
        cos: ValueId,
        sin: ValueId,
        mask: ValueId,
        past: (ValueId, ValueId),
    ) -> Result<(ValueId, ValueId, ValueId), HfError> {
        let cfg = self.cfg;
        let (h, nh, kvh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let p = format!("model.layers.{layer}.self_attn");
        let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
        let why_q = format!("num_attention_heads={nh} x head_dim={hd} rows from config.json");
        let why_kv = format!("num_key_value_heads={kvh} x head_dim={hd} rows from config.json");
        let (q, k, v) = if cfg.arch.fused_projections() {
            let rows = (nh + 2 * kvh) * hd;
            let why = format!(
                "(num_attention_heads={nh} + 2 x num_key_value_heads={kvh}) x head_dim={hd} rows from config.json"
            );
            let qkv = self.linear(x, &format!("{p}.qkv_proj"), rows, h, false, &why)?;
            let q = self.slice_last(qkv, 0, nh * hd)?;
            let k = self.slice_last(qkv, nh * hd, (nh + kvh) * hd)?;
            let v = self.slice_last(qkv, (nh + kvh) * hd, rows)?;
            (q, k, v)
        } else {
            let bias = cfg.attention_bias;
            let q = self.linear(x, &format!("{p}.q_proj"), nh * hd, h, bias, &why_q)?;
            let k = self.linear(x, &format!("{p}.k_proj"), kvh * hd, h, bias, &why_kv)?;
            let v = self.linear(x, &format!("{p}.v_proj"), kvh * hd, h, bias, &why_kv)?;
            (q, k, v)
        };
        let heads = |n: usize| vec![batch.clone(), seq.clone(), Dim::from(n), Dim::from(hd)];
        let mut q = self.reshape(q, heads(nh))?;
        let mut k = self.reshape(k, heads(kvh))?;
        let v = self.reshape(v, heads(kvh))?;
        if cfg.arch.has_qk_norm() {
            q = self.rms_norm(q, &format!("{p}.q_norm"), hd, "head_dim from config.json")?;
            k = self.rms_norm(k, &format!("{p}.k_norm"), hd, "head_dim from config.json")?;
        }
        let q = self.transpose(q, &[0, 2, 1, 3])?;
        let k = self.transpose(k, &[0, 2, 1, 3])?;
        let v = self.transpose(v, &[0, 2, 1, 3])?;
        let cos4 = self.op(Op::Unsqueeze { axes: vec![1] }, &[cos])?;
        let sin4 = self.op(Op::Unsqueeze { axes: vec![1] }, &[sin])?;
        let q = self.apply_rope(q, cos4, sin4)?;
        let k = self.apply_rope(k, cos4, sin4)?;
        let k_all = self.op(Op::Concat { axis: -2 }, &[past.0, k])?;
        let v_all = self.op(Op::Concat { axis: -2 }, &[past.1, v])?;
        let (k_rep, v_rep) = (self.repeat_kv(k_all)?, self.repeat_kv(v_all)?);
        let kt = self.transpose(k_rep, &[0, 1, 3, 2])?;
        let scores = self.op(Op::MatMul {}, &[q, kt])?;
        let scale = self.scalar((hd as f64).powf(-0.5) as f32)?;
        let scores = self.mul(scores, scale)?;
        let scores = self.add(scores, mask)?;
        let probs = self.softmax(scores)?;
        let out = self.op(Op::MatMul {}, &[probs, v_rep])?;
        let out = self.transpose(out, &[0, 2, 1, 3])?;
        let out = self.reshape(out, vec![batch, seq, Dim::from(nh * hd)])?;
        let o = self.linear(
            out,
            &format!("{p}.o_proj"),
            h,
            nh * hd,
            cfg.o_proj_bias,
            &format!("hidden_size={h} x num_attention_heads={nh}*head_dim={hd} from config.json"),
        )?;
        Ok((o, k_all, v_all))
    }

    /// `apply_rotary_pos_emb`: `x * cos + rotate_half(x) * sin` on the first
    /// `rope_dim` features (partial rotary passes the rest through).
    fn apply_rope(&mut self, x: ValueId, cos: ValueId, sin: ValueId) -> Result<ValueId, HfError> {
        let (hd, rot) = (self.cfg.head_dim, self.cfg.rope_dim());
        let (x_rot, x_pass) =
            if rot < hd { (self.slice_last(x, 0, rot)?, Some(self.slice_last(x, rot, hd)?)) } else { (x, None) };
        let x1 = self.slice_last(x_rot, 0, rot / 2)?;
        let x2 = self.slice_last(x_rot, rot / 2, rot)?;
        let nx2 = self.op(Op::Neg {}, &[x2])?;
        let rotated = self.op(Op::Concat { axis: -1 }, &[nx2, x1])?;
        let a = self.mul(x_rot, cos)?;
        let b = self.mul(rotated, sin)?;
        let y = self.add(a, b)?;
        match x_pass {
            Some(pass) => self.op(Op::Concat { axis: -1 }, &[y, pass]),
            None => Ok(y),
        }
    }

    /// `repeat_kv`: `x[:, :, None].expand(b, kvh, n_rep, t, d).reshape(b, kvh * n_rep, t, d)`.
    fn repeat_kv(&mut self, x: ValueId) -> Result<ValueId, HfError> {
        let n_rep = self.cfg.kv_group_size();
        if n_rep == 1 {
            return Ok(x);
        }
        let ty = self.g.ty(x).clone();
        let [b, kvh, t, d] = <[Dim; 4]>::try_from(ty.shape)
            .map_err(|s| HfError::invalid(&self.cfg.source, format!("kv cache rank {} is not 4", s.len())))?;
        let x5 = self.op(Op::Unsqueeze { axes: vec![2] }, &[x])?;
        let e =
            self.op(Op::Expand { shape: vec![b.clone(), kvh.clone(), Dim::from(n_rep), t.clone(), d.clone()] }, &[x5])?;
        self.reshape(e, vec![b, kvh * Dim::from(n_rep), t, d])
    }

    /// Softmax over the last axis in primitives: exp(x - max) / sum(exp(x - max)).
    fn softmax(&mut self, x: ValueId) -> Result<ValueId, HfError> {
        let mx = self.op(Op::ReduceMax { axes: vec![-1], keepdims: true }, &[x])?;
        let sh = self.binary(Op::Sub {}, x, mx)?;
        let e = self.op(Op::Exp {}, &[sh])?;
        let s = self.op(Op::ReduceSum { axes: vec![-1], keepdims: true }, &[e])?;
        self.binary(Op::Div {}, e, s)
    }

    /// `down(act(gate(x)) * up(x))`; Phi-3 reads gate and up from one fused weight.
    fn mlp(&mut self, p: &str, x: ValueId) -> Result<ValueId, HfError> {
        let cfg = self.cfg;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let why = format!("intermediate_size={i} x hidden_size={h} from config.json");
        let (gate, up) = if cfg.arch.fused_projections() {
            let gu = self.linear(x, &format!("{p}.mlp.gate_up_proj"), 2 * i, h, false, &format!("2 x {why}"))?;
            (self.slice_last(gu, 0, i)?, self.slice_last(gu, i, 2 * i)?)
        } else {
            let gate = self.linear(x, &format!("{p}.mlp.gate_proj"), i, h, cfg.mlp_bias, &why)?;
            let up = self.linear(x, &format!("{p}.mlp.up_proj"), i, h, cfg.mlp_bias, &why)?;
            (gate, up)
        };
        let act = self.activation(gate)?;
        // Phi-3 computes `up_states * act(gate)`; the others `act(gate) * up`.
        let prod = if cfg.arch == Arch::Phi3 { self.mul(up, act)? } else { self.mul(act, up)? };
        self.linear(
            prod,
            &format!("{p}.mlp.down_proj"),
            h,
            i,
            cfg.mlp_bias,
            &format!("hidden_size={h} x intermediate_size={i} from config.json"),
        )
    }
}
