//! `ligera snapshot create` and `ligera snapshot restore`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::api::client::{fault_message, request, request_with_fds};
use crate::cli::{OnOff, SnapshotCreateArgs, SnapshotRestoreArgs};
use crate::config::{RestoreConfig, VmConfig};
use crate::exit::{EXIT_OK, EXIT_USAGE, EXIT_VMM_ERROR};

/// How long a snapshot may take to write (guest RAM is written whole).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_secs(10);

/// A path as the VM process opens it: absolute, from our working directory.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `ligera snapshot create`: pauses the VM if it runs, has it write its
/// snapshot, and resumes it if it was running.
pub fn create(args: SnapshotCreateArgs) -> i32 {
    match create_inner(&args) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("ligera: error: {e}");
            EXIT_VMM_ERROR
        }
    }
}

fn create_inner(args: &SnapshotCreateArgs) -> Result<(), String> {
    let sock = &args.api_sock;
    let state = absolute(&args.state)?;
    let memory = absolute(&args.memory)?;
    let (status, body) = request(sock, "GET", "/", None, SHORT)?;
    if status != 200 {
        return Err(format!("the VM says: {}", fault_message(&body)));
    }
    let info: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let was_running = info["state"] == "Running";
    if was_running {
        let (status, body) = request(
            sock,
            "PATCH",
            "/vm",
            Some(&json!({"state": "Paused"})),
            SHORT,
        )?;
        if status != 204 {
            return Err(format!("cannot pause the VM: {}", fault_message(&body)));
        }
    }
    let result = write_snapshot(sock, &state, &memory, SNAPSHOT_TIMEOUT);
    if was_running {
        let resumed = request(
            sock,
            "PATCH",
            "/vm",
            Some(&json!({"state": "Resumed"})),
            SHORT,
        );
        match resumed {
            Ok((204, _)) => {}
            Ok((_, body)) => eprintln!("ligera: cannot resume the VM: {}", fault_message(&body)),
            Err(e) => eprintln!("ligera: cannot resume the VM: {e}"),
        }
    }
    if result.is_err() {
        // No half-written snapshot is left to be restored later.
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(&memory);
    }
    result
}

/// Has the paused VM on control socket `sock` write its snapshot to
/// `state` and `memory`, which we open (created or replaced, mode 0600)
/// and hand over: the VM, jailed, could not open them itself.
pub fn write_snapshot(
    sock: &Path,
    state: &Path,
    memory: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let (s, m) = (open(state)?, open(memory)?);
    let (status, body) = request_with_fds(
        sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({
            "snapshot_type": "Full",
            "snapshot_path": state,
            "mem_file_path": memory,
        })),
        &[s.as_raw_fd(), m.as_raw_fd()],
        timeout,
    )?;
    if status != 204 {
        return Err(fault_message(&body));
    }
    Ok(())
}

/// `ligera snapshot restore`: the snapshot's configuration with this
/// command's overrides, marked for restoring; or the exit status of why not.
pub fn restore_config(
    args: SnapshotRestoreArgs,
) -> Result<(VmConfig, crate::jail::JailOptions), i32> {
    let snapshot = match super::read_state(&args.state) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ligera: error: cannot restore the snapshot: {e}");
            return Err(EXIT_VMM_ERROR);
        }
    };
    let snapshot = std::sync::Arc::new(snapshot);
    let mut config = snapshot.config.clone();
    config.serial = args.serial;
    config.api_socket = args.api_sock;
    config.seccomp = args.seccomp == OnOff::On;
    if let Some(path) = args.vsock_socket {
        match &mut config.vsock {
            Some(v) => v.socket = path,
            None => {
                eprintln!(
                    "ligera: error: --vsock-socket: the snapshot's VM has no vsock device \
                     (see 'ligera snapshot restore --help')"
                );
                return Err(EXIT_USAGE);
            }
        }
    }
    config.restore = Some(RestoreConfig {
        state: args.state,
        memory: args.memory,
        read: crate::config::ReadState(Some(snapshot)),
        memory_id: None,
    });
    Ok((config, args.jail))
}
