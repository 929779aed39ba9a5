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

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, disk::DiskImage};
use devices::virtio::{Activation, GuestMemory, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const IMAGE_SIZE: u64 = 256 << 20;
const QSIZE: u16 = 256;
/// Requests in flight per batch (three descriptors each).
const BATCH: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(600);

const T_IN: u32 = 0;
const T_OUT: u32 = 1;

struct Device {
    mem: GuestMemory,
    block: Block,
    irq: EventFd,
    next_avail: u16,
    req_size: u64,
    /// Time spent in the device (serving queues), not in the driver's
    /// preparation of the requests.
    busy: Duration,
}

impl Device {
    fn new(path: &std::path::Path, req_size: u64) -> Device {
        let mem_size = DATA + u64::from(BATCH) * req_size;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let mut block = Block::new(DiskImage::open(path, false).unwrap(), None).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_event_idx(true);
        queue.set_ready(true);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let features = block.features();
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue],
                features,
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            })
            .unwrap();
        // Touch the data buffers once, as a running guest would have.
        mem.write_slice(&vec![1u8; (mem_size - DATA) as usize], GuestAddress(DATA))
            .unwrap();
        Device {
            mem,
            block,
            irq,
            next_avail: 0,
            req_size,
            busy: Duration::ZERO,
        }
    }

    /// Lays out the descriptors of a batch: request `i` has a header, its
    /// own data buffer and a status byte.
    fn describe(&self, kind: u32) {
        for i in 0..u64::from(BATCH) {
            let write = if kind == T_IN { 2u16 } else { 0 };
            let d = |slot: u64, addr: u64, len: u32, flags: u16, next: u16| {
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..16].copy_from_slice(&next.to_le_bytes());
                self.mem
                    .write_slice(&b, GuestAddress(DESC + 16 * slot))
                    .unwrap();
            };
            let s = 3 * i;
            d(s, HEADERS + 16 * i, 16, 1, (s + 1) as u16);
            d(
                s + 1,
                DATA + i * self.req_size,
                self.req_size as u32,
                write | 1,
                (s + 2) as u16,
            );
            d(s + 2, STATUS + i, 1, 2, 0);
        }
    }

    /// Serves one batch of requests of `kind` at byte `offsets`.
    fn batch(&mut self, kind: u32, offsets: &[u64]) {
        let n = offsets.len();
        self.mem
            .write_slice(&vec![0xffu8; n], GuestAddress(STATUS))
            .unwrap();
        for (i, off) in offsets.iter().enumerate() {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&(off / 512).to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(HEADERS + 16 * i as u64))
                .unwrap();
            let slot = self.next_avail.wrapping_add(i as u16) % QSIZE;
            self.mem
                .write_obj(3 * i as u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
        }
        self.next_avail = self.next_avail.wrapping_add(offsets.len() as u16);
        // Ask for an interrupt only after the whole batch (used_event).
        self.mem
            .write_obj(
                self.next_avail.wrapping_sub(1),
                GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)),
            )
            .unwrap();
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
        let start = Instant::now();
        loop {
            self.block.process_queue();
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if used == self.next_avail {
                break;
            }
        }
        self.busy += start.elapsed();
        let _ = self.irq.read();
        let mut status = vec![0xffu8; n];
        self.mem
            .read_slice(&mut status, GuestAddress(STATUS))
            .unwrap();
        assert!(status.iter().all(|&s| s == 0), "a request failed");
    }
}

/// The offsets of the next `count` requests: random 4 KiB-aligned ones,
/// or sequential from request number `start` on.
fn offsets(random: bool, size: u64, start: usize, count: usize, seed: &mut u64) -> Vec<u64> {
    let slots = IMAGE_SIZE / size;
    (start..start + count)
        .map(|i| {
            if random {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % (IMAGE_SIZE / 4096 - size / 4096)) * 4096
            } else {
                (i as u64 % slots) * size
            }
        })
        .collect()
}

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
    let dir = std::path::Path::new("/dev/shm");
    assert!(dir.is_dir(), "the benchmark needs /dev/shm (tmpfs)");
    let path = dir.join(format!("ligera-blk-bench-{}.img", std::process::id()));
    {
        let f = std::fs::File::create(&path).unwrap();
        // Written, not sparse: every read hits real pages.
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..IMAGE_SIZE >> 20 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
    }
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
