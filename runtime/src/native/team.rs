//! A persistent thread team: `threads - 1` spawned workers plus the calling
//! thread run a sequence of launches together. Each launch is cut into
//! [`Team::parts`] parts, and `task(launch, part)` runs once for every part
//! of every launch, on whichever thread claims it; a part of launch `i + 1`
//! starts only once every part of launch `i` has finished, so it sees
//! everything launch `i` wrote on any thread.
//!
//! Each thread owns `PARTS_PER_THREAD` consecutive parts of every launch
//! (thread `t` parts `t * PARTS_PER_THREAD..`) and claims them in order
//! first; a thread done with its own parts of a launch then waits for the
//! others, and when the wait is long it claims the parts other threads
//! have not claimed yet.
//!
//! Why own parts first: a kernel maps consecutive parts to consecutive
//! ranges of its parallel loop, so a thread that runs its own parts in
//! order reads one contiguous range of the weights, whose streams the
//! hardware prefetchers keep following from part to part. When parts were
//! claimed from one shared counter, each thread jumped between ranges and
//! every part restarted its streams. On a 2-core Zen 5 (smollm2-135m
//! decode, interleaved runs) one part per thread was 3% (f32 weights) and
//! 8% (bf16) faster than that, and own parts first 8% and 13% faster when
//! the machine's memory was in its fast phase.
//!
//! Why parts claimed dynamically rather than one share per thread behind a
//! barrier: when the machine runs more threads than it has cores (a build,
//! another program), a thread of the team is descheduled now and then. With
//! a barrier, every launch then waits for it (a scheduler time slice, not a
//! microsecond); with claimed parts, the threads that run take over the
//! parts it has not claimed, and only a part claimed and not yet finished is
//! waited for.
//!
//! Design points:
//! - no allocation and no lock per launch: the job (a pointer to the task
//!   and the launch count) is published once per [`Team::run`], workers are
//!   woken once per run, and claiming and finishing a part is one atomic
//!   each, on counters of the thread's own (each on a cache line of its
//!   own), which the other threads only read;
//! - waiting spins briefly, then yields; idle workers (between runs) end up
//!   asleep on a condition variable after `SLEEP_AFTER`, so an idle team
//!   costs no CPU, and [`Team::prewake`] wakes them while the caller
//!   prepares its next run;
//! - a panic in a task (on any thread) is caught: the team is poisoned, every
//!   other thread leaves at its next barrier, [`Team::run`] waits until no
//!   thread still runs a task (so the caller's buffers are no longer in use)
//!   and returns [`TeamError::Panicked`]; later runs refuse at once;
//! - dropping the team stops and joins the workers.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Spins before yielding.
const SPINS: u32 = 1 << 10;

/// How long an idle worker keeps looking for the next job (spinning, then
/// yielding the core to anything else runnable) before it sleeps. Longer
/// than the host's work between two decode steps (checking the inputs,
/// placing buffers, copying the logits out: about 0.1-0.3 ms for
/// smollm2-135m): a worker woken from sleep started its first launch about
/// 20 us late on a 2-core VM, every step.
pub(crate) const SLEEP_AFTER: Duration = Duration::from_millis(2);

/// Spins of a thread waiting for a launch's other parts between its looks
/// for parts nobody has claimed (a few microseconds: a launch's last parts
/// usually finish sooner, and then nobody looks).
const STEAL_AFTER: u32 = 128;

/// Parts per thread in a launch: enough for the running threads to take
/// over a descheduled one's share, few enough that a part is still a
/// sizeable contiguous range of a kernel's parallel loop.
const PARTS_PER_THREAD: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeamError {
    #[error("thread {thread} of the kernel thread team panicked while running launch {launch}; the team is unusable")]
    Panicked { thread: usize, launch: usize },
    #[error("the kernel thread team is unusable after an earlier panic")]
    Poisoned,
}

/// The task of one run, with its lifetime erased: [`Team::run`] does not
/// return before every thread is done with it.
type Task = *const (dyn Fn(usize, usize) + Sync + 'static);

#[derive(Clone, Copy)]
struct Job {
    task: Option<Task>,
    launches: usize,
}

struct Shared {
    threads: usize,
    /// Bumped (under `lock`) when a new job is published.
    epoch: AtomicU64,
    /// Bumped (under `lock`) by [`Team::prewake`]: a job is coming soon.
    hint: AtomicU64,
    /// Workers asleep on `wake`.
    sleeping: AtomicUsize,
    /// How long (nanoseconds) an idle worker spins and yields before it
    /// sleeps: `SLEEP_AFTER` unless [`Team::set_idle_spin`] changed it.
    idle_spin_ns: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
    /// Written by the caller only while every worker is idle (see `run`).
    job: UnsafeCell<Job>,
    /// Parts per launch.
    parts: usize,
    /// Parts per thread (`parts / threads`).
    own: usize,
    /// Per thread, its own parts of the current job claimed so far (by it
    /// or by others), counted over all launches: value `c` is launch
    /// `c / own`, part `thread * own + c % own`.
    claimed: Vec<Padded>,
    /// Per thread, the parts of the current job it finished (its own and
    /// others'), over all launches; only that thread writes its counter.
    finished: Vec<Padded>,
    /// Workers done with the current job.
    done: AtomicUsize,
    poisoned: AtomicBool,
    /// (thread, launch) of the first panic.
    panic_at: Mutex<Option<(usize, usize)>>,
    shutdown: AtomicBool,
}

/// An atomic counter on a cache line of its own, so that one thread's
/// claims do not move the line other threads read.
#[repr(align(128))]
struct Padded(AtomicUsize);

// SAFETY: `job` is the only non-Sync field; it is written by the caller only
// when no worker reads it (before the epoch bump that publishes it, and after
// every worker reported done with the previous job), and the task it points
// to is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// Parts of the current job finished, over all threads.
    fn finished(&self) -> usize {
        self.finished.iter().map(|f| f.0.load(Ordering::Acquire)).sum()
    }

    fn poison(&self, thread: usize, launch: usize) {
        if let Ok(mut at) = self.panic_at.lock() {
            at.get_or_insert((thread, launch));
        }
        self.poisoned.store(true, Ordering::Release);
    }

    /// Runs the job's launches as `thread`: in each, its own parts, then
    /// it waits for the launch's other parts to finish, and runs those of
    /// them no thread has claimed when the wait is long (their owner is
    /// descheduled or has more work); catches a panic and poisons.
    ///
    /// Waiting first and taking over parts only later keeps a launch's
    /// synchronisation to one write of each thread's `finished` counter
    /// and its reads by the others: when every thread runs, nobody touches
    /// another thread's `claimed` line, where one shared `finished`
    /// counter moved between the cores for every part. (In decode runs on
    /// the Zen 5 above this was about 2% faster with bf16 weights in the
    /// fast phase, and alike otherwise.)
    ///
    /// No deadlock: a thread moves on to launch `l + 1` only once every
    /// part of `l` has finished, and a waiting thread runs any part of `l`
    /// still unclaimed, so every part of `l` is claimed by a thread that
    /// runs it without waiting for anything.
    fn run_job(&self, job: Job, thread: usize) {
        let Some(task) = job.task else { return };
        // SAFETY: the caller of `Team::run` keeps the task alive until every
        // worker has reported done.
        let task = unsafe { &*task };
        let mine = &self.finished[thread].0;
        let mut done = 0;
        let mut launch = 0;
        let r = catch_unwind(AssertUnwindSafe(|| {
            for l in 0..job.launches {
                launch = l;
                let mut run = |owner: usize, c: usize| {
                    task(l, owner * self.own + c % self.own);
                    done += 1;
                    mine.store(done, Ordering::Release);
                };
                while let Some(c) = self.claim(thread, l) {
                    if self.poisoned.load(Ordering::Acquire) {
                        return;
                    }
                    run(thread, c);
                }
                let mut spins = 0u32;
                while self.finished() < (l + 1) * self.parts {
                    if self.poisoned.load(Ordering::Acquire) {
                        return;
                    }
                    spins += 1;
                    if spins.is_multiple_of(STEAL_AFTER) {
                        for k in 1..self.threads {
                            let owner = (thread + k) % self.threads;
                            while let Some(c) = self.claim(owner, l) {
                                run(owner, c);
                            }
                        }
                    }
                    if spins < SPINS {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }));
        if r.is_err() {
            self.poison(thread, launch);
        }
    }

    /// Claims the next unclaimed part of `owner`'s own parts of launch `l`:
    /// its count (see `claimed`), or None when all are claimed.
    fn claim(&self, owner: usize, l: usize) -> Option<usize> {
        let counter = &self.claimed[owner].0;
        let end = (l + 1) * self.own;
        let mut c = counter.load(Ordering::Relaxed);
        loop {
            // Below `l * own` cannot happen: every part of the launches
            // before `l` was claimed before this thread got to `l`.
            if c >= end {
                return None;
            }
            match counter.compare_exchange_weak(c, c + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(c),
                Err(now) => c = now,
            }
        }
    }

    /// A worker waits for a job newer than `seen`; None on shutdown. It
    /// spins, yields, then sleeps until a job or a [`Team::prewake`],
    /// after which it spins again.
    fn next_epoch(&self, seen: u64) -> Option<u64> {
        loop {
            let start = std::time::Instant::now();
            for i in 0u32.. {
                let e = self.epoch.load(Ordering::Acquire);
                if e != seen {
                    return Some(e);
                }
                if self.shutdown.load(Ordering::Acquire) {
                    return None;
                }
                if i < SPINS {
                    std::hint::spin_loop();
                } else if start.elapsed() < Duration::from_nanos(self.idle_spin_ns.load(Ordering::Relaxed)) {
                    std::thread::yield_now();
                } else {
                    break;
                }
            }
            let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let hint = self.hint.load(Ordering::Relaxed);
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            let woken = loop {
                let e = self.epoch.load(Ordering::Acquire);
                if e != seen {
                    break Some(Some(e));
                }
                if self.shutdown.load(Ordering::Acquire) {
                    break Some(None);
                }
                if self.hint.load(Ordering::Relaxed) != hint {
                    break None;
                }
                guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
            };
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            if let Some(next) = woken {
                return next;
            }
        }
    }
}

thread_local! {
    /// The team thread index of the current thread (0: the caller of
    /// [`Team::run`], and any thread outside a team).
    static THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index in its team of the thread this is called on (0 for the
/// thread that calls [`Team::run`]), for profiles.
pub fn current_thread() -> usize {
    THREAD.with(|t| t.get())
}

fn worker(shared: Arc<Shared>, thread: usize) {
    THREAD.with(|t| t.set(thread));
    let mut seen = 0;
    while let Some(e) = shared.next_epoch(seen) {
        seen = e;
        // SAFETY: the job was written before the epoch bump we just saw
        // (Release/Acquire on `epoch`) and is not written again before this
        // worker reports done.
        let job = unsafe { *shared.job.get() };
        shared.run_job(job, thread);
        shared.done.fetch_add(1, Ordering::Release);
    }
}

/// A team of threads that run launches together.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.shared.threads).finish()
    }
}

impl Team {
    /// Starts a team of `threads` threads (at least 1): `threads - 1`
    /// workers are spawned, the caller of [`Team::run`] is thread 0.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let threads = threads.max(1);
        let own = if threads == 1 { 1 } else { PARTS_PER_THREAD };
        let shared = Arc::new(Shared {
            threads,
            parts: threads * own,
            own,
            claimed: (0..threads).map(|_| Padded(AtomicUsize::new(0))).collect(),
            finished: (0..threads).map(|_| Padded(AtomicUsize::new(0))).collect(),
            epoch: AtomicU64::new(0),
            hint: AtomicU64::new(0),
            sleeping: AtomicUsize::new(0),
            idle_spin_ns: AtomicU64::new(SLEEP_AFTER.as_nanos() as u64),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            job: UnsafeCell::new(Job { task: None, launches: 0 }),
            done: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            panic_at: Mutex::new(None),
            shutdown: AtomicBool::new(false),
        });
        let mut team = Team { shared: shared.clone(), workers: Vec::with_capacity(threads - 1) };
        for t in 1..threads {
            let s = shared.clone();
            // On a spawn failure `team` is dropped, which stops the workers
            // already started.
            let h = std::thread::Builder::new().name(format!("smelt-worker-{t}")).spawn(move || worker(s, t))?;
            team.workers.push(h);
        }
        Ok(team)
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// The parts each launch is cut into (1 for a team of one thread).
    pub fn parts(&self) -> usize {
        self.shared.parts
    }

    /// Wakes sleeping workers so that they are spinning when the next
    /// [`Team::run`] comes: a caller that prepares a run (checks inputs,
    /// places buffers) calls this first, and the wake-up, tens of
    /// microseconds for an idle CPU, overlaps that work instead of
    /// delaying the first launch.
    pub fn prewake(&self) {
        let s = &*self.shared;
        if s.sleeping.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _guard = s.lock.lock().unwrap_or_else(|p| p.into_inner());
        s.hint.fetch_add(1, Ordering::Relaxed);
        s.wake.notify_all();
    }

    /// How long idle workers keep looking for the next run (spinning, then
    /// yielding) before they sleep; `SLEEP_AFTER` by default. Zero suits a
    /// process that runs several models in turn (`smelt bench` with
    /// several artifacts): an idle team's workers would otherwise take CPU
    /// from the team running, for the first `SLEEP_AFTER` of its every call.
    pub fn set_idle_spin(&self, spin: Duration) {
        self.shared.idle_spin_ns.store(spin.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Runs `launches` launches: `task(launch, part)` runs once for every
    /// part (`0..parts()`) of every launch, each launch's parts after every
    /// part of the one before (see the module docs). Returns when all have
    /// finished.
    pub fn run(&mut self, launches: usize, task: &(dyn Fn(usize, usize) + Sync)) -> Result<(), TeamError> {
        let s = &*self.shared;
        if s.poisoned.load(Ordering::Acquire) {
            return Err(TeamError::Poisoned);
        }
        if launches == 0 {
            return Ok(());
        }
        // SAFETY: only the lifetime is erased; this function does not return
        // before every worker has reported done with this job.
        let erased: Task =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), Task>(task as *const _) };
        let job = Job { task: Some(erased), launches };
        if s.threads > 1 {
            // SAFETY: every worker is idle: it reported done with the previous
            // job (or never had one) and reads `job` only after the bump below.
            unsafe { *s.job.get() = job };
            let _guard = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.epoch.fetch_add(1, Ordering::Release);
            s.wake.notify_all();
        }
        s.run_job(job, 0);
        if s.threads > 1 {
            let mut spins = 0u32;
            while s.done.load(Ordering::Acquire) < s.threads - 1 {
                if spins < SPINS {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            s.done.store(0, Ordering::Relaxed);
            // SAFETY: no worker reads the job any more; clear the dangling
            // task pointer.
            unsafe { *s.job.get() = Job { task: None, launches: 0 } };
        }
        // Every thread is done with the job (the workers reported done).
        for c in s.claimed.iter().chain(&s.finished) {
            c.0.store(0, Ordering::Relaxed);
        }
        if s.poisoned.load(Ordering::Acquire) {
            let at = s.panic_at.lock().ok().and_then(|a| *a);
            let (thread, launch) = at.unwrap_or((0, 0));
            return Err(TeamError::Panicked { thread, launch });
        }
        Ok(())
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    /// Launch `i` writes `v[j] = v[j] + sum(prev)`-style dependencies: each
    /// part writes its chunk from values every part wrote in the previous
    /// launch, so a part run too early shows as a wrong total.
    #[test]
    fn launches_see_previous_launches() {
        for threads in [1, 2, 3, 5] {
            let mut team = Team::new(threads).unwrap();
            let n: usize = 64;
            let a: Vec<AtomicI64> = (0..n).map(|_| AtomicI64::new(1)).collect();
            let b: Vec<AtomicI64> = (0..n).map(|_| AtomicI64::new(0)).collect();
            for _round in 0..3 {
                for x in &a {
                    x.store(1, Ordering::Relaxed);
                }
                let parts = team.parts();
                let task = |launch: usize, t: usize| {
                    let (src, dst) = if launch.is_multiple_of(2) { (&a, &b) } else { (&b, &a) };
                    let total: i64 = src.iter().map(|x| x.load(Ordering::Relaxed)).sum();
                    let chunk = n.div_ceil(parts);
                    for d in dst.iter().skip(t * chunk).take(chunk) {
                        d.store(total / n as i64 * 2, Ordering::Relaxed);
                    }
                };
                team.run(6, &task).unwrap();
                // Each launch doubles every element: 1 -> 2^6.
                assert!(a.iter().all(|x| x.load(Ordering::Relaxed) == 64), "threads {threads}");
            }
        }
    }

    #[test]
    fn every_part_of_every_launch_runs_once() {
        let mut team = Team::new(4).unwrap();
        let parts = team.parts();
        assert_eq!(parts, 4 * PARTS_PER_THREAD);
        let hits: Vec<AtomicUsize> = (0..parts * 10).map(|_| AtomicUsize::new(0)).collect();
        team.run(10, &|l, p| {
            hits[l * parts + p].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert_eq!(team.threads(), 4);
        assert_eq!(Team::new(1).unwrap().parts(), 1);
    }

    /// A thread that stalls in its part (descheduled, in effect) does not
    /// hold up the other parts of its launch: the other threads run them.
    #[test]
    fn a_stalled_thread_does_not_hold_up_the_others() {
        let mut team = Team::new(2).unwrap();
        let parts = team.parts();
        let by_thread: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(usize::MAX)).collect();
        let stalled = AtomicBool::new(false);
        team.run(1, &|_, p| {
            let worker = std::thread::current().name().is_some_and(|n| n.starts_with("smelt-worker-"));
            let me = usize::from(worker);
            by_thread[p].store(me, Ordering::Relaxed);
            // The first part a worker claims sleeps long enough for the
            // caller to claim every other part.
            if me == 1 && !stalled.swap(true, Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
        .unwrap();
        let ran: Vec<usize> = by_thread.iter().map(|x| x.load(Ordering::Relaxed)).collect();
        assert!(ran.iter().all(|&t| t <= 1), "{ran:?}");
        if stalled.load(Ordering::Relaxed) {
            let by_caller = ran.iter().filter(|&&t| t == 0).count();
            assert!(by_caller >= parts - 2, "the caller ran only {by_caller} of {parts} parts: {ran:?}");
        }
    }

    #[test]
    fn a_worker_panic_is_an_error_not_a_hang() {
        let mut team = Team::new(3).unwrap();
        let e = team
            .run(4, &|l, p| {
                if l == 2 && p == 1 {
                    panic!("boom");
                }
            })
            .unwrap_err();
        assert!(matches!(e, TeamError::Panicked { launch: 2, .. }), "{e:?}");
        assert_eq!(team.run(1, &|_, _| {}).unwrap_err(), TeamError::Poisoned);
        drop(team);
    }

    #[test]
    fn a_caller_panic_is_an_error_too() {
        let mut team = Team::new(2).unwrap();
        let e = team.run(3, &|l, p| assert!(!(l == 0 && p == 0), "boom")).unwrap_err();
        assert!(matches!(e, TeamError::Panicked { launch: 0, .. }), "{e:?}");
    }

    #[test]
    fn idle_teams_wake_up_after_sleeping() {
        let mut team = Team::new(3).unwrap();
        let count = AtomicUsize::new(0);
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            team.run(2, &|_, _| {
                count.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), 3 * 2 * team.parts());
    }

    /// Idle workers fall asleep after `SLEEP_AFTER`; `prewake` gets every
    /// one of them looking for work again (spinning, not asleep), and the
    /// next run works.
    #[test]
    fn prewake_wakes_sleeping_workers() {
        let mut team = Team::new(3).unwrap();
        let asleep = |team: &Team| team.shared.sleeping.load(Ordering::SeqCst);
        let wait_for = |team: &Team, want: usize| {
            let start = std::time::Instant::now();
            while asleep(team) != want {
                assert!(start.elapsed().as_secs() < 10, "{} workers asleep, waited for {want}", asleep(team));
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        };
        wait_for(&team, 2);
        team.prewake();
        wait_for(&team, 0);
        let count = AtomicUsize::new(0);
        team.run(1, &|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(count.load(Ordering::Relaxed), team.parts());
    }

    /// `set_idle_spin` decides when idle workers sleep, read while they
    /// wait: with an hour's spin none sleeps after a run; set to zero, the
    /// waiting ones go to sleep at once.
    #[test]
    fn idle_spin_decides_when_workers_sleep() {
        let mut team = Team::new(3).unwrap();
        team.set_idle_spin(Duration::from_secs(3600));
        team.run(1, &|_, _| {}).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(team.shared.sleeping.load(Ordering::SeqCst), 0, "a worker slept while told to spin");
        team.set_idle_spin(Duration::ZERO);
        let start = std::time::Instant::now();
        while team.shared.sleeping.load(Ordering::SeqCst) != 2 {
            assert!(start.elapsed().as_secs() < 10, "workers did not sleep after the spin was set to zero");
            std::thread::sleep(Duration::from_micros(100));
        }
        team.run(1, &|_, _| {}).unwrap();
    }
}
