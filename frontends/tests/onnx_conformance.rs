//! ONNX operator conformance on the reference interpreter: runs every case
//! of `../shared/conformance/onnx-node` (skipped with a message when absent)
//! and fails if fewer in-scope cases pass than `conformance/passing.txt`
//! records. `SMELT_BLESS_CONFORMANCE=1` rewrites `conformance/passing.txt`
//! and `conformance/failures.md` (the failing cases with their reasons).

use smelt_frontends::onnx::conformance;
use std::path::Path;

fn recorded(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| l.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or_else(|| panic!("{}: no pass count", path.display()))
}

#[test]
fn onnx_node_conformance_does_not_regress() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance/onnx-node"));
    if !dir.is_dir() {
        println!("skipping: {} not found", dir.display());
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance");
    let start = std::time::Instant::now();
    let report = conformance::run_dir(dir);
    println!("{report}");
    println!(
        "{} in scope, {:.1}% passed, {:.1}s",
        report.in_scope(),
        100.0 * report.passed() as f64 / report.in_scope().max(1) as f64,
        start.elapsed().as_secs_f64()
    );
    for c in report.failures() {
        println!("FAIL {}: {}", c.name, c.reason.as_deref().unwrap_or(""));
    }
    if std::env::var_os("SMELT_BLESS_CONFORMANCE").is_some() {
        std::fs::create_dir_all(&root).unwrap();
        let text = format!(
            "# In-scope ONNX conformance cases passing on the reference interpreter\n\
             # (of {} in scope); the conformance test fails below this number.\n{}\n",
            report.in_scope(),
            report.passed()
        );
        std::fs::write(root.join("passing.txt"), text).unwrap();
        std::fs::write(root.join("failures.md"), report.failures_markdown()).unwrap();
        return;
    }
    let want = recorded(&root.join("passing.txt"));
    assert!(
        report.passed() >= want,
        "{} in-scope cases pass, {want} are recorded in conformance/passing.txt",
        report.passed()
    );
}
