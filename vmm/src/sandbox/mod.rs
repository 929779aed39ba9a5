//! `ligera sandbox`: run a command from an image in a throwaway microVM.
//!
//! `ligera sandbox run [OPTIONS] -- CMD [ARG...]` builds (or takes from
//! the cache) the image's read-only disk and the agent's disk, makes a
//! sparse scratch disk for the writable layer, boots the guest kernel with
//! the agent as init, runs the command through the agent over vsock with
//! stdin, stdout and stderr streamed, and exits with the command's status.
//! Everything the run made (scratch disk, sockets, console log) lives in a
//! run directory that goes away with it; one left by a killed ligera is
//! removed by the next run.

pub mod client;
pub mod persistent;
pub mod template;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::protocol::{ExecRequest, ExitStatus};

use crate::config::{DiskConfig, SerialConfig, VmConfig, VsockConfig, parse_size};
use crate::exit::ExitReason;
use crate::image::{self, RunConfig};

/// Status when ligera could not run the command (as `docker run` uses it).
pub const EXIT_SANDBOX_ERROR: i32 = 125;
/// Status when `--timeout` ended the command (as `timeout(1)` uses it).
pub const EXIT_TIMEOUT: i32 = 124;

/// The guest's command line: the fast-boot options for the resources/
/// kernel, the agent disk as root and the agent as init.
const SANDBOX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux \
     i8042.nopnp i8042.dumbkbd rodata=off percpu_alloc=page noreplace-smp keep_initmem quiet \
     root=/dev/vda ro rootfstype=ext4 init=/agent";
/// Environment every command starts with (before the image's and `--env`).
const BASE_ENV: [&str; 3] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "HOSTNAME=sandbox",
];
/// How long the guest may take to boot to its agent.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

const SANDBOX_EXAMPLES: &str = "\
Examples:
  ligera sandbox run -- uname -a
  echo hello | ligera sandbox run -- cat
  ligera sandbox run --memory 512M --timeout 30s --env GREETING=hi -- sh -c 'echo $GREETING'
  ligera sandbox run --image ./rootfs -- /bin/app

Exit status:
  the command's own status; 128+N if signal N killed it
  124  --timeout ended it
  125  ligera could not run it (bad image, the VM did not start, ...)
  126  the command is not executable
  127  the command was not found
  2    bad command line";

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Run a command in a new throwaway microVM and exit with its status.
    #[command(after_help = SANDBOX_EXAMPLES)]
    Run(SandboxRunArgs),
    /// Start a sandbox in the background and print its name.
    Create(persistent::CreateArgs),
    /// Run a command in a running sandbox and exit with its status.
    Exec(persistent::ExecArgs),
    /// Copy files and directories in (HOST_PATH NAME:/PATH) or out
    /// (NAME:/PATH HOST_PATH).
    Cp(persistent::CpArgs),
    /// List the sandboxes: name, image, state, age, memory.
    Ls,
    /// End a sandbox and remove what it left (-f if it is still running).
    Rm(persistent::RmArgs),
    /// (internal) The background process of `sandbox create`.
    #[command(hide = true)]
    Serve(persistent::ServeArgs),
}

/// What the sandbox's VM is made of.
#[derive(Clone, Debug, clap::Args)]
pub struct VmOptions {
    /// The image: an OCI image layout (DIR or DIR:TAG), an OCI or
    /// `docker save` archive (FILE or FILE:TAG), a registry reference
    /// (HOST[:PORT]/NAME[:TAG|@DIGEST]), or a root file system directory or
    /// tarball (default: the busybox image setup builds).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,

    /// vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,

    /// Guest RAM: 512M, 2G, ...
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,

    /// Guest kernel (default: the one resources/setup.sh built, in the cache).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Size of the writable layer the commands can fill.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub disk_size: u64,

    #[arg(long, value_name = "MODE", default_value = "on", help = crate::cli::SECCOMP_HELP)]
    pub seccomp: crate::cli::OnOff,

    /// A network interface on host TAP device NAME (made if missing, as
    /// `ligera run --net` does), which the agent brings up as eth0 with
    /// address ADDR/PREFIX and default route via GW. Loopback is always up.
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,ip=ADDR/PREFIX][,gw=GW]",
          value_parser = parse_sandbox_net)]
    pub net: Option<SandboxNet>,

    /// Boot the guest kernel, instead of restoring the cached snapshot of a
    /// booted sandbox VM (made by the first sandbox of this image, kernel,
    /// vCPUs, memory and disk size). Sandboxes with --net always boot.
    #[arg(long)]
    pub no_snapshot: bool,

    #[command(flatten)]
    pub jail: crate::jail::JailOptions,
}

/// `--net` of a sandbox: the VM's interface and the guest's address.
#[derive(Clone, Debug)]
pub struct SandboxNet {
    pub nic: crate::config::NetConfig,
    /// `ligera.ip=` for the agent: `ADDR/PREFIX[,GW]`.
    pub ip: Option<String>,
    /// The flag's text, for the `serve` process.
    pub text: String,
}

fn parse_sandbox_net(text: &str) -> Result<SandboxNet, String> {
    let o = crate::options::Options::parse(text, &["tap", "mac", "ip", "gw"])?;
    let nic = crate::config::NetConfig {
        tap: o.required("tap")?.to_string(),
        mac: o.get("mac").map(crate::options::parse_mac).transpose()?,
        id: None,
    };
    let ip = match (o.get("ip"), o.get("gw")) {
        (None, None) => None,
        (None, Some(_)) => return Err("'gw=' needs 'ip='".into()),
        (Some(ip), gw) => {
            let bad = || {
                let gw = gw.map_or(String::new(), |g| format!(",gw={g}"));
                format!("ip={ip}{gw}: want ip=ADDR/PREFIX and gw=ADDR, IPv4")
            };
            let value = match gw {
                Some(gw) => format!("{ip},{gw}"),
                None => ip.to_string(),
            };
            if value.contains(char::is_whitespace) {
                return Err(bad());
            }
            let c = agent::net::parse_cmdline(&format!("ligera.ip={value}"))
                .map_err(|_| bad())?
                .ok_or_else(bad)?;
            let mask = u32::from(c.netmask());
            if let Some(gw) = c.gateway
                && (u32::from(gw) & mask != u32::from(c.address) & mask || gw == c.address)
            {
                return Err(format!(
                    "gw={gw} is not another address in {}/{}",
                    c.address, c.prefix
                ));
            }
            // Written back from the parsed values: nothing else reaches
            // the guest's command line.
            Some(match c.gateway {
                Some(gw) => format!("{}/{},{gw}", c.address, c.prefix),
                None => format!("{}/{}", c.address, c.prefix),
            })
        }
    };
    Ok(SandboxNet {
        nic,
        ip,
        text: text.to_string(),
    })
}

/// How one command runs.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecOptions {
    /// End the command after this long (status 124): 30s, 5m, 1h, or seconds.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// An environment variable for the command: KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<String>,

    /// Working directory of the command (default /).
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,

    /// Allocate a pseudo-terminal for the command (the host terminal goes
    /// raw; Ctrl-C and window size changes reach the command).
    #[arg(long, short = 't')]
    pub tty: bool,

    /// Run as UID[:GID] (default root).
    #[arg(long, short = 'u', value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: Option<(u32, Option<u32>)>,
}

impl ExecOptions {
    /// The agent's request for `command` in an image configured as
    /// `image`, as `docker run` combines them: Entrypoint, then the command
    /// (or the image's Cmd when none is given); the environment from
    /// ligera's defaults, the image's Env, then `--env`, later ones winning;
    /// `--workdir` and `--user` over the image's WorkingDir and User.
    pub fn request(&self, command: &[String], image: &RunConfig) -> Result<ExecRequest, String> {
        let mut argv = image.entrypoint.clone();
        if command.is_empty() {
            argv.extend(image.cmd.iter().cloned());
        } else {
            argv.extend(command.iter().cloned());
        }
        if argv.is_empty() {
            return Err("no command: give one after --; the image has no Entrypoint or Cmd".into());
        }
        let mut env: Vec<String> = Vec::new();
        let all = BASE_ENV
            .iter()
            .map(|s| s.to_string())
            .chain(image.env.iter().cloned())
            .chain(self.env.iter().cloned());
        for kv in all {
            let key = kv
                .split_once('=')
                .map_or(kv.as_str(), |(k, _)| k)
                .to_string();
            env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
            env.push(kv);
        }
        let size = self
            .tty
            .then(|| client::window_size(libc::STDOUT_FILENO))
            .flatten();
        // A numeric image user is applied here; a name is looked up by the
        // agent in the image's /etc/passwd.
        let mut user_name = None;
        let user = match (self.user, &image.user) {
            (Some(u), _) => Some(u),
            (None, Some(u)) if u == "root" => Some((0, None)),
            (None, Some(u)) => match parse_user(u) {
                Ok(id) => Some(id),
                Err(_) => {
                    user_name = Some(u.clone());
                    None
                }
            },
            (None, None) => None,
        };
        Ok(ExecRequest {
            argv,
            env,
            cwd: self.workdir.clone().or_else(|| image.workdir.clone()),
            uid: user.map(|u| u.0),
            gid: user.and_then(|u| u.1),
            user_name,
            tty: self.tty,
            rows: size.map(|s| s.0),
            cols: size.map(|s| s.1),
            setup: None,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct SandboxRunArgs {
    #[command(flatten)]
    pub vm: VmOptions,

    #[command(flatten)]
    pub exec: ExecOptions,

    /// The command and its arguments (after --; default: the image's Cmd).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `30s`, `5m`, `2h`, `1500ms` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 30s, 5m or 1h"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60).ok_or("too long")?,
        "h" => n.checked_mul(3600).ok_or("too long")?,
        _ => return Err(format!("'{text}' has an unknown unit (use ms, s, m or h)")),
    };
    if secs == 0 && n == 0 {
        return Err("a timeout of zero ends before it starts".into());
    }
    Ok(Duration::from_secs(secs))
}

fn parse_env(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        Some((k, _)) if !k.is_empty() && !k.contains('\0') => Ok(text.to_string()),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn parse_user(text: &str) -> Result<(u32, Option<u32>), String> {
    let bad = || format!("'{text}' is not UID or UID:GID (numbers)");
    match text.split_once(':') {
        Some((u, g)) => Ok((
            u.parse().map_err(|_| bad())?,
            Some(g.parse().map_err(|_| bad())?),
        )),
        None => Ok((text.parse().map_err(|_| bad())?, None)),
    }
}

/// Where sandboxes keep their run directories: `$XDG_RUNTIME_DIR/ligera`,
/// `/run/ligera` for root, else a per-user directory in /tmp.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("ligera");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/ligera")
    } else {
        PathBuf::from(format!("/tmp/ligera-{uid}"))
    }
}

/// A run directory, removed when dropped.
pub(crate) struct RunDir(pub PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes run directories whose ligera is gone (killed with SIGKILL).
pub(crate) fn remove_stale_runs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            log::info!("removing {} (its ligera is gone)", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub(crate) fn fail(message: impl std::fmt::Display) -> i32 {
    eprintln!("ligera: error: {message}");
    EXIT_SANDBOX_ERROR
}

/// `ligera sandbox run`; returns the exit status (or exits the process).
pub fn run(args: SandboxRunArgs) -> i32 {
    let runtime = runtime_dir();
    if let Err(e) = std::fs::create_dir_all(&runtime) {
        return fail(format!("cannot create {}: {e}", runtime.display()));
    }
    remove_stale_runs(&runtime);
    let run_dir = RunDir(runtime.join(format!("run-{}", std::process::id())));
    if let Err(e) = std::fs::create_dir(&run_dir.0) {
        return fail(format!("cannot create {}: {e}", run_dir.0.display()));
    }

    let (mut config, image_config) = match prepare(&args.vm, &run_dir.0) {
        Ok(c) => c,
        Err(message) => return fail(message),
    };
    let mut request = match args.exec.request(&args.command, &image_config) {
        Ok(r) => r,
        Err(message) => return fail(message),
    };
    if let Err(e) = config.validate() {
        return fail(e);
    }
    let (jailed, foundation) = match crate::jail::start(
        &args.vm.jail,
        &mut config,
        EXIT_SANDBOX_ERROR,
        crate::builder::lay_foundation,
    ) {
        Ok(crate::jail::Start::Supervisor(code)) => return code,
        Ok(crate::jail::Start::Vm(jailed, foundation)) => (jailed, foundation),
        Err(e) => return fail(e),
    };
    if let Err(e) = crate::vm::block_signals() {
        return fail(e);
    }
    let mut vm = match crate::builder::build_on(&config, foundation) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    let control = vm.control();
    let console = open_console(&run_dir.0);
    if let Some(jailed) = jailed
        && let Err(e) = jailed.lock_down()
    {
        return fail(format!("cannot lock the jail: {e}"));
    }

    let outcome: Arc<Mutex<Option<Result<ExitStatus, client::ClientError>>>> = Arc::default();
    let finished = Arc::new(AtomicBool::new(false));
    let socket = config
        .vsock
        .as_ref()
        .map(|v| v.socket.clone())
        .unwrap_or_default();
    {
        let (outcome, control, finished) = (outcome.clone(), control.clone(), finished.clone());
        let spawned = std::thread::Builder::new()
            .name("sandbox".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Sandbox) {
                    control.request_stop(ExitReason::VmmError(e));
                    return;
                }
                let stopped = || control.state() == crate::vm::VmState::Stopped;
                // The guest first gets our time (taken once it answers) and
                // fresh entropy (a restored one has its snapshot's), then
                // the command: both in the exec request, one session.
                let result = client::connect(&socket, BOOT_TIMEOUT, stopped).and_then(|s| {
                    request.setup = Some(client::fresh_setup()?);
                    log::debug!("sandbox: the agent answers; running the command");
                    client::run_command(
                        s,
                        &request,
                        Some(Box::new(std::io::stdin())),
                        std::io::stdout(),
                        std::io::stderr(),
                    )
                });
                *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                finished.store(true, Ordering::SeqCst);
                control.request_stop(ExitReason::Stopped);
            });
        if let Err(e) = spawned {
            return fail(format!("cannot start a thread: {e}"));
        }
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(limit) = args.exec.timeout {
        let (timed_out, control, finished) = (timed_out.clone(), control.clone(), finished.clone());
        let _ = std::thread::Builder::new()
            .name("sandbox-timeout".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Sandbox) {
                    control.request_stop(ExitReason::VmmError(e));
                    return;
                }
                std::thread::sleep(limit);
                if !finished.load(Ordering::SeqCst) {
                    timed_out.store(true, Ordering::SeqCst);
                    control.request_stop(ExitReason::Stopped);
                }
            });
    }

    let raw = args
        .exec
        .tty
        .then(|| crate::terminal::RawTerminal::enter_passing_signals(0));
    let reason = vm.run();
    drop(raw);
    let result = outcome.lock().unwrap_or_else(|e| e.into_inner()).take();
    let code = if timed_out.load(Ordering::SeqCst) {
        if let Some(limit) = args.exec.timeout {
            eprintln!("ligera: the command did not finish within {limit:?}");
        }
        EXIT_TIMEOUT
    } else {
        match (result, &reason) {
            (Some(Ok(status)), _) => report(&status),
            (_, ExitReason::Signal(sig)) => {
                eprintln!("ligera: stopped by signal {sig}");
                128 + sig
            }
            (Some(Err(e)), _) => fail(e),
            (None, reason) => fail(format!(
                "the VM stopped before the command finished: {}{}",
                reason
                    .message()
                    .unwrap_or_else(|| "the guest rebooted".into()),
                console_tail(console.as_ref())
            )),
        }
    };
    drop(run_dir);
    vm.exit_process(code)
}

/// Says why a command did not simply exit; returns its host status.
pub(crate) fn report(status: &ExitStatus) -> i32 {
    if let Some(e) = &status.error {
        eprintln!("ligera: {}", e.message);
    }
    if status.oom_killed {
        eprintln!(
            "ligera: the command ran out of memory in the sandbox and was killed (give more --memory)"
        );
    }
    status.host_code()
}

/// The guest's console log, opened for [`console_tail`] before the VM runs
/// (its threads may not open files then).
pub(crate) fn open_console(run_dir: &Path) -> Option<std::fs::File> {
    std::fs::File::open(run_dir.join("console.log")).ok()
}

/// The last lines of the guest's console, for an error message.
pub(crate) fn console_tail(log: Option<&std::fs::File>) -> String {
    use std::os::unix::fs::FileExt;
    let Some(file) = log else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(8192);
    let mut buf = vec![0u8; (len - start) as usize];
    let n = file.read_at(&mut buf, start).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("; the guest's console ended with: {}", tail.join(" | "))
}

/// What a sandbox VM boots: its kernel, the agent's disk (`/dev/vda`, the
/// root), the image's disk (`/dev/vdb`) and the kernel command line, for
/// ligera and for another VMM (the bench's QEMU). The scratch disk
/// (`/dev/vdc`) is each VM's own.
pub struct GuestParts {
    pub kernel: PathBuf,
    pub agent_disk: PathBuf,
    pub image_disk: PathBuf,
    pub image_config: RunConfig,
    pub cmdline: String,
}

/// Resolves (building or pulling what is missing) the [`GuestParts`] of
/// `image` (None: the default image) with `kernel` (None: setup's).
pub fn guest_parts(image: Option<&str>, kernel: Option<&Path>) -> Result<GuestParts, String> {
    let kernel = match kernel {
        Some(k) => k.to_path_buf(),
        None => image::cache_dir()
            .map_err(|e| e.to_string())?
            .join("kernel/vmlinux"),
    };
    if !kernel.exists() {
        return Err(format!(
            "no guest kernel at {}: run resources/setup.sh, or give --kernel",
            kernel.display()
        ));
    }
    let reference = match image {
        Some(i) => i.to_string(),
        None => image::default_image()
            .map_err(|e| e.to_string())?
            .display()
            .to_string(),
    };
    let (image_disk, image_config) = image::image_disk(&reference).map_err(|e| e.to_string())?;
    let agent = agent_binary()?;
    let agent_disk = image::agent_disk(&agent).map_err(|e| e.to_string())?;
    Ok(GuestParts {
        kernel,
        agent_disk,
        image_disk,
        image_config,
        cmdline: SANDBOX_CMDLINE.to_string(),
    })
}

/// Resolves the kernel, image and agent, and builds the VM configuration
/// with its run-time files in `run_dir`.
pub(crate) fn prepare(args: &VmOptions, run_dir: &Path) -> Result<(VmConfig, RunConfig), String> {
    let GuestParts {
        kernel,
        agent_disk,
        image_disk,
        image_config,
        mut cmdline,
    } = guest_parts(args.image.as_deref(), args.kernel.as_deref())?;
    let scratch = run_dir.join("scratch.ext4");
    image::scratch_disk(&scratch, args.disk_size).map_err(|e| e.to_string())?;
    let disk = |path: PathBuf, readonly: bool, id: &str| DiskConfig {
        path,
        readonly,
        id: Some(id.into()),
    };
    if let Some(ip) = args.net.as_ref().and_then(|n| n.ip.as_ref()) {
        cmdline.push_str(" ligera.ip=");
        cmdline.push_str(ip);
    }
    let config = VmConfig {
        cmdline,
        nets: args.net.iter().map(|n| n.nic.clone()).collect(),
        vcpus: args.cpus,
        mem_size: args.memory,
        serial: SerialConfig::File(run_dir.join("console.log")),
        disks: vec![
            disk(agent_disk, true, "agent"),
            disk(image_disk, true, "image"),
            disk(scratch, false, "scratch"),
        ],
        vsock: Some(VsockConfig {
            cid: 3,
            socket: run_dir.join("v.sock"),
        }),
        seccomp: args.seccomp == crate::cli::OnOff::On,
        ..VmConfig::new(kernel)
    };
    let mut config = config;
    if template::eligible(&config, args.no_snapshot) {
        template::restore_from_template(&mut config)?;
    }
    Ok((config, image_config))
}

/// The agent binary: `$LIGERA_AGENT`, else `ligera-agent` next to ligera.
fn agent_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LIGERA_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find ligera itself: {e}"))?;
    let agent = exe.with_file_name("ligera-agent");
    if agent.exists() {
        Ok(agent)
    } else {
        Err(format!(
            "no guest agent at {} (build it with cargo build, or set LIGERA_AGENT)",
            agent.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "5x", "-1s", "1.5s", "0"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_config_combines_as_docker_run_does() {
        let image = RunConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo default".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            workdir: Some("/work".into()),
            user: Some("1000:100".into()),
        };
        let none = ExecOptions {
            timeout: None,
            env: vec!["A=flag".into()],
            workdir: None,
            user: None,
            tty: false,
        };
        let r = none.request(&[], &image).unwrap();
        assert_eq!(r.argv, ["/bin/sh", "-c", "echo default"]);
        assert_eq!(
            r.env,
            ["HOME=/root", "HOSTNAME=sandbox", "PATH=/bin", "A=flag"]
        );
        assert_eq!(
            (r.cwd.as_deref(), r.uid, r.gid),
            (Some("/work"), Some(1000), Some(100))
        );
        let r = none.request(&["echo mine".into()], &image).unwrap();
        assert_eq!(
            r.argv,
            ["/bin/sh", "-c", "echo mine"],
            "the command replaces Cmd"
        );
        let flags = ExecOptions {
            workdir: Some("/tmp".into()),
            user: Some((0, None)),
            ..none.clone()
        };
        let r = flags.request(&[], &image).unwrap();
        assert_eq!(
            (r.cwd.as_deref(), r.uid, r.gid),
            (Some("/tmp"), Some(0), None)
        );
        assert!(
            none.request(&[], &RunConfig::default()).is_err(),
            "no command at all"
        );
        let named = RunConfig {
            user: Some("www-data".into()),
            ..image
        };
        // A name goes to the agent, which looks it up in the image.
        let r = none.request(&[], &named).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.user_name.as_deref()),
            (None, None, Some("www-data"))
        );
    }

    #[test]
    fn users_and_env() {
        assert_eq!(parse_user("1000"), Ok((1000, None)));
        assert_eq!(parse_user("1000:100"), Ok((1000, Some(100))));
        assert!(parse_user("nobody").is_err());
        assert!(parse_env("A=b=c").is_ok());
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }
}
