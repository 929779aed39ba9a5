//! A built VM and its life: configured, running, paused, stopped.
//!
//! Threads: one per vCPU (started by [`Vm::run`], steered through
//! [`VmControl`]), a console input thread, a thread per block device for its
//! I/O, the control socket's thread when there is one, and the VMM event
//! loop on the thread that calls [`Vm::run`]: it serves the other devices and
//! waits for a reason to stop (a guest event, a vCPU failure, a signal, a
//! stop request), then stops the vCPUs and the device threads.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use devices::serial::SerialConsole;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::DeviceManager;
use crate::exit::{ExitReason, ExitState};
use crate::terminal::RawTerminal;
use crate::vcpu::{LifecycleError, Vcpu, VcpuHandle, kick_signal, kicked};

/// Signals that stop the VM cleanly.
pub(crate) const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The serial console wired to stdin/stdout.
pub struct Console {
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Written when the guest has drained the receive FIFO.
    pub input_space: EventFd,
}

/// The VMM's event loop: device work and VMM events, on the thread that runs the VM.
pub type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VmState {
    /// Built, no vCPU has run yet.
    Configured,
    Running,
    /// Every vCPU is stopped outside `KVM_RUN`; devices and the event loop go on.
    Paused,
    /// The vCPU threads have ended; the VM does not run again.
    Stopped,
}

/// How long a pause may take before it is reported as failed: a vCPU leaves
/// `KVM_RUN` within microseconds of its kick, even on an emulating host.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a lifecycle change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("the VM is {0:?}; this needs it {1}")]
    WrongState(VmState, &'static str),
    #[error(transparent)]
    Vcpu(#[from] LifecycleError),
}

/// The lifecycle of a VM, shared with whoever steers it (the control
/// socket's thread): each state change is one call.
pub struct VmControl {
    state: Mutex<VmState>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    exit: Arc<ExitState>,
}

impl VmControl {
    fn new(exit: Arc<ExitState>) -> Self {
        VmControl {
            state: Mutex::new(VmState::Configured),
            vcpus: Mutex::new(Vec::new()),
            exit,
        }
    }

    pub fn state(&self) -> VmState {
        *lock(&self.state)
    }

    /// Stops every vCPU at an instruction boundary, outside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), StateError> {
        let mut state = lock(&self.state);
        match *state {
            VmState::Running => {}
            VmState::Paused => return Ok(()),
            other => return Err(StateError::WrongState(other, "running")),
        }
        let vcpus = lock(&self.vcpus);
        for vcpu in vcpus.iter() {
            vcpu.pause();
        }
        for vcpu in vcpus.iter() {
            if let Err(e) = vcpu.wait_paused(PAUSE_TIMEOUT) {
                // Leave no vCPU half-paused.
                vcpus.iter().for_each(VcpuHandle::resume);
                return Err(e.into());
            }
        }
        *state = VmState::Paused;
        log::info!("VM paused");
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), StateError> {
        let mut state = lock(&self.state);
        match *state {
            VmState::Paused => {}
            VmState::Running => return Ok(()),
            other => return Err(StateError::WrongState(other, "paused")),
        }
        lock(&self.vcpus).iter().for_each(VcpuHandle::resume);
        *state = VmState::Running;
        log::info!("VM resumed");
        Ok(())
    }

    /// Runs `f` with the paused vCPUs, keeping the VM paused meanwhile (a
    /// resume waits): for a snapshot.
    pub fn while_paused<R>(
        &self,
        f: impl FnOnce(&[VcpuHandle]) -> Result<R, String>,
    ) -> Result<R, String> {
        let state = lock(&self.state);
        if *state != VmState::Paused {
            return Err(StateError::WrongState(*state, "paused").to_string());
        }
        let vcpus = lock(&self.vcpus);
        f(&vcpus)
    }

    /// Asks the VM to stop; the event loop then stops the vCPUs. `reason`
    /// decides ligera's exit status.
    pub fn request_stop(&self, reason: ExitReason) {
        self.exit.request(reason);
    }

    /// Stops and joins every vCPU thread.
    fn stop_vcpus(&self) {
        let mut state = lock(&self.state);
        for mut vcpu in lock(&self.vcpus).drain(..) {
            vcpu.stop();
        }
        *state = VmState::Stopped;
    }
}

/// A VM: built, then run until something stops it. Field order is drop
/// order: vCPUs, devices and the VM fd go before the guest memory they
/// point into.
pub struct Vm {
    control: Arc<VmControl>,
    /// vCPUs built but not started yet.
    unstarted: Vec<Vcpu>,
    console: Option<Console>,
    exit: Arc<ExitState>,
    events: EventLoop,
    devices: DeviceManager,
    vm: Arc<VmFd>,
    mem: arch::GuestMemoryMmap,
    /// The MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST).
    msr_list: Arc<Vec<u32>>,
    /// Start with every vCPU paused (a snapshot loaded without resuming).
    start_paused: bool,
    /// Called once the vCPU threads run (or wait, paused).
    on_start: Option<Box<dyn FnOnce() + Send>>,
    _kvm: Kvm,
}

/// What [`Vm::new`] takes: everything the builder made.
pub struct VmParts {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: arch::GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub exit: Arc<ExitState>,
    pub console: Option<Console>,
    pub events: EventLoop,
    pub devices: DeviceManager,
    pub msr_list: Vec<u32>,
}

impl Vm {
    pub fn new(p: VmParts) -> Self {
        Vm {
            control: Arc::new(VmControl::new(p.exit.clone())),
            unstarted: p.vcpus,
            console: p.console,
            exit: p.exit,
            events: p.events,
            devices: p.devices,
            vm: Arc::new(p.vm),
            mem: p.mem,
            msr_list: Arc::new(p.msr_list),
            start_paused: false,
            on_start: None,
            _kvm: p.kvm,
        }
    }

    /// Has [`Vm::run`] start the vCPUs paused: the VM is Paused until
    /// resumed through its [`VmControl`].
    pub fn start_paused(&mut self) {
        self.start_paused = true;
    }

    /// Calls `f` once the vCPU threads have started (not if they never do).
    pub fn on_start(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_start = Some(Box::new(f));
    }

    /// The handle to pause, resume or stop this VM from another thread.
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    pub fn state(&self) -> VmState {
        self.control.state()
    }

    /// The devices, which stay reachable for the VM's whole life.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// What a snapshot of this VM (built from `config`) is taken from.
    pub fn snapshot_source(&self, config: &crate::config::VmConfig) -> crate::snapshot::Source {
        crate::snapshot::Source {
            control: self.control.clone(),
            vm: self.vm.clone(),
            mem: self.mem.clone(),
            serial: self.devices.serial.clone(),
            i8042: self.devices.i8042.clone(),
            virtio: self
                .devices
                .virtio
                .iter()
                .map(|s| crate::snapshot::VirtioPart {
                    name: s.name.clone(),
                    transport: s.transport.clone(),
                    device: s.device.clone(),
                    mailbox: s.mailbox.clone(),
                })
                .collect(),
            config: config.clone(),
            msr_list: self.msr_list.clone(),
        }
    }

    /// Runs the guest until something stops it, and says why. The VM is
    /// Stopped afterwards; its devices can still be read.
    pub fn run(&mut self) -> ExitReason {
        if self.state() != VmState::Configured {
            return ExitReason::VmmError("the VM has already run".into());
        }
        match self.run_inner() {
            Ok(()) => {}
            Err(message) => self.exit.request(ExitReason::VmmError(message)),
        }
        // Not started: whoever waits for the start learns it (the closure,
        // and what it would have sent, are dropped).
        self.on_start = None;
        self.exit
            .reason()
            .unwrap_or_else(|| ExitReason::VmmError("the VM stopped without a reason".into()))
    }

    fn run_inner(&mut self) -> Result<(), String> {
        block_signals()?;
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kicked)
            .map_err(|e| format!("cannot install the vCPU kick handler: {e}"))?;
        let signals = signal_fd(&STOP_SIGNALS)?;

        let _terminal = match &self.console {
            Some(_) => RawTerminal::enter(libc::STDIN_FILENO)
                .map_err(|e| format!("cannot set the terminal to raw mode: {e}"))?,
            None => None,
        };
        if let Some(console) = &self.console {
            start_console_input(console)?;
        }
        self.devices
            .start_threads()
            .map_err(|e| format!("cannot start a device thread: {e}"))?;

        {
            let mut state = lock(&self.control.state);
            let mut handles = lock(&self.control.vcpus);
            for vcpu in self.unstarted.drain(..) {
                match vcpu.start(self.start_paused) {
                    Ok(handle) => handles.push(handle),
                    Err(e) => {
                        self.exit.request(ExitReason::VmmError(e.to_string()));
                        break;
                    }
                }
            }
            *state = if self.start_paused {
                VmState::Paused
            } else {
                VmState::Running
            };
        }
        log::debug!("vCPUs started (CLOCK_MONOTONIC {} ns)", monotonic_ns());
        if let Some(f) = self.on_start.take()
            && !self.exit.is_stopping()
        {
            f();
        }
        // This thread's filter after the vCPUs' own (see
        // SetUpWatch::wait_set_up); nothing here reads guest data until
        // the event loop runs.
        let watches: Vec<_> = lock(&self.control.vcpus)
            .iter()
            .map(|h| h.set_up_watch())
            .collect();
        for watch in watches {
            watch.wait_set_up(Duration::from_millis(50));
        }
        crate::seccomp::install(crate::seccomp::Role::Vmm)?;

        let result = event_loop(&mut self.events, self.exit.clone(), signals);
        if let Err(e) = &result {
            self.exit.request(ExitReason::VmmError(e.clone()));
        }
        self.control.stop_vcpus();
        self.devices.stop_threads();
        result
    }

    /// Ends the process with `code`. Destroying a VM makes the kernel wait
    /// for several RCU grace periods; where that is safe, a child pays for
    /// it instead (see [`hand_off_teardown`]).
    pub fn exit_process(self, code: i32) -> ! {
        // As PID 1 of a PID namespace (a jailed VM), a child would be killed
        // with us and our exit would wait for it anyway: the jail's
        // supervisor, outside the namespace, takes the VM instead.
        let pid_one = std::process::id() == 1;
        let inline = std::env::var_os("LIGERA_INLINE_TEARDOWN").is_some();
        if pid_one && !inline {
            crate::jail::hand_vm_to_supervisor(self.vm.as_raw_fd());
        } else if !inline {
            hand_off_teardown(self.vm.as_raw_fd());
        }
        drop(self);
        std::process::exit(code)
    }
}

/// The name (`/proc/PID/comm`) of the child that destroys a VM once its
/// ligera has exited, while it does.
pub const TEARDOWN_NAME: &std::ffi::CStr = c"ligera-teardown";

/// Lets a child process, rather than ligera, pay for destroying the VM.
///
/// Tearing a VM down makes KVM and the kernel wait for several RCU grace
/// periods (PIT, irqchip, memory slots, the MMU notifier on our address
/// space): 2 to 20 ms on the development machines, after the guest has
/// already stopped. A child made with `CLONE_VM` shares our address space and
/// holds copies of our descriptors until ligera has exited (then
/// PR_SET_PDEATHSIG kills it), so all of that happens when the child ends,
/// and whoever waits for ligera sees it exit at once. If the child cannot be
/// made, the teardown simply happens at exit as usual.
pub(crate) fn hand_off_teardown(vm_fd: RawFd) {
    const STACK_SIZE: usize = 16 * 1024;
    /// What the child needs: who to outlive, and the one descriptor to keep.
    struct Handoff {
        parent: libc::pid_t,
        vm_fd: libc::c_uint,
    }
    extern "C" fn teardown_child(arg: *mut libc::c_void) -> libc::c_int {
        // The child shares the parent's thread pointer (no CLONE_SETTLS), so
        // it must not touch thread-local storage: libc's wrappers write errno
        // there. It makes raw system calls only.
        // SAFETY: `arg` points to the leaked Handoff below, never freed.
        let Handoff { parent, vm_fd } = unsafe { std::ptr::read(arg as *const Handoff) };
        let vm_fd = u64::from(vm_fd);
        // SAFETY: raw system calls on our own stack, touching no memory of
        // the parent's. We keep only the VM descriptor: everything else
        // (stdio, so readers see end-of-file; disk images, so their locks go;
        // taps and sockets) closes with ligera, as it would without this child.
        unsafe {
            raw_syscall(libc::SYS_close_range, [0, vm_fd.saturating_sub(1), 0]);
            raw_syscall(libc::SYS_close_range, [vm_fd + 1, u64::from(u32::MAX), 0]);
            if vm_fd != 0
                && raw_syscall(
                    libc::SYS_prctl,
                    [libc::PR_SET_PDEATHSIG as u64, libc::SIGKILL as u64, 0],
                ) == 0
            {
                while raw_syscall(libc::SYS_getppid, [0; 3]) == i64::from(parent) {
                    raw_syscall(libc::SYS_pause, [0; 3]);
                }
            }
            // Named while it destroys the VM (as it exits), so that a
            // benchmark can wait for that to be done.
            raw_syscall(
                libc::SYS_prctl,
                [libc::PR_SET_NAME as u64, TEARDOWN_NAME.as_ptr() as u64, 0],
            );
            raw_syscall(libc::SYS_exit, [0; 3]);
        }
        0
    }
    let Ok(vm_fd) = libc::c_uint::try_from(vm_fd) else {
        return;
    };
    // The child's stack and argument live as long as the address space;
    // they are never freed.
    let stack: &'static mut [u8] = Box::leak(vec![0u8; STACK_SIZE].into_boxed_slice());
    let handoff: &'static mut Handoff = Box::leak(Box::new(Handoff {
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        vm_fd,
    }));
    // SAFETY: the stack is ours and 16-byte aligned at its top; the child
    // function only makes the system calls above.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(STACK_SIZE - 64);
        let top = top.sub(top as usize % 16);
        libc::clone(
            teardown_child,
            top.cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            (handoff as *mut Handoff).cast(),
        )
    };
    if pid < 0 {
        log::debug!(
            "no teardown child ({}): the VM is destroyed at exit",
            std::io::Error::last_os_error()
        );
    }
}

/// Blocks the stop signals (they arrive through a signalfd in the event
/// loop) and the vCPU kick signal (vCPU threads unblock it) in the calling
/// thread, and so in every thread it starts afterwards: call it before
/// starting any thread.
pub fn block_signals() -> Result<(), String> {
    use vmm_sys_util::signal::{Error, block_signal};
    for sig in STOP_SIGNALS.iter().copied().chain([kick_signal()]) {
        match block_signal(sig) {
            Ok(()) | Err(Error::SignalAlreadyBlocked(_)) => {}
            Err(e) => return Err(format!("cannot block signal {sig}: {e}")),
        }
    }
    Ok(())
}

/// A system call without libc's wrapper (which would set errno); returns
/// the kernel's result (negative errno on failure).
///
/// # Safety
/// The call and its arguments must be valid for the calling context.
unsafe fn raw_syscall(nr: libc::c_long, args: [u64; 3]) -> i64 {
    let ret: i64;
    // SAFETY: the x86_64 system call convention: number in rax, arguments
    // in rdi, rsi, rdx; the kernel clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// CLOCK_MONOTONIC now, in ns: comparable with other processes' clocks
/// (benchmarks time exec → first KVM_RUN with it).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `t`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A signalfd for `signals` (which must be blocked).
pub(crate) fn signal_fd(signals: &[i32]) -> Result<File, String> {
    let set = vmm_sys_util::signal::create_sigset(signals)
        .map_err(|e| format!("cannot build a signal set: {e}"))?;
    // SAFETY: `set` is a valid sigset; signalfd returns a new descriptor or -1.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot create a signalfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Turns VMM events (exit requests, stop signals) into a stop decision.
struct Controller {
    exit: Arc<ExitState>,
    signals: File,
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit.event.as_raw_fd(), self.signals.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                self.exit.request(ExitReason::VmmError(format!(
                    "cannot watch an event source: {e:?}"
                )));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signals.as_raw_fd() {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            while let Ok(n) = self.signals.read(&mut info) {
                if n < info.len() {
                    break;
                }
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                self.exit.request(ExitReason::Signal(signo as i32));
            }
        } else {
            let _ = self.exit.event.read();
        }
    }
}

fn event_loop(manager: &mut EventLoop, exit: Arc<ExitState>, signals: File) -> Result<(), String> {
    manager.add_subscriber(Arc::new(Mutex::new(Controller {
        exit: exit.clone(),
        signals,
    })));
    while !exit.is_stopping() {
        manager
            .run()
            .map_err(|e| format!("event loop failed: {e:?}"))?;
    }
    Ok(())
}

/// Feeds stdin to the guest's UART, as fast as the guest drains its FIFO.
/// The thread blocks in read(2), so it is not joined: it ends with the process.
fn start_console_input(console: &Console) -> Result<(), String> {
    let serial = console.serial.clone();
    let space = console
        .input_space
        .try_clone()
        .map_err(|e| format!("cannot clone an event fd: {e}"))?;
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Console) {
                // Fail closed: no thread runs without its filter.
                eprintln!("ligera: error: {e}");
                crate::terminal::restore();
                std::process::exit(crate::exit::EXIT_VMM_ERROR);
            }
            let mut buf = [0u8; 64];
            loop {
                let room = lock(&serial).input_capacity().min(buf.len());
                if room == 0 {
                    // Woken when the guest empties the FIFO.
                    if space.read().is_err() {
                        return;
                    }
                    continue;
                }
                // SAFETY: reading into a buffer we own, at most its length.
                let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), room) };
                match n {
                    0 => return, // end of input
                    n if n < 0 => {
                        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                        {
                            return;
                        }
                    }
                    n => {
                        lock(&serial).enqueue_input(&buf[..n as usize]);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the console input thread: {e}"))
}
