//! The block device driven through a mock split queue in real guest memory.

use std::path::PathBuf;

use crate::scratch::Scratch;
use virtio_queue::QueueT;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::request::{MAX_DATA_BYTES, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS};
use super::*;

const QSIZE: u16 = 256;
/// Guest memory: two adjacent regions, so a buffer can straddle them.
const REGION: u64 = 0x100_0000;
const SECTORS: u64 = 64;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const INDIRECT: u64 = 0x40_0000;

const R: bool = false;
const W: bool = true;

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap()
}

/// The byte at `offset` of a fresh test image.
fn pattern(offset: u64) -> u8 {
    (offset / 512 * 7 + offset % 251) as u8
}

/// A disk image of `len` bytes of [`pattern`], in its own scratch
/// directory (removed with the returned guard).
fn image(name: &str, len: u64) -> (Scratch, PathBuf) {
    let dir = Scratch::new("blk");
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..len).map(pattern).collect();
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

struct Harness {
    mem: GuestMemory,
    block: Block,
    irq: EventFd,
    path: PathBuf,
    _scratch: Scratch,
    /// Next free descriptor table slot.
    next: u16,
    /// Chains put in the avail ring so far.
    chains: u16,
    avail: GuestAddress,
    used: GuestAddress,
}

fn all_features() -> u64 {
    F_VERSION_1
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
}

impl Harness {
    fn new(name: &str, readonly: bool) -> Harness {
        Harness::with(name, SECTORS * 512, readonly, None, all_features())
    }

    fn with(name: &str, len: u64, readonly: bool, id: Option<&str>, features: u64) -> Harness {
        let (scratch, path) = image(name, len);
        let disk = DiskImage::open(&path, readonly).unwrap();
        let mut block = Block::new(disk, id).unwrap();
        let mem = mem();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // The mock lays out (and zeroes) the rings; made once, as re-making
        // it would zero them again.
        let mock = MockSplitQueue::new(&mem, QSIZE);
        let queue: Queue = mock.create_queue().unwrap();
        let (avail, used) = (mock.avail_addr(), mock.used_addr());
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue],
                features: features & block.features(),
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            })
            .unwrap();
        // Activation kicks the queue so the event loop serves anything queued
        // before DRIVER_OK; the queue is empty here.
        assert_eq!(block.queue_events[0].read().unwrap(), 1);
        Harness {
            mem,
            block,
            irq,
            path,
            _scratch: scratch,
            next: 0,
            chains: 0,
            avail,
            used,
        }
    }

    /// Puts raw descriptors (their own flags and next fields) in the table
    /// from the next free slot and offers the first as a chain head.
    fn offer_raw(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next;
        for (i, d) in descs.iter().enumerate() {
            let slot = u64::from(head) + i as u64;
            self.mem.write_obj(*d, GuestAddress(16 * slot)).unwrap();
        }
        let avail = self.avail;
        let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(head, avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        self.next += descs.len() as u16;
        self.chains += 1;
        head
    }

    /// Offers a chain of (address, length, device-writable) buffers.
    fn offer(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let start = self.next;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let last = i + 1 == bufs.len();
                let flags = if write { VRING_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VRING_DESC_F_NEXT };
                desc(addr, len, flags as u16, start + i as u16 + 1)
            })
            .collect();
        self.offer_raw(&descs)
    }

    /// Writes a request header at HDR.
    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// A standard three-buffer request: header, data, status. Runs it and
    /// returns (status, used length).
    fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_writable: bool) -> (u8, u32) {
        self.header(kind, sector);
        let mut bufs = vec![(HDR, 16, R)];
        if data_len > 0 {
            bufs.push((DATA, data_len, data_writable));
        }
        bufs.push((STATUS, 1, W));
        self.offer(&bufs);
        self.run();
        (self.status(), self.last_used().1)
    }

    fn run(&mut self) {
        self.block.process_queue();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn used_count(&self) -> u16 {
        self.block.running.as_ref().unwrap().queue.next_used()
    }

    /// (descriptor id, length) of used element `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let base = self.used.unchecked_add(4 + 8 * u64::from(i % QSIZE));
        (
            self.mem.read_obj(base).unwrap(),
            self.mem.read_obj(base.unchecked_add(4)).unwrap(),
        )
    }

    fn last_used(&self) -> (u32, u32) {
        assert_eq!(self.used_count(), self.chains, "every chain is used");
        self.used(self.chains - 1)
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bit(b: u32) -> u64 {
    1 << b
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn reads_sectors_into_guest_memory() {
    let mut h = Harness::new("read.img", false);
    let (status, used) = h.request(VIRTIO_BLK_T_IN, 3, 2048, W);
    assert_eq!((status, used), (OK, 2049));
    let want: Vec<u8> = (3 * 512..3 * 512 + 2048).map(pattern).collect();
    assert_eq!(h.data(2048), want);
    assert_eq!(h.irq.read().unwrap(), 1, "used-buffer interrupt");
}

#[test]
fn writes_reach_the_image() {
    let mut h = Harness::new("write.img", false);
    h.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 10, 1024, R), (OK, 1));
    let file = h.file();
    assert!(file[10 * 512..11 * 512 + 512].iter().all(|&b| b == 0x5a));
    assert_eq!(file[9 * 512 + 511], pattern(9 * 512 + 511));
    assert_eq!(file[12 * 512], pattern(12 * 512));
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, 0, R), (OK, 1));
}

#[test]
fn any_framing_is_accepted() {
    let mut h = Harness::new("framing.img", false);
    // OUT: header split 10 + 6, the header's tail sharing a buffer with the
    // first data bytes, data over three buffers, one straddling two memory
    // regions, and the status at the end of a longer writable buffer...
    // which an OUT request must not have: status alone.
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..16].copy_from_slice(&4u64.to_le_bytes());
    h.mem.write_slice(&hdr[..10], GuestAddress(HDR)).unwrap();
    h.mem
        .write_slice(&hdr[10..], GuestAddress(HDR + 0x100))
        .unwrap();
    h.mem
        .write_slice(&[1u8; 100], GuestAddress(HDR + 0x106))
        .unwrap();
    h.mem.write_slice(&[2u8; 312], GuestAddress(DATA)).unwrap();
    h.mem
        .write_slice(&[3u8; 612], GuestAddress(REGION - 300))
        .unwrap();
    h.offer(&[
        (HDR, 10, R),
        (HDR + 0x100, 106, R),
        (DATA, 312, R),
        (REGION - 300, 612, R),
        (STATUS, 1, W),
    ]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (OK, 1));
    let f = h.file();
    let want: Vec<u8> = [vec![1u8; 100], vec![2; 312], vec![3; 612]].concat();
    assert_eq!(&f[4 * 512..6 * 512], &want[..]);

    // IN: data and status share the last writable buffer; data straddles
    // the two memory regions.
    h.header(VIRTIO_BLK_T_IN, 4);
    h.offer(&[
        (HDR, 16, R),
        (REGION - 1000, 600, W),
        (REGION - 400, 425, W),
    ]);
    h.run();
    assert_eq!(h.last_used().1, 1025);
    let mut back = vec![0u8; 1025];
    h.mem
        .read_slice(&mut back, GuestAddress(REGION - 1000))
        .unwrap();
    assert_eq!(&back[..1024], &want[..]);
    assert_eq!(back[1024], OK);
}

#[test]
fn get_id_answers_the_id_or_the_file_name() {
    let mut h = Harness::with("id.img", 4096, false, Some("root-disk"), all_features());
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, 20, W), (OK, 21));
    assert_eq!(&h.data(20), b"root-disk\0\0\0\0\0\0\0\0\0\0\0");
    let mut h = Harness::with(
        "a-rather-long-image-name.img",
        4096,
        true,
        None,
        F_VERSION_1,
    );
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, 20, W), (OK, 21));
    assert_eq!(&h.data(20), b"a-rather-long-image-");
    // A shorter buffer gets what fits; a readable one is refused.
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, 4, W), (OK, 5));
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, 20, R), (IOERR, 1));
}

#[test]
fn sector_ranges_are_bounds_checked() {
    let mut h = Harness::new("bounds.img", false);
    let before = h.file();
    for (kind, sector, len, dir) in [
        (VIRTIO_BLK_T_IN, SECTORS, 512, W),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024, W),
        (VIRTIO_BLK_T_IN, u64::MAX, 512, W),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512, W),
        (VIRTIO_BLK_T_OUT, SECTORS, 512, R),
        (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024, R),
        (VIRTIO_BLK_T_OUT, u64::MAX, 512, R),
    ] {
        assert_eq!(
            h.request(kind, sector, len, dir),
            (IOERR, 1),
            "{kind} {sector} {len}"
        );
    }
    assert_eq!(h.file(), before, "nothing written");
    // The last sector itself is fine.
    assert_eq!(h.request(VIRTIO_BLK_T_IN, SECTORS - 1, 512, W), (OK, 513));
}

#[test]
fn partial_last_sector_is_out_of_reach() {
    let mut h = Harness::with("partial.img", 4 * 512 + 300, false, None, all_features());
    assert_eq!(h.block.config[0..8], 4u64.to_le_bytes());
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 3, 512, W), (OK, 513));
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 4, 512, W), (IOERR, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 4, 512, R), (IOERR, 1));
    assert_eq!(h.file().len(), 4 * 512 + 300, "the image keeps its size");
}

#[test]
fn unknown_types_are_unsupported() {
    let mut h = Harness::new("unsupp.img", false);
    for kind in [2, 5, 9, 10, 14, 15, 16, 0x8000_0000, u32::MAX] {
        assert_eq!(h.request(kind, 0, 512, W), (UNSUPP, 1), "type {kind}");
    }
}

#[test]
fn readonly_disks_fail_writes_and_write_nothing() {
    let mut h = Harness::new("ro.img", true);
    assert_ne!(h.block.features() & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.block.features() & bit(VIRTIO_BLK_F_DISCARD), 0);
    let before = h.file();
    h.mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, 512, R), (IOERR, 1));
    h.mem
        .write_slice(&segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    // Discard / write zeroes were not offered: unsupported.
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, 16, R), (UNSUPP, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, R), (UNSUPP, 1));
    assert_eq!(h.file(), before);
    // Reads and flushes work.
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 512, W), (OK, 513));
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, 0, R), (OK, 1));
}

#[test]
fn sizes_must_be_whole_sectors_and_bounded() {
    let mut h = Harness::new("sizes.img", false);
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 1000, W), (IOERR, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, 100, R), (IOERR, 1));
    let big = Harness::with("big.img", 4 << 20, false, None, all_features());
    let mut big = big;
    assert_eq!(big.request(VIRTIO_BLK_T_IN, 0, MAX_DATA_BYTES, W).0, OK);
    assert_eq!(
        big.request(VIRTIO_BLK_T_IN, 0, MAX_DATA_BYTES + 512, W),
        (IOERR, 1)
    );
}

#[test]
fn buffers_outside_guest_memory_fail_the_request() {
    let mut h = Harness::new("outside.img", false);
    h.header(VIRTIO_BLK_T_IN, 0);
    // Data past the end of guest memory, and straddling its end.
    h.offer(&[(HDR, 16, R), (0x1_0000_0000, 512, W), (STATUS, 1, W)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (IOERR, 1));
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.offer(&[(HDR, 16, R), (2 * REGION - 256, 512, R), (STATUS, 1, W)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (IOERR, 1));
    // A header outside memory.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.offer(&[(u64::MAX - 8, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (IOERR, 1));
    // No usable status byte: nothing can be reported, 0 bytes used.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.offer(&[(HDR, 16, R), (DATA, 512, W), (0x1_0000_0000, 1, W)]);
    h.run();
    assert_eq!(h.last_used().1, 0);
    assert_eq!(h.data(512)[..4], [0u8; 4], "nothing read either");
    // The device carries on.
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 512, W), (OK, 513));
}

#[test]
fn wrong_directions_fail_the_request() {
    let mut h = Harness::new("dirs.img", false);
    let before = h.file();
    // Header in a writable buffer (no readable header at all).
    h.header(VIRTIO_BLK_T_IN, 0);
    h.offer(&[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (IOERR, 1));
    // A read whose data is device-readable.
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 512, R), (IOERR, 1));
    // A write whose data is device-writable.
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, 512, W), (IOERR, 1));
    // Readable after writable.
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.offer(&[(HDR, 16, R), (STATUS, 1, W), (DATA, 512, R), (STATUS, 1, W)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (IOERR, 1));
    // Status byte in a readable buffer: nothing to report into.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.offer(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]);
    h.run();
    assert_eq!(h.last_used().1, 0);
    // A zero-length last buffer, and a chain of only a header.
    h.offer(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)]);
    h.offer(&[(HDR, 16, R)]);
    h.run();
    assert_eq!(h.used(h.chains - 2).1, 0);
    assert_eq!(h.last_used().1, 0);
    // A short header.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.offer(&[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (IOERR, 1));
    assert_eq!(h.file(), before);
}

#[test]
fn descriptor_loops_and_long_chains_are_cut() {
    let mut h = Harness::new("loops.img", false);
    h.header(VIRTIO_BLK_T_IN, 0);
    // A chain whose last descriptor points back at its first.
    let head = h.next;
    h.offer_raw(&[
        desc(HDR, 16, VRING_DESC_F_NEXT as u16, head + 1),
        desc(
            DATA,
            512,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            head + 2,
        ),
        desc(
            STATUS,
            1,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            head,
        ),
    ]);
    // A next index outside the table.
    h.offer_raw(&[desc(HDR, 16, VRING_DESC_F_NEXT as u16, 300)]);
    h.run();
    assert_eq!(h.used(h.chains - 2).1, 0);
    assert_eq!(h.last_used().1, 0);
    assert_eq!(h.status(), 0xff, "no status written");

    // An indirect table longer than MAX_DESCRIPTORS: header, many data
    // buffers, status.
    let n = MAX_DESCRIPTORS + 10;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, VRING_DESC_F_NEXT),
            _ if i == n - 1 => (STATUS, 1, VRING_DESC_F_WRITE),
            _ => (
                DATA + 512 * i as u64,
                512,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            ),
        };
        h.mem
            .write_obj(
                desc(addr, len, flags as u16, i as u16 + 1),
                GuestAddress(INDIRECT + 16 * i as u64),
            )
            .unwrap();
    }
    h.offer_raw(&[desc(
        INDIRECT,
        16 * n as u32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    )]);
    h.run();
    assert_eq!(h.last_used().1, 0);
    // An indirect table that loops.
    h.mem
        .write_obj(
            desc(HDR, 16, VRING_DESC_F_NEXT as u16, 0),
            GuestAddress(INDIRECT),
        )
        .unwrap();
    h.offer_raw(&[desc(INDIRECT, 16 * 4, VRING_DESC_F_INDIRECT as u16, 0)]);
    // An indirect table outside memory, and one of odd length.
    h.offer_raw(&[desc(0x1_0000_0000, 64, VRING_DESC_F_INDIRECT as u16, 0)]);
    h.offer_raw(&[desc(INDIRECT, 17, VRING_DESC_F_INDIRECT as u16, 0)]);
    h.run();
    for back in 1..=3 {
        assert_eq!(h.used(h.chains - back).1, 0);
    }
    // A good indirect request works.
    h.header(VIRTIO_BLK_T_IN, 1);
    for (i, (addr, len, flags)) in [
        (HDR, 16, VRING_DESC_F_NEXT),
        (DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
        (STATUS, 1, VRING_DESC_F_WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        h.mem
            .write_obj(
                desc(addr, len, flags as u16, i as u16 + 1),
                GuestAddress(INDIRECT + 16 * i as u64),
            )
            .unwrap();
    }
    h.offer_raw(&[desc(INDIRECT, 48, VRING_DESC_F_INDIRECT as u16, 0)]);
    h.run();
    assert_eq!((h.status(), h.last_used().1), (OK, 513));
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = Harness::new("discard.img", false);
    // Two write-zeroes segments (one may unmap) and a discard.
    let segs = [
        segment(2, 2, 0),
        segment(8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
    ]
    .concat();
    h.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 32, R), (OK, 1));
    h.mem
        .write_slice(&segment(16, 8, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, 16, R), (OK, 1));
    let f = h.file();
    assert!(f[2 * 512..4 * 512].iter().all(|&b| b == 0));
    assert!(f[8 * 512..9 * 512].iter().all(|&b| b == 0));
    assert_eq!(f[4 * 512], pattern(4 * 512));
    assert_eq!(f[9 * 512], pattern(9 * 512));
    assert_eq!(f.len() as u64, SECTORS * 512);

    // Empty segments are fine (fallocate would refuse a zero length).
    let segs = [segment(3, 0, 0), segment(SECTORS, 0, 0)].concat();
    h.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, 32, R), (OK, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 32, R), (OK, 1));
    assert!(!h.block.warned, "no host error");

    let before = h.file();
    for (kind, segs, status) in [
        // Unknown flags, and unmap on a discard: unsupported.
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1, 2).to_vec(), UNSUPP),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).to_vec(),
            UNSUPP,
        ),
        // Out of range, overflowing, too long, not whole segments, none, too many.
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(SECTORS - 1, 2, 0).to_vec(),
            IOERR,
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(u64::MAX, 1, 0).to_vec(),
            IOERR,
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(0, MAX_DISCARD_SECTORS + 1, 0).to_vec(),
            IOERR,
        ),
        (VIRTIO_BLK_T_DISCARD, segment(0, 1, 0)[..12].to_vec(), IOERR),
        (VIRTIO_BLK_T_DISCARD, Vec::new(), IOERR),
        (VIRTIO_BLK_T_DISCARD, [segment(0, 1, 0); 17].concat(), IOERR),
    ] {
        h.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
        assert_eq!(
            h.request(kind, 0, segs.len() as u32, R),
            (status, 1),
            "{kind} {segs:x?}"
        );
    }
    assert_eq!(h.file(), before, "nothing changed");

    // Without the features negotiated: unsupported.
    let mut h = Harness::with("nodiscard.img", 4096, false, None, F_VERSION_1);
    h.mem
        .write_slice(&segment(0, 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, 16, R), (UNSUPP, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, R), (UNSUPP, 1));
}

#[test]
fn writes_without_negotiated_flush_still_complete() {
    // Write-through: each write is synced before it completes.
    let mut h = Harness::with("wt.img", 4096, false, None, F_VERSION_1);
    h.mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 1, 512, R), (OK, 1));
    assert!(!h.block.running.as_ref().unwrap().flush);
    assert!(h.file()[512..1024].iter().all(|&b| b == 9));
}

#[test]
fn host_io_errors_become_ioerr() {
    let mut h = Harness::new("shrink.img", false);
    // The image shrinks behind the device's back: reads past the new end
    // fail with IOERR rather than returning stale or partial data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&h.path)
        .unwrap()
        .set_len(1024)
        .unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 4, 512, W), (IOERR, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 512, W), (OK, 513));
}

#[test]
fn work_per_event_is_bounded_and_rearmed() {
    let mut h = Harness::new("budget.img", false);
    let total = MAX_CHAINS_PER_EVENT + 20;
    h.header(VIRTIO_BLK_T_IN, 0);
    for _ in 0..total {
        h.offer(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    }
    // The ring has 256 descriptors: reuse slots from the start.
    h.run();
    assert_eq!(usize::from(h.used_count()), MAX_CHAINS_PER_EVENT);
    assert_eq!(h.block.queue_events[0].read().unwrap(), 1, "re-armed");
    assert_eq!(
        h.irq.read().unwrap(),
        1,
        "the driver hears about the first batch"
    );
    h.run();
    assert_eq!(usize::from(h.used_count()), total);
    assert!(
        h.block.queue_events[0].read().is_err(),
        "not re-armed when done"
    );
}

#[test]
fn notifications_before_activation_and_after_reset_are_ignored() {
    let (_scratch, path) = image("early.img", 4096);
    let mut block = Block::new(DiskImage::open(&path, false).unwrap(), None).unwrap();
    block.queue_events[0].write(1).unwrap();
    block.process_queue();
    assert!(block.running.is_none());
    let mut h = Harness::new("reset.img", false);
    h.block.reset();
    h.header(VIRTIO_BLK_T_IN, 0);
    h.offer(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    h.run();
    assert_eq!(h.status(), 0xff);
}

#[test]
fn config_space_describes_the_disk() {
    let h = Harness::new("config.img", false);
    let cfg = |off: u64, len: usize| {
        let mut d = vec![0u8; len];
        h.block.read_config(off, &mut d);
        d
    };
    assert_eq!(cfg(0, 8), SECTORS.to_le_bytes());
    // Byte-wise and 32-bit reads agree.
    assert_eq!(cfg(0, 4), (SECTORS as u32).to_le_bytes());
    assert_eq!(cfg(8, 4), request::SIZE_MAX.to_le_bytes());
    assert_eq!(cfg(12, 4), request::SEG_MAX.to_le_bytes());
    assert_eq!(cfg(20, 4), 512u32.to_le_bytes());
    assert_eq!(cfg(36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(cfg(56, 1), [1]);
    // Reads past the structure are zeros; writes anywhere change nothing.
    assert_eq!(cfg(60, 8), [0; 8]);
    assert_eq!(cfg(u64::MAX, 4), [0; 4]);
    let mut h = h;
    h.block.write_config(0, &[0xff; 8]);
    h.block.write_config(0xe00, &[0xff; 8]);
    h.block.write_config(u64::MAX, &[0xff; 4]);
    let mut d = [0u8; 8];
    h.block.read_config(0, &mut d);
    assert_eq!(d, SECTORS.to_le_bytes());
    // Features: what the spec needs, RO only when read-only.
    let f = h.block.features();
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & F_VERSION_1, 0);
}

#[test]
fn the_transport_refuses_bad_queues_for_the_block_device() {
    use crate::BusDevice;
    use crate::virtio::mmio::{MmioTransport, STATUS_NEEDS_RESET};
    use std::sync::Mutex;
    let (_scratch, path) = image("transport.img", 4096);
    for (size, ok) in [
        (256u32, true),
        (128, true),
        (12, false),
        (512, false),
        (0, false),
    ] {
        let block = Block::new(DiskImage::open(&path, true).unwrap(), None).unwrap();
        let dev = Arc::new(Mutex::new(block));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new("blk", dev.clone(), mem(), Arc::new(Interrupt::new(irq)));
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(&mut t, 0x70, 11);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, size);
        w(&mut t, 0x80, 0x1_0000);
        w(&mut t, 0x90, 0x2_0000);
        w(&mut t, 0xa0, 0x3_0000);
        w(&mut t, 0x44, 1);
        // A notification before DRIVER_OK: nothing happens.
        dev.lock().unwrap().queue_events[0].write(1).unwrap();
        dev.lock().unwrap().process_queue();
        w(&mut t, 0x70, 15);
        let mut s = [0u8; 4];
        t.read(0x70, &mut s);
        let needs_reset = u32::from_le_bytes(s) & STATUS_NEEDS_RESET != 0;
        assert_eq!(needs_reset, !ok, "size {size}");
        assert_eq!(dev.lock().unwrap().running.is_some(), ok, "size {size}");
        // Config space through the transport, in and out of range.
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        t.write(0x100, &[0; 8]);
        t.write(0xfff, &[0; 1]);
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
    }
}

/// Found by the fuzzer: an avail index more than a queue's worth ahead made
/// `enable_notification` report work forever that `pop_descriptor_chain`
/// refused to hand out, and the device spun on the event loop.
#[test]
fn an_avail_index_far_ahead_does_not_hang_the_device() {
    for event_idx in [false, true] {
        let features = all_features() | if event_idx { F_EVENT_IDX } else { 0 };
        let mut h = Harness::with("ahead.img", 4096, false, None, features);
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 512, W), (OK, 513));
        h.mem.write_obj(1000u16, h.avail.unchecked_add(2)).unwrap();
        h.run();
        assert_eq!(h.used_count(), 1, "nothing served from a broken ring");
        assert!(h.block.queue_events[0].read().is_err(), "and not re-armed");
        // The driver fixes its index: the device serves again.
        h.mem.write_obj(h.chains, h.avail.unchecked_add(2)).unwrap();
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, 512, W), (OK, 513));
    }
}
