//! The hypervisor's counter registry: per-NIC traffic counters, per-guest state and VM-exit
//! counters, management-plane counters and the runtime tunables. The management API (`net::mgmt`)
//! and the metrics page (`net::metrics`) read it; drivers and the guest runner write it.
//!
//! # How other parts update it
//!
//! On bare metal there is one global registry behind a spin lock; reach it with [`with`]:
//!
//! ```ignore
//! // a guest runner, after loading a guest and on every exit:
//! stats::with(|s| s.guest_mut("redis").state = GuestState::Running);
//! stats::with(|s| s.guest_mut("redis").exits.record(&exit));
//! // when the guest ends:
//! stats::with(|s| s.guest_mut("redis").state = GuestState::Stopped);
//! // a NIC driver:
//! stats::with(|s| s.nic_mut(0).rx_frames += 1);
//! ```
//!
//! Keep the closure short (no I/O, no nested [`with`]): it runs with the lock held. Guests are
//! looked up by name and created on first use; NICs by index (created by `net` at bring-up).
//! The registry itself is pure data and host-tested.
#![deny(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;

use crate::vcpu::ExitCounters;

/// Traffic counters of one host NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// Frames received (all, including those dropped or refused afterwards).
    pub rx_frames: u64,
    /// Bytes of received frames.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes of sent frames.
    pub tx_bytes: u64,
    /// Received frames nobody wanted (unknown protocol, not addressed to us or a guest).
    pub rx_dropped: u64,
    /// Received frames that were malformed (bad lengths, bad checksums, truncated headers) or
    /// that the NIC flagged with a receive error.
    pub rx_errors: u64,
    /// Frames not sent because the transmit ring was full.
    pub tx_dropped: u64,
    /// Frames not sent because they were empty or larger than a transmit buffer.
    pub tx_errors: u64,
    /// Guest frames refused because this host is fenced (nothing with the guest's MAC leaves).
    pub tx_fenced: u64,
}

/// One host NIC in the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicEntry {
    /// `nic0`, `nic1`, ... in the order of the `nics=` command-line key.
    pub name: String,
    /// Its roles as written on the command line, e.g. `mgmt+client`.
    pub roles: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Whether the link was up at the last poll.
    pub link_up: bool,
    /// Its counters.
    pub counters: NicCounters,
}

/// What a guest is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestState {
    /// Known but not started yet.
    #[default]
    Loading,
    /// Running (or runnable).
    Running,
    /// Paused (for instance during a checkpoint).
    Paused,
    /// Ended normally.
    Stopped,
    /// Ended by a fault.
    Faulted,
}

impl GuestState {
    /// Every state, in a fixed order (the metrics page emits one series per state).
    pub const ALL: [GuestState; 5] = [Self::Loading, Self::Running, Self::Paused, Self::Stopped, Self::Faulted];

    /// The lower-case name used in JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Faulted => "faulted",
        }
    }
}

/// One guest in the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestEntry {
    /// Its name (the module's command line).
    pub name: String,
    /// Its state.
    pub state: GuestState,
    /// Its VM exits by kind.
    pub exits: ExitCounters,
}

/// Management-plane counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MgmtCounters {
    /// JSON requests answered (including errors).
    pub requests: u64,
    /// JSON requests answered with an error.
    pub request_errors: u64,
    /// Metrics pages served.
    pub scrapes: u64,
    /// HTTP requests refused (bad request, wrong path or method).
    pub http_errors: u64,
    /// Connections of the JSON API server.
    pub json: ServerCounters,
    /// Connections of the metrics server.
    pub http: ServerCounters,
    /// Token checks of both servers (see `net::auth`).
    pub auth: AuthCounters,
}

/// What the management token check decided (JSON API and metrics page together).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthCounters {
    /// Requests that needed the token and had it (or came on an authenticated connection).
    pub authorized: u64,
    /// Requests refused for a missing or wrong token (`unauthorized`, HTTP 401).
    pub unauthorized: u64,
    /// Requests refused without a token check because their source failed too often
    /// (`rate_limited`, HTTP 429).
    pub rate_limited: u64,
    /// Requests refused because no `mgmt-token` module was given (`no_token_configured`).
    pub no_token_configured: u64,
}

impl AuthCounters {
    const fn new() -> Self {
        Self { authorized: 0, unauthorized: 0, rate_limited: 0, no_token_configured: 0 }
    }

    /// Counts one decision.
    pub fn record(&mut self, result: &Result<(), crate::net::auth::Denied>) {
        use crate::net::auth::Denied;
        match result {
            Ok(()) => self.authorized += 1,
            Err(Denied::Unauthorized { .. }) => self.unauthorized += 1,
            Err(Denied::RateLimited { .. }) => self.rate_limited += 1,
            Err(Denied::NoTokenConfigured) => self.no_token_configured += 1,
        }
    }

    /// Every counter with its name (for JSON and metrics), in a fixed order.
    pub fn named(&self) -> [(&'static str, u64); 4] {
        [
            ("authorized", self.authorized),
            ("unauthorized", self.unauthorized),
            ("rate_limited", self.rate_limited),
            ("no_token_configured", self.no_token_configured),
        ]
    }
}

/// What happened to the connections of one TCP server (see `net::server` for the limits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed to make room for a new client (oldest idle first, then slowest).
    pub evicted: u64,
    /// Connections closed because a request did not arrive whole within the request deadline.
    pub request_timeouts: u64,
    /// Connections closed after the idle timeout.
    pub idle_timeouts: u64,
    /// Connections closed because the peer stopped reading (output stalled or over its bound).
    pub not_reading: u64,
    /// Requests refused for their size (the connection is closed after the reply).
    pub too_large: u64,
    /// Requests answered at a half-close (the peer sent FIN after a request with no newline).
    pub half_close_requests: u64,
    /// Times every slot was busy and none could be evicted (new clients were refused).
    pub full: u64,
}

impl ServerCounters {
    const fn new() -> Self {
        Self {
            accepted: 0,
            evicted: 0,
            request_timeouts: 0,
            idle_timeouts: 0,
            not_reading: 0,
            too_large: 0,
            half_close_requests: 0,
            full: 0,
        }
    }

    /// Every counter with its name (for JSON and metrics), in a fixed order.
    pub fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("accepted", self.accepted),
            ("evicted", self.evicted),
            ("request_timeouts", self.request_timeouts),
            ("idle_timeouts", self.idle_timeouts),
            ("not_reading", self.not_reading),
            ("too_large", self.too_large),
            ("half_close_requests", self.half_close_requests),
            ("full", self.full),
        ]
    }
}

/// The kernel heap's use, as last sampled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapUsage {
    /// Bytes the heap manages.
    pub size: u64,
    /// Bytes allocated now.
    pub used: u64,
    /// Bytes free now (`size - used`; fragmentation may keep a large allocation from fitting).
    pub free: u64,
    /// The most bytes ever allocated at once.
    pub high_water: u64,
    /// Allocations the heap could not satisfy.
    pub alloc_failures: u64,
}

/// Tunables the management API can change at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// Interval between heartbeats on the replication link, ms.
    pub heartbeat_ms: u32,
    /// Periodic checkpoint interval, ms.
    pub checkpoint_ms: u32,
}

impl Tunables {
    /// The boot defaults (the command line's `heartbeat_ms=` and `checkpoint_ms=` defaults).
    pub const DEFAULT: Tunables = Tunables { heartbeat_ms: 100, checkpoint_ms: 1000 };
}

impl Default for Tunables {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// COLO replication on this host, as the two-host driver (`node`) last published it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColoReport {
    /// `primary` or `secondary`.
    pub role: &'static str,
    /// The link: `down`, `handshake`, `syncing` or `colo`.
    pub link: &'static str,
    /// Primary: the epoch the PVM runs in; secondary: the epoch the SVM runs in.
    pub epoch: u64,
    /// The last committed checkpoint (primary: acknowledged; secondary: applied and verified).
    pub committed: u64,
    /// Checkpoints started, by cause, in [`ColoReport::CAUSES`] order.
    pub checkpoints_by_cause: [u64; 6],
    /// Checkpoints (and full syncs) committed.
    pub checkpoints_committed: u64,
    /// Checkpoints aborted (link lost, refused).
    pub checkpoints_aborted: u64,
    /// Full syncs completed.
    pub full_syncs: u64,
    /// PVM pause per capture (primary), µs: last, total, and how many captures.
    pub pause_us: Sample,
    /// Capture done to acknowledgement (primary, ms resolution), µs.
    pub transfer_us: Sample,
    /// Checkpoint and full-sync apply (secondary), µs.
    pub apply_us: Sample,
    /// Dirty pages of the last checkpoint.
    pub pages_last: u64,
    /// Pages of all checkpoints.
    pub pages_total: u64,
    /// Stream bytes of the last checkpoint.
    pub bytes_last: u64,
    /// Stream bytes of all checkpoints.
    pub bytes_total: u64,
    /// TCP payload bytes the comparator compared (each stream byte once, plus re-sent bytes
    /// compared again).
    pub compared_bytes: u64,
    /// TCP stream bytes matched between PVM and SVM.
    pub matched_bytes: u64,
    /// Bytes of PVM frames released to clients.
    pub released_bytes: u64,
    /// PVM frames released to clients.
    pub released_frames: u64,
    /// PVM frames released by a committed checkpoint rather than a match.
    pub released_by_checkpoint: u64,
    /// PVM frames held now.
    pub held_frames: u64,
    /// Client frames mirrored to the secondary.
    pub mirrored_frames: u64,
    /// Client frames refused because the link queue or the secondary's backlog was full.
    pub input_dropped: u64,
    /// SVM frames sent (secondary) or received (primary).
    pub svm_frames: u64,
    /// SVM frames dropped.
    pub svm_frames_dropped: u64,
    /// Link errors by name (`colo::link::LinkError::NAMES` order).
    pub link_errors: [(&'static str, u64); 8],
    /// Well-formed link messages that made no sense here (each closed the link).
    pub protocol_errors: u64,
    /// Checkpoints whose digest did not match after the apply.
    pub verify_failures: u64,
    /// Link connections.
    pub link_connects: u64,
    /// Link closures.
    pub link_closes: u64,
    /// Secondary: SVM output frames and mirrored client frames whose TCP sequence numbers the
    /// rewriter translated, and TCP frames passed untranslated because the offset was unknown.
    pub seq_rewritten: (u64, u64, u64),
    /// The last `checkpoint_verify` digest this host computed: (epoch, digest).
    pub digest: Option<(u64, u64)>,
}

impl ColoReport {
    /// Checkpoint causes, in counter order (`colo::node::Cause`).
    pub const CAUSES: [&'static str; 6] = ["mismatch", "timeout", "pressure", "periodic", "manual", "full_sync"];
}

/// A duration measured once per event: the last value, the sum and the count (mean = sum / count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// The last value.
    pub last: u64,
    /// The sum of all values.
    pub total: u64,
    /// How many values.
    pub count: u64,
}

impl Sample {
    /// The mean (0 before the first value).
    pub fn mean(&self) -> u64 {
        self.total.checked_div(self.count).unwrap_or(0)
    }
}

/// The registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HypervisorStats {
    /// Host NICs, by index.
    pub nics: Vec<NicEntry>,
    /// Guests, in the order they were first seen.
    pub guests: Vec<GuestEntry>,
    /// Management-plane counters.
    pub mgmt: MgmtCounters,
    /// The runtime tunables.
    pub tunables: Tunables,
    /// The kernel heap (sampled by the management plane before each report).
    pub heap: HeapUsage,
    /// COLO replication (`role=primary|secondary`), published by the two-host driver.
    pub colo: Option<ColoReport>,
    /// `checkpoint` requests the management API accepted and the driver has not taken yet.
    pub colo_checkpoint_requests: u64,
    /// `repl_auth=` of a replicating host (`None` on a standalone one).
    pub repl_auth: Option<bool>,
    /// Failover state of a replicating host (`None` on a standalone host).
    pub failover: Option<FailoverInfo>,
    /// `ctl failover` was accepted and the node has not taken it yet.
    pub failover_requested: bool,
}

/// Failover state for status and metrics (issue 12), refreshed by the node driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailoverInfo {
    /// Pair generation.
    pub generation: u64,
    /// `primary`, `secondary`, `claiming` ... (the failover machine's role).
    pub role: String,
    /// Primary: output compared (true) or released unprotected.
    pub protected: bool,
    /// `none`, `alive`, `lost`.
    pub peer: &'static str,
    /// The witness: `none` or its `IP:PORT`.
    pub witness: String,
    /// The generation of the last claim sent.
    pub last_claim: Option<u64>,
    /// Its answer: `granted`, `denied`, `unreachable`, `error`.
    pub last_result: Option<&'static str>,
    /// Claim round trip, ms.
    pub last_latency_ms: u64,
    /// A claim not answered yet.
    pub pending: Option<u64>,
    /// Takeovers by this host.
    pub failovers: u64,
    /// Claims sent / granted / denied / failed.
    pub claims: [u64; 4],
    /// Uptime (ms) at the last promotion of this host.
    pub last_promotion_ms: Option<u64>,
    /// Measured at this hypervisor at the last takeover: ms from the last byte heard from the peer
    /// to the first output released by this host afterwards.
    pub stall_ms: Option<u64>,
    /// Fenced, and why (text).
    pub fenced: Option<String>,
}

impl HypervisorStats {
    /// An empty registry with default tunables (const, for the global).
    pub const fn new() -> Self {
        Self {
            nics: Vec::new(),
            guests: Vec::new(),
            mgmt: MgmtCounters::new(),
            tunables: Tunables::DEFAULT,
            heap: HeapUsage { size: 0, used: 0, free: 0, high_water: 0, alloc_failures: 0 },
            colo: None,
            colo_checkpoint_requests: 0,
            repl_auth: None,
            failover: None,
            failover_requested: false,
        }
    }

    /// NIC `index`, created (named `nicN`) with every NIC before it if missing.
    pub fn nic_mut(&mut self, index: usize) -> &mut NicEntry {
        while self.nics.len() <= index {
            let name = crate::net::mgmt::format(format_args!("nic{}", self.nics.len()));
            self.nics.push(NicEntry { name, ..NicEntry::default() });
        }
        &mut self.nics[index]
    }

    /// The guest called `name`, created in state `Loading` if missing.
    pub fn guest_mut(&mut self, name: &str) -> &mut GuestEntry {
        let index = match self.guests.iter().position(|g| g.name == name) {
            Some(index) => index,
            None => {
                self.guests.push(GuestEntry { name: name.into(), ..GuestEntry::default() });
                self.guests.len() - 1
            }
        };
        &mut self.guests[index]
    }

    /// The guest called `name`, if known.
    pub fn guest(&self, name: &str) -> Option<&GuestEntry> {
        self.guests.iter().find(|g| g.name == name)
    }

    /// Sum of every NIC's counters.
    pub fn nic_totals(&self) -> NicCounters {
        let mut t = NicCounters::default();
        for c in self.nics.iter().map(|n| &n.counters) {
            t.rx_frames += c.rx_frames;
            t.rx_bytes += c.rx_bytes;
            t.tx_frames += c.tx_frames;
            t.tx_bytes += c.tx_bytes;
            t.rx_dropped += c.rx_dropped;
            t.rx_errors += c.rx_errors;
            t.tx_dropped += c.tx_dropped;
            t.tx_errors += c.tx_errors;
            t.tx_fenced += c.tx_fenced;
        }
        t
    }
}

impl MgmtCounters {
    const fn new() -> Self {
        Self {
            requests: 0,
            request_errors: 0,
            scrapes: 0,
            http_errors: 0,
            json: ServerCounters::new(),
            http: ServerCounters::new(),
            auth: AuthCounters::new(),
        }
    }
}

#[cfg(feature = "bare-metal")]
static REGISTRY: spin::Mutex<HypervisorStats> = spin::Mutex::new(HypervisorStats::new());

/// Runs `f` on the global registry with its lock held (bare metal only). Do not nest.
#[cfg(feature = "bare-metal")]
pub fn with<R>(f: impl FnOnce(&mut HypervisorStats) -> R) -> R {
    f(&mut REGISTRY.lock())
}

/// A copy of the global registry (bare metal only), for reports that format at leisure.
#[cfg(feature = "bare-metal")]
pub fn snapshot() -> HypervisorStats {
    REGISTRY.lock().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::VmExit;

    #[test]
    fn nics_are_created_in_order_with_names() {
        let mut s = HypervisorStats::new();
        s.nic_mut(1).counters.rx_frames = 3;
        assert_eq!(s.nics.len(), 2);
        assert_eq!(s.nics[0].name, "nic0");
        assert_eq!(s.nics[1].name, "nic1");
        assert_eq!(s.nics[1].counters.rx_frames, 3);
        s.nic_mut(0).counters.rx_frames = 2;
        s.nic_mut(0).counters.tx_bytes = 100;
        let t = s.nic_totals();
        assert_eq!((t.rx_frames, t.tx_bytes), (5, 100));
    }

    #[test]
    fn guests_are_found_by_name_and_count_exits() {
        let mut s = HypervisorStats::new();
        assert!(s.guest("g").is_none());
        s.guest_mut("g").state = GuestState::Running;
        s.guest_mut("g").exits.record(&VmExit::Hlt);
        s.guest_mut("h");
        assert_eq!(s.guests.len(), 2);
        let g = s.guest("g").unwrap();
        assert_eq!(g.state, GuestState::Running);
        assert_eq!(g.exits.get("hlt"), 1);
        assert_eq!(s.guest("h").unwrap().state, GuestState::Loading);
    }

    #[test]
    fn state_names_are_distinct() {
        let names: Vec<_> = GuestState::ALL.iter().map(|s| s.name()).collect();
        for (i, a) in names.iter().enumerate() {
            assert!(!names[i + 1..].contains(a));
        }
        assert_eq!(HypervisorStats::new().tunables, Tunables::default());
    }
}
