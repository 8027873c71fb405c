//! Checking PTX with NVIDIA's assembler, `ptxas`, without a GPU: it
//! compiles the PTX to machine code for an architecture and reports each
//! function's registers, spills and shared memory (`ptxas -v`). Tests and
//! the CLI use it to prove that emitted PTX assembles and to watch register
//! pressure.
//!
//! `ptxas` comes with the CUDA toolkit or, with no toolkit, from PyPI
//! (`pip install nvidia-cuda-nvcc`); [`find_ptxas`] looks in the places
//! those put it. Nothing here needs LLVM: it only runs a program.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// What `ptxas -v` said about one function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtxasFunction {
    pub name: String,
    /// A kernel (`.entry`), not a device function.
    pub entry: bool,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Static shared memory (`smem`).
    pub shared_bytes: u32,
    pub barriers: u32,
}

/// A successful `ptxas` run.
#[derive(Clone, Debug)]
pub struct PtxasReport {
    pub arch: String,
    /// Every function ptxas reported on, in its order.
    pub functions: Vec<PtxasFunction>,
    /// Everything ptxas printed (its `-v` output), for the curious.
    pub log: String,
}

impl PtxasReport {
    /// The kernel (`.entry`) named `name`.
    pub fn kernel(&self, name: &str) -> Option<&PtxasFunction> {
        self.functions.iter().find(|f| f.entry && f.name == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PtxasError {
    #[error("ptxas not found: set SMELT_PTXAS, put it on PATH, or `pip install nvidia-cuda-nvcc`")]
    NotFound,
    #[error("running {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ptxas -arch={arch} rejected the PTX ({status}):\n{stderr}")]
    Rejected { arch: String, status: String, stderr: String },
}

/// Where `ptxas` is: `$SMELT_PTXAS` (when set, that file or nothing), then
/// `ptxas` on `PATH`, then `/usr/local/cuda/bin`, then the PyPI packages'
/// `nvidia/cuda_nvcc/bin/ptxas` (CUDA 12 wheels) or `nvidia/cu*/bin/ptxas`
/// (CUDA 13) under the site-packages of `~/.venvs/*`, the user's
/// (`~/.local/lib/python*`) and the system's Pythons.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMELT_PTXAS").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(p) = std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file()) {
            return Some(p);
        }
    }
    let cuda = PathBuf::from("/usr/local/cuda/bin/ptxas");
    if cuda.is_file() {
        return Some(cuda);
    }
    let mut lib_dirs = vec![];
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        lib_dirs.extend(subdirs(&home.join(".venvs")).into_iter().map(|v| v.join("lib")));
        lib_dirs.push(home.join(".local/lib"));
    }
    lib_dirs.extend(["/usr/local/lib", "/usr/lib", "/usr/lib64"].map(PathBuf::from));
    for lib in lib_dirs {
        for py in subdirs(&lib).into_iter().filter(|d| file_name_starts(d, "python")) {
            for site in ["site-packages", "dist-packages"] {
                let nvidia = py.join(site).join("nvidia");
                let mut kits = vec![nvidia.join("cuda_nvcc")];
                let mut cu: Vec<PathBuf> = subdirs(&nvidia).into_iter().filter(|d| file_name_starts(d, "cu")).collect();
                // The newest CUDA first (cu13 before cu12).
                cu.sort();
                kits.extend(cu.into_iter().rev());
                if let Some(p) = kits.into_iter().map(|k| k.join("bin/ptxas")).find(|p| p.is_file()) {
                    return Some(p);
                }
            }
        }
    }
    None
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect(),
        Err(_) => vec![],
    };
    out.sort();
    out
}

fn file_name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix))
}

/// Assembles `ptx` for `arch` (`sm_90a`, ...) with the `ptxas` that
/// [`find_ptxas`] finds, and parses its report.
pub fn check(ptx: &str, arch: &str) -> Result<PtxasReport, PtxasError> {
    check_with(&find_ptxas().ok_or(PtxasError::NotFound)?, ptx, arch)
}

/// [`check`] with a given `ptxas`.
pub fn check_with(ptxas: &Path, ptx: &str, arch: &str) -> Result<PtxasReport, PtxasError> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let stem = format!("smelt-ptxas-{}-{}", std::process::id(), RUN.fetch_add(1, Ordering::Relaxed));
    let dir = std::env::temp_dir();
    let (input, output) = (dir.join(format!("{stem}.ptx")), dir.join(format!("{stem}.cubin")));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PtxasError::Io { path, source }
    };
    std::fs::write(&input, ptx).map_err(io(&input))?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .map_err(io(ptxas));
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let out = out?;
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(PtxasError::Rejected { arch: arch.to_string(), status: out.status.to_string(), stderr: log });
    }
    Ok(PtxasReport { arch: arch.to_string(), functions: parse(&log), log })
}

/// Parses `ptxas -v` output: a function starts at `Compiling entry function
/// 'NAME'` or `Function properties for NAME`, and the lines after it give
/// its stack, spills, registers, barriers and shared memory.
fn parse(log: &str) -> Vec<PtxasFunction> {
    let mut out: Vec<PtxasFunction> = vec![];
    let mut current: Option<usize> = None;
    let select = |out: &mut Vec<PtxasFunction>, name: &str, entry: bool| {
        let i = match out.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                out.push(PtxasFunction { name: name.to_string(), ..Default::default() });
                out.len() - 1
            }
        };
        out[i].entry |= entry;
        i
    };
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("");
            current = Some(select(&mut out, name, true));
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = Some(select(&mut out, rest.trim(), false));
        } else if let Some(i) = current {
            let f = &mut out[i];
            // "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
            // "Used 12 registers, used 1 barriers, 256 bytes smem, 376 bytes cmem[0]"
            for part in line.trim_start_matches("ptxas info    :").split(',') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let num = |i: usize| words.get(i).and_then(|w| w.parse::<u32>().ok());
                match words.as_slice() {
                    [n, "bytes", "stack", "frame"] => f.stack_frame_bytes = n.parse().unwrap_or(0),
                    [n, "bytes", "spill", "stores"] => f.spill_store_bytes = n.parse().unwrap_or(0),
                    [n, "bytes", "spill", "loads"] => f.spill_load_bytes = n.parse().unwrap_or(0),
                    ["Used", _, "registers"] => f.registers = num(1).unwrap_or(0),
                    ["used", _, "barriers"] => f.barriers = num(1).unwrap_or(0),
                    [n, "bytes", "smem"] => f.shared_bytes = n.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'smelt_k' for 'sm_90a'
ptxas info    : Function properties for smelt_k
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 12 registers, used 1 barriers, 256 bytes smem, 376 bytes cmem[0]
ptxas info    : Function properties for __smelt_fmodf
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compile time = 7.165 ms
";
        let f = parse(log);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            f[0],
            PtxasFunction {
                name: "smelt_k".into(),
                entry: true,
                registers: 12,
                stack_frame_bytes: 0,
                spill_store_bytes: 8,
                spill_load_bytes: 4,
                shared_bytes: 256,
                barriers: 1,
            }
        );
        assert!(!f[1].entry);
        assert_eq!(f[1].stack_frame_bytes, 16);
    }
}
