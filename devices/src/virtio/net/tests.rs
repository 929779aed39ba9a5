//! The network device against queues in real guest memory (virtio-queue's
//! mock driver) and a datagram socket pair in place of the tap.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::chain::{GSO_TCPV4, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM};
use super::*;
use crate::BusDevice;
use crate::virtio::mmio::{self, MmioTransport};

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
/// Where test buffers live (the rings are below).
const DATA: u64 = 0x10_0000;

/// Each queue's descriptor table; its avail ring a page on, its used ring
/// two pages on.
const RING_BASE: [u64; 2] = [0, 0x8_0000];

fn avail_addr(q: usize) -> u64 {
    RING_BASE[q] + 0x1000
}

fn used_addr(q: usize) -> u64 {
    RING_BASE[q] + 0x2000
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// A pretend driver: guest memory with both rings, the device on a socket
/// pair, and the host end of the pair.
///
/// The descriptor tables are virtio-queue's mock ones; the avail and used
/// rings are placed here, a page apart: the mock (0.18) places its used ring
/// `len` bytes after the avail ring's entries start instead of `2 * len`,
/// so the two overlap once more than half the entries are in use.
struct Guest {
    mem: &'static GuestMemory,
    rx: MockSplitQueue<'static, GuestMemory>,
    tx: MockSplitQueue<'static, GuestMemory>,
    size: u16,
    next_desc: [u16; 2],
    next_used: [u16; 2],
    net: Net<UnixDatagram>,
    host: UnixDatagram,
    irq: EventFd,
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    f[..HDR_LEN].fill(0);
    f
}

impl Guest {
    fn new(features: u64) -> Guest {
        Guest::with_size(features, 16)
    }

    fn with_size(features: u64, size: u16) -> Guest {
        let mem: &'static GuestMemory = Box::leak(Box::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(mem, GuestAddress(RING_BASE[RX_QUEUE]), size);
        let tx = MockSplitQueue::create(mem, GuestAddress(RING_BASE[TX_QUEUE]), size);
        let (dev_end, host) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut g = Guest {
            mem,
            rx,
            tx,
            size,
            next_desc: [0, 0],
            next_used: [0, 0],
            net: Net::new(dev_end, MAC).unwrap(),
            host,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        g.activate(features).unwrap();
        g
    }

    fn activate(&mut self, features: u64) -> Result<(), ActivateError> {
        let event_idx = features & F_EVENT_IDX != 0;
        let queues = [RX_QUEUE, TX_QUEUE].map(|q| {
            for addr in [avail_addr(q), used_addr(q)] {
                self.mem
                    .write_slice(&[0u8; 0x1000], GuestAddress(addr))
                    .unwrap();
            }
            let mut queue = Queue::new(self.size).unwrap();
            queue
                .try_set_desc_table_address(GuestAddress(RING_BASE[q]))
                .unwrap();
            queue
                .try_set_avail_ring_address(GuestAddress(avail_addr(q)))
                .unwrap();
            queue
                .try_set_used_ring_address(GuestAddress(used_addr(q)))
                .unwrap();
            queue.set_ready(true);
            queue.set_event_idx(event_idx);
            queue
        });
        self.next_used = [0, 0];
        self.net.activate(Activation {
            mem: self.mem.clone(),
            queues: queues.into(),
            features,
            interrupt: Arc::new(Interrupt::new(self.irq.try_clone().unwrap())),
        })?;
        // Activation kicks both queues for the event loop; tests drive the
        // device by hand.
        let _ = self.net.queue_events[RX_QUEUE].read();
        let _ = self.net.queue_events[TX_QUEUE].read();
        Ok(())
    }

    fn queue(&self, q: usize) -> &MockSplitQueue<'static, GuestMemory> {
        if q == RX_QUEUE { &self.rx } else { &self.tx }
    }

    /// Makes a chain of `descs` available in queue `q`; returns its head.
    fn post(&mut self, q: usize, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc[q];
        let chained: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let s = SplitDescriptor::from(*raw);
                let last = i + 1 == descs.len();
                let flags = if last { s.flags() } else { s.flags() | N };
                let next = (head + i as u16 + 1) % self.size;
                RawDescriptor::from(SplitDescriptor::new(s.addr().0, s.len(), flags, next))
            })
            .collect();
        for (i, raw) in chained.iter().enumerate() {
            self.queue(q)
                .desc_table()
                .store((head + i as u16) % self.size, *raw)
                .unwrap();
        }
        self.push_avail(q, head);
        self.next_desc[q] = (head + descs.len() as u16) % self.size;
        head
    }

    fn push_avail(&self, q: usize, head: u16) {
        let avail = avail_addr(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        self.mem
            .write_obj(
                head,
                GuestAddress(avail + 4 + 2 * u64::from(idx % self.size)),
            )
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Puts `data` in guest memory and queues it for transmission in
    /// descriptors of at most `piece` bytes.
    fn send(&mut self, addr: u64, data: &[u8], piece: usize) -> u16 {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        let descs: Vec<RawDescriptor> = data
            .chunks(piece)
            .scan(addr, |a, c| {
                let desc = d(*a, c.len() as u32, 0);
                *a += c.len() as u64;
                Some(desc)
            })
            .collect();
        self.post(TX_QUEUE, &descs)
    }

    /// Used elements (head, length) added since the last call.
    fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = used_addr(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.next_used[q] != idx {
            let slot = u64::from(self.next_used[q] % self.size);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(used + 8 + 8 * slot))
                .unwrap();
            out.push((id, len));
            self.next_used[q] = self.next_used[q].wrapping_add(1);
        }
        out
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }

    /// Frames the device sent to the host end, without waiting.
    fn host_frames(&self) -> Vec<Vec<u8>> {
        self.host.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        self.host.set_nonblocking(false).unwrap();
        out
    }
}

const BASIC: u64 = F_VERSION_1 | F_MAC;

#[test]
fn transmits_frames_byte_for_byte() {
    let mut g = Guest::with_size(BASIC | F_EVENT_IDX, 64);
    let a = frame(60, 1);
    let b = frame(1514, 2);
    let c = frame(200, 3);
    let heads = [
        g.send(DATA, &a, 60),
        g.send(DATA + 0x1000, &b, 100), // 16 descriptors
        g.send(DATA + 0x2000, &c, 7),   // header split over two
    ];
    g.net.process_tx();
    assert_eq!(g.host_frames(), vec![a, b, c]);
    let used = g.used(TX_QUEUE);
    assert_eq!(
        used,
        heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>()
    );
    assert!(g.interrupted());
    let s = g.net.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (3, 0));
    assert_eq!(s.tx_bytes, (60 + 1514 + 200 - 3 * HDR_LEN) as u64);
}

#[test]
fn bad_transmit_chains_are_dropped_and_the_device_carries_on() {
    let mut g = Guest::with_size(BASIC, 64);
    let good = frame(100, 9);
    g.mem.write_slice(&good, GuestAddress(DATA)).unwrap();
    let mut csum = frame(100, 9);
    csum[0] = HDR_F_NEEDS_CSUM;
    csum[6] = 34;
    csum[8] = 16;
    g.mem
        .write_slice(&csum, GuestAddress(DATA + 0x1000))
        .unwrap();
    let mut gso = frame(100, 9);
    gso[1] = GSO_TCPV4;
    g.mem
        .write_slice(&gso, GuestAddress(DATA + 0x2000))
        .unwrap();
    let bad: Vec<Vec<RawDescriptor>> = vec![
        vec![d(DATA, 100, W)],                           // device-writable
        vec![d(DATA, 20, 0), d(DATA + 20, 80, W)],       // writable after readable
        vec![d(0xff_fff0, 100, 0)],                      // past the end of memory
        vec![d(0x4000_0000, 100, 0)],                    // nowhere
        vec![d(DATA, 0x2_0000, 0)],                      // longer than 65562
        vec![d(DATA, 20, 0)],                            // runt
        vec![d(DATA + 0x1000, 100, 0)],                  // CSUM not negotiated
        vec![d(DATA + 0x2000, 100, 0)],                  // TSO not negotiated
        vec![d(DATA, 17, VRING_DESC_F_INDIRECT as u16)], // indirect table of a bad size
    ];
    let mut heads = Vec::new();
    for chain in &bad {
        heads.push(g.post(TX_QUEUE, chain));
    }
    // A loop: a descriptor that points to itself.
    let head = g.next_desc[TX_QUEUE];
    g.tx.desc_table()
        .store(
            head,
            RawDescriptor::from(SplitDescriptor::new(DATA, 10, N, head)),
        )
        .unwrap();
    g.push_avail(TX_QUEUE, head);
    g.next_desc[TX_QUEUE] += 1;
    heads.push(head);
    let last = g.post(TX_QUEUE, &[d(DATA, 100, 0)]);
    g.net.process_tx();
    assert_eq!(g.host_frames(), vec![good]);
    let used = g.used(TX_QUEUE);
    heads.push(last);
    assert_eq!(
        used,
        heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>()
    );
    let s = g.net.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (1, bad.len() as u64 + 1));
}

#[test]
fn transmit_offloads_pass_when_negotiated() {
    let mut g = Guest::new(BASIC | F_CSUM | F_HOST_TSO4);
    let mut f = frame(2000, 4);
    f[0] = HDR_F_NEEDS_CSUM;
    f[1] = GSO_TCPV4;
    f[6] = 34;
    f[8] = 16;
    g.send(DATA, &f, 2000);
    g.net.process_tx();
    assert_eq!(g.host_frames(), vec![f]);
}

#[test]
fn transmit_work_per_event_is_bounded_and_rearmed() {
    let mut g = Guest::with_size(BASIC, 256);
    let f = frame(64, 5);
    for i in 0..200u64 {
        g.send(DATA + i * 0x100, &f, 64);
    }
    // The socket pair holds only a few datagrams: drain it as we go.
    let mut received = 0;
    let drain = std::thread::spawn({
        let host = g.host.try_clone().unwrap();
        move || {
            let mut buf = [0u8; 100];
            let mut n = 0;
            while n < 200 && host.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        }
    });
    let mut rounds = 0;
    loop {
        g.net.process_tx();
        rounds += 1;
        let used = g.used(TX_QUEUE).len();
        received += used;
        let rearmed = g.net.queue_events[TX_QUEUE].read().is_ok();
        if received == 200 {
            break;
        }
        // Either the budget ran out (and the device re-armed itself), or the
        // socket was full (and the device waits for it to drain).
        assert!(
            rearmed || g.net.tx_backlog.is_some(),
            "round {rounds}: {received}"
        );
        assert!(used <= BUDGET + 1, "{used} frames in one event");
        if !rearmed {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(rounds < 10_000);
    }
    assert_eq!(drain.join().unwrap(), 200);
    assert!(rounds >= 200 / (BUDGET + 1));
}

#[test]
fn receives_into_posted_buffers() {
    let mut g = Guest::new(BASIC | F_EVENT_IDX);
    let head = g.post(RX_QUEUE, &[d(DATA, 1526, W)]);
    let mut f = frame(1000, 6);
    f[0] = HDR_F_DATA_VALID; // the tap may say so; this driver did not ask
    g.host.send(&f).unwrap();
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), vec![(u32::from(head), 1000)]);
    let got = g.read(DATA, 1000);
    assert_eq!(got[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
    assert!(g.interrupted());
    let s = g.net.stats();
    assert_eq!((s.rx_frames, s.rx_bytes), (1, 1000 - HDR_LEN as u64));
}

#[test]
fn without_buffers_the_tap_is_left_alone_until_the_guest_posts() {
    let mut g = Guest::new(BASIC | F_EVENT_IDX);
    let f = frame(100, 7);
    g.host.send(&f).unwrap();
    g.net.process_rx();
    assert!(g.net.running.as_ref().unwrap().rx_waiting);
    assert_eq!(g.net.wanted_events(), EventSet::empty());
    assert_eq!(g.net.rx_pending, None, "not read: no buffer to put it in");
    // EVENT_IDX: the driver is asked to notify when it adds the next buffer.
    let avail_event: u16 = g
        .mem
        .read_obj(GuestAddress(used_addr(RX_QUEUE) + 4 + 8 * 16))
        .unwrap();
    assert_eq!(avail_event, 0);
    let head = g.post(RX_QUEUE, &[d(DATA, 200, W)]);
    g.net.notified(RX_QUEUE);
    assert_eq!(g.used(RX_QUEUE), vec![(u32::from(head), 100)]);
    assert_eq!(&g.read(DATA + 12, 88)[..], &f[12..]);
    // That was its only buffer: the device waits for the next one.
    assert_eq!(g.net.wanted_events(), EventSet::empty());
    g.post(RX_QUEUE, &[d(DATA, 200, W)]);
    g.net.notified(RX_QUEUE);
    assert_eq!(g.net.wanted_events(), EventSet::IN);
}

#[test]
fn mergeable_buffers_take_a_frame_in_pieces() {
    let mut g = Guest::new(BASIC | F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
    let heads: Vec<u16> = (0..2)
        .map(|i| g.post(RX_QUEUE, &[d(DATA + i * 0x1000, 1000, W)]))
        .collect();
    let mut f = frame(2500, 8);
    f[0] = HDR_F_NEEDS_CSUM;
    f[1] = GSO_TCPV4;
    g.host.send(&f).unwrap();
    g.net.process_rx();
    // Two buffers are not enough: the frame waits, nothing is used.
    assert_eq!(g.used(RX_QUEUE), vec![]);
    assert_eq!(g.net.rx_pending, Some(2500));
    assert!(g.net.running.as_ref().unwrap().rx_waiting);
    let third = g.post(
        RX_QUEUE,
        &[d(DATA + 0x2000, 600, W), d(DATA + 0x3000, 600, W)],
    );
    g.net.notified(RX_QUEUE);
    assert_eq!(
        g.used(RX_QUEUE),
        vec![
            (u32::from(heads[0]), 1000),
            (u32::from(heads[1]), 1000),
            (u32::from(third), 500)
        ]
    );
    let mut got = g.read(DATA, 1000);
    got.extend(g.read(DATA + 0x1000, 1000));
    got.extend(g.read(DATA + 0x2000, 500));
    assert_eq!(&got[..2], &[HDR_F_NEEDS_CSUM, GSO_TCPV4]);
    assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn mergeable_frame_larger_than_every_buffer_together_is_dropped() {
    let mut g = Guest::new(BASIC | F_MRG_RXBUF);
    for i in 0..16 {
        g.post(RX_QUEUE, &[d(DATA + i * 0x100, 100, W)]);
    }
    g.host.send(&frame(5000, 1)).unwrap();
    g.host.send(&frame(300, 2)).unwrap();
    g.net.process_rx();
    let used = g.used(RX_QUEUE);
    assert_eq!(used, vec![(0, 100), (1, 100), (2, 100)], "the second frame");
    assert_eq!(g.net.stats().rx_dropped, 1);
}

#[test]
fn small_buffers_drop_large_frames_but_keep_for_small_ones() {
    let mut g = Guest::new(BASIC);
    let head = g.post(RX_QUEUE, &[d(DATA, 200, W)]);
    g.host.send(&frame(1000, 1)).unwrap();
    let small = frame(150, 2);
    g.host.send(&small).unwrap();
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), vec![(u32::from(head), 150)]);
    assert_eq!(&g.read(DATA + 12, 138)[..], &small[12..]);
    assert_eq!(g.net.stats().rx_dropped, 1);
}

#[test]
fn frames_the_driver_did_not_agree_to_are_dropped() {
    let mut g = Guest::new(BASIC | F_GUEST_CSUM);
    g.post(RX_QUEUE, &[d(DATA, 3000, W)]);
    let mut tso = frame(2000, 1);
    tso[0] = HDR_F_NEEDS_CSUM;
    tso[1] = GSO_TCPV4;
    g.host.send(&tso).unwrap();
    g.host.send(&[0u8; 20]).unwrap(); // a runt
    let ok = frame(100, 2);
    g.host.send(&ok).unwrap();
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), vec![(0, 100)]);
    assert_eq!(g.net.stats().rx_dropped, 2);
}

#[test]
fn bad_receive_chains_are_returned_unused() {
    let mut g = Guest::with_size(BASIC, 32);
    let bad: Vec<Vec<RawDescriptor>> = vec![
        vec![d(DATA, 1526, 0)],                      // device-readable
        vec![d(DATA, 12, W), d(DATA + 12, 1514, 0)], // readable after writable
        vec![d(0xff_ff00, 0x1000, W)],               // past the end of memory
        vec![d(DATA, 8, W)],                         // smaller than the header
    ];
    let mut expected = Vec::new();
    for chain in &bad {
        expected.push((u32::from(g.post(RX_QUEUE, chain)), 0));
    }
    let head = g.next_desc[RX_QUEUE];
    g.rx.desc_table()
        .store(
            head,
            RawDescriptor::from(SplitDescriptor::new(DATA, 100, W | N, head)),
        )
        .unwrap();
    g.push_avail(RX_QUEUE, head);
    g.next_desc[RX_QUEUE] += 1;
    expected.push((u32::from(head), 0));
    let good = g.post(RX_QUEUE, &[d(DATA + 0x1_0000, 1526, W)]);
    expected.push((u32::from(good), 100));
    g.host.send(&frame(100, 3)).unwrap();
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), expected);
    assert_eq!(g.net.stats().rx_bad_buffers, bad.len() as u64 + 1);
    assert_eq!(g.net.stats().rx_frames, 1);
}

#[test]
fn receive_work_per_event_is_bounded() {
    let mut g = Guest::with_size(BASIC, 256);
    for i in 0..200u64 {
        g.post(RX_QUEUE, &[d(DATA + i * 0x1000, 1526, W)]);
    }
    // Feed the socket from a thread (it holds only a few datagrams).
    let host = g.host.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 0..150 {
            host.send(&frame(100, i as u8)).unwrap();
        }
    });
    let mut total = 0;
    let mut rounds = 0;
    while total < 150 {
        g.net.process_rx();
        let n = g.used(RX_QUEUE).len();
        assert!(n <= BUDGET, "{n} frames in one event");
        total += n;
        rounds += 1;
        assert!(rounds < 100_000);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    feeder.join().unwrap();
    assert_eq!(g.net.stats().rx_frames, 150);
}

#[test]
fn a_bad_avail_index_neither_hangs_nor_panics() {
    let mut g = Guest::new(BASIC | F_EVENT_IDX);
    for q in [RX_QUEUE, TX_QUEUE] {
        let avail = avail_addr(q);
        g.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    }
    g.host.send(&frame(100, 1)).unwrap();
    g.net.process_tx();
    g.net.process_rx();
    assert_eq!(g.used(TX_QUEUE), vec![]);
    assert_eq!(g.used(RX_QUEUE), vec![]);
    // It waits for a notification rather than spinning.
    assert!(g.net.queue_events[RX_QUEUE].read().is_err());
    assert!(g.net.queue_events[TX_QUEUE].read().is_err());
}

#[test]
fn notifications_before_activation_and_after_reset_are_ignored() {
    let (dev_end, _host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    let mut net = Net::new(dev_end, MAC).unwrap();
    net.process_rx();
    net.process_tx();
    assert!(!net.is_active());
    let mut g = Guest::new(BASIC);
    g.post(RX_QUEUE, &[d(DATA, 1526, W)]);
    g.net.reset();
    g.host.send(&frame(100, 1)).unwrap();
    g.net.process_rx();
    g.net.process_tx();
    assert_eq!(g.used(RX_QUEUE), vec![]);
    assert_eq!(g.net.wanted_events(), EventSet::empty());
    // Running again after a reset (which clears the rings).
    g.activate(BASIC).unwrap();
    g.next_desc = [0, 0];
    g.post(RX_QUEUE, &[d(DATA, 1526, W)]);
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), vec![(0, 100)]);
}

#[test]
fn activation_needs_both_queues() {
    let (dev_end, _host) = UnixDatagram::pair().unwrap();
    let mut net = Net::new(dev_end, MAC).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    for n in [0, 1, 3] {
        let queues = (0..n).map(|_| mock.create_queue().unwrap()).collect();
        let e = net
            .activate(Activation {
                mem: mem.clone(),
                queues,
                features: BASIC,
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            })
            .unwrap_err();
        assert!(
            matches!(e, ActivateError::QueueCount { expected: 2, .. }),
            "{n}"
        );
    }
}

#[test]
fn config_space_is_the_mac_and_read_only() {
    let (dev_end, _host) = UnixDatagram::pair().unwrap();
    let mut net = Net::new(dev_end, MAC).unwrap();
    let mut d6 = [0u8; 6];
    net.read_config(0, &mut d6);
    assert_eq!(d6, MAC);
    let mut d4 = [0xffu8; 4];
    net.read_config(4, &mut d4);
    assert_eq!(d4, [0x44, 0x55, 0, 0]);
    net.read_config(u64::MAX, &mut d4);
    assert_eq!(d4, [0; 4]);
    net.write_config(0, &[9; 6]);
    net.write_config(0x1000, &[9; 8]);
    net.write_config(u64::MAX, &[9]);
    net.read_config(0, &mut d6);
    assert_eq!(d6, MAC);
}

#[test]
fn offloads_follow_the_guest_features() {
    assert_eq!(
        tap_offload_flags(F_VERSION_1 | F_GUEST_TSO4),
        0,
        "TSO needs CSUM"
    );
    assert_eq!(tap_offload_flags(F_GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(
        tap_offload_flags(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    assert_eq!(
        tap_offload_flags(F_GUEST_CSUM | F_GUEST_ECN),
        libc::TUN_F_CSUM
    );
    let mac = random_mac();
    assert_eq!(mac[0], 0x02, "locally administered, unicast");
    assert_ne!(random_mac(), mac);
    assert_eq!(format_mac(&MAC), "02:11:22:33:44:55");
}

/// The device on a real event loop: what it watches follows its state, a
/// full backend makes it wait for EPOLLOUT, and a queue notification after
/// a wait brings the pending frame in.
#[test]
fn event_loop_watching_follows_the_device() {
    let mut g = Guest::with_size(BASIC | F_EVENT_IDX, 64);
    // Move the device onto an event loop; keep driving the rings by hand.
    let rx_evt = g.net.queue_events[RX_QUEUE].try_clone().unwrap();
    let tx_evt = g.net.queue_events[TX_QUEUE].try_clone().unwrap();
    let placeholder = Net::new(UnixDatagram::pair().unwrap().0, MAC).unwrap();
    let net = Arc::new(Mutex::new(std::mem::replace(&mut g.net, placeholder)));
    let mut events: EventManager<Arc<Mutex<Net<UnixDatagram>>>> = EventManager::new().unwrap();
    events.add_subscriber(net.clone());
    let run = |events: &mut EventManager<Arc<Mutex<Net<UnixDatagram>>>>| {
        for _ in 0..1000 {
            if events.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop does not settle");
    };
    rx_evt.write(1).unwrap(); // as activation does
    run(&mut events);
    // No RX buffers: the backend is not watched, a frame stays in it.
    assert_eq!(net.lock().unwrap().watching, Some(EventSet::empty()));
    g.host.send(&frame(100, 1)).unwrap();
    run(&mut events);
    assert_eq!(g.used(RX_QUEUE), vec![]);
    // The guest posts buffers and notifies: the frame comes in and the
    // backend is watched for more.
    g.post(RX_QUEUE, &[d(DATA, 1526, W)]);
    g.post(RX_QUEUE, &[d(DATA + 0x1000, 1526, W)]);
    rx_evt.write(1).unwrap();
    run(&mut events);
    assert_eq!(g.used(RX_QUEUE), vec![(0, 100)]);
    assert_eq!(net.lock().unwrap().watching, Some(EventSet::IN));
    // Transmit more than the socket takes (its send buffer holds ~200 KB):
    // the device waits for EPOLLOUT.
    let f = frame(9000, 2);
    for i in 0..60u64 {
        g.send(DATA + 0x1_0000 + i * 0x4000, &f, 9000);
    }
    tx_evt.write(1).unwrap();
    run(&mut events);
    let sent_first = g.used(TX_QUEUE).len();
    assert!(sent_first < 60, "{sent_first}: the socket should fill up");
    assert_eq!(
        net.lock().unwrap().watching,
        Some(EventSet::IN | EventSet::OUT)
    );
    let mut got = g.host_frames().len();
    let mut rounds = 0;
    while got < 60 {
        run(&mut events);
        got += g.host_frames().len();
        rounds += 1;
        assert!(rounds < 1000, "{got}");
    }
    run(&mut events);
    assert_eq!(sent_first + g.used(TX_QUEUE).len(), 60);
    assert_eq!(net.lock().unwrap().watching, Some(EventSet::IN));
    // The backend goes away (the peer closes): the loop does not spin on it.
    drop(g.host);
    run(&mut events);
}

/// The transport with this device: bad queue sizes and early notifications.
#[test]
fn transport_refuses_bad_queue_sizes() {
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    for (size, ok) in [
        (256u32, true),
        (16, true),
        (12, false),
        (512, false),
        (0, false),
    ] {
        let (dev_end, _host) = UnixDatagram::pair().unwrap();
        let net = Arc::new(Mutex::new(Net::new(dev_end, MAC).unwrap()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(
            "net",
            net.clone(),
            mem.clone(),
            Arc::new(Interrupt::new(irq)),
        );
        let ready = mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER | mmio::STATUS_FEATURES_OK;
        w(&mut t, 0x70, mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(&mut t, 0x70, ready);
        for q in 0..2u32 {
            let base = 0x1_0000 + u64::from(q) * 0x4000;
            w(&mut t, 0x30, q);
            w(&mut t, 0x38, if q == 0 { size } else { 256 });
            w(&mut t, 0x80, base as u32);
            w(&mut t, 0x90, (base + 0x1000) as u32);
            w(&mut t, 0xa0, (base + 0x2000) as u32);
            w(&mut t, 0x44, 1);
        }
        // A notification before DRIVER_OK: the device is not running.
        net.lock().unwrap().queue_events[TX_QUEUE].write(1).unwrap();
        net.lock().unwrap().process_tx();
        w(&mut t, 0x70, ready | mmio::STATUS_DRIVER_OK);
        let status = r(&mut t, 0x70);
        assert_eq!(
            status & mmio::STATUS_NEEDS_RESET == 0,
            ok,
            "size {size}: {status:#x}"
        );
        assert_eq!(net.lock().unwrap().is_active(), ok, "size {size}");
    }
}

/// A real tap deleted under an active device: no spinning, transmit
/// frames are dropped and counted, the device carries on. Needs root (CI
/// runs as root) and `ip` (iproute2).
#[test]
fn a_deleted_tap_is_survived() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test creates a TAP device: run it as root (CI does)");
    }
    let name = format!("lgu{}", std::process::id() % 1_000_000);
    let tap = Tap::open(&name).unwrap_or_else(|e| panic!("{e}"));
    let ip = |args: &[&str]| {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip {args:?}");
    };
    ip(&["link", "set", &name, "up"]);
    let mut g = Guest::with_size(BASIC, 16);
    let net = Net::new(tap, MAC).unwrap();
    let rx_evt = net.queue_events[RX_QUEUE].try_clone().unwrap();
    let tx_evt = net.queue_events[TX_QUEUE].try_clone().unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut events: EventManager<Arc<Mutex<Net<Tap>>>> = EventManager::new().unwrap();
    events.add_subscriber(net.clone());
    // Activate the tap device on the guest's rings.
    let queues = [RX_QUEUE, TX_QUEUE].map(|q| {
        let mut queue = Queue::new(16).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(RING_BASE[q]))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(avail_addr(q)))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(used_addr(q)))
            .unwrap();
        queue.set_ready(true);
        queue
    });
    net.lock()
        .unwrap()
        .activate(Activation {
            mem: g.mem.clone(),
            queues: queues.into(),
            features: BASIC,
            interrupt: Arc::new(Interrupt::new(g.irq.try_clone().unwrap())),
        })
        .unwrap();
    g.post(RX_QUEUE, &[d(DATA, 1526, W)]);
    g.post(RX_QUEUE, &[d(DATA + 0x1000, 1526, W)]);
    let run = |events: &mut EventManager<Arc<Mutex<Net<Tap>>>>| {
        for _ in 0..1000 {
            if events.run_with_timeout(10).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop does not settle");
    };
    run(&mut events);
    assert_eq!(net.lock().unwrap().watching, Some(EventSet::IN));
    // A frame to the tap works while it exists.
    g.send(DATA + 0x2000, &frame(60, 1), 60);
    tx_evt.write(1).unwrap();
    run(&mut events);
    assert_eq!(net.lock().unwrap().stats().tx_frames, 1);
    ip(&["link", "del", &name]);
    // The tap's error may come later than the loop's 10 ms of quiet on a
    // busy host: run until it came, for at most 5 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    run(&mut events);
    while net.lock().unwrap().watching.is_some() && std::time::Instant::now() < deadline {
        run(&mut events);
    }
    // The tap reports an error forever: the device stopped watching it.
    assert_eq!(net.lock().unwrap().watching, None);
    g.send(DATA + 0x3000, &frame(60, 2), 60);
    tx_evt.write(1).unwrap();
    rx_evt.write(1).unwrap();
    run(&mut events);
    let s = net.lock().unwrap().stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (1, 1), "{s:?}");
    assert_eq!(g.used(TX_QUEUE).len(), 2);
}

/// A guest may point receive buffers at its own rings (the fuzzer's first
/// input did): frames then overwrite avail indices, used rings and
/// descriptors. The device must keep its footing.
#[test]
fn receive_buffers_over_the_rings() {
    // Without MRG_RXBUF one buffer is taken at a time: the third frame
    // overwrites the descriptor of the fourth buffer before it is taken.
    let mut g = Guest::new(BASIC | F_EVENT_IDX);
    g.post(RX_QUEUE, &[d(used_addr(TX_QUEUE), 1526, W)]);
    g.post(RX_QUEUE, &[d(avail_addr(TX_QUEUE), 1526, W)]);
    g.post(RX_QUEUE, &[d(RING_BASE[RX_QUEUE], 1526, W)]);
    g.post(RX_QUEUE, &[d(avail_addr(RX_QUEUE), 1526, W)]);
    for _ in 0..4 {
        let mut f = vec![0xffu8; 1000];
        f[..HDR_LEN].fill(0);
        g.host.send(&f).unwrap();
    }
    g.net.process_rx();
    g.net.process_tx();
    g.net.notified(RX_QUEUE);
    g.net.notified(TX_QUEUE);
    let s = g.net.stats();
    assert_eq!((s.rx_frames, s.rx_bad_buffers), (3, 1), "{s:?}");
    assert_eq!(s.tx_frames, 0, "{s:?}");

    let mut g = Guest::new(BASIC | F_EVENT_IDX | F_MRG_RXBUF);
    g.post(RX_QUEUE, &[d(used_addr(TX_QUEUE), 1526, W)]);
    g.post(RX_QUEUE, &[d(avail_addr(TX_QUEUE), 1526, W)]);
    g.post(RX_QUEUE, &[d(RING_BASE[RX_QUEUE], 1526, W)]); // its own table
    g.post(RX_QUEUE, &[d(avail_addr(RX_QUEUE), 1526, W)]); // its own avail ring
    for seed in 0..4 {
        let mut f = vec![0xffu8; 1000];
        f[..HDR_LEN].fill(0);
        f[HDR_LEN] = seed;
        g.host.send(&f).unwrap();
    }
    g.net.process_rx();
    g.net.process_tx();
    g.net.notified(RX_QUEUE);
    g.net.notified(TX_QUEUE);
    // The same with MRG_RXBUF.
    let s = g.net.stats();
    assert_eq!((s.rx_frames, s.rx_bad_buffers), (3, 1), "{s:?}");
    assert_eq!(s.tx_frames, 0, "the avail index is garbage: {s:?}");
    // A reset brings it back.
    g.net.reset();
    g.activate(BASIC).unwrap();
    g.next_desc = [0, 0];
    g.send(DATA, &frame(100, 1), 100);
    g.net.process_tx();
    assert_eq!(g.host_frames().len(), 1);
}

/// Page-sized mergeable buffers, as Linux posts them: a frame takes as many
/// as it needs; one longer than the device's receive buffer is dropped.
#[test]
fn mergeable_page_sized_buffers() {
    let mut g = Guest::with_size(BASIC | F_MRG_RXBUF | F_EVENT_IDX, 64);
    for i in 0..20u64 {
        g.post(RX_QUEUE, &[d(DATA + i * 0x1000, 4096, W)]);
    }
    let mut big = frame(10_000, 1);
    big[0] = HDR_F_DATA_VALID; // not negotiated: cleared in guest memory
    let small = frame(100, 2);
    g.host.send(&big).unwrap();
    g.host.send(&small).unwrap();
    g.net.process_rx();
    let used = g.used(RX_QUEUE);
    assert_eq!(
        used,
        vec![(0, 4096), (1, 4096), (2, 10_000 - 8192), (3, 100)]
    );
    let mut got = g.read(DATA, 4096);
    got.extend(g.read(DATA + 0x1000, 4096));
    got.extend(g.read(DATA + 0x2000, 10_000 - 8192));
    assert_eq!(got[0], 0, "flags cleared");
    assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &big[12..]);
    let got = g.read(DATA + 0x3000, 100);
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &small[12..]);
    // A 70,000-byte frame (more than any tap hands over) is cut short by
    // the read and dropped; the buffers stay for the next frame.
    g.host.send(&frame(70_000, 3)).unwrap();
    let next = frame(200, 4);
    g.host.send(&next).unwrap();
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), vec![(4, 200)]);
    assert_eq!(&g.read(DATA + 0x4000 + 12, 188)[..], &next[12..]);
    let s = g.net.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (3, 1), "{s:?}");
}

/// Without MRG_RXBUF, a driver that accepts TSO frames posts buffers for
/// the largest one.
#[test]
fn a_large_buffer_takes_a_tso_frame() {
    let mut g = Guest::new(BASIC | F_GUEST_CSUM | F_GUEST_TSO4);
    let head = g.post(RX_QUEUE, &[d(DATA, 12, W), d(DATA + 0x100, 65_550, W)]);
    let mut f = frame(30_000, 5);
    f[0] = HDR_F_NEEDS_CSUM;
    f[1] = GSO_TCPV4;
    g.host.send(&f).unwrap();
    g.net.process_rx();
    assert_eq!(g.used(RX_QUEUE), vec![(u32::from(head), 30_000)]);
    let hdr = g.read(DATA, 12);
    assert_eq!(&hdr[..2], &[HDR_F_NEEDS_CSUM, GSO_TCPV4]);
    assert_eq!(&hdr[10..12], &1u16.to_le_bytes());
    assert_eq!(&g.read(DATA + 0x100, 30_000 - 12)[..], &f[12..]);
    assert!(g.net.rx_pending.is_none());
}

/// A frame in more pieces than one writev takes is sent through a copy.
#[test]
fn transmit_chains_in_many_pieces() {
    let mut g = Guest::new(BASIC);
    let f = frame(1514, 6);
    g.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    // An indirect table of 1514 one-byte descriptors.
    let table = DATA + 0x10_0000;
    for i in 0..1514u64 {
        let flags = if i + 1 < 1514 { N } else { 0 };
        let desc = SplitDescriptor::new(DATA + i, 1, flags, (i + 1) as u16);
        g.mem
            .write_obj(RawDescriptor::from(desc), GuestAddress(table + 16 * i))
            .unwrap();
    }
    g.post(
        TX_QUEUE,
        &[d(table, 16 * 1514, VRING_DESC_F_INDIRECT as u16)],
    );
    g.send(DATA, &f, 1514);
    g.net.process_tx();
    assert_eq!(g.host_frames(), vec![f.clone(), f]);
}
