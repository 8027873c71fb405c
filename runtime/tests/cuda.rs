//! The GPU runtime on hand-made `cuda` plans over hand-written kernels
//! (`cuda/kernels.ll`, compiled by `llc-22` to `cuda/kernels.ptx`).
//!
//! Everything that needs no GPU runs everywhere: plan validation (blocks,
//! grids, `needs` against buffer lengths), and opening a model on a machine
//! without a driver or device, which must be a clear error, not a panic.
//! The tests that need a GPU print why they are skipped when there is none;
//! on a GPU machine `cargo test -p smelt-runtime --test cuda` runs them.

use std::collections::BTreeMap;
use std::path::Path;

use smelt_ir::{DType, Tensor};
use smelt_runtime::artifact::{Bounds, Signature, TensorSig};
use smelt_runtime::cuda::{probe, CudaError, CudaModel, CudaPlan, DeviceMemory, Host};
use smelt_runtime::plan::{Buffer, Elem, KernelEntry, Launch, NativePlan, PtxModule, Storage};
use smelt_runtime::{generate, CachedDecode, Forward, ForwardError, GenerateOptions};

const PTX: &str = include_str!("cuda/kernels.ptx");

fn kernel(symbol: &str, buffers: &[Elem], scalars: usize) -> KernelEntry {
    KernelEntry {
        symbol: symbol.into(),
        lowering: "llvm".into(),
        buffers: buffers.to_vec(),
        scalars,
        block: Some([64, 1, 1]),
        tuning: None,
        library: None,
    }
}

fn buf(name: &str, elem: Elem, shape: &[&str], storage: Storage) -> Buffer {
    Buffer { name: name.into(), elem, shape: shape.iter().map(|s| s.to_string()).collect(), storage }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn launch(kernel: usize, args: &[usize], needs: &[&str], scalars: &[&str], grid: &str, node: &str) -> Launch {
    Launch {
        kernel,
        args: args.to_vec(),
        needs: strings(needs),
        scalars: strings(scalars),
        node: node.into(),
        grid: Some([grid.to_string(), "1".to_string(), "1".to_string()]),
        work: None,
    }
}

fn sig_of(name: &str, dtype: &str, shape: &[&str]) -> TensorSig {
    TensorSig { name: name.into(), dtype: dtype.into(), shape: strings(shape), optional: false }
}

/// x [n] + w[:n] -> t; t + t -> y; a launch with an empty grid that would
/// overwrite y with x + x; outputs y and its tail (a view at offset 1).
fn vadd_plan() -> (NativePlan, Signature) {
    let plan = NativePlan {
        library: String::new(),
        weights: "weights.bin".into(),
        kernels: vec![kernel("smelt_test_add", &[Elem::F32, Elem::F32, Elem::F32], 1)],
        buffers: vec![
            buf("x", Elem::F32, &["n"], Storage::Input { name: "x".into() }),
            buf("w", Elem::F32, &["256"], Storage::Weight { offset: 64 }),
            buf("t", Elem::F32, &["n"], Storage::Arena),
            buf("y", Elem::F32, &["n"], Storage::Arena),
            buf("y_tail", Elem::F32, &["n - 1"], Storage::Alias { of: 3, offset: "1".into() }),
        ],
        launches: vec![
            launch(0, &[0, 1, 2], &["n", "n", "n"], &["n"], "(n + 63) / 64", "%t = add %x, %w"),
            launch(0, &[2, 2, 3], &["n", "n", "n"], &["n"], "(n + 63) / 64", "%y = add %t, %t"),
            launch(0, &[0, 0, 3], &["n", "n", "n"], &["n"], "0", "%y = add %x, %x (never launched)"),
        ],
        symbols: vec![("n".into(), 1, 256)],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("y".into(), 3), ("y_tail".into(), 4)],
        arch: String::new(),
        cpu_features: vec![],
        ptx: vec![PtxModule { arch: "sm_80".into(), file: "kernels.sm_80.ptx".into() }],
        kv_cache: None,
    };
    let sig = Signature {
        inputs: vec![sig_of("x", "f32", &["n"])],
        outputs: vec![sig_of("y", "f32", &["n"]), sig_of("y_tail", "f32", &["n - 1"])],
        symbols: [("n".to_string(), Bounds { min: 1, max: 256 })].into_iter().collect(),
    };
    (plan, sig)
}

/// The weights file: 64 bytes of padding, then w[i] = i / 4 for 256 floats.
fn weights() -> (Vec<f32>, Vec<u8>) {
    let w: Vec<f32> = (0..256).map(|i| i as f32 / 4.0).collect();
    let mut bytes = vec![0u8; 64];
    bytes.extend(w.iter().flat_map(|v| v.to_le_bytes()));
    (w, bytes)
}

/// A toy decoder with the decoder-with-past signature: the cache holds
/// every token seen (as f32), and the last position's logits are one-hot
/// at (sum of the tokens seen) mod 10.
fn decoder_plan() -> (NativePlan, Signature) {
    let plan = NativePlan {
        library: String::new(),
        weights: "weights.bin".into(),
        kernels: vec![
            kernel("smelt_test_ids_to_f32", &[Elem::I64, Elem::F32], 1),
            kernel("smelt_test_concat", &[Elem::F32, Elem::F32, Elem::F32], 2),
            kernel("smelt_test_logits", &[Elem::F32, Elem::F32], 2),
        ],
        buffers: vec![
            buf("input_ids", Elem::I64, &["batch", "seq"], Storage::Input { name: "input_ids".into() }),
            buf(
                "past",
                Elem::F32,
                &["batch", "1", "past", "1"],
                Storage::Input { name: "past_key_values.0.key".into() },
            ),
            buf("new", Elem::F32, &["batch", "1", "seq", "1"], Storage::Arena),
            buf("present", Elem::F32, &["batch", "1", "past + seq", "1"], Storage::Arena),
            buf("logits", Elem::F32, &["batch", "seq", "10"], Storage::Arena),
        ],
        launches: vec![
            launch(0, &[0, 2], &["seq", "seq"], &["seq"], "(seq + 63) / 64", "%new = cast %input_ids"),
            launch(
                1,
                &[1, 2, 3],
                &["past", "seq", "past + seq"],
                &["past", "seq"],
                "(past + seq + 63) / 64",
                "%present = concat %past, %new",
            ),
            launch(2, &[3, 4], &["past + seq", "10*seq"], &["past + seq", "seq"], "(10*seq + 63) / 64", "%logits"),
        ],
        symbols: vec![("batch".into(), 1, 1), ("seq".into(), 1, 64), ("past".into(), 0, 64)],
        inputs: vec![("input_ids".into(), 0), ("past_key_values.0.key".into(), 1)],
        outputs: vec![("logits".into(), 4), ("present.0.key".into(), 3)],
        arch: String::new(),
        cpu_features: vec![],
        ptx: vec![PtxModule { arch: "sm_80".into(), file: "kernels.sm_80.ptx".into() }],
        kv_cache: None,
    };
    let sig = Signature {
        inputs: vec![
            sig_of("input_ids", "i64", &["batch", "seq"]),
            sig_of("past_key_values.0.key", "f32", &["batch", "1", "past", "1"]),
        ],
        outputs: vec![
            sig_of("logits", "f32", &["batch", "seq", "10"]),
            sig_of("present.0.key", "f32", &["batch", "1", "past + seq", "1"]),
        ],
        symbols: [
            ("batch".to_string(), Bounds { min: 1, max: 1 }),
            ("seq".to_string(), Bounds { min: 1, max: 64 }),
            ("past".to_string(), Bounds { min: 0, max: 64 }),
        ]
        .into_iter()
        .collect(),
    };
    (plan, sig)
}

/// Writes the weights and the PTX into `dir`.
fn artifact_dir(dir: &Path) {
    std::fs::write(dir.join("weights.bin"), weights().1).unwrap();
    std::fs::write(dir.join("kernels.sm_80.ptx"), PTX).unwrap();
}

fn xs(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 100.0 - 5.0).collect()
}

fn x_input(x: &[f32]) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert("x".to_string(), Tensor::from_f32(DType::F32, vec![x.len()], x.to_vec()).unwrap());
    m
}

fn vadd_checked(plan: NativePlan, sig: Signature) -> Result<CudaPlan, CudaError> {
    CudaPlan::new(plan, sig, weights().1.len())
}

/// The GPU, or why the GPU tests are skipped.
fn gpu() -> Option<String> {
    match probe(0) {
        Ok(info) => {
            println!("running on {info}");
            Some(info.name)
        }
        Err(e) => {
            println!("skipped: no GPU to run on ({e})");
            None
        }
    }
}

// ---- Without a GPU -------------------------------------------------------

#[test]
fn plans_are_checked_on_the_host() {
    let (plan, sig) = vadd_plan();
    let p = vadd_checked(plan.clone(), sig.clone()).unwrap();
    assert_eq!(p.choose_module(9, 0).unwrap().arch, "sm_80");
    let prep = p.prepare(&x_input(&xs(100, 1)), &BTreeMap::new()).unwrap();
    assert_eq!(prep.grids, vec![Some((2, 1, 1)), Some((2, 1, 1)), None]);
    assert_eq!(prep.sizes.scalars, vec![100, 100, 100]);
    assert_eq!(prep.sizes.lens, vec![100, 256, 100, 100, 99]);
    assert_eq!(prep.sizes.elem_offsets[4], 1);

    // A kernel without a block, or with one the hardware refuses.
    let mut bad = plan.clone();
    bad.kernels[0].block = None;
    let e = vadd_checked(bad, sig.clone()).unwrap_err().to_string();
    assert_eq!(e, "invalid launch plan: kernel `smelt_test_add` has no thread block (is it a CPU kernel?)");
    let mut bad = plan.clone();
    bad.kernels[0].block = Some([64, 32, 1]);
    let e = vadd_checked(bad, sig.clone()).unwrap_err().to_string();
    assert!(e.contains("has thread block [64, 32, 1]") && e.contains("at most 1024 threads"), "{e}");
    let mut bad = plan.clone();
    bad.kernels[0].block = Some([0, 1, 1]);
    assert!(vadd_checked(bad, sig.clone()).is_err());

    // A launch without a grid, or with one that does not parse.
    let mut bad = plan.clone();
    bad.launches[1].grid = None;
    let e = vadd_checked(bad, sig.clone()).unwrap_err().to_string();
    assert_eq!(e, "invalid launch plan: launch 1 (`%y = add %t, %t`) of kernel `smelt_test_add` has no grid");
    let mut bad = plan.clone();
    bad.launches[0].grid = Some(["n +".into(), "1".into(), "1".into()]);
    let e = vadd_checked(bad, sig.clone()).unwrap_err().to_string();
    assert!(e.starts_with("invalid launch plan: launch 0 (`%t = add %x, %w`): grid: cannot parse dim"), "{e}");

    // A grid whose value is out of range for these inputs.
    let mut bad = plan.clone();
    bad.launches[0].grid = Some(["1".into(), "n * 1000".into(), "1".into()]);
    let p = vadd_checked(bad, sig.clone()).unwrap();
    p.prepare(&x_input(&xs(65, 1)), &BTreeMap::new()).unwrap();
    let e = p.prepare(&x_input(&xs(66, 1)), &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.starts_with("launch 0 (`%t = add %x, %w`, kernel `smelt_test_add`): grid axis 1 = 66000"), "{e}");

    // A PTX module for an unknown architecture.
    let mut bad = plan.clone();
    bad.ptx[0].arch = "compute_90".into();
    let e = vadd_checked(bad, sig.clone()).unwrap_err().to_string();
    assert!(e.contains("`compute_90` is not a GPU architecture"), "{e}");
}

#[test]
fn launches_that_do_not_fit_are_refused_before_any_launch() {
    let (mut plan, sig) = vadd_plan();
    // The second launch writes one element more than `y` has.
    plan.launches[1].needs[2] = "n + 1".into();
    let p = vadd_checked(plan, sig.clone()).unwrap();
    let e = p.prepare(&x_input(&xs(10, 1)), &BTreeMap::new()).unwrap_err();
    assert!(matches!(&e, CudaError::Native(smelt_runtime::native::NativeError::Launch { launch: 1, .. })), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("%y = add %t, %t") && msg.contains("needs 11") && msg.contains("`y` has 10"), "{msg}");

    // A weight read past its 256 elements, for n beyond them: the plan's
    // bound on n lets it happen, the sizes catch it.
    let (mut plan, mut sig) = vadd_plan();
    plan.symbols = vec![("n".into(), 1, 300)];
    sig.symbols.insert("n".into(), Bounds { min: 1, max: 300 });
    let p = vadd_checked(plan, sig).unwrap();
    p.prepare(&x_input(&xs(256, 1)), &BTreeMap::new()).unwrap();
    let e = p.prepare(&x_input(&xs(257, 1)), &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.contains("argument 1 needs 257 elements (`n`) but buffer `w` has 256"), "{e}");

    // Bad inputs get the CPU runtime's messages.
    let (plan, sig) = vadd_plan();
    let p = vadd_checked(plan, sig).unwrap();
    let e = p.prepare(&x_input(&xs(257, 1)), &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.starts_with("symbol `n` = 257 (from input `x` axis 0) is outside its declared bounds"), "{e}");
    let e = p.prepare(&BTreeMap::new(), &BTreeMap::new()).unwrap_err().to_string();
    assert_eq!(e, "missing input `x` (expected f32[n])");
}

#[test]
fn a_decoder_plan_keeps_its_cache_on_the_device() {
    let (plan, sig) = decoder_plan();
    let p = CudaPlan::new(plan.clone(), sig.clone(), 0).unwrap();
    let layout = p.cache_layout().expect("a cache layout");
    assert_eq!(layout.pairs.len(), 1);
    assert_eq!((layout.pairs[0].past_buf, layout.pairs[0].present_buf, layout.logits), (1, 3, 4));
    assert_eq!(layout.present_roots, vec![3]);
    // With the past given by shape only (resident), the symbols still bind.
    let mut inputs = BTreeMap::new();
    inputs.insert("input_ids".to_string(), Tensor::from_i64(DType::I64, vec![1, 1], vec![4]).unwrap());
    let resident: BTreeMap<String, Vec<usize>> =
        [("past_key_values.0.key".to_string(), vec![1, 1, 7, 1])].into_iter().collect();
    let prep = p.prepare(&inputs, &resident).unwrap();
    assert_eq!(prep.sizes.syms["past"], 7);
    assert_eq!(prep.sizes.lens[3], 8);

    // A present that is not computed into scratch memory (here: an input)
    // cannot be kept on the device.
    let (mut plan2, sig2) = decoder_plan();
    plan2.outputs[1].1 = 0;
    let p = CudaPlan::new(plan2, sig2, 0).unwrap();
    assert!(p.cache_layout().is_none());
}

#[test]
fn without_a_driver_or_device_opening_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    artifact_dir(dir.path());
    let (plan, sig) = vadd_plan();
    match CudaModel::open(plan.clone(), sig.clone(), dir.path()) {
        Ok(m) => println!("a GPU is present ({}); the no-driver path is not exercised here", m.device_name()),
        Err(e) => {
            let msg = e.to_string();
            println!("open without a GPU: {msg}");
            assert!(matches!(e, CudaError::NoDriver(_) | CudaError::NoDevice(_)), "{msg}");
            if !smelt_runtime::cuda::device::driver_present() {
                assert!(msg.starts_with("no CUDA driver: ") && msg.contains("libcuda.so"), "{msg}");
            }
        }
    }
    // A bad plan is refused before the driver is looked for.
    let mut bad = plan.clone();
    bad.kernels[0].block = None;
    let e = CudaModel::open(bad, sig.clone(), dir.path()).unwrap_err();
    assert!(matches!(e, CudaError::Plan(_)), "{e}");
    let mut bad = plan;
    bad.ptx[0].file = "../kernels.ptx".into();
    let e = CudaModel::open(bad, sig, dir.path()).unwrap_err().to_string();
    assert!(e.contains("is not a plain file name"), "{e}");
}

/// Device memory for the host half alone: addresses, no allocations.
#[derive(Default)]
struct FakeMemory {
    arena: usize,
    slots: Vec<[usize; 2]>,
}

const ARENA: u64 = 0x1000_0000;
const WEIGHTS: u64 = 0x2000_0000;

fn slot_addr(k: usize, slot: usize) -> u64 {
    0x3000_0000 + (2 * k + slot) as u64 * 0x100_0000
}

impl DeviceMemory for FakeMemory {
    fn weights(&self) -> u64 {
        WEIGHTS
    }

    fn arena(&mut self, bytes: usize) -> Result<u64, CudaError> {
        self.arena = self.arena.max(bytes);
        Ok(ARENA)
    }

    fn cache_slot(&mut self, k: usize, slot: usize, bytes: usize) -> Result<u64, CudaError> {
        if self.slots.len() <= k {
            self.slots.resize(k + 1, [0; 2]);
        }
        self.slots[k][slot] = self.slots[k][slot].max(bytes);
        Ok(slot_addr(k, slot))
    }
}

fn ids(v: &[i64]) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert("input_ids".to_string(), Tensor::from_i64(DType::I64, vec![1, v.len()], v.to_vec()).unwrap());
    m
}

/// Launch `li`'s arguments in the host's table: (buffer addresses, scalars).
fn launch_args(host: &Host, li: usize) -> (Vec<u64>, Vec<i64>) {
    let plan = host.plan().plan();
    let at: usize = plan.launches[..li].iter().map(|l| l.args.len() + l.scalars.len()).sum();
    let l = &plan.launches[li];
    let args = &host.args()[at..at + l.args.len() + l.scalars.len()];
    (args[..l.args.len()].to_vec(), args[l.args.len()..].iter().map(|&v| v as i64).collect())
}

#[test]
fn the_host_half_of_decode_steps_binds_the_cache_slots_in_turn() {
    let (plan, sig) = decoder_plan();
    let mut host = Host::new(CudaPlan::new(plan, sig, 0).unwrap());
    let mut mem = FakeMemory::default();
    let in_arena = |a: u64, mem: &FakeMemory| (ARENA..ARENA + mem.arena as u64).contains(&a);

    // The prompt: the past is empty (in the arena), the present goes to slot 1.
    let read = host.prepare_step(ids(&[3, 4, 1]), &mut mem).unwrap();
    let (bufs, scalars) = launch_args(&host, 1);
    assert!(in_arena(bufs[0], &mem) && in_arena(bufs[1], &mem), "{bufs:x?}");
    assert_eq!((bufs[2], scalars), (slot_addr(0, 1), vec![0, 3]));
    assert_eq!(host.grids(), &[Some((1, 1, 1)); 3]);
    assert_eq!(mem.slots[0][1], 3 * 4);
    // Only the logits' last row comes back.
    let (logits, _) = launch_args(&host, 2);
    assert_eq!((read.shape.clone(), read.ranges.clone()), (vec![1, 10], vec![(logits[1] + 2 * 10 * 4, 10)]));
    // The ids are staged for their buffer, as the kernels' i64.
    let uploads: Vec<(String, u64, Vec<u8>)> = host.uploads().map(|(n, a, b)| (n.to_string(), a, b.to_vec())).collect();
    let want: Vec<u8> = [3i64, 4, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(uploads, vec![("input_ids".to_string(), launch_args(&host, 0).0[0], want)]);
    assert_eq!(host.cached_len(), 0, "the cache changes only once the step ran");
    host.finish_step();
    assert_eq!(host.cached_len(), 3);

    // Each step reads the past from the slot the previous one wrote, and
    // writes the other.
    for (step, write) in [(0usize, 0usize), (1, 1), (2, 0)] {
        host.prepare_step(ids(&[7]), &mut mem).unwrap();
        let (bufs, scalars) = launch_args(&host, 1);
        assert_eq!(bufs[0], slot_addr(0, 1 - write), "step {step}");
        assert_eq!(bufs[2], slot_addr(0, write), "step {step}");
        assert!(in_arena(bufs[1], &mem));
        assert_eq!(scalars, vec![3 + step as i64, 1]);
        host.finish_step();
    }
    assert_eq!(host.cached_len(), 6);

    // A refused step changes nothing: the next one still reads slot 0,
    // which the last step wrote.
    let mut bad = ids(&[7]);
    bad.insert("past_key_values.0.key".into(), Tensor::full(DType::F32, vec![1, 1, 0, 1], 0.0));
    assert!(host.prepare_step(bad, &mut mem).unwrap_err().to_string().contains("takes no past key/values"));
    let e = host.prepare_step(ids(&[1; 70]), &mut mem).unwrap_err().to_string();
    assert!(e.contains("outside its declared bounds"), "{e}");
    host.prepare_step(ids(&[7]), &mut mem).unwrap();
    assert_eq!(launch_args(&host, 1).0[0], slot_addr(0, 0));
    host.finish_step();
    // The same placement served every step after the first.
    assert_eq!(host.placements_computed(), [0, 1, 1]);

    // A forward call places the present in the arena, and leaves the cache.
    let reads = host.prepare_run(ids(&[1, 2]), &mut mem).unwrap();
    let (bufs, scalars) = launch_args(&host, 1);
    assert!(bufs.iter().all(|&a| in_arena(a, &mem)), "{bufs:x?}");
    assert_eq!(scalars, vec![0, 2]);
    let names: Vec<&str> = reads.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["logits", "present.0.key"]);
    assert_eq!(reads[1].ranges, vec![(bufs[2], 2)]);
    assert_eq!(host.cached_len(), 7);
    host.reset_cache();
    assert_eq!(host.cached_len(), 0);
    host.prepare_step(ids(&[5]), &mut mem).unwrap();
    assert_eq!(launch_args(&host, 1).1, vec![0, 1]);
}

#[test]
fn the_host_half_hands_each_launch_its_parameters() {
    let (plan, sig) = vadd_plan();
    let mut host = Host::new(vadd_checked(plan, sig).unwrap());
    let mut mem = FakeMemory::default();
    host.prepare_run(x_input(&xs(100, 1)), &mut mem).unwrap();
    let mut seen = Vec::new();
    host.each_launch(|li, kernel, grid, block, params| {
        // SAFETY: each parameter points to its 8-byte value in the table.
        let values: Vec<u64> = params.iter().map(|&p| unsafe { *(p as *const u64) }).collect();
        seen.push((li, kernel, grid, block, values));
        Ok::<(), ()>(())
    })
    .unwrap();
    // The third launch has an empty grid: it is not launched.
    assert_eq!(seen.len(), 2);
    for (li, kernel, grid, block, values) in seen {
        let (bufs, scalars) = launch_args(&host, li);
        assert_eq!((kernel, grid, block), (0, (2, 1, 1), (64, 1, 1)));
        assert_eq!(values, bufs.iter().copied().chain(scalars.iter().map(|&s| s as u64)).collect::<Vec<_>>());
    }
    let (bufs, scalars) = launch_args(&host, 0);
    // x and t in the arena, w in the weights at its offset; n = 100.
    assert_eq!((bufs[1], scalars), (WEIGHTS + 64, vec![100]));
    assert_eq!(host.launched(), 2);
}

// ---- On a GPU ------------------------------------------------------------

#[test]
fn gpu_vector_add_runs_like_the_host() {
    let Some(_) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    artifact_dir(dir.path());
    let (plan, sig) = vadd_plan();
    let mut m = CudaModel::open(plan, sig, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.ptx_arch(), "sm_80");
    let (w, _) = weights();
    // Growing and shrinking n exercises arena growth and reuse.
    for (round, n) in [5usize, 256, 1, 100].into_iter().enumerate() {
        let x = xs(n, round as u64);
        let out = m.run(x_input(&x)).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<f32> = x.iter().zip(&w).map(|(a, b)| (a + b) + (a + b)).collect();
        assert_eq!(out["y"].shape, vec![n]);
        assert_eq!(out["y"].to_f32_vec(), want, "n = {n}");
        assert_eq!(out["y_tail"].to_f32_vec(), want[1..].to_vec(), "n = {n}");
    }
    // The model may move to another thread (its context goes with it).
    let x = xs(7, 9);
    let (mut m, out) = std::thread::spawn(move || {
        let out = m.run(x_input(&x)).unwrap_or_else(|e| panic!("{e}"));
        (m, out)
    })
    .join()
    .unwrap();
    let want: Vec<f32> = xs(7, 9).iter().zip(&w).map(|(a, b)| (a + b) + (a + b)).collect();
    assert_eq!(out["y"].to_f32_vec(), want);
    let stats = m.stats();
    assert_eq!((stats.calls, stats.launches, stats.skipped), (5, 10, 5));
    assert!(stats.arena_bytes >= 2 * 256 * 4, "{stats:?}");
    // Refused inputs launch nothing.
    assert!(m.run(x_input(&xs(300, 0))).is_err());
    assert_eq!(m.stats().launches, 10);
}

#[test]
fn gpu_repeated_launches_replay_as_a_graph() {
    let Some(_) = gpu() else { return };
    if std::env::var_os("SMELT_PROFILE").is_some() {
        println!("skipped: SMELT_PROFILE times each launch, so no graph is captured");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    artifact_dir(dir.path());
    let (plan, sig) = vadd_plan();
    let mut m = CudaModel::open(plan, sig, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let (w, _) = weights();
    let check = |m: &mut CudaModel, n: usize, seed: u64| {
        let x = xs(n, seed);
        let out = m.run(x_input(&x)).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<f32> = x.iter().zip(&w).map(|(a, b)| (a + b) + (a + b)).collect();
        assert_eq!(out["y"].to_f32_vec(), want, "n = {n}, seed {seed}");
    };
    // The second identical call is captured, later ones replay it; new
    // input values reach the graph (they are copied to the same addresses).
    for seed in 0..5 {
        check(&mut m, 64, seed);
    }
    assert_eq!((m.stats().calls, m.stats().launches, m.stats().graph_replays), (5, 10, 4));
    check(&mut m, 10, 9);
    assert_eq!(m.stats().graph_replays, 4, "other shapes launch directly");
    check(&mut m, 64, 10);
    assert_eq!(m.stats().graph_replays, 5, "the graph's shapes replay it again");
    m.set_graphs(false);
    check(&mut m, 64, 11);
    check(&mut m, 64, 12);
    assert_eq!(m.stats().graph_replays, 5);
}

/// Hides the model's cache, so generation moves the cache through the host.
struct HostCache<'a>(&'a mut CudaModel);

impl Forward for HostCache<'_> {
    fn signature(&self) -> &Signature {
        self.0.signature()
    }

    fn forward(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, ForwardError> {
        self.0.forward(inputs)
    }
}

fn expected(prompt: &[i64], n: usize) -> Vec<i64> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        ids.push(ids.iter().sum::<i64>() % 10);
    }
    ids
}

#[test]
fn gpu_decoding_keeps_the_cache_on_the_device() {
    let Some(_) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    artifact_dir(dir.path());
    let (plan, sig) = decoder_plan();
    let mut m = CudaModel::open(plan, sig, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let opts = GenerateOptions { max_new_tokens: 40, eos_token_ids: vec![], ..Default::default() };
    let prompt = [3, 4, 1, 9, 2];
    let want = expected(&prompt, 40);

    let through_host = generate(&mut HostCache(&mut m), &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(through_host.ids, want);
    let on_device = generate(&mut m, &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(on_device.ids, want);
    assert_eq!(m.cached_len(), prompt.len() + 39);
    let stats = m.stats();
    assert!(stats.cache_bytes >= (prompt.len() + 39) * 4, "{stats:?}");
    println!("decode: {:.3} ms per token on the device", on_device.decode_secs * 1e3 / 39.0);

    // A forward call in between neither reads nor changes the cache.
    let mut inputs = BTreeMap::new();
    inputs.insert("input_ids".to_string(), Tensor::from_i64(DType::I64, vec![1, 2], vec![1, 2]).unwrap());
    let out = m.run(inputs).unwrap();
    assert_eq!(out["present.0.key"].to_f32_vec(), vec![1.0, 2.0]);
    assert_eq!(m.cached_len(), prompt.len() + 39);
    let mut step = BTreeMap::new();
    step.insert("input_ids".to_string(), Tensor::from_i64(DType::I64, vec![1, 1], vec![7]).unwrap());
    let logits = CachedDecode::step(&mut m, step.clone()).unwrap();
    assert_eq!(logits.shape, vec![1, 10]);
    // The cache holds every token but the last generated one, then the 7.
    let sum: i64 = want[..want.len() - 1].iter().sum::<i64>() + 7;
    let hot: Vec<usize> = logits.to_f32_vec().iter().enumerate().filter(|(_, &v)| v == 1.0).map(|(i, _)| i).collect();
    assert_eq!(hot, vec![(sum % 10) as usize]);

    // A step that passes its own past is refused, and the cache is kept.
    let mut bad = step;
    bad.insert("past_key_values.0.key".into(), Tensor::full(DType::F32, vec![1, 1, 0, 1], 0.0));
    let e = CachedDecode::step(&mut m, bad).unwrap_err().to_string();
    assert!(e.contains("takes no past key/values"), "{e}");
    assert_eq!(m.cached_len(), prompt.len() + 40);
}
