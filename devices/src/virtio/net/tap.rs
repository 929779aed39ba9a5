//! The host side of a virtio-net interface: a TAP device, opened through
//! `/dev/net/tun` with a virtio-net header in front of every frame
//! (`IFF_VNET_HDR`, 12 bytes as in virtio 1.0) and no packet-information
//! prefix (`IFF_NO_PI`). The descriptor is non-blocking: the device waits for
//! it on the event loop.
//!
//! Opening a TAP interface that exists attaches to it (a persistent TAP made
//! with `ip tuntap add` can belong to an unprivileged user); a missing one is
//! created, which needs CAP_NET_ADMIN, and disappears when ligera exits.
//! ligera does not configure the interface (state, addresses, bridge): that
//! is the host's business.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::{HDR_LEN, NetBackend};

const TUN_PATH: &str = "/dev/net/tun";

/// Why a TAP device could not be opened; every message names the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap '{0}': not a valid interface name (1 to 15 characters, no '/', ':', '%' or spaces)"
    )]
    BadName(String),
    #[error("tap {name}: {TUN_PATH} does not exist (is the tun module loaded?)")]
    NoTunDevice { name: String },
    #[error("tap {name}: cannot open {TUN_PATH}: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error(
        "tap {name}: permission denied (creating a tap needs CAP_NET_ADMIN; an existing one must belong to this user)"
    )]
    Permission { name: String },
    #[error(
        "tap {name}: already in use (a tap has one reader: another program, or this tap given twice)"
    )]
    Busy { name: String },
    #[error("tap {name}: an interface of that name exists and is not a TAP device")]
    NotTap { name: String },
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether the kernel would accept `name` as an interface name (and not
/// treat it as a pattern like `tap%d`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'%'))
}

impl Tap {
    /// Opens the TAP interface `name`, creating it if it does not exist.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let owned = || name.to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice { name: owned() },
                io::ErrorKind::PermissionDenied => TapError::Permission { name: owned() },
                _ => TapError::OpenTun {
                    name: owned(),
                    source,
                },
            })?;

        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name: owned() },
                Some(libc::EBUSY) => TapError::Busy { name: owned() },
                Some(libc::EINVAL) => TapError::NotTap { name: owned() },
                _ => TapError::Ioctl {
                    name: owned(),
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let ret = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        if ret < 0 {
            return Err(tap.ioctl_error("set the virtio-net header size"));
        }
        // No offloads until a driver asks for them.
        tap.set_offload(0)
            .map_err(|_| tap.ioctl_error("turn offloads off"))?;
        Ok(tap)
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the tap which offloads the reader accepts (`TUN_F_*` bits):
    /// with none, the kernel hands over only complete, checksummed frames.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["tap0", "a", "ligera-net.1", "123456789012345"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "tap%d",
            "a b",
            "1234567890123456",
            "tä",
        ] {
            assert!(!valid_name(bad), "{bad}");
            let e = Tap::open(bad).unwrap_err();
            assert!(matches!(e, TapError::BadName(_)), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
        }
    }

    /// Needs CAP_NET_ADMIN (CI runs as root): creates a tap, attaches, and
    /// checks that a second open is refused with a clear error.
    #[test]
    fn create_attach_and_busy() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test creates a TAP device: run it as root (CI does)");
        }
        let name = format!("lgt{}", std::process::id() % 1_000_000);
        let tap = Tap::open(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tap.name(), name);
        assert!(std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
        let e = Tap::open(&name).unwrap_err();
        assert!(matches!(e, TapError::Busy { .. }), "{e}");
        assert!(e.to_string().contains(&name), "{e}");
        // The interface is down: nothing to read yet, and reading does not block.
        let mut t = tap;
        let mut buf = [0u8; 100];
        let e = t.read_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        for flags in [
            0,
            libc::TUN_F_CSUM,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
        ] {
            t.set_offload(flags).unwrap();
        }
        drop(t);
        // Not persistent: it goes away with its descriptor (a moment later
        // if a child another test forks holds a copy until its exec).
        let path = format!("/sys/class/net/{name}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(&path).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!std::path::Path::new(&path).exists());
        let e = Tap::open("lo").unwrap_err();
        assert!(matches!(e, TapError::NotTap { .. }), "{e}");
    }
}
