//! virtio-rng (virtio 1.2 §5.4): one queue; the device fills each buffer the
//! driver offers with bytes from the host's getrandom(2).

use std::io::Write;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, Budget, F_VERSION_1, GuestMemory, Handled, Interrupt, TYPE_RNG,
    VirtioDevice, drain_queue,
};
use std::sync::Arc;

/// Most bytes handed out per request, so one request cannot keep the event
/// loop busy for long.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Most requests served per queue event before the other devices get a turn.
const REQUESTS_PER_EVENT: usize = 64;
const QUEUE_SIZE: u16 = 256;

struct Running {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The entropy device.
pub struct Rng {
    queue_events: Vec<EventFd>,
    running: Option<Running>,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            running: None,
        })
    }

    /// Fills every available buffer.
    fn process(&mut self) {
        let Some(r) = &mut self.running else {
            return;
        };
        let mut random = vec![0u8; MAX_REQUEST];
        let drained = drain_queue(
            &mut r.queue,
            &r.mem,
            &r.interrupt,
            Budget::chains(REQUESTS_PER_EVENT),
            |chain| {
                let mem = chain.memory();
                let mut writer = match chain.clone().writer(mem) {
                    Ok(w) => w,
                    Err(e) => {
                        log::debug!("virtio-rng: bad descriptor chain: {e:?}");
                        return Handled::used(0);
                    }
                };
                let want = writer.available_bytes().min(MAX_REQUEST);
                let got = getrandom(&mut random[..want]);
                Handled::used(match writer.write_all(&random[..got]) {
                    Ok(()) => got as u32,
                    Err(e) => {
                        log::debug!("virtio-rng: cannot write to the guest: {e}");
                        writer.bytes_written() as u32
                    }
                })
            },
        );
        if drained.more {
            // Come back after the other events of this round.
            if let Err(e) = self.queue_events[0].write(1) {
                log::warn!("virtio-rng: cannot re-arm the queue event: {e}");
            }
        }
    }
}

/// Fills `buf` from getrandom(2); returns how many bytes it got.
fn getrandom(buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        filled += n as usize;
    }
    filled
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | super::F_EVENT_IDX | super::F_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        let [queue] = a.take_queues()?;
        self.running = Some(Running {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        });
        // Buffers the driver queued before DRIVER_OK (whose notification we
        // ignored) are served by the event loop, not on the vCPU thread
        // activating us.
        if let Err(e) = self.queue_events[0].write(1) {
            log::warn!("virtio-rng: cannot kick the queue: {e}");
        }
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        super::positions(self.running.iter().map(|r| &r.queue))
    }

    fn reset(&mut self) {
        self.running = None;
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            log::error!("virtio-rng: cannot watch the queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Notifications before DRIVER_OK are dropped: nothing to serve yet.
        let _ = self.queue_events[0].read();
        self.process();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::QueueT;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn activate(rng: &mut Rng, mem: &GuestMemory, mock: &MockSplitQueue<GuestMemory>) -> EventFd {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            features: F_VERSION_1,
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        })
        .unwrap();
        // What the event loop does when the kick arrives.
        assert_eq!(
            rng.queue_events[0].read().unwrap(),
            1,
            "activation kicks the queue"
        );
        rng.process();
        irq
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn used_len(mem: &GuestMemory, mock: &MockSplitQueue<GuestMemory>, i: u64) -> u32 {
        mem.read_obj(GuestAddress(mock.used_addr().0 + 4 + 8 * i + 4))
            .unwrap()
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = mem();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [desc(0x10000, 100, VRING_DESC_F_WRITE as u16, 0)];
        mock.build_desc_chain(&descs).unwrap();
        let mut rng = Rng::new().unwrap();
        let irq = activate(&mut rng, &mem, &mock);
        assert_eq!(used_len(&mem, &mock, 0), 100);
        let mut out = [0u8; 100];
        mem.read_slice(&mut out, GuestAddress(0x10000)).unwrap();
        assert!(out.iter().any(|&b| b != 0));
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rng.running.as_ref().unwrap().queue.next_used(), 1);
    }

    #[test]
    fn hostile_chains_are_answered_with_zero_bytes() {
        let mem = mem();
        let mock = MockSplitQueue::new(&mem, 16);
        // Read-only buffer, a buffer outside guest memory, and a chain whose
        // second descriptor points outside memory.
        mock.build_desc_chain(&[desc(0x10000, 64, 0, 0)]).unwrap();
        mock.build_desc_chain(&[desc(0xffff_0000, 64, VRING_DESC_F_WRITE as u16, 0)])
            .unwrap();
        mock.build_desc_chain(&[
            desc(
                0x20000,
                8,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                1,
            ),
            desc(0x2_0000_0000, 8, VRING_DESC_F_WRITE as u16, 0),
        ])
        .unwrap();
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &mock);
        for i in 0..3 {
            assert_eq!(used_len(&mem, &mock, i), 0, "chain {i}");
        }
        assert_eq!(rng.running.as_ref().unwrap().queue.next_used(), 3);
    }

    #[test]
    fn huge_buffers_get_at_most_max_request() {
        let mem = mem();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.build_desc_chain(&[desc(0x10_0000, 0x20_0000, VRING_DESC_F_WRITE as u16, 0)])
            .unwrap();
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &mock);
        assert_eq!(used_len(&mem, &mock, 0) as usize, MAX_REQUEST);
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let mem = mem();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.build_desc_chain(&[desc(0x10000, 8, VRING_DESC_F_WRITE as u16, 0)])
            .unwrap();
        // The driver claims 1000 buffers in a 16-entry ring.
        mem.write_obj(1000u16, GuestAddress(mock.avail_addr().0 + 2))
            .unwrap();
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &mock); // returns: it did not spin
        assert_eq!(rng.running.as_ref().unwrap().queue.next_used(), 0);
    }

    #[test]
    fn work_per_event_is_bounded_and_rearmed() {
        let mem = mem();
        let mock = MockSplitQueue::new(&mem, 256);
        for i in 0..100u64 {
            mock.build_desc_chain(&[desc(0x10000 + i * 16, 16, VRING_DESC_F_WRITE as u16, 0)])
                .unwrap();
        }
        let mut rng = Rng::new().unwrap();
        activate(&mut rng, &mem, &mock);
        assert_eq!(
            rng.running.as_ref().unwrap().queue.next_used() as usize,
            REQUESTS_PER_EVENT
        );
        // The device re-armed its own event for the rest.
        assert_eq!(rng.queue_events[0].read().unwrap(), 1);
        rng.process();
        assert_eq!(rng.running.as_ref().unwrap().queue.next_used(), 100);
    }

    #[test]
    fn notifications_before_activation_are_ignored() {
        let mut rng = Rng::new().unwrap();
        rng.queue_events[0].write(1).unwrap();
        rng.process();
        assert!(rng.running.is_none());
    }
}
