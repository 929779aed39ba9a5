//! What the guest puts in the network queues, checked before use.
//!
//! A transmit chain is a virtio-net header and an Ethernet frame in
//! device-readable buffers; a receive chain is device-writable buffers for
//! one (or, with MRG_RXBUF, part of one) received frame. Every address,
//! length, direction and the chain's end are checked here: a chain that
//! fails is answered with 0 bytes used and never touches host memory
//! outside guest RAM.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{
    F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_ECN, F_HOST_TSO4,
    F_HOST_TSO6,
};
use crate::virtio::GuestMemory;

/// The virtio-net header (virtio 1.2 §5.1.6), 12 bytes with VERSION_1.
pub const HDR_LEN: usize = 12;
/// An Ethernet header: the shortest frame the tap accepts.
pub const ETH_HLEN: usize = 14;
/// The longest transmit chain: header and a 64 KiB segmentation-offload
/// frame with Ethernet header and VLAN tag (65550 + 12 bytes, as virtio-net
/// drivers size their buffers).
pub const MAX_TX_FRAME: usize = 65562;

/// `flags` in the header.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type` in the header.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Offsets in the header.
const OFF_FLAGS: usize = 0;
const OFF_GSO_TYPE: usize = 1;
const OFF_CSUM_START: usize = 6;
const OFF_CSUM_OFFSET: usize = 8;
pub const OFF_NUM_BUFFERS: usize = 10;

/// Why a chain (or the frame in it) is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain has no descriptors (bad head index or descriptor table)")]
    Empty,
    #[error("a device-writable descriptor in a transmit chain")]
    WritableInTx,
    #[error("a device-readable descriptor in a receive chain")]
    ReadableInRx,
    #[error("buffer {addr:#x} (+{len:#x}) is not in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error(
        "the chain does not end (a loop, a bad next index or indirect table, or more descriptors than the queue has)"
    )]
    Unterminated,
    #[error("the frame is longer than {MAX_TX_FRAME} bytes with its header")]
    TooLong,
    #[error("{0} bytes: too short for a virtio-net header and an Ethernet header")]
    TooShort(usize),
    #[error("a {0}-byte receive buffer cannot hold the virtio-net header")]
    RxTooSmall(u32),
    #[error("header flags {0:#x} are not valid in a transmitted frame")]
    BadFlags(u8),
    #[error("checksum offload requested but not negotiated")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    BadCsumPosition { start: u16, offset: u16, len: usize },
    #[error("segmentation offload type {0:#x} unknown or not negotiated")]
    BadGso(u8),
}

/// A checked transmit chain: a copy of its virtio-net header, and where the
/// rest of the frame lies in guest memory.
#[derive(Debug, Default)]
pub struct TxFrame {
    header: [u8; HDR_LEN],
    /// Frame length, header included.
    len: usize,
    /// The bytes after the header: guest memory ranges, all checked.
    segments: Vec<(GuestAddress, usize)>,
}

impl TxFrame {
    pub fn new() -> TxFrame {
        TxFrame::default()
    }

    /// Length with the header.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn header(&self) -> &[u8; HDR_LEN] {
        &self.header
    }

    /// Copies the frame, header first, into `buf` (at least `len` bytes).
    pub fn copy_to(&self, mem: &GuestMemory, buf: &mut [u8]) -> Result<usize, ChainError> {
        if buf.len() < self.len {
            return Err(ChainError::TooLong);
        }
        buf[..HDR_LEN].copy_from_slice(&self.header);
        let mut at = HDR_LEN;
        for &(addr, len) in &self.segments {
            mem.read_slice(&mut buf[at..at + len], addr).map_err(|_| {
                ChainError::OutsideMemory {
                    addr: addr.0,
                    len: len as u32,
                }
            })?;
            at += len;
        }
        Ok(at)
    }

    /// Appends host I/O vectors for the frame to `iov`: the header (this
    /// copy of it), then the guest memory holding the rest. They point into
    /// `self` and `mem`, and are valid while both are.
    pub fn iovecs(&self, mem: &GuestMemory, iov: &mut Vec<libc::iovec>) -> Result<(), ChainError> {
        iov.push(libc::iovec {
            iov_base: self.header.as_ptr() as *mut libc::c_void,
            iov_len: HDR_LEN,
        });
        for &(addr, len) in &self.segments {
            guest_iovecs(mem, addr, len, iov)?;
        }
        Ok(())
    }
}

/// Appends host I/O vectors for `len` bytes of guest memory at `addr`.
/// They stay valid as long as `mem` (its mappings) does.
fn guest_iovecs(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: usize,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), ChainError> {
    for slice in mem.get_slices(addr, len) {
        let slice = slice.map_err(|_| ChainError::OutsideMemory {
            addr: addr.0,
            len: len as u32,
        })?;
        iov.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// Checks a transmit chain (directions, addresses, length, its end) and
/// records it in `frame`: the header copied, the rest as guest memory
/// ranges. The header is checked by [`check_tx_header`].
pub fn read_tx_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    frame: &mut TxFrame,
) -> Result<(), ChainError> {
    frame.len = 0;
    frame.segments.clear();
    let mut seen = false;
    let mut more = false;
    for desc in chain {
        seen = true;
        if desc.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let n = desc.len() as usize;
        let end = frame
            .len
            .checked_add(n)
            .filter(|&end| end <= MAX_TX_FRAME)
            .ok_or(ChainError::TooLong)?;
        let outside = ChainError::OutsideMemory {
            addr: desc.addr().0,
            len: desc.len(),
        };
        if !mem.check_range(desc.addr(), n) {
            return Err(outside);
        }
        // The header may be spread over descriptors: copy it out.
        let in_header = HDR_LEN.saturating_sub(frame.len).min(n);
        if in_header > 0 {
            mem.read_slice(
                &mut frame.header[frame.len..frame.len + in_header],
                desc.addr(),
            )
            .map_err(|_| outside.clone())?;
        }
        if n > in_header {
            let addr = desc.addr().checked_add(in_header as u64).ok_or(outside)?;
            frame.segments.push((addr, n - in_header));
        }
        frame.len = end;
        more = desc.has_next();
    }
    if !seen {
        return Err(ChainError::Empty);
    }
    // The iterator stops without saying why (a loop cut at the queue size, a
    // next index out of range, a bad indirect table): the last descriptor
    // still points on.
    if more {
        return Err(ChainError::Unterminated);
    }
    if frame.len < HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(frame.len));
    }
    Ok(())
}

fn u16_at(frame: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([frame[offset], frame[offset + 1]])
}

/// Checks the `header` of a transmitted frame of `len` bytes (header
/// included) against the features the driver agreed to: the driver may ask
/// for checksum and segmentation offloads only as far as it negotiated them.
pub fn check_tx_header(
    header: &[u8; HDR_LEN],
    len: usize,
    features: u64,
) -> Result<(), ChainError> {
    if len < HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(len));
    }
    let frame = header;
    let flags = frame[OFF_FLAGS];
    if flags & !HDR_F_NEEDS_CSUM != 0 {
        return Err(ChainError::BadFlags(flags));
    }
    if flags & HDR_F_NEEDS_CSUM != 0 {
        if features & F_CSUM == 0 {
            return Err(ChainError::CsumNotNegotiated);
        }
        let (start, offset) = (
            u16_at(frame, OFF_CSUM_START),
            u16_at(frame, OFF_CSUM_OFFSET),
        );
        let payload = len - HDR_LEN;
        if usize::from(start) + usize::from(offset) + 2 > payload {
            return Err(ChainError::BadCsumPosition {
                start,
                offset,
                len: payload,
            });
        }
    }
    check_gso(
        frame[OFF_GSO_TYPE],
        features,
        [F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN],
    )
}

/// Checks a header's segmentation-offload type against the agreed
/// `features`, given the (TSO4, TSO6, ECN) feature bits of the direction the
/// frame travels.
fn check_gso(gso: u8, features: u64, [tso4, tso6, ecn]: [u64; 3]) -> Result<(), ChainError> {
    let mut needed = match gso & !GSO_ECN {
        GSO_NONE if gso == GSO_NONE => 0,
        GSO_TCPV4 => tso4,
        GSO_TCPV6 => tso6,
        _ => return Err(ChainError::BadGso(gso)),
    };
    if gso & GSO_ECN != 0 {
        needed |= ecn;
    }
    if features & needed != needed {
        return Err(ChainError::BadGso(gso));
    }
    Ok(())
}

/// Prepares the `header` of a received frame of `len` bytes (header
/// included) for a driver with `features`: flags it did not agree to are
/// cleared, or the frame refused when the kernel left work for it that it
/// cannot do (a partial checksum, a segmentation-offload frame).
pub fn fix_rx_header(
    header: &mut [u8; HDR_LEN],
    len: usize,
    features: u64,
) -> Result<(), ChainError> {
    if len < HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(len));
    }
    let frame = header;
    let flags = frame[OFF_FLAGS];
    if features & F_GUEST_CSUM == 0 {
        if flags & HDR_F_NEEDS_CSUM != 0 {
            return Err(ChainError::CsumNotNegotiated);
        }
        frame[OFF_FLAGS] = 0;
    }
    check_gso(
        frame[OFF_GSO_TYPE],
        features,
        [F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN],
    )
}

/// A checked receive chain: where a frame may be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    pub head: u16,
    /// The first segment inline (most chains have one), the rest after.
    first: (GuestAddress, u32),
    more: Vec<(GuestAddress, u32)>,
    capacity: u32,
}

impl RxBuffer {
    /// Bytes the chain can hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Writes the start of `data` (as much as fits); returns the bytes written.
    pub fn write(&self, mem: &GuestMemory, data: &[u8]) -> Result<u32, ChainError> {
        let mut done = 0usize;
        for &(addr, len) in std::iter::once(&self.first).chain(&self.more) {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], addr)
                .map_err(|_| ChainError::OutsideMemory { addr: addr.0, len })?;
            done += n;
        }
        // At most `capacity`, a u32.
        Ok(done as u32)
    }
}

/// Checks a receive chain: device-writable buffers in guest memory, at least
/// a header's worth, and a proper end.
pub fn parse_rx_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<RxBuffer, ChainError> {
    let head = chain.head_index();
    let mut first = None;
    let mut rest = Vec::new();
    let mut capacity = 0u32;
    let mut seen = false;
    let mut more = false;
    for desc in chain {
        seen = true;
        if !desc.is_write_only() {
            return Err(ChainError::ReadableInRx);
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        // The iterator ends chains whose total overflows a u32.
        capacity = capacity.saturating_add(desc.len());
        if desc.len() > 0 {
            match first {
                None => first = Some((desc.addr(), desc.len())),
                Some(_) => rest.push((desc.addr(), desc.len())),
            }
        }
        more = desc.has_next();
    }
    if !seen {
        return Err(ChainError::Empty);
    }
    if more {
        return Err(ChainError::Unterminated);
    }
    if (capacity as usize) < HDR_LEN {
        return Err(ChainError::RxTooSmall(capacity));
    }
    Ok(RxBuffer {
        head,
        first: first.unwrap_or((GuestAddress(0), 0)),
        more: rest,
        capacity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::F_VERSION_1;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Puts `descs` at the start of the table, heads in the avail ring, and
    /// returns the queue to pop them from.
    fn queue(mem: &GuestMemory, descs: &[RawDescriptor]) -> Queue {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(descs, 0).unwrap();
        mock.create_queue().unwrap()
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7) as u8).collect()
    }

    #[test]
    fn tx_chain_is_gathered_from_all_descriptors() {
        let mem = mem();
        let data = frame(100);
        mem.write_slice(&data[..30], GuestAddress(0x1_0000))
            .unwrap();
        mem.write_slice(&data[30..], GuestAddress(0x2_0000))
            .unwrap();
        let mut q = queue(&mem, &[d(0x1_0000, 30, N, 1), d(0x2_0000, 70, 0, 0)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut f = TxFrame::new();
        assert_eq!(read_tx_chain(&mem, chain, &mut f), Ok(()));
        assert_eq!(f.len(), 100);
        assert_eq!(&f.header()[..], &data[..HDR_LEN]);
        let mut buf = vec![0u8; MAX_TX_FRAME];
        assert_eq!(f.copy_to(&mem, &mut buf), Ok(100));
        assert_eq!(&buf[..100], &data[..]);
        // The I/O vectors: the header copy, then guest memory after it.
        let mut iov = Vec::new();
        f.iovecs(&mem, &mut iov).unwrap();
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [HDR_LEN, 30 - HDR_LEN, 70]);
        assert_eq!(iov[0].iov_base as *const u8, f.header().as_ptr());
        let host = mem
            .get_host_address(GuestAddress(0x1_0000 + HDR_LEN as u64))
            .unwrap();
        assert_eq!(iov[1].iov_base as *mut u8, host);
    }

    #[test]
    fn tx_chain_errors() {
        let mem = mem();
        let mut f = TxFrame::new();
        let cases: Vec<(Vec<RawDescriptor>, ChainError)> = vec![
            (vec![d(0x1_0000, 64, W, 0)], ChainError::WritableInTx),
            (
                vec![d(0x1_0000, 20, N, 1), d(0x1_0100, 64, W, 0)],
                ChainError::WritableInTx,
            ),
            (
                vec![d(0x1f_fff0, 64, 0, 0)],
                ChainError::OutsideMemory {
                    addr: 0x1f_fff0,
                    len: 64,
                },
            ),
            (
                vec![d(u64::MAX - 8, 64, 0, 0)],
                ChainError::OutsideMemory {
                    addr: u64::MAX - 8,
                    len: 64,
                },
            ),
            // A loop: descriptor 0 points to itself.
            (vec![d(0x1_0000, 64, N, 0)], ChainError::Unterminated),
            // Next index beyond the queue.
            (vec![d(0x1_0000, 64, N, 99)], ChainError::Unterminated),
            // Too long in one descriptor, and over several.
            (vec![d(0x1_0000, 0x10_0000, 0, 0)], ChainError::TooLong),
            (
                vec![d(0x1_0000, 40_000, N, 1), d(0x1_0000, 40_000, 0, 0)],
                ChainError::TooLong,
            ),
            (vec![d(0x1_0000, 25, 0, 0)], ChainError::TooShort(25)),
            // An indirect table of bad size.
            (
                vec![d(0x3_0000, 17, VRING_DESC_F_INDIRECT as u16, 0)],
                ChainError::Empty,
            ),
        ];
        for (descs, want) in cases {
            let mut q = queue(&mem, &descs);
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            assert_eq!(
                read_tx_chain(&mem, chain, &mut f),
                Err(want.clone()),
                "{descs:?}"
            );
        }
        // 16 descriptors in a ring of 16, all pointing on: cut at the queue size.
        let ring: Vec<RawDescriptor> = (0..16).map(|i| d(0x1_0000, 10, N, (i + 1) % 16)).collect();
        let mut q = queue(&mem, &ring);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            read_tx_chain(&mem, chain, &mut f),
            Err(ChainError::Unterminated)
        );
    }

    #[test]
    fn tx_chain_through_an_indirect_table() {
        let mem = mem();
        let table = [d(0x1_0000, 20, N, 1), d(0x1_1000, 30, 0, 0)];
        for (i, t) in table.iter().enumerate() {
            mem.write_obj(*t, GuestAddress(0x3_0000 + 16 * i as u64))
                .unwrap();
        }
        let mut q = queue(&mem, &[d(0x3_0000, 32, VRING_DESC_F_INDIRECT as u16, 0)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut f = TxFrame::new();
        assert_eq!(read_tx_chain(&mem, chain, &mut f), Ok(()));
        assert_eq!(f.len(), 50);
    }

    fn chk(frame: &[u8], features: u64) -> Result<(), ChainError> {
        check_tx_header(frame[..HDR_LEN].try_into().unwrap(), frame.len(), features)
    }

    fn fix(frame: &mut [u8], features: u64) -> Result<(), ChainError> {
        let len = frame.len();
        fix_rx_header((&mut frame[..HDR_LEN]).try_into().unwrap(), len, features)
    }

    fn tx_frame(flags: u8, gso: u8, csum_start: u16, csum_offset: u16) -> Vec<u8> {
        let mut f = frame(HDR_LEN + 60);
        f[..HDR_LEN].fill(0);
        f[OFF_FLAGS] = flags;
        f[OFF_GSO_TYPE] = gso;
        f[OFF_CSUM_START..OFF_CSUM_START + 2].copy_from_slice(&csum_start.to_le_bytes());
        f[OFF_CSUM_OFFSET..OFF_CSUM_OFFSET + 2].copy_from_slice(&csum_offset.to_le_bytes());
        f
    }

    #[test]
    fn tx_headers_follow_the_features() {
        let all = F_VERSION_1 | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN;
        let plain = tx_frame(0, GSO_NONE, 0, 0);
        assert_eq!(chk(&plain, F_VERSION_1), Ok(()));
        let csum = tx_frame(HDR_F_NEEDS_CSUM, GSO_NONE, 34, 16);
        assert_eq!(chk(&csum, all), Ok(()));
        assert_eq!(chk(&csum, F_VERSION_1), Err(ChainError::CsumNotNegotiated));
        assert!(matches!(
            chk(&tx_frame(HDR_F_NEEDS_CSUM, 0, 50, 9), all),
            Err(ChainError::BadCsumPosition { .. })
        ));
        assert!(matches!(
            chk(&tx_frame(HDR_F_NEEDS_CSUM, 0, u16::MAX, u16::MAX), all),
            Err(ChainError::BadCsumPosition { .. })
        ));
        assert_eq!(
            chk(&tx_frame(HDR_F_DATA_VALID, 0, 0, 0), all),
            Err(ChainError::BadFlags(HDR_F_DATA_VALID))
        );
        for (gso, feature) in [
            (GSO_TCPV4, F_HOST_TSO4),
            (GSO_TCPV6, F_HOST_TSO6),
            (GSO_TCPV4 | GSO_ECN, F_HOST_TSO4 | F_HOST_ECN),
        ] {
            let f = tx_frame(HDR_F_NEEDS_CSUM, gso, 34, 16);
            assert_eq!(chk(&f, F_CSUM | feature), Ok(()), "{gso:#x}");
            assert_eq!(
                chk(&f, all & !feature),
                Err(ChainError::BadGso(gso)),
                "{gso:#x}"
            );
        }
        for gso in [GSO_UDP, GSO_UDP_L4, 2, 6, 0x7f, GSO_ECN, 0xff] {
            assert_eq!(
                chk(&tx_frame(HDR_F_NEEDS_CSUM, gso, 34, 16), all),
                Err(ChainError::BadGso(gso)),
                "{gso:#x}"
            );
        }
        assert_eq!(chk(&plain[..20], all), Err(ChainError::TooShort(20)));
    }

    #[test]
    fn rx_headers_follow_the_features() {
        let mut f = tx_frame(HDR_F_DATA_VALID, 0, 0, 0);
        assert_eq!(fix(&mut f, F_VERSION_1), Ok(()));
        assert_eq!(f[OFF_FLAGS], 0, "DATA_VALID cleared without GUEST_CSUM");
        let mut f = tx_frame(HDR_F_DATA_VALID, 0, 0, 0);
        assert_eq!(fix(&mut f, F_GUEST_CSUM), Ok(()));
        assert_eq!(f[OFF_FLAGS], HDR_F_DATA_VALID);
        let mut f = tx_frame(HDR_F_NEEDS_CSUM, 0, 34, 16);
        assert_eq!(fix(&mut f, F_VERSION_1), Err(ChainError::CsumNotNegotiated));
        let mut f = tx_frame(HDR_F_NEEDS_CSUM, GSO_TCPV4, 34, 16);
        assert_eq!(
            fix(&mut f, F_GUEST_CSUM),
            Err(ChainError::BadGso(GSO_TCPV4))
        );
        assert_eq!(fix(&mut f, F_GUEST_CSUM | F_GUEST_TSO4), Ok(()));
        let mut f = tx_frame(0, GSO_UDP, 0, 0);
        assert_eq!(fix(&mut f, u64::MAX), Err(ChainError::BadGso(GSO_UDP)));
    }

    #[test]
    fn rx_chains() {
        let mem = mem();
        let mut q = queue(
            &mem,
            &[
                d(0x1_0000, 8, W | N, 1),
                d(0x2_0000, 0, W | N, 2),
                d(0x3_0000, 100, W, 0),
            ],
        );
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let b = parse_rx_chain(&mem, chain).unwrap();
        assert_eq!((b.head, b.capacity()), (0, 108));
        let data = frame(200);
        assert_eq!(b.write(&mem, &data[..50]), Ok(50));
        let mut out = [0u8; 42];
        mem.read_slice(&mut out, GuestAddress(0x3_0000)).unwrap();
        assert_eq!(&out[..], &data[8..50]);
        assert_eq!(b.write(&mem, &data), Ok(108), "bounded by the capacity");

        for (descs, want) in [
            (vec![d(0x1_0000, 64, 0, 0)], ChainError::ReadableInRx),
            (
                vec![d(0x1_0000, 64, W | N, 1), d(0x2_0000, 64, 0, 0)],
                ChainError::ReadableInRx,
            ),
            (
                vec![d(0x1f_ff00, 0x200, W, 0)],
                ChainError::OutsideMemory {
                    addr: 0x1f_ff00,
                    len: 0x200,
                },
            ),
            (vec![d(0x1_0000, 64, W | N, 0)], ChainError::Unterminated),
            (vec![d(0x1_0000, 11, W, 0)], ChainError::RxTooSmall(11)),
            (
                vec![d(0x1_0000, u32::MAX, W | N, 1), d(0x1_0000, 2, W, 0)],
                ChainError::OutsideMemory {
                    addr: 0x1_0000,
                    len: u32::MAX,
                },
            ),
        ] {
            let mut q = queue(&mem, &descs);
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            assert_eq!(parse_rx_chain(&mem, chain), Err(want.clone()), "{descs:?}");
        }
    }

    #[test]
    fn chains_from_a_bad_avail_index_are_not_popped() {
        let mem = mem();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        mem.write_obj(100u16, GuestAddress(mock.avail_addr().0 + 2))
            .unwrap();
        assert!(q.iter(&mem).is_err());
    }
}
