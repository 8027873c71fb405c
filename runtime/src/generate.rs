//! Greedy generation with the KV cache, on top of any [`Forward`] model.
//!
//! The model follows the decoder-with-past convention: inputs `input_ids
//! [batch, seq]`, optionally `attention_mask [batch, past + seq]`,
//! `position_ids [batch, seq]` and `past_key_values.{i}.key/value`; outputs
//! `logits [batch, seq, vocab]` and, for every past input
//! `past_key_values.X`, an output `present.X` holding `concat(past, new)`.
//!
//! [`generate`] runs the prompt once (the prefill, with an empty
//! cache), then feeds exactly one token per step with the previous step's
//! `present.*` as `past_key_values.*`, an all-ones mask of `past + 1` and the
//! position `past`. It never re-runs the whole sequence when the model has a
//! cache; a model without past inputs (a plain `input_ids -> logits` graph)
//! is run on the whole sequence each step, because that is all it can do.
//! A model that keeps its cache itself ([`Forward::cache`]: a CPU model
//! with the cache in its own memory, a GPU model with it in device memory)
//! is fed the token inputs only and hands back the last position's logits,
//! so a step moves a few ids in and one row of logits out. Batch size is 1;
//! ties in the argmax go to the lowest token id (as `torch.argmax` does).

use std::collections::BTreeMap;

use smelt_ir::{DType, Tensor};

use crate::artifact::{Signature, TensorSig};

/// Why a forward call failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The reference interpreter refused the inputs or failed.
    #[error(transparent)]
    Interp(#[from] smelt_ir::interp::InterpError),
    /// Any other backend's failure, as one line.
    #[error("{0}")]
    Other(String),
}

/// A model that maps named input tensors to named output tensors.
pub trait Forward {
    /// The inputs the model takes and the outputs it produces.
    fn signature(&self) -> &Signature;

    /// Runs the model once.
    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError>;

    /// The model's own KV cache, when it keeps one next to where it
    /// computes (a CPU model in its own memory, a GPU model in device
    /// memory): [`generate`] then feeds each step the token inputs only and
    /// reads back one row of logits. `None` (the default): the cache
    /// travels through `forward`'s `past_key_values.*` inputs and
    /// `present.*` outputs.
    fn cache(&mut self) -> Option<&mut dyn CachedDecode> {
        None
    }

    /// Whether the model's threads, if it has a team of them, sleep as
    /// soon as a call is done (`true`) or first spin a while for the next
    /// one (`false`, the default, which suits a loop of calls such as
    /// generation). Sleeping suits a process that runs several models in
    /// turn, where an idle team's spinning would slow the one running;
    /// each call then pays a wake-up.
    fn sleep_when_idle(&mut self, _sleep: bool) {}
}

/// Decoding with the KV cache held by the model (see [`Forward::cache`]).
/// It is separate from [`Forward::forward`], which stays stateless: a
/// forward call neither reads nor changes this cache.
pub trait CachedDecode {
    /// Empties the cache: the next step starts a new sequence.
    fn reset(&mut self);

    /// How many positions the cache holds.
    fn cached_len(&self) -> usize;

    /// Tells the cache how many positions the sequence will reach, so it
    /// can allocate that room once instead of growing step by step. A
    /// hint: a step past it still works.
    fn reserve(&mut self, _positions: usize) {}

    /// Runs `inputs` (`input_ids [batch, seq]`, and `attention_mask`
    /// covering the cached positions plus `seq`, `position_ids`, when the
    /// model takes them; never `past_key_values.*`) after the cached
    /// positions, appends their keys and values to the cache, and returns
    /// the logits of each sequence's last position, `[batch, vocab]`. A
    /// failed step leaves the cache as it was.
    fn step(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Tensor, ForwardError>;
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty (give at least one token)")]
    EmptyPrompt,
    #[error("prompt token id {id} is out of range for the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: i64, vocab: usize },
    #[error("the model cannot generate: {0}")]
    Signature(String),
    #[error("a prompt of {prompt} tokens plus {new} new tokens needs {needed} positions of `{symbol}`, but the model allows at most {max} (its context length); ask for fewer tokens")]
    TooLong { prompt: usize, new: usize, needed: usize, symbol: String, max: i64 },
    #[error("step {step}: {source}")]
    Forward {
        step: usize,
        #[source]
        source: ForwardError,
    },
    #[error("step {step}: {msg}")]
    BadOutput { step: usize, msg: String },
}

/// Settings of a generation run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOptions {
    /// How many tokens to add at most.
    pub max_new_tokens: usize,
    /// Generation stops after producing any of these (empty: never).
    pub eos_token_ids: Vec<i64>,
    /// How each token is chosen; the default is greedy.
    pub sampling: Sampling,
}

/// How the next token is chosen from the last position's logits:
/// `temperature <= 0` is greedy (argmax, lowest id on ties); otherwise the
/// logits are divided by the temperature, cut to the `top_k` largest
/// (0: all), then to the smallest set whose probability reaches `top_p`
/// (1: all), and a token is drawn from what is left with a generator
/// seeded by `seed`, so a run is reproducible.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl Sampling {
    /// The chosen token's index in `row`, or `None` when the logits hold NaN.
    pub fn choose(&self, row: &[f32], rng: &mut fastrand::Rng) -> Option<usize> {
        if row.iter().any(|x| x.is_nan()) {
            return None;
        }
        if self.temperature <= 0.0 || self.top_k == 1 {
            return argmax(row);
        }
        let mut cand: Vec<(usize, f32)> = row.iter().map(|&x| x / self.temperature).enumerate().collect();
        let by_logit = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.top_k > 0 && self.top_k < cand.len() {
            cand.select_nth_unstable_by(self.top_k - 1, by_logit);
            cand.truncate(self.top_k);
        }
        cand.sort_by(by_logit);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= self.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = rng.f64() * total;
        for (c, p) in cand.iter().zip(&probs) {
            if u < *p {
                return Some(c.0);
            }
            u -= p;
        }
        cand.get(probs.len() - 1).map(|c| c.0)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxNewTokens,
    Eos,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::Eos => "eos",
        }
    }
}

/// The result of a generation run.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The prompt followed by the generated tokens.
    pub ids: Vec<i64>,
    pub prompt_len: usize,
    pub stop: StopReason,
    /// Seconds spent in the first forward call (the prompt) and in all later ones.
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// The generated tokens only.
    pub fn new_ids(&self) -> &[i64] {
        &self.ids[self.prompt_len..]
    }
}

/// How generation feeds one model: which inputs it has and which outputs
/// carry the cache forward.
struct Plan {
    ids: TensorSig,
    mask: Option<TensorSig>,
    positions: Option<TensorSig>,
    /// (past input, present output, empty past tensor).
    cache: Vec<(String, String, Tensor)>,
    vocab: Option<usize>,
    /// The symbols of the sequence and past axes, with their upper bounds,
    /// when the signature declares them.
    seq_bound: Option<(String, i64)>,
    past_bound: Option<(String, i64)>,
}

fn plan(sig: &Signature) -> Result<Plan, GenerateError> {
    let bad = |m: String| GenerateError::Signature(m);
    let ids = sig.input("input_ids").cloned().ok_or_else(|| bad("it has no `input_ids` input".to_string()))?;
    let logits = sig.output("logits").ok_or_else(|| bad("it has no `logits` output".to_string()))?;
    let vocab = logits.shape.last().and_then(|d| d.parse::<usize>().ok());
    let mut cache = Vec::new();
    for input in sig.inputs.iter().filter(|t| t.name.starts_with("past_key_values.")) {
        let rest = &input.name["past_key_values.".len()..];
        let present = format!("present.{rest}");
        if sig.output(&present).is_none() {
            return Err(bad(format!("input `{}` has no matching output `{present}`", input.name)));
        }
        // The empty cache [batch, kv_heads, past, head_dim]: batch 1, no past
        // positions, the model's constant head count and size.
        let ty = input.tensor_type().map_err(bad)?;
        if input.shape.len() != 4 {
            return Err(bad(format!(
                "input `{}` has shape {}, expected [batch, kv_heads, past, head_dim]",
                input.name,
                input.type_string()
            )));
        }
        let mut shape = Vec::with_capacity(4);
        for (axis, d) in input.shape.iter().enumerate() {
            let n = if axis == 0 {
                1
            } else if axis == 2 {
                0
            } else if let Ok(n) = d.parse::<usize>() {
                n
            } else {
                return Err(bad(format!("input `{}` has dim `{d}` at axis {axis}, expected a constant", input.name)));
            };
            shape.push(n);
        }
        cache.push((input.name.clone(), present, Tensor::full(ty.dtype, shape, 0.0)));
    }
    let bound = |dim: Option<&String>| {
        let name = dim?;
        sig.symbols.get(name).map(|b| (name.clone(), b.max))
    };
    let seq_bound = bound(ids.shape.get(1));
    let past_bound =
        bound(sig.inputs.iter().find(|t| t.name.starts_with("past_key_values.")).and_then(|t| t.shape.get(2)));
    Ok(Plan {
        seq_bound,
        past_bound,
        ids,
        mask: sig.input("attention_mask").cloned(),
        positions: sig.input("position_ids").cloned(),
        cache,
        vocab,
    })
}

/// `input_ids`, and the all-ones mask and positions when the model takes
/// them, for feeding `feed` (batch 1) after `past_len` cached positions.
fn token_inputs(plan: &Plan, feed: &[i64], past_len: usize) -> Result<BTreeMap<String, Tensor>, GenerateError> {
    token_inputs_of(&plan.ids, plan.mask.as_ref(), plan.positions.as_ref(), feed, past_len)
}

/// [`token_inputs`] from the inputs' signatures.
fn token_inputs_of(
    ids: &TensorSig,
    mask: Option<&TensorSig>,
    positions: Option<&TensorSig>,
    feed: &[i64],
    past_len: usize,
) -> Result<BTreeMap<String, Tensor>, GenerateError> {
    let seq = feed.len();
    let mut inputs = BTreeMap::new();
    let t = |dtype, shape, v| Tensor::from_i64(dtype, shape, v).map_err(|e| GenerateError::Signature(e.to_string()));
    inputs.insert("input_ids".to_string(), t(int_dtype(ids), vec![1, seq], feed.to_vec())?);
    if let Some(m) = mask {
        inputs.insert(m.name.clone(), t(int_dtype(m), vec![1, past_len + seq], vec![1; past_len + seq])?);
    }
    if let Some(p) = positions {
        let pos = (past_len..past_len + seq).map(|i| i as i64).collect();
        inputs.insert(p.name.clone(), t(int_dtype(p), vec![1, seq], pos)?);
    }
    Ok(inputs)
}

/// Whether the model takes its past keys and values as inputs (the
/// `past_key_values.*` / `present.*` pairs [`generate`] carries forward).
/// A model without them has no cache to decode against: each new token
/// runs the whole sequence again.
pub fn takes_past(sig: &Signature) -> Result<bool, GenerateError> {
    Ok(!plan(sig)?.cache.is_empty())
}

/// The inputs of one forward call over `feed` (batch 1) after `past_len`
/// cached positions whose keys and values are zero: what a benchmark of a
/// prefill (`past_len` 0) or a decode step (one token) feeds.
pub fn step_inputs(sig: &Signature, feed: &[i64], past_len: usize) -> Result<BTreeMap<String, Tensor>, GenerateError> {
    let plan = plan(sig)?;
    let mut inputs = token_inputs(&plan, feed, past_len)?;
    for (name, _, empty) in &plan.cache {
        let mut shape = empty.shape.clone();
        shape[2] = past_len;
        inputs.insert(name.clone(), Tensor::full(empty.dtype, shape, 0.0));
    }
    Ok(inputs)
}

/// The token inputs alone (`input_ids`, and the all-ones mask and positions
/// when the model takes them) for feeding `feed` (batch 1) after `past_len`
/// positions the model holds itself: what a decode step of a model with its
/// own cache ([`Forward::cache`]) takes. Unlike [`step_inputs`] it builds no
/// past tensors, so its cost does not grow with `past_len` beyond the mask.
pub fn cached_step_inputs(
    sig: &Signature,
    feed: &[i64],
    past_len: usize,
) -> Result<BTreeMap<String, Tensor>, GenerateError> {
    let ids = sig.input("input_ids").ok_or_else(|| GenerateError::Signature("it has no `input_ids` input".into()))?;
    token_inputs_of(ids, sig.input("attention_mask"), sig.input("position_ids"), feed, past_len)
}

fn int_dtype(t: &TensorSig) -> DType {
    t.dtype.parse().unwrap_or(DType::I64)
}

/// The index of the largest value; the first one on ties.
fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

/// Decoding: prefill the prompt once, then one token per step with the KV
/// cache, until `max_new_tokens` or an end-of-sequence token, choosing each
/// token as `opts.sampling` says. `on_token` sees each new token as soon as
/// it is chosen.
pub fn generate(
    model: &mut dyn Forward,
    prompt: &[i64],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(i64),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let plan = plan(model.signature())?;
    if let Some(vocab) = plan.vocab {
        if let Some(&id) = prompt.iter().find(|&&id| id < 0 || id as usize >= vocab) {
            return Err(GenerateError::TokenOutOfRange { id, vocab });
        }
    }
    let use_cache = !plan.cache.is_empty();
    // Refuse up front a run that would outgrow the model's declared context,
    // rather than failing after many steps: with a cache the longest call
    // feeds the prompt, and the last step sees the longest past; without
    // one, the last call feeds everything but the last token.
    let new = opts.max_new_tokens;
    let mut needs = Vec::new();
    if use_cache {
        needs.push((&plan.seq_bound, prompt.len()));
        needs.push((&plan.past_bound, (prompt.len() + new).saturating_sub(2)));
    } else {
        needs.push((&plan.seq_bound, prompt.len() + new.saturating_sub(1)));
    }
    for (bound, needed) in needs {
        if let Some((symbol, max)) = bound {
            if needed as i64 > *max {
                return Err(GenerateError::TooLong {
                    prompt: prompt.len(),
                    new,
                    needed,
                    symbol: symbol.clone(),
                    max: *max,
                });
            }
        }
    }
    let mut ids = prompt.to_vec();
    let mut past: Vec<Tensor> = plan.cache.iter().map(|(_, _, empty)| empty.clone()).collect();
    let mut past_len = 0usize;
    let mut stop = StopReason::MaxNewTokens;
    let mut rng = fastrand::Rng::with_seed(opts.sampling.seed);
    let (mut prefill_secs, mut decode_secs) = (0.0, 0.0);
    // A model that keeps the cache itself starts the sequence empty.
    let on_model = use_cache && model.cache().is_some();
    if let Some(c) = model.cache().filter(|_| on_model) {
        c.reset();
        // The last token generated is never fed back.
        c.reserve(prompt.len() + opts.max_new_tokens.saturating_sub(1));
    }

    for step in 0..opts.max_new_tokens {
        // With a cache, the prefill feeds the prompt and each later step the
        // newest token only; without one, the whole sequence every time.
        let feed: &[i64] = if use_cache && step > 0 {
            &ids[ids.len() - 1..]
        } else if use_cache {
            &ids
        } else {
            past_len = 0;
            &ids
        };
        let seq = feed.len();
        let mut inputs = token_inputs(&plan, feed, past_len)?;
        let bad = |msg: String| GenerateError::BadOutput { step, msg };
        let forward_err = |source| GenerateError::Forward { step, source };

        let start = std::time::Instant::now();
        let last: Vec<f32> = if on_model {
            let c = model.cache().ok_or_else(|| bad("the model no longer keeps a cache".to_string()))?;
            let logits = c.step(inputs).map_err(forward_err)?;
            let vocab = logits.shape.get(1).copied().unwrap_or(0);
            if logits.shape.len() != 2 || logits.shape[0] != 1 || vocab == 0 {
                return Err(bad(format!("the step's logits have shape {:?}, expected [1, vocab]", logits.shape)));
            }
            if c.cached_len() != past_len + seq {
                return Err(bad(format!(
                    "the model's cache holds {} positions after the step, expected {}",
                    c.cached_len(),
                    past_len + seq
                )));
            }
            logits.to_f32_vec()
        } else {
            for ((name, _, _), tensor) in plan.cache.iter().zip(past.drain(..)) {
                inputs.insert(name.clone(), tensor);
            }
            let mut out = model.forward(inputs).map_err(forward_err)?;
            let logits = out.remove("logits").ok_or_else(|| bad("no `logits` output".to_string()))?;
            let vocab = *logits.shape.last().unwrap_or(&0);
            let rows = logits.numel().checked_div(vocab).unwrap_or(0);
            if vocab == 0 || logits.shape.first() != Some(&1) || rows != seq {
                return Err(bad(format!("`logits` has shape {:?}, expected [1, {seq}, vocab]", logits.shape)));
            }
            for (_, present, _) in &plan.cache {
                let t = out.remove(present).ok_or_else(|| bad(format!("no `{present}` output")))?;
                if t.shape.get(2) != Some(&(past_len + seq)) {
                    return Err(bad(format!(
                        "`{present}` has shape {:?}, expected {} positions on axis 2",
                        t.shape,
                        past_len + seq
                    )));
                }
                past.push(t);
            }
            let mut values = logits.to_f32_vec();
            values.drain(..(rows - 1) * vocab);
            values
        };
        // The time includes reading the logits back, as a caller sees it.
        let secs = start.elapsed().as_secs_f64();
        if step == 0 {
            prefill_secs = secs;
        } else {
            decode_secs += secs;
        }
        let next =
            opts.sampling.choose(&last, &mut rng).ok_or_else(|| bad("the logits contain NaN".to_string()))? as i64;

        past_len += seq;
        ids.push(next);
        on_token(next);
        if opts.eos_token_ids.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
    }
    Ok(Generation { ids, prompt_len: prompt.len(), stop, prefill_secs, decode_secs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::TensorSig;

    fn sig(name: &str, dtype: &str, shape: &[&str]) -> TensorSig {
        TensorSig {
            name: name.into(),
            dtype: dtype.into(),
            shape: shape.iter().map(|s| s.to_string()).collect(),
            optional: false,
        }
    }

    /// A fake decoder whose next token is (sum of all tokens seen so far) mod
    /// vocab. It keeps the tokens it has seen in its "cache" (one value per
    /// position in `present.0.key`), so a generator that dropped or
    /// duplicated cache entries would produce different tokens. It records
    /// every call's inputs.
    struct Counting {
        sig: Signature,
        calls: Vec<BTreeMap<String, Tensor>>,
        vocab: usize,
        with_cache: bool,
    }

    impl Counting {
        fn new(with_cache: bool) -> Counting {
            let mut inputs = vec![
                sig("input_ids", "i64", &["batch", "seq"]),
                sig("attention_mask", "i64", &["batch", "past + seq"]),
                sig("position_ids", "i64", &["batch", "seq"]),
            ];
            let mut outputs = vec![sig("logits", "f32", &["batch", "seq", "10"])];
            if with_cache {
                inputs.push(sig("past_key_values.0.key", "f32", &["batch", "1", "past", "1"]));
                outputs.push(sig("present.0.key", "f32", &["batch", "1", "past + seq", "1"]));
            }
            Counting {
                sig: Signature { inputs, outputs, symbols: BTreeMap::new() },
                calls: Vec::new(),
                vocab: 10,
                with_cache,
            }
        }
    }

    impl Forward for Counting {
        fn signature(&self) -> &Signature {
            &self.sig
        }

        fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
            self.calls.push(inputs.clone());
            let ids = inputs["input_ids"].to_i64_vec();
            let mut seen: Vec<f32> = match inputs.get("past_key_values.0.key") {
                Some(p) => p.to_f32_vec(),
                None => Vec::new(),
            };
            seen.extend(ids.iter().map(|&i| i as f32));
            let seq = ids.len();
            let mut logits = vec![0.0f32; seq * self.vocab];
            let next = seen.iter().sum::<f32>() as usize % self.vocab;
            logits[(seq - 1) * self.vocab + next] = 1.0;
            let mut out = BTreeMap::new();
            out.insert("logits".to_string(), Tensor::from_f32(DType::F32, vec![1, seq, self.vocab], logits).unwrap());
            if self.with_cache {
                let n = seen.len();
                out.insert("present.0.key".to_string(), Tensor::from_f32(DType::F32, vec![1, 1, n, 1], seen).unwrap());
            }
            Ok(out)
        }
    }

    fn expected(prompt: &[i64], n: usize) -> Vec<i64> {
        let mut ids = prompt.to_vec();
        for _ in 0..n {
            ids.push(ids.iter().sum::<i64>() % 10);
        }
        ids
    }

    #[test]
    fn prefills_once_then_feeds_one_token_per_step() {
        let mut m = Counting::new(true);
        let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], ..Default::default() };
        let mut streamed = Vec::new();
        let g = generate(&mut m, &[3, 4, 1], &opts, &mut |t| streamed.push(t)).unwrap();
        assert_eq!(g.ids, expected(&[3, 4, 1], 6));
        assert_eq!(streamed, g.new_ids());
        assert_eq!(g.stop, StopReason::MaxNewTokens);
        // One prefill of the 3 prompt tokens, then 5 calls of exactly one token.
        assert_eq!(m.calls.len(), 6);
        let lens: Vec<usize> = m.calls.iter().map(|c| c["input_ids"].shape[1]).collect();
        assert_eq!(lens, vec![3, 1, 1, 1, 1, 1]);
        for (step, c) in m.calls.iter().enumerate() {
            let past = if step == 0 { 0 } else { 2 + step };
            assert_eq!(c["past_key_values.0.key"].shape, vec![1, 1, past, 1]);
            assert_eq!(c["attention_mask"].shape, vec![1, past + lens[step]]);
            assert!(c["attention_mask"].to_i64_vec().iter().all(|&v| v == 1));
            let want: Vec<i64> = (past as i64..(past + lens[step]) as i64).collect();
            assert_eq!(c["position_ids"].to_i64_vec(), want);
        }
        // The last call's input is the previous step's output token.
        assert_eq!(m.calls[5]["input_ids"].to_i64_vec(), vec![g.ids[g.ids.len() - 2]]);
    }

    #[test]
    fn refuses_runs_longer_than_the_context() {
        let mut m = Counting::new(true);
        m.sig.symbols.insert("past".into(), crate::artifact::Bounds { min: 0, max: 8 });
        m.sig.symbols.insert("seq".into(), crate::artifact::Bounds { min: 1, max: 8 });
        let opts = |n| GenerateOptions { max_new_tokens: n, eos_token_ids: vec![], ..Default::default() };
        // 3 + 7 tokens: the last step has a past of 8, the bound.
        assert_eq!(generate(&mut m, &[1, 2, 3], &opts(7), &mut |_| {}).unwrap().ids.len(), 10);
        let e = generate(&mut m, &[1, 2, 3], &opts(8), &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("needs 9 positions of `past`, but the model allows at most 8"), "{e}");
        let e = generate(&mut m, &[1; 9], &opts(1), &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("9 positions of `seq`"), "{e}");
    }

    #[test]
    fn stops_at_eos_and_checks_prompt() {
        let mut m = Counting::new(true);
        // [3, 4] -> 7 -> 4 -> 8 ...; 4 is the end-of-sequence token.
        let opts = GenerateOptions { max_new_tokens: 10, eos_token_ids: vec![4], ..Default::default() };
        let g = generate(&mut m, &[3, 4], &opts, &mut |_| {}).unwrap();
        assert_eq!(g.ids, vec![3, 4, 7, 4]);
        assert_eq!(g.stop, StopReason::Eos);
        assert_eq!(m.calls.len(), 2);

        let e = generate(&mut m, &[], &opts, &mut |_| {}).unwrap_err();
        assert!(matches!(e, GenerateError::EmptyPrompt));
        let e = generate(&mut m, &[3, 12], &opts, &mut |_| {}).unwrap_err();
        assert_eq!(e.to_string(), "prompt token id 12 is out of range for the vocabulary of 10 tokens");
    }

    #[test]
    fn without_a_cache_reruns_the_sequence() {
        let mut m = Counting::new(false);
        let opts = GenerateOptions { max_new_tokens: 3, eos_token_ids: vec![], ..Default::default() };
        let g = generate(&mut m, &[5, 5], &opts, &mut |_| {}).unwrap();
        assert_eq!(g.ids, expected(&[5, 5], 3));
        let lens: Vec<usize> = m.calls.iter().map(|c| c["input_ids"].shape[1]).collect();
        assert_eq!(lens, vec![2, 3, 4]);
    }

    /// [`Counting`] with its cache kept inside, as a GPU model keeps it on
    /// the device: steps see token inputs only.
    struct Resident {
        inner: Counting,
        seen: Vec<f32>,
        steps: Vec<BTreeMap<String, Tensor>>,
        forwards: usize,
        resets: usize,
        /// Fault injection: a step that forgets to append to the cache.
        drop_positions: bool,
    }

    impl Resident {
        fn new() -> Resident {
            Resident {
                inner: Counting::new(true),
                seen: Vec::new(),
                steps: Vec::new(),
                forwards: 0,
                resets: 0,
                drop_positions: false,
            }
        }
    }

    impl Forward for Resident {
        fn signature(&self) -> &Signature {
            &self.inner.sig
        }

        fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
            self.forwards += 1;
            self.inner.forward(inputs)
        }

        fn cache(&mut self) -> Option<&mut dyn CachedDecode> {
            Some(self)
        }
    }

    impl CachedDecode for Resident {
        fn reset(&mut self) {
            self.seen.clear();
            self.resets += 1;
        }

        fn cached_len(&self) -> usize {
            self.seen.len()
        }

        fn step(&mut self, mut inputs: BTreeMap<String, Tensor>) -> Result<Tensor, ForwardError> {
            self.steps.push(inputs.clone());
            if inputs.keys().any(|k| k.starts_with("past_key_values.")) {
                return Err(ForwardError::Other("a step takes no past".into()));
            }
            let past = self.seen.len();
            let past_tensor = Tensor::from_f32(DType::F32, vec![1, 1, past, 1], self.seen.clone()).unwrap();
            inputs.insert("past_key_values.0.key".into(), past_tensor);
            let out = self.inner.forward(inputs)?;
            if !self.drop_positions {
                self.seen = out["present.0.key"].to_f32_vec();
            }
            let logits = &out["logits"];
            let vocab = logits.shape[2];
            let rows = logits.shape[1];
            let last = logits.to_f32_vec()[(rows - 1) * vocab..].to_vec();
            Ok(Tensor::from_f32(DType::F32, vec![1, vocab], last).unwrap())
        }
    }

    #[test]
    fn a_model_holding_its_cache_gets_token_inputs_only() {
        let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], ..Default::default() };
        let mut host = Counting::new(true);
        let want = generate(&mut host, &[3, 4, 1], &opts, &mut |_| {}).unwrap();
        let mut m = Resident::new();
        let mut streamed = Vec::new();
        let g = generate(&mut m, &[3, 4, 1], &opts, &mut |t| streamed.push(t)).unwrap();
        assert_eq!(g.ids, want.ids);
        assert_eq!(streamed, g.new_ids());
        assert_eq!((m.forwards, m.resets), (0, 1), "steps only, after one reset");
        let lens: Vec<usize> = m.steps.iter().map(|c| c["input_ids"].shape[1]).collect();
        assert_eq!(lens, vec![3, 1, 1, 1, 1, 1]);
        for (step, c) in m.steps.iter().enumerate() {
            let past = if step == 0 { 0 } else { 2 + step };
            assert!(!c.keys().any(|k| k.starts_with("past_key_values.")), "step {step} got a past tensor");
            assert_eq!(c["attention_mask"].shape, vec![1, past + lens[step]]);
            let want: Vec<i64> = (past as i64..(past + lens[step]) as i64).collect();
            assert_eq!(c["position_ids"].to_i64_vec(), want);
        }
        // A second run starts from an empty cache again.
        let again = generate(&mut m, &[3, 4, 1], &opts, &mut |_| {}).unwrap();
        assert_eq!(again.ids, want.ids);
        assert_eq!(m.resets, 2);
    }

    #[test]
    fn a_model_cache_that_loses_positions_is_an_error() {
        let mut m = Resident::new();
        m.drop_positions = true;
        let opts = GenerateOptions { max_new_tokens: 3, eos_token_ids: vec![], ..Default::default() };
        let e = generate(&mut m, &[1, 2], &opts, &mut |_| {}).unwrap_err().to_string();
        assert_eq!(e, "step 0: the model's cache holds 0 positions after the step, expected 2");
    }

    #[test]
    fn a_model_cache_is_unused_without_past_inputs() {
        // The signature has no cache: the whole sequence goes through
        // `forward`, whatever the model offers.
        let mut m = Resident::new();
        m.inner = Counting::new(false);
        let opts = GenerateOptions { max_new_tokens: 3, eos_token_ids: vec![], ..Default::default() };
        let g = generate(&mut m, &[5, 5], &opts, &mut |_| {}).unwrap();
        assert_eq!(g.ids, expected(&[5, 5], 3));
        assert_eq!((m.forwards, m.steps.len(), m.resets), (3, 0, 0));
    }

    #[test]
    fn cached_step_inputs_are_the_token_inputs_of_step_inputs() {
        let m = Counting::new(true);
        let full = step_inputs(&m.sig, &[7], 5).unwrap();
        let tokens = cached_step_inputs(&m.sig, &[7], 5).unwrap();
        assert_eq!(full["past_key_values.0.key"].shape, vec![1, 1, 5, 1]);
        let want: BTreeMap<_, _> = full.into_iter().filter(|(k, _)| !k.starts_with("past_key_values.")).collect();
        assert_eq!(tokens, want);
        assert_eq!(tokens["attention_mask"].shape, vec![1, 6]);
        assert_eq!(tokens["position_ids"].to_i64_vec(), vec![5]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[1.0, f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn sampling_follows_temperature_top_k_and_top_p() {
        let mut rng = fastrand::Rng::with_seed(1);
        let row = [0.5f32, 3.0, 1.0, 2.9];
        assert_eq!(Sampling::default().choose(&row, &mut rng), Some(1));
        let s = |temperature, top_k, top_p| Sampling { temperature, top_k, top_p, seed: 0 };
        assert_eq!(s(1.0, 1, 1.0).choose(&row, &mut rng), Some(1));
        // top_p small enough keeps only the most likely token.
        assert!((0..200).all(|_| s(1.0, 0, 0.01).choose(&row, &mut rng) == Some(1)));
        // top_k 2 never leaves the two largest logits.
        assert!((0..500).all(|_| matches!(s(5.0, 2, 1.0).choose(&row, &mut rng), Some(1 | 3))));
        // Probabilities follow softmax(logits / T): [0, ln 3] at T 1 is 1/4, 3/4.
        let two = [0.0f32, 3f32.ln()];
        let n = 8000;
        let ones = (0..n).filter(|_| s(1.0, 0, 1.0).choose(&two, &mut rng) == Some(1)).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "drew token 1 with frequency {frac}, expected 0.75");
        // The same seed gives the same draws.
        let draw = |seed| {
            let mut r = fastrand::Rng::with_seed(seed);
            (0..20).map(|_| s(2.0, 0, 0.9).choose(&row, &mut r).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_eq!(s(1.0, 0, 1.0).choose(&[1.0, f32::NAN], &mut rng), None);
    }
}
