//! The host side of the hybrid vsock: the Unix socket that host
//! applications connect to (`PATH`), and the sockets that guest-initiated
//! connections go to (`PATH_<port>`).

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why the host socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum HostSocketError {
    #[error("vsock socket {}: in use by another process", .0.display())]
    InUse(PathBuf),
    #[error("vsock socket {}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("vsock socket {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
}

/// The listening socket at `PATH`; the file goes away with it (if it is
/// still the one we made).
pub struct HostListener {
    pub listener: UnixListener,
    path: PathBuf,
    id: (u64, u64),
}

impl HostListener {
    /// Creates and listens on `path`. A socket file nobody listens on (left
    /// by a process that died) is replaced; a live one, or a file that is
    /// not a socket, is an error.
    pub fn bind(path: &Path) -> Result<HostListener, HostSocketError> {
        let create = |source| HostSocketError::Create {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match connect_nonblocking(path) {
                Ok(_) => return Err(HostSocketError::InUse(path.to_path_buf())),
                // Listening, with a full backlog.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(HostSocketError::InUse(path.to_path_buf()));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("vsock: removing the stale socket {}", path.display());
                    std::fs::remove_file(path).map_err(create)?;
                }
                Err(e) => return Err(create(e)),
            },
            Ok(_) => return Err(HostSocketError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(create(e)),
        }
        let listener = UnixListener::bind(path).map_err(create)?;
        listener.set_nonblocking(true).map_err(create)?;
        let meta = std::fs::symlink_metadata(path).map_err(create)?;
        Ok(HostListener {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        // Only our own socket: another ligera may have replaced it since.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where guest-initiated connections go.
pub trait Connector: Send {
    /// A connected, non-blocking stream to the host application listening
    /// for guest connections to host port `port`.
    fn connect(&mut self, port: u32) -> io::Result<UnixStream>;
}

/// Firecracker's convention: host port P is the Unix socket `PATH_P`.
pub struct PathConnector {
    base: PathBuf,
}

impl PathConnector {
    pub fn new(base: &Path) -> Self {
        PathConnector {
            base: base.to_path_buf(),
        }
    }

    pub fn path_for(&self, port: u32) -> PathBuf {
        let mut p = OsString::from(self.base.as_os_str());
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }
}

impl Connector for PathConnector {
    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        connect_nonblocking(&self.path_for(port))
    }
}

/// Guest connections to socket pairs: the other ends stay here, for
/// the test or fuzz target that plays the host application.
#[derive(Clone, Default)]
pub struct PairConnector {
    /// (port, host application's end), in connection order.
    pub peers: Arc<Mutex<Vec<(u32, UnixStream)>>>,
    /// Ports that refuse connections.
    pub refuse: Vec<u32>,
    /// Most peers kept; older ones are closed.
    pub keep: usize,
}

impl Connector for PairConnector {
    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        if self.refuse.contains(&port) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(true)?;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if self.keep > 0 && peers.len() >= self.keep {
            peers.remove(0);
        }
        peers.push((port, theirs));
        Ok(ours)
    }
}

/// Connects to the Unix socket at `path` without ever blocking: a listener
/// with a full backlog gives `WouldBlock`, not a wait on the event loop.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path is empty or too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() has no memory arguments; we check the result.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` is within its size.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // EAGAIN: the listener's backlog is full (Unix sockets never give EINPROGRESS).
        return Err(e);
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    /// A socket path in its own scratch directory (removed with the guard).
    fn tmp(name: &str) -> (Scratch, PathBuf) {
        let dir = Scratch::new("vsock-host");
        let p = dir.join(name);
        (dir, p)
    }

    #[test]
    fn bind_in_use_stale_and_cleanup() {
        let (_dir, path) = tmp("a.sock");
        let first = HostListener::bind(&path).unwrap();
        assert!(matches!(
            HostListener::bind(&path),
            Err(HostSocketError::InUse(_))
        ));
        drop(first);
        assert!(!path.exists(), "removed with the listener");
        // A stale socket (nobody listening) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let l = HostListener::bind(&path).unwrap();
        assert_eq!(l.path(), path);
        drop(l);
        // A regular file is left alone.
        std::fs::write(&path, b"data").unwrap();
        let e = HostListener::bind(&path).err().unwrap();
        assert!(matches!(e, HostSocketError::NotASocket(_)));
        assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        std::fs::remove_file(&path).unwrap();
        // A directory that does not exist.
        let e = HostListener::bind(Path::new("/nonexistent/dir/v.sock"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/dir/v.sock"), "{e}");
    }

    #[test]
    fn dropping_does_not_remove_a_replaced_socket() {
        let (_dir, path) = tmp("b.sock");
        let first = HostListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let second = HostListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists());
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn connector_uses_path_underscore_port() {
        let (_dir, base) = tmp("c.sock");
        let c = PathConnector::new(&base);
        let target = c.path_for(52);
        assert_eq!(target.file_name().unwrap(), "c.sock_52");
        let _ = std::fs::remove_file(&target);
        let mut c = c;
        assert!(c.connect(52).is_err(), "nobody listens");
        let l = UnixListener::bind(&target).unwrap();
        let s = c.connect(52).unwrap();
        let (peer, _) = l.accept().unwrap();
        drop((s, peer));
        std::fs::remove_file(&target).unwrap();
        assert!(connect_nonblocking(Path::new(&"x".repeat(200))).is_err());
    }

    #[test]
    fn full_backlog_does_not_block() {
        let (_dir, path) = tmp("d.sock");
        let l = UnixListener::bind(&path).unwrap();
        // Nobody accepts: the backlog fills and connects fail at once.
        let mut held = Vec::new();
        let err = loop {
            match connect_nonblocking(&path) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000);
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop((l, held));
        std::fs::remove_file(&path).unwrap();
    }
}
