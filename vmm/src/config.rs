//! What a VM is made of, as the command line (or an API) describes it.
//! One `VmConfig` travels from the CLI to the builder; nothing else carries
//! configuration. Every rule about the values lives here, in
//! [`VmConfig::validate`]: the CLI only parses syntax, and the APIs to come
//! deserialize the same types (they derive `serde`) and validate the same way.
//! What can only be checked on the host (its RAM, KVM's vCPU limit, whether
//! files exist) is checked by the builder.

use std::path::{Path, PathBuf};

use arch::layout::{GIB, KIB, MIB};
use arch::mptable::MAX_VCPUS;
use devices::virtio::net::format_mac;
use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// Output to stdout, input from stdin (raw mode on a terminal).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// The UART exists but its output is dropped.
    None,
}

/// Whether to offer KVM paravirtual features that need hypercalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PvHypercalls {
    /// On, unless the host is known not to complete hypercalls.
    Auto,
    On,
    Off,
}

/// A raw disk image (`--disk`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The serial the guest reads (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
    pub id: Option<String>,
}

/// A network interface backed by a TAP device (`--net`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    /// The interface's name in the Firecracker API (`iface_id`), kept so a
    /// snapshot's `network_overrides` can name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl NetConfig {
    /// Its API name: the ID it was given, else `net{index}` (its place
    /// among the VM's interfaces).
    pub fn iface_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }
}

/// A vsock device with a hybrid-vsock Unix socket on the host (`--vsock`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Per-thread seccomp filters (`--seccomp off` turns them off).
    #[serde(default = "on")]
    pub seccomp: bool,
    /// Start from a snapshot instead of booting the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreConfig>,
    /// Firecracker's boot timer (`--boot-timer`): the first MMIO window
    /// logs the time to a guest's "boot done" write.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot_timer: bool,
}

/// The files of a snapshot to restore (`ligera snapshot restore`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub state: PathBuf,
    pub memory: PathBuf,
    /// The state file as read by whoever took the configuration from it:
    /// the builder restores this instead of reading the file again, and
    /// the jail does not bind the file.
    #[serde(skip)]
    pub read: ReadState,
    /// The memory file's device and inode when the jail placed it: the
    /// builder, which opens it by path outside the jail, checks that it
    /// opened that file.
    #[serde(skip)]
    pub memory_id: Option<(u64, u64)>,
}

/// A state file already read and checked (see [`RestoreConfig::read`]).
#[derive(Clone, Default)]
pub struct ReadState(pub Option<std::sync::Arc<crate::snapshot::Snapshot>>);

impl std::fmt::Debug for ReadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "read" } else { "unread" })
    }
}

/// Two restores are the same if they name the same files: what was read
/// from them is a cache.
impl PartialEq for ReadState {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ReadState {}

fn on() -> bool {
    true
}

/// A configuration value that breaks a rule. The message names the
/// command-line flag, as that is how users give it today.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

fn bad(flag: &'static str, problem: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        flag,
        problem: problem.into(),
    })
}

/// Longest path a Unix socket address holds (sun_path less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest interface name (IFNAMSIZ less its NUL).
pub const MAX_TAP_NAME: usize = 15;
/// Longest disk ID: the guest reads it as a 20-byte serial (VIRTIO_BLK_T_GET_ID).
pub const MAX_DISK_ID: usize = 20;
/// vsock CIDs 0, 1 and 2 are the hypervisor, loopback and host; u32::MAX is "any".
pub const MIN_GUEST_CID: u32 = 3;

impl VmConfig {
    /// Checks every rule a configuration must follow, before anything is
    /// built; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || u32::from(self.vcpus) > MAX_VCPUS {
            return bad(
                "--cpus",
                format!("{} is not between 1 and {MAX_VCPUS}", self.vcpus),
            );
        }
        if let Err(e) = arch::GuestLayout::new(self.mem_size) {
            return bad("--memory", format!("{}: {e}", format_size(self.mem_size)));
        }
        if let Err(e) =
            linux_loader::cmdline::Cmdline::try_from(&format!(" {} ", self.cmdline), usize::MAX)
        {
            return bad("--cmdline", e.to_string());
        }
        for path in [Some(&self.kernel), self.initrd.as_ref()]
            .into_iter()
            .flatten()
        {
            if path.as_os_str().is_empty() {
                return bad(
                    if Some(path) == self.initrd.as_ref() {
                        "--initrd"
                    } else {
                        "--kernel"
                    },
                    "the path is empty",
                );
            }
        }
        if let SerialConfig::File(path) = &self.serial
            && path.as_os_str().is_empty()
        {
            return bad("--serial", "file= needs a path");
        }
        for disk in &self.disks {
            if disk.path.as_os_str().is_empty() {
                return bad("--disk", "path= is empty");
            }
            if let Some(id) = &disk.id
                && (id.len() > MAX_DISK_ID || !id.bytes().all(|b| b.is_ascii_graphic()))
            {
                return bad(
                    "--disk",
                    format!("id '{id}' must be 1 to {MAX_DISK_ID} printable ASCII characters"),
                );
            }
        }
        for (i, nic) in self.nets.iter().enumerate() {
            let t = &nic.tap;
            if let Err(problem) = check_tap_name(t) {
                return bad("--net", problem);
            }
            if self.nets[..i].iter().any(|other| &other.tap == t) {
                return bad("--net", format!("tap {t} is given twice"));
            }
            if let Some(mac) = nic.mac {
                if mac[0] & 1 != 0 {
                    return bad(
                        "--net",
                        format!("{} is a multicast address", format_mac(&mac)),
                    );
                }
                if mac == [0; 6] {
                    return bad("--net", "the MAC address 00:00:00:00:00:00 is not usable");
                }
                if self.nets[..i].iter().any(|other| other.mac == Some(mac)) {
                    return bad(
                        "--net",
                        format!("MAC address {} is given twice", format_mac(&mac)),
                    );
                }
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < MIN_GUEST_CID || v.cid == u32::MAX {
                return bad(
                    "--vsock",
                    format!(
                        "cid {} is reserved: use {MIN_GUEST_CID} to {}",
                        v.cid,
                        u32::MAX - 1
                    ),
                );
            }
            check_socket_path("--vsock", &v.socket)?;
        }
        if let Some(path) = &self.api_socket {
            check_socket_path("--api-sock", path)?;
        }
        Ok(())
    }

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
            seccomp: true,
            restore: None,
            boot_timer: false,
        }
    }
}

/// A TAP interface name: 1 to 15 printable characters without '/' or ':'.
pub fn check_tap_name(t: &str) -> Result<(), String> {
    if t.is_empty()
        || t.len() > MAX_TAP_NAME
        || t == "."
        || t == ".."
        || !t
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
    {
        return Err(format!(
            "tap name '{t}' must be 1 to {MAX_TAP_NAME} printable characters without '/' or ':'"
        ));
    }
    Ok(())
}

pub fn check_socket_path(flag: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len == 0 {
        return bad(flag, "the socket path is empty");
    }
    if len > MAX_SOCKET_PATH {
        return bad(
            flag,
            format!(
                "socket path {} is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                path.display()
            ),
        );
    }
    Ok(())
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

    fn with(f: impl FnOnce(&mut VmConfig)) -> Result<(), ConfigError> {
        let mut c = VmConfig::new("k".into());
        f(&mut c);
        c.validate()
    }

    #[test]
    fn rules() {
        assert_eq!(with(|_| {}), Ok(()));
        let disk = |id: &str| DiskConfig {
            path: "a.img".into(),
            readonly: false,
            id: Some(id.into()),
        };
        let nic = |tap: &str, mac: Option<[u8; 6]>| NetConfig {
            tap: tap.into(),
            mac,
            id: None,
        };
        let vsock = |cid: u32, socket: &str| VsockConfig {
            cid,
            socket: socket.into(),
        };
        let long = "/tmp/".to_string() + &"s".repeat(120);
        type Change = Box<dyn FnOnce(&mut VmConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("--cpus", Box::new(|c| c.vcpus = 0)),
            ("--cpus", Box::new(|c| c.vcpus = 33)),
            ("--memory", Box::new(|c| c.mem_size = 2 * MIB)),
            ("--memory", Box::new(|c| c.mem_size = 5 * MIB + 1)),
            ("--kernel", Box::new(|c| c.kernel = PathBuf::new())),
            (
                "--serial",
                Box::new(|c| c.serial = SerialConfig::File(PathBuf::new())),
            ),
            (
                "--disk",
                Box::new(move |c| c.disks = vec![disk("123456789012345678901")]),
            ),
            ("--disk", Box::new(move |c| c.disks = vec![disk("a b")])),
            (
                "--net",
                Box::new(move |c| c.nets = vec![nic("abcdefghijklmnop", None)]),
            ),
            ("--net", Box::new(move |c| c.nets = vec![nic("a/b", None)])),
            ("--net", Box::new(move |c| c.nets = vec![nic("", None)])),
            (
                "--net",
                Box::new(move |c| c.nets = vec![nic("t", Some([1, 0, 0, 0, 0, 1]))]),
            ),
            (
                "--net",
                Box::new(move |c| c.nets = vec![nic("t", Some([0; 6]))]),
            ),
            (
                "--net",
                Box::new(move |c| c.nets = vec![nic("t", None), nic("t", None)]),
            ),
            (
                "--net",
                Box::new(move |c| {
                    c.nets = vec![
                        nic("a", Some([2, 0, 0, 0, 0, 1])),
                        nic("b", Some([2, 0, 0, 0, 0, 1])),
                    ]
                }),
            ),
            (
                "--vsock",
                Box::new(move |c| c.vsock = Some(vsock(2, "/tmp/v"))),
            ),
            (
                "--vsock",
                Box::new(move |c| c.vsock = Some(vsock(u32::MAX, "/tmp/v"))),
            ),
            ("--vsock", Box::new(move |c| c.vsock = Some(vsock(3, "")))),
            (
                "--api-sock",
                Box::new(move |c| c.api_socket = Some(long.into())),
            ),
        ];
        for (flag, f) in cases {
            let err = with(f).expect_err(flag);
            assert_eq!(err.flag, flag, "{err}");
        }
        assert_eq!(
            with(|c| {
                c.vcpus = 32;
                c.nets = vec![nic("tap0", Some([2, 0, 0, 0, 0, 1]))];
                c.vsock = Some(vsock(3, "/tmp/v.sock"));
                c.cmdline = "a -- b".into();
            }),
            Ok(())
        );
    }

    #[test]
    fn serde_round_trip() {
        let mut c = VmConfig::new("vmlinux".into());
        c.disks.push(DiskConfig {
            path: "a.img".into(),
            readonly: true,
            id: None,
        });
        c.serial = SerialConfig::File("log".into());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        assert!(serde_json::from_str::<VmConfig>(&json.replace("\"vcpus\"", "\"cpus\"")).is_err());
    }

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
