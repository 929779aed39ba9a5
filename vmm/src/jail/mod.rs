//! The jail: what a ligera process that a guest has taken over is left with.
//!
//! [`enter`] runs before the VM is built. The process that called it
//! becomes a small supervisor: it makes the VM's cgroup, then forks the VM
//! process into new PID, mount, IPC, UTS and network namespaces, forwards
//! signals to it, waits for it, and removes what it leaves (the jail
//! directory, the cgroup, the sockets it made) however it ends. The VM process
//! closes every inherited descriptor, joins the cgroup, opens its taps, and,
//! while a second thread opens `/dev/kvm` and makes the VM's memory and the
//! VM in KVM (see [`start`]), `pivot_root`s into a tmpfs that holds only
//! what the rest of the VM uses, bind-mounted at the paths the configuration
//! names: kernel, initrd and disk images, the serial file and the
//! directories of its sockets. It builds the VM there, still as root; [`Jailed::lock_down`] then
//! drops to an unprivileged uid/gid with no capabilities and no_new_privs,
//! before any thread starts or any guest byte is read. The seccomp filters
//! go on after that, per thread.

pub mod cgroup;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use arch::layout::{GIB, MIB};

use crate::config::{SerialConfig, VmConfig, parse_size};
use cgroup::{Cgroup, Layout};

/// Where jail directories go unless `--jail=DIR` says otherwise.
pub const DEFAULT_BASE: &str = "/run/ligera/jail";
/// The jailed VM runs as uid and gid DEFAULT_ID + its supervisor's pid
/// unless `--uid`/`--gid` say otherwise: ids no distribution hands out
/// (above the 16-bit range and the usual subordinate-id ranges of container
/// tools), one per VM.
pub const DEFAULT_ID: u32 = 1_000_000_000;
/// What ligera itself may use beyond guest RAM before the memory ceiling:
/// its own heap and stacks, KVM's page tables (about 2 MiB per GiB of guest
/// RAM mapped with 4 KiB pages), the page cache of its disks.
pub fn default_overhead(guest_ram: u64) -> u64 {
    128 * MIB + guest_ram / 64
}
/// Open files: the vsock device's 256 connections, disks, event fds and
/// sockets fit with room to spare.
const MAX_OPEN_FILES: u64 = 2048;
/// The serial log may grow this far (writes beyond it fail), unless a
/// writable disk is larger.
const MIN_FILE_SIZE_LIMIT: u64 = GIB;

pub const JAIL_HELP: &str = "Confine the VM process (the default for root and for sandboxes): new \
     PID, mount, IPC, UTS and network namespaces, a root holding only the VM's files, an \
     unprivileged uid/gid, no capabilities, a cgroup. DIR holds the jails' mount points \
     (default /run/ligera/jail)";

/// How the VM process is confined (`ligera run` and the sandbox commands).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct JailOptions {
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true,
          default_missing_value = DEFAULT_BASE, conflicts_with = "no_jail", help = JAIL_HELP)]
    pub jail: Option<PathBuf>,

    /// Run the VM unconfined (UNSAFE: a guest that escapes KVM gets ligera's
    /// user, here root, with every file it can reach).
    #[arg(long)]
    pub no_jail: bool,

    /// The uid the jailed VM runs as (default 1000000000 + the supervising
    /// ligera's pid: one per VM, owning nothing).
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,

    /// The gid the jailed VM runs as (default as the uid).
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,

    /// CPU time the whole VM may use per 100 ms, in microseconds (as docker
    /// run --cpu-quota): 50000 is half a CPU, 200000 two CPUs.
    #[arg(long, value_name = "MICROSECONDS")]
    pub cpu_quota: Option<u64>,

    /// Memory ceiling for the whole ligera process, guest RAM included
    /// (default: guest RAM + 128M + 1/64 of guest RAM). A VM that reaches it
    /// is killed and reported as such.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl JailOptions {
    /// These options as flags again (for the sandbox's serve process).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.no_jail {
            a.push("--no-jail".into());
        }
        if let Some(dir) = &self.jail {
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            a.push(format!("--jail={}", dir.display()));
        }
        let numbers = [
            ("--uid", self.uid.map(u64::from)),
            ("--gid", self.gid.map(u64::from)),
            ("--cpu-quota", self.cpu_quota),
        ];
        for (flag, value) in numbers {
            if let Some(v) = value {
                a.extend([flag.to_string(), v.to_string()]);
            }
        }
        if let Some(m) = self.memory_limit {
            a.extend(["--memory-limit".into(), format!("{}K", m.div_ceil(1024))]);
        }
        a
    }

    /// Whether and how to jail a VM configured as `config`: `None` for
    /// `--no-jail`, and by default when not root (the jail needs root).
    pub fn spec(&self, config: &VmConfig) -> Result<Option<Spec>, String> {
        let limits = [
            ("--uid", self.uid.is_some()),
            ("--gid", self.gid.is_some()),
            ("--cpu-quota", self.cpu_quota.is_some()),
            ("--memory-limit", self.memory_limit.is_some()),
        ];
        let given = limits.iter().find(|(_, set)| *set).map(|(flag, _)| *flag);
        if self.no_jail {
            if let Some(flag) = given {
                return Err(format!(
                    "{flag} applies to the jail, which --no-jail turns off"
                ));
            }
            return Ok(None);
        }
        if !is_root() {
            if self.jail.is_some() {
                return Err("--jail needs root (it makes namespaces, mounts and cgroups)".into());
            }
            if let Some(flag) = given {
                return Err(format!("{flag} needs the jail, which needs root"));
            }
            return Ok(None);
        }
        // One id per VM (its supervisor's pid added), so that jailed VMs
        // cannot reach each other's sockets.
        let own = DEFAULT_ID + std::process::id();
        let uid = self.uid.unwrap_or(own);
        let gid = self.gid.unwrap_or(own);
        if uid == 0 || gid == 0 {
            return Err("--uid/--gid 0 would leave the jailed VM root".into());
        }
        if let Some(q) = self.cpu_quota
            && q < 1000
        {
            return Err(format!(
                "--cpu-quota {q}: at least 1000 microseconds per 100 ms"
            ));
        }
        let memory_limit = self
            .memory_limit
            .unwrap_or(config.mem_size + default_overhead(config.mem_size));
        if memory_limit < 16 * MIB {
            return Err("--memory-limit: at least 16M".into());
        }
        let base = self.jail.clone().unwrap_or_else(|| DEFAULT_BASE.into());
        let base = if base.is_absolute() {
            base
        } else {
            std::env::current_dir()
                .map_err(|e| format!("--jail: {e}"))?
                .join(base)
        };
        Ok(Some(Spec {
            base,
            uid,
            gid,
            cpu_quota: self.cpu_quota,
            memory_limit,
            limits_required: self.cpu_quota.is_some() || self.memory_limit.is_some(),
            failure_code: crate::exit::EXIT_VMM_ERROR,
            guest_memory: config.mem_size,
        }))
    }
}

/// A jail to enter.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Holds the jails' mount points, one per VM.
    pub base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub cpu_quota: Option<u64>,
    pub memory_limit: u64,
    /// `--cpu-quota` or `--memory-limit` was given: no cgroup is an error,
    /// not a warning.
    pub limits_required: bool,
    /// The status the VM process exits with when it cannot be jailed (the
    /// command's "could not run" status: 1 for run, 125 for sandboxes).
    pub failure_code: i32,
    /// Guest RAM: a snapshot's memory file is that large.
    pub guest_memory: u64,
}

/// Something the VM uses, bind-mounted into the jail at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    path: PathBuf,
    dir: bool,
    writable: bool,
}

/// Turns every path in `config` into its canonical form (the jail holds
/// the real files, not the symlinks leading to them) and lists what the
/// jail must hold. A path that cannot be placed in the jail is an error here,
/// before anything starts.
fn place(config: &mut VmConfig) -> Result<(Vec<Mount>, Vec<PathBuf>), String> {
    // Named as the user gave them, before they become canonical.
    crate::builder::check_disks_distinct(config).map_err(|e| e.to_string())?;
    let canonical = |flag: &str, p: &Path| {
        std::fs::canonicalize(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
    };
    // What the builder would refuse is refused here, in its words.
    let regular = |flag: &str, p: &Path, block_too: bool| {
        let p = canonical(flag, p)?;
        let kind = std::fs::metadata(&p)
            .map_err(|e| format!("{flag} {}: {e}", p.display()))?
            .file_type();
        if kind.is_file() || (block_too && kind.is_block_device()) {
            Ok(p)
        } else if block_too {
            Err(format!(
                "{flag} {}: not a regular file or a block device",
                p.display()
            ))
        } else {
            Err(format!("{flag} {}: not a regular file", p.display()))
        }
    };
    let file = |path: PathBuf, writable: bool| Mount {
        path,
        dir: false,
        writable,
    };
    // Taps are opened before the jail (see `confine`): no /dev/net/tun.
    // Nor /dev/kvm, nor a snapshot's memory file: `start`'s `lay` opens
    // them before the jail's root is made.
    let mut mounts = Vec::new();
    if let Some(restore) = &mut config.restore {
        // A restored VM reads its snapshot, not its kernel.
        // Both are read by `start`'s `lay`, before the jail's root is made.
        restore.state = regular("--state", &restore.state, false)?;
        restore.memory = regular("--memory", &restore.memory, false)?;
        restore.memory_id = std::fs::metadata(&restore.memory)
            .ok()
            .map(|m| (m.dev(), m.ino()));
    } else {
        config.kernel = regular("--kernel", &config.kernel, false)?;
        mounts.push(file(config.kernel.clone(), false));
        if let Some(initrd) = &mut config.initrd {
            *initrd = regular("--initrd", initrd, false)?;
            mounts.push(file(initrd.clone(), false));
        }
    }
    for disk in &mut config.disks {
        disk.path = regular("--disk", &disk.path, true)?;
        mounts.push(file(disk.path.clone(), !disk.readonly));
    }
    if let SerialConfig::File(path) = &mut config.serial {
        // Made now (as the serial device would) so that it can be bound.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*path)
            .map_err(|e| format!("--serial file={}: {e}", path.display()))?;
        *path = canonical("--serial file=", path)?;
        mounts.push(file(path.clone(), true));
    }
    let mut sockets = Vec::new();
    let socket_paths = [
        (
            "--vsock socket=",
            config.vsock.as_mut().map(|v| &mut v.socket),
        ),
        ("--api-sock", config.api_socket.as_mut()),
    ];
    for (flag, path) in socket_paths {
        let Some(path) = path else { continue };
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(format!("{flag}{}: not a file path", path.display()));
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let dir =
            std::fs::canonicalize(dir).map_err(|e| format!("{flag}{}: {e}", path.display()))?;
        if dir == Path::new("/") {
            return Err(format!(
                "{flag}{}: the jail would have to hold all of /; put the socket in a directory of its own",
                path.display()
            ));
        }
        // The directory is visible in the jail: not one that others fill.
        let mode = std::fs::metadata(&dir)
            .map_err(|e| format!("{flag}{}: {e}", path.display()))?
            .mode();
        if mode & 0o1022 != 0 {
            return Err(format!(
                "{flag}{}: {} is writable by others (like /tmp), and the jail would hold all of it; \
                 put the socket in a directory of its own",
                path.display(),
                dir.display()
            ));
        }
        *path = dir.join(name);
        if path.as_os_str().len() > crate::config::MAX_SOCKET_PATH {
            return Err(format!(
                "{flag}{}: longer than a socket address holds ({} bytes)",
                path.display(),
                crate::config::MAX_SOCKET_PATH
            ));
        }
        sockets.push(path.clone());
        mounts.push(Mount {
            path: dir,
            dir: true,
            writable: true,
        });
    }
    // Directories first, parents before children: a file or directory
    // already visible through a bound directory is not bound again.
    mounts.sort_by_key(|m| (!m.dir, m.path.as_os_str().len()));
    mounts.dedup_by(|a, b| a.path == b.path);
    Ok((mounts, sockets))
}

/// Why a VM could not be jailed.
#[derive(Debug)]
pub enum JailError {
    /// The options do not fit together (a usage error).
    Options(String),
    /// The jail could not be made.
    Failed(String),
}

impl std::fmt::Display for JailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JailError::Options(m) | JailError::Failed(m) => f.write_str(m),
        }
    }
}

/// What the command that starts a VM does next: exit with the status of
/// the jailed VM process it supervised, or build the VM, in a jail or not.
pub enum Start<F> {
    Supervisor(i32),
    /// The VM process, jailed or not, with what `lay` made.
    Vm(Option<Jailed>, F),
}

/// Jails the VM as `options` say (see [`JailOptions::spec`] and [`enter`]);
/// `failure_code` is the caller's status for "could not start the VM".
/// `lay` makes what the VM needs that depends on neither its file system
/// nor its network (KVM and guest memory: see
/// [`crate::builder::lay_foundation`]), in the VM process: in a jail, on a
/// thread, while the main thread makes the jail's namespaces. The jail's
/// root has neither `/dev/kvm` nor a snapshot's memory file: `lay` is
/// where they are opened.
pub fn start<F: Send>(
    options: &JailOptions,
    config: &mut VmConfig,
    failure_code: i32,
    lay: impl FnOnce(&VmConfig) -> F + Send,
) -> Result<Start<F>, JailError> {
    match options.spec(config).map_err(JailError::Options)? {
        None => Ok(Start::Vm(None, lay(config))),
        Some(mut spec) => {
            spec.failure_code = failure_code;
            let entered = enter(&spec, config, lay).map_err(JailError::Failed)?;
            Ok(match entered {
                Entered::Supervisor { code, vm_fd } => {
                    if let Some(fd) = vm_fd {
                        // Destroyed by a child once this process has exited.
                        crate::vm::hand_off_teardown(fd);
                    }
                    Start::Supervisor(code)
                }
                Entered::Jailed(j, laid) => Start::Vm(Some(j), laid),
            })
        }
    }
}

/// The VM process's end of the socket to its supervisor (-1: not jailed).
static HANDOFF: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// In a jailed VM process at exit: gives the VM descriptor to the
/// supervisor, whose teardown child destroys the VM after the supervisor
/// has exited, so that nobody waits for the kernel's teardown.
pub fn hand_vm_to_supervisor(vm_fd: i32) {
    let socket = HANDOFF.load(std::sync::atomic::Ordering::SeqCst);
    if socket >= 0 {
        send_fd(socket, vm_fd);
    }
}

/// Room for one descriptor in a control message.
const FD_SPACE: usize = 64;

/// A one-byte message whose control buffer is `control`, over `iov`
/// (both the caller's, outliving the message).
fn fd_message(iov: &mut libc::iovec, control: &mut [u8; FD_SPACE]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

fn send_fd(socket: i32, fd: i32) {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u8; FD_SPACE];
    let mut msg = fd_message(&mut iov, &mut control);
    // SAFETY: the control buffer is ours and large enough for one
    // SCM_RIGHTS descriptor (CMSG_SPACE(4) is 24 on x86_64).
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        libc::sendmsg(socket, &msg, libc::MSG_DONTWAIT);
    }
}

/// A descriptor waiting on `socket`, if any (never blocks).
fn receive_fd(socket: i32) -> Option<i32> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u8; FD_SPACE];
    let mut msg = fd_message(&mut iov, &mut control);
    // SAFETY: as in send_fd; the kernel fills at most msg_controllen bytes.
    unsafe {
        if libc::recvmsg(
            socket,
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        ) < 1
        {
            return None;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return None;
        }
        Some(std::ptr::read_unaligned(
            libc::CMSG_DATA(cmsg).cast::<i32>(),
        ))
    }
}

/// Taps the VM process opened before entering its network namespace.
static PREOPENED_TAPS: std::sync::Mutex<Vec<devices::virtio::net::Tap>> =
    std::sync::Mutex::new(Vec::new());

/// The tap named `name` if the jail opened it (the builder's source of taps
/// in a jailed VM process).
pub fn take_tap(name: &str) -> Option<devices::virtio::net::Tap> {
    let mut taps = PREOPENED_TAPS.lock().unwrap_or_else(|e| e.into_inner());
    let i = taps.iter().position(|t| t.name() == name)?;
    Some(taps.remove(i))
}

/// Which side of the fork [`enter`] returns on.
pub enum Entered<F> {
    /// The VM process, in its jail, with what `lay` made: build the VM,
    /// then [`Jailed::lock_down`].
    Jailed(Jailed, F),
    /// The supervisor, after the VM process ended: exit with `code`. The VM
    /// process handed over its VM descriptor (`vm_fd`), if it could, so that
    /// the kernel's teardown of the VM happens after the supervisor exits.
    Supervisor { code: i32, vm_fd: Option<i32> },
}

/// The VM process's side of the jail.
pub struct Jailed {
    uid: u32,
    gid: u32,
    sockets: Vec<PathBuf>,
    /// Read end of a pipe whose write end only the supervisor holds.
    parent_alive: i32,
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", p.display()))
}

fn os_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Whether process `pid` exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes jail directories and cgroups left by supervisors that are gone
/// (killed with SIGKILL); returns whether nothing stale is left (a VM
/// process outlives its killed supervisor for a moment).
pub fn remove_stale(base: &Path) -> bool {
    let mut clean = true;
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let pid = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            if let Some(pid) = pid
                && !alive(pid)
            {
                log::info!("removing the stale jail {}", e.path().display());
                // Only the empty mount point is ever left on the host.
                clean &= std::fs::remove_dir(e.path()).is_ok();
            }
        }
    }
    if let Ok(layout) = Layout::detect() {
        clean &= cgroup::remove_stale(&layout, alive);
    }
    clean
}

/// Puts the VM into a jail; see the module's description. `config`'s
/// paths become canonical. Must be called before any thread starts. The VM
/// process runs `lay` on a thread of its own while it makes its namespaces
/// (see [`start`]).
pub fn enter<F: Send>(
    spec: &Spec,
    config: &mut VmConfig,
    lay: impl FnOnce(&VmConfig) -> F + Send,
) -> Result<Entered<F>, String> {
    if thread_count() != Some(1) {
        return Err("internal error: the jail must be entered before any thread starts".into());
    }
    let (mounts, sockets) = place(config)?;
    // Read while /sys is still there.
    crate::host::is_emulating_nested_host();
    let me = std::process::id();
    let root = spec.base.join(me.to_string());
    // One named by our own pid is a previous life's (ligera as PID 1 of a
    // container that was killed and started again).
    let _ = std::fs::remove_dir(&root);
    make_jail_dir(&spec.base, &root)?;
    let cgroup = match Layout::detect().and_then(|layout| {
        Cgroup::create(layout, &me.to_string(), spec.memory_limit, spec.cpu_quota)
    }) {
        Ok(c) => Ok(Some(c)),
        // `ip netns exec` mounts a /sys of its own, without the cgroup
        // hierarchies, and a container may not let us make one: the jail
        // goes on without limits, unless some were asked for.
        Err(e) if !spec.limits_required => {
            eprintln!("ligera: warning: {e}: the VM runs without a memory ceiling or CPU quota");
            Ok(None)
        }
        Err(e) => Err(format!("{e} (needed for --cpu-quota and --memory-limit)")),
    };
    let cgroup = match cgroup {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir(&root);
            return Err(e);
        }
    };
    let cgroup = cgroup.as_ref();
    let before: Vec<Option<Identity>> = sockets.iter().map(|s| identity(s)).collect();
    // The vsock socket becomes the jailed user's: the sandbox's own client
    // thread connects to it after the uid change.
    let connectable: Vec<PathBuf> = config.vsock.iter().map(|v| v.socket.clone()).collect();
    let taps: Vec<String> = config.nets.iter().map(|n| n.tap.clone()).collect();
    let result = fork_jailed(spec, &mounts, &root, cgroup, &connectable, &taps, || {
        lay(config)
    });
    if let Ok(Entered::Supervisor { .. }) | Err(_) = &result {
        // The VM process is gone: take away the sockets it made, which
        // nobody listens on any more (one that another process made in the
        // meantime, and listens on, stays).
        for (socket, before) in sockets.iter().zip(before) {
            if let Some(now) = identity(socket)
                && Some(now) != before
                && devices::virtio::vsock::host::connect_nonblocking(socket)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            {
                let _ = std::fs::remove_file(socket);
            }
        }
        if let Some(c) = cgroup {
            c.remove();
        }
        let _ = std::fs::remove_dir(&root);
        // The base goes too once no other jail is in it.
        let _ = std::fs::remove_dir(&spec.base);
    }
    result
}

/// Creates the jail's mount point `root` in `base`, making `base` as
/// needed: another ligera may remove an empty base in between, so that is
/// retried.
fn make_jail_dir(base: &Path, root: &Path) -> Result<(), String> {
    for _ in 0..10 {
        std::fs::create_dir_all(base)
            .map_err(|e| format!("--jail: cannot create {}: {e}", base.display()))?;
        match std::fs::create_dir(root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            made => return made.map_err(|e| format!("cannot create {}: {e}", root.display())),
        }
    }
    Err(format!(
        "cannot create {}: its directory keeps going away",
        root.display()
    ))
}

/// A file's device, inode and change time: a socket made again in its
/// place may get the same inode number, never the same change time too.
type Identity = (u64, u64, i64, i64);

/// The socket at `path`, if there is one.
fn identity(path: &Path) -> Option<Identity> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

fn fork_jailed<F: Send>(
    spec: &Spec,
    mounts: &[Mount],
    root: &Path,
    cgroup: Option<&Cgroup>,
    sockets: &[PathBuf],
    taps: &[String],
    lay: impl FnOnce() -> F + Send,
) -> Result<Entered<F>, String> {
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("cannot create a pipe"));
    }
    // The VM process hands its VM descriptor over this at exit.
    let mut handoff = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            handoff.as_mut_ptr(),
        )
    } != 0
    {
        return Err(os_err("cannot create a socket pair"));
    }
    // Our own PID namespace, to go back to for later children (the VM's
    // teardown child) once the VM's namespace is gone.
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let own_pid_ns = unsafe {
        libc::open(
            c"/proc/self/ns/pid".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: unshare(CLONE_NEWPID) affects only the children made next.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(os_err("cannot create a PID namespace"));
    }
    // Blocked before the fork: the supervisor takes them with sigwaitinfo,
    // and in the VM process they stay pending until its signal fd reads
    // them (as PID 1 of its namespace it would otherwise ignore them).
    let signals = supervised_signals();
    // SAFETY: blocking signals in this single-threaded process; SIGCHLD
    // ignored (inherited through exec) would reap the child unseen.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut());
    }
    let terminal = Terminal::save();
    // SAFETY: this process has one thread (checked by `enter`), so the child
    // is a complete copy that may go on running Rust code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os_err("cannot start the VM process"));
    }
    if child == 0 {
        // SAFETY: our copies of the supervisor's ends; SIGCHLD back to normal.
        unsafe {
            libc::close(pipe[1]);
            libc::close(handoff[0]);
            let mut chld: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut chld);
            libc::sigaddset(&mut chld, libc::SIGCHLD);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut());
        }
        return match confine(spec, mounts, root, cgroup, taps, [pipe[0], handoff[1]], lay) {
            Ok((parent_alive, laid)) => Ok(Entered::Jailed(
                Jailed {
                    uid: spec.uid,
                    gid: spec.gid,
                    sockets: sockets.to_vec(),
                    parent_alive,
                },
                laid,
            )),
            Err(e) => {
                eprintln!("ligera: error: {e}");
                std::process::exit(spec.failure_code);
            }
        };
    }
    // While the VM process makes its namespaces, the supervisor removes
    // what the jails of dead supervisors left (ours is alive).
    remove_stale(&spec.base);
    // SAFETY: our copy of the read end (the write end stays open until we
    // exit); every signal blocked, so none ends the supervisor before it
    // has cleaned up: `supervise` takes them all.
    let all = unsafe {
        libc::close(pipe[0]);
        libc::close(handoff[1]);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        all
    };
    let status = supervise(child, &all);
    let vm_fd = receive_fd(handoff[0]);
    // SAFETY: our end of the pair; setns back into our own PID namespace
    // for children (without it, a fork here would fail: the VM's namespace
    // has no init any more).
    unsafe {
        libc::close(handoff[0]);
        if own_pid_ns >= 0 {
            libc::setns(own_pid_ns, libc::CLONE_NEWPID);
            libc::close(own_pid_ns);
        }
    }
    if let Status::Signaled(_) | Status::Quit = status {
        // It had no chance to put the terminal back.
        terminal.restore();
    }
    let code = match status {
        Status::Quit => 128 + libc::SIGQUIT,
        Status::Exited(code) => code,
        Status::Signaled(sig) => {
            if sig == libc::SIGKILL && cgroup.is_some_and(|c| c.oom_kills() > 0) {
                eprintln!(
                    "ligera: the VM reached its memory ceiling ({}: guest RAM and ligera's own \
                     memory; see --memory-limit) and the kernel killed it",
                    crate::config::format_size(spec.memory_limit)
                );
            } else {
                eprintln!("ligera: the VM process was killed by signal {sig}");
            }
            128 + sig
        }
    };
    Ok(Entered::Supervisor { code, vm_fd })
}

enum Status {
    Exited(i32),
    Signaled(i32),
    /// SIGQUIT reached the supervisor, which killed the VM process.
    Quit,
}

/// The signals that end a VM, passed on to the VM process.
const FORWARDED: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn supervised_signals() -> libc::sigset_t {
    // SAFETY: a sigset_t we own, filled by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED.iter().chain(&[libc::SIGCHLD, libc::SIGQUIT]) {
            libc::sigaddset(&mut set, *sig);
        }
        set
    }
}

/// The terminal's settings on stdin, if it is one.
struct Terminal(Option<libc::termios>);

impl Terminal {
    fn save() -> Terminal {
        // SAFETY: tcgetattr fills the struct we own; it fails on a non-terminal.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            Terminal((libc::tcgetattr(0, &mut t) == 0).then_some(t))
        }
    }

    fn restore(&self) {
        if let Some(t) = &self.0 {
            // SAFETY: tcsetattr reads the struct saved above.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Waits for the VM process (every signal blocked in this process by the
/// caller). SIGINT, SIGTERM and SIGHUP are passed on; SIGQUIT, which the VM
/// process does not handle, kills it; any other signal whose default would
/// end a process ends the VM as SIGTERM does; job control, window size and
/// urgent-data signals are ignored.
fn supervise(child: libc::pid_t, set: &libc::sigset_t) -> Status {
    let mut quit = false;
    // SAFETY: waitpid, sigwaitinfo and kill on our own child, with values we own.
    unsafe {
        loop {
            let mut status = 0;
            let done = libc::waitpid(child, &mut status, libc::WNOHANG);
            if done == child {
                if quit {
                    return Status::Quit;
                }
                if libc::WIFEXITED(status) {
                    return Status::Exited(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    return Status::Signaled(libc::WTERMSIG(status));
                }
                continue;
            }
            if done < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Status::Exited(crate::exit::EXIT_VMM_ERROR);
            }
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(set, &mut info);
            const IGNORED: [i32; 7] = [
                libc::SIGCHLD,
                libc::SIGCONT,
                libc::SIGTSTP,
                libc::SIGTTIN,
                libc::SIGTTOU,
                libc::SIGWINCH,
                libc::SIGURG,
            ];
            if FORWARDED.contains(&sig) {
                libc::kill(child, sig);
            } else if sig == libc::SIGQUIT {
                quit = true;
                libc::kill(child, libc::SIGKILL);
            } else if sig > 0 && !IGNORED.contains(&sig) {
                libc::kill(child, libc::SIGTERM);
            }
        }
    }
}

/// A failed step of `confine`: opening a tap (the user's to fix, said as
/// the builder says it) or making the jail.
enum Step {
    Tap(String),
    Jail(String),
}

impl From<String> for Step {
    fn from(e: String) -> Step {
        Step::Jail(e)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Tap(e) => f.write_str(e),
            Step::Jail(e) => write!(f, "cannot jail the VM: {e}"),
        }
    }
}

/// The VM process's first steps: returns the descriptor that tells
/// whether the supervisor is still there, and what `lay` made.
fn confine<F: Send>(
    spec: &Spec,
    mounts: &[Mount],
    root: &Path,
    cgroup: Option<&Cgroup>,
    taps: &[String],
    keep: [i32; 2],
    lay: impl FnOnce() -> F + Send,
) -> Result<(i32, F), Step> {
    // SAFETY: plain system calls on values we own; this process has one thread.
    unsafe {
        // Keep only stdio, the supervisor pipe (as descriptor 3) and the
        // hand-off socket (as 4): moved out of the way first, then into place.
        for (i, fd) in keep.into_iter().enumerate() {
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64 + i as i32);
            if high < 0 || libc::dup2(high, 3 + i as i32) < 0 {
                return Err(os_err("dup2").into());
            }
        }
        let close_from = 5u32;
        if libc::syscall(libc::SYS_close_range, close_from, u32::MAX, 0) != 0 {
            return Err(os_err("cannot close inherited descriptors").into());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(os_err("prctl(PR_SET_PDEATHSIG)").into());
        }
    }
    let parent_alive = 3;
    HANDOFF.store(4, std::sync::atomic::Ordering::SeqCst);
    if let Some(c) = cgroup {
        c.join()?;
    }
    // Taps are opened in the network namespace they are plugged into; their
    // descriptors go on working from the VM's own, empty one.
    for name in taps {
        let tap =
            devices::virtio::net::Tap::open(name).map_err(|e| Step::Tap(format!("--net: {e}")))?;
        PREOPENED_TAPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tap);
    }
    // `lay` needs neither the namespaces nor the root: on a second thread
    // (made after the cgroup join, which is cheap only for one thread),
    // it overlaps them. Namespaces belong to threads, so that thread stays
    // in the host's; it ends before anything else runs.
    // The new network namespace, the costliest to make (0.4-0.7 ms on the
    // development machines), is made on a third thread and entered once the
    // root is made.
    std::thread::scope(|scope| {
        let spawn_err = |e: std::io::Error| Step::Jail(format!("cannot start a thread: {e}"));
        // `lay` first: it is the longest.
        let helper = std::thread::Builder::new()
            .name("ligera-lay".into())
            .spawn_scoped(scope, lay)
            .map_err(spawn_err)?;
        let net = std::thread::Builder::new()
            .name("ligera-netns".into())
            .spawn_scoped(scope, new_network_namespace)
            .map_err(spawn_err)?;
        let made = enclose(spec, mounts, root);
        let net = net
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let made = made.and_then(|()| {
            let net = net?;
            // SAFETY: setns with a namespace descriptor we own.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&net), libc::CLONE_NEWNET) }
                != 0
            {
                return Err(os_err("cannot enter the network namespace").into());
            }
            Ok(())
        });
        let laid = helper
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        made.map(|()| (parent_alive, laid))
    })
}

/// On a thread of its own: a new, empty network namespace, as a descriptor.
fn new_network_namespace() -> Result<std::os::fd::OwnedFd, Step> {
    // SAFETY: unshare of the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(os_err("cannot create a network namespace").into());
    }
    std::fs::File::open("/proc/thread-self/ns/net")
        .map(std::os::fd::OwnedFd::from)
        .map_err(|e| Step::Jail(format!("cannot open the new network namespace: {e}")))
}

/// Puts the calling thread in the jail's namespaces (but the network's) and
/// root, with its limits.
fn enclose(spec: &Spec, mounts: &[Mount], root: &Path) -> Result<(), Step> {
    // Each is the calling thread's alone (CLONE_NEWNS unshares its file
    // system view, CLONE_FS, from any other thread).
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare of namespaces a thread may leave alone.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(os_err("cannot create namespaces").into());
    }
    let hostname = b"ligera";
    // SAFETY: the name is a valid buffer of that length.
    unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    make_root(mounts, root)?;
    set_limits(spec, mounts)?;
    Ok(())
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: NUL-terminated strings that live across the call, or null.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if ret != 0 {
        return Err(os_err(format!("cannot mount {}", target.display())));
    }
    Ok(())
}

/// Binds `m` (opened as `source`) at its path under `root`, with its flags.
fn bind(m: &Mount, source: &Path, root: &Path) -> Result<(), String> {
    let target = root.join(m.path.strip_prefix("/").unwrap_or(&m.path));
    // A file already visible through a directory bound before it is
    // bound again on top, with its own flags; nothing is created there.
    if target.symlink_metadata().is_err() {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let made = if m.dir {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        };
        made.map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    }
    mount(Some(source), &target, None, libc::MS_BIND, None)
        .map_err(|e| format!("{e} (binding {} into the jail)", m.path.display()))?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NOEXEC;
    if !m.writable {
        flags |= libc::MS_RDONLY;
    }
    let device = std::fs::metadata(source)
        .is_ok_and(|d| d.file_type().is_char_device() || d.file_type().is_block_device());
    if !device {
        flags |= libc::MS_NODEV;
    }
    mount(None, &target, None, flags, None)
}

/// Builds the jail's root on a tmpfs at `root` and makes it `/`.
fn make_root(mounts: &[Mount], root: &Path) -> Result<(), String> {
    // Nothing we mount may reach the host's mount namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=64k,nr_inodes=1024,mode=0755"),
    )?;
    for m in mounts {
        // The object bound is the one opened here, checked to be at the
        // canonical path still (not swapped for a symlink since `place`)
        // and of the kind expected.
        let path_c = cstr(&m.path)?;
        // SAFETY: a NUL-terminated path; the descriptor is closed below.
        let fd = unsafe { libc::open(path_c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(os_err(format!("cannot open {}", m.path.display())));
        }
        let source = PathBuf::from(format!("/proc/self/fd/{fd}"));
        let checked = std::fs::read_link(&source).ok() == Some(m.path.clone())
            && std::fs::metadata(&source).is_ok_and(|meta| meta.is_dir() == m.dir);
        let bound = if checked {
            bind(m, &source, root)
        } else {
            Err(format!(
                "{} changed while the jail was made",
                m.path.display()
            ))
        };
        // SAFETY: our descriptor from open above.
        unsafe { libc::close(fd) };
        bound?;
    }
    let root_c = cstr(root)?;
    let dot = c".";
    // SAFETY: path strings that live across the calls. pivot_root(".", ".")
    // stacks the old root on top of the new one; detaching it leaves only
    // the jail.
    unsafe {
        if libc::chdir(root_c.as_ptr()) != 0 {
            return Err(os_err(format!("cannot enter {}", root.display())));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(os_err("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(os_err("cannot detach the host's root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(os_err("chdir /"));
        }
    }
    // The jail's own directories and mount points are read-only.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
}

/// No core dumps, a bounded number of open files, and files no larger
/// than the largest writable disk or a snapshot's memory file (guest RAM),
/// and at least 1 GiB, which bounds the serial log.
fn set_limits(spec: &Spec, mounts: &[Mount]) -> Result<(), String> {
    let largest = mounts
        .iter()
        .filter(|m| m.writable && !m.dir)
        .filter_map(|m| std::fs::metadata(&m.path).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    let limits = [
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (
            libc::RLIMIT_FSIZE,
            largest.max(spec.guest_memory).max(MIN_FILE_SIZE_LIMIT),
        ),
    ];
    for (resource, value) in limits {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(os_err(format!("setrlimit({resource})")));
        }
    }
    Ok(())
}

impl Jailed {
    /// Drops to the jail's uid and gid with no capabilities and
    /// no_new_privs. Call after the VM is built and its sockets exist, and
    /// before any thread starts: a uid change applies to the calling thread,
    /// so there must be only one.
    pub fn lock_down(self) -> Result<(), String> {
        for socket in &self.sockets {
            if let Ok(c) = cstr(socket) {
                // SAFETY: a NUL-terminated path, of the socket this process
                // bound a moment ago; it becomes the jailed user's, who may
                // then still connect to it.
                unsafe { libc::lchown(c.as_ptr(), self.uid, self.gid) };
            }
        }
        // SAFETY: plain system calls on values we own, in a process with
        // one thread.
        unsafe {
            // Capabilities can never come back, not even through exec.
            let mut cap = 0;
            while libc::prctl(libc::PR_CAPBSET_DROP, cap) == 0 {
                cap += 1;
            }
            if cap == 0 {
                return Err(os_err("cannot drop capabilities"));
            }
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(os_err("setgroups"));
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err(os_err(format!("cannot change to gid {}", self.gid)));
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err(os_err(format!("cannot change to uid {}", self.uid)));
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
            {
                return Err(os_err("cannot clear ambient capabilities"));
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(os_err("cannot set no_new_privs"));
            }
            // A uid change clears the parent-death signal: set it again, then
            // make sure the supervisor did not go in between.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let mut poll = libc::pollfd {
                fd: self.parent_alive,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut poll, 1, 0) != 0 {
                return Err("the supervising ligera is gone".into());
            }
        }
        check_no_capabilities()
    }
}

fn check_no_capabilities() -> Result<(), String> {
    let mut header = libc_cap::Header {
        version: libc_cap::VERSION_3,
        pid: 0,
    };
    let mut data = [libc_cap::Data::default(); 2];
    // SAFETY: capget fills two data structs for version 3.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(os_err("capget"));
    }
    if data
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0)
    {
        return Err("capabilities are left after dropping them".into());
    }
    Ok(())
}

/// capget's structures (linux/capability.h), which libc does not define.
mod libc_cap {
    pub const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    pub struct Header {
        pub version: u32,
        pub pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct Data {
        pub effective: u32,
        pub permitted: u32,
        pub inheritable: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_canonical_and_sockets_bring_their_directory() {
        let dir = std::env::temp_dir().join(format!("ligera-jail-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("k"), b"").unwrap();
        std::fs::write(dir.join("disk"), b"").unwrap();
        std::os::unix::fs::symlink(dir.join("disk"), dir.join("link")).unwrap();
        let mut config = VmConfig::new(dir.join("sub/../k"));
        config.disks.push(crate::config::DiskConfig {
            path: dir.join("link"),
            readonly: true,
            id: None,
        });
        config.api_socket = Some(dir.join("sub/api.sock"));
        let (mounts, sockets) = place(&mut config).unwrap();
        assert_eq!(config.kernel, dir.join("k"));
        assert_eq!(config.disks[0].path, dir.join("disk"));
        assert_eq!(sockets, vec![dir.join("sub/api.sock")]);
        assert!(mounts[0].dir && mounts[0].path == dir.join("sub"));
        assert!(
            mounts
                .iter()
                .any(|m| m.path == dir.join("disk") && !m.writable)
        );
        assert!(!mounts.iter().any(|m| m.path == Path::new("/dev/kvm")));
        // A missing file or a socket in / cannot be placed.
        config.disks[0].path = dir.join("missing");
        assert!(place(&mut config).unwrap_err().contains("--disk"));
        config.disks.clear();
        config.api_socket = Some("/api.sock".into());
        assert!(
            place(&mut config)
                .unwrap_err()
                .contains("directory of its own")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limits_need_the_jail() {
        let config = VmConfig::new("k".into());
        let off = JailOptions {
            no_jail: true,
            cpu_quota: Some(50_000),
            ..Default::default()
        };
        assert!(off.spec(&config).unwrap_err().contains("--no-jail"));
        let root_uid = JailOptions {
            uid: Some(0),
            ..Default::default()
        };
        if is_root() {
            assert!(root_uid.spec(&config).is_err());
            let spec = JailOptions::default().spec(&config).unwrap().unwrap();
            assert_eq!(
                spec.memory_limit,
                config.mem_size + 128 * MIB + config.mem_size / 64
            );
            let own = DEFAULT_ID + std::process::id();
            assert_eq!((spec.uid, spec.gid), (own, own));
        }
    }
}
