//! Sandboxes start from a snapshot instead of booting.
//!
//! The first sandbox of an (image, kernel, agent, vCPUs, memory, disk size)
//! boots a VM once with `ligera run`, waits until its agent answers, and
//! snapshots it there: guest RAM, the VM's state and its scratch disk as it
//! was at that moment. That template is kept in the cache
//! (`~/.cache/ligera/snapshots/sandbox-KEY/`). Every sandbox after it gets
//! a copy of the template's scratch disk (sparse: a few MiB) and restores
//! the snapshot, whose memory is mapped copy-on-write: no kernel boot, no
//! agent start. The agent reseeds the guest's RNG and sets its clock from
//! the host's with every session (see `agent::protocol::Hello`), so clones
//! do not share random numbers or a stale time.
//!
//! Sandboxes with `--net` boot cold: their guest's network address is part
//! of what it booted with.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::client::{fault_message, request};
use crate::config::{RestoreConfig, SerialConfig, VmConfig};

/// A template's files.
pub struct Template {
    pub state: PathBuf,
    pub memory: PathBuf,
    pub scratch: PathBuf,
}

/// The scratch disk's id in a sandbox configuration.
const SCRATCH: &str = "scratch";

/// Turns a sandbox VM's configuration (as `prepare` made it) into one that
/// restores the cached template, making the template first if there is
/// none. The scratch disk named in `config` becomes a copy of the
/// template's.
pub fn restore_from_template(config: &mut VmConfig) -> Result<(), String> {
    let scratch = config
        .disks
        .iter()
        .find(|d| d.id.as_deref() == Some(SCRATCH))
        .map(|d| d.path.clone())
        .ok_or("no scratch disk")?;
    let size = std::fs::metadata(&scratch)
        .map_err(|e| format!("{}: {e}", scratch.display()))?
        .len();
    let dir = crate::image::cache_dir()
        .map_err(|e| e.to_string())?
        .join("snapshots")
        .join(format!("sandbox-{}", key(config, size)?));
    let template = Template {
        state: dir.join("state"),
        memory: dir.join("memory"),
        scratch: dir.join("scratch.ext4"),
    };
    let made = (|| {
        if !template.state.exists() {
            let parent = dir.parent().unwrap_or(&dir);
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            // One sandbox makes it; the others started meanwhile wait for it.
            let _lock = lock(&dir.with_extension("lock"))?;
            if !template.state.exists() {
                prune(parent);
                make(config, &dir, size)?;
            }
        }
        Ok::<(), String>(())
    })();
    if let Err(e) = made {
        // The sandbox still runs, booted: slower, but the same.
        log::warn!("no snapshot to start the sandbox from ({e}): booting it");
        return Ok(());
    }
    // Marks it used (see `prune`).
    let _ = std::fs::File::open(&dir).and_then(|d| d.set_modified(std::time::SystemTime::now()));
    copy_sparse(&template.scratch, &scratch)?;
    // Read here, outside the jail; a state file that does not read is
    // said by the builder, which reads it again.
    let read = crate::snapshot::read_state(&template.state).ok();
    config.restore = Some(RestoreConfig {
        state: template.state,
        memory: template.memory,
        read: crate::config::ReadState(read.map(std::sync::Arc::new)),
        memory_id: None,
    });
    Ok(())
}

/// Templates unused for this long are removed when a new one is made
/// (a new ligera build, kernel or image makes new ones).
const UNUSED: Duration = Duration::from_secs(24 * 3600);

/// Removes templates not used for [`UNUSED`], and leftovers of makers that
/// died. A sandbox running from a removed template keeps its mapping.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNUSED);
        let dead_maker = name
            .rsplit_once(".tmp")
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
            // SAFETY: kill with signal 0 only checks that the process exists.
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } != 0);
        if name.starts_with("sandbox-") && (old || dead_maker) {
            log::info!("removing the sandbox snapshot {}", e.path().display());
            let path = e.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// Holds an exclusive lock on `path` (made if missing) until dropped.
fn lock(path: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; the lock goes with it.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

/// What decides a template: everything the guest booted with, and the
/// ligera and agent that made it (a new build makes a new template).
fn key(config: &VmConfig, scratch_size: u64) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |p: &Path| -> Result<String, String> {
        let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(format!(
            "{}:{}:{}:{}",
            p.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ))
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find ligera itself: {e}"))?;
    let mut h = Sha256::new();
    h.update(stamp(&exe)?);
    h.update(stamp(&config.kernel)?);
    h.update(&config.cmdline);
    h.update(format!(
        "v{} cpus {} mem {} scratch {} seccomp {}",
        crate::snapshot::VERSION,
        config.vcpus,
        config.mem_size,
        scratch_size,
        config.seccomp
    ));
    for d in &config.disks {
        if d.id.as_deref() != Some(SCRATCH) {
            // Image and agent disks are named by their content.
            h.update(d.path.display().to_string());
        }
    }
    let digest = h.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Removes a half-made template directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots the sandbox VM with `ligera run`, snapshots it once its agent
/// answers, and publishes the template at `dir`.
fn make(config: &VmConfig, dir: &Path, scratch_size: u64) -> Result<(), String> {
    let started = Instant::now();
    eprintln!(
        "ligera: booting the sandbox VM once to snapshot it \
         (kept for this image, kernel, vCPUs and memory)..."
    );
    let parent = dir.parent().ok_or("no cache directory")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let tmp = Scratch(dir.with_extension(format!("tmp{}", std::process::id())));
    std::fs::create_dir(&tmp.0).map_err(|e| format!("{}: {e}", tmp.0.display()))?;
    let scratch = tmp.0.join("scratch.ext4");
    crate::image::scratch_disk(&scratch, scratch_size).map_err(|e| e.to_string())?;
    let (vsock, api) = (tmp.0.join("v.sock"), tmp.0.join("api.sock"));

    let exe = std::env::current_exe().map_err(|e| format!("cannot find ligera itself: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run", "--kernel"])
        .arg(&config.kernel)
        .args(["--cmdline", &config.cmdline])
        .args(["--cpus", &config.vcpus.to_string()])
        .args(["--memory", &format!("{}K", config.mem_size >> 10)])
        .arg("--serial")
        .arg(format!("file={}", tmp.0.join("console.log").display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", vsock.display()))
        .arg("--api-sock")
        .arg(&api);
    if !config.seccomp {
        cmd.args(["--seccomp", "off"]);
    }
    for d in &config.disks {
        let path = if d.id.as_deref() == Some(SCRATCH) {
            &scratch
        } else {
            &d.path
        };
        let mut spec = format!("path={}", path.display());
        if d.readonly {
            spec.push_str(",readonly=on");
        }
        if let Some(id) = &d.id {
            spec.push_str(&format!(",id={id}"));
        }
        cmd.arg("--disk").arg(spec);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the template VM: {e}"))?;
    let result = snapshot_when_ready(&mut child, &vsock, &api, &tmp.0);
    // The VM is paused (or failed): stop it, without resuming it, so its
    // scratch disk stays as the snapshot saw it.
    let _ = request(
        &api,
        "PUT",
        "/actions",
        Some(&json!({"action_type": "Stop"})),
        Duration::from_secs(5),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait();
    if let Err(e) = result {
        let mut stderr = String::new();
        if let Some(mut s) = child.stderr.take() {
            use std::io::Read;
            let _ = s.read_to_string(&mut stderr);
        }
        let log = std::fs::read_to_string(tmp.0.join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        return Err(format!(
            "cannot make the sandbox snapshot: {e} ({}{}{})",
            status.map(|s| s.to_string()).unwrap_or_default(),
            stderr
                .trim()
                .lines()
                .last()
                .map(|l| format!("; {l}"))
                .unwrap_or_default(),
            if tail.is_empty() {
                String::new()
            } else {
                format!(
                    "; console: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )
            }
        ));
    }
    for f in ["v.sock", "api.sock", "console.log"] {
        let _ = std::fs::remove_file(tmp.0.join(f));
    }
    match std::fs::rename(&tmp.0, dir) {
        Ok(()) => {}
        // Another sandbox made the same template meanwhile: use theirs.
        Err(_) if dir.join("state").exists() => {}
        Err(e) => return Err(format!("cannot publish {}: {e}", dir.display())),
    }
    eprintln!(
        "ligera: sandbox snapshot ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits for the agent to answer, then has ligera write the snapshot.
fn snapshot_when_ready(
    child: &mut std::process::Child,
    vsock: &Path,
    api: &Path,
    dir: &Path,
) -> Result<(), String> {
    let child = std::cell::RefCell::new(child);
    let stream = super::client::connect(vsock, super::BOOT_TIMEOUT, || {
        child.borrow_mut().try_wait().ok().flatten().is_some()
    })
    .map_err(|e| e.to_string())?;
    super::client::ping(stream).map_err(|e| e.to_string())?;
    // One command first, its output dropped: the guest's exec path and the
    // image's common pages are then warm in the snapshot, which spares
    // every sandbox started from it a first-exec cost (about 1 s here).
    let warm = agent::protocol::ExecRequest {
        argv: vec!["true".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..Default::default()
    };
    let died = || child.borrow_mut().try_wait().ok().flatten().is_some();
    let _ = super::client::connect(vsock, super::BOOT_TIMEOUT, died)
        .and_then(|s| super::client::run_command(s, &warm, None, std::io::sink(), std::io::sink()));
    let (status, body) = request(
        api,
        "PATCH",
        "/vm",
        Some(&json!({"state": "Paused"})),
        Duration::from_secs(10),
    )?;
    if status != 204 {
        return Err(format!("cannot pause it: {}", fault_message(&body)));
    }
    crate::snapshot::cli::write_snapshot(
        api,
        &dir.join("state"),
        &dir.join("memory"),
        crate::snapshot::cli::SNAPSHOT_TIMEOUT,
    )
}

/// Copies `from` to `to` (replaced), keeping its holes: only the data
/// ranges are copied (SEEK_DATA/SEEK_HOLE, copy_file_range).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let err = |p: &Path, e: std::io::Error| format!("cannot copy {}: {e}", p.display());
    let src = std::fs::File::open(from).map_err(|e| err(from, e))?;
    let len = src.metadata().map_err(|e| err(from, e))?.len();
    let dst = std::fs::File::create(to).map_err(|e| err(to, e))?;
    dst.set_len(len).map_err(|e| err(to, e))?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let (mut off_in, mut off_out) = (data, data);
        while off_in < end {
            // SAFETY: copies between two descriptors we own, at offsets we
            // pass. The system call itself: the static binary's libc
            // wrapper can be a null weak symbol.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_copy_file_range,
                    src.as_raw_fd(),
                    &mut off_in as *mut i64,
                    dst.as_raw_fd(),
                    &mut off_out as *mut i64,
                    (end - off_in) as usize,
                    0u32,
                )
            };
            if n <= 0 {
                return Err(err(from, std::io::Error::last_os_error()));
            }
        }
        pos = end;
    }
    Ok(())
}

/// Whether a sandbox with these options starts from a snapshot.
pub fn eligible(config: &VmConfig, no_snapshot: bool) -> bool {
    !no_snapshot
        && config.nets.is_empty()
        && matches!(config.serial, SerialConfig::File(_))
        && std::env::var_os("LIGERA_SANDBOX_SNAPSHOT").is_none_or(|v| v != "off")
}
