//! The launch plan of a natively compiled artifact (`target cpu`): which
//! kernels the shared library exports, every buffer the model touches, and
//! the ordered kernel launches of one forward call.
//!
//! The compiler (`smelt-codegen`'s scheduler) writes it into the manifest;
//! the runtime reads it and needs nothing else to run the model. Sizes are
//! symbolic dims (strings in the text IR's dim syntax, e.g. `past + seq`)
//! over the graph's symbols, resolved per call once the inputs' shapes bind
//! the symbols.
//!
//! Invariants the scheduler guarantees and the runtime re-checks before any
//! kernel runs: every launch names existing kernels and buffers, and for
//! every argument `needs` (the element count the kernel's declaration asks
//! for, given the launch's scalars) is at most the bound buffer's length.

use serde::{Deserialize, Serialize};

/// Element types of plan buffers, as the kernels read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Elem {
    F32,
    I32,
    I64,
    /// One byte per element, 0 or 1.
    Bool,
    /// Storage-only narrow floats (weights stored narrower than they are
    /// computed); kernels widen them to f32 as they load.
    BF16,
    F16,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::I64 => 8,
            Elem::Bool => 1,
            Elem::BF16 | Elem::F16 => 2,
        }
    }
}

/// One kernel the library exports, called as
/// `extern "C" fn(buffers: *const *mut u8, scalars: *const i64, thread: i64, threads: i64)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelEntry {
    /// The exported symbol.
    pub symbol: String,
    /// Which lowering produced it (`cranelift`, `llvm`).
    pub lowering: String,
    /// Element types of its global buffers, in argument order.
    pub buffers: Vec<Elem>,
    /// How many `i64` scalars it takes.
    pub scalars: usize,
    /// For a GPU kernel: its threads per block (x, y, z). GPU kernels take
    /// their global buffers as device pointers, then the scalars as `i64`,
    /// as kernel parameters in that order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<[u32; 3]>,
    /// Where the kernel's template parameters came from (absent in
    /// artifacts written before the tuner existed, and for GPU kernels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<KernelTuning>,
    /// Present when this entry is not a kernel of the artifact's code but a
    /// call into a vendor library (see [`LibraryCall`]); `symbol` then only
    /// names it, `lowering` is the library (`cublas`) and `block` is absent.
    /// Absent in plans written before library calls existed; a runtime that
    /// predates them refuses such an entry (it has no thread block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library: Option<LibraryCall>,
}

/// A launch done by a vendor library instead of a generated kernel. Its
/// [`KernelEntry::buffers`] and its launches' arguments follow the call's
/// own order (see each variant), its scalars are the variant's run-time
/// sizes, and its launches have no grid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LibraryCall {
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ`, all dense row-major, by cuBLAS
    /// (`cublasGemmEx`). Buffers: `x` (elements `a`), `w` (elements `b`),
    /// `y` (elements `c`); one scalar, `m`. Every launch's needs are
    /// exactly `m·k`, `n·k` and `m·n` (the runtime refuses a plan whose
    /// needs differ, and a call whose buffers are shorter).
    Gemm(GemmCall),
}

/// The static half of a [`LibraryCall::Gemm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmCall {
    /// The library: `cublas`.
    pub library: String,
    pub n: u64,
    pub k: u64,
    /// Element types of `x`, `w` and `y` (`x` and `w` the same: f32, bf16
    /// or f16; `y` f32).
    pub a: Elem,
    pub b: Elem,
    pub c: Elem,
    pub compute: GemmCompute,
}

/// How a library GEMM accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmCompute {
    /// f32 products and sums (`CUBLAS_COMPUTE_32F`: f32 operands are not
    /// rounded to TF32; bf16/f16 operands multiply exactly).
    F32,
    /// f32 operands rounded to TF32 on tensor cores
    /// (`CUBLAS_COMPUTE_32F_FAST_TF32`), f32 sums.
    Tf32,
}

/// How a kernel's parameters were chosen, as the compiler records it for
/// people and for `smelt tune ARTIFACT` (which re-creates the kernel's
/// variants from `site`). The runtime does not interpret it. Strings only
/// (no floats), so the plan's hash is stable across a manifest round trip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelTuning {
    pub source: TuningSource,
    /// The template and what is fixed about the kernel (static sizes,
    /// dtypes), e.g. `weight_product n=960 k=576 act=none w=f32`; empty for
    /// a kernel without tunable parameters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site: String,
    /// The parameters it was built with, as the template spells them, e.g.
    /// `panels mr=6 nr=8 ksplit=4 fma=0 lanes=4 lowering=cranelift`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
    /// For a measured kernel: the tuning database record's key
    /// (`signature/bucket/device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Where a kernel's parameters came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TuningSource {
    /// A winner measured on this device kind, from the tuning database.
    Measured,
    /// The template's default (estimated) parameters: no record matched.
    Estimated,
    /// The template has no tunable parameters.
    Fixed,
}

/// Where a buffer's bytes live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Storage {
    /// A graph input, filled from the caller's tensor (converted to `elem`).
    Input { name: String },
    /// Constant data at `offset` bytes in the artifact's weights file
    /// (64-byte aligned).
    Weight { offset: u64 },
    /// Scratch memory in the session's arena, placed by liveness per call.
    Arena,
    /// A view of another buffer starting `offset` elements in (reshapes and
    /// contiguous slices need no copy).
    Alias { of: usize, offset: String },
}

/// A tensor of the forward call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    /// The IR value's name, for error messages.
    pub name: String,
    pub elem: Elem,
    /// The tensor's shape as dims (the length is their product).
    pub shape: Vec<String>,
    pub storage: Storage,
}

/// One kernel call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// Index into [`NativePlan::kernels`].
    pub kernel: usize,
    /// Buffer indices, one per kernel buffer argument.
    pub args: Vec<usize>,
    /// The element count the kernel reads or writes through each argument.
    pub needs: Vec<String>,
    /// The kernel's scalar arguments as dims.
    pub scalars: Vec<String>,
    /// The IR node it computes (`%42 = rms_norm ...` location), for errors
    /// and profiles.
    pub node: String,
    /// For a GPU kernel: the grid (x, y, z) in blocks, as dims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<[String; 3]>,
    /// Bytes the launch reads and writes in all, as a dim, where that is
    /// far less than its arguments hold (an append of one position to a
    /// KV cache kept in place; split decode attention's first launch,
    /// which moves nothing below 512 visible keys). The CPU runtime runs a
    /// launch on one thread when this, or else every argument, is small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<String>,
}

/// PTX text for one GPU architecture, a file of the artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PtxModule {
    /// The target, as `ptxas -arch` spells it (`sm_80`, `sm_90`, `sm_90a`).
    pub arch: String,
    /// The file's name inside the artifact.
    pub file: String,
}

/// Everything the runtime needs to run a `cpu` artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NativePlan {
    /// The shared library's file name inside the artifact.
    pub library: String,
    /// The weights file's name inside the artifact.
    pub weights: String,
    pub kernels: Vec<KernelEntry>,
    pub buffers: Vec<Buffer>,
    pub launches: Vec<Launch>,
    /// The graph's symbols with their inclusive bounds; inputs outside them
    /// are refused before any kernel runs.
    pub symbols: Vec<(String, i64, i64)>,
    /// Graph inputs by name, as buffer indices (their buffers have
    /// `Storage::Input`), in the graph's order.
    pub inputs: Vec<(String, usize)>,
    /// Graph outputs by name, as buffer indices.
    pub outputs: Vec<(String, usize)>,
    /// The architecture the library was compiled for, as
    /// `std::env::consts::ARCH` spells it (`x86_64`); the runtime refuses to
    /// load the library on another one. Empty: not checked.
    #[serde(default)]
    pub arch: String,
    /// The CPU features the library's code may use, as
    /// `is_x86_feature_detected!` spells them (`sse4.1`, `avx2`, `fma`);
    /// the runtime refuses to load the library when the host lacks any
    /// (`smelt_codegen::aot::LibraryInfo::cpu_features` gives them).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// For a `cuda` plan: the kernels as PTX, one module per architecture
    /// (every module defines every kernel, named by `KernelEntry::symbol`);
    /// `library` is then empty. The runtime takes the best module the
    /// device can run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ptx: Vec<PtxModule>,
    /// Present when some `present.*` buffers are KV caches kept in place
    /// (see [`KvCachePlan`]); their shapes use its `capacity` symbol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvCachePlan>,
}

/// How a plan's KV caches are kept in place. The `present.*` buffers of the
/// caches have room for `capacity` positions per `(batch, head)`; the
/// kernels that append to them copy the first `copied` positions of their
/// `past_key_values.*` input, then write the call's new positions after
/// the past ones. Neither symbol comes from an input:
/// - a call given its past as inputs binds `capacity` to `filled` and
///   `copied` to `past` (dims over the input symbols), so the buffers are
///   the dense `present.*` outputs;
/// - a decode step whose cache the runtime holds binds `capacity` to the
///   room of the buffers it keeps (at least `filled`) and `copied` to 0,
///   and passes those same buffers as the `past_key_values.*` inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCachePlan {
    /// The symbol for the positions each cache buffer has room for.
    pub capacity: String,
    /// The symbol for the past positions an append copies from its input.
    pub copied: String,
    /// The positions held before a call, as a dim (`past`).
    pub past: String,
    /// The positions held after a call, as a dim (`past + seq`).
    pub filled: String,
}
