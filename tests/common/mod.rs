//! Shared helpers for the end-to-end tests: build the test guests from
//! `tests/guests/`, run the real `ligera` binary with a timeout, and read the
//! guest's report.
#![allow(dead_code)]

pub mod linux;
pub mod oci;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const LIGERA: &str = env!("CARGO_BIN_EXE_ligera");

/// The test guest, built three ways.
pub struct Guests {
    /// ELF entered through the 64-bit Linux boot protocol.
    pub elf64: PathBuf,
    /// ELF with a PVH note, entered in 32-bit mode.
    pub pvh: PathBuf,
    /// The 64-bit image wrapped as a bzImage.
    pub bzimage: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gcc(out: &Path, extra: &[&str]) {
    let src = repo().join("tests/guests");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-fno-asynchronous-unwind-tables",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src.join("boot.S"))
        .args(c_sources(&src))
        .status()
        .expect("gcc is needed to build the test guests");
    assert!(status.success(), "building {} failed", out.display());
}

/// Every C file of the test guest, in a stable order.
fn c_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    files.sort();
    files
}

/// Builds the test guests once per test process.
pub fn guests() -> &'static Guests {
    static GUESTS: OnceLock<Guests> = OnceLock::new();
    GUESTS.get_or_init(|| {
        // Each test binary builds its own copy, so parallel test binaries
        // never see a half-written file.
        let dir = out_dir().join(format!("{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf64 = dir.join("guest64.elf");
        let pvh = dir.join("guest-pvh.elf");
        gcc(&elf64, &[]);
        gcc(&pvh, &["-DPVH"]);
        let flat = dir.join("guest64.bin");
        let status = Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&elf64)
            .arg(&flat)
            .status()
            .expect("objcopy is needed to build the bzImage test guest");
        assert!(status.success());
        let bzimage = dir.join("guest.bzImage");
        let image = std::fs::read(&flat).unwrap();
        let memsz = elf_load_memsz(&std::fs::read(&elf64).unwrap());
        std::fs::write(&bzimage, make_bzimage(&image, memsz, 0x1fff_ffff)).unwrap();
        Guests {
            elf64,
            pvh,
            bzimage,
        }
    })
}

/// p_memsz of the first loadable segment of an ELF64 file.
fn elf_load_memsz(elf: &[u8]) -> u64 {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    for i in 0..u16_at(56) {
        let ph = &elf[phoff + i * 56..phoff + (i + 1) * 56];
        if u32::from_le_bytes(ph[0..4].try_into().unwrap()) == 1 {
            return u64::from_le_bytes(ph[40..48].try_into().unwrap());
        }
    }
    panic!("no PT_LOAD segment");
}

/// Wraps a flat 64-bit image (linked at 1 MiB, 64-bit entry at +0x200) in a
/// bzImage: four setup sectors holding a boot protocol 2.15 header.
pub fn make_bzimage(image: &[u8], memsz: u64, initrd_addr_max: u32) -> Vec<u8> {
    let mut setup = vec![0u8; 5 * 512];
    setup[0x1f1] = 4; // setup_sects
    setup[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    setup[0x202..0x206].copy_from_slice(b"HdrS");
    setup[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    setup[0x211] = 0x01; // loadflags: LOADED_HIGH
    setup[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    setup[0x22c..0x230].copy_from_slice(&initrd_addr_max.to_le_bytes());
    setup[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    setup[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    setup[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    setup[0x258..0x260].copy_from_slice(&0x10_0000u64.to_le_bytes()); // pref_address
    setup[0x260..0x264].copy_from_slice(&(memsz as u32).to_le_bytes()); // init_size
    setup.extend_from_slice(image);
    setup
}

/// What a finished run of ligera produced.
#[derive(Debug)]
pub struct Outcome {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Lines of guest output starting with `tag ` (the report format).
    pub fn lines(&self, tag: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(tag))
            .filter_map(|l| l.strip_prefix(' '))
            .collect()
    }

    /// The only line tagged `tag`.
    pub fn line(&self, tag: &str) -> &str {
        let lines = self.lines(tag);
        assert_eq!(lines.len(), 1, "one {tag} line expected in:\n{self}");
        lines[0]
    }

    /// `key=value` from the only line tagged `tag`.
    pub fn field(&self, tag: &str, key: &str) -> String {
        field(self.line(tag), key).unwrap_or_else(|| panic!("no {key}= in {tag} line:\n{self}"))
    }

    pub fn assert_ok(&self) {
        assert_eq!(self.status, 0, "ligera failed:\n{self}");
        assert!(
            self.stdout.contains("DONE"),
            "guest did not finish:\n{self}"
        );
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::to_string)
}

pub fn hex(text: &str) -> u64 {
    u64::from_str_radix(text, 16).unwrap_or_else(|_| panic!("not hex: {text}"))
}

/// A running ligera, with its output collected in the background. Dropped
/// without [`Running::finish`] (a test failed), it kills the process, so a
/// failing test leaves no VM running.
pub struct Running {
    child: Child,
    stdout: std::sync::mpsc::Receiver<Vec<u8>>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    seen: Vec<u8>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Starts `ligera` with `args`; stdin is a pipe the test can write to.
pub fn spawn(args: &[&str]) -> Running {
    spawn_program(Path::new(LIGERA), args)
}

/// Starts `program` (ligera under another name) with `args`, as [`spawn`].
pub fn spawn_program(program: &Path, args: &[&str]) -> Running {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ligera");
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let stderr = collect(child.stderr.take().unwrap());
    Running {
        child,
        stdout: rx,
        stderr: Some(stderr),
        seen: Vec::new(),
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn write_stdin(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits until the guest's output contains `text`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !String::from_utf8_lossy(&self.seen).contains(text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no {text:?} within {timeout:?}; output so far:\n{}",
                        String::from_utf8_lossy(&self.seen)
                    );
                }
            }
        }
    }

    /// Collects the guest's output for `time`; returns all of it so far.
    pub fn collect_for(&mut self, time: Duration) -> String {
        let deadline = Instant::now() + time;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Ok(chunk) = self.stdout.recv_timeout(left) {
                self.seen.extend_from_slice(&chunk);
            }
        }
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Waits for ligera to exit; kills it and fails the test on timeout.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "ligera did not exit within {timeout:?}; output:\n{}",
                    String::from_utf8_lossy(&self.seen)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok(chunk) = self.stdout.recv_timeout(Duration::from_secs(5)) {
            self.seen.extend_from_slice(&chunk);
        }
        use std::os::unix::process::ExitStatusExt;
        Outcome {
            status: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&self.seen).into_owned(),
            stderr: String::from_utf8_lossy(
                &self
                    .stderr
                    .take()
                    .map(|t| t.join().unwrap())
                    .unwrap_or_default(),
            )
            .into_owned(),
        }
    }
}

/// Runs ligera to completion and returns its outcome and peak RSS in KiB
/// (from wait4's rusage).
// The child is reaped by wait4 below, which std's Child does not know about.
#[allow(clippy::zombie_processes)]
pub fn run_measured(args: &[&str], timeout: Duration) -> (Outcome, u64) {
    let mut child = Command::new(LIGERA)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ligera");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let pid = child.id() as i32;
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child, writing into locals we own.
        let ret = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if ret == pid {
            break;
        }
        assert!(ret == 0, "wait4: {}", std::io::Error::last_os_error());
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ligera did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = Outcome {
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        },
        stdout: String::from_utf8_lossy(&stdout.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap()).into_owned(),
    };
    (out, usage.ru_maxrss as u64)
}

/// Runs ligera to completion with no input.
pub fn run(args: &[&str], timeout: Duration) -> Outcome {
    let mut r = spawn(args);
    r.close_stdin();
    r.finish(timeout)
}

/// `ligera run --kernel <kernel> <extra...>` with the host quirks off, so
/// the guest sees exactly the command line the test gives.
pub fn run_guest(kernel: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--no-host-quirks",
    ];
    args.extend_from_slice(extra);
    run(&args, Duration::from_secs(60))
}

/// FNV-1a, as the test guest computes it over the initrd.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A file of pseudo-random bytes (deterministic per seed).
pub fn random_file(name: &str, len: usize, seed: u64) -> PathBuf {
    let path = out_dir().join(format!("{}-{name}", std::process::id()));
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Starts the test guest in its counting mode (32 MiB, `extra` flags
/// added) and returns once it has counted to 3.
pub fn counting_guest(extra: &[&str]) -> Running {
    let g = guests();
    let mut args = vec![
        "run",
        "--kernel",
        g.elf64.to_str().unwrap(),
        "--no-host-quirks",
        "--memory",
        "32M",
        "--cmdline",
        "test=count",
    ];
    args.extend_from_slice(extra);
    let mut vm = spawn(&args);
    vm.wait_for("COUNT 3\n", Duration::from_secs(30));
    vm
}

/// A listener for the guest's connections to a host port (the Unix socket
/// `PATH_PORT`): writable by everyone, as a jailed VM runs as its own uid.
pub fn guest_port_listener(path: &Path) -> std::os::unix::net::UnixListener {
    use std::os::unix::fs::PermissionsExt;
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    listener
}

/// Accepts one connection within `timeout` (a guest that cannot connect
/// fails the test instead of hanging it).
pub fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    timeout: Duration,
) -> std::os::unix::net::UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The process that runs the VM of the ligera started as `pid`: its one
/// child when ligera jailed the VM (`pid` is then the supervisor), else `pid`.
pub fn vm_process(pid: i32) -> i32 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let children: Vec<i32> = children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    match children[..] {
        [child]
            if std::fs::read_to_string(format!("/proc/{child}/comm"))
                .is_ok_and(|c| c.trim() == "ligera") =>
        {
            child
        }
        _ => pid,
    }
}

/// The names of the threads of the running ligera `pid`, sorted, after
/// checking that every one runs under a seccomp filter (`Seccomp: 2`, at
/// least one filter). KVM's kernel worker (`kvm-nx-lpage-recovery`, on
/// hosts with the NX huge page mitigation) runs kernel code only: skipped.
pub fn filtered_threads(pid: i32) -> Vec<String> {
    let pid = vm_process(pid);
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let name = field("Name:");
        if name.starts_with("kvm-") {
            continue;
        }
        assert_eq!(field("Seccomp:"), "2", "thread {name}: {status}");
        let filters: u32 = field("Seccomp_filters:").parse().unwrap();
        assert!(filters >= 1, "thread {name}: {status}");
        names.push(name);
    }
    names.sort();
    names
}

/// Connects to the guest's `port` through the hybrid-vsock socket, retrying
/// while nobody listens yet (the guest answers with a RST: the socket
/// closes without an `OK`); returns the stream after its `OK <port>` line.
pub fn connect_to_guest(
    socket: &Path,
    port: u32,
    deadline: Instant,
) -> std::os::unix::net::UnixStream {
    loop {
        assert!(
            Instant::now() < deadline,
            "guest port {port} never accepted"
        );
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            match s.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => break,
            }
        }
        if line.starts_with(b"OK ") && line.ends_with(b"\n") {
            return s;
        }
        assert!(line.is_empty(), "unexpected answer {line:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
