//! One vsock stream connection between a guest port and a host Unix socket,
//! with credit-based flow control in both directions (virtio 1.2 §5.10.6.3).
//!
//! Guest to host: the guest may have at most [`CONN_BUF_SIZE`] bytes that
//! the host socket has not taken yet (we advertise that as `buf_alloc`, and
//! how much we passed on as `fwd_cnt`); they wait in a bounded buffer. A
//! guest that sends more than its credit is reset.
//!
//! Host to guest: we read from the host socket only as much as the guest
//! said it has room for (its `buf_alloc` minus what it has not consumed yet)
//! and as fits in the RX buffer at hand, so nothing is buffered on our side.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::Poller;
use super::packet::{
    HOST_CID, Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, Op,
    SHUTDOWN_SEND, TYPE_STREAM, TxPacket,
};

/// Guest bytes a connection holds for a host socket that does not take
/// them fast enough: the `buf_alloc` we advertise.
pub const CONN_BUF_SIZE: u32 = 64 * 1024;

const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_SHUTDOWN: u8 = 4;
const PENDING_CREDIT: u8 = 8;

/// The connection is over: the muxer forgets it, closes the host socket
/// and, if `rst`, tells the guest with a RST.
#[derive(Debug, PartialEq, Eq)]
pub struct Close {
    pub rst: bool,
    pub why: &'static str,
}

fn close(why: &'static str) -> Close {
    Close { rst: true, why }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST pending or sent, waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

pub struct Connection {
    stream: UnixStream,
    pub token: u32,
    /// Our (host) port, the source port of what we send.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    guest_cid: u64,
    state: State,
    pending: u8,

    /// Guest to host: bytes waiting for the host socket; the first
    /// `preamble` of them are ours (the `OK <port>` line), not the guest's.
    to_host: VecDeque<u8>,
    preamble: usize,
    /// Guest bytes received and passed on to the host (wrapping counters).
    rx_cnt: u32,
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    told_fwd_cnt: u32,

    /// Host to guest: bytes sent, and the guest's last word on its buffer.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,

    /// The host socket has data for us (epoll said so, no EAGAIN since).
    readable: bool,
    /// The host will send no more (read returned 0).
    host_eof: bool,
    /// The host socket is closed both ways (EPOLLHUP/ERR or a failed write):
    /// nothing more can go to it; it is out of epoll for good.
    host_hup: bool,
    /// We shut down the host socket's write side (the guest sends no more).
    host_write_shut: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,

    /// What epoll watches for us; `None` when the socket is not registered.
    registered: Option<EventSet>,
    /// Listed in the muxer's ready queue.
    pub queued: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        token: u32,
        (local_port, peer_port): (u32, u32),
        guest_cid: u64,
    ) -> Self {
        Connection {
            stream,
            token,
            local_port,
            peer_port,
            guest_cid,
            state: State::Established,
            pending: 0,
            to_host: VecDeque::new(),
            preamble: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            registered: None,
            queued: false,
        }
    }

    /// The guest asked for `request` and we connected `stream` to the host
    /// application: the RESPONSE is pending. `stream` is not registered yet.
    pub fn guest_initiated(stream: UnixStream, token: u32, request: &Header) -> Self {
        let ports = (request.dst_port, request.src_port);
        let mut c = Connection::new(stream, token, ports, request.src_cid);
        c.pending = PENDING_RESPONSE;
        c.peer_credit(request);
        c
    }

    /// The host asked (`CONNECT <peer_port>`) on `stream`, which is
    /// registered with `registered`: the REQUEST is pending.
    pub fn host_initiated(
        stream: UnixStream,
        token: u32,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        registered: Option<EventSet>,
    ) -> Self {
        let mut c = Connection::new(stream, token, (local_port, peer_port), guest_cid);
        c.state = State::LocalInit;
        c.pending = PENDING_REQUEST;
        c.registered = registered;
        c
    }

    /// The guest's free buffer space as we know it.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A guest that acknowledges bytes we never sent gets no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Guest bytes we hold for the host.
    fn buffered(&self) -> usize {
        self.to_host.len() - self.preamble
    }

    /// A packet from the guest for this connection.
    pub fn from_guest(&mut self, pkt: &TxPacket, payload: &[u8]) -> Result<(), Close> {
        self.peer_credit(&pkt.hdr);
        match pkt.op {
            Op::Request => return Err(close("REQUEST for a connection that exists")),
            Op::Response => {
                if self.state != State::LocalInit || self.pending & PENDING_REQUEST != 0 {
                    return Err(close("unexpected RESPONSE"));
                }
                self.state = State::Established;
                let ok = format!("OK {}\n", self.local_port);
                self.preamble = ok.len();
                self.to_host.extend(ok.as_bytes());
                self.flush()?;
            }
            Op::Rst => {
                return Err(Close {
                    rst: false,
                    why: "the guest reset it",
                });
            }
            Op::Shutdown { rcv, send } => {
                self.guest_shut_rcv |= rcv;
                self.guest_shut_send |= send;
                if rcv && !self.host_hup {
                    // The host application sees EPIPE on its next write.
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                self.flush()?;
            }
            Op::Rw => {
                if self.state != State::Established || self.guest_shut_send {
                    return Err(close("RW before RESPONSE or after SHUTDOWN"));
                }
                let len = payload.len();
                if self.buffered() + len > CONN_BUF_SIZE as usize {
                    return Err(close("the guest sent more than its credit"));
                }
                self.rx_cnt = self.rx_cnt.wrapping_add(len as u32);
                if self.host_hup {
                    // Nobody to give it to: drop it, but keep the credit moving.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(len as u32);
                } else {
                    self.to_host.extend(payload);
                    self.flush()?;
                }
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => self.pending |= PENDING_CREDIT,
        }
        self.check_finished()
    }

    /// Writes what the host socket takes.
    fn flush(&mut self) -> Result<(), Close> {
        while !self.to_host.is_empty() && !self.host_hup {
            let (a, b) = self.to_host.as_slices();
            match self
                .stream
                .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            {
                Ok(0) => return Err(close("the host socket takes no data")),
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.preamble);
                    self.preamble -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(close("the host socket is closed")),
            }
        }
        if self.to_host.is_empty() && self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        // Tell the guest about freed space before it runs dry: once what it
        // believes it may send falls under half the buffer.
        let guest_view_used = self.rx_cnt.wrapping_sub(self.told_fwd_cnt);
        if self.fwd_cnt != self.told_fwd_cnt
            && guest_view_used > CONN_BUF_SIZE / 2
            && !self.guest_shut_send
        {
            self.pending |= PENDING_CREDIT;
        }
        Ok(())
    }

    /// Readiness of the host socket.
    pub fn host_event(&mut self, set: EventSet) -> Result<(), Close> {
        if set.contains(EventSet::ERROR) {
            return Err(close("error on the host socket"));
        }
        if set.contains(EventSet::HANG_UP) {
            // Closed both ways; what it sent before is still to be read.
            self.host_hup = true;
            self.readable = true;
            let dropped = self.buffered() as u32;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(dropped);
            self.to_host.clear();
            self.preamble = 0;
        }
        if set.contains(EventSet::IN) {
            self.readable = true;
        }
        if set.contains(EventSet::OUT) {
            self.flush()?;
        }
        self.check_finished()
    }

    /// Both directions are done: the connection can go.
    fn check_finished(&self) -> Result<(), Close> {
        let to_host_done = self.host_hup || (self.guest_shut_send && self.to_host.is_empty());
        // host_eof is set once a read returned 0: every byte was read.
        let to_guest_done = self.guest_shut_rcv || self.host_eof;
        if to_host_done && to_guest_done {
            return Err(close("both directions are done"));
        }
        Ok(())
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        self.pending != 0 || self.can_read()
    }

    fn can_read(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_free() > 0
    }

    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn sent(&mut self, hdr: Header) -> Option<(Header, usize)> {
        self.told_fwd_cnt = hdr.fwd_cnt;
        self.pending &= !PENDING_CREDIT; // every header carries our credit
        Some((hdr, hdr.len as usize))
    }

    /// The next packet for the guest, with up to `buf.len()` bytes of
    /// payload read into `buf`; `None` if there is nothing to send.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Result<Option<(Header, usize)>, Close> {
        if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            return Ok(self.sent(self.header(OP_REQUEST)));
        }
        if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            return Ok(self.sent(self.header(OP_RESPONSE)));
        }
        if self.can_read() && !buf.is_empty() {
            let want = buf.len().min(self.peer_free() as usize);
            loop {
                match self.stream.read(&mut buf[..want]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.readable = false;
                        self.check_finished()?;
                        self.pending |= PENDING_SHUTDOWN;
                        break;
                    }
                    Ok(n) => {
                        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                        let mut hdr = self.header(OP_RW);
                        hdr.len = n as u32;
                        return Ok(self.sent(hdr));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.readable = false;
                        break;
                    }
                    Err(_) => return Err(close("cannot read the host socket")),
                }
            }
        }
        if self.pending & PENDING_SHUTDOWN != 0 {
            self.pending &= !PENDING_SHUTDOWN;
            let mut hdr = self.header(OP_SHUTDOWN);
            hdr.flags = SHUTDOWN_SEND;
            return Ok(self.sent(hdr));
        }
        if self.pending & PENDING_CREDIT != 0 {
            return Ok(self.sent(self.header(OP_CREDIT_UPDATE)));
        }
        Ok(None)
    }

    /// Header of the RST that ends this connection.
    pub fn rst(&self) -> Header {
        let mut h = self.header(super::packet::OP_RST);
        h.buf_alloc = 0;
        h.fwd_cnt = 0;
        h
    }

    /// The epoll events we want for the host socket; `None` once it is
    /// closed both ways (HUP would fire for ever).
    fn desired(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if self.state == State::Established
            && !self.readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_free() > 0
        {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Brings the epoll registration in line with what the connection needs.
    pub fn update_interest(&mut self, poller: &mut dyn Poller) -> Result<(), Close> {
        let want = self.desired();
        if want == self.registered {
            return Ok(());
        }
        let fd = self.stream.as_raw_fd();
        let result = match (self.registered, want) {
            (None, Some(set)) => poller.add(fd, self.token, set),
            (Some(_), Some(set)) => poller.modify(fd, self.token, set),
            (Some(_), None) => poller.remove(fd, self.token),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => {
                self.registered = want;
                Ok(())
            }
            Err(e) => {
                log::debug!("virtio-vsock: cannot watch a host socket: {e}");
                Err(close("cannot watch the host socket"))
            }
        }
    }

    /// Takes the socket out of epoll before it is closed.
    pub fn deregister(&mut self, poller: &mut dyn Poller) {
        if self.registered.take().is_some() {
            let _ = poller.remove(self.stream.as_raw_fd(), self.token);
        }
    }

    #[cfg(test)]
    pub fn stats(&self) -> (u32, u32, u32, usize) {
        (
            self.fwd_cnt,
            self.tx_cnt,
            self.peer_free(),
            self.to_host.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::NoPoller;
    use super::super::packet::{OP_CREDIT_REQUEST, OP_RST};
    use super::*;

    const CID: u64 = 3;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn guest(op: u16, buf_alloc: u32, fwd_cnt: u32) -> TxPacket {
        let hdr = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            type_: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        };
        super::super::packet::parse_tx(&hdr.to_bytes(), usize::MAX, CID).unwrap()
    }

    fn rw(len: usize, buf_alloc: u32, fwd_cnt: u32) -> TxPacket {
        let mut p = guest(OP_RW, buf_alloc, fwd_cnt);
        p.hdr.len = len as u32;
        p
    }

    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, theirs) = pair();
        let mut c = Connection::guest_initiated(ours, 16, &guest(OP_REQUEST, buf_alloc, 0).hdr);
        let mut buf = [0u8; 16];
        let (h, n) = c.next_packet(&mut buf).unwrap().unwrap();
        assert_eq!(
            (h.op, n, h.src_port, h.dst_port),
            (OP_RESPONSE, 0, 52, 1024)
        );
        (c, theirs)
    }

    #[test]
    fn host_data_respects_the_guest_credit() {
        let (mut c, mut host) = established(10);
        host.write_all(&[7u8; 100]).unwrap();
        c.host_event(EventSet::IN).unwrap();
        let mut buf = [0u8; 64];
        let (h, n) = c.next_packet(&mut buf).unwrap().unwrap();
        assert_eq!((h.op, n, h.len), (OP_RW, 10, 10));
        // Out of credit: nothing more, and epoll stops reporting input.
        assert!(!c.wants_rx());
        assert_eq!(c.next_packet(&mut buf).unwrap(), None);
        assert_eq!(c.desired(), Some(EventSet::empty()));
        // The guest consumed 4 bytes.
        c.from_guest(&guest(OP_CREDIT_UPDATE, 10, 4), &[]).unwrap();
        let (_, n) = c.next_packet(&mut buf).unwrap().unwrap();
        assert_eq!(n, 4);
        // A guest that acknowledges more than it got gets nothing.
        c.from_guest(&guest(OP_CREDIT_UPDATE, 10, 1000), &[])
            .unwrap();
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn guest_data_is_bounded_by_our_credit() {
        let (mut c, host) = established(4096);
        // The host does not read: its socket buffer fills, then ours.
        let chunk = vec![1u8; 32 * 1024];
        let mut sent = 0u32;
        let result = loop {
            let r = c.from_guest(&rw(chunk.len(), 4096, 0), &chunk);
            if r.is_err() {
                break r;
            }
            sent += chunk.len() as u32;
            assert!(c.buffered() <= CONN_BUF_SIZE as usize);
            assert!(sent < 64 * 1024 * 1024, "never refused");
        };
        assert_eq!(
            result.unwrap_err().why,
            "the guest sent more than its credit"
        );
        drop(host);
    }

    #[test]
    fn buffered_data_flows_when_the_host_reads_and_credit_is_updated() {
        let (mut c, mut host) = established(4096);
        let chunk = vec![9u8; 16 * 1024];
        // Fill the host socket so data stays with us.
        let mut total = 0usize;
        while c.to_host.is_empty() {
            c.from_guest(&rw(chunk.len(), 4096, 0), &chunk).unwrap();
            total += chunk.len();
        }
        assert!(c.desired().unwrap().contains(EventSet::OUT));
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < total {
            match host.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.host_event(EventSet::OUT).unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, total);
        assert!(c.to_host.is_empty());
        assert_eq!(c.fwd_cnt as usize, total);
        // The guest hears about the freed space.
        let mut b = [0u8; 8];
        let (h, _) = c.next_packet(&mut b).unwrap().unwrap();
        assert_eq!((h.op, h.fwd_cnt as usize), (OP_CREDIT_UPDATE, total));
    }

    #[test]
    fn credit_request_is_answered() {
        let (mut c, _host) = established(4096);
        c.from_guest(&guest(OP_CREDIT_REQUEST, 4096, 0), &[])
            .unwrap();
        let mut b = [0u8; 8];
        let (h, _) = c.next_packet(&mut b).unwrap().unwrap();
        assert_eq!((h.op, h.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_SIZE));
    }

    #[test]
    fn host_initiated_sends_request_then_ok_line() {
        let (ours, mut host) = pair();
        let mut c = Connection::host_initiated(ours, 17, 1 << 30, 5000, CID, None);
        let mut b = [0u8; 8];
        let (h, _) = c.next_packet(&mut b).unwrap().unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_REQUEST, 1 << 30, 5000, CID)
        );
        // Data before the RESPONSE is a protocol violation.
        let mut early = c_clone_for_test(&c);
        assert!(early.from_guest(&rw(1, 4096, 0), &[1]).is_err());
        let mut resp = guest(OP_RESPONSE, 4096, 0);
        resp.hdr.src_port = 5000;
        c.from_guest(&resp, &[]).unwrap();
        c.from_guest(&rw(3, 4096, 0), b"abc").unwrap();
        let mut text = [0u8; 64];
        let n = host.read(&mut text).unwrap();
        assert_eq!(&text[..n], format!("OK {}\nabc", 1u32 << 30).as_bytes());
        // Only the guest's bytes count as forwarded.
        assert_eq!(c.fwd_cnt, 3);
    }

    fn c_clone_for_test(c: &Connection) -> Connection {
        Connection::host_initiated(
            c.stream.try_clone().unwrap(),
            c.token,
            c.local_port,
            c.peer_port,
            c.guest_cid,
            None,
        )
    }

    #[test]
    fn shutdowns_and_close() {
        // Host half-closes: the guest gets SHUTDOWN(SEND), can still send.
        let (mut c, mut host) = established(4096);
        host.write_all(b"bye").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        c.host_event(EventSet::IN).unwrap();
        let mut b = [0u8; 64];
        let (h, n) = c.next_packet(&mut b).unwrap().unwrap();
        assert_eq!((h.op, &b[..n]), (OP_RW, &b"bye"[..]));
        let (h, _) = c.next_packet(&mut b).unwrap().unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        c.from_guest(&rw(2, 4096, 3), b"ok").unwrap();
        let mut t = [0u8; 8];
        assert_eq!(host.read(&mut t).unwrap(), 2);
        // The guest is done too: both directions over, RST.
        let mut s = guest(OP_SHUTDOWN, 4096, 3);
        s.op = Op::Shutdown {
            rcv: false,
            send: true,
        };
        assert!(c.from_guest(&s, &[]).unwrap_err().rst);
        assert_eq!(host.read(&mut t).unwrap(), 0, "host sees EOF");

        // The guest closes (both flags): RST once the host has its data.
        let (mut c, _host) = established(4096);
        let mut s = guest(OP_SHUTDOWN, 4096, 0);
        s.op = Op::Shutdown {
            rcv: true,
            send: true,
        };
        assert!(c.from_guest(&s, &[]).unwrap_err().rst);

        // The guest resets: no RST back.
        let (mut c, _host) = established(4096);
        assert!(!c.from_guest(&guest(OP_RST, 0, 0), &[]).unwrap_err().rst);

        // The host closes entirely: remaining data still reaches the guest.
        let (mut c, mut host) = established(4096);
        host.write_all(b"last").unwrap();
        drop(host);
        c.host_event(EventSet::IN | EventSet::HANG_UP).unwrap();
        c.update_interest(&mut NoPoller).unwrap();
        assert_eq!(c.desired(), None, "out of epoll");
        let (h, n) = c.next_packet(&mut b).unwrap().unwrap();
        assert_eq!((h.op, &b[..n]), (OP_RW, &b"last"[..]));
        // Guest data for a gone host is dropped, credit still moves.
        c.from_guest(&rw(2, 4096, 4), b"xx").unwrap();
        assert_eq!(c.fwd_cnt, 2);
        assert!(c.next_packet(&mut b).unwrap_err().rst);
    }

    #[test]
    fn unexpected_packets_reset() {
        let (mut c, _host) = established(4096);
        assert!(c.from_guest(&guest(OP_REQUEST, 0, 0), &[]).is_err());
        let (mut c, _host) = established(4096);
        assert!(c.from_guest(&guest(OP_RESPONSE, 0, 0), &[]).is_err());
        let (mut c, _host) = established(4096);
        let mut s = guest(OP_SHUTDOWN, 4096, 0);
        s.op = Op::Shutdown {
            rcv: false,
            send: true,
        };
        c.from_guest(&s, &[]).unwrap();
        assert!(
            c.from_guest(&rw(1, 4096, 0), &[0]).is_err(),
            "data after SHUTDOWN"
        );
        let (mut c, _host) = established(4096);
        assert!(c.host_event(EventSet::ERROR).is_err());
    }
}
