//! Matrix products whose sizes may be scalar parameters: numpy `matmul`
//! with batch broadcasting, and the gated MLP `act(x·Wg) * (x·Wu)` built
//! from the same register tiles.
//!
//! The one top-level `Parallel` loop runs over `batch x row blocks x column
//! blocks`, so a decode step (one row) still splits over the output
//! columns and a prefill over `M x N` tiles. Each iteration computes one
//! tile held in vector accumulators:
//! - `B` stored `[k, n]` (`Layout::KN`): the tile is `mr` rows by `nv`
//!   vectors of 4 columns; each step of `k` broadcasts one element of `A`
//!   per row against `nv` vectors of `B`.
//! - `B` stored `[n, k]` (`Layout::NK`, a weight used through a transpose):
//!   the tile is `mr` rows by `nr` columns, each accumulator a vector of 4
//!   partial dot products along the contiguous `k`, reduced at the end.
//!
//! A tile with a single row (every tile of a decode step) splits `k` over
//! `ksplit` sets of accumulators so that enough independent FMA chains hide
//! the FMA latency. Leftover rows pick a smaller static tile through a
//! chain of `if`s on the (dynamic) number of rows left; leftover columns
//! use one-vector and then one-column tiles. Sums accumulate in f32.

use super::sym::{self, add, as_const, ceil_div, floor_to, mul, sub};
use super::{bind, c, widen, LANES};
use crate::kir::{Access, BufId, Builder, CmpOp, Expr, LoopKind, RedOp, Scalar, Space, UnOp, Var};

/// How the right operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[k, n]` row-major.
    KN,
    /// `[n, k]` row-major (the weight of a `transpose` folded away).
    NK,
}

/// One batch axis of the result and whether each operand has it (an
/// operand without it, or with size 1 there, is broadcast along it).
#[derive(Clone, Debug)]
pub struct BatchAxis {
    pub dim: Expr,
    pub a: bool,
    pub b: bool,
}

/// The sizes of a (batched) product `[.., m, k] x [.., k, n]`.
#[derive(Clone, Debug)]
pub struct MatmulDims {
    pub batch: Vec<BatchAxis>,
    pub m: Expr,
    pub k: Expr,
    pub n: Expr,
}

/// The activation of a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    Silu,
    GeluTanh,
    /// The erf form, with erf from Abramowitz and Stegun 7.1.26 (absolute
    /// error below 1.5e-7), as KIR has no erf.
    Gelu,
}

impl Act {
    pub fn parse(s: &str) -> Option<Act> {
        match s {
            "silu" => Some(Act::Silu),
            "gelu_tanh" => Some(Act::GeluTanh),
            "gelu" => Some(Act::Gelu),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Act::Silu => "silu",
            Act::GeluTanh => "gelu_tanh",
            Act::Gelu => "gelu",
        }
    }

    /// The activation of `x` (of width `lanes`), with `x` in a variable
    /// because it is used several times.
    pub fn apply(self, b: &mut Builder, x: Var, lanes: u8) -> Expr {
        let xv = || Expr::Var(x);
        match self {
            Act::Silu => xv() * (c(1.0, lanes) / (c(1.0, lanes) + (-xv()).exp())),
            Act::GeluTanh => {
                let x3 = xv() * xv() * xv();
                let inner = (xv() + c(0.044715, lanes) * x3) * c((2.0 / std::f32::consts::PI).sqrt(), lanes);
                c(0.5, lanes) * xv() * (c(1.0, lanes) + inner.tanh())
            }
            Act::Gelu => {
                #[allow(clippy::excessive_precision)] // the published coefficients
                let (p, a) =
                    (0.327_591_1, [0.254_829_592, -0.284_496_736, 1.421_413_741, -1.453_152_027, 1.061_405_429]);
                let z = b.let_("z", xv() * c(std::f32::consts::FRAC_1_SQRT_2, lanes));
                let az = b.let_("az", Expr::Var(z).un(UnOp::Abs));
                let t = b.let_("t", c(1.0, lanes) / (c(1.0, lanes) + c(p, lanes) * Expr::Var(az)));
                let poly = a.iter().rev().fold(c(0.0, lanes), |acc, &k| (acc + c(k, lanes)) * Expr::Var(t));
                let e = b.let_("erf_abs", c(1.0, lanes) - poly * (-(Expr::Var(az) * Expr::Var(az))).exp());
                let neg = Expr::Var(z).cmp(CmpOp::Lt, c(0.0, lanes));
                let erf = Expr::select(neg, -Expr::Var(e), Expr::Var(e));
                c(0.5, lanes) * xv() * (c(1.0, lanes) + erf)
            }
        }
    }
}

/// Tile sizes of [`matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileParams {
    /// Rows of a tile.
    pub mr: usize,
    /// Columns of a tile: vectors of 4 (KN) or single columns (NK).
    pub nc: usize,
    /// Accumulator sets along `k` for single-row tiles.
    pub ksplit: usize,
}

impl TileParams {
    /// Defaults chosen by timing 576x1536 products with 1 and 128 rows on
    /// one thread (x86-64, SSE registers): 16-column KN tiles use whole
    /// cache lines of the strided rows of `B`; single-row tiles keep 8
    /// independent FMA chains.
    pub fn default_for(layout: Layout, gated: bool) -> TileParams {
        match (layout, gated) {
            (Layout::KN, false) => TileParams { mr: 4, nc: 4, ksplit: 2 },
            (Layout::KN, true) => TileParams { mr: 2, nc: 2, ksplit: 2 },
            (Layout::NK, false) => TileParams { mr: 3, nc: 4, ksplit: 2 },
            (Layout::NK, true) => TileParams { mr: 2, nc: 2, ksplit: 2 },
        }
    }
}

/// Declares the buffers (`a`, then `b` or `w_gate, w_up`, then the result)
/// and builds the body of `C = A · B` (or the gated MLP when `act` is set)
/// into `b`. Every size may be a scalar parameter of `b`. The right operand
/// (`b`, or the gated MLP's weights) is stored as `b_elem` (`F32`, or
/// `BF16`/`F16` widened to f32 as it is loaded); everything else is f32.
pub fn matmul(b: &mut Builder, d: &MatmulDims, layout: Layout, act: Option<Act>, p: TileParams, b_elem: Scalar) {
    let (mr, nc, ksplit) = (p.mr.max(1), p.nc.max(1), p.ksplit.max(1));
    let (m, k, n) = (d.m.clone(), d.k.clone(), d.n.clone());
    let a_batch: Vec<Expr> = d.batch.iter().filter(|x| x.a).map(|x| x.dim.clone()).collect();
    let b_batch: Vec<Expr> = d.batch.iter().filter(|x| x.b).map(|x| x.dim.clone()).collect();
    let all_batch: Vec<Expr> = d.batch.iter().map(|x| x.dim.clone()).collect();
    let a = b.input("a", mul(sym::product(&a_batch), mul(m.clone(), k.clone())));
    let mut right = |name: &str, len: Expr| b.buffer(name, b_elem, len, Space::Global, Access::Read);
    let bufs: Vec<BufId> = if act.is_some() {
        vec![right("w_gate", mul(k.clone(), n.clone())), right("w_up", mul(k.clone(), n.clone()))]
    } else {
        vec![right("b", mul(sym::product(&b_batch), mul(k.clone(), n.clone())))]
    };
    let out = b.output("c", mul(sym::product(&all_batch), mul(m.clone(), n.clone())));

    let col_block = match layout {
        Layout::KN => LANES as usize * nc,
        Layout::NK => nc,
    };
    let mblocks = ceil_div(m.clone(), mr);
    let nblocks = ceil_div(n.clone(), col_block);
    let total = mul(sym::product(&all_batch), mul(mblocks.clone(), nblocks.clone()));
    b.for_("t", Expr::i64(0), total, 1, LoopKind::Parallel, |b, t| {
        // Row blocks vary fastest: consecutive iterations (and so one
        // thread's chunk) reuse one panel of B from cache while A streams.
        let ib = bind(b, "ib", sym::rem(t.clone(), mblocks.clone()));
        let rest = bind(b, "tr", sym::div(t, mblocks.clone()));
        let jb = bind(b, "jb", sym::rem(rest.clone(), nblocks.clone()));
        let bi = bind(b, "bi", sym::div(rest, nblocks.clone()));
        // Offsets of this batch element's matrices.
        let (mut a_off, mut b_off) = (Expr::i64(0), Expr::i64(0));
        if !d.batch.is_empty() {
            let idx = sym::unflatten(b, "bx", bi.clone(), &all_batch);
            let (mut sa, mut sb) = (mul(m.clone(), k.clone()), mul(k.clone(), n.clone()));
            for (ax, i) in d.batch.iter().zip(&idx).rev() {
                if ax.a {
                    a_off = add(a_off, mul(i.clone(), sa.clone()));
                    sa = mul(sa, ax.dim.clone());
                }
                if ax.b {
                    b_off = add(b_off, mul(i.clone(), sb.clone()));
                    sb = mul(sb, ax.dim.clone());
                }
            }
            a_off = bind(b, "a_off", a_off);
            b_off = bind(b, "b_off", b_off);
        }
        let c_off = bind(b, "c_off", mul(bi, mul(m.clone(), n.clone())));
        let i0 = bind(b, "i0", mul(ib, Expr::idx(mr)));
        let j0 = bind(b, "j0", mul(jb, Expr::idx(col_block)));
        let g = Gen { a, bs: bufs.clone(), out, k: k.clone(), n: n.clone(), a_off, b_off, c_off, act, layout, ksplit };
        let rows_left = sub(m.clone(), i0.clone());
        let cols_left = sub(n.clone(), j0.clone());
        g.row_chain(b, &i0, &j0, rows_left, cols_left, mr, col_block);
    });
}

struct Gen {
    a: BufId,
    bs: Vec<BufId>,
    out: BufId,
    k: Expr,
    n: Expr,
    a_off: Expr,
    b_off: Expr,
    c_off: Expr,
    act: Option<Act>,
    layout: Layout,
    ksplit: usize,
}

impl Gen {
    /// Chooses the static row count of the tile from the rows left.
    #[allow(clippy::too_many_arguments)]
    fn row_chain(&self, b: &mut Builder, i0: &Expr, j0: &Expr, rows_left: Expr, cols_left: Expr, mr: usize, cb: usize) {
        if let Some(r) = as_const(&rows_left) {
            let rows = (r.max(1) as usize).min(mr);
            return self.col_chain(b, i0, j0, rows, cols_left, cb);
        }
        self.rows_from(b, i0, j0, &rows_left, cols_left, mr, cb);
    }

    #[allow(clippy::too_many_arguments)]
    fn rows_from(&self, b: &mut Builder, i0: &Expr, j0: &Expr, left: &Expr, cols: Expr, rows: usize, cb: usize) {
        if rows == 1 {
            return self.col_chain(b, i0, j0, 1, cols, cb);
        }
        let cond = left.clone().cmp(CmpOp::Ge, Expr::idx(rows));
        let cols2 = cols.clone();
        b.if_(
            cond,
            |b| self.col_chain(b, i0, j0, rows, cols, cb),
            |b| self.rows_from(b, i0, j0, left, cols2, rows - 1, cb),
        );
    }

    /// A full column block, or the partial last one.
    fn col_chain(&self, b: &mut Builder, i0: &Expr, j0: &Expr, rows: usize, cols_left: Expr, cb: usize) {
        let full = |b: &mut Builder| match self.layout {
            Layout::KN => self.tile_kn(b, i0, j0, rows, &vec![LANES; cb / LANES as usize]),
            Layout::NK => self.tile_nk(b, i0, j0, rows, cb),
        };
        let partial = |b: &mut Builder| {
            let end = add(j0.clone(), cols_left.clone());
            match self.layout {
                Layout::KN => {
                    // Single vectors, then single columns.
                    let vec_end = add(j0.clone(), floor_to(cols_left.clone(), LANES as usize));
                    b.for_("jv", j0.clone(), vec_end.clone(), LANES as i64, LoopKind::Serial, |b, j| {
                        self.tile_kn(b, i0, &j, rows, &[LANES]);
                    });
                    b.for_("js", vec_end, end, 1, LoopKind::Serial, |b, j| self.tile_kn(b, i0, &j, rows, &[1]));
                }
                Layout::NK => {
                    b.for_("js", j0.clone(), end, 1, LoopKind::Serial, |b, j| self.tile_nk(b, i0, &j, rows, 1));
                }
            }
        };
        match as_const(&cols_left) {
            Some(cl) if cl >= cb as i64 => full(b),
            Some(_) => partial(b),
            None => {
                if as_const(&self.n).is_some_and(|n| n % cb as i64 == 0) {
                    full(b)
                } else {
                    b.if_(cols_left.clone().cmp(CmpOp::Ge, Expr::idx(cb)), full, partial)
                }
            }
        }
    }

    fn a_at(&self, row: Expr, p: Expr) -> Expr {
        add(add(self.a_off.clone(), mul(row, self.k.clone())), p)
    }

    /// Stores the tile's values (`vals[op][r][c]`, the gated epilogue
    /// applied) at row `i0 + r`, columns `j0 + offsets[c]`.
    // Row, column and operand indices address several parallel tables at once.
    #[allow(clippy::needless_range_loop)]
    fn store(&self, b: &mut Builder, i0: &Expr, j0: &Expr, vals: Vec<Vec<Vec<Expr>>>, offs: &[usize], widths: &[u8]) {
        let rows = vals[0].len();
        for r in 0..rows {
            for (cix, (&off, &w)) in offs.iter().zip(widths).enumerate() {
                let v = match self.act {
                    None => vals[0][r][cix].clone(),
                    Some(act) => {
                        let g = b.let_("g", vals[0][r][cix].clone());
                        let a = act.apply(b, g, w);
                        a * vals[1][r][cix].clone()
                    }
                };
                let row = add(i0.clone(), Expr::idx(r));
                let at = add(add(self.c_off.clone(), mul(row, self.n.clone())), add(j0.clone(), Expr::idx(off)));
                b.store(self.out, at, v);
            }
        }
    }

    /// A `rows x sum(widths)` tile of the KN layout at `(i0, j0)`.
    // Row, column and operand indices address several parallel tables at once.
    #[allow(clippy::needless_range_loop)]
    fn tile_kn(&self, b: &mut Builder, i0: &Expr, j0: &Expr, rows: usize, widths: &[u8]) {
        let offs = offsets(widths);
        let split = if rows == 1 { self.ksplit } else { 1 };
        let nb = self.bs.len();
        // acc[u][op][r][c]
        let acc: Vec<Vec<Vec<Vec<Var>>>> = (0..split)
            .map(|_| {
                (0..nb)
                    .map(|_| (0..rows).map(|_| widths.iter().map(|&w| b.let_("acc", c(0.0, w))).collect()).collect())
                    .collect()
            })
            .collect();
        let step = |b: &mut Builder, p: Expr, u: usize| {
            let brow = b.let_("brow", add(add(self.b_off.clone(), mul(p.clone(), self.n.clone())), j0.clone()));
            let bv: Vec<Vec<Var>> = self
                .bs
                .iter()
                .map(|&bb| {
                    widths
                        .iter()
                        .zip(&offs)
                        .map(|(&w, &off)| b.let_("bv", Expr::load(bb, add(Expr::Var(brow), Expr::idx(off)), w)))
                        .collect()
                })
                .collect();
            for r in 0..rows {
                let av = b.let_("av", Expr::load(self.a, self.a_at(add(i0.clone(), Expr::idx(r)), p.clone()), 1));
                for op in 0..nb {
                    for (cix, &w) in widths.iter().enumerate() {
                        let x = &acc[u][op][r][cix];
                        b.assign(*x, widen(Expr::Var(av), w).fma(Expr::Var(bv[op][cix]), Expr::Var(*x)));
                    }
                }
            }
        };
        let kk = self.k.clone();
        if split == 1 {
            b.for_("p", Expr::i64(0), kk, 1, LoopKind::Serial, |b, p| step(b, p, 0));
        } else {
            let kend = floor_to(kk.clone(), split);
            b.for_("p", Expr::i64(0), kend.clone(), split as i64, LoopKind::Unroll(split as u32), |b, p| {
                for u in 0..split {
                    step(b, add(p.clone(), Expr::idx(u)), u);
                }
            });
            if as_const(&kk).is_none_or(|k| k % split as i64 != 0) {
                b.for_("p_tail", kend, kk, 1, LoopKind::Serial, |b, p| step(b, p, 0));
            }
        }
        let vals = (0..nb)
            .map(|op| {
                (0..rows)
                    .map(|r| {
                        (0..widths.len())
                            .map(|cix| {
                                (1..split).fold(Expr::Var(acc[0][op][r][cix]), |s, u| s + Expr::Var(acc[u][op][r][cix]))
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        self.store(b, i0, j0, vals, &offs, widths);
    }

    /// A `rows x cols` tile of the NK layout at `(i0, j0)`: vector partial
    /// sums along `k`, reduced, plus a scalar tail of `k`.
    fn tile_nk(&self, b: &mut Builder, i0: &Expr, j0: &Expr, rows: usize, cols: usize) {
        let l = LANES as usize;
        let split = if rows == 1 { self.ksplit } else { 1 };
        let nb = self.bs.len();
        let kk = self.k.clone();
        let kvec = floor_to(kk.clone(), l);
        let has_vec = as_const(&kvec).is_none_or(|k| k > 0);
        let sums: Vec<Vec<Vec<Var>>> = (0..nb)
            .map(|_| (0..rows).map(|_| (0..cols).map(|_| b.let_("sum", Expr::f32(0.0))).collect()).collect())
            .collect();
        let arow: Vec<Var> =
            (0..rows).map(|r| b.let_("arow", self.a_at(add(i0.clone(), Expr::idx(r)), Expr::i64(0)))).collect();
        let wrow: Vec<Var> = (0..cols)
            .map(|cix| b.let_("wrow", add(self.b_off.clone(), mul(add(j0.clone(), Expr::idx(cix)), kk.clone()))))
            .collect();
        if has_vec {
            let acc: Vec<Vec<Vec<Vec<Var>>>> = (0..split)
                .map(|_| {
                    (0..nb)
                        .map(|_| (0..rows).map(|_| (0..cols).map(|_| b.let_("acc", c(0.0, LANES))).collect()).collect())
                        .collect()
                })
                .collect();
            let step = |b: &mut Builder, p: Expr, u: usize| {
                let av: Vec<Var> = arow
                    .iter()
                    .map(|&ar| b.let_("av", Expr::load(self.a, add(Expr::Var(ar), p.clone()), LANES)))
                    .collect();
                for (op, &bb) in self.bs.iter().enumerate() {
                    for (cix, &wr) in wrow.iter().enumerate() {
                        let wv = b.let_("wv", Expr::load(bb, add(Expr::Var(wr), p.clone()), LANES));
                        for (r, &a) in av.iter().enumerate() {
                            let x = acc[u][op][r][cix];
                            b.assign(x, Expr::Var(a).fma(Expr::Var(wv), Expr::Var(x)));
                        }
                    }
                }
            };
            let block = l * split;
            let kblk = floor_to(kk.clone(), block);
            b.for_("p", Expr::i64(0), kblk.clone(), block as i64, LoopKind::Vectorized(LANES), |b, p| {
                for u in 0..split {
                    step(b, add(p.clone(), Expr::idx(u * l)), u);
                }
            });
            if split > 1 && as_const(&kk).is_none_or(|k| k % block as i64 >= l as i64) {
                b.for_("p_vec", kblk, kvec.clone(), l as i64, LoopKind::Vectorized(LANES), |b, p| step(b, p, 0));
            }
            for op in 0..nb {
                for r in 0..rows {
                    for cix in 0..cols {
                        let total =
                            (1..split).fold(Expr::Var(acc[0][op][r][cix]), |s, u| s + Expr::Var(acc[u][op][r][cix]));
                        b.assign(sums[op][r][cix], total.hreduce(RedOp::Add));
                    }
                }
            }
        }
        if as_const(&kk).is_none_or(|k| k % l as i64 != 0) {
            b.for_("p_tail", kvec, kk, 1, LoopKind::Serial, |b, p| {
                let av: Vec<Var> =
                    arow.iter().map(|&ar| b.let_("av", Expr::load(self.a, add(Expr::Var(ar), p.clone()), 1))).collect();
                for (op, &bb) in self.bs.iter().enumerate() {
                    for (cix, &wr) in wrow.iter().enumerate() {
                        let wv = b.let_("wv", Expr::load(bb, add(Expr::Var(wr), p.clone()), 1));
                        for (r, &a) in av.iter().enumerate() {
                            let x = sums[op][r][cix];
                            b.assign(x, Expr::Var(a).fma(Expr::Var(wv), Expr::Var(x)));
                        }
                    }
                }
            });
        }
        let vals = sums.iter().map(|o| o.iter().map(|r| r.iter().map(|v| Expr::Var(*v)).collect()).collect()).collect();
        let offs: Vec<usize> = (0..cols).collect();
        self.store(b, i0, j0, vals, &offs, &vec![1; cols]);
    }
}

fn offsets(widths: &[u8]) -> Vec<usize> {
    widths
        .iter()
        .scan(0, |o, w| {
            let at = *o;
            *o += *w as usize;
            Some(at)
        })
        .collect()
}
