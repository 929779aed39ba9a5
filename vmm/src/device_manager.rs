//! The devices of a VM, held for its whole life: the buses the vCPUs use,
//! every virtio device with its transport, the legacy devices, and the
//! threads that run devices outside the VMM event loop.
//!
//! Virtio devices run on an event loop through their
//! [`VirtioRunner`]: most share the VMM's loop; each block device gets a loop
//! on a thread of its own, so a guest keeping a disk busy (large reads,
//! synchronous writes each followed by `fdatasync`) delays neither the other
//! devices nor signal handling.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arch::layout::VIRTIO_MMIO_START;
use devices::Bus;
use devices::legacy::{
    BootTimer, I8042, I8042_IRQ, I8042_PORT, I8042_PORT_LEN, PVPANIC_PORT, PvPanic,
};
use devices::serial::{COM1_IRQ, COM1_PORT, COM1_PORT_LEN, SerialConsole};
use devices::virtio::block::{Block, disk::DiskImage};
use devices::virtio::runner::{DeviceMailbox, VirtioRunner};
use devices::virtio::vsock::Vsock;
use devices::virtio::{self, Interrupt, VirtioDevice, mmio::MmioTransport, net, rng::Rng};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{BuildError, kvm_err};
use crate::config::{SerialConfig, VmConfig};
use crate::exit::ExitState;
use crate::vm::{Console, EventLoop};

type Result<T> = std::result::Result<T, BuildError>;

/// Interrupt lines for virtio devices: IOAPIC pins 5 to 23 (1 is the
/// keyboard, 4 is COM1).
const VIRTIO_FIRST_GSI: u32 = 5;
const VIRTIO_LAST_GSI: u32 = 23;
/// The most virtio devices a VM can have (one interrupt line each).
pub const MAX_VIRTIO_DEVICES: usize = (VIRTIO_LAST_GSI - VIRTIO_FIRST_GSI + 1) as usize;

/// A virtio device as placed on the MMIO bus.
pub struct VirtioSlot {
    /// For messages: `virtio-blk@0xd0000000`.
    pub name: String,
    /// Start of its 4 KiB register window.
    pub base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub mailbox: Arc<DeviceMailbox>,
}

/// An event loop on a thread of its own, for one device.
struct DeviceThread {
    name: String,
    /// Built with the device; moved to the thread by `start_threads`.
    events: Option<EventLoop>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// Every device of a VM.
pub struct DeviceManager {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub virtio: Vec<VirtioSlot>,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    threads: Vec<DeviceThread>,
    /// Where a device thread that cannot start reports it.
    exit: Arc<ExitState>,
}

impl DeviceManager {
    /// COM1, the i8042, the pvpanic port and the configured virtio devices,
    /// with their interrupts and notifications wired to KVM. Devices that
    /// share the VMM loop are added to `events`; returns the console when
    /// the serial port is on stdio.
    pub fn create(
        config: &VmConfig,
        vm: &VmFd,
        mem: &arch::GuestMemoryMmap,
        exit: &Arc<ExitState>,
        events: &mut EventLoop,
    ) -> Result<(DeviceManager, Option<Console>)> {
        let mut mmio = Bus::new();
        // Firecracker's boot timer takes the first window; the guest finds
        // it where Firecracker puts it.
        if config.boot_timer {
            mmio.insert(
                Arc::new(Mutex::new(BootTimer::new(crate::logger::started()))),
                VIRTIO_MMIO_START,
                virtio::mmio::WINDOW_SIZE,
            )?;
        }
        let mut placer = VirtioPlacer {
            vm,
            mem,
            mmio: &mut mmio,
            slots: Vec::new(),
            threads: Vec::new(),
            skipped_windows: u64::from(config.boot_timer),
        };
        if config.rng {
            let rng = Rng::new().map_err(BuildError::EventFd)?;
            placer.add("virtio-rng", rng, Some(&mut *events))?;
        }
        for disk in &config.disks {
            let image = DiskImage::open(&disk.path, disk.readonly)?;
            let block = Block::new(image, disk.id.as_deref()).map_err(BuildError::EventFd)?;
            // Its own loop, on its own thread.
            placer.add("virtio-blk", block, None)?;
        }
        for nic in &config.nets {
            let mac = nic.mac.unwrap_or_else(net::random_mac);
            let device = net::Net::new(
                match crate::jail::take_tap(&nic.tap) {
                    Some(tap) => tap,
                    None => net::Tap::open(&nic.tap)?,
                },
                mac,
            )
            .map_err(BuildError::EventFd)?;
            log::info!("virtio-net: tap {}, MAC {}", nic.tap, net::format_mac(&mac));
            placer.add(
                &format!("virtio-net({})", nic.tap),
                device,
                Some(&mut *events),
            )?;
        }
        if let Some(v) = &config.vsock {
            placer.add(
                "virtio-vsock",
                Vsock::new(v.cid, &v.socket)?,
                Some(&mut *events),
            )?;
        }
        let VirtioPlacer { slots, threads, .. } = placer;

        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("connect the serial interrupt"))?;
        // Blocking: the console input thread sleeps on it while the FIFO is full.
        let input_space = EventFd::new(0).map_err(BuildError::EventFd)?;
        let out: Box<dyn Write + Send> = match &config.serial {
            SerialConfig::Stdio => Box::new(std::io::stdout()),
            SerialConfig::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| BuildError::SerialFile {
                        path: path.clone(),
                        source,
                    })?,
            ),
            SerialConfig::None => Box::new(std::io::sink()),
        };
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq,
            input_space.try_clone().map_err(BuildError::EventFd)?,
            out,
        )));
        pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
        let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&keyboard_irq, I8042_IRQ)
            .map_err(kvm_err("connect the keyboard interrupt"))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), keyboard_irq)));
        pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
            PVPANIC_PORT,
            1,
        )?;
        let console = match config.serial {
            SerialConfig::Stdio => Some(Console {
                serial: serial.clone(),
                input_space,
            }),
            _ => None,
        };
        Ok((
            DeviceManager {
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                virtio: slots,
                serial,
                i8042,
                threads,
                exit: exit.clone(),
            },
            console,
        ))
    }

    /// What the kernel must be told about the virtio devices: each window's
    /// base address and interrupt line.
    pub fn virtio_mmio_windows(&self) -> Vec<(u64, u32)> {
        self.virtio.iter().map(|s| (s.base, s.gsi)).collect()
    }

    /// Starts the device threads (before the vCPUs run).
    pub fn start_threads(&mut self) -> std::io::Result<()> {
        for t in &mut self.threads {
            let Some(mut events) = t.events.take() else {
                continue;
            };
            let stop = t.stop.clone();
            let name = t.name.clone();
            let exit = self.exit.clone();
            t.thread = Some(
                std::thread::Builder::new()
                    .name(t.name.clone())
                    .spawn(move || {
                        if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Block) {
                            log::error!("{name}: {e}");
                            exit.request(crate::exit::ExitReason::VmmError(format!("{name}: {e}")));
                            return;
                        }
                        while !stop.is_stopped() {
                            if let Err(e) = events.run() {
                                log::error!("{name}: event loop failed: {e:?}");
                                return;
                            }
                        }
                    })?,
            );
        }
        Ok(())
    }

    /// Stops and joins the device threads, and releases any vCPU still
    /// waiting on a device (the VM is stopping).
    pub fn stop_threads(&mut self) {
        for t in &mut self.threads {
            if let Err(e) = t.stop.write(1) {
                log::error!("{}: cannot stop its thread: {e}", t.name);
            }
            if let Some(thread) = t.thread.take()
                && thread.join().is_err()
            {
                log::error!("{}: its thread panicked", t.name);
            }
        }
        for slot in &self.virtio {
            slot.mailbox.close();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// A stop flag that is also an event fd, so a device loop wakes to see it.
trait StopFlag {
    fn is_stopped(&self) -> bool;
}

impl StopFlag for Arc<EventFd> {
    fn is_stopped(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: polls one descriptor we own, without waiting.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) > 0 }
    }
}

/// Ends a device thread's loop when its stop fd is written (it stays
/// readable, so the loop sees it on every turn).
struct StopWatcher(Arc<EventFd>);

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.0, EventSet::IN)) {
            log::error!("cannot watch a device thread's stop event: {e:?}");
        }
    }
    fn process(&mut self, _: Events, ops: &mut EventOps) {
        // Stop watching (it stays readable); the loop ends on this turn.
        let _ = ops.remove(Events::new(&*self.0, EventSet::IN));
    }
}

/// Places virtio devices: each gets a 4 KiB MMIO window from
/// [`VIRTIO_MMIO_START`] and its own interrupt line from [`VIRTIO_FIRST_GSI`].
struct VirtioPlacer<'a> {
    vm: &'a VmFd,
    mem: &'a arch::GuestMemoryMmap,
    mmio: &'a mut Bus,
    slots: Vec<VirtioSlot>,
    threads: Vec<DeviceThread>,
    /// Windows before the first virtio device's (the boot timer's).
    skipped_windows: u64,
}

impl VirtioPlacer<'_> {
    /// Adds `device`, run on `events` or, if `None`, on a thread of its own.
    fn add<D>(&mut self, kind: &str, device: D, events: Option<&mut EventLoop>) -> Result<()>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let index = self.slots.len() as u32;
        let gsi = VIRTIO_FIRST_GSI + index;
        if gsi > VIRTIO_LAST_GSI {
            return Err(BuildError::TooManyDevices(
                VIRTIO_LAST_GSI - VIRTIO_FIRST_GSI + 1,
            ));
        }
        let base = VIRTIO_MMIO_START
            + (self.skipped_windows + u64::from(index)) * virtio::mmio::WINDOW_SIZE;
        let name = format!("{kind}@{base:#x}");

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(kvm_err("connect a virtio interrupt"))?;
        for (queue, event) in device.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(base + virtio::mmio::REG_QUEUE_NOTIFY);
            self.vm
                .register_ioevent(event, &notify, queue as u32)
                .map_err(kvm_err("connect a virtio queue notification"))?;
        }
        let interrupt = Arc::new(Interrupt::new(irq));
        let device = Arc::new(Mutex::new(device));
        let (runner, mailbox) = VirtioRunner::new(name.clone(), device.clone(), interrupt.clone())
            .map_err(BuildError::EventFd)?;
        let transport = Arc::new(Mutex::new(MmioTransport::with_runner(
            name.clone(),
            device.clone(),
            mailbox.clone(),
            self.mem.clone(),
            interrupt,
        )));
        self.mmio
            .insert(transport.clone(), base, virtio::mmio::WINDOW_SIZE)?;
        match events {
            Some(events) => {
                events.add_subscriber(Arc::new(Mutex::new(runner)));
            }
            None => {
                let mut own: EventLoop = EventManager::new()
                    .map_err(|e| BuildError::EventLoop(format!("{name}: {e:?}")))?;
                let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?);
                own.add_subscriber(Arc::new(Mutex::new(runner)));
                own.add_subscriber(Arc::new(Mutex::new(StopWatcher(stop.clone()))));
                self.threads.push(DeviceThread {
                    name: format!("{}{}", kind.trim_start_matches("virtio-"), index),
                    events: Some(own),
                    stop,
                    thread: None,
                });
            }
        }
        log::debug!("{name}: GSI {gsi}");
        self.slots.push(VirtioSlot {
            name,
            base,
            gsi,
            transport,
            device,
            mailbox,
        });
        Ok(())
    }
}
