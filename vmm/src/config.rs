//! What a VM is made of, as the command line (or later an API) describes it.
//! One `VmConfig` travels from the CLI to the builder; nothing else carries
//! configuration.

use std::path::PathBuf;

use arch::layout::{GIB, KIB, MIB};

/// The kernel command line ligera uses when none is given: console on COM1,
/// reboot through the keyboard controller (which ends ligera), reboot one
/// second after a panic, no PCI probing, and an i8042 that is not probed for
/// the mouse port, multiplexers or PnP.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Defaults.
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY: u64 = 256 * MIB;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// Output to stdout, input from stdin (raw mode on a terminal).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// The UART exists but its output is dropped.
    None,
}

/// Whether to offer KVM paravirtual features that need hypercalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvHypercalls {
    /// On, unless the host is known not to complete hypercalls.
    Auto,
    On,
    Off,
}

/// A raw disk image (`--disk`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The serial the guest reads (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
    pub id: Option<String>,
}

/// A network interface backed by a TAP device (`--net`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

/// A vsock device with a hybrid-vsock Unix socket on the host (`--vsock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_size: u64,
    pub serial: SerialConfig,
    pub pv_hypercalls: PvHypercalls,
    /// Add the guest command-line workarounds for an emulating nested host.
    pub host_quirks: bool,
    /// A virtio-rng entropy device.
    pub rng: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// The control socket (`--api-sock`).
    pub api_socket: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: DEFAULT_VCPUS,
            mem_size: DEFAULT_MEMORY,
            serial: SerialConfig::Stdio,
            pv_hypercalls: PvHypercalls::Auto,
            host_quirks: true,
            rng: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            api_socket: None,
        }
    }
}

/// Parses a memory size: `512M`, `2G`, `1024K`, `1T`, or a plain number of MiB.
/// Suffixes may be followed by `iB` or `B`; case does not matter.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, unit) = match stripped.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&stripped[..i], Some(c)),
        _ => (stripped, None),
    };
    let multiplier = match unit {
        None | Some('m') => MIB,
        Some('k') => KIB,
        Some('g') => GIB,
        Some('t') => 1024 * GIB,
        Some(_) => return Err(format!("'{text}' has an unknown unit (use K, M, G or T)")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{text}' is not a size like 512M, 2G or 256"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Formats a byte count for messages: `512 MiB`, `2 GiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("2g"), Ok(2 * GIB));
        assert_eq!(parse_size("256"), Ok(256 * MIB));
        assert_eq!(parse_size("1024KiB"), Ok(MIB));
        assert_eq!(parse_size("1GB"), Ok(GIB));
        assert_eq!(parse_size("1T"), Ok(1024 * GIB));
        for bad in [
            "",
            "M",
            "12X",
            "-5",
            "1.5G",
            "0x10",
            "99999999999999999999G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(
            parse_size("99999999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512 * MIB), "512 MiB");
        assert_eq!(format_size(2 * GIB), "2 GiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_size(1000), "1000 bytes");
    }
}
