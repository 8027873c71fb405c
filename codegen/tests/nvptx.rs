//! The NVPTX lowering (feature `llvm`): KIR GPU kernels covering every
//! construct (launch coordinates on all axes, shared memory with barriers,
//! each shuffle kind on each type, `f32x4` and `bf16x8` vector loads,
//! narrow stores, every unary and binary op including the libm ones,
//! casts, selects, comparisons, horizontal reductions, nested loops of
//! each kind, tensor-core MMAs of both types from shared and global
//! memory) are first run in the interpreter's GPU mode against plain
//! Rust references, then emitted as PTX for sm_80, sm_90 and sm_90a and
//! assembled by `ptxas` (skipped, saying why, when no ptxas is found).
//! The sm_90a-only warpgroup MMA (wgmma) is checked apart: its GEMM's
//! PTX for sm_90a assembles without spills, and sm_80/sm_90 modules hold
//! none (its numerics are tested in the interpreter, in `gemm_wgmma`).
//!
//! With `SMELT_NVPTX_DUMP=DIR` the test also writes, for a GPU machine,
//! the PTX of each architecture, every case's inputs and the interpreter's
//! outputs, a manifest, and `DIR/run.py` ([`RUN_PY`]), which loads each
//! architecture's PTX with CuPy (the driver JIT-compiles sm_80 and sm_90
//! PTX for the GPU at hand), runs every case and compares with the
//! interpreter: `python3 DIR/run.py DIR`.
#![cfg(feature = "llvm")]

use half::{bf16, f16};
use smelt_codegen::kir::interp::{run, BufData, Mode};
use smelt_codegen::kir::*;
use smelt_codegen::llvm::LlvmError;
use smelt_codegen::{emit_ptx, ptxas, GpuArch};

/// One kernel, its launch, inputs, and what the interpreter must produce.
struct Case {
    kernel: Kernel,
    grid: [usize; 3],
    scalars: Vec<i64>,
    /// Every global buffer, inputs filled, outputs zeroed.
    bufs: Vec<BufData>,
    /// The Rust reference of every global buffer after the run.
    want: Vec<BufData>,
    /// Relative tolerance for float outputs against the reference (0 = exact).
    tol: f32,
    /// Relative tolerance the GPU's results get against the interpreter's.
    gpu_tol: f32,
}

fn t(a: u8) -> Expr {
    Expr::Special(Special::ThreadIdx(a))
}

fn v(x: Var) -> Expr {
    Expr::Var(x)
}

fn global(b: &mut Builder, name: &str, elem: Scalar, len: usize, access: Access) -> BufId {
    b.buffer(name, elem, len, Space::Global, access)
}

/// Values in [-1, 1), deterministic.
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The global thread index along x.
fn gid_x(b: &mut Builder) -> Var {
    let bid = Expr::Special(Special::BlockIdx(0));
    let bdim = Expr::Special(Special::BlockDim(0));
    b.let_("g", bid * bdim + t(0))
}

/// Every test kernel starts its vector accesses at multiples of their lane
/// counts, so it may promise aligned vectors (16-byte loads on the GPU).
fn launch(b: &mut Builder, block: [u32; 3], grid: [usize; 3]) {
    b.gpu_launch(block, grid.map(Expr::idx));
    b.promise_aligned_vectors();
}

// ----- the kernels -----

/// Every launch coordinate on every axis, per thread.
fn specials() -> Case {
    let (block, grid) = ([4u32, 2, 2], [3usize, 2, 2]);
    let n = 16 * 12;
    let mut b = Builder::new("gpu_specials");
    let out = global(&mut b, "out", Scalar::I64, n * 12, Access::Write);
    let s = |f: fn(u8) -> Special, a| Expr::Special(f(a));
    let blk = (s(Special::BlockIdx, 2) * s(Special::GridDim, 1) + s(Special::BlockIdx, 1)) * s(Special::GridDim, 0)
        + s(Special::BlockIdx, 0);
    let thr = (t(2) * s(Special::BlockDim, 1) + t(1)) * s(Special::BlockDim, 0) + t(0);
    let size = s(Special::BlockDim, 0) * s(Special::BlockDim, 1) * s(Special::BlockDim, 2);
    let g = b.let_("g", blk * size + thr);
    let mut j = 0;
    for f in [Special::ThreadIdx, Special::BlockIdx, Special::BlockDim, Special::GridDim] {
        for a in 0..3 {
            b.store(out, v(g) * Expr::idx(12) + Expr::idx(j), Expr::Special(f(a)));
            j += 1;
        }
    }
    launch(&mut b, block, grid);
    let mut want = vec![0i64; n * 12];
    for (bz, by, bx) in itertools3(grid) {
        for (tz, ty, tx) in itertools3([4, 2, 2]) {
            let g = ((bz * 2 + by) * 3 + bx) * 16 + (tz * 2 + ty) * 4 + tx;
            let vals = [tx, ty, tz, bx, by, bz, 4, 2, 2, 3, 2, 2];
            for (j, x) in vals.iter().enumerate() {
                want[g * 12 + j] = *x as i64;
            }
        }
    }
    Case {
        kernel: b.finish().unwrap(),
        grid,
        scalars: vec![],
        bufs: vec![BufData::zeros(Scalar::I64, n * 12)],
        want: vec![BufData::I64(want)],
        tol: 0.0,
        gpu_tol: 0.0,
    }
}

/// (z, y, x) over a `[x, y, z]` extent, x fastest.
fn itertools3(e: [usize; 3]) -> Vec<(usize, usize, usize)> {
    let mut out = vec![];
    for z in 0..e[2] {
        for y in 0..e[1] {
            for x in 0..e[0] {
                out.push((z, y, x));
            }
        }
    }
    out
}

/// A shared-memory tree sum per block (barrier between rounds), and a
/// second shared buffer (i32) read across threads after a barrier.
fn block_reduce() -> Case {
    let (block, blocks) = (64usize, 4usize);
    let mut b = Builder::new("gpu_block_reduce");
    let x = b.input("x", block * blocks);
    let y = b.output("y", blocks);
    let nb = global(&mut b, "neighbour", Scalar::I32, block * blocks, Access::Write);
    let sh = b.buffer("partial", Scalar::F32, block, Space::Shared, Access::Write);
    let ids = b.buffer("ids", Scalar::I32, block, Space::Shared, Access::Write);
    let bid = Expr::Special(Special::BlockIdx(0));
    let tx = b.let_("t", t(0));
    let g = b.let_("g", bid.clone() * Expr::idx(block) + v(tx));
    b.store(sh, v(tx), Expr::load(x, v(g), 1));
    b.store(ids, v(tx), (v(g) * Expr::i64(3)).cast(Scalar::I32));
    b.barrier();
    let mut stride = block / 2;
    while stride > 0 {
        b.if_(
            v(tx).lt(Expr::idx(stride)),
            |b| b.store(sh, v(tx), Expr::load(sh, v(tx), 1) + Expr::load(sh, v(tx) + Expr::idx(stride), 1)),
            |_| {},
        );
        b.barrier();
        stride /= 2;
    }
    b.if_(v(tx).cmp(CmpOp::Eq, Expr::idx(0)), |b| b.store(y, bid, Expr::load(sh, Expr::idx(0), 1)), |_| {});
    b.store(nb, v(g), Expr::load(ids, (v(tx) + Expr::idx(1)) % Expr::idx(block), 1));
    launch(&mut b, [block as u32, 1, 1], [blocks, 1, 1]);
    let xs: Vec<f32> = rand(block * blocks, 1);
    let sums: Vec<f32> = xs
        .chunks(block)
        .map(|c| {
            let mut p = c.to_vec();
            let mut s = block / 2;
            while s > 0 {
                for i in 0..s {
                    p[i] += p[i + s];
                }
                s /= 2;
            }
            p[0]
        })
        .collect();
    let nbs: Vec<i32> =
        (0..block * blocks).map(|g| ((g / block * block + (g % block + 1) % block) * 3) as i32).collect();
    Case {
        kernel: b.finish().unwrap(),
        grid: [blocks, 1, 1],
        scalars: vec![],
        bufs: vec![
            BufData::F32(xs.clone()),
            BufData::zeros(Scalar::F32, blocks),
            BufData::zeros(Scalar::I32, block * blocks),
        ],
        want: vec![BufData::F32(xs), BufData::F32(sums), BufData::I32(nbs)],
        tol: 0.0,
        gpu_tol: 0.0,
    }
}

/// Each shuffle kind on f32, i32, i64 and bool values, and arguments
/// outside the warp.
fn shuffles() -> Case {
    let (block, blocks) = (64usize, 2usize);
    let n = block * blocks;
    let mut b = Builder::new("gpu_shuffles");
    let x = b.input("x", n);
    let o_xor = b.output("xor_sum", n);
    let o_down = b.output("down_sum", n);
    let o_i64 = global(&mut b, "idx_i64", Scalar::I64, n, Access::Write);
    let o_i32 = global(&mut b, "xor_i32", Scalar::I32, n, Access::Write);
    let o_bool = global(&mut b, "idx_bool", Scalar::Bool, n, Access::Write);
    let o_out = b.output("outside", n);
    let g = gid_x(&mut b);
    let lane = v(g) % Expr::idx(32);
    let a = b.let_("a", Expr::load(x, v(g), 1));
    let d = b.let_("d", Expr::load(x, v(g), 1));
    let other = b.var("other", Ty::F32);
    for off in [16, 8, 4, 2, 1] {
        b.shuffle(other, ShuffleKind::Xor, v(a), Expr::idx(off));
        b.assign(a, v(a) + v(other));
        b.shuffle(other, ShuffleKind::Down, v(d), Expr::idx(off));
        b.assign(d, v(d) + v(other));
    }
    b.store(o_xor, v(g), v(a));
    b.store(o_down, v(g), v(d));
    let wide = b.let_("wide", v(g) * Expr::i64(1_000_003) + Expr::i64(1 << 40) - Expr::i64(1 << 33));
    let wd = b.var("wide_d", Ty::I64);
    b.shuffle(wd, ShuffleKind::Idx, v(wide), lane.clone() % Expr::idx(7));
    b.store(o_i64, v(g), v(wd));
    let small = b.let_("small", (v(g) * Expr::i64(-7)).cast(Scalar::I32));
    let sd = b.var("small_d", Ty::I32);
    b.shuffle(sd, ShuffleKind::Xor, v(small), Expr::idx(1));
    b.store(o_i32, v(g), v(sd));
    let flag = b.let_("flag", (v(g) % Expr::idx(3)).cmp(CmpOp::Eq, Expr::idx(0)));
    let fd = b.var("flag_d", Ty::BOOL);
    b.shuffle(fd, ShuffleKind::Idx, v(flag), Expr::idx(5));
    b.store(o_bool, v(g), v(fd));
    // Lanes past the warp read their own value: xor 33, idx 40, down 31.
    let od = b.var("out_d", Ty::F32);
    let xg = b.let_("xg", Expr::load(x, v(g), 1));
    b.shuffle(od, ShuffleKind::Xor, v(xg), Expr::idx(33));
    let acc = b.let_("acc", v(od));
    b.shuffle(od, ShuffleKind::Idx, v(xg), Expr::idx(40));
    b.assign(acc, v(acc) * Expr::f32(2.0) + v(od));
    b.shuffle(od, ShuffleKind::Down, v(xg), Expr::idx(31));
    b.assign(acc, v(acc) * Expr::f32(2.0) + v(od));
    b.store(o_out, v(g), v(acc));
    launch(&mut b, [block as u32, 1, 1], [blocks, 1, 1]);

    let xs = rand(n, 2);
    let warp = |g: usize| g / 32 * 32;
    let (mut a, mut d) = (xs.clone(), xs.clone());
    for off in [16, 8, 4, 2, 1] {
        let (pa, pd) = (a.clone(), d.clone());
        for g in 0..n {
            let l = g % 32;
            a[g] = pa[g] + pa[warp(g) + (l ^ off)];
            d[g] = pd[g] + if l + off < 32 { pd[g + off] } else { pd[g] };
        }
    }
    let wide = |g: usize| g as i64 * 1_000_003 + (1 << 40) - (1 << 33);
    let i64s: Vec<i64> = (0..n).map(|g| wide(warp(g) + (g % 32) % 7)).collect();
    let i32s: Vec<i32> = (0..n).map(|g| ((g ^ 1) as i64 * -7) as i32).collect();
    let bools: Vec<bool> = (0..n).map(|g| (warp(g) + 5) % 3 == 0).collect();
    let outs: Vec<f32> =
        xs.iter().enumerate().map(|(g, x)| (x * 2.0 + x) * 2.0 + if g % 32 == 0 { xs[g + 31] } else { *x }).collect();
    Case {
        kernel: b.finish().unwrap(),
        grid: [blocks, 1, 1],
        scalars: vec![],
        bufs: vec![
            BufData::F32(xs.clone()),
            BufData::zeros(Scalar::F32, n),
            BufData::zeros(Scalar::F32, n),
            BufData::zeros(Scalar::I64, n),
            BufData::zeros(Scalar::I32, n),
            BufData::zeros(Scalar::Bool, n),
            BufData::zeros(Scalar::F32, n),
        ],
        want: vec![
            BufData::F32(xs),
            BufData::F32(a),
            BufData::F32(d),
            BufData::I64(i64s),
            BufData::I32(i32s),
            BufData::Bool(bools),
            BufData::F32(outs),
        ],
        tol: 0.0,
        gpu_tol: 0.0,
    }
}

/// Interesting narrow-float inputs: ties to even, NaN, infinities,
/// subnormals, overflow, as f32 (each is rounded by the kernel's stores).
fn narrow_inputs(n: usize, seed: u64) -> Vec<f32> {
    let specials = [
        f32::from_bits(0x3f80_8000), // a bf16 tie, rounds to even (down)
        f32::from_bits(0x3f81_8000), // a bf16 tie, rounds up
        f32::from_bits(0x3f80_8001),
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -3e-39,
        f32::MAX,
        65520.0, // f16 overflow
        1.0009766,
        6e-8, // f16 subnormal
        -0.0,
    ];
    rand(n, seed).iter().enumerate().map(|(i, x)| specials.get(i % 29).copied().unwrap_or(x * 300.0)).collect()
}

/// Vector loads (f32x4, bf16x8, f16x4), vector and scalar stores of f32,
/// bf16 and f16, and a horizontal sum.
fn vectors_and_narrow() -> Case {
    let (block, blocks) = (32usize, 2usize);
    let n = block * blocks * 8;
    let mut b = Builder::new("gpu_vectors");
    let x = b.input("x", n);
    let hb = global(&mut b, "xb", Scalar::BF16, n, Access::Read);
    let hh = global(&mut b, "xh", Scalar::F16, n, Access::Read);
    let y = b.output("y", n);
    let y8 = b.output("y8", n);
    let ob = global(&mut b, "ob", Scalar::BF16, n, Access::Write);
    let oh = global(&mut b, "oh", Scalar::F16, n, Access::Write);
    let osum = global(&mut b, "sum_bf16", Scalar::BF16, block * blocks, Access::Write);
    let oone = global(&mut b, "one_f16", Scalar::F16, block * blocks, Access::Write);
    let g = gid_x(&mut b);
    let i = b.let_("i", v(g) * Expr::idx(8));
    let lo = b.let_("lo", Expr::load(x, v(i), 4));
    let hi = b.let_("hi", Expr::load(x, v(i) + Expr::idx(4), 4));
    b.store(y, v(i), v(lo) * Expr::f32(2.0).splat(4));
    b.store(y, v(i) + Expr::idx(4), v(hi) + Expr::f32(1.0).splat(4));
    let h8 = b.let_("h8", Expr::load(hb, v(i), 8));
    b.store(y8, v(i), v(h8));
    // Stores round x (not h8, which is exact): ties, NaN, overflow.
    b.store(ob, v(i), Expr::load(x, v(i), 8));
    let f4 = b.let_("f4", Expr::load(hh, v(i), 4));
    b.store(oh, v(i), Expr::load(x, v(i), 4));
    b.store(oh, v(i) + Expr::idx(4), v(f4) * Expr::f32(0.5).splat(4));
    b.store(osum, v(g), v(lo).hreduce(RedOp::Add));
    b.store(oone, v(g), Expr::load(hh, v(i) + Expr::idx(5), 1) + Expr::load(x, v(i) + Expr::idx(1), 1));
    launch(&mut b, [block as u32, 1, 1], [blocks, 1, 1]);

    let xs = narrow_inputs(n, 3);
    let xb: Vec<bf16> = narrow_inputs(n, 4).iter().map(|v| bf16::from_f32(*v)).collect();
    let xh: Vec<f16> = narrow_inputs(n, 5).iter().map(|v| f16::from_f32(*v)).collect();
    let mut want_y = vec![0.0; n];
    let mut want_oh = vec![f16::ZERO; n];
    let (mut sums, mut ones) = (vec![], vec![]);
    for g in 0..n / 8 {
        let i = g * 8;
        for k in 0..4 {
            want_y[i + k] = xs[i + k] * 2.0;
            want_y[i + 4 + k] = xs[i + 4 + k] + 1.0;
            want_oh[i + k] = f16::from_f32(xs[i + k]);
            want_oh[i + 4 + k] = f16::from_f32(xh[i + k].to_f32() * 0.5);
        }
        sums.push(bf16::from_f32(((xs[i] + xs[i + 1]) + xs[i + 2]) + xs[i + 3]));
        ones.push(f16::from_f32(xh[i + 5].to_f32() + xs[i + 1]));
    }
    let y8: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let ob: Vec<bf16> = xs.iter().map(|v| bf16::from_f32(*v)).collect();
    Case {
        kernel: b.finish().unwrap(),
        grid: [blocks, 1, 1],
        scalars: vec![],
        bufs: vec![
            BufData::F32(xs.clone()),
            BufData::BF16(xb.clone()),
            BufData::F16(xh.clone()),
            BufData::zeros(Scalar::F32, n),
            BufData::zeros(Scalar::F32, n),
            BufData::zeros(Scalar::BF16, n),
            BufData::zeros(Scalar::F16, n),
            BufData::zeros(Scalar::BF16, n / 8),
            BufData::zeros(Scalar::F16, n / 8),
        ],
        want: vec![
            BufData::F32(xs),
            BufData::BF16(xb),
            BufData::F16(xh),
            BufData::F32(want_y),
            BufData::F32(y8),
            BufData::BF16(ob),
            BufData::F16(want_oh),
            BufData::BF16(sums),
            BufData::F16(ones),
        ],
        tol: 0.0,
        gpu_tol: 0.0,
    }
}

const UNOPS: [UnOp; 13] = [
    UnOp::Neg,
    UnOp::Abs,
    UnOp::Exp,
    UnOp::Sqrt,
    UnOp::Rsqrt,
    UnOp::Tanh,
    UnOp::Sin,
    UnOp::Cos,
    UnOp::Log,
    UnOp::Erf,
    UnOp::Floor,
    UnOp::Ceil,
    UnOp::Round,
];

fn un_ref(op: UnOp, x: f32) -> f32 {
    match op {
        UnOp::Neg => -x,
        UnOp::Abs => x.abs(),
        UnOp::Exp => x.exp(),
        UnOp::Sqrt => x.sqrt(),
        UnOp::Rsqrt => 1.0 / x.sqrt(),
        UnOp::Tanh => x.tanh(),
        UnOp::Sin => x.sin(),
        UnOp::Cos => x.cos(),
        UnOp::Log => x.ln(),
        UnOp::Erf => smelt_codegen::kir::libm::erff(x),
        UnOp::Floor => x.floor(),
        UnOp::Ceil => x.ceil(),
        UnOp::Round => x.round_ties_even(),
    }
}

/// Every unary op on f32 (scalars; sin and cos also on f32x4, rope-sized
/// angles included), and `-`, `abs` on i64 and i32.
fn unary() -> Case {
    let (block, blocks) = (128usize, 2usize);
    let n = block * blocks;
    let k = UNOPS.len();
    let mut b = Builder::new("gpu_unary");
    let x = b.input("x", n);
    let xi = global(&mut b, "xi", Scalar::I64, n, Access::Read);
    let y = b.output("y", n * k);
    let yv = b.output("trig4", n * 2);
    let yi = global(&mut b, "yi", Scalar::I64, n * 2, Access::Write);
    let yj = global(&mut b, "yj", Scalar::I32, n * 2, Access::Write);
    let g = gid_x(&mut b);
    let xg = b.let_("xg", Expr::load(x, v(g), 1));
    for (j, op) in UNOPS.iter().enumerate() {
        b.store(y, v(g) * Expr::idx(k) + Expr::idx(j), v(xg).un(*op));
    }
    b.if_(
        (v(g) % Expr::idx(4)).cmp(CmpOp::Eq, Expr::idx(0)),
        |b| {
            let a = Expr::load(x, v(g), 4) * Expr::f32(4096.0).splat(4);
            b.store(yv, v(g) * Expr::idx(2), a.clone().un(UnOp::Sin));
            b.store(yv, v(g) * Expr::idx(2) + Expr::idx(4), a.un(UnOp::Cos));
        },
        |_| {},
    );
    let i = b.let_("i", Expr::load(xi, v(g), 1));
    b.store(yi, v(g) * Expr::idx(2), -v(i));
    b.store(yi, v(g) * Expr::idx(2) + Expr::idx(1), v(i).un(UnOp::Abs));
    let j = b.let_("j", v(i).cast(Scalar::I32));
    b.store(yj, v(g) * Expr::idx(2), -v(j));
    b.store(yj, v(g) * Expr::idx(2) + Expr::idx(1), v(j).un(UnOp::Abs));
    launch(&mut b, [block as u32, 1, 1], [blocks, 1, 1]);

    let mut xs: Vec<f32> = rand(n, 6).iter().map(|v| v * 12.0).collect();
    xs[..8].copy_from_slice(&[0.0, -0.0, 2.5, -2.5, 3.5, f32::NAN, f32::INFINITY, -1e-3]);
    let xis: Vec<i64> = rand(n, 7).iter().map(|v| (v * 1e12) as i64).chain([i64::MIN]).skip(1).collect();
    let mut want = vec![0.0; n * k];
    let mut trig = vec![0.0; n * 2];
    for g in 0..n {
        for (j, op) in UNOPS.iter().enumerate() {
            want[g * k + j] = un_ref(*op, xs[g]);
        }
        if g % 4 == 0 {
            for l in 0..4 {
                trig[g * 2 + l] = (xs[g + l] * 4096.0).sin();
                trig[g * 2 + 4 + l] = (xs[g + l] * 4096.0).cos();
            }
        }
    }
    let yi: Vec<i64> = xis.iter().flat_map(|i| [i.wrapping_neg(), i.wrapping_abs()]).collect();
    let yj: Vec<i32> = xis.iter().flat_map(|i| [(*i as i32).wrapping_neg(), (*i as i32).wrapping_abs()]).collect();
    Case {
        kernel: b.finish().unwrap(),
        grid: [blocks, 1, 1],
        scalars: vec![],
        bufs: vec![
            BufData::F32(xs.clone()),
            BufData::I64(xis.clone()),
            BufData::zeros(Scalar::F32, n * k),
            BufData::zeros(Scalar::F32, n * 2),
            BufData::zeros(Scalar::I64, n * 2),
            BufData::zeros(Scalar::I32, n * 2),
        ],
        want: vec![
            BufData::F32(xs),
            BufData::I64(xis),
            BufData::F32(want),
            BufData::F32(trig),
            BufData::I64(yi),
            BufData::I32(yj),
        ],
        tol: 0.0,
        // The IR libm against glibc: an ulp or two.
        gpu_tol: 3e-7,
    }
}

const BINOPS: [BinOp; 8] =
    [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Rem, BinOp::Max, BinOp::Min, BinOp::Pow];
const CMPS: [CmpOp; 6] = [CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge];

fn cmp_ref<T: PartialOrd>(op: CmpOp, a: T, b: T) -> bool {
    match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    }
}

/// Every binary op on f32, i64 and i32 (pow on f32), fma, comparisons of
/// f32, i64 and bools, scalar and lanewise selects, every cast, splat,
/// extract and horizontal max/min; one scalar parameter.
fn binary() -> Case {
    let (block, blocks) = (64usize, 2usize);
    let n = block * blocks;
    let mut b = Builder::new("gpu_binary");
    let scale = b.scalar_param("scale");
    let x = b.input("x", n);
    let z = b.input("z", n);
    let xi = global(&mut b, "xi", Scalar::I64, n, Access::Read);
    let zi = global(&mut b, "zi", Scalar::I64, n, Access::Read);
    let yf = b.output("yf", n * 9);
    let yi = global(&mut b, "yi", Scalar::I64, n * 7, Access::Write);
    let yj = global(&mut b, "yj", Scalar::I32, n * 7, Access::Write);
    let yc = global(&mut b, "yc", Scalar::Bool, n * 18, Access::Write);
    let ys = b.output("ysel", n * 2);
    let yk = global(&mut b, "ycast", Scalar::I64, n * 8, Access::Write);
    let yv = b.output("yvec", n * 3);
    let g = gid_x(&mut b);
    let (a, c) = (b.let_("a", Expr::load(x, v(g), 1)), b.let_("c", Expr::load(z, v(g), 1)));
    for (j, op) in BINOPS.iter().enumerate() {
        b.store(yf, v(g) * Expr::idx(9) + Expr::idx(j), v(a).bin(*op, v(c)));
    }
    b.store(yf, v(g) * Expr::idx(9) + Expr::idx(8), v(a).fma(v(c), Expr::f32(0.25)));
    let (p, q) = (b.let_("p", Expr::load(xi, v(g), 1)), b.let_("q", Expr::load(zi, v(g), 1)));
    let (pj, qj) = (b.let_("pj", v(p).cast(Scalar::I32)), b.let_("qj", v(q).cast(Scalar::I32)));
    for (j, op) in BINOPS[..7].iter().enumerate() {
        b.store(yi, v(g) * Expr::idx(7) + Expr::idx(j), v(p).bin(*op, v(q)));
        b.store(yj, v(g) * Expr::idx(7) + Expr::idx(j), v(pj).bin(*op, v(qj)));
    }
    let (fa, fb) = (b.let_("fa", v(a).lt(Expr::f32(0.0))), b.let_("fb", v(c).lt(Expr::f32(0.0))));
    for (j, op) in CMPS.iter().enumerate() {
        b.store(yc, v(g) * Expr::idx(18) + Expr::idx(j), v(a).cmp(*op, v(c)));
        b.store(yc, v(g) * Expr::idx(18) + Expr::idx(6 + j), v(p).cmp(*op, v(q)));
        b.store(yc, v(g) * Expr::idx(18) + Expr::idx(12 + j), v(fa).cmp(*op, v(fb)));
    }
    b.store(ys, v(g) * Expr::idx(2), Expr::select(v(fa), v(a) * scale.clone().cast(Scalar::F32), v(c)));
    // Lanewise select on f32x4 reduced by max, then by min.
    b.if_(
        (v(g) % Expr::idx(4)).cmp(CmpOp::Eq, Expr::idx(0)),
        |b| {
            let (va, vc) = (Expr::load(x, v(g), 4), Expr::load(z, v(g), 4));
            let m = b.let_("m", Expr::select(va.clone().lt(vc.clone()), va.clone(), vc.clone()));
            b.store(ys, v(g) * Expr::idx(2) + Expr::idx(1), v(m).hreduce(RedOp::Max));
            b.store(yv, v(g) * Expr::idx(3), v(m).hreduce(RedOp::Min));
            b.store(yv, v(g) * Expr::idx(3) + Expr::idx(1), Expr::Extract(Box::new(va), 2));
            b.store(yv, v(g) * Expr::idx(3) + Expr::idx(2), Expr::Extract(Box::new(v(c).splat(4) + vc), 3));
        },
        |b| {
            b.store(ys, v(g) * Expr::idx(2) + Expr::idx(1), Expr::f32(0.0));
            for j in 0..3 {
                b.store(yv, v(g) * Expr::idx(3) + Expr::idx(j), Expr::f32(-1.0));
            }
        },
    );
    // Casts, all to i64 for storage: f32->i32 (saturating), f32->i64,
    // i32->f32->i64 round trip via x * 1e6, i64->i32, bools.
    let big = v(a) * Expr::f32(3e9);
    let casts = [
        big.clone().cast(Scalar::I32).cast(Scalar::I64),
        big.cast(Scalar::I64),
        (v(pj).cast(Scalar::F32) * Expr::f32(0.5)).cast(Scalar::I64),
        (v(p).cast(Scalar::F32) * Expr::f32(0.5)).cast(Scalar::I64),
        (v(p) * Expr::i64(1 << 20)).cast(Scalar::I32).cast(Scalar::I64),
        v(fa).cast(Scalar::I64) + v(fb).cast(Scalar::I32).cast(Scalar::I64) * Expr::i64(2),
        (v(fa).cast(Scalar::F32) * Expr::f32(3.0)).cast(Scalar::I64),
        v(a).cast(Scalar::Bool).cast(Scalar::I64) + v(p).cast(Scalar::Bool).cast(Scalar::I64) * Expr::i64(2),
    ];
    for (j, e) in casts.into_iter().enumerate() {
        b.store(yk, v(g) * Expr::idx(8) + Expr::idx(j), e);
    }
    launch(&mut b, [block as u32, 1, 1], [blocks, 1, 1]);

    let mut xs: Vec<f32> = rand(n, 8).iter().map(|v| v * 4.0).collect();
    let mut zs: Vec<f32> = rand(n, 9).iter().map(|v| v * 4.0).collect();
    xs[..6].copy_from_slice(&[0.0, f32::NAN, -2.0, 1.0, 5.0, -0.0]);
    zs[..6].copy_from_slice(&[1.0, 2.0, 3.0, f32::NAN, 0.0, 0.5]);
    let ps: Vec<i64> = rand(n, 10).iter().map(|v| (v * 1e4) as i64).collect();
    let qs: Vec<i64> = rand(n, 11)
        .iter()
        .map(|v| {
            let q = (v * 50.0) as i64;
            if q == 0 {
                3
            } else {
                q
            }
        })
        .collect();
    let sc = 3i64;
    let fbin = |op: BinOp, a: f32, c: f32| match op {
        BinOp::Add => a + c,
        BinOp::Sub => a - c,
        BinOp::Mul => a * c,
        BinOp::Div => a / c,
        BinOp::Rem => a % c,
        BinOp::Max => a.max(c),
        BinOp::Min => a.min(c),
        BinOp::Pow => a.powf(c),
    };
    fn ibin<
        T: Copy
            + Ord
            + std::ops::Add<Output = T>
            + std::ops::Sub<Output = T>
            + std::ops::Mul<Output = T>
            + std::ops::Div<Output = T>
            + std::ops::Rem<Output = T>,
    >(
        op: BinOp,
        a: T,
        c: T,
    ) -> T {
        match op {
            BinOp::Add => a + c,
            BinOp::Sub => a - c,
            BinOp::Mul => a * c,
            BinOp::Div => a / c,
            BinOp::Rem => a % c,
            BinOp::Max => a.max(c),
            BinOp::Min => a.min(c),
            BinOp::Pow => unreachable!(),
        }
    }
    let (mut wf, mut wi, mut wj, mut wc, mut ws, mut wk, mut wv) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for g in 0..n {
        let (a, c, p, q) = (xs[g], zs[g], ps[g], qs[g]);
        let (pj, qj) = (p as i32, q as i32);
        for op in BINOPS {
            wf.push(fbin(op, a, c));
        }
        wf.push(a.mul_add(c, 0.25));
        for op in &BINOPS[..7] {
            wi.push(ibin(*op, p, q));
            wj.push(ibin(*op, pj, qj));
        }
        let (fa, fb) = (a < 0.0, c < 0.0);
        let cmps: Vec<bool> = CMPS.iter().map(|op| cmp_ref(*op, a, c)).collect();
        wc.extend(cmps);
        wc.extend(CMPS.iter().map(|op| cmp_ref(*op, p, q)));
        wc.extend(CMPS.iter().map(|op| cmp_ref(*op, fa, fb)));
        ws.push(if fa { a * sc as f32 } else { c });
        if g % 4 == 0 {
            let m: Vec<f32> = (0..4).map(|l| if xs[g + l] < zs[g + l] { xs[g + l] } else { zs[g + l] }).collect();
            ws.push(m[1..].iter().fold(m[0], |s, x| s.max(*x)));
            wv.push(m[1..].iter().fold(m[0], |s, x| s.min(*x)));
            wv.push(xs[g + 2]);
            wv.push(c + zs[g + 3]);
        } else {
            ws.push(0.0);
            wv.extend([-1.0; 3]);
        }
        let big = a * 3e9;
        wk.extend([
            big as i32 as i64,
            big as i64,
            (pj as f32 * 0.5) as i64,
            (p as f32 * 0.5) as i64,
            (p.wrapping_mul(1 << 20)) as i32 as i64,
            fa as i64 + fb as i64 * 2,
            (fa as u8 as f32 * 3.0) as i64,
            (a != 0.0) as i64 + (p != 0) as i64 * 2,
        ]);
    }
    Case {
        kernel: b.finish().unwrap(),
        grid: [blocks, 1, 1],
        scalars: vec![sc],
        bufs: vec![
            BufData::F32(xs.clone()),
            BufData::F32(zs.clone()),
            BufData::I64(ps.clone()),
            BufData::I64(qs.clone()),
            BufData::zeros(Scalar::F32, n * 9),
            BufData::zeros(Scalar::I64, n * 7),
            BufData::zeros(Scalar::I32, n * 7),
            BufData::zeros(Scalar::Bool, n * 18),
            BufData::zeros(Scalar::F32, n * 2),
            BufData::zeros(Scalar::I64, n * 8),
            BufData::zeros(Scalar::F32, n * 3),
        ],
        want: vec![
            BufData::F32(xs),
            BufData::F32(zs),
            BufData::I64(ps),
            BufData::I64(qs),
            BufData::F32(wf),
            BufData::I64(wi),
            BufData::I32(wj),
            BufData::Bool(wc),
            BufData::F32(ws),
            BufData::I64(wk),
            BufData::F32(wv),
        ],
        tol: 0.0,
        gpu_tol: 3e-7,
    }
}

/// Nested loops of every kind: a `Parallel` loop (serial on the GPU) over
/// rows, a serial loop, an unrolled one and a `Vectorized(4)` dot product
/// with an f32x4 accumulator, an `if`/`else` inside; sizes from a scalar.
fn loops() -> Case {
    let (block, blocks, k) = (32usize, 2usize, 24usize);
    let rows = 3;
    let n = block * blocks;
    let mut b = Builder::new("gpu_loops");
    let kk = b.scalar_param("k");
    let x = b.input("x", kk.clone() * Expr::idx(n));
    let w = b.input("w", kk.clone() * Expr::idx(rows));
    let y = b.output("y", Expr::idx(n * rows));
    let g = gid_x(&mut b);
    b.for_("r", Expr::idx(0), Expr::idx(rows), 1, LoopKind::Parallel, |b, r| {
        let acc = b.let_("acc", Expr::f32(0.0).splat(4));
        b.for_("j", Expr::idx(0), kk.clone(), 4, LoopKind::Vectorized(4), |b, j| {
            let xv = Expr::load(x, v(g) * kk.clone() + j.clone(), 4);
            let wv = Expr::load(w, r.clone() * kk.clone() + j, 4);
            b.assign(acc, xv.fma(wv, v(acc)));
        });
        let s = b.let_("s", v(acc).hreduce(RedOp::Add));
        b.for_("u", Expr::idx(0), Expr::idx(4), 1, LoopKind::Unroll(2), |b, u| {
            b.for_("q", Expr::idx(0), u.clone() + Expr::idx(1), 1, LoopKind::Serial, |b, _| {
                b.if_(
                    v(s).lt(Expr::f32(0.0)),
                    |b| b.assign(s, v(s) * Expr::f32(0.5)),
                    |b| b.assign(s, v(s) + Expr::f32(1.0)),
                );
            });
        });
        b.store(y, v(g) * Expr::idx(rows) + r, v(s));
    });
    launch(&mut b, [block as u32, 1, 1], [blocks, 1, 1]);

    let xs = rand(k * n, 12);
    let ws = rand(k * rows, 13);
    let mut want = vec![0.0; n * rows];
    for g in 0..n {
        for r in 0..rows {
            let mut acc = [0.0f32; 4];
            for j in (0..k).step_by(4) {
                for l in 0..4 {
                    acc[l] = xs[g * k + j + l].mul_add(ws[r * k + j + l], acc[l]);
                }
            }
            let mut s = ((acc[0] + acc[1]) + acc[2]) + acc[3];
            for u in 0..4 {
                for _ in 0..u + 1 {
                    s = if s < 0.0 { s * 0.5 } else { s + 1.0 };
                }
            }
            want[g * rows + r] = s;
        }
    }
    Case {
        kernel: b.finish().unwrap(),
        grid: [blocks, 1, 1],
        scalars: vec![k as i64],
        bufs: vec![BufData::F32(xs.clone()), BufData::F32(ws.clone()), BufData::zeros(Scalar::F32, n * rows)],
        want: vec![BufData::F32(xs), BufData::F32(ws), BufData::F32(want)],
        tol: 0.0,
        gpu_tol: 1e-6,
    }
}

/// Tensor-core MMAs (`m16n8k16`, f32 accumulation), two warps per block
/// and two blocks, each warp its own tile: a bf16 one with `A` staged in
/// shared memory (padded rows) and `B` from global memory, and an f16 one
/// the other way round, each accumulating onto a `C` read from memory.
fn mma() -> Case {
    let (warps, blocks) = (2usize, 2usize);
    let tiles = warps * blocks;
    let mut b = Builder::new("gpu_mma");
    let a_bf = global(&mut b, "a_bf16", Scalar::BF16, tiles * 256, Access::Read);
    let b_bf = global(&mut b, "b_bf16", Scalar::BF16, tiles * 128, Access::Read);
    let a_h = global(&mut b, "a_f16", Scalar::F16, tiles * 256, Access::Read);
    let b_h = global(&mut b, "b_f16", Scalar::F16, tiles * 128, Access::Read);
    let cin = b.input("c", tiles * 128);
    let y_bf = b.output("y_bf16", tiles * 128);
    let y_h = b.output("y_f16", tiles * 128);
    let (lda, ldb) = (24usize, 24usize);
    let sa = b.buffer("a_tile", Scalar::BF16, warps * 16 * lda, Space::Shared, Access::Write);
    let sb = b.buffer("b_tile", Scalar::F16, warps * 8 * ldb, Space::Shared, Access::Write);
    let tx = b.let_("t", t(0));
    let w = b.let_("w", v(tx) / Expr::idx(32));
    let lane = b.let_("lane", v(tx) % Expr::idx(32));
    let tile = b.let_("tile", Expr::Special(Special::BlockIdx(0)) * Expr::idx(warps) + v(w));
    // Each lane copies 8 elements of its warp's A (bf16) and 4 of its B (f16).
    for i in 0..8 {
        let e = b.let_("e", v(lane) * Expr::idx(8) + Expr::idx(i));
        let (r, c) = (v(e) / Expr::idx(16), v(e) % Expr::idx(16));
        let val = Expr::load(a_bf, v(tile) * Expr::idx(256) + v(e), 1);
        b.store(sa, (v(w) * Expr::idx(16) + r) * Expr::idx(lda) + c, val);
    }
    b.for_("i", Expr::idx(0), Expr::idx(4), 1, LoopKind::Serial, |b, i| {
        let e = b.let_("e", v(lane) * Expr::idx(4) + i);
        let (r, c) = (v(e) / Expr::idx(16), v(e) % Expr::idx(16));
        let val = Expr::load(b_h, v(tile) * Expr::idx(128) + v(e), 1);
        b.store(sb, (v(w) * Expr::idx(8) + r) * Expr::idx(ldb) + c, val);
    });
    b.barrier();
    let g = b.let_("g", v(lane) / Expr::idx(4));
    let tq = b.let_("tq", v(lane) % Expr::idx(4));
    // Fragment indices in a row-major A (stride lda) and a [n][k] B
    // (stride ldb), from the PTX ISA's m16n8k16 layout.
    let a_at = |base: Expr, ld: usize| {
        [0usize, 1, 2, 3].map(|r| {
            base.clone()
                + (v(g) + Expr::idx(8 * (r % 2))) * Expr::idx(ld)
                + v(tq) * Expr::idx(2)
                + Expr::idx(8 * (r / 2))
        })
    };
    let b_at = |base: Expr, ld: usize| {
        [0usize, 1].map(|r| base.clone() + v(g) * Expr::idx(ld) + v(tq) * Expr::idx(2) + Expr::idx(8 * r))
    };
    let cell = |e: usize| {
        v(tile) * Expr::idx(128)
            + (v(g) + Expr::idx(8 * (e / 2))) * Expr::idx(8)
            + v(tq) * Expr::idx(2)
            + Expr::idx(e % 2)
    };
    let c = [0usize, 1, 2, 3].map(|e| Expr::load(cin, cell(e), 1));
    let d1 = [(); 4].map(|_| b.var("d_bf16", Ty::F32));
    b.mma(Mma {
        elem: Scalar::BF16,
        d: d1,
        a: sa,
        a_at: a_at(v(w) * Expr::idx(16 * lda), lda),
        b: b_bf,
        b_at: b_at(v(tile) * Expr::idx(128), 16),
        c: c.clone(),
    });
    let d2 = [(); 4].map(|_| b.var("d_f16", Ty::F32));
    b.mma(Mma {
        elem: Scalar::F16,
        d: d2,
        a: a_h,
        a_at: a_at(v(tile) * Expr::idx(256), 16),
        b: sb,
        b_at: b_at(v(w) * Expr::idx(8 * ldb), ldb),
        c,
    });
    for e in 0..4 {
        b.store(y_bf, cell(e), v(d1[e]));
        b.store(y_h, cell(e), v(d2[e]));
    }
    launch(&mut b, [(warps * 32) as u32, 1, 1], [blocks, 1, 1]);
    let abf: Vec<bf16> = rand(tiles * 256, 31).iter().map(|x| bf16::from_f32(*x)).collect();
    let bbf: Vec<bf16> = rand(tiles * 128, 32).iter().map(|x| bf16::from_f32(*x)).collect();
    let ah: Vec<f16> = rand(tiles * 256, 33).iter().map(|x| f16::from_f32(*x)).collect();
    let bh: Vec<f16> = rand(tiles * 128, 34).iter().map(|x| f16::from_f32(*x)).collect();
    let cs = rand(tiles * 128, 35);
    // D = A · B + C per tile, B given [n][k]; in f64, rounded once.
    let matmul = |a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64| -> Vec<f32> {
        let mut out = vec![0f32; tiles * 128];
        for tl in 0..tiles {
            for r in 0..16 {
                for n in 0..8 {
                    let s: f64 = (0..16).map(|k| a(tl * 256 + r * 16 + k) * b(tl * 128 + n * 16 + k)).sum();
                    out[tl * 128 + r * 8 + n] = (s + cs[tl * 128 + r * 8 + n] as f64) as f32;
                }
            }
        }
        out
    };
    let want_bf = matmul(&|i| abf[i].to_f64(), &|i| bbf[i].to_f64());
    let want_h = matmul(&|i| ah[i].to_f64(), &|i| bh[i].to_f64());
    let bufs = vec![
        BufData::BF16(abf.clone()),
        BufData::BF16(bbf.clone()),
        BufData::F16(ah.clone()),
        BufData::F16(bh.clone()),
        BufData::F32(cs.clone()),
        BufData::zeros(Scalar::F32, tiles * 128),
        BufData::zeros(Scalar::F32, tiles * 128),
    ];
    let want = vec![
        BufData::BF16(abf),
        BufData::BF16(bbf),
        BufData::F16(ah),
        BufData::F16(bh),
        BufData::F32(cs),
        BufData::F32(want_bf),
        BufData::F32(want_h),
    ];
    // The interpreter rounds the f64 sum once; tensor cores sum in f32
    // with their own order and truncation (values here are below 16).
    Case { kernel: b.finish().unwrap(), grid: [blocks, 1, 1], scalars: vec![], bufs, want, tol: 0.0, gpu_tol: 1e-5 }
}

/// A bf16 weight product (symbolic `m` = 70 rows: the tensor-core GEMM
/// path) in 128-thread blocks, one warpgroup of m64n16: `mma.sync` on
/// sm_80 and sm_90, its wgmma variant on sm_90a, so the dump checks wgmma
/// against the interpreter on a Hopper GPU. The interpreter runs both
/// bodies against the f64 product of the rounded activations.
fn weight_product_tc() -> Case {
    use smelt_codegen::templates::gpu::{weight_product, WeightOp, WeightProductParams};
    let (m, n, k) = (70usize, 24usize, 40usize);
    let p = WeightProductParams::ONE_WARPGROUP;
    let op = WeightOp::plain(Scalar::BF16);
    let mut b = Builder::new("gpu_weight_product_tc");
    let ms = b.scalar_param("m");
    weight_product(&mut b, ms, &op, n, k, &p).unwrap();
    let kernel = b.finish().unwrap();
    assert!(kernel.sm90a.is_some());
    let x = rand(m * k, 41);
    let w: Vec<bf16> = rand(n * k, 42).into_iter().map(bf16::from_f32).collect();
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let xr = |p: usize| bf16::from_f32(x[i * k + p]).to_f64();
            y[i * n + j] = (0..k).map(|p| xr(p) * w[j * k + p].to_f64()).sum::<f64>() as f32;
        }
    }
    let bufs = vec![BufData::F32(x.clone()), BufData::BF16(w.clone()), BufData::zeros(Scalar::F32, m * n)];
    let want = vec![BufData::F32(x), BufData::BF16(w), BufData::F32(y)];
    // Sums of 40 products below 1 in f32, in any order.
    Case { kernel, grid: [2, 1, 1], scalars: vec![m as i64], bufs, want, tol: 1e-5, gpu_tol: 1e-5 }
}

fn cases() -> Vec<Case> {
    vec![
        specials(),
        block_reduce(),
        shuffles(),
        vectors_and_narrow(),
        unary(),
        binary(),
        loops(),
        mma(),
        weight_product_tc(),
    ]
}

// ----- checking -----

fn floats(b: &BufData) -> Option<Vec<f32>> {
    match b {
        BufData::F32(v) => Some(v.clone()),
        BufData::BF16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
        BufData::F16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
        _ => None,
    }
}

/// Equal (floats within `tol` relative to max(1, |want|), NaN matching
/// NaN), or the first difference.
fn compare(got: &BufData, want: &BufData, tol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} vs {}", got.len(), want.len()));
    }
    match (floats(got), floats(want)) {
        (Some(g), Some(w)) => {
            for (i, (g, w)) in g.iter().zip(&w).enumerate() {
                let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= tol * w.abs().max(1.0);
                if !ok {
                    return Err(format!("element {i}: got {g:e}, want {w:e}"));
                }
            }
            Ok(())
        }
        _ if got == want => Ok(()),
        _ => {
            let (g, w) = (format!("{got:?}"), format!("{want:?}"));
            let at = g.chars().zip(w.chars()).position(|(a, b)| a != b).unwrap_or(0);
            Err(format!(
                "differs near `{}` vs `{}`",
                &g[at.saturating_sub(40)..(at + 40).min(g.len())],
                &w[at.saturating_sub(40)..(at + 40).min(w.len())]
            ))
        }
    }
}

fn block_of(k: &Kernel) -> [usize; 3] {
    k.gpu.as_ref().unwrap().block.map(|d| d as usize)
}

#[test]
fn kernels_match_rust_references_in_the_gpu_interpreter() {
    for c in cases() {
        // The kernel, and its sm_90a body when it has one.
        for k in [Some(&c.kernel), c.kernel.sm90a.as_deref()].into_iter().flatten() {
            let mut bufs = c.bufs.clone();
            run(k, &mut bufs, &c.scalars, Mode::Gpu { grid: c.grid, block: block_of(k) })
                .unwrap_or_else(|e| panic!("{e}\n{k}"));
            for (i, ((got, want), (_, d))) in bufs.iter().zip(&c.want).zip(k.global_buffers()).enumerate() {
                compare(got, want, c.tol).unwrap_or_else(|e| panic!("{} buffer {i} `{}`: {e}", k.name, d.name));
            }
            assert_eq!(k.grid(&c.scalars).unwrap().unwrap(), c.grid);
        }
    }
}

#[test]
fn every_op_and_construct_is_covered() {
    let cs = cases();
    let text: String = cs.iter().map(|c| c.kernel.to_string()).collect();
    for s in ["shuffle_xor", "shuffle_down", "shuffle_idx", "barrier", "mma_m16n8k16_bf16", "mma_m16n8k16_f16"] {
        assert!(text.contains(s), "no `{s}` in the kernels:\n{text}");
    }
    let mut seen = std::collections::HashSet::new();
    for c in &cs {
        fn walk(s: &[Stmt], seen: &mut std::collections::HashSet<String>) {
            for s in s {
                let mut e = |e: &Expr| {
                    e.visit(&mut |e| {
                        let tag = match e {
                            Expr::Un(op, _) => format!("{op:?}"),
                            Expr::Bin(op, _, _) => format!("{op:?}"),
                            Expr::Special(s) => format!("{s:?}"),
                            Expr::HReduce(op, _) => format!("h{op:?}"),
                            Expr::Load { lanes, .. } => format!("load{lanes}"),
                            other => format!("{other:?}").split(['(', ' ', '{']).next().unwrap().to_string(),
                        };
                        seen.insert(tag);
                    })
                };
                match s {
                    Stmt::Assign(_, x) => e(x),
                    Stmt::Store { index, value, .. } => {
                        e(index);
                        e(value)
                    }
                    Stmt::For(l) => {
                        seen.insert(format!("{:?}", l.kind));
                        walk(&l.body, seen)
                    }
                    Stmt::If { cond, then, els } => {
                        e(cond);
                        walk(then, seen);
                        walk(els, seen)
                    }
                    Stmt::Shuffle { value, .. } => e(value),
                    Stmt::Mma(m) => m.exprs().for_each(e),
                    Stmt::Prefetch { index, .. } => e(index),
                    Stmt::Wgmma(w) => w.exprs().for_each(e),
                    Stmt::Barrier | Stmt::Async(_) => {}
                }
            }
        }
        walk(&c.kernel.body, &mut seen);
    }
    let mut want: Vec<String> = UNOPS.iter().map(|o| format!("{o:?}")).collect();
    want.extend(BINOPS.iter().map(|o| format!("{o:?}")));
    for a in 0..3 {
        for s in [Special::ThreadIdx(a), Special::BlockIdx(a), Special::BlockDim(a), Special::GridDim(a)] {
            want.push(format!("{s:?}"));
        }
    }
    want.extend(
        ["Serial", "Parallel", "Unroll(2)", "Vectorized(4)", "load4", "load8", "hAdd", "hMax", "hMin"]
            .map(String::from),
    );
    want.extend(["Fma", "Cmp", "Select", "Cast", "Splat", "Extract"].map(String::from));
    for w in want {
        assert!(seen.contains(&w), "no {w} in the kernels (seen {seen:?})");
    }
}

#[test]
fn ptx_for_every_arch_passes_ptxas() {
    let cs = cases();
    let kernels: Vec<Kernel> = cs.iter().map(|c| c.kernel.clone()).collect();
    let ptxas = ptxas::find_ptxas();
    if ptxas.is_none() {
        eprintln!("SKIPPED the ptxas part: {}", ptxas::PtxasError::NotFound);
    }
    let dump = std::env::var_os("SMELT_NVPTX_DUMP").map(std::path::PathBuf::from);
    for arch in GpuArch::all() {
        let ptx = emit_ptx(&kernels, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        check_ptx_text(&ptx, arch, &kernels);
        if let Some(dir) = &dump {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(format!("kernels_{}.ptx", arch.name())), &ptx).unwrap();
        }
        let Some(p) = &ptxas else { continue };
        let report = ptxas::check_with(p, &ptx, arch.name()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in &kernels {
            let sym = smelt_codegen::aot::symbol_of(k);
            let f =
                report.kernel(&sym).unwrap_or_else(|| panic!("{arch}: ptxas said nothing of {sym}:\n{}", report.log));
            eprintln!(
                "{arch} {sym}: {} registers, {} B spill stores, {} B spill loads, {} B stack, {} B shared",
                f.registers, f.spill_store_bytes, f.spill_load_bytes, f.stack_frame_bytes, f.shared_bytes
            );
            assert_eq!(f.spill_store_bytes + f.spill_load_bytes, 0, "{arch} {sym} spills");
            // The module holds the kernel's sm_90a body there.
            let k = if arch == GpuArch::Sm90a { k.for_sm90a() } else { std::borrow::Cow::Borrowed(k) };
            let shared: usize = k
                .buffers
                .iter()
                .filter(|b| b.space == Space::Shared)
                .map(|b| k.const_len(b).unwrap() * b.elem.size())
                .sum();
            assert!(f.shared_bytes as usize >= shared, "{arch} {sym}: {} B shared, want {shared}", f.shared_bytes);
        }
    }
    if let Some(dir) = &dump {
        write_dump(dir, cs);
    }
}

/// What the PTX text must (not) contain.
fn check_ptx_text(ptx: &str, arch: GpuArch, kernels: &[Kernel]) {
    assert!(ptx.contains(&format!(".target {}", arch.name())), "{ptx}");
    let version = if arch == GpuArch::Sm80 { ".version 7.8" } else { ".version 8.0" };
    assert!(ptx.contains(version), "{arch}: want {version}");
    for k in kernels {
        let sym = smelt_codegen::aot::symbol_of(k);
        assert!(ptx.contains(&format!(".entry {sym}(")), "{arch}: no .entry {sym}");
    }
    for want in [
        ".maxntid 64, 1, 1",
        ".maxntid 4, 2, 2",
        "bar.sync",
        "shfl.sync.bfly.b32",
        "shfl.sync.down.b32",
        "shfl.sync.idx.b32",
        ".shared .align 16",
        "ld.global.nc.v4",
        "sqrt.rn.f32",
        "div.rn.f32",
        "%tid.z",
        "%ctaid.y",
        "%ntid.z",
        "%nctaid.z",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    ] {
        assert!(ptx.contains(want), "{arch}: no `{want}` in the PTX");
    }
    // No approximate transcendental, no libcall, no flush to zero.
    for bad in ["sin.approx", "cos.approx", "lg2.approx", "ex2.approx", "rsqrt.approx", ".ftz", "call.uni"] {
        assert!(!ptx.contains(bad), "{arch}: `{bad}` in the PTX");
    }
}

#[test]
fn cpu_kernels_and_bad_names_are_rejected() {
    let mut b = Builder::new("cpu_only");
    let y = b.output("y", 4);
    b.for_("i", Expr::idx(0), Expr::idx(4), 1, LoopKind::Parallel, |b, i| b.store(y, i, Expr::f32(1.0)));
    let k = b.finish().unwrap();
    let err = emit_ptx(std::slice::from_ref(&k), GpuArch::Sm90).unwrap_err();
    assert!(matches!(err, LlvmError::NotGpu { .. }), "{err}");
    assert!(err.to_string().contains("kernel `cpu_only` is a CPU kernel"), "{err}");
    let mut bad = specials().kernel;
    bad.name = "has.dot".into();
    let err = emit_ptx(&[bad], GpuArch::Sm80).unwrap_err().to_string();
    assert!(err.contains("is not a PTX identifier"), "{err}");
    let s = specials().kernel;
    let err = emit_ptx(&[s.clone(), s], GpuArch::Sm80).unwrap_err().to_string();
    assert!(err.contains("two kernels are named `gpu_specials`"), "{err}");
}

/// A launch that asks for a minimum of resident blocks gets
/// `.minnctapersm` after its `.maxntid`; one that does not gets none (ptxas
/// then chooses its register budget itself).
#[test]
fn min_blocks_per_sm_becomes_minnctapersm() {
    let kernel = |name: &str, min: Option<u32>| {
        let mut b = Builder::new(name);
        let y = b.output("y", 256);
        launch(&mut b, [128, 1, 1], [2, 1, 1]);
        if let Some(n) = min {
            b.min_blocks_per_sm(n);
        }
        let g = gid_x(&mut b);
        b.store(y, Expr::Var(g), Expr::f32(1.0));
        b.finish().unwrap()
    };
    let (with, without) = (kernel("bounded", Some(1)), kernel("free", None));
    assert_eq!(with.gpu.as_ref().unwrap().min_blocks_per_sm, Some(1));
    for arch in GpuArch::all() {
        let ptx = emit_ptx(&[with.clone(), without.clone()], arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let entry = |k: &Kernel| {
            let at = ptx.find(&format!(".entry {}(", smelt_codegen::aot::symbol_of(k))).unwrap();
            let body = &ptx[at..];
            body[..body.find('{').unwrap()].to_string()
        };
        assert!(entry(&with).contains(".minnctapersm 1"), "{arch}: {}", entry(&with));
        assert!(!entry(&without).contains(".minnctapersm"), "{arch}: {}", entry(&without));
        if let Some(p) = ptxas::find_ptxas() {
            ptxas::check_with(&p, &ptx, arch.name()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        }
    }
}

#[test]
fn ptxas_reports_broken_ptx() {
    let Some(p) = ptxas::find_ptxas() else {
        eprintln!("SKIPPED: {}", ptxas::PtxasError::NotFound);
        return;
    };
    let err = ptxas::check_with(&p, "not ptx", "sm_90").unwrap_err().to_string();
    assert!(err.contains("ptxas -arch=sm_90 rejected the PTX"), "{err}");
}

// ----- the dump for a GPU machine -----

fn elem_name(b: &BufData) -> &'static str {
    match b {
        BufData::F32(_) => "f32",
        BufData::I32(_) => "i32",
        BufData::I64(_) => "i64",
        BufData::Bool(_) => "bool",
        BufData::BF16(_) => "bf16",
        BufData::F16(_) => "f16",
    }
}

fn bytes(b: &BufData) -> Vec<u8> {
    match b {
        BufData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        BufData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        BufData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        BufData::Bool(v) => v.iter().map(|x| *x as u8).collect(),
        BufData::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        BufData::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
    }
}

/// Inputs as given, expected outputs from the interpreter, in one binary
/// file per case, described by `manifest.txt`.
fn write_dump(dir: &std::path::Path, cs: Vec<Case>) {
    let mut manifest = String::new();
    for c in cs {
        let k = &c.kernel;
        let inputs = c.bufs.clone();
        let mut outs = c.bufs;
        run(k, &mut outs, &c.scalars, Mode::Gpu { grid: c.grid, block: block_of(k) }).unwrap();
        let block = block_of(k);
        manifest += &format!(
            "case {} grid {} {} {} block {} {} {} tol {} scalars {}\n",
            smelt_codegen::aot::symbol_of(k),
            c.grid[0],
            c.grid[1],
            c.grid[2],
            block[0],
            block[1],
            block[2],
            c.gpu_tol,
            c.scalars.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
        );
        let mut data = vec![];
        for ((input, out), (_, d)) in inputs.iter().zip(&outs).zip(k.global_buffers()) {
            let role = if d.access == Access::Read { "in" } else { "out" };
            let (a, b) = (bytes(input), bytes(out));
            manifest += &format!("buf {} {} {} {} {}\n", d.name, elem_name(input), input.len(), role, data.len());
            data.extend(a);
            manifest += &format!("want {}\n", data.len());
            data.extend(b);
        }
        std::fs::write(dir.join(format!("{}.bin", smelt_codegen::aot::symbol_of(k))), data).unwrap();
    }
    std::fs::write(dir.join("manifest.txt"), manifest).unwrap();
    std::fs::write(dir.join("run.py"), RUN_PY).unwrap();
}

/// Runs the dumped cases on a GPU with CuPy (see the module docs).
const RUN_PY: &str = r#"import sys, os, time
import numpy as np, cupy as cp
d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
DT = {'f32': np.float32, 'i32': np.int32, 'i64': np.int64, 'bool': np.uint8, 'bf16': np.uint16, 'f16': np.float16}
cases = []
for line in open(os.path.join(d, 'manifest.txt')):
    w = line.split()
    if w[0] == 'case':
        cases.append(dict(name=w[1], grid=tuple(map(int, w[3:6])), block=tuple(map(int, w[7:10])), tol=float(w[11]),
                          scalars=[int(x) for x in w[13].split(',')] if len(w) > 13 and w[13] else [], bufs=[]))
    elif w[0] == 'buf':
        cases[-1]['bufs'].append(dict(name=w[1], elem=w[2], n=int(w[3]), role=w[4], off=int(w[5])))
    elif w[0] == 'want':
        cases[-1]['bufs'][-1]['want'] = int(w[1])
def as_f32(a, elem):
    if elem == 'bf16':
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)
print(cp.cuda.runtime.getDeviceProperties(0)['name'].decode(), 'driver', cp.cuda.runtime.driverGetVersion())
fails = 0
for arch in ['sm_80', 'sm_90', 'sm_90a']:
    t = time.time()
    mod = cp.RawModule(path=os.path.join(d, 'kernels_%s.ptx' % arch))
    mod.get_function(cases[0]['name'])
    print('%s: module loaded (JIT) in %.1f ms' % (arch, (time.time() - t) * 1e3))
    for c in cases:
        data = np.fromfile(os.path.join(d, c['name'] + '.bin'), dtype=np.uint8)
        args, outs = [], []
        for b in c['bufs']:
            dt = DT[b['elem']]
            nb = b['n'] * np.dtype(dt).itemsize
            inp = data[b['off']:b['off'] + nb].view(dt)
            want = data[b['want']:b['want'] + nb].view(dt)
            dev = cp.asarray(inp)
            args.append(dev)
            outs.append((b, dev, want))
        args += [np.int64(s) for s in c['scalars']]
        mod.get_function(c['name'])(c['grid'], c['block'], tuple(args))
        cp.cuda.runtime.deviceSynchronize()
        bad = []
        for b, dev, want in outs:
            got = cp.asnumpy(dev)
            if b['elem'] in ('f32', 'bf16', 'f16'):
                g, w = as_f32(got, b['elem']), as_f32(want, b['elem'])
                with np.errstate(invalid='ignore'):
                    ok = (g == w) | (np.isnan(g) & np.isnan(w)) | (np.abs(g - w) <= c['tol'] * np.maximum(np.abs(w), 1))
            else:
                g, w = got, want
                ok = g == w
            if not ok.all():
                i = int(np.argmin(ok))
                bad.append('%s: %d of %d differ, first at %d: got %r want %r' % (b['name'], (~ok).sum(), ok.size, i, g[i], w[i]))
        fails += len(bad)
        print('  %-24s %s' % (c['name'], 'ok' if not bad else 'FAIL ' + '; '.join(bad)))
print('ALL OK' if fails == 0 else '%d FAILURES' % fails)
sys.exit(1 if fails else 0)
"#;

/// A kernel that does not promise aligned vectors (what `gpuize` makes of
/// CPU kernels, whose f32x4 loads start at any element) gets no 16-byte
/// accesses: a misaligned one would fault on the GPU.
#[test]
fn unpromised_vector_loads_are_split() {
    let mut b = Builder::new("misaligned_vec");
    let x = b.input("x", Expr::idx(9));
    let y = b.output("y", Expr::idx(4));
    b.gpu_launch([1, 1, 1], [Expr::idx(1), Expr::idx(1), Expr::idx(1)]);
    // Elements 1..5: not a multiple of 4 lanes from the base.
    b.store(y, Expr::idx(0), Expr::load(x, Expr::idx(1), 4));
    let k = b.finish().unwrap();
    let mut bufs = vec![BufData::F32((0..9).map(|i| i as f32).collect()), BufData::F32(vec![0.0; 4])];
    run(&k, &mut bufs, &[], Mode::Gpu { grid: [1, 1, 1], block: [1, 1, 1] }).unwrap();
    assert_eq!(bufs[1].f32(), &[1.0, 2.0, 3.0, 4.0]);
    for arch in GpuArch::all() {
        let ptx = emit_ptx(std::slice::from_ref(&k), arch).unwrap();
        assert!(!ptx.contains(".v4."), "{arch}: a 16-byte access in\n{ptx}");
        if ptxas::find_ptxas().is_some() {
            ptxas::check(&ptx, arch.name()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        }
    }
}

/// The tensor-core GEMM as the GPU weight product uses it (bf16 and f16
/// weights, plain, gated and with bias/residual epilogues, default
/// parameters, alone and behind the run-time GEMV/GEMM branch) emits
/// `mma.sync` for every architecture (on sm_90a the weight products run
/// their wgmma variant instead, see `wgmma_gemm_ptx_passes_ptxas`; the
/// lone `mma.sync` GEMMs keep it) and assembles without spills (at most 16
/// bytes on sm_80). `-- --nocapture` prints each kernel's registers and shared memory.
#[test]
fn tensor_core_gemm_ptx_passes_ptxas() {
    use smelt_codegen::templates::gpu::{gemm_tc, weight_product, TcParams, WeightOp, WeightProductParams};
    use smelt_codegen::templates::matmul_dyn::Act;
    let silu = |elem| WeightOp { bias: true, residual: true, ..WeightOp::gated(elem, Act::Silu) };
    let mut kernels = vec![];
    for (op, n, k) in [(WeightOp::plain(Scalar::BF16), 4096, 4096), (silu(Scalar::F16), 14336, 4096)] {
        let mut b = Builder::new(&format!("gemm_tc_{}", op.describe()));
        let m = b.scalar_param("m");
        gemm_tc::gemm_tc(&mut b, m, &op, n, k, &TcParams::DEFAULT).unwrap();
        kernels.push(b.finish().unwrap());
    }
    let ops = [(WeightOp::plain(Scalar::F16), 896, 896), (WeightOp::gated(Scalar::BF16, Act::Silu), 4864, 896)];
    for (op, n, k) in ops {
        let mut b = Builder::new(&format!("weight_product_{}", op.describe()));
        let m = b.scalar_param("m");
        weight_product(&mut b, m, &op, n, k, &WeightProductParams::for_shape(&op, n, k)).unwrap();
        kernels.push(b.finish().unwrap());
    }
    let ptxas = ptxas::find_ptxas();
    if ptxas.is_none() {
        eprintln!("SKIPPED the ptxas part: {}", ptxas::PtxasError::NotFound);
    }
    let mut spills = vec![];
    for arch in GpuArch::all() {
        let ptx = emit_ptx(&kernels, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        if let Some(dir) = std::env::var_os("SMELT_TC_DUMP") {
            std::fs::write(std::path::Path::new(&dir).join(format!("tc_{}.ptx", arch.name())), &ptx).unwrap();
        }
        for t in ["bf16.bf16", "f16.f16"] {
            let want = format!("mma.sync.aligned.m16n8k16.row.col.f32.{t}.f32");
            assert!(ptx.contains(&want), "{arch}: no `{want}` in the PTX");
        }
        let Some(p) = &ptxas else { continue };
        let report = ptxas::check_with(p, &ptx, arch.name()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in &kernels {
            let sym = smelt_codegen::aot::symbol_of(k);
            let f =
                report.kernel(&sym).unwrap_or_else(|| panic!("{arch}: ptxas said nothing of {sym}:\n{}", report.log));
            eprintln!(
                "{arch} {sym}: {} registers, {} B spill stores, {} B spill loads, {} B stack, {} B shared",
                f.registers, f.spill_store_bytes, f.spill_load_bytes, f.stack_frame_bytes, f.shared_bytes
            );
            spills.push((arch, sym.clone(), f.spill_store_bytes + f.spill_load_bytes));
        }
    }
    // As for the attention kernels: ptxas for sm_80 caps the combined
    // weight product (GEMV and GEMM paths) at 64 registers and spills a
    // few bytes there; sm_90 and sm_90a must not spill at all.
    let bad: Vec<_> = spills.iter().filter(|(arch, _, b)| *b > 0 && !(*arch == GpuArch::Sm80 && *b <= 16)).collect();
    assert!(bad.is_empty(), "spills: {bad:?}");
}

/// The host lowerings (LLVM and Cranelift) refuse an MMA with a typed
/// error naming it.
#[test]
fn host_lowerings_refuse_mma() {
    let mut b = Builder::new("host_mma");
    let a = global(&mut b, "a", Scalar::BF16, 256, Access::Read);
    let w = global(&mut b, "w", Scalar::BF16, 128, Access::Read);
    let y = b.output("y", 4);
    let d = [(); 4].map(|_| b.var("d", Ty::F32));
    let at = |i: usize| Expr::idx(2 * i);
    b.mma(Mma {
        elem: Scalar::BF16,
        d,
        a,
        a_at: [0, 1, 2, 3].map(at),
        b: w,
        b_at: [0, 1].map(at),
        c: [(); 4].map(|_| Expr::f32(0.0)),
    });
    for (i, dv) in d.iter().enumerate() {
        b.store(y, Expr::idx(i), v(*dv));
    }
    let k = b.finish().unwrap();
    let err = smelt_codegen::llvm::emit_object(std::slice::from_ref(&k), "host_mma").unwrap_err();
    assert!(matches!(err, LlvmError::Unsupported { .. }) && err.to_string().contains("tensor-core mma"), "{err}");
    let err = smelt_codegen::cranelift::JitKernel::compile(&k).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, smelt_codegen::cranelift::CompileError::Unsupported { .. })
            && err.to_string().contains("tensor-core mma"),
        "{err}"
    );
}

/// The wgmma GEMM (sm_90a): alone (bf16 plain, f16 gated with bias and
/// residual, default parameters: two warpgroups of m64n64) and as the
/// sm_90a variant of the weight products. The sm_90a module holds
/// `wgmma.mma_async` of both types with its fences, commits and waits, and
/// assembles without spills; the sm_80 and sm_90 modules of the weight
/// products hold no wgmma (they keep `mma.sync` under the same entries),
/// and a kernel whose own body uses wgmma is refused for them.
/// `-- --nocapture` prints each kernel's registers and shared memory.
#[test]
fn wgmma_gemm_ptx_passes_ptxas() {
    use smelt_codegen::templates::gpu::{gemm_wgmma, weight_product, TcParams, WeightOp, WeightProductParams};
    use smelt_codegen::templates::matmul_dyn::Act;
    let silu = |elem| WeightOp { bias: true, residual: true, ..WeightOp::gated(elem, Act::Silu) };
    let mut alone = vec![];
    for (op, n, k) in [(WeightOp::plain(Scalar::BF16), 4096, 4096), (silu(Scalar::F16), 14336, 4096)] {
        let mut b = Builder::new(&format!("gemm_wgmma_{}", op.describe()));
        let m = b.scalar_param("m");
        gemm_wgmma::gemm_wgmma(&mut b, m, &op, n, k, &TcParams::DEFAULT).unwrap();
        alone.push(b.finish().unwrap());
    }
    let mut products = vec![];
    let ops = [(WeightOp::plain(Scalar::F16), 896, 896), (WeightOp::gated(Scalar::BF16, Act::Silu), 4864, 896)];
    for (op, n, k) in ops {
        let mut b = Builder::new(&format!("weight_product_{}", op.describe()));
        let m = b.scalar_param("m");
        weight_product(&mut b, m, &op, n, k, &WeightProductParams::for_shape(&op, n, k)).unwrap();
        let kern = b.finish().unwrap();
        assert!(kern.sm90a.as_ref().is_some_and(|v| v.uses_wgmma()), "{} has no wgmma variant", kern.name);
        products.push(kern);
    }
    for arch in [GpuArch::Sm80, GpuArch::Sm90] {
        let ptx = emit_ptx(&products, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(!ptx.contains("wgmma") && ptx.contains("mma.sync.aligned.m16n8k16"), "{arch}: wgmma in the PTX");
        let err = emit_ptx(&alone, arch).unwrap_err();
        assert!(matches!(err, LlvmError::NeedsArch { .. }) && err.to_string().contains("sm_90a"), "{err}");
    }
    let kernels: Vec<Kernel> = alone.into_iter().chain(products).collect();
    let ptx = emit_ptx(&kernels, GpuArch::Sm90a).unwrap_or_else(|e| panic!("sm_90a: {e}"));
    if let Some(dir) = std::env::var_os("SMELT_TC_DUMP") {
        std::fs::write(std::path::Path::new(&dir).join("wgmma_sm_90a.ptx"), &ptx).unwrap();
    }
    for want in [
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16",
        "wgmma.fence.sync.aligned",
        "wgmma.commit_group.sync.aligned",
        "wgmma.wait_group.sync.aligned \t0",
        "fence.proxy.async.shared::cta",
    ] {
        assert!(ptx.contains(want), "sm_90a: no `{want}` in the PTX");
    }
    assert!(!ptx.contains("mma.sync"), "sm_90a: the weight products still use mma.sync");
    let Some(p) = ptxas::find_ptxas() else {
        eprintln!("SKIPPED the ptxas part: {}", ptxas::PtxasError::NotFound);
        return;
    };
    let report = ptxas::check_with(&p, &ptx, "sm_90a").unwrap_or_else(|e| panic!("sm_90a: {e}"));
    for k in &kernels {
        let sym = smelt_codegen::aot::symbol_of(k);
        let f = report.kernel(&sym).unwrap_or_else(|| panic!("sm_90a: ptxas said nothing of {sym}:\n{}", report.log));
        eprintln!(
            "sm_90a {sym}: {} registers, {} B spill stores, {} B spill loads, {} B stack, {} B shared",
            f.registers, f.spill_store_bytes, f.spill_load_bytes, f.stack_frame_bytes, f.shared_bytes
        );
        assert_eq!(f.spill_store_bytes + f.spill_load_bytes, 0, "sm_90a {sym} spills");
    }
    assert!(!report.log.contains("serialized"), "ptxas serialized wgmma:\n{}", report.log);
    eprintln!("{}", report.log);
}

/// The host lowerings (LLVM and Cranelift) refuse a wgmma with a typed
/// error naming it.
#[test]
fn host_lowerings_refuse_wgmma() {
    let mut b = Builder::new("host_wgmma");
    let y = b.output("y", 4);
    let s = b.buffer("s", Scalar::BF16, Expr::idx(64 * 16), Space::Shared, Access::Write);
    let d: Vec<Var> = (0..4).map(|_| b.let_("d", Expr::f32(0.0))).collect();
    b.async_sync(AsyncSync::WgmmaFence);
    let mat = SmemMatrix { buf: s, start: Expr::idx(0), lbo: 128, sbo: 256 };
    b.wgmma(Wgmma { elem: Scalar::BF16, n: 8, d: d.clone(), a: mat.clone(), b: mat });
    b.async_sync(AsyncSync::WgmmaCommit);
    b.async_sync(AsyncSync::WgmmaWait(0));
    for (i, dv) in d.iter().enumerate() {
        b.store(y, Expr::idx(i), v(*dv));
    }
    let mut k = b.finish().unwrap();
    // Without its shared buffer the host lowerings reach the statement.
    k.buffers.truncate(1);
    let err = smelt_codegen::llvm::emit_object(std::slice::from_ref(&k), "host_wgmma").unwrap_err();
    assert!(matches!(err, LlvmError::Unsupported { .. }) && err.to_string().contains("wgmma"), "{err}");
    let err = smelt_codegen::cranelift::JitKernel::compile(&k).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, smelt_codegen::cranelift::CompileError::Unsupported { .. }) && err.to_string().contains("wgmma"),
        "{err}"
    );
}

/// Every value of every axis of the GPU weight product's tuning space, one
/// axis at a time from the default (what a coordinate search tries first),
/// for a decoder's MLP shape with bf16 weights (tensor-core GEMM, and its
/// wgmma body on sm_90a) and an f32 projection, either fails to build or
/// gives PTX that ptxas accepts for every architecture: a variant the
/// tuner times never fails to load for a reason the build could have seen.
#[test]
fn the_gpu_tuning_space_builds_ptx_that_ptxas_accepts() {
    use smelt_codegen::tuning::{GpuParams, Site, Variant, GPU_AXES};
    let mut kernels: Vec<Kernel> = vec![];
    for site in [
        Site::gpu_weight_product(1536, 576, Some("silu"), Scalar::BF16).unwrap(),
        Site::gpu_weight_product(960, 576, None, Scalar::F32).unwrap(),
    ] {
        let (n, k, act, w) = site.product();
        let default = GpuParams::default_for(n, k, w, act);
        for (axis, (_, values)) in GPU_AXES.iter().enumerate() {
            for &value in values.iter() {
                let mut v = default.values();
                v[axis] = value;
                let variant = Variant::Gpu { p: GpuParams::from_values(v) };
                if let Ok(b) = site.build(&site.rows_type(), &variant) {
                    if !kernels.iter().any(|x| x.name == b.instance.kernel.name) {
                        kernels.push(b.instance.kernel);
                    }
                }
            }
        }
    }
    assert!(kernels.len() > 40, "{} kernels", kernels.len());
    let ptxas = ptxas::find_ptxas();
    if ptxas.is_none() {
        eprintln!("SKIPPED the ptxas part: {}", ptxas::PtxasError::NotFound);
    }
    for arch in GpuArch::all() {
        let ptx = emit_ptx(&kernels, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let Some(p) = &ptxas else { continue };
        let report = ptxas::check_with(p, &ptx, arch.name()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in &kernels {
            let sym = smelt_codegen::aot::symbol_of(k);
            let f = report.kernel(&sym).unwrap_or_else(|| panic!("{arch}: ptxas said nothing of {sym}"));
            assert!(f.shared_bytes <= 48 << 10, "{arch} {sym}: {} B of static shared memory", f.shared_bytes);
        }
    }
}
