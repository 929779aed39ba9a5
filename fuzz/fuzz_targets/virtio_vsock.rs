//! Fuzzes the virtio-vsock device's TX path: the input becomes a 16-entry
//! TX queue (descriptor table, avail index and ring) and guest memory in two
//! regions with a hole (packet headers, payloads, indirect tables); the
//! device parses and serves every chain against a backend whose guest
//! connections are socket pairs, then host-side bytes from the input flow
//! back through the RX queue. The request parsers (`parse_tx`,
//! `parse_connect`) also get the raw input.
#![no_main]

use std::io::Write;
use std::sync::Arc;

use devices::virtio::vsock::host::PairConnector;
use devices::virtio::vsock::muxer::{FIRST_CONN_TOKEN, parse_connect};
use devices::virtio::vsock::packet::parse_tx;
use devices::virtio::vsock::{EventSet, NoPoller, RX, TX, Vsock};
use devices::virtio::{Activation, F_EVENT_IDX, F_VERSION_1, GuestMemory, Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const CID: u32 = 3;
const QSIZE: u16 = 16;
/// Region A: TX rings and fuzzed data; region B (after a hole): more
/// fuzzed data, then well-formed RX buffers and the other rings.
const A: (u64, usize) = (0, 0x10000);
const B: (u64, usize) = (0x20000, 0x20000);
const TX_DESC: u64 = 0x0;
const TX_AVAIL: u64 = 0x1000;
const TX_USED: u64 = 0x2000;
const A_DATA: u64 = 0x3000;
const B_DATA: u64 = 0x20000;
const RX_DESC: u64 = 0x30000;
const RX_AVAIL: u64 = 0x31000;
const RX_USED: u64 = 0x32000;
const EV_RING: u64 = 0x33000;
const RX_BUFS: u64 = 0x34000;
const RX_BUF_LEN: u32 = 1024;

fn queue(mem: &GuestMemory, desc: u64, avail: u64, used: u64, event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(QSIZE);
    q.try_set_desc_table_address(GuestAddress(desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(used)).ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

fuzz_target!(|data: &[u8]| {
    // The parsers alone, on the raw input.
    let _ = parse_tx(data, data.len(), u64::from(CID));
    let _ = parse_connect(data);

    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // Descriptor table (16 x 16 bytes), avail index and ring (2 + 32 bytes).
    let ring_len = 16 * usize::from(QSIZE) + 2 + 2 * usize::from(QSIZE);
    if rest.len() < ring_len {
        return;
    }
    let (rings, payload) = rest.split_at(ring_len);
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(A.0), A.1), (GuestAddress(B.0), B.1)])
    else {
        return;
    };
    let event_idx = flags & 1 != 0;

    // TX queue from the input.
    let _ = mem.write_slice(&rings[..256], GuestAddress(TX_DESC));
    let _ = mem.write_slice(&rings[256..258], GuestAddress(TX_AVAIL + 2));
    let _ = mem.write_slice(&rings[258..], GuestAddress(TX_AVAIL + 4));
    // Data for the descriptors to point at: the same bytes in both regions,
    // with the host-side bytes at the end of the input.
    let (guest_bytes, host_bytes) = payload.split_at(payload.len() * 3 / 4);
    let a_room = (A.0 + A.1 as u64 - A_DATA) as usize;
    let _ = mem.write_slice(&guest_bytes[..guest_bytes.len().min(a_room)], GuestAddress(A_DATA));
    let _ = mem.write_slice(&guest_bytes[..guest_bytes.len().min(0x8000)], GuestAddress(B_DATA));

    // Well-formed RX buffers, so the device's replies go somewhere.
    for i in 0..QSIZE {
        let d = RX_DESC + 16 * u64::from(i);
        let _ = mem.write_obj(RX_BUFS + u64::from(i) * u64::from(RX_BUF_LEN), GuestAddress(d));
        let _ = mem.write_obj(RX_BUF_LEN, GuestAddress(d + 8));
        let _ = mem.write_obj(2u16, GuestAddress(d + 12)); // WRITE
        let _ = mem.write_obj(i, GuestAddress(RX_AVAIL + 4 + 2 * u64::from(i)));
    }
    let _ = mem.write_obj(QSIZE, GuestAddress(RX_AVAIL + 2));

    let (Some(rxq), Some(txq), Some(evq)) = (
        queue(&mem, RX_DESC, RX_AVAIL, RX_USED, event_idx),
        queue(&mem, TX_DESC, TX_AVAIL, TX_USED, event_idx),
        queue(&mem, EV_RING, EV_RING + 0x100, EV_RING + 0x200, event_idx),
    ) else {
        return;
    };

    let connector = PairConnector {
        // Some ports refuse, as a host with nobody listening would.
        refuse: vec![u32::from(flags >> 4)],
        keep: 64,
        ..PairConnector::default()
    };
    let Ok(mut dev) = Vsock::with_backend(CID, None, Box::new(connector.clone())) else {
        return;
    };
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let features = F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 };
    if dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rxq, txq, evq],
            features,
            interrupt: Arc::new(Interrupt::new(irq)),
        })
        .is_err()
    {
        return;
    }
    let mut poller = NoPoller;
    // The guest notifies TX (twice: what a first pass left past its budget).
    dev.handle(TX as u32, EventSet::IN, &mut poller);
    dev.handle(TX as u32, EventSet::IN, &mut poller);
    // Host applications write (and some hang up) on the connections made.
    let peers: Vec<_> = connector
        .peers
        .lock()
        .map(|p| p.iter().filter_map(|(_, s)| s.try_clone().ok()).collect())
        .unwrap_or_default();
    for (k, mut peer) in peers.into_iter().enumerate() {
        let _ = peer.write(host_bytes);
        if flags & 2 != 0 && k % 2 == 1 {
            let _ = peer.shutdown(std::net::Shutdown::Write);
        }
        let set = if flags & 4 != 0 {
            EventSet::IN | EventSet::OUT | EventSet::HANG_UP
        } else {
            EventSet::IN | EventSet::OUT
        };
        dev.handle(FIRST_CONN_TOKEN + k as u32, set, &mut poller);
    }
    dev.handle(RX as u32, EventSet::IN, &mut poller);
    // A reset, served on the next event, ends everything.
    if flags & 8 != 0 {
        dev.reset();
        dev.handle(TX as u32, EventSet::IN, &mut poller);
    }
});
