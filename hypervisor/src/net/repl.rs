//! The replication link transport: one TCP connection (smoltcp) between the primary and the
//! secondary host, on the NIC with the `repl` role and its own address (`repl_addr=`).
//!
//! - The secondary listens on `repl_port`; the primary connects to `peer_addr` and connects again
//!   (after [`RECONNECT_MS`]) whenever the connection closes.
//! - A connection the secondary accepts while another one is up replaces it (the primary may
//!   have restarted and left a half-open connection behind); two sockets listen so a new
//!   connection is never refused.
//! - Socket buffers are sized for bulk checkpoints ([`BUFFER_BYTES`], so window scaling is
//!   negotiated), Nagle is off and ACKs are not delayed. smoltcp 0.12 sends one segment per
//!   socket per `Interface::poll`, so [`ReplLink::poll`] polls again while segments leave.
//! - Bounded both ways: [`ReplLink::send`] takes only what fits in the socket's send buffer (the
//!   caller keeps the rest: backpressure) and [`ReplLink::recv`] reads what the receive buffer
//!   holds; there is no other queue.
//! - Every connection gets a new [`Connection::id`]: a caller that parses the byte stream resets
//!   its decoder when the id changes. [`ReplLink::close`] (the caller found bad bytes) resets the
//!   connection and counts the reason by name; nothing received on it afterwards is delivered.
//!
//! - Sealed (`repl_auth=on`, [`ReplLink::set_sealing`]): every new TCP connection first runs the
//!   [`SecureChannel`] handshake (the primary initiates) with a fresh nonce; only a connection
//!   whose peer proved the cluster key becomes the link ([`ReplLink::connection`] is `None`
//!   until then, and on the secondary an unproven newcomer never replaces the link). From then
//!   on [`ReplLink::send`] seals what it takes into one record sized to the socket's free space
//!   ([`SEAL_OVERHEAD`] more than the plaintext, at most [`MAX_SEALED_RECORD`]), and
//!   [`ReplLink::recv`] hands out only plaintext that authenticated. A handshake or record that
//!   fails closes the connection and is counted by name (`seal_wrong_key`,
//!   `seal_record_rejected`, `seal_truncated`, ...; [`SealError::counter_name`]); the log names
//!   the peer's address, never the key. Nothing of such a connection reaches the caller.
//!
//! The transport is generic over the smoltcp [`Device`], so the host tests run two links over an
//! in-memory wire; on bare metal [`nic::ReplNic`] is the e1000 with the `repl` role.
#![deny(unsafe_code)]

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use crate::config::Ipv4Cidr;
use crate::seal::{ClusterKey, SealError, SealRole, SecureChannel, NONCE_LEN};

/// Send and receive buffer of each link socket. At least 64 KiB so window scaling is negotiated;
/// a few hundred KiB cover the bandwidth-delay product between (emulated) hosts.
pub const BUFFER_BYTES: usize = 256 << 10;
/// Wait before the primary connects again after a close or a failed attempt.
pub const RECONNECT_MS: u64 = 200;
/// A connection whose segments stay unacknowledged this long (keep-alives included) is dropped.
pub const TIMEOUT_MS: u64 = 5_000;
/// Keep-alive interval on an idle connection.
pub const KEEP_ALIVE_MS: u64 = 1_000;
/// Sockets listening on the secondary (one may be busy with a connection being replaced).
const LISTEN_SLOTS: usize = 2;
/// Most `Interface::poll` rounds per [`ReplLink::poll`] (each sends at most one segment per
/// socket); bounds the time one call takes.
const MAX_POLL_ROUNDS: usize = 256;
/// First local port the primary connects from; it moves on with every attempt.
const FIRST_LOCAL_PORT: u16 = 49_152;
/// Distinct close reasons counted by name.
const MAX_REASONS: usize = 24;
/// Largest plaintext [`ReplLink::send`] seals into one record.
pub const MAX_SEALED_RECORD: usize = 64 << 10;
/// Bytes a sealed record takes beyond its plaintext (length and tag).
pub const SEAL_OVERHEAD: usize = SecureChannel::record_len(0);
/// A new connection that has not proved the cluster key after this long is dropped.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Raw bytes read per step during a handshake (its messages are 48, 72 and 32 bytes).
const HANDSHAKE_READ: usize = 64;
/// Raw bytes [`ReplLink::recv`] reads from the socket at a time on a sealed link.
const RAW_CHUNK: usize = 64 << 10;

/// What sealing needs: the cluster key and a source of fresh handshake nonces (one per
/// connection; on bare metal RDRAND where the CPU has it).
pub struct Sealing {
    /// The cluster key (module `cluster-key`).
    pub key: ClusterKey,
    /// A new random nonce each call.
    pub nonces: Box<dyn FnMut() -> [u8; NONCE_LEN]>,
}

impl fmt::Debug for Sealing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealing").field("key", &self.key).finish_non_exhaustive()
    }
}

/// Why a handshake on a new connection ended without a link.
#[derive(Debug)]
enum HandshakeEnd {
    /// The channel refused the peer's bytes.
    Refused(SealError),
    /// No proof within [`HANDSHAKE_TIMEOUT_MS`].
    Timeout,
    /// The peer closed or reset the connection first.
    Incomplete,
}

impl HandshakeEnd {
    fn name(&self) -> &'static str {
        match self {
            Self::Refused(e) => e.counter_name(),
            Self::Timeout => "seal_handshake_timeout",
            Self::Incomplete => "seal_handshake_incomplete",
        }
    }
}

/// Which end of the link this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The primary: connects to the secondary.
    Connect {
        /// The secondary's replication endpoint (`peer_addr=`).
        peer: SocketAddrV4,
    },
    /// The secondary: accepts the primary's connection.
    Listen {
        /// The TCP port (`repl_port=`).
        port: u16,
    },
}

/// How to set up a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Connect or listen.
    pub mode: Mode,
    /// This host's address on the replication network (`repl_addr=`).
    pub addr: Ipv4Cidr,
    /// The MAC of the replication NIC.
    pub mac: [u8; 6],
    /// Seed for smoltcp's initial sequence numbers and the first local port.
    pub seed: u64,
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side (FIN).
    PeerClosed,
    /// Reset by the peer, timed out, or never established.
    Lost,
    /// The secondary accepted a newer connection.
    Replaced,
    /// The caller found bytes it could not accept (the codec's error name).
    Protocol(&'static str),
    /// The caller closed it for another reason (a name).
    Local(&'static str),
}

impl CloseReason {
    /// The reason's counter name.
    pub fn name(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Lost => "lost",
            Self::Replaced => "replaced",
            Self::Protocol(name) | Self::Local(name) => name,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol(name) => write!(f, "protocol error `{name}`"),
            Self::Local(name) => write!(f, "closed locally: {name}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The connection that is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// New for every connection (1, 2, ...): a stream parser restarts when it changes.
    pub id: u32,
    /// The other end.
    pub remote: SocketAddrV4,
}

/// The link's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplCounters {
    /// Connections the primary started.
    pub connect_attempts: u64,
    /// Connections that came up (either end).
    pub connects: u64,
    /// Connections that ended, for any reason.
    pub closes: u64,
    /// Bad bytes the caller found: connections it closed with [`CloseReason::Protocol`] and
    /// streams that ended inside a message ([`ReplLink::count_error`]).
    pub errors: u64,
    /// Bytes the caller handed to [`ReplLink::send`] that were accepted.
    pub bytes_sent: u64,
    /// Bytes [`ReplLink::recv`] delivered.
    pub bytes_received: u64,
    /// Closes and errors by name, in order of first appearance.
    pub by_reason: heapless::Vec<(&'static str, u64), MAX_REASONS>,
}

impl ReplCounters {
    /// The fixed counters by name (`repl_` prefix in the metrics).
    pub fn named(&self) -> [(&'static str, u64); 6] {
        [
            ("connect_attempts", self.connect_attempts),
            ("connects", self.connects),
            ("closes", self.closes),
            ("errors", self.errors),
            ("bytes_sent", self.bytes_sent),
            ("bytes_received", self.bytes_received),
        ]
    }

    /// Closes or errors with this name so far.
    pub fn by_name(&self, reason: &str) -> u64 {
        self.by_reason.iter().find(|(name, _)| *name == reason).map_or(0, |(_, n)| *n)
    }

    fn count_close(&mut self, reason: CloseReason) {
        self.closes += 1;
        if matches!(reason, CloseReason::Protocol(_)) {
            self.errors += 1;
        }
        self.count_name(reason.name());
    }

    fn count_name(&mut self, name: &'static str) {
        if let Some(entry) = self.by_reason.iter_mut().find(|(n, _)| *n == name) {
            entry.1 += 1;
        } else if self.by_reason.push((name, 1)).is_err() {
            // More distinct names than slots: count them under one name.
            if let Some(entry) = self.by_reason.iter_mut().find(|(n, _)| *n == "other") {
                entry.1 += 1;
            } else if let Some(last) = self.by_reason.last_mut() {
                *last = ("other", last.1 + 1);
            }
        }
    }
}

impl fmt::Display for ReplCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (name, value) in self.named() {
            write!(f, "{sep}{name}={value}")?;
            sep = " ";
        }
        for (name, value) in &self.by_reason {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// One socket and what the link knows about it.
#[derive(Debug)]
struct Slot {
    handle: SocketHandle,
    /// The connection id while this socket is the link.
    active: Option<u32>,
    /// Sealed links: this connection's secure channel (handshake, then records).
    channel: Option<SecureChannel>,
    /// When its handshake began.
    since_ms: u64,
    /// Plaintext the channel authenticated, not yet read by the caller, and how much was read.
    plain: Vec<u8>,
    plain_at: usize,
}

impl Slot {
    fn new(handle: SocketHandle) -> Self {
        Self { handle, active: None, channel: None, since_ms: 0, plain: Vec::new(), plain_at: 0 }
    }

    fn forget_channel(&mut self) {
        self.channel = None;
        self.plain = Vec::new();
        self.plain_at = 0;
    }
}

/// The replication link: a smoltcp interface of its own on the `repl` NIC and its sockets.
pub struct ReplLink {
    mode: Mode,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: heapless::Vec<Slot, LISTEN_SLOTS>,
    /// The slot carrying the link, with its connection.
    current: Option<(usize, Connection)>,
    next_id: u32,
    next_local_port: u16,
    /// Primary: when to try again.
    retry_at_ms: u64,
    /// The last close, for status reports.
    last_close: Option<CloseReason>,
    counters: ReplCounters,
    /// `repl_auth=on`: the key and nonces; `None`: bytes travel as they are.
    sealing: Option<Sealing>,
    /// This host's id in the handshake (its replication address).
    host_id: u64,
    /// Raw bytes read from the socket (sealed links).
    scratch: Vec<u8>,
    /// A record being sealed.
    sealed_out: Vec<u8>,
    /// The time of the last [`Self::poll`] (for closes found by `recv`).
    now_ms: u64,
}

impl fmt::Debug for ReplLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplLink")
            .field("mode", &self.mode)
            .field("current", &self.current)
            .field("counters", &self.counters)
            .field("sealed", &self.sealing.is_some())
            .finish_non_exhaustive()
    }
}

fn new_socket() -> tcp::Socket<'static> {
    let mut socket =
        tcp::Socket::new(tcp::SocketBuffer::new(vec![0; BUFFER_BYTES]), tcp::SocketBuffer::new(vec![0; BUFFER_BYTES]));
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket.set_timeout(Some(Duration::from_millis(TIMEOUT_MS)));
    socket.set_keep_alive(Some(Duration::from_millis(KEEP_ALIVE_MS)));
    socket
}

fn to_v4(endpoint: IpEndpoint) -> SocketAddrV4 {
    match endpoint.addr {
        IpAddress::Ipv4(addr) => SocketAddrV4::new(addr, endpoint.port),
        #[allow(unreachable_patterns)]
        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, endpoint.port),
    }
}

impl ReplLink {
    /// A link on `device` with `config`; nothing is sent before the first [`Self::poll`].
    pub fn new<D: Device + ?Sized>(config: LinkConfig, device: &mut D, now_ms: u64) -> Self {
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(config.mac)));
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, device, Instant::from_millis(now_ms as i64));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.addr.addr), config.addr.prefix));
        });
        let mut sockets = SocketSet::new(vec![]);
        let mut slots = heapless::Vec::new();
        let count = match config.mode {
            Mode::Connect { .. } => 1,
            Mode::Listen { .. } => LISTEN_SLOTS,
        };
        for _ in 0..count {
            let handle = sockets.add(new_socket());
            let _ = slots.push(Slot::new(handle));
        }
        Self {
            mode: config.mode,
            iface,
            sockets,
            slots,
            current: None,
            next_id: 1,
            next_local_port: FIRST_LOCAL_PORT + (config.seed % 4096) as u16,
            retry_at_ms: now_ms,
            last_close: None,
            counters: ReplCounters::default(),
            sealing: None,
            host_id: u64::from(u32::from(config.addr.addr)),
            scratch: Vec::new(),
            sealed_out: Vec::new(),
            now_ms,
        }
    }

    /// Seals every connection from now on (`repl_auth=on`): handshake first, then records.
    pub fn set_sealing(&mut self, sealing: Sealing) {
        self.sealing = Some(sealing);
        self.scratch = vec![0; RAW_CHUNK];
        self.sealed_out = Vec::with_capacity(MAX_SEALED_RECORD + SEAL_OVERHEAD);
    }

    /// Gives up the sealing configuration (a promoted host moves it to its new link).
    pub fn take_sealing(&mut self) -> Option<Sealing> {
        self.sealing.take()
    }

    /// Whether connections are sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealing.is_some()
    }

    /// Which end this is.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The connection that is up, if any.
    pub fn connection(&self) -> Option<Connection> {
        self.current.map(|(_, c)| c)
    }

    /// Why the last connection ended.
    pub fn last_close(&self) -> Option<CloseReason> {
        self.last_close
    }

    /// The counters.
    pub fn counters(&self) -> &ReplCounters {
        &self.counters
    }

    /// One round of work: receive everything the NIC holds, then send while segments leave
    /// (bounded), and open, accept, replace or retire connections.
    pub fn poll<D: Device + ?Sized>(&mut self, now_ms: u64, device: &mut D) {
        self.now_ms = now_ms;
        let now = Instant::from_millis(now_ms as i64);
        self.manage(now_ms);
        for _ in 0..MAX_POLL_ROUNDS {
            let result = self.iface.poll(now, device, &mut self.sockets);
            self.manage(now_ms);
            if result == PollResult::None {
                break;
            }
        }
    }

    /// When [`Self::poll`] should run next at the latest (`None`: only when frames arrive).
    pub fn poll_at_ms(&mut self, now_ms: u64) -> Option<u64> {
        let socket_at = self.iface.poll_at(Instant::from_millis(now_ms as i64), &self.sockets);
        let socket_at = socket_at.map(|at| at.total_millis().max(0) as u64);
        let retry_at = match self.mode {
            Mode::Connect { .. } if self.current.is_none() => Some(self.retry_at_ms),
            _ => None,
        };
        match (socket_at, retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes [`Self::send`] would accept now (0 while no connection is up).
    pub fn send_capacity(&self) -> usize {
        match self.current {
            Some((slot, _)) => {
                let socket = self.sockets.get::<tcp::Socket>(self.slots[slot].handle);
                if !socket.may_send() {
                    0
                } else if self.sealing.is_some() {
                    (socket.send_capacity() - socket.send_queue()).saturating_sub(SEAL_OVERHEAD).min(MAX_SEALED_RECORD)
                } else {
                    socket.send_capacity() - socket.send_queue()
                }
            }
            None => 0,
        }
    }

    /// Bytes sent but not yet acknowledged by the peer (0 while no connection is up).
    pub fn unacked(&self) -> usize {
        self.current.map_or(0, |(slot, _)| self.sockets.get::<tcp::Socket>(self.slots[slot].handle).send_queue())
    }

    /// Queues as much of `data` as fits; returns how much (0 while no connection is up). The
    /// caller keeps the rest and offers it again after a [`Self::poll`]. Sealed: what it takes
    /// (at most [`Self::send_capacity`]) goes out as one record that fits the socket whole.
    pub fn send(&mut self, data: &[u8]) -> usize {
        let Some((slot, _)) = self.current else { return 0 };
        if self.sealing.is_none() {
            let socket = self.sockets.get_mut::<tcp::Socket>(self.slots[slot].handle);
            if !socket.may_send() {
                return 0;
            }
            let n = socket.send_slice(data).unwrap_or(0);
            self.counters.bytes_sent += n as u64;
            return n;
        }
        let take = data.len().min(self.send_capacity());
        if take == 0 {
            return 0;
        }
        let Self { slots, sockets, sealed_out, counters, .. } = self;
        let Some(channel) = slots[slot].channel.as_mut() else { return 0 };
        sealed_out.clear();
        if let Err(e) = channel.seal(&data[..take], sealed_out) {
            log::warn!("repl: sealing a record: {e}");
            let now = self.now_ms;
            self.close(CloseReason::Local(e.counter_name()), now);
            return 0;
        }
        let socket = sockets.get_mut::<tcp::Socket>(slots[slot].handle);
        let n = socket.send_slice(sealed_out).unwrap_or(0);
        debug_assert_eq!(n, sealed_out.len(), "a record sized to the free space fits whole");
        counters.bytes_sent += take as u64;
        take
    }

    /// Reads received bytes into `buf`; returns how many (0 when none, or no connection is up).
    /// Sealed: only plaintext of records that authenticated; a record that does not closes the
    /// connection (counted by name) and nothing more of it is delivered.
    pub fn recv(&mut self, buf: &mut [u8]) -> usize {
        let Some((slot, conn)) = self.current else { return 0 };
        if self.sealing.is_none() {
            let socket = self.sockets.get_mut::<tcp::Socket>(self.slots[slot].handle);
            if !socket.can_recv() {
                return 0;
            }
            let n = socket.recv_slice(buf).unwrap_or(0);
            self.counters.bytes_received += n as u64;
            return n;
        }
        loop {
            let Self { slots, sockets, scratch, counters, .. } = self;
            let s = &mut slots[slot];
            if s.plain_at < s.plain.len() {
                let n = (s.plain.len() - s.plain_at).min(buf.len());
                buf[..n].copy_from_slice(&s.plain[s.plain_at..s.plain_at + n]);
                s.plain_at += n;
                if s.plain_at == s.plain.len() {
                    s.plain.clear();
                    s.plain_at = 0;
                }
                counters.bytes_received += n as u64;
                return n;
            }
            let socket = sockets.get_mut::<tcp::Socket>(s.handle);
            if !socket.can_recv() {
                return 0;
            }
            let n = socket.recv_slice(scratch).unwrap_or(0);
            if n == 0 {
                return 0;
            }
            let Some(channel) = s.channel.as_mut() else { return 0 };
            let plain = &mut s.plain;
            if let Err(e) = channel.receive(&scratch[..n], |p| plain.extend_from_slice(p)) {
                // Whatever came with the bad record is dropped with the connection.
                s.plain.clear();
                s.plain_at = 0;
                log::warn!("repl: record from {} refused: {e}", conn.remote);
                let now = self.now_ms;
                self.close(CloseReason::Protocol(e.counter_name()), now);
                return 0;
            }
        }
    }

    /// Counts bad bytes named `name` that did not lead to [`Self::close`] (a stream that ended
    /// inside a message).
    pub fn count_error(&mut self, name: &'static str) {
        self.counters.errors += 1;
        self.counters.count_name(name);
    }

    /// Ends the current connection at once (reset; unread bytes are discarded) and counts
    /// `reason`. The primary connects again after [`RECONNECT_MS`]; the secondary keeps listening.
    pub fn close(&mut self, reason: CloseReason, now_ms: u64) {
        if let Some((slot, _)) = self.current {
            self.retire(slot, reason, now_ms);
        }
    }

    /// Drops the connection in `slot` (the current one) with `reason`.
    fn retire(&mut self, slot: usize, reason: CloseReason, now_ms: u64) {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.slots[slot].handle);
        socket.abort();
        if let Some(conn) = self.slots[slot].active.take() {
            // A sealed stream that ended inside a record was cut short.
            let partial = self.slots[slot].channel.as_ref().map_or(0, SecureChannel::partial_bytes);
            if partial > 0 && matches!(reason, CloseReason::PeerClosed | CloseReason::Lost) {
                self.count_error("seal_truncated");
                log::warn!("repl: connection {conn} ended inside a sealed record ({partial} bytes of it received)");
            }
            self.counters.count_close(reason);
            self.last_close = Some(reason);
            log::info!("repl: connection {conn} closed: {reason}; {}", self.counters);
        }
        self.slots[slot].forget_channel();
        if self.current.is_some_and(|(s, _)| s == slot) {
            self.current = None;
        }
        self.retry_at_ms = now_ms + RECONNECT_MS;
    }

    /// Opens, accepts, replaces and retires connections after the sockets moved.
    fn manage(&mut self, now_ms: u64) {
        // The current connection ended?
        if let Some((slot, _)) = self.current {
            let state = self.sockets.get::<tcp::Socket>(self.slots[slot].handle).state();
            let reason = match state {
                tcp::State::Established | tcp::State::FinWait1 | tcp::State::FinWait2 => None,
                // What arrived before the FIN is read first.
                tcp::State::CloseWait if self.sockets.get::<tcp::Socket>(self.slots[slot].handle).recv_queue() > 0 => {
                    None
                }
                tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait => {
                    Some(CloseReason::PeerClosed)
                }
                _ => Some(CloseReason::Lost),
            };
            if let Some(reason) = reason {
                self.retire(slot, reason, now_ms);
            }
        }
        match self.mode {
            Mode::Connect { peer } => self.manage_connect(peer, now_ms),
            Mode::Listen { port } => self.manage_listen(port, now_ms),
        }
    }

    fn manage_connect(&mut self, peer: SocketAddrV4, now_ms: u64) {
        let handle = self.slots[0].handle;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let arrived = socket.state() == tcp::State::Established
            || (socket.state() == tcp::State::CloseWait && socket.recv_queue() > 0);
        if self.current.is_none() && self.slots[0].channel.is_some() && !arrived {
            self.fail_handshake(0, HandshakeEnd::Incomplete, now_ms);
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match socket.state() {
            tcp::State::Established if self.current.is_none() => {
                let remote = socket.remote_endpoint().map_or(peer, to_v4);
                if self.handshake(0, now_ms) {
                    self.activate(0, remote);
                }
            }
            tcp::State::Closed if now_ms >= self.retry_at_ms && socket.local_endpoint().is_none() => {
                let local_port = self.next_local_port;
                self.next_local_port = if local_port >= 65_000 { FIRST_LOCAL_PORT } else { local_port + 1 };
                self.retry_at_ms = now_ms + RECONNECT_MS;
                let remote = (IpAddress::Ipv4(*peer.ip()), peer.port());
                match socket.connect(self.iface.context(), remote, local_port) {
                    Ok(()) => self.counters.connect_attempts += 1,
                    Err(e) => log::warn!("repl: connect to {peer}: {e:?}"),
                }
            }
            _ => {}
        }
    }

    fn manage_listen(&mut self, port: u16, now_ms: u64) {
        for slot in 0..self.slots.len() {
            let socket = self.sockets.get_mut::<tcp::Socket>(self.slots[slot].handle);
            // An aborted socket keeps its endpoints until its RST has left: listen after that.
            if !socket.is_open() && socket.local_endpoint().is_none() {
                if self.slots[slot].channel.is_some() {
                    // Its handshake never finished (the peer reset it).
                    self.fail_handshake(slot, HandshakeEnd::Incomplete, now_ms);
                }
                let socket = self.sockets.get_mut::<tcp::Socket>(self.slots[slot].handle);
                if let Err(e) = socket.listen(port) {
                    log::warn!("repl: listen on port {port}: {e:?}");
                }
                continue;
            }
            // A peer may send and close (FIN) before this loop first sees its connection: what
            // it sent is still read and judged.
            let arrived = matches!(socket.state(), tcp::State::Established)
                || (socket.state() == tcp::State::CloseWait && socket.recv_queue() > 0);
            if arrived && self.slots[slot].active.is_none() {
                let remote = socket.remote_endpoint().map(to_v4);
                // Sealed: a newcomer replaces the link only once it proved the cluster key.
                if self.handshake(slot, now_ms) {
                    if let Some((old, _)) = self.current {
                        self.retire(old, CloseReason::Replaced, now_ms);
                    }
                    self.activate(slot, remote.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
                }
            } else if self.slots[slot].active.is_none()
                && !matches!(socket.state(), tcp::State::Listen | tcp::State::SynReceived)
            {
                // A connection that ended before it became the link.
                if self.slots[slot].channel.is_some() {
                    self.fail_handshake(slot, HandshakeEnd::Incomplete, now_ms);
                } else {
                    socket.abort();
                }
            }
        }
    }

    /// Moves the handshake of the new connection in `slot` on; true once the link may use it
    /// (at once when connections are not sealed). A failed handshake drops the connection.
    fn handshake(&mut self, slot: usize, now_ms: u64) -> bool {
        let Some(sealing) = self.sealing.as_mut() else { return true };
        let Self { slots, sockets, .. } = self;
        let s = &mut slots[slot];
        if s.channel.is_none() {
            let role = match self.mode {
                Mode::Connect { .. } => SealRole::Initiator,
                Mode::Listen { .. } => SealRole::Responder,
            };
            s.channel = Some(SecureChannel::new(role, sealing.key.clone(), self.host_id, (sealing.nonces)()));
            s.since_ms = now_ms;
            s.plain.clear();
            s.plain_at = 0;
        }
        let socket = sockets.get_mut::<tcp::Socket>(s.handle);
        let channel = s.channel.as_mut().expect("just made");
        let result = loop {
            let out = channel.take_outgoing();
            if !out.is_empty() && socket.send_slice(&out) != Ok(out.len()) {
                // A new socket's buffer holds every handshake message; this cannot happen.
                break Err(HandshakeEnd::Incomplete);
            }
            if channel.is_established() {
                break Ok(true);
            }
            let mut raw = [0u8; HANDSHAKE_READ];
            let n = if socket.can_recv() { socket.recv_slice(&mut raw).unwrap_or(0) } else { 0 };
            if n == 0 {
                break if now_ms.saturating_sub(s.since_ms) > HANDSHAKE_TIMEOUT_MS {
                    Err(HandshakeEnd::Timeout)
                } else {
                    Ok(false)
                };
            }
            // Records right behind the last handshake message are kept for `recv`.
            let plain = &mut s.plain;
            if let Err(e) = channel.receive(&raw[..n], |p| plain.extend_from_slice(p)) {
                break Err(HandshakeEnd::Refused(e));
            }
        };
        match result {
            Ok(done) => done,
            Err(end) => {
                self.fail_handshake(slot, end, now_ms);
                false
            }
        }
    }

    /// Drops the new connection in `slot` whose handshake failed, counting why by name; the log
    /// names the peer's address (never the key).
    fn fail_handshake(&mut self, slot: usize, end: HandshakeEnd, now_ms: u64) {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.slots[slot].handle);
        let remote = socket.remote_endpoint().map(to_v4);
        socket.abort();
        self.slots[slot].forget_channel();
        let name = end.name();
        self.count_error(name);
        let detail = match &end {
            HandshakeEnd::Refused(e) => alloc::format!("{e}"),
            HandshakeEnd::Timeout => alloc::format!("no proof of the cluster key within {HANDSHAKE_TIMEOUT_MS} ms"),
            HandshakeEnd::Incomplete => "the connection ended before the handshake did".into(),
        };
        match remote {
            Some(remote) => log::warn!("repl: handshake with {remote} failed: `{name}`: {detail}; {}", self.counters),
            None => log::warn!("repl: handshake with an unknown peer failed: `{name}`: {detail}; {}", self.counters),
        }
        if matches!(self.mode, Mode::Connect { .. }) {
            self.retry_at_ms = now_ms + RECONNECT_MS;
        }
    }

    fn activate(&mut self, slot: usize, remote: SocketAddrV4) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.slots[slot].active = Some(id);
        let connection = Connection { id, remote };
        self.current = Some((slot, connection));
        self.counters.connects += 1;
        log::info!("repl: connection {id} up with {remote}");
    }
}

/// The bare-metal side: the e1000 with the `repl` role alone as the link's smoltcp device.
#[cfg(feature = "bare-metal")]
pub mod nic {
    use alloc::vec::Vec;
    use core::fmt;

    use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
    use smoltcp::time::Instant;

    use super::{LinkConfig, Mode, ReplLink, Sealing};
    use crate::config::{Config, Role};
    use crate::host::time;
    use crate::net::e1000::{TxError, E1000, MAX_FRAME};
    use crate::seal::ClusterKey;
    use crate::stats;

    /// Why the link could not start.
    #[derive(Debug)]
    pub enum ReplError {
        /// `role=standalone` has no link.
        NotReplicating,
        /// Networking did not find (or already gave away) a NIC whose only role is `repl`.
        NoReplNic,
        /// `repl_addr=` or `peer_addr=` is missing (the config parser normally refuses that).
        Unaddressed,
        /// `repl_auth=on` without a `cluster-key` module.
        NoClusterKey,
    }

    /// The name of the module holding the cluster key.
    pub const CLUSTER_KEY_MODULE: &str = "cluster-key";

    /// The cluster key read at boot, until the link takes it.
    static CLUSTER_KEY: spin::Mutex<Option<ClusterKey>> = spin::Mutex::new(None);

    /// Hands the cluster key (from the `cluster-key` module) to the link started later.
    pub fn install_cluster_key(key: ClusterKey) {
        *CLUSTER_KEY.lock() = Some(key);
    }

    /// The loud warning of `repl_auth=off`.
    pub fn warn_unsealed() {
        for _ in 0..3 {
            log::warn!(
                "repl: !!! repl_auth=off: the replication link is NEITHER AUTHENTICATED NOR ENCRYPTED: anyone on \
                 the replication network can read guest memory and inject checkpoints. For benchmarks only !!!"
            );
        }
    }

    impl fmt::Display for ReplError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::NotReplicating => write!(f, "role=standalone has no replication link"),
                Self::NoReplNic => write!(
                    f,
                    "no e1000 NIC with the repl role alone (nics=... e.g. mgmt+client,repl, and as many e1000 NICs on the PCI bus)"
                ),
                Self::Unaddressed => write!(f, "the replication link needs repl_addr= and peer_addr="),
                Self::NoClusterKey => write!(
                    f,
                    "repl_auth=on (the default) needs a `{CLUSTER_KEY_MODULE}` module of 32 random bytes \
                     (`cargo xtask image` and `cargo xtask cluster start` write one); repl_auth=off only for benchmarks"
                ),
            }
        }
    }

    /// The e1000 of the replication network.
    pub struct ReplNic {
        dev: E1000,
        index: usize,
    }

    impl fmt::Debug for ReplNic {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ReplNic").field("index", &self.index).finish_non_exhaustive()
        }
    }

    /// The link and its NIC, as the node driver holds them.
    #[derive(Debug)]
    pub struct ReplPort {
        /// The transport.
        pub link: ReplLink,
        nic: ReplNic,
        /// When the NIC's link state is next copied to the registry.
        link_state_at: u64,
    }

    /// How often the `repl` NIC's link state is read, ms.
    const LINK_STATE_MS: u64 = 100;

    impl ReplPort {
        /// Takes the `repl` NIC from the network stack and starts the link for `config`'s role.
        pub fn bring_up(config: &Config) -> Result<Self, ReplError> {
            let mode = match config.role {
                Role::Primary => Mode::Connect { peer: config.peer_addr.ok_or(ReplError::Unaddressed)? },
                Role::Secondary => Mode::Listen { port: config.repl_port },
                Role::Standalone => return Err(ReplError::NotReplicating),
            };
            let addr = config.repl_addr.ok_or(ReplError::Unaddressed)?;
            let (index, dev) = crate::net::take_repl_nic().ok_or(ReplError::NoReplNic)?;
            let mac = dev.mac();
            let mut nic = ReplNic { dev, index };
            let mut link = ReplLink::new(LinkConfig { mode, addr, mac, seed: time::rdtsc() }, &mut nic, time::now_ms());
            if config.repl_auth {
                let key = CLUSTER_KEY.lock().take().ok_or(ReplError::NoClusterKey)?;
                link.set_sealing(Sealing { key, nonces: alloc::boxed::Box::new(crate::host::random::nonce) });
                log::info!(
                    "repl: repl_auth=on: each connection proves the cluster key (HMAC-SHA256 handshake), then every \
                     message is sealed (ChaCha20-Poly1305)"
                );
            } else {
                warn_unsealed();
            }
            stats::with(|s| s.repl_auth = Some(config.repl_auth));
            match mode {
                Mode::Connect { peer } => {
                    log::info!("repl: {}/{} on nic{index}, connecting to {peer}", addr.addr, addr.prefix)
                }
                Mode::Listen { port } => {
                    log::info!("repl: {}/{} on nic{index}, listening on TCP port {port}", addr.addr, addr.prefix)
                }
            }
            Ok(Self { link, nic, link_state_at: 0 })
        }

        /// Promotion: this host is the primary now; the link connects to `peer` (a new
        /// secondary) and keeps reconnecting. Any connection is dropped.
        pub fn become_primary(&mut self, peer: core::net::SocketAddrV4, addr: crate::config::Ipv4Cidr) {
            let mac = self.nic.dev.mac();
            let mode = Mode::Connect { peer };
            // The new link keeps the cluster key: the joining secondary expects a sealed link.
            let sealing = self.link.take_sealing();
            self.link =
                ReplLink::new(LinkConfig { mode, addr, mac, seed: time::rdtsc() }, &mut self.nic, time::now_ms());
            if let Some(sealing) = sealing {
                self.link.set_sealing(sealing);
            }
            log::info!("repl: promoted: {}/{} now connects to {peer}", addr.addr, addr.prefix);
        }

        /// One round of link work at the current time. The NIC's link state (a register read,
        /// an exit to the device model under emulation) goes to the registry at most every
        /// [`LINK_STATE_MS`], not at every round: the driver polls many times per millisecond.
        pub fn poll(&mut self) {
            let now = time::now_ms();
            self.link.poll(now, &mut self.nic);
            if now >= self.link_state_at {
                self.link_state_at = now + LINK_STATE_MS;
                let up = self.nic.dev.link_up();
                stats::with(|s| s.nic_mut(self.nic.index).link_up = up);
            }
        }
    }

    /// A received frame for smoltcp.
    #[derive(Debug)]
    pub struct RxBuf(Vec<u8>);

    impl phy::RxToken for RxBuf {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    /// Permission to send one frame.
    #[derive(Debug)]
    pub struct TxSlot<'a>(&'a mut ReplNic);

    impl phy::TxToken for TxSlot<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let index = self.0.index;
            let mut f = Some(f);
            match self.0.dev.transmit(len, |buf| (f.take().expect("called once"))(buf)) {
                Ok(r) => {
                    stats::with(|s| {
                        let c = &mut s.nic_mut(index).counters;
                        c.tx_frames += 1;
                        c.tx_bytes += len as u64;
                    });
                    r
                }
                Err(err) => {
                    stats::with(|s| {
                        let c = &mut s.nic_mut(index).counters;
                        match err {
                            TxError::RingFull => c.tx_dropped += 1,
                            TxError::BadLength { .. } => c.tx_errors += 1,
                        }
                    });
                    // Not sent; smoltcp still needs its result (TCP retransmits).
                    let mut scratch = alloc::vec![0u8; len.min(MAX_FRAME * 2)];
                    (f.take().expect("not called yet"))(&mut scratch)
                }
            }
        }
    }

    impl Device for ReplNic {
        type RxToken<'a>
            = RxBuf
        where
            Self: 'a;
        type TxToken<'a>
            = TxSlot<'a>
        where
            Self: 'a;

        fn receive(&mut self, _timestamp: Instant) -> Option<(RxBuf, TxSlot<'_>)> {
            let index = self.index;
            // Skip (bounded) over frames the NIC flagged; smoltcp checks the rest.
            for _ in 0..64 {
                let frame = self.dev.receive(|result| {
                    let frame = result.ok().map(<[u8]>::to_vec);
                    stats::with(|s| {
                        let c = &mut s.nic_mut(index).counters;
                        match &frame {
                            Some(f) => {
                                c.rx_frames += 1;
                                c.rx_bytes += f.len() as u64;
                            }
                            None => c.rx_errors += 1,
                        }
                    });
                    frame
                })?;
                if let Some(frame) = frame {
                    return Some((RxBuf(frame), TxSlot(self)));
                }
            }
            None
        }

        fn transmit(&mut self, _timestamp: Instant) -> Option<TxSlot<'_>> {
            self.dev.can_transmit().then_some(TxSlot(self))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            caps.max_burst_size = Some(32);
            caps
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::VecDeque;
    use alloc::vec::Vec;
    use smoltcp::phy::{self, DeviceCapabilities, Medium};

    /// Frames in flight between two ends of an in-memory Ethernet wire.
    #[derive(Default)]
    struct Wire {
        a_to_b: VecDeque<Vec<u8>>,
        b_to_a: VecDeque<Vec<u8>>,
        /// Frames each direction may hold (a NIC ring); beyond it frames are dropped.
        limit: usize,
        dropped: usize,
        /// Every frame sent, both ways, when set.
        capture: Option<Vec<u8>>,
    }

    struct End<'a> {
        rx: &'a mut VecDeque<Vec<u8>>,
        tx: &'a mut VecDeque<Vec<u8>>,
        limit: usize,
        dropped: &'a mut usize,
        capture: &'a mut Option<Vec<u8>>,
    }

    struct Rx(Vec<u8>);
    struct Tx<'a> {
        queue: &'a mut VecDeque<Vec<u8>>,
        limit: usize,
        dropped: &'a mut usize,
        capture: &'a mut Option<Vec<u8>>,
    }

    impl phy::RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    impl phy::TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut buf = vec![0; len];
            let r = f(&mut buf);
            if let Some(capture) = self.capture.as_mut() {
                capture.extend_from_slice(&buf);
            }
            if self.queue.len() < self.limit {
                self.queue.push_back(buf);
            } else {
                *self.dropped += 1;
            }
            r
        }
    }

    impl Device for End<'_> {
        type RxToken<'a>
            = Rx
        where
            Self: 'a;
        type TxToken<'a>
            = Tx<'a>
        where
            Self: 'a;

        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            let frame = self.rx.pop_front()?;
            Some((Rx(frame), Tx { queue: self.tx, limit: self.limit, dropped: self.dropped, capture: self.capture }))
        }

        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx { queue: self.tx, limit: self.limit, dropped: self.dropped, capture: self.capture })
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            caps
        }
    }

    impl Wire {
        fn a(&mut self) -> End<'_> {
            End {
                rx: &mut self.b_to_a,
                tx: &mut self.a_to_b,
                limit: self.limit,
                dropped: &mut self.dropped,
                capture: &mut self.capture,
            }
        }
        fn b(&mut self) -> End<'_> {
            End {
                rx: &mut self.a_to_b,
                tx: &mut self.b_to_a,
                limit: self.limit,
                dropped: &mut self.dropped,
                capture: &mut self.capture,
            }
        }
    }

    const PRIMARY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
    const SECONDARY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
    const PORT: u16 = 7000;

    struct Pair {
        wire: Wire,
        primary: ReplLink,
        secondary: ReplLink,
        now: u64,
    }

    /// Nonces from a counter (the tests need fresh ones per connection, not secret ones).
    fn sealing(key: u8, salt: u8) -> Sealing {
        let mut n = 0u8;
        Sealing {
            key: ClusterKey::from_bytes(&[key; 32]).unwrap(),
            nonces: Box::new(move || {
                n = n.wrapping_add(1);
                let mut nonce = [salt; NONCE_LEN];
                nonce[0] = n;
                nonce
            }),
        }
    }

    impl Pair {
        /// A pair whose links are sealed with these cluster keys (`None`: not sealed).
        fn sealed(limit: usize, primary_key: Option<u8>, secondary_key: Option<u8>) -> Self {
            let mut pair = Self::new(limit);
            if let Some(k) = primary_key {
                pair.primary.set_sealing(sealing(k, 0xA1));
            }
            if let Some(k) = secondary_key {
                pair.secondary.set_sealing(sealing(k, 0xB2));
            }
            pair
        }

        fn new(limit: usize) -> Self {
            let mut wire = Wire { limit, ..Wire::default() };
            let primary = ReplLink::new(
                LinkConfig {
                    mode: Mode::Connect { peer: SocketAddrV4::new(SECONDARY, PORT) },
                    addr: Ipv4Cidr { addr: PRIMARY, prefix: 24 },
                    mac: [0x52, 0x54, 0, 0x99, 0, 1],
                    seed: 1,
                },
                &mut wire.a(),
                0,
            );
            let secondary = ReplLink::new(
                LinkConfig {
                    mode: Mode::Listen { port: PORT },
                    addr: Ipv4Cidr { addr: SECONDARY, prefix: 24 },
                    mac: [0x52, 0x54, 0, 0x99, 0, 2],
                    seed: 2,
                },
                &mut wire.b(),
                0,
            );
            Self { wire, primary, secondary, now: 0 }
        }

        /// One millisecond of both hosts' loops.
        fn step(&mut self) {
            self.now += 1;
            self.primary.poll(self.now, &mut self.wire.a());
            self.secondary.poll(self.now, &mut self.wire.b());
        }

        fn run_until(&mut self, ms: u64, mut done: impl FnMut(&mut Self) -> bool) {
            for _ in 0..ms {
                if done(self) {
                    return;
                }
                self.step();
            }
            assert!(done(self), "not reached within {ms} ms: {:?} {:?}", self.primary, self.secondary);
        }

        fn connected(&mut self) {
            self.run_until(2_000, |p| p.primary.connection().is_some() && p.secondary.connection().is_some());
        }
    }

    /// Sends `data` from `from` to `to` through the link, both directions interleaved with the
    /// loops; returns what arrived.
    fn transfer(pair: &mut Pair, data: &[u8], primary_sends: bool, max_ms: u64) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7_000];
        for _ in 0..max_ms {
            let (tx, rx) = if primary_sends {
                (&mut pair.primary, &mut pair.secondary)
            } else {
                (&mut pair.secondary, &mut pair.primary)
            };
            if sent < data.len() {
                let n = tx.send(&data[sent..]);
                assert!(n <= BUFFER_BYTES);
                sent += n;
            }
            loop {
                let n = rx.recv(&mut buf);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if got.len() == data.len() {
                break;
            }
            pair.step();
        }
        got
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 9) as u8).collect()
    }

    #[test]
    fn primary_connects_and_bulk_bytes_flow_both_ways() {
        let mut pair = Pair::new(usize::MAX);
        pair.connected();
        assert_eq!(pair.primary.connection().unwrap().remote, SocketAddrV4::new(SECONDARY, PORT));
        assert_eq!(*pair.secondary.connection().unwrap().remote.ip(), PRIMARY);
        // More than the socket buffers in each direction: backpressure, then everything arrives.
        let down = pattern(3 * BUFFER_BYTES + 12_345, 7);
        assert_eq!(transfer(&mut pair, &down, true, 20_000), down);
        let up = pattern(BUFFER_BYTES + 999, 3);
        assert_eq!(transfer(&mut pair, &up, false, 20_000), up);
        let c = pair.primary.counters();
        assert_eq!((c.connects, c.closes, c.errors), (1, 0, 0));
        assert_eq!(c.bytes_sent, down.len() as u64);
        assert_eq!(c.bytes_received, up.len() as u64);
        assert_eq!(pair.secondary.counters().bytes_received, down.len() as u64);
    }

    #[test]
    fn send_takes_only_what_fits() {
        let mut pair = Pair::new(usize::MAX);
        pair.connected();
        let big = pattern(4 * BUFFER_BYTES, 1);
        let first = pair.primary.send(&big);
        assert_eq!(first, BUFFER_BYTES, "the first send fills the send buffer exactly");
        assert_eq!(pair.primary.send_capacity(), 0);
        assert_eq!(pair.primary.send(&big[first..]), 0, "nothing more fits until the peer acknowledges");
        // Without anyone reading on the secondary, the window closes: at most both buffers hold.
        for _ in 0..2_000 {
            pair.step();
            pair.primary.send(&big[first..first + 1]);
        }
        assert!(pair.primary.counters().bytes_sent <= 2 * BUFFER_BYTES as u64 + 1);
    }

    #[test]
    fn bulk_transfer_survives_a_small_nic_ring() {
        // A receive ring of 64 frames between the hosts: bursts beyond it are dropped and smoltcp
        // recovers them by retransmission.
        let mut pair = Pair::new(64);
        pair.connected();
        let data = pattern(2 * BUFFER_BYTES, 9);
        assert_eq!(transfer(&mut pair, &data, true, 60_000), data);
    }

    #[test]
    fn no_bytes_before_a_connection_and_none_after_close() {
        let mut pair = Pair::new(usize::MAX);
        assert_eq!(pair.primary.send(b"early"), 0);
        assert_eq!(pair.primary.send_capacity(), 0);
        pair.connected();
        assert_eq!(pair.primary.send(b"hello"), 5);
        pair.run_until(100, |p| {
            p.secondary
                .sockets
                .get::<tcp::Socket>(p.secondary.slots[p.secondary.current.unwrap().0].handle)
                .recv_queue()
                == 5
        });
        let first = pair.secondary.connection().unwrap().id;
        pair.secondary.close(CloseReason::Protocol("bad_magic"), pair.now);
        assert!(pair.secondary.connection().is_none());
        // The primary learns it from the reset at once (not from a keep-alive timeout).
        pair.run_until(50, |p| p.primary.counters().by_name("lost") == 1);
        let mut buf = [0u8; 16];
        assert_eq!(pair.secondary.recv(&mut buf), 0, "bytes of a closed connection are never delivered");
        assert_eq!(pair.secondary.counters().errors, 1);
        assert_eq!(pair.secondary.counters().by_name("bad_magic"), 1);
        assert_eq!(pair.secondary.last_close(), Some(CloseReason::Protocol("bad_magic")));
        // The primary sees the reset and connects again; the new connection has a new id.
        pair.run_until(5_000, |p| p.secondary.connection().is_some_and(|c| c.id != first));
        pair.run_until(100, |p| p.primary.connection().is_some());
        assert_eq!(pair.primary.counters().connects, 2);
        assert_eq!(pair.primary.counters().by_name("lost"), 1);
        assert_eq!(transfer(&mut pair, b"again", true, 1_000), b"again");
    }

    #[test]
    fn peer_fin_ends_the_connection() {
        let mut pair = Pair::new(usize::MAX);
        pair.connected();
        let (slot, _) = pair.primary.current.unwrap();
        pair.primary.sockets.get_mut::<tcp::Socket>(pair.primary.slots[slot].handle).close();
        pair.run_until(1_000, |p| p.secondary.connection().is_none());
        assert_eq!(pair.secondary.counters().by_name("peer_closed"), 1);
        pair.run_until(5_000, |p| p.primary.connection().is_some() && p.secondary.connection().is_some());
    }

    #[test]
    fn bytes_before_a_fin_are_delivered_before_the_close() {
        let mut pair = Pair::new(usize::MAX);
        pair.connected();
        assert_eq!(pair.primary.send(b"half a message"), 14);
        let (slot, _) = pair.primary.current.unwrap();
        pair.primary.sockets.get_mut::<tcp::Socket>(pair.primary.slots[slot].handle).close();
        // Nobody reads on the secondary for a while: the connection stays until the bytes are read.
        for _ in 0..200 {
            pair.step();
        }
        assert!(pair.secondary.connection().is_some(), "retired before its bytes were read");
        let mut buf = [0u8; 64];
        assert_eq!(pair.secondary.recv(&mut buf), 14);
        assert_eq!(&buf[..14], b"half a message");
        pair.step();
        assert!(pair.secondary.connection().is_none());
        pair.secondary.count_error("truncated");
        let c = pair.secondary.counters();
        assert_eq!((c.errors, c.by_name("truncated"), c.by_name("peer_closed")), (1, 1, 1));
    }

    #[test]
    fn a_connection_that_sends_and_closes_at_once_is_still_read() {
        let mut pair = Pair::new(usize::MAX);
        // Handshake, but the secondary does not look again once the primary is established: the
        // primary's ACK, data and FIN then arrive in one secondary poll (state CloseWait).
        for _ in 0..100 {
            pair.now += 1;
            pair.primary.poll(pair.now, &mut pair.wire.a());
            if pair.primary.connection().is_some() {
                break;
            }
            pair.secondary.poll(pair.now, &mut pair.wire.b());
        }
        assert!(pair.primary.connection().is_some() && pair.secondary.connection().is_none());
        assert_eq!(pair.primary.send(b"garbage"), 7);
        let (slot, _) = pair.primary.current.unwrap();
        pair.primary.sockets.get_mut::<tcp::Socket>(pair.primary.slots[slot].handle).close();
        pair.primary.poll(pair.now, &mut pair.wire.a());
        pair.secondary.poll(pair.now, &mut pair.wire.b());
        assert!(pair.secondary.connection().is_some(), "a connection closed with unread bytes was dropped unseen");
        let mut buf = [0u8; 16];
        assert_eq!(pair.secondary.recv(&mut buf), 7);
        assert_eq!(&buf[..7], b"garbage");
    }

    #[test]
    fn sealed_link_carries_bulk_bytes_both_ways_and_no_plaintext_on_the_wire() {
        let mut pair = Pair::sealed(usize::MAX, Some(7), Some(7));
        pair.wire.capture = Some(Vec::new());
        pair.connected();
        // More than the socket buffers: records are sized to the free space (backpressure).
        let down = pattern(3 * BUFFER_BYTES + 12_345, 7);
        assert!(pair.primary.send_capacity() <= MAX_SEALED_RECORD);
        assert_eq!(transfer(&mut pair, &down, true, 20_000), down);
        let up = pattern(BUFFER_BYTES + 999, 3);
        assert_eq!(transfer(&mut pair, &up, false, 20_000), up);
        let c = pair.primary.counters();
        assert_eq!((c.connects, c.closes, c.errors), (1, 0, 0), "{c}");
        assert_eq!(c.bytes_sent, down.len() as u64, "bytes_sent counts plaintext");
        let wire = pair.wire.capture.take().unwrap();
        assert!(wire.len() > down.len() + up.len(), "the capture holds the whole transfer");
        for needle in [&down[1000..1032], &up[5000..5032]] {
            assert!(!wire.windows(needle.len()).any(|w| w == needle), "plaintext on the wire");
        }
        // The same transfer unsealed: the scan finds the plaintext (the scan works).
        let mut plain = Pair::new(usize::MAX);
        plain.wire.capture = Some(Vec::new());
        plain.connected();
        assert_eq!(transfer(&mut plain, &down[..20_000], true, 5_000), &down[..20_000]);
        let wire = plain.wire.capture.take().unwrap();
        assert!(wire.windows(32).any(|w| w == &down[1000..1032]));
    }

    #[test]
    fn a_peer_with_another_key_never_becomes_the_link() {
        let mut pair = Pair::sealed(usize::MAX, Some(1), Some(2));
        let mut buf = [0u8; 256];
        for _ in 0..3_000 {
            pair.step();
            assert!(pair.primary.connection().is_none() && pair.secondary.connection().is_none());
            assert_eq!(pair.primary.send(b"secret"), 0);
            assert_eq!(pair.secondary.recv(&mut buf), 0);
        }
        let p = pair.primary.counters();
        let s = pair.secondary.counters();
        assert!(p.by_name("seal_wrong_key") >= 5, "the primary retries and refuses each time: {p}");
        assert!(s.by_name("seal_handshake_incomplete") >= 5, "{p} / {s}");
        assert_eq!((p.connects, s.connects, p.bytes_received, s.bytes_received), (0, 0, 0, 0));
    }

    #[test]
    fn an_unsealed_peer_is_refused_by_name_and_sends_nothing_through() {
        // The primary is not sealed (repl_auth=off, or an attacker): its bytes are not a handshake.
        let mut pair = Pair::sealed(usize::MAX, None, Some(2));
        pair.run_until(2_000, |p| p.primary.connection().is_some());
        assert_eq!(pair.primary.send(&[b'G'; 200]), 200);
        pair.run_until(2_000, |p| p.secondary.counters().by_name("seal_bad_magic") >= 1);
        let mut buf = [0u8; 256];
        assert_eq!(pair.secondary.recv(&mut buf), 0);
        assert_eq!(pair.secondary.counters().connects, 0);
        // One that connects and stays silent is dropped after the handshake timeout.
        let mut pair = Pair::sealed(usize::MAX, None, Some(2));
        pair.run_until(2_000, |p| p.primary.connection().is_some());
        pair.run_until(HANDSHAKE_TIMEOUT_MS + 500, |p| p.secondary.counters().by_name("seal_handshake_timeout") >= 1);
        assert_eq!(pair.secondary.counters().connects, 0);
    }

    #[test]
    fn a_sealed_stream_cut_inside_a_record_is_counted_as_truncated() {
        let mut pair = Pair::sealed(usize::MAX, Some(3), Some(3));
        pair.connected();
        assert_eq!(transfer(&mut pair, b"whole", true, 1_000), b"whole");
        // Half a record, straight into the socket, then FIN.
        let (slot, _) = pair.primary.current.unwrap();
        let mut record = Vec::new();
        pair.primary.slots[slot].channel.as_mut().unwrap().seal(&[9; 100], &mut record).unwrap();
        let socket = pair.primary.sockets.get_mut::<tcp::Socket>(pair.primary.slots[slot].handle);
        assert_eq!(socket.send_slice(&record[..60]), Ok(60));
        socket.close();
        let mut buf = [0u8; 256];
        pair.run_until(2_000, |p| {
            assert_eq!(p.secondary.recv(&mut buf), 0, "nothing of a cut record is delivered");
            p.secondary.counters().by_name("seal_truncated") == 1
        });
    }

    #[test]
    fn counters_name_unknown_reasons_within_a_bound() {
        let mut c = ReplCounters::default();
        let names = [
            "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u",
            "v", "w", "x", "y", "z",
        ];
        for name in names {
            c.count_close(CloseReason::Protocol(name));
        }
        assert_eq!(c.closes, names.len() as u64);
        assert_eq!(c.errors, names.len() as u64);
        assert_eq!(c.by_reason.iter().map(|(_, n)| n).sum::<u64>(), names.len() as u64);
        assert!(c.to_string().contains("errors=26"), "{c}");
    }
}
