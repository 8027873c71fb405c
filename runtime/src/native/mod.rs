//! The native backend: runs a `cpu` artifact's kernels (a shared library
//! built by `smelt_codegen::aot`) following its [`NativePlan`].
//!
//! - [`library`]: loads the shared library, resolves every kernel symbol up
//!   front and checks the host's architecture and CPU features;
//! - [`team`]: a persistent thread team that runs a sequence of launches,
//!   every thread calling every kernel with its index, a spin barrier
//!   between launches;
//! - [`arena`]: 64-byte aligned memory and the liveness-based placement of
//!   scratch buffers;
//! - [`bind`]: input validation and symbol binding;
//! - [`checked`]: the plan checked once and sized per call (shared with the
//!   GPU runtime, [`crate::cuda`]);
//! - [`exec`]: [`NativeModel`], the [`crate::Forward`] implementation, with
//!   the KV cache kept in its own memory while decoding
//!   ([`crate::CachedDecode`]).
//!
//! Nothing here depends on the compiler: the plan, the library and the
//! weights file are everything it needs.
//!
//! [`NativePlan`]: crate::plan::NativePlan

pub mod arena;
pub mod bind;
pub mod checked;
pub mod exec;
pub mod library;
pub mod team;

use std::path::PathBuf;

pub use exec::{NativeModel, NativeStats, Weights};
pub use library::{check_cpu_features, KernelFn, KernelLibrary};
pub use team::{Team, TeamError};

/// Everything that can go wrong loading or running a native model. Messages
/// name the input, buffer, kernel or launch (with its IR node) concerned.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot load the kernel library: {message}", path.display())]
    Library { path: PathBuf, message: String },
    #[error("{}: the kernel library does not export `{symbol}` ({message}); the artifact is corrupt or was built by another version", path.display())]
    MissingSymbol { path: PathBuf, symbol: String, message: String },
    #[error("the kernel library was compiled for {expected}, this machine is {found}; recompile the model here")]
    Arch { expected: String, found: String },
    #[error("the kernel library needs CPU features this machine lacks: {}; recompile the model on this machine", .missing.join(", "))]
    MissingCpuFeatures { missing: Vec<String> },
    #[error("invalid launch plan: {0}")]
    Plan(String),
    #[error("cannot start the thread team: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("missing input `{name}` (expected {expected})")]
    MissingInput { name: String, expected: String },
    #[error("unknown input `{name}` (the model's inputs are {})", .expected.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))]
    UnknownInput { name: String, expected: Vec<String> },
    #[error("input `{name}`: expected dtype {expected}, found {found}")]
    InputDType { name: String, expected: String, found: String },
    #[error("input `{name}`: expected rank {} ({expected}), found rank {} (shape {found:?})", .rank, .found.len())]
    InputRank { name: String, expected: String, rank: usize, found: Vec<usize> },
    #[error("input `{name}` axis {axis}: expected {expected}, found {found}")]
    InputDim { name: String, axis: usize, expected: String, found: usize },
    #[error(
        "symbol `{symbol}` = {value} (from input `{name}` axis {axis}) is outside its declared bounds [{min}, {max}]"
    )]
    SymbolOutOfBounds { symbol: String, value: i64, name: String, axis: usize, min: i64, max: i64 },
    #[error("input `{name}`: {why}")]
    BadInput { name: String, why: String },
    #[error("buffer `{buffer}`: {why}")]
    Buffer { buffer: String, why: String },
    #[error("launch {launch} (`{node}`, kernel `{kernel}`): {why}")]
    Launch { launch: usize, node: String, kernel: String, why: String },
    #[error("the scratch arena would need {bytes} bytes, more than this machine can address")]
    ArenaTooLarge { bytes: u128 },
    #[error("the scratch arena of {bytes} bytes could not be allocated")]
    OutOfMemory { bytes: usize },
    #[error("the KV cache's {bytes} bytes could not be allocated")]
    CacheOutOfMemory { bytes: usize },
    #[error("this model cannot keep its KV cache: {0}")]
    NoCache(String),
    #[error("the KV cache has room for {capacity} positions, the call needs {filled}")]
    CacheFull { capacity: usize, filled: usize },
    #[error(transparent)]
    Team(#[from] TeamError),
}

impl From<NativeError> for crate::ForwardError {
    fn from(e: NativeError) -> crate::ForwardError {
        crate::ForwardError::Other(e.to_string())
    }
}
