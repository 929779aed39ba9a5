//! Where a virtio device's work happens: on the thread of the event loop
//! that runs it, never on the vCPU thread that wrote a register.
//!
//! The transport turns the driver's DRIVER_OK and reset into
//! [`DeviceRequest`]s in the device's [`DeviceMailbox`] and kicks the
//! mailbox's event fd; the device's [`VirtioRunner`] (its `event-manager`
//! subscriber) carries them out in order, between the device's own queue
//! events. Activation is asynchronous (the device serves buffers queued
//! before it started once it runs); a reset is waited for, because after the
//! driver's write of 0 returns, the device must no longer touch the rings the
//! driver is about to free.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, INT_CONFIG_CHANGE, Interrupt, VirtioDevice};
use crate::bus::lock;

/// What the transport asks of a device.
pub enum DeviceRequest {
    /// The driver set DRIVER_OK with these (checked) queues.
    Activate(Activation),
    /// The driver reset the device.
    Reset,
}

#[derive(Default)]
struct Pending {
    requests: VecDeque<DeviceRequest>,
    /// Requests posted and carried out so far.
    posted: u64,
    done: u64,
    /// The runner is gone: nobody will carry out requests any more.
    closed: bool,
}

/// Requests from a device's transport to its runner.
pub struct DeviceMailbox {
    pending: Mutex<Pending>,
    done: Condvar,
    /// Wakes the runner's event loop.
    event: EventFd,
    /// The last activation failed: the device needs a reset.
    failed: AtomicBool,
}

/// A reset not carried out within this long is reported and given up on (a
/// vCPU never waits forever on a device).
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

impl DeviceMailbox {
    fn new() -> std::io::Result<Self> {
        Ok(DeviceMailbox {
            pending: Mutex::new(Pending::default()),
            done: Condvar::new(),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            failed: AtomicBool::new(false),
        })
    }

    /// Queues `request` for the runner; returns its ticket.
    pub fn post(&self, request: DeviceRequest) -> u64 {
        let mut p = lock(&self.pending);
        if p.closed {
            return p.posted;
        }
        p.requests.push_back(request);
        p.posted += 1;
        let ticket = p.posted;
        drop(p);
        if let Err(e) = self.event.write(1) {
            log::warn!("virtio: cannot wake a device's event loop: {e}");
        }
        ticket
    }

    /// Waits until the request with `ticket` (and all before it) is done, or
    /// the runner is gone. Returns false on a timeout.
    pub fn wait(&self, ticket: u64) -> bool {
        let p = lock(&self.pending);
        let (_p, result) = self
            .done
            .wait_timeout_while(p, RESET_TIMEOUT, |p| p.done < ticket && !p.closed)
            .unwrap_or_else(|e| e.into_inner());
        !result.timed_out()
    }

    /// Waits until every request posted so far is carried out; false if
    /// that takes longer than the reset timeout.
    pub fn settle(&self) -> bool {
        let posted = lock(&self.pending).posted;
        self.wait(posted)
    }

    /// Whether the last activation failed (the device wants a reset).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The runner is going away: wake and release every waiter.
    pub fn close(&self) {
        let mut p = lock(&self.pending);
        p.closed = true;
        p.requests.clear();
        drop(p);
        self.done.notify_all();
    }

    /// Carries out every queued request on `device`, in order.
    fn serve(&self, device: &mut dyn VirtioDevice, interrupt: &Interrupt, name: &str) {
        loop {
            let Some(request) = lock(&self.pending).requests.pop_front() else {
                return;
            };
            match request {
                DeviceRequest::Activate(activation) => {
                    if let Err(e) = device.activate(activation) {
                        // The guest controls this: debug level after the first.
                        log::warn!("{name}: cannot activate: {e}");
                        self.failed.store(true, Ordering::SeqCst);
                        interrupt.raise(INT_CONFIG_CHANGE);
                    }
                }
                DeviceRequest::Reset => {
                    device.reset();
                    self.failed.store(false, Ordering::SeqCst);
                }
            }
            lock(&self.pending).done += 1;
            self.done.notify_all();
        }
    }
}

/// A device on an event loop: the subscriber that gets both the device's
/// own events and its transport's requests.
pub struct VirtioRunner<D> {
    name: String,
    device: Arc<Mutex<D>>,
    mailbox: Arc<DeviceMailbox>,
    interrupt: Arc<Interrupt>,
}

impl<D> VirtioRunner<D> {
    /// A runner for `device`, with the mailbox its transport posts to.
    pub fn new(
        name: impl Into<String>,
        device: Arc<Mutex<D>>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<(Self, Arc<DeviceMailbox>)> {
        let mailbox = Arc::new(DeviceMailbox::new()?);
        Ok((
            VirtioRunner {
                name: name.into(),
                device,
                mailbox: mailbox.clone(),
                interrupt,
            },
            mailbox,
        ))
    }
}

impl<D> Drop for VirtioRunner<D> {
    fn drop(&mut self) {
        self.mailbox.close();
    }
}

impl<D: VirtioDevice + MutEventSubscriber> MutEventSubscriber for VirtioRunner<D> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.mailbox.event, EventSet::IN)) {
            log::error!("{}: cannot watch its requests: {e:?}", self.name);
        }
        lock(&self.device).init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.mailbox.event.as_raw_fd() {
            let _ = self.mailbox.event.read();
            let mut device = lock(&self.device);
            self.mailbox
                .serve(&mut *device, &self.interrupt, &self.name);
        } else {
            lock(&self.device).process(events, ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, F_VERSION_1, GuestMemory};
    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Recorder {
        threads: Vec<(String, &'static str)>,
        fail: bool,
    }

    fn here() -> String {
        std::thread::current().name().unwrap_or("?").to_string()
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[]
        }
        fn features(&self) -> u64 {
            F_VERSION_1
        }
        fn queue_events(&self) -> &[EventFd] {
            &[]
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _: Activation) -> Result<(), ActivateError> {
            self.threads.push((here(), "activate"));
            if self.fail {
                return Err(ActivateError::Other("refused".into()));
            }
            Ok(())
        }
        fn queue_positions(&self) -> Vec<(u16, u16)> {
            Vec::new()
        }
        fn reset(&mut self) {
            self.threads.push((here(), "reset"));
        }
    }

    impl MutEventSubscriber for Recorder {
        fn init(&mut self, _: &mut EventOps) {}
        fn process(&mut self, _: Events, _: &mut EventOps) {}
    }

    fn activation(interrupt: &Arc<Interrupt>) -> Activation {
        Activation {
            mem: GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
            queues: Vec::new(),
            features: F_VERSION_1,
            interrupt: interrupt.clone(),
        }
    }

    #[test]
    fn requests_run_on_the_event_loop_thread_in_order() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq));
        let (runner, mailbox) =
            VirtioRunner::new("rec", device.clone(), interrupt.clone()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let loop_stop = stop.clone();
        let event_loop = std::thread::Builder::new()
            .name("event-loop".into())
            .spawn(move || {
                let mut manager =
                    EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
                manager.add_subscriber(Arc::new(Mutex::new(runner)));
                while !loop_stop.load(Ordering::SeqCst) {
                    manager.run_with_timeout(10).unwrap();
                }
            })
            .unwrap();
        // Posted from this ("vCPU") thread: nothing happens here.
        mailbox.post(DeviceRequest::Activate(activation(&interrupt)));
        let ticket = mailbox.post(DeviceRequest::Reset);
        assert!(mailbox.wait(ticket));
        device.lock().unwrap().fail = true;
        let ticket = mailbox.post(DeviceRequest::Activate(activation(&interrupt)));
        assert!(mailbox.wait(ticket));
        assert!(mailbox.failed());
        assert_ne!(interrupt.status() & INT_CONFIG_CHANGE, 0);
        let ticket = mailbox.post(DeviceRequest::Reset);
        assert!(mailbox.wait(ticket));
        assert!(!mailbox.failed());
        stop.store(true, Ordering::SeqCst);
        event_loop.join().unwrap();
        let seen = device.lock().unwrap().threads.clone();
        let names: Vec<&str> = seen.iter().map(|(_, what)| *what).collect();
        assert_eq!(names, ["activate", "reset", "activate", "reset"]);
        assert!(
            seen.iter().all(|(thread, _)| thread == "event-loop"),
            "{seen:?}"
        );
        // With the runner gone, waiting never blocks.
        let ticket = mailbox.post(DeviceRequest::Reset);
        assert!(mailbox.wait(ticket));
    }
}
