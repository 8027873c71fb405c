//! Library calls in `cuda` plans (a GEMM by cuBLAS instead of a PTX
//! kernel, `smelt compile --gpu-gemm cublas`): the plan format round trip,
//! the plan checks (a call whose needs or types do not fit is refused), the
//! host-side sizing of a call with library launches on made-up addresses,
//! and opening a model, which without a driver (or cuBLAS) is a clear error.
//! On a GPU machine with cuBLAS the last test also runs the GEMM, eagerly
//! and replayed as a CUDA graph, against a host matmul.

use std::collections::BTreeMap;

use smelt_ir::{DType, Tensor};
use smelt_runtime::artifact::{Bounds, Signature, TensorSig};
use smelt_runtime::cuda::blas::{check_cublas, cublas_present};
use smelt_runtime::cuda::{probe, CudaError, CudaModel, CudaPlan, DeviceMemory, Host, Issue};
use smelt_runtime::plan::{
    Buffer, Elem, GemmCall, GemmCompute, KernelEntry, Launch, LibraryCall, NativePlan, PtxModule, Storage,
};
use smelt_runtime::Forward;

const PTX: &str = include_str!("cuda/kernels.ptx");
const N: usize = 8;
const K: usize = 16;
const WEIGHTS: u64 = 0x1000_0000;
const ARENA: u64 = 0x2000_0000;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn gemm_entry(a: Elem) -> KernelEntry {
    KernelEntry {
        symbol: "cublas_gemm_f32_n8_k16".into(),
        lowering: "cublas".into(),
        buffers: vec![a, a, Elem::F32],
        scalars: 1,
        block: None,
        tuning: None,
        library: Some(LibraryCall::Gemm(GemmCall {
            library: "cublas".into(),
            n: N as u64,
            k: K as u64,
            a,
            b: a,
            c: Elem::F32,
            compute: GemmCompute::F32,
        })),
    }
}

/// `y[m, 8] = x[m, 16] · w[8, 16]ᵀ` by cuBLAS, then `z = y + y` by the
/// test PTX's `smelt_test_add`; output z.
fn gemm_plan() -> (NativePlan, Signature) {
    let buf = |name: &str, shape: &[&str], storage: Storage| Buffer {
        name: name.into(),
        elem: Elem::F32,
        shape: strings(shape),
        storage,
    };
    let plan = NativePlan {
        library: String::new(),
        weights: "weights.bin".into(),
        kernels: vec![
            KernelEntry {
                symbol: "smelt_test_add".into(),
                lowering: "llvm".into(),
                buffers: vec![Elem::F32; 3],
                scalars: 1,
                block: Some([64, 1, 1]),
                tuning: None,
                library: None,
            },
            gemm_entry(Elem::F32),
        ],
        buffers: vec![
            buf("x", &["m", "16"], Storage::Input { name: "x".into() }),
            buf("w", &["8", "16"], Storage::Weight { offset: 0 }),
            buf("y", &["m", "8"], Storage::Arena),
            buf("z", &["m", "8"], Storage::Arena),
        ],
        launches: vec![
            Launch {
                kernel: 1,
                args: vec![0, 1, 2],
                needs: strings(&["16*m", "128", "8*m"]),
                scalars: strings(&["m"]),
                node: "%y = matmul %x, %w".into(),
                grid: None,
                work: None,
            },
            Launch {
                kernel: 0,
                args: vec![2, 2, 3],
                needs: strings(&["8*m", "8*m", "8*m"]),
                scalars: strings(&["8*m"]),
                node: "%z = add %y, %y".into(),
                grid: Some(["(8*m + 63) / 64".into(), "1".into(), "1".into()]),
                work: None,
            },
        ],
        symbols: vec![("m".into(), 1, 4096)],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("z".into(), 3)],
        arch: String::new(),
        cpu_features: vec![],
        ptx: vec![PtxModule { arch: "sm_80".into(), file: "kernels.sm_80.ptx".into() }],
        kv_cache: None,
    };
    let t = |name: &str, shape: &[&str]| TensorSig {
        name: name.into(),
        dtype: "f32".into(),
        shape: strings(shape),
        optional: false,
    };
    let sig = Signature {
        inputs: vec![t("x", &["m", "16"])],
        outputs: vec![t("z", &["m", "8"])],
        symbols: [("m".to_string(), Bounds { min: 1, max: 4096 })].into_iter().collect(),
    };
    (plan, sig)
}

fn w_values() -> Vec<f32> {
    (0..N * K).map(|i| ((i * 7 % 23) as f32 - 11.0) / 8.0).collect()
}

fn weights_bytes() -> Vec<u8> {
    w_values().iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn checked(plan: NativePlan, sig: Signature) -> Result<CudaPlan, CudaError> {
    CudaPlan::new(plan, sig, weights_bytes().len())
}

fn x_input(m: usize) -> (Vec<f32>, BTreeMap<String, Tensor>) {
    let x: Vec<f32> = (0..m * K).map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0).collect();
    let t = Tensor::from_f32(DType::F32, vec![m, K], x.clone()).unwrap();
    (x, BTreeMap::from([("x".to_string(), t)]))
}

/// z = 2 · x · wᵀ on the host.
fn reference(x: &[f32], m: usize) -> Vec<f32> {
    let w = w_values();
    (0..m * N)
        .map(|i| {
            let (r, j) = (i / N, i % N);
            2.0 * (0..K).map(|t| x[r * K + t] as f64 * w[j * K + t] as f64).sum::<f64>() as f32
        })
        .collect()
}

#[test]
fn library_calls_round_trip_through_the_manifest_format() {
    let (plan, _) = gemm_plan();
    let json = serde_json::to_string(&plan).unwrap();
    assert!(json.contains(r#""library":{"kind":"gemm","library":"cublas","n":8,"k":16"#), "{json}");
    assert!(json.contains(r#""compute":"f32""#), "{json}");
    let back: NativePlan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    // A kernel entry without the field (an older plan) reads as a kernel.
    let old = r#"{"symbol":"k","lowering":"nvptx","buffers":["f32"],"scalars":0,"block":[32,1,1]}"#;
    let e: KernelEntry = serde_json::from_str(old).unwrap();
    assert_eq!(e.library, None);
    assert!(!serde_json::to_string(&e).unwrap().contains("library"));
}

#[test]
fn plans_with_library_calls_are_checked() {
    let (plan, sig) = gemm_plan();
    let p = checked(plan.clone(), sig.clone()).unwrap();
    assert!(p.has_library_calls());
    assert!(p.gemm(1).is_some() && p.gemm(0).is_none());
    // Without its library call the plan needs no cuBLAS.
    let mut plain = plan.clone();
    plain.kernels.truncate(1);
    plain.launches.remove(0);
    assert!(!checked(plain, sig.clone()).unwrap().has_library_calls());

    let refused = |f: &dyn Fn(&mut NativePlan), want: &str| {
        let mut bad = plan.clone();
        f(&mut bad);
        let e = checked(bad, sig.clone()).unwrap_err().to_string();
        assert!(e.contains(want), "expected `{want}` in: {e}");
    };
    // Needs that are not m·k, n·k, m·n.
    refused(&|p| p.launches[0].needs[0] = "16*m - 1".into(), "argument 0 (x) needs `16*m - 1` elements");
    refused(&|p| p.launches[0].needs[2] = "8".into(), "argument 2 (y) needs `8` elements");
    // Types the GEMM does not take, or that disagree with the buffers.
    refused(
        &|p| {
            if let Some(LibraryCall::Gemm(g)) = &mut p.kernels[1].library {
                g.b = Elem::BF16;
            }
            p.kernels[1].buffers[1] = Elem::BF16;
        },
        "the operands must be both f32, bf16 or f16",
    );
    refused(&|p| p.kernels[1].buffers[2] = Elem::F16, "a GEMM takes [F32, F32, F32]");
    refused(&|p| p.kernels[1] = gemm_entry(Elem::BF16), "argument 0 of kernel `cublas_gemm_f32_n8_k16` is BF16");
    refused(
        &|p| {
            if let Some(LibraryCall::Gemm(g)) = &mut p.kernels[1].library {
                g.library = "rocblas".into();
            }
        },
        "unknown library `rocblas`",
    );
    refused(&|p| p.kernels[1].block = Some([32, 1, 1]), "a library call has no thread block");
    refused(&|p| p.launches[0].grid = Some(["1".into(), "1".into(), "1".into()]), "a library call has no grid");
    refused(&|p| p.launches[0].scalars.clear(), "takes 1 scalars, the launch gives 0");
    // A buffer shorter than the call reads: the x buffer with 15 columns.
    let mut short = plan.clone();
    short.buffers[0].shape = strings(&["m", "15"]);
    let mut sig15 = sig.clone();
    sig15.inputs[0].shape = strings(&["m", "15"]);
    let p = checked(short, sig15).unwrap();
    let x = Tensor::from_f32(DType::F32, vec![2, 15], vec![0.0; 30]).unwrap();
    let e = p.prepare(&BTreeMap::from([("x".to_string(), x)]), &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.contains("argument 0 needs 32 elements (`16*m`) but buffer `x` has 30"), "{e}");
}

struct FakeMemory;

impl DeviceMemory for FakeMemory {
    fn weights(&self) -> u64 {
        WEIGHTS
    }
    fn arena(&mut self, _: usize) -> Result<u64, CudaError> {
        Ok(ARENA)
    }
    fn cache_slot(&mut self, _: usize, _: usize, _: usize) -> Result<u64, CudaError> {
        Ok(0)
    }
}

#[derive(Debug, PartialEq)]
enum Seen {
    Kernel { launch: usize, kernel: usize, grid: (u32, u32, u32), params: usize },
    Gemm { launch: usize, m: u64, x: u64, w: u64, y: u64 },
}

#[test]
fn a_call_with_library_launches_is_sized_on_the_host() {
    let (plan, sig) = gemm_plan();
    let mut host = Host::new(checked(plan.clone(), sig).unwrap());
    for m in [1usize, 3, 100] {
        let (_, inputs) = x_input(m);
        host.prepare_run(inputs, &mut FakeMemory).unwrap();
        assert_eq!(host.launched(), 2, "m = {m}");
        assert_eq!(host.grids()[0], Some((1, 1, 1)));
        let mut seen = vec![];
        host.each_issue(|i| {
            seen.push(match i {
                Issue::Kernel { launch, kernel, grid, params, .. } => {
                    Seen::Kernel { launch, kernel, grid, params: params.len() }
                }
                Issue::Gemm { launch, call, m, x, w, y } => {
                    assert_eq!((call.n, call.k), (N as u64, K as u64));
                    Seen::Gemm { launch, m, x, w, y }
                }
            });
            Ok::<(), ()>(())
        })
        .unwrap();
        let [Seen::Gemm { launch: 0, m: gm, x, w, y }, Seen::Kernel { launch: 1, kernel: 0, grid, params: 4 }] =
            &seen[..]
        else {
            panic!("m = {m}: {seen:?}");
        };
        assert_eq!(*gm, m as u64);
        assert_eq!(*w, WEIGHTS);
        assert_eq!(*grid, ((8 * m as u32).div_ceil(64), 1, 1));
        // x, y and z live in the arena, apart from each other.
        let bytes = |n: usize| (n * 4) as u64;
        let (xs, ys) = ((*x, bytes(m * K)), (*y, bytes(m * N)));
        for a in [xs, ys] {
            assert!(a.0 >= ARENA, "m = {m}: {seen:?}");
        }
        assert!(xs.0 + xs.1 <= ys.0 || ys.0 + ys.1 <= xs.0, "x and y overlap: {seen:?}");
        // The GEMM's arguments in the table are what `each_issue` gave:
        // addresses x, w, y, then m.
        assert_eq!(&host.args()[..4], &[*x, *w, *y, m as u64]);
        // `each_launch` gives the kernels only.
        let mut kernels = 0;
        host.each_launch(|li, _, _, _, _| {
            assert_eq!(li, 1);
            kernels += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(kernels, 1);
    }
}

#[test]
fn cublas_is_looked_for_without_a_gpu() {
    match check_cublas() {
        Ok(()) => assert!(cublas_present()),
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, CudaError::NoLibrary { .. }), "{msg}");
            assert!(msg.contains("libcublas"), "{msg}");
            println!("no cuBLAS here: {msg}");
        }
    }
}

/// Opening a plan with library calls: without a driver, device or cuBLAS
/// a clear error; with them, the GEMM runs eagerly and then from a
/// captured CUDA graph, matching a host matmul.
#[test]
fn a_model_with_library_calls_opens_cleanly_or_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weights.bin"), weights_bytes()).unwrap();
    std::fs::write(dir.path().join("kernels.sm_80.ptx"), PTX).unwrap();
    let (plan, sig) = gemm_plan();
    let gpu = probe(0);
    let mut model = match CudaModel::open(plan, sig, dir.path()) {
        Ok(m) => m,
        Err(e) => {
            let msg = e.to_string();
            match &e {
                CudaError::NoDriver(_) | CudaError::NoDevice(_) => assert!(gpu.is_err(), "{msg}"),
                CudaError::NoLibrary { .. } => assert!(gpu.is_ok() && !cublas_present(), "{msg}"),
                other => panic!("unexpected error opening the model: {other}"),
            }
            println!("skipped running: {msg}");
            return;
        }
    };
    println!("running on {}", model.device_name());
    for m in [1usize, 37, 37, 37, 300] {
        let (x, inputs) = x_input(m);
        let got = model.forward(inputs).unwrap()["z"].to_f32_vec();
        let want = reference(&x, m);
        let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        println!("m = {m}: max |error| {err}");
        assert!(err <= 1e-4 * (1.0 + want.iter().fold(0f32, |a, w| a.max(w.abs()))), "m = {m}: {err}");
    }
    let stats = model.stats();
    assert!(stats.graph_replays >= 1 || std::env::var_os("SMELT_PROFILE").is_some(), "{stats:?}");
}
