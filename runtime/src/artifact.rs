//! The smelt artifact format: a directory `NAME.smelt/` holding
//!
//! - `manifest.json`: the format version, the compiler version, the target,
//!   what the model is (architecture, parameter count, layers, source), its
//!   signature (inputs and outputs with dtype and symbolic shape, symbol
//!   bounds), every other file with its sha256 and size, the tokenizer file
//!   if any and the end-of-sequence token ids;
//! - `model.smir`: the verified graph in the text IR (target `interp`);
//! - `weights.safetensors`: the weights in their stored dtypes (bf16 stays
//!   bf16);
//! - `tokenizer.json`, copied from the model folder when it has one.
//!
//! [`write_artifact`] writes one (into a temporary sibling directory,
//! renamed into place at the end, so a failed compile never leaves half an
//! artifact); [`Artifact::open`] reads one and refuses, with one line naming
//! the problem, an unknown format version or target, malformed manifest JSON,
//! a missing file and a file whose size or sha256 does not match. File names
//! in the manifest must be plain names inside the directory.
//!
//! A `cpu` artifact's launch plan lives in the manifest itself, which no
//! file sha256 covers; yet the plan decides which machine code runs on which
//! buffers, so an edited plan could make a kernel write past a buffer. The
//! manifest therefore also records `native_sha256`, the sha256 of the
//! signature and the plan ([`native_sha256`]), and opening refuses a plan
//! that does not match it. Like the file checksums, this catches corruption
//! and hand edits, not a deliberate forgery.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use smelt_ir::{DType, Dim, Graph, StoredTensor, Tensor, TensorType};

pub use crate::constants::FileData;
use crate::plan::{NativePlan, PtxModule};
use crate::tensors::{read_tensor_file, stored_file_bytes, TensorFileError};

/// The artifact format version this runtime writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// The version of smelt that writes artifacts (the workspace version).
pub const COMPILER_VERSION: &str = env!("CARGO_PKG_VERSION");

pub const MANIFEST_FILE: &str = "manifest.json";
pub const GRAPH_FILE: &str = "model.smir";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Targets an artifact may be compiled for: `interp` (text IR run by the
/// reference interpreter) and `cpu` (kernels in a shared library run by
/// [`crate::native`]).
pub const TARGET_INTERP: &str = "interp";
pub const TARGET_CPU: &str = "cpu";
/// The shared library and the constant data of a `cpu` artifact.
pub const LIBRARY_FILE: &str = "kernels.so";
pub const CONSTANTS_FILE: &str = "constants.bin";
/// The constant data of a `cuda` plan when it differs from the `cpu` one
/// (e.g. weights stored narrower for the GPU).
pub const CUDA_CONSTANTS_FILE: &str = "constants.cuda.bin";
/// `cuda` artifacts hold NVIDIA GPU kernels as PTX (one file per GPU
/// architecture); `cpu,cuda` holds both plans and the runtime picks one.
pub const TARGET_CUDA: &str = "cuda";
pub const TARGET_CPU_CUDA: &str = "cpu,cuda";
pub const KNOWN_TARGETS: &[&str] = &["interp", "cpu", "cuda", "cpu,cuda"];

/// The PTX file of one GPU architecture inside an artifact.
pub fn ptx_file_name(arch: &str) -> String {
    format!("kernels.{arch}.ptx")
}

/// Everything that can go wrong writing or opening an artifact.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a smelt artifact (no {MANIFEST_FILE})", dir.display())]
    NotAnArtifact { dir: PathBuf },
    #[error("{}: malformed JSON at line {line} column {column}: {msg}", path.display())]
    ManifestJson { path: PathBuf, line: usize, column: usize, msg: String },
    #[error("{}: invalid manifest: {msg}", path.display())]
    ManifestInvalid { path: PathBuf, msg: String },
    #[error("{}: artifact format version {found} is not supported (this smelt reads version {FORMAT_VERSION}); recompile the model", dir.display())]
    FormatVersion { dir: PathBuf, found: String },
    #[error("{}: target `{target}` {why}", dir.display())]
    Target { dir: PathBuf, target: String, why: String },
    #[error("{}: file `{name}` listed in the manifest is missing", dir.display())]
    MissingFile { dir: PathBuf, name: String },
    #[error("{}: file `{name}` is {found} bytes, the manifest says {expected} (corrupted or modified)", dir.display())]
    SizeMismatch { dir: PathBuf, name: String, expected: u64, found: u64 },
    #[error("{}: file `{name}` has sha256 {found}, the manifest says {expected} (corrupted or modified)", dir.display())]
    HashMismatch { dir: PathBuf, name: String, expected: String, found: String },
    #[error("{}: the launch plan (`native` and `signature` in {MANIFEST_FILE}) has sha256 {found}, `native_sha256` says {expected} (corrupted or modified); recompile the model", dir.display())]
    PlanHashMismatch { dir: PathBuf, expected: String, found: String },
    #[error("{}: {GRAPH_FILE}:{msg}", dir.display())]
    GraphParse { dir: PathBuf, msg: String },
    #[error("{}: the graph does not verify: {msg}", dir.display())]
    GraphInvalid { dir: PathBuf, msg: String },
    #[error("weight `{name}` {why}")]
    Weight { name: String, why: String },
    #[error("{}: exists and is not a smelt artifact; refusing to overwrite it", path.display())]
    WouldOverwrite { path: PathBuf },
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io { path: path.to_path_buf(), source }
}

/// What the model is, for `smelt inspect` and for people reading the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The transformers class (`LlamaForCausalLM`) or the graph's name.
    pub architecture: String,
    /// `model_type` from config.json (`llama`), when known.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Number of weight elements.
    pub parameters: u64,
    /// Number of decoder layers.
    pub layers: usize,
    /// The dtype the weights are stored in (`f32`, `bf16`, ...), when uniform.
    #[serde(default)]
    pub stored_dtype: Option<String>,
    /// Where the model was compiled from, as given on the command line.
    pub source: String,
}

/// One input or output of the model: name, dtype and symbolic shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSig {
    pub name: String,
    /// The text IR spelling: `f32`, `i64`, ...
    pub dtype: String,
    /// Each dim as the text IR prints it: `batch`, `past + seq`, `64`.
    pub shape: Vec<String>,
    /// Inputs the runtime fills with a default when the caller leaves them out.
    #[serde(default)]
    pub optional: bool,
}

/// Inclusive bounds of a shape symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub min: i64,
    pub max: i64,
}

/// The model's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Signature {
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
    pub symbols: BTreeMap<String, Bounds>,
}

/// Whether a decoder input may be left out by callers (the runtime fills it):
/// the attention mask, the position ids and the past key/values.
pub fn is_optional_input(name: &str) -> bool {
    name == "attention_mask" || name == "position_ids" || name.starts_with("past_key_values.")
}

impl TensorSig {
    fn new(name: &str, ty: &TensorType, optional: bool) -> TensorSig {
        TensorSig {
            name: name.to_string(),
            dtype: ty.dtype.name().to_string(),
            shape: ty.shape.iter().map(|d| d.to_string()).collect(),
            optional,
        }
    }

    /// The dtype and shape as an IR type.
    pub fn tensor_type(&self) -> Result<TensorType, String> {
        let dtype: DType = self.dtype.parse().map_err(|e| format!("`{}`: {e}", self.name))?;
        let shape = self
            .shape
            .iter()
            .map(|s| s.parse::<Dim>().map_err(|e| format!("`{}`: {e}", self.name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TensorType::new(dtype, shape))
    }

    /// `f32[batch, seq, 256]`.
    pub fn type_string(&self) -> String {
        format!("{}[{}]", self.dtype, self.shape.join(", "))
    }
}

impl Signature {
    /// The signature of a graph: its inputs, outputs and symbol bounds.
    pub fn from_graph(g: &Graph) -> Signature {
        Signature {
            inputs: g.inputs().iter().map(|(n, v)| TensorSig::new(n, g.ty(*v), is_optional_input(n))).collect(),
            outputs: g.outputs().iter().map(|(n, v)| TensorSig::new(n, g.ty(*v), false)).collect(),
            symbols: g.symbols().iter().map(|(n, b)| (n.clone(), Bounds { min: b.min, max: b.max })).collect(),
        }
    }

    pub fn input(&self, name: &str) -> Option<&TensorSig> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSig> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// A file of the artifact with its size and sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// For a file of more than one piece of `piece_bytes`: the sha256 of
    /// each piece, in order (the last may be shorter). Opening checks
    /// these, on every core at once, instead of the whole file's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub piece_bytes: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// The piece size of [`FileEntry::pieces`] for the files an artifact
/// writes.
pub const PIECE_BYTES: u64 = 16 << 20;

/// The sha256 of a file's bytes, fed in order, and of each of its pieces
/// (see [`FileEntry::pieces`]); the two are separate so that a writer can
/// feed them on two threads.
pub struct FileHasher {
    pub whole: Sha256,
    pub pieces: PieceHasher,
}

/// The sha256 of each piece of `piece_bytes` of the bytes fed in order.
pub struct PieceHasher {
    piece: Sha256,
    piece_bytes: u64,
    in_piece: u64,
    done: Vec<String>,
}

impl PieceHasher {
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = data.len().min((self.piece_bytes - self.in_piece) as usize);
            self.piece.update(&data[..take]);
            self.in_piece += take as u64;
            data = &data[take..];
            if self.in_piece == self.piece_bytes {
                self.done.push(hex(&self.piece.finalize_reset()));
                self.in_piece = 0;
            }
        }
    }
}

impl FileHasher {
    pub fn new(piece_bytes: u64) -> FileHasher {
        let pieces = PieceHasher { piece: Sha256::new(), piece_bytes: piece_bytes.max(1), in_piece: 0, done: vec![] };
        FileHasher { whole: Sha256::new(), pieces }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.whole.update(data);
        self.pieces.update(data);
    }

    /// The whole file's sha256, and the pieces' when there are several
    /// (none for a file of one piece).
    pub fn finish(self) -> (String, Vec<String>) {
        let FileHasher { whole, pieces: mut p } = self;
        if p.in_piece > 0 {
            p.done.push(hex(&p.piece.finalize()));
        }
        if p.done.len() < 2 {
            p.done.clear();
        }
        (hex(&whole.finalize()), p.done)
    }
}

/// The entry of file `name` with these hashes.
pub(crate) fn file_entry(name: &str, size: u64, sha256: String, pieces: Vec<String>) -> FileEntry {
    let piece_bytes = if pieces.is_empty() { 0 } else { PIECE_BYTES };
    FileEntry { name: name.to_string(), size, sha256, pieces, piece_bytes }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u64,
    pub compiler_version: String,
    pub target: String,
    pub model: ModelInfo,
    pub signature: Signature,
    /// Every file of the artifact except the manifest itself.
    pub files: Vec<FileEntry>,
    /// The tokenizer file's name, when the artifact has one.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Token ids that end generation.
    #[serde(default)]
    pub eos_token_ids: Vec<i64>,
    /// The compiler's fusion report (what fused, what did not), when passes ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<serde_json::Value>,
    /// The launch plan of a `cpu` artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<NativePlan>,
    /// For a `cpu` artifact: [`native_sha256`] of `signature` and `native`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_sha256: Option<String>,
    /// The launch plan of a `cuda` artifact (PTX modules in `ptx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<NativePlan>,
    /// For a `cuda` artifact: [`native_sha256`] of `signature` and `cuda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_sha256: Option<String>,
    /// For a `cuda` artifact compiled with `--dtype bf16|f16`: the type of
    /// the hidden-state activations (absent: f32). Informational: the
    /// plan's buffers say the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_activation_dtype: Option<String>,
}

/// The hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    let mut s = String::with_capacity(2 * digest.len());
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Checks file `path` (entry `f`, with pieces) against the manifest: its
/// size, then every piece's sha256, the pieces spread over the machine's
/// cores (each thread reads its own; a weights file of 538 MB took 0.45 s
/// to hash on one core of a Zen 5).
fn check_pieces(dir: &Path, path: &Path, f: &FileEntry) -> Result<(), ArtifactError> {
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    if size != f.size {
        return Err(ArtifactError::SizeMismatch {
            dir: dir.to_path_buf(),
            name: f.name.clone(),
            expected: f.size,
            found: size,
        });
    }
    let piece = f.piece_bytes.max(1);
    let count = size.div_ceil(piece) as usize;
    if count != f.pieces.len() {
        return Err(ArtifactError::HashMismatch {
            dir: dir.to_path_buf(),
            name: f.name.clone(),
            expected: format!("{} pieces of {piece} bytes", f.pieces.len()),
            found: format!("{count} in a file of {size} bytes"),
        });
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(count).max(1);
    // Each thread's first bad piece (index, found), or an error reading.
    type Found = std::io::Result<Option<(usize, String)>>;
    let results: Vec<Found> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Found {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut file = std::fs::File::open(path)?;
                    // Read in 1 MiB parts: a buffer of a piece per thread
                    // stayed in the process's heap after the check.
                    let mut buf = vec![0u8; (1u64 << 20).min(piece).min(size) as usize];
                    for i in (t..count).step_by(threads) {
                        let start = i as u64 * piece;
                        let mut left = piece.min(size - start) as usize;
                        file.seek(SeekFrom::Start(start))?;
                        let mut hasher = Sha256::new();
                        while left > 0 {
                            let part = &mut buf[..left.min(1 << 20)];
                            file.read_exact(part)?;
                            hasher.update(&*part);
                            left -= part.len();
                        }
                        let found = hex(&hasher.finalize());
                        if found != f.pieces[i].to_ascii_lowercase() {
                            return Ok(Some((i, found)));
                        }
                    }
                    Ok(None)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked"))))
            .collect()
    });
    let mut bad: Option<(usize, String)> = None;
    for r in results {
        if let Some((i, found)) = r.map_err(io(path))? {
            if bad.as_ref().is_none_or(|(j, _)| i < *j) {
                bad = Some((i, found));
            }
        }
    }
    let Some((i, found)) = bad else { return Ok(()) };
    let start = i as u64 * piece;
    let end = (start + piece).min(size);
    Err(ArtifactError::HashMismatch {
        dir: dir.to_path_buf(),
        name: format!("{} (bytes {start}..{end})", f.name),
        expected: f.pieces[i].clone(),
        found,
    })
}

/// The size and hex sha256 of a file, read in pieces: a weights file is
/// hashed without a copy of it in memory.
fn file_size_and_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

/// The sha256 of a `cpu` artifact's signature and launch plan: of their
/// compact JSON, serialised from the parsed structs, so it does not depend on
/// the manifest's formatting. Neither holds a float or an unordered map, so
/// the bytes are the same after a round trip through the manifest.
pub fn native_sha256(signature: &Signature, plan: &NativePlan) -> String {
    // Serialising strings, integers and sequences cannot fail; an empty
    // input would only make the check fail, never pass wrongly.
    let bytes = serde_json::to_vec(&(signature, plan)).unwrap_or_default();
    sha256_hex(&bytes)
}

/// What [`write_artifact`] needs to know about the model.
pub struct ArtifactSpec<'a> {
    /// The graph; it is verified before anything is written.
    pub graph: &'a Graph,
    /// Every weight the graph references, in its stored dtype.
    pub weights: &'a BTreeMap<String, StoredTensor>,
    pub model: ModelInfo,
    /// The model folder's `tokenizer.json`, copied when given.
    pub tokenizer: Option<&'a Path>,
    pub eos_token_ids: Vec<i64>,
    /// The fusion report to record in the manifest, when passes ran.
    pub fusion: Option<serde_json::Value>,
    /// For a `cpu` artifact: the plan, the linked library and the constants
    /// its `Weight` buffers point into (then no safetensors file is written).
    pub native: Option<NativeFiles>,
    /// For a `cuda` artifact: the plan, PTX per architecture and constants.
    pub cuda: Option<CudaFiles>,
}

/// The compiled parts of a `cpu` artifact.
pub struct NativeFiles {
    pub plan: NativePlan,
    pub library: Vec<u8>,
    pub constants: FileData,
}

/// The compiled parts of a `cuda` artifact.
pub struct CudaFiles {
    pub plan: NativePlan,
    /// `(arch, PTX text)`, e.g. `("sm_90a", ...)`.
    pub ptx: Vec<(String, String)>,
    pub constants: FileData,
    /// The hidden-state activations' type when narrow (`bf16`, `f16`).
    pub activation_dtype: Option<String>,
}

/// Checks that every weight the graph references is given with the dtype
/// and (constant) shape the graph declares.
pub fn check_weights(g: &Graph, weights: &BTreeMap<String, Tensor>) -> Result<(), ArtifactError> {
    check_weight_types(g, |n| weights.get(n).map(|t| (t.dtype, &t.shape[..])))
}

/// [`check_weights`] of stored tensors.
pub fn check_stored_weights(g: &Graph, weights: &BTreeMap<String, StoredTensor>) -> Result<(), ArtifactError> {
    check_weight_types(g, |n| weights.get(n).map(|t| (t.dtype, &t.shape[..])))
}

fn check_weight_types<'w>(g: &Graph, get: impl Fn(&str) -> Option<(DType, &'w [usize])>) -> Result<(), ArtifactError> {
    for (name, v) in g.weights() {
        let ty = g.ty(v);
        let Some((dtype, shape)) = get(&name) else {
            return Err(ArtifactError::Weight { name, why: "is referenced by the graph but not given".to_string() });
        };
        let shape_ok = ty.const_shape().is_some_and(|s| s == shape);
        if dtype != ty.dtype || !shape_ok {
            return Err(ArtifactError::Weight { name, why: format!("is {dtype}{shape:?}, the graph declares {ty}") });
        }
    }
    Ok(())
}

/// Writes an artifact for the `interp` target to `out` (a directory, created
/// or replaced if it already is an artifact). Returns the manifest written.
pub fn write_artifact(out: &Path, a: &ArtifactSpec<'_>) -> Result<Manifest, ArtifactError> {
    let dir_for_errors = out.to_path_buf();
    smelt_ir::verify::verify(a.graph)
        .map_err(|e| ArtifactError::GraphInvalid { dir: dir_for_errors.clone(), msg: first_lines(&e.to_string()) })?;
    check_stored_weights(a.graph, a.weights)?;

    if out.exists() {
        let is_artifact = out.join(MANIFEST_FILE).is_file();
        let is_empty_dir = out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_none();
        if !is_artifact && !is_empty_dir {
            return Err(ArtifactError::WouldOverwrite { path: out.to_path_buf() });
        }
    }

    // Everything is written into a sibling directory first and renamed into
    // place at the end, so an interrupted compile leaves no half artifact.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = write_files(&tmp, out, a);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(manifest)
}

/// The files written into the temporary artifact directory, with their
/// manifest entries.
struct Files<'t> {
    tmp: &'t Path,
    list: Vec<FileEntry>,
}

impl Files<'_> {
    fn put(&mut self, name: &str, bytes: &[u8]) -> Result<(), ArtifactError> {
        let p = self.tmp.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))?;
        let mut h = FileHasher::new(PIECE_BYTES);
        h.update(bytes);
        let (sha256, pieces) = h.finish();
        self.list.push(file_entry(name, bytes.len() as u64, sha256, pieces));
        Ok(())
    }

    /// Puts `data`; a file written (and hashed) already is moved in, not
    /// read again.
    fn put_data(&mut self, name: &str, data: &FileData) -> Result<(), ArtifactError> {
        let FileData::File { path, size, sha256, pieces } = data else {
            return self.put(name, &data.read().map_err(io(self.tmp))?);
        };
        let p = self.tmp.join(name);
        if std::fs::rename(path, &p).is_err() {
            // Another file system: copy.
            std::fs::copy(path, &p).map_err(io(&p))?;
        }
        self.list.push(file_entry(name, *size, sha256.clone(), pieces.clone()));
        Ok(())
    }
}

fn write_files(tmp: &Path, out: &Path, a: &ArtifactSpec<'_>) -> Result<Manifest, ArtifactError> {
    let mut files = Files { tmp, list: Vec::new() };
    files.put(GRAPH_FILE, smelt_ir::text::print(a.graph).as_bytes())?;
    let native = match &a.native {
        Some(n) => {
            files.put(LIBRARY_FILE, &n.library)?;
            files.put_data(CONSTANTS_FILE, &n.constants)?;
            let mut plan = n.plan.clone();
            plan.library = LIBRARY_FILE.to_string();
            plan.weights = CONSTANTS_FILE.to_string();
            Some(plan)
        }
        None => None,
    };
    let cuda = match &a.cuda {
        Some(c) => {
            let mut plan = c.plan.clone();
            plan.library = String::new();
            plan.ptx = vec![];
            for (arch, text) in &c.ptx {
                let file = ptx_file_name(arch);
                files.put(&file, text.as_bytes())?;
                plan.ptx.push(PtxModule { arch: arch.clone(), file });
            }
            // Both plans share one constants file when its bytes are equal.
            let shared = a.native.as_ref().is_some_and(|n| n.constants.same_contents(&c.constants));
            plan.weights = if shared { CONSTANTS_FILE } else { CUDA_CONSTANTS_FILE }.to_string();
            if !shared {
                files.put_data(CUDA_CONSTANTS_FILE, &c.constants)?;
            }
            Some(plan)
        }
        None => None,
    };
    match (&native, &cuda) {
        (Some(_), _) | (_, Some(_)) => {}
        (None, None) => {
            // Only the weights the graph references are stored.
            let used: BTreeMap<String, &StoredTensor> =
                a.graph.weights().into_iter().filter_map(|(n, _)| a.weights.get(&n).map(|t| (n, t))).collect();
            files.put(WEIGHTS_FILE, &stored_file_bytes(&out.join(WEIGHTS_FILE), &used)?)?;
        }
    }
    let tokenizer = match a.tokenizer {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(io(p))?;
            files.put(TOKENIZER_FILE, &bytes)?;
            Some(TOKENIZER_FILE.to_string())
        }
        None => None,
    };
    let signature = Signature::from_graph(a.graph);
    let native_hash = native.as_ref().map(|plan| native_sha256(&signature, plan));
    let cuda_hash = cuda.as_ref().map(|plan| native_sha256(&signature, plan));
    let target = match (native.is_some(), cuda.is_some()) {
        (false, false) => TARGET_INTERP,
        (true, false) => TARGET_CPU,
        (false, true) => TARGET_CUDA,
        (true, true) => TARGET_CPU_CUDA,
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        compiler_version: COMPILER_VERSION.to_string(),
        target: target.to_string(),
        model: a.model.clone(),
        signature,
        files: files.list,
        tokenizer,
        eos_token_ids: a.eos_token_ids.clone(),
        fusion: a.fusion.clone(),
        native,
        native_sha256: native_hash,
        cuda,
        cuda_sha256: cuda_hash,
        cuda_activation_dtype: a.cuda.as_ref().and_then(|c| c.activation_dtype.clone()),
    };
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| ArtifactError::ManifestInvalid { path: out.join(MANIFEST_FILE), msg: e.to_string() })?;
    let p = tmp.join(MANIFEST_FILE);
    std::fs::write(&p, json + "\n").map_err(io(&p))?;
    Ok(manifest)
}

/// Keeps a multi-line message to its first line plus a count, so errors stay
/// one line.
fn first_lines(msg: &str) -> String {
    let mut lines = msg.lines();
    let first = lines.next().unwrap_or_default().to_string();
    let rest = lines.count();
    if rest == 0 {
        first
    } else {
        format!("{first} (and {rest} more)")
    }
}

/// An opened, checked artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    dir: PathBuf,
    manifest: Manifest,
}

/// Whether a manifest file name is a plain name inside the artifact directory.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && Path::new(name).components().count() == 1
}

impl Artifact {
    /// Opens an artifact: reads and checks the manifest, then checks that
    /// every listed file exists with the listed size and sha256.
    pub fn open(dir: &Path) -> Result<Artifact, ArtifactError> {
        let dir_buf = dir.to_path_buf();
        let mpath = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            return Err(ArtifactError::Io {
                path: dir_buf,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such artifact directory"),
            });
        }
        if !mpath.is_file() {
            return Err(ArtifactError::NotAnArtifact { dir: dir_buf });
        }
        let text = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
        let manifest = parse_manifest(dir, &text)?;
        for f in &manifest.files {
            let p = dir.join(&f.name);
            if !p.is_file() {
                return Err(ArtifactError::MissingFile { dir: dir_buf, name: f.name.clone() });
            }
            if !f.pieces.is_empty() {
                check_pieces(dir, &p, f)?;
                continue;
            }
            let (size, found) = file_size_and_sha256(&p).map_err(io(&p))?;
            if size != f.size {
                return Err(ArtifactError::SizeMismatch {
                    dir: dir_buf,
                    name: f.name.clone(),
                    expected: f.size,
                    found: size,
                });
            }
            if found != f.sha256.to_ascii_lowercase() {
                return Err(ArtifactError::HashMismatch {
                    dir: dir_buf,
                    name: f.name.clone(),
                    expected: f.sha256.clone(),
                    found,
                });
            }
        }
        Ok(Artifact { dir: dir_buf, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The text IR as stored.
    pub fn graph_text(&self) -> Result<String, ArtifactError> {
        let p = self.dir.join(GRAPH_FILE);
        std::fs::read_to_string(&p).map_err(io(&p))
    }

    /// Parses and verifies the graph.
    pub fn graph(&self) -> Result<Graph, ArtifactError> {
        let text = self.graph_text()?;
        let g = smelt_ir::text::parse(&text)
            .map_err(|e| ArtifactError::GraphParse { dir: self.dir.clone(), msg: e.to_string() })?;
        smelt_ir::verify::verify(&g)
            .map_err(|e| ArtifactError::GraphInvalid { dir: self.dir.clone(), msg: first_lines(&e.to_string()) })?;
        Ok(g)
    }

    /// Reads the weights (in their stored dtypes).
    pub fn weights(&self) -> Result<BTreeMap<String, Tensor>, ArtifactError> {
        Ok(read_tensor_file(&self.dir.join(WEIGHTS_FILE))?)
    }

    /// The tokenizer file, when the artifact has one.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        self.manifest.tokenizer.as_ref().map(|n| self.dir.join(n))
    }
}

/// Parses and checks `manifest.json`. The format version is read before the
/// rest, so a newer artifact is refused for its version, not for whatever
/// field it changed.
fn parse_manifest(dir: &Path, text: &str) -> Result<Manifest, ArtifactError> {
    let mpath = dir.join(MANIFEST_FILE);
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        let msg = full.rfind(" at line ").map(|i| full[..i].to_string()).unwrap_or(full);
        ArtifactError::ManifestJson { path: mpath.clone(), line: e.line(), column: e.column(), msg }
    })?;
    let invalid = |msg: String| ArtifactError::ManifestInvalid { path: mpath.clone(), msg };
    let version = value.get("format_version").ok_or_else(|| invalid("key `format_version` missing".to_string()))?;
    if version.as_u64() != Some(FORMAT_VERSION) {
        return Err(ArtifactError::FormatVersion { dir: dir.to_path_buf(), found: version.to_string() });
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    if !KNOWN_TARGETS.contains(&manifest.target.as_str()) {
        return Err(ArtifactError::Target {
            dir: dir.to_path_buf(),
            target: manifest.target,
            why: format!("is unknown (known targets: {})", KNOWN_TARGETS.join(", ")),
        });
    }
    let has_cpu = manifest.target == TARGET_CPU || manifest.target == TARGET_CPU_CUDA;
    let has_cuda = manifest.target == TARGET_CUDA || manifest.target == TARGET_CPU_CUDA;
    if has_cpu != manifest.native.is_some() {
        return Err(invalid(format!("target `{}` and the presence of a `native` plan disagree", manifest.target)));
    }
    if has_cuda != manifest.cuda.is_some() {
        return Err(invalid(format!("target `{}` and the presence of a `cuda` plan disagree", manifest.target)));
    }
    for f in &manifest.files {
        if !plain_file_name(&f.name) || f.name == MANIFEST_FILE {
            return Err(invalid(format!("file name `{}` is not a plain file name inside the artifact", f.name)));
        }
    }
    let mut required = vec![GRAPH_FILE];
    if let Some(plan) = &manifest.native {
        required.extend([plan.library.as_str(), plan.weights.as_str()]);
    }
    if let Some(plan) = &manifest.cuda {
        if plan.ptx.is_empty() {
            return Err(invalid("the `cuda` plan lists no PTX module".into()));
        }
        required.push(plan.weights.as_str());
        required.extend(plan.ptx.iter().map(|m| m.file.as_str()));
    }
    if manifest.native.is_none() && manifest.cuda.is_none() {
        required.push(WEIGHTS_FILE);
    }
    if let Some(t) = &manifest.tokenizer {
        required.push(t.as_str());
    }
    for name in required {
        if !manifest.files.iter().any(|f| f.name == name) {
            return Err(invalid(format!("file `{name}` is not listed in `files`")));
        }
    }
    if let Some(plan) = &manifest.native {
        let Some(expected) = &manifest.native_sha256 else {
            return Err(invalid(
                "key `native_sha256` missing (a `cpu` artifact's launch plan must be checksummed)".into(),
            ));
        };
        let found = native_sha256(&manifest.signature, plan);
        if found != expected.to_ascii_lowercase() {
            return Err(ArtifactError::PlanHashMismatch { dir: dir.to_path_buf(), expected: expected.clone(), found });
        }
    }
    if let Some(plan) = &manifest.cuda {
        let Some(expected) = &manifest.cuda_sha256 else {
            return Err(invalid(
                "key `cuda_sha256` missing (a `cuda` artifact's launch plan must be checksummed)".into(),
            ));
        };
        let found = native_sha256(&manifest.signature, plan);
        if found != expected.to_ascii_lowercase() {
            return Err(ArtifactError::PlanHashMismatch { dir: dir.to_path_buf(), expected: expected.clone(), found });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::Op;

    /// A two-op graph `y = x * w + x` with one weight.
    fn tiny() -> (Graph, BTreeMap<String, Tensor>) {
        let mut g = Graph::new("tiny");
        g.declare_symbol("seq", 1, 16);
        let x = g.add_input("x", TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::c(4)]));
        let w = g.add_weight("w", TensorType::fixed(DType::BF16, &[4]));
        let wf = g.add(Op::Cast { to: DType::F32 }, &[w]).unwrap();
        let m = g.add(Op::Mul {}, &[x, wf]).unwrap();
        let y = g.add(Op::Add {}, &[m, x]).unwrap();
        g.set_output("y", y);
        let mut weights = BTreeMap::new();
        weights.insert("w".to_string(), Tensor::from_f32(DType::BF16, vec![4], vec![1.0, 2.0, 0.5, -1.0]).unwrap());
        (g, weights)
    }

    fn stored(w: &BTreeMap<String, Tensor>) -> BTreeMap<String, StoredTensor> {
        w.iter().map(|(n, t)| (n.clone(), StoredTensor::from_tensor(t))).collect()
    }

    fn info() -> ModelInfo {
        ModelInfo {
            architecture: "Tiny".into(),
            model_type: None,
            parameters: 4,
            layers: 0,
            stored_dtype: Some("bf16".into()),
            source: "memory".into(),
        }
    }

    fn write(dir: &Path) -> PathBuf {
        let (g, w) = tiny();
        let out = dir.join("m.smelt");
        write_artifact(
            &out,
            &ArtifactSpec {
                graph: &g,
                weights: &stored(&w),
                model: info(),
                tokenizer: None,
                eos_token_ids: vec![2],
                fusion: None,
                native: None,
                cuda: None,
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn write_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let out = write(dir.path());
        let a = Artifact::open(&out).unwrap();
        let m = a.manifest();
        assert_eq!(m.format_version, FORMAT_VERSION);
        assert_eq!(m.target, "interp");
        assert_eq!(m.signature.inputs[0].type_string(), "f32[seq, 4]");
        assert_eq!(m.signature.symbols["seq"], Bounds { min: 1, max: 16 });
        assert_eq!(m.eos_token_ids, vec![2]);
        let w = a.weights().unwrap();
        assert_eq!(w["w"].dtype, DType::BF16);
        let g = a.graph().unwrap();
        assert_eq!(smelt_ir::text::print(&g), smelt_ir::text::print(&tiny().0));
        // Writing again over an artifact replaces it.
        write(dir.path());
        assert!(Artifact::open(&out).is_ok());
    }

    /// Pieces: their hashes are the sha256 of each piece (the last shorter;
    /// none for one piece), the whole file's is unchanged, and opening
    /// checks every piece on several threads: a flipped byte is reported
    /// with its piece's byte range, a truncated file by its size, a
    /// manifest with the wrong number of pieces too.
    #[test]
    fn files_in_pieces_are_checked_piece_by_piece() {
        let bytes: Vec<u8> = (0..10_500u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = FileHasher::new(1000);
        for part in bytes.chunks(333) {
            h.update(part);
        }
        let (whole, pieces) = h.finish();
        assert_eq!(whole, sha256_hex(&bytes));
        let want: Vec<String> = bytes.chunks(1000).map(sha256_hex).collect();
        assert_eq!((pieces.len(), &pieces), (11, &want));
        let mut one = FileHasher::new(1000);
        one.update(&bytes[..1000]);
        assert!(one.finish().1.is_empty(), "a file of one piece lists none");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.bin");
        std::fs::write(&path, &bytes).unwrap();
        let entry =
            FileEntry { name: "c.bin".into(), size: bytes.len() as u64, sha256: whole, pieces, piece_bytes: 1000 };
        check_pieces(dir.path(), &path, &entry).unwrap();
        let mut bad = bytes.clone();
        bad[7_123] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = check_pieces(dir.path(), &path, &entry).unwrap_err().to_string();
        assert!(e.contains("c.bin (bytes 7000..8000)") && e.contains(&entry.pieces[7]), "{e}");
        std::fs::write(&path, &bytes[..10_000]).unwrap();
        let e = check_pieces(dir.path(), &path, &entry).unwrap_err().to_string();
        assert!(e.contains("10500") && e.contains("10000"), "{e}");
        std::fs::write(&path, &bytes).unwrap();
        let short = FileEntry { pieces: entry.pieces[..10].to_vec(), ..entry.clone() };
        let e = check_pieces(dir.path(), &path, &short).unwrap_err().to_string();
        assert!(e.contains("10 pieces of 1000 bytes") && e.contains("11 in a file of 10500 bytes"), "{e}");
    }

    #[test]
    fn refuses_bad_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let out = write(dir.path());
        let manifest = std::fs::read_to_string(out.join(MANIFEST_FILE)).unwrap();
        let msg = |out: &Path| Artifact::open(out).unwrap_err().to_string();

        // A flipped byte in the weights: the sha256 names the file.
        let wpath = out.join(WEIGHTS_FILE);
        let mut bytes = std::fs::read(&wpath).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&wpath, &bytes).unwrap();
        let m = msg(&out);
        assert!(m.contains("file `weights.safetensors` has sha256"), "{m}");
        bytes[last] ^= 0x40;
        std::fs::write(&wpath, &bytes).unwrap();
        assert!(Artifact::open(&out).is_ok());

        std::fs::rename(out.join(GRAPH_FILE), dir.path().join("g")).unwrap();
        let m = msg(&out);
        assert!(m.contains("file `model.smir` listed in the manifest is missing"), "{m}");
        std::fs::rename(dir.path().join("g"), out.join(GRAPH_FILE)).unwrap();

        let future = manifest.replace("\"format_version\": 1", "\"format_version\": 99");
        std::fs::write(out.join(MANIFEST_FILE), future).unwrap();
        let m = msg(&out);
        assert!(m.contains("format version 99 is not supported"), "{m}");

        std::fs::write(out.join(MANIFEST_FILE), &manifest[..manifest.len() / 2]).unwrap();
        let m = msg(&out);
        assert!(m.contains("manifest.json: malformed JSON at line"), "{m}");

        let escape = manifest.replace("\"name\": \"model.smir\"", "\"name\": \"../model.smir\"");
        std::fs::write(out.join(MANIFEST_FILE), escape).unwrap();
        let m = msg(&out);
        assert!(m.contains("not a plain file name"), "{m}");

        let cuda = manifest.replace("\"target\": \"interp\"", "\"target\": \"cuda\"");
        std::fs::write(out.join(MANIFEST_FILE), cuda).unwrap();
        let m = msg(&out);
        assert!(m.contains("target `cuda` and the presence of a `cuda` plan disagree"), "{m}");

        let unknown = manifest.replace("\"target\": \"interp\"", "\"target\": \"tpu\"");
        std::fs::write(out.join(MANIFEST_FILE), unknown).unwrap();
        let m = msg(&out);
        assert!(m.contains("target `tpu` is unknown"), "{m}");

        std::fs::remove_file(out.join(MANIFEST_FILE)).unwrap();
        assert!(msg(&out).contains("not a smelt artifact"));
        for m in [msg(&out), msg(&dir.path().join("nope.smelt"))] {
            assert_eq!(m.lines().count(), 1, "{m}");
        }
    }

    #[test]
    fn refuses_to_overwrite_other_folders_and_checks_weights() {
        let dir = tempfile::tempdir().unwrap();
        let (g, mut w) = tiny();
        std::fs::write(dir.path().join("precious.txt"), "x").unwrap();
        let art = |w: &BTreeMap<String, Tensor>| {
            write_artifact(
                dir.path(),
                &ArtifactSpec {
                    graph: &g,
                    weights: &stored(w),
                    model: info(),
                    tokenizer: None,
                    eos_token_ids: vec![],
                    fusion: None,
                    native: None,
                    cuda: None,
                },
            )
            .unwrap_err()
            .to_string()
        };
        assert!(art(&w).contains("refusing to overwrite"));
        w.insert("w".into(), Tensor::from_f32(DType::F32, vec![4], vec![0.0; 4]).unwrap());
        assert!(art(&w).contains("weight `w` is f32[4], the graph declares bf16[4]"), "{}", art(&w));
        assert!(dir.path().join("precious.txt").exists());
    }
}
