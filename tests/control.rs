//! The control socket (`--api-sock`) end to end: the real `ligera` running
//! the test guest in its counting mode, steered over HTTP on the Unix
//! socket; paused, the guest stops counting; resumed, it goes on from where
//! it was. Hostile clients (silent, slow, malformed, oversized, too many)
//! get errors or are dropped, while the guest and other clients carry on.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Running, guests};

fn socket_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("control-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("api.sock")
}

/// Starts the counting guest with a control socket at `sock`.
fn counting_vm(sock: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::counting_guest(&args)
}

/// One request on a new connection; returns the status and the body.
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut UnixStream) -> (u16, String) {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The COUNT values the guest printed.
fn counts(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("COUNT "))
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .collect()
}

#[test]
fn pause_resume_and_stop_through_the_control_socket() {
    let sock = socket_path("lifecycle");
    let mut vm = counting_vm(&sock, &[]);
    let (status, body) = http(&sock, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    // Every thread runs under a seccomp filter: the event loop (ligera),
    // the control socket, the console's input and the vCPU.
    assert_eq!(
        common::filtered_threads(vm.pid()),
        ["api", "console-in", "ligera", "vcpu0"]
    );
    assert!(body.contains("\"state\":\"Running\""), "{body}");
    assert!(body.contains("\"app_name\":\"ligera\""), "{body}");

    let (status, body) = http(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(status, 204, "{body}");
    assert!(
        http(&sock, "GET", "/", "")
            .1
            .contains("\"state\":\"Paused\"")
    );
    // Paused: whatever the guest wrote before is out after a moment, then nothing.
    let before = counts(&vm.collect_for(Duration::from_millis(300)));
    let during = counts(&vm.collect_for(Duration::from_millis(1500)));
    assert!(!before.is_empty());
    assert_eq!(before, during, "the guest counted while paused");
    // Pausing twice is fine.
    assert_eq!(http(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);

    let last = *during.last().unwrap();
    let (status, body) = http(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(status, 204, "{body}");
    vm.wait_for(&format!("COUNT {:x}\n", last + 3), Duration::from_secs(30));
    let all = counts(&vm.collect_for(Duration::ZERO));
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "counting goes on from where it stopped: {all:?}"
    );

    let (status, body) = http(&sock, "PUT", "/actions", r#"{"action_type": "Stop"}"#);
    assert_eq!(status, 204, "{body}");
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.status, 0, "{out}");
    assert!(out.stderr.is_empty(), "{out}");
    assert!(!sock.exists(), "the socket file is removed at exit");
}

#[test]
fn ctrl_alt_del_reaches_the_guest_keyboard() {
    let sock = socket_path("cad");
    let mut vm = counting_vm(&sock, &[]);
    let (status, body) = http(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(status, 204, "{body}");
    vm.wait_for("KBD 9d\n", Duration::from_secs(30));
    let out = vm.collect_for(Duration::ZERO);
    let keys: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("KBD ")).collect();
    assert_eq!(keys, ["1d", "38", "e0", "53", "e0", "d3", "b8", "9d"]);
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    assert_eq!(vm.finish(Duration::from_secs(30)).status, 143);
}

#[test]
fn curl_and_bad_requests() {
    let sock = socket_path("curl");
    let vm = counting_vm(&sock, &["--cpus", "2", "--rng"]);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            sock.to_str().unwrap(),
            "http://localhost/vm/config",
        ])
        .output()
        .expect("curl (resources/setup.sh installs it)");
    let config: String = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{config}");
    for want in [
        "\"machine-config\":{",
        "\"vcpu_count\":2",
        "\"mem_size_mib\":32",
        "\"boot_args\":\"test=count\"",
        "\"entropy\":{}",
    ] {
        assert!(config.contains(want), "{want} in {config}");
    }
    for (method, path, body, want) in [
        ("GET", "/nothing", "", "GET /nothing"),
        ("DELETE", "/vm", "", "DELETE /vm"),
        ("PATCH", "/vm", r#"{"state": "Asleep"}"#, "Asleep"),
        (
            "PATCH",
            "/vm",
            r#"{"state": "Paused", "extra": 1}"#,
            "extra",
        ),
        ("PATCH", "/vm", "{not json", "PATCH /vm"),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Explode"}"#,
            "Explode",
        ),
        ("PUT", "/actions", "", "PUT /actions"),
    ] {
        let (status, text) = http(&sock, method, path, body);
        assert_eq!(status, 400, "{method} {path} {body}: {text}");
        assert!(
            text.contains("fault_message") && text.contains(want),
            "{text}"
        );
    }
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    assert_eq!(vm.finish(Duration::from_secs(30)).status, 143);
}

#[test]
fn hostile_clients_stall_neither_the_vm_nor_other_clients() {
    let sock = socket_path("hostile");
    let mut vm = counting_vm(&sock, &[]);
    // Silent connections, more than the server keeps.
    let silent: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // A slow client: half a request, then nothing.
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A client that pipelines requests and never reads the answers.
    let mut deaf = UnixStream::connect(&sock).unwrap();
    deaf.set_nonblocking(true).unwrap();
    let request = b"GET /vm/config HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..20_000 {
        if deaf.write(request).is_err() {
            break;
        }
    }
    // Garbage and an oversized body get 400 and a closed connection.
    let mut garbage = UnixStream::connect(&sock).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    garbage.write_all(b"\x00\xff\x13 nonsense\r\n\r\n").unwrap();
    let (status, body) = read_response(&mut garbage);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("fault_message"), "{body}");
    let mut big = UnixStream::connect(&sock).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    big.write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n{")
        .unwrap();
    let (status, body) = read_response(&mut big);
    assert_eq!(status, 400, "{body}");

    // A well-behaved client is still served at once, and the guest still counts.
    let start = Instant::now();
    let (status, _) = http(&sock, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let before = counts(&vm.collect_for(Duration::ZERO)).len();
    let after = counts(&vm.collect_for(Duration::from_millis(500))).len();
    assert!(after > before, "the guest went on counting");

    // The half request times out with 408.
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (status, body) = read_response(&mut slow);
    assert_eq!(status, 408, "{body}");
    drop(silent);

    let (status, _) = http(&sock, "PUT", "/actions", r#"{"action_type": "Stop"}"#);
    assert_eq!(status, 204);
    assert_eq!(vm.finish(Duration::from_secs(30)).status, 0);
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let sock = socket_path("twice");
    let vm = counting_vm(&sock, &[]);
    let g = guests();
    let out = common::run_guest(
        &g.elf64,
        &["--memory", "32M", "--api-sock", sock.to_str().unwrap()],
    );
    assert_eq!(out.status, 1, "{out}");
    assert!(out.stderr.contains("in use"), "{out}");
    assert_eq!(
        http(&sock, "GET", "/", "").0,
        200,
        "the first VM keeps its socket"
    );
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    assert_eq!(vm.finish(Duration::from_secs(30)).status, 143);
    assert!(!sock.exists());
}
