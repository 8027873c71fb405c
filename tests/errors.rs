//! Bad input never panics: every case below must make `smelt` exit with
//! code 1 and print exactly one line `error: ...` that names the problem.
//!
//! The broken models are copies of a small model written by `smelt
//! make-test-model` into a temporary folder, so this suite does not depend on
//! `../shared`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use smelt_ir::{DType, Tensor};

/// A fresh random llama checkpoint in a temporary folder.
fn model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model(&dir, &["--arch", "llama", "--layers", "1"]);
    (tmp, dir)
}

fn compile_fails(dir: &Path, wants: &[&str]) -> String {
    let out = dir.with_extension("smelt");
    let msg = fails(&[&"compile", &dir, &"-o", &out], wants);
    assert!(!out.exists(), "a failed compile must not leave an artifact");
    msg
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, f: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut w = read_tensors(&p);
    f(&mut w);
    write_tensors(&p, &w);
}

const DOWN: &str = "model.layers.0.mlp.down_proj.weight";

#[test]
fn missing_config() {
    let (_t, dir) = model();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    compile_fails(&dir, &["missing config.json"]);
}

#[test]
fn malformed_config() {
    let (_t, dir) = model();
    std::fs::write(dir.join("config.json"), "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": 64,,\n}").unwrap();
    compile_fails(&dir, &["config.json", "malformed JSON at line 3"]);
}

#[test]
fn unknown_model_type_lists_supported_ones() {
    let (_t, dir) = model();
    edit_config(&dir, |v| v["model_type"] = "gpt9".into());
    compile_fails(&dir, &["unknown model_type `gpt9`", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]);
}

#[test]
fn bad_config_value_names_the_key() {
    let (_t, dir) = model();
    edit_config(&dir, |v| v["num_attention_heads"] = "four".into());
    compile_fails(&dir, &["num_attention_heads"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = model();
    edit_weights(&dir, |w| {
        w.remove(DOWN);
    });
    compile_fails(&dir, &[&format!("tensor `{DOWN}` missing")]);
}

#[test]
fn wrong_shape_says_expected_and_found() {
    let (_t, dir) = model();
    edit_weights(&dir, |w| {
        w.insert(DOWN.into(), Tensor::full(DType::F32, vec![64, 100], 0.0));
    });
    compile_fails(&dir, &[DOWN, "[64, 100]", "expected [64, 176]"]);
}

#[test]
fn wrong_dtype_says_expected_and_found() {
    let (_t, dir) = model();
    edit_weights(&dir, |w| {
        w.insert(DOWN.into(), Tensor::full(DType::I64, vec![64, 176], 1.0));
    });
    compile_fails(&dir, &[DOWN, "dtype i64"]);
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = model();
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    compile_fails(&dir, &["model.safetensors"]);
    std::fs::write(&p, &bytes[..4]).unwrap();
    compile_fails(&dir, &["model.safetensors"]);
}

#[test]
fn safetensors_header_lying_about_its_length() {
    let (_t, dir) = model();
    let p = dir.join("model.safetensors");
    let good = std::fs::read(&p).unwrap();
    let real = u64::from_le_bytes(good[..8].try_into().unwrap());
    // Longer than the file, and a little shorter than the JSON header.
    for claimed in [good.len() as u64 * 2, real - 5] {
        let mut bytes = good.clone();
        bytes[..8].copy_from_slice(&claimed.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        compile_fails(&dir, &["model.safetensors"]);
    }
}

#[test]
fn missing_model_path_bad_onnx_and_bad_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("nowhere");
    fails(&[&"compile", &nowhere, &"-o", &tmp.path().join("x.smelt")], &["no such file or directory"]);
    let onnx = tmp.path().join("model.onnx");
    std::fs::write(&onnx, b"not really onnx").unwrap();
    fails(&[&"compile", &onnx, &"-o", &tmp.path().join("x.smelt")], &["model.onnx"]);
    assert!(!tmp.path().join("x.smelt").exists());
    // An ONNX export has its RoPE frequencies in the graph already.
    fails(
        &[&"compile", &onnx, &"-o", &tmp.path().join("x.smelt"), &"--rope-cast", &"bf16"],
        &["model.onnx", "--rope-cast applies to checkpoint folders"],
    );
    // Bad target combinations and GPU architectures are refused before any work.
    fails(
        &[&"compile", &tmp.path(), &"-o", &tmp.path().join("x.smelt"), &"--target", &"interp,cpu"],
        &["`interp` cannot be combined"],
    );
    fails(
        &[&"compile", &tmp.path(), &"-o", &tmp.path().join("x.smelt"), &"--target", &"cuda", &"--gpu-arch", &"sm_75"],
        &["unknown GPU architecture `sm_75`"],
    );
    if !cfg!(feature = "llvm") {
        fails(
            &[&"compile", &tmp.path(), &"-o", &tmp.path().join("x.smelt"), &"--target", &"cuda"],
            &["target `cuda` needs LLVM's NVPTX backend"],
        );
    }
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(&[&"inspect", &empty], &["missing config.json"]);
}

/// A compiled artifact and an inputs file path in a temporary folder.
fn artifact() -> (tempfile::TempDir, PathBuf) {
    let (t, dir) = model();
    let art = t.path().join("m.smelt");
    ok(&[&"compile", &dir, &"-o", &art]);
    (t, art)
}

fn ids(shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_i64(DType::I64, shape, (0..n as i64).collect()).unwrap()
}

fn run_with(art: &Path, inputs: BTreeMap<String, Tensor>, wants: &[&str]) {
    let dir = art.parent().unwrap();
    let inp = dir.join("in.safetensors");
    write_tensors(&inp, &inputs);
    fails(&[&"run", &art, &"--inputs", &inp, &"--outputs", &dir.join("out.safetensors")], wants);
}

#[test]
fn run_rejects_wrong_input_names_shapes_and_dtypes() {
    let (_t, art) = artifact();
    run_with(&art, BTreeMap::from([("input_id".to_string(), ids(vec![1, 3]))]), &["input_id"]);
    run_with(
        &art,
        BTreeMap::from([("input_ids".to_string(), ids(vec![1, 3])), ("inputs_embeds".to_string(), ids(vec![1, 3]))]),
        &["unknown input `inputs_embeds`"],
    );
    run_with(&art, BTreeMap::from([("input_ids".to_string(), ids(vec![3]))]), &["input `input_ids`", "rank"]);
    run_with(
        &art,
        BTreeMap::from([("input_ids".to_string(), ids(vec![1, 3])), ("attention_mask".to_string(), ids(vec![1, 5]))]),
        &["attention_mask"],
    );
    run_with(
        &art,
        BTreeMap::from([(
            "input_ids".to_string(),
            Tensor::from_f32(DType::F32, vec![1, 3], vec![0.0, 1.0, 2.0]).unwrap(),
        )]),
        &["input `input_ids`: expected dtype i64, found f32"],
    );
    let dir = art.parent().unwrap();
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00").unwrap();
    fails(
        &[&"run", &art, &"--inputs", &bad, &"--outputs", &dir.join("o.safetensors")],
        &["bad.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn corrupted_artifacts_are_refused() {
    let (_t, art) = artifact();
    let w = art.join("weights.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(&w, &bytes).unwrap();
    let args = ["--prompt-ids", "1,2", "--max-new-tokens", "1"];
    fails(&[&"generate", &art, &args[0], &args[1], &args[2], &args[3]], &["weights.safetensors", "sha256"]);
    bytes[i] ^= 0xff;
    std::fs::write(&w, &bytes).unwrap();
    ok(&[&"generate", &art, &args[0], &args[1], &args[2], &args[3]]);

    std::fs::remove_file(art.join("model.smir")).unwrap();
    fails(&[&"inspect", &art], &["model.smir", "missing"]);

    let m = art.join("manifest.json");
    std::fs::write(&m, "{\"format_version\": 1, ").unwrap();
    fails(&[&"inspect", &art], &["manifest.json: malformed JSON"]);
    std::fs::write(&m, "{\"format_version\": 2}").unwrap();
    fails(&[&"inspect", &art], &["format version 2 is not supported"]);
    std::fs::remove_file(&m).unwrap();
    fails(&[&"inspect", &art], &["not a smelt artifact"]);
}

#[test]
fn generate_rejects_bad_prompts() {
    let (_t, art) = artifact();
    fails(&[&"generate", &art, &"--prompt-ids", &"1,x,3", &"--max-new-tokens", &"2"], &["`x` is not a token id"]);
    fails(
        &[&"generate", &art, &"--prompt-ids", &"1,999", &"--max-new-tokens", &"2"],
        &["token id 999 is out of range"],
    );
    fails(&[&"generate", &art, &"--prompt-ids", &"", &"--max-new-tokens", &"2"], &["empty"]);
    fails(&[&"generate", &art, &"--prompt-ids", &"1,2", &"--max-new-tokens", &"5000"], &["context length"]);
    let no_tok = art.parent().unwrap().join("notok");
    make_model(&no_tok, &["--arch", "qwen2", "--layers", "1"]);
    std::fs::remove_file(no_tok.join("tokenizer.json")).unwrap();
    fails(&[&"generate", &no_tok, &"--prompt", &"hi", &"--max-new-tokens", &"2"], &["no tokenizer.json"]);
}

// ---- `cpu` artifacts: kernels.so, constants.bin and the launch plan ----

/// A `cpu` artifact of a fresh one-layer llama, checked to run before a test
/// breaks it (so each failure below is the breakage's doing).
fn cpu_artifact() -> (tempfile::TempDir, PathBuf) {
    let (t, dir) = model();
    let art = t.path().join("m-cpu.smelt");
    ok(&[&"compile", &dir, &"-o", &art, &"--target", &"cpu"]);
    ok(&[&"generate", &art, &"--prompt-ids", &"1,2", &"--max-new-tokens", &"1"]);
    (t, art)
}

fn generate_fails(art: &Path, wants: &[&str]) -> String {
    fails(&[&"generate", &art, &"--prompt-ids", &"1,2", &"--max-new-tokens", &"1"], wants)
}

/// `smelt run` on two tokens must fail with `wants`.
fn run_fails(art: &Path, wants: &[&str]) -> String {
    let dir = art.parent().unwrap();
    let inp = dir.join("in.safetensors");
    write_tensors(&inp, &BTreeMap::from([("input_ids".to_string(), ids(vec![1, 2]))]));
    fails(&[&"run", &art, &"--inputs", &inp, &"--outputs", &dir.join("out.safetensors"), &"--threads", &"2"], wants)
}

/// Flips every bit of the byte in the middle of `p`.
fn flip_middle_byte(p: &Path) {
    let mut bytes = std::fs::read(p).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(p, &bytes).unwrap();
}

/// Edits the manifest as a struct. `reseal` recomputes `native_sha256`, as
/// if the edited plan had been written by a compiler (an artifact built on
/// another machine, or by a buggy or other version of smelt), so the
/// runtime's own checks of the plan are reached.
fn edit_manifest(art: &Path, reseal: bool, f: impl FnOnce(&mut smelt_runtime::artifact::Manifest)) {
    let p = art.join("manifest.json");
    let mut m: smelt_runtime::artifact::Manifest = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut m);
    if reseal {
        let plan = m.native.as_ref().expect("a cpu artifact has a plan");
        m.native_sha256 = Some(smelt_runtime::artifact::native_sha256(&m.signature, plan));
    }
    std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

fn plan(m: &mut smelt_runtime::artifact::Manifest) -> &mut smelt_runtime::plan::NativePlan {
    m.native.as_mut().expect("a cpu artifact has a plan")
}

#[test]
fn cpu_artifact_with_a_flipped_byte_in_kernels_so() {
    let (_t, art) = cpu_artifact();
    flip_middle_byte(&art.join("kernels.so"));
    run_fails(&art, &["file `kernels.so` has sha256", "corrupted or modified"]);
    generate_fails(&art, &["file `kernels.so` has sha256"]);
}

#[test]
fn cpu_artifact_with_a_flipped_byte_in_constants_bin() {
    let (_t, art) = cpu_artifact();
    flip_middle_byte(&art.join("constants.bin"));
    run_fails(&art, &["file `constants.bin` has sha256", "corrupted or modified"]);
}

#[test]
fn cpu_artifact_without_kernels_so() {
    let (_t, art) = cpu_artifact();
    std::fs::remove_file(art.join("kernels.so")).unwrap();
    generate_fails(&art, &["file `kernels.so` listed in the manifest is missing"]);
    // Unlisted as well: the plan still names it.
    edit_manifest(&art, false, |m| m.files.retain(|f| f.name != "kernels.so"));
    generate_fails(&art, &["file `kernels.so` is not listed in `files`"]);
}

#[test]
fn cpu_artifact_with_a_wrong_format_version() {
    let (_t, art) = cpu_artifact();
    edit_manifest(&art, false, |m| m.format_version = 7);
    generate_fails(&art, &["artifact format version 7 is not supported", "recompile"]);
}

#[test]
fn cpu_artifact_with_an_edited_launch_plan() {
    let (_t, art) = cpu_artifact();
    let pristine = std::fs::read(art.join("manifest.json")).unwrap();
    let restore = || std::fs::write(art.join("manifest.json"), &pristine).unwrap();
    let hash = ["launch plan", "native_sha256", "corrupted or modified"];

    // Pointing a launch at another kernel with the same argument types (so
    // every structural check passes) would run the wrong machine code on
    // buffers sized for the right one: the plan's checksum refuses it.
    edit_manifest(&art, false, |m| {
        let p = plan(m);
        let (li, other) = (0..p.launches.len())
            .find_map(|li| {
                let k = &p.kernels[p.launches[li].kernel];
                let same = |j: &usize| {
                    *j != p.launches[li].kernel
                        && p.kernels[*j].buffers == k.buffers
                        && p.kernels[*j].scalars == k.scalars
                };
                (0..p.kernels.len()).find(same).map(|j| (li, j))
            })
            .expect("two kernels with the same argument types");
        p.launches[li].kernel = other;
    });
    generate_fails(&art, &hash);
    restore();
    // A weakened bound check, a changed buffer shape, a dropped checksum.
    edit_manifest(&art, false, |m| plan(m).launches[1].needs[0] = "1".into());
    generate_fails(&art, &hash);
    restore();
    edit_manifest(&art, false, |m| {
        let b = plan(m).buffers.iter_mut().find(|b| b.shape.len() > 1).unwrap();
        b.shape[0] = "1".into();
    });
    run_fails(&art, &hash);
    restore();
    edit_manifest(&art, false, |m| m.native_sha256 = None);
    generate_fails(&art, &["native_sha256` missing"]);
    restore();

    // Behind the checksum, the runtime still checks every launch before any
    // kernel runs: a missing kernel, an argument-type mismatch, a bound a
    // buffer cannot meet.
    edit_manifest(&art, true, |m| plan(m).launches[1].kernel = 999);
    generate_fails(&art, &["invalid launch plan", "launch 1", "kernel 999 does not exist"]);
    restore();
    edit_manifest(&art, true, |m| {
        let p = plan(m);
        p.launches[1].args[0] = p.buffers.len() + 5;
    });
    generate_fails(&art, &["invalid launch plan", "launch 1", "which does not exist"]);
    restore();
    edit_manifest(&art, true, |m| {
        let needs = &mut plan(m).launches[1].needs[0];
        *needs = format!("1000*({needs})");
    });
    run_fails(&art, &["launch 1", "argument 0 needs", "elements"]);
    restore();
    edit_manifest(&art, true, |m| plan(m).kernels[0].symbol = "smelt_no_such_kernel".into());
    generate_fails(&art, &["kernels.so", "does not export `smelt_no_such_kernel`"]);
    restore();
    ok(&[&"generate", &art, &"--prompt-ids", &"1,2", &"--max-new-tokens", &"1"]);
}

#[test]
fn cpu_artifact_needing_cpu_features_this_machine_lacks() {
    let (_t, art) = cpu_artifact();
    // A feature no x86 machine has yet is unknown to the runtime, and so
    // counts as missing too.
    edit_manifest(&art, true, |m| plan(m).cpu_features.push("frobnicate".into()));
    generate_fails(&art, &["CPU features this machine lacks", "frobnicate", "recompile"]);
    #[cfg(target_arch = "x86_64")]
    if !std::arch::is_x86_feature_detected!("avx512vnni") {
        edit_manifest(&art, true, |m| {
            let p = plan(m);
            p.cpu_features.retain(|f| f != "frobnicate");
            p.cpu_features.push("avx512vnni".into());
        });
        let msg = generate_fails(&art, &["CPU features this machine lacks: avx512vnni"]);
        assert!(!msg.contains("frobnicate"), "{msg}");
    }
    // Unsealed, the same edit is refused by the checksum.
    edit_manifest(&art, false, |m| plan(m).cpu_features.push("sse2".into()));
    generate_fails(&art, &["native_sha256"]);
}

#[test]
fn cpu_artifact_for_another_architecture() {
    let (_t, art) = cpu_artifact();
    let other = if std::env::consts::ARCH == "aarch64" { "x86_64" } else { "aarch64" };
    edit_manifest(&art, true, |m| plan(m).arch = other.into());
    generate_fails(
        &art,
        &[&format!("compiled for {other}, this machine is {}", std::env::consts::ARCH), "recompile the model"],
    );
}
