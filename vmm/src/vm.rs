//! A built VM and how it runs: one thread per vCPU, a console input thread,
//! and the VMM event loop on the calling thread, which waits for a reason to
//! stop (a guest event, a vCPU failure or a signal) and then tears down.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::lock;
use devices::serial::SerialConsole;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, ExitState};
use crate::terminal::RawTerminal;
use crate::vcpu::{Vcpu, kick_signal};

/// Signals that stop the VM cleanly.
const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The serial console wired to stdin/stdout.
pub struct Console {
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Written when the guest has drained the receive FIFO.
    pub input_space: EventFd,
}

/// The VMM's event loop: device work and VMM events, on the thread that runs the VM.
pub type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A VM ready to run. Field order is drop order: vCPUs and the VM fd go
/// before the guest memory they point into.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    console: Option<Console>,
    exit: Arc<ExitState>,
    events: EventLoop,
    _vm: VmFd,
    _mem: arch::GuestMemoryMmap,
    _kvm: Kvm,
}

impl Vm {
    pub fn new(
        kvm: Kvm,
        vm: VmFd,
        mem: arch::GuestMemoryMmap,
        vcpus: Vec<Vcpu>,
        exit: Arc<ExitState>,
        console: Option<Console>,
        events: EventLoop,
    ) -> Self {
        Vm {
            vcpus,
            console,
            exit,
            events,
            _vm: vm,
            _mem: mem,
            _kvm: kvm,
        }
    }

    /// Runs the guest until something stops it, and says why.
    pub fn run(mut self) -> ExitReason {
        match self.run_inner() {
            Ok(()) => {}
            Err(message) => self.exit.request(ExitReason::VmmError(message)),
        }
        hand_off_teardown(self._vm.as_raw_fd());
        self.exit
            .reason()
            .unwrap_or_else(|| ExitReason::VmmError("the VM stopped without a reason".into()))
    }

    fn run_inner(&mut self) -> Result<(), String> {
        // Threads inherit the signal mask: block the stop signals everywhere
        // (they arrive through a signalfd in the event loop) and the kick
        // signal everywhere but in vCPU threads, which unblock it.
        for sig in STOP_SIGNALS.iter().copied().chain([kick_signal()]) {
            vmm_sys_util::signal::block_signal(sig)
                .map_err(|e| format!("cannot block signal {sig}: {e}"))?;
        }
        extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
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

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start() {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.exit.request(ExitReason::VmmError(e.to_string()));
                    break;
                }
            }
        }

        let result = event_loop(&mut self.events, self.exit.clone(), signals);
        if let Err(e) = &result {
            self.exit.request(ExitReason::VmmError(e.clone()));
        }
        stop_vcpus(threads);
        result
    }
}

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
fn hand_off_teardown(vm_fd: RawFd) {
    const STACK_SIZE: usize = 16 * 1024;
    /// What the child needs: who to outlive, and the one descriptor to keep.
    struct Handoff {
        parent: libc::pid_t,
        vm_fd: libc::c_uint,
    }
    extern "C" fn teardown_child(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` points to the leaked Handoff below, never freed.
        let Handoff { parent, vm_fd } = unsafe { std::ptr::read(arg as *const Handoff) };
        // SAFETY: we share the parent's memory but run on our own stack and
        // only make system calls. We keep only the VM descriptor: everything
        // else (stdio, so readers see end-of-file; disk images, so their
        // locks go; taps and sockets) closes with ligera, as it would without
        // this child.
        unsafe {
            libc::syscall(libc::SYS_close_range, 0, vm_fd.saturating_sub(1), 0);
            libc::syscall(libc::SYS_close_range, vm_fd + 1, libc::c_uint::MAX, 0);
            if vm_fd == 0 {
                // close_range(0, 0) above closed it: nothing left to keep.
                libc::_exit(0);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                while libc::getppid() == parent {
                    libc::pause();
                }
            }
            libc::_exit(0)
        }
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

/// A signalfd for `signals` (which must be blocked).
fn signal_fd(signals: &[i32]) -> Result<File, String> {
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

/// Kicks every vCPU thread out of KVM_RUN until it has ended, then joins it.
/// Kicks repeat because a kick that lands just before a thread enters
/// KVM_RUN is lost.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    for thread in threads {
        while !thread.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_micros(200));
        }
        if thread.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
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
