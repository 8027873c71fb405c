//! The host half of a KV cache a model keeps itself between decode steps
//! ([`crate::CachedDecode`]), shared by the CPU runtime
//! ([`crate::native::NativeModel`], the cache in host memory) and the GPU
//! runtime ([`crate::cuda::CudaModel`], the cache in device memory).
//!
//! [`CacheLayout::of`] finds whether a checked plan can keep its cache: every
//! `past_key_values.X` input has a `present.X` output of the same element
//! type computed into scratch memory, and there is a `logits` output. A
//! runner then computes each `present.*` root into memory of its own, kept
//! for the next step, which binds it as the `past_key_values.*` input (given
//! by shape only, [`crate::native::bind::bind_symbols_with`]) while it
//! writes its own `present.*` elsewhere. [`CacheLayout::step_outputs`] sizes
//! what a step returns and keeps.

use std::collections::BTreeMap;

use smelt_ir::{DType, Tensor};

use crate::native::checked::{CallSizes, CheckedPlan};
use crate::native::NativeError;
use crate::plan::Storage;

/// One cache entry kept by the model between decode steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePair {
    /// The `past_key_values.X` input and its buffer.
    pub past: String,
    pub past_buf: usize,
    /// The `present.X` output and its buffer.
    pub present: String,
    pub present_buf: usize,
}

/// How a plan keeps its KV cache between decode steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    pub pairs: Vec<CachePair>,
    /// The roots of the `present.*` buffers: in a decode step they live
    /// outside the arena, in memory kept for the next step.
    pub present_roots: Vec<usize>,
    /// The `logits` output's buffer.
    pub logits: usize,
}

/// The kinds of call of a model with a KV cache, each with its own arena
/// placement (see [`CacheLayout::arena_roots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// A forward call: every buffer in the arena.
    Run = 0,
    /// A decode step on an empty cache (the prefill).
    FirstStep = 1,
    /// A decode step on a cache that holds positions.
    Step = 2,
}

impl CacheLayout {
    /// Per [`CallKind`], which of a plan's `buffers` buffers are arena
    /// roots: a forward call places every buffer; a decode step keeps its
    /// `present.*` roots in the cache's own memory and, once the cache
    /// holds positions, reads its `past_key_values.*` there, from the first
    /// step on when `pasts_in_cache` (a cache kept in place is the pasts'
    /// memory even when empty).
    pub fn arena_roots(layout: Option<&CacheLayout>, buffers: usize, pasts_in_cache: bool) -> [Vec<bool>; 3] {
        let all = vec![true; buffers];
        let (mut first, mut step) = (all.clone(), all.clone());
        if let Some(layout) = layout {
            for &r in &layout.present_roots {
                first[r] = false;
                step[r] = false;
            }
            for p in &layout.pairs {
                step[p.past_buf] = false;
                if pasts_in_cache {
                    first[p.past_buf] = false;
                }
            }
        }
        [all, first, step]
    }
}

/// What one decode step returns and keeps, for its symbol values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutputs {
    /// The `logits` output: its buffer, its name, the dtype it is returned
    /// as, and its `[batch, seq, vocab]`.
    pub logits_buf: usize,
    pub logits_name: String,
    pub logits_dtype: DType,
    pub batch: usize,
    pub seq: usize,
    pub vocab: usize,
    /// Per cache pair: the shape of its `present.*` (the cache after the step).
    pub presents: Vec<Vec<usize>>,
}

impl StepOutputs {
    /// The elements before each sequence's last logits row, in order: row
    /// `b * seq + seq - 1` of the `[batch * seq, vocab]` logits (none when
    /// `seq` is 0).
    pub fn last_rows(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch).filter(|_| self.seq > 0).map(|b| (b * self.seq + self.seq - 1) * self.vocab)
    }

    /// The shape of the logits a step returns: `[batch, vocab]`.
    pub fn returned_shape(&self) -> Vec<usize> {
        vec![self.batch, if self.seq > 0 { self.vocab } else { 0 }]
    }
}

impl CacheLayout {
    /// The cache layout of `c`, when every past input pairs with a present
    /// output computed into scratch memory (see the module docs).
    pub fn of(c: &CheckedPlan) -> Option<CacheLayout> {
        let output = |name: &str| c.outputs.iter().find(|(n, _, _)| n == name).map(|(_, b, _)| *b);
        let logits = output("logits")?;
        let mut pairs = Vec::new();
        let mut present_roots = Vec::new();
        for (spec, &past_buf) in c.specs.iter().zip(&c.input_bufs) {
            let Some(rest) = spec.name.strip_prefix("past_key_values.") else { continue };
            let present = format!("present.{rest}");
            let present_buf = output(&present)?;
            let root = c.bufs[present_buf].root;
            if c.plan.buffers[root].storage != Storage::Arena || c.bufs[present_buf].elem != c.bufs[past_buf].elem {
                return None;
            }
            if !present_roots.contains(&root) {
                present_roots.push(root);
            }
            pairs.push(CachePair { past: spec.name.clone(), past_buf, present, present_buf });
        }
        if pairs.is_empty() {
            return None;
        }
        Some(CacheLayout { pairs, present_roots, logits })
    }

    /// Refuses a step's `past_key_values.*` input: the model holds them.
    pub fn refuse_past(inputs: &BTreeMap<String, Tensor>, held_on: &str) -> Result<(), NativeError> {
        match inputs.keys().find(|k| k.starts_with("past_key_values.")) {
            Some(name) => Err(NativeError::BadInput {
                name: name.clone(),
                why: format!("a decode step takes no past key/values: the model holds them {held_on}"),
            }),
            None => Ok(()),
        }
    }

    /// Refuses a step whose batch differs from the held cache's: the cache
    /// continues the sequences it holds (`held`: the cached tensors' shapes,
    /// empty when the cache is).
    pub fn check_batch(inputs: &BTreeMap<String, Tensor>, held: &[&[usize]]) -> Result<(), NativeError> {
        let (Some(ids), Some(cached)) = (inputs.get("input_ids"), held.first()) else { return Ok(()) };
        match (ids.shape.first(), cached.first()) {
            (Some(&batch), Some(&have)) if batch != have => Err(NativeError::BadInput {
                name: "input_ids".into(),
                why: format!(
                    "batch {batch}, but the cache holds {have} sequence(s); reset the cache to start a new batch"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The resident inputs of a step, by shape, from the shapes of the
    /// cached tensors (one per pair; none when the cache is empty).
    pub fn resident(&self, shapes: &[&[usize]]) -> BTreeMap<String, Vec<usize>> {
        self.pairs.iter().zip(shapes).map(|(p, s)| (p.past.clone(), s.to_vec())).collect()
    }

    /// What a step of these sizes returns and keeps.
    pub fn step_outputs(&self, c: &CheckedPlan, sizes: &CallSizes) -> Result<StepOutputs, NativeError> {
        let shape = c.shape_in(self.logits, sizes)?;
        let &[batch, seq, vocab] = shape.as_slice() else {
            return Err(NativeError::Buffer {
                buffer: c.bufs[self.logits].name.clone(),
                why: format!("`logits` has shape {shape:?}, expected [batch, seq, vocab]"),
            });
        };
        let (logits_name, _, logits_dtype) = c
            .outputs
            .iter()
            .find(|(_, b, _)| *b == self.logits)
            .cloned()
            .ok_or_else(|| NativeError::Plan("the plan has no `logits` output".into()))?;
        // The shapes' dims were evaluated when the call was sized.
        let presents = self.pairs.iter().map(|p| c.shape_in(p.present_buf, sizes)).collect::<Result<_, _>>()?;
        Ok(StepOutputs { logits_buf: self.logits, logits_name, logits_dtype, batch, seq, vocab, presents })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step keeps its presents out of the arena, a step on a cache its
    /// pasts too, and a cache kept in place its pasts from the first step.
    #[test]
    fn arena_roots_per_kind_of_call() {
        let pair = CachePair { past: "past".into(), past_buf: 1, present: "present".into(), present_buf: 2 };
        let layout = CacheLayout { pairs: vec![pair], present_roots: vec![2], logits: 3 };
        let [run, first, step] = CacheLayout::arena_roots(Some(&layout), 4, false);
        assert_eq!((run, first, step), (vec![true; 4], vec![true, true, false, true], vec![true, false, false, true]));
        let [_, first, _] = CacheLayout::arena_roots(Some(&layout), 4, true);
        assert_eq!(first, vec![true, false, false, true]);
        assert_eq!(CacheLayout::arena_roots(None, 2, true), [vec![true; 2], vec![true; 2], vec![true; 2]]);
    }
}
