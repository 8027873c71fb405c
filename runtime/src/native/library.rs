//! Loading a kernel library: the host is checked first (architecture and
//! every CPU feature the code may use), then the shared object is opened
//! and every kernel symbol the plan names is resolved up front, so a
//! missing one is an error at load time, never in the middle of a run.
//!
//! The [`KernelLibrary`] owns the `dlopen` handle; the function pointers it
//! hands out are valid as long as it lives.

use std::path::{Path, PathBuf};

use super::NativeError;
use crate::plan::KernelEntry;

/// The kernel ABI (see `smelt_codegen::cranelift`).
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut u8, scalars: *const i64, thread: i64, threads: i64);

/// Whether the host has the named CPU feature (spelled as
/// `is_x86_feature_detected!` spells it); None for a name this runtime does
/// not know.
fn host_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "sse2" => has!("sse2"),
            "cmpxchg16b" => has!("cmpxchg16b"),
            "sse3" => has!("sse3"),
            "ssse3" => has!("ssse3"),
            "sse4.1" => has!("sse4.1"),
            "sse4.2" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "avxvnni" => has!("avxvnni"),
            "avx512vnni" => has!("avx512vnni"),
            "bmi1" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "avx512bitalg" => has!("avx512bitalg"),
            "avx512dq" => has!("avx512dq"),
            "avx512f" => has!("avx512f"),
            "avx512vl" => has!("avx512vl"),
            "avx512vbmi" => has!("avx512vbmi"),
            "lzcnt" => has!("lzcnt"),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        None
    }
}

/// Refuses a library built for another architecture (`arch` empty: not
/// checked) or needing CPU features the host lacks; a feature name this
/// runtime does not know counts as missing.
pub fn check_cpu_features(arch: &str, required: &[String]) -> Result<(), NativeError> {
    if !arch.is_empty() && arch != std::env::consts::ARCH {
        return Err(NativeError::Arch { expected: arch.to_string(), found: std::env::consts::ARCH.to_string() });
    }
    let missing: Vec<String> = required
        .iter()
        .filter_map(|f| match host_has(f) {
            Some(true) => None,
            Some(false) => Some(f.clone()),
            None => Some(format!("{f} (unknown to this runtime)")),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(NativeError::MissingCpuFeatures { missing })
    }
}

/// An opened kernel library with every kernel resolved.
pub struct KernelLibrary {
    path: PathBuf,
    fns: Vec<KernelFn>,
    /// Kept alive for `fns`; dropped last (fields drop in order, and the
    /// pointers need no drop).
    _lib: libloading::Library,
}

impl std::fmt::Debug for KernelLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLibrary").field("path", &self.path).field("kernels", &self.fns.len()).finish()
    }
}

impl KernelLibrary {
    /// Checks the host, opens the library at `path` and resolves the symbol
    /// of every kernel, in order.
    pub fn load(
        path: &Path,
        kernels: &[KernelEntry],
        arch: &str,
        cpu_features: &[String],
    ) -> Result<KernelLibrary, NativeError> {
        check_cpu_features(arch, cpu_features)?;
        // `dlopen` searches the library path for a bare name; an absolute
        // path opens exactly this file.
        let abs = std::fs::canonicalize(path).map_err(|source| NativeError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: the library is a smelt kernel library: it has no
        // initialisers with side effects (the check above makes sure its
        // code can run on this CPU).
        let lib = unsafe { libloading::Library::new(&abs) }
            .map_err(|e| NativeError::Library { path: path.to_path_buf(), message: e.to_string() })?;
        let mut fns = Vec::with_capacity(kernels.len());
        for k in kernels {
            // SAFETY: smelt kernel symbols are functions with the kernel ABI.
            let f = unsafe { lib.get::<KernelFn>(k.symbol.as_str()) }.map_err(|e| NativeError::MissingSymbol {
                path: path.to_path_buf(),
                symbol: k.symbol.clone(),
                message: e.to_string(),
            })?;
            fns.push(*f);
        }
        Ok(KernelLibrary { path: abs, fns, _lib: lib })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The function of kernel `i` (in the plan's kernel order).
    pub fn kernel(&self, i: usize) -> Option<KernelFn> {
        self.fns.get(i).copied()
    }

    pub fn len(&self) -> usize {
        self.fns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_features_and_other_architectures_are_refused() {
        let known = if cfg!(target_arch = "x86_64") { vec!["sse2".to_string()] } else { Vec::new() };
        check_cpu_features("", &known).unwrap();
        let e = check_cpu_features("", &[known, vec!["warp-drive".to_string()]].concat()).unwrap_err();
        assert!(matches!(&e, NativeError::MissingCpuFeatures { missing } if missing.len() == 1), "{e}");
        assert!(e.to_string().contains("warp-drive"), "{e}");
        let e = check_cpu_features("z80", &[]).unwrap_err();
        assert!(e.to_string().contains("z80"), "{e}");
        check_cpu_features(std::env::consts::ARCH, &[]).unwrap();
    }

    #[test]
    fn a_missing_library_is_an_io_error() {
        let e = KernelLibrary::load(Path::new("/nonexistent/kernels.so"), &[], "", &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/kernels.so"), "{e}");
    }
}
