//! The agent on the host (`--unix PATH --root /`): the protocol's exec,
//! streams, credit and exit statuses against real processes, in
//! milliseconds. The same agent boots as init in `tests/sandbox.rs`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use agent::protocol::{
    ExecRequest, ExitStatus, Hello, INITIAL_CREDIT, Kind, StartErrorKind, VERSION, read_frame,
    write_frame, write_json,
};

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn agent(name: &str) -> Agent {
    let socket = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("agent-{}-{name}.sock", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_ligera-agent"))
        .args(["--unix", socket.to_str().unwrap(), "--root", "/"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the agent did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    Agent { child, socket }
}

/// Runs `argv` through the agent; returns stdout, stderr and the status.
/// Grants credit only as it reads, like ligera.
fn exec(a: &Agent, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin".into()],
        ..Default::default()
    };
    exec_req(a, &req, stdin)
}

fn exec_req(a: &Agent, req: &ExecRequest, stdin: &[u8]) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    exec_when(a, req, None, stdin)
}

/// As [`exec_req`], but with `stdin` sent (and closed) only once stdout
/// holds `marker`, if given: input that must reach a command after it set
/// its terminal up.
fn exec_when(
    a: &Agent,
    req: &ExecRequest,
    marker: Option<&str>,
    stdin: &[u8],
) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let mut s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write_json(&mut s, Kind::Hello, &Hello { version: VERSION }).unwrap();
    let hello: Hello = read_frame(&mut s)
        .unwrap()
        .expect(Kind::Hello)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(hello.version, VERSION);
    write_json(&mut s, Kind::Exec, req).unwrap();
    let send = |s: &mut UnixStream| {
        for chunk in stdin.chunks(60_000) {
            write_frame(s, Kind::Stdin, chunk).unwrap();
        }
        write_frame(s, Kind::StdinEof, &[]).unwrap();
    };
    let mut sent = marker.is_none();
    if sent {
        send(&mut s);
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut granted = u64::from(INITIAL_CREDIT);
    loop {
        if !sent && marker.is_some_and(|m| String::from_utf8_lossy(&out).contains(m)) {
            send(&mut s);
            sent = true;
        }
        let f = read_frame(&mut s).unwrap();
        match f.kind {
            Kind::Stdout | Kind::Stderr => {
                let len = f.payload.len() as u64;
                assert!(
                    out.len() as u64 + err.len() as u64 + len <= granted,
                    "credit exceeded"
                );
                if f.kind == Kind::Stdout {
                    &mut out
                } else {
                    &mut err
                }
                .extend(f.payload);
                granted += len;
                write_frame(&mut s, Kind::Credit, &(len as u32).to_le_bytes()).unwrap();
            }
            Kind::Credit => {}
            Kind::Exited => return (out, err, f.json().unwrap()),
            other => panic!(
                "unexpected {other:?}: {:?}",
                String::from_utf8_lossy(&f.payload)
            ),
        }
    }
}

#[test]
fn runs_commands_with_their_streams_and_status() {
    let a = agent("basic");
    let (out, err, st) = exec(
        &a,
        &["sh", "-c", "echo out; echo err >&2; cat; exit 7"],
        b"in\n",
    );
    assert_eq!(out, b"out\nin\n");
    assert_eq!(err, b"err\n");
    assert_eq!(st.host_code(), 7);
    let (_, _, st) = exec(&a, &["sh", "-c", "kill -9 $$"], b"");
    assert_eq!((st.signal, st.host_code()), (Some(9), 137));
    let (_, _, st) = exec(&a, &["no-such-program-here"], b"");
    assert_eq!(st.error.as_ref().unwrap().kind, StartErrorKind::NotFound);
    assert_eq!(st.host_code(), 127);
    let (_, _, st) = exec(&a, &["/etc/passwd"], b"");
    assert_eq!(st.host_code(), 126);
}

#[test]
fn large_output_and_input_flow_within_credit() {
    let a = agent("large");
    // 5 MB through cat: input and output both far beyond one window.
    let input: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (out, _, st) = exec(&a, &["cat"], &input);
    assert_eq!(st.host_code(), 0);
    assert!(out == input, "{} bytes back", out.len());
}

#[test]
fn garbage_from_the_host_gets_an_error_not_a_crash() {
    let a = agent("garbage");
    let mut s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1]).unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!(f.kind, Kind::Error);
    // The agent still serves others.
    let (out, _, _) = exec(&a, &["echo", "still here"], b"");
    assert_eq!(out, b"still here\n");
}

#[test]
fn terminals_and_user_names() {
    let a = agent("tty");
    let req = |argv: &[&str]| ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin".into()],
        ..Default::default()
    };
    let tty = ExecRequest {
        tty: true,
        rows: Some(33),
        cols: Some(77),
        ..req(&[
            "sh",
            "-c",
            "tty; stty size; test -t 0 && test -t 2 && echo all-tty",
        ])
    };
    let (out, err, st) = exec_req(&a, &tty, b"");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(st.host_code(), 0, "{out}");
    assert!(err.is_empty(), "stderr goes to the terminal too");
    assert!(
        out.contains("/dev/pts/") && out.contains("33 77") && out.contains("all-tty"),
        "{out}"
    );
    // Ctrl-C typed on the terminal reaches the command as SIGINT (typed
    // once the command turned signals on: before, it is a plain byte).
    let ctrl_c = ExecRequest {
        tty: true,
        ..req(&["sh", "-c", "stty isig; echo ready; read x; echo never"])
    };
    let (_, _, st) = exec_when(&a, &ctrl_c, Some("ready"), b"\x03");
    assert_eq!(st.host_code(), 130, "{st:?}");
    // A user by name, from the root's /etc/passwd.
    let nobody = ExecRequest {
        user_name: Some("nobody".into()),
        ..req(&["id", "-u"])
    };
    let (out, _, st) = exec_req(&a, &nobody, b"");
    assert_eq!(
        (st.host_code(), String::from_utf8_lossy(&out).trim()),
        (0, "65534")
    );
    let ghost = ExecRequest {
        user_name: Some("no-such-user".into()),
        ..req(&["id"])
    };
    let (_, _, st) = exec_req(&a, &ghost, b"");
    assert_eq!(st.host_code(), 125);
    assert!(st.error.unwrap().message.contains("no-such-user"));
}

/// A command that cannot start is reported as such every time, even
/// when the agent's reaper (which waits for any child) wakes for it too.
#[test]
fn start_failures_are_reported_every_time() {
    let a = agent("start-failures");
    for round in 0..100 {
        let (_, _, st) = exec(&a, &["no-such-program-here"], b"");
        assert_eq!(st.host_code(), 127, "round {round}: {st:?}");
        let (_, _, st) = exec(&a, &["/etc/passwd"], b"");
        assert_eq!(st.host_code(), 126, "round {round}: {st:?}");
    }
}
