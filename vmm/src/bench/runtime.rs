//! The three ways `ligera bench` runs a workload, all on the same root file
//! system: a ligera microVM (`ligera sandbox run`), a runc container, and a
//! bare host process chrooted into the image. Each run is one child
//! process, timed from spawn to its first byte of output and to its exit.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::BenchError;

/// Output kept per stream; workloads print a few lines.
const OUTPUT_LIMIT: usize = 1 << 20;

/// The last bytes of a stream kept apart (for a one-shot status line).
const TAIL: usize = 64;

/// The line a holding workload prints once it is up; it then waits for its
/// stdin to close, so that its memory can be measured while it runs.
pub const READY: &str = "ligera-bench-ready";

/// How one run went.
#[derive(Debug)]
pub struct Run {
    /// When it was spawned.
    pub start: Instant,
    /// Spawn to the first byte on stdout.
    pub first_output: Option<Duration>,
    /// Spawn to the [`READY`] line (holding runs).
    pub ready: Option<Duration>,
    /// Host memory of the instance while it held, in bytes.
    pub memory: Option<u64>,
    /// The net suite's throughput (Gbit/s) and round trip (µs), measured
    /// while it held.
    pub net: Option<Result<(f64, f64), String>>,
    /// Spawn to the port case's server answering (see `net::Knock`).
    pub port: Option<Duration>,
    /// Spawn to exit.
    pub exit: Duration,
    /// Ended by the bench after this long.
    pub timed_out: Option<Duration>,
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The process groups of the runs in flight, for the signal handler.
pub static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Set (under [`SPAWN`]) once a signal stops the bench: no run starts after.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

/// Held while a run is started and its group recorded, so that the signal
/// handler either sees the run's group or stops it from starting.
pub static SPAWN: Mutex<()> = Mutex::new(());

/// Waits for the signal handler to end the process.
fn park() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A bare host process, chrooted into the image.
    Process,
    /// A runc container (namespaces, cgroup limits equal to the VM's).
    Runc,
    /// A ligera microVM through the sandbox agent.
    Vm,
    /// QEMU's microvm machine booting the same kernel and disks as the
    /// ligera microVM, its agent in one-shot mode (see `agent::oneshot`):
    /// a cold boot each run.
    Qemu,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Process => "process",
            Kind::Runc => "runc",
            Kind::Vm => "vm",
            Kind::Qemu => "qemu",
        }
    }
}

/// What every runtime shares: the image, its root file system on the host,
/// the limits, and the bench's scratch directory.
pub struct Setup {
    /// The `--image` reference the VM gets (None: the default image).
    pub image: Option<String>,
    /// The same image as a directory on the host.
    pub rootfs: PathBuf,
    /// The process's root: `rootfs` bound elsewhere with `disk` on its
    /// `/mnt` (or `rootfs` itself when there is no disk).
    pub process_root: PathBuf,
    /// A scratch directory on the host file system the VM's disk is on,
    /// the container's and the process's `/mnt` (None: the image has no
    /// `/mnt` to mount it on).
    pub disk: Option<PathBuf>,
    /// The net suite's namespaces and links (None: no net suite, or they
    /// could not be made).
    pub net: Option<super::net::Net>,
    pub cpus: u8,
    pub memory: u64,
    pub kernel: Option<PathBuf>,
    pub scratch: PathBuf,
}

/// A runtime ready to run workloads.
pub struct Runtime {
    pub kind: Kind,
    runs: u64,
    /// The VM's persistent sandbox, for suites that measure a running VM.
    sandbox: Option<String>,
    /// Why that sandbox could not be made (not tried again).
    sandbox_failed: Option<String>,
    /// What QEMU boots.
    guest: Option<crate::sandbox::GuestParts>,
}

impl Runtime {
    /// The runtime `kind`, or why it cannot run here.
    pub fn new(kind: Kind, setup: &Setup) -> Result<Runtime, String> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match kind {
            Kind::Process => {
                if !root {
                    return Err("chroot into the image needs root".into());
                }
            }
            Kind::Runc => {
                if !root {
                    return Err("runc needs root here (namespaces and cgroups)".into());
                }
                if find_program("runc").is_none() {
                    return Err("runc is not installed (apt-get install runc)".into());
                }
                std::fs::create_dir_all(setup.scratch.join("runc-state"))
                    .map_err(|e| format!("cannot make runc's state directory: {e}"))?;
            }
            Kind::Vm | Kind::Qemu => {
                if !Path::new("/dev/kvm").exists() {
                    return Err("no /dev/kvm on this host".into());
                }
            }
        }
        let guest = if kind == Kind::Qemu {
            if find_program(QEMU).is_none() {
                return Err(format!(
                    "{QEMU} is not installed (apt-get install qemu-system-x86)"
                ));
            }
            let parts =
                crate::sandbox::guest_parts(setup.image.as_deref(), setup.kernel.as_deref())
                    .map_err(|e| format!("cannot prepare its guest: {e}"))?;
            Some(parts)
        } else {
            None
        };
        Ok(Runtime {
            kind,
            runs: 0,
            sandbox: None,
            sandbox_failed: None,
            guest,
        })
    }

    /// Before a suite that measures a running system (not its start): the
    /// VM gets one persistent sandbox, made for the first such suite and
    /// kept for the others until [`Runtime::end`]; the container and the
    /// process start anew each run, which costs them milliseconds. Returns
    /// why the runtime cannot run the suite.
    pub fn begin(&mut self, setup: &Setup) -> Result<(), String> {
        if self.kind != Kind::Vm || self.sandbox.is_some() {
            return Ok(());
        }
        if let Some(why) = &self.sandbox_failed {
            return Err(why.clone());
        }
        self.runs += 1;
        let name = format!("{}{}", container_prefix(std::process::id()), self.runs);
        let mut cmd = ligera().map_err(|e| e.to_string())?;
        cmd.args(["sandbox", "create", "--name", &name]);
        vm_options(&mut cmd, setup);
        if let Some(net) = &setup.net {
            // The sandbox (and its tap) lives in the host-side namespace.
            cmd.arg("--net").arg(net.vm_flag());
            let ns = net.host_side().map_err(|e| e.to_string())?;
            super::net::enter(&mut cmd, ns);
        }
        eprintln!("ligera: bench: starting a VM for the suites that measure a running VM ({name})");
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ligera sandbox create: {e}"))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let why = format!("the VM did not start: {}", text.trim());
            self.sandbox_failed = Some(why.clone());
            return Err(why);
        }
        self.sandbox = Some(name);
        Ok(())
    }

    /// After the last suite: the VM's sandbox goes.
    pub fn end(&mut self) {
        if let Some(name) = self.sandbox.take() {
            remove_sandbox(&name);
        }
    }

    /// Starts `job`; [`finish`] waits for it.
    pub fn start(&mut self, setup: &Setup, job: &Job) -> Result<Started, BenchError> {
        let (script, hold) = (job.script, job.hold);
        self.runs += 1;
        let argv = ["/bin/sh", "-c", script];
        match self.kind {
            Kind::Process => {
                let root = setup.process_root.clone();
                let mut cmd = Command::new(argv[0]);
                cmd.args(&argv[1..])
                    .env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
                    .env("HOME", "/root");
                let netns = match (&setup.net, job.net) {
                    (Some(net), true) => Some(net.host_side()?),
                    _ => None,
                };
                let id = format!("{}{}", container_prefix(std::process::id()), self.runs);
                let cgroup = process_cgroup(&id).map(|(dir, procs)| {
                    // SAFETY: write(2) is async-signal-safe; "0" moves the
                    // writer, the child, into the cgroup.
                    unsafe {
                        cmd.pre_exec(move || {
                            if libc::write(procs.as_raw_fd(), c"0".as_ptr().cast(), 1) != 1 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    dir
                });
                super::net::confine(&mut cmd, &root, netns)?;
                let mut started = spawn(cmd, libc::SIGKILL, hold, Probe::Tree(None), None);
                match &mut started {
                    Ok(s) => s.cgroup = cgroup,
                    Err(_) => {
                        if let Some(dir) = cgroup {
                            remove_cgroup(&dir);
                        }
                    }
                }
                started
            }
            Kind::Runc => {
                let id = format!("{}{}", container_prefix(std::process::id()), self.runs);
                let bundle = setup.scratch.join(&id);
                let netns = match (&setup.net, job.net) {
                    (Some(net), true) => Some(net.container_side()),
                    _ => None,
                };
                write_bundle(&bundle, setup, &argv, netns.as_deref())?;
                let state = setup.scratch.join("runc-state");
                let mut cmd = Command::new("runc");
                cmd.arg("--root")
                    .arg(&state)
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(&id);
                let container = Container { state, id, bundle };
                let probe = Probe::Cgroup(container.id.clone());
                spawn(cmd, libc::SIGKILL, hold, probe, Some(container))
            }
            Kind::Vm => {
                let mut cmd = ligera()?;
                let probe = match self.sandbox.as_ref().filter(|_| job.in_sandbox) {
                    Some(name) => {
                        cmd.args(["sandbox", "exec", name.as_str()]);
                        match sandbox_pid(name) {
                            Some(pid) => Probe::Tree(Some(pid)),
                            None => Probe::Unknown,
                        }
                    }
                    None => {
                        cmd.args(["sandbox", "run"]);
                        vm_options(&mut cmd, setup);
                        if let (Some(net), true) = (&setup.net, job.net) {
                            // A new VM on the port case's own tap, which the
                            // bench's sandbox (on the other) never holds.
                            cmd.arg("--net").arg(net.vm_port_flag());
                            super::net::enter(&mut cmd, net.host_side()?);
                        }
                        Probe::Tree(None)
                    }
                };
                cmd.arg("--").args(argv);
                // SIGTERM, not SIGKILL: the sandbox cleans up after itself.
                spawn(cmd, libc::SIGTERM, hold, probe, None)
            }
            Kind::Qemu => {
                let Some(guest) = &self.guest else {
                    return Err(BenchError::Setup("QEMU's guest is not prepared".into()));
                };
                let net = match (&setup.net, job.net) {
                    (Some(net), true) => Some((net.qemu_tap(), net.host_side()?)),
                    _ => None,
                };
                let (tap, netns) = net.unzip();
                let scratch = setup.scratch.join(format!("qemu-{}.ext4", self.runs));
                let mut cmd = qemu_command(guest, setup, &scratch, tap, script)?;
                crate::image::scratch_disk(&scratch, QEMU_SCRATCH)
                    .map_err(|e| BenchError::Setup(format!("QEMU's scratch disk: {e}")))?;
                if let Some(ns) = netns {
                    super::net::enter(&mut cmd, ns);
                }
                let mut started = spawn(cmd, libc::SIGKILL, hold, Probe::Tree(None), None);
                match &mut started {
                    Ok(s) => {
                        s.oneshot = true;
                        s.scratch = Some(scratch);
                    }
                    Err(_) => {
                        let _ = std::fs::remove_file(&scratch);
                    }
                }
                started
            }
        }
    }
}

/// QEMU's program, looked for in PATH.
const QEMU: &str = "qemu-system-x86_64";

/// The size of QEMU's scratch disk (sparse, as the sandbox's).
const QEMU_SCRATCH: u64 = 1 << 30;

/// QEMU's microvm machine booting `guest` with `scratch` as its writable
/// disk, on `tap` if given (the tap's name and the guest's address), to run
/// `script` once: its output and status come on the serial port (QEMU's
/// stdout), its input from QEMU's stdin.
fn qemu_command(
    guest: &crate::sandbox::GuestParts,
    setup: &Setup,
    scratch: &Path,
    tap: Option<(String, String)>,
    script: &str,
) -> Result<Command, BenchError> {
    // Debian's QEMU on the nested kvm_pvm hosts: the machine without legacy
    // devices, and a CPU without what such a host cannot do (QEMU aborts on
    // MSR 0x10a, and PV features based on hypercalls never complete).
    let mut cmdline = format!("{} reboot=t loglevel=1", guest.cmdline);
    if crate::host::is_emulating_nested_host() {
        cmdline.push(' ');
        cmdline.push_str(crate::host::EMULATING_HOST_CMDLINE);
    }
    let mut cmd = Command::new(QEMU);
    // Without ACPI QEMU lists the virtio-mmio devices on the kernel's
    // command line, which this kernel reads (it has no ACPI); the agent ends
    // the VM through isa-debug-exit.
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,acpi=off",
    ])
    .arg("-device")
    .arg(format!(
        "isa-debug-exit,iobase={:#x},iosize=1",
        agent::oneshot::DEBUG_EXIT_PORT
    ))
    .args([
        "-enable-kvm",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .args(["-serial", "stdio", "-no-reboot"])
    .args([
        "-cpu",
        "host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-sched-yield=off,\
             kvm-pv-tlb-flush=off,kvm-pv-unhalt=off",
    ])
    .arg("-m")
    .arg(format!("{}M", setup.memory >> 20))
    .arg("-smp")
    .arg(setup.cpus.to_string())
    .arg("-kernel")
    .arg(&guest.kernel);
    // In /dev/vda, vdb, vdc order, as the agent expects them.
    for (id, path, readonly) in [
        ("agent", guest.agent_disk.as_path(), true),
        ("image", guest.image_disk.as_path(), true),
        ("scratch", scratch, false),
    ] {
        let mut drive = std::ffi::OsString::from(format!("if=none,id={id},format=raw,file="));
        // QEMU's option syntax doubles a comma inside a value.
        drive.push(path.as_os_str().to_string_lossy().replace(',', ",,"));
        if readonly {
            drive.push(",readonly=on");
        }
        cmd.arg("-drive")
            .arg(drive)
            .arg("-device")
            .arg(format!("virtio-blk-device,drive={id}"));
    }
    if let Some((tap, ip)) = tap {
        cmd.arg("-netdev")
            .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
            .args(["-device", "virtio-net-device,netdev=net0"]);
        cmdline.push_str(" ligera.ip=");
        cmdline.push_str(&ip);
    }
    cmdline.push_str(" ligera.run=");
    cmdline.push_str(&agent::oneshot::encode(script));
    // x86's 2048 bytes, less what QEMU adds (a virtio_mmio.device= entry
    // of ~40 bytes per device).
    if cmdline.len() > 2048 - 256 {
        return Err(BenchError::Setup(format!(
            "the script is too long for QEMU's kernel command line ({} bytes)",
            script.len()
        )));
    }
    cmd.arg("-append").arg(cmdline);
    Ok(cmd)
}

/// What one run runs: a script for the image's `/bin/sh`, in the VM's
/// persistent sandbox if `in_sandbox` and there is one. A `hold` run prints
/// [`READY`] and waits for its stdin to close: it is measured in between.
/// A `net` run is reachable from the bench's host-side network namespace.
pub struct Job<'a> {
    pub script: &'a str,
    pub in_sandbox: bool,
    pub hold: bool,
    pub net: bool,
}

/// A container's runc state directory, id and bundle.
struct Container {
    state: PathBuf,
    id: String,
    bundle: PathBuf,
}

/// How an instance's host memory is measured.
enum Probe {
    /// The PSS of this process (None: the run's own) and its descendants:
    /// a VM's touched guest RAM is in its VMM's PSS.
    Tree(Option<i32>),
    /// Nothing to measure (the sandbox's process is not known).
    Unknown,
    /// The memory the container's cgroup is charged, plus the PSS of the
    /// run's processes outside it (`runc run`, which stays the container's
    /// parent).
    Cgroup(String),
}

/// What a run's stdout thread gathers: the output kept, the first output,
/// the ready line, and the stream's last bytes.
type Stdout = (Vec<u8>, Option<Duration>, Option<Duration>, Vec<u8>);

/// An instance started and not yet waited for.
pub struct Started {
    child: Child,
    start: Instant,
    stdin: Option<ChildStdin>,
    /// Wakes (a message or a hang-up) once the run is ready or its
    /// stdout ended.
    ready: mpsc::Receiver<()>,
    stdout: JoinHandle<Stdout>,
    stderr: JoinHandle<Vec<u8>>,
    probe: Probe,
    container: Option<Container>,
    /// A bare process's own cgroup, removed after the run.
    cgroup: Option<PathBuf>,
    /// Its output ends with a one-shot agent's status (QEMU).
    oneshot: bool,
    /// A scratch disk of its own, removed after the run.
    scratch: Option<PathBuf>,
}

/// This ligera, to run as a command.
fn ligera() -> Result<Command, BenchError> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Setup(format!("cannot find ligera itself: {e}")))?;
    Ok(Command::new(exe))
}

/// The VM's image, size and kernel as `sandbox run`/`create` flags.
fn vm_options(cmd: &mut Command, setup: &Setup) {
    cmd.arg("--cpus")
        .arg(setup.cpus.to_string())
        .arg("--memory")
        .arg(format!("{}M", setup.memory >> 20));
    if let Some(image) = &setup.image {
        cmd.arg("--image").arg(image);
    }
    if let Some(kernel) = &setup.kernel {
        cmd.arg("--kernel").arg(kernel);
    }
}

/// The pid of the process that runs sandbox `name`.
fn sandbox_pid(name: &str) -> Option<i32> {
    let dir = crate::sandbox::runtime_dir().join(format!("sb-{name}"));
    std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Ends the sandbox `name` and removes what it left.
fn remove_sandbox(name: &str) {
    if let Ok(mut cmd) = ligera() {
        let _ = cmd
            .args(["sandbox", "rm", "-f", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Ends every sandbox whose name starts with `prefix` (one bench's VMs).
pub fn remove_sandboxes(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(crate::sandbox::runtime_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = dir.strip_prefix("sb-")
            && name.starts_with(prefix)
        {
            remove_sandbox(name);
        }
    }
}

/// Starts `cmd` in its own process group, ending with us (`death_signal`),
/// with its output read by threads.
fn spawn(
    mut cmd: Command,
    death_signal: libc::c_int,
    hold: bool,
    probe: Probe,
    container: Option<Container>,
) -> Result<Started, BenchError> {
    cmd.stdin(if hold { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong);
            Ok(())
        });
    }
    let spawning = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
    if STOPPING.load(Ordering::SeqCst) {
        drop(spawning);
        park();
    }
    let start = Instant::now();
    let spawned = cmd.spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            drop(spawning);
            if let Some(c) = &container {
                let _ = std::fs::remove_dir_all(&c.bundle);
            }
            return Err(BenchError::Setup(format!(
                "cannot start {:?}: {e}",
                cmd.get_program()
            )));
        }
    };
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child.id() as i32);
    drop(spawning);
    let mut stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr)
            .take(OUTPUT_LIMIT as u64)
            .read_to_end(&mut buf);
        // Drain the rest so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        buf
    });
    let mut stdout = child.stdout.take().expect("piped");
    let (ready_tx, ready) = mpsc::channel();
    let stdout = std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        let mut out = Vec::new();
        let mut first_output = None;
        let mut ready = None;
        let mut buf = [0u8; 8192];
        let marker = format!("{READY}\n");
        // The last bytes read, so that a marker split across reads (or
        // after the output kept) is still seen.
        let mut window: Vec<u8> = Vec::new();
        // The stream's end, wherever the output kept stops: a one-shot
        // status line is its last line.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    first_output.get_or_insert_with(|| start.elapsed());
                    if out.len() < OUTPUT_LIMIT {
                        out.extend_from_slice(&buf[..n.min(OUTPUT_LIMIT - out.len())]);
                    }
                    tail.extend_from_slice(&buf[..n]);
                    tail.drain(..tail.len().saturating_sub(TAIL));
                    window.extend_from_slice(&buf[..n]);
                    let seen = window.windows(marker.len()).any(|w| w == marker.as_bytes());
                    let keep = window.len().saturating_sub(marker.len() - 1);
                    window.drain(..keep);
                    if ready.is_none() && seen {
                        ready = Some(start.elapsed());
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        (out, first_output, ready, tail)
    });
    Ok(Started {
        stdin: child.stdin.take(),
        child,
        start,
        ready,
        stdout,
        stderr,
        probe,
        container,
        cgroup: None,
        oneshot: false,
        scratch: None,
    })
}

/// Waits for `started` to end. Holding runs are first waited for until each
/// is ready (or has ended); then the memory of each is measured and their
/// stdin closed, which lets them end.
pub fn finish(
    mut started: Vec<Started>,
    hold: bool,
    during: Option<&dyn Fn() -> Result<(f64, f64), String>>,
    limit: Duration,
) -> Result<Vec<Run>, BenchError> {
    // A workload that neither ends nor says it is up (a hostile image or
    // guest can do that) is ended at `limit`: the bench never hangs.
    let groups: Vec<i32> = started.iter().map(|s| s.child.id() as i32).collect();
    let (done, watch) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
            return false;
        }
        stop_groups(&groups);
        true
    });
    let mut memory = vec![None; started.len()];
    let mut net = None;
    if hold {
        let mut all_ready = true;
        for s in &started {
            all_ready &= s.ready.recv().is_ok();
        }
        if let Some(measure) = during.filter(|_| all_ready) {
            net = Some(measure());
        }
        for (m, s) in memory.iter_mut().zip(&started) {
            *m = match &s.probe {
                Probe::Tree(pid) => tree_pss(pid.unwrap_or(s.child.id() as i32), &[]),
                Probe::Unknown => None,
                Probe::Cgroup(id) => cgroup_memory(id).map(|(charged, inside)| {
                    charged + tree_pss(s.child.id() as i32, &inside).unwrap_or(0)
                }),
            };
        }
    }
    for s in &mut started {
        // A line ends the wait of a holding script (`read x`): QEMU passes
        // it on to the guest, where the end of its stdin never arrives.
        if let Some(mut stdin) = s.stdin.take() {
            let _ = std::io::Write::write_all(&mut stdin, b"\n");
        }
    }
    let mut runs = Vec::with_capacity(started.len());
    let mut failure = None;
    for (s, memory) in started.into_iter().zip(memory) {
        let Started {
            mut child,
            start,
            stdout,
            stderr,
            container,
            cgroup,
            oneshot,
            scratch,
            ..
        } = s;
        let (mut out, first_output, ready, tail) = stdout.join().unwrap_or_default();
        let status = child.wait();
        let exit = start.elapsed();
        if STOPPING.load(Ordering::SeqCst) {
            // Stopped by a signal, not a result: the handler is cleaning up.
            park();
        }
        GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&g| g != child.id() as i32);
        let stderr = stderr.join().unwrap_or_default();
        let status = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            }
            Err(e) => {
                failure.get_or_insert(BenchError::Setup(format!("cannot wait for a run: {e}")));
                continue;
            }
        };
        if let Some(dir) = cgroup {
            remove_cgroup(&dir);
        }
        if let Some(file) = scratch {
            let _ = std::fs::remove_file(file);
        }
        // QEMU's status is its own; the script's follows its output.
        // The status is read from the stream's last bytes (output beyond
        // what is kept cannot hide it, nor an early fake one stand for it).
        let status = if oneshot {
            let len = agent::oneshot::split_output(&out).0.len();
            out.truncate(len);
            agent::oneshot::split_output(&tail)
                .1
                .unwrap_or(if status == 0 { 255 } else { status })
        } else {
            status
        };
        if let Some(c) = container {
            // `runc run` removes the container when it ends; after a
            // failure make sure.
            if status != 0 {
                runc_delete(&c.state, &c.id);
            }
            let _ = std::fs::remove_dir_all(&c.bundle);
        }
        runs.push(Run {
            timed_out: None,
            net: net.take(),
            port: None,
            start,
            first_output,
            ready,
            memory,
            exit,
            status,
            stdout: out,
            stderr,
        });
    }
    drop(done);
    if watchdog.join().unwrap_or(false) {
        for r in &mut runs {
            r.timed_out = Some(limit);
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(runs),
    }
}

/// SIGTERM to the process groups `groups`, SIGKILL to what is left of them
/// after 10 s.
pub fn stop_groups(groups: &[i32]) {
    let alive = |g: i32| {
        // SAFETY: signal 0 only checks that the group exists.
        unsafe { libc::kill(-g, 0) == 0 }
    };
    for &g in groups {
        // SAFETY: kill(2) on a run's own process group.
        unsafe { libc::kill(-g, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while groups.iter().any(|&g| alive(g)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &g in groups {
        // SAFETY: as above.
        unsafe { libc::kill(-g, libc::SIGKILL) };
    }
}

/// The summed PSS of process `root` and its descendants but `except`, in
/// bytes.
fn tree_pss(root: i32, except: &[i32]) -> Option<u64> {
    let mut parents = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    let mut total = 0;
    for pid in tree.into_iter().filter(|p| !except.contains(p)) {
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        total += rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
    }
    (total > 0).then_some(total)
}

/// What the memory cgroup of container `id` is charged, in bytes, and the
/// processes in it.
fn cgroup_memory(id: &str) -> Option<(u64, Vec<i32>)> {
    let v2 = Path::new("/sys/fs/cgroup").join(id);
    let v1 = Path::new("/sys/fs/cgroup/memory").join(id);
    let (dir, file) = if v2.join("memory.current").exists() {
        (v2, "memory.current")
    } else {
        (v1, "memory.usage_in_bytes")
    };
    let charged = std::fs::read_to_string(dir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    Some((charged, procs))
}

/// The OCI bundle for one container: `config.json` from oci-spec's
/// defaults (those of `runc spec`), the image as a read-only root, the
/// VM's limits as cgroup limits, and a new, empty network namespace.
fn write_bundle(
    bundle: &Path,
    setup: &Setup,
    argv: &[&str],
    netns: Option<&Path>,
) -> Result<(), BenchError> {
    use oci_spec::runtime::{
        LinuxCpu, LinuxMemory, LinuxNamespaceType, LinuxResources, MountBuilder, Root, Spec,
    };
    let setup_err = |what: &str, e: &dyn std::fmt::Display| {
        BenchError::Setup(format!("runc bundle {}: {what}: {e}", bundle.display()))
    };
    std::fs::create_dir_all(bundle).map_err(|e| setup_err("cannot create", &e))?;
    let mut spec = Spec::default();
    spec.set_hostname(Some("bench".into()));
    let mut root = Root::default();
    root.set_path(setup.rootfs.clone()).set_readonly(Some(true));
    spec.set_root(Some(root));
    if let Some(process) = spec.process_mut() {
        process.set_args(Some(argv.iter().map(|s| s.to_string()).collect()));
        process.set_env(Some(vec![
            "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
            "HOME=/root".into(),
        ]));
    }
    // A writable /tmp over the read-only root, as the VM has (iperf3's
    // server makes its buffer file there).
    let tmp = MountBuilder::default()
        .destination("/tmp")
        .typ("tmpfs")
        .source("tmpfs")
        .options(vec![
            "nosuid".to_string(),
            "nodev".to_string(),
            "mode=1777".to_string(),
        ])
        .build()
        .map_err(|e| setup_err("bad mount", &e))?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(tmp);
    spec.set_mounts(Some(mounts));
    if let Some(disk) = &setup.disk {
        let mount = MountBuilder::default()
            .destination("/mnt")
            .typ("bind")
            .source(disk)
            .options(vec!["rbind".to_string(), "rw".to_string()])
            .build()
            .map_err(|e| setup_err("bad mount", &e))?;
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.push(mount);
        spec.set_mounts(Some(mounts));
    }
    if let Some(linux) = spec.linux_mut() {
        if let (Some(path), Some(namespaces)) = (netns, linux.namespaces_mut()) {
            for ns in namespaces.iter_mut() {
                if ns.typ() == LinuxNamespaceType::Network {
                    ns.set_path(Some(path.to_path_buf()));
                }
            }
        }
        let period: u64 = 100_000;
        let mut cpu = LinuxCpu::default();
        cpu.set_period(Some(period))
            .set_quota(Some(i64::from(setup.cpus) * period as i64));
        let mut memory = LinuxMemory::default();
        memory.set_limit(Some(setup.memory as i64));
        let mut resources = LinuxResources::default();
        resources.set_cpu(Some(cpu)).set_memory(Some(memory));
        linux.set_resources(Some(resources));
        // Top level, so that `runc delete` leaves no parent behind.
        linux.set_cgroups_path(Some(PathBuf::from(format!(
            "/{}",
            bundle.file_name().unwrap_or_default().to_string_lossy()
        ))));
    }
    let config = bundle.join("config.json");
    spec.save(&config)
        .map_err(|e| setup_err("cannot write", &e))
}

/// Stops and removes container `id` (what `runc run` may leave after a
/// failure or a kill).
pub fn runc_delete(state: &Path, id: &str) {
    let _ = Command::new("runc")
        .arg("--root")
        .arg(state)
        .args(["delete", "--force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes the cgroups whose name starts with `prefix` (the containers of
/// one bench), killing what is still in them: `runc delete` cannot remove
/// a container that a signal stopped while runc was creating it.
pub fn remove_cgroups(prefix: &str) {
    let top = Path::new("/sys/fs/cgroup");
    let roots: Vec<PathBuf> = if top.join("cgroup.controllers").exists() {
        vec![top.to_path_buf()]
    } else {
        std::fs::read_dir(top)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            remove_cgroup(&e.path());
        }
    }
}

/// Kills what is in the bench's cgroup `dir` and removes it.
fn remove_cgroup(dir: &Path) {
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            break;
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2); the pid is in the bench's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A cgroup of the bench's own (no limits) for a bare process run and
/// whatever it starts, so that nothing it leaves behind outlives the
/// bench, even a SIGKILLed one (the next bench's [`remove_stale`] empties
/// it). Returns the directory and its `cgroup.procs`, open to join.
fn process_cgroup(name: &str) -> Option<(PathBuf, std::fs::File)> {
    let top = Path::new("/sys/fs/cgroup");
    let root = if top.join("cgroup.controllers").exists() {
        top.to_path_buf()
    } else {
        ["pids", "memory", "cpu"]
            .iter()
            .map(|c| top.join(c))
            .find(|p| p.join("cgroup.procs").exists())?
    };
    let dir = root.join(name);
    std::fs::create_dir(&dir).ok()?;
    match std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
    {
        Ok(f) => Some((dir, f)),
        Err(_) => {
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

/// The name every container of bench `pid` starts with (its id, bundle
/// directory and cgroup).
pub fn container_prefix(pid: u32) -> String {
    format!("ligera-bench-{pid}-")
}

/// Removes what a bench killed before it could clean up left in `base`:
/// the containers in each dead bench's runc state directory, then the
/// directory itself.
pub fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let state = e.path().join("runc-state");
        if let Ok(containers) = std::fs::read_dir(&state) {
            for c in containers.flatten() {
                runc_delete(&state, &c.file_name().to_string_lossy());
            }
        }
        remove_cgroups(&container_prefix(pid as u32));
        remove_sandboxes(&container_prefix(pid as u32));
        super::net::remove(pid as u32);
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// `name` on $PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
