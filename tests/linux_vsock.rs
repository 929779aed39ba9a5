//! Linux end to end over virtio-vsock: the resources/ guest kernel and the
//! busybox initramfs (with `/bin/vsock-echo`, resources/initramfs/
//! vsock-echo.c) booted by the real `ligera` with `--vsock`; the test talks
//! to the guest through the hybrid-vsock Unix sockets, both ways. Ignored
//! by a plain `cargo test` (each boot takes seconds here); `resources/test.sh`
//! runs it with `--include-ignored`. Conventions and helpers as in linux.rs.

mod common;

use common::linux::{BOOT_TIMEOUT, CMDLINE, MARKER, busybox_initramfs, one_at_a_time};

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Outcome, connect_to_guest, spawn};

fn socket_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("linux-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("v.sock")
}

/// Boots Linux with a vsock device at `socket` running `cmd` in the guest;
/// `host` plays the host side once the init marker shows.
fn boot_with_vsock(socket: &Path, cmd: &str, host: impl FnOnce()) -> Outcome {
    let _one_at_a_time = one_at_a_time();
    let kernel = common::linux::kernel("vmlinux");
    let initrd = busybox_initramfs();
    let cmdline = format!("{CMDLINE} ligera.cmd=\"{cmd}\"");
    let vsock = format!("cid=3,socket={}", socket.display());
    let start = Instant::now();
    let mut vm = spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "128M",
        "--cmdline",
        &cmdline,
        "--vsock",
        &vsock,
    ]);
    vm.wait_for(MARKER, BOOT_TIMEOUT);
    host();
    let out = vm.finish(BOOT_TIMEOUT);
    eprintln!(
        "linux vsock ({cmd}): exit {} after {:.2} s",
        out.status,
        start.elapsed().as_secs_f64()
    );
    out
}

/// Reads until EOF (or a reset), at most `timeout`.
fn read_to_end(s: &mut UnixStream, timeout: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(timeout)).unwrap();
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

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn host_connects_to_a_linux_vsock_echo_server() {
    let socket = socket_path("echo");
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + 7) as u8).collect();
    let mut echoed = Vec::new();
    let out = boot_with_vsock(&socket, "vsock-echo 5000", || {
        let mut s = connect_to_guest(&socket, 5000, Instant::now() + BOOT_TIMEOUT);
        // Write from another thread while we read: more than any buffer holds.
        let mut writer = s.try_clone().unwrap();
        let data = sent.clone();
        let t = std::thread::spawn(move || {
            writer.write_all(&data).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        echoed = read_to_end(&mut s, Duration::from_secs(120));
        t.join().unwrap();
    });
    assert_eq!(out.status, 0, "{out}");
    assert_eq!(echoed.len(), sent.len(), "{out}");
    assert!(echoed == sent, "the echo differs from what we sent");
    assert!(
        out.stdout
            .contains(&format!("vsock-echo: echoed {} bytes", sent.len())),
        "{out}"
    );
    assert!(out.stdout.contains("LIGERA-CMD-EXIT=0"), "{out}");
    assert!(!socket.exists(), "socket file left behind");
    // Linux's driver is well behaved: no device warnings.
    assert!(!out.stderr.contains("vsock"), "{out}");
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn linux_guest_connects_to_a_host_port() {
    let socket = socket_path("client");
    // The guest connects to host port 5001: the Unix socket PATH_5001.
    let listener = common::guest_port_listener(Path::new(&format!("{}_5001", socket.display())));
    let server = std::thread::spawn(move || {
        let mut s = common::accept_within(&listener, Duration::from_secs(300));
        let got = read_to_end(&mut s, Duration::from_secs(120));
        s.write_all(b"hello-from-the-host").unwrap();
        got
    });
    let out = boot_with_vsock(&socket, "vsock-echo -c 5001 hello-from-linux", || {});
    assert_eq!(out.status, 0, "{out}");
    assert_eq!(server.join().unwrap(), b"hello-from-linux", "{out}");
    assert!(
        out.stdout.contains("vsock-echo: got hello-from-the-host"),
        "{out}"
    );
    assert!(out.stdout.contains("LIGERA-CMD-EXIT=0"), "{out}");
    assert!(!out.stderr.contains("vsock"), "{out}");
}
