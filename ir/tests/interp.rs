//! Tests of the reference interpreter and the fused-op decompositions:
//! hand-computed cases per op family, input and weight validation, a
//! property test per fused op (fused vs decomposed on seeded random inputs),
//! and a tiny two-layer decoder run as prefill plus greedy generation.

use smelt_ir::decompose::{decompose, decompose_all};
use smelt_ir::interp::{bind_symbols, eval_op, run, InterpError};
use smelt_ir::{Category, DType, Data, Dim, Graph, Op, Tensor, TensorType, ValueId};
use std::collections::BTreeMap;
use std::time::Instant;

// ----- helpers -----

fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(DType::F32, shape.to_vec(), v.to_vec()).unwrap()
}

fn i64t(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I64, shape.to_vec(), v.to_vec()).unwrap()
}

fn eval(op: Op, args: &[&Tensor]) -> Tensor {
    eval_op(&op, args, &BTreeMap::new()).unwrap().remove(0)
}

fn eval_err(op: Op, args: &[&Tensor]) -> String {
    eval_op(&op, args, &BTreeMap::new()).unwrap_err().to_string()
}

fn d(s: &str) -> Dim {
    s.parse().unwrap()
}

fn ty(dtype: DType, dims: &[&str]) -> TensorType {
    TensorType::new(dtype, dims.iter().map(|s| d(s)).collect())
}

fn map(entries: Vec<(&str, Tensor)>) -> BTreeMap<String, Tensor> {
    entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A small seeded xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn tensor(&mut self, dtype: DType, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| (self.uniform() * scale) as f64).collect();
        Tensor::from_f64(dtype, shape.to_vec(), v).unwrap()
    }
    fn bools(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_bool(shape.to_vec(), (0..n).map(|_| !self.next().is_multiple_of(4)).collect()).unwrap()
    }
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dtype, b.dtype, "{what}: dtypes");
    assert_eq!(a.shape, b.shape, "{what}: shapes");
    let (x, y) = (a.to_f64_vec(), b.to_f64_vec());
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        let ok = (p.is_nan() && q.is_nan()) || p == q || (p - q).abs() <= tol * p.abs().max(1.0);
        assert!(ok, "{what}: element {i} differs: {p} vs {q}");
    }
}

// ----- elementwise -----

#[test]
fn binary_ops_broadcast_like_numpy() {
    let a = f32t(&[2, 1], &[1.0, 2.0]);
    let b = f32t(&[3], &[10.0, 20.0, 30.0]);
    let c = eval(Op::Add {}, &[&a, &b]);
    assert_eq!(c.shape, vec![2, 3]);
    assert_eq!(c.to_f32_vec(), vec![11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
    let s = eval(Op::Sub {}, &[&b, &a]);
    assert_eq!(s.to_f32_vec(), vec![9.0, 19.0, 29.0, 8.0, 18.0, 28.0]);
    // A scalar against a matrix, and a [1, 3] row against a [2, 1] column.
    let k = f32t(&[], &[2.0]);
    assert_eq!(eval(Op::Mul {}, &[&c, &k]).to_f32_vec()[..2], [22.0, 42.0]);
    let row = f32t(&[1, 3], &[1.0, 2.0, 3.0]);
    assert_eq!(eval(Op::Max {}, &[&a, &row]).to_f32_vec(), vec![1.0, 2.0, 3.0, 2.0, 2.0, 3.0]);
    assert!(eval_err(Op::Add {}, &[&f32t(&[2], &[0.0; 2]), &f32t(&[3], &[0.0; 3])]).contains("broadcast"));
}

#[test]
fn max_min_propagate_nan_and_compare_is_false_on_nan() {
    let a = f32t(&[2], &[f32::NAN, 1.0]);
    let b = f32t(&[2], &[0.0, 2.0]);
    let m = eval(Op::Max {}, &[&a, &b]).to_f32_vec();
    assert!(m[0].is_nan());
    assert_eq!(m[1], 2.0);
    let lt = eval(Op::Lt {}, &[&a, &b]);
    assert_eq!(lt.data, Data::Bool(vec![false, true]));
    let ne = eval(Op::Ne {}, &[&a, &a]);
    assert_eq!(ne.data, Data::Bool(vec![true, false]));
}

#[test]
fn mod_is_floored_and_rem_truncated() {
    let a = i64t(&[4], &[7, -7, 7, -7]);
    let b = i64t(&[4], &[3, 3, -3, -3]);
    assert_eq!(eval(Op::Mod {}, &[&a, &b]).to_i64_vec(), vec![1, 2, -2, -1]);
    assert_eq!(eval(Op::Rem {}, &[&a, &b]).to_i64_vec(), vec![1, -1, 1, -1]);
    assert_eq!(eval(Op::Div {}, &[&a, &b]).to_i64_vec(), vec![2, -2, -2, 2]);
    let fa = f32t(&[4], &[7.5, -7.5, 7.5, -7.5]);
    let fb = f32t(&[4], &[2.0, 2.0, -2.0, -2.0]);
    assert_eq!(eval(Op::Mod {}, &[&fa, &fb]).to_f32_vec(), vec![1.5, 0.5, -0.5, -1.5]);
    assert_eq!(eval(Op::Rem {}, &[&fa, &fb]).to_f32_vec(), vec![1.5, -1.5, 1.5, -1.5]);
    let zero = i64t(&[1], &[0]);
    assert!(eval_err(Op::Div {}, &[&a, &zero]).contains("by zero"));
}

#[test]
fn pow_for_floats_and_integers() {
    let a = f32t(&[3], &[2.0, 4.0, -8.0]);
    let b = f32t(&[3], &[3.0, 0.5, 2.0]);
    assert_eq!(eval(Op::Pow {}, &[&a, &b]).to_f32_vec(), vec![8.0, 2.0, 64.0]);
    let ia = i64t(&[3], &[3, -2, 2]);
    let ib = i64t(&[3], &[4, 3, -1]);
    assert_eq!(eval(Op::Pow {}, &[&ia, &ib]).to_i64_vec(), vec![81, -8, 0]);
    // The result has a's dtype when b is another numeric dtype.
    let half = f32t(&[1], &[0.5]);
    assert_eq!(eval(Op::Pow {}, &[&i64t(&[1], &[9]), &half]).to_i64_vec(), vec![3]);
}

#[test]
fn integer_arithmetic_wraps_to_the_dtype() {
    let a = Tensor::from_i64(DType::I8, vec![2], vec![100, -100]).unwrap();
    let b = Tensor::from_i64(DType::I8, vec![2], vec![100, -100]).unwrap();
    assert_eq!(eval(Op::Add {}, &[&a, &b]).to_i64_vec(), vec![-56, 56]);
    let u = Tensor::from_i64(DType::U8, vec![2], vec![3, 0]).unwrap();
    let v = Tensor::from_i64(DType::U8, vec![2], vec![5, 1]).unwrap();
    assert_eq!(eval(Op::Sub {}, &[&u, &v]).to_i64_vec(), vec![254, 255]);
    assert_eq!(eval(Op::Neg {}, &[&u]).to_i64_vec(), vec![253, 0]);
}

#[test]
fn cast_truncates_and_wraps() {
    let x = f32t(&[6], &[300.7, -2.9, 2.9, -129.0, f32::NAN, 0.5]);
    assert_eq!(eval(Op::Cast { to: DType::I8 }, &[&x]).to_i64_vec(), vec![44, -2, 2, 127, 0, 0]);
    assert_eq!(eval(Op::Cast { to: DType::U8 }, &[&x]).to_i64_vec(), vec![44, 254, 2, 127, 0, 0]);
    let i = i64t(&[3], &[-1, 256, 1000]);
    assert_eq!(eval(Op::Cast { to: DType::U8 }, &[&i]).to_i64_vec(), vec![255, 0, 232]);
    assert_eq!(eval(Op::Cast { to: DType::I8 }, &[&i]).to_i64_vec(), vec![-1, 0, -24]);
    let b = eval(Op::Cast { to: DType::Bool }, &[&x]);
    assert_eq!(b.data, Data::Bool(vec![true, true, true, true, true, true]));
    let back = eval(Op::Cast { to: DType::F32 }, &[&b]);
    assert_eq!(back.to_f32_vec(), vec![1.0; 6]);
}

#[test]
fn narrow_floats_round_their_results() {
    let a = Tensor::from_f32(DType::BF16, vec![2], vec![1.0, 256.0]).unwrap();
    let b = Tensor::from_f32(DType::BF16, vec![2], vec![0.001, 1.0]).unwrap();
    // 1 + 0.001 and 256 + 1 are not bf16 values; both round back down.
    let c = eval(Op::Add {}, &[&a, &b]);
    assert_eq!(c.dtype, DType::BF16);
    assert_eq!(c.to_f32_vec(), vec![1.0, 256.0]);
    let h = Tensor::from_f32(DType::F16, vec![1], vec![2048.0]).unwrap();
    let one = Tensor::from_f32(DType::F16, vec![1], vec![1.0]).unwrap();
    assert_eq!(eval(Op::Add {}, &[&h, &one]).to_f32_vec(), vec![2048.0]);
    let x = Tensor::from_f32(DType::F32, vec![1], vec![1.0 + 1.0 / 256.0]).unwrap();
    assert_eq!(eval(Op::Cast { to: DType::BF16 }, &[&x]).to_f32_vec(), vec![1.0]);
}

#[test]
fn unary_math() {
    let x = f32t(&[6], &[0.5, 1.5, 2.5, -0.5, -1.5, 3.7]);
    assert_eq!(eval(Op::Round {}, &[&x]).to_f32_vec(), vec![0.0, 2.0, 2.0, -0.0, -2.0, 4.0]);
    assert_eq!(eval(Op::Floor {}, &[&x]).to_f32_vec(), vec![0.0, 1.0, 2.0, -1.0, -2.0, 3.0]);
    let e = eval(Op::Erf {}, &[&f32t(&[3], &[0.5, -1.0, 3.0])]).to_f32_vec();
    assert_eq!(e, vec![0.520_499_9_f32, -0.842_700_8, 0.999_977_9]);
    let s = eval(Op::Sigmoid {}, &[&f32t(&[3], &[0.0, -100.0, 100.0])]).to_f32_vec();
    assert_eq!(s, vec![0.5, (-100f64).exp() as f32, 1.0]);
    let r = eval(Op::Relu {}, &[&i64t(&[3], &[-2, 0, 5])]);
    assert_eq!(r.to_i64_vec(), vec![0, 0, 5]);
    let sg = eval(Op::Sign {}, &[&f32t(&[3], &[-3.0, 0.0, 2.0])]);
    assert_eq!(sg.to_f32_vec(), vec![-1.0, 0.0, 1.0]);
    let special = f32t(&[3], &[f32::NAN, f32::INFINITY, 1.0]);
    assert_eq!(eval(Op::IsNan {}, &[&special]).data, Data::Bool(vec![true, false, false]));
    assert_eq!(eval(Op::IsInf {}, &[&special]).data, Data::Bool(vec![false, true, false]));
    assert!(eval_err(Op::Exp {}, &[&i64t(&[1], &[1])]).contains("float"));
}

#[test]
fn where_broadcasts_all_three() {
    let c = Tensor::from_bool(vec![2, 1], vec![true, false]).unwrap();
    let a = f32t(&[3], &[1.0, 2.0, 3.0]);
    let b = f32t(&[], &[-1.0]);
    let w = eval(Op::Where {}, &[&c, &a, &b]);
    assert_eq!(w.shape, vec![2, 3]);
    assert_eq!(w.to_f32_vec(), vec![1.0, 2.0, 3.0, -1.0, -1.0, -1.0]);
}

// ----- reductions -----

#[test]
fn reductions_keepdims_and_identity() {
    let x = f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let s = eval(Op::ReduceSum { axes: vec![1], keepdims: true }, &[&x]);
    assert_eq!((s.shape.clone(), s.to_f32_vec()), (vec![2, 1], vec![6.0, 15.0]));
    let m = eval(Op::ReduceMean { axes: vec![0], keepdims: false }, &[&x]);
    assert_eq!((m.shape.clone(), m.to_f32_vec()), (vec![3], vec![2.5, 3.5, 4.5]));
    let all = eval(Op::ReduceProd { axes: vec![0, -1], keepdims: false }, &[&x]);
    assert_eq!((all.shape.clone(), all.to_f32_vec()), (vec![], vec![720.0]));
    let id = eval(Op::ReduceMax { axes: vec![], keepdims: false }, &[&x]);
    assert_eq!(id, x);
    let n = f32t(&[3], &[1.0, f32::NAN, 3.0]);
    let mx = eval(Op::ReduceMax { axes: vec![0], keepdims: false }, &[&n]);
    assert!(mx.to_f32_vec()[0].is_nan());
    let i = i64t(&[3], &[-7, 2, 4]);
    let im = eval(Op::ReduceMean { axes: vec![0], keepdims: false }, &[&i]);
    assert_eq!(im.to_i64_vec(), vec![0]);
}

#[test]
fn sums_accumulate_in_f64() {
    // 1 + 2^-24 * 4 in f32 steps would stay 1.0; the f64 sum keeps it.
    let x = f32t(&[5], &[1.0, 5.96e-8, 5.96e-8, 5.96e-8, 5.96e-8]);
    let s = eval(Op::ReduceSum { axes: vec![0], keepdims: false }, &[&x]);
    assert!(s.to_f32_vec()[0] > 1.0);
}

#[test]
fn argmax_takes_the_first_maximum() {
    let x = f32t(&[2, 4], &[1.0, 3.0, 3.0, 0.0, 5.0, 5.0, 5.0, 5.0]);
    let a = eval(Op::ArgMax { axis: 1, keepdims: false }, &[&x]);
    assert_eq!((a.dtype, a.to_i64_vec()), (DType::I64, vec![1, 0]));
    let k = eval(Op::ArgMax { axis: 0, keepdims: true }, &[&x]);
    assert_eq!((k.shape.clone(), k.to_i64_vec()), (vec![1, 4], vec![1, 1, 1, 1]));
}

#[test]
fn cumsum_exclusive_and_reverse() {
    let x = i64t(&[2, 3], &[1, 2, 3, 4, 5, 6]);
    let cs = |exclusive, reverse| eval(Op::CumSum { axis: 1, exclusive, reverse }, &[&x]).to_i64_vec();
    assert_eq!(cs(false, false), vec![1, 3, 6, 4, 9, 15]);
    assert_eq!(cs(true, false), vec![0, 1, 3, 0, 4, 9]);
    assert_eq!(cs(false, true), vec![6, 5, 3, 15, 11, 6]);
    assert_eq!(cs(true, true), vec![5, 3, 0, 11, 6, 0]);
    let f = eval(
        Op::CumSum { axis: 0, exclusive: false, reverse: false },
        &[&f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])],
    );
    assert_eq!(f.to_f32_vec(), vec![1.0, 2.0, 3.0, 5.0, 7.0, 9.0]);
}

// ----- matmul -----

#[test]
fn matmul_vectors_and_matrices() {
    let a = f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f32t(&[3, 2], &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
    let c = eval(Op::MatMul {}, &[&a, &b]);
    assert_eq!((c.shape.clone(), c.to_f32_vec()), (vec![2, 2], vec![58.0, 64.0, 139.0, 154.0]));
    let v = f32t(&[3], &[1.0, 0.0, -1.0]);
    let av = eval(Op::MatMul {}, &[&a, &v]);
    assert_eq!((av.shape.clone(), av.to_f32_vec()), (vec![2], vec![-2.0, -2.0]));
    let vb = eval(Op::MatMul {}, &[&v, &b]);
    assert_eq!((vb.shape.clone(), vb.to_f32_vec()), (vec![2], vec![-4.0, -4.0]));
    let vv = eval(Op::MatMul {}, &[&v, &v]);
    assert_eq!((vv.shape.clone(), vv.to_f32_vec()), (vec![], vec![2.0]));
    let ia = i64t(&[1, 2], &[3, 4]);
    let ib = i64t(&[2, 1], &[5, 6]);
    assert_eq!(eval(Op::MatMul {}, &[&ia, &ib]).to_i64_vec(), vec![39]);
}

#[test]
fn matmul_broadcasts_batch_dims() {
    // a: [2, 1, 1, 2] (two batches of a 1x2 row), b: [3, 2, 1] (three 2x1 columns).
    let a = f32t(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f32t(&[3, 2, 1], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    let c = eval(Op::MatMul {}, &[&a, &b]);
    assert_eq!(c.shape, vec![2, 3, 1, 1]);
    // Row [1,2] against columns (1,0), (0,1), (1,1); then row [3,4].
    assert_eq!(c.to_f32_vec(), vec![1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
    // A batched left operand against a plain matrix.
    let m = f32t(&[2, 1], &[2.0, 3.0]);
    let c2 = eval(Op::MatMul {}, &[&a, &m]);
    assert_eq!((c2.shape.clone(), c2.to_f32_vec()), (vec![2, 1, 1, 1], vec![8.0, 18.0]));
}

// ----- movement -----

#[test]
fn transpose_reshape_squeeze_unsqueeze_expand() {
    let x = f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let t = eval(Op::Transpose { perm: vec![1, 0] }, &[&x]);
    assert_eq!((t.shape.clone(), t.to_f32_vec()), (vec![3, 2], vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]));
    let r = eval(Op::Reshape { shape: vec![Dim::c(3), Dim::c(1), Dim::c(2)] }, &[&x]);
    assert_eq!(r.shape, vec![3, 1, 2]);
    let s = eval(Op::Squeeze { axes: vec![1] }, &[&r]);
    assert_eq!(s.shape, vec![3, 2]);
    let u = eval(Op::Unsqueeze { axes: vec![0, -1] }, &[&x]);
    assert_eq!(u.shape, vec![1, 2, 3, 1]);
    let e = eval(Op::Expand { shape: vec![Dim::c(2), Dim::c(1), Dim::c(3)] }, &[&f32t(&[2, 1], &[1.0, 2.0])]);
    assert_eq!((e.shape.clone(), e.to_f32_vec()), (vec![2, 2, 3], [[1.0; 3], [2.0; 3], [1.0; 3], [2.0; 3]].concat()));
    assert!(eval_err(Op::Squeeze { axes: vec![0] }, &[&x]).contains("not 1"));
}

#[test]
fn slice_positive_and_negative_steps() {
    let x = i64t(&[2, 5], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let sl = |starts: Vec<i64>, ends: Vec<i64>, steps: Vec<i64>| {
        let op = Op::Slice {
            axes: vec![1],
            starts: starts.into_iter().map(Dim::c).collect(),
            ends: ends.into_iter().map(Dim::c).collect(),
            steps,
        };
        eval_op(&op, &[&x], &BTreeMap::new())
    };
    let a = sl(vec![1], vec![5], vec![2]).unwrap().remove(0);
    assert_eq!((a.shape.clone(), a.to_i64_vec()), (vec![2, 2], vec![1, 3, 6, 8]));
    // Reversed through element 0: end -1.
    let b = sl(vec![4], vec![-1], vec![-1]).unwrap().remove(0);
    assert_eq!(b.to_i64_vec(), vec![4, 3, 2, 1, 0, 9, 8, 7, 6, 5]);
    let c = sl(vec![4], vec![0], vec![-2]).unwrap().remove(0);
    assert_eq!(c.to_i64_vec(), vec![4, 2, 9, 7]);
    let empty = sl(vec![3], vec![1], vec![1]).unwrap().remove(0);
    assert_eq!(empty.shape, vec![2, 0]);
    assert!(sl(vec![0], vec![6], vec![1]).is_err());
    assert!(sl(vec![5], vec![0], vec![-1]).is_err());
}

#[test]
fn concat_along_middle_axis() {
    let a = f32t(&[2, 1], &[1.0, 2.0]);
    let b = f32t(&[2, 2], &[3.0, 4.0, 5.0, 6.0]);
    let c = eval(Op::Concat { axis: -1 }, &[&a, &b]);
    assert_eq!((c.shape.clone(), c.to_f32_vec()), (vec![2, 3], vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]));
    let k = eval(Op::KvAppend { axis: 1 }, &[&a, &b]);
    assert_eq!(k, c);
}

#[test]
fn gather_counts_negative_indices_from_the_end() {
    let x = f32t(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = i64t(&[2, 2], &[0, -1, 2, 1]);
    let g = eval(Op::Gather { axis: 0 }, &[&x, &idx]);
    assert_eq!(g.shape, vec![2, 2, 2]);
    assert_eq!(g.to_f32_vec(), vec![1.0, 2.0, 5.0, 6.0, 5.0, 6.0, 3.0, 4.0]);
    let g1 = eval(Op::Gather { axis: 1 }, &[&x, &i64t(&[], &[-2])]);
    assert_eq!((g1.shape.clone(), g1.to_f32_vec()), (vec![3], vec![1.0, 3.0, 5.0]));
    let e = eval_err(Op::Gather { axis: 0 }, &[&x, &i64t(&[1], &[3])]);
    assert!(e.contains("gather") && e.contains("out of range"), "{e}");
    assert!(eval_op(&Op::Gather { axis: 0 }, &[&x, &i64t(&[1], &[-4])], &BTreeMap::new()).is_err());
}

#[test]
fn gather_and_scatter_elements() {
    let x = f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = i64t(&[2, 2], &[2, 0, -1, 1]);
    let g = eval(Op::GatherElements { axis: 1 }, &[&x, &idx]);
    assert_eq!(g.to_f32_vec(), vec![3.0, 1.0, 6.0, 5.0]);
    let upd = f32t(&[2, 2], &[10.0, 20.0, 30.0, 40.0]);
    let s = eval(Op::ScatterElements { axis: 1 }, &[&x, &idx, &upd]);
    assert_eq!(s.to_f32_vec(), vec![20.0, 2.0, 10.0, 4.0, 40.0, 30.0]);
    let i0 = i64t(&[1, 3], &[1, 0, 1]);
    let u0 = f32t(&[1, 3], &[7.0, 8.0, 9.0]);
    let s0 = eval(Op::ScatterElements { axis: 0 }, &[&x, &i0, &u0]);
    assert_eq!(s0.to_f32_vec(), vec![1.0, 8.0, 3.0, 7.0, 5.0, 9.0]);
    assert!(eval_err(Op::GatherElements { axis: 1 }, &[&x, &i64t(&[1, 1], &[3])]).contains("out of range"));
}

#[test]
fn scatter_nd_replaces_slices() {
    let x = f32t(&[3, 2], &[0.0; 6]);
    let idx = i64t(&[2, 1], &[2, 0]);
    let upd = f32t(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let s = eval(Op::ScatterNd {}, &[&x, &idx, &upd]);
    assert_eq!(s.to_f32_vec(), vec![3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
    let idx2 = i64t(&[2, 2], &[0, 1, -1, 0]);
    let upd2 = f32t(&[2], &[5.0, 6.0]);
    let s2 = eval(Op::ScatterNd {}, &[&x, &idx2, &upd2]);
    assert_eq!(s2.to_f32_vec(), vec![0.0, 5.0, 0.0, 0.0, 6.0, 0.0]);
}

#[test]
fn trilu_keeps_a_triangle() {
    let x = i64t(&[3, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let tri = |upper, k: i64| eval(Op::Trilu { upper, k: Dim::c(k) }, &[&x]).to_i64_vec();
    assert_eq!(tri(true, 0), vec![1, 2, 3, 0, 5, 6, 0, 0, 9]);
    assert_eq!(tri(true, 1), vec![0, 2, 3, 0, 0, 6, 0, 0, 0]);
    assert_eq!(tri(false, 0), vec![1, 0, 0, 4, 5, 0, 7, 8, 9]);
    assert_eq!(tri(false, -1), vec![0, 0, 0, 4, 0, 0, 7, 8, 0]);
    let b = Tensor::from_bool(vec![2, 2], vec![true; 4]).unwrap();
    let tb = eval(Op::Trilu { upper: false, k: Dim::c(0) }, &[&b]);
    assert_eq!(tb.data, Data::Bool(vec![true, false, true, true]));
}

#[test]
fn sources_use_bound_symbols() {
    let syms: BTreeMap<String, i64> = [("past".to_string(), 2), ("seq".to_string(), 3)].into();
    let r = Op::Range { start: d("past"), end: d("past + seq"), step: 1, dtype: DType::I64 };
    assert_eq!(eval_op(&r, &[], &syms).unwrap()[0].to_i64_vec(), vec![2, 3, 4]);
    let down = Op::Range { start: Dim::c(5), end: Dim::c(0), step: -2, dtype: DType::F32 };
    assert_eq!(eval_op(&down, &[], &syms).unwrap()[0].to_f32_vec(), vec![5.0, 3.0, 1.0]);
    let f = Op::Fill { shape: vec![d("seq"), Dim::c(2)], value: 1.5, dtype: DType::F32 };
    let t = eval_op(&f, &[], &syms).unwrap().remove(0);
    assert_eq!((t.shape.clone(), t.to_f32_vec()), (vec![3, 2], vec![1.5; 6]));
    let neg = Op::Fill { shape: vec![d("seq - 4")], value: 0.0, dtype: DType::F32 };
    assert!(eval_op(&neg, &[], &syms).unwrap_err().to_string().contains("negative"));
    let tri = Op::Trilu { upper: false, k: d("past - 2") };
    let ones = f32t(&[2, 2], &[1.0; 4]);
    assert_eq!(eval_op(&tri, &[&ones], &syms).unwrap()[0].to_f32_vec(), vec![1.0, 0.0, 1.0, 1.0]);
}

// ----- graphs and validation -----

/// input_ids [batch, seq], attention_mask [batch, past + seq], past [batch, past, 4].
fn signature_graph() -> Graph {
    let mut g = Graph::new("sig");
    g.declare_symbol("seq", 1, 8);
    g.declare_symbol("past", 0, 16);
    let ids = g.add_input("input_ids", ty(DType::I64, &["batch", "seq"]));
    let mask = g.add_input("attention_mask", ty(DType::I64, &["batch", "past + seq"]));
    g.add_input("past", ty(DType::F32, &["batch", "past", "4"]));
    let s = g.add(Op::ReduceSum { axes: vec![1], keepdims: false }, &[mask]).unwrap();
    g.set_output("mask_sum", s);
    g.set_output("ids", ids);
    g
}

fn signature_inputs(batch: usize, seq: usize, past: usize, mask_len: usize) -> BTreeMap<String, Tensor> {
    map(vec![
        ("input_ids", i64t(&[batch, seq], &vec![1; batch * seq])),
        ("attention_mask", i64t(&[batch, mask_len], &vec![1; batch * mask_len])),
        ("past", f32t(&[batch, past, 4], &vec![0.0; batch * past * 4])),
    ])
}

#[test]
fn binds_symbols_including_sums() {
    let g = signature_graph();
    let syms = bind_symbols(&g, &signature_inputs(2, 3, 4, 7)).unwrap();
    assert_eq!(syms, [("batch".into(), 2), ("past".into(), 4), ("seq".into(), 3)].into());
    let out = run(&g, &BTreeMap::new(), &signature_inputs(2, 3, 4, 7)).unwrap();
    assert_eq!(out["mask_sum"].to_i64_vec(), vec![7, 7]);
    // past is solved from past + seq when no input carries it alone.
    let mut g2 = Graph::new("solve");
    g2.add_input("ids", ty(DType::I64, &["seq"]));
    g2.add_input("mask", ty(DType::I64, &["past + seq"]));
    let syms = bind_symbols(&g2, &map(vec![("ids", i64t(&[2], &[0, 0])), ("mask", i64t(&[5], &[0; 5]))])).unwrap();
    assert_eq!(syms["past"], 3);
}

#[test]
fn validation_errors_name_what_is_wrong() {
    let g = signature_graph();
    let err = |inputs: BTreeMap<String, Tensor>| run(&g, &BTreeMap::new(), &inputs).unwrap_err();

    let mut missing = signature_inputs(1, 2, 0, 2);
    missing.remove("past");
    let e = err(missing);
    assert!(matches!(e, InterpError::MissingInput { .. }));
    assert_eq!(e.to_string(), "missing input `past` (expected f32[batch, past, 4])");

    let mut unknown = signature_inputs(1, 2, 0, 2);
    unknown.insert("position_ids".into(), i64t(&[1], &[0]));
    let e = err(unknown);
    assert!(matches!(e, InterpError::UnknownInput { .. }));
    let msg = e.to_string();
    assert!(msg.contains("`position_ids`") && msg.contains("`input_ids`, `attention_mask`, `past`"), "{msg}");

    let mut dtype = signature_inputs(1, 2, 0, 2);
    dtype.insert("input_ids".into(), Tensor::from_i64(DType::I32, vec![1, 2], vec![0, 0]).unwrap());
    let e = err(dtype);
    assert_eq!(e.to_string(), "input `input_ids`: expected dtype i64, found i32");

    let mut rank = signature_inputs(1, 2, 0, 2);
    rank.insert("input_ids".into(), i64t(&[2], &[0, 0]));
    let e = err(rank);
    assert!(matches!(e, InterpError::InputRank { .. }), "{e}");
    assert!(e.to_string().contains("expected rank 2"), "{e}");

    // batch is 1 from input_ids but 2 in the mask.
    let mut inconsistent = signature_inputs(1, 2, 0, 2);
    inconsistent.insert("attention_mask".into(), i64t(&[2, 2], &[1; 4]));
    let e = err(inconsistent);
    assert_eq!(
        e.to_string(),
        "input `attention_mask` axis 0: expected batch = 1 (bound by input `input_ids` axis 0), found 2"
    );

    let e = err(signature_inputs(1, 3, 4, 6));
    assert_eq!(e.to_string(), "input `attention_mask` axis 1: expected past + seq = 7, found 6");

    let e = err(signature_inputs(1, 9, 0, 9));
    assert!(matches!(e, InterpError::SymbolOutOfBounds { .. }));
    assert_eq!(e.to_string(), "symbol `seq` = 9 (from input `input_ids` axis 1) is outside its declared bounds [1, 8]");

    let mut constant = signature_inputs(1, 2, 1, 3);
    constant.insert("past".into(), f32t(&[1, 1, 3], &[0.0; 3]));
    let e = err(constant);
    assert_eq!(e.to_string(), "input `past` axis 2: expected 4, found 3");

    let mut malformed = signature_inputs(1, 2, 0, 2);
    malformed.insert("input_ids".into(), Tensor { dtype: DType::I64, shape: vec![1, 2], data: Data::I64(vec![0]) });
    assert!(matches!(err(malformed), InterpError::BadInput { .. }));
}

#[test]
fn weights_are_checked_against_declared_types() {
    let mut g = Graph::new("w");
    let x = g.add_input("x", ty(DType::F32, &["seq", "4"]));
    let w = g.add_weight("proj", TensorType::fixed(DType::F32, &[4, 2]));
    let y = g.add(Op::MatMul {}, &[x, w]).unwrap();
    g.set_output("y", y);
    let inputs = map(vec![("x", f32t(&[1, 4], &[1.0, 2.0, 3.0, 4.0]))]);
    let e = run(&g, &BTreeMap::new(), &inputs).unwrap_err();
    assert_eq!(e.to_string(), "missing weight `proj` (expected f32[4, 2])");
    let e = run(&g, &map(vec![("proj", f32t(&[2, 4], &[0.0; 8]))]), &inputs).unwrap_err();
    assert_eq!(e.to_string(), "weight `proj`: expected f32[4, 2], found f32[2, 4]");
    let bf = Tensor::from_f32(DType::BF16, vec![4, 2], vec![0.0; 8]).unwrap();
    assert!(run(&g, &map(vec![("proj", bf)]), &inputs).is_err());
    let ok =
        map(vec![("proj", f32t(&[4, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])), ("unused", f32t(&[1], &[0.0]))]);
    assert_eq!(run(&g, &ok, &inputs).unwrap()["y"].to_f32_vec(), vec![4.0, 6.0]);
}

#[test]
fn runtime_op_errors_name_the_node() {
    let mut g = Graph::new("e");
    let table = g.add_weight("embed", TensorType::fixed(DType::F32, &[4, 2]));
    let ids = g.add_input("ids", ty(DType::I64, &["seq"]));
    let h = g.add_labeled(Op::Gather { axis: 0 }, &[table, ids], Some("model.embed")).unwrap();
    g.set_output("h", h);
    let w = map(vec![("embed", f32t(&[4, 2], &[0.0; 8]))]);
    let e = run(&g, &w, &map(vec![("ids", i64t(&[2], &[1, 9]))])).unwrap_err();
    assert_eq!(e.to_string(), "op `gather` at `model.embed`: index along axis 0 9 is out of range for a dim of size 4");
    let ok = run(&g, &w, &map(vec![("ids", i64t(&[2], &[1, -1]))])).unwrap();
    assert_eq!(ok["h"].shape, vec![2, 2]);
}

#[test]
fn only_needed_nodes_run() {
    // A dead node that would fail does not stop the run.
    let mut g = Graph::new("dead");
    let x = g.add_input("x", ty(DType::I64, &["2"]));
    let zero = g.add(Op::Constant { value: i64t(&[], &[0]) }, &[]).unwrap();
    g.add(Op::Div {}, &[x, zero]).unwrap();
    let n = g.add(Op::Neg {}, &[x]).unwrap();
    g.set_output("n", n);
    let out = run(&g, &BTreeMap::new(), &map(vec![("x", i64t(&[2], &[1, 2]))])).unwrap();
    assert_eq!(out["n"].to_i64_vec(), vec![-1, -2]);
}

// ----- fused ops against their decompositions -----

/// Builds a graph with one input per operand and the op, runs it and its
/// decomposition on the given tensors, and compares every result.
fn check_fused(op: Op, operands: Vec<(TensorType, Tensor)>, tol: f64) -> BTreeMap<String, Tensor> {
    let what = format!("{op:?}");
    let mut g = Graph::new("fused");
    let vs: Vec<ValueId> = (0..operands.len()).map(|i| g.add_input(&format!("in{i}"), operands[i].0.clone())).collect();
    let outs = g.add_multi(op, &vs, Some("fused")).unwrap();
    for (i, o) in outs.iter().enumerate() {
        g.set_output(&format!("out{i}"), *o);
    }
    let inputs: BTreeMap<String, Tensor> =
        operands.into_iter().enumerate().map(|(i, (_, t))| (format!("in{i}"), t)).collect();
    let fused = run(&g, &BTreeMap::new(), &inputs).unwrap();
    let mut prim = g.clone();
    assert_eq!(decompose_all(&mut prim).unwrap(), 1);
    for n in prim.node_ids() {
        assert_ne!(prim.node(n).op.category(), Category::Fused);
    }
    let decomposed = run(&prim, &BTreeMap::new(), &inputs).unwrap();
    assert_eq!(fused.len(), decomposed.len());
    for (name, a) in &fused {
        assert!(a.to_f64_vec().iter().all(|x| x.is_finite()), "{what}: non-finite result");
        assert_close(a, &decomposed[name], tol, &what);
    }
    fused
}

fn fixed(t: &Tensor) -> (TensorType, Tensor) {
    (TensorType::fixed(t.dtype, &t.shape), t.clone())
}

#[test]
fn rms_norm_matches_decomposition() {
    let mut rng = Rng(1);
    for (dtype, shape) in [
        (DType::F32, vec![3, 5]),
        (DType::F32, vec![2, 3, 7]),
        (DType::F64, vec![4, 6]),
        (DType::BF16, vec![3, 8]),
        (DType::F16, vec![1]),
    ] {
        let x = rng.tensor(dtype, &shape, 3.0);
        let w = rng.tensor(dtype, &shape[shape.len() - 1..], 1.0);
        check_fused(Op::RmsNorm { eps: 1e-6 }, vec![fixed(&x), fixed(&w)], 1e-5);
    }
}

#[test]
fn rms_norm_by_hand() {
    let x = f32t(&[1, 2], &[3.0, 4.0]);
    let w = f32t(&[2], &[1.0, 2.0]);
    let y = eval(Op::RmsNorm { eps: 0.0 }, &[&x, &w]).to_f32_vec();
    // rms = sqrt((9 + 16) / 2) = 3.5355...
    let r = (12.5f32).sqrt();
    assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6, "{y:?}");
}

#[test]
fn layer_norm_matches_decomposition() {
    let mut rng = Rng(2);
    for (dtype, shape) in [(DType::F32, vec![4, 9]), (DType::F64, vec![2, 2, 5]), (DType::BF16, vec![3, 4])] {
        let x = rng.tensor(dtype, &shape, 2.0);
        let d = shape[shape.len() - 1];
        let w = rng.tensor(dtype, &[d], 1.0);
        let b = rng.tensor(dtype, &[d], 1.0);
        check_fused(Op::LayerNorm { eps: 1e-5 }, vec![fixed(&x), fixed(&w), fixed(&b)], 1e-5);
    }
}

#[test]
fn rope_matches_decomposition() {
    let mut rng = Rng(3);
    // (x shape, rotary dim, interleaved, dtype)
    for (xs, r, interleaved, dtype) in [
        (vec![1, 2, 3, 8], 8, false, DType::F32),
        (vec![1, 2, 3, 8], 8, true, DType::F32),
        (vec![2, 3, 5, 7], 4, false, DType::F32),
        (vec![2, 3, 5, 10], 6, true, DType::F32),
        (vec![1, 1, 2, 4], 2, true, DType::F64),
        (vec![1, 2, 3, 6], 4, false, DType::BF16),
    ] {
        let x = rng.tensor(dtype, &xs, 2.0);
        let cs = vec![1, 1, xs[2], r];
        let (c, s) = (rng.tensor(dtype, &cs, 1.0), rng.tensor(dtype, &cs, 1.0));
        check_fused(Op::Rope { interleaved }, vec![fixed(&x), fixed(&c), fixed(&s)], 1e-5);
    }
    // Symbolic sequence length.
    let x = rng.tensor(DType::F32, &[1, 2, 3, 8], 1.0);
    let c = rng.tensor(DType::F32, &[1, 1, 3, 4], 1.0);
    let s = rng.tensor(DType::F32, &[1, 1, 3, 4], 1.0);
    check_fused(
        Op::Rope { interleaved: false },
        vec![
            (ty(DType::F32, &["1", "2", "seq", "8"]), x),
            (ty(DType::F32, &["1", "1", "seq", "4"]), c),
            (ty(DType::F32, &["1", "1", "seq", "4"]), s),
        ],
        1e-5,
    );
}

#[test]
fn rope_by_hand() {
    // One position, rotary dim 4 of 6: the last two features pass through.
    let x = f32t(&[1, 6], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let c = f32t(&[1, 4], &[0.0, 0.0, 0.0, 0.0]);
    let s = f32t(&[1, 4], &[1.0, 1.0, 1.0, 1.0]);
    let half = eval(Op::Rope { interleaved: false }, &[&x, &c, &s]).to_f32_vec();
    assert_eq!(half, vec![-3.0, -4.0, 1.0, 2.0, 5.0, 6.0]);
    let inter = eval(Op::Rope { interleaved: true }, &[&x, &c, &s]).to_f32_vec();
    assert_eq!(inter, vec![-2.0, 1.0, -4.0, 3.0, 5.0, 6.0]);
}

struct AttnCase {
    b: usize,
    hq: usize,
    hkv: usize,
    s: usize,
    t: usize,
    d: usize,
    dv: usize,
    causal: bool,
    window: Option<i64>,
    softcap: Option<f64>,
    mask: Option<&'static str>,
    dtype: DType,
}

const BASE: AttnCase = AttnCase {
    b: 1,
    hq: 2,
    hkv: 2,
    s: 3,
    t: 3,
    d: 4,
    dv: 4,
    causal: false,
    window: None,
    softcap: None,
    mask: None,
    dtype: DType::F32,
};

fn attention_case(rng: &mut Rng, c: &AttnCase) -> BTreeMap<String, Tensor> {
    let q = rng.tensor(c.dtype, &[c.b, c.hq, c.s, c.d], 2.0);
    let k = rng.tensor(c.dtype, &[c.b, c.hkv, c.t, c.d], 2.0);
    let v = rng.tensor(c.dtype, &[c.b, c.hkv, c.t, c.dv], 2.0);
    let mut operands = vec![fixed(&q), fixed(&k), fixed(&v)];
    match c.mask {
        Some("bool") => {
            let mut m = rng.bools(&[c.b, 1, c.s, c.t]);
            // The first query row sees nothing: its output must be zeros.
            if let Data::Bool(v) = &mut m.data {
                v[..c.t].iter_mut().for_each(|x| *x = false);
            }
            operands.push(fixed(&m));
        }
        Some("float") => {
            let m = rng.tensor(c.dtype, &[1, 1, c.s, c.t], 1.0);
            // One -inf entry, and a second query row that sees nothing.
            let mut vals = m.to_f64_vec();
            vals[1] = f64::NEG_INFINITY;
            for x in vals[c.t..2 * c.t].iter_mut() {
                *x = f64::NEG_INFINITY;
            }
            let m = Tensor::from_f64(c.dtype, m.shape.clone(), vals).unwrap();
            operands.push(fixed(&m));
        }
        _ => {}
    }
    let op = Op::Attention { scale: 1.0 / (c.d as f64).sqrt(), causal: c.causal, window: c.window, softcap: c.softcap };
    check_fused(op, operands, 1e-5)
}

#[test]
fn attention_matches_decomposition() {
    let mut rng = Rng(4);
    let cases = [
        AttnCase { b: 2, s: 3, t: 5, ..BASE },
        AttnCase { causal: true, s: 4, t: 4, d: 8, dv: 8, ..BASE },
        AttnCase { causal: true, s: 3, t: 7, ..BASE },
        AttnCase { causal: true, window: Some(2), s: 5, t: 5, ..BASE },
        AttnCase { window: Some(3), s: 2, t: 6, ..BASE },
        AttnCase { hq: 4, hkv: 2, causal: true, s: 3, t: 5, ..BASE },
        AttnCase { hq: 6, hkv: 1, s: 2, t: 5, d: 5, dv: 3, ..BASE },
        AttnCase { b: 2, mask: Some("bool"), s: 3, t: 5, ..BASE },
        AttnCase { mask: Some("float"), causal: true, s: 3, t: 4, ..BASE },
        AttnCase { softcap: Some(0.5), causal: true, s: 3, t: 5, ..BASE },
        AttnCase { causal: true, s: 4, t: 2, ..BASE },
        AttnCase { causal: true, hq: 4, hkv: 1, dtype: DType::F64, ..BASE },
        AttnCase { causal: true, window: Some(2), hq: 4, hkv: 2, dtype: DType::BF16, s: 3, t: 6, ..BASE },
        AttnCase { mask: Some("bool"), hq: 3, hkv: 3, d: 7, dv: 5, s: 5, t: 9, softcap: Some(2.0), ..BASE },
    ];
    for c in &cases {
        let out = attention_case(&mut rng, c);
        if c.mask == Some("bool") {
            // The fully masked first row of every batch is zero.
            let o = out["out0"].to_f64_vec();
            assert!(o[..c.dv].iter().all(|&x| x == 0.0));
        }
        if c.causal && c.s > c.t {
            // Queries before the first key see nothing.
            let o = out["out0"].to_f64_vec();
            assert!(o[..(c.s - c.t) * c.dv].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn attention_with_symbolic_lengths() {
    let mut rng = Rng(5);
    let q = rng.tensor(DType::F32, &[1, 4, 3, 4], 1.0);
    let k = rng.tensor(DType::F32, &[1, 2, 7, 4], 1.0);
    let v = rng.tensor(DType::F32, &[1, 2, 7, 4], 1.0);
    let kv = ty(DType::F32, &["1", "2", "past + seq", "4"]);
    check_fused(
        Op::Attention { scale: 0.5, causal: true, window: Some(3), softcap: None },
        vec![(ty(DType::F32, &["1", "4", "seq", "4"]), q), (kv.clone(), k), (kv, v)],
        1e-5,
    );
}

#[test]
fn attention_by_hand() {
    // One query, two keys with equal scores: the output averages the values.
    let q = f32t(&[1, 1, 1, 2], &[1.0, 0.0]);
    let k = f32t(&[1, 1, 2, 2], &[1.0, 5.0, 1.0, -5.0]);
    let v = f32t(&[1, 1, 2, 1], &[2.0, 4.0]);
    let op = |causal| Op::Attention { scale: 1.0, causal, window: None, softcap: None };
    assert_eq!(eval(op(false), &[&q, &k, &v]).to_f32_vec(), vec![3.0]);
    // The single query sits at position 1 = t - s + 0 and sees both keys.
    assert_eq!(eval(op(true), &[&q, &k, &v]).to_f32_vec(), vec![3.0]);
    let window = Op::Attention { scale: 1.0, causal: true, window: Some(1), softcap: None };
    assert_eq!(eval(window, &[&q, &k, &v]).to_f32_vec(), vec![4.0]);
}

#[test]
fn gated_mlp_matches_decomposition() {
    let mut rng = Rng(6);
    for (act, xs, dtype) in [
        ("silu", vec![3, 5], DType::F32),
        ("gelu_tanh", vec![2, 3, 5], DType::F32),
        ("gelu", vec![5], DType::F32),
        ("silu", vec![2, 5], DType::F64),
        ("gelu", vec![1, 5], DType::BF16),
    ] {
        let x = rng.tensor(dtype, &xs, 2.0);
        let wg = rng.tensor(dtype, &[5, 7], 1.0);
        let wu = rng.tensor(dtype, &[5, 7], 1.0);
        check_fused(Op::GatedMlp { act: act.to_string() }, vec![fixed(&x), fixed(&wg), fixed(&wu)], 1e-5);
    }
}

#[test]
fn softmax_matches_decomposition() {
    let mut rng = Rng(7);
    for (shape, axis, dtype) in [
        (vec![3, 5], -1, DType::F32),
        (vec![2, 3, 4], 1, DType::F32),
        (vec![4, 2], 0, DType::F64),
        (vec![2, 6], 1, DType::BF16),
    ] {
        let mut x = rng.tensor(dtype, &shape, 4.0);
        let mut v = x.to_f64_vec();
        v[0] = f64::NEG_INFINITY;
        x = Tensor::from_f64(dtype, shape.clone(), v).unwrap();
        check_fused(Op::Softmax { axis }, vec![fixed(&x)], 1e-5);
    }
    let s = eval(Op::Softmax { axis: 0 }, &[&f32t(&[2], &[0.0, 0.0])]);
    assert_eq!(s.to_f32_vec(), vec![0.5, 0.5]);
}

#[test]
fn add_rms_norm_matches_decomposition() {
    let mut rng = Rng(8);
    for (shape, dtype) in [(vec![3, 6], DType::F32), (vec![2, 2, 5], DType::BF16), (vec![4], DType::F64)] {
        let x = rng.tensor(dtype, &shape, 2.0);
        let r = rng.tensor(dtype, &shape, 2.0);
        let w = rng.tensor(dtype, &shape[shape.len() - 1..], 1.0);
        let out = check_fused(Op::AddRmsNorm { eps: 1e-6 }, vec![fixed(&x), fixed(&r), fixed(&w)], 1e-5);
        assert_eq!(out.len(), 2);
        let sum = eval(Op::Add {}, &[&x, &r]);
        assert_eq!(out["out0"], sum);
    }
}

#[test]
fn kv_append_matches_decomposition() {
    let mut rng = Rng(9);
    let cache = rng.tensor(DType::F32, &[1, 2, 3, 4], 1.0);
    let new = rng.tensor(DType::F32, &[1, 2, 1, 4], 1.0);
    let out = check_fused(
        Op::KvAppend { axis: 2 },
        vec![(ty(DType::F32, &["1", "2", "past", "4"]), cache), (ty(DType::F32, &["1", "2", "seq", "4"]), new)],
        0.0,
    );
    assert_eq!(out["out0"].shape, vec![1, 2, 4, 4]);
}

#[test]
fn decompose_leaves_primitives_alone() {
    let mut g = Graph::new("p");
    let x = g.add_input("x", ty(DType::F32, &["2"]));
    let y = g.add(Op::Neg {}, &[x]).unwrap();
    let n = g.value(y).def;
    assert_eq!(decompose(&mut g, n).unwrap(), None);
    assert_eq!(decompose_all(&mut g).unwrap(), 0);
}

// ----- a tiny decoder: prefill, greedy generation, and its decomposition -----

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 128;
const VOCAB: usize = 96;
const LAYERS: usize = 2;

/// A Llama-style decoder with a KV cache, built from fused ops.
fn tiny_decoder() -> Graph {
    let mut g = Graph::new("tiny");
    g.declare_symbol("seq", 1, 64);
    g.declare_symbol("past", 0, 64);
    let f = DType::F32;
    let ids = g.add_input("input_ids", ty(DType::I64, &["1", "seq"]));
    let mut pasts = Vec::new();
    for l in 0..LAYERS {
        let kv = ty(f, &["1", &KV_HEADS.to_string(), "past", &HEAD_DIM.to_string()]);
        pasts.push((g.add_input(&format!("past_k{l}"), kv.clone()), g.add_input(&format!("past_v{l}"), kv)));
    }
    let w = |g: &mut Graph, name: &str, shape: &[usize]| g.add_weight(name, TensorType::fixed(f, shape));
    let embed = w(&mut g, "embed", &[VOCAB, HIDDEN]);
    let mut h = g.add(Op::Gather { axis: 0 }, &[embed, ids]).unwrap();

    // cos/sin for positions past .. past + seq.
    let pos = g.add(Op::Range { start: d("past"), end: d("past + seq"), step: 1, dtype: f }, &[]).unwrap();
    let pos = g.add(Op::Unsqueeze { axes: vec![1] }, &[pos]).unwrap();
    let inv: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / HEAD_DIM as f32)).collect();
    let inv = g.add(Op::Constant { value: f32t(&[HEAD_DIM / 2], &inv) }, &[]).unwrap();
    let freqs = g.add(Op::Mul {}, &[pos, inv]).unwrap();
    let emb = g.add(Op::Concat { axis: 1 }, &[freqs, freqs]).unwrap();
    let rs = Op::Reshape { shape: vec![Dim::c(1), Dim::c(1), d("seq"), Dim::c(HEAD_DIM as i64)] };
    let cos = g.add(Op::Cos {}, &[emb]).unwrap();
    let cos = g.add(rs.clone(), &[cos]).unwrap();
    let sin = g.add(Op::Sin {}, &[emb]).unwrap();
    let sin = g.add(rs, &[sin]).unwrap();

    let heads = |g: &mut Graph, x: ValueId, n: usize| {
        let r = g
            .add(Op::Reshape { shape: vec![Dim::c(1), d("seq"), Dim::c(n as i64), Dim::c(HEAD_DIM as i64)] }, &[x])
            .unwrap();
        g.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[r]).unwrap()
    };
    for (l, (pk, pv)) in pasts.into_iter().enumerate() {
        let p = |s: &str| format!("layers.{l}.{s}");
        let ln1 = w(&mut g, &p("ln1"), &[HIDDEN]);
        let x = g.add(Op::RmsNorm { eps: 1e-6 }, &[h, ln1]).unwrap();
        let wq = w(&mut g, &p("wq"), &[HIDDEN, HEADS * HEAD_DIM]);
        let wk = w(&mut g, &p("wk"), &[HIDDEN, KV_HEADS * HEAD_DIM]);
        let wv = w(&mut g, &p("wv"), &[HIDDEN, KV_HEADS * HEAD_DIM]);
        let q = g.add(Op::MatMul {}, &[x, wq]).unwrap();
        let q = heads(&mut g, q, HEADS);
        let k = g.add(Op::MatMul {}, &[x, wk]).unwrap();
        let k = heads(&mut g, k, KV_HEADS);
        let v = g.add(Op::MatMul {}, &[x, wv]).unwrap();
        let v = heads(&mut g, v, KV_HEADS);
        let q = g.add(Op::Rope { interleaved: false }, &[q, cos, sin]).unwrap();
        let k = g.add(Op::Rope { interleaved: false }, &[k, cos, sin]).unwrap();
        let kc = g.add(Op::KvAppend { axis: 2 }, &[pk, k]).unwrap();
        let vc = g.add(Op::KvAppend { axis: 2 }, &[pv, v]).unwrap();
        g.set_output(&format!("present_k{l}"), kc);
        g.set_output(&format!("present_v{l}"), vc);
        let a = g
            .add_labeled(
                Op::Attention { scale: 1.0 / (HEAD_DIM as f64).sqrt(), causal: true, window: None, softcap: None },
                &[q, kc, vc],
                Some(&p("attn")),
            )
            .unwrap();
        let a = g.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[a]).unwrap();
        let a = g.add(Op::Reshape { shape: vec![Dim::c(1), d("seq"), Dim::c(HIDDEN as i64)] }, &[a]).unwrap();
        let wo = w(&mut g, &p("wo"), &[HEADS * HEAD_DIM, HIDDEN]);
        let a = g.add(Op::MatMul {}, &[a, wo]).unwrap();
        let ln2 = w(&mut g, &p("ln2"), &[HIDDEN]);
        let [s, x] = g.add_multi(Op::AddRmsNorm { eps: 1e-6 }, &[h, a, ln2], None).unwrap().try_into().unwrap();
        let wg = w(&mut g, &p("wg"), &[HIDDEN, FFN]);
        let wu = w(&mut g, &p("wu"), &[HIDDEN, FFN]);
        let m = g.add(Op::GatedMlp { act: "silu".into() }, &[x, wg, wu]).unwrap();
        let wd = w(&mut g, &p("wd"), &[FFN, HIDDEN]);
        let m = g.add(Op::MatMul {}, &[m, wd]).unwrap();
        h = g.add(Op::Add {}, &[s, m]).unwrap();
    }
    let norm = w(&mut g, "norm", &[HIDDEN]);
    let h = g.add(Op::RmsNorm { eps: 1e-6 }, &[h, norm]).unwrap();
    let head = w(&mut g, "lm_head", &[HIDDEN, VOCAB]);
    let logits = g.add(Op::MatMul {}, &[h, head]).unwrap();
    g.set_output("logits", logits);
    let last = g
        .add(Op::Slice { axes: vec![1], starts: vec![d("seq - 1")], ends: vec![d("seq")], steps: vec![1] }, &[logits])
        .unwrap();
    let next = g.add(Op::ArgMax { axis: -1, keepdims: false }, &[last]).unwrap();
    g.set_output("next_token", next);
    g
}

fn tiny_weights(g: &Graph) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(42);
    g.weights()
        .into_iter()
        .map(|(name, v)| {
            let shape = g.ty(v).const_shape().unwrap();
            let t = if name.contains("ln") || name == "norm" {
                Tensor::full(DType::F32, shape, 1.0)
            } else {
                rng.tensor(DType::F32, &shape, 0.3)
            };
            (name, t)
        })
        .collect()
}

/// Greedy generation: prefill `prompt`, then `steps` single-token steps.
/// Returns the generated tokens and the time each phase took.
fn generate(g: &Graph, w: &BTreeMap<String, Tensor>, prompt: &[i64], steps: usize) -> (Vec<i64>, f64, f64) {
    let mut cache: Vec<Tensor> =
        (0..2 * LAYERS).map(|_| Tensor::full(DType::F32, vec![1, KV_HEADS, 0, HEAD_DIM], 0.0)).collect();
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    let mut times = Vec::new();
    for step in 0..=steps {
        let ids = if step == 0 { tokens.clone() } else { vec![*tokens.last().unwrap()] };
        let mut inputs = map(vec![("input_ids", i64t(&[1, ids.len()], &ids))]);
        for l in 0..LAYERS {
            inputs.insert(format!("past_k{l}"), cache[2 * l].clone());
            inputs.insert(format!("past_v{l}"), cache[2 * l + 1].clone());
        }
        let t0 = Instant::now();
        let res = run(g, w, &inputs).unwrap();
        times.push(t0.elapsed().as_secs_f64());
        for l in 0..LAYERS {
            cache[2 * l] = res[&format!("present_k{l}")].clone();
            cache[2 * l + 1] = res[&format!("present_v{l}")].clone();
        }
        let next = res["next_token"].to_i64_vec()[0];
        tokens.push(next);
        out.push(next);
    }
    out.pop();
    (out, times[0], times[1..].iter().sum())
}

#[test]
fn tiny_decoder_generates_consistently() {
    let g = tiny_decoder();
    let w = tiny_weights(&g);
    let prompt: Vec<i64> = vec![5, 17, 3, 88, 42, 0, 61, 9, 23];
    let (tokens, prefill_s, decode_s) = generate(&g, &w, &prompt, 16);
    eprintln!("fused graph: prefill of 9 tokens {prefill_s:.3}s, 16 decode steps {decode_s:.3}s");
    assert_eq!(tokens.len(), 16);
    assert!(prefill_s < 5.0 && decode_s < 20.0, "the interpreter is far too slow");

    // The cached steps must agree with one pass over the whole sequence.
    let mut all = prompt.clone();
    all.extend(&tokens[..15]);
    let mut inputs = map(vec![("input_ids", i64t(&[1, all.len()], &all))]);
    for l in 0..LAYERS {
        let empty = Tensor::full(DType::F32, vec![1, KV_HEADS, 0, HEAD_DIM], 0.0);
        inputs.insert(format!("past_k{l}"), empty.clone());
        inputs.insert(format!("past_v{l}"), empty);
    }
    let full = run(&g, &w, &inputs).unwrap();
    let logits = &full["logits"];
    let argmax = eval(Op::ArgMax { axis: -1, keepdims: false }, &[logits]).to_i64_vec();
    assert_eq!(&argmax[prompt.len() - 1..], &tokens[..], "cached and full-sequence decoding differ");

    // The decomposed model (primitives only) generates the same tokens.
    let mut prim = g.clone();
    assert!(decompose_all(&mut prim).unwrap() > 0);
    let (ptokens, pp, pd) = generate(&prim, &w, &prompt, 16);
    eprintln!("primitive graph: prefill {pp:.3}s, 16 decode steps {pd:.3}s");
    assert_eq!(ptokens, tokens);
    let pfull = run(&prim, &w, &inputs).unwrap();
    assert_close(&pfull["logits"], logits, 1e-5, "decomposed logits");
}

#[test]
fn unverified_graphs_are_reported_not_trusted() {
    // Nodes added unchecked (as the text parser does) with a wrong arity, a
    // wrong declared type and a text line.
    let mut g = Graph::new("bad");
    let x = g.add_input("x", ty(DType::F32, &["n"]));
    let one = g.add_unchecked(Op::Neg {}, &[x, x], vec![ty(DType::F32, &["n"])], Some(7))[0];
    g.set_output("one", one);
    let inputs = map(vec![("x", f32t(&[2], &[1.0, 2.0]))]);
    let e = run(&g, &BTreeMap::new(), &inputs).unwrap_err().to_string();
    assert!(e.starts_with("op `neg` (line 7): expects 1 operands"), "{e}");

    let mut g = Graph::new("bad_type");
    let x = g.add_input("x", ty(DType::F32, &["n"]));
    let y = g.add_unchecked(Op::Neg {}, &[x], vec![ty(DType::F32, &["n + 1"])], Some(3))[0];
    g.set_output("y", y);
    let e = run(&g, &BTreeMap::new(), &inputs).unwrap_err().to_string();
    assert_eq!(e, "op `neg` (line 3): result 0 is f32[2], but the graph declares f32[n + 1] = f32[3]");
}

#[test]
fn unsolvable_and_unbound_symbols_are_reported() {
    // 2*past cannot be 5, and `other` is never bound.
    let mut g = Graph::new("s");
    g.add_input("a", ty(DType::F32, &["2*past"]));
    let e = bind_symbols(&g, &map(vec![("a", f32t(&[5], &[0.0; 5]))])).unwrap_err();
    assert!(e.to_string().starts_with("input `a` axis 0: expected 2*past (symbol `past` has no value)"), "{e}");
    let e = bind_symbols(&g, &map(vec![("a", f32t(&[6], &[0.0; 6]))])).unwrap();
    assert_eq!(e["past"], 3);

    let mut g = Graph::new("u");
    let a = g.add_input("a", ty(DType::F32, &["n"]));
    let r = g.add(Op::Reshape { shape: vec![d("n"), Dim::c(1)] }, &[a]).unwrap();
    let f = g.add(Op::Fill { shape: vec![d("other")], value: 1.0, dtype: DType::F32 }, &[]).unwrap();
    g.set_output("r", r);
    g.set_output("f", f);
    let e = run(&g, &BTreeMap::new(), &map(vec![("a", f32t(&[2], &[0.0; 2]))])).unwrap_err();
    assert!(e.to_string().contains("symbol `other` has no value"), "{e}");
}

#[test]
fn eval_op_rejects_malformed_operands() {
    let bad = Tensor { dtype: DType::F32, shape: vec![3], data: Data::F32(vec![1.0]) };
    assert!(eval_err(Op::Neg {}, &[&bad]).contains("operand 0"));
    let out_of_range = Tensor { dtype: DType::U8, shape: vec![1], data: Data::I64(vec![300]) };
    assert!(eval_err(Op::Neg {}, &[&out_of_range]).contains("out of range for u8"));
    let huge = Op::Fill { shape: vec![Dim::c(1 << 40), Dim::c(1 << 20)], value: 0.0, dtype: DType::F32 };
    assert!(eval_op(&huge, &[], &BTreeMap::new()).is_err());
}
