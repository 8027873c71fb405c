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
