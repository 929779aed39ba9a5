//! How a VM ends, and the exit status each way maps to.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::{GuestEvent, GuestEventSink};
use vmm_sys_util::eventfd::EventFd;

/// Exit status: the guest rebooted.
pub const EXIT_OK: i32 = 0;
/// Exit status: ligera itself failed (bad input, KVM or host error).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Exit status: the command line was wrong.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: the guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 3;
/// Exit status: the guest triple-faulted.
pub const EXIT_TRIPLE_FAULT: i32 = 4;
/// Exit status: KVM could not run guest code.
pub const EXIT_KVM_FAILURE: i32 = 5;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Reset through the keyboard controller: how a Linux guest reboots.
    GuestReset,
    /// The guest reported a panic through the pvpanic port.
    GuestPanic,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault(String),
    /// KVM_EXIT_INTERNAL_ERROR or KVM_EXIT_FAIL_ENTRY, described.
    KvmFailure(String),
    /// ligera failed while the VM ran.
    VmmError(String),
    /// A signal asked ligera to stop.
    Signal(i32),
    /// The control socket asked the VM to stop.
    Stopped,
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::Stopped => EXIT_OK,
            ExitReason::GuestPanic => EXIT_GUEST_PANIC,
            ExitReason::TripleFault(_) => EXIT_TRIPLE_FAULT,
            ExitReason::KvmFailure(_) => EXIT_KVM_FAILURE,
            ExitReason::VmmError(_) => EXIT_VMM_ERROR,
            ExitReason::Signal(sig) => 128 + sig,
        }
    }

    /// A one-line description for stderr, if this is not a normal end.
    pub fn message(&self) -> Option<String> {
        match self {
            ExitReason::GuestReset | ExitReason::Stopped => None,
            ExitReason::GuestPanic => Some("the guest kernel panicked".into()),
            ExitReason::TripleFault(m) => Some(format!("guest triple fault: {m}")),
            ExitReason::KvmFailure(m) => Some(m.clone()),
            ExitReason::VmmError(m) => Some(m.clone()),
            ExitReason::Signal(sig) => Some(format!("stopped by signal {}", signal_name(*sig))),
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => n.to_string(),
    }
}

/// Shared by the vCPU threads, devices and the event loop: the first reason
/// to stop wins, and everyone can see that the VM is stopping.
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    /// Wakes the event loop.
    pub event: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to stop for `reason`, unless it is already stopping.
    pub fn request(&self, reason: ExitReason) {
        let mut current = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_none() {
            log::debug!("stopping: {reason:?}");
            *current = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl GuestEventSink for ExitState {
    fn guest_event(&self, event: GuestEvent) {
        self.request(match event {
            GuestEvent::Reset => ExitReason::GuestReset,
            GuestEvent::Panic => ExitReason::GuestPanic,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitState::new().unwrap();
        assert!(!s.is_stopping());
        s.guest_event(GuestEvent::Reset);
        s.request(ExitReason::TripleFault("late".into()));
        assert!(s.is_stopping());
        assert_eq!(s.reason(), Some(ExitReason::GuestReset));
        assert!(s.event.read().unwrap() >= 1);
    }

    #[test]
    fn codes_are_distinct() {
        let reasons = [
            ExitReason::GuestReset,
            ExitReason::VmmError(String::new()),
            ExitReason::GuestPanic,
            ExitReason::TripleFault(String::new()),
            ExitReason::KvmFailure(String::new()),
            ExitReason::Signal(libc::SIGINT),
            ExitReason::Signal(libc::SIGTERM),
        ];
        let codes: Vec<i32> = reasons.iter().map(ExitReason::code).collect();
        assert_eq!(codes, vec![0, 1, 3, 4, 5, 130, 143]);
        assert_eq!(
            ExitReason::Signal(libc::SIGTERM).message().unwrap(),
            "stopped by signal SIGTERM"
        );
    }
}
