//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): a 4 KiB window
//! of registers, then the device's configuration space at 0x100.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::runner::{DeviceMailbox, DeviceRequest};
use super::{Activation, GuestMemory, Interrupt, VirtioDevice};
use crate::BusDevice;
use crate::bus::lock;

/// Size of a device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4152_474c; // "LGRA"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: KVM turns writes here into the device's ioeventfds.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2 §2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// A queue's registers as the driver wrote them; they become a
/// `virtio_queue::Queue` (and are checked) only at DRIVER_OK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    max_size: u16,
    /// As written: a 32-bit register, checked later.
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: u32::from(max_size),
            ..Default::default()
        }
    }

    /// The queue the registers describe, if it is one the device can use.
    fn to_queue(self, mem: &GuestMemory, event_idx: bool) -> Result<Queue, String> {
        let err = |e: virtio_queue::Error| format!("{e:?}");
        let mut q = Queue::new(self.max_size).map_err(err)?;
        let size = u16::try_from(self.size).map_err(|_| format!("size {}", self.size))?;
        q.try_set_size(size)
            .map_err(|e| format!("size {size}: {e:?}"))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(err)?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(err)?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(err)?;
        q.set_ready(self.ready);
        q.set_event_idx(event_idx);
        if !self.ready || !q.is_valid(mem) {
            return Err("not ready, or its rings are not in guest memory".into());
        }
        Ok(q)
    }
}

/// A transport and its device's queue positions, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegs>,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// The device runs on the queues: `(next_avail, next_used)` of each.
    pub positions: Option<Vec<(u16, u16)>>,
}

/// Who carries out activation and reset.
enum Worker {
    /// The device's runner on its event loop (how ligera runs devices).
    Runner(Arc<DeviceMailbox>),
    /// The thread that writes the register (tests and tools without a loop).
    Inline,
}

/// One virtio device as the guest sees it on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    worker: Worker,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    device_type: u32,
    offered: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    config_generation: u32,
    /// The device is running on the queues (DRIVER_OK was accepted).
    active: bool,
    /// Name for log messages.
    name: String,
    /// Whether a driver mistake was already reported at warning level: the
    /// guest controls how often they happen, so later ones are debug-only.
    warned: bool,
}

impl MmioTransport {
    /// A transport whose device is activated and reset by its
    /// [`super::runner::VirtioRunner`] on an event loop: the thread writing
    /// the registers only posts the request (see [`super::runner`]).
    pub fn with_runner(
        name: impl Into<String>,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mailbox: Arc<DeviceMailbox>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let mut t = Self::new(name, device, mem, interrupt);
        t.worker = Worker::Runner(mailbox);
        t
    }

    /// A transport that activates and resets its device on the thread that
    /// writes the status register (for tests and tools without an event loop).
    pub fn new(
        name: impl Into<String>,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let (device_type, offered, queues) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max| QueueRegs::new(max))
                .collect();
            (d.device_type(), d.features(), queues)
        };
        MmioTransport {
            device,
            worker: Worker::Inline,
            mem,
            interrupt,
            device_type,
            offered,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            active: false,
            name: name.into(),
            warned: false,
        }
    }

    /// The transport's registers and where its running device (`device`,
    /// this transport's, locked by the caller so that it stays idle) is in
    /// each queue.
    pub fn save(&self, device: &dyn VirtioDevice) -> TransportSnapshot {
        let positions = self.active.then(|| device.queue_positions());
        TransportSnapshot {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            positions,
        }
    }

    /// Puts a new transport (whose device has never run) in the state `s`
    /// and, if the device was running, starts it on its queues from where it
    /// was. Everything in `s` is checked as the guest's own writes would be.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), String> {
        let name = self.name.clone();
        let fail = |what: String| Err(format!("{name}: {what}"));
        if s.device_type != self.device_type {
            return fail(format!(
                "the snapshot has device type {} here, this VM {}",
                s.device_type, self.device_type
            ));
        }
        let max_sizes: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        let saved_max: Vec<u16> = s.queues.iter().map(|q| q.max_size).collect();
        if max_sizes != saved_max {
            return fail(format!(
                "queue sizes {saved_max:?} in the snapshot, {max_sizes:?} here"
            ));
        }
        if s.driver_features & !self.offered != 0 {
            return fail(format!(
                "driver features {:#x} beyond the offered {:#x}",
                s.driver_features, self.offered
            ));
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.queues = s.queues.clone();
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        let Some(positions) = &s.positions else {
            return Ok(());
        };
        if s.status & STATUS_DRIVER_OK == 0 || positions.len() != self.queues.len() {
            return fail("a running device without DRIVER_OK or with the wrong queue count".into());
        }
        let event_idx = self.driver_features & super::F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (regs, &(next_avail, next_used))) in self.queues.iter().zip(positions).enumerate() {
            let mut q = match regs.to_queue(&self.mem, event_idx) {
                Ok(q) => q,
                Err(why) => return fail(format!("queue {i} is unusable: {why}")),
            };
            q.set_next_avail(next_avail);
            q.set_next_used(next_used);
            queues.push(q);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        };
        match &self.worker {
            Worker::Runner(mailbox) => {
                mailbox.post(DeviceRequest::Activate(activation));
            }
            Worker::Inline => {
                if let Err(e) = lock(&self.device).activate(activation) {
                    return fail(format!("cannot activate: {e}"));
                }
            }
        }
        self.active = true;
        lock(&self.device).restored();
        Ok(())
    }

    /// Raises the interrupt again if the driver has not acknowledged it
    /// (after a restore: an edge sent just before the snapshot may not have
    /// reached the interrupt controller whose state the snapshot kept).
    pub fn resend_interrupt(&self) {
        let status = self.interrupt.status();
        if status != 0 {
            self.interrupt.raise(status);
        }
    }

    /// Reports a driver mistake: the first as a warning, the rest at debug level.
    fn driver_error(&mut self, message: std::fmt::Arguments) {
        if self.warned {
            log::debug!("{}: {message}", self.name);
        } else {
            self.warned = true;
            log::warn!(
                "{}: {message} (further driver errors are logged at debug level)",
                self.name
            );
        }
    }

    /// The device status register (with DEVICE_NEEDS_RESET if the device's
    /// runner could not activate it).
    pub fn status(&self) -> u32 {
        match &self.worker {
            Worker::Runner(mailbox) if self.active && mailbox.failed() => {
                self.status | STATUS_NEEDS_RESET
            }
            _ => self.status,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while the driver sets the device up
    /// (FEATURES_OK, not yet DRIVER_OK) and the queue is not ready.
    fn queue_configurable(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length all ones means "none" (§4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            _ => {
                log::debug!("{}: read of register {offset:#x} ignored", self.name);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0
                    || self.status & STATUS_DRIVER == 0
                {
                    log::debug!("{}: driver features written out of order", self.name);
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            REG_QUEUE_NOTIFY => {
                // Only reached if the notification was not caught by an
                // ioeventfd; devices poll their queues on their own events.
                log::debug!(
                    "{}: notify of queue {value} reached the transport",
                    self.name
                );
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => log::debug!(
                "{}: write {value:#x} to register {offset:#x} ignored",
                self.name
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_configurable() {
            log::debug!(
                "{}: queue register {offset:#x} written in status {:#x}, ignored",
                self.name,
                self.status
            );
            return;
        }
        let name = self.name.clone();
        let Some(q) = self.selected_queue() else {
            log::debug!("{name}: write to a queue that does not exist");
            return;
        };
        if q.ready && offset != REG_QUEUE_READY {
            log::debug!("{name}: queue register {offset:#x} written while the queue is ready");
            return;
        }
        match offset {
            REG_QUEUE_NUM => q.size = value,
            REG_QUEUE_READY => q.ready = value == 1,
            REG_QUEUE_DESC_LOW => set_low(&mut q.desc, value),
            REG_QUEUE_DESC_HIGH => set_high(&mut q.desc, value),
            REG_QUEUE_DRIVER_LOW => set_low(&mut q.avail, value),
            REG_QUEUE_DRIVER_HIGH => set_high(&mut q.avail, value),
            REG_QUEUE_DEVICE_LOW => set_low(&mut q.used, value),
            REG_QUEUE_DEVICE_HIGH => set_high(&mut q.used, value),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            log::debug!(
                "{}: driver cleared status bits ({old:#x} -> {value:#x}), ignored",
                self.name
            );
            return;
        }
        let added = value & !old;
        if added & STATUS_FEATURES_OK != 0 {
            // The device refuses features it did not offer, and legacy drivers.
            let unknown = self.driver_features & !self.offered;
            if unknown != 0 || self.driver_features & super::F_VERSION_1 == 0 {
                let (asked, offered) = (self.driver_features, self.offered);
                self.driver_error(format_args!(
                    "driver asked for features {asked:#x} (offered {offered:#x}): refused"
                ));
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & STATUS_FEATURES_OK == 0 {
            self.driver_error(format_args!("DRIVER_OK without FEATURES_OK"));
            self.needs_reset();
            return;
        }
        let event_idx = self.driver_features & super::F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.clone().iter().enumerate() {
            match regs.to_queue(&self.mem, event_idx) {
                Ok(q) => queues.push(q),
                Err(why) => {
                    self.driver_error(format_args!("queue {i} is unusable: {why} ({regs:x?})"));
                    self.needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        };
        match &self.worker {
            Worker::Runner(mailbox) => {
                mailbox.post(DeviceRequest::Activate(activation));
                self.active = true;
            }
            Worker::Inline => {
                let result = lock(&self.device).activate(activation);
                match result {
                    Ok(()) => self.active = true,
                    Err(e) => {
                        self.driver_error(format_args!("cannot activate: {e}"));
                        self.needs_reset();
                    }
                }
            }
        }
    }

    /// Tells the driver the device is unusable until reset.
    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.raise(super::INT_CONFIG_CHANGE);
    }

    fn reset(&mut self) {
        if self.active {
            match &self.worker {
                Worker::Runner(mailbox) => {
                    let ticket = mailbox.post(DeviceRequest::Reset);
                    if !mailbox.wait(ticket) {
                        log::error!("{}: the device did not finish its reset in time", self.name);
                    }
                }
                Worker::Inline => lock(&self.device).reset(),
            }
        }
        self.active = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and read whole.
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                data.copy_from_slice(&self.read_register(offset).to_le_bytes());
            }
            _ => {
                log::debug!(
                    "{}: {}-byte register read at {offset:#x}",
                    self.name,
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        match data.try_into() {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => log::debug!(
                "{}: {}-byte register write at {offset:#x}",
                self.name,
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, F_EVENT_IDX, F_VERSION_1, INT_CONFIG_CHANGE};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Default)]
    struct Dummy {
        activations: Vec<(u64, usize)>,
        resets: usize,
        config: [u8; 8],
        fail: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | F_EVENT_IDX | 1
        }
        fn queue_events(&self) -> &[EventFd] {
            &[]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if o + data.len() <= self.config.len() {
                self.config[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Other("no".into()));
            }
            self.activations.push((a.features, a.queues.len()));
            Ok(())
        }
        fn queue_positions(&self) -> Vec<(u16, u16)> {
            vec![(0, 0); 2]
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>, EventFd) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let int = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let t = MmioTransport::new("test", dev.clone(), mem, int);
        (t, dev, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport like Linux's virtio_mmio driver does.
    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, REG_QUEUE_SEL, sel);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        r(t, REG_STATUS)
    }

    const READY: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = setup();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (F_EVENT_IDX | 1) as u32);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn full_handshake_activates_once() {
        let (mut t, dev, _) = setup();
        assert_eq!(negotiate(&mut t, F_VERSION_1 | F_EVENT_IDX), READY);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 8, 0x20000);
        w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), READY | STATUS_DRIVER_OK);
        assert_eq!(
            dev.lock().unwrap().activations,
            vec![(F_VERSION_1 | F_EVENT_IDX, 2)]
        );
        // Writing DRIVER_OK again does not activate twice.
        w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
        assert_eq!(dev.lock().unwrap().activations.len(), 1);
        // Reset tells the device and clears everything.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn features_not_offered_or_legacy_are_refused() {
        let (mut t, _, _) = setup();
        assert_eq!(
            negotiate(&mut t, F_VERSION_1 | (1 << 5)),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER
        );
        let (mut t, _, _) = setup();
        assert_eq!(
            negotiate(&mut t, 1),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            "no VERSION_1"
        );
    }

    #[test]
    fn bad_queues_set_needs_reset() {
        for (size, base) in [
            (12u32, 0x10000u64),
            (32, 0x10000),
            (0, 0x10000),
            (0x1_0010, 0x10000),
            (16, 0xfff_0000),
            (16, 0x10008),
        ] {
            let (mut t, dev, irq) = setup();
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0, size, base);
            setup_queue(&mut t, 1, 8, 0x20000);
            w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
            assert_ne!(
                r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET,
                0,
                "size {size} base {base:#x}"
            );
            assert!(dev.lock().unwrap().activations.is_empty());
            assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
            assert!(irq.read().is_ok());
            // A reset makes it usable again.
            w(&mut t, REG_STATUS, 0);
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0, 16, 0x10000);
            setup_queue(&mut t, 1, 8, 0x20000);
            w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
            assert_eq!(dev.lock().unwrap().activations.len(), 1);
        }
    }

    #[test]
    fn queue_not_ready_or_device_failure_sets_needs_reset() {
        let (mut t, dev, _) = setup();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x10000);
        w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        let (mut t, dev2, _) = setup();
        dev2.lock().unwrap().fail = true;
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 8, 0x20000);
        w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn out_of_order_writes_are_ignored() {
        let (mut t, dev, _) = setup();
        // Queue setup before FEATURES_OK, DRIVER_OK straight away.
        setup_queue(&mut t, 0, 16, 0x10000);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_STATUS, STATUS_DRIVER_OK);
        assert!(dev.lock().unwrap().activations.is_empty());
        // Clearing bits is refused.
        let (mut t, _, _) = setup();
        negotiate(&mut t, F_VERSION_1);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), READY);
        // Features after FEATURES_OK do not change the agreement.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 8, 0x20000);
        // Queue registers are frozen once the queue is ready.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 2);
        w(&mut t, REG_STATUS, READY | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), READY | STATUS_DRIVER_OK);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let (mut t, dev, _) = setup();
        t.write(CONFIG_SPACE + 2, &[7, 8]);
        assert_eq!(dev.lock().unwrap().config[2..4], [7, 8]);
        let mut d = [0u8; 2];
        t.read(CONFIG_SPACE + 2, &mut d);
        assert_eq!(d, [7, 8]);
        let mut big = [0xffu8; 8];
        t.read(CONFIG_SPACE + 4, &mut big);
        assert_eq!(big, [0; 8], "beyond the config reads zero");
        t.write(CONFIG_SPACE + 0xe00, &[1; 8]);
        // Registers: only aligned 32-bit accesses.
        let mut b = [0xffu8; 1];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        t.write(REG_STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(r(&mut t, REG_STATUS), 0);
        let mut d = [0u8; 4];
        t.read(0x200_0000, &mut d);
        w(&mut t, 0x0f0, 5);
    }

    #[test]
    fn interrupt_ack() {
        let (mut t, _, _) = setup();
        t.interrupt.signal_used();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }
}
