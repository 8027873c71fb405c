//! Helpers shared by the end-to-end tests: running the built `smelt` binary
//! and checking how it fails, and reading/writing named tensors.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use smelt_ir::Tensor;

pub const SMELT: &str = env!("CARGO_BIN_EXE_smelt");

/// The shared fixtures folder beside the repository, when it is there.
pub fn fixtures_dir() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures"));
    p.is_dir().then_some(p)
}

/// Runs `smelt ARGS...`.
pub fn smelt<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(SMELT).args(args).output().expect("the smelt binary runs")
}

fn describe(args: &[&dyn AsRef<std::ffi::OsStr>], out: &Output) -> String {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().to_string()).collect();
    format!(
        "smelt {}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs smelt and asserts success; returns stdout.
pub fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = smelt(args.iter().map(|a| a.as_ref()));
    assert!(out.status.success(), "expected success:\n{}", describe(args, &out));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs smelt and asserts it fails the way every user error must: exit code
/// 1, exactly one stderr line starting `error: `, no panic or internal
/// error, and the message containing each of `wants`. Returns the line.
pub fn fails(args: &[&dyn AsRef<std::ffi::OsStr>], wants: &[&str]) -> String {
    let out = smelt(args.iter().map(|a| a.as_ref()));
    let d = describe(args, &out);
    assert_eq!(out.status.code(), Some(1), "expected exit code 1:\n{d}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "expected one line on stderr:\n{d}");
    assert!(err.starts_with("error: "), "{d}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{d}");
    for w in wants {
        assert!(err.contains(w), "expected `{w}` in the message:\n{d}");
    }
    err.trim_end().to_string()
}

pub fn read_tensors(p: &Path) -> BTreeMap<String, Tensor> {
    smelt_runtime::tensors::read_tensor_file(p).unwrap_or_else(|e| panic!("{e}"))
}

pub fn write_tensors(p: &Path, t: &BTreeMap<String, Tensor>) {
    smelt_runtime::tensors::write_tensor_file(p, t).unwrap_or_else(|e| panic!("{e}"));
}

/// Max |a - b| over two tensors of the same shape.
pub fn max_abs_err(name: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    got.to_f64_vec().iter().zip(want.to_f64_vec()).map(|(a, b)| (a - b).abs()).fold(0.0, |m, e| {
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

/// Writes a random-weight checkpoint with `smelt make-test-model`.
pub fn make_model(dir: &Path, extra: &[&str]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"make-test-model", &dir];
    for e in extra {
        args.push(e);
    }
    ok(&args);
}
