//! Firecracker's API on the control socket: the pre-boot configuration
//! requests, `InstanceStart` and `PUT /snapshot/load` (which hand a
//! [`VmConfig`] to the main thread, where the VM is built), and after
//! that the running VM's requests, answered by [`VmApi`].

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use super::model::{self, Resources, parse};
use crate::api::{Handler, Request, Response, VmApi};
use crate::config::VmConfig;
use crate::vm::VmState;

/// The Firecracker API version whose request shapes ligera follows
/// (`GET /version`).
pub const FIRECRACKER_API_VERSION: &str = "1.9.0";

/// A VM for the main thread to build and run; it answers on `reply` once
/// the vCPUs run (or why they do not).
pub struct Launch {
    pub config: VmConfig,
    pub paused: bool,
    pub reply: Sender<Result<VmApi, String>>,
}

/// Where the VM is in its life, as the API sees it.
enum Phase {
    /// Taking configuration.
    PreBoot,
    /// Built by the main thread; its [`VmApi`] comes once it runs.
    Starting(Receiver<Result<VmApi, String>>),
    Running(Box<VmApi>),
    /// Failed to start in a way that cannot be retried (a config file).
    Failed(String),
}

/// The handler of a `firecracker` process's API socket.
pub struct FirecrackerApi {
    resources: Resources,
    phase: Phase,
    id: String,
    launcher: Sender<Launch>,
    /// Wakes the main thread when a launch is sent.
    wake: Arc<EventFd>,
    metrics: Metrics,
}

/// `PUT /metrics` and `FlushMetrics`: one JSON object per line.
pub struct Metrics {
    pub file: Option<File>,
    /// Process start to the API answering, wall and CPU.
    pub startup_us: u64,
    pub startup_cpu_us: u64,
    requests: u64,
    failed: u64,
    started: Instant,
}

impl Metrics {
    pub fn new(startup_us: u64, startup_cpu_us: u64) -> Self {
        Metrics {
            file: None,
            startup_us,
            startup_cpu_us,
            requests: 0,
            failed: 0,
            started: Instant::now(),
        }
    }

    /// Writes one line: counts since the last flush, as Firecracker's are.
    fn flush(&mut self, state: &str) -> Result<(), String> {
        let Some(file) = self.file.as_mut() else {
            return Err("the metrics system is not set up: PUT /metrics first".into());
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = json!({
            "utc_timestamp_ms": now_ms,
            "api_server": {
                "process_startup_time_us": self.startup_us,
                "process_startup_time_cpu_us": self.startup_cpu_us,
            },
            "ligera": {
                "api_requests": self.requests,
                "api_requests_failed": self.failed,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "vm_state": state,
            },
        });
        self.requests = 0;
        self.failed = 0;
        file.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("cannot write the metrics: {e}"))
    }
}

/// Opens a log or metrics file, which must exist (as in Firecracker: an
/// API client creates no file): appended to; a named pipe is opened
/// read-write, so the open neither blocks nor fails for want of a reader.
pub fn open_output(path: &std::path::Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Applies a logger configuration (`PUT /logger`, `--config-file`).
pub fn apply_logger(body: &model::LoggerBody) -> Result<(), String> {
    if let Some(m) = &body.module
        && !m.is_null()
    {
        return Err("logger: 'module' is not supported by ligera".into());
    }
    let level = match body.level.as_deref() {
        Some(l) => Some(parse_level(l)?),
        None => None,
    };
    if body.show_level == Some(false) {
        return Err("logger: 'show_level' false is not supported by ligera (lines always carry their level)".into());
    }
    if let Some(path) = &body.log_path {
        crate::logger::set_file(open_output(path).map_err(|e| format!("logger: {e}"))?);
    }
    if let Some(level) = level {
        log::set_max_level(level);
    }
    if let Some(origin) = body.show_log_origin {
        crate::logger::show_origin(origin);
    }
    Ok(())
}

/// Firecracker's level names, in any case.
pub fn parse_level(text: &str) -> Result<log::LevelFilter, String> {
    use log::LevelFilter::*;
    Ok(match text.to_ascii_lowercase().as_str() {
        "error" => Error,
        "warning" | "warn" => Warn,
        "info" => Info,
        "debug" => Debug,
        "trace" => Trace,
        "off" => Off,
        _ => {
            return Err(format!(
                "level '{text}' is not one of Error, Warning, Info, Debug, Trace, Off"
            ));
        }
    })
}

const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";
const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

fn fault(message: impl Into<String>) -> Response {
    Response::fault(400, message)
}

fn done(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => Response::no_content(),
        Err(e) => fault(e),
    }
}

impl FirecrackerApi {
    pub fn new(
        resources: Resources,
        id: String,
        launcher: Sender<Launch>,
        wake: Arc<EventFd>,
        metrics: Metrics,
        starting: Option<Receiver<Result<VmApi, String>>>,
    ) -> Self {
        FirecrackerApi {
            resources,
            phase: starting.map_or(Phase::PreBoot, Phase::Starting),
            id,
            launcher,
            wake,
            metrics,
        }
    }

    /// Waits for a VM being started to run (or fail).
    fn settle(&mut self) {
        if let Phase::Starting(rx) = &self.phase {
            self.phase = match rx.recv() {
                Ok(Ok(api)) => Phase::Running(Box::new(api)),
                Ok(Err(e)) => Phase::Failed(e),
                Err(_) => Phase::Failed("the microVM stopped before it started".into()),
            };
        }
    }

    fn state(&self) -> &'static str {
        match &self.phase {
            Phase::PreBoot | Phase::Starting(_) | Phase::Failed(_) => "Not started",
            Phase::Running(api) => match api.state() {
                VmState::Configured => "Not started",
                VmState::Running => "Running",
                VmState::Paused => "Paused",
                VmState::Stopped => "Stopped",
            },
        }
    }

    /// Sends `config` to the main thread and waits until it runs.
    fn launch(&mut self, config: VmConfig, paused: bool) -> Response {
        let (reply, rx) = std::sync::mpsc::channel();
        if self
            .launcher
            .send(Launch {
                config,
                paused,
                reply,
            })
            .is_err()
        {
            return Response::fault(500, "the main thread is gone");
        }
        let _ = self.wake.write(1);
        match rx.recv() {
            Ok(Ok(api)) => {
                self.phase = Phase::Running(Box::new(api));
                Response::no_content()
            }
            // Nothing was built: the configuration can be mended and retried.
            Ok(Err(e)) => fault(format!("cannot start the microVM: {e}")),
            Err(_) => {
                self.phase = Phase::Failed("the microVM stopped before it started".into());
                fault("the microVM stopped before it started (see the log)")
            }
        }
    }

    fn pre_boot(&mut self, request: &Request) -> Response {
        let r = &mut self.resources;
        let b = &request.body;
        let path = request.path.as_str();
        match (request.method.as_str(), path) {
            ("PUT", "/boot-source") => {
                done(parse("boot-source", b).and_then(|x| r.put_boot_source(x)))
            }
            ("PUT", "/machine-config") => {
                done(parse("machine-config", b).and_then(|x| r.put_machine_config(x, false)))
            }
            ("PATCH", "/machine-config") => {
                done(parse("machine-config", b).and_then(|x| r.put_machine_config(x, true)))
            }
            ("PUT", "/vsock") => done(parse("vsock", b).and_then(|x| r.put_vsock(x))),
            ("PUT", "/entropy") => done(parse("entropy", b).and_then(|x| r.put_entropy(x))),
            ("PUT", "/logger") => done(parse("logger", b).and_then(|x| apply_logger(&x))),
            ("PUT", "/metrics") => done(self.put_metrics(b)),
            ("PUT", "/snapshot/load") => {
                if self.resources.touched() {
                    return fault(
                        "loading a snapshot is not allowed after configuring boot resources",
                    );
                }
                let loaded = parse("snapshot/load", b)
                    .and_then(|x| model::snapshot_load_config(x, self.resources.seccomp));
                match loaded {
                    Ok((config, paused)) => {
                        let restored = Resources::from_vm_config(&config);
                        let response = self.launch(config, paused);
                        if response.status == 204 {
                            self.resources = restored;
                        }
                        response
                    }
                    Err(e) => fault(e),
                }
            }
            ("PATCH", p) if p.starts_with("/drives/") || p.starts_with("/network-interfaces/") => {
                fault(BEFORE_START)
            }
            ("PATCH", "/vm") | ("PUT", "/snapshot/create") => fault(BEFORE_START),
            ("PUT", p) => {
                if let Some(id) = p.strip_prefix("/drives/") {
                    done(parse("drives", b).and_then(|x| r.put_drive(id, x)))
                } else if let Some(id) = p.strip_prefix("/network-interfaces/") {
                    done(parse("network-interfaces", b).and_then(|x| r.put_net(id, x)))
                } else {
                    unknown(request)
                }
            }
            _ => unknown(request),
        }
    }

    fn put_metrics(&mut self, body: &[u8]) -> Result<(), String> {
        let m: model::MetricsBody = parse("metrics", body)?;
        if self.metrics.file.is_some() {
            return Err("metrics: the metrics system is set up already".into());
        }
        self.metrics.file =
            Some(open_output(&m.metrics_path).map_err(|e| format!("metrics: {e}"))?);
        Ok(())
    }

    fn action(&mut self, request: &Request) -> Response {
        #[derive(serde::Deserialize)]
        struct Body {
            action_type: String,
        }
        let action: Body = match parse("actions", &request.body) {
            Ok(a) => a,
            Err(e) => return fault(e),
        };
        match (action.action_type.as_str(), &mut self.phase) {
            ("FlushMetrics", _) => {
                let state = self.state();
                done(self.metrics.flush(state))
            }
            ("InstanceStart", Phase::PreBoot) => match self.resources.vm_config() {
                Ok(config) => self.launch(config, false),
                Err(e) => fault(e),
            },
            ("InstanceStart", _) => fault(AFTER_START),
            (_, Phase::Running(api)) => api.handle(request),
            ("SendCtrlAltDel", _) => fault(BEFORE_START),
            (other, _) => fault(format!(
                "action_type '{other}' is not one of InstanceStart, SendCtrlAltDel, FlushMetrics"
            )),
        }
    }
}

impl Drop for FirecrackerApi {
    /// The API thread is ending (a stop, or a panic it caught): the main
    /// thread, waiting for a launch, learns it and does not wait for ever.
    fn drop(&mut self) {
        let _ = self.wake.write(1);
    }
}

/// Endpoints of Firecracker's API that ligera does not implement, and
/// anything else.
fn unknown(request: &Request) -> Response {
    let p = request.path.as_str();
    let unsupported = ["/balloon", "/mmds", "/cpu-config", "/hotplug", "/vm/dirty"];
    if unsupported.iter().any(|u| p.starts_with(u)) {
        return fault(format!(
            "{} {p}: not supported by ligera (see the README's Firecracker section)",
            request.method
        ));
    }
    fault(format!(
        "invalid request method and/or path: {} {p}",
        request.method
    ))
}

impl Handler for FirecrackerApi {
    fn handle(&mut self, request: &Request) -> Response {
        self.settle();
        self.metrics.requests += 1;
        let response = self.route(request);
        if response.status >= 400 {
            self.metrics.failed += 1;
        }
        response
    }
}

impl FirecrackerApi {
    fn route(&mut self, request: &Request) -> Response {
        let path = request.path.as_str();
        match (request.method.as_str(), path) {
            ("GET", "/") => {
                return Response::json(
                    200,
                    json!({
                        "id": self.id,
                        "state": self.state(),
                        "vmm_version": env!("CARGO_PKG_VERSION"),
                        "app_name": "ligera",
                    }),
                );
            }
            ("GET", "/version") => {
                return Response::json(
                    200,
                    json!({
                        "firecracker_version": FIRECRACKER_API_VERSION,
                        "ligera_version": env!("CARGO_PKG_VERSION"),
                    }),
                );
            }
            ("GET", "/vm/config") => return Response::json(200, self.resources.vm_config_json()),
            ("GET", "/machine-config") => {
                return Response::json(200, self.resources.machine_config_json());
            }
            ("PUT", "/actions") => return self.action(request),
            _ => {}
        }
        match &mut self.phase {
            Phase::PreBoot => self.pre_boot(request),
            Phase::Failed(e) => fault(format!("the microVM failed to start: {e}")),
            Phase::Starting(_) => fault("the microVM is starting"),
            Phase::Running(api) => match (request.method.as_str(), path) {
                ("PATCH", "/vm") | ("PUT", "/snapshot/create") => api.handle(request),
                ("PATCH", p) if p.starts_with("/drives/") => {
                    let id = &p["/drives/".len()..];
                    if !self.resources.has_drive(id) {
                        return fault(format!("drives/{id}: no such drive"));
                    }
                    match parse::<model::PartialDrive>("drives", &request.body) {
                        Err(e) => fault(e),
                        Ok(d) if d.drive_id != id => fault(format!(
                            "the ID in the path ('{id}') does not match the ID in the body ('{}')",
                            d.drive_id
                        )),
                        Ok(d) if d.rate_limiter.as_ref().is_some_and(|v| !v.is_null()) => fault(
                            format!("drives/{id}: 'rate_limiter' is not supported by ligera"),
                        ),
                        Ok(d) if d.path_on_host.is_some() => fault(format!(
                            "drives/{id}: changing 'path_on_host' after boot is not supported by ligera"
                        )),
                        Ok(_) => Response::no_content(),
                    }
                }
                ("PATCH", p) if p.starts_with("/network-interfaces/") => {
                    let id = &p["/network-interfaces/".len()..];
                    if !self.resources.has_net(id) {
                        return fault(format!("network-interfaces/{id}: no such interface"));
                    }
                    match parse::<model::PartialNet>("network-interfaces", &request.body) {
                        Err(e) => fault(e),
                        Ok(n) if n.iface_id != id => fault(format!(
                            "the ID in the path ('{id}') does not match the ID in the body ('{}')",
                            n.iface_id
                        )),
                        Ok(n)
                            if [&n.rx_rate_limiter, &n.tx_rate_limiter]
                                .iter()
                                .any(|l| l.as_ref().is_some_and(|v| !v.is_null())) =>
                        {
                            fault(format!(
                                "network-interfaces/{id}: rate limiters are not supported by ligera"
                            ))
                        }
                        Ok(_) => Response::no_content(),
                    }
                }
                ("PUT", p)
                    if [
                        "/boot-source",
                        "/machine-config",
                        "/vsock",
                        "/entropy",
                        "/logger",
                        "/metrics",
                        "/snapshot/load",
                    ]
                    .contains(&p)
                        || p.starts_with("/drives/")
                        || p.starts_with("/network-interfaces/") =>
                {
                    fault(AFTER_START)
                }
                ("PATCH", "/machine-config") => fault(AFTER_START),
                _ => unknown(request),
            },
        }
    }
}
