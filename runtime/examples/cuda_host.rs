//! The host half of a GPU model's decode steps, timed without a GPU:
//! everything `CudaModel::step` does up to its driver calls, on a real plan,
//! with made-up device addresses.
//!
//! ```text
//! smelt make-test-model m16 --arch llama --layers 16 --hidden 128 --intermediate 256 \
//!     --heads 4 --kv-heads 2 --head-dim 32 --vocab 512 --dtype bf16 --max-positions 4096
//! smelt compile m16 -o m16.smelt --target cuda
//! cargo run --release -p smelt-runtime --example cuda_host -- m16.smelt [CTX] [STEPS]
//! ```
//!
//! It fills the cache with a CTX-token prefill (default 512), then times
//! STEPS decode steps (default 200) fed as generation feeds them, and prints
//! the median and minimum time per step of each part, and per launch.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use smelt_runtime::cuda::{CudaError, CudaPlan, DeviceMemory, Host};
use smelt_runtime::generate::cached_step_inputs;
use smelt_runtime::Artifact;

/// Device memory that hands out addresses and allocates nothing, growing
/// like the model's (the arena to what is asked, cache slots by doubling).
struct FakeMemory {
    arena: usize,
    arena_allocs: u64,
    slots: Vec<[usize; 2]>,
    slot_allocs: u64,
}

impl DeviceMemory for FakeMemory {
    fn weights(&self) -> u64 {
        1 << 40
    }

    fn arena(&mut self, bytes: usize) -> Result<u64, CudaError> {
        if bytes > self.arena {
            self.arena = bytes;
            self.arena_allocs += 1;
        }
        Ok(2 << 40)
    }

    fn cache_slot(&mut self, k: usize, slot: usize, bytes: usize) -> Result<u64, CudaError> {
        if self.slots.len() <= k {
            self.slots.resize(k + 1, [0; 2]);
        }
        let have = &mut self.slots[k][slot];
        if *have < bytes {
            *have = bytes.max(*have * 2);
            self.slot_allocs += 1;
        }
        Ok((3 << 40) + ((2 * k + slot) as u64) * (1 << 32))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: cuda_host ARTIFACT [CTX] [STEPS]"));
    let ctx: usize = args.next().map_or(512, |s| s.parse().expect("CTX"));
    let steps: usize = args.next().map_or(200, |s| s.parse().expect("STEPS"));
    let artifact = Artifact::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let m = artifact.manifest();
    let plan = m.cuda.clone().expect("the artifact has no cuda plan");
    let weights_len = std::fs::metadata(dir.join(&plan.weights)).expect("the weights file").len() as usize;
    let sig = m.signature.clone();

    let open = Instant::now();
    let plan = CudaPlan::new(plan, sig.clone(), weights_len).unwrap_or_else(|e| panic!("{e}"));
    let mut host = Host::new(plan);
    let open = open.elapsed();
    let launches = host.plan().plan().launches.len();
    let mut mem = FakeMemory { arena: 0, arena_allocs: 0, slots: Vec::new(), slot_allocs: 0 };

    let names = ["inputs", "prepare", "uploads", "launches", "finish"];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut launched = 0;
    let mut key: Vec<u64> = Vec::new();
    let prompt: Vec<i64> = (0..ctx.max(1) as i64).map(|i| (i * 7919 + 1) % 100).collect();
    for s in 0..=steps {
        let (feed, past) = if s == 0 { (&prompt[..], 0) } else { (&[1i64][..], ctx.max(1) + s - 1) };
        let mut t = [Duration::ZERO; 5];
        let mut tick = Instant::now();
        let mut lap = |i: usize| {
            let now = Instant::now();
            t[i] = now - tick;
            tick = now;
        };
        let inputs = cached_step_inputs(&sig, feed, past).unwrap_or_else(|e| panic!("{e}"));
        lap(0);
        let read = host.prepare_step(inputs, &mut mem).unwrap_or_else(|e| panic!("{e}"));
        lap(1);
        for (_, addr, bytes) in host.uploads() {
            std::hint::black_box((addr, bytes.len()));
        }
        lap(2);
        // What `CudaModel::launch_all` does before its driver calls: the
        // graph key, then one call per launch with its parameters.
        key.clear();
        key.extend_from_slice(host.args());
        launched = 0;
        host.each_launch(|_, kernel, grid, block, params| {
            std::hint::black_box((kernel, grid, block, params.as_ptr(), params.len()));
            launched += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        lap(3);
        host.finish_step();
        lap(4);
        std::hint::black_box(&read);
        if s > 0 {
            for (i, d) in t.into_iter().enumerate() {
                times[i].push(d);
            }
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{}: {launches} launches ({launched} per step), {} buffers; plan checked in {:.1} ms",
        dir.display(),
        host.plan().plan().buffers.len(),
        us(open) / 1e3
    );
    println!("decode steps {}..{} after a {ctx}-token prefill", ctx + 1, ctx + steps);
    let mut total_med = 0.0;
    let mut per_step: Vec<Duration> = (0..steps).map(|i| times.iter().map(|t| t[i]).sum()).collect();
    for (name, t) in names.iter().zip(&mut times) {
        t.sort();
        let med = us(t[t.len() / 2]);
        total_med += med;
        println!("  {name:10} median {med:8.1} us   min {:8.1} us", us(t[0]));
    }
    per_step.sort();
    let med = us(per_step[per_step.len() / 2]);
    println!(
        "  {:10} median {med:8.1} us   min {:8.1} us   ({:.0} ns per launch; sum of medians {total_med:.1} us)",
        "step",
        us(per_step[0]),
        med * 1e3 / launched.max(1) as f64
    );
    println!(
        "placements computed (forward, first step, step): {:?}; arena {} bytes ({} growths), cache slot growths {}",
        host.placements_computed(),
        mem.arena,
        mem.arena_allocs,
        mem.slot_allocs
    );
}
