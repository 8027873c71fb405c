//! The interpreter's GPU mode: a shared-memory tree reduction with barriers
//! (the pattern GPU norm and softmax kernels use), a warp-shuffle reduction,
//! and the divergence and bounds errors.

use smelt_codegen::kir::interp::{run, BufData, Mode};
use smelt_codegen::kir::*;

/// Each block sums its `block` elements of `x` into `y[block_idx]`: every
/// thread stores its element to shared memory, then halving strides add
/// pairs with a barrier between rounds.
fn block_sum(block: usize, blocks: usize) -> Kernel {
    let mut b = Builder::new("block_sum");
    let x = b.input("x", block * blocks);
    let y = b.output("y", blocks);
    let sh = b.buffer("partial", Scalar::F32, block, Space::Shared, Access::Write);
    let tid = Expr::Special(Special::ThreadIdx(0));
    let bid = Expr::Special(Special::BlockIdx(0));
    let t = b.let_("t", tid);
    b.store(sh, Expr::Var(t), Expr::load(x, bid.clone() * Expr::idx(block) + Expr::Var(t), 1));
    b.barrier();
    let mut stride = block.next_power_of_two() / 2;
    while stride > 0 {
        // Threads below `stride` add the partner `stride` above, if it exists.
        let partner = Expr::Var(t) + Expr::idx(stride);
        let cond =
            Expr::select(Expr::Var(t).lt(Expr::idx(stride)), partner.clone().lt(Expr::idx(block)), Expr::Bool(false));
        b.if_(
            cond,
            |b| {
                let s = Expr::load(sh, Expr::Var(t), 1) + Expr::load(sh, partner, 1);
                b.store(sh, Expr::Var(t), s)
            },
            |_| {},
        );
        b.barrier();
        stride /= 2;
    }
    b.if_(Expr::Var(t).cmp(CmpOp::Eq, Expr::idx(0)), |b| b.store(y, bid, Expr::load(sh, Expr::idx(0), 1)), |_| {});
    b.finish().unwrap()
}

#[test]
fn shared_memory_reduction_with_barriers() {
    for block in [1, 3, 32, 48] {
        let blocks = 3;
        let k = block_sum(block, blocks);
        let xs: Vec<f32> = (0..block * blocks).map(|i| i as f32).collect();
        let mut bufs = vec![BufData::F32(xs.clone()), BufData::zeros(Scalar::F32, blocks)];
        run(&k, &mut bufs, &[], Mode::Gpu { grid: [blocks, 1, 1], block: [block, 1, 1] }).unwrap();
        let want: Vec<f32> = xs.chunks(block).map(|c| c.iter().sum()).collect();
        assert_eq!(bufs[1].f32(), &want[..], "block {block}\n{k}");
    }
}

#[test]
fn warp_shuffle_reduction() {
    let mut b = Builder::new("warp_sum");
    let x = b.input("x", 64);
    let y = b.output("y", 2);
    let t = b.let_("t", Expr::Special(Special::ThreadIdx(0)));
    let v = b.let_("v", Expr::load(x, Expr::Var(t), 1));
    let other = b.var("other", Ty::F32);
    for off in [16, 8, 4, 2, 1] {
        b.shuffle(other, ShuffleKind::Xor, Expr::Var(v), Expr::idx(off));
        b.assign(v, Expr::Var(v) + Expr::Var(other));
    }
    b.if_(
        (Expr::Var(t) % Expr::idx(32)).cmp(CmpOp::Eq, Expr::idx(0)),
        |b| b.store(y, Expr::Var(t) / Expr::idx(32), Expr::Var(v)),
        |_| {},
    );
    let k = b.finish().unwrap();
    assert!(k.to_string().contains("other.2 = shuffle_xor(v.1, 16)"), "{k}");
    let mut bufs = vec![BufData::F32((0..64).map(|i| i as f32).collect()), BufData::zeros(Scalar::F32, 2)];
    run(&k, &mut bufs, &[], Mode::Gpu { grid: [1, 1, 1], block: [64, 1, 1] }).unwrap();
    assert_eq!(bufs[1].f32(), &[496.0, 1520.0]);
}

#[test]
fn divergent_barrier_is_an_error() {
    let mut b = Builder::new("diverge");
    let y = b.output("y", 4);
    let t = Expr::Special(Special::ThreadIdx(0));
    b.if_(t.clone().lt(Expr::idx(2)), |b| b.barrier(), |_| {});
    b.store(y, t, Expr::f32(1.0));
    let k = b.finish().unwrap();
    let mut bufs = vec![BufData::zeros(Scalar::F32, 4)];
    let err = run(&k, &mut bufs, &[], Mode::Gpu { grid: [1, 1, 1], block: [4, 1, 1] }).unwrap_err().to_string();
    assert!(err.contains("barrier divergence: threads [0, 1]"), "{err}");
}

#[test]
fn out_of_bounds_is_an_error() {
    let mut b = Builder::new("oob");
    let y = b.output("y", 4);
    b.for_("i", Expr::idx(0), Expr::idx(5), 1, LoopKind::Parallel, |b, i| b.store(y, i, Expr::f32(0.0)));
    let k = b.finish().unwrap();
    let mut bufs = vec![BufData::zeros(Scalar::F32, 4)];
    let err = run(&k, &mut bufs, &[], Mode::Cpu { threads: 1 }).unwrap_err().to_string();
    assert!(err.contains("index 4..5 out of bounds of `y` (length 4)"), "{err}");
    assert!(err.contains("in: y[i.0] = 0.0"), "{err}");
}

#[test]
fn verifier_rejects_ill_typed_kernels() {
    let mut b = Builder::new("bad");
    let x = b.input("x", 4);
    b.store(x, Expr::idx(0), Expr::f32(1.0));
    let err = b.finish().unwrap_err().to_string();
    assert!(err.contains("store to read-only buffer `x`"), "{err}");
}

/// A prefetch is a hint: it may point past its buffer, the interpreter
/// (in both modes) ignores it, and only a global buffer with an `i64`
/// index is accepted.
#[test]
fn prefetch_is_only_a_hint() {
    let mut b = Builder::new("copy_prefetching");
    let x = b.input("x", 8);
    let y = b.output("y", 8);
    b.for_("i", Expr::idx(0), Expr::idx(8), 1, LoopKind::Parallel, |b, i| {
        b.prefetch(x, i.clone() + Expr::idx(1 << 20));
        b.store(y, i.clone(), Expr::load(x, i, 1));
    });
    let k = b.finish().unwrap();
    assert!(k.to_string().contains("prefetch x[(i.0 + 1048576)]"), "{k}");
    let data: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let mut bufs = vec![BufData::F32(data.clone()), BufData::F32(vec![0.0; 8])];
    run(&k, &mut bufs, &[], Mode::Cpu { threads: 2 }).unwrap();
    assert_eq!(bufs[1].f32(), data.as_slice());

    let mut b = Builder::new("bad_prefetch");
    let sh = b.buffer("tile", Scalar::F32, 4, Space::Shared, Access::Write);
    b.prefetch(sh, Expr::idx(0));
    let err = b.finish().unwrap_err().to_string();
    assert!(err.contains("prefetch of a buffer that is not global"), "{err}");
    let mut b = Builder::new("bad_prefetch_index");
    let x = b.input("x", 4);
    b.prefetch(x, Expr::f32(0.0));
    let err = b.finish().unwrap_err().to_string();
    assert!(err.contains("prefetch index must be i64"), "{err}");
}
