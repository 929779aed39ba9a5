//! What confinement costs a device: the virtio-blk device model serving 4 KiB
//! random reads (and 1 MiB sequential reads) through a queue in guest
//! memory, once on a thread without a filter and once on a thread under the
//! block role's seccomp filter, batch by batch interleaved, best of several
//! rounds. Start-up cost is measured by `resources/bench/boot-bench.py
//! --confinement`.
//!
//!     cargo bench -p vmm --bench confinement

#[path = "../../devices/benches/common/block_device.rs"]
mod block_device;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use block_device::{BATCH, Device, T_IN, offsets};
use vmm::seccomp::Role;

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(600);

fn run(name: &str, path: &std::path::Path, worker_path: &std::path::Path, random: bool, size: u64) {
    // The filtered device lives on its own thread; it serves a batch per
    // message and answers with its busy time so far.
    let (to_worker, batches) = mpsc::sync_channel::<Option<Vec<u64>>>(0);
    let (to_main, busy_times) = mpsc::sync_channel::<Duration>(0);
    // Its own image: a writable image is locked to one user.
    let worker_path = worker_path.to_path_buf();
    let worker = std::thread::spawn(move || {
        let mut dev = Device::new(&worker_path, size);
        dev.describe(T_IN);
        vmm::seccomp::install(Role::Block).expect("the block filter");
        while let Ok(Some(offs)) = batches.recv() {
            dev.busy = Duration::ZERO;
            dev.batch(T_IN, &offs);
            to_main.send(dev.busy).unwrap();
        }
    });
    let mut dev = Device::new(path, size);
    dev.describe(T_IN);
    let (mut best_open, mut best_filtered) = (0f64, 0f64);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut other_seed = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        dev.busy = Duration::ZERO;
        let mut filtered = Duration::ZERO;
        let mut reqs = 0;
        while start.elapsed() < ROUND_TIME {
            let mine = offsets(random, size, reqs, usize::from(BATCH), &mut seed);
            let theirs = offsets(
                random,
                size,
                reqs + 1000,
                usize::from(BATCH),
                &mut other_seed,
            );
            // Who goes first alternates, so neither always finds the
            // caches as the other left them.
            let worker_first = (reqs / usize::from(BATCH)) % 2 == 1;
            if !worker_first {
                dev.batch(T_IN, &mine);
            }
            to_worker.send(Some(theirs)).unwrap();
            filtered += busy_times.recv().unwrap();
            if worker_first {
                dev.batch(T_IN, &mine);
            }
            reqs += usize::from(BATCH);
        }
        best_open = best_open.max(reqs as f64 / dev.busy.as_secs_f64());
        best_filtered = best_filtered.max(reqs as f64 / filtered.as_secs_f64());
    }
    to_worker.send(None).unwrap();
    worker.join().unwrap();
    let ratio = best_filtered / best_open;
    println!(
        "{name:<24} no filter {best_open:>9.0} req/s | block filter {best_filtered:>9.0} req/s | \
         ratio {ratio:.3} (cost {:+.1}%, target <= 3%: {})",
        (1.0 - ratio) * 100.0,
        if ratio >= 0.97 { "met" } else { "NOT met" }
    );
}

fn main() {
    // The SIGSYS handler, so a missing entry would name itself.
    vmm::seccomp::enable().unwrap();
    let path = block_device::tmpfs_image("confinement-bench");
    let other = block_device::tmpfs_image("confinement-bench-filtered");
    println!(
        "virtio-blk device model with and without the block role's seccomp filter, \
         {BATCH} requests per batch, interleaved, best of {ROUNDS} rounds"
    );
    run("4 KiB random reads", &path, &other, true, 4096);
    run("1 MiB sequential reads", &path, &other, false, 1 << 20);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&other);
}
