//! Kernel selection for the GPU: one IR node to a GPU kernel instance (or a
//! free view), under the same `Instance` contract as the CPU selection
//! (buffers are the operands then the results, scalar parameters are dims).
//!
//! Dedicated GPU templates (`templates::gpu`) serve the ops where one thread
//! per CPU iteration would be badly slow: the norms (a row per warp or
//! block), last-axis softmax (likewise), attention (for decode two
//! launches, keys split over blocks per GQA group then the partials
//! combined, with a scratch buffer: [`Selected::Steps`]; for prefill the
//! second launch runs flash attention, a block per tile of query rows),
//! rope, concat and kv_append (a thread per element). Every other op gets
//! the CPU kernel `select` picks, turned into a GPU kernel by
//! `templates::gpu::gpuize` (bitwise the CPU results); aliases pass through
//! unchanged.
//!
//! Weight matmuls and the gated MLP are not here: they get the GPU matmul
//! templates; asked for them, this falls back to the gpuized CPU kernel,
//! which is correct but slow.

use super::linalg::{dim_name, Params};
use super::{elem_of, select, Arg, Instance, Scratch, SelectError, Selected, Step, Steps};
use crate::kir::{Builder, Expr, Scalar};
use crate::templates::gpu::{attention, concat, gpuize, norm, rope, rows::RowLayout, softmax};
use crate::templates::NormKind;
use smelt_ir::ops::infer::norm_axis;
use smelt_ir::{Dim, Op, TensorType};

/// Block sizes of the GPU kernels (the defaults suit current GPUs; tests
/// use small blocks, which the interpreter runs much faster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// Threads per block of gpuized kernels and of the templates with a
    /// thread per element (rope, concat).
    pub block: u32,
    /// Threads per block of the row kernels (norms, softmax); the threads
    /// per row grow with the row length up to this.
    pub row_block: u32,
    /// Threads per block of the attention row kernel (used alone when the
    /// split path is off) and of the combine step of split attention, which
    /// runs the flash algorithm for prefill (`attention::FlashParams`); keys
    /// per tile of the row kernel.
    pub attention_threads: u32,
    /// Flash attention (prefill): query rows per block and keys per tile
    /// (both halved as needed to fit the shared memory of wide heads), and
    /// threads per query row (a power of two, at most 32; the rows must be
    /// a multiple of `attention_threads / flash_row_threads`).
    pub flash_rows: usize,
    pub flash_keys: usize,
    pub flash_row_threads: usize,
    /// Split-keys attention for decode (`attention::split_partials`):
    /// threads per block of the split kernel, and keys per tile.
    pub split_threads: u32,
    /// The working blocks a one-query, batch-1 step of the split kernel
    /// should have: `split_blocks / kv heads` splits (1..=64). 0 turns the
    /// split path off (the row kernel alone).
    pub split_blocks: usize,
    /// Up to this many queries per call take the split path.
    pub split_max_queries: usize,
    /// The weight products' parameters; `None`: each shape's defaults
    /// (`WeightProductParams::for_shape`). Tests set small ones, which the
    /// interpreter runs much faster.
    pub weight_products: Option<crate::templates::gpu::WeightProductParams>,
}

impl Default for GpuConfig {
    /// About four working split blocks per SM of an H200 (132 SMs): 64
    /// splits for 8 kv heads, 512 blocks.
    fn default() -> Self {
        GpuConfig {
            block: 256,
            row_block: 256,
            attention_threads: attention::FlashParams::DEFAULT.threads,
            flash_rows: attention::FlashParams::DEFAULT.rows,
            flash_keys: attention::FlashParams::DEFAULT.keys,
            flash_row_threads: attention::FlashParams::DEFAULT.row_threads,
            split_threads: 128,
            split_blocks: 4 * crate::templates::gpu::SMS,
            split_max_queries: 4,
            weight_products: None,
        }
    }
}

/// Selects the GPU kernel (or alias) for one node, with the default
/// [`GpuConfig`].
pub fn select_gpu(op: &Op, inputs: &[TensorType], outputs: &[TensorType]) -> Result<Selected, SelectError> {
    select_gpu_with(op, inputs, outputs, &GpuConfig::default())
}

/// Selects the GPU kernel (or alias) for one node.
pub fn select_gpu_with(
    op: &Op,
    inputs: &[TensorType],
    outputs: &[TensorType],
    cfg: &GpuConfig,
) -> Result<Selected, SelectError> {
    if let Op::Attention { .. } = op {
        return attention_node(op, inputs, cfg);
    }
    if let Some(i) = dedicated(op, inputs, outputs, cfg)? {
        return Ok(Selected::Kernel(i));
    }
    match select(op, inputs, outputs)? {
        Selected::Kernel(i) => {
            let opts = gpuize::GpuizeOptions { block: cfg.block, group: None };
            let kernel = gpuize::gpuize_with(&i.kernel, opts)
                .map_err(|e| SelectError::unsupported(op, inputs, e.to_string()))?;
            Ok(Selected::Kernel(Instance { kernel, scalars: i.scalars }))
        }
        alias => Ok(alias),
    }
}

/// Which attention kernel to build.
#[derive(Clone, Copy)]
enum AttnKernel {
    Rows,
    Split(attention::SplitParams),
    Combine(attention::SplitParams, attention::FlashParams),
}

/// Attention: the row kernel alone, or (with `cfg.split_blocks > 0`) two
/// steps, split-keys partials into a scratch buffer then the combine kernel
/// (which runs flash attention itself when a call has more queries than the
/// split path takes). Heads too wide for the flash tiles' shared memory
/// get the row kernel alone.
fn attention_node(op: &Op, inputs: &[TensorType], cfg: &GpuConfig) -> Result<Selected, SelectError> {
    let unsupported = |why: &str| SelectError::unsupported(op, inputs, why);
    let spec = super::fused::attention_spec(op, inputs, crate::templates::LANES)?;
    let (hq, hkv, d, dv) = (spec.hq, spec.hkv, spec.d, spec.dv);
    let q = &inputs[0];
    let name = format!("attention_h{hq}x{hkv}_d{d}{}", super::fused::attention_tags(op, inputs));
    let build = |kind: AttnKernel| -> Result<Instance, SelectError> {
        let mut b = Builder::new("k");
        let mut p = Params::default();
        let (batch, sq, skv, mask) = super::fused::attention_operands(&mut b, &mut p, inputs);
        let internal = |e: String| unsupported(&format!("internal error building the kernel: {e}"));
        let prefix = match kind {
            AttnKernel::Rows => {
                attention::attention(&mut b, &spec, batch, sq, skv, mask.as_ref(), cfg.attention_threads);
                format!("{name}_gpu")
            }
            AttnKernel::Split(sp) => {
                attention::split_partials(&mut b, &spec, batch, sq, skv, mask.as_ref(), &sp).map_err(internal)?;
                format!("{name}_split{}_gpu", sp.splits)
            }
            AttnKernel::Combine(sp, fp) => {
                attention::combine(&mut b, &spec, batch, sq, skv, mask.as_ref(), &sp, &fp).map_err(internal)?;
                format!("{name}_combine{}_flash{}x{}_gpu", sp.splits, fp.rows, fp.keys)
            }
        };
        p.finish(b, &prefix, op, inputs)
    };
    let fp = attention::FlashParams {
        threads: cfg.attention_threads,
        rows: cfg.flash_rows,
        keys: cfg.flash_keys,
        row_threads: cfg.flash_row_threads,
    }
    .fit(d, dv);
    if cfg.split_blocks == 0 || fp.shared_bytes(d, dv) > attention::MAX_SHARED_BYTES {
        return build(AttnKernel::Rows).map(Selected::Kernel);
    }
    let sp = attention::SplitParams::for_heads(hkv, cfg.split_blocks, cfg.split_threads, cfg.split_max_queries);
    let scratch_len = q.shape[0].clone() * Dim::c((hq * sp.max_queries * sp.splits * (dv + 2)) as i64);
    let operands: Vec<Arg> = (0..inputs.len()).map(Arg::Operand).collect();
    let split_args = [operands.clone(), vec![Arg::Scratch(0)]].concat();
    let combine_args = [operands, vec![Arg::Scratch(0), Arg::Result(0)]].concat();
    Ok(Selected::Steps(Steps {
        scratch: vec![Scratch { name: "partials".into(), elem: Scalar::F32, len: scratch_len }],
        steps: vec![
            Step { instance: build(AttnKernel::Split(sp))?, args: split_args, work: None },
            Step { instance: build(AttnKernel::Combine(sp, fp))?, args: combine_args, work: None },
        ],
    }))
}

/// The instance of a dedicated GPU template, if `op` has one.
fn dedicated(
    op: &Op,
    inputs: &[TensorType],
    outputs: &[TensorType],
    cfg: &GpuConfig,
) -> Result<Option<Instance>, SelectError> {
    let ops = super::Operands { op, inputs };
    let unsupported = |why: &str| ops.unsupported(why);
    let floats = || ops.floats();
    let last_const = |t: &TensorType, what: &str| ops.last_const(t, what);
    let mut b = Builder::new("k");
    let mut p = Params::default();
    let prefix = match op {
        Op::RmsNorm { eps } | Op::LayerNorm { eps } | Op::AddRmsNorm { eps } => {
            floats()?;
            let x = &inputs[0];
            let n = last_const(x, "x")?;
            let kind = match op {
                Op::RmsNorm { .. } => NormKind::Rms,
                Op::LayerNorm { .. } => NormKind::Layer,
                _ => NormKind::AddRms,
            };
            let rows = p.product(&mut b, &x.shape[..x.rank() - 1]);
            norm::norm_rows(&mut b, kind, rows, n, *eps as f32, RowLayout::for_len(Some(n), cfg.row_block));
            format!("{}_n{n}_gpu", op.name())
        }
        Op::Softmax { axis } => {
            let x = &inputs[0];
            let a = norm_axis(*axis, x.rank()).map_err(|e| unsupported(&e))?;
            if a + 1 != x.rank() || elem_of(x.dtype) != Scalar::F32 {
                // Other axes: the gpuized CPU kernel (a thread per line).
                return Ok(None);
            }
            let rows = p.product(&mut b, &x.shape[..a]);
            let n = p.get(&mut b, &x.shape[a]);
            softmax::softmax_rows(
                &mut b,
                rows,
                n,
                RowLayout::for_len(x.shape[a].as_const().map(|c| c as usize), cfg.row_block),
            );
            format!("softmax_{}_gpu", dim_name(&x.shape[a]))
        }
        Op::Rope { interleaved } => {
            floats()?;
            let (x, cos) = (&inputs[0], &inputs[1]);
            let d = last_const(x, "x")?;
            let r = last_const(cos, "cos")?;
            if r % 2 != 0 || r == 0 || r > d || cos.rank() > x.rank() || inputs[2].shape != cos.shape {
                return Err(unsupported("cos/sin must match, with an even last dim no larger than x's"));
            }
            let x_dims: Vec<Expr> = x.shape.iter().map(|dm| p.get(&mut b, dm)).collect();
            let cs_dims: Vec<Expr> = cos.shape.iter().map(|dm| p.get(&mut b, dm)).collect();
            rope::rope(&mut b, &x_dims, &cs_dims, d, r, *interleaved, cfg.block);
            format!("rope_d{d}_r{r}{}_gpu", if *interleaved { "_il" } else { "" })
        }
        Op::Concat { axis } | Op::KvAppend { axis } => {
            let Some(out) = outputs.first() else { return Ok(None) };
            if inputs.is_empty() || inputs.iter().any(|t| t.rank() != out.rank() || t.dtype != out.dtype) {
                return Err(unsupported("operands must share the result's dtype and rank"));
            }
            let a = norm_axis(*axis, out.rank()).map_err(|e| unsupported(&e))?;
            let inner = Dim::product(&out.shape[a + 1..]);
            let outer = p.product(&mut b, &out.shape[..a]);
            let inners: Vec<Expr> =
                inputs.iter().map(|t| p.get(&mut b, &(t.shape[a].clone() * inner.clone()))).collect();
            concat::concat(&mut b, elem_of(out.dtype), outer, &inners, cfg.block);
            format!("{}{}_{}_gpu", op.name(), inputs.len(), out.dtype.name())
        }
        _ => return Ok(None),
    };
    p.finish(b, &prefix, op, inputs).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kir::interp::BufData;
    use crate::kir::Scalar;
    use crate::templates::gpu::testing::*;
    use smelt_ir::DType;

    fn d(s: &str) -> Dim {
        s.parse().unwrap()
    }

    fn i64s(dims: &str) -> TensorType {
        ty(DType::I64, dims)
    }

    fn bools(dims: &str) -> TensorType {
        ty(DType::Bool, dims)
    }

    /// The node's GPU selection against its CPU selection, run in the
    /// interpreter on the same operands for each symbol binding: every
    /// buffer length must agree, gpuized kernels must give bitwise the CPU
    /// results and dedicated templates agree within 1e-5 * (1 + |want|).
    /// Returns whether a dedicated template was used.
    fn check(op: &Op, inputs: &[TensorType], bindings: &[&[(&str, i64)]], cfg: &GpuConfig) -> bool {
        let refs: Vec<&TensorType> = inputs.iter().collect();
        let outputs = op.infer(&refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        let gpu = select_gpu_with(op, inputs, &outputs, cfg).unwrap_or_else(|e| panic!("{e}"));
        let cpu = select(op, inputs, &outputs).unwrap();
        let c = match (&gpu, cpu) {
            (Selected::Kernel(_) | Selected::Steps(_), Selected::Kernel(c)) => c,
            (Selected::Alias { offset: a }, Selected::Alias { offset: b }) => {
                assert_eq!(a, &b, "{op:?}");
                return false;
            }
            other => panic!("{op:?}: GPU and CPU selections differ in kind: {other:?}"),
        };
        let kernels: Vec<&Instance> = match &gpu {
            Selected::Kernel(g) => vec![g],
            Selected::Steps(st) => st.steps.iter().map(|s| &s.instance).collect(),
            Selected::Alias { .. } => unreachable!("matched above"),
        };
        for g in &kernels {
            assert!(g.kernel.gpu.is_some(), "{op:?}: not a GPU kernel\n{}", g.kernel);
        }
        let gpuized = kernels.len() == 1 && kernels[0].kernel.name.starts_with(&c.kernel.name);
        let names: Vec<&str> = kernels.iter().map(|g| g.kernel.name.as_str()).collect();
        for syms in bindings {
            let cs = scalars(&c, syms);
            if let Selected::Kernel(g) = &gpu {
                let lens = |i: &Instance, s: &[i64]| -> Vec<usize> {
                    i.kernel.global_buffers().map(|(_, b)| i.kernel.buffer_len(b, s).unwrap()).collect()
                };
                assert_eq!(lens(g, &scalars(g, syms)), lens(&c, &cs), "{op:?} {syms:?}: buffer lengths");
            }
            let mut bufs = buffers(&c.kernel, &cs, 21);
            // Additive masks: some -inf, the rest small.
            if matches!(op, Op::Attention { .. }) && inputs.len() > 3 {
                if let BufData::F32(m) = &mut bufs[3] {
                    m.iter_mut().for_each(|x| *x = if *x < -1.0 { f32::NEG_INFINITY } else { *x * 0.25 });
                }
            }
            let want = run_cpu(&c.kernel, &bufs, &cs, 2);
            // (The interpreter checks every step's buffer lengths.)
            let got = run_gpu_selected(&gpu, &bufs, inputs.len(), syms);
            let what = format!("{op:?} {syms:?} ({names:?})");
            if gpuized {
                assert_same(&what, &got, &want);
            } else {
                assert_close(&what, &got, &want, 1e-5);
            }
        }
        !gpuized
    }

    /// Small blocks: the interpreter runs a block's threads one at a time
    /// and every barrier or shuffle passes through all of them. Split
    /// attention: 4 splits for 2 kv heads, up to 2 queries (so `seq = 3`
    /// runs the combine kernel's rows).
    const SMALL: GpuConfig = GpuConfig {
        block: 64,
        row_block: 64,
        attention_threads: 32,
        flash_rows: 16,
        flash_keys: 8,
        flash_row_threads: 4,
        split_threads: 32,
        split_blocks: 8,
        split_max_queries: 2,
        weight_products: None,
    };

    const KV: &[&[(&str, i64)]] = &[&[("batch", 1), ("seq", 3), ("past", 0)], &[("batch", 2), ("seq", 1), ("past", 9)]];

    /// The nodes of the fixtures' decoders (`model-kv.onnx` after fusion:
    /// llama, mistral, qwen2, qwen3, gemma, phi3), at their sizes.
    #[test]
    fn gpu_select_fixture_nodes() {
        let t = "past + seq";
        let kv = |s: &str| s.replace('T', t);
        let mut dedicated = vec![];
        let mut run = |op: Op, inputs: &[TensorType]| {
            if check(&op, inputs, KV, &SMALL) {
                dedicated.push(op.name());
            }
        };
        // Embedding, positions, rotary tables (gemma: the embedding scale).
        run(Op::Gather { axis: 0 }, &[f("256, 64"), i64s("batch, seq")]);
        run(Op::Mul {}, &[f("batch, seq, 64"), f("")]);
        run(Op::Cast { to: DType::F32 }, &[i64s("batch, seq, 1")]);
        run(Op::Mul {}, &[f("batch, seq, 1"), f("8")]);
        run(Op::Concat { axis: -1 }, &[f("batch, seq, 12"), f("batch, seq, 12")]);
        run(Op::Cos {}, &[f("batch, seq, 24")]);
        run(Op::Unsqueeze { axes: vec![1] }, &[f("batch, seq, 24")]);
        // The padding mask, gathered as ONNX's GatherND spells it.
        run(Op::Cast { to: DType::Bool }, &[i64s(&kv("batch, T"))]);
        run(Op::Range { start: d("0"), end: d(t), step: 1, dtype: DType::I64 }, &[]);
        run(Op::Expand { shape: vec![d("batch"), d("1"), d("1"), d(t)] }, &[i64s("1, 1, 1, 1")]);
        run(Op::Concat { axis: -1 }, &[i64s(&kv("batch, 1, 1, T, 1")), i64s(&kv("batch, 1, 1, T, 1"))]);
        run(
            Op::Slice { axes: vec![-1], starts: vec![d("1")], ends: vec![d("2")], steps: vec![1] },
            &[i64s(&kv("batch, 1, 1, T, 2"))],
        );
        run(Op::Lt {}, &[i64s(&kv("batch, 1, 1, T")), i64s("")]);
        run(Op::Add {}, &[i64s(&kv("batch, 1, 1, T")), i64s("1")]);
        run(Op::Where {}, &[bools(&kv("batch, 1, 1, T")), i64s(&kv("batch, 1, 1, T")), i64s(&kv("batch, 1, 1, T"))]);
        run(Op::Gather { axis: 0 }, &[bools("10"), i64s(&kv("batch, 1, 1, T"))]);
        // Attention block: fused qkv slices (phi3, qwen3 sizes), per-head
        // q/k norms (qwen3), rope, the cache append, attention.
        run(
            Op::Slice { axes: vec![-1], starts: vec![d("96")], ends: vec![d("144")], steps: vec![1] },
            &[f("batch, seq, 192")],
        );
        run(Op::Add {}, &[f("batch, seq, 96"), f("96")]);
        run(Op::RmsNorm { eps: 1e-6 }, &[f("batch, seq, 4, 24"), f("24")]);
        run(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[f("batch, seq, 4, 24")]);
        run(Op::Rope { interleaved: false }, &[f("batch, 4, seq, 24"), f("batch, 1, seq, 24"), f("batch, 1, seq, 24")]);
        run(Op::Concat { axis: -2 }, &[f("batch, 2, past, 24"), f("batch, 2, seq, 24")]);
        run(Op::KvAppend { axis: -2 }, &[f("batch, 2, past, 24"), f("batch, 2, seq, 24")]);
        let causal = |window| Op::Attention { scale: 0.2, causal: true, window, softcap: None };
        let qkv = |hq: usize, hkv: usize, dh: usize| {
            vec![
                f(&format!("batch, {hq}, seq, {dh}")),
                f(&kv(&format!("batch, {hkv}, T, {dh}"))),
                f(&kv(&format!("batch, {hkv}, T, {dh}"))),
            ]
        };
        let mut with_mask = qkv(4, 2, 24);
        with_mask.push(bools(&kv("batch, 1, 1, T")));
        run(causal(None), &with_mask);
        run(causal(Some(4)), &qkv(4, 2, 16));
        run(causal(None), &qkv(4, 1, 32));
        // The residual stream and the final norm.
        run(Op::AddRmsNorm { eps: 1e-6 }, &[f("batch, seq, 64"), f("batch, seq, 64"), f("64")]);
        run(Op::RmsNorm { eps: 1e-6 }, &[f("batch, seq, 64"), f("64")]);
        run(Op::Add {}, &[f("batch, seq, 64"), f("batch, seq, 64")]);
        dedicated.dedup();
        // (rms_norm twice: qwen3's per-head norm, then the final norm.)
        assert_eq!(
            dedicated,
            ["concat", "rms_norm", "rope", "concat", "kv_append", "attention", "add_rms_norm", "rms_norm"]
        );
    }

    /// The default blocks (256 threads, attention 128) on a decode step:
    /// slow in the interpreter, so two nodes only.
    #[test]
    fn gpu_select_default_blocks() {
        let decode: &[&[(&str, i64)]] = &[&[("batch", 1), ("seq", 1), ("past", 5)]];
        let cfg = GpuConfig::default();
        assert!(check(&Op::RmsNorm { eps: 1e-6 }, &[f("batch, seq, 4, 24"), f("24")], decode, &cfg));
        let attn = Op::Attention { scale: 0.2, causal: true, window: None, softcap: None };
        assert!(check(
            &attn,
            &[f("batch, 2, seq, 24"), f("batch, 1, past + seq, 24"), f("batch, 1, past + seq, 24")],
            decode,
            &cfg
        ));
        assert!(!check(&Op::Add {}, &[f("batch, seq, 64"), f("64")], decode, &cfg));
    }

    /// Narrow activations: the node's GPU kernels with operand `i` in a
    /// buffer of `in_elems[i]` and result `j` in `out_elems[j]` (bf16/f16
    /// buffers where the scheduler binds narrow ones: values typed narrow,
    /// widening casts seen through, results a narrowing cast follows),
    /// against the reference interpreter on the same (rounded) operands,
    /// its results rounded to the narrow buffers' type: within one ulp of
    /// that type (the kernels sum in f32, the interpreter in f64, and a sum
    /// near a rounding boundary may round either way) plus 1e-5.
    fn check_narrow(op: &Op, inputs: &[TensorType], in_elems: &[Scalar], out_elems: &[Scalar], cfg: &GpuConfig) {
        use smelt_ir::Tensor;
        let refs: Vec<&TensorType> = inputs.iter().collect();
        let outputs = op.infer(&refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        let sel = select_gpu_with(op, inputs, &outputs, cfg).unwrap_or_else(|e| panic!("{e}"));
        let sel = narrowed(&sel, in_elems, out_elems);
        for syms in KV {
            let env: std::collections::BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let shape =
                |t: &TensorType| -> Vec<usize> { t.shape.iter().map(|d| d.eval_map(&env).unwrap() as usize).collect() };
            let mut bufs = vec![];
            let mut tensors = vec![];
            for (i, (t, &e)) in inputs.iter().zip(in_elems).enumerate() {
                let sh = shape(t);
                let n: usize = sh.iter().product();
                let r = crate::templates::testing::rand(n, 90 + 13 * i as u64);
                if t.dtype.is_float() {
                    let vals: Vec<f32> = floats(&stored(e, &r.iter().map(|x| x * 2.0).collect::<Vec<_>>()));
                    bufs.push(stored(e, &vals));
                    tensors.push(Tensor::from_f32(t.dtype, sh, vals).unwrap());
                } else if t.dtype.is_bool() {
                    let v: Vec<bool> = r.iter().map(|x| *x > -0.5).collect();
                    bufs.push(BufData::Bool(v.clone()));
                    tensors.push(Tensor { dtype: t.dtype, shape: sh, data: smelt_ir::Data::Bool(v) });
                } else {
                    let v: Vec<i64> = r.iter().map(|x| ((x + 1.0) * 100.0) as i64 % 64).collect();
                    bufs.push(BufData::I64(v.clone()));
                    tensors.push(Tensor::from_i64(t.dtype, sh, v).unwrap());
                }
            }
            let trefs: Vec<&Tensor> = tensors.iter().collect();
            let want = smelt_ir::interp::eval_op(op, &trefs, &env).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            for (t, &e) in outputs.iter().zip(out_elems) {
                let n: usize = shape(t).iter().product();
                bufs.push(match e {
                    Scalar::F32 => BufData::F32(vec![f32::NAN; n]),
                    e => BufData::zeros(e, n),
                });
            }
            let got = run_gpu_selected(&sel, &bufs, inputs.len(), syms);
            for (j, (w, &e)) in want.iter().zip(out_elems).enumerate() {
                let w = w.to_f32_vec();
                let w: Vec<f32> = floats(&stored(e, &w));
                let g = floats(&got[inputs.len() + j]);
                let ulp = match e {
                    Scalar::BF16 => 1.0 / 128.0,
                    Scalar::F16 => 1.0 / 1024.0,
                    _ => 0.0,
                };
                assert_eq!(g.len(), w.len());
                for (i, (x, y)) in g.iter().zip(&w).enumerate() {
                    let ok = (x - y).abs() <= ulp * y.abs() + 1e-5 * (1.0 + y.abs()) || (x.is_nan() && y.is_nan());
                    assert!(ok, "{op:?} {syms:?} result {j} ({e:?}) element {i}: got {x}, expected {y}");
                }
            }
        }
    }

    /// Every GPU template and the gpuized CPU kernels the fixtures' decoders
    /// use, with bf16 and f16 activations (odd sizes, small blocks).
    #[test]
    fn gpu_select_narrow_activations() {
        use Scalar::{F32, I64};
        let t = "past + seq";
        let kv = |s: &str| s.replace('T', t);
        for n in [Scalar::BF16, Scalar::F16] {
            let nt = |dims: &str| ty(if n == Scalar::BF16 { DType::BF16 } else { DType::F16 }, dims);
            // Values typed narrow: norms, softmax, elementwise, layout.
            check_narrow(&Op::RmsNorm { eps: 1e-6 }, &[nt("batch, seq, 3, 24"), f("24")], &[n, F32], &[n], &SMALL);
            check_narrow(&Op::RmsNorm { eps: 1e-6 }, &[nt("batch, seq, 100"), f("100")], &[n, F32], &[n], &SMALL);
            check_narrow(
                &Op::AddRmsNorm { eps: 1e-6 },
                &[nt("batch, seq, 40"), nt("batch, seq, 40"), f("40")],
                &[n, n, F32],
                &[n, n],
                &SMALL,
            );
            check_narrow(
                &Op::LayerNorm { eps: 1e-5 },
                &[nt("batch, seq, 40"), f("40"), f("40")],
                &[n, F32, F32],
                &[n],
                &SMALL,
            );
            check_narrow(&Op::Softmax { axis: -1 }, &[nt("batch, 3, seq, 13")], &[n], &[n], &SMALL);
            check_narrow(&Op::Add {}, &[nt("batch, seq, 40"), nt("batch, seq, 40")], &[n, n], &[n], &SMALL);
            check_narrow(&Op::Sigmoid {}, &[nt("batch, seq, 40")], &[n], &[n], &SMALL);
            check_narrow(&Op::Transpose { perm: vec![0, 2, 1, 3] }, &[nt("batch, seq, 3, 24")], &[n], &[n], &SMALL);
            check_narrow(
                &Op::Slice { axes: vec![-1], starts: vec![d("96")], ends: vec![d("144")], steps: vec![1] },
                &[nt("batch, seq, 192")],
                &[n],
                &[n],
                &SMALL,
            );
            check_narrow(
                &Op::Concat { axis: -1 },
                &[nt("batch, seq, 12"), nt("batch, seq, 12")],
                &[n, n],
                &[n],
                &SMALL,
            );
            // Mixed operands: f32 values in the IR with narrow buffers (a
            // widening cast seen through, a narrowing cast stored by the
            // kernel): the embedding lookup, a scale, rope with f32 tables,
            // a narrow key appended to an f32 cache, attention with q narrow
            // and f32 or narrow caches.
            check_narrow(&Op::Gather { axis: 0 }, &[f("64, 40"), i64s("batch, seq")], &[F32, I64], &[n], &SMALL);
            check_narrow(&Op::Mul {}, &[f("batch, seq, 40"), f("")], &[n, F32], &[n], &SMALL);
            check_narrow(
                &Op::Rope { interleaved: false },
                &[f("batch, 3, seq, 24"), f("batch, 1, seq, 24"), f("batch, 1, seq, 24")],
                &[n, F32, F32],
                &[n],
                &SMALL,
            );
            check_narrow(
                &Op::Rope { interleaved: true },
                &[f("batch, 3, seq, 24"), f("batch, 1, seq, 16"), f("batch, 1, seq, 16")],
                &[n, F32, F32],
                &[n],
                &SMALL,
            );
            check_narrow(
                &Op::KvAppend { axis: -2 },
                &[f("batch, 2, past, 24"), f("batch, 2, seq, 24")],
                &[F32, n],
                &[F32],
                &SMALL,
            );
            let causal = |window| Op::Attention { scale: 0.2, causal: true, window, softcap: None };
            let qkv = |hq: usize, hkv: usize, dh: usize| {
                vec![
                    f(&format!("batch, {hq}, seq, {dh}")),
                    f(&kv(&format!("batch, {hkv}, T, {dh}"))),
                    f(&kv(&format!("batch, {hkv}, T, {dh}"))),
                ]
            };
            let mut with_mask = qkv(4, 2, 24);
            with_mask.push(bools(&kv("batch, 1, 1, T")));
            check_narrow(&causal(None), &with_mask, &[n, F32, F32, Scalar::Bool], &[n], &SMALL);
            check_narrow(&causal(Some(4)), &qkv(4, 2, 16), &[n, n, n], &[n], &SMALL);
            check_narrow(&causal(None), &qkv(3, 1, 8), &[n, F32, F32], &[F32], &SMALL);
        }
    }
}
