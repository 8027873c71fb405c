//! KIR, the kernel IR: a small structured imperative IR that kernel templates
//! build and that both lowerings (Cranelift for CPUs now, LLVM later) and the
//! interpreter consume.
//!
//! A [`Kernel`] has buffer parameters (element type, fixed length, address
//! space, access), scalar `i64` parameters, typed variables and a body of
//! statements. Expressions are trees; statements are structured (`for`, `if`),
//! so lowering never has to rediscover loops. Vectors are fixed width
//! (`f32x4` is what Cranelift lowers on x86-64; the type allows wider).
//!
//! Semantics that lowerings rely on:
//! - Indices are element indices (not bytes) of type `i64`; every access must
//!   be in bounds. The interpreter checks this, so template tests prove it for
//!   the shapes they run.
//! - A `Parallel` loop promises that its iterations touch disjoint output
//!   elements. On a CPU the outermost parallel loop on a path is split into
//!   contiguous chunks, one per thread of the team; inner ones run serially.
//! - Thread/block indices, barriers, shared buffers, warp shuffles and
//!   tensor-core MMAs ([`Mma`], and Hopper's warpgroup [`Wgmma`] with its
//!   ordering statements [`AsyncSync`]) are GPU concepts; the CPU lowerings
//!   reject them, the interpreter simulates them. `Wgmma` needs sm_90a: the
//!   PTX emitter refuses it for other architectures.
//! - A GPU kernel may carry an sm_90a variant ([`Kernel::sm90a`]): another
//!   body for the same entry (same global buffers, scalars and launch), which
//!   the sm_90a PTX module uses instead of the kernel's own body.

pub mod interp;
pub mod libm;
mod print;

use std::fmt;
use std::ops::{Add, Div, Mul, Neg, Rem, Sub};

/// Scalar element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    F32,
    I32,
    I64,
    Bool,
    /// Storage-only narrow floats: a load from a `BF16`/`F16` buffer gives
    /// `f32` lanes (exact widening) and a store into one takes `f32` lanes
    /// (rounded to nearest even). No expression has these types.
    BF16,
    F16,
}

impl Scalar {
    /// Size in bytes when stored in a buffer.
    pub fn size(self) -> usize {
        match self {
            Scalar::F32 | Scalar::I32 => 4,
            Scalar::I64 => 8,
            Scalar::Bool => 1,
            Scalar::BF16 | Scalar::F16 => 2,
        }
    }

    pub fn is_int(self) -> bool {
        matches!(self, Scalar::I32 | Scalar::I64)
    }

    /// A storage-only float (`BF16`, `F16`), computed as `f32`.
    pub fn is_narrow_float(self) -> bool {
        matches!(self, Scalar::BF16 | Scalar::F16)
    }

    /// The type a load from a buffer of this element type gives.
    pub fn computed(self) -> Scalar {
        if self.is_narrow_float() {
            Scalar::F32
        } else {
            self
        }
    }
}

/// A value type: a scalar (`lanes == 1`) or a fixed-width vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ty {
    pub elem: Scalar,
    pub lanes: u8,
}

impl Ty {
    pub const F32: Ty = Ty::scalar(Scalar::F32);
    pub const I32: Ty = Ty::scalar(Scalar::I32);
    pub const I64: Ty = Ty::scalar(Scalar::I64);
    pub const BOOL: Ty = Ty::scalar(Scalar::Bool);
    /// The vector type Cranelift supports on x86-64 (128-bit SIMD).
    pub const F32X4: Ty = Ty { elem: Scalar::F32, lanes: 4 };

    pub const fn scalar(elem: Scalar) -> Ty {
        Ty { elem, lanes: 1 }
    }

    pub fn is_vector(self) -> bool {
        self.lanes > 1
    }

    pub fn with_lanes(self, lanes: u8) -> Ty {
        Ty { elem: self.elem, lanes }
    }
}

/// Where a buffer lives. Shared buffers are per thread block (GPU) and are
/// allocated by the kernel itself, not passed by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
}

/// Whether the kernel may write a buffer; the safe CPU wrapper asks for
/// `&mut` slices exactly for writable buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A buffer the kernel reads or writes. `len` is in elements: an `i64`
/// expression over constants and the kernel's scalar parameters, so one
/// kernel serves every value of a symbolic size (shared buffers need a
/// constant length).
#[derive(Clone, Debug, PartialEq)]
pub struct BufDecl {
    pub name: String,
    pub elem: Scalar,
    pub len: Expr,
    pub space: Space,
    pub access: Access,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub u32);

#[derive(Clone, Debug, PartialEq)]
pub struct VarDecl {
    pub name: String,
    pub ty: Ty,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Abs,
    Exp,
    Sqrt,
    Rsqrt,
    Tanh,
    /// The libm functions `sinf`, `cosf`, `logf`, `erff` (see [`libm`]).
    Sin,
    Cos,
    Log,
    Erf,
    /// Round toward -inf, toward +inf, and to the nearest integer with ties
    /// to even.
    Floor,
    Ceil,
    Round,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    /// Float division, or integer division truncating toward zero.
    Div,
    /// Remainder with the sign of the dividend: integer `%`, or C's `fmodf`
    /// for floats.
    Rem,
    Max,
    Min,
    /// `powf` (floats only).
    Pow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Horizontal reductions of a vector to a scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedOp {
    Add,
    Max,
    Min,
}

/// Which elements an [`Expr::Load`] of `lanes` elements from `index` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pick {
    /// `index .. index + lanes`.
    All,
    /// Of the `2 * lanes` elements from `index` (all of them in the
    /// buffer), the even ones, `index + 2 * i`.
    Even,
    /// Of the `2 * lanes` elements from `index`, the odd ones,
    /// `index + 2 * i + 1`.
    Odd,
}

/// GPU launch coordinates, each along an axis 0..3 (x, y, z).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    ThreadIdx(u8),
    BlockIdx(u8),
    BlockDim(u8),
    GridDim(u8),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    F32(f32),
    /// An integer constant of type I32 or I64.
    Int(i64, Scalar),
    Bool(bool),
    Var(Var),
    Un(UnOp, Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// `a * b + c` with a single rounding.
    Fma(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Lanewise comparison; a vector comparison gives a bool vector.
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    /// Lanewise `cond ? a : b`; a scalar condition selects whole vectors.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Numeric conversion between scalar types (float to int truncates).
    Cast(Scalar, Box<Expr>),
    /// A scalar broadcast to every lane.
    Splat(u8, Box<Expr>),
    Extract(Box<Expr>, u8),
    HReduce(RedOp, Box<Expr>),
    /// The sums of `n` f32 vectors of `n` lanes each (`n` a power of two),
    /// as one vector: lane `i` is the sum of vector `i`'s lanes, added in
    /// the order of [`hsums`]. A tree of shuffles and adds computes all
    /// of them in `n - 1` steps of two shuffles and an add, where
    /// reducing each vector alone takes `log2(n)` dependent steps apiece.
    HSums(Vec<Expr>),
    /// `lanes` elements from element `index` on, as `pick` says:
    /// consecutive ones, or every other one of `2 * lanes` (see [`Pick`]).
    Load {
        buf: BufId,
        index: Box<Expr>,
        lanes: u8,
        pick: Pick,
    },
    Special(Special),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopKind {
    Serial,
    /// Iterations are independent and write disjoint elements; split over
    /// the CPU thread team (see the module docs).
    Parallel,
    /// A hint to unroll by this factor; lowerings may ignore it.
    Unroll(u32),
    /// The body already uses vectors of this width; recorded for printing
    /// and for lowerings that widen later.
    Vectorized(u8),
}

/// Warp shuffle flavours (CUDA `__shfl_*_sync`), within a warp of 32 lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShuffleKind {
    /// Read from lane `lane ^ arg`.
    Xor,
    /// Read from lane `lane + arg` (own value when out of the warp).
    Down,
    /// Read from lane `arg`.
    Idx,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Loop {
    pub var: Var,
    pub start: Expr,
    /// Evaluated once, before the first iteration.
    pub end: Expr,
    pub step: i64,
    pub kind: LoopKind,
    pub body: Vec<Stmt>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Assign(Var, Expr),
    Store {
        buf: BufId,
        index: Expr,
        value: Expr,
    },
    For(Loop),
    If {
        cond: Expr,
        then: Vec<Stmt>,
        els: Vec<Stmt>,
    },
    /// Block-wide barrier (`__syncthreads`): every thread of the block must
    /// reach the same barrier.
    Barrier,
    /// `dst = value` read from another lane of the warp. A statement, not an
    /// expression, because it synchronises the lanes.
    Shuffle {
        dst: Var,
        kind: ShuffleKind,
        value: Expr,
        arg: Expr,
    },
    /// One warp-wide tensor-core matrix multiply-accumulate (see [`Mma`]).
    /// Boxed: it is far larger than the other statements.
    Mma(Box<Mma>),
    /// A hint that element `index` of the global buffer `buf` is read soon,
    /// once: the host LLVM lowering emits a non-temporal prefetch of its
    /// cache line (x86 `prefetchnta`), the other lowerings and the
    /// interpreter nothing. It reads and writes no data,
    /// so `index` may lie outside the buffer (a stream's last prefetches
    /// point past its end, a gated weight tile's first prefetches into the
    /// other weight a few elements before its start), and it never changes
    /// a result.
    Prefetch {
        buf: BufId,
        index: Expr,
    },
    /// One warpgroup-wide Hopper MMA from shared memory (see [`Wgmma`]).
    Wgmma(Box<Wgmma>),
    /// An ordering point of the asynchronous proxy (see [`AsyncSync`]).
    Async(AsyncSync),
}

/// `D = A · B + D` for one `64 x N x 16` tile, computed collectively by the
/// 128 threads of a warpgroup (four consecutive warps, the first a multiple
/// of 4) as PTX `wgmma.mma_async.sync.aligned.m64nNk16.f32.T.T` with `T` =
/// `bf16` or `f16`, both operands K-major in shared memory, no swizzling.
///
/// `A` is `64 x 16` (rows `m`, columns `k`) and `B` is `16 x N` stored as
/// its transpose, `N x 16` (rows `n`, columns `k`): a `[n, k]` weight tile.
/// Each is read through a matrix descriptor ([`SmemMatrix`]) in the
/// "interleave" layout of 8 x 8 core matrices (8 rows of 16 bytes,
/// contiguous): element `(r, c)` is at byte
/// `start + (r / 8) sbo + (c / 8) lbo + (r % 8) 16 + (c % 8) 2`, so `lbo` steps between the two core matrices
/// along `k` and `sbo` between those along `m` (or `n`).
///
/// `D` is `64 x N` in `f32`, `N / 2` registers per thread, as the PTX ISA
/// lays it out ("WGMMA .m64nNk16 register fragment layout for accumulator
/// matrix D"): with `w` the thread's warp within the warpgroup, `g = lane /
/// 4` and `t = lane % 4`, register `i` holds `D[16 w + g + 8 ((i / 2) % 2)][8
/// (i / 4) + 2 t + i % 2]`. The statement reads and writes its `d`
/// variables (it always accumulates; start from zeros).
///
/// The instruction is asynchronous, and so is its contract: a
/// [`AsyncSync::WgmmaFence`] must come before the first `Wgmma` of a batch,
/// the batch is closed by [`AsyncSync::WgmmaCommit`], and its `d` variables
/// may be read, and its shared buffers stored to, only after an
/// [`AsyncSync::WgmmaWait`] retired the group. Generic stores into the
/// shared tiles must be followed by [`AsyncSync::ProxyFenceShared`] (by the
/// storing thread, before the barrier that publishes them). The interpreter
/// checks all of this, and that every thread of the warpgroup runs the
/// statement with the same descriptors; it computes the product at issue.
/// Precision as for [`Mma`]: the interpreter sums the exact products and `D`
/// in f64 and rounds once.
#[derive(Clone, Debug, PartialEq)]
pub struct Wgmma {
    /// The multiplicands' element type: `BF16` or `F16`.
    pub elem: Scalar,
    /// `N`: a multiple of 8 in `8..=256`.
    pub n: u32,
    /// `N / 2` f32 variables: this thread's fragment of `D`.
    pub d: Vec<Var>,
    pub a: SmemMatrix,
    pub b: SmemMatrix,
}

/// A K-major matrix in shared memory, as a wgmma matrix descriptor without
/// swizzling names it (see [`Wgmma`] for the addressing).
#[derive(Clone, Debug, PartialEq)]
pub struct SmemMatrix {
    /// A shared buffer of the MMA's element type.
    pub buf: BufId,
    /// The element index of `(0, 0)`: an `i64` expression, uniform over the
    /// warpgroup, 16-byte aligned.
    pub start: Expr,
    /// Leading-dimension byte offset: between core matrices along `k`.
    pub lbo: u32,
    /// Stride-dimension byte offset: between core matrices along `m`/`n`.
    pub sbo: u32,
}

impl SmemMatrix {
    /// The element offset from `start` of `(r, c)` (2-byte elements).
    pub fn offset(&self, r: usize, c: usize) -> usize {
        (r / 8) * (self.sbo as usize / 2) + (c / 8) * (self.lbo as usize / 2) + (r % 8) * 8 + c % 8
    }
}

impl Wgmma {
    /// The descriptors' start expressions (`A`'s, then `B`'s).
    pub fn exprs(&self) -> impl Iterator<Item = &Expr> {
        [&self.a.start, &self.b.start].into_iter()
    }

    /// The row and column of `D` that register `i` of thread `tid` (within
    /// the warpgroup, `0..128`) holds.
    pub fn d_cell(tid: usize, i: usize) -> (usize, usize) {
        let (w, lane) = (tid / 32, tid % 32);
        let (g, t) = (lane / 4, lane % 4);
        (16 * w + g + 8 * ((i / 2) % 2), 8 * (i / 4) + 2 * t + i % 2)
    }
}

/// Ordering statements of Hopper's asynchronous proxy, executed by every
/// thread of a warpgroup (see [`Wgmma`] for the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncSync {
    /// `wgmma.fence.sync.aligned`: register and shared-memory accesses
    /// before it are ordered before the `Wgmma`s after it.
    WgmmaFence,
    /// `wgmma.commit_group.sync.aligned`: the `Wgmma`s issued since the last
    /// commit form a group.
    WgmmaCommit,
    /// `wgmma.wait_group.sync.aligned N`: waits until at most `N` committed
    /// groups are pending.
    WgmmaWait(u8),
    /// `fence.proxy.async.shared::cta`: this thread's generic-proxy accesses
    /// to shared memory are ordered before later async-proxy (wgmma) ones.
    ProxyFenceShared,
}

/// `D = A · B + C` for one `16 x 8 x 16` tile, computed collectively by the
/// 32 lanes of a warp (PTX `mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32`
/// with `T` = `bf16` or `f16`): `A` is `16 x 16` (rows `m`, columns `k`),
/// `B` is `16 x 8` (`k` by `n`), `C` and `D` are `16 x 8` in `f32`.
///
/// Each lane holds a fragment of every matrix, as the PTX ISA lays them out
/// ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
/// `g = lane / 4` and `t = lane % 4`:
/// - `A`: four registers of two consecutive-`k` elements; register `j`
///   holds `A[g + 8 (j % 2)][2t + 8 (j / 2) + {0, 1}]`;
/// - `B`: two registers of two consecutive-`k` elements; register `j`
///   holds `B[2t + 8j + {0, 1}][g]`;
/// - `C`, `D`: four `f32`; element `i` is `[g + 8 (i / 2)][2t + i % 2]`.
///
/// A register of `A` or `B` is read from memory: the elements `at` and
/// `at + 1` of its buffer, whose element type must be `elem`, with `at`
/// even (a 4-byte aligned pair). So the statement is a fragment load and
/// the MMA at once; a template that reuses a fragment repeats the index
/// and the lowering's CSE merges the loads (the MMA touches no memory).
/// `C` is four `f32` expressions and `D` four `f32` variables.
///
/// Every lane of the warp must execute the statement with the warp's 32
/// threads present (the interpreter checks both; the hardware hangs or
/// gives undefined results). Precision: products are exact (bf16 and f16
/// have at most 11 significant bits); the interpreter adds them and `C` in
/// f64 and rounds once to f32, while tensor cores sum in their own order
/// with their own internal rounding, so the two agree to a few f32 ulps
/// of the sum of the terms' magnitudes, not bitwise.
#[derive(Clone, Debug, PartialEq)]
pub struct Mma {
    /// The multiplicands' element type: `BF16` or `F16`.
    pub elem: Scalar,
    pub d: [Var; 4],
    pub a: BufId,
    pub a_at: [Expr; 4],
    pub b: BufId,
    pub b_at: [Expr; 2],
    pub c: [Expr; 4],
}

impl Mma {
    /// Every expression of the statement: `A`'s indices, `B`'s, then `C`.
    pub fn exprs(&self) -> impl Iterator<Item = &Expr> {
        self.a_at.iter().chain(&self.b_at).chain(&self.c)
    }
}

/// A complete kernel. Build one with [`Builder`].
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub buffers: Vec<BufDecl>,
    /// Scalar `i64` parameters, in call order.
    pub scalars: Vec<Var>,
    pub vars: Vec<VarDecl>,
    pub body: Vec<Stmt>,
    /// How a GPU kernel is launched; `None` for CPU kernels.
    pub gpu: Option<GpuLaunch>,
    /// Another body for sm_90a (for example wgmma where this one uses
    /// `mma.sync`): the same global buffers, scalars and launch, its own
    /// shared buffers, variables and statements; its name is ignored (the
    /// entry keeps this kernel's). `emit_ptx` lowers it instead of this
    /// kernel for `GpuArch::Sm90a`; the interpreter and other modules run
    /// this kernel. Set it with [`Builder::set_sm90a`].
    pub sm90a: Option<Box<Kernel>>,
}

/// The launch shape of a GPU kernel: a fixed block and a grid whose sizes
/// are `i64` expressions over constants and the kernel's scalar parameters
/// (like buffer lengths), so one kernel serves every symbolic size.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuLaunch {
    pub block: [u32; 3],
    pub grid: [Expr; 3],
    /// The kernel promises that every vector access starts at an element
    /// index that is a multiple of its lane count (so, with 16-byte aligned
    /// buffers, at an address aligned to its size), which lets the GPU
    /// lowering emit 16-byte loads. Kernels made from CPU ones (`gpuize`)
    /// do not promise it, and their vector accesses are split.
    pub aligned_vectors: bool,
    /// At least this many blocks should fit on a multiprocessor at once
    /// (CUDA's second `__launch_bounds__` argument). Without it `ptxas`
    /// picks its own register budget for the block size and may spill to
    /// keep more blocks resident; a kernel that wants its registers (a
    /// compute-bound one with tiles in registers) asks for 1.
    pub min_blocks_per_sm: Option<u32>,
}

impl Kernel {
    /// The grid for the given scalar arguments (in `scalars` order).
    pub fn grid(&self, scalars: &[i64]) -> Option<Result<[usize; 3], String>> {
        let g = self.gpu.as_ref()?;
        let eval = |e: &Expr| eval_len(e, &|v| self.scalars.iter().position(|s| *s == v).map(|i| scalars[i]));
        Some((|| Ok([eval(&g.grid[0])?, eval(&g.grid[1])?, eval(&g.grid[2])?]))())
    }
}

/// A kernel that failed type checking; `at` is the printed statement.
#[derive(Debug, thiserror::Error)]
#[error("kernel `{kernel}`: {message}\n  in: {at}")]
pub struct KirError {
    pub kernel: String,
    pub message: String,
    pub at: String,
}

impl Kernel {
    pub fn var(&self, v: Var) -> &VarDecl {
        &self.vars[v.0 as usize]
    }

    pub fn buf(&self, b: BufId) -> &BufDecl {
        &self.buffers[b.0 as usize]
    }

    /// The global buffers, in the order callers pass them.
    pub fn global_buffers(&self) -> impl Iterator<Item = (BufId, &BufDecl)> {
        self.buffers.iter().enumerate().filter(|(_, b)| b.space == Space::Global).map(|(i, b)| (BufId(i as u32), b))
    }

    /// Whether the kernel uses GPU-only constructs.
    pub fn uses_gpu_features(&self) -> bool {
        fn expr(e: &Expr) -> bool {
            let mut found = false;
            e.visit(&mut |e| found |= matches!(e, Expr::Special(_)));
            found
        }
        fn stmts(s: &[Stmt]) -> bool {
            s.iter().any(|s| match s {
                Stmt::Barrier | Stmt::Shuffle { .. } | Stmt::Mma(_) | Stmt::Wgmma(_) | Stmt::Async(_) => true,
                Stmt::Assign(_, e) => expr(e),
                Stmt::Store { index, value, .. } => expr(index) || expr(value),
                Stmt::Prefetch { index, .. } => expr(index),
                Stmt::For(l) => expr(&l.start) || expr(&l.end) || stmts(&l.body),
                Stmt::If { cond, then, els } => expr(cond) || stmts(then) || stmts(els),
            })
        }
        self.buffers.iter().any(|b| b.space == Space::Shared) || stmts(&self.body)
    }

    /// The type of an expression, or why it is ill-typed.
    pub fn type_of(&self, e: &Expr) -> Result<Ty, String> {
        let same = |a: Ty, b: Ty, what: &str| {
            if a == b {
                Ok(a)
            } else {
                Err(format!("{what}: operand types differ ({} vs {})", print::ty(a), print::ty(b)))
            }
        };
        Ok(match e {
            Expr::F32(_) => Ty::F32,
            Expr::Int(_, s) => {
                if !s.is_int() {
                    return Err("integer constant of a non-integer type".into());
                }
                Ty::scalar(*s)
            }
            Expr::Bool(_) => Ty::BOOL,
            Expr::Var(v) => self.vars.get(v.0 as usize).ok_or("unknown variable")?.ty,
            Expr::Un(op, a) => {
                let t = self.type_of(a)?;
                let float_only = !matches!(op, UnOp::Neg | UnOp::Abs);
                if t.elem == Scalar::Bool || (float_only && t.elem != Scalar::F32) {
                    return Err(format!("{op:?} of {}", print::ty(t)));
                }
                t
            }
            Expr::Bin(op, a, b) => {
                let t = same(self.type_of(a)?, self.type_of(b)?, &format!("{op:?}"))?;
                if t.elem == Scalar::Bool || (*op == BinOp::Pow && t.elem != Scalar::F32) {
                    return Err(format!("{op:?} of {}", print::ty(t)));
                }
                t
            }
            Expr::Fma(a, b, c) => {
                let t = same(self.type_of(a)?, self.type_of(b)?, "fma")?;
                let t = same(t, self.type_of(c)?, "fma")?;
                if t.elem != Scalar::F32 {
                    return Err("fma of non-f32".into());
                }
                t
            }
            Expr::Cmp(_, a, b) => same(self.type_of(a)?, self.type_of(b)?, "compare")?.with_bool(),
            Expr::Select(c, a, b) => {
                let tc = self.type_of(c)?;
                let t = same(self.type_of(a)?, self.type_of(b)?, "select")?;
                if tc.elem != Scalar::Bool || (tc.lanes != 1 && tc.lanes != t.lanes) {
                    return Err(format!("select condition of type {}", print::ty(tc)));
                }
                t
            }
            Expr::Cast(s, a) => {
                let t = self.type_of(a)?;
                if t.is_vector() {
                    return Err("cast of a vector".into());
                }
                if s.is_narrow_float() {
                    return Err(format!("cast to storage-only {s:?}"));
                }
                Ty::scalar(*s)
            }
            Expr::Splat(n, a) => {
                let t = self.type_of(a)?;
                if t.is_vector() || *n < 2 {
                    return Err("splat needs a scalar and at least 2 lanes".into());
                }
                t.with_lanes(*n)
            }
            Expr::Extract(a, i) => {
                let t = self.type_of(a)?;
                if *i >= t.lanes {
                    return Err(format!("extract lane {i} of {}", print::ty(t)));
                }
                t.with_lanes(1)
            }
            Expr::HReduce(_, a) => {
                let t = self.type_of(a)?;
                if !t.is_vector() || t.elem != Scalar::F32 {
                    return Err(format!("horizontal reduction of {}", print::ty(t)));
                }
                t.with_lanes(1)
            }
            Expr::HSums(vs) => {
                let n = vs.len();
                let want = Ty::scalar(Scalar::F32).with_lanes(n.min(255) as u8);
                if n < 2 || !n.is_power_of_two() || n > 64 {
                    return Err(format!("sums of {n} vectors (a power of two from 2 to 64)"));
                }
                for v in vs {
                    let t = self.type_of(v)?;
                    if t != want {
                        return Err(format!(
                            "sums of {n} vectors, one of them {}, not {}",
                            print::ty(t),
                            print::ty(want)
                        ));
                    }
                }
                want
            }
            Expr::Load { buf, index, lanes, pick } => {
                let b = self.buffers.get(buf.0 as usize).ok_or("unknown buffer")?;
                if self.type_of(index)? != Ty::I64 {
                    return Err(format!("index into `{}` is not i64", b.name));
                }
                if *lanes > 1 && b.elem.computed() != Scalar::F32 {
                    return Err(format!("vector load from non-float buffer `{}`", b.name));
                }
                // Pairs of 16-bit elements are one 32-bit word, which is
                // how the host lowerings read them.
                if *pick != Pick::All && !b.elem.is_narrow_float() {
                    return Err(format!("{pick:?} elements of `{}`, which does not hold 16-bit floats", b.name));
                }
                Ty::scalar(b.elem.computed()).with_lanes(*lanes)
            }
            Expr::Special(_) => Ty::I64,
        })
    }

    /// Type-checks every buffer length and every statement.
    pub fn verify(&self) -> Result<(), KirError> {
        for b in &self.buffers {
            let err = |message: String| KirError {
                kernel: self.name.clone(),
                message: format!("length of buffer `{}`: {message}", b.name),
                at: print::expr(self, &b.len),
            };
            if self.type_of(&b.len).map_err(err)? != Ty::I64 {
                return Err(err("is not i64".into()));
            }
            let mut bad = None;
            b.len.visit(&mut |e| match e {
                Expr::Var(v) if !self.scalars.contains(v) => {
                    bad = Some("uses a variable that is not a scalar parameter")
                }
                Expr::Load { .. } | Expr::Special(_) => bad = Some("reads memory or launch coordinates"),
                _ => {}
            });
            if let Some(m) = bad {
                return Err(err(m.into()));
            }
            if b.space == Space::Shared && self.const_len(b).is_none() {
                return Err(err("shared buffers need a constant length".into()));
            }
        }
        if let Some(g) = &self.gpu {
            for e in &g.grid {
                let err = |message: String| KirError {
                    kernel: self.name.clone(),
                    message: format!("grid size: {message}"),
                    at: print::expr(self, e),
                };
                if self.type_of(e).map_err(err)? != Ty::I64 {
                    return Err(err("is not i64".into()));
                }
                let mut bad = false;
                e.visit(&mut |e| {
                    bad |= matches!(e, Expr::Load { .. } | Expr::Special(_))
                        || matches!(e, Expr::Var(v) if !self.scalars.contains(v))
                });
                if bad {
                    return Err(err("may use only constants and scalar parameters".into()));
                }
            }
            let threads: u64 = g.block.iter().map(|&d| d as u64).product();
            if threads == 0 || threads > 1024 {
                return Err(KirError {
                    kernel: self.name.clone(),
                    message: format!("block of {threads} threads (1..=1024 allowed)"),
                    at: format!("{:?}", g.block),
                });
            }
        }
        self.verify_stmts(&self.body)?;
        if let Some(v) = &self.sm90a {
            self.verify_variant(v)?;
        }
        Ok(())
    }

    /// A buffer's length when it does not depend on scalar parameters.
    pub fn const_len(&self, b: &BufDecl) -> Option<usize> {
        eval_len(&b.len, &|_| None).ok()
    }

    /// A buffer's length for the given scalar arguments (in `scalars`
    /// order), or why it has none (wrong arity, negative, overflow).
    pub fn buffer_len(&self, b: &BufDecl, scalars: &[i64]) -> Result<usize, String> {
        if scalars.len() != self.scalars.len() {
            return Err(format!("expected {} scalar arguments, found {}", self.scalars.len(), scalars.len()));
        }
        eval_len(&b.len, &|v| self.scalars.iter().position(|s| *s == v).map(|i| scalars[i]))
    }

    fn verify_stmts(&self, stmts: &[Stmt]) -> Result<(), KirError> {
        for s in stmts {
            let err = |message: String| KirError { kernel: self.name.clone(), message, at: print::stmt_line(self, s) };
            match s {
                Stmt::Assign(v, e) => {
                    let t = self.type_of(e).map_err(err)?;
                    let want = self.var(*v).ty;
                    if t != want {
                        return Err(err(format!("assigns {} to a {} variable", print::ty(t), print::ty(want))));
                    }
                }
                Stmt::Store { buf, index, value } => {
                    let b = self.buf(*buf);
                    if b.access == Access::Read {
                        return Err(err(format!("store to read-only buffer `{}`", b.name)));
                    }
                    if self.type_of(index).map_err(err)? != Ty::I64 {
                        return Err(err("store index is not i64".into()));
                    }
                    let t = self.type_of(value).map_err(err)?;
                    if t.elem != b.elem.computed() {
                        return Err(err(format!("stores {} into `{}`", print::ty(t), b.name)));
                    }
                }
                Stmt::For(l) => {
                    for e in [&l.start, &l.end] {
                        if self.type_of(e).map_err(err)? != Ty::I64 {
                            return Err(err("loop bounds must be i64".into()));
                        }
                    }
                    if self.var(l.var).ty != Ty::I64 || l.step <= 0 {
                        return Err(err("loop variable must be i64 with a positive step".into()));
                    }
                    self.verify_stmts(&l.body)?;
                }
                Stmt::If { cond, then, els } => {
                    if self.type_of(cond).map_err(err)? != Ty::BOOL {
                        return Err(err("if condition is not bool".into()));
                    }
                    self.verify_stmts(then)?;
                    self.verify_stmts(els)?;
                }
                Stmt::Barrier => {}
                Stmt::Shuffle { dst, value, arg, .. } => {
                    let t = self.type_of(value).map_err(err)?;
                    if t != self.var(*dst).ty || t.is_vector() || self.type_of(arg).map_err(err)? != Ty::I64 {
                        return Err(err("shuffle of mismatched types".into()));
                    }
                }
                Stmt::Mma(m) => self.verify_mma(m).map_err(err)?,
                Stmt::Prefetch { buf, index } => {
                    if self.buffers.get(buf.0 as usize).is_none_or(|b| b.space != Space::Global) {
                        return Err(err("prefetch of a buffer that is not global".into()));
                    }
                    if self.type_of(index).map_err(err)? != Ty::I64 {
                        return Err(err("prefetch index must be i64".into()));
                    }
                }
                Stmt::Wgmma(w) => self.verify_wgmma(w).map_err(err)?,
                Stmt::Async(_) => {}
            }
        }
        Ok(())
    }
}

impl Kernel {
    fn verify_mma(&self, m: &Mma) -> Result<(), String> {
        if !m.elem.is_narrow_float() {
            return Err(format!("mma of {:?} (bf16 or f16 expected)", m.elem));
        }
        for (buf, what) in [(m.a, "A"), (m.b, "B")] {
            let d = self.buffers.get(buf.0 as usize).ok_or("unknown buffer")?;
            if d.elem != m.elem {
                return Err(format!("mma {what} from `{}` of {:?}, not {:?}", d.name, d.elem, m.elem));
            }
        }
        for e in m.a_at.iter().chain(&m.b_at) {
            if self.type_of(e)? != Ty::I64 {
                return Err("mma fragment index is not i64".into());
            }
        }
        for e in &m.c {
            if self.type_of(e)? != Ty::F32 {
                return Err("mma accumulator C is not f32".into());
            }
        }
        if m.d.iter().any(|v| self.vars.get(v.0 as usize).map(|d| d.ty) != Some(Ty::F32)) {
            return Err("mma result D must be four f32 variables".into());
        }
        Ok(())
    }
}

impl Kernel {
    fn verify_wgmma(&self, w: &Wgmma) -> Result<(), String> {
        if !w.elem.is_narrow_float() {
            return Err(format!("wgmma of {:?} (bf16 or f16 expected)", w.elem));
        }
        if !(8..=256).contains(&w.n) || !w.n.is_multiple_of(8) {
            return Err(format!("wgmma with N = {} (a multiple of 8 in 8..=256 expected)", w.n));
        }
        if w.d.len() != w.n as usize / 2
            || w.d.iter().any(|v| self.vars.get(v.0 as usize).map(|d| d.ty) != Some(Ty::F32))
        {
            return Err(format!("wgmma m64n{}k16 needs {} f32 accumulator variables", w.n, w.n / 2));
        }
        for (m, what) in [(&w.a, "A"), (&w.b, "B")] {
            let d = self.buffers.get(m.buf.0 as usize).ok_or("unknown buffer")?;
            if d.elem != w.elem || d.space != Space::Shared {
                return Err(format!(
                    "wgmma {what} from `{}` ({:?}, {:?}): a shared {:?} buffer expected",
                    d.name, d.space, d.elem, w.elem
                ));
            }
            if self.type_of(&m.start)? != Ty::I64 {
                return Err(format!("wgmma {what} start is not i64"));
            }
            for (off, name) in [(m.lbo, "leading"), (m.sbo, "stride")] {
                if !off.is_multiple_of(16) || off >= 1 << 18 {
                    return Err(format!(
                        "wgmma {what} {name} byte offset {off} (a multiple of 16 below 2^18 expected)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the kernel's own body uses sm_90a-only statements (wgmma).
    pub fn uses_wgmma(&self) -> bool {
        fn stmts(s: &[Stmt]) -> bool {
            s.iter().any(|s| match s {
                Stmt::Wgmma(_) | Stmt::Async(_) => true,
                Stmt::For(l) => stmts(&l.body),
                Stmt::If { then, els, .. } => stmts(then) || stmts(els),
                _ => false,
            })
        }
        stmts(&self.body)
    }

    /// The kernel to lower for sm_90a: the [`Kernel::sm90a`] variant under
    /// this kernel's name, or this kernel.
    pub fn for_sm90a(&self) -> std::borrow::Cow<'_, Kernel> {
        match &self.sm90a {
            Some(v) => std::borrow::Cow::Owned(Kernel { name: self.name.clone(), sm90a: None, ..(**v).clone() }),
            None => std::borrow::Cow::Borrowed(self),
        }
    }

    /// Checks that `v` can stand in for this kernel on sm_90a.
    fn verify_variant(&self, v: &Kernel) -> Result<(), KirError> {
        let err = |message: String| KirError { kernel: self.name.clone(), message, at: "sm_90a variant".into() };
        if v.sm90a.is_some() {
            return Err(err("an sm_90a variant has a variant of its own".into()));
        }
        let globals = |k: &Kernel| k.global_buffers().map(|(_, d)| d.clone()).collect::<Vec<_>>();
        if globals(self) != globals(v) {
            return Err(err("the sm_90a variant's global buffers differ".into()));
        }
        if self.scalars.len() != v.scalars.len()
            || self.scalars.iter().zip(&v.scalars).any(|(a, b)| self.var(*a).name != v.var(*b).name)
        {
            return Err(err("the sm_90a variant's scalar parameters differ".into()));
        }
        if self.gpu.is_none() || self.gpu != v.gpu {
            return Err(err("the sm_90a variant's launch differs (or the kernel is not a GPU kernel)".into()));
        }
        v.verify()
    }
}

impl Ty {
    fn with_bool(self) -> Ty {
        Ty { elem: Scalar::Bool, lanes: self.lanes }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&print::kernel(self))
    }
}

// ----- expression construction -----

impl Expr {
    pub fn f32(x: f32) -> Expr {
        Expr::F32(x)
    }

    pub fn i64(x: i64) -> Expr {
        Expr::Int(x, Scalar::I64)
    }

    pub fn idx(x: usize) -> Expr {
        Expr::Int(x as i64, Scalar::I64)
    }

    pub fn un(self, op: UnOp) -> Expr {
        Expr::Un(op, Box::new(self))
    }

    pub fn exp(self) -> Expr {
        self.un(UnOp::Exp)
    }

    pub fn sqrt(self) -> Expr {
        self.un(UnOp::Sqrt)
    }

    pub fn rsqrt(self) -> Expr {
        self.un(UnOp::Rsqrt)
    }

    pub fn tanh(self) -> Expr {
        self.un(UnOp::Tanh)
    }

    pub fn bin(self, op: BinOp, o: Expr) -> Expr {
        Expr::Bin(op, Box::new(self), Box::new(o))
    }

    pub fn max(self, o: Expr) -> Expr {
        self.bin(BinOp::Max, o)
    }

    pub fn min(self, o: Expr) -> Expr {
        self.bin(BinOp::Min, o)
    }

    /// `self * b + c`.
    pub fn fma(self, b: Expr, c: Expr) -> Expr {
        Expr::Fma(Box::new(self), Box::new(b), Box::new(c))
    }

    pub fn cmp(self, op: CmpOp, o: Expr) -> Expr {
        Expr::Cmp(op, Box::new(self), Box::new(o))
    }

    pub fn lt(self, o: Expr) -> Expr {
        self.cmp(CmpOp::Lt, o)
    }

    pub fn select(cond: Expr, a: Expr, b: Expr) -> Expr {
        Expr::Select(Box::new(cond), Box::new(a), Box::new(b))
    }

    pub fn cast(self, s: Scalar) -> Expr {
        Expr::Cast(s, Box::new(self))
    }

    pub fn splat(self, lanes: u8) -> Expr {
        Expr::Splat(lanes, Box::new(self))
    }

    pub fn hreduce(self, op: RedOp) -> Expr {
        Expr::HReduce(op, Box::new(self))
    }

    pub fn load(buf: BufId, index: Expr, lanes: u8) -> Expr {
        Expr::Load { buf, index: Box::new(index), lanes, pick: Pick::All }
    }

    /// The even or odd elements of the `2 * lanes` from `index` (see
    /// [`Pick`]).
    pub fn load_pick(buf: BufId, index: Expr, lanes: u8, pick: Pick) -> Expr {
        Expr::Load { buf, index: Box::new(index), lanes, pick }
    }

    /// Calls `f` on this expression and every subexpression.
    pub fn visit(&self, f: &mut impl FnMut(&Expr)) {
        f(self);
        match self {
            Expr::F32(_) | Expr::Int(..) | Expr::Bool(_) | Expr::Var(_) | Expr::Special(_) => {}
            Expr::Un(_, a) | Expr::Cast(_, a) | Expr::Splat(_, a) | Expr::Extract(a, _) | Expr::HReduce(_, a) => {
                a.visit(f)
            }
            Expr::Load { index, .. } => index.visit(f),
            Expr::HSums(vs) => vs.iter().for_each(|v| v.visit(f)),
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
                a.visit(f);
                b.visit(f);
                c.visit(f);
            }
        }
    }
}

macro_rules! arith {
    ($tr:ident, $m:ident, $op:ident) => {
        impl $tr for Expr {
            type Output = Expr;
            fn $m(self, o: Expr) -> Expr {
                self.bin(BinOp::$op, o)
            }
        }
    };
}
arith!(Add, add, Add);
arith!(Sub, sub, Sub);
arith!(Mul, mul, Mul);
arith!(Div, div, Div);
arith!(Rem, rem, Rem);

impl Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.un(UnOp::Neg)
    }
}

impl From<usize> for Expr {
    fn from(x: usize) -> Expr {
        Expr::idx(x)
    }
}

impl From<Var> for Expr {
    fn from(v: Var) -> Expr {
        Expr::Var(v)
    }
}

/// Evaluates a length expression (integers, scalar parameters, arithmetic)
/// with checked arithmetic; `arg` gives a parameter's value.
fn eval_len(e: &Expr, arg: &dyn Fn(Var) -> Option<i64>) -> Result<usize, String> {
    fn go(e: &Expr, arg: &dyn Fn(Var) -> Option<i64>) -> Result<i64, String> {
        let overflow = || "overflows i64".to_string();
        Ok(match e {
            Expr::Int(x, _) => *x,
            Expr::Var(v) => arg(*v).ok_or("depends on a scalar parameter")?,
            Expr::Cast(_, a) => go(a, arg)?,
            Expr::Bin(op, a, b) => {
                let (a, b) = (go(a, arg)?, go(b, arg)?);
                match op {
                    BinOp::Add => a.checked_add(b).ok_or_else(overflow)?,
                    BinOp::Sub => a.checked_sub(b).ok_or_else(overflow)?,
                    BinOp::Mul => a.checked_mul(b).ok_or_else(overflow)?,
                    BinOp::Div => a.checked_div(b).ok_or("divides by zero")?,
                    BinOp::Rem => a.checked_rem(b).ok_or("divides by zero")?,
                    BinOp::Max => a.max(b),
                    BinOp::Min => a.min(b),
                    BinOp::Pow => return Err("unsupported in a length: pow".into()),
                }
            }
            other => return Err(format!("unsupported in a length: {other:?}")),
        })
    }
    let n = go(e, arg)?;
    usize::try_from(n).map_err(|_| format!("is negative ({n})"))
}

// ----- kernel construction -----

/// Builds a kernel statement by statement; nested bodies are closures.
pub struct Builder {
    kernel: Kernel,
    stack: Vec<Vec<Stmt>>,
    sm90a: Option<Box<Builder>>,
}

impl Builder {
    pub fn new(name: &str) -> Builder {
        Builder {
            kernel: Kernel {
                name: name.to_string(),
                buffers: vec![],
                scalars: vec![],
                vars: vec![],
                body: vec![],
                gpu: None,
                sm90a: None,
            },
            stack: vec![vec![]],
            sm90a: None,
        }
    }

    /// A copy of this builder as it stands (declarations and statements so
    /// far), without its sm_90a variant: where a template starts building
    /// another body for the same kernel.
    pub fn fork(&self) -> Builder {
        Builder { kernel: Kernel { sm90a: None, ..self.kernel.clone() }, stack: self.stack.clone(), sm90a: None }
    }

    /// Makes `variant` (built from a [`Builder::fork`] of this builder) the
    /// kernel's [`Kernel::sm90a`] body; [`Builder::finish`] finishes and
    /// checks it.
    pub fn set_sm90a(&mut self, variant: Builder) {
        self.sm90a = Some(Box::new(variant));
    }

    /// A warpgroup-wide Hopper MMA (see [`Wgmma`]).
    pub fn wgmma(&mut self, w: Wgmma) {
        self.push(Stmt::Wgmma(Box::new(w)));
    }

    /// An ordering statement of the asynchronous proxy (see [`AsyncSync`]).
    pub fn async_sync(&mut self, s: AsyncSync) {
        self.push(Stmt::Async(s));
    }

    pub fn buffer(&mut self, name: &str, elem: Scalar, len: impl Into<Expr>, space: Space, access: Access) -> BufId {
        self.kernel.buffers.push(BufDecl { name: name.to_string(), elem, len: len.into(), space, access });
        BufId(self.kernel.buffers.len() as u32 - 1)
    }

    /// A global f32 input.
    pub fn input(&mut self, name: &str, len: impl Into<Expr>) -> BufId {
        self.buffer(name, Scalar::F32, len, Space::Global, Access::Read)
    }

    /// A global f32 output.
    pub fn output(&mut self, name: &str, len: impl Into<Expr>) -> BufId {
        self.buffer(name, Scalar::F32, len, Space::Global, Access::Write)
    }

    /// A scalar `i64` parameter.
    pub fn scalar_param(&mut self, name: &str) -> Expr {
        let v = self.var(name, Ty::I64);
        self.kernel.scalars.push(v);
        Expr::Var(v)
    }

    /// Declares a variable without assigning it.
    pub fn var(&mut self, name: &str, ty: Ty) -> Var {
        self.kernel.vars.push(VarDecl { name: name.to_string(), ty });
        Var(self.kernel.vars.len() as u32 - 1)
    }

    /// Declares a variable typed by its initial value and assigns it.
    pub fn let_(&mut self, name: &str, init: Expr) -> Var {
        let ty = self.kernel.type_of(&init).unwrap_or_else(|e| panic!("let {name}: {e}"));
        let v = self.var(name, ty);
        self.assign(v, init);
        v
    }

    pub fn assign(&mut self, v: Var, e: Expr) {
        self.push(Stmt::Assign(v, e));
    }

    pub fn store(&mut self, buf: BufId, index: Expr, value: Expr) {
        self.push(Stmt::Store { buf, index, value });
    }

    /// Makes this a GPU kernel launched with `block` threads per block and
    /// `grid` blocks.
    pub fn gpu_launch(&mut self, block: [u32; 3], grid: [Expr; 3]) {
        self.kernel.gpu = Some(GpuLaunch { block, grid, aligned_vectors: false, min_blocks_per_sm: None });
    }

    /// Records the promise of [`GpuLaunch::aligned_vectors`] (after
    /// [`Builder::gpu_launch`]).
    pub fn promise_aligned_vectors(&mut self) {
        if let Some(g) = &mut self.kernel.gpu {
            g.aligned_vectors = true;
        }
    }

    /// Records [`GpuLaunch::min_blocks_per_sm`] (after [`Builder::gpu_launch`]).
    pub fn min_blocks_per_sm(&mut self, n: u32) {
        if let Some(g) = &mut self.kernel.gpu {
            g.min_blocks_per_sm = Some(n);
        }
    }

    pub fn barrier(&mut self) {
        self.push(Stmt::Barrier);
    }

    /// See [`Stmt::Prefetch`].
    pub fn prefetch(&mut self, buf: BufId, index: Expr) {
        self.push(Stmt::Prefetch { buf, index });
    }

    pub fn shuffle(&mut self, dst: Var, kind: ShuffleKind, value: Expr, arg: Expr) {
        self.push(Stmt::Shuffle { dst, kind, value, arg });
    }

    /// A warp-wide tensor-core MMA (see [`Mma`]).
    pub fn mma(&mut self, m: Mma) {
        self.push(Stmt::Mma(Box::new(m)));
    }

    /// `for name in (start..end).step_by(step)`; the body gets the loop variable.
    pub fn for_(
        &mut self,
        name: &str,
        start: Expr,
        end: Expr,
        step: i64,
        kind: LoopKind,
        body: impl FnOnce(&mut Builder, Expr),
    ) {
        let var = self.var(name, Ty::I64);
        self.stack.push(vec![]);
        body(self, Expr::Var(var));
        let body = self.stack.pop().unwrap();
        self.push(Stmt::For(Loop { var, start, end, step, kind, body }));
    }

    pub fn if_(&mut self, cond: Expr, then: impl FnOnce(&mut Builder), els: impl FnOnce(&mut Builder)) {
        self.stack.push(vec![]);
        then(self);
        let then = self.stack.pop().unwrap();
        self.stack.push(vec![]);
        els(self);
        let els = self.stack.pop().unwrap();
        self.push(Stmt::If { cond, then, els });
    }

    fn push(&mut self, s: Stmt) {
        self.stack.last_mut().unwrap().push(s);
    }

    /// The finished kernel, type-checked.
    pub fn finish(mut self) -> Result<Kernel, KirError> {
        assert_eq!(self.stack.len(), 1, "unclosed body");
        self.kernel.body = self.stack.pop().unwrap();
        if let Some(v) = self.sm90a {
            self.kernel.sm90a = Some(Box::new(v.finish()?));
        }
        self.kernel.verify()?;
        Ok(self.kernel)
    }
}

/// The lane sums of [`Expr::HSums`], in its order of additions: pairs of
/// vectors (`x`, `y`) become one, `[x's halves' first parts, y's] + [their
/// second parts]`, where each vector of a level holds several vectors'
/// partial sums side by side, each halved in turn, until every original
/// vector has one lane. The lowerings follow the same steps.
pub fn hsums(vs: &[Vec<f32>]) -> Vec<f32> {
    let mut cur: Vec<Vec<f32>> = vs.to_vec();
    let mut width = vs.len();
    while cur.len() > 1 {
        let h = width / 2;
        cur = cur
            .chunks(2)
            .map(|pair| {
                let (mut p, mut q) = (vec![], vec![]);
                for v in pair {
                    for part in v.chunks(width) {
                        p.extend_from_slice(&part[..h]);
                        q.extend_from_slice(&part[h..]);
                    }
                }
                p.iter().zip(&q).map(|(a, b)| a + b).collect()
            })
            .collect();
        width = h;
    }
    cur.pop().unwrap_or_default()
}

/// The two shuffles of one step of [`hsums`]: for vectors `x` (lanes
/// `0..n`) and `y` (lanes `n..2n`) whose parts are `width` lanes wide, the
/// lanes of the first halves of their parts, then of the second halves.
pub fn hsums_step(n: usize, width: usize) -> (Vec<u32>, Vec<u32>) {
    let h = width / 2;
    let (mut p, mut q) = (vec![], vec![]);
    for base in [0, n] {
        for part in (0..n).step_by(width) {
            p.extend((base + part..base + part + h).map(|i| i as u32));
            q.extend((base + part + h..base + part + width).map(|i| i as u32));
        }
    }
    (p, q)
}
