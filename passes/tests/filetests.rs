//! Pass filetests: every `tests/filetests/passes/**/*.smir` file (from the
//! workspace root) is a graph in the text IR with directives in its leading
//! comment block:
//!
//! - `# test: passes=STAGE[,STAGE...]` runs those stages in order (any of
//!   `fold`, `cse`, `dce`, `canon`, `fuse`, `horizontal`, `cleanup`), or
//!   `passes=pipeline` the whole pipeline;
//! - `# check: <substring>`: the printed result contains the substrings in
//!   order; `# check-not: <substring>`: it contains the substring nowhere.
//!
//! Every result must verify, and must compute what the input computes: both
//! run in the reference interpreter on random inputs and random weights of
//! the declared types (symbols bound to small sizes within their bounds).
//! An unknown directive or stage is an error naming the file. Set
//! `SMELT_FILETEST=substring` to run matching files only.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smelt_ir::text::{parse, print};
use smelt_ir::{DType, Graph, Tensor};
use smelt_passes::{FusionOptions, PipelineOptions, Weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
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

#[derive(Default)]
struct Directives {
    stages: Vec<String>,
    checks: Vec<String>,
    check_nots: Vec<String>,
}

const STAGES: &[&str] = &["fold", "cse", "dce", "canon", "fuse", "horizontal", "cleanup", "kv_append", "pipeline"];

fn directives(src: &str) -> Result<Directives, String> {
    let mut d = Directives::default();
    for line in src.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let Some(c) = t.strip_prefix('#') else { break };
        let Some((key, value)) = c.trim_start().split_once(':') else {
            continue;
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            continue;
        }
        let value = value.trim().to_string();
        match key {
            "test" => {
                let list = value
                    .strip_prefix("passes=")
                    .ok_or_else(|| format!("`# test: {value}`: expected `passes=STAGE,...`"))?;
                for s in list.split(',').map(str::trim) {
                    if !STAGES.contains(&s) {
                        return Err(format!("unknown stage `{s}` (known: {})", STAGES.join(", ")));
                    }
                    d.stages.push(s.to_string());
                }
            }
            "check" => d.checks.push(value),
            "check-not" => d.check_nots.push(value),
            other => return Err(format!("unknown directive `# {other}:` (known: test, check, check-not)")),
        }
    }
    if d.stages.is_empty() {
        return Err("no `# test: passes=...` line".into());
    }
    Ok(d)
}

fn run_stages(g: &mut Graph, w: &mut Weights, stages: &[String]) -> Result<(), String> {
    for s in stages {
        let r = match s.as_str() {
            "fold" => smelt_passes::fold::run(g).map(|_| ()),
            "cse" => smelt_passes::cse::run(g).map(|_| ()),
            "dce" => {
                smelt_passes::dce::run(g);
                Ok(())
            }
            "canon" => smelt_passes::canon::run(g).map(|_| ()),
            "fuse" => smelt_passes::fuse(g, &FusionOptions::default()).and_then(|r| {
                if r.ill_typed.is_empty() {
                    Ok(())
                } else {
                    Err(smelt_passes::PassError::Extract(format!("ill-typed: {:?}", r.ill_typed)))
                }
            }),
            "horizontal" => smelt_passes::horizontal::run(g, w).map(|_| ()),
            "cleanup" => smelt_passes::cleanup::run(g).map(|_| ()),
            "kv_append" => smelt_passes::kv_append::run(g).map(|_| ()),
            "pipeline" => {
                let opts = PipelineOptions { verify_each: true, ..PipelineOptions::default() };
                smelt_passes::pipeline(g, w, &opts).map(|_| ())
            }
            other => return Err(format!("unknown stage `{other}`")),
        };
        r.map_err(|e| format!("stage `{s}`: {e}"))?;
        smelt_ir::verify::verify(g).map_err(|e| format!("after stage `{s}` the graph does not verify:\n{e}"))?;
    }
    Ok(())
}

fn random(rng: &mut StdRng, dtype: DType, shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    let last = *shape.last().unwrap_or(&1);
    match dtype {
        DType::Bool => {
            let v = (0..n).map(|i| i % last.max(1) == 0 || rng.random_bool(0.7)).collect();
            Tensor::from_bool(shape, v).expect("shape")
        }
        d if d.is_int() => Tensor::from_i64(d, shape, (0..n).map(|_| rng.random_range(1..3)).collect()).expect("shape"),
        d => Tensor::from_f32(d, shape, (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect()).expect("shape"),
    }
}

/// Runs both graphs on the same random inputs and weights.
fn same_values(before: &Graph, after: &Graph, weights: &Weights) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(11);
    let syms: BTreeMap<String, i64> =
        before.symbols().iter().map(|(k, b)| (k.clone(), (b.min.max(1) + 2).min(b.max))).collect();
    let concrete = |t: &smelt_ir::TensorType| -> Result<Vec<usize>, String> {
        t.shape.iter().map(|d| d.eval_map(&syms).map(|x| x as usize).map_err(|e| e.to_string())).collect()
    };
    let mut inputs = BTreeMap::new();
    for (name, v) in before.inputs() {
        inputs.insert(name, random(&mut rng, before.ty(v).dtype, concrete(before.ty(v))?));
    }
    let w = weights;
    let a = smelt_ir::interp::run(before, w, &inputs).map_err(|e| format!("input graph: {e}"))?;
    let b = smelt_ir::interp::run(after, w, &inputs).map_err(|e| format!("result graph: {e}"))?;
    for (name, x) in &a {
        let y = b.get(name).ok_or_else(|| format!("output `{name}` is gone"))?;
        if x.shape != y.shape {
            return Err(format!("output `{name}`: shape {:?} became {:?}", x.shape, y.shape));
        }
        for (i, (p, q)) in x.to_f64_vec().iter().zip(y.to_f64_vec()).enumerate() {
            if (p - q).abs() > 1e-4 * (1.0 + p.abs()) && !(p.is_nan() && q.is_nan()) {
                return Err(format!("output `{name}` element {i}: {p} became {q}"));
            }
        }
    }
    Ok(())
}

fn run_file(path: &Path) -> Result<(), String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let d = directives(&src)?;
    let before = parse(&src).map_err(|e| format!("parse error: {e}"))?;
    smelt_ir::verify::verify(&before).map_err(|e| format!("the input does not verify:\n{e}"))?;
    let mut g = before.clone();
    // Weights named in the input get random data, so that stages that read
    // weights (horizontal fusion) have some.
    let mut rng = StdRng::seed_from_u64(3);
    let mut weights: Weights = BTreeMap::new();
    for (name, v) in before.weights() {
        if let Some(shape) = before.ty(v).const_shape() {
            weights.insert(name, random(&mut rng, before.ty(v).dtype, shape));
        }
    }
    let original = weights.clone();
    run_stages(&mut g, &mut weights, &d.stages)?;
    let text = print(&g);
    let mut from = 0;
    for c in &d.checks {
        match text[from..].find(c.as_str()) {
            Some(i) => from += i + c.len(),
            None => return Err(format!("`# check: {c}` not found after byte {from} of the result:\n{text}")),
        }
    }
    for c in &d.check_nots {
        if text.contains(c.as_str()) {
            return Err(format!("`# check-not: {c}` found in the result:\n{text}"));
        }
    }
    // The input reads the original weights, the result the updated store.
    let mut all = original;
    all.extend(weights);
    same_values(&before, &g, &all).map_err(|e| format!("{e}\nresult:\n{text}"))?;
    Ok(())
}

#[test]
fn pass_filetests() {
    let dir = root().join("tests/filetests/passes");
    let mut files = Vec::new();
    collect(&dir, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .smir files under {}", dir.display());
    let filter = std::env::var("SMELT_FILETEST").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in &files {
        let rel = f.strip_prefix(root()).unwrap_or(f).display().to_string();
        if filter.as_ref().is_some_and(|p| !rel.contains(p.as_str())) {
            continue;
        }
        ran += 1;
        if let Err(e) = run_file(f) {
            failures.push(format!("{rel}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} of {ran} pass filetests failed:\n\n{}", failures.len(), failures.join("\n\n"));
    println!("{ran} pass filetests passed");
}
