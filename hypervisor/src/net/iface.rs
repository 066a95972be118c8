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
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::auth::{Gate, MgmtToken};
use super::classify::{classify, Verdict};
use super::e1000::{RxError, TxError, E1000, MAX_FRAME};
use super::server::{choose_victim, Expiry, Limits, LineEvent, LineReader, OutBuf, Timers};
use super::{metrics, mgmt};
use crate::config::{Config, MgmtOpen, NicRoles, Role};
use crate::host::{heap, pci, shutdown, time};
use crate::stats;

/// The one idle timeout of both servers: a connection with nothing in progress and no traffic
/// for this long is closed. smoltcp's own timeout is switched off (`set_timeout(None)`), so this
/// is the only one.
const IDLE_TIMEOUT_MS: u64 = 30_000;
/// A whole request (JSON line or HTTP head) must arrive within this long of its first byte.
const REQUEST_DEADLINE_MS: u64 = 5_000;
/// Queued output that the peer does not take for this long closes the connection (`not_reading`).
const WRITE_STALL_MS: u64 = 5_000;
/// After the server closes (or answers, for HTTP), how long the peer has to close before a reset.
const LINGER_MS: u64 = 2_000;
/// A connection is evicted for a new client only after being idle (or slow) this long.
const EVICT_GRACE_MS: u64 = 1_000;
/// With a connection open, the servers' timers are checked at least this often.
const BUSY_TICK_MS: u64 = 50;
/// With every slot listening, the stack is polled at least this often without traffic (and the
/// link status read).
const IDLE_TICK_MS: u64 = 1_000;
/// How long a `shutdown` reply may take to leave before the hypervisor exits anyway.
const SHUTDOWN_FLUSH_MS: u64 = 2_000;

/// The JSON API: enough slots for operators and monitoring at once; 64 sockets of 4 KiB receive
/// and 8 KiB send buffers (768 KiB) plus at most 64 KiB of queued replies each.
const JSON_LIMITS: Limits = Limits {
    slots: 64,
    spare_listeners: 2,
    max_request: mgmt::MAX_REQUEST_BYTES,
    out_capacity: 64 * 1024,
    out_high_water: 16 * 1024,
    request_deadline_ms: REQUEST_DEADLINE_MS,
    idle_timeout_ms: IDLE_TIMEOUT_MS,
    write_stall_ms: WRITE_STALL_MS,
    linger_ms: LINGER_MS,
    evict_grace_ms: EVICT_GRACE_MS,
    requests_per_poll: 4,
    read_budget: 2048,
};
const JSON_RX_BUFFER: usize = 4096;
const JSON_TX_BUFFER: usize = 8192;

/// The metrics page: one request per connection; 16 sockets of 4 KiB receive and 16 KiB send
/// buffers; the page (generated here, not fed by the peer) may be queued up to 256 KiB.
const HTTP_LIMITS: Limits = Limits {
    slots: 16,
    spare_listeners: 2,
    max_request: metrics::MAX_HEAD_BYTES,
    out_capacity: 256 * 1024,
    out_high_water: 0,
    request_deadline_ms: REQUEST_DEADLINE_MS,
    idle_timeout_ms: IDLE_TIMEOUT_MS,
    write_stall_ms: WRITE_STALL_MS,
    linger_ms: LINGER_MS,
    evict_grace_ms: EVICT_GRACE_MS,
    requests_per_poll: 1,
    read_budget: 2048,
};
const HTTP_RX_BUFFER: usize = 4096;
const HTTP_TX_BUFFER: usize = 16384;

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
    /// `mgmt_open=none` without a `mgmt-token` module: nobody could use the management plane.
    ClosedWithoutToken,
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
            Self::ClosedWithoutToken => write!(
                f,
                "mgmt_open=none is set but no `mgmt-token` module was given; expected the module (or mgmt_open=read)"
            ),
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

/// Which protocol a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// One JSON request per line (`net::mgmt`).
    Json,
    /// One HTTP request per connection (`net::metrics`).
    Http,
}

/// One connection slot (a smoltcp socket) and what the server knows about its connection.
struct Conn {
    handle: SocketHandle,
    /// The socket left `Listen` and was counted as accepted.
    open: bool,
    timers: Timers,
    out: OutBuf,
    /// Send-queue length after the last look (a drop means the peer acknowledged bytes).
    send_queue: usize,
    /// Close once `out` is empty.
    close_after_flush: bool,
    /// When the server closed its side.
    closing_since: Option<u64>,
    /// JSON: the request line being read.
    lines: LineReader,
    /// HTTP: the request head being read (at most `MAX_HEAD_BYTES + 1` bytes).
    head: Vec<u8>,
    /// HTTP: when the response was queued.
    answered_at: Option<u64>,
    /// JSON: the connection passed `auth`.
    authenticated: bool,
}

impl Conn {
    fn new(handle: SocketHandle, limits: &Limits) -> Self {
        Self {
            handle,
            open: false,
            timers: Timers::default(),
            out: OutBuf::new(limits.out_capacity),
            send_queue: 0,
            close_after_flush: false,
            closing_since: None,
            lines: LineReader::new(limits.max_request),
            head: Vec::new(),
            answered_at: None,
            authenticated: false,
        }
    }

    /// Forgets the last connection (and frees what it held).
    fn reset(&mut self) {
        self.open = false;
        self.out.clear();
        self.send_queue = 0;
        self.close_after_flush = false;
        self.closing_since = None;
        self.lines.clear();
        self.head = Vec::new();
        self.answered_at = None;
        self.authenticated = false;
    }

    /// Answered and flushed, or closing: nothing more to do for the peer.
    fn done(&self) -> bool {
        self.closing_since.is_some() || (self.answered_at.is_some() && self.out.is_empty() && self.send_queue == 0)
    }
}

/// One TCP server: its slots, limits and counters.
struct Server {
    kind: Kind,
    port: u16,
    limits: Limits,
    conns: Vec<Conn>,
    /// Every slot was busy and none could be evicted at the last look.
    full: bool,
}

struct NetStack {
    nics: Vec<Nic>,
    mgmt_nic: usize,
    iface: Interface,
    sockets: SocketSet<'static>,
    json: Server,
    http: Server,
    /// The management token and the rate limiter (both servers).
    gate: Gate,
    role: &'static str,
    hook: Option<Box<dyn GuestForward>>,
    shutdown_at: Option<u64>,
    /// The next full poll is due then even without a received frame.
    next_due_ms: u64,
    /// The next read of the NICs' link status.
    next_link_ms: u64,
    /// The witness client's one TCP socket (created on first use; bounded buffers).
    witness: Option<SocketHandle>,
    /// Local port for the next witness connection (moves on with every attempt).
    witness_port: u16,
    /// Fenced: no frame with this source MAC leaves any NIC.
    fenced_mac: Option<[u8; 6]>,
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

/// Finds the NICs, gives them their roles and starts the management endpoint with `token`
/// (from the `mgmt-token` module, if any). Does nothing (and returns `Ok`) when `mgmt_addr=` is
/// not set.
pub fn bring_up(config: &Config, token: Option<MgmtToken>) -> Result<(), NetError> {
    let Some(addr) = config.mgmt_addr else {
        return Ok(());
    };
    if token.is_none() && config.mgmt_open == MgmtOpen::None {
        return Err(NetError::ClosedWithoutToken);
    }
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
    let json = Server::new(Kind::Json, config.mgmt_port, JSON_LIMITS, &mut sockets, JSON_RX_BUFFER, JSON_TX_BUFFER);
    let http = Server::new(Kind::Http, config.metrics_port, HTTP_LIMITS, &mut sockets, HTTP_RX_BUFFER, HTTP_TX_BUFFER);
    log::info!(
        "management: {}/{} on nic{mgmt_nic}, JSON API on TCP port {} ({} slots), metrics on http://{}:{}/metrics ({} slots); request deadline {} ms, idle timeout {} ms",
        addr.addr,
        addr.prefix,
        config.mgmt_port,
        JSON_LIMITS.slots,
        addr.addr,
        config.metrics_port,
        HTTP_LIMITS.slots,
        REQUEST_DEADLINE_MS,
        IDLE_TIMEOUT_MS
    );
    let reads = if config.mgmt_open == MgmtOpen::None { "need the token too" } else { "are open" };
    if token.is_some() {
        log::info!(
            "management access: token from module `{}`; set, checkpoint, failover and shutdown need it; status, stats, tunables and /metrics {reads} (mgmt_open)",
            super::auth::TOKEN_MODULE
        );
    } else {
        log::warn!(
            "management access: no `{}` module: set, checkpoint, failover and shutdown are refused (no_token_configured); reads {reads}",
            super::auth::TOKEN_MODULE
        );
    }
    *guard = Some(NetStack {
        nics,
        mgmt_nic,
        iface,
        sockets,
        json,
        http,
        gate: Gate::new(token, config.mgmt_open),
        role: role_name(config.role),
        hook: None,
        shutdown_at: None,
        next_due_ms: 0,
        next_link_ms: 0,
        witness: None,
        witness_port: 49_152 + (time::rdtsc() % 8192) as u16,
        fenced_mac: None,
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

/// Sends a guest's frame out of the NIC with the `client` role. A fenced host ([`fence_mac`])
/// refuses every frame from the fenced MAC (counted in `tx_fenced`).
pub fn send_from_guest(frame: &[u8]) -> Result<(), TxError> {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else {
        return Err(TxError::RingFull);
    };
    let Some(nic) = net.nics.iter_mut().find(|n| n.roles.client) else {
        return Err(TxError::RingFull);
    };
    if net.fenced_mac.is_some_and(|mac| frame.get(6..12) == Some(&mac[..])) {
        let index = nic.index;
        stats::with(|s| s.nic_mut(index).counters.tx_fenced += 1);
        return Err(TxError::RingFull);
    }
    transmit_counted(nic, frame.len(), |buf| buf.copy_from_slice(frame)).ok_or(TxError::RingFull)
}

/// Fencing: from now on no frame with source MAC `mac` leaves this host (the transmit path of
/// [`send_from_guest`] refuses and counts them). Never undone: a fenced host is restarted.
pub fn fence_mac(mac: [u8; 6]) {
    if let Some(net) = NET.lock().as_mut() {
        net.fenced_mac = Some(mac);
    }
}

/// The witness socket's receive and send buffers: one etcd request or reply at a time (the
/// reader refuses replies above its own bounds anyway).
const WITNESS_BUFFER: usize = 16 * 1024;

/// The state of the witness client's TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessSocket {
    /// No networking, or no connection.
    Closed,
    /// SYN sent.
    Connecting,
    /// Established: bytes can go both ways.
    Open,
    /// The peer closed its side (a close-delimited reply is complete).
    PeerClosed,
}

/// Opens a new connection to the witness on the management interface (aborting any earlier
/// one). `false` when networking is not up or smoltcp refused.
pub fn witness_connect(remote: core::net::SocketAddrV4) -> bool {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else { return false };
    let handle = *net.witness.get_or_insert_with(|| {
        let rx = tcp::SocketBuffer::new(vec![0; WITNESS_BUFFER]);
        let tx = tcp::SocketBuffer::new(vec![0; WITNESS_BUFFER]);
        net.sockets.add(tcp::Socket::new(rx, tx))
    });
    let port = net.witness_port;
    net.witness_port = if port >= 65_000 { 49_152 } else { port + 1 };
    let socket = net.sockets.get_mut::<tcp::Socket>(handle);
    socket.abort();
    // An aborted socket needs a poll to send its RST before it can connect again.
    let mut device = NicDevice { nic: &mut net.nics[net.mgmt_nic], hook: &mut net.hook, local: true };
    net.iface.poll(now(), &mut device, &mut net.sockets);
    let socket = net.sockets.get_mut::<tcp::Socket>(handle);
    socket.set_timeout(None);
    let ok = socket.connect(net.iface.context(), (IpAddress::Ipv4(*remote.ip()), remote.port()), port).is_ok();
    net.next_due_ms = 0;
    ok
}

/// The witness connection's state.
pub fn witness_state() -> WitnessSocket {
    let guard = NET.lock();
    let Some(net) = guard.as_ref() else { return WitnessSocket::Closed };
    let Some(handle) = net.witness else { return WitnessSocket::Closed };
    let socket = net.sockets.get::<tcp::Socket>(handle);
    match socket.state() {
        tcp::State::SynSent | tcp::State::SynReceived => WitnessSocket::Connecting,
        tcp::State::Established => WitnessSocket::Open,
        tcp::State::CloseWait => WitnessSocket::PeerClosed,
        _ if socket.can_recv() => WitnessSocket::PeerClosed,
        _ => WitnessSocket::Closed,
    }
}

/// Queues as much of `data` as the witness socket takes; returns how much.
pub fn witness_send(data: &[u8]) -> usize {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else { return 0 };
    let Some(handle) = net.witness else { return 0 };
    let n = net.sockets.get_mut::<tcp::Socket>(handle).send_slice(data).unwrap_or(0);
    net.next_due_ms = 0;
    n
}

/// Reads received witness bytes into `buf`; returns how many.
pub fn witness_recv(buf: &mut [u8]) -> usize {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else { return 0 };
    let Some(handle) = net.witness else { return 0 };
    net.sockets.get_mut::<tcp::Socket>(handle).recv_slice(buf).unwrap_or(0)
}

/// Ends the witness connection (reset).
pub fn witness_abort() {
    let mut guard = NET.lock();
    let Some(net) = guard.as_mut() else { return };
    if let Some(handle) = net.witness {
        net.sockets.get_mut::<tcp::Socket>(handle).abort();
        net.next_due_ms = 0;
    }
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
        // The runner polls every few microseconds: skip the stack and the servers (about a
        // hundred sockets) unless a frame waits, smoltcp or a server timer is due, or a shutdown
        // reply is leaving.
        if !self.nics[self.mgmt_nic].dev.rx_pending() && now_ms < self.next_due_ms && self.shutdown_at.is_none() {
            return PollOutcome::Running;
        }
        let mut device = NicDevice { nic: &mut self.nics[self.mgmt_nic], hook: &mut self.hook, local: true };
        self.iface.poll(now(), &mut device, &mut self.sockets);
        let shutdown = self.json.serve(&mut self.sockets, self.role, now_ms, &mut self.gate);
        self.http.serve(&mut self.sockets, self.role, now_ms, &mut self.gate);
        // Push out what the servers just queued.
        let mut device = NicDevice { nic: &mut self.nics[self.mgmt_nic], hook: &mut self.hook, local: true };
        self.iface.poll(now(), &mut device, &mut self.sockets);
        // Slots reset this round listen again before the next round's ingress.
        self.json.relisten(&mut self.sockets);
        self.http.relisten(&mut self.sockets);
        let busy = self.json.busy(&self.sockets) || self.http.busy(&self.sockets);
        let mut due = now_ms + if busy { BUSY_TICK_MS } else { IDLE_TICK_MS };
        if let Some(at) = self.iface.poll_at(now(), &self.sockets) {
            due = due.min(at.total_millis().max(0) as u64);
        }
        self.next_due_ms = due;
        if now_ms >= self.next_link_ms {
            self.next_link_ms = now_ms + IDLE_TICK_MS;
            let link = self.nics.iter().map(|n| (n.index, n.dev.link_up())).collect::<Vec<_>>();
            stats::with(|s| {
                for (index, up) in link {
                    s.nic_mut(index).link_up = up;
                }
            });
        }
        if shutdown && self.shutdown_at.is_none() {
            self.shutdown_at = Some(now_ms);
        }
        if let Some(at) = self.shutdown_at {
            let flushed = self.json.conns.iter().all(|c| {
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

/// Runs `f` on the counters of server `kind`.
fn count(kind: Kind, f: impl FnOnce(&mut stats::ServerCounters)) {
    stats::with(|s| {
        f(match kind {
            Kind::Json => &mut s.mgmt.json,
            Kind::Http => &mut s.mgmt.http,
        })
    });
}

/// The registry with the heap sampled now (for `status`, `stats` and the metrics page).
fn with_fresh_stats<R>(f: impl FnOnce(&mut stats::HypervisorStats) -> R) -> R {
    let usage = heap::usage();
    stats::with(|s| {
        s.heap = usage;
        f(s)
    })
}

impl Server {
    fn new(kind: Kind, port: u16, limits: Limits, sockets: &mut SocketSet<'static>, rx: usize, tx: usize) -> Self {
        let conns = (0..limits.slots)
            .map(|_| {
                let socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; tx]));
                Conn::new(sockets.add(socket), &limits)
            })
            .collect();
        Self { kind, port, limits, conns, full: false }
    }

    /// One round for every slot, then makes sure a new client finds a listening slot. Returns
    /// true when a `shutdown` request was answered.
    fn serve(&mut self, sockets: &mut SocketSet<'_>, role: &'static str, now: u64, gate: &mut Gate) -> bool {
        let mut shutdown = false;
        for conn in &mut self.conns {
            shutdown |= serve_conn(self.kind, self.port, &self.limits, conn, sockets, role, now, gate);
        }
        self.keep_listeners(sockets, now);
        shutdown
    }

    /// Whether any slot holds a connection (its timers need checking).
    fn busy(&self, sockets: &SocketSet<'_>) -> bool {
        self.conns.iter().any(|c| sockets.get::<tcp::Socket>(c.handle).state() != tcp::State::Listen)
    }

    /// Puts every closed slot back to listening (after the egress that sent their resets).
    fn relisten(&mut self, sockets: &mut SocketSet<'_>) {
        for conn in &mut self.conns {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            if !socket.is_open() {
                conn.reset();
                listen(socket, self.port);
            }
        }
    }

    /// When fewer than `spare_listeners` slots listen, evicts connections (done, then the oldest
    /// idle, then the oldest slow request) so that a new client is not refused.
    fn keep_listeners(&mut self, sockets: &mut SocketSet<'_>, now: u64) {
        loop {
            // A closed socket listens again after this round's egress (see `relisten`).
            let listening = self
                .conns
                .iter()
                .filter(|c| {
                    let socket = sockets.get::<tcp::Socket>(c.handle);
                    socket.state() == tcp::State::Listen || !socket.is_open()
                })
                .count();
            if listening >= self.limits.spare_listeners {
                self.full = false;
                return;
            }
            let ranks = self
                .conns
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.open.then(|| c.timers.evict_rank(now, &self.limits, c.done())).flatten()));
            let Some(victim) = choose_victim(ranks) else {
                if listening == 0 && !self.full {
                    self.full = true;
                    count(self.kind, |c| c.full += 1);
                    log::warn!("{:?} server: every slot is busy and none may be evicted yet", self.kind);
                }
                return;
            };
            let conn = &mut self.conns[victim];
            let done = conn.done();
            // Reset now; the RST leaves with this round's egress, then `relisten` reopens it.
            sockets.get_mut::<tcp::Socket>(conn.handle).abort();
            conn.reset();
            if !done {
                count(self.kind, |c| c.evicted += 1);
            }
        }
    }
}

/// Puts a closed socket back to listening, with smoltcp's own timeout off ([`IDLE_TIMEOUT_MS`]
/// is the one idle timeout).
fn listen(socket: &mut tcp::Socket<'_>, port: u16) {
    if socket.is_open() {
        return;
    }
    socket.set_timeout(None);
    socket.set_keep_alive(None);
    if let Err(e) = socket.listen(port) {
        log::warn!("listen on port {port}: {e:?}");
    }
}

/// The peer's IPv4 address (the rate limiter's key; `0.0.0.0` if smoltcp has none).
fn peer_of(socket: &tcp::Socket<'_>) -> Ipv4Addr {
    match socket.remote_endpoint().map(|e| e.addr) {
        Some(IpAddress::Ipv4(addr)) => addr,
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// Serves one slot for one poll; returns true when it answered a `shutdown` request.
#[allow(clippy::too_many_arguments)]
fn serve_conn(
    kind: Kind,
    port: u16,
    limits: &Limits,
    conn: &mut Conn,
    sockets: &mut SocketSet<'_>,
    role: &'static str,
    now: u64,
    gate: &mut Gate,
) -> bool {
    let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
    if !socket.is_open() {
        conn.reset();
        listen(socket, port);
        return false;
    }
    if socket.state() == tcp::State::Listen {
        return false;
    }
    if !conn.open {
        conn.open = true;
        conn.timers = Timers::open(now);
        count(kind, |c| c.accepted += 1);
    }
    if let Some(since) = conn.closing_since {
        // Closed on our side: discard what still arrives (bounded), reset after the linger
        // (which restarts while the peer still takes queued output).
        let queue = socket.send_queue();
        if queue < conn.send_queue {
            conn.closing_since = Some(now);
        }
        conn.send_queue = queue;
        let mut read = 0;
        while read < limits.read_budget && socket.can_recv() {
            match socket.recv(|b| (b.len(), b.len())) {
                Ok(n) if n > 0 => read += n,
                _ => break,
            }
        }
        if now >= conn.closing_since.unwrap_or(since) + limits.linger_ms {
            socket.abort();
        }
        return false;
    }
    let mut abort = false;
    let shutdown = match kind {
        Kind::Json => serve_json(limits, conn, socket, role, now, gate, &mut abort),
        Kind::Http => {
            serve_http(limits, conn, socket, role, now, gate, &mut abort);
            false
        }
    };
    if abort {
        count(kind, |c| c.not_reading += 1);
        socket.abort();
        return shutdown;
    }
    flush(conn, socket, now);
    if conn.close_after_flush && conn.out.is_empty() {
        socket.close();
        conn.closing_since = Some(now);
        return shutdown;
    }
    match conn.timers.expired(now, limits) {
        None => {}
        Some(Expiry::NotReading) => {
            count(kind, |c| c.not_reading += 1);
            log::debug!("{kind:?}: closing a connection whose peer does not read");
            socket.abort();
        }
        Some(Expiry::Idle) => {
            count(kind, |c| c.idle_timeouts += 1);
            socket.close();
            conn.closing_since = Some(now);
        }
        Some(Expiry::RequestDeadline) => {
            count(kind, |c| c.request_timeouts += 1);
            // Say why, then close (the linger bounds how long that may take).
            let reply = match kind {
                Kind::Json => {
                    let mut text =
                        mgmt::error_reply(&mgmt::RequestError::Timeout { deadline_ms: limits.request_deadline_ms });
                    text.push('\n');
                    text
                }
                Kind::Http => {
                    metrics::respond(
                        Err(metrics::HttpError::Timeout { deadline_ms: limits.request_deadline_ms }),
                        String::new,
                    )
                    .0
                }
            };
            conn.lines.clear();
            conn.head = Vec::new();
            if conn.out.push(reply.as_bytes()).is_err() {
                socket.abort();
                return shutdown;
            }
            flush(conn, socket, now);
            socket.close();
            conn.closing_since = Some(now);
        }
    }
    shutdown
}

/// Moves queued output into the socket and tells the timers whether it moved.
fn flush(conn: &mut Conn, socket: &mut tcp::Socket<'_>, now: u64) {
    let acked = socket.send_queue() < conn.send_queue;
    let mut moved = 0;
    if !conn.out.is_empty() && socket.can_send() {
        if let Ok(n) = socket.send_slice(conn.out.pending()) {
            conn.out.consume(n);
            moved = n;
        }
    }
    conn.send_queue = socket.send_queue();
    let pending = !conn.out.is_empty() || conn.send_queue > 0;
    conn.timers.on_output(now, pending, acked || moved > 0);
}

/// JSON API: up to `requests_per_poll` requests and `read_budget` bytes per poll, and new
/// requests only while less than `out_high_water` bytes of replies wait (a peer that does not
/// read is slowed down first, then closed by the write-stall limit).
fn serve_json(
    limits: &Limits,
    conn: &mut Conn,
    socket: &mut tcp::Socket<'_>,
    role: &'static str,
    now: u64,
    gate: &mut Gate,
    abort: &mut bool,
) -> bool {
    let mut shutdown = false;
    let peer = peer_of(socket);
    let (mut answered, mut read) = (0, 0);
    flush(conn, socket, now);
    while answered < limits.requests_per_poll
        && read < limits.read_budget
        && !conn.close_after_flush
        && conn.out.len() < limits.out_high_water
        && socket.can_recv()
    {
        let budget = limits.read_budget - read;
        let lines = &mut conn.lines;
        let Ok((n, event)) = socket.recv(|buf| {
            let (n, event) = lines.feed(&buf[..buf.len().min(budget)]);
            (n, (n, event))
        }) else {
            break;
        };
        if n == 0 {
            break;
        }
        read += n;
        // Blank lines are no request: they neither count as activity (idle timeout, eviction)
        // nor start the request deadline.
        if event.is_some() || conn.lines.in_request() {
            conn.timers.on_input(now, conn.lines.in_request());
        }
        match event {
            None => {}
            Some(LineEvent::Line(line)) => {
                answered += 1;
                shutdown |= answer_json(conn, &line, role, now, gate, peer, abort);
            }
            Some(LineEvent::TooLarge { len }) => {
                count(Kind::Json, |c| c.too_large += 1);
                let err = mgmt::RequestError::TooLarge { len };
                stats::with(|s| {
                    s.mgmt.requests += 1;
                    s.mgmt.request_errors += 1;
                });
                let text = mgmt::error_reply(&err);
                if conn.out.push_all(&[text.as_bytes(), b"\n"]).is_err() {
                    *abort = true;
                }
                conn.close_after_flush = true;
            }
        }
        if *abort {
            return shutdown;
        }
    }
    // Half-close: the peer sent FIN and every byte it sent has been read. A last request without
    // a newline is still a request.
    if peer_closed(socket) && !socket.can_recv() && !conn.close_after_flush {
        if let Some(line) = conn.lines.finish() {
            count(Kind::Json, |c| c.half_close_requests += 1);
            shutdown |= answer_json(conn, &line, role, now, gate, peer, abort);
        }
        conn.close_after_flush = true;
    }
    conn.timers.on_request_state(now, conn.lines.in_request());
    shutdown
}

/// Answers one JSON request line into `conn.out`; returns true for `shutdown`.
fn answer_json(
    conn: &mut Conn,
    line: &[u8],
    role: &'static str,
    now: u64,
    gate: &mut Gate,
    peer: Ipv4Addr,
    abort: &mut bool,
) -> bool {
    let authenticated = &mut conn.authenticated;
    let reply = with_fresh_stats(|s| {
        let access = mgmt::Access { gate, peer, authenticated };
        let mut ctx = mgmt::Context { role, uptime_ms: now, replication_running: false, stats: s, access };
        mgmt::handle(line, &mut ctx)
    });
    if conn.out.push_all(&[reply.text.as_bytes(), b"\n"]).is_err() {
        *abort = true;
        return false;
    }
    match reply.action {
        mgmt::Action::Continue => false,
        mgmt::Action::Close => {
            conn.close_after_flush = true;
            false
        }
        mgmt::Action::Shutdown => {
            conn.close_after_flush = true;
            true
        }
    }
}

/// The client sent FIN (`may_recv` alone is also false while the handshake is under way).
fn peer_closed(socket: &tcp::Socket<'_>) -> bool {
    socket.state() == tcp::State::CloseWait
}

/// Metrics: one request head (at most `MAX_HEAD_BYTES + 1` bytes are kept), one response.
fn serve_http(
    limits: &Limits,
    conn: &mut Conn,
    socket: &mut tcp::Socket<'_>,
    role: &'static str,
    now: u64,
    gate: &mut Gate,
    abort: &mut bool,
) {
    let peer = peer_of(socket);
    let mut read = 0;
    if conn.answered_at.is_some() {
        // Discard anything after the request head (bounded per poll).
        while read < limits.read_budget && socket.can_recv() {
            match socket.recv(|b| (b.len(), b.len())) {
                Ok(n) if n > 0 => read += n,
                _ => break,
            }
        }
        return;
    }
    let mut response = None;
    while read < limits.read_budget && socket.can_recv() {
        let room = (metrics::MAX_HEAD_BYTES + 1).saturating_sub(conn.head.len()).min(limits.read_budget - read);
        let head = &mut conn.head;
        let n = match socket.recv(|b| {
            let n = b.len().min(room);
            head.extend_from_slice(&b[..n]);
            (n, n)
        }) {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        read += n;
        conn.timers.on_input(now, true);
        let parsed = metrics::parse_http_request(&conn.head);
        if parsed == Err(metrics::HttpError::Incomplete) {
            continue;
        }
        if matches!(parsed, Err(metrics::HttpError::TooLarge { .. })) {
            count(Kind::Http, |c| c.too_large += 1);
        }
        let (text, outcome, check) =
            metrics::respond_checked(parsed, gate, peer, now, || with_fresh_stats(|s| metrics::render(s, role, now)));
        if let Some(check) = check {
            stats::with(|s| s.mgmt.auth.record(&check));
        }
        response = Some((text, outcome));
        break;
    }
    if response.is_none() && peer_closed(socket) && !socket.can_recv() {
        // Half-closed in the middle of a head: say so; a connection that sent nothing just ends.
        if conn.head.is_empty() {
            conn.close_after_flush = true;
            return;
        }
        response = Some(metrics::respond(Err(metrics::HttpError::Truncated), String::new));
    }
    let Some((text, outcome)) = response else {
        return;
    };
    stats::with(|s| match outcome {
        metrics::Outcome::Served => s.mgmt.scrapes += 1,
        metrics::Outcome::Refused => s.mgmt.http_errors += 1,
    });
    conn.head = Vec::new();
    conn.timers.on_request_state(now, false);
    conn.answered_at = Some(now);
    // `Connection: close`: the server closes once the response is out (RFC 9112 §9.6).
    conn.close_after_flush = true;
    if conn.out.push(text.as_bytes()).is_err() {
        *abort = true;
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
