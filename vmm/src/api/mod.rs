//! The control socket (`ligera run --api-sock PATH`): HTTP/1.1 with JSON
//! bodies in Firecracker's shapes, so that the Firecracker-compatible API
//! to come is more routes on the same server.
//!
//! | request | effect |
//! |---|---|
//! | `GET /` | `{"id", "state", "vmm_version", "app_name"}`; state is `Not started`, `Running`, `Paused` or `Stopped` |
//! | `GET /vm/config` | the VM's configuration in Firecracker's `vm/config` shape |
//! | `PATCH /vm` `{"state": "Paused" \| "Resumed"}` | pauses or resumes every vCPU; 204 |
//! | `PUT /actions` `{"action_type": "SendCtrlAltDel"}` | types Ctrl-Alt-Del on the i8042 keyboard; 204 |
//! | `PUT /actions` `{"action_type": "Stop"}` | (ligera's own) stops the VM; ligera exits with status 0; 204 |
//!
//! Errors are 400 with `{"fault_message": "..."}` naming what was wrong.

pub mod client;
pub mod server;

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::I8042;
use serde::Deserialize;
use serde_json::json;

use crate::config::VmConfig;
use crate::exit::ExitReason;
use crate::vm::{Vm, VmControl, VmState};
pub use server::{ApiServer, BoundApi, Handler, Request, Response, ServerError};

/// Answers the control socket's requests for one VM.
pub struct VmApi {
    control: Arc<VmControl>,
    i8042: Arc<Mutex<I8042>>,
    config: VmConfig,
    snapshot: crate::snapshot::Source,
}

impl VmApi {
    pub fn new(vm: &Vm, config: &VmConfig) -> Self {
        VmApi {
            control: vm.control(),
            i8042: vm.devices().i8042.clone(),
            config: config.clone(),
            snapshot: vm.snapshot_source(config),
        }
    }
}

/// Listens on the control socket `config.api_socket`, if set (before the
/// jail is locked: the socket's directory may be root's).
pub fn bind(config: &VmConfig) -> Result<Option<BoundApi>, ServerError> {
    config
        .api_socket
        .as_deref()
        .map(ApiServer::bind)
        .transpose()
}

/// Serves the control socket bound by [`bind`] for `vm`.
pub fn serve(
    bound: Option<BoundApi>,
    vm: &Vm,
    config: &VmConfig,
) -> Result<Option<ApiServer>, ServerError> {
    bound.map(|b| b.serve(VmApi::new(vm, config))).transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: RequestedState,
}

#[derive(Deserialize)]
enum RequestedState {
    Paused,
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: Action,
}

#[derive(Deserialize)]
enum Action {
    SendCtrlAltDel,
    Stop,
}

/// `PUT /snapshot/create`, in Firecracker's shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateBody {
    snapshot_path: std::path::PathBuf,
    mem_file_path: std::path::PathBuf,
    #[serde(default)]
    snapshot_type: Option<SnapshotType>,
}

#[derive(Deserialize, PartialEq, Eq)]
enum SnapshotType {
    Full,
    Diff,
}

/// Parses a JSON body, or says what is wrong with it.
fn body<'a, T: Deserialize<'a>>(request: &'a Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body)
        .map_err(|e| Response::fault(400, format!("{} {}: {e}", request.method, request.path)))
}

impl VmApi {
    /// The VM's state now.
    pub fn state(&self) -> VmState {
        self.control.state()
    }

    fn instance_info(&self) -> Response {
        let state = match self.control.state() {
            VmState::Configured => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopped => "Stopped",
        };
        Response::json(
            200,
            json!({
                "id": "anonymous-instance",
                "state": state,
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "app_name": "ligera",
            }),
        )
    }

    fn vm_config(&self) -> Response {
        let c = &self.config;
        let drives: Vec<_> = c
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                json!({
                    "drive_id": d.id.clone().unwrap_or_else(|| format!("disk{i}")),
                    "path_on_host": d.path,
                    "is_root_device": false,
                    "is_read_only": d.readonly,
                })
            })
            .collect();
        let nets: Vec<_> = c
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({
                    "iface_id": n.iface_id(i),
                    "host_dev_name": n.tap,
                    "guest_mac": n.mac.map(|m| devices::virtio::net::format_mac(&m)),
                })
            })
            .collect();
        Response::json(
            200,
            json!({
                "boot-source": {
                    "kernel_image_path": c.kernel,
                    "initrd_path": c.initrd,
                    "boot_args": c.cmdline,
                },
                "drives": drives,
                "machine-config": {
                    "vcpu_count": c.vcpus,
                    "mem_size_mib": c.mem_size >> 20,
                    "smt": false,
                },
                "network-interfaces": nets,
                "vsock": c.vsock.as_ref().map(|v| json!({
                    "guest_cid": v.cid,
                    "uds_path": v.socket,
                })),
                "entropy": c.rng.then(|| json!({})),
            }),
        )
    }

    fn patch_vm(&self, request: &Request) -> Response {
        let parsed: VmStateBody = match body(request) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let result = match parsed.state {
            RequestedState::Paused => self.control.pause(),
            RequestedState::Resumed => self.control.resume(),
        };
        match result {
            Ok(()) => Response::no_content(),
            Err(e) => Response::fault(400, e.to_string()),
        }
    }

    fn action(&self, request: &Request) -> Response {
        let parsed: ActionBody = match body(request) {
            Ok(b) => b,
            Err(r) => return r,
        };
        match parsed.action_type {
            Action::SendCtrlAltDel => {
                if lock(&self.i8042).send_ctrl_alt_del() {
                    Response::no_content()
                } else {
                    Response::fault(
                        400,
                        "the guest has not read the keys it was sent before (i8042 buffer full)",
                    )
                }
            }
            Action::Stop => {
                self.control.request_stop(ExitReason::Stopped);
                Response::no_content()
            }
        }
    }
}

impl VmApi {
    /// Writes a snapshot of the paused VM to the two files (created or
    /// truncated, mode 0600). The VM stays paused.
    fn snapshot_create(&self, request: &Request) -> Response {
        use std::os::unix::fs::OpenOptionsExt;
        let parsed: SnapshotCreateBody = match body(request) {
            Ok(b) => b,
            Err(r) => return r,
        };
        if parsed.snapshot_type == Some(SnapshotType::Diff) {
            return Response::fault(400, "diff snapshots are not supported: use Full");
        }
        if self.control.state() != VmState::Paused {
            return Response::fault(
                400,
                "the VM must be paused for a snapshot (PATCH /vm {\"state\": \"Paused\"})",
            );
        }
        let open = |path: &std::path::Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| Response::fault(400, format!("{}: {e}", path.display())))
        };
        // `ligera snapshot create` passes the two files, opened by its user
        // (a jailed VM can reach no file of theirs); other clients name them.
        let (mut state, memory) = match <[_; 2]>::try_from(request.fds.take()) {
            Ok([state, memory]) => (std::fs::File::from(state), std::fs::File::from(memory)),
            Err(_) => {
                let state = match open(&parsed.snapshot_path) {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                match open(&parsed.mem_file_path) {
                    Ok(f) => (state, f),
                    Err(r) => return r,
                }
            }
        };
        match self.snapshot.create(
            (&mut state, &parsed.snapshot_path),
            (&memory, &parsed.mem_file_path),
        ) {
            Ok(created) => {
                log::info!(
                    "snapshot taken in {:?}: state {} bytes, {} bytes of guest memory written",
                    created.elapsed,
                    created.state_bytes,
                    created.memory_bytes
                );
                Response::no_content()
            }
            Err(e) => Response::fault(400, format!("cannot take the snapshot: {e}")),
        }
    }
}

impl Handler for VmApi {
    fn handle(&mut self, request: &Request) -> Response {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/") => self.instance_info(),
            ("GET", "/vm/config") => self.vm_config(),
            ("PATCH", "/vm") => self.patch_vm(request),
            ("PUT", "/actions") => self.action(request),
            ("PUT", "/snapshot/create") => self.snapshot_create(request),
            (method, path) => Response::fault(
                400,
                format!("invalid request method and/or path: {method} {path}"),
            ),
        }
    }
}
