//! Kernels over symbolic shapes: a strided map (every output element is a
//! function of elements read through strided views of the operands) that
//! covers broadcasting elementwise ops, transposes, slices and expands, plus
//! the helpers the other symbolic kernels share.
//!
//! Dims are [`Dim`] polynomials over the graph's symbols. Constant dims are
//! baked into the kernel; every other distinct dim (a symbol, or a product
//! such as `seq*64` used as a stride) becomes one scalar `i64` parameter,
//! recorded in [`Dims`] so the caller can report its value. Kernel names are
//! a readable prefix plus a hash of the kernel's text, so identical nodes get
//! identical kernels and different kernels get different names.
//!
//! Views are collapsed before code is generated: adjacent output axes merge
//! when every view walks them as one (`stride[i] == stride[i + 1] * dim[i + 1]`,
//! compared symbolically), and axes of constant size 1 are dropped. What is
//! left is `rows x n` where only the row index needs dividing into
//! coordinates; the inner `n` is walked directly, with `f32x4` vectors when
//! every operand is contiguous or constant along it.

use super::LANES;
use crate::kir::{Access, Builder, Expr, Kernel, KirError, LoopKind, Scalar, Space, Var};
use smelt_ir::Dim;

/// Elements per parallel task along the inner axis: large enough to
/// amortise the task's index arithmetic, small enough to split one long row
/// over a thread team.
pub const CHUNK: i64 = 1024;

/// The scalar parameters standing for symbolic dims, in parameter order.
#[derive(Default)]
pub struct Dims {
    pub dims: Vec<Dim>,
    exprs: Vec<Expr>,
}

impl Dims {
    pub fn new() -> Dims {
        Dims::default()
    }

    /// The dim as an `i64` expression: a constant, or the scalar parameter
    /// for it (created on first use).
    pub fn expr(&mut self, b: &mut Builder, d: &Dim) -> Expr {
        if let Some(c) = d.as_const() {
            return Expr::i64(c);
        }
        if let Some(i) = self.dims.iter().position(|x| x == d) {
            return self.exprs[i].clone();
        }
        let e = b.scalar_param(&format!("d{}", self.dims.len()));
        self.dims.push(d.clone());
        self.exprs.push(e.clone());
        e
    }
}

/// Finishes the kernel and names it `prefix_<hash of its text>`.
pub fn finish_named(b: Builder, prefix: &str) -> Result<Kernel, KirError> {
    let mut k = b.finish()?;
    k.name = "k".into();
    // FNV-1a: stable across runs, platforms and compiler versions.
    let text = k.to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        h ^= byte as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let clean: String = prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    k.name = format!("{clean}_{:012x}", h & 0xffff_ffff_ffff);
    Ok(k)
}

/// Covers `start..end` with vector steps of `lanes` (when `lanes > 1`) and a
/// scalar tail, for bounds known only at run time; `body(b, index, width)`.
pub fn sym_vec_loop(
    b: &mut Builder,
    name: &str,
    start: Expr,
    end: Expr,
    lanes: u8,
    body: impl Fn(&mut Builder, Expr, u8),
) {
    let mut tail_start = start.clone();
    if lanes > 1 {
        let l = lanes as i64;
        let vend = b.let_(&format!("{name}_vend"), start.clone() + (end.clone() - start) / Expr::i64(l) * Expr::i64(l));
        let v = Expr::Var(vend);
        b.for_(name, tail_start, v.clone(), l, LoopKind::Vectorized(lanes), |b, j| body(b, j, lanes));
        tail_start = v;
    }
    b.for_(&format!("{name}_tail"), tail_start, end, 1, LoopKind::Serial, |b, j| body(b, j, 1));
}

/// An operand read through a strided view: the element for output
/// coordinates `c` is `offset + sum(c[i] * strides[i])` of a buffer of `len`
/// elements. A stride of 0 broadcasts; strides may be negative.
#[derive(Clone, Debug)]
pub struct View {
    pub elem: Scalar,
    pub len: Dim,
    pub offset: Dim,
    pub strides: Vec<Dim>,
}

impl View {
    /// A dense row-major operand of `shape` broadcast (numpy rules) to `out`.
    pub fn broadcast(elem: Scalar, shape: &[Dim], out: &[Dim]) -> View {
        let lead = out.len() - shape.len();
        let rs = row_strides(shape);
        let strides = (0..out.len())
            .map(|i| {
                if i < lead || (shape[i - lead] == Dim::c(1) && out[i] != Dim::c(1)) {
                    Dim::c(0)
                } else {
                    rs[i - lead].clone()
                }
            })
            .collect();
        View { elem, len: Dim::product(shape), offset: Dim::c(0), strides }
    }
}

/// Row-major strides of a shape.
pub fn row_strides(shape: &[Dim]) -> Vec<Dim> {
    let mut s = vec![Dim::c(1); shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].clone() * shape[i + 1].clone();
    }
    s
}

/// The output axes after dropping size-1 axes and merging adjacent axes
/// that every view walks as one: `(dim, stride per view)`, outermost first.
pub fn collapse(out: &[Dim], views: &[View]) -> Vec<(Dim, Vec<Dim>)> {
    let mut merged: Vec<(Dim, Vec<Dim>)> = vec![];
    for (i, d) in out.iter().enumerate() {
        if *d == Dim::c(1) {
            continue;
        }
        let s: Vec<Dim> = views.iter().map(|v| v.strides[i].clone()).collect();
        if let Some((pd, ps)) = merged.last_mut() {
            if ps.iter().zip(&s).all(|(po, si)| *po == si.clone() * d.clone()) {
                *pd = pd.clone() * d.clone();
                *ps = s;
                continue;
            }
        }
        merged.push((d.clone(), s));
    }
    merged
}

/// `out[c] = f(view_0[c], view_1[c], ...)` over the dense row-major output
/// of shape `out_shape`. `f` gets the loaded operands at width `lanes` and
/// must return an `out_elem` value of that width; `vector` says whether it
/// accepts vectors (it is used only when every operand is f32 and
/// contiguous or constant along the inner axis). Buffers: `in0, in1, ...`
/// then `out`. Returns the kernel and the dims of its scalar parameters.
pub fn map(
    prefix: &str,
    out_shape: &[Dim],
    out_elem: Scalar,
    views: &[View],
    vector: bool,
    f: &dyn Fn(&[Expr], u8) -> Expr,
) -> Result<(Kernel, Vec<Dim>), KirError> {
    let mut b = Builder::new("k");
    let mut p = Dims::new();
    let bufs: Vec<_> = views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let len = p.expr(&mut b, &v.len);
            b.buffer(&format!("in{i}"), v.elem, len, Space::Global, Access::Read)
        })
        .collect();
    let out_len = p.expr(&mut b, &Dim::product(out_shape));
    let out = b.buffer("out", out_elem, out_len, Space::Global, Access::Write);

    let mut axes = collapse(out_shape, views);
    if axes.is_empty() {
        axes.push((Dim::c(1), vec![Dim::c(0); views.len()]));
    }
    let (n_dim, inner) = axes.pop().expect("at least one axis");
    let n = p.expr(&mut b, &n_dim);
    let rows = p.expr(&mut b, &Dim::product(axes.iter().map(|(d, _)| d)));
    let outer: Vec<(Expr, Vec<Expr>)> =
        axes.iter().map(|(d, s)| (p.expr(&mut b, d), s.iter().map(|s| p.expr(&mut b, s)).collect())).collect();
    let offsets: Vec<Expr> = views.iter().map(|v| p.expr(&mut b, &v.offset)).collect();
    let inner: Vec<Expr> = inner.iter().map(|s| p.expr(&mut b, s)).collect();
    let lanes = if vector
        && out_elem == Scalar::F32
        && views.iter().all(|v| v.elem == Scalar::F32)
        && inner.iter().all(|s| matches!(s, Expr::Int(0 | 1, _)))
    {
        LANES
    } else {
        1
    };

    let nch = b.let_("nch", (n.clone() + Expr::i64(CHUNK - 1)) / Expr::i64(CHUNK));
    let tasks = rows * Expr::Var(nch);
    b.for_("t", Expr::i64(0), tasks, 1, LoopKind::Parallel, |b, t| {
        let r = b.let_("r", t.clone() / Expr::Var(nch));
        let c = b.let_("c", t % Expr::Var(nch));
        let j0 = b.let_("j0", Expr::Var(c) * Expr::i64(CHUNK));
        let j1 = b.let_("j1", (Expr::Var(j0) + Expr::i64(CHUNK)).min(n.clone()));
        // Each view's offset for this row: the row index divided into the
        // outer coordinates, innermost first.
        let mut offs: Vec<Var> = offsets.iter().map(|o| b.let_("off", o.clone())).collect();
        if !outer.is_empty() {
            let rem = b.let_("rem", Expr::Var(r));
            for (i, (d, strides)) in outer.iter().enumerate().rev() {
                let coord = if i == 0 {
                    Expr::Var(rem)
                } else {
                    let cv = b.let_("coord", Expr::Var(rem) % d.clone());
                    b.assign(rem, Expr::Var(rem) / d.clone());
                    Expr::Var(cv)
                };
                for (o, s) in offs.iter_mut().zip(strides) {
                    if !matches!(s, Expr::Int(0, _)) {
                        *o = b.let_("off", Expr::Var(*o) + coord.clone() * s.clone());
                    }
                }
            }
        }
        // Operands constant along the inner axis are loaded once per task.
        let hoisted: Vec<Option<Var>> = offs
            .iter()
            .zip(&bufs)
            .zip(&inner)
            .map(|((o, buf), s)| matches!(s, Expr::Int(0, _)).then(|| b.let_("bv", Expr::load(*buf, Expr::Var(*o), 1))))
            .collect();
        let base = b.let_("base", Expr::Var(r) * n.clone());
        sym_vec_loop(b, "j", Expr::Var(j0), Expr::Var(j1), lanes, |b, j, w| {
            let args: Vec<Expr> = (0..views.len())
                .map(|v| match (hoisted[v], &inner[v]) {
                    (Some(x), _) => super::widen(Expr::Var(x), w),
                    (None, Expr::Int(1, _)) => Expr::load(bufs[v], Expr::Var(offs[v]) + j.clone(), w),
                    (None, s) => Expr::load(bufs[v], Expr::Var(offs[v]) + j.clone() * s.clone(), w),
                })
                .collect();
            b.store(out, Expr::Var(base) + j, f(&args, w));
        });
    });
    Ok((finish_named(b, prefix)?, p.dims))
}
