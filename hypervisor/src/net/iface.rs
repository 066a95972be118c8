//! The hypervisor's network stack: every e1000 found, in PCI order, gets the roles the `nics=`
//! key gives it; the NIC with the `mgmt` role carries a smoltcp `Interface` with the management
//! address, a JSON API server on `mgmt_port` and a metrics server on `metrics_port`.
//!
//! Every received frame is classified before smoltcp sees it:
//! - unicast to a MAC the guest hook owns: handed to [`GuestForward::deliver`] (the one hook
//!   point where the COLO comparator/mirroring will sit); broadcast and multicast go to the hook
//!   too (and to the local stack);
//! - malformed (truncated Ethernet/ARP/IPv4 headers, IPv4 lengths or header checksum wrong, TCP,
//!   UDP or ICMP checksum wrong, NIC-flagged errors): counted in `rx_errors`, dropped;
//! - not for us (other unicast MAC, unknown EtherType, NICs without the mgmt role when no guest
//!   wants it): counted in `rx_dropped`;
//! - everything else goes to smoltcp (ARP, ICMP echo, TCP to the servers).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::classify::{classify, Verdict};
use super::e1000::{RxError, TxError, E1000, MAX_FRAME};
use super::{metrics, mgmt};
use crate::config::{Config, NicRoles, Role};
use crate::host::{pci, shutdown, time};
use crate::stats;

/// Concurrent JSON API connections.
const MGMT_SOCKETS: usize = 4;
/// Concurrent metrics connections.
const METRICS_SOCKETS: usize = 4;
/// A connection with no traffic for this long is reset.
const IDLE_TIMEOUT_MS: u64 = 30_000;
/// After the metrics response, how long to wait for the client to close before resetting.
const LINGER_MS: u64 = 3_000;
/// How long a `shutdown` reply may take to leave before the hypervisor exits anyway.
const SHUTDOWN_FLUSH_MS: u64 = 2_000;

/// Where frames for guests go. The guest device layer implements it; COLO puts its comparator
/// and mirroring behind it.
pub trait GuestForward: Send {
    /// Whether a guest owns unicast MAC `mac` (the frame then goes to [`Self::deliver`]).
    fn owns(&self, mac: [u8; 6]) -> bool;
    /// A frame from host NIC `nic` (with `roles`) for a guest (unicast to an owned MAC, or a
    /// broadcast/multicast frame, which the local stack sees as well).
    fn deliver(&mut self, nic: usize, roles: NicRoles, frame: &[u8]);
}

/// Why networking could not start.
#[derive(Debug)]
pub enum NetError {
    /// `nics=` names more NICs than the machine has.
    MissingNic {
        /// NICs the command line describes.
        wanted: usize,
        /// Supported NICs found on the PCI bus.
        found: usize,
    },
    /// No NIC has the `mgmt` role.
    NoMgmtNic,
    /// A NIC failed to initialise.
    Nic(super::e1000::E1000Error),
    /// Already up.
    AlreadyUp,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingNic { wanted, found } => write!(
                f,
                "nics= describes {wanted} NICs but {found} supported NIC(s) (e1000 8086:100e/100f/1004) are on the PCI bus"
            ),
            Self::NoMgmtNic => write!(f, "mgmt_addr= is set but no NIC in nics= has the mgmt role"),
            Self::Nic(e) => write!(f, "{e}"),
            Self::AlreadyUp => write!(f, "networking is already up"),
        }
    }
}

/// What [`poll`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollOutcome {
    /// Keep going.
    Running,
    /// A `shutdown` request was answered and its reply has left (or timed out).
    Shutdown,
}

struct Nic {
    dev: E1000,
    index: usize,
    roles: NicRoles,
}

struct MgmtConn {
    handle: SocketHandle,
    line: Vec<u8>,
    out: Vec<u8>,
    close_after_flush: bool,
    last_activity: u64,
}

struct MetricsConn {
    handle: SocketHandle,
    head: Vec<u8>,
    out: Vec<u8>,
    answered_at: Option<u64>,
    last_activity: u64,
}

struct NetStack {
    nics: Vec<Nic>,
    mgmt_nic: usize,
    iface: Interface,
    sockets: SocketSet<'static>,
    mgmt: Vec<MgmtConn>,
    metrics: Vec<MetricsConn>,
    mgmt_port: u16,
    metrics_port: u16,
    role: &'static str,
    hook: Option<Box<dyn GuestForward>>,
    shutdown_at: Option<u64>,
}

static NET: spin::Mutex<Option<NetStack>> = spin::Mutex::new(None);

/// The NIC whose only role is `repl`, set aside at bring-up for the replication link
/// (`net::repl`, which gives it an interface of its own): (index in `nics=`, driver).
static REPL_NIC: spin::Mutex<Option<(usize, E1000)>> = spin::Mutex::new(None);

/// Takes the NIC with the `repl` role alone, if [`bring_up`] found one (once).
pub fn take_repl_nic() -> Option<(usize, E1000)> {
    REPL_NIC.lock().take()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
        Role::Standalone => "standalone",
    }
}

fn now() -> Instant {
    Instant::from_millis(time::now_ms() as i64)
}

/// Finds the NICs, gives them their roles and starts the management endpoint. Does nothing
/// (and returns `Ok`) when `mgmt_addr=` is not set.
pub fn bring_up(config: &Config) -> Result<(), NetError> {
    let Some(addr) = config.mgmt_addr else {
        return Ok(());
    };
    let mut guard = NET.lock();
    if guard.is_some() {
        return Err(NetError::AlreadyUp);
    }
    let functions = pci::enumerate();
    for f in &functions {
        log::debug!("pci {f}");
    }
    let supported: Vec<_> = functions.iter().filter(|f| E1000::supports(f)).collect();
    log::info!("pci: {} functions, {} e1000 NIC(s)", functions.len(), supported.len());
    if supported.len() < config.nics.len() {
        return Err(NetError::MissingNic { wanted: config.nics.len(), found: supported.len() });
    }
    if !config.nics.iter().any(|r| r.mgmt) {
        return Err(NetError::NoMgmtNic);
    }
    let mut nics = Vec::new();
    for (index, (function, roles)) in supported.iter().zip(config.nics.iter()).enumerate() {
        let dev = E1000::init(function).map_err(NetError::Nic)?;
        let mac = dev.mac();
        let link = dev.link_up();
        log::info!(
            "nic{index}: e1000 at {} mac {} roles {roles} link {}",
            dev.pci(),
            mgmt::mac_string(mac),
            if link { "up" } else { "down" }
        );
        stats::with(|s| {
            let entry = s.nic_mut(index);
            entry.roles = crate::net::mgmt::format(format_args!("{roles}"));
            entry.mac = mac;
            entry.link_up = link;
        });
        if *roles == (NicRoles { repl: true, ..NicRoles::default() }) {
            *REPL_NIC.lock() = Some((index, dev));
            continue;
        }
        nics.push(Nic { dev, index, roles: *roles });
    }
    let mgmt_nic = nics.iter().position(|n| n.roles.mgmt).ok_or(NetError::NoMgmtNic)?;
    stats::with(|s| {
        s.tunables.heartbeat_ms = config.heartbeat_ms;
        s.tunables.checkpoint_ms = config.checkpoint_ms;
    });

    let mac = nics[mgmt_nic].dev.mac();
    let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    iface_config.random_seed = time::rdtsc();
    let mut hook = None;
    let mut device = NicDevice { nic: &mut nics[mgmt_nic], hook: &mut hook, local: true };
    let mut iface = Interface::new(iface_config, &mut device, now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(addr.addr), addr.prefix));
    });
    if let Some(gw) = config.mgmt_gw {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    let mut sockets = SocketSet::new(Vec::new());
    let mut mgmt_conns = Vec::new();
    for _ in 0..MGMT_SOCKETS {
        let socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 8192]), tcp::SocketBuffer::new(vec![0; 16384]));
        let handle = sockets.add(socket);
        mgmt_conns.push(MgmtConn {
            handle,
            line: Vec::new(),
            out: Vec::new(),
            close_after_flush: false,
            last_activity: 0,
        });
    }
    let mut metrics_conns = Vec::new();
    for _ in 0..METRICS_SOCKETS {
        let socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 8192]), tcp::SocketBuffer::new(vec![0; 32768]));
        let handle = sockets.add(socket);
        metrics_conns.push(MetricsConn {
            handle,
            head: Vec::new(),
            out: Vec::new(),
            answered_at: None,
            last_activity: 0,
        });
    }
    log::info!(
        "management: {}/{} on nic{mgmt_nic}, JSON API on TCP port {}, metrics on http://{}:{}/metrics",
        addr.addr,
        addr.prefix,
        config.mgmt_port,
        addr.addr,
        config.metrics_port
    );
    *guard = Some(NetStack {
        nics,
        mgmt_nic,
        iface,
        sockets,
        mgmt: mgmt_conns,
        metrics: metrics_conns,
        mgmt_port: config.mgmt_port,
        metrics_port: config.metrics_port,
        role: role_name(config.role),
        hook: None,
        shutdown_at: None,
    });
    Ok(())
}

/// Whether [`bring_up`] started networking.
pub fn is_up() -> bool {
    NET.lock().is_some()
}

/// Installs the guest forwarding hook (replacing any earlier one). Frames for guest MACs are
/// then accepted on every NIC (promiscuous receive).
pub fn set_guest_hook(hook: Box<dyn GuestForward>) {
    if let Some(net) = NET.lock().as_mut() {
        for nic in &mut net.nics {
            nic.dev.set_promiscuous(true);
        }
        net.hook = Some(hook);
    }
}

/// Removes the guest forwarding hook (the guest is gone).
pub fn clear_guest_hook() {
    if let Some(net) = NET.lock().as_mut() {
        net.hook = None;
    }
}

/// Sends a guest's frame out of the NIC with the `client` role.
pub fn send_from_guest(frame: &[u8]) -> Result<(), TxError> {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else {
        return Err(TxError::RingFull);
    };
    let Some(nic) = net.nics.iter_mut().find(|n| n.roles.client) else {
        return Err(TxError::RingFull);
    };
    transmit_counted(nic, frame.len(), |buf| buf.copy_from_slice(frame)).ok_or(TxError::RingFull)
}

/// One round of work: every NIC's receive ring, the management interface, the servers.
pub fn poll() -> PollOutcome {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else {
        return PollOutcome::Running;
    };
    net.poll()
}

/// Serves the management plane until a `shutdown` request, then ends the hypervisor with the
/// success status.
pub fn serve_until_shutdown() -> ! {
    log::info!("serving the management plane until a `shutdown` request");
    loop {
        if poll() == PollOutcome::Shutdown {
            log::info!("shutdown requested over the management API");
            shutdown::exit(shutdown::ExitStatus::Success);
        }
        core::hint::spin_loop();
    }
}

impl NetStack {
    fn poll(&mut self) -> PollOutcome {
        let now_ms = time::now_ms();
        // NICs without the local endpoint: forward or drop.
        for i in 0..self.nics.len() {
            if i != self.mgmt_nic {
                let mut device = NicDevice { nic: &mut self.nics[i], hook: &mut self.hook, local: false };
                while device.receive_one().is_some() {}
            }
        }
        let mut device = NicDevice { nic: &mut self.nics[self.mgmt_nic], hook: &mut self.hook, local: true };
        self.iface.poll(now(), &mut device, &mut self.sockets);
        let uptime_ms = now_ms;
        let mut shutdown = false;
        for conn in &mut self.mgmt {
            shutdown |= serve_mgmt(conn, &mut self.sockets, self.mgmt_port, self.role, uptime_ms);
        }
        for conn in &mut self.metrics {
            serve_metrics(conn, &mut self.sockets, self.metrics_port, self.role, uptime_ms);
        }
        // Push out what the servers just queued.
        let mut device = NicDevice { nic: &mut self.nics[self.mgmt_nic], hook: &mut self.hook, local: true };
        self.iface.poll(now(), &mut device, &mut self.sockets);
        let link = self.nics.iter().map(|n| (n.index, n.dev.link_up())).collect::<Vec<_>>();
        stats::with(|s| {
            for (index, up) in link {
                s.nic_mut(index).link_up = up;
            }
        });
        if shutdown && self.shutdown_at.is_none() {
            self.shutdown_at = Some(now_ms);
        }
        if let Some(at) = self.shutdown_at {
            let flushed = self.mgmt.iter().all(|c| {
                let s = self.sockets.get::<tcp::Socket>(c.handle);
                c.out.is_empty() && s.send_queue() == 0
            });
            if flushed || now_ms > at + SHUTDOWN_FLUSH_MS {
                return PollOutcome::Shutdown;
            }
        }
        PollOutcome::Running
    }
}

/// Serves one JSON API socket; returns true when it answered a `shutdown` request.
fn serve_mgmt(conn: &mut MgmtConn, sockets: &mut SocketSet<'_>, port: u16, role: &'static str, now_ms: u64) -> bool {
    let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
    if !socket.is_open() {
        conn.line.clear();
        conn.out.clear();
        conn.close_after_flush = false;
        conn.last_activity = now_ms;
        socket.set_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = socket.listen(port) {
            log::warn!("mgmt: listen on port {port}: {e:?}");
        }
        return false;
    }
    if !socket.is_active() {
        conn.last_activity = now_ms;
        return false;
    }
    let mut shutdown = false;
    let mut buf = [0u8; 1024];
    while !conn.close_after_flush && socket.can_recv() {
        let Ok(n) = socket.recv_slice(&mut buf) else { break };
        if n == 0 {
            break;
        }
        conn.last_activity = now_ms;
        for &byte in &buf[..n] {
            if byte == b'\n' {
                let line = core::mem::take(&mut conn.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let reply = stats::with(|s| {
                    let mut ctx = mgmt::Context { role, uptime_ms: now_ms, replication_running: false, stats: s };
                    mgmt::handle(line, &mut ctx)
                });
                conn.out.extend_from_slice(reply.text.as_bytes());
                conn.out.push(b'\n');
                match reply.action {
                    mgmt::Action::Continue => {}
                    mgmt::Action::Close => conn.close_after_flush = true,
                    mgmt::Action::Shutdown => {
                        shutdown = true;
                        conn.close_after_flush = true;
                    }
                }
                if conn.close_after_flush {
                    break;
                }
            } else if conn.line.len() > mgmt::MAX_REQUEST_BYTES {
                let err = mgmt::RequestError::TooLarge { len: conn.line.len() + 1 };
                stats::with(|s| {
                    s.mgmt.requests += 1;
                    s.mgmt.request_errors += 1;
                });
                conn.out.extend_from_slice(mgmt::error_reply(&err).as_bytes());
                conn.out.push(b'\n');
                conn.line.clear();
                conn.close_after_flush = true;
                break;
            } else {
                conn.line.push(byte);
            }
        }
    }
    if !conn.out.is_empty() && socket.can_send() {
        if let Ok(sent) = socket.send_slice(&conn.out) {
            conn.out.drain(..sent);
        }
    }
    if conn.out.is_empty() && conn.close_after_flush {
        socket.close();
    } else if peer_closed(socket) && conn.out.is_empty() {
        // The client closed its side and has every reply.
        socket.close();
    } else if now_ms > conn.last_activity + IDLE_TIMEOUT_MS {
        socket.abort();
    }
    shutdown
}

/// The client sent FIN (`may_recv` alone is also false while the handshake is under way).
fn peer_closed(socket: &tcp::Socket<'_>) -> bool {
    socket.state() == tcp::State::CloseWait
}

/// Serves one metrics socket: one request, one response, then close.
fn serve_metrics(conn: &mut MetricsConn, sockets: &mut SocketSet<'_>, port: u16, role: &str, now_ms: u64) {
    let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
    if !socket.is_open() {
        conn.head.clear();
        conn.out.clear();
        conn.answered_at = None;
        conn.last_activity = now_ms;
        socket.set_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = socket.listen(port) {
            log::warn!("metrics: listen on port {port}: {e:?}");
        }
        return;
    }
    if !socket.is_active() {
        conn.last_activity = now_ms;
        return;
    }
    let mut buf = [0u8; 1024];
    while conn.answered_at.is_none() && socket.can_recv() {
        let Ok(n) = socket.recv_slice(&mut buf) else { break };
        if n == 0 {
            break;
        }
        conn.last_activity = now_ms;
        conn.head.extend_from_slice(&buf[..n]);
        let parsed = metrics::parse_http_request(&conn.head);
        if parsed == Err(metrics::HttpError::Incomplete) {
            continue;
        }
        let (response, outcome) = metrics::respond(parsed, || stats::with(|s| metrics::render(s, role, now_ms)));
        stats::with(|s| match outcome {
            metrics::Outcome::Served => s.mgmt.scrapes += 1,
            metrics::Outcome::Refused => s.mgmt.http_errors += 1,
        });
        conn.out = response.into_bytes();
        conn.answered_at = Some(now_ms);
    }
    // Discard anything after the request head.
    if conn.answered_at.is_some() {
        while socket.can_recv() && socket.recv_slice(&mut buf).is_ok_and(|n| n > 0) {}
    }
    if !conn.out.is_empty() && socket.can_send() {
        if let Ok(sent) = socket.send_slice(&conn.out) {
            conn.out.drain(..sent);
        }
    }
    match conn.answered_at {
        // Let the client close first (no TIME-WAIT here); reset if it lingers.
        Some(at) if conn.out.is_empty() && socket.send_queue() == 0 => {
            if peer_closed(socket) {
                socket.close();
            } else if now_ms > at + LINGER_MS {
                socket.abort();
            }
        }
        Some(_) => {}
        None if peer_closed(socket) => socket.close(),
        None if now_ms > conn.last_activity + IDLE_TIMEOUT_MS => socket.abort(),
        None => {}
    }
}

/// Sends through `nic`, counting the frame; `None` when it was not sent.
fn transmit_counted<R>(nic: &mut Nic, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let index = nic.index;
    match nic.dev.transmit(len, f) {
        Ok(r) => {
            stats::with(|s| {
                let c = &mut s.nic_mut(index).counters;
                c.tx_frames += 1;
                c.tx_bytes += len as u64;
            });
            Some(r)
        }
        Err(err) => {
            stats::with(|s| {
                let c = &mut s.nic_mut(index).counters;
                match err {
                    TxError::RingFull => c.tx_dropped += 1,
                    TxError::BadLength { .. } => c.tx_errors += 1,
                }
            });
            None
        }
    }
}

/// smoltcp's view of one NIC (`local`: the NIC with the management interface).
struct NicDevice<'a> {
    nic: &'a mut Nic,
    hook: &'a mut Option<Box<dyn GuestForward>>,
    local: bool,
}

impl NicDevice<'_> {
    /// Takes one frame off the ring: `Some(Some(frame))` for the local stack, `Some(None)` when
    /// it went elsewhere or was dropped, `None` when the ring is empty.
    fn receive_one(&mut self) -> Option<Option<Vec<u8>>> {
        let index = self.nic.index;
        let roles = self.nic.roles;
        let own = EthernetAddress(self.nic.dev.mac());
        let local = self.local;
        let hook = &mut *self.hook;
        self.nic.dev.receive(|result| {
            let frame = match result {
                Ok(frame) => frame,
                Err(RxError::Flagged { .. } | RxError::Fragmented) => {
                    stats::with(|s| s.nic_mut(index).counters.rx_errors += 1);
                    return None;
                }
            };
            let verdict = match hook.as_deref() {
                Some(h) => classify(frame, own.0, Some(&|mac| h.owns(mac))),
                None => classify(frame, own.0, None),
            };
            stats::with(|s| {
                let c = &mut s.nic_mut(index).counters;
                c.rx_frames += 1;
                c.rx_bytes += frame.len() as u64;
                match verdict {
                    Verdict::Malformed => c.rx_errors += 1,
                    Verdict::Dropped => c.rx_dropped += 1,
                    Verdict::Local { also_guests: false } if !local => c.rx_dropped += 1,
                    _ => {}
                }
            });
            match verdict {
                Verdict::Guest => {
                    if let Some(h) = hook.as_mut() {
                        h.deliver(index, roles, frame);
                    }
                    None
                }
                Verdict::Local { also_guests } => {
                    if also_guests {
                        if let Some(h) = hook.as_mut() {
                            h.deliver(index, roles, frame);
                        }
                    }
                    local.then(|| frame.to_vec())
                }
                Verdict::Dropped | Verdict::Malformed => None,
            }
        })
    }
}

/// A received frame for smoltcp.
struct RxBuf(Vec<u8>);

impl phy::RxToken for RxBuf {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Permission to send one frame.
struct TxSlot<'a>(&'a mut Nic);

impl phy::TxToken for TxSlot<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        if let Some(r) = transmit_counted(self.0, len, |buf| (f.take().expect("called once"))(buf)) {
            return r;
        }
        // Not sent (ring full or bad length, already counted): smoltcp still needs its result.
        let mut scratch = vec![0u8; len.min(MAX_FRAME * 2)];
        (f.take().expect("not called yet"))(&mut scratch)
    }
}

impl Device for NicDevice<'_> {
    type RxToken<'a>
        = RxBuf
    where
        Self: 'a;
    type TxToken<'a>
        = TxSlot<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // Skip (bounded) over frames that are not for the local stack.
        for _ in 0..64 {
            match self.receive_one()? {
                Some(frame) => return Some((RxBuf(frame), TxSlot(self.nic))),
                None => continue,
            }
        }
        None
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.nic.dev.can_transmit().then_some(TxSlot(self.nic))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(32);
        caps
    }
}
