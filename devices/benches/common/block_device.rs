//! The virtio-blk device model driven through a queue in guest memory, as a
//! driver would: shared by `devices/benches/block.rs` (device vs host
//! pread/pwrite) and `vmm/benches/confinement.rs` (device with and without
//! its seccomp filter).
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, disk::DiskImage};
use devices::virtio::{Activation, GuestMemory, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const IMAGE_SIZE: u64 = 256 << 20;
const QSIZE: u16 = 256;
/// Requests in flight per batch (three descriptors each).
pub const BATCH: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;

pub struct Device {
    mem: GuestMemory,
    block: Block,
    irq: EventFd,
    next_avail: u16,
    req_size: u64,
    /// Time spent in the device (serving queues), not in the driver's
    /// preparation of the requests.
    pub busy: Duration,
}

impl Device {
    pub fn new(path: &std::path::Path, req_size: u64) -> Device {
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
    pub fn describe(&self, kind: u32) {
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
    pub fn batch(&mut self, kind: u32, offsets: &[u64]) {
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
pub fn offsets(random: bool, size: u64, start: usize, count: usize, seed: &mut u64) -> Vec<u64> {
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

/// A fully written (not sparse) image of IMAGE_SIZE in /dev/shm (tmpfs),
/// so every read hits real pages; the caller removes it.
pub fn tmpfs_image(tag: &str) -> PathBuf {
    let dir = Path::new("/dev/shm");
    assert!(dir.is_dir(), "the benchmark needs /dev/shm (tmpfs)");
    let path = dir.join(format!("ligera-{tag}-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..IMAGE_SIZE >> 20 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    path
}
