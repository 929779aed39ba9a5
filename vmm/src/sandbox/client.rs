//! The host side of the agent protocol (`agent::protocol`) for one
//! command: connect through the VM's hybrid-vsock socket, start the
//! command, stream stdin, stdout and stderr both ways within the credit
//! windows, and return how it ended.
//!
//! Everything the agent sends is untrusted: frames are size-checked before
//! anything is allocated, only the kinds that make sense are accepted, and
//! data beyond the credit the host granted ends the session with an error.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agent::protocol::{
    self, CopyRequest, ExecRequest, ExitStatus, FrameError, Hello, INITIAL_CREDIT, Kind, Setup,
    read_frame, write_frame, write_json,
};

/// Why a command's session failed (ligera then exits with status 125).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the guest agent did not answer within {0:?}")]
    NoAgent(Duration),
    #[error("the guest agent broke the protocol: {0}")]
    Protocol(#[from] FrameError),
    #[error("the guest agent reports: {0}")]
    Agent(String),
    #[error("the guest agent sent {sent} bytes of output beyond the {granted} it was allowed")]
    Credit { sent: u64, granted: u64 },
    #[error("talking to the guest agent: {0}")]
    Io(#[from] io::Error),
}

/// Connects to the agent's port through ligera's hybrid-vsock socket at
/// `socket`, retrying while the guest boots, until `deadline` or `gone()`.
pub fn connect(
    socket: &Path,
    timeout: Duration,
    gone: impl Fn() -> bool,
) -> Result<UnixStream, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = try_connect(socket) {
            return Ok(s);
        }
        if gone() || Instant::now() >= deadline {
            return Err(ClientError::NoAgent(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn try_connect(socket: &Path) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "CONNECT {}", protocol::PORT)?;
    // "OK <port>\n", read byte by byte: what follows is the agent's.
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1, &s);
    reader.read_until(b'\n', &mut line)?;
    if !line.starts_with(b"OK ") {
        return Err(io::ErrorKind::ConnectionRefused.into());
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Brings the guest up to date (a restored one wakes with its snapshot's
/// clock and random pool): sets its clock to ours and mixes 64 fresh bytes
/// from our `getrandom` into its RNG, which the agent then reseeds.
pub fn refresh(stream: UnixStream) -> Result<(), ClientError> {
    let setup = fresh_setup()?;
    let status = run_session(stream, Request::Setup(&setup), None, io::sink(), io::sink())?;
    match status.error {
        Some(e) => Err(ClientError::Agent(format!(
            "setting the guest up: {}",
            e.message
        ))),
        None => Ok(()),
    }
}

/// The host's time and 64 bytes of its entropy, for a (restored) guest.
pub fn fresh_setup() -> Result<Setup, ClientError> {
    let mut entropy = vec![0u8; 64];
    // SAFETY: getrandom writes at most `entropy.len()` bytes into it.
    let got = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    if got != entropy.len() as isize {
        return Err(ClientError::Io(io::Error::last_os_error()));
    }
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok());
    Ok(Setup {
        realtime_ns,
        entropy,
    })
}

/// Checks that the agent answers (the Hello exchange), then hangs up.
pub fn ping(mut stream: UnixStream) -> Result<(), ClientError> {
    hello(&mut stream)
}

/// The Hello exchange that opens every session.
fn hello(s: &mut UnixStream) -> Result<(), ClientError> {
    write_json(
        s,
        Kind::Hello,
        &Hello {
            version: protocol::VERSION,
        },
    )?;
    let hello: Hello = read_frame(s)?.expect(Kind::Hello)?.json()?;
    if hello.version != protocol::VERSION {
        return Err(ClientError::Agent(format!(
            "it speaks protocol version {}, ligera {}",
            hello.version,
            protocol::VERSION
        )));
    }
    Ok(())
}

/// The window size of the terminal `fd`: (rows, columns).
pub fn window_size(fd: std::os::fd::RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize to the pointer.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Credit the agent has granted us for stdin.
struct Window {
    left: Mutex<u64>,
    more: Condvar,
}

/// What a session asks of the agent.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// Run a command.
    Exec(&'a ExecRequest),
    /// Unpack the tar stream sent as stdin at this guest path.
    CopyIn(&'a str),
    /// Send this guest path as a tar stream on stdout.
    CopyOut(&'a str),
    /// Set the clock and feed the RNG.
    Setup(&'a Setup),
}

/// Runs `req` on the agent at the other end of `stream`, with our stdin,
/// stdout and stderr; returns its exit status.
pub fn run_command(
    stream: UnixStream,
    req: &ExecRequest,
    stdin: Option<Box<dyn Read + Send>>,
    stdout: impl Write,
    stderr: impl Write,
) -> Result<ExitStatus, ClientError> {
    run_session(stream, Request::Exec(req), stdin, stdout, stderr)
}

/// One session: `request`, then its data both ways until it ends.
pub fn run_session(
    stream: UnixStream,
    request: Request<'_>,
    stdin: Option<Box<dyn Read + Send>>,
    mut stdout: impl Write,
    mut stderr: impl Write,
) -> Result<ExitStatus, ClientError> {
    let mut stream = stream;
    hello(&mut stream)?;
    let mut input = stream.try_clone()?;
    let out = Arc::new(Mutex::new(stream));
    match request {
        Request::Exec(req) => {
            write_json(&mut *lock(&out), Kind::Exec, req)?;
            if req.tty {
                watch_window(out.clone());
            }
        }
        Request::CopyIn(path) | Request::CopyOut(path) => {
            let kind = if matches!(request, Request::CopyIn(_)) {
                Kind::CopyIn
            } else {
                Kind::CopyOut
            };
            let copy = CopyRequest { path: path.into() };
            write_json(&mut *lock(&out), kind, &copy)?
        }
        Request::Setup(setup) => write_json(&mut *lock(&out), Kind::Setup, setup)?,
    }

    // stdin on its own thread, within the agent's window.
    let window = Arc::new(Window {
        left: Mutex::new(INITIAL_CREDIT.into()),
        more: Condvar::new(),
    });
    if let Some(mut stdin) = stdin {
        let (out, window) = (out.clone(), window.clone());
        std::thread::Builder::new()
            .name("sandbox-stdin".into())
            .spawn(move || {
                crate::seccomp::inherited(crate::seccomp::Role::Sandbox);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let room = {
                        let mut left = lock(&window.left);
                        while *left == 0 {
                            left = window.more.wait(left).unwrap_or_else(|e| e.into_inner());
                        }
                        (*left as usize).min(buf.len())
                    };
                    match stdin.read(&mut buf[..room]) {
                        Ok(0) | Err(_) => {
                            let _ = write_frame(&mut *lock(&out), Kind::StdinEof, &[]);
                            return;
                        }
                        Ok(n) => {
                            *lock(&window.left) -= n as u64;
                            if write_frame(&mut *lock(&out), Kind::Stdin, &buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            })?;
    } else {
        write_frame(&mut *lock(&out), Kind::StdinEof, &[])?;
    }

    // Output, granted back as we write it out.
    let mut granted: u64 = INITIAL_CREDIT.into();
    let mut sent: u64 = 0;
    loop {
        let frame = read_frame(&mut input)?;
        match frame.kind {
            Kind::Stdout | Kind::Stderr => {
                sent += frame.payload.len() as u64;
                if sent > granted {
                    return Err(ClientError::Credit { sent, granted });
                }
                let sink: &mut dyn Write = if frame.kind == Kind::Stdout {
                    &mut stdout
                } else {
                    &mut stderr
                };
                // A host reader that went away is not the command's problem:
                // keep consuming, as a closed pipe would make it.
                let _ = sink.write_all(&frame.payload).and_then(|()| sink.flush());
                let n = frame.payload.len() as u32;
                granted += u64::from(n);
                write_frame(&mut *lock(&out), Kind::Credit, &n.to_le_bytes())?;
            }
            Kind::Credit => {
                let n = frame.u32()?;
                let mut left = lock(&window.left);
                *left = left.saturating_add(n.into()).min(1 << 40);
                window.more.notify_all();
            }
            Kind::Exited => return Ok(frame.json()?),
            Kind::Error => {
                let text = String::from_utf8_lossy(&frame.payload);
                let text: String = text.chars().take(1000).collect();
                return Err(ClientError::Agent(text));
            }
            other => {
                return Err(ClientError::Protocol(FrameError::Malformed {
                    kind: other,
                    why: "not a message the agent sends".into(),
                }));
            }
        }
    }
}

/// Passes the host terminal's size changes on (checked every 200 ms, so
/// no signal handler is needed) until the session's socket closes.
fn watch_window(out: Arc<Mutex<UnixStream>>) {
    let _ = std::thread::Builder::new()
        .name("sandbox-winsize".into())
        .spawn(move || {
            crate::seccomp::inherited(crate::seccomp::Role::Sandbox);
            let mut last = window_size(libc::STDOUT_FILENO);
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let now = window_size(libc::STDOUT_FILENO);
                if now != last
                    && let Some((rows, cols)) = now
                {
                    let resize = protocol::Resize { rows, cols };
                    if write_json(&mut *lock(&out), Kind::Resize, &resize).is_err() {
                        return;
                    }
                }
                last = now;
                if Arc::strong_count(&out) == 1 {
                    return;
                }
            }
        });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent::protocol::{ExitStatus, write_json};

    /// Plays a (possibly hostile) agent that sends `agent_bytes` after
    /// reading the host's Hello; returns what the host made of it.
    fn session(agent_bytes: Vec<u8>) -> (Result<ExitStatus, ClientError>, Vec<u8>) {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let player = std::thread::spawn(move || {
            let _ = agent.write_all(&agent_bytes);
            let _ = agent.shutdown(std::net::Shutdown::Write);
            // Drain the host's frames until it hangs up.
            let mut sink = Vec::new();
            let _ = agent.read_to_end(&mut sink);
        });
        let mut out = Vec::new();
        let req = ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        let result = run_command(host, &req, None, &mut out, io::sink());
        let _ = player.join();
        (result, out)
    }

    fn frames(list: &[(Kind, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        write_json(
            &mut v,
            Kind::Hello,
            &Hello {
                version: protocol::VERSION,
            },
        )
        .unwrap();
        for (k, p) in list {
            write_frame(&mut v, *k, p).unwrap();
        }
        v
    }

    #[test]
    fn a_well_behaved_agent() {
        let exited = br#"{"code": 3, "signal": null, "error": null}"#;
        let (r, out) = session(frames(&[(Kind::Stdout, b"hi\n"), (Kind::Exited, exited)]));
        assert_eq!(r.unwrap().host_code(), 3);
        assert_eq!(out, b"hi\n");
    }

    #[test]
    fn a_hostile_agent_gets_an_error_never_a_panic() {
        let mut huge = frames(&[]);
        huge.extend_from_slice(&(u32::MAX).to_le_bytes());
        huge.push(Kind::Stdout as u8);
        let over_credit: Vec<(Kind, &[u8])> = vec![(Kind::Stdout, &[0u8; 1 << 20][..]); 1];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("nothing at all", Vec::new()),
            ("garbage", b"\x13\x37 not a frame at all".to_vec()),
            ("an oversized frame", huge),
            (
                "an unknown kind",
                frames(&[(Kind::Stdout, b"x")])
                    .into_iter()
                    .chain([1, 0, 0, 0, 200, 0])
                    .collect(),
            ),
            (
                "malformed exit JSON",
                frames(&[(Kind::Exited, b"{\"code\": \"zero\"}")]),
            ),
            ("a host-only message", frames(&[(Kind::Exec, b"{}")])),
            ("output beyond the credit", frames(&over_credit)),
            ("a bad credit", frames(&[(Kind::Credit, b"12345")])),
            (
                "a truncated frame",
                frames(&[(Kind::Stdout, b"abc")])[..15].to_vec(),
            ),
            ("a wrong hello", {
                let mut v = Vec::new();
                write_json(&mut v, Kind::Hello, &Hello { version: 99 }).unwrap();
                v
            }),
        ];
        for (what, bytes) in cases {
            let (r, _) = session(bytes);
            assert!(r.is_err(), "{what}: {r:?}");
        }
        // An error message is passed on, shortened.
        let long = vec![b'e'; 5000];
        let (r, _) = session(frames(&[(Kind::Error, &long)]));
        match r {
            Err(ClientError::Agent(text)) => assert_eq!(text.len(), 1000),
            other => panic!("{other:?}"),
        }
    }
}
