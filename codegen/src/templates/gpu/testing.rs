//! Test helpers for the GPU templates: a node's kernel instance from
//! `select`, deterministic buffers for any kernel, and runs in the KIR
//! interpreter's CPU and GPU modes.

use crate::kir::interp::{self, BufData, Mode};
use crate::kir::{Access, Kernel, Scalar};
use crate::select::{select, Arg, Instance, Selected};
use crate::templates::testing::rand;
use smelt_ir::{Dim, Op, TensorType};
use std::collections::BTreeMap;

/// A tensor type from a dtype and comma-separated dims (`"2, s, 4"`).
pub fn ty(dtype: smelt_ir::DType, dims: &str) -> TensorType {
    let shape = if dims.trim().is_empty() {
        vec![]
    } else {
        dims.split(',').map(|d| d.trim().parse::<Dim>().unwrap()).collect()
    };
    TensorType::new(dtype, shape)
}

pub fn f(dims: &str) -> TensorType {
    ty(smelt_ir::DType::F32, dims)
}

/// The CPU instance `select` picks for `op` on `inputs`, and the result types.
pub fn cpu_instance(op: &Op, inputs: &[TensorType]) -> (Instance, Vec<TensorType>) {
    let refs: Vec<&TensorType> = inputs.iter().collect();
    let outputs = op.infer(&refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    match select(op, inputs, &outputs).unwrap_or_else(|e| panic!("{e}")) {
        Selected::Kernel(i) => (i, outputs),
        other => panic!("{op:?}: not one kernel: {other:?}"),
    }
}

/// The values of an instance's scalar parameters for the given symbols.
pub fn scalars(inst: &Instance, syms: &[(&str, i64)]) -> Vec<i64> {
    let env: BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    inst.scalars.iter().map(|d| d.eval_map(&env).unwrap()).collect()
}

/// The global buffers of `k`: inputs deterministic (floats in [-2, 2),
/// integers in -3..9, bools 3/4 true), outputs filled with a sentinel
/// (NaN, -77, true) so unwritten elements show.
pub fn buffers(k: &Kernel, scalars: &[i64], seed: u64) -> Vec<BufData> {
    k.global_buffers()
        .enumerate()
        .map(|(i, (_, d))| {
            let n = k.buffer_len(d, scalars).unwrap();
            let r = rand(n, seed + 7 * i as u64);
            let input = d.access == Access::Read;
            match d.elem {
                Scalar::F32 if input => BufData::F32(r.iter().map(|x| x * 2.0).collect()),
                Scalar::F32 => BufData::F32(vec![f32::NAN; n]),
                Scalar::I64 if input => BufData::I64(r.iter().map(|x| (x * 6.0 + 3.0).floor() as i64).collect()),
                Scalar::I64 => BufData::I64(vec![-77; n]),
                Scalar::I32 if input => BufData::I32(r.iter().map(|x| (x * 6.0 + 3.0).floor() as i32).collect()),
                Scalar::I32 => BufData::I32(vec![-77; n]),
                Scalar::Bool if input => BufData::Bool(r.iter().map(|x| *x > -0.5).collect()),
                Scalar::Bool => BufData::Bool(vec![true; n]),
                e => BufData::zeros(e, n),
            }
        })
        .collect()
}

/// Runs a CPU kernel as a team of `threads`.
pub fn run_cpu(k: &Kernel, bufs: &[BufData], scalars: &[i64], threads: usize) -> Vec<BufData> {
    let mut b = bufs.to_vec();
    interp::run(k, &mut b, scalars, Mode::Cpu { threads }).unwrap_or_else(|e| panic!("{e}\n{k}"));
    b
}

/// Runs a GPU kernel with its own launch shape.
pub fn run_gpu(k: &Kernel, bufs: &[BufData], scalars: &[i64]) -> Vec<BufData> {
    let grid = k.grid(scalars).expect("a GPU kernel").unwrap_or_else(|e| panic!("grid of {}: {e}", k.name));
    let block = k.gpu.as_ref().unwrap().block.map(|d| d as usize);
    let mut b = bufs.to_vec();
    interp::run(k, &mut b, scalars, Mode::Gpu { grid, block }).unwrap_or_else(|e| panic!("{e}\n{k}"));
    b
}

/// Runs a GPU selection on `bufs` (the node's `operands` operands, then
/// its results) for the symbol values `syms`: its kernel, or each of its
/// steps in turn with the scratch buffers, which start as NaN so that a
/// partial read but never written shows in the results.
pub fn run_gpu_selected(sel: &Selected, bufs: &[BufData], operands: usize, syms: &[(&str, i64)]) -> Vec<BufData> {
    let st = match sel {
        Selected::Kernel(i) => return run_gpu(&i.kernel, bufs, &scalars(i, syms)),
        Selected::Steps(st) => st,
        Selected::Alias { .. } => panic!("an alias runs no kernel"),
    };
    let env: BTreeMap<String, i64> = syms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut scratch: Vec<BufData> = st
        .scratch
        .iter()
        .map(|s| {
            let n = s.len.eval_map(&env).unwrap() as usize;
            match s.elem {
                Scalar::F32 => BufData::F32(vec![f32::NAN; n]),
                e => BufData::zeros(e, n),
            }
        })
        .collect();
    let mut bufs = bufs.to_vec();
    for step in &st.steps {
        let k = &step.instance.kernel;
        let args: Vec<BufData> = step
            .args
            .iter()
            .map(|a| match *a {
                Arg::Operand(i) => bufs[i].clone(),
                Arg::Result(i) => bufs[operands + i].clone(),
                Arg::Scratch(i) => scratch[i].clone(),
            })
            .collect();
        let out = run_gpu(k, &args, &scalars(&step.instance, syms));
        for ((a, data), (_, decl)) in step.args.iter().zip(out).zip(k.global_buffers()) {
            if decl.access == Access::Write {
                match *a {
                    Arg::Operand(i) => bufs[i] = data,
                    Arg::Result(i) => bufs[operands + i] = data,
                    Arg::Scratch(i) => scratch[i] = data,
                }
            }
        }
    }
    bufs
}

/// Bitwise equality of two runs' buffers (NaNs compare by bits too).
pub fn assert_same(what: &str, got: &[BufData], want: &[BufData]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = match (g, w) {
            (BufData::F32(a), BufData::F32(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => g == w,
        };
        if !same {
            let detail = match (g, w) {
                (BufData::F32(a), BufData::F32(b)) => {
                    let j = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()).unwrap_or(0);
                    format!("first difference at {j}: {:?} vs {:?}", a.get(j), b.get(j))
                }
                _ => format!("{g:?}\nvs\n{w:?}"),
            };
            panic!("{what}: buffer {i} differs: {detail}");
        }
    }
}

/// `|got - want| <= tol * (1 + |want|)` for every f32 output element
/// (NaN matches NaN); other buffers must be equal.
pub fn assert_close(what: &str, got: &[BufData], want: &[BufData], tol: f32) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        match (g, w) {
            (BufData::F32(a), BufData::F32(b)) => {
                assert_eq!(a.len(), b.len(), "{what}: buffer {i} length");
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    let ok = (x - y).abs() <= tol * (1.0 + y.abs()) || (x.is_nan() && y.is_nan()) || x == y;
                    assert!(ok, "{what}: buffer {i} element {j}: got {x}, expected {y} (tolerance {tol})");
                }
            }
            _ => assert_eq!(g, w, "{what}: buffer {i}"),
        }
    }
}

/// The values of a float buffer (f32, bf16 or f16) as f32.
pub fn floats(b: &BufData) -> Vec<f32> {
    match b {
        BufData::F32(v) => v.clone(),
        BufData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        BufData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        other => panic!("not a float buffer: {other:?}"),
    }
}

/// `values` stored as `elem` (f32, or rounded to nearest even for bf16/f16).
pub fn stored(elem: Scalar, values: &[f32]) -> BufData {
    match elem {
        Scalar::BF16 => BufData::BF16(values.iter().map(|x| half::bf16::from_f32(*x)).collect()),
        Scalar::F16 => BufData::F16(values.iter().map(|x| half::f16::from_f32(*x)).collect()),
        _ => BufData::F32(values.to_vec()),
    }
}

/// A GPU selection whose kernels have the node's operand `i` in a buffer of
/// `operands[i]` and result `j` in one of `results[j]`: each kernel's f32
/// buffer bound to a narrow one is made narrow, as the scheduler does.
pub fn narrowed(sel: &Selected, operands: &[Scalar], results: &[Scalar]) -> Selected {
    let narrow = |k: &Kernel, args: &[Arg]| -> Kernel {
        let list: Vec<(usize, Scalar)> = args
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let e = match *a {
                    Arg::Operand(j) => operands[j],
                    Arg::Result(j) => results[j],
                    Arg::Scratch(_) => return None,
                };
                (e.is_narrow_float() && k.global_buffers().nth(i).unwrap().1.elem == Scalar::F32).then_some((i, e))
            })
            .collect();
        crate::select::narrow_buffers(k, &list).unwrap_or_else(|e| panic!("{}: {e}", k.name))
    };
    match sel {
        Selected::Kernel(i) => {
            let n = i.kernel.global_buffers().count();
            let args: Vec<Arg> = (0..n)
                .map(|j| if j < operands.len() { Arg::Operand(j) } else { Arg::Result(j - operands.len()) })
                .collect();
            Selected::Kernel(Instance { kernel: narrow(&i.kernel, &args), scalars: i.scalars.clone() })
        }
        Selected::Steps(st) => {
            let mut st = st.clone();
            for s in &mut st.steps {
                s.instance.kernel = narrow(&s.instance.kernel, &s.args);
            }
            Selected::Steps(st)
        }
        alias => alias.clone(),
    }
}
