//! virtio-blk (virtio 1.2 §5.2) on a raw disk image: one request queue;
//! reads, writes, flush, GET_ID, discard and write-zeroes.
//!
//! - Capacity: the image's size in whole 512-byte sectors, taken when the
//!   image is opened (a partial last sector is out of the guest's reach).
//! - Every sector range is checked against the capacity; a read or write
//!   outside it fails with VIRTIO_BLK_S_IOERR, an unknown request type with
//!   VIRTIO_BLK_S_UNSUPP, a write to a read-only disk with IOERR (and
//!   nothing is written).
//! - Data moves with pread/pwrite (preadv/pwritev for several buffers)
//!   straight between the image and guest memory, at most
//!   [`request::MAX_DATA_BYTES`] per request. Requests are parsed by
//!   [`request::parse`] from virtio-queue's descriptor chains; the data
//!   buffers are resolved to host slices rather than read through
//!   virtio-queue's `Reader`/`Writer`, which only copy.
//! - FLUSH returns only after fdatasync(2) on the image has. If the driver
//!   did not negotiate VIRTIO_BLK_F_FLUSH, every write is synced before it
//!   completes (the spec's write-through case).
//! - Discard punches holes; write zeroes zeroes the range (punching holes if
//!   the driver allows unmapping).
//! - GET_ID answers the configured ID, or the image's file name (its first
//!   20 bytes, non-printable characters as `_`), NUL-padded to 20 bytes.
//! - The device handles at most [`MAX_CHAINS_PER_EVENT`] requests per queue
//!   notification and then re-arms its own queue event, so one busy guest
//!   cannot keep the shared event loop from other devices for long.

pub mod disk;
pub mod request;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use self::disk::{DiskImage, SECTOR_SIZE};
use self::request::{Buffer, Limits, Range, Request, RequestKind};
use super::{
    ActivateError, Activation, Budget, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, GuestMemory,
    Handled, Interrupt, TYPE_BLOCK, VirtioDevice, drain_queue,
};

pub use self::disk::DiskError;

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Requests handled per queue notification before yielding the event loop.
pub const MAX_CHAINS_PER_EVENT: usize = 64;
/// Data bytes moved per queue notification before yielding the event loop.
pub const MAX_BYTES_PER_EVENT: u64 = 8 << 20;

/// Size of the configuration space we expose (struct virtio_blk_config up
/// to and including the write-zeroes fields).
const CONFIG_SIZE: usize = 60;

const fn bit(b: u32) -> u64 {
    1 << b
}

struct Running {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    limits: Limits,
    /// VIRTIO_BLK_F_FLUSH was negotiated; if not, writes are synced at once.
    flush: bool,
}

/// The block device.
pub struct Block {
    disk: DiskImage,
    id: [u8; request::ID_BYTES],
    config: [u8; CONFIG_SIZE],
    queue_events: Vec<EventFd>,
    running: Option<Running>,
    /// A host I/O error was reported at warning level (later ones: debug).
    warned: bool,
}

impl Block {
    /// A device on `disk`; `id` is what GET_ID answers (at most 20 bytes; by
    /// default the image's file name).
    pub fn new(disk: DiskImage, id: Option<&str>) -> std::io::Result<Block> {
        let id = device_id(id, &disk);
        let config = config_space(&disk);
        Ok(Block {
            disk,
            id,
            config,
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            running: None,
            warned: false,
        })
    }

    /// The ID GET_ID answers.
    pub fn id(&self) -> &[u8; request::ID_BYTES] {
        &self.id
    }

    /// Serves available requests, at most [`MAX_CHAINS_PER_EVENT`] (or
    /// [`MAX_BYTES_PER_EVENT`]); if more are waiting, re-arms the queue event
    /// so the event loop comes back after serving others.
    pub fn process_queue(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let (disk, id, warned) = (&self.disk, &self.id, &mut self.warned);
        let budget = Budget {
            chains: MAX_CHAINS_PER_EVENT,
            cost: MAX_BYTES_PER_EVENT,
        };
        let drained = drain_queue(&mut r.queue, &r.mem, &r.interrupt, budget, |chain| {
            let (len, moved) = handle(disk, id, &r.mem, &r.limits, r.flush, warned, chain);
            Handled::Used { len, cost: moved }
        });
        if drained.more
            && let Err(e) = self.queue_events[0].write(1)
        {
            log::warn!("virtio-blk: cannot re-arm the queue event: {e}");
        }
    }
}

/// Parses and carries out one request; returns the used length (bytes
/// written to the guest, status byte included) and the data bytes moved.
fn handle<M>(
    disk: &DiskImage,
    id: &[u8; request::ID_BYTES],
    mem: &GuestMemory,
    limits: &Limits,
    flush: bool,
    warned: &mut bool,
    chain: virtio_queue::DescriptorChain<M>,
) -> (u32, u64)
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let req = match request::parse(chain, mem, limits) {
        Ok(req) => req,
        Err(rejected) => {
            log::debug!("virtio-blk: request refused: {}", rejected.error);
            return match rejected.status {
                Some(addr) if request::write_guest(mem, addr, &[rejected.error.status()]) => (1, 0),
                _ => (0, 0),
            };
        }
    };
    let (status, written) = match execute(disk, id, mem, &req, flush) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(ExecError::Guest(why)) => {
            log::debug!("virtio-blk: request refused: {why}");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
        Err(ExecError::Host(e)) => {
            if *warned {
                log::debug!("virtio-blk {}: {e}", disk.path().display());
            } else {
                *warned = true;
                log::warn!(
                    "virtio-blk {}: {e} (the guest gets an I/O error; further errors are logged at debug level)",
                    disk.path().display()
                );
            }
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    if !request::write_guest(mem, req.status, &[status]) {
        return (0, u64::from(req.len));
    }
    (written + 1, u64::from(req.len))
}

/// Why a parsed request failed.
enum ExecError {
    /// The guest's fault (a data buffer outside guest memory).
    Guest(String),
    /// The host's: the image could not be read or written.
    Host(std::io::Error),
}

impl From<std::io::Error> for ExecError {
    fn from(e: std::io::Error) -> Self {
        ExecError::Host(e)
    }
}

/// Carries out a parsed request; returns the bytes written to guest memory.
fn execute(
    disk: &DiskImage,
    id: &[u8; request::ID_BYTES],
    mem: &GuestMemory,
    req: &Request,
    flush: bool,
) -> Result<u32, ExecError> {
    match &req.kind {
        RequestKind::Read { sector } => {
            // SAFETY: the iovecs cover guest memory (checked by the parser,
            // resolved by `with_iovecs`), which stays mapped while `mem` lives.
            with_iovecs(mem, &req.data, |iov| unsafe {
                disk.read_vectored_at(iov, sector * SECTOR_SIZE)
            })?;
            Ok(req.len)
        }
        RequestKind::Write { sector } => {
            // SAFETY: as for reads; pwritev only reads the buffers.
            with_iovecs(mem, &req.data, |iov| unsafe {
                disk.write_vectored_at(iov, sector * SECTOR_SIZE)
            })?;
            if !flush {
                disk.flush()?;
            }
            Ok(0)
        }
        RequestKind::Flush => {
            disk.flush()?;
            Ok(0)
        }
        RequestKind::GetId => {
            let n = request::scatter(mem, &req.data, &id[..req.len as usize]);
            if n < req.len as usize {
                return Err(ExecError::Guest("ID buffer not in guest memory".into()));
            }
            Ok(n as u32)
        }
        RequestKind::Discard(ranges) => {
            for r in ranges {
                let (off, len) = bytes(r);
                disk.discard(off, len)?;
            }
            if !flush {
                disk.flush()?;
            }
            Ok(0)
        }
        RequestKind::WriteZeroes(ranges) => {
            for r in ranges {
                let (off, len) = bytes(r);
                disk.write_zeroes(off, len, r.unmap)?;
            }
            if !flush {
                disk.flush()?;
            }
            Ok(0)
        }
    }
}

fn bytes(r: &Range) -> (u64, u64) {
    (r.sector * SECTOR_SIZE, u64::from(r.sectors) * SECTOR_SIZE)
}

/// Calls `io` with host iovecs for guest buffers (a buffer that spans
/// memory regions gets one per region), kept on the stack for up to eight.
fn with_iovecs<R>(
    mem: &GuestMemory,
    bufs: &[Buffer],
    io: impl FnOnce(&mut [libc::iovec]) -> std::io::Result<R>,
) -> Result<R, ExecError> {
    const INLINE: usize = 8;
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut inline = [empty; INLINE];
    let mut n = 0;
    let mut heap = Vec::new();
    for b in bufs {
        for slice in GuestMemoryBackend::get_slices(mem, b.addr, b.len as usize) {
            let slice = slice.map_err(|e| {
                ExecError::Guest(format!("data buffer {:#x}+{:#x}: {e}", b.addr.0, b.len))
            })?;
            let v = libc::iovec {
                // Plain mmap-backed memory: the guard is only a pointer,
                // valid as long as the mapping (held by `mem`).
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            };
            if heap.is_empty() && n < INLINE {
                inline[n] = v;
                n += 1;
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&inline[..n]);
                }
                heap.push(v);
            }
        }
    }
    let result = if heap.is_empty() {
        io(&mut inline[..n])
    } else {
        io(&mut heap)
    };
    Ok(result?)
}

/// The GET_ID string: `id`, or the image's file name; NUL-padded.
fn device_id(id: Option<&str>, disk: &DiskImage) -> [u8; request::ID_BYTES] {
    let mut out = [0u8; request::ID_BYTES];
    let name = match id {
        Some(id) => id.as_bytes().to_vec(),
        None => disk
            .path()
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default(),
    };
    for (o, &c) in out.iter_mut().zip(name.iter()) {
        *o = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
    out
}

/// struct virtio_blk_config, little-endian.
fn config_space(disk: &DiskImage) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.sectors().to_le_bytes()); // capacity
    put(8, &request::SIZE_MAX.to_le_bytes()); // size_max
    put(12, &request::SEG_MAX.to_le_bytes()); // seg_max
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    // Discard and write zeroes (offered for writable disks only).
    put(36, &request::MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &request::MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
    put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
    put(48, &request::MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &request::MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_EVENT_IDX
            | F_INDIRECT_DESC
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.disk.readonly() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in it is writable without VIRTIO_BLK_F_CONFIG_WCE.
        log::debug!(
            "virtio-blk: ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        let [queue] = a.take_queues()?;
        let limits = Limits {
            sectors: self.disk.sectors(),
            readonly: self.disk.readonly(),
            discard: a.features & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: a.features & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        };
        self.running = Some(Running {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
            limits,
            flush: a.features & bit(VIRTIO_BLK_F_FLUSH) != 0,
        });
        // Requests queued before DRIVER_OK (whose notification was dropped)
        // are served by the event loop, not on the vCPU thread activating us.
        if let Err(e) = self.queue_events[0].write(1) {
            log::warn!("virtio-blk: cannot kick the queue: {e}");
        }
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        super::positions(self.running.iter().map(|r| &r.queue))
    }

    fn reset(&mut self) {
        self.running = None;
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Notifications before DRIVER_OK are dropped: nothing to serve yet.
        let _ = self.queue_events[0].read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests;
