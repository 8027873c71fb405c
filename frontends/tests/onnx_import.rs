//! Tests of the ONNX importer.
//!
//! - Every fixture model in `../shared/fixtures` (skipped with a message when
//!   absent): `model.onnx` reproduces `logits`, `model-kv.onnx` reproduces
//!   one decoder-with-past step (`kv.logits`, `kv.present.*`) within 1e-3,
//!   and a 16-step greedy loop over `model-kv.onnx` (prefill with an empty
//!   past, then one token per step feeding `present` back as `past`)
//!   reproduces `greedy_ids` exactly. Everything runs on the reference
//!   interpreter.
//! - Hand-built models (protobuf written here with prost): a
//!   `Shape -> Gather -> Concat -> Reshape` chain folds into a symbolic
//!   reshape, and a model with several unsupported operators fails with one
//!   report that lists them all.

use prost::Message;
use smelt_frontends::onnx::proto::tensor_proto::DataType;
use smelt_frontends::onnx::proto::tensor_shape_proto::{dimension, Dimension};
use smelt_frontends::onnx::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use smelt_frontends::onnx::{self, ImportError};
use smelt_ir::{DType, Dim, Graph, Op, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Fixtures

fn fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    if p.is_dir() {
        Some(p)
    } else {
        println!("skipping: fixtures folder {} not found", p.display());
        None
    }
}

fn fixture_dirs() -> Vec<PathBuf> {
    let Some(root) = fixtures() else { return vec![] };
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("model.onnx").exists()).collect();
    v.sort();
    v
}

/// The tensors of `reference.safetensors`, as IR tensors.
fn reference(dir: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::I64 => DType::I64,
            d => panic!("{name}: unexpected dtype {d:?}"),
        };
        let t = Tensor::from_le_bytes(&name, dtype, view.shape().to_vec(), view.data()).unwrap();
        out.insert(name, t);
    }
    out
}

fn max_abs(got: &Tensor, want: &Tensor, what: &str) -> f64 {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    got.to_f64_vec().iter().zip(want.to_f64_vec()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

fn run(g: &Graph, w: &BTreeMap<String, Tensor>, inputs: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    smelt_ir::verify::verify(g).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    smelt_ir::interp::run(g, w, &inputs).unwrap_or_else(|e| panic!("{}: {e}", g.name))
}

fn i64s(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
    Tensor::from_i64(DType::I64, shape, v).unwrap()
}

#[test]
fn fixture_logits_match_reference() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = onnx::import(&dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = reference(&dir);
        let out = run(&m.graph, &m.weights, [("input_ids".to_string(), r["input_ids"].clone())].into());
        let err = max_abs(&out["logits"], &r["logits"], &name);
        println!("{name}: model.onnx logits max abs error {err:.3e}");
        assert!(err <= 1e-3, "{name}: logits differ by {err}");
    }
}

fn num_layers(r: &BTreeMap<String, Tensor>) -> usize {
    (0..).take_while(|i| r.contains_key(&format!("kv.past.{i}.key"))).count()
}

#[test]
fn fixture_kv_step_matches_reference() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = onnx::import(&dir.join("model-kv.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = reference(&dir);
        let layers = num_layers(&r);
        let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
        for k in ["input_ids", "attention_mask", "position_ids"] {
            inputs.insert(k.to_string(), r[&format!("kv.{k}")].clone());
        }
        for i in 0..layers {
            for kv in ["key", "value"] {
                inputs.insert(format!("past_key_values.{i}.{kv}"), r[&format!("kv.past.{i}.{kv}")].clone());
            }
        }
        let out = run(&m.graph, &m.weights, inputs);
        let mut worst = max_abs(&out["logits"], &r["kv.logits"], &name);
        for i in 0..layers {
            for kv in ["key", "value"] {
                let e = max_abs(&out[&format!("present.{i}.{kv}")], &r[&format!("kv.present.{i}.{kv}")], &name);
                worst = worst.max(e);
            }
        }
        println!("{name}: model-kv.onnx logits/present max abs error {worst:.3e}");
        assert!(worst <= 1e-3, "{name}: kv step differs by {worst}");
    }
}

fn argmax_last(logits: &Tensor) -> i64 {
    let v = logits.to_f32_vec();
    let vocab = *logits.shape.last().unwrap();
    let row = &v[v.len() - vocab..];
    let mut best = 0;
    for (i, x) in row.iter().enumerate() {
        if *x > row[best] {
            best = i;
        }
    }
    best as i64
}

#[test]
fn fixture_greedy_generation_matches_reference() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = onnx::import(&dir.join("model-kv.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = reference(&dir);
        let layers = num_layers(&r);
        let past0 = &r["kv.past.0.key"];
        let (kvh, hd) = (past0.shape[1], past0.shape[3]);
        let prompt = r["prompt"].to_i64_vec();
        let want = r["greedy_ids"].to_i64_vec();
        let mut ids = prompt.clone();
        let mut past: Vec<Tensor> =
            (0..2 * layers).map(|_| Tensor::from_f32(DType::F32, vec![1, kvh, 0, hd], vec![]).unwrap()).collect();
        let mut step_ids = prompt.clone();
        while ids.len() < want.len() {
            let past_len = past[0].shape[2];
            let seq = step_ids.len();
            let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
            inputs.insert("input_ids".into(), i64s(vec![1, seq], step_ids.clone()));
            inputs.insert("attention_mask".into(), i64s(vec![1, past_len + seq], vec![1; past_len + seq]));
            inputs.insert(
                "position_ids".into(),
                i64s(vec![1, seq], (past_len as i64..(past_len + seq) as i64).collect()),
            );
            for i in 0..layers {
                inputs.insert(format!("past_key_values.{i}.key"), past[2 * i].clone());
                inputs.insert(format!("past_key_values.{i}.value"), past[2 * i + 1].clone());
            }
            let mut out = run(&m.graph, &m.weights, inputs);
            let next = argmax_last(&out["logits"]);
            for i in 0..layers {
                past[2 * i] = out.remove(&format!("present.{i}.key")).unwrap();
                past[2 * i + 1] = out.remove(&format!("present.{i}.value")).unwrap();
            }
            ids.push(next);
            step_ids = vec![next];
        }
        println!("{name}: greedy ids {ids:?}");
        assert_eq!(ids, want, "{name}: greedy generation differs");
    }
}

// ---------------------------------------------------------------------------
// Hand-built models

fn dim_param(p: &str) -> Dimension {
    Dimension { value: Some(dimension::Value::DimParam(p.into())), denotation: None }
}

fn dim_value(v: i64) -> Dimension {
    Dimension { value: Some(dimension::Value::DimValue(v)), denotation: None }
}

fn value_info(name: &str, elem: DataType, dims: Vec<Dimension>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, ins: &[&str], outs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(smelt_frontends::onnx::proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn i64_init(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        data_type: Some(DataType::Int64 as i32),
        dims: vec![v.len() as i64],
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn write_model(dir: &Path, graph: GraphProto, opset: i64) -> PathBuf {
    let m = ModelProto {
        ir_version: Some(10),
        opset_import: vec![
            OperatorSetIdProto { domain: Some("".into()), version: Some(opset) },
            OperatorSetIdProto { domain: Some("com.microsoft".into()), version: Some(1) },
        ],
        graph: Some(graph),
        ..Default::default()
    };
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

/// x: [batch, seq, 64] -> Reshape(x, Concat(Shape(x)[0], Shape(x)[1], [4, 16]))
/// -> Transpose -> output. The shape subgraph must fold into a symbolic
/// reshape target and leave no Shape/Gather/Concat behind.
#[test]
fn shape_subgraph_folds_into_a_symbolic_reshape() {
    let dir = tempfile::tempdir().unwrap();
    let graph = GraphProto {
        name: Some("fold".into()),
        node: vec![
            node("Shape", "shape", &["x"], &["s"], vec![]),
            node("Gather", "g0", &["s", "zero"], &["b"], vec![int_attr("axis", 0)]),
            node("Gather", "g1", &["s", "one"], &["t"], vec![]),
            node("Unsqueeze", "u0", &["b", "ax0"], &["b1"], vec![]),
            node("Unsqueeze", "u1", &["t", "ax0"], &["t1"], vec![]),
            node("Concat", "cat", &["b1", "t1", "heads"], &["target"], vec![int_attr("axis", 0)]),
            node("Reshape", "reshape", &["x", "target"], &["r"], vec![]),
            node("Transpose", "tr", &["r"], &["y"], vec![]),
        ],
        initializer: vec![
            TensorProto {
                name: Some("zero".into()),
                data_type: Some(DataType::Int64 as i32),
                dims: vec![],
                int64_data: vec![0],
                ..Default::default()
            },
            TensorProto {
                name: Some("one".into()),
                data_type: Some(DataType::Int64 as i32),
                dims: vec![],
                int64_data: vec![1],
                ..Default::default()
            },
            i64_init("ax0", &[0]),
            i64_init("heads", &[4, 16]),
        ],
        input: vec![value_info("x", DataType::Float, vec![dim_param("batch"), dim_param("seq"), dim_value(64)])],
        output: vec![value_info("y", DataType::Float, vec![])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let m = onnx::import(&path).unwrap();
    let g = &m.graph;
    let kinds: Vec<&str> = g.topo_order().unwrap().into_iter().map(|n| g.node(n).op.name()).collect();
    assert_eq!(kinds, vec!["input", "reshape", "transpose"], "{}", smelt_ir::text::print(g));
    let reshape = g
        .node_ids()
        .into_iter()
        .find_map(|n| match &g.node(n).op {
            Op::Reshape { shape } => Some(shape.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(reshape, vec![Dim::sym("batch"), Dim::sym("seq"), Dim::c(4), Dim::c(16)]);
    let (_, y) = &g.outputs()[0];
    assert_eq!(g.ty(*y).to_string(), "f32[16, 4, seq, batch]");
    assert!(g.symbols().contains_key("batch") && g.symbols().contains_key("seq"));

    // And it computes what ONNX says for a concrete shape.
    let x = Tensor::from_f32(DType::F32, vec![2, 3, 64], (0..384).map(|i| i as f32).collect()).unwrap();
    let out = smelt_ir::interp::run(g, &m.weights, &[("x".to_string(), x)].into()).unwrap();
    let y = &out["y"];
    assert_eq!(y.shape, vec![16, 4, 3, 2]);
    // y[j, h, s, b] = x[b, s, h*16 + j]
    let v = y.to_f32_vec();
    let at = |j: usize, h: usize, s: usize, b: usize| v[((j * 4 + h) * 3 + s) * 2 + b];
    assert_eq!(at(5, 2, 1, 1), (64 * 3 + 64 + 2 * 16 + 5) as f32);
}

/// Unsupported operators are all reported at once, with counts and the
/// first node names, and the import fails with that report.
#[test]
fn unsupported_operators_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes =
        vec![node("Relu", "ok", &["x"], &["a"], vec![]), node("NonZero", "/mask/nonzero", &["a"], &["nz"], vec![])];
    for i in 0..4 {
        let (i_in, i_out) = (if i == 0 { "a".to_string() } else { format!("q{}", i - 1) }, format!("q{i}"));
        let mut n = node("QuickGeluX", &format!("/mlp/act{i}"), &[&i_in], &[&i_out], vec![]);
        n.domain = Some("com.microsoft".into());
        nodes.push(n);
    }
    nodes.push(node("Loop", "/generate/loop", &["q3"], &["y"], vec![]));
    let graph = GraphProto {
        name: Some("unsupported".into()),
        node: nodes,
        input: vec![value_info("x", DataType::Float, vec![dim_value(4)])],
        output: vec![value_info("y", DataType::Float, vec![dim_value(4)])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let report = onnx::check(&path).unwrap();
    assert_eq!(report.unsupported.len(), 3, "{report}");
    let text = report.to_string();
    println!("{text}");
    assert!(text.contains("3 unsupported operators (nothing was compiled)"), "{text}");
    assert!(text.contains("ai.onnx:NonZero (opset 17)"), "{text}");
    assert!(text.contains("com.microsoft:QuickGeluX (opset 1)  x4"), "{text}");
    assert!(text.contains("first at nodes /mlp/act0, /mlp/act1, /mlp/act2"), "{text}");
    assert!(text.contains("ai.onnx:Loop (opset 17)"), "{text}");
    match onnx::import(&path) {
        Err(ImportError::Unsupported(r)) => assert_eq!(*r, report),
        other => panic!("expected the coverage report, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Contrib operators against their standard spellings
//
// Each test builds the same computation twice, once with ONNX Runtime's
// `com.microsoft` operator and once with standard operators (opset 23),
// imports both, runs both on the same random inputs and compares. The
// contrib import must also have used the fused IR op.

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(smelt_frontends::onnx::proto::attribute_proto::AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn f32_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    value_info(name, DataType::Float, dims.iter().map(|&d| dim_value(d)).collect())
}

fn ms(mut n: NodeProto) -> NodeProto {
    n.domain = Some("com.microsoft".into());
    n
}

/// A deterministic pseudo-random tensor in [-1, 1).
fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_f32(DType::F32, shape.to_vec(), v).unwrap()
}

fn model_graph(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: &[&str],
) -> GraphProto {
    GraphProto {
        name: Some("g".into()),
        node: nodes,
        initializer: inits,
        input: inputs,
        output: outputs.iter().map(|o| value_info(o, DataType::Float, vec![])).collect(),
        ..Default::default()
    }
}

/// Imports and runs a graph; returns the outputs and the op names it used.
fn import_run(graph: GraphProto, inputs: &BTreeMap<String, Tensor>) -> (BTreeMap<String, Tensor>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), graph, 23);
    let m = onnx::import(&path).unwrap_or_else(|e| panic!("{e}"));
    let ops = m.graph.node_ids().into_iter().map(|n| m.graph.node(n).op.name().to_string()).collect();
    (run(&m.graph, &m.weights, inputs.clone()), ops)
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let e = max_abs(a, b, what);
    assert!(e <= 1e-5, "{what}: differs by {e}");
}

#[test]
fn skip_simplified_layer_norm_is_add_rms_norm() {
    let inputs: BTreeMap<String, Tensor> = [
        ("x".to_string(), random(&[2, 3, 8], 1)),
        ("skip".to_string(), random(&[2, 3, 8], 2)),
        ("gamma".to_string(), random(&[8], 3)),
    ]
    .into();
    let infos = vec![f32_info("x", &[2, 3, 8]), f32_info("skip", &[2, 3, 8]), f32_info("gamma", &[8])];
    let contrib = model_graph(
        vec![ms(node(
            "SkipSimplifiedLayerNormalization",
            "n",
            &["x", "skip", "gamma"],
            &["y", "", "", "sum"],
            vec![float_attr("epsilon", 1e-6)],
        ))],
        vec![],
        infos.clone(),
        &["y", "sum"],
    );
    let standard = model_graph(
        vec![
            node("Add", "a", &["x", "skip"], &["sum"], vec![]),
            node("RMSNormalization", "r", &["sum", "gamma"], &["y"], vec![float_attr("epsilon", 1e-6)]),
        ],
        vec![],
        infos,
        &["y", "sum"],
    );
    let (a, ops) = import_run(contrib, &inputs);
    let (b, _) = import_run(standard, &inputs);
    assert!(ops.iter().any(|o| o == "add_rms_norm"), "{ops:?}");
    assert_close(&a["y"], &b["y"], "y");
    assert_close(&a["sum"], &b["sum"], "sum");
}

#[test]
fn contrib_rotary_embedding_matches_the_standard_op() {
    for interleaved in [0, 1] {
        let (b, s, h, d, max) = (2usize, 3usize, 2usize, 8usize, 10usize);
        let pos = i64s(vec![b, s], vec![0, 1, 2, 4, 5, 6]);
        let inputs: BTreeMap<String, Tensor> = [
            ("x".to_string(), random(&[b, s, h * d], 4)),
            ("pos".to_string(), pos),
            ("cos".to_string(), random(&[max, d / 2], 5)),
            ("sin".to_string(), random(&[max, d / 2], 6)),
        ]
        .into();
        let mut infos = vec![f32_info("x", &[2, 3, 16]), f32_info("cos", &[10, 4]), f32_info("sin", &[10, 4])];
        infos.push(value_info("pos", DataType::Int64, vec![dim_value(2), dim_value(3)]));
        let attrs = || vec![int_attr("interleaved", interleaved), int_attr("num_heads", h as i64)];
        let contrib = model_graph(
            vec![ms(node("RotaryEmbedding", "r", &["x", "pos", "cos", "sin"], &["y"], attrs()))],
            vec![],
            infos.clone(),
            &["y"],
        );
        let standard = model_graph(
            vec![node("RotaryEmbedding", "r", &["x", "cos", "sin", "pos"], &["y"], attrs())],
            vec![],
            infos,
            &["y"],
        );
        let (a, ops) = import_run(contrib, &inputs);
        let (bb, _) = import_run(standard, &inputs);
        assert!(ops.iter().any(|o| o == "rope"), "{ops:?}");
        assert_close(&a["y"], &bb["y"], &format!("interleaved={interleaved}"));
    }
}

/// GroupQueryAttention with a cache against `Attention` (3-D, causal, past).
#[test]
fn group_query_attention_matches_standard_attention() {
    let (b, s, past, nh, kvh, d) = (2usize, 3usize, 4usize, 4usize, 2usize, 8usize);
    let inputs: BTreeMap<String, Tensor> = [
        ("q".to_string(), random(&[b, s, nh * d], 7)),
        ("k".to_string(), random(&[b, s, kvh * d], 8)),
        ("v".to_string(), random(&[b, s, kvh * d], 9)),
        ("pk".to_string(), random(&[b, kvh, past, d], 10)),
        ("pv".to_string(), random(&[b, kvh, past, d], 11)),
    ]
    .into();
    let infos = vec![
        f32_info("q", &[2, 3, 32]),
        f32_info("k", &[2, 3, 16]),
        f32_info("v", &[2, 3, 16]),
        f32_info("pk", &[2, 2, 4, 8]),
        f32_info("pv", &[2, 2, 4, 8]),
    ];
    let seqlens = TensorProto {
        name: Some("seqlens".into()),
        data_type: Some(DataType::Int32 as i32),
        dims: vec![2],
        int32_data: vec![(past + s - 1) as i32; 2],
        ..Default::default()
    };
    let total = TensorProto {
        name: Some("total".into()),
        data_type: Some(DataType::Int32 as i32),
        dims: vec![],
        int32_data: vec![(past + s) as i32],
        ..Default::default()
    };
    let contrib = model_graph(
        vec![ms(node(
            "GroupQueryAttention",
            "gqa",
            &["q", "k", "v", "pk", "pv", "seqlens", "total"],
            &["y", "present_k", "present_v"],
            vec![int_attr("num_heads", nh as i64), int_attr("kv_num_heads", kvh as i64)],
        ))],
        vec![seqlens, total],
        infos.clone(),
        &["y", "present_k", "present_v"],
    );
    let standard = model_graph(
        vec![node(
            "Attention",
            "att",
            &["q", "k", "v", "", "pk", "pv"],
            &["y", "present_k", "present_v"],
            vec![int_attr("is_causal", 1), int_attr("q_num_heads", nh as i64), int_attr("kv_num_heads", kvh as i64)],
        )],
        vec![],
        infos,
        &["y", "present_k", "present_v"],
    );
    let (a, ops) = import_run(contrib, &inputs);
    let (bb, _) = import_run(standard, &inputs);
    assert!(ops.iter().any(|o| o == "attention"), "{ops:?}");
    for o in ["y", "present_k", "present_v"] {
        assert_close(&a[o], &bb[o], o);
    }
}

/// MultiHeadAttention (unidirectional, with a cache) against `Attention`.
#[test]
fn multi_head_attention_matches_standard_attention() {
    let (b, s, past, nh, d) = (1usize, 2usize, 3usize, 2usize, 4usize);
    let inputs: BTreeMap<String, Tensor> = [
        ("q".to_string(), random(&[b, s, nh * d], 12)),
        ("k".to_string(), random(&[b, s, nh * d], 13)),
        ("v".to_string(), random(&[b, s, nh * d], 14)),
        ("pk".to_string(), random(&[b, nh, past, d], 15)),
        ("pv".to_string(), random(&[b, nh, past, d], 16)),
    ]
    .into();
    let infos = vec![
        f32_info("q", &[1, 2, 8]),
        f32_info("k", &[1, 2, 8]),
        f32_info("v", &[1, 2, 8]),
        f32_info("pk", &[1, 2, 3, 4]),
        f32_info("pv", &[1, 2, 3, 4]),
    ];
    let contrib = model_graph(
        vec![ms(node(
            "MultiHeadAttention",
            "mha",
            &["q", "k", "v", "", "", "", "pk", "pv"],
            &["y", "present_k", "present_v"],
            vec![int_attr("num_heads", nh as i64), int_attr("unidirectional", 1)],
        ))],
        vec![],
        infos.clone(),
        &["y", "present_k", "present_v"],
    );
    let standard = model_graph(
        vec![node(
            "Attention",
            "att",
            &["q", "k", "v", "", "pk", "pv"],
            &["y", "present_k", "present_v"],
            vec![int_attr("is_causal", 1), int_attr("q_num_heads", nh as i64), int_attr("kv_num_heads", nh as i64)],
        )],
        vec![],
        infos,
        &["y", "present_k", "present_v"],
    );
    let (a, ops) = import_run(contrib, &inputs);
    let (bb, _) = import_run(standard, &inputs);
    assert!(ops.iter().any(|o| o == "attention"), "{ops:?}");
    for o in ["y", "present_k", "present_v"] {
        assert_close(&a[o], &bb[o], o);
    }
}

#[test]
fn simplified_layer_norm_is_rms_norm() {
    let inputs: BTreeMap<String, Tensor> =
        [("x".to_string(), random(&[3, 8], 17)), ("w".to_string(), random(&[8], 18))].into();
    let infos = vec![f32_info("x", &[3, 8]), f32_info("w", &[8])];
    let ort = model_graph(
        vec![node("SimplifiedLayerNormalization", "n", &["x", "w"], &["y"], vec![float_attr("epsilon", 1e-5)])],
        vec![],
        infos.clone(),
        &["y"],
    );
    let standard = model_graph(vec![node("RMSNormalization", "n", &["x", "w"], &["y"], vec![])], vec![], infos, &["y"]);
    let (a, ops) = import_run(ort, &inputs);
    let (b, _) = import_run(standard, &inputs);
    assert!(ops.iter().any(|o| o == "rms_norm"), "{ops:?}");
    assert_close(&a["y"], &b["y"], "y");
}

// ---------------------------------------------------------------------------
// Symbols and bad graphs

/// An attention mask declared with its own `total` dim, added to scores of
/// length `past + seq`: the importer unifies `total` with `past + seq`.
#[test]
fn independently_declared_dims_are_unified() {
    let dir = tempfile::tempdir().unwrap();
    let graph = GraphProto {
        name: Some("unify".into()),
        node: vec![
            node("Concat", "cat", &["past", "new"], &["kv"], vec![int_attr("axis", 1)]),
            node("Add", "add", &["kv", "mask"], &["y"], vec![]),
        ],
        input: vec![
            value_info("past", DataType::Float, vec![dim_param("batch"), dim_param("past"), dim_value(4)]),
            value_info("new", DataType::Float, vec![dim_param("batch"), dim_param("seq"), dim_value(4)]),
            value_info("mask", DataType::Float, vec![dim_param("batch"), dim_param("total"), dim_value(1)]),
        ],
        output: vec![value_info("y", DataType::Float, vec![])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let m = onnx::import(&path).unwrap();
    let inputs: Vec<String> = m.graph.inputs().iter().map(|(n, v)| format!("{n}: {}", m.graph.ty(*v))).collect();
    assert_eq!(inputs[2], "mask: f32[batch, past + seq, 1]");
    assert!(!m.graph.symbols().contains_key("total"));
    let out = run(
        &m.graph,
        &m.weights,
        [
            ("past".to_string(), random(&[1, 2, 4], 1)),
            ("new".to_string(), random(&[1, 1, 4], 2)),
            ("mask".to_string(), random(&[1, 3, 1], 3)),
        ]
        .into(),
    );
    assert_eq!(out["y"].shape, vec![1, 3, 4]);
}

#[test]
fn cycles_and_undefined_names_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let graph = GraphProto {
        name: Some("cycle".into()),
        node: vec![node("Relu", "a", &["x", "c"], &["b"], vec![]), node("Relu", "b", &["b"], &["c"], vec![])],
        input: vec![f32_info("x", &[2])],
        output: vec![f32_info("c", &[2])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let e = onnx::import(&path).unwrap_err().to_string();
    assert!(e.contains("cycle"), "{e}");

    let graph = GraphProto {
        name: Some("undefined".into()),
        node: vec![node("Relu", "r", &["nope"], &["y"], vec![])],
        input: vec![f32_info("x", &[2])],
        output: vec![f32_info("y", &[2])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let e = onnx::import(&path).unwrap_err().to_string();
    assert!(e.contains("`nope` is not defined"), "{e}");

    // Absurd sizes are refused, not multiplied until they overflow.
    let graph = GraphProto {
        name: Some("huge".into()),
        node: vec![node("Expand", "e", &["x", "shape"], &["y"], vec![])],
        initializer: vec![i64_init("shape", &[1 << 40, 1 << 40, 1 << 40])],
        input: vec![f32_info("x", &[1])],
        output: vec![f32_info("y", &[])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let e = onnx::import(&path).unwrap_err().to_string();
    assert!(e.contains("more than"), "{e}");

    std::fs::write(dir.path().join("model.onnx"), b"\x08\x07garbage").unwrap();
    assert!(onnx::import(&dir.path().join("model.onnx")).is_err());
}

/// A reshape whose target comes from runtime data names the problem.
#[test]
fn data_dependent_shapes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let graph = GraphProto {
        name: Some("dyn".into()),
        node: vec![node("Reshape", "reshape", &["x", "shape"], &["y"], vec![])],
        input: vec![f32_info("x", &[2, 3]), value_info("shape", DataType::Int64, vec![dim_value(2)])],
        output: vec![f32_info("y", &[3, 2])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 17);
    let e = onnx::import(&path).unwrap_err();
    assert!(e.needs_constant_inputs(), "{e}");
    assert!(e.to_string().contains("the target shape must be known at import time"), "{e}");
    let opts = onnx::ImportOptions {
        constant_inputs: [("shape".to_string(), i64s(vec![2], vec![3, 2]))].into(),
        ..Default::default()
    };
    let m = onnx::import_with(&path, &opts).unwrap();
    assert_eq!(m.graph.inputs().len(), 1);
}

/// An operator set newer than smelt implements is named in the report.
#[test]
fn newer_opsets_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let graph = GraphProto {
        name: Some("new".into()),
        node: vec![node("Relu", "r", &["x"], &["y"], vec![])],
        input: vec![f32_info("x", &[2])],
        output: vec![f32_info("y", &[2])],
        ..Default::default()
    };
    let path = write_model(dir.path(), graph, 99);
    let report = onnx::check(&path).unwrap();
    assert!(!report.is_supported());
    let text = report.to_string();
    assert!(text.contains("ai.onnx opset 99 is newer than the newest smelt implements"), "{text}");
    assert!(matches!(onnx::import(&path), Err(ImportError::Unsupported(_))));
}
