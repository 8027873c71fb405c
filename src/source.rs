//! What a MODEL argument names, and loading it: a smelt artifact directory
//! (it has `manifest.json`, or its name ends in `.smelt`), a Hugging Face
//! checkpoint folder (any other directory), or an ONNX file (`.onnx`).
//!
//! Checkpoints and ONNX files are compiled in memory (the frontend's graph,
//! verified) so `run`, `generate` and `inspect` accept them as well as
//! artifacts. An ONNX file carries no tokenizer or end-of-sequence ids; they
//! are taken from a `tokenizer.json` and a `config.json` beside it when
//! those exist (as in an exported Hugging Face folder).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use smelt_frontends::hf;
use smelt_ir::{DType, Graph, StoredTensor, Tensor};
use smelt_runtime::artifact::{Artifact, Manifest, ModelInfo};
use smelt_runtime::cuda::CudaModel;
use smelt_runtime::generate::Forward;
use smelt_runtime::native::NativeModel;
use smelt_runtime::InterpModel;

/// The kinds of model paths the CLI accepts.
pub enum Source {
    Artifact(PathBuf),
    Checkpoint(PathBuf),
    Onnx(PathBuf),
}

impl Source {
    pub fn classify(path: &Path) -> Result<Source> {
        if path.is_dir() {
            let named_artifact = path.extension().is_some_and(|e| e == "smelt");
            if path.join("manifest.json").is_file() || named_artifact {
                return Ok(Source::Artifact(path.to_path_buf()));
            }
            return Ok(Source::Checkpoint(path.to_path_buf()));
        }
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
            if !path.is_file() {
                bail!("{}: no such file", path.display());
            }
            return Ok(Source::Onnx(path.to_path_buf()));
        }
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        bail!(
            "{}: not a model (expected a Hugging Face checkpoint folder, a .smelt artifact directory or an .onnx file)",
            path.display()
        )
    }
}

/// A model ready to run: graph, weights and what is known about it. The
/// weights are tensors (what the interpreter runs on) or, for a compile,
/// their stored bytes.
pub struct Loaded<W = Tensor> {
    pub graph: Graph,
    pub weights: BTreeMap<String, W>,
    pub info: ModelInfo,
    pub tokenizer: Option<PathBuf>,
    pub eos_token_ids: Vec<i64>,
    /// What the path was: `artifact`, `checkpoint` or `onnx`.
    pub kind: &'static str,
    /// Set when the model came from an artifact.
    pub manifest: Option<Manifest>,
}

impl<W> Loaded<W> {
    fn map_weights<V>(self, f: impl Fn(W) -> V) -> Loaded<V> {
        Loaded {
            graph: self.graph,
            weights: self.weights.into_iter().map(|(n, w)| (n, f(w))).collect(),
            info: self.info,
            tokenizer: self.tokenizer,
            eos_token_ids: self.eos_token_ids,
            kind: self.kind,
            manifest: self.manifest,
        }
    }
}

impl Loaded {
    /// The weights as stored bytes (what a compile reads).
    pub fn into_stored(self) -> Loaded<StoredTensor> {
        self.map_weights(|t| StoredTensor::from_tensor(&t))
    }
}

/// The dtype all weights share, if they share one.
fn uniform_dtype(mut dtypes: impl Iterator<Item = DType>) -> Option<String> {
    let first = dtypes.next()?;
    dtypes.all(|d| d == first).then(|| first.name().to_string())
}

/// Builds a checkpoint's graph with the Hugging Face frontend and verifies it.
pub fn load_checkpoint(dir: &Path) -> Result<Loaded> {
    Ok(load_checkpoint_stored(dir)?.map_weights(|t| t.to_tensor()))
}

/// [`load_checkpoint`], leaving the weights in the checkpoint's mapped files.
pub fn load_checkpoint_stored(dir: &Path) -> Result<Loaded<StoredTensor>> {
    load_checkpoint_stored_with(dir, &hf::HfOptions::default())
}

/// [`load_checkpoint_stored`] with the frontend's options.
pub fn load_checkpoint_stored_with(dir: &Path, options: &hf::HfOptions) -> Result<Loaded<StoredTensor>> {
    let m = hf::load_stored_with(dir, options)?;
    verify(&m.graph, dir)?;
    let info = ModelInfo {
        architecture: m
            .config
            .architectures
            .first()
            .cloned()
            .unwrap_or_else(|| m.config.arch.causal_lm_class().to_string()),
        model_type: Some(m.config.arch.model_type().to_string()),
        parameters: m.parameter_count() as u64,
        layers: m.config.num_hidden_layers,
        stored_dtype: uniform_dtype(m.weights.values().map(|t| t.dtype)),
        source: dir.display().to_string(),
    };
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(Loaded {
        graph: m.graph,
        weights: m.weights,
        info,
        tokenizer,
        eos_token_ids: m.config.eos_token_id.clone(),
        kind: "checkpoint",
        manifest: None,
    })
}

/// Verifies a graph the frontend built; a failure is a frontend bug, but it
/// is reported, not written out.
pub fn verify(g: &Graph, source: &Path) -> Result<()> {
    smelt_ir::verify::verify(g).map_err(|e| {
        let all = e.to_string();
        let n = all.lines().count();
        let first = all.lines().next().unwrap_or_default();
        let more = if n > 1 { format!(" (and {} more)", n - 1) } else { String::new() };
        anyhow::anyhow!("the IR built from {} does not verify: {first}{more}", source.display())
    })
}

/// Imports an ONNX file with the ONNX frontend and verifies the graph.
pub fn load_onnx(path: &Path) -> Result<Loaded> {
    let m = smelt_frontends::onnx::import(path)?;
    verify(&m.graph, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    // A config.json beside the file names the model and its end tokens; one
    // that does not parse is ignored, since the ONNX file alone is the model.
    let config = Some(dir.join("config.json")).filter(|p| p.is_file()).and_then(|p| hf::HfConfig::from_file(p).ok());
    let layers = m.graph.inputs().iter().filter(|(n, _)| n.starts_with("past_key_values.")).count() / 2;
    let info = ModelInfo {
        architecture: config
            .as_ref()
            .and_then(|c| c.architectures.first().cloned())
            .unwrap_or_else(|| m.graph.name.clone()),
        model_type: config.as_ref().map(|c| c.arch.model_type().to_string()),
        parameters: m.weights.values().map(|t| t.numel() as u64).sum(),
        layers: config.as_ref().map(|c| c.num_hidden_layers).unwrap_or(layers),
        stored_dtype: uniform_dtype(m.weights.values().map(|t| t.dtype)),
        source: path.display().to_string(),
    };
    Ok(Loaded {
        graph: m.graph,
        weights: m.weights,
        info,
        tokenizer: Some(dir.join("tokenizer.json")).filter(|p| p.is_file()),
        eos_token_ids: config.map(|c| c.eos_token_id).unwrap_or_default(),
        kind: "onnx",
        manifest: None,
    })
}

/// Opens an artifact (checking its manifest and hashes) and reads it.
pub fn load_artifact(dir: &Path) -> Result<Loaded> {
    let a = Artifact::open(dir)?;
    let graph = a.graph()?;
    // A `cpu` or `cuda` artifact keeps its constants in the plans' layout only.
    let weights =
        if a.manifest().native.is_some() || a.manifest().cuda.is_some() { BTreeMap::new() } else { a.weights()? };
    let m = a.manifest().clone();
    Ok(Loaded {
        graph,
        weights,
        info: m.model.clone(),
        tokenizer: a.tokenizer_path(),
        eos_token_ids: m.eos_token_ids.clone(),
        kind: "artifact",
        manifest: Some(m),
    })
}

/// Loads any model path the CLI accepts.
pub fn load(path: &Path) -> Result<Loaded> {
    match Source::classify(path)? {
        Source::Artifact(p) => load_artifact(&p),
        Source::Checkpoint(p) => load_checkpoint(&p),
        Source::Onnx(p) => load_onnx(&p),
    }
}

/// Loads a `tokenizer.json`.
pub fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("{}: cannot load tokenizer", path.display()))
}

/// A runnable model and what generation needs to know about it.
pub struct Runnable {
    pub model: Box<dyn Forward>,
    pub tokenizer: Option<PathBuf>,
    pub eos_token_ids: Vec<i64>,
    /// `interp` or `cpu`: what executes it.
    pub backend: &'static str,
}

/// Which compiled plan of an artifact runs (`--device`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The GPU plan when the artifact has one and a GPU is usable, else the CPU plan.
    Auto,
    /// The CPU plan (native kernels).
    Cpu,
    /// The GPU plan (PTX kernels on the first NVIDIA GPU).
    Cuda,
}

/// Opens any model path for running: an artifact's GPU plan on the GPU or
/// its CPU plan on `threads` threads, as `device` asks; anything else (and
/// `interp` artifacts) with the reference interpreter.
pub fn open_runnable(path: &Path, threads: usize, device: DeviceArg) -> Result<Runnable> {
    if let Source::Artifact(dir) = Source::classify(path)? {
        let a = Artifact::open(&dir)?;
        let m = a.manifest().clone();
        let use_cuda = match (device, &m.cuda, &m.native) {
            (DeviceArg::Cpu, _, None) if m.cuda.is_some() => {
                bail!("{}: has no CPU plan (compiled for target `{}`)", dir.display(), m.target)
            }
            (DeviceArg::Cpu, _, _) => false,
            (DeviceArg::Cuda, None, _) => {
                bail!(
                    "{}: has no GPU plan (compiled for target `{}`; compile with --target cuda)",
                    dir.display(),
                    m.target
                )
            }
            (DeviceArg::Cuda, Some(_), _) => true,
            (DeviceArg::Auto, Some(_), None) => true,
            (DeviceArg::Auto, Some(_), Some(_)) => smelt_runtime::cuda::probe(0).is_ok(),
            (DeviceArg::Auto, None, _) => false,
        };
        if use_cuda {
            let plan = m.cuda.clone().expect("checked above");
            let model = CudaModel::open(plan, m.signature.clone(), &dir)
                .with_context(|| format!("{}: cannot run the GPU plan", dir.display()))?;
            return Ok(Runnable {
                model: Box::new(model),
                tokenizer: a.tokenizer_path(),
                eos_token_ids: m.eos_token_ids,
                backend: "cuda",
            });
        }
        if let Some(plan) = m.native.clone() {
            let model = NativeModel::open(plan, m.signature.clone(), &dir, threads)
                .with_context(|| format!("{}: cannot load the native kernels", dir.display()))?;
            return Ok(Runnable {
                model: Box::new(model),
                tokenizer: a.tokenizer_path(),
                eos_token_ids: m.eos_token_ids,
                backend: "cpu",
            });
        }
    }
    let loaded = load(path)?;
    Ok(Runnable {
        tokenizer: loaded.tokenizer,
        eos_token_ids: loaded.eos_token_ids,
        model: Box::new(InterpModel::new(loaded.graph, loaded.weights)?),
        backend: "interp",
    })
}

/// The thread count `--threads` asks for, all cores by default.
pub fn threads(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
}
