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
