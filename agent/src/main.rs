//! ligera-agent: the guest side of `ligera sandbox`, booted as PID 1.
//!
//! As init it mounts the image disk (`/dev/vdb`, read-only) under a
//! throwaway writable layer (an overlay whose upper layer is the scratch
//! disk `/dev/vdc`, or a tmpfs when there is none) at `/mnt/root`, with
//! `/proc`, `/sys`, `/dev` and `/tmp` inside, and then serves commands on
//! vsock port [`protocol::PORT`]: one connection, one command, run chrooted
//! in `/mnt/root` (see `agent::protocol` for the messages). The agent stays
//! outside that root, so a command cannot replace it.
//!
//! `ligera-agent --unix PATH --root DIR` serves on a Unix socket instead,
//! running commands chrooted in DIR, without any init work (for tests on
//! the host).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, mpsc};
use std::time::Duration;

use agent::protocol::{
    self, CopyRequest, ExecRequest, ExitStatus, Frame, FrameError, Hello, INITIAL_CREDIT, Kind,
    Setup, StartErrorKind, read_frame, write_frame, write_json,
};

mod spawn;

use spawn::{Child, Plan};

const ROOT: &str = "/mnt/root";
/// How long output may still come after the command exited (from programs
/// it left running that still hold its stdout or stderr).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("--unix") if args.len() == 5 && args[3] == "--root" => {
            serve_unix(Path::new(&args[2]), PathBuf::from(&args[4]))
        }
        // The copy helpers the agent runs for CopyIn and CopyOut.
        Some(mode @ ("--untar" | "--tar")) if args.len() == 4 => {
            copy_helper(mode == "--untar", &args[2], Path::new(&args[3]))
        }
        None if std::process::id() == 1 => init().and_then(|()| {
            let cmdline = std::fs::read_to_string("/proc/cmdline")?;
            match agent::oneshot::parse_cmdline(&cmdline).map_err(io::Error::other)? {
                Some(script) => run_oneshot(&script),
                None => serve_vsock(PathBuf::from(ROOT)),
            }
        }),
        _ => Err(io::Error::other(
            "usage: ligera-agent (as PID 1) | ligera-agent --unix PATH --root DIR",
        )),
    };
    if let Err(e) = result {
        eprintln!("ligera-agent: {e}");
    }
    if std::process::id() == 1 {
        // init must not exit (the kernel would panic): reboot, which ends
        // the VM (ligera then reports the console's last lines).
        // SAFETY: reboot(2) with a valid command; never returns on success.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(1);
}

/// `--untar ROOT DEST` (stdin into DEST) or `--tar ROOT PATH` (PATH to
/// stdout), chrooted into ROOT first, so a symlink in the guest's tree
/// resolves inside it.
fn copy_helper(untar: bool, root: &str, path: &Path) -> io::Result<()> {
    let c = CString::new(root).map_err(io::Error::other)?;
    // SAFETY: chroot and chdir with valid NUL-terminated paths.
    if unsafe { libc::chroot(c.as_ptr()) } != 0 || unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let result = if untar {
        agent::copy::unpack(io::stdin().lock(), path, agent::copy::Limits::default())
    } else {
        agent::copy::pack(path, io::BufWriter::new(io::stdout().lock()))
    };
    result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::process::exit(0)
}

/// One-shot mode (see `agent::oneshot`): `script` runs in the image with
/// the serial port, in raw mode, as its terminal; its status follows its
/// output. Returns once that is written (init then reboots).
fn run_oneshot(script: &str) -> io::Result<()> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ttyS0")?;
    // SAFETY: termios calls on our descriptor with a struct we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(tty.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .stdin(tty.try_clone()?)
        .stdout(tty.try_clone()?)
        .stderr(tty.try_clone()?);
    // SAFETY: setsid, chroot and chdir are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own: what the script leaves running is
            // killed before the status goes out, so nothing writes after it.
            libc::setsid();
            if libc::chroot(c"/mnt/root".as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let code = match cmd.spawn() {
        Ok(mut child) => {
            let status = child.wait();
            // SAFETY: kill of the script's process group (its pid).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            match status {
                Ok(status) => status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                Err(_) => 127,
            }
        }
        Err(e) => {
            eprintln!("ligera-agent: cannot run the script: {e}");
            127
        }
    };
    let mut out = &tty;
    write!(out, "\n{}{code}\n", agent::oneshot::EXIT_MARKER)?;
    // SAFETY: waits until the serial port has sent what we wrote.
    unsafe { libc::tcdrain(tty.as_raw_fd()) };
    debug_exit();
    Ok(())
}

/// Ends the VM through QEMU's `isa-debug-exit` device at
/// [`agent::oneshot::DEBUG_EXIT_PORT`], if it has one: a reboot by triple
/// fault (microvm has no other way without ACPI) stops QEMU with a KVM
/// internal error on the nested kvm_pvm hosts instead of ending it. Without
/// the device the write goes nowhere, and init reboots as usual.
fn debug_exit() {
    #[cfg(target_arch = "x86_64")]
    {
        let port = agent::oneshot::DEBUG_EXIT_PORT;
        // SAFETY: ioperm grants this process the one port; the write has no
        // effect on memory.
        unsafe {
            if libc::ioperm(u64::from(port), 1, 1) == 0 {
                std::arch::asm!("out dx, al", in("dx") port, in("al") 0u8);
            }
        }
    }
}

// ---- init ---------------------------------------------------------------

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let (source, target, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if ret != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "mount {} on {}: {e}",
                fstype.to_string_lossy(),
                target.to_string_lossy()
            ),
        ));
    }
    Ok(())
}

fn init() -> io::Result<()> {
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    // The kernel may have mounted /dev already (DEVTMPFS_MOUNT).
    if !Path::new("/dev/null").exists() {
        mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    }
    mount("tmpfs", "/run", "tmpfs", 0, "mode=0755")?;
    mount("/dev/vdb", "/mnt/image", "ext4", libc::MS_RDONLY, "")?;
    if Path::new("/dev/vdc").exists() {
        mount("/dev/vdc", "/mnt/scratch", "ext4", 0, "")?;
    } else {
        mount("tmpfs", "/mnt/scratch", "tmpfs", 0, "mode=0755")?;
    }
    for dir in ["/mnt/scratch/upper", "/mnt/scratch/work"] {
        std::fs::create_dir_all(dir)?;
    }
    mount(
        "overlay",
        ROOT,
        "overlay",
        0,
        "lowerdir=/mnt/image,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work",
    )?;
    for dir in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(Path::new(ROOT).join(dir))?;
    }
    mount("proc", "/mnt/root/proc", "proc", 0, "")?;
    mount("sysfs", "/mnt/root/sys", "sysfs", 0, "")?;
    mount("devtmpfs", "/mnt/root/dev", "devtmpfs", 0, "")?;
    mount("tmpfs", "/mnt/root/tmp", "tmpfs", 0, "mode=1777")?;
    // Pseudo-terminals for `-t`: a private devpts instance.
    std::fs::create_dir_all("/mnt/root/dev/pts")?;
    mount(
        "devpts",
        "/mnt/root/dev/pts",
        "devpts",
        0,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    // The OOM killer takes a command, never the agent (commands get 0
    // back in spawn).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let name = b"sandbox";
    // SAFETY: sethostname reads `name` for its length.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    let ip = agent::net::parse_cmdline(&cmdline).map_err(io::Error::other)?;
    agent::net::configure(ip.as_ref())?;
    Ok(())
}

// ---- listening ------------------------------------------------------------

fn serve_vsock(root: PathBuf) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = protocol::PORT;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: bind with a valid address of the given size.
    let ret = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen on our socket.
    if ret != 0 || unsafe { libc::listen(fd, 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    start_reaper();
    loop {
        // SAFETY: accept on our listening socket; peer address not wanted.
        let conn = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The transport was reset (e.g. after a snapshot restore):
            // listen again.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // SAFETY: a new connected socket we own.
        let stream = unsafe { File::from_raw_fd(conn) };
        let root = root.clone();
        std::thread::spawn(move || serve_connection(stream, &root));
    }
}

fn serve_unix(path: &Path, root: PathBuf) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    start_reaper();
    for stream in listener.incoming() {
        let stream = File::from(OwnedFd::from(stream?));
        let root = root.clone();
        std::thread::spawn(move || serve_connection(stream, &root));
    }
    Ok(())
}

// ---- reaping ---------------------------------------------------------------

/// Exit statuses by pid: waiters register a channel; statuses of processes
/// nobody waits for (yet) are kept until claimed. As PID 1 the agent also
/// reaps every orphan.
#[derive(Default)]
struct Reaper {
    waiting: HashMap<libc::pid_t, mpsc::Sender<libc::c_int>>,
    exited: HashMap<libc::pid_t, libc::c_int>,
}

fn reaper() -> &'static Mutex<Reaper> {
    static REAPER: OnceLock<Mutex<Reaper>> = OnceLock::new();
    REAPER.get_or_init(Mutex::default)
}

/// Held shared while a command is being spawned, and exclusively by the
/// reaper while it reaps. When exec fails, the spawn reaps that very child
/// itself, so the reaper must not take a child while a spawn is in flight.
fn spawning() -> &'static RwLock<()> {
    static SPAWNING: OnceLock<RwLock<()>> = OnceLock::new();
    SPAWNING.get_or_init(RwLock::default)
}

/// How many commands have been started, and a signal when one is.
fn started() -> &'static (Mutex<u64>, Condvar) {
    static STARTED: OnceLock<(Mutex<u64>, Condvar)> = OnceLock::new();
    STARTED.get_or_init(Default::default)
}

/// Wakes the reaper if it is waiting for a child to exist.
fn children_started() {
    let (count, started) = started();
    *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    started.notify_all();
}

fn start_reaper() {
    std::thread::spawn(|| {
        loop {
            let seen = *started().0.lock().unwrap_or_else(|e| e.into_inner());
            // Wait until some child has ended, without reaping it.
            // SAFETY: siginfo_t is plain data that waitid fills.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid for any child, writing to `info`.
            let ret =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if ret < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                    // No children: sleep until one is started (polling would
                    // cost an idle sandbox host CPU time).
                    let (count, started) = started();
                    let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
                    while *n == seen {
                        n = started.wait(n).unwrap_or_else(|e| e.into_inner());
                    }
                }
                continue;
            }
            let _no_spawn = spawning().write().unwrap_or_else(|e| e.into_inner());
            loop {
                let mut status = 0;
                // SAFETY: waitpid for any ended child, writing its status.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    // None left (a spawn may have taken its own failed child).
                    break;
                }
                let mut r = reaper().lock().unwrap_or_else(|e| e.into_inner());
                match r.waiting.remove(&pid) {
                    Some(tx) => {
                        let _ = tx.send(status);
                    }
                    None => {
                        // An orphan, or a child whose waiter is not registered
                        // yet; bounded: orphans are forgotten beyond a limit.
                        if r.exited.len() < 4096 {
                            r.exited.insert(pid, status);
                        }
                    }
                }
            }
        }
    });
}

/// Waits for `pid` to end; returns its wait status.
fn wait_for(pid: libc::pid_t) -> libc::c_int {
    let rx = {
        let mut r = reaper().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = r.exited.remove(&pid) {
            return status;
        }
        let (tx, rx) = mpsc::channel();
        r.waiting.insert(pid, tx);
        rx
    };
    rx.recv().unwrap_or(0)
}

// ---- one connection, one command ---------------------------------------------

/// A window of bytes the other side has allowed us to send.
struct Credit {
    available: Mutex<u64>,
    changed: Condvar,
}

impl Credit {
    fn new(initial: u32) -> Self {
        Credit {
            available: Mutex::new(initial.into()),
            changed: Condvar::new(),
        }
    }

    fn grant(&self, n: u32) {
        let mut a = self.available.lock().unwrap_or_else(|e| e.into_inner());
        *a = a.saturating_add(n.into());
        self.changed.notify_all();
    }

    /// Takes up to `want` bytes of credit, waiting while there is none;
    /// None once `closed` is set.
    fn take(&self, want: usize, closed: &std::sync::atomic::AtomicBool) -> Option<usize> {
        let mut a = self.available.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if closed.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            if *a > 0 {
                let n = (*a).min(want as u64) as usize;
                *a -= n as u64;
                return Some(n);
            }
            a = self
                .changed
                .wait_timeout(a, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn send(out: &Shared<File>, kind: Kind, payload: &[u8]) -> io::Result<()> {
    write_frame(
        &mut *out.lock().unwrap_or_else(|e| e.into_inner()),
        kind,
        payload,
    )
}

fn send_json<T: serde::Serialize>(out: &Shared<File>, kind: Kind, v: &T) -> io::Result<()> {
    write_json(&mut *out.lock().unwrap_or_else(|e| e.into_inner()), kind, v)
}

fn serve_connection(stream: File, root: &Path) {
    let mut input = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let out: Shared<File> = Arc::new(Mutex::new(stream));
    if let Err(e) = handle(&mut input, &out, root) {
        let _ = send(&out, Kind::Error, e.to_string().as_bytes());
    }
    // The last message is out; closing now, with the host's frames still
    // arriving, could make the transport reset the connection before it is
    // delivered. The host closes its end once it has the last message.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let _ = input.set_read_timeout_compat(Duration::from_millis(200));
    while std::time::Instant::now() < deadline {
        match read_frame(&mut input) {
            Ok(_) => {}
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

/// Read timeouts on a socket held as a File.
trait ReadTimeout {
    fn set_read_timeout_compat(&self, timeout: Duration) -> io::Result<()>;
}

impl ReadTimeout for File {
    fn set_read_timeout_compat(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as _,
            tv_usec: timeout.subsec_micros() as _,
        };
        // SAFETY: setsockopt reads a timeval of the given size.
        let ret = unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn handle(input: &mut File, out: &Shared<File>, root: &Path) -> Result<(), FrameError> {
    let hello: Hello = read_frame(input)?.expect(Kind::Hello)?.json()?;
    if hello.version != protocol::VERSION {
        return Err(FrameError::Malformed {
            kind: Kind::Hello,
            why: format!(
                "version {} (the agent speaks {})",
                hello.version,
                protocol::VERSION
            ),
        });
    }
    send_json(
        out,
        Kind::Hello,
        &Hello {
            version: protocol::VERSION,
        },
    )?;
    let first = read_frame(input)?;
    let (req, helper) = match first.kind {
        Kind::Exec => (first.json::<ExecRequest>()?, false),
        Kind::CopyIn | Kind::CopyOut => {
            let copy: CopyRequest = first.json()?;
            if !copy.path.starts_with('/') || copy.path.contains('\0') {
                return Err(FrameError::Malformed {
                    kind: first.kind,
                    why: "the path must be absolute".into(),
                });
            }
            let exe = std::env::current_exe().map_err(FrameError::Io)?;
            let mode = if first.kind == Kind::CopyIn {
                "--untar"
            } else {
                "--tar"
            };
            let argv = vec![
                exe.display().to_string(),
                mode.into(),
                root.display().to_string(),
                copy.path,
            ];
            (
                ExecRequest {
                    argv,
                    ..Default::default()
                },
                true,
            )
        }
        Kind::Setup => {
            let setup: Setup = first.json()?;
            let status = match apply_setup(&setup) {
                Ok(()) => ExitStatus {
                    code: Some(0),
                    signal: None,
                    error: None,
                    oom_killed: false,
                },
                Err(e) => ExitStatus::not_started(StartErrorKind::Other, e.to_string()),
            };
            send_json(out, Kind::Exited, &status)?;
            return Ok(());
        }
        got => {
            return Err(FrameError::Unexpected {
                expected: Kind::Exec,
                got,
            });
        }
    };
    if let Err(why) = req.validate() {
        return Err(FrameError::Malformed {
            kind: Kind::Exec,
            why,
        });
    }
    if let Some(setup) = &req.setup
        && let Err(e) = apply_setup(setup)
    {
        let status =
            ExitStatus::not_started(StartErrorKind::Other, format!("setting the guest up: {e}"));
        send_json(out, Kind::Exited, &status)?;
        return Ok(());
    }
    let (mut child, terminal) = match spawn(&req, root, helper) {
        Ok(c) => c,
        Err(e) => {
            let kind = match e.kind() {
                io::ErrorKind::NotFound => StartErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => StartErrorKind::NotExecutable,
                _ => StartErrorKind::Other,
            };
            let status = ExitStatus::not_started(kind, format!("{}: {e}", req.argv[0]));
            send_json(out, Kind::Exited, &status)?;
            return Ok(());
        }
    };
    // The agent keeps a slave end of a terminal open until the command
    // is reaped: the command's last output is then surely in the master's
    // buffer before the master can read as hung up.
    let (master, slave) = terminal.unzip();
    let pid = child.pid;
    let credit = Arc::new(Credit::new(INITIAL_CREDIT));
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Output: one thread for both streams (the terminal's master end for
    // a tty), sending as the host's credit allows.
    let master_out = master.as_ref().and_then(|m| m.try_clone().ok());
    let streams: Vec<(File, Kind)> = [
        (child.stdout.take().or(master_out), Kind::Stdout),
        (child.stderr.take(), Kind::Stderr),
    ]
    .into_iter()
    .filter_map(|(f, kind)| Some((f?, kind)))
    .collect();
    let output = {
        let (out, credit, closed) = (out.clone(), credit.clone(), closed.clone());
        std::thread::spawn(move || forward_output(streams, &out, &credit, &closed))
    };

    let stdin = Input {
        file: child
            .stdin
            .take()
            .or_else(|| master.as_ref().and_then(|m| m.try_clone().ok())),
        tty: master.is_some(),
        out: out.clone(),
        writer: None,
    };

    // Frames from the host, until the command has exited.
    let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host_input = input.try_clone().map_err(FrameError::Io)?;
    let host_credit = credit.clone();
    let host_exited = exited.clone();
    let host_thread = std::thread::spawn(move || {
        host_frames(host_input, pid, stdin, host_credit, host_exited, master)
    });
    let status = wait_for(pid);
    exited.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(slave);
    // Output still buffered in the pipes is sent; programs the command left
    // running get a moment, then their output is no longer waited for.
    let deadline = std::time::Instant::now() + OUTPUT_GRACE;
    while !output.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    let exit = if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
            error: None,
            oom_killed: libc::WTERMSIG(status) == libc::SIGKILL && oom_killed(pid),
        }
    } else {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
            error: None,
            oom_killed: false,
        }
    };
    send_json(out, Kind::Exited, &exit)?;
    drop(host_thread);
    Ok(())
}

/// Sends the command's output streams to the host as its credit allows,
/// until both are at their end or `closed` is set.
fn forward_output(
    mut streams: Vec<(File, Kind)>,
    out: &Shared<File>,
    credit: &Credit,
    closed: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while !streams.is_empty() {
        let Some(room) = credit.take(buf.len(), closed) else {
            return;
        };
        let mut fds: Vec<libc::pollfd> = streams
            .iter()
            .map(|(f, _)| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // A timeout, so that `closed` is seen while a program the command
        // left running holds a stream open.
        // SAFETY: poll on our own descriptors, `fds.len()` entries.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        let Some(i) = fds
            .iter()
            .position(|p| p.revents != 0)
            .filter(|_| ready > 0)
        else {
            credit.grant(room as u32);
            continue;
        };
        match streams[i].0.read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                credit.grant(room as u32);
                streams.remove(i);
            }
            Ok(n) => {
                credit.grant((room - n) as u32);
                if send(out, streams[i].1, &buf[..n]).is_err() {
                    return;
                }
                // The other stream goes first next time.
                let s = streams.remove(i);
                streams.push(s);
            }
        }
    }
}

/// The command's input, written by a thread of its own (so a command that
/// does not read never blocks the frames from the host), which starts with
/// the first bytes: a command given no input costs no thread.
struct Input {
    file: Option<File>,
    tty: bool,
    out: Shared<File>,
    writer: Option<mpsc::Sender<Option<Vec<u8>>>>,
}

impl Input {
    fn write(&mut self, chunk: Vec<u8>) {
        if self.writer.is_none() {
            let Some(file) = self.file.take() else {
                // Nothing takes input: its credit goes back at once.
                let _ = send(&self.out, Kind::Credit, &(chunk.len() as u32).to_le_bytes());
                return;
            };
            let (tx, rx) = mpsc::channel();
            let (tty, out) = (self.tty, self.out.clone());
            std::thread::spawn(move || write_input(file, &rx, tty, &out));
            self.writer = Some(tx);
        }
        if let Some(tx) = &self.writer {
            let _ = tx.send(Some(chunk));
        }
    }

    /// The end of the host's input. A terminal stays open (closing the
    /// master would hang the command up).
    fn end(&mut self) {
        match &self.writer {
            Some(tx) => {
                let _ = tx.send(None);
            }
            None if !self.tty => self.file = None,
            None => {}
        }
    }
}

fn write_input(
    mut stdin: File,
    chunks: &mpsc::Receiver<Option<Vec<u8>>>,
    tty: bool,
    out: &Shared<File>,
) {
    loop {
        let chunk = match chunks.recv() {
            Ok(Some(chunk)) => chunk,
            Ok(None) if tty => continue,
            _ => break,
        };
        if stdin.write_all(&chunk).is_err() {
            // The command closed its stdin: drop the rest, but keep
            // granting credit so the host is never stuck.
            while let Ok(Some(c)) = chunks.recv() {
                let _ = send(out, Kind::Credit, &(c.len() as u32).to_le_bytes());
            }
            return;
        }
        let _ = send(out, Kind::Credit, &(chunk.len() as u32).to_le_bytes());
    }
}

/// Reads the host's frames for a running command: input, signals, credit.
fn host_frames(
    mut input: File,
    pid: libc::pid_t,
    mut stdin: Input,
    credit: Arc<Credit>,
    exited: Arc<std::sync::atomic::AtomicBool>,
    master: Option<File>,
) {
    loop {
        let frame: Frame = match read_frame(&mut input) {
            Ok(f) => f,
            Err(_) => {
                // The host is gone (or broke the protocol): nobody reads the
                // command's output any more, so it ends too.
                if !exited.load(std::sync::atomic::Ordering::SeqCst) {
                    // SAFETY: kill(2) on the command's process group, which
                    // has not been reaped yet.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                return;
            }
        };
        match frame.kind {
            Kind::Stdin => stdin.write(frame.payload),
            Kind::StdinEof => stdin.end(),
            Kind::Credit => {
                if let Ok(n) = frame.u32() {
                    credit.grant(n);
                }
            }
            Kind::Resize => {
                if let (Some(m), Ok(size)) = (&master, frame.json::<protocol::Resize>()) {
                    set_window(m, size.rows, size.cols);
                }
            }
            Kind::Signal => {
                if let Ok(sig) = frame.u32()
                    && (1..=64).contains(&sig)
                {
                    // SAFETY: kill(2) on the command's process group.
                    unsafe { libc::kill(-pid, sig as libc::c_int) };
                }
            }
            _ => {}
        }
    }
}

/// Whether the kernel's log says its OOM killer took `pid` (or one of
/// its process group, which the log cannot tell: the pid is what counts).
fn oom_killed(pid: libc::pid_t) -> bool {
    let Ok(kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    let needle = format!("Killed process {pid} ");
    let mut record = vec![0u8; 8192];
    // One record per read; the buffer is small, so this ends quickly.
    for _ in 0..10_000 {
        match (&kmsg).read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                if String::from_utf8_lossy(&record[..n]).contains(&needle) {
                    return true;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    false
}

/// Sets the clock and feeds the RNG.
fn apply_setup(setup: &Setup) -> io::Result<()> {
    if let Some(ns) = setup.realtime_ns {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as _,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if !setup.entropy.is_empty() {
        if setup.entropy.len() > 512 {
            return Err(io::Error::other("more than 512 bytes of entropy"));
        }
        // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
        let mut info = Vec::with_capacity(8 + setup.entropy.len());
        info.extend_from_slice(&((setup.entropy.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(setup.entropy.len() as i32).to_ne_bytes());
        info.extend_from_slice(&setup.entropy);
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/random")?;
        // RNDADDENTROPY = _IOW('R', 0x03, int[2])
        const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
        // SAFETY: the ioctl reads a rand_pool_info of the length it declares.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // And reseed from the pool now, not at the next scheduled reseed:
        // clones of one snapshot must part ways from the next random byte.
        // RNDRESEEDCRNG = _IO('R', 0x07)
        const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
        // SAFETY: the ioctl takes no argument.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `NAME`, `NAME:GROUP`, `UID:GROUP` or `NAME:GID` from the image's
/// `/etc/passwd` and `/etc/group` (uid, gid; the user's own group when none
/// is named).
fn lookup_user(root: &Path, spec: &str) -> io::Result<(u32, u32)> {
    let table = |file: &str| -> Vec<Vec<String>> {
        std::fs::read_to_string(root.join(file))
            .unwrap_or_default()
            .lines()
            .take(100_000)
            .map(|l| l.split(':').map(String::from).collect())
            .collect()
    };
    let not_found = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unable to find {what} in the image"),
        )
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = table("etc/passwd");
    let (uid, own_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => passwd
            .iter()
            .find(|f| f.len() >= 4 && f[0] == user)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| not_found(&format!("user {user}")))?,
    };
    let gid = match group {
        None => own_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => table("etc/group")
                .iter()
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| not_found(&format!("group {g}")))?,
        },
    };
    Ok((uid, gid))
}

fn set_window(master: &File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// A new pseudo-terminal in `root`'s devpts (the agent's own instance in
/// the guest, the host's in `--unix` mode): (master, slave).
fn open_pty(root: &Path) -> io::Result<(File, File)> {
    let private = root.join("dev/pts/ptmx");
    let ptmx = if private.exists() {
        private
    } else {
        root.join("dev/ptmx")
    };
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&ptmx)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int; TIOCGPTPEER opens the slave end.
    let slave = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok((master, unsafe { File::from_raw_fd(slave) }))
}

/// Starts the command chrooted into `root`, as its user, in its own
/// session; a `helper` (the agent's own copy helpers) chroots itself.
/// With `tty`, on a new pseudo-terminal (returned: its master end, and a
/// slave end for the agent).
fn spawn(
    req: &ExecRequest,
    root: &Path,
    helper: bool,
) -> io::Result<(Child, Option<(File, File)>)> {
    let (terminal, tty) = if req.tty {
        let (master, slave) = open_pty(root)?;
        set_window(&master, req.rows.unwrap_or(24), req.cols.unwrap_or(80));
        let ours = slave.try_clone()?;
        (Some((master, ours)), Some(slave))
    } else {
        (None, None)
    };
    let (uid, gid) = match (&req.uid, &req.user_name) {
        (None, Some(name)) => {
            let (u, g) = lookup_user(root, name)?;
            (Some(u), Some(g))
        }
        _ => (req.uid, req.gid.or(req.uid)),
    };
    let root = if helper {
        None
    } else {
        let cwd = req.cwd.as_deref().unwrap_or("/");
        let c = |s: &[u8]| CString::new(s).map_err(io::Error::other);
        Some((c(root.as_os_str().as_encoded_bytes())?, c(cwd.as_bytes())?))
    };
    let plan = Plan {
        argv: req.argv.clone(),
        env: req.env.clone(),
        root,
        uid,
        gid,
        tty,
        reset_oom_score: std::process::id() == 1,
    };
    let child = spawn::spawn(plan, || {
        spawning().read().unwrap_or_else(|e| e.into_inner())
    })?;
    children_started();
    Ok((child, terminal))
}
