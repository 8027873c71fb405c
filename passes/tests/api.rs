//! The library surface the CLI uses: the pipeline with dumps, the fusion
//! report as JSON, and explanations of fused ops.

use smelt_passes::{fusion_report, pipeline, DumpSpec, DumpTarget, FusionOptions, PipelineOptions, Weights};

fn decoder_layer() -> smelt_ir::Graph {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/filetests/passes/decoder_layer.smir");
    smelt_ir::text::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn explanations_name_the_rewrite_chain() {
    let mut g = decoder_layer();
    let mut w = Weights::new();
    let opts = PipelineOptions {
        verify_each: true,
        fusion: FusionOptions { explain: true, ..FusionOptions::default() },
        ..PipelineOptions::default()
    };
    let report = pipeline(&mut g, &mut w, &opts).unwrap();
    let attn = report.fusion.explanations.iter().find(|e| e.op == "attention").expect("an explanation for attention");
    for rule in ["softmax/stable", "attention/core", "attention/grouped-query-heads"] {
        assert!(attn.rules.iter().any(|r| r.starts_with(rule)), "{rule} missing from {:?}", attn.rules);
    }
    let arn = report.fusion.explanations.iter().find(|e| e.op == "add_rms_norm").unwrap();
    assert_eq!(arn.rules.last().map(String::as_str), Some("residual/add-rms-norm"));
    let norm = report.fusion.explanations.iter().find(|e| e.op == "rms_norm").unwrap();
    assert!(norm.rules.iter().any(|r| r.starts_with("rmsnorm/")), "{:?}", norm.rules);
    println!("{}", report.fusion.summary());
}

#[test]
fn report_is_json_and_counts_ops() {
    let mut g = decoder_layer();
    let mut w = Weights::new();
    let report = pipeline(&mut g, &mut w, &PipelineOptions::default()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&report.fusion.to_json()).unwrap();
    assert_eq!(json["fused"]["attention"], 1);
    assert_eq!(json["fused"]["rope"], 2);
    assert_eq!(json["phases"].as_array().unwrap().len(), 3);
    assert!(json["unfused"].get("reduce_mean").is_none());
    let counts = fusion_report(&g);
    assert_eq!(counts.fused, report.fusion.fused);
    assert_eq!(counts.unfused, report.fusion.unfused);
    assert!(!report.fusion.hit_limit());
}

#[test]
fn dumps_go_to_a_folder_per_stage() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = decoder_layer();
    let mut w = Weights::new();
    let opts = PipelineOptions {
        dump: Some(DumpSpec::parse("all", DumpTarget::Dir(dir.path().to_path_buf())).unwrap()),
        ..PipelineOptions::default()
    };
    pipeline(&mut g, &mut w, &opts).unwrap();
    let mut files: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    files.sort();
    assert_eq!(files.first().map(String::as_str), Some("00-input.smir"));
    assert_eq!(files.last().map(String::as_str), Some("10-kv_append.smir"));
    assert_eq!(files.len(), 11);
    let fused = std::fs::read_to_string(dir.path().join("07-fuse.smir")).unwrap();
    assert!(smelt_ir::text::parse(&fused).is_ok());
    assert!(fused.contains("= attention "));

    let one = DumpSpec::parse("fuse,cleanup", DumpTarget::Stdout).unwrap();
    assert_eq!(one.stages, Some(vec!["fuse".to_string(), "cleanup".to_string()]));
    let err = DumpSpec::parse("fusion", DumpTarget::Stdout).unwrap_err().to_string();
    assert!(err.contains("unknown stage `fusion`"), "{err}");
}

#[test]
fn runner_limits_are_reported() {
    let mut g = decoder_layer();
    let opts = FusionOptions {
        limits: smelt_passes::Limits { iterations: 1, ..smelt_passes::Limits::default() },
        ..FusionOptions::default()
    };
    let report = smelt_passes::fuse(&mut g, &opts).unwrap();
    assert!(report.hit_limit(), "{}", report.summary());
    assert!(report.summary().contains("LIMIT HIT"));
    smelt_ir::verify::verify(&g).unwrap();
}

/// Elementwise groups: single-use elementwise values of the root's shape
/// join their user's group; a broadcast operand, a second user or a graph
/// output starts a group of its own. The report lists the same groups.
#[test]
fn elementwise_groups_are_maximal_single_use_same_shape_trees() {
    let text = r#"
sym seq in [1, 8]
func @g(%x: f32[seq, 4], %y: f32[seq, 4], %s: f32[4]) -> (out, side) {
  %a = exp %x : f32[seq, 4]
  %b = neg %y : f32[seq, 4]
  %c = add %a, %b : f32[seq, 4]
  %s2 = mul %s, %s : f32[4]
  %d = mul %c, %s2 : f32[seq, 4]
  %e = tanh %d : f32[seq, 4]
  %e2 = transpose %x perm=[1, 0] : f32[4, seq]
  %t = matmul %e, %e2 : f32[seq, seq]
  %side = sigmoid %x : f32[seq, 4]
  %f = abs %side : f32[seq, 4]
  %out = matmul %t, %f : f32[seq, 4]
  return out=%out, side=%side
}
"#;
    let mut g = smelt_ir::text::parse(text).unwrap();
    let groups = smelt_passes::cleanup::elementwise_groups(&g).unwrap();
    let ops: Vec<Vec<&str>> =
        groups.iter().map(|grp| grp.iter().map(|n| g.node(*n).op.name()).collect::<Vec<_>>()).collect();
    // exp, neg -> add -> mul -> tanh is one tree; the [4]-shaped mul is
    // broadcast into it, so it is its own group; sigmoid is a graph output.
    assert!(
        ops.contains(&vec!["exp", "neg", "add", "mul", "tanh"])
            || ops.contains(&vec!["neg", "exp", "add", "mul", "tanh"]),
        "{ops:?}"
    );
    assert!(ops.contains(&vec!["mul"]), "{ops:?}");
    assert!(ops.contains(&vec!["sigmoid"]), "{ops:?}");
    assert!(ops.contains(&vec!["abs"]), "{ops:?}");
    assert_eq!(groups.len(), 4, "{ops:?}");
    let report = smelt_passes::cleanup::run(&mut g).unwrap();
    assert_eq!(report.len(), 4);
    assert!(report.iter().any(|r| r.ops.len() == 5 && r.ops.last().map(String::as_str) == Some("tanh")));
}

/// Measured kernel times decide between a gated MLP and its unfused
/// spelling (two products and the elementwise ops between them): the
/// faster measured alternative is extracted; unmeasured, the estimate
/// prefers the fused op.
#[test]
fn measured_times_choose_fused_or_unfused() {
    use smelt_passes::egraph::cost::MeasuredCosts;
    let text = r#"
func @mlp(%x: f32[seq, 8]) -> (y) {
  %wg = weight name="wg" : f32[16, 8]
  %wu = weight name="wu" : f32[16, 8]
  %tg = transpose %wg perm=[1, 0] : f32[8, 16]
  %tu = transpose %wu perm=[1, 0] : f32[8, 16]
  %g = matmul %x, %tg : f32[seq, 16]
  %s = sigmoid %g : f32[seq, 16]
  %a = mul %g, %s : f32[seq, 16]
  %u = matmul %x, %tu : f32[seq, 16]
  %y = mul %a, %u : f32[seq, 16]
  return y=%y
}
"#;
    let fused_with = |measured: Option<MeasuredCosts>| {
        let mut g = smelt_ir::text::parse(text).unwrap();
        let opts = FusionOptions { measured: measured.map(std::sync::Arc::new), ..FusionOptions::default() };
        smelt_passes::fuse(&mut g, &opts).unwrap();
        smelt_ir::verify::verify(&g).unwrap();
        let ops = smelt_passes::fuse::op_counts(&g);
        (ops.get("gated_mlp").copied().unwrap_or(0), ops.get("matmul").copied().unwrap_or(0))
    };
    let times = |gated: f64, product: f64| {
        let mut m = MeasuredCosts::default();
        m.insert(MeasuredCosts::key("gated_mlp", 8, 16), gated);
        m.insert(MeasuredCosts::key("matmul", 8, 16), product);
        m
    };
    assert_eq!(fused_with(None), (1, 0));
    // Fused 3 us against two products of 1 us: unfused is faster.
    assert_eq!(fused_with(Some(times(3e-6, 1e-6))), (0, 2));
    // Fused 1.5 us against two products of 1 us: fused is faster.
    assert_eq!(fused_with(Some(times(1.5e-6, 1e-6))), (1, 0));
    // Only the fused op measured: nothing to compare, the estimate decides.
    let mut only = MeasuredCosts::default();
    only.insert(MeasuredCosts::key("gated_mlp", 8, 16), 3e-6);
    assert_eq!(fused_with(Some(only)), (1, 0));
}
