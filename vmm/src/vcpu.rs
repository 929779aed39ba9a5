//! One vCPU: its KVM state at boot, and the thread that runs it.
//!
//! Each vCPU thread loops on `KVM_RUN` and hands port and MMIO exits to the
//! buses. Everything that ends the VM goes through [`ExitState`].
//!
//! The VMM steers a running vCPU through its [`VcpuHandle`]: it records what
//! it wants (run, pause, stop) and sends the thread [`kick_signal`] once. The
//! signal's handler sets `immediate_exit` in the vCPU's `kvm_run` structure,
//! so `KVM_RUN` returns at once whether the thread was inside it or just about
//! to enter it; the thread then looks at the request before entering again.
//! No kick is lost and none needs repeating. A paused thread says so and
//! sleeps on a condition variable, outside `KVM_RUN`, until resumed or stopped.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arch::cpuid::{CpuidConfig, configure_cpuid};
use arch::regs::{EntryPoint, boot_fpu, boot_msrs, boot_regs, boot_sregs, set_lint_pins};
use devices::Bus;
use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::exit::{ExitReason, ExitState};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index} ({what}): {source}")]
    Setup {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted only {set} of {total} boot MSRs (first refused: {msr:#x})")]
    Msrs {
        index: u8,
        set: usize,
        total: usize,
        msr: u32,
    },
    #[error("vCPU {index}: {count} CPUID entries are more than KVM takes")]
    CpuidEntries { index: u8, count: usize },
    #[error("cannot start the thread for vCPU {index}: {source}")]
    Thread { index: u8, source: std::io::Error },
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, if it is a vCPU thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes the current or next `KVM_RUN` of this
/// vCPU thread return at once. Only touches a thread-local and the mapped
/// `kvm_run` page, which is async-signal-safe.
pub extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: set by the vCPU thread to its own kvm_run mapping, which
        // outlives the pointer (cleared before the vCPU fd is dropped).
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// What the VMM wants a vCPU thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// Where a vCPU thread is, as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reported {
    Running,
    Paused,
    Ended,
}

/// Work for a paused vCPU thread, on its vCPU fd (saving its state).
type Task = Box<dyn FnOnce(&VcpuFd) + Send>;

struct Control {
    request: Request,
    reported: Reported,
    /// The thread is past its set-up: about to run the guest, paused, or
    /// ended.
    set_up: bool,
    /// Run by the thread while it is paused.
    task: Option<Task>,
}

/// Shared by a vCPU thread and its [`VcpuHandle`].
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On the vCPU thread, before each `KVM_RUN`: whether to go on running.
    /// A pause request is acknowledged here and sleeps until lifted, doing
    /// the tasks it is given meanwhile.
    fn may_run(&self, fd: &VcpuFd) -> bool {
        let mut c = self.lock();
        if !c.set_up {
            c.set_up = true;
            self.changed.notify_all();
        }
        loop {
            match c.request {
                Request::Run => {
                    if c.reported != Reported::Running {
                        c.reported = Reported::Running;
                        self.changed.notify_all();
                    }
                    return true;
                }
                Request::Stop => return false,
                Request::Pause => {
                    if c.reported != Reported::Paused {
                        c.reported = Reported::Paused;
                        self.changed.notify_all();
                    }
                    if let Some(task) = c.task.take() {
                        task(fd);
                        continue;
                    }
                    c = self.changed.wait(c).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    fn ended(&self) {
        let mut c = self.lock();
        c.reported = Reported::Ended;
        c.set_up = true;
        drop(c);
        self.changed.notify_all();
    }
}

/// The VMM's hold on a started vCPU thread.
pub struct VcpuHandle {
    index: u8,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// See [`VcpuHandle::set_up_watch`].
pub struct SetUpWatch(Arc<Shared>);

impl SetUpWatch {
    /// Waits (at most `timeout`) until the thread is past its set-up, about
    /// to enter the guest. Its set-up (installing its seccomp filter,
    /// unblocking its kick signal) takes the process's signal lock, which
    /// installing any thread's filter holds while the kernel prepares the
    /// filter's cache (~0.3 ms on the development machines): a thread that
    /// installs its own filter meanwhile holds the vCPU back from the guest.
    pub fn wait_set_up(&self, timeout: Duration) {
        let c = self.0.lock();
        let _ = self.0.changed.wait_timeout_while(c, timeout, |c| !c.set_up);
    }
}

/// Why a vCPU did not do what it was asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("vCPU {0} has ended: the VM is stopping")]
    Ended(u8),
    #[error("vCPU {0} did not pause within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {0} is not paused")]
    NotPaused(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    NoAnswer(u8, Duration),
}

impl VcpuHandle {
    fn request(&self, request: Request) {
        let mut c = self.shared.lock();
        if c.request == Request::Stop {
            return; // final
        }
        c.request = request;
        drop(c);
        self.shared.changed.notify_all();
        if request != Request::Run {
            self.kick();
        }
    }

    fn kick(&self) {
        use vmm_sys_util::signal::Killable;
        if let Some(thread) = &self.thread
            && !thread.is_finished()
            && let Err(e) = thread.kill(kick_signal())
        {
            log::warn!("vCPU {}: cannot kick its thread: {e}", self.index);
        }
    }

    /// A watch on the thread's set-up that holds no lock of the VMM's.
    pub fn set_up_watch(&self) -> SetUpWatch {
        SetUpWatch(self.shared.clone())
    }

    /// Asks the vCPU to pause; see [`VcpuHandle::wait_paused`].
    pub fn pause(&self) {
        self.request(Request::Pause);
    }

    /// Waits until the vCPU is paused outside `KVM_RUN`.
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), LifecycleError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        loop {
            match c.reported {
                Reported::Paused => return Ok(()),
                Reported::Ended => return Err(LifecycleError::Ended(self.index)),
                Reported::Running => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LifecycleError::Timeout(self.index, timeout));
            }
            c = self
                .shared
                .changed
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `f` on the paused vCPU's thread with its vCPU fd, and returns
    /// what it returns.
    pub fn run_paused<R: Send + 'static>(
        &self,
        f: impl FnOnce(&VcpuFd) -> R + Send + 'static,
        timeout: Duration,
    ) -> Result<R, LifecycleError> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut c = self.shared.lock();
            if c.request != Request::Pause || c.reported != Reported::Paused {
                return Err(LifecycleError::NotPaused(self.index));
            }
            c.task = Some(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
        }
        self.shared.changed.notify_all();
        rx.recv_timeout(timeout)
            .map_err(|_| LifecycleError::NoAnswer(self.index, timeout))
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.request(Request::Run);
    }

    /// Asks the vCPU to stop and waits for its thread to end.
    pub fn stop(&mut self) {
        self.request(Request::Stop);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("vCPU {}: its thread panicked", self.index);
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A vCPU and what its thread needs.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: arch::GuestMemoryMmap,
    exit: Arc<ExitState>,
}

/// How the boot vCPU starts; the others wait for INIT/SIPI from the guest.
pub struct BootState {
    pub entry: EntryPoint,
    pub gdt: (u64, u16),
    pub cr3: u64,
}

impl Vcpu {
    /// Makes vCPU `index` of `vm` in KVM (see [`Vcpu::new`]).
    pub fn create_fd(vm: &VmFd, index: u8) -> Result<VcpuFd, VcpuError> {
        vm.create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })
    }

    /// vCPU `index`, made by [`Vcpu::create_fd`] as `fd`, with the buses
    /// its exits go to.
    pub fn new(
        fd: VcpuFd,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: arch::GuestMemoryMmap,
        exit: Arc<ExitState>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            mem,
            exit,
        }
    }

    /// Sets CPUID, MSRs and LAPIC for every vCPU, and the entry registers for
    /// the boot vCPU. Secondary vCPUs stay in KVM's wait-for-SIPI state.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        cpuid: CpuidConfig,
        boot: Option<&BootState>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |what| {
            move |source| VcpuError::Setup {
                index,
                what,
                source,
            }
        };
        let mut list = supported_cpuid.as_slice().to_vec();
        configure_cpuid(&mut list, cpuid);
        let entries = CpuId::from_entries(&list).map_err(|_| VcpuError::CpuidEntries {
            index,
            count: list.len(),
        })?;
        if log::log_enabled!(log::Level::Trace) {
            for e in entries.as_slice() {
                log::trace!(
                    "vCPU {index} CPUID {:#010x}/{}: {:08x} {:08x} {:08x} {:08x}",
                    e.function,
                    e.index,
                    e.eax,
                    e.ebx,
                    e.ecx,
                    e.edx
                );
            }
        }
        self.fd.set_cpuid2(&entries).map_err(err("CPUID"))?;

        let boot_msrs = boot_msrs();
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|_| VcpuError::Msrs {
            index,
            set: 0,
            total: boot_msrs.len(),
            msr: 0,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(err("MSRs"))?;
        if set != boot_msrs.len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                total: boot_msrs.len(),
                msr: boot_msrs[set].index,
            });
        }

        let mut lapic = self.fd.get_lapic().map_err(err("local APIC"))?;
        set_lint_pins(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(err("local APIC"))?;

        if let Some(boot) = boot {
            self.fd.set_fpu(&boot_fpu()).map_err(err("FPU"))?;
            self.fd
                .set_regs(&boot_regs(boot.entry))
                .map_err(err("registers"))?;
            let sregs = self.fd.get_sregs().map_err(err("special registers"))?;
            self.fd
                .set_sregs(&boot_sregs(sregs, boot.entry, boot.gdt, boot.cr3))
                .map_err(err("special registers"))?;
        }
        Ok(())
    }

    /// Starts the vCPU's thread, running (or paused, if `paused`).
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                request: if paused { Request::Pause } else { Request::Run },
                reported: Reported::Running,
                set_up: false,
                task: None,
            }),
            changed: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                self.run(&thread_shared);
                thread_shared.ended();
            })
            .map_err(|source| VcpuError::Thread { index, source })?;
        Ok(VcpuHandle {
            index,
            shared,
            thread: Some(thread),
        })
    }

    fn run(mut self, shared: &Shared) {
        if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Vcpu) {
            self.exit
                .request(ExitReason::VmmError(format!("vCPU {}: {e}", self.index)));
            return;
        }
        // The kick signal is blocked in the threads that spawned us (so only
        // vCPU threads take it); take it here.
        if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
            self.exit.request(ExitReason::VmmError(format!(
                "vCPU {}: cannot unblock the kick signal: {e}",
                self.index
            )));
            return;
        }
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let mut first = true;
        loop {
            // Cleared before the request is read: a kick from now on sets it
            // again and the next KVM_RUN returns at once.
            // SAFETY: the vCPU's own kvm_run mapping, alive as long as `self.fd`.
            unsafe { std::ptr::write_volatile(immediate_exit, 0) };
            if self.exit.is_stopping() || !shared.may_run(&self.fd) {
                break;
            }
            if first {
                first = false;
                // What resources/bench/snapshot-bench.py times a start to.
                log::debug!(
                    "vCPU {}: first KVM_RUN (CLOCK_MONOTONIC {} ns)",
                    self.index,
                    crate::vm::monotonic_ns()
                );
            }
            if let Some(reason) = self.run_once() {
                self.exit.request(reason);
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Runs the guest until its next exit and handles it; returns why the VM
    /// must stop, if it must.
    fn run_once(&mut self) -> Option<ExitReason> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    log::debug!("vCPU {index}: read from unemulated port {port:#x}");
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.pio.write(u64::from(port), data) {
                    log::debug!("vCPU {index}: write {data:x?} to unemulated port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    log::debug!("vCPU {index}: read from unemulated MMIO {addr:#x}");
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    log::debug!("vCPU {index}: write {data:x?} to unemulated MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault(
                self.describe("shutdown (triple fault)", None),
            )),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::KvmFailure(self.describe(
                &format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host CPU {cpu})"),
                None,
            ))),
            Ok(VcpuExit::InternalError) => Some(self.internal_error()),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Some(ExitReason::GuestReset)
                }
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::GuestPanic),
                other => {
                    log::warn!("vCPU {index}: ignoring system event {other}");
                    None
                }
            },
            // HLT exits only without an in-kernel LAPIC; interrupt-window and
            // other informational exits need nothing from us.
            Ok(VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr) => None,
            Ok(other) => {
                let what = format!("unexpected KVM exit {other:?}");
                Some(ExitReason::KvmFailure(self.describe(&what, None)))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked, or asked to retry: the loop checks whether to stop.
                None
            }
            Err(e) => Some(ExitReason::VmmError(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        }
    }

    /// Describes KVM_EXIT_INTERNAL_ERROR, with the instruction bytes from the
    /// run structure when KVM gives them.
    fn internal_error(&mut self) -> ExitReason {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the union; it is plain data.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "simultaneous exceptions",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown",
        };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let mut insn = None;
        if internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
            && ndata >= 3
            && internal.data[0]
                & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                != 0
        {
            // After the flags: one byte of instruction length, then the bytes.
            let raw: Vec<u8> = internal.data[1..3]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let size = usize::from(raw[0]).min(15);
            let bytes = raw[1..1 + size].to_vec();
            insn = Some(bytes);
        }
        let mut text = format!(
            "KVM_EXIT_INTERNAL_ERROR: {what} (suberror {})",
            internal.suberror
        );
        if ndata > 0 {
            text += &format!(", data {:x?}", &internal.data[..ndata]);
        }
        ExitReason::KvmFailure(self.describe(&text, insn))
    }

    /// "vCPU n: <what> at RIP ..., instruction bytes ..." from the vCPU's state.
    fn describe(&self, what: &str, insn: Option<Vec<u8>>) -> String {
        let index = self.index;
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return format!("vCPU {index}: {what} (registers unavailable)");
        };
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let bytes = insn.or_else(|| self.code_bytes(linear, sregs.cr0 & (1 << 31) != 0));
        let bytes = match bytes {
            Some(b) if !b.is_empty() => b
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            _ => "unavailable".into(),
        };
        format!(
            "vCPU {index}: {what} at RIP {:#x} (CS {:#x}, CR0 {:#x}), instruction bytes: {bytes}",
            regs.rip, sregs.cs.selector, sregs.cr0
        )
    }

    /// Up to 15 bytes of guest code at a linear address.
    fn code_bytes(&self, linear: u64, paging: bool) -> Option<Vec<u8>> {
        let phys = if paging {
            let t = self.fd.translate_gva(linear).ok()?;
            log::debug!(
                "vCPU {}: {linear:#x} translates to {:#x} (valid {})",
                self.index,
                t.physical_address,
                t.valid
            );
            (t.valid != 0).then_some(t.physical_address)?
        } else {
            linear
        };
        let mut bytes = Vec::new();
        for i in 0..15 {
            match self.mem.read_obj::<u8>(GuestAddress(phys + i)) {
                Ok(b) => bytes.push(b),
                Err(_) => break,
            }
        }
        Some(bytes)
    }
}
