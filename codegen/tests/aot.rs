//! The native path end to end: kernels built by the templates (and one
//! hand-built kernel with a symbolic length) are linked into a shared
//! library by `aot::build_library`, a hand-made `NativePlan` chains them
//! (graph input -> kernel -> arena buffer -> kernel -> output, views, weights
//! read from a file), and `smelt_runtime::native::NativeModel` runs it on
//! thread teams of 1 and 3, against the KIR interpreter run kernel by
//! kernel. Also: the refusals (missing symbol, bad inputs and launches that
//! do not fit, caught before any kernel runs, CPU features, a missing
//! linker) and a deterministic library.

use std::collections::BTreeMap;
use std::path::Path;

use smelt_codegen::aot::{build_library, build_library_with, kernel_entry, AotError, LibraryInfo};
use smelt_codegen::kir::interp::{self, BufData, Mode};
use smelt_codegen::kir::{Builder, Expr, Kernel, LoopKind, Scalar};
use smelt_codegen::templates::testing::{assert_close, rand, rand_pos};
use smelt_codegen::templates::{binary, rms_norm, Bcast, BinaryOp};
use smelt_ir::{DType, Tensor};
use smelt_runtime::artifact::{Bounds, Signature, TensorSig};
use smelt_runtime::native::{check_cpu_features, NativeError, NativeModel, Weights};
use smelt_runtime::plan::{Buffer, Elem, Launch, NativePlan, Storage};
use smelt_runtime::Forward;

const ROWS: usize = 4;
const COLS: usize = 6;
const EPS: f32 = 1e-5;

/// `y = 2 * x` over `3 * n` elements, `n` a scalar parameter.
fn double_rows() -> Kernel {
    let mut b = Builder::new("double_rows");
    let n = b.scalar_param("n");
    let len = n * Expr::idx(3);
    let x = b.input("x", len.clone());
    let y = b.output("y", len.clone());
    b.for_("i", Expr::idx(0), len, 1, LoopKind::Parallel, |b, i| {
        b.store(y, i.clone(), Expr::load(x, i, 1) * Expr::f32(2.0))
    });
    b.finish().unwrap()
}

fn kernels() -> Vec<Kernel> {
    vec![binary(BinaryOp::Add, ROWS, COLS, Bcast::Row).unwrap(), rms_norm(ROWS, COLS, EPS).unwrap(), double_rows()]
}

/// Runs a kernel in the KIR interpreter; returns the last buffer.
fn interp_run(k: &Kernel, inputs: &[&[f32]], scalars: &[i64]) -> Vec<f32> {
    let mut bufs: Vec<BufData> = inputs.iter().map(|v| BufData::F32(v.to_vec())).collect();
    let out = k.global_buffers().last().unwrap().1;
    bufs.push(BufData::zeros(Scalar::F32, k.buffer_len(out, scalars).unwrap()));
    interp::run(k, &mut bufs, scalars, Mode::Cpu { threads: 1 }).unwrap();
    bufs.pop().unwrap().f32().to_vec()
}

fn buf(name: &str, shape: &[&str], storage: Storage) -> Buffer {
    Buffer { name: name.into(), elem: Elem::F32, shape: shape.iter().map(|s| s.to_string()).collect(), storage }
}

fn launch(kernel: usize, args: &[usize], needs: &[&str], scalars: &[&str], node: &str) -> Launch {
    Launch {
        kernel,
        args: args.to_vec(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
        scalars: scalars.iter().map(|s| s.to_string()).collect(),
        node: node.into(),
        grid: None,
        work: None,
    }
}

/// The weights file: `bias [6]` at 0, `gamma [6]` at 64.
fn weights() -> (Vec<f32>, Vec<f32>, Vec<u8>) {
    let bias = rand(COLS, 11);
    let gamma = rand_pos(COLS, 12);
    let mut bytes = vec![0u8; 64 + COLS * 4];
    for (i, v) in bias.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (i, v) in gamma.iter().enumerate() {
        bytes[64 + i * 4..64 + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    (bias, gamma, bytes)
}

/// x [4, 6] -> add bias -> t1 -> rms_norm -> t2; t2 viewed as [8, 3] ->
/// double -> y; t2's row 1 (a view at offset 6) -> row1; z [seq, 3] ->
/// double -> t3 -> double -> w.
fn plan(lib: &LibraryInfo, ks: &[Kernel]) -> NativePlan {
    let buffers = vec![
        buf("x", &["4", "6"], Storage::Input { name: "x".into() }),
        buf("bias", &["6"], Storage::Weight { offset: 0 }),
        buf("gamma", &["6"], Storage::Weight { offset: 64 }),
        buf("t1", &["4", "6"], Storage::Arena),
        buf("t2", &["4", "6"], Storage::Arena),
        buf("t2_rows", &["8", "3"], Storage::Alias { of: 4, offset: "0".into() }),
        buf("y", &["8", "3"], Storage::Arena),
        buf("row1", &["6"], Storage::Alias { of: 4, offset: "6".into() }),
        buf("z", &["seq", "3"], Storage::Input { name: "z".into() }),
        buf("t3", &["seq", "3"], Storage::Arena),
        buf("w", &["seq", "3"], Storage::Arena),
    ];
    let launches = vec![
        launch(0, &[0, 1, 3], &["24", "6", "24"], &[], "%t1 = add %x, %bias"),
        launch(1, &[3, 2, 4], &["24", "6", "24"], &[], "%t2 = rms_norm %t1, %gamma"),
        launch(2, &[5, 6], &["24", "24"], &["8"], "%y = mul %t2_rows, 2"),
        launch(2, &[8, 9], &["3*seq", "3*seq"], &["seq"], "%t3 = mul %z, 2"),
        launch(2, &[9, 10], &["3*seq", "3*seq"], &["seq"], "%w = mul %t3, 2"),
    ];
    NativePlan {
        library: "kernels.so".into(),
        weights: "weights.bin".into(),
        kernels: ks.iter().map(kernel_entry).collect(),
        buffers,
        launches,
        symbols: vec![("seq".into(), 1, 16)],
        inputs: vec![("x".into(), 0), ("z".into(), 8)],
        outputs: vec![("y".into(), 6), ("row1".into(), 7), ("w".into(), 10)],
        arch: lib.arch.clone(),
        cpu_features: lib.cpu_features.clone(),
        ptx: vec![],
        kv_cache: None,
    }
}

fn sig_of(name: &str, shape: &[&str]) -> TensorSig {
    TensorSig {
        name: name.into(),
        dtype: "f32".into(),
        shape: shape.iter().map(|s| s.to_string()).collect(),
        optional: false,
    }
}

fn signature() -> Signature {
    Signature {
        inputs: vec![sig_of("x", &["4", "6"]), sig_of("z", &["seq", "3"])],
        outputs: vec![sig_of("y", &["8", "3"]), sig_of("row1", &["6"]), sig_of("w", &["seq", "3"])],
        symbols: [("seq".to_string(), Bounds { min: 1, max: 16 })].into_iter().collect(),
    }
}

/// Builds the library and writes the weights into `dir`.
fn setup(dir: &Path) -> (LibraryInfo, Vec<Kernel>, Vec<f32>, Vec<f32>) {
    let ks = kernels();
    let lib = build_library(&ks, dir).unwrap_or_else(|e| panic!("{e}"));
    let (bias, gamma, bytes) = weights();
    std::fs::write(dir.join("weights.bin"), bytes).unwrap();
    (lib, ks, bias, gamma)
}

fn inputs(x: &[f32], z: &[f32], seq: usize) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert("x".to_string(), Tensor::from_f32(DType::F32, vec![ROWS, COLS], x.to_vec()).unwrap());
    m.insert("z".to_string(), Tensor::from_f32(DType::F32, vec![seq, 3], z.to_vec()).unwrap());
    m
}

#[test]
fn a_plan_runs_like_the_interpreter_on_teams_of_1_and_3() {
    let dir = tempfile::tempdir().unwrap();
    let (lib, ks, bias, gamma) = setup(dir.path());
    assert_eq!(lib.symbols, vec!["smelt_add_4x6_row", "smelt_rms_norm_4x6", "smelt_double_rows"]);
    for threads in [1, 3] {
        let mut m = NativeModel::open(plan(&lib, &ks), signature(), dir.path(), threads).unwrap();
        assert_eq!(m.threads(), threads);
        // Growing and shrinking `seq` exercises arena growth and reuse.
        for (round, seq) in [5usize, 1, 16, 3].into_iter().enumerate() {
            let x = rand(ROWS * COLS, 100 + round as u64);
            let z = rand(seq * 3, 200 + round as u64);
            let out = m.forward(inputs(&x, &z, seq)).unwrap();

            let t1 = interp_run(&ks[0], &[&x, &bias], &[]);
            let t2 = interp_run(&ks[1], &[&t1, &gamma], &[]);
            let y = interp_run(&ks[2], &[&t2], &[8]);
            let t3 = interp_run(&ks[2], &[&z], &[seq as i64]);
            let w = interp_run(&ks[2], &[&t3], &[seq as i64]);

            assert_eq!(out["y"].shape, vec![8, 3]);
            assert_eq!(out["row1"].shape, vec![6]);
            assert_eq!(out["w"].shape, vec![seq, 3]);
            let what = format!("threads {threads} seq {seq}");
            assert_close(&format!("y ({what})"), &out["y"].to_f32_vec(), &y, 1e-5, 1e-6);
            assert_close(&format!("row1 ({what})"), &out["row1"].to_f32_vec(), &t2[6..12], 1e-5, 1e-6);
            assert_eq!(out["w"].to_f32_vec(), w, "{what}");
            let max_err = out["y"].to_f32_vec().iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            println!("threads {threads} seq {seq}: max |y - interp| = {max_err:e}");
        }
        let stats = m.stats();
        assert_eq!(stats.calls, 4);
        assert_eq!(stats.launches, 20);
        println!("threads {threads}: arena {} bytes", stats.arena_bytes);
    }
}

#[test]
fn bad_inputs_and_launches_that_do_not_fit_are_refused_before_any_kernel_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (lib, ks, _, _) = setup(dir.path());
    let mut m = NativeModel::open(plan(&lib, &ks), signature(), dir.path(), 2).unwrap();
    let x = rand(ROWS * COLS, 1);
    m.run(inputs(&x, &rand(6, 2), 2)).unwrap();
    let before = m.stats();

    let mut bad = inputs(&x, &rand(6, 2), 2);
    bad.insert("x".into(), Tensor::from_f32(DType::F32, vec![4, 5], rand(20, 3)).unwrap());
    let e = m.run(bad).unwrap_err();
    assert!(matches!(e, NativeError::InputDim { axis: 1, found: 5, .. }), "{e}");
    assert_eq!(e.to_string(), "input `x` axis 1: expected 6, found 5");

    let e = m.run(inputs(&x, &rand(17 * 3, 2), 17)).unwrap_err();
    assert!(matches!(e, NativeError::SymbolOutOfBounds { value: 17, .. }), "{e}");

    let mut missing = inputs(&x, &rand(6, 2), 2);
    missing.remove("z");
    let e = m.run(missing).unwrap_err();
    assert_eq!(e.to_string(), "missing input `z` (expected f32[seq, 3])");

    let mut wrong = inputs(&x, &rand(6, 2), 2);
    wrong.insert("z".into(), Tensor::from_i64(DType::I64, vec![2, 3], vec![0; 6]).unwrap());
    let e = m.run(wrong).unwrap_err();
    assert!(matches!(e, NativeError::InputDType { .. }), "{e}");
    assert_eq!(m.stats().launches, before.launches, "no kernel may run on refused inputs");

    // A launch whose needs exceed its buffer for these symbol values: the
    // last launch reads one row more than `t3` has.
    let mut p = plan(&lib, &ks);
    p.launches[4].needs[0] = "3*seq + 3".into();
    let mut m = NativeModel::open(p, signature(), dir.path(), 2).unwrap();
    let e = m.run(inputs(&x, &rand(6, 2), 2)).unwrap_err();
    assert!(matches!(&e, NativeError::Launch { launch: 4, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("%w = mul %t3, 2") && msg.contains("needs 9") && msg.contains("`t3` has 6"), "{msg}");
    assert_eq!(m.stats().launches, 0, "no kernel may run when a later launch does not fit");

    // A view that does not fit its target.
    let mut p = plan(&lib, &ks);
    p.buffers[7].storage = Storage::Alias { of: 4, offset: "20".into() };
    let mut m = NativeModel::open(p, signature(), dir.path(), 1).unwrap();
    let e = m.run(inputs(&x, &rand(6, 2), 2)).unwrap_err();
    assert!(e.to_string().starts_with("buffer `row1`: a view of 6 elements at offset 20"), "{e}");
    assert_eq!(m.stats().launches, 0);
}

#[test]
fn missing_symbols_features_and_bad_plans_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (lib, ks, _, _) = setup(dir.path());

    let mut p = plan(&lib, &ks);
    p.kernels[2].symbol = "smelt_no_such_kernel".into();
    let e = NativeModel::open(p, signature(), dir.path(), 1).unwrap_err();
    assert!(matches!(&e, NativeError::MissingSymbol { symbol, .. } if symbol == "smelt_no_such_kernel"), "{e}");
    assert!(e.to_string().contains("does not export `smelt_no_such_kernel`"), "{e}");

    let mut p = plan(&lib, &ks);
    p.cpu_features.push("warp-drive".into());
    let e = NativeModel::open(p, signature(), dir.path(), 1).unwrap_err();
    assert!(matches!(&e, NativeError::MissingCpuFeatures { missing } if missing[0].starts_with("warp-drive")), "{e}");

    let mut p = plan(&lib, &ks);
    p.arch = "riscv64-but-not-this-one".into();
    let e = NativeModel::open(p, signature(), dir.path(), 1).unwrap_err();
    assert!(matches!(e, NativeError::Arch { .. }), "{e}");

    // Statically broken plans: wrong argument count, a weight outside the
    // file, an input the signature does not know.
    let mut p = plan(&lib, &ks);
    p.launches[1].args.pop();
    let e = NativeModel::open(p, signature(), dir.path(), 1).unwrap_err();
    assert!(e.to_string().contains("launch 1 (`%t2 = rms_norm %t1, %gamma`)"), "{e}");
    let mut p = plan(&lib, &ks);
    p.buffers[2].storage = Storage::Weight { offset: 128 };
    let e = NativeModel::open(p, signature(), dir.path(), 1).unwrap_err();
    assert!(e.to_string().contains("outside the weights file"), "{e}");
    let mut sig = signature();
    sig.inputs[1].name = "zz".into();
    let e = NativeModel::open(plan(&lib, &ks), sig, dir.path(), 1).unwrap_err();
    assert!(e.to_string().contains("input `z` is not in the model's signature"), "{e}");

    // Weights can also come from memory.
    let (_, _, bytes) = weights();
    let w = Weights::from_bytes(&bytes).unwrap();
    let mut m = NativeModel::new(plan(&lib, &ks), signature(), &lib.path, w, 1).unwrap();
    m.run(inputs(&rand(24, 0), &rand(3, 0), 1)).unwrap();
}

#[test]
fn the_library_is_deterministic_and_its_features_are_the_hosts() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ks = kernels();
    let la = build_library(&ks, a.path()).unwrap();
    let lb = build_library(&ks, b.path()).unwrap();
    assert!(la.bytes == lb.bytes, "two builds of the same kernels differ");
    assert!(!a.path().join("kernels.o").exists(), "the object file is removed after linking");
    check_cpu_features(&la.arch, &la.cpu_features).unwrap();
    assert_eq!(la.arch, std::env::consts::ARCH);
    println!("library: {} bytes, features {:?}", la.bytes.len(), la.cpu_features);

    let e = build_library_with(&ks, a.path(), "/nonexistent/cc").unwrap_err();
    assert!(matches!(e, AotError::NoLinker { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/cc"), "{e}");
    let e = build_library_with(&ks, a.path(), "false").unwrap_err();
    assert!(matches!(e, AotError::LinkFailed { .. }), "{e}");
    let e = build_library(&[double_rows(), double_rows()], a.path()).unwrap_err();
    assert!(matches!(e, AotError::DuplicateKernel(_)), "{e}");
}
