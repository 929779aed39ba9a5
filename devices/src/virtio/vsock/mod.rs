//! virtio-vsock (virtio 1.2 §5.10) with Firecracker's hybrid-vsock host
//! side: guest stream sockets map to host Unix sockets (see [`muxer`]).
//!
//! Three queues: RX (device to driver packets), TX (driver to device) and
//! the event queue (unused: there is no live migration). All work happens
//! on the VMM's event loop: queue notifications, the listening socket and
//! every connection's socket are `event-manager` events of this device, and
//! each event does a bounded amount of work ([`TX_BUDGET`], [`RX_BUDGET`])
//! so one busy connection cannot starve the other devices; what is left is
//! picked up on the next turn of the loop (through the `kick` event fd).
//!
//! Activation and reset come from a vCPU thread (a register write), where
//! there is no access to the event loop: they only record what to do and
//! kick the event loop, which adds and removes socket registrations.

pub mod connection;
pub mod host;
pub mod muxer;
pub mod packet;

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

pub use event_manager::EventSet;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, Budget, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, GuestMemory,
    Handled, Interrupt, TYPE_VSOCK, VirtioDevice, drain_queue, read_config_bytes, ring_is_broken,
    signal_used_if_needed,
};
use host::{Connector, HostListener, HostSocketError, PathConnector};
use muxer::{FIRST_CONN_TOKEN, Muxer, TOKEN_LISTENER};
use packet::{HDR_SIZE, Header, MAX_PAYLOAD, TxError, TxPacket, parse_tx};

/// VIRTIO_VSOCK_F_STREAM: stream sockets (the only kind served).
pub const F_STREAM: u64 = 1 << 0;

/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// TX chains handled per event.
pub const TX_BUDGET: usize = 64;
/// RX packets produced per event.
pub const RX_BUDGET: usize = 64;

/// Queue indices, also the event tokens of their notifications (the
/// third, 2, is the event queue).
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
/// virtio_vsock_event.id of a transport reset (virtio 1.2 §5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;
/// How long host connections wait for the driver to handle a transport reset.
const RESET_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
const TOKEN_KICK: u32 = 4;

/// How the device registers and unregisters file descriptors with the
/// event loop: `EventOps` in ligera, something simpler in tests and fuzzing.
pub trait Poller {
    fn add(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
}

fn event_error(e: event_manager::Error) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

impl Poller for EventOps<'_> {
    fn add(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()> {
        EventOps::add(self, Events::with_data_raw(fd, token, set)).map_err(event_error)
    }
    fn modify(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()> {
        EventOps::modify(self, Events::with_data_raw(fd, token, set)).map_err(event_error)
    }
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        EventOps::remove(self, Events::with_data_raw(fd, token, EventSet::empty()))
            .map_err(event_error)
    }
}

/// A poller that watches nothing (fuzzing: events are never delivered).
pub struct NoPoller;

impl Poller for NoPoller {
    fn add(&mut self, _: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: RawFd, _: u32) -> io::Result<()> {
        Ok(())
    }
}

struct Running {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    queue_events: Vec<EventFd>,
    /// Written when there is work for the event loop that no other event
    /// will report: activation, reset, leftovers past a budget.
    kick: EventFd,
    muxer: Muxer,
    running: Option<Running>,
    reset_pending: bool,
    /// A transport reset event is owed to the driver (after a restore).
    transport_reset_pending: bool,
    /// The reset went out when the event queue's avail index was this;
    /// host connections are refused (their clients retry) until the driver
    /// has handled it, which it shows by giving an event buffer back, or
    /// until [`RESET_GRACE`] has passed. A connection made before would
    /// race the reset in the guest, which would drop it without a word.
    reset_sent: Option<(u16, std::time::Instant)>,
    /// Payload scratch space, in and out.
    scratch: Vec<u8>,
    /// Whether a guest mistake was logged at warning level already.
    warned: bool,
}

impl Vsock {
    /// A device for guest `cid` whose host side is the Unix socket at
    /// `socket` (created here) and `socket_<port>` for guest connections.
    pub fn new(cid: u32, socket: &Path) -> Result<Vsock, VsockError> {
        let listener = HostListener::bind(socket)?;
        Vsock::with_backend(cid, Some(listener), Box::new(PathConnector::new(socket)))
            .map_err(VsockError::EventFd)
    }

    /// A device with any host side (tests and fuzzing use socket pairs).
    pub fn with_backend(
        cid: u32,
        listener: Option<HostListener>,
        connector: Box<dyn Connector>,
    ) -> io::Result<Vsock> {
        let cid = u64::from(cid);
        Ok(Vsock {
            cid,
            queue_events: (0..3)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<io::Result<_>>()?,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            muxer: Muxer::new(cid, listener, connector),
            running: None,
            reset_pending: false,
            transport_reset_pending: false,
            reset_sent: None,
            scratch: vec![0; MAX_PAYLOAD],
            warned: false,
        })
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn guest_mistake(&mut self, what: std::fmt::Arguments) {
        if self.warned {
            log::debug!("virtio-vsock: {what}");
        } else {
            self.warned = true;
            log::warn!("virtio-vsock: {what} (further guest mistakes are logged at debug level)");
        }
    }

    /// Handles one event: `token` says whose (a queue, the listener, a
    /// connection, the kick), then runs the queues, within the budgets.
    pub fn handle(&mut self, token: u32, set: EventSet, poller: &mut dyn Poller) {
        if self.reset_pending {
            self.reset_pending = false;
            self.muxer.reset(poller);
        }
        if self.transport_reset_pending && self.send_transport_reset() {
            self.transport_reset_pending = false;
        }
        if let (Some((avail, sent)), Some(r)) = (self.reset_sent, &self.running) {
            let now = r.queues[EVENT]
                .avail_idx(&r.mem, std::sync::atomic::Ordering::Acquire)
                .map(|i| i.0);
            if now.is_ok_and(|i| i != avail) || sent.elapsed() > RESET_GRACE {
                self.reset_sent = None;
            }
        }
        let active =
            self.running.is_some() && !self.transport_reset_pending && self.reset_sent.is_none();
        match token {
            0..=2 => {
                // Notifications before DRIVER_OK are dropped: nothing to serve yet.
                let _ = self.queue_events[token as usize].read();
            }
            TOKEN_KICK => {
                let _ = self.kick.read();
            }
            TOKEN_LISTENER => self.muxer.accept(active, poller),
            t if t >= FIRST_CONN_TOKEN => self.muxer.host_event(t, set, active, poller),
            _ => {}
        }
        let more_tx = self.process_tx(poller);
        let more_rx = self.process_rx(poller);
        if more_tx || more_rx {
            let _ = self.kick.write(1);
        }
    }

    /// Puts a transport reset event in the event queue; false if the
    /// device is not running or the driver has no event buffer yet (the
    /// next event of the device tries again).
    fn send_transport_reset(&mut self) -> bool {
        let Some(r) = &mut self.running else {
            return false;
        };
        let (mem, queue) = (&r.mem, &mut r.queues[EVENT]);
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            let _ = queue.enable_notification(mem);
            return false;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= 4 => w
                .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                .map_or(0, |()| 4),
            _ => 0,
        };
        if queue.add_used(mem, head, written).is_ok() {
            signal_used_if_needed(queue, mem, &r.interrupt);
        }
        // Told when the driver gives the buffer back (see `reset_sent`).
        let _ = queue.enable_notification(mem);
        let avail = queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_or(0, |i| i.0);
        self.reset_sent = Some((avail, std::time::Instant::now()));
        log::info!("virtio-vsock: transport reset sent to the driver");
        true
    }

    /// Handles guest packets; returns whether chains were left for later.
    pub fn process_tx(&mut self, poller: &mut dyn Poller) -> bool {
        let Some(r) = &mut self.running else {
            return false;
        };
        let mut mistakes = Vec::new();
        let (cid, scratch, muxer) = (self.cid, &mut self.scratch, &mut self.muxer);
        let drained = drain_queue(
            &mut r.queues[TX],
            &r.mem,
            &r.interrupt,
            Budget::chains(TX_BUDGET),
            |chain| {
                match read_tx_chain(chain, cid, scratch) {
                    Ok(pkt) => {
                        let payload = &scratch[..pkt.payload_len()];
                        muxer.guest_packet(&pkt, payload, poller);
                    }
                    Err((hdr, err)) => {
                        muxer.guest_error(hdr.as_ref(), &err);
                        log::debug!("virtio-vsock: dropped a TX packet: {err}");
                        mistakes.push("dropped a malformed TX packet");
                    }
                }
                Handled::used(0)
            },
        );
        if drained.broken {
            mistakes.push("the TX avail index is more than a queue ahead");
        }
        if let Some(what) = mistakes.first() {
            self.guest_mistake(format_args!("{what}"));
        }
        drained.more
    }

    /// Fills RX buffers with what the muxer has for the guest; returns
    /// whether packets were left for later while buffers remain.
    pub fn process_rx(&mut self, poller: &mut dyn Poller) -> bool {
        let Some(r) = &mut self.running else {
            return false;
        };
        let (mem, queue) = (&r.mem, &mut r.queues[RX]);
        let mut used = false;
        let mut budget = RX_BUDGET;
        let mut more = false;
        while self.muxer.has_rx() {
            if budget == 0 {
                more = true;
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if ring_is_broken(queue, mem) {
                    log::debug!("virtio-vsock: the RX avail index is more than a queue ahead");
                    break;
                }
                // Out of buffers: have the driver tell us when it adds some.
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            budget -= 1;
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= HDR_SIZE => w,
                _ => {
                    // Not a buffer we can write a header to: give it back empty.
                    if queue.add_used(mem, head, 0).is_ok() {
                        used = true;
                    }
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_SIZE).min(MAX_PAYLOAD);
            let Some((hdr, n)) = self.muxer.next_rx(&mut self.scratch[..room], poller) else {
                queue.go_to_previous_position();
                break;
            };
            let written = write_rx(&mut writer, &hdr, &self.scratch[..n]);
            if let Err(e) = queue.add_used(mem, head, written as u32) {
                log::debug!("virtio-vsock: cannot return RX descriptor {head}: {e}");
            } else {
                used = true;
            }
        }
        if used {
            signal_used_if_needed(queue, mem, &r.interrupt);
        }
        more
    }
}

/// Writes a packet into an RX chain with room for it; returns the bytes written.
fn write_rx(writer: &mut virtio_queue::Writer<'_>, hdr: &Header, payload: &[u8]) -> usize {
    match writer
        .write_all(&hdr.to_bytes())
        .and_then(|()| writer.write_all(payload))
    {
        Ok(()) => HDR_SIZE + payload.len(),
        Err(e) => {
            log::debug!("virtio-vsock: cannot write an RX packet: {e}");
            writer.bytes_written()
        }
    }
}

/// Reads a TX chain: header, checks, and the payload into `scratch`. On
/// error, the header if there was one (to answer with a RST).
pub fn read_tx_chain(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    guest_cid: u64,
    scratch: &mut [u8],
) -> Result<TxPacket, (Option<Header>, TxError)> {
    let mem = chain.memory();
    let mut reader = chain
        .clone()
        .reader(mem)
        .map_err(|_| (None, TxError::BadChain))?;
    let total = reader.available_bytes();
    let mut head = [0u8; HDR_SIZE];
    let n = total.min(HDR_SIZE);
    reader
        .read_exact(&mut head[..n])
        .map_err(|_| (None, TxError::BadChain))?;
    let pkt = parse_tx(&head[..n], total - n, guest_cid).map_err(|e| {
        let hdr = (n == HDR_SIZE).then(|| Header::from_bytes(&head));
        (hdr, e)
    })?;
    let len = pkt.payload_len();
    // parse_tx checked len <= MAX_PAYLOAD (the size of scratch) and <= what
    // the chain holds.
    let payload = scratch
        .get_mut(..len)
        .ok_or((Some(pkt.hdr), TxError::TooLong(pkt.hdr.len)))?;
    reader.read_exact(payload).map_err(|_| {
        (
            Some(pkt.hdr),
            TxError::Truncated {
                len: pkt.hdr.len,
                available: 0,
            },
        )
    })?;
    Ok(pkt)
}

/// Why the vsock device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(transparent)]
    HostSocket(#[from] HostSocketError),
    #[error("vsock: cannot create an event fd: {0}")]
    EventFd(io::Error),
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC | F_STREAM
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// struct virtio_vsock_config { le64 guest_cid; }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The configuration space is read-only.
        self.guest_mistake(format_args!(
            "ignoring a {}-byte config write at {offset:#x}",
            data.len()
        ));
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        let queues: [Queue; 3] = a.take_queues()?;
        self.running = Some(Running {
            mem: a.mem,
            queues: queues.into(),
            interrupt: a.interrupt,
        });
        // Packets the driver queued before DRIVER_OK are served on the event loop.
        let _ = self.kick.write(1);
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        super::positions(self.running.iter().flat_map(|r| r.queues.iter()))
    }

    fn restored(&mut self) {
        // Host connections are gone (the snapshot has none of their
        // sockets): drop ours and tell the driver, which drops its own
        // (virtio 1.2 §5.10.6.6); listeners stay.
        self.transport_reset_pending = true;
        let _ = self.kick.write(1);
    }

    fn reset(&mut self) {
        self.running = None;
        self.reset_pending = true;
        let _ = self.kick.write(1);
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch queue {i}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.kick, TOKEN_KICK, EventSet::IN)) {
            log::error!("virtio-vsock: cannot watch its kick event: {e:?}");
        }
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle(events.data(), events.event_set(), ops);
    }
}

#[cfg(test)]
mod tests;
