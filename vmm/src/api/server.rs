//! HTTP/1.1 over a Unix socket, on a thread of its own, for the control
//! API. Requests are parsed by `httparse`; this module only manages the
//! connections, so that no client can stall the VM or another client:
//!
//! - everything is non-blocking on one `poll(2)` loop; the VM's own threads
//!   never wait for it;
//! - at most [`MAX_CONNECTIONS`] connections; a new one evicts the
//!   longest-idle one, or gets 503 if none is idle;
//! - a request must arrive whole within [`REQUEST_TIMEOUT`] of its first
//!   byte (else 408), with at most [`MAX_HEAD`] bytes of head and
//!   [`MAX_BODY`] bytes of body (else 400); chunked bodies are refused;
//! - a client that does not read its responses is dropped after
//!   [`WRITE_TIMEOUT`], and no further request of it is read meanwhile;
//! - an idle connection is closed after [`IDLE_TIMEOUT`].
//!
//! (rust-vmm's `micro_http`, which Firecracker uses, is not published on
//! crates.io; `tiny_http` runs a thread per connection with no limits.)

use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::vsock::host::{HostListener, HostSocketError};
use vmm_sys_util::eventfd::EventFd;

pub const MAX_CONNECTIONS: usize = 16;
pub const MAX_HEAD: usize = 8 * 1024;
pub const MAX_BODY: usize = 64 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEADERS: usize = 32;

/// A request, whole.
#[derive(Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// Descriptors the client passed (SCM_RIGHTS) with the request's bytes,
    /// at most [`MAX_FDS`]; a handler takes them with `fds.take()`.
    pub fds: std::cell::Cell<Vec<OwnedFd>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({} bytes)",
            self.method,
            self.path,
            self.body.len()
        )
    }
}

/// Descriptors kept per request; more are closed as they arrive.
pub const MAX_FDS: usize = 2;

/// A response: a status and, unless 204, a JSON body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl Response {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Response {
            status,
            body: Some(body),
        }
    }

    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": ...}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Response::json(
            status,
            serde_json::json!({ "fault_message": message.into() }),
        )
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            408 => "Request Timeout",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        };
        let body = self
            .body
            .as_ref()
            .map(|b| b.to_string().into_bytes())
            .unwrap_or_default();
        let mut out = format!("HTTP/1.1 {} {reason}\r\nServer: ligera\r\n", self.status);
        if self.body.is_some() {
            out += "Content-Type: application/json\r\n";
        }
        out += &format!("Content-Length: {}\r\n\r\n", body.len());
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

/// What answers requests.
pub trait Handler: Send + 'static {
    fn handle(&mut self, request: &Request) -> Response;
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--api-sock {0}: in use by another process")]
    InUse(String),
    #[error("--api-sock {0}: exists and is not a socket")]
    NotASocket(String),
    #[error("--api-sock {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The server thread; dropping it stops the thread and removes the socket.
pub struct ApiServer {
    stop: Arc<EventFd>,
    /// The thread gives the listener back, so the socket file is removed
    /// by whoever stops it (the control thread's filter has no unlink).
    thread: Option<JoinHandle<HostListener>>,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file is replaced) and serves
    /// requests with `handler` on a new thread.
    pub fn start(path: &Path, handler: impl Handler) -> Result<ApiServer, ServerError> {
        ApiServer::bind(path)?.serve(handler)
    }

    /// Listens on `path` (a stale socket file is replaced); requests are
    /// served once [`BoundApi::serve`] starts the thread.
    pub fn bind(path: &Path) -> Result<BoundApi, ServerError> {
        let shown = path.display().to_string();
        let listener = HostListener::bind(path).map_err(|e| match e {
            HostSocketError::InUse(_) => ServerError::InUse(shown.clone()),
            HostSocketError::NotASocket(_) => ServerError::NotASocket(shown.clone()),
            HostSocketError::Create { source, .. } => ServerError::Io {
                path: shown.clone(),
                source,
            },
        })?;
        Ok(BoundApi { listener, shown })
    }
}

/// A control socket that listens but has no thread serving it yet.
pub struct BoundApi {
    listener: HostListener,
    shown: String,
}

impl BoundApi {
    /// Serves requests with `handler` on a new thread.
    pub fn serve(self, handler: impl Handler) -> Result<ApiServer, ServerError> {
        let BoundApi { listener, shown } = self;
        let io = |source| ServerError::Io {
            path: shown.clone(),
            source,
        };
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io)?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                match crate::seccomp::install(crate::seccomp::Role::Api) {
                    Ok(()) => {
                        // A panic must not drop the listener here (see above).
                        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            serve(&listener, thread_stop, handler)
                        }));
                        if served.is_err() {
                            log::error!("the control socket's thread panicked");
                        }
                    }
                    Err(e) => {
                        // Fail closed: no thread runs without its filter.
                        eprintln!("ligera: error: {e}");
                        std::process::exit(crate::exit::EXIT_VMM_ERROR);
                    }
                }
                listener
            })
            .map_err(io)?;
        Ok(ApiServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            // Dropping the listener here removes the socket file.
            drop(t.join());
        }
    }
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// When the first byte of the request being read arrived.
    request_started: Option<Instant>,
    /// Last progress: a read, a write, a connection.
    last_active: Instant,
    close_after_write: bool,
    /// The peer has closed its end.
    eof: bool,
    /// Descriptors received with the request being read.
    fds: Vec<OwnedFd>,
}

impl Connection {
    fn idle(&self) -> bool {
        self.input.is_empty() && self.output.len() == self.written
    }

    fn respond(&mut self, response: Response) {
        self.output.extend_from_slice(&response.to_bytes());
    }

    fn fail(&mut self, status: u16, message: &str) {
        log::debug!("control socket: {status}: {message}");
        self.respond(Response::fault(status, message));
        self.close_after_write = true;
        self.input.clear();
        self.request_started = None;
    }

    /// Reads what is there, up to the request limit.
    fn read(&mut self, now: Instant) {
        let mut buf = [0u8; 4096];
        while self.input.len() < MAX_HEAD + MAX_BODY {
            let room = (MAX_HEAD + MAX_BODY - self.input.len()).min(buf.len());
            match recv_with_fds(&self.stream, &mut buf[..room], &mut self.fds) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => {
                    if self.input.is_empty() {
                        self.request_started = Some(now);
                    }
                    self.input.extend_from_slice(&buf[..n]);
                    self.last_active = now;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.eof = true;
                    return;
                }
            }
        }
    }

    /// Answers complete requests, one at a time: the next is read only
    /// once the previous response is written.
    fn process(&mut self, handler: &mut dyn Handler) {
        while self.idle_output() && !self.close_after_write && !self.input.is_empty() {
            match parse(&self.input) {
                Parsed::Partial => {
                    if self.input.len() >= MAX_HEAD + MAX_BODY {
                        self.fail(400, "request too large");
                    }
                    return;
                }
                Parsed::Bad(message) => {
                    self.fail(400, &message);
                    return;
                }
                Parsed::Complete {
                    request,
                    consumed,
                    close,
                } => {
                    self.input.drain(..consumed);
                    request.fds.set(std::mem::take(&mut self.fds));
                    self.request_started = (!self.input.is_empty()).then(Instant::now);
                    log::debug!("control socket: {} {}", request.method, request.path);
                    let response = handler.handle(&request);
                    self.respond(response);
                    self.close_after_write |= close;
                }
            }
        }
    }

    fn idle_output(&self) -> bool {
        self.output.len() == self.written
    }

    /// Writes what it can; returns false when the connection is done.
    fn write(&mut self, now: Instant) -> bool {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.written += n;
                    self.last_active = now;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        self.output.clear();
        self.written = 0;
        !self.close_after_write
    }
}

/// Reads from a Unix stream like read(2), keeping descriptors passed with
/// the bytes (up to [`MAX_FDS`] in `fds`; any others are closed).
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    const FD: usize = std::mem::size_of::<libc::c_int>();
    // Room for MAX_FDS descriptors: the kernel installs no more than fit and
    // closes the rest of a larger batch itself.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE((MAX_FDS * FD) as u32) } as _;
    // SAFETY: recvmsg on our socket into the buffers described by `msg`.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / FD {
                    let fd = std::ptr::read_unaligned(data.add(i * FD).cast::<libc::c_int>());
                    // Owned from here: closed when dropped.
                    let owned = OwnedFd::from_raw_fd(fd);
                    if fds.len() < MAX_FDS {
                        fds.push(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

enum Parsed {
    Partial,
    Bad(String),
    Complete {
        request: Request,
        consumed: usize,
        close: bool,
    },
}

fn parse(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() > MAX_HEAD => {
            return Parsed::Bad(format!("request head longer than {MAX_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => return Parsed::Bad(format!("malformed request: {e}")),
    };
    if head_len > MAX_HEAD {
        return Parsed::Bad(format!("request head longer than {MAX_HEAD} bytes"));
    }
    let mut length = 0usize;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<usize>() {
                Ok(n) if n <= MAX_BODY => length = n,
                Ok(n) => return Parsed::Bad(format!("body of {n} bytes; the limit is {MAX_BODY}")),
                Err(_) => return Parsed::Bad(format!("bad Content-Length '{value}'")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad("Transfer-Encoding is not supported: send Content-Length".into());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        }
    }
    if input.len() < head_len + length {
        return Parsed::Partial;
    }
    Parsed::Complete {
        request: Request {
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
            body: input[head_len..head_len + length].to_vec(),
            fds: Default::default(),
        },
        consumed: head_len + length,
        close,
    }
}

fn serve(listener: &HostListener, stop: Arc<EventFd>, mut handler: impl Handler) {
    let mut conns: Vec<Connection> = Vec::new();
    loop {
        let now = Instant::now();
        // Deadlines.
        conns.retain_mut(|c| {
            if let Some(started) = c.request_started
                && now.duration_since(started) > REQUEST_TIMEOUT
                && c.idle_output()
                && !c.close_after_write
            {
                c.fail(408, "the request did not arrive in time");
                // The write timeout runs from now.
                c.last_active = now;
            }
            let stuck = !c.idle_output() && now.duration_since(c.last_active) > WRITE_TIMEOUT;
            let idle = c.idle() && now.duration_since(c.last_active) > IDLE_TIMEOUT;
            !(stuck || idle)
        });

        let mut fds = vec![
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for c in &conns {
            let mut events = 0;
            if c.idle_output() && !c.close_after_write {
                events |= libc::POLLIN;
            }
            if !c.idle_output() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // Wake up in time for the nearest deadline.
        let timeout_ms = conns
            .iter()
            .map(|c| {
                let limit = if c.request_started.is_some() {
                    REQUEST_TIMEOUT
                } else if !c.idle_output() {
                    WRITE_TIMEOUT
                } else {
                    IDLE_TIMEOUT
                };
                let since = c.request_started.unwrap_or(c.last_active);
                limit.saturating_sub(now.duration_since(since))
            })
            .min()
            .map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            log::error!(
                "control socket: poll failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        let now = Instant::now();
        let ready: Vec<i16> = fds[2..].iter().map(|f| f.revents).collect();
        let mut keep = Vec::with_capacity(conns.len());
        for (mut c, revents) in conns.drain(..).zip(ready) {
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                c.read(now);
                c.process(&mut handler);
            }
            let alive = c.write(now);
            // Requests that were waiting for the output to drain.
            if alive && !c.input.is_empty() {
                c.process(&mut handler);
                if !c.write(now) {
                    continue;
                }
            }
            if alive && !(c.eof && c.idle_output()) {
                keep.push(c);
            }
        }
        conns = keep;
        if fds[1].revents != 0 {
            accept(listener, &mut conns, now);
        }
    }
}

/// Takes every waiting connection, within the limit.
fn accept(listener: &HostListener, conns: &mut Vec<Connection>, now: Instant) {
    loop {
        let stream = match listener.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if conns.len() >= MAX_CONNECTIONS {
            let oldest_idle = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.idle())
                .min_by_key(|(_, c)| c.last_active)
                .map(|(i, _)| i);
            match oldest_idle {
                Some(i) => {
                    conns.remove(i);
                }
                None => {
                    // Best effort: the client may not be reading.
                    let mut s = stream;
                    let _ = s.write(
                        &Response::fault(503, "too many connections to the control socket")
                            .to_bytes(),
                    );
                    continue;
                }
            }
        }
        conns.push(Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            request_started: None,
            last_active: now,
            close_after_write: false,
            eof: false,
            fds: Vec::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_requests_only() {
        let full = b"PATCH /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"state\": \"Paused\"}\n";
        for cut in [0, 10, full.len() - 1] {
            assert!(matches!(parse(&full[..cut]), Parsed::Partial), "{cut}");
        }
        match parse(full) {
            Parsed::Complete {
                request,
                consumed,
                close,
            } => {
                assert_eq!(
                    (request.method.as_str(), request.path.as_str()),
                    ("PATCH", "/vm")
                );
                assert_eq!(request.body, b"{\"state\": \"Paused\"}\n");
                assert_eq!(consumed, full.len());
                assert!(!close);
            }
            _ => panic!("not complete"),
        }
        let bad: [&[u8]; 4] = [
            b"GET / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"\x00\x01garbage\r\n\r\n",
        ];
        for b in bad {
            assert!(matches!(parse(b), Parsed::Bad(_)), "{b:?}");
        }
        let long = vec![b'a'; MAX_HEAD + 1];
        assert!(matches!(parse(&long), Parsed::Bad(_)));
    }
}
