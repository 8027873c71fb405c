//! Builds the graph of every fixture checkpoint (when ../shared is present)
//! and of random checkpoints of every architecture, and checks the
//! signature: names, dtypes and symbolic shapes of inputs and outputs.

use smelt_frontends::hf::{self, write_random_checkpoint, Arch, RandomModelSpec};
use smelt_ir::{DType, Graph};
use std::path::{Path, PathBuf};

fn fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    if p.is_dir() {
        Some(p)
    } else {
        println!("skipping fixture graphs: {} not found", p.display());
        None
    }
}

fn signature(g: &Graph) -> Vec<String> {
    let mut v: Vec<String> = g.inputs().iter().map(|(n, id)| format!("in {n}: {}", g.ty(*id))).collect();
    v.extend(g.outputs().iter().map(|(n, id)| format!("out {n}: {}", g.ty(*id))));
    v
}

fn check_signature(g: &Graph, layers: usize, kvh: usize, hd: usize, vocab: usize) {
    let sig = signature(g);
    let kv = |len: &str| format!("f32[batch, {kvh}, {len}, {hd}]");
    let mut want = vec![
        "in input_ids: i64[batch, seq]".to_string(),
        "in attention_mask: i64[batch, past + seq]".to_string(),
        "in position_ids: i64[batch, seq]".to_string(),
    ];
    for i in 0..layers {
        want.push(format!("in past_key_values.{i}.key: {}", kv("past")));
        want.push(format!("in past_key_values.{i}.value: {}", kv("past")));
    }
    want.push(format!("out logits: f32[batch, seq, {vocab}]"));
    for i in 0..layers {
        want.push(format!("out present.{i}.key: {}", kv("past + seq")));
        want.push(format!("out present.{i}.value: {}", kv("past + seq")));
    }
    assert_eq!(sig, want);
}

#[test]
fn fixture_graphs_have_the_decoder_with_past_signature() {
    let Some(root) = fixtures() else { return };
    let mut seen = 0;
    for e in std::fs::read_dir(root).unwrap() {
        let dir = e.unwrap().path();
        if !dir.join("config.json").exists() {
            continue;
        }
        let m = hf::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let c = &m.config;
        check_signature(&m.graph, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.vocab_size);
        // Every weight the graph names is in the weight map with the declared type.
        for (name, v) in m.graph.weights() {
            let t = &m.weights[&name];
            assert_eq!(m.graph.ty(v).const_shape().unwrap(), t.shape, "{name}");
        }
        seen += 1;
    }
    assert_eq!(seen, 6);
}

#[test]
fn random_checkpoints_of_every_architecture_build() {
    for arch in Arch::ALL {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = RandomModelSpec::tiny(arch);
        spec.dtype = DType::BF16;
        write_random_checkpoint(dir.path(), &spec).unwrap();
        let m = hf::load(dir.path()).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        let c = &m.config;
        check_signature(&m.graph, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.vocab_size);
        // bf16 weights are cast to f32 where the graph computes.
        assert!(m.weights.values().all(|t| t.dtype == DType::BF16));
    }
}

/// Reads every tensor of a safetensors file.
fn read_safetensors(path: &Path) -> std::collections::BTreeMap<String, smelt_ir::Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let dtype = smelt_frontends::hf::checkpoint::dtype_from_safetensors(v.dtype()).unwrap();
            let t = smelt_ir::Tensor::from_le_bytes(&name, dtype, v.shape().to_vec(), v.data()).unwrap();
            (name, t)
        })
        .collect()
}

fn max_abs_diff(a: &smelt_ir::Tensor, b: &smelt_ir::Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    a.to_f64_vec().iter().zip(b.to_f64_vec()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The kv step of every fixture through the graph and the interpreter
/// matches PyTorch within the fixtures' tolerance (1e-3). The references
/// come from the model cast in memory to its stored dtype and back, so a
/// bf16 fixture's RoPE frequencies are rounded as that cast left them
/// (`HfOptions::rope_cast`).
#[test]
fn fixture_kv_step_matches_reference_on_the_interpreter() {
    let Some(root) = fixtures() else { return };
    let mut worst_all = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let dir = e.unwrap().path();
        if !dir.join("config.json").exists() {
            continue;
        }
        let ck = hf::Checkpoint::open(&dir).unwrap();
        let m = hf::build_stored_with(&ck, &hf::HfOptions::cast_to_stored(ck.config())).unwrap().into_tensors();
        let r = read_safetensors(&dir.join("reference.safetensors"));
        let mut inputs = std::collections::BTreeMap::new();
        for (k, t) in &r {
            if let Some(rest) = k.strip_prefix("kv.past.") {
                inputs.insert(format!("past_key_values.{rest}"), t.clone());
            } else if let Some(name) =
                ["input_ids", "attention_mask", "position_ids"].iter().find(|n| k == &format!("kv.{n}"))
            {
                inputs.insert(name.to_string(), t.clone());
            }
        }
        let out =
            smelt_ir::interp::run(&m.graph, &m.weights, &inputs).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut worst = max_abs_diff(&out["logits"], &r["kv.logits"]);
        for (k, t) in &r {
            if let Some(rest) = k.strip_prefix("kv.present.") {
                let e = max_abs_diff(&out[&format!("present.{rest}")], t);
                worst = worst.max(e);
            }
        }
        println!("{}: kv step max abs err {worst:.3e}", dir.display());
        worst_all.push((dir.display().to_string(), worst));
    }
    for (d, w) in &worst_all {
        assert!(*w <= 1e-3, "{d}: {w}");
    }
}
