//! Fuzzes the virtio-blk device's request handling: the input becomes a
//! split queue (descriptor table, avail ring) and the contents of guest
//! memory (headers, data, segments, indirect tables), and the device serves
//! whatever the avail ring offers, against a small image on tmpfs.
//!
//! Input layout:
//!   byte 0      bit 0: read-only disk; bit 1: DISCARD/WRITE_ZEROES negotiated;
//!               bit 2: FLUSH negotiated; bit 3: EVENT_IDX negotiated
//!   1..257      the 16-entry descriptor table
//!   257..259    avail idx (little-endian)
//!   259..291    the avail ring's 16 entries
//!   291..       guest memory from 0x1000 on
//!
//! Guest memory is two adjacent regions (0-32 KiB, 32-64 KiB: buffers may
//! straddle them), a hole, and a third region at 128-160 KiB.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::block::{Block, disk::DiskImage};
use devices::virtio::{Activation, GuestMemory, Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const DATA: u64 = 0x1000;

struct Devices {
    rw: Block,
    ro: Block,
}

fn devices() -> &'static Mutex<Devices> {
    static DEVICES: OnceLock<Mutex<Devices>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let dir = std::path::Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let make = |name: &str, readonly: bool| {
            let path = dir.join(format!("ligera-fuzz-{}-{name}", std::process::id()));
            std::fs::write(&path, vec![0x5au8; 64 * 512 + 100]).unwrap();
            let disk = DiskImage::open(&path, readonly).unwrap();
            // Open, it needs no name: nothing is left behind in /dev/shm.
            let _ = std::fs::remove_file(&path);
            Block::new(disk, None).unwrap()
        };
        Mutex::new(Devices {
            rw: make("rw.img", false),
            ro: make("ro.img", true),
        })
    })
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x8000),
        (GuestAddress(0x2_0000), 0x8000),
    ])
    .unwrap()
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 291 {
        return;
    }
    let flags = input[0];
    let mem = memory();
    mem.write_slice(&input[1..257], GuestAddress(DESC)).unwrap();
    mem.write_slice(&[0, 0], GuestAddress(AVAIL)).unwrap();
    mem.write_slice(&input[257..259], GuestAddress(AVAIL + 2))
        .unwrap();
    mem.write_slice(&input[259..291], GuestAddress(AVAIL + 4))
        .unwrap();
    let rest = &input[291..];
    let rest = &rest[..rest.len().min(0x1_0000 - DATA as usize)];
    mem.write_slice(rest, GuestAddress(DATA)).unwrap();

    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_size(QSIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(flags & 8 != 0);
    queue.set_ready(true);

    let mut devs = devices().lock().unwrap_or_else(|e| e.into_inner());
    let block = if flags & 1 != 0 {
        &mut devs.ro
    } else {
        &mut devs.rw
    };
    let mut features = 1u64 << 32;
    if flags & 2 != 0 {
        features |= (1 << 13) | (1 << 14);
    }
    if flags & 4 != 0 {
        features |= 1 << 9;
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    block
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            features: features & block.features(),
            interrupt: Arc::new(Interrupt::new(irq)),
        })
        .unwrap();
    // Work past the per-event budget, as the event loop would.
    for _ in 0..4 {
        block.process_queue();
    }
    block.reset();
});
