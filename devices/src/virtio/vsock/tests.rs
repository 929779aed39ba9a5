//! The vsock device against real guest memory: a small driver puts chains
//! in split rings, the device runs on a real `event-manager` event loop,
//! and the host side is real Unix sockets.
//!
//! The rings are laid out here rather than with virtio-queue's
//! `MockSplitQueue::create`: in 0.18 its used ring starts `len` bytes after
//! the avail ring's entries instead of `2 * len`, so once more than half a
//! queue of buffers is in flight, used entries overwrite avail entries.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::scratch::Scratch;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::connection::CONN_BUF_SIZE;
use super::host::PairConnector;
use super::muxer::MAX_CONNECTIONS;
use super::packet::*;
use super::*;
use crate::BusDevice;
use crate::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};

const CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 0x100_0000;

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The driver side of one queue: descriptors and avail entries go round
/// the rings (unlike MockSplitQueue's helpers), buffers come from a bump
/// allocator in guest memory.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Descriptors at `base`, avail ring at +4 KiB, used ring at +8 KiB.
    fn new(mem: &GuestMemory, base: u64) -> (DriverQueue, Queue) {
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QSIZE);
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        let q = DriverQueue {
            desc,
            avail,
            used,
            size: QSIZE,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (q, queue)
    }

    /// Writes one descriptor at table index `i`.
    fn put_desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(i % self.size);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes the chain at `head` available.
    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a chain of (address, length, device-writable) buffers.
    fn add(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % self.size;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if k + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.put_desc(mem, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_desc = self.next_desc.wrapping_add(bufs.len() as u16);
        self.publish(mem, head);
        head
    }

    /// Used elements (id, len) not seen yet.
    fn used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A guest with a vsock driver, a device on an event loop, and the
/// host-side sockets.
struct Rig {
    mem: GuestMemory,
    dev: Arc<Mutex<Vsock>>,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    rx: DriverQueue,
    tx: DriverQueue,
    irq: EventFd,
    /// Where the next RX/TX buffer goes.
    next_buf: u64,
    /// RX buffers posted: head -> (address, length).
    rx_bufs: std::collections::HashMap<u16, (u64, u32)>,
    peers: Option<PairConnector>,
    _dir: Option<Scratch>,
}

impl Rig {
    /// A device whose guest connections go to socket pairs.
    fn with_pairs() -> Rig {
        let connector = PairConnector::default();
        let dev = Vsock::with_backend(CID as u32, None, Box::new(connector.clone())).unwrap();
        let mut rig = Rig::build(dev, None);
        rig.peers = Some(connector);
        rig
    }

    /// A device with a real host socket in a fresh directory.
    fn with_socket(name: &str) -> (Rig, PathBuf) {
        let dir = Scratch::new(&format!("vsock-{name}"));
        let path = dir.join("v.sock");
        let dev = Vsock::new(CID as u32, &path).unwrap();
        (Rig::build(dev, Some(dir)), path)
    }

    fn build(dev: Vsock, dir: Option<Scratch>) -> Rig {
        let mem = mem();
        let (rx, rxq) = DriverQueue::new(&mem, 0x0);
        let (tx, txq) = DriverQueue::new(&mem, 0x10000);
        let (_ev, evq) = DriverQueue::new(&mem, 0x20000);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(dev.clone() as Arc<Mutex<dyn MutEventSubscriber + Send>>);
        let mut rig = Rig {
            mem: mem.clone(),
            dev,
            events,
            rx,
            tx,
            irq,
            next_buf: 0x100000,
            rx_bufs: Default::default(),
            peers: None,
            _dir: dir,
        };
        rig.activate(vec![rxq, txq, evq]);
        rig
    }

    fn activate(&mut self, queues: Vec<Queue>) {
        let irq = self.irq.try_clone().unwrap();
        self.dev
            .lock()
            .unwrap()
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                features: F_VERSION_1,
                interrupt: Arc::new(Interrupt::new(irq)),
            })
            .unwrap();
        self.pump();
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let at = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(64);
        assert!(
            self.next_buf < MEM_SIZE as u64,
            "test ran out of guest memory"
        );
        at
    }

    /// Runs the event loop until nothing happens for a moment.
    fn pump(&mut self) {
        let mut idle = 0;
        while idle < 3 {
            match self.events.run_with_timeout(5) {
                Ok(0) => idle += 1,
                Ok(_) => idle = 0,
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    fn notify(&mut self, queue: usize) {
        self.dev.lock().unwrap().queue_events[queue]
            .write(1)
            .unwrap();
        self.pump();
    }

    /// Posts `n` RX buffers of `len` bytes each.
    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.alloc(len);
            let head = self.rx.add(&self.mem, &[(addr, len, true)]);
            self.rx_bufs.insert(head, (addr, len));
        }
        self.notify(RX);
    }

    /// Sends a packet as the guest: header and payload in two descriptors,
    /// like Linux does.
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let h = self.alloc(HDR_SIZE as u32);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        let mut bufs = vec![(h, HDR_SIZE as u32, false)];
        if !payload.is_empty() {
            let p = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            bufs.push((p, payload.len() as u32, false));
        }
        self.tx.add(&self.mem, &bufs);
        self.notify(TX);
    }

    /// Packets the device put in RX buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used(&self.mem);
        used.into_iter()
            .map(|(id, len)| {
                let Some((addr, cap)) = self.rx_bufs.remove(&(id as u16)) else {
                    panic!(
                        "unknown RX buffer {id} (len {len}), known {:?}",
                        self.rx_bufs.keys()
                    )
                };
                assert!(len <= cap);
                assert!(len as usize >= HDR_SIZE, "RX packet of {len} bytes");
                let mut b = [0u8; HDR_SIZE];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let hdr = Header::from_bytes(&b);
                let mut payload = vec![0u8; len as usize - HDR_SIZE];
                self.mem
                    .read_slice(&mut payload, GuestAddress(addr + HDR_SIZE as u64))
                    .unwrap();
                assert_eq!(hdr.len as usize, payload.len());
                (hdr, payload)
            })
            .collect()
    }

    fn tx_used(&mut self) -> Vec<(u32, u32)> {
        self.tx.used(&self.mem)
    }

    /// The host application's end of the `n`th guest connection.
    fn peer(&self, n: usize) -> UnixStream {
        let peers = self.peers.as_ref().unwrap().peers.lock().unwrap();
        peers[n].1.try_clone().unwrap()
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

fn rw(src_port: u32, dst_port: u32, len: usize) -> Header {
    let mut h = hdr(OP_RW, src_port, dst_port);
    h.len = len as u32;
    h
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

/// Reads what a non-blocking socket has, waiting up to a second for `want` bytes.
fn read_some(s: &mut UnixStream, want: usize) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < want && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    out
}

/// Reads what a non-blocking socket has right now, at most `max` bytes.
fn read_now(s: &mut UnixStream, max: usize) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; max];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

/// Whether the host side of a connection was closed (EOF or reset).
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.set_nonblocking(false).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A guest connection to host port 52, established.
fn connect(rig: &mut Rig) -> UnixStream {
    rig.send(hdr(OP_REQUEST, GUEST_PORT, 52), &[]);
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RESPONSE]);
    let r = got[0].0;
    assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.type_),
        (HOST_CID, CID, 52, GUEST_PORT, TYPE_STREAM)
    );
    assert_eq!(r.buf_alloc, CONN_BUF_SIZE);
    let n = rig.peers.as_ref().unwrap().peers.lock().unwrap().len();
    rig.peer(n - 1)
}

#[test]
fn identity_features_and_config() {
    let rig = Rig::with_pairs();
    let mut d = rig.dev.lock().unwrap();
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_ne!(d.features() & F_VERSION_1, 0);
    let mut cfg = [0xffu8; 8];
    d.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut hi = [0xffu8; 4];
    d.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4], "upper CID bits are zero");
    let mut past = [0xffu8; 4];
    d.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    // Writes anywhere (in range or far out) change nothing.
    d.write_config(0, &[9; 8]);
    d.write_config(0x1000, &[9; 4]);
    d.write_config(u64::MAX, &[9]);
    d.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
}

#[test]
fn guest_connection_carries_bytes_both_ways_and_closes() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(16, 4096);
    let mut host = connect(&mut rig);
    assert_eq!(rig.peers.as_ref().unwrap().peers.lock().unwrap()[0].0, 52);
    // Guest to host.
    rig.send(rw(GUEST_PORT, 52, 11), b"hello, host");
    assert_eq!(read_some(&mut host, 11), b"hello, host");
    assert!(rig.received().is_empty(), "no packet back for data");
    // Host to guest.
    host.write_all(b"hello, guest").unwrap();
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1, b"hello, guest");
    assert_eq!(got[0].0.fwd_cnt, 11, "our credit: 11 bytes forwarded");
    // The guest closes: RST back, and the host sees EOF.
    let mut s = hdr(OP_SHUTDOWN, GUEST_PORT, 52);
    s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(s, &[]);
    assert_eq!(ops(&rig.received()), [OP_RST]);
    assert!(closed(&mut host));
    assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 0);
    // Every TX chain came back, with 0 bytes written.
    assert!(rig.tx_used().iter().all(|&(_, len)| len == 0));
}

#[test]
fn host_close_reaches_the_guest_as_shutdown_then_rst() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(16, 4096);
    let mut host = connect(&mut rig);
    host.write_all(b"bye").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(got[1].0.flags, SHUTDOWN_SEND);
    // The guest can still send; then it is done too.
    rig.send(rw(GUEST_PORT, 52, 2), b"ok");
    assert_eq!(read_some(&mut host, 2), b"ok");
    let mut s = hdr(OP_SHUTDOWN, GUEST_PORT, 52);
    s.flags = SHUTDOWN_SEND;
    rig.send(s, &[]);
    assert_eq!(ops(&rig.received()), [OP_RST]);
    assert!(closed(&mut host));

    // A host that goes away entirely: its last bytes, then a RST.
    let host = connect(&mut rig);
    (&host).write_all(b"last words").unwrap();
    // (The connector keeps the other end open: shut it down both ways.)
    host.shutdown(std::net::Shutdown::Both).unwrap();
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RW, OP_RST]);
    assert_eq!(got[0].1, b"last words");
    assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 0);
}

#[test]
fn refused_and_unknown_connections_get_rst() {
    let mut rig = Rig::with_pairs();
    rig.peers.as_mut().unwrap().refuse.push(99);
    // The connector is shared: refusing in our copy is not enough, so
    // make the device's copy refuse too.
    let connector = PairConnector {
        refuse: vec![99],
        ..rig.peers.clone().unwrap()
    };
    rig.dev.lock().unwrap().muxer = Muxer::new(CID, None, Box::new(connector));
    rig.post_rx(8, 256);
    rig.send(hdr(OP_REQUEST, GUEST_PORT, 99), &[]);
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RST]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (99, GUEST_PORT));
    // Data, credit and shutdown for a connection that does not exist.
    rig.send(rw(GUEST_PORT, 7, 3), b"abc");
    rig.send(hdr(OP_CREDIT_UPDATE, GUEST_PORT, 7), &[]);
    rig.send(hdr(OP_SHUTDOWN, GUEST_PORT, 7), &[]);
    assert_eq!(ops(&rig.received()), [OP_RST, OP_RST, OP_RST]);
    // No RST for a RST.
    rig.send(hdr(OP_RST, GUEST_PORT, 7), &[]);
    assert!(rig.received().is_empty());
}

#[test]
fn hostile_tx_chains_fail_alone() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(32, 256);
    let mem = rig.mem.clone();
    let good = hdr(OP_REQUEST, GUEST_PORT, 52);
    let h = rig.alloc(64);
    mem.write_slice(&good.to_bytes(), GuestAddress(h)).unwrap();

    // 1. The header outside guest memory.
    rig.tx.add(&mem, &[(MEM_SIZE as u64 + 0x1000, 44, false)]);
    // 2. Straddling the end of guest memory.
    rig.tx.add(&mem, &[(MEM_SIZE as u64 - 20, 44, false)]);
    // 3. A device-writable header (wrong direction).
    rig.tx.add(&mem, &[(h, 44, true)]);
    // 4. A short header.
    rig.tx.add(&mem, &[(h, 43, false)]);
    // 5. A descriptor loop: head points at itself.
    let head = rig.tx.next_desc % QSIZE;
    rig.tx
        .put_desc(&mem, head, h, 44, VRING_DESC_F_NEXT as u16, head);
    rig.tx.next_desc += 1;
    rig.tx.publish(&mem, head);
    // 6. A chain longer than the queue (descriptor 63 -> 0 -> 1 ... all NEXT).
    let base = rig.tx.next_desc % QSIZE;
    for k in 0..QSIZE {
        let i = (base + k) % QSIZE;
        rig.tx
            .put_desc(&mem, i, h, 1, VRING_DESC_F_NEXT as u16, (i + 1) % QSIZE);
    }
    rig.tx.publish(&mem, base);
    rig.tx.next_desc = base + QSIZE;
    rig.notify(TX);
    // 7. An indirect table outside memory.
    let i = rig.tx.next_desc % QSIZE;
    rig.tx.put_desc(
        &mem,
        i,
        0x7fff_0000_0000,
        32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    rig.tx.next_desc += 1;
    rig.tx.publish(&mem, i);
    // 8. A header with a payload length beyond the chain.
    rig.send(rw(GUEST_PORT, 52, 100), b"only ten b");
    // 9. A payload longer than any packet may be.
    let mut big = rw(GUEST_PORT, 52, 0);
    big.len = MAX_PAYLOAD as u32 + 1;
    rig.send(big, &[]);
    // 10. A forged source CID, a wrong destination, an unknown type and op.
    let mut forged = good;
    forged.src_cid = 77;
    rig.send(forged, &[]);
    let mut elsewhere = good;
    elsewhere.dst_cid = 9;
    rig.send(elsewhere, &[]);
    let mut dgram = good;
    dgram.type_ = 3;
    rig.send(dgram, &[]);
    let mut unknown = good;
    unknown.op = 42;
    rig.send(unknown, &[]);
    rig.notify(TX);

    // Every chain was returned (the over-long one is cut at the queue
    // size) with nothing written.
    let used = rig.tx_used();
    assert_eq!(used.len(), 13, "{used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));
    // RSTs for the packets whose header could be read and that did not
    // lie about their source: 8, 9, and 10 (but the forged one).
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RST; 5], "{got:?}");
    assert!(
        got.iter()
            .all(|(h, _)| h.dst_cid == CID && h.dst_port == GUEST_PORT)
    );
    assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 0);

    // The device still works.
    let mut host = connect(&mut rig);
    rig.send(rw(GUEST_PORT, 52, 2), b"ok");
    assert_eq!(read_some(&mut host, 2), b"ok");
}

#[test]
fn bad_rx_buffers_are_returned_empty() {
    let mut rig = Rig::with_pairs();
    let mem = rig.mem.clone();
    // Read-only, too small for a header, outside memory: all returned with
    // 0 bytes; the packet lands in the good buffer after them.
    let a = rig.alloc(256);
    rig.rx.add(&mem, &[(a, 256, false)]);
    rig.rx.add(&mem, &[(a, 20, true)]);
    rig.rx.add(&mem, &[(MEM_SIZE as u64, 256, true)]);
    rig.post_rx(1, 256);
    rig.send(hdr(OP_REQUEST, GUEST_PORT, 52), &[]);
    let used = rig.rx.used(&mem);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0, 44]);
}

#[test]
fn host_to_guest_respects_the_guest_credit() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(32, 4096);
    let mut req = hdr(OP_REQUEST, GUEST_PORT, 52);
    req.buf_alloc = 100;
    rig.send(req, &[]);
    assert_eq!(ops(&rig.received()), [OP_RESPONSE]);
    let mut host = rig.peer(0);
    host.write_all(&[5u8; 1000]).unwrap();
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1.len(), 100, "no more than the guest's buf_alloc");
    // Nothing more until the guest frees space.
    rig.pump();
    assert!(rig.received().is_empty());
    let mut upd = hdr(OP_CREDIT_UPDATE, GUEST_PORT, 52);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 60;
    rig.send(upd, &[]);
    let got = rig.received();
    assert_eq!(got.iter().map(|p| p.1.len()).sum::<usize>(), 60);
    // And the guest can grow its buffer.
    upd.buf_alloc = 10_000;
    upd.fwd_cnt = 160;
    rig.send(upd, &[]);
    let got = rig.received();
    assert_eq!(got.iter().map(|p| p.1.len()).sum::<usize>(), 840);
}

#[test]
fn guest_over_its_credit_is_reset_and_memory_stays_bounded() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(8, 256);
    let host = connect(&mut rig);
    // The host never reads. The guest ignores credit and keeps sending.
    let chunk = vec![3u8; 32 * 1024];
    let mut sent = 0usize;
    loop {
        rig.send(rw(GUEST_PORT, 52, chunk.len()), &chunk);
        sent += chunk.len();
        let got = rig.received();
        if ops(&got).contains(&OP_RST) {
            break;
        }
        assert!(sent < 16 * 1024 * 1024, "never reset");
    }
    // The host socket buffer plus our 64 KiB, not everything sent.
    assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 0);
    drop(host);
}

#[test]
fn credit_updates_flow_back_as_the_host_reads() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(64, 256);
    let mut host = connect(&mut rig);
    // The guest sends exactly its credit in 4 KiB packets, waiting for
    // credit updates when it runs out, like Linux does; the host reads
    // slowly.
    let total = 256 * 1024;
    let (mut sent, mut peer_fwd) = (0usize, 0u32);
    let mut got = Vec::new();
    let mut updates = 0;
    let start = Instant::now();
    while got.len() < total {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stuck at {}",
            got.len()
        );
        let room = (CONN_BUF_SIZE as usize).saturating_sub(sent - peer_fwd as usize);
        let n = room.min(4096).min(total - sent);
        if n > 0 {
            let data: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
            rig.send(rw(GUEST_PORT, 52, n), &data);
            sent += n;
        }
        // A slow reader: a few KiB at a time.
        got.extend(read_now(&mut host, 3000));
        rig.pump();
        for (h, _) in rig.received() {
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            assert!(h.fwd_cnt as usize <= sent, "forwarded more than was sent");
            peer_fwd = h.fwd_cnt;
            updates += 1;
        }
        if rig.rx_bufs.len() < 8 {
            rig.post_rx(32, 256);
        }
    }
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    assert!(updates > 0);
}

#[test]
fn rx_work_is_bounded_per_event_and_shared_between_connections() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(2, 128);
    let mut a = connect(&mut rig);
    rig.send(hdr(OP_REQUEST, GUEST_PORT + 1, 52), &[]);
    assert_eq!(ops(&rig.received()), [OP_RESPONSE]);
    let mut b = rig.peer(1);
    // Both have plenty for the guest, which has no RX buffers yet.
    a.write_all(&[1u8; 50_000]).unwrap();
    b.write_all(&[2u8; 50_000]).unwrap();
    rig.pump();
    assert!(rig.received().is_empty());
    // Buffers arrive; one RX notification's worth of work is bounded...
    let mem = rig.mem.clone();
    for _ in 0..200 {
        let addr = rig.alloc(128);
        let head = rig.rx.add(&mem, &[(addr, 128, true)]);
        rig.rx_bufs.insert(head, (addr, 128));
    }
    rig.dev
        .lock()
        .unwrap()
        .handle(RX as u32, EventSet::IN, &mut NoPoller);
    let got = rig.received();
    assert_eq!(got.len(), RX_BUDGET);
    // ... and the two connections take turns.
    let ports: Vec<u32> = got.iter().map(|(h, _)| h.dst_port).collect();
    let from_a = ports.iter().filter(|&&p| p == GUEST_PORT).count();
    assert_eq!(from_a, RX_BUDGET / 2, "{ports:?}");
    assert!(ports.windows(2).all(|w| w[0] != w[1]), "{ports:?}");
    // The rest comes on later turns of the event loop (the device kicked itself).
    rig.pump();
    assert_eq!(rig.received().len(), 200 - RX_BUDGET);
}

#[test]
fn tx_work_is_bounded_per_event() {
    let mut rig = Rig::with_pairs();
    let mem = rig.mem.clone();
    let h = rig.alloc(64);
    mem.write_slice(&hdr(OP_RST, GUEST_PORT, 9).to_bytes(), GuestAddress(h))
        .unwrap();
    for _ in 0..(TX_BUDGET + 10) {
        rig.tx.add(&mem, &[(h, 44, false)]);
    }
    rig.dev
        .lock()
        .unwrap()
        .handle(TX as u32, EventSet::IN, &mut NoPoller);
    assert_eq!(rig.tx_used().len(), TX_BUDGET);
    // The rest is picked up on the next turn (the device kicked itself).
    rig.pump();
    assert_eq!(rig.tx_used().len(), 10);
}

#[test]
fn bogus_avail_index_does_not_hang_the_event_loop() {
    let mut rig = Rig::with_pairs();
    let mem = rig.mem.clone();
    // An avail index far ahead of what the queue can hold, in both rings.
    for q in [rig.tx.avail, rig.rx.avail] {
        mem.write_obj(1000u16, GuestAddress(q + 2)).unwrap();
    }
    rig.notify(TX);
    rig.notify(RX);
    assert!(rig.tx_used().is_empty());
    // The driver fixes its rings: back in business.
    for q in [rig.tx.avail, rig.rx.avail] {
        mem.write_obj(0u16, GuestAddress(q + 2)).unwrap();
    }
    rig.post_rx(4, 256);
    let mut host = connect(&mut rig);
    rig.send(rw(GUEST_PORT, 52, 2), b"ok");
    assert_eq!(read_some(&mut host, 2), b"ok");
}

#[test]
fn connection_limit() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(60, 64);
    let mut responses = 0;
    let mut rsts = 0;
    for i in 0..(MAX_CONNECTIONS as u32 + 3) {
        rig.send(hdr(OP_REQUEST, 2000 + i, 52), &[]);
        for (h, _) in rig.received() {
            match h.op {
                OP_RESPONSE => responses += 1,
                OP_RST => rsts += 1,
                op => panic!("op {op}"),
            }
        }
        if rig.rx_bufs.len() < 4 {
            rig.post_rx(60, 64);
        }
    }
    assert_eq!((responses, rsts), (MAX_CONNECTIONS, 3));
    assert_eq!(
        rig.dev.lock().unwrap().muxer().connection_count(),
        MAX_CONNECTIONS
    );
}

#[test]
fn rst_queue_is_bounded_without_rx_buffers() {
    let mut rig = Rig::with_pairs();
    let mem = rig.mem.clone();
    let h = rig.alloc(64);
    mem.write_slice(&rw(GUEST_PORT, 9, 0).to_bytes(), GuestAddress(h))
        .unwrap();
    // No RX buffers; thousands of packets that each deserve a RST.
    for _ in 0..40 {
        for _ in 0..60 {
            rig.tx.add(&mem, &[(h, 44, false)]);
        }
        rig.notify(TX);
        rig.tx_used();
    }
    let d = rig.dev.lock().unwrap();
    assert!(d.muxer().stats.rsts_dropped >= 2400 - 2 * MAX_CONNECTIONS as u64);
}

fn host_connect(path: &std::path::Path, line: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(line).unwrap();
    s
}

#[test]
fn host_initiated_connection() {
    let (mut rig, path) = Rig::with_socket("host-init");
    rig.post_rx(16, 4096);
    // Data right behind the CONNECT line belongs to the stream.
    let mut host = host_connect(&path, b"CONNECT 5000\nearly");
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_REQUEST]);
    let req = got[0].0;
    assert_eq!(
        (req.dst_port, req.dst_cid, req.src_cid),
        (5000, CID, HOST_CID)
    );
    assert!(req.src_port >= 1 << 30);
    let local = req.src_port;
    // The guest accepts.
    rig.send(hdr(OP_RESPONSE, 5000, local), &[]);
    let ok = format!("OK {local}\n");
    assert_eq!(read_some(&mut host, ok.len()), ok.as_bytes());
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1, b"early");
    rig.send(rw(5000, local, 5), b"reply");
    assert_eq!(read_some(&mut host, 5), b"reply");
    // The guest resets: the host sees the end.
    rig.send(hdr(OP_RST, 5000, local), &[]);
    assert!(closed(&mut host));
    drop(rig);
    assert!(!path.exists(), "socket file removed with the device");
}

#[test]
fn host_connect_to_a_port_nobody_listens_on_is_closed() {
    let (mut rig, path) = Rig::with_socket("refused");
    rig.post_rx(16, 4096);
    let mut host = host_connect(&path, b"CONNECT 6001\n");
    rig.pump();
    let got = rig.received();
    assert_eq!(ops(&got), [OP_REQUEST]);
    // The guest (nobody listening) answers with a RST.
    rig.send(hdr(OP_RST, 6001, got[0].0.src_port), &[]);
    assert!(closed(&mut host));
    assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 0);
}

#[test]
fn bad_or_early_host_connections_are_closed() {
    let (mut rig, path) = Rig::with_socket("bad-host");
    rig.post_rx(16, 4096);
    for line in [
        &b"HELLO\n"[..],
        b"CONNECT x\n",
        b"CONNECT 123456789012345678901234567890",
    ] {
        let mut host = host_connect(&path, line);
        rig.pump();
        assert!(closed(&mut host), "{:?}", String::from_utf8_lossy(line));
    }
    // A partial line waits for the rest.
    let mut host = host_connect(&path, b"CONN");
    rig.pump();
    host.write_all(b"ECT 77\n").unwrap();
    rig.pump();
    assert_eq!(ops(&rig.received()), [OP_REQUEST]);
    assert!(rig.received().is_empty());
    // After a reset the driver is not ready: connections are refused and
    // the ones that existed are gone.
    rig.dev.lock().unwrap().reset();
    rig.pump();
    assert!(closed(&mut host));
    let mut late = host_connect(&path, b"CONNECT 77\n");
    rig.pump();
    assert!(closed(&mut late));
    assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 0);
}

#[test]
fn reset_closes_connections_and_the_device_comes_back() {
    let mut rig = Rig::with_pairs();
    rig.post_rx(8, 256);
    let mut host = connect(&mut rig);
    // A notification after reset and before the next DRIVER_OK is ignored.
    rig.dev.lock().unwrap().reset();
    rig.notify(TX);
    rig.pump();
    assert!(closed(&mut host));
    // New queues, new driver.
    let mem = rig.mem.clone();
    let (rx, rxq) = DriverQueue::new(&mem, 0x30000);
    let (tx, txq) = DriverQueue::new(&mem, 0x40000);
    let (_ev, evq) = DriverQueue::new(&mem, 0x50000);
    rig.rx = rx;
    rig.tx = tx;
    rig.rx_bufs.clear();
    rig.activate(vec![rxq, txq, evq]);
    rig.post_rx(8, 256);
    let mut host = connect(&mut rig);
    rig.send(rw(GUEST_PORT, 52, 4), b"back");
    assert_eq!(read_some(&mut host, 4), b"back");
}

#[test]
fn packets_queued_before_driver_ok_are_served_at_activation() {
    let connector = PairConnector::default();
    let dev = Vsock::with_backend(CID as u32, None, Box::new(connector.clone())).unwrap();
    let mem = mem();
    let (mut rx, rxq) = DriverQueue::new(&mem, 0x0);
    let (mut tx, txq) = DriverQueue::new(&mem, 0x10000);
    let (_ev, evq) = DriverQueue::new(&mem, 0x20000);
    let dev = Arc::new(Mutex::new(dev));
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    events.add_subscriber(dev.clone() as Arc<Mutex<dyn MutEventSubscriber + Send>>);
    mem.write_slice(
        &hdr(OP_REQUEST, GUEST_PORT, 52).to_bytes(),
        GuestAddress(0x100000),
    )
    .unwrap();
    tx.add(&mem, &[(0x100000, 44, false)]);
    rx.add(&mem, &[(0x200000, 256, true)]);
    // Notified before DRIVER_OK: dropped.
    dev.lock().unwrap().queue_events[TX].write(1).unwrap();
    events.run_with_timeout(10).unwrap();
    assert!(tx.used(&mem).is_empty());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    dev.lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rxq, txq, evq],
            features: F_VERSION_1,
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        })
        .unwrap();
    events.run_with_timeout(10).unwrap();
    assert_eq!(tx.used(&mem).len(), 1);
    assert_eq!(rx.used(&mem), [(0, 44)]);
    assert!(irq.read().unwrap() >= 1, "used-buffer interrupt");
    // Two queues are not enough.
    let (_a, q1) = DriverQueue::new(&mem, 0x30000);
    let (_b, q2) = DriverQueue::new(&mem, 0x40000);
    let e = dev.lock().unwrap().activate(Activation {
        mem: mem.clone(),
        queues: vec![q1, q2],
        features: F_VERSION_1,
        interrupt: Arc::new(Interrupt::new(irq)),
    });
    assert!(e.is_err());
}

/// The transport with this device: queue sizes the driver may not use.
#[test]
fn transport_refuses_bad_queue_sizes() {
    for size in [100u32, 512, 0x1_0000, 0] {
        let connector = PairConnector::default();
        let dev = Vsock::with_backend(CID as u32, None, Box::new(connector)).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mem = mem();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new("vsock", dev.clone(), mem, Arc::new(Interrupt::new(irq)));
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let r = |t: &mut MmioTransport, off: u64| {
            let mut d = [0u8; 4];
            t.read(off, &mut d);
            u32::from_le_bytes(d)
        };
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(&mut t, 0x70, ready);
        for q in 0..3u32 {
            w(&mut t, 0x30, q);
            w(&mut t, 0x38, if q == 1 { size } else { 64 });
            let base = 0x10000 * (u64::from(q) + 1);
            w(&mut t, 0x80, base as u32);
            w(&mut t, 0x90, (base + 0x1000) as u32);
            w(&mut t, 0xa0, (base + 0x2000) as u32);
            w(&mut t, 0x44, 1);
        }
        // A config write past the end, then DRIVER_OK.
        t.write(0x100 + 0x40, &[1, 2, 3, 4]);
        w(&mut t, 0x70, ready | STATUS_DRIVER_OK);
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0, "size {size}");
        assert!(dev.lock().unwrap().running.is_none());
        // The CID still reads right.
        assert_eq!(r(&mut t, 0x100), CID as u32);
    }
}
