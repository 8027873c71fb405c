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
    assert_eq!(files.last().map(String::as_str), Some("09-cleanup.smir"));
    assert_eq!(files.len(), 10);
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
