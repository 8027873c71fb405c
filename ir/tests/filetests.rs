//! Filetests: every `tests/filetests/**/*.smir` file (from the workspace
//! root) is a test written in the text IR, driven by directives in its
//! leading comment block:
//!
//! - `# test: roundtrip`: the file parses and verifies, and printing is a
//!   fixed point: `print(parse(print(g))) == print(g)`.
//! - `# test: verify-error`: the file must fail to parse or to verify, and
//!   every `# error: <substring>` line must appear in the error text (parse
//!   errors read `line:col: message`, verifier errors `line N: %v = op: message`).
//! - `# check: <substring>`: the printed graph contains the substrings in
//!   order (each after the previous match); `# check-not: <substring>`: it
//!   contains the substring nowhere. Passing tests only.
//!
//! - `# test: passes=STAGE,...`: a pass test, run by smelt-passes'
//!   runner (`passes/tests/filetests.rs`); its checks apply to the pass
//!   output, so here the input is only round-trip checked.
//!
//! Every passing file is also round-trip checked, whatever its test kind.
//! A header line `# word: ...` with an unknown lowercase key, an unknown test
//! kind, or a missing `# test:` line is an error naming the file, so a typo
//! cannot silently skip a test. All failing files are reported together.
//!
//! This file also keeps `docs/ops.md` equal to `smelt_ir::text::ops_markdown()`
//! (regenerate with `SMELT_BLESS=1`).

use smelt_ir::text::{ops_markdown, parse, print};
use smelt_ir::verify::verify;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "smir") {
            out.push(p);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Kind {
    Roundtrip,
    VerifyError,
    /// Run by smelt-passes; this crate checks only that the input round-trips.
    Passes,
}

#[derive(Debug, Default)]
struct Directives {
    kind: Option<Kind>,
    errors: Vec<String>,
    checks: Vec<String>,
    check_nots: Vec<String>,
}

/// Reads the directives from the leading block of comment lines.
fn directives(src: &str) -> Result<Directives, String> {
    let mut d = Directives::default();
    for line in src.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let Some(c) = t.strip_prefix('#') else { break };
        let c = c.trim_start();
        let Some((key, value)) = c.split_once(':') else { continue };
        // Only `word:` with a lowercase word is a directive; other comments are prose.
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            continue;
        }
        let value = value.trim().to_string();
        match key {
            "test" => {
                if d.kind.is_some() {
                    return Err("more than one `# test:` line".into());
                }
                d.kind = Some(match value.as_str() {
                    "roundtrip" => Kind::Roundtrip,
                    "verify-error" => Kind::VerifyError,
                    v if v.starts_with("passes=") => Kind::Passes,
                    other => {
                        return Err(format!(
                            "unknown test kind `{other}` (known: roundtrip, verify-error, passes=STAGE,...)"
                        ))
                    }
                });
            }
            "error" => d.errors.push(value),
            "check" => d.checks.push(value),
            "check-not" => d.check_nots.push(value),
            other => return Err(format!("unknown directive `# {other}:` (known: test, error, check, check-not)")),
        }
        if value_is_empty(&d) {
            return Err(format!("empty `# {key}:` directive"));
        }
    }
    match d.kind {
        None => Err("no `# test:` line".into()),
        Some(Kind::VerifyError) if d.errors.is_empty() => Err("a verify-error test needs `# error:` lines".into()),
        Some(Kind::VerifyError) if !d.checks.is_empty() || !d.check_nots.is_empty() => {
            Err("`# check:` lines need a test that passes".into())
        }
        Some(Kind::Roundtrip | Kind::Passes) if !d.errors.is_empty() => {
            Err("`# error:` lines need a verify-error test".into())
        }
        _ => Ok(d),
    }
}

fn value_is_empty(d: &Directives) -> bool {
    [&d.errors, &d.checks, &d.check_nots].iter().any(|v| v.last().is_some_and(|s| s.is_empty()))
}

/// Parses, verifies and checks that printing is a fixed point; returns the printed text.
fn round_trip(src: &str) -> Result<String, String> {
    let g = parse(src).map_err(|e| format!("parse error: {e}"))?;
    verify(&g).map_err(|e| format!("verifier errors:\n{e}"))?;
    let p1 = print(&g);
    let g2 = parse(&p1).map_err(|e| format!("printed text does not parse: {e}\n{p1}"))?;
    verify(&g2).map_err(|e| format!("printed text does not verify:\n{e}\n{p1}"))?;
    let p2 = print(&g2);
    if p1 != p2 {
        return Err(format!("printing is not a fixed point:\n--- first\n{p1}--- second\n{p2}"));
    }
    Ok(p1)
}

/// FileCheck-lite: `check` substrings in order, `check-not` substrings nowhere.
fn run_checks(d: &Directives, text: &str) -> Result<(), String> {
    let mut from = 0;
    for c in &d.checks {
        match text[from..].find(c.as_str()) {
            Some(i) => from += i + c.len(),
            None => return Err(format!("`# check: {c}` not found after byte {from} of the printed graph:\n{text}")),
        }
    }
    for c in &d.check_nots {
        if text.contains(c.as_str()) {
            return Err(format!("`# check-not: {c}` found in the printed graph:\n{text}"));
        }
    }
    Ok(())
}

fn run_file(path: &Path) -> Result<(), String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let d = directives(&src)?;
    match d.kind {
        Some(Kind::Roundtrip) => {
            let printed = round_trip(&src)?;
            run_checks(&d, &printed)
        }
        Some(Kind::Passes) => round_trip(&src).map(|_| ()),
        Some(Kind::VerifyError) => {
            let text = match parse(&src) {
                Err(e) => e.to_string(),
                Ok(g) => match verify(&g) {
                    Err(e) => e.to_string(),
                    Ok(()) => return Err("expected an error, but the file parsed and verified".into()),
                },
            };
            let missing: Vec<_> = d.errors.iter().filter(|e| !text.contains(e.as_str())).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "error text lacks {}:\n{text}",
                    missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                ))
            }
        }
        None => Err("no `# test:` line".into()),
    }
}

#[test]
fn filetests() {
    let root = workspace_root().join("tests/filetests");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .smir files under {}", root.display());
    let filter = std::env::var("SMELT_FILETEST").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in &files {
        let rel = f.strip_prefix(workspace_root()).unwrap_or(f).display().to_string();
        if filter.as_ref().is_some_and(|p| !rel.contains(p.as_str())) {
            continue;
        }
        ran += 1;
        if let Err(e) = run_file(f) {
            failures.push(format!("{rel}: {e}"));
        }
    }
    if !failures.is_empty() {
        panic!("{} of {ran} filetests failed:\n\n{}", failures.len(), failures.join("\n\n"));
    }
}

#[test]
fn ops_doc_is_current() {
    let path = workspace_root().join("docs/ops.md");
    let want = ops_markdown();
    if std::env::var_os("SMELT_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write docs/ops.md");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/ops.md is stale; regenerate it with `SMELT_BLESS=1 cargo test -p smelt-ir --test filetests`"
    );
}

#[test]
fn directive_errors_name_the_problem() {
    assert!(directives("# test: fuse\nfunc @f() {\n  return\n}\n").unwrap_err().contains("unknown test kind `fuse`"));
    assert_eq!(directives("# test: passes=fuse\n").unwrap().kind, Some(Kind::Passes));
    assert!(directives("# test: roundtrip\n# chek: x\n").unwrap_err().contains("unknown directive `# chek:`"));
    assert!(directives("# just prose\nfunc @f() {}").unwrap_err().contains("no `# test:` line"));
    let d = directives("# test: roundtrip\n# Note: prose\n# check: a\n# check-not: b\nfunc").unwrap();
    assert_eq!((d.checks.len(), d.check_nots.len()), (1, 1));
    let ok = Directives { checks: vec!["a".into(), "c".into()], check_nots: vec!["z".into()], ..Directives::default() };
    assert!(run_checks(&ok, "a b c").is_ok());
    assert!(run_checks(&ok, "c b a").is_err());
    assert!(run_checks(&ok, "a c z").is_err());
}
