//! Sandboxes that outlive a command: `create`, `exec`, `ls`, `rm`.
//!
//! No daemon: `create` starts `ligera sandbox serve` in the background (its
//! own session, its output in a log), which boots the VM with its files in
//! `<runtime>/sb-NAME/`: the vsock socket commands connect to, the control
//! socket, the scratch disk, the console log, `info.json` (name, image,
//! memory, creation time) and `pid`. `create` returns once the guest agent
//! answers. `exec` connects to the sandbox's vsock socket like `run` does;
//! several at once each get their own connection. The directory goes away
//! when the sandbox ends; one whose ligera died shows as `dead` in `ls`,
//! and `rm` removes it.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    BOOT_TIMEOUT, EXIT_SANDBOX_ERROR, EXIT_TIMEOUT, ExecOptions, RunDir, VmOptions, client,
    console_tail, fail, prepare, runtime_dir,
};
use crate::config::format_size;
use crate::exit::EXIT_OK;
use crate::image::RunConfig;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The sandbox's name (letters, digits, '.', '_', '-'; default: generated).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub vm: VmOptions,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub name: String,

    #[command(flatten)]
    pub vm: VmOptions,
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The sandbox.
    pub name: String,

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

#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// End it even if it is running.
    #[arg(long, short = 'f')]
    pub force: bool,

    /// The sandboxes.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// HOST_PATH (copy in) or NAME:GUEST_PATH (copy out).
    #[arg(value_name = "SRC")]
    pub src: String,
    /// NAME:GUEST_PATH (copy in) or HOST_PATH (copy out).
    #[arg(value_name = "DEST")]
    pub dest: String,
}

/// What `ls` shows of a sandbox, written by its `serve` process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Info {
    name: String,
    image: String,
    memory: u64,
    /// Seconds since the epoch.
    created: u64,
    /// The image's configuration, applied to each `exec`.
    #[serde(default)]
    config: RunConfig,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.')
}

fn sandbox_dir(name: &str) -> PathBuf {
    runtime_dir().join(format!("sb-{name}"))
}

/// The pid of the sandbox's ligera, if it is alive.
fn live_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `ligera sandbox create`.
pub fn create(args: CreateArgs) -> i32 {
    let name = args.name.clone().unwrap_or_else(|| {
        let mut b = [0u8; 4];
        // SAFETY: getrandom writes at most 4 bytes into `b`.
        unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        format!("sb-{:08x}", u32::from_ne_bytes(b))
    });
    if !valid_name(&name) {
        return fail(format!(
            "'{name}' is not a sandbox name (1 to 64 letters, digits, '.', '_', '-')"
        ));
    }
    let dir = sandbox_dir(&name);
    if dir.exists() {
        if live_pid(&dir).is_some() {
            return fail(format!("a sandbox named {name} is running"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find ligera itself: {e}")),
    };
    let log = match std::fs::File::create(dir.join("serve.log")) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot create the sandbox's log: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.args(["sandbox", "serve", "--name", &name])
        .args(vm_args(&args.vm))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child leaves our session so
    // it outlives this command and the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the sandbox: {e}")),
    };
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if is_ready(&dir) {
            println!("{name}");
            return EXIT_OK;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return fail(format!(
                "the sandbox did not start ({status}): {}",
                log.trim().trim_start_matches("ligera: error: ")
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            return fail(format!("the sandbox did not start within {BOOT_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM options as flags again, for the `serve` process.
fn vm_args(vm: &VmOptions) -> Vec<String> {
    let mut a = vec![
        "--cpus".into(),
        vm.cpus.to_string(),
        "--memory".into(),
        format!("{}K", vm.memory / 1024),
        "--disk-size".into(),
        format!("{}K", vm.disk_size / 1024),
    ];
    if vm.seccomp == crate::cli::OnOff::Off {
        a.extend(["--seccomp".into(), "off".into()]);
    }
    if vm.no_snapshot {
        a.push("--no-snapshot".into());
    }
    a.extend(vm.jail.to_args());
    if let Some(n) = &vm.net {
        a.extend(["--net".into(), n.text.clone()]);
    }
    if let Some(i) = &vm.image {
        a.extend(["--image".into(), crate::image::absolute(i)]);
    }
    if let Some(k) = &vm.kernel {
        let k = std::fs::canonicalize(k).unwrap_or_else(|_| k.clone());
        a.extend(["--kernel".into(), k.display().to_string()]);
    }
    a
}

/// `ligera sandbox serve`: the sandbox's VM, until `rm` or a signal ends it.
pub fn serve(args: ServeArgs) -> i32 {
    let dir = RunDir(sandbox_dir(&args.name));
    let (mut config, image_config) = match prepare(&args.vm, &dir.0) {
        Ok(c) => c,
        Err(message) => return fail(message),
    };
    config.api_socket = Some(dir.0.join("api.sock"));
    if let Err(e) = config.validate() {
        return fail(e);
    }
    let info = Info {
        name: args.name.clone(),
        image: args.vm.image.clone().unwrap_or_else(|| "(default)".into()),
        memory: args.vm.memory,
        created: now(),
        config: image_config,
    };
    let written = serde_json::to_vec(&info)
        .map_err(std::io::Error::other)
        .and_then(|j| std::fs::write(dir.0.join("info.json"), j))
        .and_then(|()| std::fs::write(dir.0.join("pid"), std::process::id().to_string()));
    if let Err(e) = written {
        return fail(format!("cannot write to {}: {e}", dir.0.display()));
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
    let bound = match crate::api::bind(&config) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    // Ready once the agent answers.
    let control = vm.control();
    let socket = config
        .vsock
        .as_ref()
        .map(|v| v.socket.clone())
        .unwrap_or_default();
    // Readiness is the mark file's content, written through a descriptor
    // opened now: the thread's filter opens no files.
    let ready = match std::fs::File::create(dir.0.join("ready")) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot write to {}: {e}", dir.0.display())),
    };
    let console = super::open_console(&dir.0);
    if let Some(jailed) = jailed
        && let Err(e) = jailed.lock_down()
    {
        return fail(format!("cannot lock the jail: {e}"));
    }
    let api = match crate::api::serve(bound, &vm, &config) {
        Ok(api) => api,
        Err(e) => return fail(e),
    };
    let _ = std::thread::Builder::new()
        .name("sandbox-ready".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Sandbox) {
                control.request_stop(crate::exit::ExitReason::VmmError(e));
                return;
            }
            let stopped = || control.state() == crate::vm::VmState::Stopped;
            // Ready once the agent answers and has the time and fresh entropy.
            match client::connect(&socket, BOOT_TIMEOUT, stopped).and_then(client::refresh) {
                Ok(()) => {
                    let _ = (&ready).write_all(READY);
                }
                Err(e) => {
                    eprintln!("ligera: error: {e}");
                    control.request_stop(crate::exit::ExitReason::VmmError(e.to_string()));
                }
            }
        });
    let reason = vm.run();
    drop(api);
    if let Some(m) = reason.message() {
        eprintln!("ligera: {m}{}", console_tail(console.as_ref()));
    }
    drop(dir);
    vm.exit_process(reason.code())
}

/// What the `ready` file holds once the agent has answered.
const READY: &[u8] = b"ready\n";

/// Whether the sandbox in `dir` has answered (its `ready` file is written).
fn is_ready(dir: &Path) -> bool {
    std::fs::read(dir.join("ready")).is_ok_and(|c| c == READY)
}

/// A connection to the agent of the running sandbox `name`.
fn connect_to(name: &str) -> Result<(PathBuf, std::os::unix::net::UnixStream), String> {
    let dir = sandbox_dir(name);
    if !valid_name(name) || live_pid(&dir).is_none() || !is_ready(&dir) {
        return Err(format!("no running sandbox named {name}"));
    }
    let stream = client::connect(&dir.join("v.sock"), Duration::from_secs(10), || false)
        .map_err(|e| e.to_string())?;
    Ok((dir, stream))
}

/// `NAME:/PATH` as (name, path).
fn guest_path(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (valid_name(name) && path.starts_with('/')).then_some((name, path))
}

/// `ligera sandbox cp`: a tree in or out, as a tar stream through the
/// agent; what comes out is unpacked with the image rules (nothing
/// outside the destination, bounded size).
pub fn cp(args: CpArgs) -> i32 {
    use agent::copy;
    let (copy_in, name, guest, host) = match (guest_path(&args.src), guest_path(&args.dest)) {
        (None, Some((name, guest))) => (true, name, guest, PathBuf::from(&args.src)),
        (Some((name, guest)), None) => (false, name, guest, PathBuf::from(&args.dest)),
        _ => {
            eprintln!("ligera: error: give one NAME:/GUEST_PATH and one host path");
            return crate::exit::EXIT_USAGE;
        }
    };
    if copy_in && let Err(e) = std::fs::symlink_metadata(&host) {
        return fail(format!("{}: {e}", host.display()));
    }
    let (_, stream) = match connect_to(name) {
        Ok(c) => c,
        Err(message) => return fail(message),
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let mut agent_err = Vec::new();
    let (session, local) = if copy_in {
        let src = host.clone();
        let packer = std::thread::spawn(move || copy::pack(&src, writer));
        let s = client::run_session(
            stream,
            client::Request::CopyIn(guest),
            Some(Box::new(reader)),
            std::io::sink(),
            &mut agent_err,
        );
        (
            s,
            packer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("panicked"))),
        )
    } else {
        let dest = host.clone();
        let unpacker =
            std::thread::spawn(move || copy::unpack(reader, &dest, copy::Limits::default()));
        let s = client::run_session(
            stream,
            client::Request::CopyOut(guest),
            None,
            writer,
            &mut agent_err,
        );
        (
            s,
            unpacker
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("panicked"))),
        )
    };
    let agent_err = String::from_utf8_lossy(&agent_err);
    let agent_err: String = agent_err.trim().chars().take(1000).collect();
    match session {
        Err(e) => fail(e),
        Ok(status) if status.host_code() != 0 => fail(format!(
            "copying {} in the sandbox failed: {}",
            guest,
            agent_err.trim_start_matches("ligera-agent: ")
        )),
        Ok(_) => match local {
            Ok(()) => EXIT_OK,
            Err(e) => fail(format!("{}: {e}", host.display())),
        },
    }
}

/// `ligera sandbox exec`.
pub fn exec(args: ExecArgs) -> i32 {
    let (dir, stream) = match connect_to(&args.name) {
        Ok(c) => c,
        Err(message) => return fail(message),
    };
    if let Some(limit) = args.exec.timeout {
        // The agent ends the command when its connection goes.
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            crate::terminal::restore();
            eprintln!("ligera: the command did not finish within {limit:?}");
            let _ = std::io::stdout().flush();
            std::process::exit(EXIT_TIMEOUT);
        });
    }
    let image_config = std::fs::read(dir.join("info.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Info>(&b).ok())
        .map(|i| i.config)
        .unwrap_or_default();
    let request = match args.exec.request(&args.command, &image_config) {
        Ok(r) => r,
        Err(message) => return fail(message),
    };
    let raw = request
        .tty
        .then(|| crate::terminal::RawTerminal::enter_passing_signals(0));
    let result = client::run_command(
        stream,
        &request,
        Some(Box::new(std::io::stdin())),
        std::io::stdout(),
        std::io::stderr(),
    );
    drop(raw);
    match result {
        Ok(status) => super::report(&status),
        Err(e) => fail(e),
    }
}

/// `ligera sandbox ls`.
pub fn ls() -> i32 {
    println!(
        "{:<24} {:<32} {:<8} {:>8} {:>10}",
        "NAME", "IMAGE", "STATE", "AGE", "MEMORY"
    );
    let Ok(entries) = std::fs::read_dir(runtime_dir()) else {
        return EXIT_OK;
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        let Some(name) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("sb-"))
            .map(String::from)
        else {
            continue;
        };
        let info: Option<Info> = std::fs::read(dir.join("info.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let state = match (live_pid(&dir), is_ready(&dir)) {
            (Some(_), true) => "running",
            (Some(_), false) => "starting",
            (None, _) => "dead",
        };
        let (image, age, memory) = match &info {
            Some(i) => (
                i.image.clone(),
                format_age(now().saturating_sub(i.created)),
                format_size(i.memory),
            ),
            None => ("?".into(), "?".into(), "?".into()),
        };
        let image: String = image
            .chars()
            .rev()
            .take(32)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        rows.push((
            name.clone(),
            format!("{name:<24} {image:<32} {state:<8} {age:>8} {memory:>10}"),
        ));
    }
    rows.sort();
    for (_, row) in rows {
        println!("{row}");
    }
    EXIT_OK
}

fn format_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `ligera sandbox rm`.
pub fn rm(args: RmArgs) -> i32 {
    let mut status = EXIT_OK;
    for name in &args.names {
        let dir = sandbox_dir(name);
        if !valid_name(name) || !dir.exists() {
            status = fail(format!("no sandbox named {name}"));
            continue;
        }
        let killed = live_pid(&dir);
        if let Some(pid) = killed {
            if !args.force {
                status = fail(format!("sandbox {name} is running (use -f to end it)"));
                continue;
            }
            // SAFETY: kill(2) on the sandbox's ligera, which stops its VM
            // and removes its directory.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while live_pid(&dir).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if live_pid(&dir).is_some() {
                // SAFETY: as above; it did not stop in time.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // What a ligera killed with SIGKILL leaves: its VM process ends
        // with it, then its jail's mount point and cgroup can go.
        let base = std::path::Path::new(crate::jail::DEFAULT_BASE);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            crate::jail::remove_stale(base);
            let left = killed.is_some_and(|pid| base.join(pid.to_string()).exists());
            if !left || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&dir);
        println!("{name}");
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-1", "x.y_z", &"n".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"n".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(format_age(5), "5s");
        assert_eq!(format_age(600), "10m");
        assert_eq!(format_age(7200), "2h");
    }
}
