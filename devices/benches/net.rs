//! virtio-net throughput between a guest queue and a TAP device, against a
//! host process using the same tap directly.
//!
//!     cargo bench -p devices --bench net        (as root: it creates a tap)
//!
//! TX: the bench plays the driver: it queues frames in a 256-entry transmit
//! queue in guest memory and notifies; the device (on this thread, as on
//! the event loop) reads each chain and writes the frame to the tap. The
//! host side writes the same frames (virtio-net header included) to the
//! same tap descriptor in a loop.
//!
//! RX: frames are put in the tap's queue from a packet socket (not timed),
//! then drained: by the device into mergeable 4 KiB guest buffers (the
//! bench re-posts used buffers, as a driver does), or by the host process
//! reading the tap descriptor into a buffer.
//!
//! Sizes: 64-byte and 1514-byte Ethernet frames, and 64 KiB ones: on TX a
//! TCP segmentation-offload frame (the header asks the host to segment it,
//! as a Linux guest does with TSO), on RX a 65535-byte frame on a tap with a
//! 64 KiB MTU (a packet socket cannot hand a tap a TSO frame: the kernel
//! segments those first). Frames go to a MAC address that is not the tap's,
//! so the host stack drops them at once.
//!
//! The host process uses the same memory as the device (the 256 frame
//! copies it sends from, the 1 MiB of receive buffers it fills), so that
//! the ratio is the device's own cost, not cache effects.
//!
//! Prints frames/s and MiB/s (Ethernet bytes, without the 12-byte header)
//! for the device and for the host process, and their ratio: the median of
//! five interleaved runs of about 0.3 s each.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::{FEATURES, Net, RX_QUEUE, TX_QUEUE, Tap};
use devices::virtio::{Activation, GuestMemory, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const HDR: usize = 12;
/// Rings: descriptor table, avail ring, used ring, per queue.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x4000, 0x5000, 0x6000)];
/// Transmit frames, then receive buffers.
const TX_DATA: u64 = 0x10_0000;
const RX_DATA: u64 = 0x200_0000;
const RX_BUF: u32 = 4096;
const RUNS: usize = 5;
const RUN_TIME: Duration = Duration::from_millis(300);
const DEST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args:?} failed (iproute2 is needed)");
}

/// A frame with its virtio-net header: `len` Ethernet bytes; `tso` makes it
/// an IPv4/TCP frame the host must segment (TSO), else a test EtherType.
fn frame(len: usize, tso: bool) -> Vec<u8> {
    let mut f = vec![0u8; HDR + len];
    let eth = &mut f[HDR..];
    eth[..6].copy_from_slice(&DEST);
    eth[6..12].copy_from_slice(&SRC);
    if tso {
        f[0] = 1; // NEEDS_CSUM
        f[1] = 1; // GSO_TCPV4
        f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        f[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
        let eth = &mut f[HDR..];
        eth[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut eth[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6; // TCP
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let sum = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let tcp = &mut eth[34..54];
        tcp[0..2].copy_from_slice(&5000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x10; // ACK
        tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    } else {
        eth[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        for (i, b) in eth[14..].iter_mut().enumerate() {
            *b = i as u8;
        }
    }
    f
}

struct Bench {
    mem: GuestMemory,
    net: Net<Tap>,
    tap: String,
    /// The driver's view of each queue: next avail index, next used index.
    avail: [u16; 2],
    used: [u16; 2],
    /// Puts frames in the tap's queue.
    packet: OwnedFd,
}

impl Bench {
    fn new() -> Bench {
        let tap = format!("lgb{}", std::process::id() % 1_000_000);
        let net =
            Net::new(Tap::open(&tap).unwrap_or_else(|e| panic!("{e}")), DEST).expect("event fds");
        let v6 = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
        if std::path::Path::new(&v6).exists() {
            std::fs::write(&v6, "1").unwrap();
        }
        ip(&[
            "link",
            "set",
            &tap,
            "mtu",
            "65521",
            "txqueuelen",
            "4096",
            "up",
        ]);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let packet = packet_socket(&tap);
        let mut b = Bench {
            mem,
            net,
            tap,
            avail: [0, 0],
            used: [0, 0],
            packet,
        };
        let queues = RINGS
            .iter()
            .map(|&(desc, avail, used)| {
                let mut q = Queue::new(QSIZE).unwrap();
                q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
                q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
                q.try_set_used_ring_address(GuestAddress(used)).unwrap();
                q.set_event_idx(true);
                q.set_ready(true);
                q
            })
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        b.net
            .activate(Activation {
                mem: b.mem.clone(),
                queues,
                features: FEATURES,
                interrupt: Arc::new(Interrupt::new(irq)),
            })
            .unwrap();
        // Receive buffers: one 4 KiB buffer per descriptor, all posted.
        for i in 0..QSIZE {
            let addr = RX_DATA + u64::from(i) * u64::from(RX_BUF);
            b.set_desc(RX_QUEUE, i, addr, RX_BUF, 2);
            b.push_avail(RX_QUEUE, i);
        }
        b.publish(RX_QUEUE);
        b
    }

    fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16) {
        let base = RINGS[q].0 + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
    }

    fn push_avail(&mut self, q: usize, head: u16) {
        let slot = u64::from(self.avail[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(RINGS[q].1 + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
    }

    fn publish(&self, q: usize) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(self.avail[q], GuestAddress(RINGS[q].1 + 2))
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(RINGS[q].2 + 2)).unwrap()
    }

    /// The device sends `frame` (virtio-net header first) for `RUN_TIME`;
    /// returns frames sent and seconds.
    fn device_tx(&mut self, frame: &[u8]) -> (u64, f64) {
        // Every descriptor points at its own copy of the frame.
        for i in 0..QSIZE {
            let addr = TX_DATA + u64::from(i) * 0x1_1000;
            self.mem.write_slice(frame, GuestAddress(addr)).unwrap();
            self.set_desc(TX_QUEUE, i, addr, frame.len() as u32, 0);
        }
        let before = self.net.stats();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < RUN_TIME {
            for i in 0..QSIZE {
                self.push_avail(TX_QUEUE, i);
            }
            self.publish(TX_QUEUE);
            self.net.notified(TX_QUEUE);
            while self.used_idx(TX_QUEUE) != self.avail[TX_QUEUE] {
                self.net.notified(TX_QUEUE);
            }
            sent += u64::from(QSIZE);
        }
        let secs = start.elapsed().as_secs_f64();
        let after = self.net.stats();
        assert_eq!(after.tx_frames - before.tx_frames, sent, "{after:?}");
        assert_eq!(after.tx_dropped, before.tx_dropped, "{after:?}");
        self.used[TX_QUEUE] = self.avail[TX_QUEUE];
        (sent, secs)
    }

    /// The host writes the same frames to the tap for `RUN_TIME`, from the
    /// same memory (the 256 copies in guest memory `device_tx` used).
    fn host_tx(&self, frame: &[u8]) -> (u64, f64) {
        let fd = self.net.backend().as_raw_fd();
        let frames: Vec<*const u8> = (0..QSIZE)
            .map(|i| {
                let addr = GuestAddress(TX_DATA + u64::from(i) * 0x1_1000);
                self.mem.get_host_address(addr).unwrap() as *const u8
            })
            .collect();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < RUN_TIME {
            for &f in &frames {
                // SAFETY: each pointer is `frame.len()` bytes of guest memory.
                let n = unsafe { libc::write(fd, f.cast(), frame.len()) };
                assert_eq!(
                    n,
                    frame.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
            }
            sent += u64::from(QSIZE);
        }
        (sent, start.elapsed().as_secs_f64())
    }

    /// Puts up to `count` copies of the Ethernet frame `eth` in the tap's
    /// queue (untimed).
    fn fill_tap(&self, eth: &[u8], count: usize) {
        for _ in 0..count {
            // SAFETY: send reads `eth.len()` bytes from `eth`.
            let n =
                unsafe { libc::send(self.packet.as_raw_fd(), eth.as_ptr().cast(), eth.len(), 0) };
            assert_eq!(n, eth.len() as isize, "{}", std::io::Error::last_os_error());
        }
    }

    /// The device moves what is in the tap into guest buffers; returns
    /// frames and seconds.
    fn device_rx(&mut self, eth: &[u8], batch: usize) -> (u64, f64) {
        let mut frames = 0u64;
        let mut secs = 0.0;
        while secs < RUN_TIME.as_secs_f64() {
            self.fill_tap(eth, batch);
            let before = self.net.stats();
            let start = Instant::now();
            loop {
                self.net.notified(RX_QUEUE);
                // Re-post what the device used, as a driver refills.
                let used = self.used_idx(RX_QUEUE);
                if used == self.used[RX_QUEUE] {
                    break;
                }
                while self.used[RX_QUEUE] != used {
                    let slot = u64::from(self.used[RX_QUEUE] % QSIZE);
                    let id: u32 = self
                        .mem
                        .read_obj(GuestAddress(RINGS[RX_QUEUE].2 + 4 + 8 * slot))
                        .unwrap();
                    self.push_avail(RX_QUEUE, id as u16);
                    self.used[RX_QUEUE] = self.used[RX_QUEUE].wrapping_add(1);
                }
                self.publish(RX_QUEUE);
            }
            secs += start.elapsed().as_secs_f64();
            let after = self.net.stats();
            assert_eq!(after.rx_dropped, before.rx_dropped, "{after:?}");
            frames += after.rx_frames - before.rx_frames;
        }
        (frames, secs)
    }

    /// The host reads what is in the tap, into the memory the device fills
    /// (the 1 MiB of receive buffers, in turn).
    fn host_rx(&self, eth: &[u8], batch: usize) -> (u64, f64) {
        let fd = self.net.backend().as_raw_fd();
        let area = self.mem.get_host_address(GuestAddress(RX_DATA)).unwrap();
        let slot = (eth.len() + HDR).next_multiple_of(RX_BUF as usize);
        let slots = (usize::from(QSIZE) * RX_BUF as usize) / slot;
        let mut frames = 0u64;
        let mut secs = 0.0;
        while secs < RUN_TIME.as_secs_f64() {
            self.fill_tap(eth, batch);
            let start = Instant::now();
            loop {
                // SAFETY: the slot lies in the receive area of guest memory
                // and holds `slot` bytes.
                let n = unsafe {
                    let at = area.add((frames as usize % slots) * slot);
                    libc::read(fd, at.cast(), slot)
                };
                if n < 0 {
                    break;
                }
                frames += 1;
            }
            secs += start.elapsed().as_secs_f64();
        }
        (frames, secs)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.tap]).status();
    }
}

/// A raw packet socket that hands frames straight to the tap's queue.
fn packet_socket(tap: &str) -> OwnedFd {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: sockaddr_ll is plain old data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: a sockaddr_ll of the size given.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
    let one: libc::c_int = 1;
    let big: libc::c_int = 512 << 20;
    for (level, option, value) in [
        (libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one),
        (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &big),
    ] {
        // SAFETY: each option takes an int.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                option,
                (value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(ret, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
    fd
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(what: &str, eth_len: usize, device: Vec<(u64, f64)>, host: Vec<(u64, f64)>) {
    let rate = |runs: Vec<(u64, f64)>| median(runs.iter().map(|&(n, s)| n as f64 / s).collect());
    let (d, h) = (rate(device), rate(host));
    let mib = |fps: f64| fps * eth_len as f64 / (1024.0 * 1024.0);
    println!(
        "{what:<22} {:>11.0} {:>9.1} {:>11.0} {:>9.1} {:>7.2}",
        d,
        mib(d),
        h,
        mib(h),
        d / h
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs it with no
    // arguments, where a quick smoke run would still need root: skip there.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("net bench: needs root (it creates a TAP device)");
        std::process::exit(1);
    }
    let mut b = Bench::new();
    println!(
        "virtio-net, {RUNS} interleaved runs of ~{} ms each, median (MiB/s: Ethernet bytes)",
        RUN_TIME.as_millis()
    );
    println!(
        "{:<22} {:>11} {:>9} {:>11} {:>9} {:>7}",
        "", "device f/s", "MiB/s", "host f/s", "MiB/s", "ratio"
    );
    for (name, len, tso) in [
        ("TX 64 B", 64, false),
        ("TX 1514 B", 1514, false),
        ("TX 64 KiB (TSO)", 65535, true),
    ] {
        let f = frame(len, tso);
        let (mut dev, mut host) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            dev.push(b.device_tx(&f));
            host.push(b.host_tx(&f));
        }
        report(name, len, dev, host);
    }
    for (name, len, batch) in [
        ("RX 64 B", 64, 2048),
        ("RX 1514 B", 1514, 2048),
        ("RX 64 KiB (jumbo)", 65535, 256),
    ] {
        let f = frame(len, false);
        let eth = &f[HDR..];
        let (mut dev, mut host) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            dev.push(b.device_rx(eth, batch));
            host.push(b.host_rx(eth, batch));
        }
        report(name, len, dev, host);
    }
}
