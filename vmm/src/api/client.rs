//! A client for the control socket: one HTTP/1.1 request per connection,
//! for the `ligera snapshot` commands.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest response head and body taken from the VM.
const MAX_RESPONSE: usize = 1 << 20;

/// Sends one request and returns the status and body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    request_with_fds(socket, method, path, body, &[], timeout)
}

/// Sends one request with descriptors attached (SCM_RIGHTS) and returns
/// the status and body.
pub fn request_with_fds(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    fds: &[RawFd],
    timeout: Duration,
) -> Result<(u16, String), String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(|e| fail(&e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| fail(&e))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let bytes = [head.as_bytes(), body.as_bytes()].concat();
    let sent = send_with_fds(&stream, &bytes, fds).map_err(|e| fail(&e))?;
    stream.write_all(&bytes[sent..]).map_err(|e| fail(&e))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = response.parse(&buf).map_err(|e| fail(&e))? {
            let status = response.code.unwrap_or(0);
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0usize);
            if length > MAX_RESPONSE {
                return Err(fail(&"response too large"));
            }
            while buf.len() < len + length {
                let n = stream.read(&mut chunk).map_err(|e| fail(&e))?;
                if n == 0 {
                    return Err(fail(&"the connection closed mid-response"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8_lossy(&buf[len..len + length]).into_owned();
            return Ok((status, text));
        }
        if buf.len() > MAX_RESPONSE {
            return Err(fail(&"response too large"));
        }
        let n = stream.read(&mut chunk).map_err(|e| fail(&e))?;
        if n == 0 {
            return Err(fail(&"the connection closed before a response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends the first bytes of `bytes` with `fds` attached; returns how many
/// bytes went.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    if fds.is_empty() {
        return (&*stream).write(bytes);
    }
    let fd_bytes = std::mem::size_of_val(fds);
    let mut control = vec![0u64; 4 + fd_bytes.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the call, and the control buffer holds CMSG_SPACE(fd_bytes).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(fd_bytes as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
        let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The `fault_message` of an error body, or the body itself.
pub fn fault_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}
