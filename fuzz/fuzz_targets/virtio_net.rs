//! Fuzzes the virtio-net device: the input becomes both split queues
//! (descriptor tables, avail rings), the contents of guest memory (frames,
//! buffers, indirect tables) and the frames the backend hands over; the
//! device transmits whatever the TX avail ring offers and fills whatever the
//! RX avail ring offers, against a datagram socket pair in place of the tap.
//!
//! Input layout:
//!   byte 0      bit 0: MRG_RXBUF; bit 1: CSUM, HOST_TSO4/6, HOST_ECN;
//!               bit 2: GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN; bit 3: EVENT_IDX;
//!               bit 4: reset and activate again half-way; bit 5: frames for
//!               the guest are 4,500 bytes longer (up to 70,035)
//!   byte 1      frames the backend has for the guest (low 3 bits)
//!   2..4        their length (little-endian; each frame is the input's
//!               guest-memory part, repeated, from a different offset)
//!   4..260      the RX queue's 16 descriptors
//!   260..262    RX avail idx; 262..294 its ring
//!   294..550    the TX queue's 16 descriptors
//!   550..552    TX avail idx; 552..584 its ring
//!   584..       guest memory from 0x1000 on
//!
//! Guest memory is two adjacent regions (0-32 KiB, 32-64 KiB: buffers may
//! straddle them), a hole, and a third region at 128-160 KiB.
//!
//! Besides "no panic, no hang", it checks that every frame the device sends
//! is one it may send (a header and an Ethernet header at least, at most
//! 65,562 bytes, offloads only as negotiated), and that its counters add up.
//! (It does not check the used rings: the guest may place receive buffers
//! over its own rings, as the first finding showed; see fuzz/README.md.)
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use devices::virtio::net::chain::{HDR_LEN, MAX_TX_FRAME, check_tx_header};
use devices::virtio::net::{
    F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_ECN, F_HOST_TSO4,
    F_HOST_TSO6, F_MAC, F_MRG_RXBUF, Net, RX_QUEUE, TX_QUEUE,
};
use devices::virtio::{Activation, F_EVENT_IDX, F_VERSION_1, GuestMemory, Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
/// Descriptor table, avail ring and used ring of each queue.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x100, 0x200), (0x400, 0x500, 0x600)];
const DATA: u64 = 0x1000;
const HEADER: usize = 4;
const QUEUE_BYTES: usize = 16 * 16 + 2 + 32;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x8000),
        (GuestAddress(0x2_0000), 0x8000),
    ])
    .unwrap()
}

fn features(flags: u8) -> u64 {
    let mut f = F_VERSION_1 | F_MAC;
    if flags & 1 != 0 {
        f |= F_MRG_RXBUF;
    }
    if flags & 2 != 0 {
        f |= F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN;
    }
    if flags & 4 != 0 {
        f |= F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN;
    }
    if flags & 8 != 0 {
        f |= F_EVENT_IDX;
    }
    f
}

fn queues(features: u64) -> Vec<Queue> {
    RINGS
        .iter()
        .map(|&(desc, avail, used)| {
            let mut q = Queue::new(QSIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            q.set_event_idx(features & F_EVENT_IDX != 0);
            q.set_ready(true);
            q
        })
        .collect()
}

fn activate(net: &mut Net<UnixDatagram>, mem: &GuestMemory, features: u64, irq: &EventFd) {
    net.activate(Activation {
        mem: mem.clone(),
        queues: queues(features),
        features,
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
    })
    .unwrap();
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER + 2 * QUEUE_BYTES {
        return;
    }
    let flags = data[0];
    let features = features(flags);
    let frames = usize::from(data[1] & 7);
    let mut frame_len = usize::from(u16::from_le_bytes([data[2], data[3]]));
    if flags & 0x20 != 0 {
        frame_len += 4500;
    }
    let mem = memory();
    for (q, &(desc, avail, _)) in RINGS.iter().enumerate() {
        let part = &data[HEADER + q * QUEUE_BYTES..HEADER + (q + 1) * QUEUE_BYTES];
        mem.write_slice(&part[..256], GuestAddress(desc)).unwrap();
        mem.write_slice(&part[256..], GuestAddress(avail + 2))
            .unwrap();
    }
    let contents = &data[HEADER + 2 * QUEUE_BYTES..];
    let n = contents.len().min(0xf000);
    mem.write_slice(&contents[..n], GuestAddress(DATA)).unwrap();

    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    // Frames for the guest: slices of the input, or short ones.
    for i in 0..frames {
        let start = (i * 97).min(contents.len());
        let mut frame: Vec<u8> = contents[start..]
            .iter()
            .copied()
            .cycle()
            .take(frame_len)
            .collect();
        if frame.is_empty() {
            frame = vec![0u8; frame_len];
        }
        let _ = host.send(&frame);
    }

    let mut net = Net::new(dev_end, [2, 0, 0, 0, 0, 1]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    activate(&mut net, &mem, features, &irq);
    let mut buf = vec![0u8; 70_000];
    let mut sent = 0u64;
    for round in 0..3 {
        if round == 1 && flags & 0x10 != 0 {
            net.reset();
            activate(&mut net, &mem, features, &irq);
        }
        net.notified(TX_QUEUE);
        net.notified(RX_QUEUE);
        net.process_tx();
        while let Ok(len) = host.recv(&mut buf) {
            assert!(
                len >= HDR_LEN + 14 && len <= MAX_TX_FRAME,
                "{len}-byte frame sent"
            );
            let header: &[u8; HDR_LEN] = buf[..HDR_LEN].try_into().unwrap();
            assert_eq!(check_tx_header(header, len, features), Ok(()));
            sent += 1;
        }
    }
    let s = net.stats();
    assert!(s.rx_frames + s.rx_dropped <= frames as u64, "{s:?}");
    assert_eq!(s.tx_frames, sent, "{s:?}");
});
