//! virtio-vsock end to end: the test guest's vsock driver (tests/guests/
//! virtio-vsock.c) booted by the real `ligera`, talking to this test over
//! the hybrid-vsock Unix sockets, both ways, byte for byte.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fnv1a, guests, spawn};

/// The test guest's ports (tests/guests/virtio-vsock.c).
const OUT_PORT: u32 = 5001;
const LISTEN_PORT: u32 = 6000;
const OUT_LEN: usize = 3000;
const IN_LEN: usize = 2000;

fn tmpdir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn vsock_arg(path: &Path) -> String {
    format!("cid=3,socket={}", path.display())
}

/// Reads until EOF (or a reset, which also ends the stream), at most 10 s.
fn read_to_end(s: &mut UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("reading the vsock stream: {e} after {} bytes", out.len()),
        }
    }
}

/// Reads the `OK <port>\n` line byte by byte (what follows is the stream).
fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn guest_and_host_exchange_bytes_both_ways() {
    let dir = tmpdir("both-ways");
    let path = dir.join("v.sock");
    // Guest to host: the guest connects to host port 5001, which is the
    // Unix socket PATH_5001; we echo what comes and keep a copy.
    let echo_path = PathBuf::from(format!("{}_{OUT_PORT}", path.display()));
    let echo = common::guest_port_listener(&echo_path);
    let echo_thread = std::thread::spawn(move || {
        let mut s = common::accept_within(&echo, Duration::from_secs(120));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    s.write_all(&buf[..n]).unwrap();
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("echo: {e} after {} bytes", seen.len()),
            }
        }
        seen
    });

    let guest = guests().elf64.to_str().unwrap().to_string();
    let vsock = vsock_arg(&path);
    let mut vm = spawn(&[
        "run",
        "--kernel",
        &guest,
        "--no-host-quirks",
        "--memory",
        "32M",
        "--vsock",
        &vsock,
        "--cmdline",
        "test=virtio",
    ]);
    vm.close_stdin();
    vm.wait_for("VIRTIO-VSOCK listening", Duration::from_secs(60));

    // Host to guest, to a port nobody listens on: closed without an OK.
    let mut refused = UnixStream::connect(&path).unwrap();
    refused.write_all(b"CONNECT 6001\n").unwrap();
    assert_eq!(
        read_to_end(&mut refused),
        b"",
        "a refused CONNECT is just closed"
    );

    // Host to guest, to the guest's port: OK, then an echo of our bytes.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(format!("CONNECT {LISTEN_PORT}\n").as_bytes())
        .unwrap();
    let ok = read_line(&mut s);
    let host_port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("expected 'OK <port>', got {ok:?}"));
    assert!(ok.ends_with('\n'));
    let sent: Vec<u8> = (0..IN_LEN).map(|i| (i * 13 + 5) as u8).collect();
    s.write_all(&sent).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let echoed = read_to_end(&mut s);

    let out = vm.finish(Duration::from_secs(60));
    out.assert_ok();
    assert_eq!(echoed.len(), IN_LEN, "{out}");
    assert!(echoed == sent, "the echo differs from what we sent:\n{out}");

    // What the guest saw, and what reached our echo server.
    let seen = echo_thread.join().unwrap();
    let pattern: Vec<u8> = (0..OUT_LEN).map(|i| (i * 7 + 3) as u8).collect();
    assert!(
        seen == pattern,
        "guest bytes at PATH_{OUT_PORT} differ:\n{out}"
    );
    assert_eq!(out.field("VIRTIO-VSOCK ready", "cid"), "3");
    let o = out.line("VIRTIO-VSOCK out");
    for (k, v) in [
        ("connected", "1".to_string()),
        ("sent", format!("{OUT_LEN:x}")),
        ("echoed", format!("{OUT_LEN:x}")),
        ("out_echo", "ok".to_string()),
        ("rst", "1".to_string()),
    ] {
        assert_eq!(common::field(o, k), Some(v), "{k}:\n{out}");
    }
    let i = out.line("VIRTIO-VSOCK in");
    for (k, v) in [
        ("refused", "1".to_string()),
        ("accepted", "1".to_string()),
        ("in_bytes", format!("{IN_LEN:x}")),
        ("in_fnv", format!("{:x}", fnv1a(&sent))),
        ("echoed", format!("{IN_LEN:x}")),
        ("host_done", "1".to_string()),
        ("rst", "1".to_string()),
    ] {
        assert_eq!(common::field(i, k), Some(v), "{k}:\n{out}");
    }
    // The device kept to the guest's small buffer, and needed its updates.
    assert_eq!(out.field("VIRTIO-VSOCK credit", "violations"), "0", "{out}");
    assert_ne!(out.field("VIRTIO-VSOCK credit", "updates"), "0", "{out}");
    assert!(host_port >= 1 << 30, "{ok}");
    // Nothing for the operator to worry about.
    assert!(out.stderr.is_empty(), "{out}");
    // The socket file goes with ligera.
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn second_ligera_on_the_same_socket_fails_clearly() {
    let dir = tmpdir("twice");
    let path = dir.join("v.sock");
    let guest = guests().elf64.to_str().unwrap().to_string();
    let vsock = vsock_arg(&path);
    let args = [
        "run",
        "--kernel",
        &guest,
        "--no-host-quirks",
        "--memory",
        "32M",
        "--vsock",
        &vsock,
        "--cmdline",
        "test=hang",
    ];
    let mut first = spawn(&args);
    first.close_stdin();
    first.wait_for("HANG", Duration::from_secs(60));
    assert!(path.exists());

    let second = common::run(&args, Duration::from_secs(60));
    assert_eq!(second.status, 1, "{second}");
    let lines: Vec<&str> = second.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{second}");
    assert!(lines[0].contains(path.to_str().unwrap()), "{second}");
    assert!(lines[0].contains("in use"), "{second}");
    // The first one still owns (and serves) its socket.
    assert!(UnixStream::connect(&path).is_ok());

    // SIGTERM ends it the normal way: socket file removed.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.pid(), libc::SIGTERM) };
    let out = first.finish(Duration::from_secs(30));
    assert_eq!(out.status, 128 + libc::SIGTERM, "{out}");
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn stale_socket_is_replaced_and_bad_paths_fail_clearly() {
    let dir = tmpdir("stale");
    let path = dir.join("v.sock");
    // A socket file nobody listens on (a ligera that was killed).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let guest = guests().elf64.to_str().unwrap().to_string();
    let run = |socket: &Path| {
        let vsock = vsock_arg(socket);
        common::run(
            &[
                "run",
                "--kernel",
                &guest,
                "--no-host-quirks",
                "--memory",
                "32M",
                "--vsock",
                &vsock,
            ],
            Duration::from_secs(60),
        )
    };
    let out = run(&path);
    out.assert_ok();
    assert!(!path.exists());

    // A regular file is not ours to replace.
    std::fs::write(&path, b"keep me").unwrap();
    let out = run(&path);
    assert_eq!(out.status, 1, "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    assert!(out.stderr.contains(path.to_str().unwrap()), "{out}");
    assert!(out.stderr.contains("not a socket"), "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");

    // A directory that does not exist.
    let nowhere = dir.join("no/such/dir/v.sock");
    let out = run(&nowhere);
    assert_eq!(out.status, 1, "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    assert!(out.stderr.contains(nowhere.to_str().unwrap()), "{out}");
}
