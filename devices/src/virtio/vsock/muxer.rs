//! The vsock backend: maps guest (port) connections to host Unix sockets.
//!
//! Host-initiated: a host application connects to the listening socket and
//! writes `CONNECT <port>\n`; we send the guest a REQUEST for that port and,
//! on its RESPONSE, write `OK <host port>\n` back; then bytes flow. A RST
//! from the guest (nobody listens) closes the host socket.
//!
//! Guest-initiated: a REQUEST to host port P connects to the Unix socket
//! `PATH_P`; RESPONSE if that works, RST if not.
//!
//! Packets for the guest come from the connections (in turn, one packet
//! each per round, so none starves the others) and from a bounded queue of
//! RSTs for packets that match no connection.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::Poller;
use super::connection::{Close, Connection};
use super::host::{Connector, HostListener};
use super::packet::{Header, Op, TxError, TxPacket};

/// Event tokens below this are the device's own (queues, listener, kick).
pub const FIRST_CONN_TOKEN: u32 = 16;
/// The listening socket's token.
pub const TOKEN_LISTENER: u32 = 3;

/// Most connections at once, counting host connections still waiting for
/// their `CONNECT` line.
pub const MAX_CONNECTIONS: usize = 256;
/// RSTs waiting for RX buffers; past that, RSTs for unknown connections are
/// dropped (a guest that sends garbage and posts no RX buffers).
const MAX_QUEUED_RSTS: usize = 2 * MAX_CONNECTIONS;
/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;
/// Connections accepted per listener event.
const ACCEPT_BUDGET: usize = 16;
/// Host ports handed out for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (our port, guest port)
type Key = (u32, u32);

/// A host connection that has not said `CONNECT <port>` yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Counters for tests and debugging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    pub rsts_dropped: u64,
    pub refused_host: u64,
    /// Guest connections the host's listener did not let us make.
    pub denied_guest: u64,
}

pub struct Muxer {
    guest_cid: u64,
    listener: Option<HostListener>,
    connector: Box<dyn Connector>,
    conns: HashMap<Key, Connection>,
    tokens: HashMap<u32, Key>,
    pending: HashMap<u32, PendingHost>,
    /// Connections that may have a packet for the guest, in turn.
    ready: VecDeque<Key>,
    rsts: VecDeque<Header>,
    next_token: u32,
    next_port: u32,
    pub stats: MuxerStats,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        listener: Option<HostListener>,
        connector: Box<dyn Connector>,
    ) -> Self {
        Muxer {
            guest_cid,
            listener,
            connector,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_port: FIRST_LOCAL_PORT,
            stats: MuxerStats::default(),
        }
    }

    /// Watches the listening socket.
    pub fn init(&mut self, poller: &mut dyn Poller) {
        if let Some(l) = &self.listener
            && let Err(e) = poller.add(l.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
        {
            log::error!("virtio-vsock: cannot watch {}: {e}", l.path().display());
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    fn new_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if !self.tokens.contains_key(&t) && !self.pending.contains_key(&t) {
                return t;
            }
        }
    }

    fn new_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = match self.next_port.checked_add(1) {
                Some(n) if n < u32::MAX => n,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn push_rst(&mut self, hdr: Header) {
        if self.rsts.len() >= MAX_QUEUED_RSTS {
            self.stats.rsts_dropped += 1;
            log::debug!("virtio-vsock: RST queue full, dropping a RST");
            return;
        }
        self.rsts.push_back(hdr);
    }

    fn mark_ready(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.queued
            && c.wants_rx()
        {
            c.queued = true;
            self.ready.push_back(key);
        }
    }

    /// Ends a connection: out of epoll, socket closed, RST to the guest if asked.
    fn close(&mut self, key: Key, how: Close, poller: &mut dyn Poller) {
        if let Some(mut c) = self.conns.remove(&key) {
            log::debug!(
                "virtio-vsock: closing {}<->{}: {}",
                c.local_port,
                c.peer_port,
                how.why
            );
            c.deregister(poller);
            self.tokens.remove(&c.token);
            if how.rst {
                self.push_rst(c.rst());
            }
        }
    }

    /// After a connection changed: its epoll interest, its place in the
    /// ready queue, or its end.
    fn settle(&mut self, key: Key, result: Result<(), Close>, poller: &mut dyn Poller) {
        let result = result.and_then(|()| match self.conns.get_mut(&key) {
            Some(c) => c.update_interest(poller),
            None => Ok(()),
        });
        match result {
            Ok(()) => self.mark_ready(key),
            Err(how) => self.close(key, how, poller),
        }
    }

    /// Accepts host connections; refuses them when the guest driver is not
    /// ready or there are too many.
    pub fn accept(&mut self, active: bool, poller: &mut dyn Poller) {
        for _ in 0..ACCEPT_BUDGET {
            let Some(l) = &self.listener else { return };
            let stream = match l.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("virtio-vsock: accept on {}: {e}", l.path().display());
                    return;
                }
            };
            if !active || self.connection_count() >= MAX_CONNECTIONS {
                // Dropping it closes it: the host application sees EOF.
                self.stats.refused_host += 1;
                log::debug!(
                    "virtio-vsock: refusing a host connection (driver ready: {active}, {} connections)",
                    self.connection_count()
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.new_token();
            if let Err(e) = poller.add(stream.as_raw_fd(), token, EventSet::IN) {
                log::debug!("virtio-vsock: cannot watch a host connection: {e}");
                continue;
            }
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Readiness of a host socket (anything but the listener).
    pub fn host_event(&mut self, token: u32, set: EventSet, active: bool, poller: &mut dyn Poller) {
        if self.pending.contains_key(&token) {
            self.pending_event(token, set, active, poller);
        } else if let Some(&key) = self.tokens.get(&token) {
            let result = match self.conns.get_mut(&key) {
                Some(c) => c.host_event(set),
                None => Ok(()),
            };
            self.settle(key, result, poller);
        }
    }

    /// Reads the `CONNECT <port>\n` line without reading past it: bytes
    /// after it are the stream's and are read when the guest has room.
    fn pending_event(&mut self, token: u32, set: EventSet, active: bool, poller: &mut dyn Poller) {
        let Some(mut p) = self.pending.remove(&token) else {
            return;
        };
        let outcome = read_connect_line(&mut p, set);
        match outcome {
            Ok(None) => {
                self.pending.insert(token, p);
            }
            Ok(Some(port)) if active => {
                let local = self.new_local_port(port);
                let key = (local, port);
                let conn = Connection::host_initiated(
                    p.stream,
                    token,
                    local,
                    port,
                    self.guest_cid,
                    Some(EventSet::IN),
                );
                self.conns.insert(key, conn);
                self.tokens.insert(token, key);
                self.settle(key, Ok(()), poller);
            }
            Ok(Some(_)) | Err(_) => {
                if let Err(why) = outcome {
                    log::debug!("virtio-vsock: host connection closed: {why}");
                }
                let _ = poller.remove(p.stream.as_raw_fd(), token);
            }
        }
    }

    /// A packet from the guest that did not parse.
    pub fn guest_error(&mut self, hdr: Option<&Header>, err: &TxError) {
        if let Some(rst) = hdr.and_then(|h| err.reply(h)) {
            self.push_rst(rst);
        }
    }

    /// A packet from the guest (checked by `parse_tx`), with its payload.
    pub fn guest_packet(&mut self, pkt: &TxPacket, payload: &[u8], poller: &mut dyn Poller) {
        let key = (pkt.hdr.dst_port, pkt.hdr.src_port);
        if pkt.op == Op::Request {
            if self.conns.contains_key(&key) {
                // The guest reuses a live port pair: end the old connection.
                self.close(
                    key,
                    Close {
                        rst: false,
                        why: "the guest reused its port",
                    },
                    poller,
                );
                self.push_rst(pkt.hdr.reset_reply());
                return;
            }
            self.connect_for_guest(pkt, poller);
            return;
        }
        match self.conns.get_mut(&key) {
            Some(c) => {
                let result = c.from_guest(pkt, payload);
                self.settle(key, result, poller);
            }
            None if pkt.op == Op::Rst => {}
            None => self.push_rst(pkt.hdr.reset_reply()),
        }
    }

    fn connect_for_guest(&mut self, pkt: &TxPacket, poller: &mut dyn Poller) {
        let port = pkt.hdr.dst_port;
        if self.connection_count() >= MAX_CONNECTIONS {
            log::debug!("virtio-vsock: too many connections, refusing port {port}");
            self.push_rst(pkt.hdr.reset_reply());
            return;
        }
        let stream = match self.connector.connect(port) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                // Said once: a jailed VM runs as its own uid, which the
                // host application's socket must let in.
                if self.stats.denied_guest == 0 {
                    log::warn!(
                        "virtio-vsock: may not connect to the listener for host port {port} ({e}); \
                         a jailed VM runs as its own uid (--uid), which needs write permission on \
                         that socket"
                    );
                }
                self.stats.denied_guest += 1;
                self.push_rst(pkt.hdr.reset_reply());
                return;
            }
            Err(e) => {
                log::debug!("virtio-vsock: guest connection to host port {port}: {e}");
                self.push_rst(pkt.hdr.reset_reply());
                return;
            }
        };
        let token = self.new_token();
        let key = (pkt.hdr.dst_port, pkt.hdr.src_port);
        self.conns
            .insert(key, Connection::guest_initiated(stream, token, &pkt.hdr));
        self.tokens.insert(token, key);
        self.settle(key, Ok(()), poller);
    }

    /// Whether anything is waiting for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.ready.is_empty()
    }

    /// The next packet for the guest, with up to `buf.len()` payload bytes
    /// in `buf`.
    pub fn next_rx(&mut self, buf: &mut [u8], poller: &mut dyn Poller) -> Option<(Header, usize)> {
        // Connections that have something, but nothing that fits `buf`
        // (data for an RX buffer with room for a header only): they stay
        // in the queue for a bigger buffer, after this call.
        let mut later = Vec::new();
        let packet = loop {
            if let Some(rst) = self.rsts.pop_front() {
                break Some((rst, 0));
            }
            let Some(key) = self.ready.pop_front() else {
                break None;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            match c.next_packet(buf) {
                Ok(Some(packet)) => {
                    self.settle(key, Ok(()), poller);
                    break Some(packet);
                }
                Ok(None) => {
                    let result = c.update_interest(poller);
                    match result {
                        Ok(()) if c.wants_rx() => {
                            c.queued = true;
                            later.push(key);
                        }
                        Ok(()) => {}
                        Err(how) => self.close(key, how, poller),
                    }
                }
                Err(how) => self.close(key, how, poller),
            }
        };
        self.ready.extend(later);
        packet
    }

    /// The driver reset the device: every connection ends (the host sides
    /// see EOF); the listener stays.
    pub fn reset(&mut self, poller: &mut dyn Poller) {
        for (_, mut c) in self.conns.drain() {
            c.deregister(poller);
        }
        for (token, p) in self.pending.drain() {
            let _ = poller.remove(p.stream.as_raw_fd(), token);
        }
        self.tokens.clear();
        self.ready.clear();
        self.rsts.clear();
    }

    #[cfg(test)]
    pub fn connection(&self, local: u32, peer: u32) -> Option<&Connection> {
        self.conns.get(&(local, peer))
    }
}

/// Reads what there is of the `CONNECT` line: `Ok(Some(port))` once whole,
/// `Ok(None)` while incomplete, `Err` for anything else.
fn read_connect_line(p: &mut PendingHost, set: EventSet) -> Result<Option<u32>, &'static str> {
    if set.contains(EventSet::ERROR) {
        return Err("socket error");
    }
    let mut peek = [0u8; MAX_CONNECT_LINE];
    let room = MAX_CONNECT_LINE - p.line.len();
    // SAFETY: recv writes at most `room` bytes into `peek`, which is larger.
    let n = unsafe {
        libc::recv(
            p.stream.as_raw_fd(),
            peek.as_mut_ptr().cast(),
            room,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::Interrupted => Ok(None),
            _ => Err("read error"),
        };
    }
    let n = n as usize;
    if n == 0 {
        return Err("closed before CONNECT");
    }
    // Take exactly up to the newline (or all we peeked if there is none).
    let take = peek[..n]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(n, |i| i + 1);
    let mut consumed = vec![0u8; take];
    p.stream
        .read_exact(&mut consumed)
        .map_err(|_| "read error")?;
    p.line.extend_from_slice(&consumed);
    if p.line.last() != Some(&b'\n') {
        if p.line.len() >= MAX_CONNECT_LINE {
            return Err("CONNECT line too long");
        }
        return Ok(None);
    }
    parse_connect(&p.line)
        .map(Some)
        .ok_or("not a CONNECT <port> line")
}

/// `CONNECT <decimal port>\n`
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?.strip_suffix(b"\n")?;
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r\n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 52"[..],
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 99999999999\n",
            b"connect 52\n",
            b"CONNECT 5 2\n",
            b"CONNECT +5\n",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
