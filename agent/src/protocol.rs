//! The one protocol between ligera (the host) and its guest agent, over a
//! vsock stream (the host end is ligera's hybrid-vsock Unix socket).
//!
//! One connection carries one command. Every message is a frame:
//!
//! ```text
//! [u32 little-endian: payload length][u8: kind][payload]
//! ```
//!
//! with at most [`MAX_PAYLOAD`] bytes of payload. Control messages carry JSON
//! ([`Hello`], [`ExecRequest`], [`ExitStatus`], [`Resize`]); data messages carry raw
//! bytes (stdin, stdout, stderr); [`Kind::Credit`] carries a u32.
//!
//! A connection goes: host `Hello` → agent `Hello` → host `Exec` → then, in
//! any order, host `Stdin`/`StdinEof`/`Signal`/`Resize`/`Credit` and agent
//! `Stdout`/`Stderr`/`Credit`, until the agent's `Exited` (or `Error`).
//! A copy runs the same way in place of `Exec`: `CopyIn` ([`CopyRequest`])
//! with the tar stream (see `agent::copy`) as stdin, or `CopyOut` with the
//! tar stream as stdout; its stderr says what went wrong, its status is 0 on
//! success. `Setup` ([`Setup`]) sets the guest's clock and adds entropy to
//! its RNG (after a snapshot restore), answered by `Exited`.
//!
//! Flow control both ways: a side may send only as many `Stdout`+`Stderr`
//! (agent) or `Stdin` (host) payload bytes as the other side has granted
//! with `Credit` frames; each side starts with [`INITIAL_CREDIT`] granted and
//! grants more as it consumes (writes the bytes out). So a command printing
//! gigabytes to a slow host reader, or a host writing stdin faster than the
//! command reads it, never grows either side's memory beyond its window.
//!
//! The host treats everything the agent sends as hostile: [`read_frame`]
//! refuses unknown kinds and oversized lengths before allocating, and every
//! JSON payload is parsed with serde into a fixed shape.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const PORT: u32 = 1024;
/// Protocol version, exchanged in [`Hello`].
pub const VERSION: u32 = 1;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes of data each side may send before the other grants more.
pub const INITIAL_CREDIT: u32 = 256 * 1024;
/// Frame header: length and kind.
pub const HEADER_LEN: usize = 5;
/// Most argv entries, environment entries, and bytes of each.
pub const MAX_ARGS: usize = 4096;
pub const MAX_ARG_LEN: usize = 128 * 1024;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Exec = 2,
    Stdin = 3,
    StdinEof = 4,
    Stdout = 5,
    Stderr = 6,
    Signal = 7,
    Resize = 8,
    Exited = 9,
    Error = 10,
    Credit = 11,
    CopyIn = 12,
    CopyOut = 13,
    Setup = 14,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Exec,
            3 => Stdin,
            4 => StdinEof,
            5 => Stdout,
            6 => Stderr,
            7 => Signal,
            8 => Resize,
            9 => Exited,
            10 => Error,
            11 => Credit,
            12 => CopyIn,
            13 => CopyOut,
            14 => Setup,
            _ => return None,
        })
    }
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Why a frame could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("frame of kind {0} is not a known kind")]
    UnknownKind(u8),
    #[error("frame of {len} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: u64 },
    #[error("malformed {kind:?} message: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("expected a {expected:?} message, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
}

/// Reads one frame. The length is checked before anything is allocated; a
/// connection that ends between frames is [`FrameError::Closed`].
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { len: len.into() });
    }
    let kind = Kind::from_u8(header[4]).ok_or(FrameError::UnknownKind(header[4]))?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Frame { kind, payload })
}

/// Writes one frame (one `write_all`, so frames from one writer never mix).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame payload too large",
        ));
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// Writes a control message as JSON.
pub fn write_json<T: Serialize>(w: &mut impl Write, kind: Kind, value: &T) -> io::Result<()> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(w, kind, &json)
}

impl Frame {
    /// The payload as a control message of type `T`.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::Malformed {
            kind: self.kind,
            why: e.to_string(),
        })
    }

    /// The payload of a `Credit` or `Signal` frame.
    pub fn u32(&self) -> Result<u32, FrameError> {
        let bytes: [u8; 4] =
            self.payload
                .as_slice()
                .try_into()
                .map_err(|_| FrameError::Malformed {
                    kind: self.kind,
                    why: format!("{} bytes, expected 4", self.payload.len()),
                })?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Fails unless this frame is of `kind`.
    pub fn expect(self, kind: Kind) -> Result<Frame, FrameError> {
        if self.kind == kind {
            Ok(self)
        } else {
            Err(FrameError::Unexpected {
                expected: kind,
                got: self.kind,
            })
        }
    }
}

/// The first message each way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
}

/// Run a command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` of `env`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries: the whole environment.
    pub env: Vec<String>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A user given by name (`NAME`, `NAME:GROUP`, `UID:GROUP`), looked up
    /// in the image's `/etc/passwd` and `/etc/group`; used when `uid` is
    /// not set.
    #[serde(default)]
    pub user_name: Option<String>,
    /// Run on a pseudo-terminal.
    pub tty: bool,
    pub rows: Option<u16>,
    pub cols: Option<u16>,
    /// Bring the guest up to date first (a restored one: clock, entropy),
    /// as a `Setup` session would, without a session of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<Setup>,
}

impl ExecRequest {
    /// Checks the sizes a well-behaved host sends.
    pub fn validate(&self) -> Result<(), String> {
        if self.argv.is_empty() {
            return Err("no command".into());
        }
        if self.argv.len() + self.env.len() > MAX_ARGS {
            return Err(format!("more than {MAX_ARGS} arguments and variables"));
        }
        let all = self
            .argv
            .iter()
            .chain(&self.env)
            .chain(&self.cwd)
            .chain(&self.user_name);
        if all
            .clone()
            .any(|a| a.len() > MAX_ARG_LEN || a.contains('\0'))
        {
            return Err(format!(
                "an argument or variable is longer than {MAX_ARG_LEN} bytes or holds a NUL"
            ));
        }
        Ok(())
    }
}

/// Why the command ended, or why it did not start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Its exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Why it could not be started.
    pub error: Option<StartError>,
    /// The guest's kernel killed a process for want of memory while the
    /// command ran (and the command died of SIGKILL).
    #[serde(default)]
    pub oom_killed: bool,
}

/// Why a command could not be started, as `docker run` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartError {
    pub kind: StartErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartErrorKind {
    /// No such program (exit status 127).
    NotFound,
    /// Not executable (126).
    NotExecutable,
    /// Anything else (125).
    Other,
}

impl ExitStatus {
    /// A command that could not be started, and why.
    pub fn not_started(kind: StartErrorKind, message: String) -> ExitStatus {
        ExitStatus {
            code: None,
            signal: None,
            error: Some(StartError { kind, message }),
            oom_killed: false,
        }
    }

    /// The status `ligera sandbox run` exits with, as `docker run` and a
    /// shell do: the command's, 128+N for signal N, 126/127 when it could
    /// not be started, 125 for other failures to start it.
    pub fn host_code(&self) -> i32 {
        match (&self.error, self.signal, self.code) {
            (Some(e), _, _) => match e.kind {
                StartErrorKind::NotFound => 127,
                StartErrorKind::NotExecutable => 126,
                StartErrorKind::Other => 125,
            },
            (None, Some(sig), _) => 128 + sig,
            (None, None, Some(code)) => code,
            (None, None, None) => 125,
        }
    }
}

/// Copy a tree into (`CopyIn`) or out of (`CopyOut`) the guest's root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    /// Absolute path in the guest.
    pub path: String,
}

/// Bring a (restored) guest up to date.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub realtime_ns: Option<u64>,
    /// Bytes to mix into the guest's RNG (at most 512), credited as entropy.
    pub entropy: Vec<u8>,
}

/// A terminal size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(&mut buf, Kind::Hello, &Hello { version: VERSION }).unwrap();
        let mut r = &buf[..];
        let f = read_frame(&mut r).unwrap();
        assert_eq!(
            (f.kind, f.payload.as_slice()),
            (Kind::Stdout, &b"hello"[..])
        );
        let h: Hello = read_frame(&mut r).unwrap().json().unwrap();
        assert_eq!(h.version, VERSION);
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn hostile_frames_are_errors() {
        // Too long: refused before reading (or allocating) the payload.
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.push(Kind::Stdout as u8);
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 0, 99][..]),
            Err(FrameError::UnknownKind(99))
        ));
        // Truncated header and payload.
        assert!(matches!(
            read_frame(&mut &[1, 0][..]),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &[4, 0, 0, 0, 5, 1][..]),
            Err(FrameError::Io(_))
        ));
        // Malformed JSON and credit payloads.
        let f = Frame {
            kind: Kind::Exited,
            payload: b"{\"code\": \"x\"}".to_vec(),
        };
        assert!(f.json::<ExitStatus>().is_err());
        let f = Frame {
            kind: Kind::Credit,
            payload: vec![1, 2, 3],
        };
        assert!(f.u32().is_err());
    }

    #[test]
    fn exit_codes_as_docker_uses_them() {
        let st = |code, signal, error: Option<StartErrorKind>| ExitStatus {
            code,
            signal,
            error: error.map(|kind| StartError {
                kind,
                message: String::new(),
            }),
            oom_killed: false,
        };
        assert_eq!(st(Some(42), None, None).host_code(), 42);
        assert_eq!(st(None, Some(9), None).host_code(), 137);
        assert_eq!(
            st(None, None, Some(StartErrorKind::NotFound)).host_code(),
            127
        );
        assert_eq!(
            st(None, None, Some(StartErrorKind::NotExecutable)).host_code(),
            126
        );
        assert_eq!(st(None, None, Some(StartErrorKind::Other)).host_code(), 125);
        assert_eq!(st(None, None, None).host_code(), 125);
    }

    #[test]
    fn exec_requests_are_bounded() {
        let ok = ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        assert!(ExecRequest::default().validate().is_err());
        let nul = ExecRequest {
            argv: vec!["a\0b".into()],
            ..Default::default()
        };
        assert!(nul.validate().is_err());
    }
}
