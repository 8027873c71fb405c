//! A persistent thread team: `threads - 1` spawned workers plus the calling
//! thread run a sequence of launches together. Every thread runs
//! `task(launch, thread)` for each launch in order, and a spin barrier
//! separates consecutive launches, so launch `i + 1` sees everything launch
//! `i` wrote on any thread.
//!
//! Design points:
//! - no allocation and no lock per launch: the job (a pointer to the task
//!   and the launch count) is published once per [`Team::run`], workers are
//!   woken once per run, and the barrier is two atomics;
//! - waiting spins briefly, then yields; idle workers (between runs) end up
//!   asleep on a condition variable, so an idle team costs no CPU;
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

/// Spins before yielding, and yields before sleeping (idle workers only).
const SPINS: u32 = 1 << 10;
const YIELDS: u32 = 1 << 8;

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
    lock: Mutex<()>,
    wake: Condvar,
    /// Written by the caller only while every worker is idle (see `run`).
    job: UnsafeCell<Job>,
    /// The barrier: arrivals in the current phase and the phase number.
    arrived: AtomicUsize,
    phase: AtomicUsize,
    /// Workers done with the current job.
    done: AtomicUsize,
    poisoned: AtomicBool,
    /// (thread, launch) of the first panic.
    panic_at: Mutex<Option<(usize, usize)>>,
    shutdown: AtomicBool,
}

// SAFETY: `job` is the only non-Sync field; it is written by the caller only
// when no worker reads it (before the epoch bump that publishes it, and after
// every worker reported done with the previous job), and the task it points
// to is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// Waits until every thread has arrived; false when the team was
    /// poisoned meanwhile (the phase is then abandoned).
    fn barrier(&self) -> bool {
        let phase = self.phase.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.phase.fetch_add(1, Ordering::Release);
            return !self.poisoned.load(Ordering::Acquire);
        }
        let mut spins = 0u32;
        loop {
            if self.phase.load(Ordering::Acquire) != phase {
                return true;
            }
            if self.poisoned.load(Ordering::Acquire) {
                return false;
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn poison(&self, thread: usize, launch: usize) {
        if let Ok(mut at) = self.panic_at.lock() {
            at.get_or_insert((thread, launch));
        }
        self.poisoned.store(true, Ordering::Release);
    }

    /// Runs the job's launches as `thread`; catches a panic and poisons.
    fn run_job(&self, job: Job, thread: usize) {
        let Some(task) = job.task else { return };
        // SAFETY: the caller of `Team::run` keeps the task alive until every
        // worker has reported done.
        let task = unsafe { &*task };
        let mut launch = 0;
        let r = catch_unwind(AssertUnwindSafe(|| {
            while launch < job.launches {
                task(launch, thread);
                launch += 1;
                if launch < job.launches && !self.barrier() {
                    return;
                }
            }
        }));
        if r.is_err() {
            self.poison(thread, launch);
        }
    }

    /// A worker waits for a job newer than `seen`; None on shutdown.
    fn next_epoch(&self, seen: u64) -> Option<u64> {
        for i in 0..SPINS + YIELDS {
            let e = self.epoch.load(Ordering::Acquire);
            if e != seen {
                return Some(e);
            }
            if self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            if i < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            if e != seen {
                return Some(e);
            }
            if self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn worker(shared: Arc<Shared>, thread: usize) {
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
        let shared = Arc::new(Shared {
            threads,
            epoch: AtomicU64::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            job: UnsafeCell::new(Job { task: None, launches: 0 }),
            arrived: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
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

    /// Runs `launches` launches: every thread calls `task(launch, thread)`
    /// for each launch in order, with a barrier between launches. Returns
    /// when every thread has finished the last one.
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
    /// thread writes its chunk from values every thread wrote in the previous
    /// launch, so a missing barrier shows as a wrong total.
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
                let task = |launch: usize, t: usize| {
                    let (src, dst) = if launch.is_multiple_of(2) { (&a, &b) } else { (&b, &a) };
                    let total: i64 = src.iter().map(|x| x.load(Ordering::Relaxed)).sum();
                    let chunk = n.div_ceil(threads);
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
    fn every_thread_runs_every_launch() {
        let mut team = Team::new(4).unwrap();
        let hits: Vec<AtomicUsize> = (0..4 * 10).map(|_| AtomicUsize::new(0)).collect();
        team.run(10, &|l, t| {
            hits[l * 4 + t].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert_eq!(team.threads(), 4);
    }

    #[test]
    fn a_worker_panic_is_an_error_not_a_hang() {
        let mut team = Team::new(3).unwrap();
        let e = team
            .run(4, &|l, t| {
                if l == 2 && t == 1 {
                    panic!("boom");
                }
            })
            .unwrap_err();
        assert_eq!(e, TeamError::Panicked { thread: 1, launch: 2 });
        assert_eq!(team.run(1, &|_, _| {}).unwrap_err(), TeamError::Poisoned);
        drop(team);
    }

    #[test]
    fn a_caller_panic_is_an_error_too() {
        let mut team = Team::new(2).unwrap();
        let e = team.run(3, &|l, t| assert!(!(l == 0 && t == 0), "boom")).unwrap_err();
        assert_eq!(e, TeamError::Panicked { thread: 0, launch: 0 });
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
        assert_eq!(count.load(Ordering::Relaxed), 3 * 2 * 3);
    }
}
