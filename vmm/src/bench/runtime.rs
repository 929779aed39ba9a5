//! The three ways `ligera bench` runs a workload, all on the same root file
//! system: a ligera microVM (`ligera sandbox run`), a runc container, and a
//! bare host process chrooted into the image. Each run is one child
//! process, timed from spawn to its first byte of output and to its exit.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use super::BenchError;

/// Output kept per stream; workloads print a few lines.
const OUTPUT_LIMIT: usize = 1 << 20;

/// How one run went.
#[derive(Debug)]
pub struct Run {
    /// Spawn to the first byte on stdout.
    pub first_output: Option<Duration>,
    /// Spawn to exit.
    pub exit: Duration,
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The process group of the run in flight, for the signal handler.
pub static CURRENT_GROUP: AtomicI32 = AtomicI32::new(0);

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
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Process => "process",
            Kind::Runc => "runc",
            Kind::Vm => "vm",
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
            Kind::Vm => {
                if !Path::new("/dev/kvm").exists() {
                    return Err("no /dev/kvm on this host".into());
                }
            }
        }
        Ok(Runtime {
            kind,
            runs: 0,
            sandbox: None,
        })
    }

    /// Before a suite: a suite that measures a running system (not its
    /// start) gets one VM for all its runs, as a persistent sandbox; the
    /// container and the process start anew each run, which costs them
    /// milliseconds. Returns why the runtime cannot run the suite.
    pub fn begin(&mut self, setup: &Setup, persistent: bool) -> Result<(), String> {
        if self.kind != Kind::Vm || !persistent {
            return Ok(());
        }
        self.runs += 1;
        let name = format!("{}{}", container_prefix(std::process::id()), self.runs);
        let mut cmd = ligera().map_err(|e| e.to_string())?;
        cmd.args(["sandbox", "create", "--name", &name]);
        vm_options(&mut cmd, setup);
        eprintln!("ligera: bench: starting a VM for the suite ({name})");
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ligera sandbox create: {e}"))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            return Err(format!("the VM did not start: {}", text.trim()));
        }
        self.sandbox = Some(name);
        Ok(())
    }

    /// After a suite: the suite's VM goes.
    pub fn end(&mut self) {
        if let Some(name) = self.sandbox.take() {
            remove_sandbox(&name);
        }
    }

    /// Runs `script` with the image's `/bin/sh`, to completion.
    pub fn run(&mut self, setup: &Setup, script: &str) -> Result<Run, BenchError> {
        self.runs += 1;
        let argv = ["/bin/sh", "-c", script];
        match self.kind {
            Kind::Process => {
                let root = setup.rootfs.clone();
                let mut cmd = Command::new(argv[0]);
                cmd.args(&argv[1..])
                    .env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
                    .env("HOME", "/root");
                let root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
                    .map_err(|_| BenchError::Setup("the root path has a NUL byte".into()))?;
                // SAFETY: only async-signal-safe calls between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                timed(cmd, libc::SIGKILL)
            }
            Kind::Runc => {
                let id = format!("{}{}", container_prefix(std::process::id()), self.runs);
                let bundle = setup.scratch.join(&id);
                write_bundle(&bundle, setup, &argv)?;
                let state = setup.scratch.join("runc-state");
                let mut cmd = Command::new("runc");
                cmd.arg("--root")
                    .arg(&state)
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(&id);
                let result = timed(cmd, libc::SIGKILL);
                // `runc run` removes the container when it ends; after a
                // failure make sure.
                if result.as_ref().map_or(true, |r| r.status != 0) {
                    runc_delete(&state, &id);
                }
                let _ = std::fs::remove_dir_all(&bundle);
                result
            }
            Kind::Vm => {
                let mut cmd = ligera()?;
                if let Some(name) = &self.sandbox {
                    cmd.args(["sandbox", "exec", name.as_str()]);
                } else {
                    cmd.args(["sandbox", "run"]);
                    vm_options(&mut cmd, setup);
                }
                cmd.arg("--").args(argv);
                // SIGTERM, not SIGKILL: the sandbox cleans up after itself.
                timed(cmd, libc::SIGTERM)
            }
        }
    }
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

/// Runs `cmd` in its own process group, ending with us (`death_signal`);
/// returns its timings, status and output.
fn timed(mut cmd: Command, death_signal: libc::c_int) -> Result<Run, BenchError> {
    cmd.stdin(Stdio::null())
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
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start {:?}: {e}", cmd.get_program())))?;
    CURRENT_GROUP.store(child.id() as i32, Ordering::SeqCst);
    drop(spawning);
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr)
            .take(OUTPUT_LIMIT as u64)
            .read_to_end(&mut buf);
        // Drain the rest so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        buf
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut out = Vec::new();
    let mut first_output = None;
    let mut buf = [0u8; 8192];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first_output.get_or_insert_with(|| start.elapsed());
                if out.len() < OUTPUT_LIMIT {
                    out.extend_from_slice(&buf[..n.min(OUTPUT_LIMIT - out.len())]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let status = child
        .wait()
        .map_err(|e| BenchError::Setup(format!("cannot wait for a run: {e}")))?;
    let exit = start.elapsed();
    if STOPPING.load(Ordering::SeqCst) {
        // Stopped by a signal, not a result: the handler is cleaning up.
        park();
    }
    CURRENT_GROUP.store(0, Ordering::SeqCst);
    let stderr = errors.join().unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    let status = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(Run {
        first_output,
        exit,
        status,
        stdout: out,
        stderr,
    })
}

/// The OCI bundle for one container: `config.json` from oci-spec's
/// defaults (those of `runc spec`), the image as a read-only root, the
/// VM's limits as cgroup limits, and a new, empty network namespace.
fn write_bundle(bundle: &Path, setup: &Setup, argv: &[&str]) -> Result<(), BenchError> {
    use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources, Root, Spec};
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
    if let Some(linux) = spec.linux_mut() {
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
            let dir = e.path();
            for _ in 0..100 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
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
