//! Row-wise GPU kernels (norms, softmax): each row of a `[rows, n]` tensor
//! is owned by `tpr` consecutive threads of a block, which stride over the
//! row and combine their partial results with a warp butterfly (xor
//! shuffles) and, for rows wider than a warp, a shared-memory exchange
//! between the row's warps.
//!
//! Every thread of a block runs every shuffle and barrier (rows past the
//! end only skip their loads and stores), as the hardware and the
//! interpreter require. After a reduction every thread of the row holds the
//! same total, bit for bit: the butterfly adds the same pairs in every lane,
//! and the warps' partials are combined in one order by every thread.

use crate::kir::{Access, BufId, Builder, Expr, ShuffleKind, Space, Special, Ty, Var};
use crate::templates::sym;

/// How rows map to threads: `tpr` threads per row (a power of two), each
/// block of `block` threads (a multiple of `tpr`) taking `block / tpr` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    pub block: u32,
    pub tpr: u32,
}

impl RowLayout {
    /// Blocks of `block` threads; threads per row grow with the row length
    /// (about 8 elements each, at least a warp, at most the largest power
    /// of two dividing the block, which they take when the length is not
    /// known).
    pub fn for_len(n: Option<usize>, block: u32) -> RowLayout {
        let most = block & block.wrapping_neg();
        let tpr = match n {
            Some(n) => (n.div_ceil(8).next_power_of_two() as u32).clamp(32.min(most), most),
            None => most,
        };
        RowLayout { block, tpr }
    }

    pub fn rows_per_block(self) -> u32 {
        self.block / self.tpr
    }
}

/// The row a thread works on and its index within the row's threads.
pub struct RowThread {
    /// The row index (may be past the last row in the last block).
    pub row: Var,
    /// `0..tpr`: the thread's first column and its stride start.
    pub t: Var,
    /// Whether `row` exists.
    pub ok: Expr,
    /// The row's slot among the block's rows (for shared buffers).
    pub slot: Var,
}

/// Makes `b` a row kernel for `rows` rows (an `i64` expression over
/// constants and scalar parameters) and computes each thread's place.
pub fn launch_rows(b: &mut Builder, layout: RowLayout, rows: Expr) -> RowThread {
    let rpb = layout.rows_per_block() as usize;
    b.gpu_launch([layout.block, 1, 1], [sym::ceil_div(rows.clone(), rpb), Expr::i64(1), Expr::i64(1)]);
    let tid = Expr::Special(Special::ThreadIdx(0));
    let bid = Expr::Special(Special::BlockIdx(0));
    let tpr = Expr::idx(layout.tpr as usize);
    let slot = b.let_("slot", sym::div(tid.clone(), tpr.clone()));
    let row = b.let_("row", sym::add(sym::mul(bid, Expr::idx(rpb)), Expr::Var(slot)));
    let t = b.let_("t", sym::rem(tid, tpr));
    RowThread { row, t, ok: Expr::Var(row).lt(rows), slot }
}

/// Shared scratch for [`row_reduce`]: one partial per warp of the block
/// (`None` when rows fit in a warp and need none).
pub fn reduce_scratch(b: &mut Builder, layout: RowLayout, name: &str) -> Option<BufId> {
    (layout.tpr > 32)
        .then(|| b.buffer(name, crate::kir::Scalar::F32, (layout.block / 32) as usize, Space::Shared, Access::Write))
}

/// Combines `v` (an f32 variable) over the threads of each row with
/// `combine`; returns a variable holding the row's total in every thread.
/// `scratch` comes from [`reduce_scratch`] with the same layout.
pub fn row_reduce(
    b: &mut Builder,
    layout: RowLayout,
    rt: &RowThread,
    v: Var,
    scratch: Option<BufId>,
    combine: &dyn Fn(Expr, Expr) -> Expr,
) -> Var {
    let other = b.var("other", Ty::F32);
    let mut off = layout.tpr.min(32) / 2;
    while off > 0 {
        b.shuffle(other, ShuffleKind::Xor, Expr::Var(v), Expr::idx(off as usize));
        b.assign(v, combine(Expr::Var(v), Expr::Var(other)));
        off /= 2;
    }
    let Some(sh) = scratch else { return v };
    // One partial per warp, then every thread folds its row's warps in order.
    let wpr = (layout.tpr / 32) as usize;
    let tid = Expr::Special(Special::ThreadIdx(0));
    let lane0 = sym::rem(tid.clone(), Expr::idx(32)).cmp(crate::kir::CmpOp::Eq, Expr::i64(0));
    b.if_(lane0, |b| b.store(sh, sym::div(tid, Expr::idx(32)), Expr::Var(v)), |_| {});
    b.barrier();
    let first = b.let_("first", sym::mul(Expr::Var(rt.slot), Expr::idx(wpr)));
    let total = b.let_("total", Expr::load(sh, Expr::Var(first), 1));
    for k in 1..wpr {
        b.assign(total, combine(Expr::Var(total), Expr::load(sh, sym::add(Expr::Var(first), Expr::idx(k)), 1)));
    }
    // The scratch may be reused by the next reduction.
    b.barrier();
    total
}

/// `for j in t..n step tpr` over the thread's columns of the row.
pub fn row_loop(b: &mut Builder, layout: RowLayout, rt: &RowThread, n: Expr, body: impl FnOnce(&mut Builder, Expr)) {
    b.for_("j", Expr::Var(rt.t), n, layout.tpr as i64, crate::kir::LoopKind::Serial, body);
}
