//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue between
//! the guest and a host TAP device ([`tap::Tap`]); the MAC address in
//! configuration space.
//!
//! Frames carry a 12-byte virtio-net header on both sides, so checksum and
//! segmentation offloads pass straight between the guest and the host
//! kernel. The device offers them as far as the tap implements them, and
//! tells the tap (TUNSETOFFLOAD) which ones the driver accepts on receive.
//!
//! All work happens on the VMM's event loop: the device watches its two
//! queue event fds and the tap. Receive reads the tap only while the guest
//! has buffers posted (otherwise it waits for the guest's next notification
//! and leaves frames in the tap's queue); transmit writes each frame to the
//! tap, and watches for the tap to become writable only when a write would
//! block. Each event handles at most [`BUDGET`] frames per direction, then
//! yields to the other devices on the loop.

pub mod chain;
pub mod tap;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, Budget, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, GuestMemory,
    Handled, Interrupt, TYPE_NET, VirtioDevice, drain_queue, signal_used_if_needed,
};
pub use chain::{ChainError, HDR_LEN, MAX_TX_FRAME};
use chain::{OFF_NUM_BUFFERS, RxBuffer, TxFrame, check_tx_header, fix_rx_header};
pub use tap::{Tap, TapError};

/// Feature bits (virtio 1.2 §5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;

/// What the device offers. Transmit offloads (CSUM, HOST_*) are frames the
/// tap accepts with their header as they are; receive offloads (GUEST_*) are
/// what the tap may hand over once told with TUNSETOFFLOAD. UFO/USO are not
/// offered: Linux taps no longer produce UFO, and USO is too new for the
/// hosts ligera targets.
pub const FEATURES: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_MAC
    | F_CSUM
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_MRG_RXBUF;

/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Frames handled per event and direction before the device yields the
/// event loop (and re-arms itself).
pub const BUDGET: usize = 64;
/// The receive buffer: the longest frame a tap hands over (a 64 KiB
/// segmentation-offload packet with Ethernet header and VLAN tag) with its
/// header, and some room.
const RX_FRAME_MAX: usize = MAX_TX_FRAME + 64;
/// Event data of the backend fd (the queues use their index).
const BACKEND_DATA: u32 = 2;

/// Where frames go to and come from: a TAP device, or (in tests and
/// fuzzing) one end of a datagram socket pair. One read or write is
/// one frame, virtio-net header first; the descriptor is non-blocking.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame; `WouldBlock` when there is none. Returns the
    /// frame's full length, more than `buf` holds if it was cut short.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame; `WouldBlock` when the backend cannot take it now.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Writes one frame gathered from `iov`.
    ///
    /// # Safety
    ///
    /// Every vector must be valid for reads of its length.
    unsafe fn write_vectored(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = iov.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: the caller vouches for the vectors.
        let n = unsafe { libc::writev(self.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    /// Which offloads (`TUN_F_*` bits) the reader accepts in read frames.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// For messages.
    fn name(&self) -> &str;
}

/// A datagram socket as a backend: frames keep their boundaries, and
/// nothing needs privileges. Used by tests and fuzzing.
impl NetBackend for UnixDatagram {
    /// Like a tap, reports the full length of a datagram cut short.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.send(frame)
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn name(&self) -> &str {
        "socket"
    }
}

/// The TUNSETOFFLOAD bits that match what a driver accepts on receive.
pub fn tap_offload_flags(features: u64) -> u32 {
    if features & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if features & F_GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if features & F_GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    if features & F_GUEST_ECN != 0 && features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// A MAC address for a VM that was given none: locally administered and
/// unicast (`02:xx:xx:xx:xx:xx`), the rest random.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most 5 bytes into the 5-byte slice.
    let n = unsafe { libc::getrandom(mac[1..].as_mut_ptr().cast(), 5, 0) };
    if n != 5 {
        // No entropy: the process id and time still tell VMs apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = (u64::from(std::process::id()) << 32) | u64::from(t);
        mac[1..].copy_from_slice(&seed.to_le_bytes()[..5]);
    }
    mac[0] = 0x02;
    mac
}

/// Formats a MAC address as `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Frame counters, since the device was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames (and their bytes, without the header) written to the backend.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Transmit chains refused (malformed, too long, bad header) or that the
    /// backend refused.
    pub tx_dropped: u64,
    /// Frames (bytes without the header) given to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the backend that the guest could not take (no
    /// buffer large enough, offloads it did not agree to, runts).
    pub rx_dropped: u64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_buffers: u64,
}

/// Reports what the guest (or the host) does wrong: the first report at
/// warning level, the rest at debug level, so neither can flood stderr.
struct Reporter {
    name: String,
    warned_guest: bool,
    warned_host: bool,
}

impl Reporter {
    fn guest(&mut self, what: std::fmt::Arguments) {
        if self.warned_guest {
            log::debug!("{}: {what}", self.name);
        } else {
            self.warned_guest = true;
            log::warn!(
                "{}: {what} (further driver errors are logged at debug level)",
                self.name
            );
        }
    }

    fn host(&mut self, what: std::fmt::Arguments) {
        if self.warned_host {
            log::debug!("{}: {what}", self.name);
        } else {
            self.warned_host = true;
            log::warn!(
                "{}: {what} (further backend errors are logged at debug level)",
                self.name
            );
        }
    }
}

/// State while the driver runs the device.
struct Running {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    features: u64,
    /// The guest has no receive buffers for us: the tap is not read until
    /// it notifies the receive queue.
    rx_waiting: bool,
}

/// The network device.
pub struct Net<B: NetBackend = Tap> {
    mac: [u8; 6],
    backend: B,
    queue_events: Vec<EventFd>,
    running: Option<Running>,
    /// A frame read from the backend, header first, and its length while it
    /// waits for guest buffers.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// Checked receive chains taken from the queue, not yet used.
    rx_buffers: VecDeque<RxBuffer>,
    /// The transmit chain being sent.
    tx: TxFrame,
    /// Its head while its write would block.
    tx_backlog: Option<u16>,
    /// For frames in too many pieces for one writev.
    tx_copy: Vec<u8>,
    /// Scratch I/O vectors (empty between calls).
    iov: IoVecs,
    /// What the event loop watches the backend for (None: not at all).
    watching: Option<EventSet>,
    /// The backend failed for good (a tap that was deleted).
    backend_gone: bool,
    stats: NetStats,
    report: Reporter,
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, mac: [u8; 6]) -> io::Result<Self> {
        let name = format!("virtio-net({})", backend.name());
        Ok(Net {
            mac,
            backend,
            queue_events: vec![
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            running: None,
            rx_frame: vec![0u8; RX_FRAME_MAX],
            rx_pending: None,
            rx_buffers: VecDeque::new(),
            tx: TxFrame::new(),
            tx_backlog: None,
            tx_copy: vec![0u8; MAX_TX_FRAME],
            iov: IoVecs(Vec::new()),
            watching: None,
            backend_gone: false,
            stats: NetStats::default(),
            report: Reporter {
                name,
                warned_guest: false,
                warned_host: false,
            },
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the driver has the device running.
    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }

    /// What the backend should be watched for now.
    fn wanted_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if let Some(r) = &self.running
            && !self.backend_gone
        {
            if !r.rx_waiting {
                set |= EventSet::IN;
            }
            if self.tx_backlog.is_some() {
                set |= EventSet::OUT;
            }
        }
        set
    }

    /// Makes the device run again soon, after the other event sources had
    /// their turn: the queue's event fd is level-triggered in the loop.
    fn kick(&self, queue: usize) {
        if let Err(e) = self.queue_events[queue].write(1) {
            log::debug!("{}: cannot re-arm queue {queue}: {e}", self.report.name);
        }
    }

    /// Sends what the guest queued for transmission: at most [`BUDGET`]
    /// frames, then re-arms itself. A frame the backend cannot take now is
    /// kept (the guest does not get it back yet) and sent first when the
    /// backend is writable again.
    pub fn process_tx(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let mut returned = false;
        if let Some(head) = self.tx_backlog {
            // `tx` still describes that chain.
            let result = send(
                &mut self.backend,
                &self.tx,
                &r.mem,
                &mut self.iov,
                &mut self.tx_copy,
            );
            if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                return;
            }
            tx_done(&mut self.stats, &mut self.report, result, self.tx.len());
            self.tx_backlog = None;
            return_chain(&mut r.tx, &r.mem, head, 0, &self.report.name);
            returned = true;
        }
        let (backend, frame, iov, copy) = (
            &mut self.backend,
            &mut self.tx,
            &mut self.iov,
            &mut self.tx_copy,
        );
        let (stats, report, backlog) = (&mut self.stats, &mut self.report, &mut self.tx_backlog);
        let drained = drain_queue(
            &mut r.tx,
            &r.mem,
            &r.interrupt,
            Budget::chains(BUDGET),
            |chain| {
                let head = chain.head_index();
                let parsed = chain::read_tx_chain(&r.mem, chain, frame)
                    .and_then(|()| check_tx_header(frame.header(), frame.len(), r.features));
                if let Err(e) = parsed {
                    stats.tx_dropped += 1;
                    report.guest(format_args!("TX chain {head} dropped: {e}"));
                    return Handled::used(0);
                }
                let result = send(backend, frame, &r.mem, iov, copy);
                if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                    *backlog = Some(head);
                    return Handled::Kept;
                }
                tx_done(stats, report, result, frame.len());
                Handled::used(0)
            },
        );
        if drained.broken {
            self.report.guest(format_args!(
                "TX queue unusable: its avail index is out of range"
            ));
        }
        if returned && drained.used == 0 {
            signal_used_if_needed(&mut r.tx, &r.mem, &r.interrupt);
        }
        if drained.more {
            self.kick(TX_QUEUE);
        }
    }

    /// Takes one more usable receive chain from the queue into
    /// `rx_buffers`; malformed ones are returned unused on the way. False
    /// when the queue has none (or is unusable).
    fn take_rx_buffer(&mut self, used: &mut bool) -> bool {
        let Some(r) = self.running.as_mut() else {
            return false;
        };
        // Each round consumes an available entry; the queue has at most
        // `size` of them before the driver must wait for used ones.
        for _ in 0..r.rx.size() {
            let chain = match r.rx.iter(&r.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => {
                    self.report.guest(format_args!("RX queue unusable: {e:?}"));
                    return false;
                }
            };
            let Some(chain) = chain else {
                return false;
            };
            let head = chain.head_index();
            match chain::parse_rx_chain(&r.mem, chain) {
                Ok(buffer) => {
                    self.rx_buffers.push_back(buffer);
                    return true;
                }
                Err(e) => {
                    self.stats.rx_bad_buffers += 1;
                    self.report
                        .guest(format_args!("RX chain {head} returned unused: {e}"));
                    if let Err(e) = r.rx.add_used(&r.mem, head, 0) {
                        log::debug!(
                            "{}: cannot return RX descriptor {head}: {e}",
                            self.report.name
                        );
                    }
                    *used = true;
                }
            }
        }
        false
    }

    /// The guest has no (more) buffers: stop reading the backend until it
    /// notifies the receive queue, unless buffers arrived meanwhile.
    fn wait_for_rx_buffers(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        r.rx_waiting = true;
        match r.rx.enable_notification(&r.mem) {
            Ok(true) if r.rx.iter(&r.mem).is_ok() => {
                // Buffers arrived while we were looking: go on later.
                r.rx_waiting = false;
                self.kick(RX_QUEUE);
            }
            Ok(_) => {}
            Err(e) => log::debug!("{}: cannot enable RX notifications: {e}", self.report.name),
        }
    }

    /// Moves frames from the backend to the guest: at most [`BUDGET`], and
    /// only while the guest has buffers for them.
    pub fn process_rx(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        if r.rx_waiting || self.backend_gone {
            return;
        }
        let (mrg, features) = (r.features & F_MRG_RXBUF != 0, r.features);
        let mut used = false;
        for _ in 0..BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    // Read only with somewhere to put the frame.
                    if self.rx_buffers.is_empty() && !self.take_rx_buffer(&mut used) {
                        self.wait_for_rx_buffers();
                        break;
                    }
                    let result = self.backend.read_frame(&mut self.rx_frame);
                    let Some(len) = self.received(result) else {
                        break;
                    };
                    if len > self.rx_frame.len() {
                        self.stats.rx_dropped += 1;
                        log::debug!("{}: {len}-byte frame cut short, dropped", self.report.name);
                        continue;
                    }
                    let header: &mut [u8; HDR_LEN] = match self.rx_frame.first_chunk_mut() {
                        Some(h) => h,
                        None => continue,
                    };
                    if let Err(e) = fix_rx_header(header, len, features) {
                        self.stats.rx_dropped += 1;
                        log::debug!("{}: received frame dropped: {e}", self.report.name);
                        continue;
                    }
                    self.rx_pending = Some(len);
                    len
                }
            };
            let count = match self.rx_buffers_for(len, mrg, &mut used) {
                Some(Ok(count)) => count,
                Some(Err(())) => {
                    self.rx_pending = None;
                    continue;
                }
                None => {
                    self.wait_for_rx_buffers();
                    break;
                }
            };
            self.rx_pending = None;
            self.write_rx_frame(len, count);
            used = true;
        }
        if used && let Some(r) = self.running.as_mut() {
            signal_used_if_needed(&mut r.rx, &r.mem, &r.interrupt);
        }
    }

    /// What a read from the backend gave: the frame's length, or None
    /// when there is nothing (more) to read now.
    fn received(&mut self, result: io::Result<usize>) -> Option<usize> {
        match result {
            Ok(len) => Some(len),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                self.report
                    .host(format_args!("cannot read from the backend: {e}"));
                self.backend_gone = true;
                None
            }
        }
    }

    /// How many of the (front) receive buffers a `len`-byte frame takes:
    /// `None` if the guest must post more first, `Some(Err)` if the frame
    /// was dropped because it can never fit.
    fn rx_buffers_for(
        &mut self,
        len: usize,
        mrg: bool,
        used: &mut bool,
    ) -> Option<Result<usize, ()>> {
        if !mrg {
            if self.rx_buffers.is_empty() && !self.take_rx_buffer(used) {
                return None;
            }
            let capacity = self.rx_buffers[0].capacity() as usize;
            if capacity < len {
                // The buffer stays for the next (smaller) frame.
                self.stats.rx_dropped += 1;
                self.report.guest(format_args!(
                    "RX buffer of {capacity} bytes too small for a {len}-byte frame"
                ));
                return Some(Err(()));
            }
            return Some(Ok(1));
        }
        loop {
            let mut room = 0usize;
            let enough = self.rx_buffers.iter().position(|b| {
                room += b.capacity() as usize;
                room >= len
            });
            if let Some(i) = enough {
                return Some(Ok(i + 1));
            }
            let size = self
                .running
                .as_ref()
                .map_or(0, |r| usize::from(r.rx.size()));
            if self.rx_buffers.len() >= size {
                // Every buffer the queue can hold is here, and still too
                // small: the frame can never fit.
                self.stats.rx_dropped += 1;
                self.report.guest(format_args!(
                    "all RX buffers together cannot hold a {len}-byte frame"
                ));
                return Some(Err(()));
            }
            if !self.take_rx_buffer(used) {
                return None;
            }
        }
    }

    /// Writes the `len`-byte frame in `rx_frame` over the first `count`
    /// receive buffers and returns them to the guest.
    fn write_rx_frame(&mut self, len: usize, count: usize) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let frame = &mut self.rx_frame[..len];
        // `count` is at most the queue size.
        frame[OFF_NUM_BUFFERS..OFF_NUM_BUFFERS + 2].copy_from_slice(&(count as u16).to_le_bytes());
        let mut done = 0usize;
        for buffer in self.rx_buffers.drain(..count) {
            let written = match buffer.write(&r.mem, &frame[done..]) {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("{}: cannot write a received frame: {e}", self.report.name);
                    0
                }
            };
            done += written as usize;
            if let Err(e) = r.rx.add_used(&r.mem, buffer.head, written) {
                log::debug!(
                    "{}: cannot return RX descriptor {}: {e}",
                    self.report.name,
                    buffer.head
                );
            }
        }
        if done == len {
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += (len - HDR_LEN) as u64;
        } else {
            self.stats.rx_dropped += 1;
        }
    }

    /// Handles a notification of queue `queue` (its event fd fired).
    /// Notifications before DRIVER_OK find nothing running and are dropped.
    pub fn notified(&mut self, queue: usize) {
        match queue {
            RX_QUEUE => {
                let _ = self.queue_events[RX_QUEUE].read();
                if let Some(r) = self.running.as_mut() {
                    // New buffers: read the backend again, and hear from the
                    // driver only when we run out (see wait_for_rx_buffers).
                    r.rx_waiting = false;
                    if let Err(e) = r.rx.disable_notification(&r.mem) {
                        log::debug!("{}: cannot disable RX notifications: {e}", self.report.name);
                    }
                }
                self.process_rx();
            }
            TX_QUEUE => {
                let _ = self.queue_events[TX_QUEUE].read();
                self.process_tx();
            }
            _ => {}
        }
    }

    /// Brings what the event loop watches in line with what the device needs.
    fn update_watch(&mut self, ops: &mut EventOps) {
        let Some(current) = self.watching else {
            return;
        };
        let wanted = self.wanted_events();
        if wanted != current {
            match ops.modify(Events::with_data(&self.backend, BACKEND_DATA, wanted)) {
                Ok(()) => self.watching = Some(wanted),
                Err(e) => log::error!("{}: cannot watch the backend: {e:?}", self.report.name),
            }
        }
    }

    fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }
}

/// Scratch I/O vectors for sending. They hold raw pointers into guest
/// memory only during one call that also borrows that memory, and are
/// cleared after.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the vectors are empty whenever the device changes threads (they
// are filled and cleared within one call), so no pointer crosses threads.
unsafe impl Send for IoVecs {}

/// Most I/O vectors one readv/writev takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Writes a checked transmit frame to the backend, straight from guest
/// memory; frames in more pieces than one writev takes go through `copy`.
fn send<B: NetBackend>(
    backend: &mut B,
    frame: &TxFrame,
    mem: &GuestMemory,
    iov: &mut IoVecs,
    copy: &mut [u8],
) -> io::Result<usize> {
    iov.0.clear();
    let result = match frame.iovecs(mem, &mut iov.0) {
        Ok(()) if iov.0.len() <= IOV_MAX => {
            // SAFETY: the vectors point into `frame` and `mem`, checked
            // guest memory, both borrowed for the duration of the call.
            unsafe { backend.write_vectored(&iov.0) }
        }
        _ => match frame.copy_to(mem, copy) {
            Ok(n) => backend.write_frame(&copy[..n]),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        },
    };
    iov.0.clear();
    result
}

/// Counts the outcome of sending a `len`-byte frame.
fn tx_done(stats: &mut NetStats, report: &mut Reporter, result: io::Result<usize>, len: usize) {
    match result {
        Ok(n) if n == len => {
            stats.tx_frames += 1;
            stats.tx_bytes += (len - HDR_LEN) as u64;
        }
        Ok(n) => {
            stats.tx_dropped += 1;
            report.host(format_args!(
                "short write to the backend: {n} of {len} bytes"
            ));
        }
        Err(e) => {
            stats.tx_dropped += 1;
            report.host(format_args!(
                "cannot send a {len}-byte frame: {e} (is the interface up?)"
            ));
        }
    }
}

/// Puts a chain in the used ring.
fn return_chain(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32, name: &str) {
    if let Err(e) = queue.add_used(mem, head, len) {
        log::debug!("{name}: cannot return descriptor {head}: {e}");
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The configuration space: the MAC address (no status, no MTU).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac, offset, data);
    }

    // Writes to the configuration space are ignored (the default): with
    // VERSION_1 the MAC address is read-only.

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        let [rx, tx] = a.take_queues()?;
        let offload = tap_offload_flags(a.features);
        self.backend.set_offload(offload).map_err(|e| {
            ActivateError::Other(format!(
                "{}: cannot set offloads {offload:#x}: {e}",
                self.report.name
            ))
        })?;
        self.running = Some(Running {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
            features: a.features,
            rx_waiting: false,
        });
        // The event loop takes it from here: start reading the backend and
        // send what was queued before DRIVER_OK.
        self.kick(RX_QUEUE);
        self.kick(TX_QUEUE);
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        super::positions(self.running.iter().flat_map(|r| [&r.rx, &r.tx]))
    }

    fn reset(&mut self) {
        self.running = None;
        self.rx_pending = None;
        self.rx_buffers.clear();
        self.tx_backlog = None;
        if let Err(e) = self.backend.set_offload(0) {
            log::debug!("{}: cannot turn offloads off: {e}", self.report.name);
        }
        // Stop watching the backend.
        self.kick(RX_QUEUE);
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                log::error!("{}: cannot watch queue {i}: {e:?}", self.report.name);
            }
        }
        // Registered with no events until the driver is ready.
        match ops.add(Events::with_data(
            &self.backend,
            BACKEND_DATA,
            EventSet::empty(),
        )) {
            Ok(()) => self.watching = Some(EventSet::empty()),
            Err(e) => log::error!("{}: cannot watch the backend: {e:?}", self.report.name),
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        if events.fd() == self.backend_fd() {
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                // A deleted tap reports an error forever: stop watching it.
                self.report.host(format_args!(
                    "the backend failed ({set:?}): the link is down"
                ));
                self.backend_gone = true;
                if let Err(e) = ops.remove(Events::new(
                    &self.backend,
                    self.watching.unwrap_or(EventSet::empty()),
                )) {
                    log::debug!(
                        "{}: cannot stop watching the backend: {e:?}",
                        self.report.name
                    );
                }
                self.watching = None;
                return;
            }
            if set.contains(EventSet::OUT) {
                self.process_tx();
            }
            if set.contains(EventSet::IN) {
                self.process_rx();
            }
        } else {
            self.notified(events.data() as usize);
        }
        self.update_watch(ops);
    }
}
