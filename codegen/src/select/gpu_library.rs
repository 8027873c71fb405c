//! The GPU weight products done by a vendor library (cuBLAS) instead of
//! generated kernels: `smelt compile --target cuda --gpu-gemm cublas`.
//!
//! A product `y = x · Wᵀ` (constant `W [n, k]`) becomes:
//! - when `W` is bf16/f16 and the activations' buffer holds another type, a
//!   KIR kernel converting `x` into a scratch buffer of `W`'s type (rounded
//!   to nearest even; cuBLAS multiplies operands of one type), skipped when
//!   the activations already have it;
//! - one library GEMM (`GemmStep`: f32 result, f32 compute, no TF32);
//! - the gated MLP `act(x · Wgᵀ) * (x · Wuᵀ)`: two GEMMs into f32 scratch
//!   buffers `g`, `u`, then a KIR elementwise kernel `act(g) * u`.
//!
//! A result stored in a type other than f32 (narrow activations) gets the
//! GEMM's f32 output converted into it (the gated kernel stores it
//! directly). f32 weights with narrow activations have no library form
//! (cuBLAS takes no mixed operands): the caller falls back to the kernels.
//!
//! The KIR kernels are CPU elementwise kernels (one top-level `Parallel`
//! loop over the rows `m`) made GPU kernels by `gpuize`. Operands are
//! numbered as the node's: `x`, then the weight(s); result 0 is `y`.

use super::linalg::{dim_name, Params};
use super::{Arg, Instance, Scratch, SelectError, Step};
use crate::kir::{Access, Builder, Expr, LoopKind, Scalar, Space};
use crate::templates::gpu::gpuize::gpuize;
use crate::templates::matmul_dyn::Act;
use crate::templates::{vec_loop, LANES};
use smelt_ir::{Dim, Op, TensorType};

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` by the library: `x` holds `a`, `w` holds
/// `b` (the same type), `y` is f32.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmStep {
    pub x: Arg,
    pub w: Arg,
    pub y: Arg,
    /// The rows, over the graph's symbols.
    pub m: Dim,
    pub n: usize,
    pub k: usize,
    pub a: Scalar,
    pub b: Scalar,
}

/// One launch of a [`LibrarySteps`].
#[derive(Clone, Debug)]
pub enum LibStep {
    Kernel(Box<Step>),
    Gemm(GemmStep),
}

/// The launches computing one weight product, in order, with their scratch
/// buffers (as [`super::Steps`], plus library GEMMs).
#[derive(Clone, Debug)]
pub struct LibrarySteps {
    pub scratch: Vec<Scratch>,
    pub steps: Vec<LibStep>,
}

/// The library form of `x · Wᵀ` (`act` None) or of the gated MLP with
/// activation `act`, for weights `[n, k]` of `w_elem`, activations of type
/// `x` held in buffers of `x_elem`, and a result buffer of `y_elem`.
pub fn cublas_weight_product(
    x: &TensorType,
    x_elem: Scalar,
    y_elem: Scalar,
    n: usize,
    k: usize,
    act: Option<&str>,
    w_elem: Scalar,
) -> Result<LibrarySteps, SelectError> {
    let op = match act {
        None => Op::MatMul {},
        Some(a) => Op::GatedMlp { act: a.to_string() },
    };
    let fail = |why: String| SelectError::unsupported(&op, std::slice::from_ref(x), why);
    let act = act.map(|a| Act::parse(a).ok_or_else(|| fail(format!("unknown act `{a}`")))).transpose()?;
    let floats = |e: Scalar| e == Scalar::F32 || e.is_narrow_float();
    if !floats(x_elem) || !floats(y_elem) || !floats(w_elem) {
        return Err(fail("a library GEMM takes float operands only".into()));
    }
    if w_elem == Scalar::F32 && x_elem != Scalar::F32 {
        return Err(fail("f32 weights with narrow activations have no library GEMM (mixed operands)".into()));
    }
    if x.rank() == 0 || x.shape.last() != Some(&Dim::c(k as i64)) {
        return Err(fail(format!("x's last dim must be the contraction dim {k}")));
    }
    if n == 0 || k == 0 || n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(fail(format!("n = {n}, k = {k}: a library GEMM needs sizes in 1..=i32::MAX")));
    }
    let rows = &x.shape[..x.rank() - 1];
    let m = Dim::product(rows);
    let mut scratch = vec![];
    let mut steps = vec![];
    let mut add_scratch = |name: &str, elem: Scalar, len: Dim| {
        scratch.push(Scratch { name: name.to_string(), elem, len });
        Arg::Scratch(scratch.len() - 1)
    };
    // The activations in the weights' type.
    let xs = if x_elem == w_elem {
        Arg::Operand(0)
    } else {
        let to = add_scratch(&format!("x_{}", elem_name(w_elem)), w_elem, m.clone() * Dim::c(k as i64));
        let inst = convert(rows, k, x_elem, w_elem, &op, x)?;
        steps.push(LibStep::Kernel(Box::new(Step { instance: inst, args: vec![Arg::Operand(0), to], work: None })));
        to
    };
    let mn = m.clone() * Dim::c(n as i64);
    let gemm = |w: usize, y: Arg| GemmStep { x: xs, w: Arg::Operand(w), y, m: m.clone(), n, k, a: w_elem, b: w_elem };
    match act {
        None if y_elem == Scalar::F32 => steps.push(LibStep::Gemm(gemm(1, Arg::Result(0)))),
        None => {
            let y32 = add_scratch("y_f32", Scalar::F32, mn);
            steps.push(LibStep::Gemm(gemm(1, y32)));
            let inst = convert(rows, n, Scalar::F32, y_elem, &op, x)?;
            steps.push(LibStep::Kernel(Box::new(Step { instance: inst, args: vec![y32, Arg::Result(0)], work: None })));
        }
        Some(act) => {
            let g = add_scratch("gate", Scalar::F32, mn.clone());
            let u = add_scratch("up", Scalar::F32, mn);
            steps.push(LibStep::Gemm(gemm(1, g)));
            steps.push(LibStep::Gemm(gemm(2, u)));
            let inst = gated(rows, n, act, y_elem, &op, x)?;
            steps.push(LibStep::Kernel(Box::new(Step {
                instance: inst,
                args: vec![g, u, Arg::Result(0)],
                work: None,
            })));
        }
    }
    Ok(LibrarySteps { scratch, steps })
}

fn elem_name(e: Scalar) -> &'static str {
    match e {
        Scalar::BF16 => "bf16",
        Scalar::F16 => "f16",
        _ => "f32",
    }
}

/// The GPU kernel copying `[rows.., cols]` from elements `from` to `to`
/// (loads widen exactly, stores round to nearest even).
fn convert(
    rows: &[Dim],
    cols: usize,
    from: Scalar,
    to: Scalar,
    op: &Op,
    x: &TensorType,
) -> Result<Instance, SelectError> {
    let mut b = Builder::new("gpu_convert");
    let mut p = Params::default();
    let m = p.product(&mut b, rows);
    let len = m.clone() * Expr::idx(cols);
    let src = b.buffer("x", from, len.clone(), Space::Global, Access::Read);
    let dst = b.buffer("y", to, len, Space::Global, Access::Write);
    b.for_("r", Expr::idx(0), m, 1, LoopKind::Parallel, |b, r| {
        let base = b.let_("base", r * Expr::idx(cols));
        vec_loop(b, "j", cols, LANES, |b, j, w| {
            let i = Expr::Var(base) + j;
            b.store(dst, i.clone(), Expr::load(src, i, w));
        });
    });
    let prefix =
        format!("gpu_convert_{}_to_{}_c{cols}_m{}", elem_name(from), elem_name(to), dim_name(&Dim::product(rows)));
    on_gpu(p.finish(b, &prefix, op, std::slice::from_ref(x))?, op, x)
}

/// The GPU kernel `y = act(g) * u` over `[rows.., cols]` (f32 `g`, `u`; `y`
/// of `y_elem`).
fn gated(
    rows: &[Dim],
    cols: usize,
    act: Act,
    y_elem: Scalar,
    op: &Op,
    x: &TensorType,
) -> Result<Instance, SelectError> {
    let mut b = Builder::new("gpu_gated");
    let mut p = Params::default();
    let m = p.product(&mut b, rows);
    let len = m.clone() * Expr::idx(cols);
    let g = b.input("g", len.clone());
    let u = b.input("u", len.clone());
    let y = b.buffer("y", y_elem, len, Space::Global, Access::Write);
    b.for_("r", Expr::idx(0), m, 1, LoopKind::Parallel, |b, r| {
        let base = b.let_("base", r * Expr::idx(cols));
        vec_loop(b, "j", cols, LANES, |b, j, w| {
            let i = Expr::Var(base) + j;
            let gv = b.let_("gv", Expr::load(g, i.clone(), w));
            let a = act.apply(b, gv, w);
            b.store(y, i.clone(), a * Expr::load(u, i, w));
        });
    });
    let prefix = format!("gpu_gated_{}_n{cols}_m{}", act.name(), dim_name(&Dim::product(rows)));
    on_gpu(p.finish(b, &prefix, op, std::slice::from_ref(x))?, op, x)
}

fn on_gpu(inst: Instance, op: &Op, x: &TensorType) -> Result<Instance, SelectError> {
    let kernel =
        gpuize(&inst.kernel).map_err(|e| SelectError::unsupported(op, std::slice::from_ref(x), e.to_string()))?;
    Ok(Instance { kernel, scalars: inst.scalars })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::DType;

    fn x_ty() -> TensorType {
        TensorType::new(DType::F32, vec!["batch".parse().unwrap(), "seq".parse().unwrap(), Dim::c(64)])
    }

    fn kinds(l: &LibrarySteps) -> Vec<String> {
        l.steps
            .iter()
            .map(|s| match s {
                LibStep::Kernel(k) => k.instance.kernel.name.split("_m").next().unwrap().to_string(),
                LibStep::Gemm(g) => format!("gemm {:?}->{:?} n={}", g.x, g.y, g.n),
            })
            .collect()
    }

    #[test]
    fn steps_follow_the_element_types() {
        let x = x_ty();
        // bf16 weights, f32 activations: convert, then the GEMM into y.
        let l = cublas_weight_product(&x, Scalar::F32, Scalar::F32, 32, 64, None, Scalar::BF16).unwrap();
        assert_eq!(kinds(&l), ["gpu_convert_f32_to_bf16_c64", "gemm Scratch(0)->Result(0) n=32"]);
        assert_eq!(l.scratch[0].elem, Scalar::BF16);
        assert_eq!(l.scratch[0].len, Dim::product(&x.shape));
        // Activations already bf16: no conversion.
        let l = cublas_weight_product(&x, Scalar::BF16, Scalar::F32, 32, 64, None, Scalar::BF16).unwrap();
        assert_eq!(kinds(&l), ["gemm Operand(0)->Result(0) n=32"]);
        // A narrow result: the GEMM's f32 output converted into it.
        let l = cublas_weight_product(&x, Scalar::BF16, Scalar::BF16, 32, 64, None, Scalar::BF16).unwrap();
        assert_eq!(kinds(&l), ["gemm Operand(0)->Scratch(0) n=32", "gpu_convert_f32_to_bf16_c32"]);
        // f32 weights: one f32 GEMM on the activations as they are.
        let l = cublas_weight_product(&x, Scalar::F32, Scalar::F32, 32, 64, None, Scalar::F32).unwrap();
        assert_eq!(kinds(&l), ["gemm Operand(0)->Result(0) n=32"]);
        // The gated MLP: two GEMMs into scratch, then act(g) * u.
        let l = cublas_weight_product(&x, Scalar::F32, Scalar::F32, 32, 64, Some("gelu_tanh"), Scalar::F16).unwrap();
        assert_eq!(
            kinds(&l),
            [
                "gpu_convert_f32_to_f16_c64",
                "gemm Scratch(0)->Scratch(1) n=32",
                "gemm Scratch(0)->Scratch(2) n=32",
                "gpu_gated_gelu_tanh_n32"
            ]
        );
        let LibStep::Gemm(g) = &l.steps[2] else { panic!() };
        assert_eq!((g.w, g.a, g.b), (Arg::Operand(2), Scalar::F16, Scalar::F16));
    }

    #[test]
    fn refusals() {
        let x = x_ty();
        // Mixed operands, an unknown activation, a wrong contraction dim.
        assert!(cublas_weight_product(&x, Scalar::BF16, Scalar::F32, 32, 64, None, Scalar::F32).is_err());
        assert!(cublas_weight_product(&x, Scalar::F32, Scalar::F32, 32, 64, Some("relu"), Scalar::F32).is_err());
        assert!(cublas_weight_product(&x, Scalar::F32, Scalar::F32, 32, 48, None, Scalar::F32).is_err());
        assert!(cublas_weight_product(&x, Scalar::I64, Scalar::F32, 32, 64, None, Scalar::F32).is_err());
    }
}
