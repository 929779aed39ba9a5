//! Guest-visible devices and the buses that route port and MMIO accesses to them.
//!
//! Nothing here owns a KVM file descriptor: devices see only guest accesses,
//! event fds (for interrupts) and, for virtio, guest memory.

pub mod bus;
pub mod legacy;
#[cfg(test)]
mod scratch;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};

/// Things the guest does through a device that end the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// Reset through the keyboard controller (how Linux reboots with `reboot=k`).
    Reset,
    /// The guest kernel reported a panic through the pvpanic port.
    Panic,
}

/// The VMM side of [`GuestEvent`]s: called on the vCPU thread that made the access.
pub trait GuestEventSink: Send + Sync {
    fn guest_event(&self, event: GuestEvent);
}
