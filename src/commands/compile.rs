//! `smelt compile MODEL -o OUT.smelt [--target interp|cpu|cuda] [--weight-dtype f32|bf16|f16] [--dump-ir STAGE|all]`:
//! builds the model's graph, runs the pass pipeline (folding, CSE, fusion
//! with egg; `--no-fuse` skips it), verifies the result and writes an
//! artifact whose manifest records the fusion report. `interp` stores the
//! verified text IR and weights for the reference interpreter; `cpu` also
//! schedules the graph into kernels, compiles them with Cranelift, links
//! them into `kernels.so` with the system `cc` and stores the launch plan
//! and the constants laid out for mmap; `cuda` schedules the graph for the
//! GPU and stores the kernels as PTX for each `--gpu-arch` (it needs the
//! `llvm` build). `--target cpu,cuda` stores both plans in one artifact.
//! `--weight-dtype` stores the matmul weights and embedding tables as bf16
//! or f16 (computation stays f32); it defaults to the checkpoint's own dtype
//! when that is bf16 or f16, so a bf16 checkpoint keeps its exact weights at
//! half the bytes of f32. `--dtype bf16|f16` (target `cuda` only) keeps
//! the hidden-state activations in that type, computed with f32
//! accumulation (`smelt_passes::narrow`), and makes it the weights'
//! default type too.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::ValueEnum;
use smelt_codegen::kir::Scalar;
use smelt_codegen::schedule::{schedule_into, ScheduleOptions, WeightDtype};
use smelt_codegen::tuning::{Site, Tuning};
use smelt_ir::{Graph, StoredTensor};
use smelt_passes::egraph::cost::MeasuredCosts;
use smelt_passes::{pipeline, DumpSpec, DumpTarget, PipelineOptions};
use smelt_runtime::artifact::{write_artifact, ArtifactSpec, CudaFiles, NativeFiles};
use smelt_runtime::constants::ConstantsWriter;
use smelt_runtime::plan::{NativePlan, TuningSource};
use smelt_tune::db;
use std::sync::Arc;

use crate::source::{load_checkpoint_stored, load_checkpoint_stored_with, load_onnx, Source};
use smelt_frontends::hf::HfOptions;

/// The weights a compile reads: stored bytes by name.
type Weights = std::collections::BTreeMap<String, StoredTensor>;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The verified IR and weights, run by the reference interpreter.
    Interp,
    /// Native CPU kernels (Cranelift) in a shared library, run by the native runtime.
    Cpu,
    /// NVIDIA GPU kernels as PTX (LLVM NVPTX), run by the CUDA runtime.
    Cuda,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightDtypeArg {
    /// 4 bytes per weight, exact.
    F32,
    /// 2 bytes, 8 significant bits, f32's range.
    Bf16,
    /// 2 bytes, 11 significant bits, up to 65504 (larger weights stay f32); slower to widen than bf16.
    F16,
}

impl From<WeightDtypeArg> for WeightDtype {
    fn from(d: WeightDtypeArg) -> WeightDtype {
        match d {
            WeightDtypeArg::F32 => WeightDtype::F32,
            WeightDtypeArg::Bf16 => WeightDtype::BF16,
            WeightDtypeArg::F16 => WeightDtype::F16,
        }
    }
}

/// `--gpu-gemm`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuGemmArg {
    #[default]
    Kernels,
    Cublas,
    CublasTf32,
}

/// `--dtype`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActDtypeArg {
    /// f32 activations.
    F32,
    /// bf16 activations (f32 accumulation; the logits and the KV cache stay f32).
    Bf16,
    /// f16 activations (f32 accumulation; the logits and the KV cache stay f32).
    F16,
}

impl ActDtypeArg {
    /// The narrow type, `None` for f32.
    fn narrow(self) -> Option<smelt_ir::DType> {
        match self {
            ActDtypeArg::F32 => None,
            ActDtypeArg::Bf16 => Some(smelt_ir::DType::BF16),
            ActDtypeArg::F16 => Some(smelt_ir::DType::F16),
        }
    }
}

/// `--rope-cast`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum RopeCastArg {
    Bf16,
    F16,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face checkpoint folder (config.json + *.safetensors) or an .onnx file.
    pub model: PathBuf,
    /// The artifact directory to write (conventionally NAME.smelt).
    #[arg(short, long)]
    pub output: PathBuf,
    /// What to compile for; `cpu,cuda` puts both in one artifact.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "interp")]
    pub target: Vec<Target>,
    /// GPU architectures to emit PTX for (target `cuda`).
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90,sm_90a", value_name = "SM,...")]
    pub gpu_arch: Vec<String>,
    /// Keep the frontend's primitive graph (no passes, no fusion).
    #[arg(long)]
    pub no_fuse: bool,
    /// How `--target cpu` stores matmul weights and embedding tables (all
    /// arithmetic stays f32) [default: the checkpoint's dtype if bf16 or f16, else f32].
    #[arg(long, value_enum)]
    pub weight_dtype: Option<WeightDtypeArg>,
    /// What computes `--target cuda`'s weight products: generated kernels, or cuBLAS GEMMs
    /// (loaded at run time; the manifest's kernel entries say which, `lowering: cublas`);
    /// `cublas-tf32` lets f32 weight products round their operands to TF32.
    #[arg(long, value_enum, default_value = "kernels")]
    pub gpu_gemm: GpuGemmArg,
    /// The type of the hidden-state activations of `--target cuda` (computed with f32 accumulation;
    /// narrow types make the weights default to the same type).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ActDtypeArg,
    /// Round a checkpoint's RoPE frequencies to bf16 or f16, as a transformers model cast in
    /// memory (`model.to(torch.bfloat16)`) has them [default: exact float32, as `from_pretrained`
    /// computes them for any checkpoint]. The two drift apart with the position.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub rope_cast: Option<RopeCastArg>,
    #[command(flatten)]
    pub tuning: TuningArgs,
    #[command(flatten)]
    pub passes: PassArgs,
}

/// Which measured kernel parameters `--target cpu` uses.
#[derive(clap::Args, Debug, Default)]
pub struct TuningArgs {
    /// The tuning database `smelt tune` wrote [default: $SMELT_TUNING_DB, else the user's cache folder's
    /// smelt/tuning.json, when it exists].
    #[arg(long, value_name = "PATH")]
    pub tuning_db: Option<PathBuf>,
    /// Use every kernel's default (estimated) parameters, ignoring any tuning database.
    #[arg(long, conflicts_with = "tuning_db")]
    pub no_tuning: bool,
}

impl TuningArgs {
    /// The winners for this machine from the database, if one is used, and
    /// their measured times for the fusion cost model (of products whose
    /// weights are stored as `weights`, as this compile stores them); a
    /// damaged database is a warning (on stderr) and an untuned compile.
    pub fn load(&self, weights: Scalar) -> Option<(Arc<Tuning>, PathBuf, MeasuredCosts)> {
        self.load_for(&smelt_tune::device::Device::host_cpu(), weights)
    }

    /// The winners for GPU 0 of this machine (a `cuda` compile); none,
    /// with a note, when no GPU is visible (records are only applied to the
    /// GPU they were measured on).
    pub fn load_gpu(&self) -> Option<(Arc<Tuning>, PathBuf)> {
        // Without a database there is nothing to match: the GPU is not
        // opened.
        if self.no_tuning || (self.tuning_db.is_none() && db::default_path().filter(|p| p.exists()).is_none()) {
            return None;
        }
        match smelt_runtime::cuda::probe(0) {
            Ok(info) => {
                let device = smelt_tune::device::Device::gpu(&info.name, info.compute_capability, info.driver_version);
                self.load_for(&device, Scalar::F32).map(|(t, p, _)| (t, p))
            }
            Err(e) => {
                if self.tuning_db.is_some() {
                    eprintln!("note: no GPU to match tuning records against ({e}); GPU kernels use their estimated parameters");
                }
                None
            }
        }
    }

    /// The winners measured on `device`, and (CPU) their times for the
    /// fusion cost model.
    fn load_for(
        &self,
        device: &smelt_tune::device::Device,
        weights: Scalar,
    ) -> Option<(Arc<Tuning>, PathBuf, MeasuredCosts)> {
        if self.no_tuning {
            return None;
        }
        let path = match &self.tuning_db {
            Some(p) => {
                if !p.exists() {
                    eprintln!("warning: tuning database {}: no such file; compiling untuned", p.display());
                    return None;
                }
                p.clone()
            }
            None => db::default_path().filter(|p| p.exists())?,
        };
        let (database, warnings) = db::Db::load(&path);
        let (tuning, more) = database.tuning_for(&device.id, &path.display().to_string());
        for w in warnings.iter().chain(&more) {
            eprintln!("warning: {w}");
        }
        // The winners' times (summed over the row counts they were timed
        // at), keyed as the cost model looks weight products up.
        let mut costs = MeasuredCosts::default();
        for r in database.records().filter(|r| r.key.device == device.id) {
            if let Ok(Site::WeightProduct { n, k, act, w }) = r.site.parse::<Site>() {
                if w != weights {
                    continue;
                }
                let op = if act.is_some() { "gated_mlp" } else { "matmul" };
                costs.insert(MeasuredCosts::key(op, k as i64, n as i64), r.timings.iter().map(|t| t.seconds).sum());
            }
        }
        Some((Arc::new(tuning), path, costs))
    }
}

/// The pass pipeline's options, shared by `compile` and `inspect --fusion`.
#[derive(clap::Args, Debug, Default)]
pub struct PassArgs {
    /// Dump the IR after a stage (comma-separated stage names) or after `all` of them.
    #[arg(long, value_name = "STAGE|all")]
    pub dump_ir: Option<String>,
    /// Write dumps as files into this folder instead of stdout.
    #[arg(long, value_name = "DIR", requires = "dump_ir")]
    pub dump_dir: Option<PathBuf>,
}

impl PassArgs {
    /// The pipeline options these flags ask for.
    pub fn options(&self, explain: bool) -> Result<PipelineOptions> {
        let dump = match &self.dump_ir {
            None => None,
            Some(what) => {
                let target = match &self.dump_dir {
                    Some(d) => DumpTarget::Dir(d.clone()),
                    None => DumpTarget::Stdout,
                };
                Some(DumpSpec::parse(what, target)?)
            }
        };
        let mut opts = PipelineOptions { dump, ..PipelineOptions::default() };
        opts.fusion.explain = explain;
        Ok(opts)
    }
}

pub fn main(args: Args) -> Result<()> {
    let wants = |t: Target| args.target.contains(&t);
    if let Some(d) = args.dtype.narrow() {
        if wants(Target::Cpu) || wants(Target::Interp) {
            bail!("--dtype {d} applies to `--target cuda` only (the cpu and interp targets keep f32 activations)");
        }
    }
    if wants(Target::Interp) && args.target.len() > 1 {
        bail!("target `interp` cannot be combined with other targets");
    }
    if wants(Target::Cuda) {
        check_gpu_archs(&args.gpu_arch)?;
        if !cfg!(feature = "llvm") {
            bail!("{NO_NVPTX}");
        }
    }
    if args.weight_dtype.is_some() && wants(Target::Interp) {
        bail!("--weight-dtype applies to `--target cpu` and `cuda` only (the interp target keeps the checkpoint's weights)");
    }
    let start = Instant::now();
    let mut phases = Phases::new();
    // The weights stay in their stored bytes (a checkpoint's memory map)
    // until the scheduler places them.
    let rope_cast = args.rope_cast.map(|d| match d {
        RopeCastArg::Bf16 => smelt_ir::DType::BF16,
        RopeCastArg::F16 => smelt_ir::DType::F16,
    });
    let mut loaded = match Source::classify(&args.model)? {
        Source::Checkpoint(dir) => load_checkpoint_stored_with(&dir, &HfOptions { rope_cast })?,
        Source::Onnx(p) if rope_cast.is_some() => bail!(
            "{}: --rope-cast applies to checkpoint folders (an ONNX export has its RoPE frequencies in the graph)",
            p.display()
        ),
        Source::Onnx(p) => load_onnx(&p)?.into_stored(),
        Source::Artifact(p) => {
            bail!("{}: is already a smelt artifact (compile takes a checkpoint folder or an .onnx file)", p.display())
        }
    };
    phases.mark("load");
    let weight_dtype = match (args.weight_dtype, args.dtype) {
        (None, ActDtypeArg::Bf16) => WeightDtype::BF16,
        (None, ActDtypeArg::F16) => WeightDtype::F16,
        _ => weight_dtype(args.weight_dtype, loaded.info.stored_dtype.as_deref()),
    };
    // Measured kernels of this machine (CPU kernels: only a cpu compile;
    // GPU kernels: of the GPU this machine has).
    let tuning = if wants(Target::Cpu) { args.tuning.load(weight_dtype.scalar()) } else { None };
    let gpu_tuning = if wants(Target::Cuda) { args.tuning.load_gpu() } else { None };
    let fusion = if args.no_fuse {
        None
    } else {
        let mut options = args.passes.options(false)?;
        options.fusion.measured = tuning.as_ref().map(|t| Arc::new(t.2.clone()));
        let report = pipeline(&mut loaded.graph, &mut loaded.weights, &options)?;
        Some(serde_json::to_value(&report.fusion)?)
    };
    phases.mark("passes");
    // Constants files are written here as they are built, then moved into
    // the artifact; beside the output, so moving is a rename.
    let staging = staging_dir(&args.output)?;
    let native = if wants(Target::Cpu) {
        let constants = ConstantsWriter::create(&staging.path().join("constants.bin"))?;
        let tuning = tuning.map(|(t, p, _)| (t, p));
        Some(compile_native(&loaded.graph, &loaded.weights, weight_dtype, tuning, constants, &mut phases)?)
    } else {
        None
    };
    let cuda = if wants(Target::Cuda) {
        let constants = ConstantsWriter::create(&staging.path().join("constants.cuda.bin"))?;
        let gemm = match args.gpu_gemm {
            GpuGemmArg::Kernels => smelt_codegen::schedule::GpuGemm::Kernels,
            GpuGemmArg::Cublas => smelt_codegen::schedule::GpuGemm::Cublas,
            GpuGemmArg::CublasTf32 => smelt_codegen::schedule::GpuGemm::CublasTf32,
        };
        let gpu = GpuChoices { gemm, activations: args.dtype.narrow(), archs: &args.gpu_arch };
        Some(compile_cuda(&loaded.graph, &loaded.weights, weight_dtype, gpu, gpu_tuning, constants, &mut phases)?)
    } else {
        None
    };
    let manifest = write_artifact(
        &args.output,
        &ArtifactSpec {
            graph: &loaded.graph,
            weights: &loaded.weights,
            model: loaded.info.clone(),
            tokenizer: loaded.tokenizer.as_deref(),
            eos_token_ids: loaded.eos_token_ids.clone(),
            fusion,
            native,
            cuda,
        },
    )?;
    drop(staging);
    phases.mark("write");
    let target = manifest.target.clone();
    let size: u64 = manifest.files.iter().map(|f| f.size).sum();
    crate::out(&format!(
        "compiled {} ({}, {} parameters, {} nodes) -> {} [target {target}, {:.1} MB] in {:.2}s\n",
        args.model.display(),
        manifest.model.architecture,
        manifest.model.parameters,
        loaded.graph.node_count(),
        args.output.display(),
        size as f64 / 1e6,
        start.elapsed().as_secs_f64()
    ))
}

/// The weight storage type: `--weight-dtype`, else the checkpoint's own
/// when it is bf16 or f16, else f32.
pub fn weight_dtype(arg: Option<WeightDtypeArg>, stored: Option<&str>) -> WeightDtype {
    match (arg, stored) {
        (Some(d), _) => d.into(),
        (None, Some("bf16")) => WeightDtype::BF16,
        (None, Some("f16")) => WeightDtype::F16,
        (None, _) => WeightDtype::F32,
    }
}

/// The schedule options of `--target cpu` in this build.
pub fn cpu_options(weight_dtype: WeightDtype, tuning: Option<Arc<Tuning>>) -> ScheduleOptions {
    // The weight kernels read packed panels: 4-lane vectors for Cranelift,
    // and in the llvm build vectors as wide as the host's (see `panel`),
    // unless a measured winner says otherwise.
    ScheduleOptions { packed_weights: true, weight_dtype, panel: panel(), tuning, ..ScheduleOptions::default() }
}

/// The schedule options of `--target cuda` (generated weight products).
pub fn gpu_options(weight_dtype: WeightDtype) -> ScheduleOptions {
    ScheduleOptions { device: smelt_codegen::schedule::Device::Gpu, weight_dtype, ..ScheduleOptions::default() }
}

/// The `cuda` plan of a model (untuned, generated weight products), for
/// `smelt tune --target cuda`.
pub fn gpu_plan(model: &std::path::Path, weight_dtype_arg: Option<WeightDtypeArg>) -> Result<NativePlan> {
    plan_with(model, weight_dtype_arg, gpu_options)
}

/// Loads `model` (a checkpoint folder or an .onnx file), runs the passes
/// and schedules it for the CPU, untuned: the plan `smelt tune` reads the
/// model's kernels from. The constants are built in memory and dropped.
pub fn cpu_plan(model: &std::path::Path, weight_dtype_arg: Option<WeightDtypeArg>) -> Result<NativePlan> {
    plan_with(model, weight_dtype_arg, |wd| cpu_options(wd, None))
}

/// The plan `options` schedule for a model (after the pass pipeline).
fn plan_with(
    model: &std::path::Path,
    weight_dtype_arg: Option<WeightDtypeArg>,
    options: impl Fn(WeightDtype) -> ScheduleOptions,
) -> Result<NativePlan> {
    let mut loaded = match Source::classify(model)? {
        Source::Checkpoint(dir) => load_checkpoint_stored(&dir)?,
        Source::Onnx(p) => load_onnx(&p)?.into_stored(),
        Source::Artifact(p) => bail!("{}: is an artifact, not a model", p.display()),
    };
    pipeline(&mut loaded.graph, &mut loaded.weights, &PipelineOptions::default())?;
    let wd = weight_dtype(weight_dtype_arg, loaded.info.stored_dtype.as_deref());
    let sched = schedule_into(&loaded.graph, &loaded.weights, options(wd), ConstantsWriter::in_memory())?;
    Ok(sched.plan)
}

/// `SMELT_TIME=1`: the time each phase of a compile took (and the peak
/// resident memory so far, where `/proc` has it), on stderr.
struct Phases {
    on: bool,
    last: Instant,
}

impl Phases {
    fn new() -> Phases {
        Phases { on: std::env::var_os("SMELT_TIME").is_some_and(|v| !v.is_empty() && v != "0"), last: Instant::now() }
    }

    fn mark(&mut self, phase: &str) {
        if self.on {
            let peak = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l[6..].trim().to_string()))
                .map(|p| format!(" (peak RSS {p})"))
                .unwrap_or_default();
            eprintln!("time: {phase:<14} {:7.2}s{peak}", self.last.elapsed().as_secs_f64());
        }
        self.last = Instant::now();
    }
}

/// Schedules the graph into kernels, compiles and links them, and returns
/// what the artifact stores for the `cpu` target.
fn compile_native(
    graph: &Graph,
    weights: &Weights,
    weight_dtype: WeightDtype,
    tuning: Option<(Arc<Tuning>, PathBuf)>,
    constants: ConstantsWriter,
    phases: &mut Phases,
) -> Result<NativeFiles> {
    let (tuning, db_path) = match tuning {
        Some((t, p)) => (Some(t), Some(p)),
        None => (None, None),
    };
    let sched = schedule_into(graph, weights, cpu_options(weight_dtype, tuning), constants)?;
    if let Some(p) = db_path {
        report_tuning(&sched.plan, "", &p);
    }
    phases.mark("cpu schedule");
    let dir = tempfile::tempdir()?;
    let mut plan = sched.plan;
    #[cfg(not(feature = "llvm"))]
    let lib = smelt_codegen::aot::build_library(&sched.kernels, dir.path())?;
    // With LLVM built in, it lowers every kernel: besides the weight
    // kernels (8-lane tiles only it lowers), attention and the norms ran
    // 1.4x and 2x faster through it than through Cranelift in a prefill of
    // smollm2-135m, and the compile took no longer (a few dozen distinct
    // kernels). A tunable kernel's lowering is its variant's (the
    // scheduler has set it).
    #[cfg(feature = "llvm")]
    let lib = {
        for entry in plan.kernels.iter_mut() {
            let tunable = entry.tuning.as_ref().is_some_and(|t| t.source != TuningSource::Fixed);
            if !tunable {
                entry.lowering = "llvm".into();
            }
        }
        let llvm: std::collections::HashSet<String> = plan
            .kernels
            .iter()
            .zip(&sched.kernels)
            .filter(|(e, _)| e.lowering == "llvm")
            .map(|(_, k)| k.name.clone())
            .collect();
        smelt_codegen::aot::build_library_mixed(&sched.kernels, &|k| llvm.contains(&k.name), dir.path())?
    };
    phases.mark("cpu kernels");
    plan.arch = lib.arch;
    plan.cpu_features = lib.cpu_features;
    let constants = sched.constants.finish()?;
    phases.mark("cpu constants");
    Ok(NativeFiles { plan, library: lib.bytes, constants })
}

/// How many of `plan`'s tunable kernels use measured parameters, on stderr.
fn report_tuning(plan: &NativePlan, what: &str, db: &std::path::Path) {
    let count =
        |s: TuningSource| plan.kernels.iter().filter(|k| k.tuning.as_ref().is_some_and(|t| t.source == s)).count();
    let (measured, estimated) = (count(TuningSource::Measured), count(TuningSource::Estimated));
    eprintln!(
        "tuning: {measured} of {} tunable {what}kernels use measured parameters ({})",
        measured + estimated,
        db.display()
    );
}

/// The packed weight kernels' tiles: without LLVM, Cranelift's 128-bit
/// ones; with it, 8-lane tiles where the host has AVX2 and FMA (LLVM
/// lowers the weight kernels), else the 128-bit tiles with FMA.
fn panel() -> smelt_codegen::templates::packed::PanelParams {
    smelt_codegen::tuning::default_panels(&smelt_codegen::tuning::Lowering::available()).0
}

/// A temporary folder beside `output` (or in the system's when the
/// output's folder does not exist yet), removed when dropped.
fn staging_dir(output: &std::path::Path) -> Result<tempfile::TempDir> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".smelt-staging-");
    Ok(if parent.is_dir() { builder.tempdir_in(parent)? } else { builder.tempdir()? })
}

/// The GPU architectures PTX can be emitted for.
const GPU_ARCHS: &[&str] = &["sm_80", "sm_90", "sm_90a"];

fn check_gpu_archs(archs: &[String]) -> Result<()> {
    if archs.is_empty() {
        bail!("--gpu-arch: at least one architecture is needed ({})", GPU_ARCHS.join(", "));
    }
    for a in archs {
        if !GPU_ARCHS.contains(&a.as_str()) {
            bail!("--gpu-arch: unknown GPU architecture `{a}` (known: {})", GPU_ARCHS.join(", "));
        }
    }
    Ok(())
}

/// The GPU target's choices: what computes the weight products
/// (`--gpu-gemm`), the activations' type (`--dtype`; `None` for f32) and
/// the architectures to emit PTX for (`--gpu-arch`).
// Without LLVM `compile_cuda` refuses before reading them.
#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
struct GpuChoices<'a> {
    gemm: smelt_codegen::schedule::GpuGemm,
    activations: Option<smelt_ir::DType>,
    archs: &'a [String],
}

/// Schedules the graph for the GPU and emits its kernels as PTX for each
/// architecture in `gpu.archs`.
#[cfg(feature = "llvm")]
fn compile_cuda(
    graph: &Graph,
    weights: &Weights,
    weight_dtype: WeightDtype,
    gpu: GpuChoices,
    tuning: Option<(Arc<Tuning>, PathBuf)>,
    constants: ConstantsWriter,
    phases: &mut Phases,
) -> Result<CudaFiles> {
    use smelt_codegen::llvm::{emit_ptx, GpuArch};
    let GpuChoices { gemm: gpu_gemm, activations, archs } = gpu;
    let (tuning, db_path) = match tuning {
        Some((t, p)) => (Some(t), Some(p)),
        None => (None, None),
    };
    let options = ScheduleOptions { gpu_gemm, tuning, ..gpu_options(weight_dtype) };
    // Narrow activations: the hidden state's values retyped (the artifact
    // keeps the f32 graph: inputs and outputs are the same).
    let narrowed = match activations {
        Some(d) => Some(smelt_passes::narrow::narrow_activations(graph, d)?.0),
        None => None,
    };
    let sched = schedule_into(narrowed.as_ref().unwrap_or(graph), weights, options, constants)?;
    if let Some(p) = db_path {
        report_tuning(&sched.plan, "GPU ", &p);
    }
    phases.mark("cuda schedule");
    let mut ptx = vec![];
    for a in archs {
        let arch = GpuArch::all().into_iter().find(|g| g.name() == a).expect("checked by check_gpu_archs");
        ptx.push((a.clone(), emit_ptx(&sched.kernels, arch)?));
    }
    phases.mark("cuda kernels");
    let mut plan = sched.plan;
    // Library calls (cuBLAS) keep their own `lowering`.
    for entry in plan.kernels.iter_mut().filter(|e| e.library.is_none()) {
        entry.lowering = "nvptx".into();
    }
    let constants = sched.constants.finish()?;
    phases.mark("cuda constants");
    let activation_dtype = activations.map(|d| d.name().to_string());
    Ok(CudaFiles { plan, ptx, constants, activation_dtype })
}

#[cfg(not(feature = "llvm"))]
fn compile_cuda(
    _: &Graph,
    _: &Weights,
    _: WeightDtype,
    _: GpuChoices,
    _: Option<(Arc<Tuning>, PathBuf)>,
    _: ConstantsWriter,
    _: &mut Phases,
) -> Result<CudaFiles> {
    bail!("{NO_NVPTX}")
}

const NO_NVPTX: &str = "target `cuda` needs LLVM's NVPTX backend: this smelt was built without the `llvm` feature (cargo build --features llvm)";
