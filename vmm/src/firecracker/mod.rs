//! ligera as `firecracker`: Firecracker's command line and REST API, so
//! that tools that launch a `firecracker` binary and configure it over its
//! socket run on ligera unchanged. Invoked through a link named
//! `firecracker` (its `argv[0]`) or as `ligera firecracker`.
//!
//! The API socket is served from the start by [`api::FirecrackerApi`];
//! `InstanceStart` (or `PUT /snapshot/load`, or a `--config-file`) hands a
//! [`VmConfig`](crate::config::VmConfig) to the main thread, which builds
//! the VM and runs it as `ligera run` does. Like Firecracker without its
//! jailer, the process is not jailed; the seccomp filters apply.

pub mod api;
pub mod model;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use vmm_sys_util::eventfd::EventFd;

use crate::exit::{EXIT_OK, EXIT_USAGE, EXIT_VMM_ERROR};
use api::{FirecrackerApi, Launch, Metrics};
use model::Resources;

/// Firecracker's command line (the options ligera implements; any other
/// is refused as unknown).
#[derive(Debug, clap::Parser)]
#[command(
    name = "firecracker",
    about = "ligera with Firecracker's command line and API",
    disable_version_flag = true
)]
pub struct FirecrackerArgs {
    /// Path of the API socket.
    #[arg(long, default_value = "/run/firecracker.socket", value_name = "PATH")]
    pub api_sock: PathBuf,
    /// The microVM's ID (GET /): 1 to 64 letters, digits, '-' or '_'.
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Start a microVM from this JSON file (Firecracker's format) at once.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Serve no API socket (needs --config-file).
    #[arg(long)]
    pub no_api: bool,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long)]
    pub level: Option<String>,
    /// Write the log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Name the source file and line of each log line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Accepted for compatibility: log lines always carry their level.
    #[arg(long)]
    pub show_level: bool,
    /// Write metrics (JSON lines) here on FlushMetrics.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Run every thread without its seccomp filter.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Log the guest's boot time when it writes 123 to the first MMIO window.
    #[arg(long)]
    pub boot_timer: bool,
    /// Print the version of Firecracker's API that ligera follows.
    #[arg(long)]
    pub version: bool,
    /// Passed by Firecracker's jailer; accepted, not used.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Passed by Firecracker's jailer; accepted, not used.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// Passed by Firecracker's jailer; accepted, not used.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
}

/// Whether ligera was started through a link named `firecracker`.
pub fn invoked_as_firecracker() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "firecracker"))
        .unwrap_or(false)
}

fn error(message: impl std::fmt::Display, code: i32) -> i32 {
    eprintln!("firecracker (ligera): error: {message}");
    code
}

/// CPU time this process has used, in µs.
fn cpu_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `t`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// Runs a `firecracker` process; returns its exit status.
pub fn main(args: FirecrackerArgs) -> i32 {
    if args.version {
        println!(
            "Firecracker v{} (ligera {})",
            api::FIRECRACKER_API_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return EXIT_OK;
    }
    if args.no_api && args.config_file.is_none() {
        return error("--no-api needs --config-file", EXIT_USAGE);
    }
    if let Err(e) = model::check_id("--id", &args.id) {
        return error(e, EXIT_USAGE);
    }
    let logger = model::LoggerBody {
        level: args.level.clone(),
        log_path: args.log_path.clone(),
        show_log_origin: Some(args.show_log_origin),
        ..Default::default()
    };
    if let Err(e) = api::apply_logger(&logger) {
        return error(e, EXIT_USAGE);
    }
    let mut resources = Resources::default();
    resources.boot_timer = args.boot_timer;
    resources.seccomp = !args.no_seccomp;
    let mut metrics = Metrics::new(0, 0);
    if let Some(path) = &args.metrics_path {
        match api::open_output(path) {
            Ok(f) => metrics.file = Some(f),
            Err(e) => return error(format!("--metrics-path {e}"), EXIT_VMM_ERROR),
        }
    }
    // A config file starts the VM at once.
    let mut first_launch = None;
    let (starting_tx, starting_rx) = std::sync::mpsc::channel();
    if let Some(path) = &args.config_file {
        let text = match read_config_file(path) {
            Ok(t) => t,
            Err(e) => return error(e, EXIT_VMM_ERROR),
        };
        let (logger, metrics_section) = match resources.apply_file(&text) {
            Ok(sections) => sections,
            Err(e) => {
                return error(
                    format!("--config-file {}: {e}", path.display()),
                    EXIT_VMM_ERROR,
                );
            }
        };
        if let Some(l) = logger
            && let Err(e) = api::apply_logger(&l)
        {
            return error(format!("--config-file: {e}"), EXIT_VMM_ERROR);
        }
        if let Some(m) = metrics_section {
            match api::open_output(&m.metrics_path) {
                Ok(f) => metrics.file = Some(f),
                Err(e) => return error(format!("--config-file: metrics: {e}"), EXIT_VMM_ERROR),
            }
        }
        match resources.vm_config() {
            Ok(config) => {
                first_launch = Some(Launch {
                    config,
                    paused: false,
                    reply: starting_tx,
                })
            }
            Err(e) => return error(format!("--config-file: {e}"), EXIT_VMM_ERROR),
        }
    }
    if resources.seccomp
        && let Err(e) = crate::seccomp::enable()
    {
        return error(e, EXIT_VMM_ERROR);
    }
    // Every thread started from here has the stop signals blocked; this
    // one reads them from a signalfd.
    if let Err(e) = crate::vm::block_signals() {
        return error(e, EXIT_VMM_ERROR);
    }
    let signals = match crate::vm::signal_fd(&crate::vm::STOP_SIGNALS) {
        Ok(s) => s,
        Err(e) => return error(e, EXIT_VMM_ERROR),
    };
    let wake = match EventFd::new(libc::EFD_NONBLOCK) {
        Ok(w) => Arc::new(w),
        Err(e) => return error(e, EXIT_VMM_ERROR),
    };
    let (launcher, launches) = std::sync::mpsc::channel();
    let server = if args.no_api {
        None
    } else {
        let bound = match crate::api::ApiServer::bind(&args.api_sock) {
            Ok(b) => b,
            Err(e) => return error(e, EXIT_VMM_ERROR),
        };
        metrics.startup_us = crate::logger::started().elapsed().as_micros() as u64;
        metrics.startup_cpu_us = cpu_us();
        let handler = FirecrackerApi::new(
            resources,
            args.id.clone(),
            launcher,
            wake.clone(),
            metrics,
            first_launch.is_some().then_some(starting_rx),
        );
        match bound.serve(handler) {
            Ok(s) => Some(s),
            Err(e) => return error(e, EXIT_VMM_ERROR),
        }
    };
    let from_file = first_launch.is_some();
    loop {
        let launch = match first_launch.take() {
            Some(l) => l,
            None => match wait_for_launch(&launches, &wake, &signals) {
                Ok(l) => l,
                Err(code) => {
                    // A launch still queued holds the reply the API thread
                    // may be waiting for: drop it first, or the join hangs.
                    drop(launches);
                    drop(server);
                    return code;
                }
            },
        };
        let Launch {
            config,
            paused,
            reply,
        } = launch;
        log::info!("starting: {}", crate::cli::describe(&config));
        let mut vm = match crate::builder::build(&config) {
            Ok(vm) => vm,
            Err(e) => {
                log::error!("cannot start the microVM: {e}");
                let _ = reply.send(Err(e.to_string()));
                if from_file {
                    drop(server);
                    return error(e, EXIT_VMM_ERROR);
                }
                continue;
            }
        };
        if paused {
            vm.start_paused();
        }
        let vm_api = crate::api::VmApi::new(&vm, &config);
        vm.on_start(move || {
            let _ = reply.send(Ok(vm_api));
        });
        drop(signals);
        let reason = vm.run();
        drop(server);
        if let Some(message) = reason.message() {
            eprintln!("firecracker (ligera): {message}");
        }
        vm.exit_process(reason.code())
    }
}

/// Reads a `--config-file`, up to [`model::MAX_CONFIG_FILE`] bytes.
fn read_config_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let shown = || format!("--config-file {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", shown()))?;
    let mut text = Vec::new();
    file.take(model::MAX_CONFIG_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", shown()))?;
    if text.len() as u64 > model::MAX_CONFIG_FILE {
        return Err(format!(
            "{}: longer than {} bytes",
            shown(),
            model::MAX_CONFIG_FILE
        ));
    }
    Ok(text)
}

/// Waits for the API to ask for a VM, or for a stop signal (whose exit
/// status is returned).
fn wait_for_launch(
    launches: &Receiver<Launch>,
    wake: &EventFd,
    signals: &std::fs::File,
) -> Result<Launch, i32> {
    loop {
        match launches.try_recv() {
            Ok(l) => return Ok(l),
            // The API thread is gone: nothing can start the VM any more.
            Err(TryRecvError::Disconnected) => return Err(EXIT_VMM_ERROR),
            Err(TryRecvError::Empty) => {}
        }
        let mut fds = [
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            let signo = match (&*signals).read(&mut info) {
                Ok(n) if n == info.len() => {
                    u32::from_ne_bytes([info[0], info[1], info[2], info[3]])
                }
                _ => continue,
            };
            log::info!("stopped by signal {signo} before the microVM started");
            return Err(128 + signo as i32);
        }
        let _ = wake.read();
    }
}
