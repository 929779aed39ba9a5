//! Seccomp filters, one per thread role.
//!
//! Every thread of a process that runs a VM installs the filter of its role
//! before it touches anything the guest controls: the vCPUs before their
//! first `KVM_RUN`, the device threads before their first queue event, the
//! event loop (the main thread) before it polls, the control socket and the
//! sandbox client before they read a byte. What a role needs beyond its list
//! (opening files, creating taps, registering signal handlers) is done
//! before, while the VM is built.
//!
//! A call outside the filter traps: the kernel sends SIGSYS, whose handler
//! writes one line naming the thread's role and the call, then ends the
//! process with [`EXIT_BAD_SYSCALL`] (128 + SIGSYS, what a shell shows for a
//! process killed by SIGSYS). Trap rather than kill-process because the line
//! is what makes a missing entry diagnosable; it is not a way out: the
//! handler cannot be replaced (`rt_sigaction` is in no list), and a thread
//! that blocks SIGSYS is killed by the kernel's default action instead.

mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Exit status when a thread makes a call outside its filter.
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

/// What a thread does, and so which calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The main thread: the VMM event loop (vsock, net, rng, stop signals),
    /// then stopping the VM, cleaning up and exiting.
    Vmm,
    /// A vCPU: `KVM_RUN` and the exits it handles (serial, MMIO, PIO).
    Vcpu,
    /// A block device's I/O thread.
    Block,
    /// The control socket (`--api-sock`).
    Api,
    /// Copies the host terminal to the guest's serial port.
    Console,
    /// The sandbox's host side of the agent protocol (and its helper
    /// threads: stdin, window size, timeout, readiness).
    Sandbox,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Vmm,
        Role::Vcpu,
        Role::Block,
        Role::Api,
        Role::Console,
        Role::Sandbox,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Vcpu => "vcpu",
            Role::Block => "block",
            Role::Api => "api",
            Role::Console => "console",
            Role::Sandbox => "sandbox",
        }
    }
}

/// Whether seccomp is on for this process ([`enable`] was called).
static ENABLED: OnceLock<()> = OnceLock::new();
/// Each role's compiled filter, made the first time a thread of that role
/// starts (a VM without a control socket never compiles the api filter).
static FILTERS: [OnceLock<Result<BpfProgram, String>>; Role::ALL.len()] =
    [const { OnceLock::new() }; Role::ALL.len()];

thread_local! {
    /// The role whose filter this thread runs under (for the SIGSYS line).
    static ROLE: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Installs the SIGSYS handler and turns on [`install`]: call once, while
/// the VM is built, before any thread starts (`rt_sigaction` is in no list).
/// Without this call [`install`] does nothing (`--seccomp off`).
pub fn enable() -> Result<(), String> {
    if ENABLED.get().is_some() {
        return Ok(());
    }
    install_sigsys_handler()?;
    let _ = ENABLED.set(());
    Ok(())
}

/// Puts the calling thread under `role`'s filter (if seccomp is enabled).
/// Threads this one starts afterwards inherit it.
pub fn install(role: Role) -> Result<(), String> {
    if ENABLED.get().is_none() {
        return Ok(());
    }
    match filter(role) {
        Ok(program) => apply(role, program),
        Err(e) => Err(e.clone()),
    }
}

/// Compiles `role`'s filter ahead of [`install`] (an error is kept for it).
pub fn prepare(role: Role) {
    filter(role);
}

/// `role`'s filter, compiled the first time it is asked for.
fn filter(role: Role) -> &'static Result<BpfProgram, String> {
    let index = Role::ALL.iter().position(|&r| r == role).unwrap_or(0);
    FILTERS[index].get_or_init(|| compile(role))
}

/// Names `role` as the calling thread's, for a thread that runs under the
/// filter it inherited from the thread that started it.
pub fn inherited(role: Role) {
    ROLE.with(|r| r.set(role.name()));
}

/// Applies `program` as `role`'s filter to the calling thread.
pub fn apply(role: Role, program: &BpfProgram) -> Result<(), String> {
    ROLE.with(|r| r.set(role.name()));
    seccompiler::apply_filter(program)
        .map_err(|e| format!("cannot install the {} seccomp filter: {e}", role.name()))
}

/// `role`'s filter as a BPF program.
pub fn compile(role: Role) -> Result<BpfProgram, String> {
    let rules = rules(role).map_err(|e| format!("{} seccomp rules: {e}", role.name()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("{} seccomp filter: {e}", role.name()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("{} seccomp filter: {e}", role.name()))
}

/// The names of the calls `role` may make (some only with certain
/// arguments), for the README and tests.
pub fn allowed(role: Role) -> Vec<&'static str> {
    allowed_with_checks(role)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// The calls `role` may make, each with whether its arguments are checked.
pub fn allowed_with_checks(role: Role) -> Vec<(&'static str, bool)> {
    let mut calls: Vec<_> = rules(role)
        .map(|r| {
            r.iter()
                .map(|(&nr, rules)| {
                    let name = names::NAMES.get(nr as usize).copied().unwrap_or("?");
                    (name, !rules.is_empty())
                })
                .collect()
        })
        .unwrap_or_default();
    calls.sort();
    calls
}

/// The threads that run under each role's filter.
pub fn threads(role: Role) -> &'static str {
    match role {
        Role::Vmm => "the main thread (`ligera`): event loop, exit",
        Role::Vcpu => "`vcpuN`",
        Role::Block => "`blkN`",
        Role::Api => "`api`",
        Role::Console => "`console-in`",
        Role::Sandbox => {
            "`sandbox`, `sandbox-stdin`, `sandbox-winsize`, `sandbox-timeout`, `sandbox-ready`"
        }
    }
}

/// The README's table row for `role`.
pub fn readme_row(role: Role) -> String {
    let calls = allowed_with_checks(role);
    let list: Vec<String> = calls
        .iter()
        .map(|(n, checked)| format!("`{n}`{}", if *checked { "*" } else { "" }))
        .collect();
    format!(
        "| {} | {} | {} | {} |",
        role.name(),
        threads(role),
        calls.len(),
        list.join(" ")
    )
}

// ---- the lists ------------------------------------------------------------

/// Builds a rule map: a call allowed outright, or only when one of its
/// rules (conditions on arguments, all true) matches.
#[derive(Default)]
struct List(BTreeMap<i64, Vec<SeccompRule>>);

type Cond = (u8, Len, Op, u64);

impl List {
    fn allow(&mut self, calls: &[libc::c_long]) {
        for &nr in calls {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Allows `nr` when all of `conds` hold (one more alternative).
    fn allow_if(
        &mut self,
        nr: libc::c_long,
        conds: &[Cond],
    ) -> Result<(), seccompiler::BackendError> {
        let rule = SeccompRule::new(
            conds
                .iter()
                .map(|(arg, len, op, value)| {
                    SeccompCondition::new(*arg, len.clone(), op.clone(), *value)
                })
                .collect::<Result<_, _>>()?,
        )?;
        match self.0.get_mut(&nr) {
            // Already allowed outright.
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        Ok(())
    }

    /// Allows `nr` when argument `arg` is one of `values`.
    fn allow_values(
        &mut self,
        nr: libc::c_long,
        arg: u8,
        values: &[u64],
    ) -> Result<(), seccompiler::BackendError> {
        for &v in values {
            self.allow_if(nr, &[(arg, Len::Dword, Op::Eq, v)])?;
        }
        Ok(())
    }

    /// Allows opening a path when its flags under `mask` are `flags`:
    /// through openat, and through open, which musl's open() calls (the
    /// flags one argument earlier).
    fn allow_open(&mut self, mask: u64, flags: u64) -> Result<(), seccompiler::BackendError> {
        self.allow_if(
            libc::SYS_openat,
            &[(2, Len::Dword, Op::MaskedEq(mask), flags)],
        )?;
        self.allow_if(
            libc::SYS_open,
            &[(1, Len::Dword, Op::MaskedEq(mask), flags)],
        )
    }
}

fn no_exec(arg: u8) -> Cond {
    (arg, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0)
}

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_TRANSLATE,
    kvm_bindings::KVMIO,
    0x85,
    kvm_bindings::kvm_translation
);

// What a snapshot reads from a paused vCPU (on its thread) and from the VM.
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_IRQCHIP,
    kvm_bindings::KVMIO,
    0x62,
    kvm_bindings::kvm_irqchip
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_PIT2,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_pit_state2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_CLOCK,
    kvm_bindings::KVMIO,
    0x7c,
    kvm_bindings::kvm_clock_data
);

fn rules(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    use libc::*;
    // ioctl requests as the filter compares them (libc types them c_ulong
    // on glibc, c_int on musl).
    const FIONBIO: u64 = libc::FIONBIO as u64;
    const TCGETS: u64 = libc::TCGETS as u64;
    const TCSETS: u64 = libc::TCSETS as u64;
    const TCSETSW: u64 = libc::TCSETSW as u64;
    const TCSETSF: u64 = libc::TCSETSF as u64;
    const TIOCGWINSZ: u64 = libc::TIOCGWINSZ as u64;
    const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD as u64;
    const TUNSETVNETHDRSZ: u64 = libc::TUNSETVNETHDRSZ as u64;
    let mut l = List::default();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() } as u64;

    // Every thread: memory (never executable), locks, its own signals and
    // exit, time, randomness (std's hash maps), writing to the descriptors
    // it holds (stderr for errors).
    l.allow(&[
        SYS_read,
        SYS_write,
        SYS_close,
        SYS_futex,
        SYS_munmap,
        SYS_mremap,
        SYS_brk,
        SYS_madvise,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_exit,
        SYS_exit_group,
        SYS_sched_yield,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
        SYS_gettid,
        SYS_getpid,
        SYS_restart_syscall,
    ]);
    l.allow_if(SYS_mmap, &[no_exec(2)])?;
    l.allow_if(SYS_mprotect, &[no_exec(2)])?;
    // Descriptor flags, and duplicating a descriptor already held (event
    // fds are cloned so two sides can signal).
    l.allow_values(
        SYS_fcntl,
        1,
        &[
            F_GETFD as u64,
            F_SETFD as u64,
            F_GETFL as u64,
            F_SETFL as u64,
            F_DUPFD_CLOEXEC as u64,
        ],
    )?;
    // The terminal on stdin, put back from a panic hook or the SIGSYS
    // handler on whatever thread they run.
    for request in [TCGETS, TCSETS, TCSETSW, TCSETSF] {
        l.allow_if(
            SYS_ioctl,
            &[(0, Len::Dword, Op::Eq, 0), (1, Len::Dword, Op::Eq, request)],
        )?;
    }
    // Signals only to our own threads (vCPU kicks, abort). musl's
    // pthread_kill and raise use tkill, which names no process: there only
    // the kick and SIGABRT may be sent (and the jail's user owns nothing
    // else to signal).
    l.allow_if(SYS_tgkill, &[(0, Len::Dword, Op::Eq, pid)])?;
    l.allow_values(
        SYS_tkill,
        1,
        &[crate::vcpu::kick_signal() as u64, SIGABRT as u64],
    )?;

    // Unix socket traffic on sockets already open or accepted: the vsock
    // host side, the control socket, the agent.
    let unix_server = |l: &mut List| -> Result<(), seccompiler::BackendError> {
        l.allow(&[
            SYS_accept4,
            SYS_recvfrom,
            SYS_sendto,
            SYS_recvmsg,
            SYS_sendmsg,
            SYS_shutdown,
            SYS_getsockopt,
            SYS_poll,
            SYS_ppoll,
        ]);
        l.allow_values(SYS_ioctl, 1, &[FIONBIO])?;
        l.allow_if(
            SYS_setsockopt,
            &[
                (1, Len::Dword, Op::Eq, SOL_SOCKET as u64),
                (2, Len::Dword, Op::Eq, SO_RCVTIMEO as u64),
            ],
        )?;
        l.allow_if(
            SYS_setsockopt,
            &[
                (1, Len::Dword, Op::Eq, SOL_SOCKET as u64),
                (2, Len::Dword, Op::Eq, SO_SNDTIMEO as u64),
            ],
        )
    };
    // New connections: the vsock host side connects guest-initiated
    // streams to `PATH_PORT`, the sandbox client to the agent. The path is
    // in memory, out of a filter's reach (see the README's caveat).
    let unix_client = |l: &mut List| -> Result<(), seccompiler::BackendError> {
        l.allow_values(SYS_socket, 0, &[AF_UNIX as u64])?;
        l.allow(&[SYS_connect]);
        Ok(())
    };
    let epoll = |l: &mut List| {
        l.allow(&[SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl]);
    };
    // A file's metadata, by descriptor or path (musl's stat and lstat of a
    // path are the stat and lstat calls).
    let stat = |l: &mut List| {
        l.allow(&[SYS_fstat, SYS_newfstatat, SYS_stat, SYS_lstat, SYS_statx]);
    };
    // Starting threads (the sandbox client starts its stdin and window-size
    // threads): musl's pthread_create calls clone, allowed only for a
    // thread (clone3's flags are in memory, out of a filter's reach).
    let threads = |l: &mut List| -> Result<(), seccompiler::BackendError> {
        l.allow_if(
            SYS_clone,
            &[(
                0,
                Len::Qword,
                Op::MaskedEq(CLONE_THREAD as u64),
                CLONE_THREAD as u64,
            )],
        )?;
        l.allow(&[
            SYS_clone3,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_sched_getaffinity,
        ]);
        l.allow_values(SYS_prctl, 0, &[PR_SET_NAME as u64])
    };
    let terminal = |l: &mut List| -> Result<(), seccompiler::BackendError> {
        l.allow_values(
            SYS_ioctl,
            1,
            &[TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ],
        )
    };

    match role {
        Role::Vcpu => {
            // KVM_RUN, and what describes a fatal exit.
            l.allow_values(
                SYS_ioctl,
                1,
                &[KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS(), KVM_TRANSLATE()],
            )?;
            // A snapshot's reads of the paused vCPU.
            l.allow_values(
                SYS_ioctl,
                1,
                &[
                    KVM_GET_MP_STATE(),
                    KVM_GET_XSAVE(),
                    KVM_GET_XCRS(),
                    KVM_GET_DEBUGREGS(),
                    KVM_GET_LAPIC(),
                    KVM_GET_CPUID2(),
                    KVM_GET_TSC_KHZ(),
                    KVM_GET_MSRS(),
                    KVM_GET_VCPU_EVENTS(),
                ],
            )?;
            l.allow(&[SYS_writev]);
        }
        Role::Block => {
            epoll(&mut l);
            // poll: the loop's check for its stop event.
            l.allow(&[
                SYS_poll,
                SYS_pread64,
                SYS_pwrite64,
                SYS_preadv,
                SYS_pwritev,
                SYS_fsync,
                SYS_fdatasync,
                SYS_fallocate,
            ]);
        }
        Role::Vmm => {
            epoll(&mut l);
            unix_server(&mut l)?;
            unix_client(&mut l)?;
            terminal(&mut l)?;
            // Tap frames and their offload settings (set on activation).
            l.allow(&[SYS_readv, SYS_writev]);
            l.allow_values(SYS_ioctl, 1, &[TUNSETOFFLOAD, TUNSETVNETHDRSZ])?;
            // Cleaning up: our sockets and the run directory. Directories
            // may be opened (to empty them), never files.
            l.allow(&[
                SYS_unlink,
                SYS_unlinkat,
                SYS_rmdir,
                SYS_getdents64,
                SYS_lseek,
                // The console log's tail, for an error message.
                SYS_pread64,
            ]);
            stat(&mut l);
            let open_mask = (O_DIRECTORY | O_CREAT | O_WRONLY | O_RDWR | O_TRUNC) as u64;
            l.allow_open(open_mask, O_DIRECTORY as u64)?;
            // The teardown child (vm.rs: hand_off_teardown) and what it does.
            l.allow_if(
                SYS_clone,
                &[(0, Len::Qword, Op::Eq, (CLONE_VM | SIGCHLD) as u64)],
            )?;
            l.allow(&[SYS_close_range, SYS_getppid, SYS_pause]);
            l.allow_values(SYS_prctl, 0, &[PR_SET_PDEATHSIG as u64])?;
        }
        Role::Api => {
            // Accepts connections, never makes one.
            unix_server(&mut l)?;
            // PUT /snapshot/create: the VM's in-kernel devices and clock,
            // and the two files it writes (created or truncated, never
            // executed; guest RAM's resident pages found with mincore).
            l.allow_values(
                SYS_ioctl,
                1,
                &[KVM_GET_IRQCHIP(), KVM_GET_PIT2(), KVM_GET_CLOCK()],
            )?;
            l.allow(&[SYS_ftruncate, SYS_pwrite64, SYS_fsync, SYS_mincore]);
            stat(&mut l);
            l.allow_open((O_DIRECTORY | O_PATH) as u64, 0)?;
        }
        Role::Console => {}
        Role::Sandbox => {
            unix_server(&mut l)?;
            unix_client(&mut l)?;
            threads(&mut l)?;
            terminal(&mut l)?;
        }
    }
    Ok(l.0)
}

// ---- SIGSYS -----------------------------------------------------------------

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; the handler only writes and exits.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in x86_64's siginfo_t for SIGSYS: the union
/// starts at 16, after `_call_addr` (a pointer) comes the call number.
const SI_SYSCALL_OFFSET: usize = 24;

/// `si_code` of a SIGSYS that seccomp sent (SYS_SECCOMP).
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t.
    if unsafe { (*info).si_code } != SYS_SECCOMP {
        // A SIGSYS somebody sent (kill -SYS): not a filter's verdict.
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; the field is
    // an int at a fixed offset.
    let nr = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>())
    };
    let role = ROLE.with(|r| r.get());
    let mut line = Line::default();
    line.push(b"ligera: seccomp: the ");
    line.push(role.as_bytes());
    line.push(b" thread made a system call outside its filter: ");
    let name = usize::try_from(nr)
        .ok()
        .and_then(|n| names::NAMES.get(n))
        .copied()
        .unwrap_or("");
    line.push(if name.is_empty() {
        b"?"
    } else {
        name.as_bytes()
    });
    line.push(b" (");
    line.number(nr);
    line.push(b")\n");
    crate::terminal::restore_from_signal_handler();
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

/// A message built without allocating (in a signal handler).
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let negative = n < 0;
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if negative {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in Role::ALL {
            assert!(!compile(role).unwrap().is_empty(), "{role:?}");
            assert!(allowed(role).contains(&"exit_group"), "{role:?}");
        }
        assert!(allowed(Role::Vcpu).contains(&"ioctl"));
        assert!(!allowed(Role::Vcpu).contains(&"openat"));
        assert!(!allowed(Role::Block).contains(&"socket"));
    }

    #[test]
    fn the_readme_lists_every_roles_calls() {
        let readme = include_str!("../../../README.md");
        let missing: Vec<String> = Role::ALL
            .iter()
            .map(|&r| readme_row(r))
            .filter(|row| !readme.lines().any(|l| l == row))
            .collect();
        assert!(
            missing.is_empty(),
            "README.md's seccomp table must have these rows:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn names_match_libc() {
        assert_eq!(names::NAMES[libc::SYS_openat as usize], "openat");
        assert_eq!(names::NAMES[libc::SYS_ioctl as usize], "ioctl");
        assert_eq!(names::NAMES[libc::SYS_clone3 as usize], "clone3");
    }

    #[test]
    fn the_line_says_numbers() {
        let mut l = Line::default();
        l.number(0);
        l.push(b" ");
        l.number(-42);
        l.push(b" ");
        l.number(i32::MAX);
        assert_eq!(&l.buf[..l.len], b"0 -42 2147483647");
    }
}
