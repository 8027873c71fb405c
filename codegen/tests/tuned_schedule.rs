//! The scheduler with a tuning table: a weight product with a measured
//! winner is built with the winner's parameters (and weight layout), the
//! plan records per kernel how its parameters were chosen, and the tuned
//! kernel computes what the reference interpreter does.

use std::collections::BTreeMap;
use std::sync::Arc;

use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::kir::Scalar;
use smelt_codegen::schedule::{schedule, ScheduleOptions};
use smelt_codegen::select::PanelParams;
use smelt_codegen::tuning::{Lowering, Site, Tuning, Variant};
use smelt_ir::{DType, StoredTensor, Tensor};
use smelt_runtime::plan::{Storage, TuningSource};

const GRAPH: &str = r#"
func @mlp(%x: f32[seq, 16]) -> (y) {
  %w = weight name="w" : f32[24, 16]
  %wt = transpose %w perm=[1, 0] : f32[16, 24]
  %y = matmul %x, %wt : f32[seq, 24]
  return y=%y
}
"#;

fn weights() -> BTreeMap<String, StoredTensor> {
    let w: Vec<f32> = (0..24 * 16).map(|i| ((i * 7 % 23) as f32 - 11.0) / 11.0).collect();
    BTreeMap::from([(
        "w".to_string(),
        StoredTensor::from_tensor(&Tensor::from_f32(DType::F32, vec![24, 16], w).unwrap()),
    )])
}

#[test]
fn a_measured_winner_is_built_and_recorded() {
    let g = smelt_ir::text::parse(GRAPH).unwrap();
    let w = weights();
    let site = Site::weight_product(24, 16, None, Scalar::F32).unwrap();
    let signature = site.signature(&Lowering::available());

    let untuned = schedule(&g, &w, ScheduleOptions { packed_weights: true, ..ScheduleOptions::default() }).unwrap();
    let entry = |s: &smelt_codegen::schedule::Schedule| {
        let i = s.plan.launches.iter().find(|l| l.node.contains("matmul")).unwrap().kernel;
        (s.plan.kernels[i].clone(), s.kernels[i].clone())
    };
    let (e, _) = entry(&untuned);
    let t = e.tuning.unwrap();
    assert_eq!(t.source, TuningSource::Estimated);
    assert_eq!(t.site, site.to_string());
    // The estimate is the build's default panels (Cranelift's 4-lane
    // tiles, or LLVM's wider ones in the llvm build), their streams
    // balanced for this machine's cores.
    let (p, lowering) = smelt_codegen::tuning::default_panels(&Lowering::available());
    let p = p.balanced(24, smelt_codegen::tuning::host_team());
    assert_eq!(t.params, Variant::Panels { p, lowering }.to_string());

    let winner = Variant::Panels {
        p: PanelParams { mr: 3, nr: 12, ksplit: 2, fma: true, lanes: 4, streams: 1, prefetch: 0 },
        lowering: Lowering::Cranelift,
    };
    let mut tuning = Tuning::default();
    tuning.insert(&signature, winner, "sig/m=1,128 threads=2/cpu-x");
    let tuned = schedule(
        &g,
        &w,
        ScheduleOptions { packed_weights: true, tuning: Some(Arc::new(tuning)), ..ScheduleOptions::default() },
    )
    .unwrap();
    let (e, k) = entry(&tuned);
    let t = e.tuning.unwrap();
    assert_eq!(
        (t.source, t.params.as_str(), t.key.as_deref()),
        (TuningSource::Measured, winner.to_string().as_str(), Some("sig/m=1,128 threads=2/cpu-x"))
    );
    // Every other kernel is recorded as having no parameters.
    assert!(tuned
        .plan
        .kernels
        .iter()
        .filter(|k| k.symbol != e.symbol)
        .all(|k| k.tuning.as_ref().unwrap().source == TuningSource::Fixed));

    // The tuned kernel, on its packed weight (panels of 12: 2 panels, the
    // last zero-padded), gives the reference result.
    let l = tuned.plan.launches.iter().find(|l| l.node.contains("matmul")).unwrap();
    let Storage::Weight { offset } = tuned.plan.buffers[l.args[1]].storage else { panic!("weight") };
    let bytes = tuned.constants.finish().unwrap().read().unwrap();
    let packed: Vec<f32> = bytes[offset as usize..offset as usize + 24 * 16 * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let seq = 5;
    let x: Vec<f32> = (0..seq * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; seq * 24];
    let j = JitKernel::compile(&k).unwrap();
    j.run_part(&mut [Arg::F32(&x), Arg::F32(&packed), Arg::F32Mut(&mut y)], &[seq as i64], 0, 1).unwrap();
    let inputs = BTreeMap::from([("x".to_string(), Tensor::from_f32(DType::F32, vec![seq, 16], x).unwrap())]);
    let full: BTreeMap<String, Tensor> = w.iter().map(|(n, t)| (n.clone(), t.to_tensor())).collect();
    let want = smelt_ir::interp::run(&g, &full, &inputs).unwrap()["y"].to_f32_vec();
    for (a, b) in y.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn a_record_outside_the_space_or_for_another_site_is_not_used() {
    let g = smelt_ir::text::parse(GRAPH).unwrap();
    let w = weights();
    let other = Site::weight_product(24, 16, Some("silu"), Scalar::F32).unwrap();
    let mut tuning = Tuning::default();
    let v = Variant::Rows {
        t: smelt_codegen::templates::matmul_dyn::TileParams { mr: 1, nc: 1, ksplit: 1 },
        lowering: Lowering::Cranelift,
    };
    tuning.insert(&other.signature(&Lowering::available()), v, "k");
    let s = schedule(
        &g,
        &w,
        ScheduleOptions { packed_weights: true, tuning: Some(Arc::new(tuning)), ..ScheduleOptions::default() },
    )
    .unwrap();
    assert!(s.plan.kernels.iter().all(|k| k.tuning.as_ref().unwrap().source != TuningSource::Measured));
}

/// On the GPU the weight product is a tunable site too: untuned it is the
/// template's estimate (`WeightProductParams::for_shape`), and a measured
/// winner is built with its block size and grid and recorded with its key
/// (`tuning::gpu`'s tests check that such points compute the product).
#[test]
fn a_measured_gpu_winner_is_built_and_recorded() {
    use smelt_codegen::schedule::Device;
    use smelt_codegen::templates::gpu::{WeightOp, WeightProductParams, SMS};
    use smelt_codegen::tuning::GpuParams;

    let g = smelt_ir::text::parse(GRAPH).unwrap();
    let w = weights();
    let site = Site::gpu_weight_product(24, 16, None, Scalar::F32).unwrap();
    let gpu = ScheduleOptions { device: Device::Gpu, ..ScheduleOptions::default() };
    let entry = |s: &smelt_codegen::schedule::Schedule| {
        let i = s.plan.launches.iter().find(|l| l.node.contains("matmul")).unwrap().kernel;
        (s.plan.kernels[i].clone(), s.kernels[i].clone())
    };

    let untuned = schedule(&g, &w, gpu.clone()).unwrap();
    let (e, k) = entry(&untuned);
    let t = e.tuning.unwrap();
    assert_eq!((t.source, t.site.as_str()), (TuningSource::Estimated, site.to_string().as_str()));
    let default = GpuParams::default_for(24, 16, Scalar::F32, None);
    assert_eq!(t.params, Variant::Gpu { p: default }.to_string());
    let d = WeightProductParams::for_shape(&WeightOp::plain(Scalar::F32), 24, 16);
    assert_eq!(k.gpu.as_ref().unwrap().block, [d.gemv.threads() as u32, 1, 1]);

    let winner =
        GpuParams { threads: 128, wpg: 2, rpg: 1, unroll: 2, mtile: 2, gemv_max_m: 4, tile: 1, bk: 16, bps: 1 };
    let mut tuning = Tuning::default();
    // GPU signatures do not depend on the host's lowerings.
    assert_eq!(site.signature(&[]), site.signature(&Lowering::available()));
    tuning.insert(&site.signature(&[]), Variant::Gpu { p: winner }, "sig/m=1,128 gpu/gpu-x");
    let tuned = schedule(&g, &w, ScheduleOptions { tuning: Some(Arc::new(tuning)), ..gpu }).unwrap();
    let (e, k) = entry(&tuned);
    let t = e.tuning.unwrap();
    assert_eq!(
        (t.source, t.params.as_str(), t.key.as_deref()),
        (TuningSource::Measured, Variant::Gpu { p: winner }.to_string().as_str(), Some("sig/m=1,128 gpu/gpu-x"))
    );
    let grid = k.grid(&[1]).unwrap().unwrap();
    assert_eq!((k.gpu.as_ref().unwrap().block, grid), ([128, 1, 1], [SMS, 1, 1]));
    // No other kernel of the plan claims the record.
    assert!(tuned
        .plan
        .kernels
        .iter()
        .filter(|x| x.symbol != e.symbol)
        .all(|x| x.tuning.as_ref().unwrap().source != TuningSource::Measured));
}

/// A measured choice of cuBLAS for a GPU weight product makes it a library
/// GEMM whose plan entry records the choice.
#[test]
fn a_measured_cublas_choice_is_a_recorded_library_call() {
    use smelt_codegen::schedule::Device;
    let g = smelt_ir::text::parse(GRAPH).unwrap();
    let w = weights();
    let site = Site::gpu_weight_product(24, 16, None, Scalar::F32).unwrap();
    let mut tuning = Tuning::default();
    tuning.insert(&site.signature(&[]), Variant::Cublas, "sig/m=1,128 gpu/gpu-x");
    let options = ScheduleOptions { device: Device::Gpu, tuning: Some(Arc::new(tuning)), ..ScheduleOptions::default() };
    let s = schedule(&g, &w, options).unwrap();
    let l = s.plan.launches.iter().find(|l| l.node.contains("matmul")).unwrap();
    let e = &s.plan.kernels[l.kernel];
    assert!(e.library.is_some(), "{e:?}");
    let t = e.tuning.as_ref().unwrap();
    assert_eq!((t.source, t.params.as_str()), (TuningSource::Measured, "cublas"));
}
