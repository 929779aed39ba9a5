//! virtio-blk requests (virtio 1.2 §5.2.6) parsed from a descriptor chain.
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable
//! buffers, then data (device-readable for writes, device-writable for reads
//! and GET_ID), then one device-writable status byte, the last byte of the
//! chain. Buffer boundaries are free (§2.6.4: no framing is assumed): the
//! header may be split over descriptors and share one with data.
//!
//! [`parse`] is a pure function of the chain, guest memory and the disk's
//! limits: it checks everything a guest controls (chain shape and length,
//! directions, type, sector range, sizes, flags, and that the header, status,
//! ID and segment buffers lie in guest memory) and returns either a
//! [`Request`] or a [`Rejected`] that says which status to report, if the
//! chain has a usable status byte at all. The data buffers of reads and
//! writes are resolved to host memory once, when the I/O is done: one outside
//! guest memory fails the request before any byte moves.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::SECTOR_SIZE;
use crate::virtio::GuestMemory;

/// Size of the request header.
pub const HEADER_SIZE: usize = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_SIZE: usize = 16;
/// Most descriptors in one request chain (direct or through an indirect
/// table): the advertised `seg_max` data segments plus room for a header and
/// status in descriptors of their own, with slack for drivers that split them.
pub const MAX_DESCRIPTORS: usize = 512;
/// Most data bytes in one read or write request. With `seg_max` × `size_max`
/// (254 × 4 KiB) below it, drivers that honour the configuration never
/// exceed it; it bounds the time one request keeps the event loop busy.
pub const MAX_DATA_BYTES: u32 = 1 << 20;
/// Data segments advertised in `seg_max`.
pub const SEG_MAX: u32 = 254;
/// Largest data segment advertised in `size_max`.
pub const SIZE_MAX: u32 = 4096;
/// Most sectors one discard or write-zeroes request covers, all segments
/// together (`max_discard_sectors`, `max_write_zeroes_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 17; // 64 MiB
/// Most segments in a discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Length of the device ID string (GET_ID).
pub const ID_BYTES: usize = 20;

/// What the device knows when it parses: the disk and the agreed features.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Capacity in sectors.
    pub sectors: u64,
    pub readonly: bool,
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
}

/// A buffer in guest memory (checked to be there when parsed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One discard or write-zeroes range, in sectors (bounds checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
    /// Write zeroes may deallocate the range.
    pub unmap: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into the data buffers.
    Read {
        sector: u64,
    },
    /// Write the data buffers to `sector`.
    Write {
        sector: u64,
    },
    Flush,
    /// Write the device ID to the data buffers.
    GetId,
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// The data buffers, in order (device-writable for Read and GetId,
    /// device-readable for Write; empty for the others). Those of GetId are
    /// known to be in guest memory; those of Read and Write are checked
    /// when they are used.
    pub data: Buffers,
    /// Their total length (at most [`MAX_DATA_BYTES`]).
    pub len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What is wrong with a request. Messages are for debug logs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is cut short (a loop, a bad index or a bad indirect table)")]
    BrokenChain,
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("the chain does not end with a device-writable status byte")]
    NoStatus,
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    #[error("the header has {0} bytes, not {HEADER_SIZE}")]
    ShortHeader(usize),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("request type {0} has buffers in the wrong direction")]
    Direction(u32),
    #[error("data of {0} bytes is not a whole number of sectors")]
    Unaligned(u64),
    #[error("data of {0} bytes is more than {MAX_DATA_BYTES}")]
    TooLarge(u64),
    #[error("sectors {sector}+{count} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{0} bytes of segments is not a whole, non-zero number up to {MAX_DISCARD_SEGMENTS}")]
    BadSegments(u64),
    #[error("the segments cover more than {MAX_DISCARD_SECTORS} sectors")]
    TooManySectors,
    #[error("segment flags {0:#x} are not supported")]
    Flags(u32),
}

impl RequestError {
    /// The status byte the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::Flags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request that cannot be carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Where to write the error status, if the chain has a usable status byte.
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

#[derive(Clone, Copy, Default)]
struct Desc {
    buf: Buffer,
    write: bool,
}

/// Data buffers of a request: most have one to a few, kept without an
/// allocation.
pub type Buffers = InlineVec<Buffer, 4>;

/// A list that keeps up to `N` items inline and moves to the heap beyond:
/// parsing a typical request allocates nothing.
#[derive(Clone, Debug)]
pub struct InlineVec<T: Copy + Default, const N: usize> {
    inline: [T; N],
    len: usize,
    heap: Vec<T>,
}

impl<T: Copy + Default, const N: usize> InlineVec<T, N> {
    pub fn new() -> Self {
        InlineVec {
            inline: [T::default(); N],
            len: 0,
            heap: Vec::new(),
        }
    }

    pub fn push(&mut self, value: T) {
        if !self.heap.is_empty() {
            self.heap.push(value);
        } else if self.len < N {
            self.inline[self.len] = value;
            self.len += 1;
        } else {
            self.heap.reserve(2 * N);
            self.heap.extend_from_slice(&self.inline);
            self.heap.push(value);
        }
    }
}

impl<T: Copy + Default, const N: usize> Default for InlineVec<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default, const N: usize> std::ops::Deref for InlineVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        if self.heap.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

impl<T: Copy + Default + PartialEq, const N: usize> PartialEq for InlineVec<T, N> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Copy + Default + Eq, const N: usize> Eq for InlineVec<T, N> {}

/// Parses the request in `chain`.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    limits: &Limits,
) -> Result<Request, Rejected>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let reject = |status, error| Rejected { status, error };

    // The chain's descriptors. The iterator ends quietly on a loop (after
    // queue-size descriptors), a bad next index or an unreadable descriptor:
    // a last descriptor that still says NEXT gives that away.
    let mut descs: InlineVec<Desc, 4> = InlineVec::new();
    let mut cut_short = false;
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(reject(None, RequestError::TooManyDescriptors));
        }
        cut_short = d.has_next();
        descs.push(Desc {
            buf: Buffer {
                addr: d.addr(),
                len: d.len(),
            },
            write: d.is_write_only(),
        });
    }
    if cut_short {
        return Err(reject(None, RequestError::BrokenChain));
    }

    // The status byte: the last byte of the last, device-writable descriptor.
    let status = match descs.last() {
        Some(d) if d.write && d.buf.len > 0 => d
            .buf
            .addr
            .checked_add(u64::from(d.buf.len) - 1)
            .filter(|&a| mem.address_in_range(a)),
        _ => None,
    };
    let Some(status) = status else {
        return Err(reject(None, RequestError::NoStatus));
    };
    let rejected = |error| Rejected {
        status: Some(status),
        error,
    };
    let fail = |error| Err(rejected(error));

    // Device-readable buffers first, then device-writable ones.
    let readable = descs.iter().take_while(|d| !d.write).count();
    if descs[readable..].iter().any(|d| !d.write) {
        return fail(RequestError::Order);
    }
    let readable_bufs = || descs[..readable].iter().map(|d| d.buf);
    let writable_bufs = || descs[readable..].iter().map(|d| d.buf);

    // The header, from the start of the readable part.
    let mut header = [0u8; HEADER_SIZE];
    let got = gather(
        mem,
        &window(readable_bufs(), 0, HEADER_SIZE as u64),
        &mut header,
    );
    if got < HEADER_SIZE {
        return fail(RequestError::ShortHeader(got));
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    // What follows the header, and the writable part without its last
    // byte (the status).
    let mut out = window(readable_bufs(), HEADER_SIZE as u64, u64::MAX);
    let writable_len: u64 = writable_bufs().map(|b| u64::from(b.len)).sum();
    let mut input = window(writable_bufs(), 0, writable_len - 1);
    let out_len: u64 = out.iter().map(|b| u64::from(b.len)).sum();
    let in_len: u64 = input.iter().map(|b| u64::from(b.len)).sum();

    let request = |kind, data: Buffers, len: u64| {
        Ok(Request {
            kind,
            data,
            len: len as u32,
            status,
        })
    };
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (data, len) = if kind == VIRTIO_BLK_T_IN {
                if out_len != 0 {
                    return fail(RequestError::Direction(kind));
                }
                (std::mem::take(&mut input), in_len)
            } else {
                if in_len != 0 {
                    return fail(RequestError::Direction(kind));
                }
                if limits.readonly {
                    return fail(RequestError::ReadOnly);
                }
                (std::mem::take(&mut out), out_len)
            };
            if !len.is_multiple_of(SECTOR_SIZE) {
                return fail(RequestError::Unaligned(len));
            }
            if len > u64::from(MAX_DATA_BYTES) {
                return fail(RequestError::TooLarge(len));
            }
            check_range(sector, len / SECTOR_SIZE, limits.sectors).map_err(rejected)?;
            let kind = if kind == VIRTIO_BLK_T_IN {
                RequestKind::Read { sector }
            } else {
                RequestKind::Write { sector }
            };
            request(kind, data, len)
        }
        // A flush has no data (the driver SHOULD include none: ignore any).
        VIRTIO_BLK_T_FLUSH => request(RequestKind::Flush, Buffers::new(), 0),
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 || in_len == 0 {
                return fail(RequestError::Direction(kind));
            }
            // The ID is 20 bytes; a longer buffer gets 20.
            let data = window(input.iter().copied(), 0, ID_BYTES as u64);
            in_memory(mem, &data).map_err(rejected)?;
            request(RequestKind::GetId, data, in_len.min(ID_BYTES as u64))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
                return fail(RequestError::Unsupported(kind));
            }
            if in_len != 0 {
                return fail(RequestError::Direction(kind));
            }
            if limits.readonly {
                return fail(RequestError::ReadOnly);
            }
            in_memory(mem, &out).map_err(rejected)?;
            let ranges = segments(mem, &out, out_len, discard, limits.sectors).map_err(rejected)?;
            let kind = if discard {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            };
            request(kind, Buffers::new(), 0)
        }
        other => fail(RequestError::Unsupported(other)),
    }
}

/// Every buffer must lie in guest memory.
fn in_memory(mem: &GuestMemory, bufs: &[Buffer]) -> Result<(), RequestError> {
    match bufs
        .iter()
        .find(|b| !GuestMemoryBackend::check_range(mem, b.addr, b.len as usize))
    {
        Some(b) => Err(RequestError::OutsideMemory {
            addr: b.addr.raw_value(),
            len: b.len,
        }),
        None => Ok(()),
    }
}

/// `sector`..`sector + count` must lie within `capacity` sectors.
fn check_range(sector: u64, count: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

/// Discard / write-zeroes segments from `bufs` (`len` bytes).
fn segments(
    mem: &GuestMemory,
    bufs: &[Buffer],
    len: u64,
    discard: bool,
    capacity: u64,
) -> Result<Vec<Range>, RequestError> {
    let count = len / SEGMENT_SIZE as u64;
    if !len.is_multiple_of(SEGMENT_SIZE as u64)
        || count == 0
        || count > u64::from(MAX_DISCARD_SEGMENTS)
    {
        return Err(RequestError::BadSegments(len));
    }
    let mut raw = [0u8; SEGMENT_SIZE * MAX_DISCARD_SEGMENTS as usize];
    let raw = &mut raw[..len as usize];
    gather(mem, bufs, raw);
    let mut ranges = Vec::with_capacity(count as usize);
    let mut total: u64 = 0;
    for s in raw.chunks_exact(SEGMENT_SIZE) {
        let sector = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        let sectors = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
        // Discard knows no flags; write zeroes knows "unmap" (§5.2.6.3).
        let known = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !known != 0 {
            return Err(RequestError::Flags(flags));
        }
        check_range(sector, u64::from(sectors), capacity)?;
        total += u64::from(sectors);
        if total > u64::from(MAX_DISCARD_SECTORS) {
            return Err(RequestError::TooManySectors);
        }
        ranges.push(Range {
            sector,
            sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

/// The part of the byte stream `bufs` from byte `from` up to byte `to`.
fn window(bufs: impl Iterator<Item = Buffer>, from: u64, to: u64) -> Buffers {
    let mut out = Buffers::new();
    let mut pos = 0u64;
    for b in bufs {
        let (start, end) = (pos, pos + u64::from(b.len));
        pos = end;
        let (lo, hi) = (start.max(from), end.min(to));
        if lo < hi {
            // Both fit in u32 (within one buffer), and the address (checked
            // to be in guest memory with the whole buffer) does not wrap.
            out.push(Buffer {
                addr: b.addr.unchecked_add(lo - start),
                len: (hi - lo) as u32,
            });
        }
        if pos >= to {
            break;
        }
    }
    out
}

/// Copies from `bufs` into `out` until either runs out; returns the bytes copied.
fn gather(mem: &GuestMemory, bufs: &[Buffer], out: &mut [u8]) -> usize {
    let mut done = 0;
    for b in bufs {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(b.len as usize);
        if !read_guest(mem, b.addr, &mut out[done..done + n]) {
            break;
        }
        done += n;
    }
    done
}

/// Copies `data` into `bufs` (device-writable buffers) until either runs
/// out; returns the bytes copied.
pub fn scatter(mem: &GuestMemory, bufs: &[Buffer], data: &[u8]) -> usize {
    let mut done = 0;
    for b in bufs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(b.len as usize);
        if !write_guest(mem, b.addr, &data[done..done + n]) {
            break;
        }
        done += n;
    }
    done
}

/// Reads `out.len()` bytes of guest memory at `addr`. A range within one
/// memory region (nearly always) is copied through its host slice, several
/// times cheaper than vm-memory's general `Bytes` path, which it falls back
/// to for ranges that span regions.
pub fn read_guest(mem: &GuestMemory, addr: GuestAddress, out: &mut [u8]) -> bool {
    match GuestMemoryBackend::get_slice(mem, addr, out.len()) {
        Ok(slice) => slice.copy_to(out) == out.len(),
        Err(_) => mem.read_slice(out, addr).is_ok(),
    }
}

/// Writes `data` to guest memory at `addr` (as [`read_guest`] reads).
pub fn write_guest(mem: &GuestMemory, addr: GuestAddress, data: &[u8]) -> bool {
    match GuestMemoryBackend::get_slice(mem, addr, data.len()) {
        Ok(slice) if slice.len() == data.len() => {
            slice.copy_from(data);
            true
        }
        _ => mem.write_slice(data, addr).is_ok(),
    }
}
