//! Snapshots: a paused VM written to two files, and a VM restored from them.
//!
//! - The **state file** holds everything but guest RAM: the configuration,
//!   every vCPU's KVM state, the VM's interrupt controllers, PIT and clock,
//!   and every device (serial, i8042, each virtio transport with its queue
//!   positions). It starts with a 32-byte header: the magic `LIGERAsn`, the
//!   format version, the payload's length and its CRC-32; the payload is
//!   JSON. A file that is not one, is cut short, has a wrong checksum or a
//!   newer version is refused with a message saying which, before anything
//!   is built.
//! - The **memory file** is guest RAM, its regions one after another, with
//!   holes where the guest never wrote (pages never touched, or all zero):
//!   a 2 GiB guest that used 100 MiB costs about 100 MiB of disk.
//!
//! A restore maps the memory file private and copy-on-write: nothing is
//! read up front, the guest faults pages in from the page cache as it
//! touches them, and VMs restored from one snapshot share its unchanged
//! pages.

pub mod cli;
pub mod kvm;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::{I8042, I8042Snapshot};
use devices::serial::{SerialConsole, SerialSnapshot};
use devices::virtio::VirtioDevice;
use devices::virtio::mmio::{MmioTransport, TransportSnapshot};
use devices::virtio::runner::DeviceMailbox;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{VmConfig, format_size};
use crate::vm::VmControl;
use kvm::{VcpuState, VmKvmState};

/// The state file's first bytes.
pub const MAGIC: [u8; 8] = *b"LIGERAsn";
/// The format this ligera writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// A state file is a few hundred KiB; anything past this is not one.
pub const MAX_STATE_SIZE: u64 = 64 << 20;
const PAGE: usize = 4096;

/// Everything in a state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The VM's configuration (paths as the VM saw them, MACs filled in).
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmKvmState,
    pub devices: DevicesSnapshot,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesSnapshot {
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    /// In bus order: `(name, transport)`.
    pub virtio: Vec<(String, TransportSnapshot)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a ligera snapshot state file", path.display())]
    NotSnapshot { path: PathBuf },
    #[error(
        "{}: snapshot format {found}, but this ligera reads format {VERSION} (made by a newer ligera?)",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{}: the state file is cut short ({got} of {expected} bytes)", path.display())]
    Truncated {
        path: PathBuf,
        got: u64,
        expected: u64,
    },
    #[error("{}: the state file is corrupted (checksum mismatch)", path.display())]
    Checksum { path: PathBuf },
    #[error("{}: the state file does not describe a VM this ligera can restore: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `snapshot` to `file` (`path` names it in errors).
pub fn write_state(snapshot: &Snapshot, file: &mut File, path: &Path) -> Result<(), SnapshotError> {
    let payload = serde_json::to_vec(snapshot).map_err(|e| SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    file.set_len(0).map_err(io_err(path))?;
    file.write_all(&header).map_err(io_err(path))?;
    file.write_all(&payload).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<Snapshot, SnapshotError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > MAX_STATE_SIZE {
        return Err(SnapshotError::NotSnapshot {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_STATE_SIZE)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    parse_state(&bytes, path)
}

/// Checks a state file's bytes and decodes them.
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<Snapshot, SnapshotError> {
    let path = path.to_path_buf();
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(SnapshotError::NotSnapshot { path });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path,
            got: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
    let version = u32_at(8);
    if version != VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
        });
    }
    let payload_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let expected = (HEADER_LEN as u64).saturating_add(payload_len);
    let got = bytes.len() as u64;
    if got < expected {
        return Err(SnapshotError::Truncated {
            path,
            got,
            expected,
        });
    }
    if got > expected {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!("{} bytes after its end", got - expected),
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != u32_at(24) {
        return Err(SnapshotError::Checksum { path });
    }
    let snapshot: Snapshot =
        serde_json::from_slice(payload).map_err(|e| SnapshotError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let invalid = |reason: String| SnapshotError::Invalid {
        path: path.clone(),
        reason,
    };
    snapshot
        .config
        .validate()
        .map_err(|e| invalid(e.to_string()))?;
    if snapshot.vcpus.len() != usize::from(snapshot.config.vcpus) {
        return Err(invalid(format!(
            "{} vCPU states for {} vCPUs",
            snapshot.vcpus.len(),
            snapshot.config.vcpus
        )));
    }
    Ok(snapshot)
}

/// Writes guest RAM to `file`, its regions one after another, leaving holes
/// for pages the guest never touched or that hold only zeros. Returns the
/// bytes written. Nothing may write guest memory meanwhile (vCPUs paused,
/// devices idle).
pub fn write_memory(
    mem: &arch::GuestMemoryMmap,
    file: &File,
    path: &Path,
) -> Result<u64, SnapshotError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(0).map_err(io_err(path))?;
    file.set_len(total).map_err(io_err(path))?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host =
            mem.get_host_address(region.start_addr())
                .map_err(|e| SnapshotError::Invalid {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
        // SAFETY: the region's mapping, `len` bytes, alive as long as `mem`;
        // nothing writes it while we read (see above).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let resident = resident_pages(host, len);
        let mut page = 0;
        let pages = len / PAGE;
        while page < pages {
            if !resident[page] || is_zero(&bytes[page * PAGE..(page + 1) * PAGE]) {
                page += 1;
                continue;
            }
            // A run of pages with data, at most 1 MiB per write.
            let start = page;
            while page < pages
                && page - start < 256
                && resident[page]
                && !is_zero(&bytes[page * PAGE..(page + 1) * PAGE])
            {
                page += 1;
            }
            let run = &bytes[start * PAGE..page * PAGE];
            file.write_all_at(run, offset + (start * PAGE) as u64)
                .map_err(io_err(path))?;
            written += run.len() as u64;
        }
        offset += len as u64;
    }
    file.sync_all().map_err(io_err(path))?;
    Ok(written)
}

/// Which pages of a mapping are in memory (a page never touched is not, and
/// reads as zero); all of them if the kernel will not say.
fn resident_pages(host: *mut u8, len: usize) -> Vec<bool> {
    let pages = len / PAGE;
    let mut vec = vec![0u8; pages];
    // SAFETY: `host` is page-aligned (an mmap), `len` bytes mapped; `vec`
    // has one byte per page.
    let ret = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    if ret != 0 {
        return vec![true; pages];
    }
    vec.iter().map(|b| b & 1 != 0).collect()
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to keeps the bytes.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Maps a memory file as guest RAM for `layout`: private and copy-on-write,
/// so the file never changes and pages are read only when the guest
/// touches them.
pub fn map_memory(
    file: &File,
    path: &Path,
    layout: &arch::GuestLayout,
) -> Result<arch::GuestMemoryMmap, SnapshotError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let len = file.metadata().map_err(io_err(path))?.len();
    if len != layout.mem_size() {
        return Err(SnapshotError::Mismatch {
            path: path.to_path_buf(),
            reason: format!(
                "the memory file holds {}, the snapshot's VM has {}",
                format_size(len),
                format_size(layout.mem_size())
            ),
        });
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in layout.ram_regions() {
        let dup = file.try_clone().map_err(io_err(path))?;
        let region = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::new(dup, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(path, &e))?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| map_err(path, &"the region does not fit the address space"))?;
        regions.push(region);
        offset += size;
    }
    arch::GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(path, &e))
}

fn map_err(path: &Path, e: &dyn std::fmt::Display) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: format!("cannot map guest memory: {e}"),
    }
}

/// A virtio device as a snapshot reaches it.
pub struct VirtioPart {
    pub name: String,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub mailbox: Arc<DeviceMailbox>,
}

/// What a snapshot of a running VM is taken from (see
/// [`crate::vm::Vm::snapshot_source`]); the control socket's thread holds it.
pub struct Source {
    pub control: Arc<VmControl>,
    pub vm: Arc<VmFd>,
    pub mem: arch::GuestMemoryMmap,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub virtio: Vec<VirtioPart>,
    pub config: VmConfig,
    pub msr_list: Arc<Vec<u32>>,
}

/// What a snapshot took.
#[derive(Debug)]
pub struct Created {
    pub state_bytes: u64,
    /// Guest RAM bytes written (the rest are holes).
    pub memory_bytes: u64,
    pub elapsed: Duration,
}

/// How long a vCPU may take to hand over its state.
const VCPU_ANSWER: Duration = Duration::from_secs(5);

impl Source {
    /// Writes a snapshot of the paused VM: its state to `state` and its RAM
    /// to `memory` (both created or truncated). The VM stays paused
    /// throughout and afterwards; the devices are held idle while it is taken.
    pub fn create(
        &self,
        state: (&mut File, &Path),
        memory: (&File, &Path),
    ) -> Result<Created, String> {
        let started = Instant::now();
        self.control.while_paused(|vcpus| {
            let list = &self.msr_list;
            let mut vcpu_states = Vec::with_capacity(vcpus.len());
            for v in vcpus {
                let list = list.clone();
                let saved = v
                    .run_paused(move |fd| kvm::save_vcpu(fd, &list), VCPU_ANSWER)
                    .map_err(|e| e.to_string())?;
                vcpu_states.push(saved?);
            }
            // Activations and resets the vCPUs asked for are carried out
            // first; then every device is held (its event loop waits).
            for part in &self.virtio {
                if !part.mailbox.settle() {
                    return Err(format!("{}: the device does not settle", part.name));
                }
            }
            let held: Vec<_> = self.virtio.iter().map(|p| lock(&p.device)).collect();
            let mut config = self.config.clone();
            config.restore = None;
            let mut virtio = Vec::with_capacity(held.len());
            let mut nets = config.nets.iter_mut();
            for (part, device) in self.virtio.iter().zip(&held) {
                if device.device_type() == devices::virtio::TYPE_NET
                    && let Some(net) = nets.next()
                {
                    // The MAC the guest has, also when ligera chose it.
                    let mut mac = [0u8; 6];
                    device.read_config(0, &mut mac);
                    net.mac = Some(mac);
                }
                virtio.push((part.name.clone(), lock(&part.transport).save(&**device)));
            }
            let snapshot = Snapshot {
                config,
                vcpus: vcpu_states,
                vm: kvm::save_vm(&self.vm)?,
                devices: DevicesSnapshot {
                    serial: lock(&self.serial).save(),
                    i8042: lock(&self.i8042).save(),
                    virtio,
                },
            };
            let memory_bytes =
                write_memory(&self.mem, memory.0, memory.1).map_err(|e| e.to_string())?;
            drop(held);
            write_state(&snapshot, state.0, state.1).map_err(|e| e.to_string())?;
            let state_bytes = state.0.metadata().map(|m| m.len()).unwrap_or(0);
            Ok(Created {
                state_bytes,
                memory_bytes,
                elapsed: started.elapsed(),
            })
        })
    }
}
