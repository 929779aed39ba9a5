//! ligera as `firecracker`: a link of that name to the ligera binary takes
//! Firecracker's command line and API. Driven with curl, as Firecracker's
//! published API description says, against the test guest and (with
//! --include-ignored) a Linux guest, which is snapshotted through the API
//! and restored side by side by `firecracker` and `ligera snapshot restore`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{LIGERA, Running, guests, spawn_program};

/// A scratch directory holding a `firecracker` link to ligera.
fn work_dir(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ligera-fc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("firecracker");
    std::os::unix::fs::symlink(LIGERA, &link).unwrap();
    (dir, link)
}

/// One request with curl; returns the status and the body.
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "120", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    cmd.arg(format!("http://localhost{path}"));
    let out = cmd.output().expect("curl (resources/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl: {text} {out:?}")),
        body.to_string(),
    )
}

/// A request that must succeed with 204.
fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, text) = curl(sock, method, path, Some(body));
    assert_eq!(status, 204, "{method} {path} {body}: {text}");
}

/// A request that must fail with 400 and a fault message containing `says`.
fn refused(sock: &Path, method: &str, path: &str, body: Option<&str>, says: &str) {
    let (status, text) = curl(sock, method, path, body);
    assert_eq!(status, 400, "{method} {path}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let message = v["fault_message"].as_str().unwrap();
    assert!(message.contains(says), "{method} {path}: {message}");
}

fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(link: &Path, sock: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let vm = spawn_program(link, &args);
    wait_for_socket(sock);
    vm
}

fn signal(vm: &Running, sig: i32) {
    // SAFETY: kill(2) on a child we started; no memory is involved.
    unsafe { libc::kill(vm.pid(), sig) };
}

fn counts(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("COUNT "))
        .filter_map(|n| u64::from_str_radix(n.trim(), 16).ok())
        .collect()
}

#[test]
fn configure_start_pause_snapshot_and_load_through_firecrackers_api() {
    let (dir, link) = work_dir("api");
    let sock = dir.join("api.sock");
    let kernel = guests().elf64.to_str().unwrap().to_string();
    let metrics = dir.join("metrics.json");
    // Log and metrics files must exist, as in Firecracker.
    std::fs::write(&metrics, b"").unwrap();
    let mut vm = start(&link, &sock, &["--id", "fc-test-1"]);

    // Before the start: what Firecracker answers with defaults.
    let (status, text) = curl(&sock, "GET", "/version", None);
    assert_eq!(status, 200);
    assert!(text.contains("firecracker_version"), "{text}");
    let (_, text) = curl(&sock, "GET", "/", None);
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (info["id"].as_str(), info["state"].as_str()),
        (Some("fc-test-1"), Some("Not started"))
    );
    let (_, text) = curl(&sock, "GET", "/machine-config", None);
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(1), Some(128))
    );

    // Unsupported and post-boot requests are refused, naming the reason.
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 32, "smt": true}"#),
        "'smt'",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 32, "turbo": 1}"#),
        "unknown field `turbo`",
    );
    refused(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": false}"#),
        "not supported by ligera",
    );
    refused(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "before starting",
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "PUT /boot-source first",
    );
    refused(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
        "No such file",
    );
    // A named pipe would block whoever opens it; a client creates no file.
    let fifo = dir.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    refused(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(r#"{{"kernel_image_path": "{}"}}"#, fifo.display())),
        "not a regular file",
    );
    let missing = dir.join("missing-metrics.json");
    refused(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, missing.display())),
        "No such file",
    );
    assert!(!missing.exists());
    refused(
        &sock,
        "PUT",
        "/drives/rootfs",
        Some(r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": true}"#),
        "does not match",
    );

    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{kernel}", "boot_args": "test=count"}}"#),
    );
    ok(
        &sock,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vm.wait_for("COUNT 3\n", Duration::from_secs(30));

    // After the start: configuration is closed, lifecycle is open.
    refused(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(r#"{{"kernel_image_path": "{kernel}"}}"#)),
        "after starting",
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "after starting",
    );
    let (_, text) = curl(&sock, "GET", "/", None);
    assert!(text.contains("\"Running\""), "{text}");
    let (_, text) = curl(&sock, "GET", "/vm/config", None);
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(c["machine-config"]["mem_size_mib"].as_u64(), Some(32));
    assert_eq!(c["boot-source"]["boot_args"].as_str(), Some("test=count"));

    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        ),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    );
    let line = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(m["utc_timestamp_ms"].as_u64().unwrap() > 0, "{line}");
    assert!(
        m["ligera"]["api_requests"].as_u64().unwrap() >= 10,
        "{line}"
    );
    let at_snapshot = *counts(&vm.collect_for(Duration::from_millis(300)))
        .last()
        .unwrap();

    // SIGTERM ends the process and removes its socket.
    signal(&vm, libc::SIGTERM);
    let out = vm.finish(Duration::from_secs(10));
    assert_eq!(out.status, 128 + libc::SIGTERM, "{}", out.stderr);
    assert!(!sock.exists(), "the API socket was left behind");

    // A second process loads the snapshot, paused, and resumes it: the guest
    // counts on from where it was.
    let mut second = start(&link, &sock, &[]);
    refused(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "/u"}}}}"#,
            state.display()
        )),
        "'Uffd'",
    );
    ok(
        &sock,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
            state.display(),
            memory.display()
        ),
    );
    let (_, text) = curl(&sock, "GET", "/", None);
    assert!(text.contains("\"Paused\""), "{text}");
    assert!(
        counts(&second.collect_for(Duration::from_millis(300))).is_empty(),
        "a paused VM ran"
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    second.wait_for(
        &format!("COUNT {:x}\n", at_snapshot + 3),
        Duration::from_secs(30),
    );
    let resumed = counts(&second.collect_for(Duration::from_millis(10)));
    assert!(
        resumed[0] <= at_snapshot + 1,
        "restored at {resumed:?}, snapshot at {at_snapshot}"
    );
    ok(&sock, "PUT", "/actions", r#"{"action_type": "Stop"}"#);
    let out = second.finish(Duration::from_secs(10));
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(!sock.exists());

    // A snapshot load after configuring something is refused.
    let third = start(&link, &sock, &[]);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        )),
        "after configuring",
    );
    signal(&third, libc::SIGINT);
    assert_eq!(
        third.finish(Duration::from_secs(10)).status,
        128 + libc::SIGINT
    );
    assert!(!sock.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_file_without_api_and_the_boot_timer() {
    let (dir, link) = work_dir("file");
    let config = dir.join("vm.json");
    let log = dir.join("fc.log");
    std::fs::write(&log, b"").unwrap();
    std::fs::write(
        &config,
        format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{}", "boot_args": "test=boottimer"}},
              "drives": [],
              "machine-config": {{"vcpu_count": 1, "mem_size_mib": 32, "smt": false}},
              "network-interfaces": [],
              "logger": {{"level": "Info", "log_path": "{}"}}
            }}"#,
            guests().elf64.display(),
            log.display()
        ),
    )
    .unwrap();
    let mut vm = spawn_program(
        &link,
        &[
            "--no-api",
            "--boot-timer",
            "--config-file",
            config.to_str().unwrap(),
        ],
    );
    vm.wait_for("BOOTTIMER written", Duration::from_secs(30));
    // The guest halts; the log says how long its boot took.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Guest-boot-time = ") {
            break;
        }
        assert!(Instant::now() < deadline, "no boot time logged: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&vm, libc::SIGTERM);
    vm.finish(Duration::from_secs(10));

    // Mistakes in the file, and --no-api alone, fail before any VM runs.
    std::fs::write(&config, r#"{"boot-source": {"kernel_image_path": "/k"}, "mmds-config": {"network_interfaces": []}}"#).unwrap();
    let out = spawn_program(
        &link,
        &["--no-api", "--config-file", config.to_str().unwrap()],
    )
    .finish(Duration::from_secs(10));
    assert_eq!(out.status, 1);
    assert!(out.stderr.contains("'mmds-config'"), "{}", out.stderr);
    let out = spawn_program(&link, &["--no-api"]).finish(Duration::from_secs(10));
    assert_eq!(out.status, 2, "{}", out.stderr);
    let out = spawn_program(&link, &["--version"]).finish(Duration::from_secs(10));
    assert!(out.stdout.starts_with("Firecracker v"), "{}", out.stdout);
    let out = spawn_program(&link, &["--seccomp-filter", "x"]).finish(Duration::from_secs(10));
    assert_eq!(out.status, 2, "{}", out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The TICK lines of the Linux guest's loop: `(n, boot_id, disk text)`.
fn ticks(output: &str) -> Vec<(u64, String, String)> {
    output
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("TICK "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.to_string(),
                w.next().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn linux_booted_through_the_api_is_snapshotted_and_restored_side_by_side() {
    use common::linux::{BOOT_TIMEOUT, CMDLINE, busybox_initramfs, kernel, one_at_a_time};
    use std::io::{Read, Write};
    let _one = one_at_a_time();
    let (dir, link) = work_dir("linux");
    let disk = dir.join("disk");
    let mut bytes = b"BEFORE-SNAPSHOT".to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&disk, &bytes).unwrap();
    // Every second: a count, the boot id, and the disk's first bytes read
    // past the page cache; a vsock echo server listens on port 5000.
    let cmd = "vsock-echo 5000 & i=0; while :; do echo 1 > /proc/sys/vm/drop_caches; \
               echo TICK $i $(cat /proc/sys/kernel/random/boot_id) $(head -c 15 /dev/vda); \
               i=$((i+1)); sleep 1; done";
    let boot_args = format!("{CMDLINE} ligera.cmd=\\\"{cmd}\\\"");
    let sock = dir.join("api.sock");
    let mut vm = start(&link, &sock, &["--id", "linux-1"]);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{boot_args}"}}"#,
            kernel("vmlinux").display(),
            busybox_initramfs().display()
        ),
    );
    ok(
        &sock,
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
            disk.display()
        ),
    );
    ok(
        &sock,
        "PUT",
        "/vsock",
        &format!(
            r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
            dir.join("v.sock").display()
        ),
    );
    ok(&sock, "PUT", "/entropy", "{}");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vm.wait_for("TICK 2 ", BOOT_TIMEOUT);

    let (state, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        ),
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let before = ticks(&vm.collect_for(Duration::from_millis(200)));
    signal(&vm, libc::SIGTERM);
    assert_eq!(vm.finish(Duration::from_secs(60)).status, 143);
    let (last, boot_id, text) = before.last().cloned().unwrap();
    assert_eq!(text, "BEFORE-SNAPSHOT");

    // The disk changes under the clones: they read it anew. One clone is
    // loaded by a second `firecracker`, one by `ligera snapshot restore`,
    // side by side.
    bytes[..15].copy_from_slice(b"AFTER-SNAPSHOT!");
    std::fs::write(&disk, &bytes).unwrap();
    let (v0, v1) = (dir.join("v0.sock"), dir.join("v1.sock"));
    let sock2 = dir.join("api2.sock");
    let loaded = start(&link, &sock2, &[]);
    ok(
        &sock2,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "vsock_override": {{"uds_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            memory.display(),
            v0.display()
        ),
    );
    let restored = common::spawn(&[
        "snapshot",
        "restore",
        "--state",
        state.to_str().unwrap(),
        "--memory",
        memory.to_str().unwrap(),
        "--vsock-socket",
        v1.to_str().unwrap(),
    ]);
    let (_, text) = curl(&sock2, "GET", "/vm/config", None);
    assert!(text.contains("\"drive_id\":\"data\""), "{text}");
    let mut clones = [(loaded, v0), (restored, v1)];
    for (clone, vsock) in &mut clones {
        clone.wait_for("AFTER-SNAPSHOT!", BOOT_TIMEOUT);
        let seen = ticks(&clone.collect_for(Duration::ZERO));
        let (first, ..) = seen[0];
        assert!(
            first <= last + 2 && first + 2 >= last,
            "the clone counts on from {last}, not from a boot: {seen:?}"
        );
        assert!(
            seen.iter().all(|(_, id, _)| *id == boot_id),
            "the same boot: {seen:?}"
        );
        // The guest's vsock listener survived; new connections work.
        let mut s = common::connect_to_guest(vsock, 5000, Instant::now() + BOOT_TIMEOUT);
        s.write_all(b"hello after restore").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echo = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = s.read_to_end(&mut echo);
        assert_eq!(echo, b"hello after restore");
    }
    for (clone, _) in clones {
        signal(&clone, libc::SIGTERM);
        let out = clone.finish(Duration::from_secs(60));
        assert_eq!(out.status, 143, "{out}");
    }
    assert!(!sock2.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
