//! Virtio devices on the virtio-mmio transport (virtio 1.2, §4.2).
//!
//! A device implements [`VirtioDevice`]: what it offers (type, features,
//! queues, config space) and what it does once the driver is ready
//! (`activate`). The transport ([`mmio::MmioTransport`]) does the rest:
//! registers, status state machine, feature negotiation, queue setup and
//! interrupt status. The guest is untrusted: nothing it writes may panic or
//! hang the VMM; a device that finds the queues unusable marks itself
//! DEVICE_NEEDS_RESET and waits for a reset.
//!
//! Queue notifications arrive on event fds (KVM ioeventfds on QueueNotify)
//! and devices do their work on the VMM's event loop thread, as
//! `event-manager` subscribers; interrupts leave through an event fd (a KVM
//! irqfd).

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod runner;
pub mod vsock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Device IDs (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits every device may offer (virtio 1.2 §6).
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1 << 0;
pub const INT_CONFIG_CHANGE: u32 = 1 << 1;

/// A device's interrupt line and its InterruptStatus register, shared by
/// the transport (which reads and acknowledges it) and the device (which
/// raises it).
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Raises the interrupt for `reason` (INT_USED_RING or INT_CONFIG_CHANGE).
    pub fn raise(&self, reason: u32) {
        self.status.fetch_or(reason, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// Tells the driver that buffers are in a used ring.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus register (a restored VM's), without raising the line.
    pub fn set_status(&self, status: u32) {
        self.status.store(
            status & (INT_USED_RING | INT_CONFIG_CHANGE),
            Ordering::SeqCst,
        );
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("{0}")]
    Other(String),
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemory,
    /// The driver's queues, in order, all valid and ready.
    pub queues: Vec<Queue>,
    /// Features both sides agreed on.
    pub features: u64,
    pub interrupt: Arc<Interrupt>,
}

impl Activation {
    /// Takes the queues as exactly the `N` the device declared.
    pub fn take_queues<const N: usize>(&mut self) -> Result<[Queue; N], ActivateError> {
        let got = self.queues.len();
        std::mem::take(&mut self.queues)
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: N, got })
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered (must include [`F_VERSION_1`]).
    fn features(&self) -> u64;

    /// The event fds the VMM signals when the driver notifies each queue
    /// (one per queue, in order; KVM ioeventfds on QueueNotify).
    fn queue_events(&self) -> &[EventFd];

    /// Reads device-specific configuration space; `offset` is within it.
    /// Reads beyond the config space return zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    /// The driver is ready: start using the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// The driver reset the device: stop using (and forget) the queues.
    fn reset(&mut self);

    /// Where the device is in each of its queues while it runs:
    /// `(next_avail, next_used)`, in queue order (empty when not running).
    /// A snapshot keeps them; a restored device resumes from them.
    fn queue_positions(&self) -> Vec<(u16, u16)>;

    /// The VM was just restored from a snapshot, before it runs again: the
    /// device drops what cannot survive (vsock connections to the host).
    fn restored(&mut self) {}
}

/// `(next_avail, next_used)` of each queue.
pub fn positions<'a>(queues: impl IntoIterator<Item = &'a Queue>) -> Vec<(u16, u16)> {
    queues
        .into_iter()
        .map(|q| (q.next_avail(), q.next_used()))
        .collect()
}

/// Copies `bytes` (a config structure) to `data` from `offset`, zero-filling
/// whatever lies outside it.
pub fn read_config_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < bytes.len() {
        let n = data.len().min(bytes.len() - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }
}

/// What a device did with one descriptor chain, for [`drain_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Done: return it to the driver with `len` bytes written to it;
    /// `cost` (bytes moved, say) counts against [`Budget::cost`].
    Used { len: u32, cost: u64 },
    /// Kept by the device (its backend cannot take it now): stop draining
    /// without returning it; the device returns it later itself.
    Kept,
}

impl Handled {
    /// Used, with `len` bytes written and no cost beyond the chain.
    pub fn used(len: u32) -> Self {
        Handled::Used { len, cost: 0 }
    }
}

/// How much one call of [`drain_queue`] may do before the other devices
/// of the event loop get their turn.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Chains handled.
    pub chains: usize,
    /// The sum of the handler's costs.
    pub cost: u64,
}

impl Budget {
    pub const fn chains(chains: usize) -> Self {
        Budget {
            chains,
            cost: u64::MAX,
        }
    }
}

/// How a [`drain_queue`] call ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Chains returned to the driver.
    pub used: usize,
    /// The budget ran out with chains still available: the caller comes
    /// back later (re-arming its queue event).
    pub more: bool,
    /// A chain was kept by the handler.
    pub kept: bool,
    /// The ring cannot be read (an avail index more than a queue ahead, or
    /// outside guest memory): nothing is served until the driver notifies
    /// again or resets the device.
    pub broken: bool,
}

/// Whether the driver's avail index is further ahead than the queue holds
/// (or unreadable): then `pop_descriptor_chain` finds nothing, while
/// re-enabling notifications keeps saying there is more — a loop that would
/// never end.
pub fn ring_is_broken(queue: &Queue, mem: &GuestMemory) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => (idx - std::num::Wrapping(queue.next_avail())).0 > queue.size(),
        Err(_) => true,
    }
}

/// Interrupts the driver if it wants to hear about used buffers (with
/// EVENT_IDX, only when it asked to; when unsure, it is told).
pub fn signal_used_if_needed(queue: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => interrupt.signal_used(),
    }
}

/// The one way devices serve a queue the driver fills: pops available
/// chains, lets `handle` process each, puts it in the used ring, and raises
/// the interrupt if the driver wants one.
///
/// At most `budget` is spent, so one queue cannot keep the event loop from
/// the other devices; the result says whether chains are left (the caller
/// then re-arms its queue event). A ring the device cannot read (see
/// [`ring_is_broken`]) ends the call: the driver has to fix or reset the
/// queue, and a notification that finds nothing to pop is not an invitation
/// to spin.
pub fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    budget: Budget,
    mut handle: F,
) -> Drained
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> Handled,
{
    let mut done = Drained::default();
    let (mut chains, mut cost) = (0usize, 0u64);
    'rounds: loop {
        if ring_is_broken(queue, mem) {
            log::debug!("virtio: the available ring is unreadable; waiting for the driver");
            done.broken = true;
            break;
        }
        if let Err(e) = queue.disable_notification(mem) {
            log::debug!("virtio: cannot disable notifications: {e}");
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            chains += 1;
            match handle(chain) {
                Handled::Kept => {
                    done.kept = true;
                    break 'rounds;
                }
                Handled::Used { len, cost: c } => {
                    cost = cost.saturating_add(c);
                    match queue.add_used(mem, head, len) {
                        Ok(()) => done.used += 1,
                        Err(e) => log::debug!("virtio: cannot return descriptor {head}: {e}"),
                    }
                }
            }
            if chains >= budget.chains || cost >= budget.cost {
                // Spent. Re-enabling says whether more is waiting.
                done.more = matches!(queue.enable_notification(mem), Ok(true));
                break 'rounds;
            }
        }
        // With EVENT_IDX, re-enabling reports whether more arrived meanwhile.
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                log::debug!("virtio: cannot enable notifications: {e}");
                break;
            }
        }
    }
    if done.used > 0 {
        signal_used_if_needed(queue, mem, interrupt);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = Interrupt::new(evt.try_clone().unwrap());
        i.signal_used();
        i.raise(INT_CONFIG_CHANGE);
        assert_eq!(i.status(), 3);
        assert_eq!(evt.read().unwrap(), 2);
        i.ack(INT_USED_RING);
        assert_eq!(i.status(), INT_CONFIG_CHANGE);
    }
}
