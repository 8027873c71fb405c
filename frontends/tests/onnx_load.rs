//! Tests of the ONNX file-reading layer: the shared fixture models, the ONNX
//! conformance `.pb` files, external data (round trip, unaligned offsets, path
//! escapes), typed-field decoding, attributes, value types, and bad input that
//! must fail with an error rather than a panic.
//!
//! Tests that need `../shared` (fixtures, conformance cases) print a message
//! and pass when it is absent; set `SMELT_SHARED` to point elsewhere.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;
use smelt_frontends::onnx::proto::attribute_proto::AttributeType;
use smelt_frontends::onnx::proto::tensor_proto::{DataLocation, DataType};
use smelt_frontends::onnx::proto::tensor_shape_proto::{dimension, Dimension};
use smelt_frontends::onnx::proto::type_proto;
use smelt_frontends::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use smelt_frontends::onnx::{read_tensor_pb, OnnxDim, OnnxError, OnnxModel, OnnxTensor};
use smelt_ir::DType;

// ---------------------------------------------------------------------------
// Helpers

fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("SMELT_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    };
    if dir.is_dir() {
        Some(dir)
    } else {
        println!("skipped: shared folder {} is absent", dir.display());
        None
    }
}

fn model_bytes(graph: GraphProto) -> Vec<u8> {
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto { domain: Some("".into()), version: Some(17) }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn write_model(dir: &Path, graph: GraphProto) -> PathBuf {
    let path = dir.join("model.onnx");
    std::fs::write(&path, model_bytes(graph)).unwrap();
    path
}

fn tensor(name: &str, dtype: DataType, dims: &[i64]) -> TensorProto {
    TensorProto { name: Some(name.into()), data_type: Some(dtype as i32), dims: dims.to_vec(), ..Default::default() }
}

fn external(mut t: TensorProto, entries: &[(&str, &str)]) -> TensorProto {
    t.data_location = Some(DataLocation::External as i32);
    t.external_data = entries
        .iter()
        .map(|(k, v)| StringStringEntryProto { key: Some(k.to_string()), value: Some(v.to_string()) })
        .collect();
    t
}

fn graph_with(initializers: Vec<TensorProto>) -> GraphProto {
    GraphProto { name: Some("g".into()), initializer: initializers, ..Default::default() }
}

fn f32_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes a tensor through a throwaway model (no external data needed).
fn decode(t: TensorProto) -> Result<OnnxTensor, OnnxError> {
    let bytes = Bytes::from(model_bytes(graph_with(vec![])));
    let model = OnnxModel::from_bytes(bytes, "mem/model.onnx").unwrap();
    model.tensor(&t)
}

// Initialisers may be decoded from several threads at once.
#[test]
fn model_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<OnnxModel>();
    assert_send_sync::<OnnxTensor>();
    assert_send_sync::<OnnxError>();
}

// ---------------------------------------------------------------------------
// Fixtures

#[test]
fn fixture_models_open() {
    let Some(shared) = shared_dir() else { return };
    let mut opened = 0;
    for entry in std::fs::read_dir(shared.join("fixtures")).unwrap() {
        let dir = entry.unwrap().path();
        for (file, kv) in [("model.onnx", false), ("model-kv.onnx", true)] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let model = OnnxModel::open(&path).unwrap_or_else(|e| panic!("{e}"));
            opened += 1;
            let opset = model.opset_version("").expect("default opset imported");
            assert!(opset >= 13, "{}: opset {opset}", path.display());
            assert_eq!(model.opset_version("ai.onnx"), Some(opset));
            assert!(model.ir_version() >= 7, "{}", path.display());

            let inputs: Vec<&str> = model.graph_inputs().iter().map(|v| v.name()).collect();
            assert_eq!(inputs.first(), Some(&"input_ids"), "{}: {inputs:?}", path.display());
            if kv {
                for want in ["attention_mask", "position_ids", "past_key_values.0.key"] {
                    assert!(inputs.contains(&want), "{}: {inputs:?} lacks {want}", path.display());
                }
            }
            let ids = model.value_type(model.graph_inputs()[0]).unwrap();
            assert_eq!(ids.dtype, DType::I64);
            let shape = ids.shape.expect("input_ids has a shape");
            assert_eq!(shape.len(), 2);
            assert!(
                shape.iter().all(|d| matches!(d, OnnxDim::Param(_))),
                "{}: input_ids dims {shape:?}",
                path.display()
            );
            for out in &model.graph().output {
                model.value_type(out).unwrap();
            }

            let init_count = model.graph().initializer.len();
            assert!(init_count > 0, "{}", path.display());
            let mut total = 0usize;
            let mut largest: Option<OnnxTensor> = None;
            for t in model.initializers() {
                let t = t.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(t.bytes().len(), t.numel() * t.dtype.size_bytes(), "{}", t.name);
                total += t.bytes().len();
                if largest.as_ref().is_none_or(|l| l.bytes().len() < t.bytes().len()) {
                    largest = Some(t);
                }
            }
            let largest = largest.unwrap();
            // The weights are inline raw_data: they must be borrowed from the map.
            assert!(largest.data.is_borrowed(), "{} copied", largest.name);
            let name = largest.name.clone();
            assert_eq!(model.initializer(&name).unwrap().unwrap(), largest);
            println!(
                "{}: ir {} opset {opset}, {} nodes, {init_count} initializers, {total} bytes, inputs {inputs:?}",
                path.display(),
                model.ir_version(),
                model.graph().node.len()
            );
            // Reading every node's attributes of the kinds used must not fail on
            // a real exporter's output.
            for node in &model.graph().node {
                let attrs = model.attrs(node);
                if node.op_type() == "Constant" {
                    if let Some(v) = attrs.tensor("value").unwrap() {
                        model.tensor(v).unwrap();
                    }
                }
            }
        }
    }
    assert!(opened > 0, "no fixture model found");
}

// ---------------------------------------------------------------------------
// Conformance .pb files

fn case(shared: &Path, name: &str, file: &str) -> OnnxTensor {
    let p = shared.join("conformance/onnx-node").join(name).join("test_data_set_0").join(file);
    read_tensor_pb(&p).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn conformance_pb_dtypes() {
    let Some(shared) = shared_dir() else { return };

    // f32 -> f16: numpy and `half` both round to nearest even.
    let x = case(&shared, "test_cast_FLOAT_to_FLOAT16", "input_0.pb");
    let y = case(&shared, "test_cast_FLOAT_to_FLOAT16", "output_0.pb");
    assert_eq!((x.dtype, y.dtype), (DType::F32, DType::F16));
    assert_eq!(x.dims, y.dims);
    let xs = x.to_vec::<f32>().unwrap();
    let ys = y.to_vec::<half::f16>().unwrap();
    for (a, b) in xs.iter().zip(&ys) {
        let want = half::f16::from_f32(*a);
        assert!(want == *b || (want.is_nan() && b.is_nan()), "{a} -> {b}, want {want}");
    }

    // bf16 -> f32 is exact.
    let x = case(&shared, "test_cast_BFLOAT16_to_FLOAT", "input_0.pb");
    let y = case(&shared, "test_cast_BFLOAT16_to_FLOAT", "output_0.pb");
    assert_eq!((x.dtype, y.dtype), (DType::BF16, DType::F32));
    for (a, b) in x.to_f32_vec().iter().zip(y.to_vec::<f32>().unwrap()) {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{a} vs {b}");
    }

    // f32 -> f64 is exact.
    let x = case(&shared, "test_cast_FLOAT_to_DOUBLE", "input_0.pb");
    let y = case(&shared, "test_cast_FLOAT_to_DOUBLE", "output_0.pb");
    assert_eq!(y.dtype, DType::F64);
    for (a, b) in x.to_vec::<f32>().unwrap().iter().zip(y.to_vec::<f64>().unwrap()) {
        assert!(f64::from(*a) == b || (a.is_nan() && b.is_nan()), "{a} vs {b}");
    }

    // bool: and.
    let a = case(&shared, "test_and2d", "input_0.pb");
    let b = case(&shared, "test_and2d", "input_1.pb");
    let y = case(&shared, "test_and2d", "output_0.pb");
    assert_eq!(a.dtype, DType::Bool);
    let (a, b, y) = (a.to_vec::<bool>().unwrap(), b.to_vec::<bool>().unwrap(), y.to_vec::<bool>().unwrap());
    assert!(a.iter().zip(&b).zip(&y).all(|((a, b), y)| (*a && *b) == *y));

    // int8 and uint8: wrapping add, as numpy does.
    for (name, dtype) in [("test_add_int8", DType::I8), ("test_add_uint8", DType::U8)] {
        let a = case(&shared, name, "input_0.pb");
        let b = case(&shared, name, "input_1.pb");
        let y = case(&shared, name, "output_0.pb");
        assert_eq!(a.dtype, dtype);
        let (a, b, y) = (a.to_i64_vec().unwrap(), b.to_i64_vec().unwrap(), y.to_i64_vec().unwrap());
        for ((a, b), y) in a.iter().zip(&b).zip(&y) {
            let sum = if dtype == DType::I8 {
                i64::from((*a as i8).wrapping_add(*b as i8))
            } else {
                i64::from((*a as u8).wrapping_add(*b as u8))
            };
            assert_eq!(sum, *y);
        }
    }

    // int64 indices.
    let idx = case(&shared, "test_gather_0", "input_1.pb");
    assert_eq!(idx.dtype, DType::I64);
    assert!(idx.to_vec::<i64>().is_some());

    // An unsupported element type is named.
    let p = shared.join("conformance/onnx-node/test_add_uint32/test_data_set_0/input_0.pb");
    match read_tensor_pb(&p) {
        Err(OnnxError::UnsupportedDType { onnx_type_name, .. }) => assert_eq!(onnx_type_name, "UINT32"),
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
}

/// Every model and `.pb` file of the conformance suite is read without a
/// panic; supported dtypes decode, the rest fail with a typed error.
#[test]
fn conformance_all_files_no_panic() {
    let Some(shared) = shared_dir() else { return };
    let root = shared.join("conformance/onnx-node");
    let (mut models, mut ok, mut unsupported, mut other) = (0, 0, 0, Vec::new());
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let model = OnnxModel::open(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{e}"));
        models += 1;
        for node in &model.graph().node {
            for a in &node.attribute {
                if a.r#type() == AttributeType::Tensor {
                    let _ = model.tensor(model.attrs(node).require_tensor(a.name()).unwrap());
                }
            }
        }
        for init in model.initializers() {
            let _ = init;
        }
        for set in std::fs::read_dir(&dir).unwrap() {
            let set = set.unwrap().path();
            if !set.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&set).unwrap() {
                let f = f.unwrap().path();
                match read_tensor_pb(&f) {
                    Ok(t) => {
                        assert_eq!(t.bytes().len(), t.numel() * t.dtype.size_bytes());
                        ok += 1;
                    }
                    Err(OnnxError::UnsupportedDType { .. }) => unsupported += 1,
                    // Sequence and optional cases store other messages in .pb files.
                    Err(e) => other.push(e.to_string()),
                }
            }
        }
    }
    println!("{models} models; .pb files: {ok} decoded, {unsupported} unsupported dtype, {} other errors", other.len());
    for e in other.iter().take(5) {
        println!("  e.g. {e}");
    }
    assert!(models > 1000);
    // Keep `Result<_, OnnxError>` small (clippy's result_large_err threshold).
    assert!(std::mem::size_of::<OnnxError>() <= 120, "{}", std::mem::size_of::<OnnxError>());
    assert!(ok > 4000);
}

// ---------------------------------------------------------------------------
// External data

#[test]
fn external_data_round_trip_unaligned() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let idx: Vec<i64> = vec![7, -3, 1 << 40];
    // 13 bytes of junk first, so no tensor starts at an aligned offset.
    let mut file = vec![0xAAu8; 13];
    file.extend(f32_le(&w));
    let idx_offset = file.len();
    file.extend(idx.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/weights.bin"), &file).unwrap();

    let inits = vec![
        external(
            tensor("w", DataType::Float, &[2, 3]),
            &[("location", "data/weights.bin"), ("offset", "13"), ("length", "24")],
        ),
        // No `length`: the tensor runs to the end of the file.
        external(
            tensor("idx", DataType::Int64, &[3]),
            &[("location", "./data/weights.bin"), ("offset", &idx_offset.to_string())],
        ),
    ];
    let path = write_model(dir.path(), graph_with(inits));
    let model = OnnxModel::open(&path).unwrap();
    let t = model.initializer("w").unwrap().unwrap();
    assert_eq!((t.dtype, t.dims.clone()), (DType::F32, vec![2, 3]));
    assert!(t.data.is_borrowed());
    assert_eq!(t.to_vec::<f32>().unwrap(), w);
    let t = model.initializer("idx").unwrap().unwrap();
    assert_eq!(t.to_vec::<i64>().unwrap(), idx);
    assert!(model.initializer("nope").is_none());
}

#[test]
fn external_data_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    std::fs::write(dir.path().join("secret.bin"), [0u8; 64]).unwrap();
    std::fs::write(model_dir.join("w.bin"), [0u8; 16]).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path().join("secret.bin"), model_dir.join("link.bin")).unwrap();

    let ext = |loc: &str, extra: &[(&str, &str)]| {
        let mut e = vec![("location", loc)];
        e.extend_from_slice(extra);
        external(tensor("w", DataType::Float, &[4]), &e)
    };
    let secret = dir.path().join("secret.bin");
    let cases: Vec<(TensorProto, &str)> = vec![
        (ext("../secret.bin", &[]), "escape"),
        (ext("sub/../../secret.bin", &[]), "escape"),
        (ext(secret.to_str().unwrap(), &[]), "escape"),
        #[cfg(unix)]
        (ext("link.bin", &[]), "escape"),
        (ext("", &[]), "escape"),
        (ext("missing.bin", &[]), "data"),
        (ext("w.bin", &[("offset", "17")]), "data"),
        (ext("w.bin", &[("offset", "8"), ("length", "16")]), "data"),
        (ext("w.bin", &[("offset", "-1")]), "data"),
        (ext("w.bin", &[("length", "18446744073709551615"), ("offset", "1")]), "data"),
        (ext("w.bin", &[("offset", "4")]), "size"),
        (external(tensor("w", DataType::Float, &[4]), &[("offset", "0")]), "invalid"),
    ];
    for (t, want) in cases {
        let path = write_model(&model_dir, graph_with(vec![t.clone()]));
        let model = OnnxModel::open(&path).unwrap();
        let err = model.initializer("w").unwrap().unwrap_err();
        let msg = err.to_string();
        println!("{msg}");
        assert!(msg.contains("model.onnx") && msg.contains("`w`"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let matched = match want {
            "escape" => matches!(err, OnnxError::ExternalPath { .. }),
            "data" => matches!(err, OnnxError::ExternalData { .. }),
            "size" => matches!(err, OnnxError::DataSize { expected: 16, found: 12, .. }),
            _ => matches!(err, OnnxError::InvalidTensor { .. }),
        };
        assert!(matched, "{:?}: expected {want}, got {msg}", t.external_data);
    }
    // A good location after all those refusals still works.
    let path = write_model(&model_dir, graph_with(vec![ext("w.bin", &[])]));
    let model = OnnxModel::open(&path).unwrap();
    assert_eq!(model.initializer("w").unwrap().unwrap().to_vec::<f32>().unwrap(), vec![0.0; 4]);
}

// ---------------------------------------------------------------------------
// Typed fields and sizes

#[test]
fn typed_fields_decode() {
    let mut t = tensor("f", DataType::Float, &[3]);
    t.float_data = vec![1.0, -2.5, 3.25];
    let d = decode(t).unwrap();
    assert!(!d.data.is_borrowed());
    assert_eq!(d.to_vec::<f32>().unwrap(), vec![1.0, -2.5, 3.25]);

    let mut t = tensor("i", DataType::Int64, &[2, 1]);
    t.int64_data = vec![i64::MIN, 42];
    let d = decode(t).unwrap();
    assert_eq!(d.dims, vec![2, 1]);
    assert_eq!(d.to_vec::<i64>().unwrap(), vec![i64::MIN, 42]);

    let vals = [1.5f32, -0.0, 65504.0, f32::INFINITY];
    let mut t = tensor("h", DataType::Float16, &[4]);
    t.int32_data = vals.iter().map(|v| i32::from(half::f16::from_f32(*v).to_bits())).collect();
    let d = decode(t).unwrap();
    assert_eq!(d.dtype, DType::F16);
    assert_eq!(d.to_f32_vec(), vals.to_vec());
    assert_eq!(d.bytes().len(), 8);

    let mut t = tensor("b", DataType::Bfloat16, &[2]);
    t.int32_data = vec![i32::from(half::bf16::from_f32(3.0).to_bits()), 0xBF80];
    assert_eq!(decode(t).unwrap().to_f32_vec(), vec![3.0, -1.0]);

    let mut t = tensor("i8", DataType::Int8, &[3]);
    t.int32_data = vec![-128, 127, -1];
    assert_eq!(decode(t).unwrap().to_vec::<i8>().unwrap(), vec![-128, 127, -1]);

    let mut t = tensor("u8", DataType::Uint8, &[2]);
    t.int32_data = vec![255, 0];
    assert_eq!(decode(t).unwrap().to_vec::<u8>().unwrap(), vec![255, 0]);

    let mut t = tensor("bool", DataType::Bool, &[3]);
    t.int32_data = vec![1, 0, 1];
    assert_eq!(decode(t).unwrap().to_vec::<bool>().unwrap(), vec![true, false, true]);

    let mut t = tensor("i32", DataType::Int32, &[]);
    t.int32_data = vec![-7];
    let d = decode(t).unwrap();
    assert_eq!((d.dims.len(), d.numel()), (0, 1));
    assert_eq!(d.to_vec::<i32>().unwrap(), vec![-7]);
    assert_eq!(d.to_vec::<i64>(), None);

    let mut t = tensor("d", DataType::Double, &[2]);
    t.double_data = vec![0.1, 1e300];
    assert_eq!(decode(t).unwrap().to_vec::<f64>().unwrap(), vec![0.1, 1e300]);

    // Empty tensors need no data at all.
    let d = decode(tensor("empty", DataType::Float, &[0, 5])).unwrap();
    assert_eq!((d.numel(), d.bytes().len()), (0, 0));

    // raw_data is borrowed even from an in-memory model.
    let mut t = tensor("raw", DataType::Float, &[2]);
    t.raw_data = Some(Bytes::from(f32_le(&[4.0, 5.0])));
    let d = decode(t).unwrap();
    assert!(d.data.is_borrowed());
    assert_eq!(d.to_vec::<f32>().unwrap(), vec![4.0, 5.0]);
}

#[test]
fn bad_tensors_are_errors() {
    // raw_data shorter than the dims say.
    let mut t = tensor("short", DataType::Float, &[2, 3]);
    t.raw_data = Some(Bytes::from(vec![0u8; 20]));
    let e = decode(t).unwrap_err();
    assert!(matches!(e, OnnxError::DataSize { expected: 24, found: 20, .. }), "{e}");
    assert!(e.to_string().contains("`short`"), "{e}");
    println!("{e}");

    // Typed field with the wrong count, and a huge lying shape: no allocation.
    let mut t = tensor("huge", DataType::Float, &[1 << 40, 1 << 20]);
    t.float_data = vec![1.0];
    let e = decode(t).unwrap_err();
    assert!(matches!(e, OnnxError::DataSize { .. }), "{e}");

    let e = decode(tensor("overflow", DataType::Double, &[1 << 62, 1 << 62])).unwrap_err();
    assert!(matches!(e, OnnxError::InvalidTensor { .. }), "{e}");

    let e = decode(tensor("neg", DataType::Float, &[2, -1])).unwrap_err();
    assert!(matches!(e, OnnxError::InvalidTensor { .. }), "{e}");

    // float_data under an int64 type: the int64 field is empty.
    let mut t = tensor("wrongfield", DataType::Int64, &[1]);
    t.float_data = vec![1.0];
    let e = decode(t).unwrap_err();
    assert!(e.to_string().contains("int64_data"), "{e}");

    for (dt, name) in [
        (DataType::Float8e4m3fn, "FLOAT8E4M3FN"),
        (DataType::Int4, "INT4"),
        (DataType::String, "STRING"),
        (DataType::Uint16, "UINT16"),
        (DataType::Int16, "INT16"),
        (DataType::Uint64, "UINT64"),
        (DataType::Complex64, "COMPLEX64"),
    ] {
        let e = decode(tensor("x", dt, &[1])).unwrap_err();
        match &e {
            OnnxError::UnsupportedDType { tensor, onnx_type_name, .. } => {
                assert_eq!((tensor.as_str(), onnx_type_name.as_str()), ("x", name))
            }
            _ => panic!("{e}"),
        }
    }
    let mut t = tensor("x", DataType::Float, &[1]);
    t.data_type = Some(99);
    assert!(decode(t).unwrap_err().to_string().contains("unknown element type 99"));
    let mut t = tensor("x", DataType::Float, &[1]);
    t.data_type = None;
    assert!(matches!(decode(t).unwrap_err(), OnnxError::InvalidTensor { .. }));
}

// ---------------------------------------------------------------------------
// Garbage in, errors out

#[test]
fn garbage_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("garbage.onnx");

    // Pseudo-random bytes (xorshift, fixed seed), an empty file, text.
    let mut x = 0x9E3779B97F4A7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for content in [noise.clone(), vec![], b"hello, this is not protobuf\n".to_vec()] {
        std::fs::write(&p, &content).unwrap();
        let e = OnnxModel::open(&p).unwrap_err();
        assert!(e.to_string().contains("garbage.onnx"), "{e}");
        assert!(read_tensor_pb(&p).is_err());
    }
    assert!(matches!(OnnxModel::open(dir.path()).unwrap_err(), OnnxError::Io { .. }));
    assert!(matches!(OnnxModel::open(dir.path().join("absent.onnx")).unwrap_err(), OnnxError::Io { .. }));

    // A valid model cut short, and a length prefix that lies.
    let mut t = tensor("w", DataType::Float, &[64]);
    t.raw_data = Some(Bytes::from(f32_le(&[1.0; 64])));
    let full = model_bytes(graph_with(vec![t]));
    for cut in [1, 7, full.len() / 2, full.len() - 1] {
        std::fs::write(&p, &full[..cut]).unwrap();
        if let Ok(m) = OnnxModel::open(&p) {
            // Protobuf cannot always tell a cut at a field boundary; then the
            // data must still be checked.
            for t in m.initializers() {
                let _ = t;
            }
        }
    }

    // Random single-byte corruptions of a valid model: never a panic.
    let mut node = NodeProto {
        op_type: Some("Constant".into()),
        name: Some("c".into()),
        output: vec!["y".into()],
        ..Default::default()
    };
    let mut v = tensor("v", DataType::Int64, &[2]);
    v.int64_data = vec![1, 2];
    node.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(v),
        ..Default::default()
    });
    let mut g =
        graph_with(vec![external(tensor("e", DataType::Float, &[2]), &[("location", "w.bin"), ("offset", "3")])]);
    g.node.push(node);
    let base = model_bytes(g);
    std::fs::write(dir.path().join("w.bin"), [0u8; 11]).unwrap();
    for i in 0..2000 {
        let mut b = base.clone();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pos = (x as usize) % b.len();
        b[pos] ^= (x >> 32) as u8 | 1;
        if i % 3 == 0 {
            b.truncate((x >> 40) as usize % b.len());
        }
        let Ok(m) = OnnxModel::from_bytes(Bytes::from(b), dir.path().join("model.onnx")) else {
            continue;
        };
        for t in m.initializers() {
            let _ = t;
        }
        for n in &m.graph().node {
            let a = m.attrs(n);
            if let Ok(Some(t)) = a.tensor("value") {
                let _ = m.tensor(t);
            }
            let _ = a.int("value");
            let _ = a.strings("value");
        }
        for v in m.graph().input.iter().chain(&m.graph().output) {
            let _ = m.value_type(v);
        }
    }
}

// ---------------------------------------------------------------------------
// Attributes, opsets, value types

fn attr(name: &str, ty: Option<AttributeType>, f: impl FnOnce(&mut AttributeProto)) -> AttributeProto {
    let mut a = AttributeProto { name: Some(name.into()), r#type: ty.map(|t| t as i32), ..Default::default() };
    f(&mut a);
    a
}

#[test]
fn node_attributes() {
    let mut v = tensor("v", DataType::Float, &[1]);
    v.float_data = vec![2.0];
    let node = NodeProto {
        name: Some("/layers.0/attn/Softmax".into()),
        op_type: Some("Softmax".into()),
        attribute: vec![
            attr("axis", Some(AttributeType::Int), |a| a.i = Some(-1)),
            attr("perm", Some(AttributeType::Ints), |a| a.ints = vec![0, 2, 1]),
            attr("alpha", Some(AttributeType::Float), |a| a.f = Some(0.5)),
            attr("scales", Some(AttributeType::Floats), |a| a.floats = vec![1.0, 2.0]),
            attr("mode", Some(AttributeType::String), |a| a.s = Some(Bytes::from_static(b"tanh"))),
            attr("names", Some(AttributeType::Strings), |a| {
                a.strings = vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
            }),
            attr("value", Some(AttributeType::Tensor), |a| a.t = Some(v.clone())),
            attr("body", Some(AttributeType::Graph), |a| a.g = Some(graph_with(vec![]))),
            // IR version 1 writers leave `type` out.
            attr("old_int", None, |a| a.i = Some(3)),
            attr("bad_utf8", Some(AttributeType::String), |a| a.s = Some(Bytes::from_static(b"\xff\xfe"))),
        ],
        ..Default::default()
    };
    let bytes = Bytes::from(model_bytes(GraphProto { node: vec![node], ..Default::default() }));
    let model = OnnxModel::from_bytes(bytes, "dir/m.onnx").unwrap();
    let a = model.attrs(&model.graph().node[0]);

    assert_eq!(a.int("axis").unwrap(), Some(-1));
    assert_eq!(a.int_or("missing", 7).unwrap(), 7);
    assert_eq!(a.require_int("old_int").unwrap(), 3);
    assert_eq!(a.require_ints("perm").unwrap(), &[0, 2, 1]);
    assert_eq!(a.float_or("alpha", 1.0).unwrap(), 0.5);
    assert_eq!(a.floats("scales").unwrap(), Some(&[1.0f32, 2.0][..]));
    assert_eq!(a.string_or("mode", "none").unwrap(), "tanh");
    assert_eq!(a.strings("names").unwrap(), Some(vec!["a", "b"]));
    let t = model.tensor(a.require_tensor("value").unwrap()).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![2.0]);
    assert!(a.require_graph("body").is_ok());
    assert!(a.has("body") && !a.has("nope"));
    assert_eq!(a.names().count(), 10);

    let e = a.int("alpha").unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(matches!(e, OnnxError::AttributeType { expected: AttributeType::Int, found: AttributeType::Float, .. }));
    for part in ["dir/m.onnx", "/layers.0/attn/Softmax", "Softmax", "`alpha`"] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    let e = a.require_float("epsilon").unwrap_err();
    println!("{e}");
    assert!(matches!(e, OnnxError::MissingAttribute { .. }));
    assert!(e.to_string().contains("`epsilon`"));
    let e = a.string("bad_utf8").unwrap_err();
    assert!(matches!(e, OnnxError::AttributeValue { .. }), "{e}");
    assert!(a.graph("value").is_err());
    assert!(a.tensor("body").is_err());
}

#[test]
fn opsets_and_value_types() {
    let dim = |v: Option<dimension::Value>| Dimension { value: v, ..Default::default() };
    let ty = |elem: DataType, dims: Option<Vec<Dimension>>| TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem as i32),
            shape: dims.map(|dim| TensorShapeProto { dim }),
        })),
        ..Default::default()
    };
    let vi =
        |name: &str, t: Option<TypeProto>| ValueInfoProto { name: Some(name.into()), r#type: t, ..Default::default() };
    let graph = GraphProto {
        input: vec![
            vi(
                "x",
                Some(ty(
                    DataType::Bfloat16,
                    Some(vec![
                        dim(Some(dimension::Value::DimParam("batch".into()))),
                        dim(Some(dimension::Value::DimValue(64))),
                        dim(None),
                        dim(Some(dimension::Value::DimValue(-1))),
                    ]),
                )),
            ),
            vi("r", Some(ty(DataType::Float, None))),
            vi("s", Some(ty(DataType::String, Some(vec![])))),
            vi(
                "seq",
                Some(TypeProto {
                    value: Some(type_proto::Value::SequenceType(Box::new(type_proto::Sequence {
                        elem_type: Some(Box::new(ty(DataType::Float, None))),
                    }))),
                    ..Default::default()
                }),
            ),
            vi("none", None),
            vi("w", Some(ty(DataType::Float, Some(vec![])))),
        ],
        initializer: vec![{
            let mut w = tensor("w", DataType::Float, &[]);
            w.float_data = vec![1.0];
            w
        }],
        ..Default::default()
    };
    let mut proto = ModelProto { ir_version: Some(3), graph: Some(graph), ..Default::default() };
    proto.opset_import = vec![
        OperatorSetIdProto { domain: Some("ai.onnx".into()), version: Some(13) },
        OperatorSetIdProto { domain: Some("com.microsoft".into()), version: Some(1) },
    ];
    let model = OnnxModel::from_bytes(Bytes::from(proto.encode_to_vec()), "v.onnx").unwrap();
    assert_eq!(model.opset_version(""), Some(13));
    assert_eq!(model.opset_version("ai.onnx"), Some(13));
    assert_eq!(model.opset_version("com.microsoft"), Some(1));
    assert_eq!(model.opset_version("ai.onnx.ml"), None);
    assert_eq!(model.opset_imports(), vec![("", 13), ("com.microsoft", 1)]);
    assert_eq!(model.ir_version(), 3);

    // IR version 3 lists initialisers as inputs too; graph_inputs drops them.
    let names: Vec<&str> = model.graph_inputs().iter().map(|v| v.name()).collect();
    assert_eq!(names, vec!["x", "r", "s", "seq", "none"]);

    let inputs = &model.graph().input;
    let x = model.value_type(&inputs[0]).unwrap();
    assert_eq!(x.dtype, DType::BF16);
    assert_eq!(
        x.shape.unwrap(),
        vec![OnnxDim::Param("batch".into()), OnnxDim::Fixed(64), OnnxDim::Unknown, OnnxDim::Unknown]
    );
    assert_eq!(model.value_type(&inputs[1]).unwrap().shape, None);
    let e = model.value_type(&inputs[2]).unwrap_err();
    assert!(matches!(&e, OnnxError::UnsupportedDType { onnx_type_name, .. } if onnx_type_name == "STRING"), "{e}");
    let e = model.value_type(&inputs[3]).unwrap_err();
    assert!(e.to_string().contains("`seq`") && e.to_string().contains("sequence"), "{e}");
    assert!(model.value_type(&inputs[4]).is_err());
    assert_eq!(model.value_type(&inputs[5]).unwrap().shape, Some(vec![]));

    // A model without a graph is refused when opened.
    let empty = ModelProto::default().encode_to_vec();
    let e = OnnxModel::from_bytes(Bytes::from(empty), "e.onnx").unwrap_err();
    assert!(matches!(e, OnnxError::InvalidModel { .. }), "{e}");
}
