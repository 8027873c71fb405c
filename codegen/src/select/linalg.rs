//! Kernel selection for `matmul` (numpy semantics, batch broadcasting) and
//! the gated MLP, plus the `[n, k]`-weight variants the scheduler uses when
//! it folds a `transpose` of a weight into the product.
//!
//! Also home of [`Params`], which every family here uses to turn dims into
//! kernel sizes: constant dims are baked into the kernel, each distinct
//! symbolic dim becomes one scalar parameter, and kernels are named from a
//! readable prefix plus a hash of their text, so identical nodes (same op,
//! attributes and static dims) get identical kernels and different ones
//! never share a name.

use super::{elem_of, Instance, SelectError, Selected};
use crate::kir::{Builder, Expr, Scalar};
use crate::templates::matmul_dyn::{self, Act, BatchAxis, Layout, MatmulDims, TileParams};
use crate::templates::packed;
pub use crate::templates::packed::Packing;
pub use crate::templates::packed::PanelParams;
use smelt_ir::{DType, Dim, Op, TensorType};

/// The scalar parameters of a kernel being built, one per distinct
/// symbolic dim, in the order they were first asked for.
#[derive(Default)]
pub(super) struct Params {
    dims: Vec<(Dim, Expr)>,
}

impl Params {
    /// `d` as a kernel size: a constant, or its scalar parameter.
    pub(super) fn get(&mut self, b: &mut Builder, d: &Dim) -> Expr {
        if let Some(c) = d.as_const() {
            return Expr::i64(c);
        }
        if let Some((_, e)) = self.dims.iter().find(|(x, _)| x == d) {
            return e.clone();
        }
        let e = b.scalar_param(&format!("s{}", self.dims.len()));
        self.dims.push((d.clone(), e.clone()));
        e
    }

    /// The product of `dims` as one size.
    pub(super) fn product(&mut self, b: &mut Builder, dims: &[Dim]) -> Expr {
        self.get(b, &Dim::product(dims))
    }

    /// Finishes the kernel and names it `<prefix>_<hash of its text>`.
    pub(super) fn finish(
        self,
        b: Builder,
        prefix: &str,
        op: &Op,
        inputs: &[TensorType],
    ) -> Result<Instance, SelectError> {
        let mut kernel = b
            .finish()
            .map_err(|e| SelectError::unsupported(op, inputs, format!("internal error building the kernel: {e}")))?;
        kernel.name = String::new();
        let text = kernel.to_string();
        // FNV-1a: stable across runs and platforms, unlike std's hasher.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| (h ^ c as u64).wrapping_mul(0x0100_0000_01b3));
        kernel.name = format!("{prefix}_{:012x}", hash >> 16);
        Ok(Instance { kernel, scalars: self.dims.into_iter().map(|(d, _)| d).collect() })
    }
}

/// A dim for kernel names: its value, or `d` when symbolic.
pub(super) fn dim_name(d: &Dim) -> String {
    d.as_const().map_or("d".to_string(), |c| c.to_string())
}

/// Floats only: integer and bool products have no kernel here.
fn float_operands(op: &Op, inputs: &[TensorType]) -> Result<(), SelectError> {
    if inputs.iter().all(|t| elem_of(t.dtype) == Scalar::F32) {
        Ok(())
    } else {
        Err(SelectError::unsupported(op, inputs, "only float operands have a CPU kernel"))
    }
}

pub fn select(op: &Op, inputs: &[TensorType], _outputs: &[TensorType]) -> Result<Option<Selected>, SelectError> {
    match op {
        Op::MatMul {} => {
            float_operands(op, inputs)?;
            matmul(op, inputs).map(|i| Some(Selected::Kernel(i)))
        }
        Op::GatedMlp { act } => {
            float_operands(op, inputs)?;
            let act =
                Act::parse(act).ok_or_else(|| SelectError::unsupported(op, inputs, format!("unknown act `{act}`")))?;
            let (x, w) = (&inputs[0], &inputs[1]);
            if w.rank() != 2 || inputs[2].shape != w.shape {
                return Err(SelectError::unsupported(op, inputs, "weights must be one [k, n] shape"));
            }
            gated(op, inputs, x, &w.shape[1], &w.shape[0], Layout::KN, act, Scalar::F32)
                .map(|i| Some(Selected::Kernel(i)))
        }
        _ => Ok(None),
    }
}

/// `matmul` of `inputs[0]` and `inputs[1]`.
fn matmul(op: &Op, inputs: &[TensorType]) -> Result<Instance, SelectError> {
    let (a, bt) = (&inputs[0], &inputs[1]);
    if a.rank() == 0 || bt.rank() == 0 {
        return Err(SelectError::unsupported(op, inputs, "operands must have rank >= 1"));
    }
    let mut sa = a.shape.clone();
    let mut sb = bt.shape.clone();
    if sa.len() == 1 {
        sa.insert(0, Dim::c(1));
    }
    if sb.len() == 1 {
        sb.push(Dim::c(1));
    }
    let (m, k, n) = (sa[sa.len() - 2].clone(), sa[sa.len() - 1].clone(), sb[sb.len() - 1].clone());
    if sb[sb.len() - 2] != k {
        return Err(SelectError::unsupported(op, inputs, "contraction dims differ"));
    }
    let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
    let out_batch =
        smelt_ir::ops::infer::broadcast_shapes(ba, bb).map_err(|e| SelectError::unsupported(op, inputs, e))?;
    let one = Dim::c(1);
    let has = |src: &[Dim], i: usize| -> bool {
        let lead = out_batch.len() - src.len();
        i >= lead && src[i - lead] != one
    };
    let axes: Vec<(Dim, bool, bool)> = (0..out_batch.len())
        .filter(|&i| out_batch[i] != one)
        .map(|i| (out_batch[i].clone(), has(ba, i), has(bb, i)))
        .collect();
    let mut b = Builder::new("matmul");
    let mut p = Params::default();
    // A batch of rows against one matrix is a single taller product.
    let dims = if axes.iter().all(|x| x.1 && !x.2) {
        let mut rows: Vec<Dim> = axes.iter().map(|x| x.0.clone()).collect();
        rows.push(m.clone());
        MatmulDims { batch: vec![], m: p.product(&mut b, &rows), k: p.get(&mut b, &k), n: p.get(&mut b, &n) }
    } else {
        let batch =
            axes.iter().map(|(d, ha, hb)| BatchAxis { dim: p.get(&mut b, d), a: *ha, b: *hb }).collect::<Vec<_>>();
        MatmulDims { batch, m: p.get(&mut b, &m), k: p.get(&mut b, &k), n: p.get(&mut b, &n) }
    };
    let batched = if dims.batch.is_empty() { String::new() } else { format!("b{}_", dims.batch.len()) };
    matmul_dyn::matmul(&mut b, &dims, Layout::KN, None, TileParams::default_for(Layout::KN, false), Scalar::F32);
    let prefix = format!("matmul_kn_{batched}k{}_n{}", dim_name(&k), dim_name(&n));
    p.finish(b, &prefix, op, inputs)
}

/// A product `x · W` where `x` is `[.., m, k]` (every leading axis folded
/// into the rows) and `W` is `[k, n]` or `[n, k]` as `layout` says, stored
/// as `w`; with `act` the gated MLP over two such weights.
#[allow(clippy::too_many_arguments)]
fn gated(
    op: &Op,
    inputs: &[TensorType],
    x: &TensorType,
    n: &Dim,
    k: &Dim,
    layout: Layout,
    act: Act,
    w: Scalar,
) -> Result<Instance, SelectError> {
    rows_times_weight(op, inputs, x, n, k, layout, Some(act), w, TileParams::default_for(layout, true))
}

#[allow(clippy::too_many_arguments)]
fn rows_times_weight(
    op: &Op,
    inputs: &[TensorType],
    x: &TensorType,
    n: &Dim,
    k: &Dim,
    layout: Layout,
    act: Option<Act>,
    w: Scalar,
    tile: TileParams,
) -> Result<Instance, SelectError> {
    if x.rank() == 0 || x.shape.last() != Some(k) {
        return Err(SelectError::unsupported(op, inputs, format!("x's last dim must be the contraction dim {k}")));
    }
    let mut b = Builder::new("matmul");
    let mut p = Params::default();
    let dims = MatmulDims {
        batch: vec![],
        m: p.product(&mut b, &x.shape[..x.rank() - 1]),
        k: p.get(&mut b, k),
        n: p.get(&mut b, n),
    };
    matmul_dyn::matmul(&mut b, &dims, layout, act, tile, w);
    let l = format!("{layout:?}").to_lowercase();
    let prefix = match act {
        None => format!("matmul_{l}_k{}_n{}{}", dim_name(k), dim_name(n), elem_suffix(w)),
        Some(a) => format!("gated_mlp_{}_{l}_k{}_n{}{}", a.name(), dim_name(k), dim_name(n), elem_suffix(w)),
    };
    p.finish(b, &prefix, op, inputs)
}

/// `_bf16`/`_f16` for kernels reading narrow weights, so profiles tell them apart.
fn elem_suffix(w: Scalar) -> &'static str {
    match w {
        Scalar::BF16 => "_bf16",
        Scalar::F16 => "_f16",
        _ => "",
    }
}

/// How a weight of this dtype is stored for the weight kernels: `bf16` and
/// `f16` weights stay narrow (widened as they are loaded), others are f32.
fn weight_elem(d: DType) -> Scalar {
    match d {
        DType::BF16 => Scalar::BF16,
        DType::F16 => Scalar::F16,
        _ => Scalar::F32,
    }
}

/// `a · w_nkᵀ` for a weight stored `[n, k]` (the scheduler's fold of
/// `matmul(a, transpose(w, [1, 0]))`): operands `(a, w_nk)`, result
/// `[.., m, n]` for `a` of shape `[.., m, k]`. The dot products run along
/// the weight's contiguous rows. A `bf16`/`f16` weight is read from a
/// buffer of that type (unlike other operands, which hold floats as f32).
pub fn matmul_weight_nk(a: &TensorType, w_nk: &TensorType) -> Result<Instance, SelectError> {
    let op = Op::MatMul {};
    let inputs = [a.clone(), w_nk.clone()];
    float_operands(&op, &inputs)?;
    if w_nk.rank() != 2 {
        return Err(SelectError::unsupported(&op, &inputs, "the [n, k] weight must have rank 2"));
    }
    let tile = TileParams::default_for(Layout::NK, false);
    rows_times_weight(&op, &inputs, a, &w_nk.shape[0], &w_nk.shape[1], Layout::NK, None, weight_elem(w_nk.dtype), tile)
}

/// A product with a constant weight `[n, k]` stored as `w` (the plain one,
/// or the gated MLP with `act`), read as `[n, k]` rows with the tile
/// parameters `tile`: [`matmul_weight_nk`] and [`gated_mlp_weight_nk`] with
/// chosen parameters (the tuner's `rows` variants). Operands `(x, W...)`
/// with `x` of shape `[.., m, k]`.
pub fn weight_product_rows(
    x: &TensorType,
    n: usize,
    k: usize,
    act: Option<Act>,
    w: Scalar,
    tile: TileParams,
) -> Result<Instance, SelectError> {
    let op = match act {
        None => Op::MatMul {},
        Some(a) => Op::GatedMlp { act: a.name().to_string() },
    };
    let wt = TensorType::new(x.dtype, vec![Dim::c(n as i64), Dim::c(k as i64)]);
    let inputs = match act {
        None => vec![x.clone(), wt],
        Some(_) => vec![x.clone(), wt.clone(), wt],
    };
    float_operands(&op, &inputs)?;
    let (nd, kd) = (Dim::c(n as i64), Dim::c(k as i64));
    rows_times_weight(&op, &inputs, x, &nd, &kd, Layout::NK, act, w, tile)
}

/// A packed-panel weight product (the plain one, or the gated MLP with
/// `act`) with the panel parameters `params`: [`weight_matmul`] and
/// [`weight_gated_mlp`] with chosen parameters (the tuner's `panels`
/// variants).
pub fn weight_product_panels(
    x: &TensorType,
    n: usize,
    k: usize,
    act: Option<Act>,
    w: Scalar,
    params: PanelParams,
) -> Result<WeightKernel, SelectError> {
    weight_kernel(x, n, k, act, w, params)
}

/// `gated_mlp` with both weights stored `[n, k]`: operands
/// `(x, w_gate_nk, w_up_nk)`, result `[.., m, n]`; narrow weights as for
/// [`matmul_weight_nk`].
pub fn gated_mlp_weight_nk(
    x: &TensorType,
    w_gate_nk: &TensorType,
    w_up_nk: &TensorType,
    act: &str,
) -> Result<Instance, SelectError> {
    let op = Op::GatedMlp { act: act.to_string() };
    let inputs = [x.clone(), w_gate_nk.clone(), w_up_nk.clone()];
    float_operands(&op, &inputs)?;
    let a = Act::parse(act).ok_or_else(|| SelectError::unsupported(&op, &inputs, format!("unknown act `{act}`")))?;
    if w_gate_nk.rank() != 2 || w_up_nk.shape != w_gate_nk.shape || w_up_nk.dtype != w_gate_nk.dtype {
        return Err(SelectError::unsupported(&op, &inputs, "weights must be one [n, k] type"));
    }
    let w = weight_elem(w_gate_nk.dtype);
    gated(&op, &inputs, x, &w_gate_nk.shape[0], &w_gate_nk.shape[1], Layout::NK, a, w)
}

/// A weight-stationary matmul kernel and how its constant weights must be
/// laid out.
///
/// The instance's buffers are the activations `[.., m, k]` (dense, every
/// leading axis folded into `m`), then one packed weight per entry of
/// `packs` (declared with length [`Packing::packed_len`], which exceeds
/// `n * k` when `n` is not a multiple of the panel width), then the result
/// `[.., m, n]`. Its only possible scalar parameter is `m`, the product of
/// the leading dims of the activations. The caller stores
/// `packs[i].apply(w_nk, n, k)` of the `i`-th weight (given `[n, k]`) in
/// the `i`-th weight buffer.
#[derive(Clone, Debug)]
pub struct WeightKernel {
    pub instance: Instance,
    /// One per weight operand, in operand order.
    pub packs: Vec<Packing>,
}

/// `a · Wᵀ` for a constant weight `W` given as `[n, k]`: operands
/// `(a, packed W)`, result `[.., m, n]` for `a` of shape `[.., m, k]`. The
/// same result as `matmul(a, transpose(W, [1, 0]))`. The packed weight is
/// stored as `w` (`F32`, `BF16` or `F16`).
pub fn weight_matmul(a: &TensorType, n: usize, k: usize, w: Scalar) -> Result<WeightKernel, SelectError> {
    weight_kernel(a, n, k, None, w, PanelParams::DEFAULT)
}

/// [`weight_matmul`] with the tile shape and vector width of `params`.
pub fn weight_matmul_with(
    a: &TensorType,
    n: usize,
    k: usize,
    w: Scalar,
    params: PanelParams,
) -> Result<WeightKernel, SelectError> {
    weight_kernel(a, n, k, None, w, params)
}

/// `act(x · Wgᵀ) * (x · Wuᵀ)` for constant weights given as `[n, k]`:
/// operands `(x, packed Wg, packed Wu)`, result `[.., m, n]`. The same
/// result as `gated_mlp(x, transpose(Wg), transpose(Wu))` with `act`. The
/// packed weights are stored as `w`.
pub fn weight_gated_mlp(x: &TensorType, n: usize, k: usize, act: &str, w: Scalar) -> Result<WeightKernel, SelectError> {
    weight_gated_mlp_with(x, n, k, act, w, PanelParams::DEFAULT)
}

/// [`weight_gated_mlp`] with the tile shape and vector width of `params`.
pub fn weight_gated_mlp_with(
    x: &TensorType,
    n: usize,
    k: usize,
    act: &str,
    w: Scalar,
    params: PanelParams,
) -> Result<WeightKernel, SelectError> {
    let op = Op::GatedMlp { act: act.to_string() };
    let a = Act::parse(act)
        .ok_or_else(|| SelectError::unsupported(&op, std::slice::from_ref(x), format!("unknown act `{act}`")))?;
    weight_kernel(x, n, k, Some(a), w, params)
}

fn weight_kernel(
    x: &TensorType,
    n: usize,
    k: usize,
    act: Option<Act>,
    welem: Scalar,
    params: PanelParams,
) -> Result<WeightKernel, SelectError> {
    let op = match act {
        None => Op::MatMul {},
        Some(a) => Op::GatedMlp { act: a.name().to_string() },
    };
    let w = TensorType::new(x.dtype, vec![Dim::c(n as i64), Dim::c(k as i64)]);
    let inputs = match act {
        None => vec![x.clone(), w],
        Some(_) => vec![x.clone(), w.clone(), w],
    };
    float_operands(&op, &inputs)?;
    if n == 0 || k == 0 {
        return Err(SelectError::unsupported(&op, &inputs, "empty weights have no packed kernel"));
    }
    if x.rank() == 0 || x.shape.last() != Some(&Dim::c(k as i64)) {
        return Err(SelectError::unsupported(&op, &inputs, format!("x's last dim must be the contraction dim {k}")));
    }
    let mut b = Builder::new("matmul");
    let mut p = Params::default();
    let m = p.product(&mut b, &x.shape[..x.rank() - 1]);
    if !matches!(welem, Scalar::F32 | Scalar::BF16 | Scalar::F16) {
        return Err(SelectError::unsupported(&op, &inputs, format!("weights stored as {welem:?}")));
    }
    let params = params.normalized();
    packed::weight_matmul(&mut b, m, n, k, act, params, welem);
    // The vector width is in the name: the lowering is chosen by it.
    let v = if params.lanes == 4 { String::new() } else { format!("_v{}", params.lanes) };
    let prefix = match act {
        None => format!("wmatmul_k{k}_n{n}{}{v}", elem_suffix(welem)),
        Some(a) => format!("wgated_mlp_{}_k{k}_n{n}{}{v}", a.name(), elem_suffix(welem)),
    };
    let instance = p.finish(b, &prefix, &op, &inputs)?;
    let packs = vec![params.packing(welem); if act.is_some() { 2 } else { 1 }];
    Ok(WeightKernel { instance, packs })
}
