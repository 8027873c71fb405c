//! The KIR interpreter: runs a kernel on host buffers. It is the reference
//! the lowerings are tested against and the way GPU kernel logic is tested
//! on machines without a GPU.
//!
//! Two modes:
//! - [`Mode::Cpu`] runs the kernel once per thread of a simulated CPU team,
//!   one after another, each doing its chunk of the outermost parallel loops
//!   (the same split the Cranelift lowering makes).
//! - [`Mode::Gpu`] runs a grid of thread blocks, one block at a time. Within
//!   a block every thread is an OS thread, but only one runs at a time: thread
//!   0 runs to its next barrier, then thread 1, and so on; when the last
//!   thread arrives the next phase starts at thread 0 (each thread waits on
//!   its own condition variable, so passing the turn wakes one thread). The
//!   schedule is therefore deterministic, and a barrier reached by some
//!   threads while others finish is reported as divergence. Warp shuffles
//!   synchronise the whole block (publish, barrier, read, barrier), so every
//!   thread of the block must execute the same shuffles. A tensor-core [`Mma`] is
//!   simulated the same way: every lane publishes its fragments, and each
//!   computes its part of `D` from its warp's 32 fragments. A warpgroup
//!   [`Wgmma`] publishes its descriptors (which must agree over the
//!   warpgroup) and computes its part of `D` from shared memory at issue;
//!   its asynchrony is simulated as a protocol check instead: reading its
//!   accumulators or storing to the shared buffers it reads before a
//!   `wgmma.wait_group` retired it, issuing it without a `wgmma.fence` or
//!   on shared tiles whose generic stores no `fence.proxy.async` ordered,
//!   and ending the kernel with a group in flight are errors.
//!
//! Every buffer access is bounds-checked; errors name the kernel and the
//! statement.

use super::*;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Host data for one buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum BufData {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl BufData {
    pub fn len(&self) -> usize {
        match self {
            BufData::F32(v) => v.len(),
            BufData::I32(v) => v.len(),
            BufData::I64(v) => v.len(),
            BufData::Bool(v) => v.len(),
            BufData::BF16(v) => v.len(),
            BufData::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(elem: Scalar, len: usize) -> BufData {
        match elem {
            Scalar::F32 => BufData::F32(vec![0.0; len]),
            Scalar::I32 => BufData::I32(vec![0; len]),
            Scalar::I64 => BufData::I64(vec![0; len]),
            Scalar::Bool => BufData::Bool(vec![false; len]),
            Scalar::BF16 => BufData::BF16(vec![half::bf16::ZERO; len]),
            Scalar::F16 => BufData::F16(vec![half::f16::ZERO; len]),
        }
    }

    fn elem(&self) -> Scalar {
        match self {
            BufData::F32(_) => Scalar::F32,
            BufData::I32(_) => Scalar::I32,
            BufData::I64(_) => Scalar::I64,
            BufData::Bool(_) => Scalar::Bool,
            BufData::BF16(_) => Scalar::BF16,
            BufData::F16(_) => Scalar::F16,
        }
    }

    /// The f32 data; panics on other element types (for tests).
    pub fn f32(&self) -> &[f32] {
        match self {
            BufData::F32(v) => v,
            other => panic!("buffer holds {:?}, not f32", other.elem()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Cpu { threads: usize },
    Gpu { grid: [usize; 3], block: [usize; 3] },
}

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error("kernel `{kernel}`: expected {expected} global buffers and {scalars} scalars, found {found} and {found_scalars}")]
    Arity { kernel: String, expected: usize, scalars: usize, found: usize, found_scalars: usize },
    #[error("kernel `{kernel}`: buffer `{name}` expects {expected_elem:?}[{expected}], found {found_elem:?}[{found}]")]
    Buffer { kernel: String, name: String, expected_elem: Scalar, expected: usize, found_elem: Scalar, found: usize },
    #[error("kernel `{kernel}`{thread}: {message}")]
    Run { kernel: String, thread: String, message: String },
}

#[derive(Clone, Debug, PartialEq)]
enum Val {
    F(f32),
    I32(i32),
    I64(i64),
    B(bool),
    VF(Vec<f32>),
    VB(Vec<bool>),
}

impl Val {
    fn i64(&self) -> Result<i64, String> {
        match self {
            Val::I64(x) => Ok(*x),
            Val::I32(x) => Ok(*x as i64),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }

    fn bool(&self) -> Result<bool, String> {
        match self {
            Val::B(b) => Ok(*b),
            other => Err(format!("expected a bool, found {other:?}")),
        }
    }
}

/// Runs `kernel` on `globals` (the global buffers in declaration order) and
/// `scalars`. Buffers must match the declared element types and lengths.
pub fn run(kernel: &Kernel, globals: &mut [BufData], scalars: &[i64], mode: Mode) -> Result<(), InterpError> {
    let decls: Vec<(BufId, &BufDecl)> = kernel.global_buffers().collect();
    if decls.len() != globals.len() || kernel.scalars.len() != scalars.len() {
        return Err(InterpError::Arity {
            kernel: kernel.name.clone(),
            expected: decls.len(),
            scalars: kernel.scalars.len(),
            found: globals.len(),
            found_scalars: scalars.len(),
        });
    }
    for ((_, d), b) in decls.iter().zip(globals.iter()) {
        let len = kernel.buffer_len(d, scalars).map_err(|message| InterpError::Run {
            kernel: kernel.name.clone(),
            thread: String::new(),
            message: format!("length of `{}` {message}", d.name),
        })?;
        if d.elem != b.elem() || len != b.len() {
            return Err(InterpError::Buffer {
                kernel: kernel.name.clone(),
                name: d.name.clone(),
                expected_elem: d.elem,
                expected: len,
                found_elem: b.elem(),
                found: b.len(),
            });
        }
    }
    // The caller's buffers move into one table indexed by BufId for the run
    // and move back afterwards, also on error.
    let mut mem: Vec<BufData> = kernel.buffers.iter().map(|d| BufData::zeros(d.elem, 0)).collect();
    for ((id, _), b) in decls.iter().zip(globals.iter_mut()) {
        mem[id.0 as usize] = std::mem::replace(b, BufData::F32(vec![]));
    }
    let result = run_in(kernel, &mut mem, scalars, mode);
    for ((id, _), b) in decls.iter().zip(globals.iter_mut()) {
        *b = std::mem::replace(&mut mem[id.0 as usize], BufData::F32(vec![]));
    }
    result
}

fn run_in(kernel: &Kernel, mem: &mut Vec<BufData>, scalars: &[i64], mode: Mode) -> Result<(), InterpError> {
    let fail = |thread: String, message: String| InterpError::Run { kernel: kernel.name.clone(), thread, message };
    match mode {
        Mode::Cpu { threads } => {
            let threads = threads.max(1);
            for t in 0..threads {
                let mut th = Thread::new(kernel, scalars, Ctx::Cpu { thread: t, threads }, Memory::Direct(mem));
                th.exec(&kernel.body).map_err(|m| fail(format!(" (cpu thread {t}/{threads})"), m))?;
            }
            Ok(())
        }
        Mode::Gpu { grid, block } => {
            let n: usize = block.iter().product();
            for bz in 0..grid[2] {
                for by in 0..grid[1] {
                    for bx in 0..grid[0] {
                        // Shared memory is fresh (zeroed) for every block.
                        for (d, m) in kernel.buffers.iter().zip(mem.iter_mut()) {
                            if d.space == Space::Shared {
                                *m = BufData::zeros(d.elem, kernel.const_len(d).unwrap_or(0));
                            }
                        }
                        let bid = [bx, by, bz];
                        run_block(kernel, mem, scalars, grid, block, bid, n)
                            .map_err(|m| fail(format!(" (block {bid:?})"), m))?;
                    }
                }
            }
            Ok(())
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Running,
    Barrier,
    Done,
}

struct SimState<'m> {
    mem: &'m mut Vec<BufData>,
    turn: usize,
    status: Vec<Status>,
    slots: Vec<Option<Val>>,
    error: Option<String>,
    /// Per buffer: the (thread, in-flight wgmma group) pairs that read it.
    async_reads: Vec<u32>,
    /// Per buffer: the threads with generic stores into it that no
    /// `fence.proxy.async` has ordered yet.
    unfenced: Vec<u32>,
}

struct Sim<'m> {
    state: Mutex<SimState<'m>>,
    /// One per simulated thread: passing the baton wakes only the thread
    /// whose turn it is (waking every thread at every turn made the
    /// simulation spend most of its time in the kernel's scheduler).
    cvs: Vec<Condvar>,
}

impl Sim<'_> {
    /// Wakes the thread whose turn `st` says it is, or every thread when
    /// one failed (they all abort).
    fn wake(&self, st: &SimState<'_>) {
        if st.error.is_some() {
            self.cvs.iter().for_each(Condvar::notify_all);
        } else if let Some(cv) = self.cvs.get(st.turn) {
            cv.notify_all();
        }
    }
}

fn run_block(
    kernel: &Kernel,
    mem: &mut Vec<BufData>,
    scalars: &[i64],
    grid: [usize; 3],
    block: [usize; 3],
    bid: [usize; 3],
    n: usize,
) -> Result<(), String> {
    let sim = Sim {
        state: Mutex::new(SimState {
            mem,
            turn: 0,
            status: vec![Status::Running; n],
            slots: vec![None; n],
            error: None,
            async_reads: vec![0; kernel.buffers.len()],
            unfenced: vec![0; kernel.buffers.len()],
        }),
        cvs: (0..n).map(|_| Condvar::new()).collect(),
    };
    std::thread::scope(|s| {
        for me in 0..n {
            let sim = &sim;
            s.spawn(move || {
                let tid = [me % block[0], (me / block[0]) % block[1], me / (block[0] * block[1])];
                let guard = sim.cvs[me]
                    .wait_while(sim.state.lock().unwrap(), |st| st.turn != me && st.error.is_none())
                    .unwrap();
                if guard.error.is_some() {
                    return;
                }
                let ctx = Ctx::Gpu { tid, bid, block, grid, me, n };
                let mut th = Thread::new(kernel, scalars, ctx, Memory::Sim { sim, guard: Some(guard) });
                let result = th.exec(&kernel.body).and_then(|()| th.wgmma_done());
                match result {
                    Ok(()) => {
                        let _ = th.sync(Status::Done);
                    }
                    Err(e) => {
                        let mut g = th.take_guard();
                        if g.error.is_none() {
                            g.error = Some(format!("thread {tid:?}: {e}"));
                        }
                        sim.wake(&g);
                    }
                }
            });
        }
    });
    let st = sim.state.into_inner().unwrap();
    match st.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

enum Ctx {
    Cpu { thread: usize, threads: usize },
    Gpu { tid: [usize; 3], bid: [usize; 3], block: [usize; 3], grid: [usize; 3], me: usize, n: usize },
}

enum Memory<'a, 'm> {
    Direct(&'a mut Vec<BufData>),
    Sim { sim: &'a Sim<'m>, guard: Option<MutexGuard<'a, SimState<'m>>> },
}

struct Thread<'a, 'm> {
    k: &'a Kernel,
    vars: Vec<Option<Val>>,
    ctx: Ctx,
    mem: Memory<'a, 'm>,
    /// Depth of enclosing parallel loops; only the outermost is split.
    parallel_depth: usize,
    wg: WgState,
}

/// One thread's view of the wgmma protocol (see the module docs).
#[derive(Default)]
struct WgState {
    /// A `wgmma.fence` since the last wait.
    fenced: bool,
    /// The wgmmas issued since the last commit: their accumulators and the
    /// buffers they read.
    open: (Vec<Var>, Vec<BufId>),
    /// Committed groups still in flight, oldest first.
    groups: std::collections::VecDeque<(Vec<Var>, Vec<BufId>)>,
    /// Per variable: an accumulator of a wgmma in flight.
    pending: Vec<bool>,
    /// Per buffer: this thread stored into it since its last proxy fence.
    dirty: Vec<bool>,
}

impl<'a, 'm> Thread<'a, 'm> {
    fn new(k: &'a Kernel, scalars: &[i64], ctx: Ctx, mem: Memory<'a, 'm>) -> Self {
        let mut vars = vec![None; k.vars.len()];
        for (v, x) in k.scalars.iter().zip(scalars) {
            vars[v.0 as usize] = Some(Val::I64(*x));
        }
        let wg =
            WgState { pending: vec![false; k.vars.len()], dirty: vec![false; k.buffers.len()], ..WgState::default() };
        Thread { k, vars, ctx, mem, parallel_depth: 0, wg }
    }

    fn bufs(&mut self) -> &mut Vec<BufData> {
        match &mut self.mem {
            Memory::Direct(m) => m,
            Memory::Sim { guard, .. } => guard.as_mut().expect("simulated thread runs without the baton").mem,
        }
    }

    fn take_guard(&mut self) -> MutexGuard<'a, SimState<'m>> {
        match &mut self.mem {
            Memory::Sim { guard, .. } => guard.take().expect("no baton"),
            Memory::Direct(_) => unreachable!("only simulated threads hold a baton"),
        }
    }

    /// Arrives at a barrier (or the end) and, unless done, waits for the
    /// next phase. See the module docs for the schedule.
    fn sync(&mut self, status: Status) -> Result<(), String> {
        let (me, n) = match self.ctx {
            Ctx::Gpu { me, n, .. } => (me, n),
            Ctx::Cpu { .. } => return Err("barrier or shuffle in CPU mode".into()),
        };
        let Memory::Sim { sim, guard } = &mut self.mem else { unreachable!() };
        let sim: &'a Sim<'m> = sim;
        let mut g = guard.take().expect("no baton");
        g.status[me] = status;
        if me + 1 < n {
            g.turn = me + 1;
        } else if g.status.iter().all(|s| *s == Status::Barrier) {
            g.status.iter_mut().for_each(|s| *s = Status::Running);
            g.turn = 0;
        } else if g.status.iter().all(|s| *s == Status::Done) {
            g.turn = n;
        } else if g.error.is_none() {
            let at: Vec<usize> = (0..n).filter(|i| g.status[*i] == Status::Barrier).collect();
            g.error = Some(format!(
                "barrier divergence: threads {at:?} wait at a barrier that the other threads of the block never reach"
            ));
        }
        sim.wake(&g);
        if status == Status::Done {
            return Ok(());
        }
        let g = sim.cvs[me].wait_while(g, |st| st.turn != me && st.error.is_none()).unwrap();
        if g.error.is_some() {
            *guard = Some(g);
            return Err("aborted: another thread failed".into());
        }
        *guard = Some(g);
        Ok(())
    }

    fn exec(&mut self, stmts: &[Stmt]) -> Result<(), String> {
        for s in stmts {
            self.stmt(s).map_err(|e| {
                if e.contains("\n  in: ") {
                    e
                } else {
                    format!("{e}\n  in: {}", super::print::stmt_line(self.k, s))
                }
            })?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::Assign(v, e) => {
                let x = self.eval(e)?;
                self.not_pending(*v)?;
                self.vars[v.0 as usize] = Some(x);
            }
            Stmt::Store { buf, index, value } => {
                let i = self.eval(index)?.i64()?;
                let x = self.eval(value)?;
                if self.k.buf(*buf).space == Space::Shared {
                    self.shared_store(*buf)?;
                }
                self.store(*buf, i, x)?;
            }
            Stmt::For(l) => {
                let mut start = self.eval(&l.start)?.i64()?;
                let mut end = self.eval(&l.end)?.i64()?;
                let split = l.kind == LoopKind::Parallel && self.parallel_depth == 0;
                if let (true, Ctx::Cpu { thread, threads }) = (split, &self.ctx) {
                    (start, end) = split_range(start, end, l.step, *thread, *threads);
                }
                if l.kind == LoopKind::Parallel {
                    self.parallel_depth += 1;
                }
                let mut i = start;
                let r = (|| -> Result<(), String> {
                    while i < end {
                        self.vars[l.var.0 as usize] = Some(Val::I64(i));
                        self.exec(&l.body)?;
                        i += l.step;
                    }
                    Ok(())
                })();
                if l.kind == LoopKind::Parallel {
                    self.parallel_depth -= 1;
                }
                r?;
            }
            Stmt::If { cond, then, els } => {
                if self.eval(cond)?.bool()? {
                    self.exec(then)?;
                } else {
                    self.exec(els)?;
                }
            }
            Stmt::Barrier => self.sync(Status::Barrier)?,
            Stmt::Shuffle { dst, kind, value, arg } => {
                let x = self.eval(value)?;
                let a = self.eval(arg)?.i64()?;
                let (me, n) = match self.ctx {
                    Ctx::Gpu { me, n, .. } => (me, n),
                    Ctx::Cpu { .. } => return Err("shuffle in CPU mode".into()),
                };
                let lane = (me % 32) as i64;
                let base = me - lane as usize;
                let src = match kind {
                    ShuffleKind::Xor => lane ^ a,
                    ShuffleKind::Down => lane + a,
                    ShuffleKind::Idx => a,
                };
                let src = if (0..32).contains(&src) && base + (src as usize) < n { base + src as usize } else { me };
                self.slots()[me] = Some(x);
                self.sync(Status::Barrier)?;
                let y = self.slots()[src].clone().ok_or("shuffle source lane published nothing")?;
                self.sync(Status::Barrier)?;
                self.vars[dst.0 as usize] = Some(y);
            }
            Stmt::Mma(m) => self.mma(m)?,
            Stmt::Prefetch { index, .. } => {
                self.eval(index)?.i64()?;
            }
            Stmt::Wgmma(w) => self.wgmma(w)?,
            Stmt::Async(a) => self.async_sync(*a)?,
        }
        Ok(())
    }

    /// Fails if `v` is the accumulator of a wgmma still in flight.
    fn not_pending(&self, v: Var) -> Result<(), String> {
        if self.wg.pending[v.0 as usize] {
            return Err(format!(
                "accesses `{}`, an accumulator of a wgmma in flight (no wgmma.wait_group retired it)",
                self.k.var(v).name
            ));
        }
        Ok(())
    }

    fn sim_state(&mut self) -> Result<&mut SimState<'m>, String> {
        match &mut self.mem {
            Memory::Sim { guard, .. } => Ok(guard.as_mut().expect("no baton")),
            Memory::Direct(_) => Err("wgmma and async-proxy fences run only in GPU mode".into()),
        }
    }

    /// One of the wgmma protocol's ordering statements (see [`AsyncSync`]).
    fn async_sync(&mut self, a: AsyncSync) -> Result<(), String> {
        self.sim_state()?;
        match a {
            AsyncSync::WgmmaFence => self.wg.fenced = true,
            AsyncSync::WgmmaCommit => {
                let group = std::mem::take(&mut self.wg.open);
                self.wg.groups.push_back(group);
            }
            AsyncSync::WgmmaWait(n) => {
                while self.wg.groups.len() > n as usize {
                    let (vars, bufs) = self.wg.groups.pop_front().unwrap();
                    for v in vars {
                        self.wg.pending[v.0 as usize] = false;
                    }
                    let st = self.sim_state()?;
                    for b in bufs {
                        st.async_reads[b.0 as usize] -= 1;
                    }
                }
                // Accumulators of later groups (or of uncommitted wgmmas)
                // stay in flight.
                let still: Vec<Var> =
                    self.wg.groups.iter().chain(std::iter::once(&self.wg.open)).flat_map(|g| g.0.clone()).collect();
                for v in still {
                    self.wg.pending[v.0 as usize] = true;
                }
                self.wg.fenced = false;
            }
            AsyncSync::ProxyFenceShared => {
                for i in 0..self.wg.dirty.len() {
                    if std::mem::take(&mut self.wg.dirty[i]) {
                        self.sim_state()?.unfenced[i] -= 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails if wgmmas are still in flight when the thread ends.
    fn wgmma_done(&mut self) -> Result<(), String> {
        if !self.wg.groups.is_empty() || !self.wg.open.0.is_empty() {
            return Err("the kernel ends with wgmmas in flight (no wgmma.commit_group and wait_group)".into());
        }
        Ok(())
    }

    /// One warpgroup-wide `m64nNk16` MMA (see [`Wgmma`] for the layouts).
    fn wgmma(&mut self, w: &Wgmma) -> Result<(), String> {
        let (me, n) = match self.ctx {
            Ctx::Gpu { me, n, .. } => (me, n),
            Ctx::Cpu { .. } => return Err("wgmma in CPU mode".into()),
        };
        let base = me - me % 128;
        if base + 128 > n {
            return Err(format!("wgmma in a warpgroup of {} threads (128 needed)", n - base));
        }
        if !self.wg.fenced {
            return Err("wgmma without a wgmma.fence before it (since the last wait)".into());
        }
        let mut starts = [0i64; 2];
        for (s, m) in starts.iter_mut().zip([&w.a, &w.b]) {
            *s = self.eval(&m.start)?.i64()?;
            let bytes = *s * 2;
            if !(0..1 << 18).contains(&bytes) || bytes % 16 != 0 {
                return Err(format!(
                    "wgmma descriptor start {s} of `{}` (16-byte aligned, below 2^18 bytes)",
                    self.k.buf(m.buf).name
                ));
            }
            if self.sim_state()?.unfenced[m.buf.0 as usize] > 0 {
                return Err(format!(
                    "wgmma reads `{}`, whose generic stores no fence.proxy.async ordered",
                    self.k.buf(m.buf).name
                ));
            }
        }
        self.slots()[me] = Some(Val::I64((starts[0] << 32) | starts[1]));
        self.sync(Status::Barrier)?;
        let mine = self.slots()[me].clone();
        if let Some(other) = (base..base + 128).find(|&t| self.slots()[t] != mine) {
            return Err(format!("wgmma descriptors differ between threads {me} and {other} of the warpgroup"));
        }
        self.sync(Status::Barrier)?;
        let tid = me - base;
        let (r0, _) = Wgmma::d_cell(tid, 0);
        // This thread's two rows of A and N / 4 columns of B (rows of the
        // stored transpose), each 16 deep.
        let mut fetch = |m: &SmemMatrix, start: i64, r: usize| -> Result<Vec<f64>, String> {
            (0..16)
                .map(|c| match self.load(m.buf, start + m.offset(r, c) as i64, 1)? {
                    Val::F(x) => Ok(x as f64),
                    other => Err(format!("wgmma element {other:?}")),
                })
                .collect()
        };
        let a_rows = [fetch(&w.a, starts[0], r0)?, fetch(&w.a, starts[0], r0 + 8)?];
        let mut b_cols = vec![];
        for i in (0..w.n as usize / 2).step_by(4) {
            for j in 0..2 {
                b_cols.push(fetch(&w.b, starts[1], Wgmma::d_cell(tid, i + j).1)?);
            }
        }
        for (i, v) in w.d.iter().enumerate() {
            let c = match &self.vars[v.0 as usize] {
                Some(Val::F(x)) => *x as f64,
                _ => return Err(format!("wgmma accumulator `{}` unset", self.k.var(*v).name)),
            };
            let (a, b) = (&a_rows[(i / 2) % 2], &b_cols[(i / 4) * 2 + i % 2]);
            let sum = c + (0..16).map(|kk| a[kk] * b[kk]).sum::<f64>();
            self.vars[v.0 as usize] = Some(Val::F(sum as f32));
            self.wg.pending[v.0 as usize] = true;
            self.wg.open.0.push(*v);
        }
        for m in [&w.a, &w.b] {
            self.wg.open.1.push(m.buf);
            self.sim_state()?.async_reads[m.buf.0 as usize] += 1;
        }
        Ok(())
    }

    /// One warp-wide `m16n8k16` MMA (see [`Mma`] for the fragment layout
    /// and the precision).
    fn mma(&mut self, m: &Mma) -> Result<(), String> {
        let (me, n) = match self.ctx {
            Ctx::Gpu { me, n, .. } => (me, n),
            Ctx::Cpu { .. } => return Err("mma in CPU mode".into()),
        };
        let base = me - me % 32;
        if base + 32 > n {
            return Err(format!("mma in a warp of {} threads (32 needed)", n - base));
        }
        // This lane's fragments: A's 8 elements, B's 4, then C's 4.
        let mut mine = Vec::with_capacity(16);
        let regs = m.a_at.iter().map(|e| (m.a, e)).chain(m.b_at.iter().map(|e| (m.b, e)));
        for (buf, at) in regs {
            let i = self.eval(at)?.i64()?;
            if i % 2 != 0 {
                return Err(format!("mma fragment at odd index {i} of `{}`", self.k.buf(buf).name));
            }
            for j in [i, i + 1] {
                match self.load(buf, j, 1)? {
                    Val::F(x) => mine.push(x),
                    other => return Err(format!("mma fragment element {other:?}")),
                }
            }
        }
        for c in &m.c {
            match self.eval(c)? {
                Val::F(x) => mine.push(x),
                other => return Err(format!("mma accumulator {other:?}")),
            }
        }
        self.slots()[me] = Some(Val::VF(mine));
        self.sync(Status::Barrier)?;
        let mut a = [[0f64; 16]; 16];
        let mut b = [[0f64; 8]; 16];
        let mut c = [[0f64; 8]; 16];
        for lane in 0..32 {
            let Some(Val::VF(f)) = &self.slots()[base + lane] else {
                return Err(format!("mma: lane {lane} published no fragments"));
            };
            let (g, t) = (lane / 4, lane % 4);
            for j in 0..4 {
                let (row, col) = (g + 8 * (j % 2), 2 * t + 8 * (j / 2));
                a[row][col] = f[2 * j] as f64;
                a[row][col + 1] = f[2 * j + 1] as f64;
            }
            for j in 0..2 {
                let k = 2 * t + 8 * j;
                b[k][g] = f[8 + 2 * j] as f64;
                b[k + 1][g] = f[8 + 2 * j + 1] as f64;
            }
            for i in 0..4 {
                c[g + 8 * (i / 2)][2 * t + i % 2] = f[12 + i] as f64;
            }
        }
        let lane = me % 32;
        let (g, t) = (lane / 4, lane % 4);
        let d: Vec<f32> = (0..4)
            .map(|i| {
                let (row, col) = (g + 8 * (i / 2), 2 * t + i % 2);
                (c[row][col] + (0..16).map(|k| a[row][k] * b[k][col]).sum::<f64>()) as f32
            })
            .collect();
        self.sync(Status::Barrier)?;
        for (v, x) in m.d.iter().zip(d) {
            self.vars[v.0 as usize] = Some(Val::F(x));
        }
        Ok(())
    }

    /// Protocol bookkeeping of a generic store into shared `buf`.
    fn shared_store(&mut self, buf: BufId) -> Result<(), String> {
        let i = buf.0 as usize;
        let Memory::Sim { guard, .. } = &mut self.mem else { return Ok(()) };
        let st = guard.as_mut().expect("no baton");
        if st.async_reads[i] > 0 {
            return Err(format!(
                "stores into `{}` while a wgmma in flight reads it (no wgmma.wait_group retired it)",
                self.k.buf(buf).name
            ));
        }
        if !self.wg.dirty[i] {
            self.wg.dirty[i] = true;
            st.unfenced[i] += 1;
        }
        Ok(())
    }

    fn slots(&mut self) -> &mut Vec<Option<Val>> {
        match &mut self.mem {
            Memory::Sim { guard, .. } => &mut guard.as_mut().expect("no baton").slots,
            Memory::Direct(_) => unreachable!("shuffles run only in GPU mode"),
        }
    }

    fn check(&mut self, buf: BufId, i: i64, lanes: usize) -> Result<usize, String> {
        let len = self.bufs()[buf.0 as usize].len();
        if i < 0 || i as usize + lanes > len {
            let d = self.k.buf(buf);
            return Err(format!("index {i}..{} out of bounds of `{}` (length {len})", i as usize + lanes, d.name));
        }
        Ok(i as usize)
    }

    fn load(&mut self, buf: BufId, i: i64, lanes: u8) -> Result<Val, String> {
        let i = self.check(buf, i, lanes as usize)?;
        let b = &self.bufs()[buf.0 as usize];
        Ok(match (b, lanes) {
            (BufData::F32(v), 1) => Val::F(v[i]),
            (BufData::F32(v), n) => Val::VF(v[i..i + n as usize].to_vec()),
            (BufData::I32(v), _) => Val::I32(v[i]),
            (BufData::I64(v), _) => Val::I64(v[i]),
            (BufData::Bool(v), _) => Val::B(v[i]),
            (BufData::BF16(v), 1) => Val::F(v[i].to_f32()),
            (BufData::BF16(v), n) => Val::VF(v[i..i + n as usize].iter().map(|x| x.to_f32()).collect()),
            (BufData::F16(v), 1) => Val::F(v[i].to_f32()),
            (BufData::F16(v), n) => Val::VF(v[i..i + n as usize].iter().map(|x| x.to_f32()).collect()),
        })
    }

    fn store(&mut self, buf: BufId, i: i64, x: Val) -> Result<(), String> {
        let lanes = match &x {
            Val::VF(v) => v.len(),
            _ => 1,
        };
        let i = self.check(buf, i, lanes)?;
        match (&mut self.bufs()[buf.0 as usize], x) {
            (BufData::F32(v), Val::F(x)) => v[i] = x,
            (BufData::F32(v), Val::VF(x)) => v[i..i + x.len()].copy_from_slice(&x),
            (BufData::I32(v), Val::I32(x)) => v[i] = x,
            (BufData::I64(v), Val::I64(x)) => v[i] = x,
            (BufData::Bool(v), Val::B(x)) => v[i] = x,
            (BufData::BF16(v), Val::F(x)) => v[i] = half::bf16::from_f32(x),
            (BufData::BF16(v), Val::VF(x)) => {
                v[i..i + x.len()].iter_mut().zip(&x).for_each(|(d, s)| *d = half::bf16::from_f32(*s))
            }
            (BufData::F16(v), Val::F(x)) => v[i] = half::f16::from_f32(x),
            (BufData::F16(v), Val::VF(x)) => {
                v[i..i + x.len()].iter_mut().zip(&x).for_each(|(d, s)| *d = half::f16::from_f32(*s))
            }
            (_, x) => return Err(format!("store of {x:?} into a buffer of another type")),
        }
        Ok(())
    }

    fn eval(&mut self, e: &Expr) -> Result<Val, String> {
        Ok(match e {
            Expr::F32(x) => Val::F(*x),
            Expr::Int(x, Scalar::I32) => Val::I32(*x as i32),
            Expr::Int(x, _) => Val::I64(*x),
            Expr::Bool(b) => Val::B(*b),
            Expr::Var(v) => {
                self.not_pending(*v)?;
                self.vars[v.0 as usize]
                    .clone()
                    .ok_or_else(|| format!("variable `{}` read before assignment", self.k.var(*v).name))?
            }
            Expr::Un(op, a) => un(*op, self.eval(a)?)?,
            Expr::Bin(op, a, b) => {
                let a = self.eval(a)?;
                bin(*op, a, self.eval(b)?)?
            }
            Expr::Fma(a, b, c) => {
                let (a, b, c) = (self.eval(a)?, self.eval(b)?, self.eval(c)?);
                match (a, b, c) {
                    (Val::F(a), Val::F(b), Val::F(c)) => Val::F(a.mul_add(b, c)),
                    (Val::VF(a), Val::VF(b), Val::VF(c)) => {
                        Val::VF((0..a.len()).map(|i| a[i].mul_add(b[i], c[i])).collect())
                    }
                    other => return Err(format!("fma of {other:?}")),
                }
            }
            Expr::Cmp(op, a, b) => {
                let a = self.eval(a)?;
                cmp(*op, a, self.eval(b)?)?
            }
            Expr::Select(c, a, b) => {
                let (c, a, b) = (self.eval(c)?, self.eval(a)?, self.eval(b)?);
                match (c, a, b) {
                    (Val::B(c), a, b) => {
                        if c {
                            a
                        } else {
                            b
                        }
                    }
                    (Val::VB(c), Val::VF(a), Val::VF(b)) => {
                        Val::VF((0..a.len()).map(|i| if c[i] { a[i] } else { b[i] }).collect())
                    }
                    other => return Err(format!("select of {other:?}")),
                }
            }
            Expr::Cast(s, a) => {
                let a = self.eval(a)?;
                let f = match a {
                    Val::F(x) => x as f64,
                    Val::I32(x) => x as f64,
                    Val::I64(x) => x as f64,
                    Val::B(b) => b as u8 as f64,
                    other => return Err(format!("cast of {other:?}")),
                };
                match (s, &a) {
                    (Scalar::I64, Val::I32(x)) => Val::I64(*x as i64),
                    (Scalar::I32, Val::I64(x)) => Val::I32(*x as i32),
                    (Scalar::F32, _) => Val::F(f as f32),
                    (Scalar::I32, _) => Val::I32(f as i32),
                    (Scalar::I64, _) => Val::I64(f as i64),
                    (Scalar::Bool, _) => Val::B(f != 0.0),
                    (Scalar::BF16 | Scalar::F16, _) => return Err("cast to a storage-only type".into()),
                }
            }
            Expr::Splat(n, a) => match self.eval(a)? {
                Val::F(x) => Val::VF(vec![x; *n as usize]),
                Val::B(x) => Val::VB(vec![x; *n as usize]),
                other => return Err(format!("splat of {other:?}")),
            },
            Expr::Extract(a, i) => match self.eval(a)? {
                Val::VF(v) => Val::F(v[*i as usize]),
                Val::VB(v) => Val::B(v[*i as usize]),
                other => return Err(format!("extract from {other:?}")),
            },
            Expr::HReduce(op, a) => match self.eval(a)? {
                // Left to right, the order the Cranelift lowering uses.
                Val::VF(v) => Val::F(v[1..].iter().fold(v[0], |acc, x| match op {
                    RedOp::Add => acc + x,
                    RedOp::Max => acc.max(*x),
                    RedOp::Min => acc.min(*x),
                })),
                other => return Err(format!("horizontal reduction of {other:?}")),
            },
            Expr::HSums(vs) => {
                let mut vals = vec![];
                for v in vs {
                    match self.eval(v)? {
                        Val::VF(x) => vals.push(x),
                        other => return Err(format!("lane sums of {other:?}")),
                    }
                }
                Val::VF(hsums(&vals))
            }
            Expr::Load { buf, index, lanes, pick } => {
                let i = self.eval(index)?.i64()?;
                match pick {
                    Pick::All => self.load(*buf, i, *lanes)?,
                    // Every element of the pairs must be in the buffer, as
                    // the lowerings read them all.
                    Pick::Even | Pick::Odd => {
                        match self.load(*buf, i, lanes.checked_mul(2).ok_or("load of too many pairs")?)? {
                            Val::VF(v) => {
                                let first = (*pick == Pick::Odd) as usize;
                                let picked: Vec<f32> = v.into_iter().skip(first).step_by(2).collect();
                                if *lanes == 1 {
                                    Val::F(picked[0])
                                } else {
                                    Val::VF(picked)
                                }
                            }
                            other => return Err(format!("{pick:?} elements of {other:?}")),
                        }
                    }
                }
            }
            Expr::Special(s) => {
                let Ctx::Gpu { tid, bid, block, grid, .. } = &self.ctx else {
                    return Err("thread/block index in CPU mode".into());
                };
                let v = match s {
                    Special::ThreadIdx(a) => tid.get(*a as usize),
                    Special::BlockIdx(a) => bid.get(*a as usize),
                    Special::BlockDim(a) => block.get(*a as usize),
                    Special::GridDim(a) => grid.get(*a as usize),
                };
                Val::I64(*v.ok_or("axis out of range")? as i64)
            }
        })
    }
}

/// The chunk of `start..end` (in steps of `step`) that `thread` of `threads`
/// runs: contiguous, iterations `thread * iters / threads` up to
/// `(thread + 1) * iters / threads` (rounded down), so chunks differ by at
/// most one iteration and the longer ones are spread evenly. (The runtime
/// gives each core consecutive parts: had the first parts taken all the
/// extra iterations, 10 panel groups in 8 parts would have been 6 for one
/// core and 4 for the other.) Both lowerings compute the same split.
pub fn split_range(start: i64, end: i64, step: i64, thread: usize, threads: usize) -> (i64, i64) {
    let iters = if end > start { (end - start + step - 1) / step } else { 0 };
    let (t, n) = (thread as i64, threads as i64);
    let first = t * iters / n;
    let last = (t + 1) * iters / n;
    (start + first * step, (start + last * step).min(end.max(start)))
}

fn un(op: UnOp, a: Val) -> Result<Val, String> {
    let f = |x: f32| match op {
        UnOp::Neg => -x,
        UnOp::Abs => x.abs(),
        UnOp::Exp => x.exp(),
        UnOp::Sqrt => x.sqrt(),
        UnOp::Rsqrt => 1.0 / x.sqrt(),
        UnOp::Tanh => x.tanh(),
        UnOp::Sin => super::libm::sinf(x),
        UnOp::Cos => super::libm::cosf(x),
        UnOp::Log => super::libm::logf(x),
        UnOp::Erf => super::libm::erff(x),
        UnOp::Floor => x.floor(),
        UnOp::Ceil => x.ceil(),
        UnOp::Round => x.round_ties_even(),
    };
    Ok(match (op, a) {
        (_, Val::F(x)) => Val::F(f(x)),
        (_, Val::VF(v)) => Val::VF(v.into_iter().map(f).collect()),
        (UnOp::Neg, Val::I64(x)) => Val::I64(x.wrapping_neg()),
        (UnOp::Neg, Val::I32(x)) => Val::I32(x.wrapping_neg()),
        (UnOp::Abs, Val::I64(x)) => Val::I64(x.wrapping_abs()),
        (UnOp::Abs, Val::I32(x)) => Val::I32(x.wrapping_abs()),
        (op, other) => return Err(format!("{op:?} of {other:?}")),
    })
}

fn bin(op: BinOp, a: Val, b: Val) -> Result<Val, String> {
    let f = |x: f32, y: f32| match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => x / y,
        BinOp::Rem => super::libm::fmodf(x, y),
        BinOp::Max => x.max(y),
        BinOp::Min => x.min(y),
        BinOp::Pow => super::libm::powf(x, y),
    };
    let int = |x: i64, y: i64| -> Result<i64, String> {
        Ok(match op {
            BinOp::Add => x.wrapping_add(y),
            BinOp::Sub => x.wrapping_sub(y),
            BinOp::Mul => x.wrapping_mul(y),
            BinOp::Div | BinOp::Rem if y == 0 => return Err("integer division by zero".into()),
            BinOp::Div => x.wrapping_div(y),
            BinOp::Rem => x.wrapping_rem(y),
            BinOp::Max => x.max(y),
            BinOp::Min => x.min(y),
            BinOp::Pow => return Err("integer pow".into()),
        })
    };
    Ok(match (a, b) {
        (Val::F(x), Val::F(y)) => Val::F(f(x, y)),
        (Val::VF(x), Val::VF(y)) => Val::VF(x.iter().zip(&y).map(|(x, y)| f(*x, *y)).collect()),
        (Val::I64(x), Val::I64(y)) => Val::I64(int(x, y)?),
        (Val::I32(x), Val::I32(y)) => Val::I32(int(x as i64, y as i64)? as i32),
        (a, b) => return Err(format!("{op:?} of {a:?} and {b:?}")),
    })
}

fn cmp(op: CmpOp, a: Val, b: Val) -> Result<Val, String> {
    fn c<T: PartialOrd>(op: CmpOp, x: T, y: T) -> bool {
        match op {
            CmpOp::Eq => x == y,
            CmpOp::Ne => x != y,
            CmpOp::Lt => x < y,
            CmpOp::Le => x <= y,
            CmpOp::Gt => x > y,
            CmpOp::Ge => x >= y,
        }
    }
    Ok(match (a, b) {
        (Val::F(x), Val::F(y)) => Val::B(c(op, x, y)),
        (Val::I64(x), Val::I64(y)) => Val::B(c(op, x, y)),
        (Val::I32(x), Val::I32(y)) => Val::B(c(op, x, y)),
        (Val::B(x), Val::B(y)) => Val::B(c(op, x, y)),
        (Val::VF(x), Val::VF(y)) => Val::VB(x.iter().zip(&y).map(|(x, y)| c(op, x, y)).collect()),
        (a, b) => return Err(format!("comparison of {a:?} and {b:?}")),
    })
}

#[cfg(test)]
mod split_tests {
    use super::split_range;

    #[test]
    fn chunks_cover_the_range_once_and_spread_the_extra_iterations() {
        for iters in 0..40i64 {
            for threads in 1..10 {
                let chunks: Vec<(i64, i64)> = (0..threads).map(|t| split_range(0, iters, 1, t, threads)).collect();
                // Contiguous, in thread order, from 0 to `iters`.
                assert_eq!(chunks.first().map(|c| c.0), Some(0), "{iters} in {threads}");
                assert_eq!(chunks.last().map(|c| c.1), Some(iters), "{iters} in {threads}");
                assert!(chunks.windows(2).all(|w| w[0].1 == w[1].0), "{iters} in {threads}: {chunks:?}");
                let sizes: Vec<i64> = chunks.iter().map(|c| c.1 - c.0).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            }
        }
        // Steps: 0, 3, ..., 27 (10 iterations; the end is not a multiple of
        // the step) in 4 chunks of 2, 3, 2, 3 iterations.
        let chunks: Vec<(i64, i64)> = (0..4).map(|t| split_range(0, 29, 3, t, 4)).collect();
        assert_eq!(chunks, [(0, 6), (6, 15), (15, 21), (21, 29)]);
        // 10 in 8: the two longer chunks are one in each half.
        let sizes: Vec<i64> = (0..8).map(|t| split_range(0, 10, 1, t, 8)).map(|(s, e)| e - s).collect();
        assert_eq!(sizes, [1, 1, 1, 2, 1, 1, 1, 2]);
    }
}
