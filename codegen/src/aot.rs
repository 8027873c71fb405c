//! Ahead-of-time build of a `cpu` artifact's kernel library: every kernel
//! lowered by Cranelift into one relocatable object (position-independent),
//! linked by the system C compiler into a shared object that the runtime
//! loads with `dlopen` (see `smelt_runtime::native`).
//!
//! Assumptions and choices:
//! - the linker is `$CC` when set, else `cc`; it is run inside the output
//!   directory on relative file names, with `-shared -Wl,-z,noexecstack -lm`,
//!   so no absolute path ends up in the library and building the same
//!   kernels twice gives the same bytes (the ELF build id is a hash of the
//!   contents). `noexecstack` matters: Cranelift objects carry no
//!   `.note.GNU-stack`, and recent glibc refuses to `dlopen` a library that
//!   asks for an executable stack;
//! - the code is compiled for the host as `cranelift_native` detects it, so
//!   it may use any feature the host has: [`LibraryInfo::cpu_features`] lists
//!   every one of them (spelled as `is_x86_feature_detected!` spells them)
//!   for the runtime to check before it runs anything on another machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use cranelift_codegen::isa::TargetIsa;
use smelt_runtime::plan::{Elem, KernelEntry};

use crate::cranelift::{emit_object, host_isa, CompileError};
use crate::kir::{Kernel, Scalar};

/// The library's file name inside the output directory.
pub const LIBRARY_FILE: &str = "kernels.so";
/// The object file's name while linking (removed afterwards).
const OBJECT_FILE: &str = "kernels.o";

/// Why the library could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AotError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[cfg(feature = "llvm")]
    #[error(transparent)]
    Llvm(#[from] crate::llvm::LlvmError),
    #[error("two kernels are named `{0}`; kernel names must be unique in a library")]
    DuplicateKernel(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run the C compiler `{cc}` to link the kernel library ({source}); install a C toolchain (e.g. `apt-get install gcc`) or set CC")]
    NoLinker {
        cc: String,
        #[source]
        source: std::io::Error,
    },
    #[error("linking the kernel library with `{cc}` failed ({status}): {stderr}")]
    LinkFailed { cc: String, status: String, stderr: String },
}

/// What [`build_library`] produced.
#[derive(Clone, Debug)]
pub struct LibraryInfo {
    /// `out_dir/kernels.so`.
    pub path: PathBuf,
    /// The library's bytes (what the artifact stores).
    pub bytes: Vec<u8>,
    /// The exported symbols, one per kernel, in the kernels' order.
    pub symbols: Vec<String>,
    /// The target triple the code was compiled for.
    pub triple: String,
    /// The architecture as `std::env::consts::ARCH` spells it (`x86_64`).
    pub arch: String,
    /// Every CPU feature the code may use, as `is_x86_feature_detected!`
    /// spells it (`sse4.1`, `avx2`, `fma`, ...), sorted.
    pub cpu_features: Vec<String>,
}

/// The symbol a kernel is exported as.
pub fn symbol_of(k: &Kernel) -> String {
    format!("smelt_{}", k.name)
}

/// The plan's element type of a KIR scalar type.
pub fn elem_of_scalar(s: Scalar) -> Elem {
    match s {
        Scalar::F32 => Elem::F32,
        Scalar::I32 => Elem::I32,
        Scalar::I64 => Elem::I64,
        Scalar::Bool => Elem::Bool,
        Scalar::BF16 => Elem::BF16,
        Scalar::F16 => Elem::F16,
    }
}

/// The plan entry describing how to call a kernel of the library.
pub fn kernel_entry(k: &Kernel) -> KernelEntry {
    KernelEntry {
        symbol: symbol_of(k),
        lowering: "cranelift".to_string(),
        buffers: k.global_buffers().map(|(_, b)| elem_of_scalar(b.elem)).collect(),
        scalars: k.scalars.len(),
        block: k.gpu.as_ref().map(|g| g.block),
        tuning: None,
        library: None,
    }
}

/// Maps Cranelift's x86 ISA flag names to the names the standard library's
/// feature detection uses.
fn x86_feature_name(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "has_cmpxchg16b" => "cmpxchg16b",
        "has_sse3" => "sse3",
        "has_ssse3" => "ssse3",
        "has_sse41" => "sse4.1",
        "has_sse42" => "sse4.2",
        "has_popcnt" => "popcnt",
        "has_avx" => "avx",
        "has_avx2" => "avx2",
        "has_fma" => "fma",
        "has_avx_vnni" => "avxvnni",
        "has_avx512vnni" => "avx512vnni",
        "has_bmi1" => "bmi1",
        "has_bmi2" => "bmi2",
        "has_avx512bitalg" => "avx512bitalg",
        "has_avx512dq" => "avx512dq",
        "has_avx512f" => "avx512f",
        "has_avx512vl" => "avx512vl",
        "has_avx512vbmi" => "avx512vbmi",
        "has_lzcnt" => "lzcnt",
        _ => return None,
    })
}

/// The CPU features the ISA was configured with. On x86-64 an enabled
/// `has_*` flag this list does not know is kept under its Cranelift name, so
/// the runtime refuses it as unknown rather than ignoring it.
fn required_features(isa: &dyn TargetIsa) -> Vec<String> {
    let mut out: Vec<String> = isa
        .isa_flags()
        .iter()
        .filter(|v| v.name.starts_with("has_") && v.as_bool() == Some(true))
        .map(|v| x86_feature_name(v.name).map(str::to_string).unwrap_or_else(|| v.name.to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The C compiler used to link: `$CC` when set and not empty, else `cc`.
pub fn default_cc() -> String {
    std::env::var("CC").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "cc".to_string())
}

/// Lowers every kernel into one object and links it into
/// `out_dir/kernels.so` (the directory is created if needed) with
/// [`default_cc`].
pub fn build_library(kernels: &[Kernel], out_dir: &Path) -> Result<LibraryInfo, AotError> {
    build_library_with(kernels, out_dir, &default_cc())
}

/// [`build_library`] with the given C compiler as the linker.
pub fn build_library_with(kernels: &[Kernel], out_dir: &Path, cc: &str) -> Result<LibraryInfo, AotError> {
    check_names(kernels)?;
    let (isa, info) = host_isa(true)?;
    let cpu_features = if info.triple.starts_with("x86_64") { required_features(&*isa) } else { Vec::new() };
    let object = emit_object(kernels, "smelt_kernels")?;
    link_library(kernels, out_dir, cc, &[object], info.triple, cpu_features)
}

/// One library with each kernel lowered by LLVM where `use_llvm` says so
/// and by Cranelift elsewhere (two objects, one link). The CPU features are
/// the union of both lowerings'.
#[cfg(feature = "llvm")]
pub fn build_library_mixed(
    kernels: &[Kernel],
    use_llvm: &dyn Fn(&Kernel) -> bool,
    out_dir: &Path,
) -> Result<LibraryInfo, AotError> {
    check_names(kernels)?;
    let (cl, ll): (Vec<Kernel>, Vec<Kernel>) = kernels.iter().cloned().partition(|k| !use_llvm(k));
    let (isa, info) = host_isa(true)?;
    let mut cpu_features = if info.triple.starts_with("x86_64") { required_features(&*isa) } else { Vec::new() };
    let mut objects = vec![];
    if !cl.is_empty() {
        objects.push(emit_object(&cl, "smelt_kernels_cranelift")?);
    }
    if !ll.is_empty() {
        let host = crate::llvm::host_info()?;
        if host.triple.starts_with("x86_64") {
            cpu_features
                .extend(host.enabled_features().iter().filter_map(|f| llvm_x86_feature_name(f)).map(str::to_string));
        }
        objects.push(crate::llvm::emit_object(&ll, "smelt_kernels_llvm")?);
    }
    cpu_features.sort();
    cpu_features.dedup();
    link_library(kernels, out_dir, &default_cc(), &objects, info.triple, cpu_features)
}

/// [`build_library_with`] with the kernels lowered by LLVM (cargo feature
/// `llvm`) for the host CPU. `cpu_features` lists the host's enabled
/// features that the runtime can check; LLVM may also use others of the
/// build host's (`movbe`, `f16c`, ...), so the library is meant for the
/// machine that built it or one of the same CPU family.
#[cfg(feature = "llvm")]
pub fn build_library_llvm_with(kernels: &[Kernel], out_dir: &Path, cc: &str) -> Result<LibraryInfo, AotError> {
    check_names(kernels)?;
    let host = crate::llvm::host_info()?;
    let mut cpu_features: Vec<String> = if host.triple.starts_with("x86_64") {
        host.enabled_features().iter().filter_map(|f| llvm_x86_feature_name(f)).map(str::to_string).collect()
    } else {
        Vec::new()
    };
    cpu_features.sort();
    cpu_features.dedup();
    let object = crate::llvm::emit_object(kernels, "smelt_kernels")?;
    link_library(kernels, out_dir, cc, &[object], host.triple, cpu_features)
}

/// Maps LLVM's x86 feature names to the standard library's, for the
/// features the runtime checks.
#[cfg(feature = "llvm")]
fn llvm_x86_feature_name(f: &str) -> Option<&'static str> {
    Some(match f {
        "cx16" => "cmpxchg16b",
        "sse3" => "sse3",
        "ssse3" => "ssse3",
        "sse4.1" => "sse4.1",
        "sse4.2" => "sse4.2",
        "popcnt" => "popcnt",
        "avx" => "avx",
        "avx2" => "avx2",
        "fma" => "fma",
        "avxvnni" => "avxvnni",
        "avx512vnni" => "avx512vnni",
        "bmi" => "bmi1",
        "bmi2" => "bmi2",
        "avx512bitalg" => "avx512bitalg",
        "avx512dq" => "avx512dq",
        "avx512f" => "avx512f",
        "avx512vl" => "avx512vl",
        "avx512vbmi" => "avx512vbmi",
        "lzcnt" => "lzcnt",
        _ => return None,
    })
}

fn check_names(kernels: &[Kernel]) -> Result<(), AotError> {
    let mut names: Vec<&str> = kernels.iter().map(|k| k.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(AotError::DuplicateKernel(w[0].to_string()));
    }
    Ok(())
}

/// Writes the objects into `out_dir`, links them into the library and
/// describes it.
fn link_library(
    kernels: &[Kernel],
    out_dir: &Path,
    cc: &str,
    objects: &[Vec<u8>],
    triple: String,
    cpu_features: Vec<String>,
) -> Result<LibraryInfo, AotError> {
    let arch = triple.split('-').next().unwrap_or_default().to_string();
    let io = |path: PathBuf| move |source| AotError::Io { path, source };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir.to_path_buf()))?;
    let mut names = vec![];
    for (i, object) in objects.iter().enumerate() {
        let name = if i == 0 { OBJECT_FILE.to_string() } else { format!("kernels_{i}.o") };
        let obj_path = out_dir.join(&name);
        std::fs::write(&obj_path, object).map_err(io(obj_path.clone()))?;
        names.push(name);
    }
    let link = link(out_dir, cc, &names);
    for n in &names {
        let _ = std::fs::remove_file(out_dir.join(n));
    }
    link?;
    let path = out_dir.join(LIBRARY_FILE);
    let bytes = std::fs::read(&path).map_err(io(path.clone()))?;
    Ok(LibraryInfo { path, bytes, symbols: kernels.iter().map(symbol_of).collect(), triple, arch, cpu_features })
}

/// Runs `cc -shared` in `dir` on the objects written there.
fn link(dir: &Path, cc: &str, objects: &[String]) -> Result<(), AotError> {
    let out = Command::new(cc)
        .current_dir(dir)
        .args(["-shared", "-o", LIBRARY_FILE])
        .args(objects)
        .args(["-Wl,-z,noexecstack", "-lm"])
        .output()
        .map_err(|source| AotError::NoLinker { cc: cc.to_string(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(AotError::LinkFailed { cc: cc.to_string(), status: out.status.to_string(), stderr });
    }
    Ok(())
}
