//! `smelt make-test-model DIR --arch ARCH [--seed N] [--dtype ...] [sizes]`:
//! writes a Hugging Face checkpoint folder (config.json, model.safetensors,
//! a byte-level tokenizer.json) with seeded random weights, using the
//! frontend's writer. It starts from the writer's tiny model of the
//! architecture (shaped like the matching fixture) and applies the flags
//! given; the same flags and seed always write the same bytes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use smelt_frontends::hf::{write_random_checkpoint, Arch, RandomModelSpec};
use smelt_ir::DType;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Phi3,
}

impl ArchArg {
    fn arch(self) -> Arch {
        match self {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Mistral => Arch::Mistral,
            ArchArg::Qwen2 => Arch::Qwen2,
            ArchArg::Qwen3 => Arch::Qwen3,
            ArchArg::Gemma => Arch::Gemma,
            ArchArg::Phi3 => Arch::Phi3,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The folder to write (created if needed).
    pub dir: PathBuf,
    #[arg(long, value_enum)]
    pub arch: ArchArg,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stored dtype of the weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Number of decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP intermediate size.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head size (default hidden / heads, or the architecture's tiny default).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Vocabulary size (at least 256: the tokenizer has one token per byte).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Tie the output projection to the embeddings.
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    /// Sliding attention window on every layer.
    #[arg(long)]
    pub sliding_window: Option<usize>,
    /// Rotary base.
    #[arg(long)]
    pub rope_theta: Option<f64>,
    /// Rope scaling as JSON, e.g. '{"rope_type":"linear","factor":2.0}'.
    #[arg(long)]
    pub rope_scaling: Option<String>,
    /// Maximum context length (max_position_embeddings).
    #[arg(long)]
    pub max_positions: Option<usize>,
    /// Write into DIR even if it already holds files.
    #[arg(long)]
    pub force: bool,
}

pub fn main(a: Args) -> Result<()> {
    let mut spec = RandomModelSpec::tiny(a.arch.arch());
    spec.seed = a.seed;
    spec.dtype = match a.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    };
    if let Some(n) = a.layers {
        spec.num_layers = n;
    }
    if let Some(n) = a.hidden {
        spec.hidden_size = n;
        // The tiny default head_dim belongs to the tiny hidden size; a new
        // hidden size gets hidden / heads unless --head-dim says otherwise.
        spec.head_dim = None;
    }
    if let Some(n) = a.intermediate {
        spec.intermediate_size = n;
    }
    if let Some(n) = a.heads {
        spec.num_heads = n;
    }
    if let Some(n) = a.kv_heads {
        spec.num_kv_heads = n;
    }
    if let Some(n) = a.head_dim {
        spec.head_dim = Some(n);
    }
    if let Some(n) = a.vocab {
        spec.vocab_size = n;
    }
    if let Some(t) = a.tie_embeddings {
        spec.tie_word_embeddings = t;
    }
    if let Some(w) = a.sliding_window {
        spec.sliding_window = Some(w);
    }
    if let Some(t) = a.rope_theta {
        spec.rope_theta = t;
    }
    if let Some(js) = &a.rope_scaling {
        let v: serde_json::Value =
            serde_json::from_str(js).with_context(|| format!("--rope-scaling: `{js}` is not valid JSON"))?;
        spec.rope_scaling = Some(v);
    }
    if let Some(n) = a.max_positions {
        spec.max_position_embeddings = n;
    }
    if a.dir.exists() && !a.force {
        let non_empty =
            std::fs::read_dir(&a.dir).with_context(|| format!("{}: cannot read", a.dir.display()))?.next().is_some();
        if non_empty {
            bail!("{}: exists and is not empty (pass --force to write into it)", a.dir.display());
        }
    }
    write_random_checkpoint(&a.dir, &spec)?;
    crate::out(&format!(
        "wrote {} ({}, {} layers, hidden {}, {} heads / {} kv heads, vocab {}, {}, seed {})\n",
        a.dir.display(),
        spec.arch.causal_lm_class(),
        spec.num_layers,
        spec.hidden_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.vocab_size,
        spec.dtype,
        spec.seed
    ))
}
