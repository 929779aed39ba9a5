//! Firecracker's request bodies, as its API description (swagger 1.9)
//! names them, and the configuration they add up to before the VM starts.
//!
//! A field Firecracker knows and ligera does not implement (rate limiters,
//! vhost-user, CPU templates, huge pages, dirty-page tracking, ...) is
//! refused with a message naming it when it is given a value; an unknown
//! field is refused by serde (`deny_unknown_fields`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{
    DEFAULT_CMDLINE, DiskConfig, MAX_DISK_ID, NetConfig, RestoreConfig, SerialConfig, VmConfig,
    VsockConfig,
};

/// Firecracker's default machine: 1 vCPU, 128 MiB.
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Firecracker's vCPU limit.
pub const MAX_VCPUS: u8 = 32;
/// Longest `--config-file` read.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// A field ligera does not implement: only its absence (or null) passes.
type Unsupported = Option<Value>;

fn refuse(what: &str, field: &str, value: &Unsupported) -> Result<(), String> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(_) => Err(format!("{what}: '{field}' is not supported by ligera")),
    }
}

/// A string field where only `allowed` is implemented.
fn only(what: &str, field: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), String> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(format!(
            "{what}: {field} '{v}' is not supported by ligera (only {})",
            allowed.join(", ")
        )),
        _ => Ok(()),
    }
}

/// A flag where only `false` is implemented.
fn not_true(what: &str, field: &str, value: Option<bool>, why: &str) -> Result<(), String> {
    if value == Some(true) {
        return Err(format!(
            "{what}: '{field}' is not supported by ligera ({why})"
        ));
    }
    Ok(())
}

/// Parses a JSON body into `T`, or says what is wrong, naming the request.
pub fn parse<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("{what}: {e}"))
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    #[serde(default)]
    pub boot_args: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    vcpu_count: Option<u8>,
    mem_size_mib: Option<u64>,
    smt: Option<bool>,
    track_dirty_pages: Option<bool>,
    cpu_template: Option<String>,
    huge_pages: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveBody {
    drive_id: String,
    path_on_host: Option<PathBuf>,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: Option<bool>,
    #[serde(default)]
    partuuid: Option<String>,
    #[serde(default)]
    cache_type: Option<String>,
    #[serde(default)]
    rate_limiter: Unsupported,
    #[serde(default)]
    io_engine: Option<String>,
    #[serde(default)]
    socket: Unsupported,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Unsupported,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetBody {
    iface_id: String,
    host_dev_name: String,
    #[serde(default)]
    guest_mac: Option<String>,
    #[serde(default)]
    rx_rate_limiter: Unsupported,
    #[serde(default)]
    tx_rate_limiter: Unsupported,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNet {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Unsupported,
    #[serde(default)]
    pub tx_rate_limiter: Unsupported,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockBody {
    guest_cid: u32,
    uds_path: PathBuf,
    /// Deprecated in Firecracker, and without effect there too.
    #[serde(default)]
    #[allow(dead_code)]
    vsock_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EntropyBody {
    #[serde(default)]
    rate_limiter: Unsupported,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct LoggerBody {
    pub level: Option<String>,
    pub log_path: Option<PathBuf>,
    pub show_level: Option<bool>,
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Unsupported,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct MetricsBody {
    pub metrics_path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: String,
    backend_path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkOverride {
    iface_id: String,
    host_dev_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockOverride {
    uds_path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    track_dirty_pages: Option<bool>,
    #[serde(default)]
    resume_vm: Option<bool>,
    #[serde(default)]
    network_overrides: Option<Vec<NetworkOverride>>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    clock_realtime: Option<bool>,
    #[serde(default)]
    huge_pages: Option<String>,
}

/// `--config-file`: Firecracker's `FullVmConfiguration`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(rename = "boot-source")]
    boot_source: Option<BootSource>,
    #[serde(default)]
    drives: Vec<Value>,
    #[serde(rename = "machine-config")]
    machine_config: Option<Value>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<Value>,
    vsock: Option<Value>,
    entropy: Option<Value>,
    pub logger: Option<LoggerBody>,
    pub metrics: Option<MetricsBody>,
    #[serde(default)]
    balloon: Unsupported,
    #[serde(rename = "mmds-config", default)]
    mmds_config: Unsupported,
    #[serde(rename = "cpu-config", default)]
    cpu_config: Unsupported,
}

/// A drive as configured.
#[derive(Clone, Debug)]
struct Drive {
    id: String,
    path: PathBuf,
    read_only: bool,
    root: bool,
    partuuid: Option<String>,
    cache_type: String,
}

/// A network interface as configured.
#[derive(Clone, Debug)]
struct Net {
    id: String,
    tap: String,
    mac: Option<[u8; 6]>,
}

/// What the pre-boot requests have configured so far.
#[derive(Clone, Debug)]
pub struct Resources {
    boot: Option<BootSource>,
    vcpus: u8,
    mem_mib: u64,
    drives: Vec<Drive>,
    nets: Vec<Net>,
    vsock: Option<(u32, PathBuf)>,
    entropy: bool,
    /// Whether any resource was configured (a snapshot load is then refused).
    touched: bool,
    /// From the command line.
    pub boot_timer: bool,
    pub seccomp: bool,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            boot: None,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            entropy: false,
            touched: false,
            boot_timer: false,
            seccomp: true,
        }
    }
}

/// A file the VM will open: it must be there now, so the mistake is
/// reported by the request that made it, and be a regular file (a named
/// pipe would block whoever opens it; `block_ok` lets a drive be a block
/// device).
fn check_file(what: &str, path: &Path, block_ok: bool) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || (block_ok && m.file_type().is_block_device()) => Ok(()),
        Ok(_) => Err(format!(
            "{what}: {} is not a regular file{}",
            path.display(),
            if block_ok { " or block device" } else { "" }
        )),
        Err(e) => Err(format!("{what}: {}: {e}", path.display())),
    }
}

/// Virtio devices configured (a new drive or interface must fit).
fn room_for_one_more(r: &Resources, what: &str) -> Result<(), String> {
    let devices =
        r.drives.len() + r.nets.len() + usize::from(r.vsock.is_some()) + usize::from(r.entropy);
    if devices >= crate::device_manager::MAX_VIRTIO_DEVICES {
        return Err(format!(
            "{what}: a VM has at most {} virtio devices",
            crate::device_manager::MAX_VIRTIO_DEVICES
        ));
    }
    Ok(())
}

/// Path IDs and body IDs must agree, as in Firecracker.
fn same_id(path_id: &str, body_id: &str) -> Result<(), String> {
    if path_id != body_id {
        return Err(format!(
            "the ID in the path ('{path_id}') does not match the ID in the body ('{body_id}')"
        ));
    }
    Ok(())
}

/// The ID of `PUT /KIND/{path_id}`, checked against the body's and
/// Firecracker's rule; returns the request's name for messages.
fn checked_id(kind: &str, path_id: &str, body_id: &str) -> Result<String, String> {
    let what = format!("{kind}/{path_id}");
    same_id(path_id, body_id)?;
    check_id(&what, path_id)?;
    Ok(what)
}

/// IDs: 1 to 64 letters, digits, '-' or '_' (Firecracker's rule).
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "{what}: ID '{id}' must be 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

impl Resources {
    pub fn put_boot_source(&mut self, body: BootSource) -> Result<(), String> {
        check_file(
            "boot-source: kernel_image_path",
            &body.kernel_image_path,
            false,
        )?;
        if let Some(initrd) = &body.initrd_path {
            check_file("boot-source: initrd_path", initrd, false)?;
        }
        if let Some(args) = &body.boot_args
            && let Err(e) = linux_loader::cmdline::Cmdline::try_from(args, 4096)
        {
            return Err(format!("boot-source: boot_args: {e}"));
        }
        self.boot = Some(body);
        self.touched = true;
        Ok(())
    }

    /// PUT (`partial` false: both counts required, the rest back to
    /// defaults) or PATCH (`partial` true) of the machine configuration.
    pub fn put_machine_config(&mut self, body: MachineConfig, partial: bool) -> Result<(), String> {
        const WHAT: &str = "machine-config";
        not_true(WHAT, "smt", body.smt, "one thread per core")?;
        not_true(
            WHAT,
            "track_dirty_pages",
            body.track_dirty_pages,
            "no diff snapshots",
        )?;
        only(WHAT, "cpu_template", &body.cpu_template, &["None"])?;
        only(WHAT, "huge_pages", &body.huge_pages, &["None"])?;
        if !partial && (body.vcpu_count.is_none() || body.mem_size_mib.is_none()) {
            return Err(format!("{WHAT}: vcpu_count and mem_size_mib are required"));
        }
        let vcpus = body.vcpu_count.unwrap_or(self.vcpus);
        let mib = body.mem_size_mib.unwrap_or(self.mem_mib);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(format!(
                "{WHAT}: vcpu_count {vcpus} is not between 1 and {MAX_VCPUS}"
            ));
        }
        let bytes = mib
            .checked_mul(1 << 20)
            .ok_or_else(|| format!("{WHAT}: mem_size_mib {mib} is too large"))?;
        if let Err(e) = arch::GuestLayout::new(bytes) {
            return Err(format!("{WHAT}: mem_size_mib {mib}: {e}"));
        }
        self.vcpus = vcpus;
        self.mem_mib = mib;
        self.touched = true;
        Ok(())
    }

    pub fn put_drive(&mut self, path_id: &str, body: DriveBody) -> Result<(), String> {
        let what = checked_id("drives", path_id, &body.drive_id)?;
        refuse(&what, "rate_limiter", &body.rate_limiter)?;
        refuse(&what, "socket (vhost-user)", &body.socket)?;
        only(&what, "io_engine", &body.io_engine, &["Sync"])?;
        only(
            &what,
            "cache_type",
            &body.cache_type,
            &["Unsafe", "Writeback"],
        )?;
        let path = body
            .path_on_host
            .ok_or_else(|| format!("{what}: path_on_host is required"))?;
        check_file(&format!("{what}: path_on_host"), &path, true)?;
        if !self.has_drive(path_id) {
            room_for_one_more(self, &what)?;
        }
        if body.is_root_device
            && let Some(other) = self.drives.iter().find(|d| d.root && d.id != path_id)
        {
            return Err(format!(
                "{what}: drive '{}' is the root device already",
                other.id
            ));
        }
        if let Some(p) = &body.partuuid
            && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        {
            return Err(format!("{what}: partuuid '{p}' is not a partition UUID"));
        }
        let drive = Drive {
            id: body.drive_id,
            path,
            read_only: body.is_read_only.unwrap_or(false),
            root: body.is_root_device,
            partuuid: body.partuuid,
            cache_type: body.cache_type.unwrap_or_else(|| "Unsafe".into()),
        };
        let id = drive.id.clone();
        upsert(&mut self.drives, drive, |d| d.id == id);
        self.touched = true;
        Ok(())
    }

    pub fn put_net(&mut self, path_id: &str, body: NetBody) -> Result<(), String> {
        let what = checked_id("network-interfaces", path_id, &body.iface_id)?;
        refuse(&what, "rx_rate_limiter", &body.rx_rate_limiter)?;
        refuse(&what, "tx_rate_limiter", &body.tx_rate_limiter)?;
        if !self.has_net(path_id) {
            room_for_one_more(self, &what)?;
        }
        let mac = body
            .guest_mac
            .as_deref()
            .map(crate::options::parse_mac)
            .transpose()
            .map_err(|e| format!("{what}: guest_mac: {e}"))?;
        let tap = body.host_dev_name;
        crate::config::check_tap_name(&tap).map_err(|e| format!("{what}: host_dev_name: {e}"))?;
        if let Some(other) = self.nets.iter().find(|n| n.tap == tap && n.id != path_id) {
            return Err(format!(
                "{what}: tap '{tap}' is used by interface '{}' already",
                other.id
            ));
        }
        if let Some(mac) = mac
            && let Some(other) = self
                .nets
                .iter()
                .find(|n| n.mac == Some(mac) && n.id != path_id)
        {
            return Err(format!(
                "{what}: guest_mac is used by interface '{}' already",
                other.id
            ));
        }
        let net = Net {
            id: body.iface_id,
            tap,
            mac,
        };
        let id = net.id.clone();
        upsert(&mut self.nets, net, |n| n.id == id);
        self.touched = true;
        Ok(())
    }

    pub fn put_vsock(&mut self, body: VsockBody) -> Result<(), String> {
        if body.guest_cid < crate::config::MIN_GUEST_CID || body.guest_cid == u32::MAX {
            return Err(format!(
                "vsock: guest_cid {} is reserved (3 and up)",
                body.guest_cid
            ));
        }
        crate::config::check_socket_path("vsock: uds_path", &body.uds_path)
            .map_err(|e| e.to_string())?;
        if self.vsock.is_none() {
            room_for_one_more(self, "vsock")?;
        }
        self.vsock = Some((body.guest_cid, body.uds_path));
        self.touched = true;
        Ok(())
    }

    pub fn put_entropy(&mut self, body: EntropyBody) -> Result<(), String> {
        refuse("entropy", "rate_limiter", &body.rate_limiter)?;
        if !self.entropy {
            room_for_one_more(self, "entropy")?;
        }
        self.entropy = true;
        self.touched = true;
        Ok(())
    }

    pub fn has_drive(&self, id: &str) -> bool {
        self.drives.iter().any(|d| d.id == id)
    }

    pub fn has_net(&self, id: &str) -> bool {
        self.nets.iter().any(|n| n.id == id)
    }

    /// Whether anything was configured (a snapshot can then not be loaded).
    pub fn touched(&self) -> bool {
        self.touched
    }

    /// `GET /machine-config`.
    pub fn machine_config_json(&self) -> Value {
        json!({
            "vcpu_count": self.vcpus,
            "mem_size_mib": self.mem_mib,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "None",
        })
    }

    /// `GET /vm/config`.
    pub fn vm_config_json(&self) -> Value {
        let drives: Vec<Value> = self
            .drives
            .iter()
            .map(|d| {
                json!({
                    "drive_id": d.id,
                    "path_on_host": d.path,
                    "is_root_device": d.root,
                    "partuuid": d.partuuid,
                    "is_read_only": d.read_only,
                    "cache_type": d.cache_type,
                    "io_engine": "Sync",
                    "rate_limiter": null,
                    "socket": null,
                })
            })
            .collect();
        let nets: Vec<Value> = self
            .nets
            .iter()
            .map(|n| {
                json!({
                    "iface_id": n.id,
                    "host_dev_name": n.tap,
                    "guest_mac": n.mac.map(|m| devices::virtio::net::format_mac(&m)),
                    "rx_rate_limiter": null,
                    "tx_rate_limiter": null,
                })
            })
            .collect();
        json!({
            "balloon": null,
            "boot-source": self.boot.as_ref().map(|b| json!({
                "kernel_image_path": b.kernel_image_path,
                "initrd_path": b.initrd_path,
                "boot_args": b.boot_args,
            })),
            "drives": drives,
            "machine-config": self.machine_config_json(),
            "cpu-config": null,
            "network-interfaces": nets,
            "vsock": self.vsock.as_ref().map(|(cid, path)| json!({
                "guest_cid": cid,
                "uds_path": path,
            })),
            "entropy": self.entropy.then(|| json!({"rate_limiter": null})),
            "mmds-config": null,
        })
    }

    /// The VM these resources describe, for `InstanceStart`.
    pub fn vm_config(&self) -> Result<VmConfig, String> {
        let boot = self.boot.as_ref().ok_or(
            "cannot start the microVM without a kernel: PUT /boot-source first".to_string(),
        )?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        // The root device is the first disk, /dev/vda, as in Firecracker.
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.root).collect();
        drives.extend(self.drives.iter().filter(|d| !d.root));
        if let Some(root) = drives.first().filter(|d| d.root) {
            match &root.partuuid {
                Some(uuid) => cmdline += &format!(" root=PARTUUID={uuid}"),
                None => cmdline += " root=/dev/vda",
            }
            cmdline += if root.read_only { " ro" } else { " rw" };
        }
        let config = VmConfig {
            initrd: boot.initrd_path.clone(),
            cmdline,
            vcpus: self.vcpus,
            mem_size: self.mem_mib << 20,
            serial: SerialConfig::Stdio,
            rng: self.entropy,
            disks: drives
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    readonly: d.read_only,
                    // The guest reads the drive's ID as its serial, as in
                    // Firecracker (cut to the 20 bytes virtio-blk has).
                    id: Some(d.id.chars().take(MAX_DISK_ID).collect()),
                })
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|n| NetConfig {
                    tap: n.tap.clone(),
                    mac: n.mac,
                    id: Some(n.id.clone()),
                })
                .collect(),
            vsock: self.vsock.as_ref().map(|(cid, path)| VsockConfig {
                cid: *cid,
                socket: path.clone(),
            }),
            seccomp: self.seccomp,
            boot_timer: self.boot_timer,
            ..VmConfig::new(boot.kernel_image_path.clone())
        };
        config
            .validate()
            .map_err(|e| format!("invalid configuration: {e}"))?;
        Ok(config)
    }

    /// The resources of a VM restored from a snapshot, for `GET /vm/config`.
    pub fn from_vm_config(config: &VmConfig) -> Resources {
        Resources {
            boot: Some(BootSource {
                kernel_image_path: config.kernel.clone(),
                initrd_path: config.initrd.clone(),
                boot_args: Some(config.cmdline.clone()),
            }),
            vcpus: config.vcpus,
            mem_mib: config.mem_size >> 20,
            drives: config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Drive {
                    id: d.id.clone().unwrap_or_else(|| format!("disk{i}")),
                    path: d.path.clone(),
                    read_only: d.readonly,
                    root: false,
                    partuuid: None,
                    cache_type: "Unsafe".into(),
                })
                .collect(),
            nets: config
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| Net {
                    id: n.iface_id(i),
                    tap: n.tap.clone(),
                    mac: n.mac,
                })
                .collect(),
            vsock: config.vsock.as_ref().map(|v| (v.cid, v.socket.clone())),
            entropy: config.rng,
            touched: true,
            boot_timer: config.boot_timer,
            seccomp: config.seccomp,
        }
    }

    /// Applies a `--config-file`; returns its logger and metrics sections.
    pub fn apply_file(
        &mut self,
        text: &[u8],
    ) -> Result<(Option<LoggerBody>, Option<MetricsBody>), String> {
        let file: ConfigFile = parse("config file", text)?;
        refuse("config file", "balloon", &file.balloon)?;
        refuse("config file", "mmds-config", &file.mmds_config)?;
        refuse("config file", "cpu-config", &file.cpu_config)?;
        let boot = file
            .boot_source
            .ok_or("config file: 'boot-source' is required")?;
        self.put_boot_source(boot)?;
        if let Some(m) = file.machine_config {
            let body = serde_json::from_value(m).map_err(|e| format!("machine-config: {e}"))?;
            self.put_machine_config(body, false)?;
        }
        for d in file.drives {
            let body: DriveBody = serde_json::from_value(d).map_err(|e| format!("drives: {e}"))?;
            let id = body.drive_id.clone();
            self.put_drive(&id, body)?;
        }
        for n in file.network_interfaces {
            let body: NetBody =
                serde_json::from_value(n).map_err(|e| format!("network-interfaces: {e}"))?;
            let id = body.iface_id.clone();
            self.put_net(&id, body)?;
        }
        if let Some(v) = file.vsock {
            self.put_vsock(serde_json::from_value(v).map_err(|e| format!("vsock: {e}"))?)?;
        }
        if let Some(e) = file.entropy {
            self.put_entropy(serde_json::from_value(e).map_err(|e| format!("entropy: {e}"))?)?;
        }
        Ok((file.logger, file.metrics))
    }
}

/// What `PUT /snapshot/load` asks for: the snapshot's VM with the
/// request's overrides, and whether it starts paused.
pub fn snapshot_load_config(body: SnapshotLoad, seccomp: bool) -> Result<(VmConfig, bool), String> {
    const WHAT: &str = "snapshot/load";
    not_true(
        WHAT,
        "enable_diff_snapshots",
        body.enable_diff_snapshots,
        "no diff snapshots",
    )?;
    not_true(
        WHAT,
        "track_dirty_pages",
        body.track_dirty_pages,
        "no diff snapshots",
    )?;
    not_true(
        WHAT,
        "clock_realtime",
        body.clock_realtime,
        "kvm-clock goes on from the snapshot; a sandbox's agent sets the time",
    )?;
    only(WHAT, "huge_pages", &body.huge_pages, &["None"])?;
    let memory = match (body.mem_file_path, body.mem_backend) {
        (Some(path), None) => path,
        (None, Some(b)) if b.backend_type == "File" => b.backend_path,
        (None, Some(b)) => {
            return Err(format!(
                "{WHAT}: mem_backend type '{}' is not supported by ligera (only File)",
                b.backend_type
            ));
        }
        _ => {
            return Err(format!(
                "{WHAT}: give exactly one of mem_backend and mem_file_path"
            ));
        }
    };
    check_file(
        &format!("{WHAT}: snapshot_path"),
        &body.snapshot_path,
        false,
    )?;
    check_file(&format!("{WHAT}: memory file"), &memory, false)?;
    let snapshot = crate::snapshot::read_state(&body.snapshot_path)
        .map_err(|e| format!("{WHAT}: cannot load the snapshot: {e}"))?;
    let snapshot = std::sync::Arc::new(snapshot);
    let mut config = snapshot.config.clone();
    config.serial = SerialConfig::Stdio;
    config.api_socket = None;
    config.seccomp = seccomp;
    for o in body.network_overrides.unwrap_or_default() {
        crate::config::check_tap_name(&o.host_dev_name)
            .map_err(|e| format!("{WHAT}: network_overrides: {e}"))?;
        let found = config
            .nets
            .iter_mut()
            .enumerate()
            .find(|(i, n)| n.iface_id(*i) == o.iface_id);
        match found {
            Some((_, n)) => n.tap = o.host_dev_name,
            None => {
                return Err(format!(
                    "{WHAT}: network_overrides: the snapshot has no interface '{}'",
                    o.iface_id
                ));
            }
        }
    }
    if let Some(o) = body.vsock_override {
        crate::config::check_socket_path("vsock_override: uds_path", &o.uds_path)
            .map_err(|e| format!("{WHAT}: {e}"))?;
        match &mut config.vsock {
            Some(v) => v.socket = o.uds_path,
            None => return Err(format!("{WHAT}: vsock_override: the snapshot has no vsock")),
        }
    }
    config.restore = Some(RestoreConfig {
        state: body.snapshot_path,
        memory,
        read: crate::config::ReadState(Some(snapshot)),
        memory_id: None,
    });
    Ok((config, !body.resume_vm.unwrap_or(false)))
}

/// Replaces the item of `list` that `same` picks with `item`, or appends it.
fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) {
    match list.iter_mut().find(|x| same(x)) {
        Some(x) => *x = item,
        None => list.push(item),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn kernel() -> Scratch {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ligera-fc-unit-{}-{n}", std::process::id()));
        std::fs::write(&path, b"kernel").unwrap();
        Scratch(path)
    }

    #[test]
    fn unsupported_and_unknown_fields_are_named() {
        let mut r = Resources::default();
        let cases = [
            (
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
                "'smt'",
            ),
            (
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"}"#,
                "cpu_template 'T2'",
            ),
            (
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
                "huge_pages '2M'",
            ),
            (
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true}"#,
                "'track_dirty_pages'",
            ),
            (
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "colour": 1}"#,
                "unknown field `colour`",
            ),
            (r#"{"vcpu_count": 2}"#, "required"),
            (
                r#"{"vcpu_count": 33, "mem_size_mib": 256}"#,
                "between 1 and 32",
            ),
        ];
        for (body, named) in cases {
            let e = parse::<MachineConfig>("machine-config", body.as_bytes())
                .and_then(|b| r.put_machine_config(b, false))
                .unwrap_err();
            assert!(e.contains(named), "{body}: {e}");
        }
        let k = kernel();
        let path = k.path().display();
        let drive = |extra: &str| {
            format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{path}", "is_root_device": true{extra}}}"#
            )
        };
        for (extra, named) in [
            (
                r#", "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}"#,
                "'rate_limiter'",
            ),
            (r#", "io_engine": "Async""#, "io_engine 'Async'"),
            (r#", "socket": "/x""#, "'socket (vhost-user)'"),
        ] {
            let e = parse::<DriveBody>("drives", drive(extra).as_bytes())
                .and_then(|b| r.put_drive("rootfs", b))
                .unwrap_err();
            assert!(e.contains(named), "{extra}: {e}");
        }
        let e = parse::<DriveBody>("drives", drive("").as_bytes())
            .and_then(|b| r.put_drive("other", b))
            .unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert!(!r.touched(), "failed requests change nothing");
    }

    #[test]
    fn root_device_comes_first_and_names_the_root() {
        let (k, a, b) = (kernel(), kernel(), kernel());
        let mut r = Resources::default();
        assert!(r.vm_config().unwrap_err().contains("boot-source"));
        r.put_boot_source(BootSource {
            kernel_image_path: k.path().into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        })
        .unwrap();
        for (id, file, root) in [("data", &a, false), ("rootfs", &b, true)] {
            let body = format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": {root}, "is_read_only": {root}}}"#,
                file.path().display()
            );
            r.put_drive(id, parse("drives", body.as_bytes()).unwrap())
                .unwrap();
        }
        let c = r.vm_config().unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(c.disks[0].path, b.path());
        assert_eq!(c.disks[0].id.as_deref(), Some("rootfs"));
        assert_eq!((c.vcpus, c.mem_size), (1, 128 << 20));
        // A second root device is refused.
        let body = format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": true}}"#,
            a.path().display()
        );
        let e = r
            .put_drive("data", parse("drives", body.as_bytes()).unwrap())
            .unwrap_err();
        assert!(e.contains("root device already"), "{e}");
        // PATCH keeps what it does not name.
        r.put_machine_config(parse("m", br#"{"mem_size_mib": 512}"#).unwrap(), true)
            .unwrap();
        assert_eq!(r.machine_config_json()["mem_size_mib"], 512);
        assert_eq!(r.machine_config_json()["vcpu_count"], 1);
    }

    #[test]
    fn drives_and_interfaces_are_bounded() {
        let disk = kernel();
        let mut r = Resources::default();
        let max = crate::device_manager::MAX_VIRTIO_DEVICES;
        for i in 0..=max {
            let id = format!("d{i}");
            let body = format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": false}}"#,
                disk.path().display()
            );
            let result = r.put_drive(&id, parse("drives", body.as_bytes()).unwrap());
            assert_eq!(result.is_ok(), i < max, "{i}: {result:?}");
        }
        // Updating one that exists still works.
        let body = format!(
            r#"{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": true}}"#,
            disk.path().display()
        );
        r.put_drive("d0", parse("drives", body.as_bytes()).unwrap())
            .unwrap();
    }

    #[test]
    fn config_file_in_firecrackers_format() {
        let k = kernel();
        let text = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k"}},
              "drives": [],
              "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64, "smt": false}},
              "network-interfaces": [],
              "vsock": {{"guest_cid": 3, "uds_path": "/tmp/v.sock"}},
              "entropy": {{}},
              "logger": {{"level": "Debug"}}
            }}"#,
            k.path().display()
        );
        let mut r = Resources::default();
        let (logger, metrics) = r.apply_file(text.as_bytes()).unwrap();
        assert_eq!(logger.unwrap().level.as_deref(), Some("Debug"));
        assert!(metrics.is_none());
        let c = r.vm_config().unwrap();
        assert_eq!((c.vcpus, c.mem_size, c.rng), (2, 64 << 20, true));
        assert_eq!(c.vsock.unwrap().cid, 3);
        let e = Resources::default()
            .apply_file(
                br#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {"amount_mib": 1}}"#,
            )
            .unwrap_err();
        assert!(e.contains("'balloon'"), "{e}");
    }

    #[test]
    fn snapshot_load_needs_one_file_memory_backend() {
        for (body, named) in [
            (r#"{"snapshot_path": "/s"}"#, "exactly one"),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
                "exactly one",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
                "'Uffd'",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
                "'enable_diff_snapshots'",
            ),
            (
                r#"{"snapshot_path": "/nonexistent", "mem_file_path": "/m"}"#,
                "snapshot_path: /nonexistent",
            ),
        ] {
            let e = parse::<SnapshotLoad>("snapshot/load", body.as_bytes())
                .and_then(|b| snapshot_load_config(b, true))
                .unwrap_err();
            assert!(e.contains(named), "{body}: {e}");
        }
    }
}
