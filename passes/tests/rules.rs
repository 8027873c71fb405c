//! One-line rule tests (declarations, expression in, expression out) and a
//! property test that evaluates both sides of every case with the reference
//! interpreter on random inputs of random sizes for the shape symbols.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smelt_ir::{DType, Dim, Tensor};
use smelt_passes::testing::{graph_of, parse_decls, rewrite};
use std::collections::{BTreeMap, BTreeSet};

/// Rewrites `input`, checks that `rule` (a name, or the part before `#` of
/// generated variants) applied and that the cheapest form is `output`.
fn check(rule: &str, decls: &str, input: &str, output: &str) {
    let r = rewrite(decls, input).unwrap_or_else(|e| panic!("{rule}: {e}"));
    assert!(r.ill_typed.is_empty(), "{rule}: ill-typed nodes: {:?}", r.ill_typed);
    let applied = r.applied.keys().any(|k| k == rule || k.split('#').next() == Some(rule));
    assert!(applied, "{rule} did not apply; applied: {:?}", r.applied);
    assert_eq!(r.best.to_string(), output, "{rule}");
}

macro_rules! rule_tests {
    ($($name:ident: $rule:literal, $decls:expr, $input:literal => $output:literal;)*) => {
        /// (test, rule, declarations, input, output)
        const CASES: &[(&str, &str, &str, &str, &str)] = &[$((stringify!($name), $rule, $decls, $input, $output)),*];
        $( #[test] fn $name() { check($rule, $decls, $input, $output) } )*
    };
}

const QKV: &str = "$q: f32[1, 4, 3, 8]; $k: f32[1, 4, 5, 8]; $v: f32[1, 4, 5, 8]";
const MLP: &str = "$x: f32[2, 8]; @g: f32[8, 16]; @u: f32[8, 16]";
const ROPE: &str = "$x: f32[1, 2, 3, 8]; $cos: f32[1, 1, 3, 8]; $sin: f32[1, 1, 3, 8]";

rule_tests! {
    pow2: "algebra/pow2-is-square", "$x: f32[4]", "(pow $x 2.0:f32)" => "(mul $x $x)";
    pow3: "algebra/pow3-is-cube", "$x: f32[4]", "(pow $x 3.0:f32)" => "(pow $x 3.0:f32)";
    pow_neg_half: "algebra/pow-neg-half-is-rsqrt", "$x: f32[4]", "(pow $x -0.5:f32)" => "(rsqrt $x)";
    div_sqrt: "algebra/div-sqrt-is-mul-rsqrt", "$x: f32[4]; $y: f32[4]", "(div $x (sqrt $y))" => "(mul $x (rsqrt $y))";
    reciprocal_sqrt: "algebra/reciprocal-sqrt-is-rsqrt", "$y: f32[4]", "(reciprocal (sqrt $y))" => "(rsqrt $y)";
    one_over_sqrt: "algebra/one-over-sqrt-is-rsqrt", "$y: f32[4]", "(div 1.0:f32 (sqrt $y))" => "(rsqrt $y)";
    div_by_constant: "algebra/div-by-constant-is-mul", "$x: f32[4]", "(mul (div $x 4.0:f32) 2.0:f32)" => "(mul $x 0.5:f32)";
    mul_scalar_right: "algebra/mul-scalar-right", "$x: f32[4]", "(mul (mul 2.0:f32 $x) 3.0:f32)" => "(mul $x 6.0:f32)";
    merge_scalar_muls: "algebra/merge-scalar-muls", "$x: f32[4]", "(mul (mul $x 0.5:f32) 0.25:f32)" => "(mul $x 0.125:f32)";
    add_scalar_right: "algebra/add-scalar-right", "$x: f32[2, 8]",
        "(mul $x (rsqrt (add 1e-5:f32 (reduce_mean (mul $x $x) [-1] true))))" => "(rms_norm $x (fill [8] 1.0 f32) 1e-5)";
    sigmoid_after_x: "algebra/sigmoid-after-x", MLP,
        "(mul (mul (sigmoid (matmul $x @g)) (matmul $x @g)) (matmul $x @u))" => "(gated_mlp $x @g @u 'silu')";

    rms_normaliser: "rmsnorm/normaliser", "$x: f32[2, 8]",
        "(mul $x (rsqrt (add (reduce_mean (mul $x $x) [-1] true) 1e-5:f32)))" => "(rms_norm $x (fill [8] 1.0 f32) 1e-5)";
    rms_rsqrt_first: "rmsnorm/normaliser", "$x: f32[2, 8]",
        "(mul (rsqrt (add (reduce_mean (pow $x 2.0:f32) [-1] true) 1e-5:f32)) $x)" => "(rms_norm $x (fill [8] 1.0 f32) 1e-5)";
    rms_weight_left: "rmsnorm/weight", "$x: f32[2, 8]; @w: f32[8]",
        "(mul @w (mul $x (rsqrt (add (reduce_mean (pow $x 2.0:f32) [-1] true) 1e-5:f32))))" => "(rms_norm $x @w 1e-5)";
    rms_div_sqrt: "rmsnorm/weight", "$x: f32[2, 8]; @w: f32[8]",
        "(mul (div $x (sqrt (add (reduce_mean (pow $x 2.0:f32) [-1] true) 1e-6:f32))) @w)" => "(rms_norm $x @w 1e-6)";
    rms_reciprocal: "rmsnorm/weight", "$x: f32[2, 8]; @w: f32[8]",
        "(mul @w (mul $x (reciprocal (sqrt (add (reduce_mean (mul $x $x) [-1] true) 1e-5:f32)))))" => "(rms_norm $x @w 1e-5)";
    rms_gemma: "rmsnorm/weight", "$x: f32[2, 8]; @w: f32[8]",
        "(mul (mul $x (rsqrt (add (reduce_mean (pow $x 2.0:f32) [-1] true) 1e-6:f32))) (add 1.0:f32 @w))"
        => "(rms_norm $x (add 1.0:f32 @w) 1e-6)";
    rms_half_casts: "rmsnorm/cast-around", "$x: f16[2, 8]; @w: f16[8]",
        "(mul @w (cast (mul (cast $x f32) (rsqrt (add (reduce_mean (mul (cast $x f32) (cast $x f32)) [-1] true) 1e-5:f32))) f16))"
        => "(rms_norm $x @w 1e-5)";

    rope_half: "rope/rotate-half", ROPE,
        "(add (mul $x $cos) (mul (concat (neg (slice $x [-1] [4] [8] [1])) (slice $x [-1] [0] [4] [1]) -1) $sin))"
        => "(rope $x $cos $sin false)";
    rope_half_commuted: "rope/rotate-half", ROPE,
        "(add (mul $sin (concat (neg (slice $x [-1] [4] [8] [1])) (slice $x [-1] [0] [4] [1]) -1)) (mul $cos $x))"
        => "(rope $x $cos $sin false)";
    rope_interleaved: "rope/interleaved", ROPE,
        "(add (mul $x $cos) (mul (reshape (concat (unsqueeze (neg (slice $x [-1] [1] [8] [2])) [-1]) (unsqueeze (slice $x [-1] [0] [8] [2]) [-1]) -1) [1,2,3,8]) $sin))"
        => "(rope $x $cos $sin true)";
    rope_partial: "rope/partial-rotary", "$x: f32[1, 2, 3, 8]; $cos: f32[1, 1, 3, 4]; $sin: f32[1, 1, 3, 4]",
        "(concat (add (mul (slice $x [-1] [0] [4] [1]) $cos) (mul (concat (neg (slice (slice $x [-1] [0] [4] [1]) [-1] [2] [4] [1])) (slice (slice $x [-1] [0] [4] [1]) [-1] [0] [2] [1]) -1) $sin)) (slice $x [-1] [4] [8] [1]) -1)"
        => "(rope $x $cos $sin false)";

    softmax_stable: "softmax/stable", "$x: f32[2, 5]",
        "(div (exp (sub $x (reduce_max $x [-1] true))) (reduce_sum (exp (sub $x (reduce_max $x [-1] true))) [-1] true))"
        => "(softmax $x -1)";
    softmax_naive: "softmax/naive", "$x: f32[2, 5]",
        "(div (exp $x) (reduce_sum (exp $x) [-1] true))" => "(softmax $x -1)";
    attention_additive: "attention/core", "$q: f32[1, 4, 3, 8]; $k: f32[1, 4, 5, 8]; $v: f32[1, 4, 5, 8]; $m: f32[1, 1, 3, 5]",
        "(matmul (softmax (add (mul (matmul $q (transpose $k [0,1,3,2])) 0.125:f32) $m) -1) $v)"
        => "(attention $q $k $v $m 0.125 false none none)";
    attention_scale_on_q: "attention/scale-on-q", QKV,
        "(matmul (softmax (matmul (mul $q 0.125:f32) (transpose $k [0,1,3,2])) -1) $v)"
        => "(attention $q $k $v 0.125 false none none)";
    attention_scale_split: "attention/scale-out-of-transpose", QKV,
        "(matmul (softmax (matmul (mul $q 0.5:f32) (transpose (mul $k 0.25:f32) [0,1,3,2])) -1) $v)"
        => "(attention $q $k $v 0.125 false none none)";
    attention_scale_on_kt: "attention/scale-on-k", QKV,
        "(matmul (softmax (matmul $q (mul (transpose $k [0,1,3,2]) 0.125:f32)) -1) $v)"
        => "(attention $q $k $v 0.125 false none none)";
    attention_bool_mask: "attention/core", "$q: f32[1, 4, 3, 8]; $k: f32[1, 4, 5, 8]; $v: f32[1, 4, 5, 8]; $b: bool[1, 1, 3, 5]",
        "(matmul (softmax (where $b (mul (matmul $q (transpose $k [0,1,3,2])) 0.125:f32) -inf:f32) -1) $v)"
        => "(attention $q $k $v $b 0.125 false none none)";
    attention_nan_guard: "attention/core", QKV,
        "(matmul (where (isnan (softmax (matmul $q (transpose $k [0,1,3,2])) -1)) 0.0:f32 (softmax (matmul $q (transpose $k [0,1,3,2])) -1)) $v)"
        => "(attention $q $k $v 1.0 false none none)";
    mask_where_to_bool: "mask/additive-where-is-bool", "$q: f32[1, 4, 3, 8]; $k: f32[1, 4, 5, 8]; $v: f32[1, 4, 5, 8]; $b: bool[1, 1, 3, 5]",
        "(attention $q $k $v (where $b 0.0:f32 -3.4028234663852886e38:f32) 0.125 false none none)"
        => "(attention $q $k $v $b 0.125 false none none)";
    mask_causal_padded: "mask/causal", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, past+seq, 8]; $v: f32[1, 4, past+seq, 8]; $pad: bool[1, 1, 1, past+seq]",
        "(attention $q $k $v (and $pad (unsqueeze (le (unsqueeze (range 0 past+seq 1 i64) [-2]) (unsqueeze (range past past+seq 1 i64) [-1])) [-4,-3])) 0.125 false none none)"
        => "(attention $q $k $v $pad 0.125 true none none)";
    mask_causal: "mask/causal", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, seq, 8]; $v: f32[1, 4, seq, 8]",
        "(attention $q $k $v (unsqueeze (ge (unsqueeze (range 0 seq 1 i64) [-1]) (unsqueeze (range 0 seq 1 i64) [-2])) [-4,-3]) 0.125 false none none)"
        => "(attention $q $k $v 0.125 true none none)";
    mask_sliding_window: "mask/sliding-window", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, past+seq, 8]; $v: f32[1, 4, past+seq, 8]; $pad: bool[1, 1, 1, past+seq]",
        "(attention $q $k $v (and $pad (unsqueeze (and (le (unsqueeze (range 0 past+seq 1 i64) [-2]) (unsqueeze (range past past+seq 1 i64) [-1])) (gt (unsqueeze (range 0 past+seq 1 i64) [-2]) (sub (unsqueeze (range past past+seq 1 i64) [-1]) 2:i64))) [-4,-3])) 0.125 false none none)"
        => "(attention $q $k $v $pad 0.125 true 2 none)";
    gqa: "attention/grouped-query-heads", "$q: f32[1, 4, 3, 8]; $k: f32[1, 2, 5, 8]; $v: f32[1, 2, 5, 8]",
        "(attention $q (reshape (expand (unsqueeze $k [-3]) [1,2,2,5,8]) [1,4,5,8]) (reshape (expand (unsqueeze $v [-3]) [1,2,2,5,8]) [1,4,5,8]) 0.125 false none none)"
        => "(attention $q $k $v 0.125 false none none)";

    swiglu: "gated_mlp/silu", MLP,
        "(mul (mul (matmul $x @g) (sigmoid (matmul $x @g))) (matmul $x @u))" => "(gated_mlp $x @g @u 'silu')";
    swiglu_up_first: "gated_mlp/silu", MLP,
        "(mul (matmul $x @u) (mul (matmul $x @g) (sigmoid (matmul $x @g))))" => "(gated_mlp $x @g @u 'silu')";
    geglu_tanh: "gated_mlp/gelu-tanh", MLP,
        "(mul (mul (mul 0.5:f32 (matmul $x @g)) (add 1.0:f32 (tanh (mul 0.7978845608028654:f32 (add (matmul $x @g) (mul 0.044715:f32 (pow (matmul $x @g) 3.0:f32))))))) (matmul $x @u))"
        => "(gated_mlp $x @g @u 'gelu_tanh')";
    geglu_tanh_half_last: "gated_mlp/gelu-tanh", MLP,
        "(mul (matmul $x @u) (mul (mul (matmul $x @g) (add (tanh (mul (add (matmul $x @g) (mul (mul (mul (matmul $x @g) (matmul $x @g)) (matmul $x @g)) 0.044715:f32)) 0.7978845608028654:f32)) 1.0:f32)) 0.5:f32))"
        => "(gated_mlp $x @g @u 'gelu_tanh')";
    geglu_erf: "gated_mlp/gelu", MLP,
        "(mul (mul (mul 0.5:f32 (matmul $x @g)) (add 1.0:f32 (erf (div (matmul $x @g) 1.4142135623730951:f32)))) (matmul $x @u))"
        => "(gated_mlp $x @g @u 'gelu')";

    add_rms_norm: "residual/add-rms-norm", "$a: f32[2, 8]; $b: f32[2, 8]; @w: f32[8]",
        "(rms_norm (add $a $b) @w 1e-5)" => "(get.1 (add_rms_norm $a $b @w 1e-5))";
    batched_key_transpose: "layout/batched-key-transpose", "$q: f32[1, 4, 3, 8]; $k: f32[1, 2, 5, 8]",
        "(matmul $q (reshape (transpose (reshape (expand (unsqueeze $k [-3]) [1,2,2,5,8]) [4,5,8]) [0,2,1]) [1,4,8,5]))"
        => "(matmul $q (transpose (reshape (expand (unsqueeze $k [-3]) [1,2,2,5,8]) [1,4,5,8]) [0,1,3,2]))";
    and_true: "algebra/and-true", "$a: bool[2, 3]", "(and true:bool $a)" => "$a";
    range_plus_offset: "algebra/range-plus-offset", "$x: f32[seq]; $p: f32[past]",
        "(concat $p (add (cast (add (range 0 seq 1 i64) (squeeze (range past past+1 1 i64) [-1])) f32) $x) -1)"
        => "(concat $p (add (cast (range past past+seq 1 i64) f32) $x) -1)";
    unsqueeze_unsqueeze: "layout/unsqueeze-unsqueeze", "$x: f32[5]",
        "(unsqueeze (unsqueeze $x [-3,-2]) [-2])" => "(unsqueeze $x [-4,-3,-2])";
    mask_sliding_window_4d: "mask/sliding-window", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, past+seq, 8]; $v: f32[1, 4, past+seq, 8]; $pad: bool[1, 1, 1, past+seq]",
        "(attention $q $k $v (and (and (and true:bool (gt (unsqueeze (unsqueeze (range 0 past+seq 1 i64) [-3,-2]) [-2]) (sub (unsqueeze (unsqueeze (add (range 0 seq 1 i64) (squeeze (range past past+1 1 i64) [-1])) [-3,-2]) [-1]) 4:i64))) (le (unsqueeze (unsqueeze (range 0 past+seq 1 i64) [-3,-2]) [-2]) (unsqueeze (unsqueeze (add (range 0 seq 1 i64) (squeeze (range past past+1 1 i64) [-1])) [-3,-2]) [-1]))) $pad) 0.25 false none none)"
        => "(attention $q $k $v $pad 0.25 true 4 none)";
    attention_softcap: "attention/core", QKV,
        "(matmul (softmax (mul (tanh (div (mul (matmul $q (transpose $k [0,1,3,2])) 0.125:f32) 50.0:f32)) 50.0:f32) -1) $v)"
        => "(attention $q $k $v 0.125 false none 50.0)";
    mask_trilu_additive: "mask/known-causal", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, past+seq, 8]; $v: f32[1, 4, past+seq, 8]",
        "(matmul (softmax (add (mul (matmul $q (transpose $k [0,1,3,2])) 0.125:f32) (trilu (fill [seq,past+seq] -3.4028234663852886e38 f32) true past+1)) -1) $v)"
        => "(attention $q $k $v 0.125 true none none)";
    mask_trilu_padded: "mask/known-causal", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, seq, 8]; $v: f32[1, 4, seq, 8]; $pad: f32[1, 1, 1, seq]",
        "(attention $q $k $v (add $pad (trilu (fill [seq,seq] -3.4028234663852886e38 f32) true 1)) 0.125 false none none)"
        => "(attention $q $k $v $pad 0.125 true none none)";
    mask_known_bool_padded: "mask/known-causal", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, seq, 8]; $v: f32[1, 4, seq, 8]; $pad: bool[1, 1, 1, seq]",
        "(attention $q $k $v (and (lt (unsqueeze (range 0 seq 1 i64) [-2]) (add (unsqueeze (range 0 seq 1 i64) [-1]) 1:i64)) $pad) 0.125 false none none)"
        => "(attention $q $k $v $pad 0.125 true none none)";
    mask_known_window: "mask/known-causal", "$q: f32[1, 4, seq, 8]; $k: f32[1, 4, seq, 8]; $v: f32[1, 4, seq, 8]",
        "(attention $q $k $v (add (trilu (fill [seq,seq] -3.4028234663852886e38 f32) true 1) (trilu (fill [seq,seq] -3.4028234663852886e38 f32) false -3)) 0.125 false none none)"
        => "(attention $q $k $v 0.125 true 3 none)";
    slice_of_matmul: "layout/slice-columns-of-matmul", "$x: f32[2, 8]; @w: f32[8, 32]",
        "(slice (matmul $x @w) [-1] [0] [16] [1])" => "(matmul $x (slice @w [-1] [0] [16] [1]))";
}

/// Every rule (by name, or by the name before `#` for generated variants)
/// has at least one case above.
#[test]
fn every_rule_has_a_one_line_test() {
    let rules = smelt_passes::rules::all().expect("rules build");
    let tested: BTreeSet<&str> = CASES.iter().map(|c| c.1).collect();
    let mut missing = BTreeSet::new();
    for r in &rules {
        let base = r.name.split('#').next().unwrap_or(&r.name);
        if !tested.contains(r.name.as_str()) && !tested.contains(base) {
            missing.insert(base.to_string());
        }
    }
    assert!(missing.is_empty(), "rules without a one-line test: {missing:?}");
}

fn random_tensor(rng: &mut StdRng, dtype: DType, shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    if dtype == DType::Bool {
        // Mostly true, and the first key of every row always visible, so that
        // no attention row is fully masked (where additive and boolean masks
        // legitimately differ).
        let last = *shape.last().unwrap_or(&1);
        let v = (0..n).map(|i| i % last.max(1) == 0 || rng.random_bool(0.7)).collect();
        return Tensor::from_bool(shape, v).expect("shape fits");
    }
    let v = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_f32(dtype, shape, v).expect("shape fits")
}

/// Both sides of every case compute the same values on random inputs, for
/// random sizes of the shape symbols.
#[test]
fn both_sides_of_every_rule_agree_on_random_inputs() {
    let mut rng = StdRng::seed_from_u64(7);
    for (test, rule, decls, input, output) in CASES {
        let types = parse_decls(decls).unwrap();
        let lhs = graph_of(decls, &input.parse().unwrap()).unwrap_or_else(|e| panic!("{test}: {e}"));
        let rhs = graph_of(decls, &output.parse().unwrap()).unwrap_or_else(|e| panic!("{test}: {e}"));
        for trial in 0..4 {
            let mut syms: BTreeMap<String, i64> = BTreeMap::new();
            syms.insert("seq".into(), rng.random_range(1..5));
            syms.insert("past".into(), if trial == 0 { 0 } else { rng.random_range(0..4) });
            let mut inputs = BTreeMap::new();
            let mut weights = BTreeMap::new();
            for (name, ty) in &types {
                let shape: Vec<usize> = ty.shape.iter().map(|d: &Dim| d.eval_map(&syms).unwrap() as usize).collect();
                let t = random_tensor(&mut rng, ty.dtype, shape);
                if let Some(n) = name.strip_prefix('$') {
                    inputs.insert(n.to_string(), t);
                } else {
                    weights.insert(name[1..].to_string(), t);
                }
            }
            let a = smelt_ir::interp::run(&lhs, &weights, &inputs).unwrap_or_else(|e| panic!("{test} lhs: {e}"));
            let b = smelt_ir::interp::run(&rhs, &weights, &inputs).unwrap_or_else(|e| panic!("{test} rhs: {e}"));
            let (a, b) = (&a["out"], &b["out"]);
            assert_eq!(a.shape, b.shape, "{test} ({rule})");
            let tol = if a.dtype == DType::F16 { 2e-3 } else { 2e-5 };
            for (i, (x, y)) in a.to_f64_vec().iter().zip(b.to_f64_vec()).enumerate() {
                if x.is_nan() && y.is_nan() {
                    continue;
                }
                let err = (x - y).abs() / (1.0 + x.abs());
                assert!(err <= tol, "{test} ({rule}): element {i}: {x} vs {y}");
            }
        }
    }
}
