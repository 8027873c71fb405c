//! `smelt tune` and `smelt compile` with a tuning database, end to end on
//! the repository's tiny model: measured winners are used and named in the
//! manifest, compiles are deterministic, another device's records and a
//! damaged database are not applied (a warning, not a failure), concurrent
//! tuners leave a valid database, GPU tuning is refused clearly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails, ok, SMELT};

fn model() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-random-llama"))
}

/// `smelt tune` on the tiny model for a few seconds into `db`.
fn tune(db: &Path, budget: &str) -> std::process::Output {
    Command::new(SMELT)
        .args(["tune"])
        .arg(model())
        .args(["--budget", budget, "--threads", "2", "--prompt", "16", "--db"])
        .arg(db)
        .output()
        .unwrap()
}

fn compile(out: &Path, db: &Path) -> (serde_json::Value, String) {
    let o = Command::new(SMELT)
        .arg("compile")
        .arg(model())
        .arg("-o")
        .arg(out)
        .args(["--target", "cpu", "--tuning-db"])
        .arg(db)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "compile failed: {stderr}");
    let m = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    (m, stderr)
}

/// Each kernel's `tuning` entry.
fn tunings(m: &serde_json::Value) -> Vec<serde_json::Value> {
    m["native"]["kernels"].as_array().unwrap().iter().map(|k| k["tuning"].clone()).collect()
}

fn sources(m: &serde_json::Value) -> Vec<String> {
    tunings(m).iter().map(|t| t["source"].as_str().unwrap().to_string()).collect()
}

#[test]
fn tuned_compiles_use_measured_winners_deterministically_and_only_on_this_device() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db.json");
    let out = tune(&db, "6");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("kernel") && table.contains("speedup") && table.contains("parameters"), "{table}");
    let text = std::fs::read_to_string(&db).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let records = parsed["records"].as_array().unwrap();
    assert!(!records.is_empty(), "{text}");

    let (a, err_a) = compile(&tmp.path().join("a.smelt"), &db);
    let (b, _) = compile(&tmp.path().join("b.smelt"), &db);
    assert_eq!(tunings(&a), tunings(&b), "two compiles with one database choose the same kernels");
    assert_eq!(a["native"]["kernels"], b["native"]["kernels"]);
    let measured: Vec<serde_json::Value> = tunings(&a).into_iter().filter(|t| t["source"] == "measured").collect();
    assert_eq!(measured.len(), records.len(), "{err_a}");
    assert!(err_a.contains(&format!("tuning: {} of", records.len())), "{err_a}");
    let keys: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{}/{}/{}",
                r["key"]["signature"].as_str().unwrap(),
                r["key"]["bucket"].as_str().unwrap(),
                r["key"]["device"].as_str().unwrap()
            )
        })
        .collect();
    for t in &measured {
        assert!(keys.contains(&t["key"].as_str().unwrap().to_string()), "{t}");
    }
    // The tuned artifact runs.
    ok(&[
        &"generate",
        &tmp.path().join("a.smelt"),
        &"--prompt-ids",
        &"1,2,3",
        &"--max-new-tokens",
        &"3",
        &"--threads",
        &"2",
    ]);

    // The same records under another device fingerprint are not applied.
    let other = tmp.path().join("other.json");
    let mut foreign = parsed.clone();
    for r in foreign["records"].as_array_mut().unwrap() {
        r["key"]["device"] = "cpu-000000000000".into();
    }
    std::fs::write(&other, serde_json::to_string(&foreign).unwrap()).unwrap();
    let (c, err_c) = compile(&tmp.path().join("c.smelt"), &other);
    assert!(sources(&c).iter().all(|s| s != "measured"), "{:?}", sources(&c));
    assert!(sources(&c).iter().any(|s| s == "estimated"));
    assert!(err_c.contains("tuning: 0 of"), "{err_c}");

    // Export, then import into a fresh database: the same records.
    let exported = tmp.path().join("export.json");
    ok(&[&"tune", &"--db", &db, &"--export", &exported]);
    let fresh = tmp.path().join("fresh.json");
    ok(&[&"tune", &"--db", &fresh, &"--import", &exported]);
    let back: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert_eq!(back["records"], parsed["records"]);
}

#[test]
fn a_damaged_database_warns_and_compiles_untuned() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "truncated.json",
            "{\"format\": \"smelt-tuning-db\", \"version\": 1, \"records\": [{\"key\": {\"sig".to_string(),
        ),
        ("garbage.json", "\u{7f}ELF not json at all".to_string()),
        ("future.json", "{\"format\": \"smelt-tuning-db\", \"version\": 99, \"records\": []}".to_string()),
    ];
    for (name, text) in cases {
        let db = tmp.path().join(name);
        std::fs::write(&db, text).unwrap();
        let (m, stderr) = compile(&tmp.path().join(format!("{name}.smelt")), &db);
        assert!(stderr.contains("warning: tuning database") && stderr.contains("ignoring it"), "{name}: {stderr}");
        assert!(sources(&m).iter().all(|s| s == "estimated" || s == "fixed"), "{name}: {:?}", sources(&m));
        assert!(sources(&m).iter().any(|s| s == "estimated"), "{name}");
    }
    // --no-tuning records estimates too, without a warning.
    let out = tmp.path().join("none.smelt");
    ok(&[&"compile", &model(), &"-o", &out, &"--target", &"cpu", &"--no-tuning"]);
}

#[test]
fn two_tuners_writing_one_database_leave_it_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db.json");
    let spawn = || {
        Command::new(SMELT)
            .arg("tune")
            .arg(model())
            .args(["--budget", "4", "--threads", "1", "--prompt", "8", "--db"])
            .arg(&db)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let text = std::fs::read_to_string(&db).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("the database is valid JSON");
    assert_eq!(v["format"], "smelt-tuning-db");
    assert!(!v["records"].as_array().unwrap().is_empty());
    let (_, stderr) = compile(&tmp.path().join("x.smelt"), &db);
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn gpu_tuning_without_a_gpu_is_refused_clearly() {
    // This test runs where no GPU is (CI); on a GPU machine it is skipped.
    if smelt_runtime::cuda::probe(0).is_ok() {
        eprintln!("skipped: this machine has a GPU, so `smelt tune --target cuda` would tune it");
        return;
    }
    let why: &[&str] = if cfg!(feature = "llvm") { &["opening the GPU"] } else { &["without the `llvm` feature"] };
    fails(&[&"tune", &model(), &"--target", &"cuda", &"--db", &"/tmp/unused.json"], why);
    fails(&[&"tune"], &["give a MODEL"]);
}
