//! A client for the control socket: one HTTP/1.1 request per connection,
//! for the `ligera snapshot` commands.

use std::io::{Read, Write};
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
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .map_err(|e| fail(&e))?;
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

/// The `fault_message` of an error body, or the body itself.
pub fn fault_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}
