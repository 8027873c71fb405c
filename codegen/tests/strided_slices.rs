//! A slice whose only use is a transpose (through a reshape that splits
//! its last axis into heads) is not a launch of its own on the CPU: the
//! transpose copies straight from the sliced buffer, and computes what the
//! reference interpreter does. A slice with another use stays a copy.

use std::collections::BTreeMap;

use smelt_codegen::cranelift::{Arg, JitKernel};
use smelt_codegen::schedule::{schedule, ScheduleOptions};
use smelt_ir::{DType, Dim, Tensor};
use smelt_runtime::plan::Storage;

const GRAPH: &str = r#"
func @heads(%x: f32[batch, seq, 12]) -> (q, k) {
  %q0 = slice %x axes=[2] starts=[4] ends=[8] steps=[1] : f32[batch, seq, 4]
  %q1 = reshape %q0 shape=[batch, seq, 2, 2] : f32[batch, seq, 2, 2]
  %q = transpose %q1 perm=[0, 2, 1, 3] : f32[batch, 2, seq, 2]
  %k0 = slice %x axes=[2] starts=[8] ends=[12] steps=[1] : f32[batch, seq, 4]
  %k = add %k0, %k0 : f32[batch, seq, 4]
  return q=%q, k=%k
}
"#;

#[test]
fn a_transpose_reads_its_slice_from_the_sliced_buffer() {
    let g = smelt_ir::text::parse(GRAPH).unwrap();
    let s = schedule(&g, &BTreeMap::new(), ScheduleOptions::default()).unwrap();
    let nodes: Vec<&str> = s.plan.launches.iter().map(|l| l.node.as_str()).collect();
    // The key's slice feeds an add: a copy. The query's slice and reshape
    // are no launches; its transpose is.
    assert_eq!(nodes.iter().filter(|n| n.contains("= slice")).count(), 1, "{nodes:?}");
    assert_eq!(nodes.len(), 3, "the key's slice and add, the query's transpose: {nodes:?}");
    let t = s.plan.launches.iter().find(|l| l.node.contains("= transpose")).unwrap_or_else(|| panic!("{nodes:?}"));
    assert!(
        matches!(&s.plan.buffers[t.args[0]].storage, Storage::Input { name } if name == "x"),
        "the transpose reads {:?}",
        s.plan.buffers[t.args[0]]
    );

    // Run it on a batch of 2 and 3 positions against the interpreter.
    let (batch, seq) = (2usize, 3usize);
    let x: Vec<f32> = (0..batch * seq * 12).map(|i| i as f32 * 0.5 - 7.0).collect();
    let env = BTreeMap::from([("batch".to_string(), batch as i64), ("seq".to_string(), seq as i64)]);
    let scalars: Vec<i64> = t.scalars.iter().map(|d| d.parse::<Dim>().unwrap().eval_map(&env).unwrap()).collect();
    let mut q = vec![f32::NAN; batch * 2 * seq * 2];
    let j = JitKernel::compile(&s.kernels[t.kernel]).unwrap();
    j.run_part(&mut [Arg::F32(&x), Arg::F32Mut(&mut q)], &scalars, 0, 1).unwrap();
    let inputs = BTreeMap::from([("x".to_string(), Tensor::from_f32(DType::F32, vec![batch, seq, 12], x).unwrap())]);
    let want = smelt_ir::interp::run(&g, &BTreeMap::new(), &inputs).unwrap()["q"].to_f32_vec();
    assert_eq!(q, want);
}
