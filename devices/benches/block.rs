//! virtio-blk throughput of the device model against the same I/O done by
//! a plain host process.
//!
//! The device side: requests are put in a split queue in guest memory (as a
//! driver would: header, data buffer, status), the device is told to serve
//! the queue (parse, preadv/pwritev between the image and guest memory, used
//! ring, interrupt), until every request is back; the time counted is the
//! device's. The host side: the same offsets with pread/pwrite, into (from)
//! as many buffers of the bench process. Both on the same image in /dev/shm
//! (tmpfs), interleaved batch by batch, best of several rounds.
//!
//!     cargo bench -p devices --bench block

#[path = "common/block_device.rs"]
mod block_device;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use block_device::{BATCH, Device, IMAGE_SIZE, T_IN, T_OUT, offsets};

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(600);

struct Figure {
    reqs_per_s: f64,
    mib_per_s: f64,
}

fn figure(reqs: usize, size: u64, t: Duration) -> Figure {
    let s = t.as_secs_f64();
    Figure {
        reqs_per_s: reqs as f64 / s,
        mib_per_s: reqs as f64 * size as f64 / (1 << 20) as f64 / s,
    }
}

fn run(name: &str, path: &std::path::Path, kind: u32, random: bool, size: u64) {
    let mut dev = Device::new(path, size);
    dev.describe(kind);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // The host reads into (writes from) as many buffers as the device's
    // requests use, in the same rotation, so both touch the same amount of
    // memory.
    // Page-aligned, as the guest's buffers are (a heap block of this size
    // starts 16 bytes into a page, which makes every copy straddle pages).
    let mut heap = vec![1u8; size as usize * usize::from(BATCH) + 4096];
    let skew = heap.as_ptr().align_offset(4096);
    let bufs = &mut heap[skew..];
    let mut best_dev: Option<Figure> = None;
    let mut best_host: Option<Figure> = None;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut host_seed = 0x9e37_79b9_7f4a_7c15_u64;
    let slots = (IMAGE_SIZE / size) as usize;
    for _ in 0..ROUNDS {
        // Batch by batch, the device serves 64 requests, then the host does
        // the same I/O; only the device's serving time counts on its side
        // (not the driver's filling of the queue). Interleaving makes both
        // see the same noise from other work on the machine.
        let start = Instant::now();
        dev.busy = Duration::ZERO;
        let mut host = Duration::ZERO;
        let mut reqs = 0;
        while start.elapsed() < ROUND_TIME {
            let offs = offsets(random, size, reqs, usize::from(BATCH), &mut seed);
            dev.batch(kind, &offs);
            // Its own offsets (the same kind of sequence from elsewhere in
            // the image): the device's would still be in the CPU caches.
            let host_offs = offsets(random, size, reqs + slots / 2, offs.len(), &mut host_seed);
            let t = Instant::now();
            for (i, &off) in host_offs.iter().enumerate() {
                let slot = i * size as usize;
                let buf = &mut bufs[slot..slot + size as usize];
                if kind == T_IN {
                    file.read_exact_at(buf, off).unwrap();
                } else {
                    file.write_all_at(buf, off).unwrap();
                }
            }
            host += t.elapsed();
            reqs += offs.len();
        }
        let d = figure(reqs, size, dev.busy);
        let h = figure(reqs, size, host);
        if best_dev
            .as_ref()
            .is_none_or(|b| d.reqs_per_s > b.reqs_per_s)
        {
            best_dev = Some(d);
        }
        if best_host
            .as_ref()
            .is_none_or(|b| h.reqs_per_s > b.reqs_per_s)
        {
            best_host = Some(h);
        }
    }
    let (d, h) = (best_dev.unwrap(), best_host.unwrap());
    println!(
        "{name:<28} device {:>9.0} req/s {:>8.0} MiB/s | host {:>9.0} req/s {:>8.0} MiB/s | ratio {:.2}",
        d.reqs_per_s,
        d.mib_per_s,
        h.reqs_per_s,
        h.mib_per_s,
        d.reqs_per_s / h.reqs_per_s
    );
}

fn main() {
    let path = block_device::tmpfs_image("blk-bench");
    println!(
        "virtio-blk device model vs. host pread/pwrite, {} MiB image on tmpfs, {BATCH} requests per batch, best of {ROUNDS}",
        IMAGE_SIZE >> 20
    );
    // `cargo bench -p devices --bench block -- WORD` runs the cases whose
    // name contains WORD.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (name, kind, random, size) in [
        ("4 KiB random reads", T_IN, true, 4096),
        ("1 MiB sequential reads", T_IN, false, 1 << 20),
        ("1 MiB sequential writes", T_OUT, false, 1 << 20),
    ] {
        if filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())) {
            run(name, &path, kind, random, size);
        }
    }
    let _ = std::fs::remove_file(&path);
}
