//! virtio-vsock packets (virtio 1.2 §5.10.6): a 44-byte little-endian
//! header, then `len` bytes of payload for RW packets.
//!
//! [`parse_tx`] is a pure function from the bytes the guest put in a TX
//! chain to what the device does with them; the fuzz target calls it.

/// Size of [`Header`] on the wire.
pub const HDR_SIZE: usize = 44;

/// The host's context ID (the well-known VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;

/// Stream sockets: the only type this device supports.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flags: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The largest payload of one packet, either way (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). Longer RW packets from the guest are
/// refused.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// A packet header, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST that answers this packet (ports swapped, no credit).
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

/// What a well-formed packet from the guest asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown {
        rcv: bool,
        send: bool,
    },
    /// Data: the payload is the `len` bytes after the header.
    Rw,
    CreditUpdate,
    CreditRequest,
}

/// A packet from the guest that the device accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub op: Op,
}

impl TxPacket {
    /// Payload bytes that follow the header (non-zero only for RW).
    pub fn payload_len(&self) -> usize {
        match self.op {
            Op::Rw => self.hdr.len as usize,
            _ => 0,
        }
    }
}

/// Why a packet from the guest is refused. [`TxError::reply`] says whether
/// the guest gets a RST for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("descriptor chain is malformed or outside guest memory")]
    BadChain,
    #[error("chain holds {0} readable bytes, less than a {HDR_SIZE}-byte header")]
    Short(usize),
    #[error("source CID {got} is not the guest's CID {want}")]
    WrongSourceCid { got: u64, want: u64 },
    #[error("destination CID {0} is not the host (2)")]
    NotToHost(u64),
    #[error("socket type {0} is not a stream (1)")]
    BadType(u16),
    #[error("unknown operation {0}")]
    BadOp(u16),
    #[error("RW payload of {0} bytes is more than {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("header says {len} payload bytes, the chain holds {available}")]
    Truncated { len: u32, available: usize },
}

impl TxError {
    /// A header that parsed but cannot be served is answered with a RST
    /// (never a RST to a RST, and never to a packet that lied about its
    /// source); the rest are dropped silently.
    pub fn reply(&self, hdr: &Header) -> Option<Header> {
        match self {
            TxError::BadChain | TxError::Short(_) | TxError::WrongSourceCid { .. } => None,
            _ if hdr.op == OP_RST => None,
            _ => Some(hdr.reset_reply()),
        }
    }
}

/// Parses and checks a packet from the guest: `head` is the first
/// [`HDR_SIZE`] bytes of the chain's readable part (fewer if it is that
/// short), `available` how many readable bytes the chain holds after them.
pub fn parse_tx(head: &[u8], available: usize, guest_cid: u64) -> Result<TxPacket, TxError> {
    let bytes: &[u8; HDR_SIZE] = head
        .get(..HDR_SIZE)
        .and_then(|h| h.try_into().ok())
        .ok_or(TxError::Short(head.len()))?;
    let hdr = Header::from_bytes(bytes);
    check_tx(&hdr, available, guest_cid).map(|op| TxPacket { hdr, op })
}

fn check_tx(hdr: &Header, available: usize, guest_cid: u64) -> Result<Op, TxError> {
    if hdr.src_cid != guest_cid {
        return Err(TxError::WrongSourceCid {
            got: hdr.src_cid,
            want: guest_cid,
        });
    }
    if hdr.dst_cid != HOST_CID {
        return Err(TxError::NotToHost(hdr.dst_cid));
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(TxError::BadType(hdr.type_));
    }
    let op = match hdr.op {
        OP_REQUEST => Op::Request,
        OP_RESPONSE => Op::Response,
        OP_RST => Op::Rst,
        OP_SHUTDOWN => Op::Shutdown {
            rcv: hdr.flags & SHUTDOWN_RCV != 0,
            send: hdr.flags & SHUTDOWN_SEND != 0,
        },
        OP_RW => Op::Rw,
        OP_CREDIT_UPDATE => Op::CreditUpdate,
        OP_CREDIT_REQUEST => Op::CreditRequest,
        other => return Err(TxError::BadOp(other)),
    };
    if op == Op::Rw {
        if hdr.len as usize > MAX_PAYLOAD {
            return Err(TxError::TooLong(hdr.len));
        }
        if hdr.len as usize > available {
            return Err(TxError::Truncated {
                len: hdr.len,
                available,
            });
        }
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn hdr(op: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 2000,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Header::default()
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1_0000,
            fwd_cnt: 0xffff_fffe,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[28..32], [1, 0, 5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn good_packets_parse() {
        let mut h = hdr(OP_RW);
        h.len = 10;
        let p = parse_tx(&h.to_bytes(), 10, CID).unwrap();
        assert_eq!(p.op, Op::Rw);
        assert_eq!(p.payload_len(), 10);
        let mut s = hdr(OP_SHUTDOWN);
        s.flags = SHUTDOWN_SEND;
        s.len = 99; // ignored for anything but RW
        assert_eq!(
            parse_tx(&s.to_bytes(), 0, CID).unwrap().op,
            Op::Shutdown {
                rcv: false,
                send: true
            }
        );
        assert_eq!(parse_tx(&s.to_bytes(), 0, CID).unwrap().payload_len(), 0);
        for (op, want) in [
            (OP_REQUEST, Op::Request),
            (OP_RESPONSE, Op::Response),
            (OP_RST, Op::Rst),
            (OP_CREDIT_UPDATE, Op::CreditUpdate),
            (OP_CREDIT_REQUEST, Op::CreditRequest),
        ] {
            assert_eq!(parse_tx(&hdr(op).to_bytes(), 0, CID).unwrap().op, want);
        }
    }

    #[test]
    fn bad_packets_are_refused_with_or_without_rst() {
        let short = parse_tx(&[0u8; 43], 0, CID).unwrap_err();
        assert_eq!(short, TxError::Short(43));
        assert_eq!(short.reply(&Header::default()), None);

        let mut h = hdr(OP_REQUEST);
        h.src_cid = 7;
        let e = parse_tx(&h.to_bytes(), 0, CID).unwrap_err();
        assert!(matches!(e, TxError::WrongSourceCid { got: 7, want: 3 }));
        assert_eq!(e.reply(&h), None, "no RST to a forged source");

        let mut h = hdr(OP_REQUEST);
        h.dst_cid = 5;
        let e = parse_tx(&h.to_bytes(), 0, CID).unwrap_err();
        assert_eq!(e, TxError::NotToHost(5));
        let rst = e.reply(&h).unwrap();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
            (OP_RST, 2000, 1000, CID)
        );

        let mut h = hdr(OP_REQUEST);
        h.type_ = 2;
        assert_eq!(
            parse_tx(&h.to_bytes(), 0, CID).unwrap_err(),
            TxError::BadType(2)
        );
        let h = hdr(0);
        assert_eq!(
            parse_tx(&h.to_bytes(), 0, CID).unwrap_err(),
            TxError::BadOp(0)
        );
        let h = hdr(99);
        assert!(
            parse_tx(&h.to_bytes(), 0, CID)
                .unwrap_err()
                .reply(&h)
                .is_some()
        );

        let mut h = hdr(OP_RW);
        h.len = MAX_PAYLOAD as u32 + 1;
        assert_eq!(
            parse_tx(&h.to_bytes(), usize::MAX, CID).unwrap_err(),
            TxError::TooLong(h.len)
        );
        h.len = 100;
        assert_eq!(
            parse_tx(&h.to_bytes(), 99, CID).unwrap_err(),
            TxError::Truncated {
                len: 100,
                available: 99
            }
        );

        // Never a RST in answer to a RST.
        let mut h = hdr(OP_RST);
        h.type_ = 9;
        let e = parse_tx(&h.to_bytes(), 0, CID).unwrap_err();
        assert_eq!(e.reply(&h), None);
    }
}
