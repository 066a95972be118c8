//! One host of a COLO pair as a sans-IO state machine: [`ColoNode`].
//!
//! The driver (`node` in the hypervisor, the simulation in `tests/colo_sim.rs`) owns the guest,
//! the NICs, the replication-link socket and the snapshot code. It feeds [`Event`]s (with the
//! current [`Tick`], 1 tick = 1 ms) into [`ColoNode::handle`], calls
//! [`ColoNode::handle_timeout`] when [`ColoNode::poll_timeout`] says so, carries out every
//! [`Action`] from [`ColoNode::poll_action`] in order, and copies link bytes out with
//! [`ColoNode::poll_transmit`] whenever the socket has room. Nothing here does I/O or reads a
//! clock.
//!
//! # Epochs
//! Checkpoint `n` covers everything the PVM did in *epoch* `n`. The capture point of checkpoint
//! `n` is the moment the node emits [`Action::Capture`] for it: from then on the PVM runs in epoch
//! `n + 1`. Every mirrored client frame, disk write and SVM output frame on the link carries the
//! epoch it belongs to. The secondary's SVM runs in epoch `a + 1` after applying checkpoint `a`;
//! it gets mirrored frames of exactly that epoch (later ones wait in a bounded backlog until the
//! checkpoint that starts their epoch is applied, earlier ones are obsolete: the checkpoint
//! already holds their effect). The primary compares SVM output of epoch `a + 1` with PVM output
//! produced after capture `a` ([`rules::epoch_of_svm_output`]).
//!
//! # Rules, each in one place
//! - **Consistency** ([`rules::may_release`]): a PVM frame reaches clients only when the
//!   comparator matched it against SVM output, or when the secondary acknowledged a checkpoint
//!   whose capture point follows the frame.
//! - **Input durability**: the comparator holds a PVM frame acknowledging client bytes until the
//!   SVM acknowledged them too; a committed checkpoint covers them otherwise.
//! - **Epochs**: above.
//! - **All-or-nothing apply** (secondary): a checkpoint is buffered whole by the
//!   [`CheckpointDecoder`] and handed to the driver ([`Action::ApplyCheckpoint`]) only after its
//!   own commit record, its CRC and the link's commit message check out. A stream cut part-way
//!   is dropped; the SVM never sees a byte of it.
//! - **Never stall**: a refused or lost checkpoint is aborted (held output stays held) and the
//!   secondary is brought back by a full sync, after which checkpoints resume.
//!
//! # Connections and full sync
//! Every (re)connection starts with a [`Repr::Hello`] each way, then a full sync: the primary
//! captures the whole guest (RAM, disk, vCPU and device state), the secondary drops what it had
//! and loads it. Anything lost with the previous connection (mirrored input, disk writes, a
//! checkpoint stream) is thereby covered. During the full sync the PVM stays paused (the
//! driver's [`FullSyncSource`] may read the live, paused guest instead of copying it).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::block::{BlockBackend, BlockError, BlockReplica, MemDisk, SECTOR_SIZE};
use super::checkpoint::{CheckpointDecoder, Feed, StagedCheckpoint, StreamLimits};
use super::comparator::{CheckpointRequest, ComparatorLimits, ComparatorStats, OutputComparator};
use super::link::{
    LinkDecoder, LinkError, LinkRole, NackReason, Repr, StateKind, MAX_CHUNK, MAX_DISK_WRITE, MAX_FRAME,
};
use super::rewriter::{ChecksumFix, SequenceRewriter};

/// Time in milliseconds, as the driver's clock reads it.
pub type Tick = u64;

/// Which host this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    /// Runs the PVM, faces clients.
    Primary,
    /// Runs the SVM, never talks to clients.
    Secondary,
}

/// Tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig {
    /// Primary or secondary.
    pub role: NodeRole,
    /// This host's id (sent in the hello).
    pub host_id: u64,
    /// Identity of the guest (image and guest configuration): both hosts must agree.
    pub guest_id: u64,
    /// Pair generation.
    pub generation: u64,
    /// Periodic checkpoint interval in ms (0 = none).
    pub checkpoint_ms: Tick,
    /// A held PVM frame older than this asks for a checkpoint.
    pub compare_timeout_ms: Tick,
    /// Heartbeat interval on the link.
    pub heartbeat_ms: Tick,
    /// Nothing heard from the peer for this long: close the link.
    pub peer_timeout_ms: Tick,
    /// Primary: a sent checkpoint not acknowledged within this long: close the link.
    pub ack_timeout_ms: Tick,
    /// `checkpoint_verify`: the commit carries a digest of RAM and disk, the secondary checks it.
    pub verify: bool,
    /// Checkpoint / full-sync bytes per link message (at most [`MAX_CHUNK`]).
    pub chunk_bytes: usize,
    /// Bytes of small messages (mirrored frames, SVM output, disk writes) queued for the link
    /// above which new input is refused (primary: client frames are dropped before the PVM
    /// sees them; secondary: SVM output is dropped, which the comparator turns into a
    /// checkpoint).
    pub max_link_queue_bytes: usize,
    /// Mirrored bytes the secondary holds for epochs its SVM has not reached yet; the primary
    /// drops client input rather than send more than this ahead.
    pub max_backlog_bytes: usize,
    /// Primary: PVM disk bytes in one epoch above which a (pressure) checkpoint is taken.
    /// Secondary: twice this is the cap on pending PVM writes.
    pub max_disk_epoch_bytes: usize,
    /// Comparator limits (its timeout and periodic fields are set from the fields above).
    pub comparator: ComparatorLimits,
    /// Checkpoint stream limits (secondary's decoder).
    pub stream_limits: StreamLimits,
    /// Secondary: translate SVM TCP sequence numbers to the PVM's.
    pub rewrite_seq: bool,
}

impl NodeConfig {
    /// Defaults for a guest of `guest_frames` 4 KiB pages.
    pub fn new(role: NodeRole, guest_frames: u64) -> Self {
        Self {
            role,
            host_id: 0,
            guest_id: 0,
            generation: 1,
            checkpoint_ms: 2000,
            compare_timeout_ms: 100,
            heartbeat_ms: 100,
            peer_timeout_ms: 1000,
            ack_timeout_ms: 5000,
            verify: false,
            chunk_bytes: 32 * 1024,
            max_link_queue_bytes: 4 << 20,
            max_backlog_bytes: 4 << 20,
            max_disk_epoch_bytes: 8 << 20,
            comparator: ComparatorLimits::default(),
            stream_limits: StreamLimits::for_guest(guest_frames),
            rewrite_seq: true,
        }
    }
}

/// Why a checkpoint was taken (index into [`NodeStats::checkpoints_by_cause`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// PVM and SVM output differed.
    Mismatch,
    /// A held frame waited longer than `compare_timeout_ms`.
    Timeout,
    /// A queue limit was crossed.
    Pressure,
    /// `checkpoint_ms` elapsed.
    Periodic,
    /// The operator asked ([`NodeCommand::Checkpoint`]).
    Manual,
    /// A full sync (new connection, or a checkpoint refused).
    FullSync,
}

impl Cause {
    /// Every cause, in counter order.
    pub const ALL: [Cause; 6] =
        [Self::Mismatch, Self::Timeout, Self::Pressure, Self::Periodic, Self::Manual, Self::FullSync];

    /// Counter index.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name for status and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mismatch => "mismatch",
            Self::Timeout => "timeout",
            Self::Pressure => "pressure",
            Self::Periodic => "periodic",
            Self::Manual => "manual",
            Self::FullSync => "full_sync",
        }
    }

    fn of(r: CheckpointRequest) -> Self {
        match r {
            CheckpointRequest::PayloadMismatch { .. } => Self::Mismatch,
            CheckpointRequest::HeldFrameTimeout { .. } => Self::Timeout,
            CheckpointRequest::MemoryPressure { .. } => Self::Pressure,
            CheckpointRequest::Periodic => Self::Periodic,
        }
    }
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeCommand {
    /// Primary: take a checkpoint now (`ctl checkpoint`).
    Checkpoint,
}

/// A checkpoint stream the driver encoded (or can encode on demand) after a capture. The node
/// reads it in chunks as link space allows and drops it when the checkpoint is acknowledged or
/// aborted.
pub trait StreamSource {
    /// Total stream length.
    fn stream_len(&self) -> u64;
    /// Copies stream bytes from `offset` into `buf`; returns how many (at least 1 while
    /// `offset < stream_len()`).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> usize;
}

impl StreamSource for Vec<u8> {
    fn stream_len(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> usize {
        let at = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - at);
        buf[..n].copy_from_slice(&self[at..at + n]);
        n
    }
}

/// One piece of a full sync, written by a [`FullSyncSource`] into the buffer it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPiece {
    /// `len` bytes of guest RAM at guest-physical `offset`.
    Memory {
        /// Offset.
        offset: u64,
        /// Bytes written into the buffer.
        len: usize,
    },
    /// `len` bytes (whole sectors) of disk from `sector`.
    Disk {
        /// First sector.
        sector: u64,
        /// Bytes written into the buffer.
        len: usize,
    },
    /// A vCPU or device state blob of `len` bytes.
    State {
        /// Which.
        kind: StateKind,
        /// vCPU index or device id.
        id: u64,
        /// Layout tag.
        tag: u32,
        /// Bytes written into the buffer.
        len: usize,
    },
}

/// The whole guest, read piece by piece while the PVM is paused (never built as one buffer).
pub trait FullSyncSource {
    /// Guest RAM bytes.
    fn ram_bytes(&self) -> u64;
    /// Disk sectors.
    fn disk_sectors(&self) -> u64;
    /// Writes the next piece into `buf` (at most `buf.len()` bytes; disk pieces whole
    /// sectors) and describes it; `None` when everything was read.
    fn next_piece(&mut self, buf: &mut [u8]) -> Option<SyncPiece>;
}

/// What a capture produced.
pub enum Capture {
    /// An incremental checkpoint stream (`colo::checkpoint` format).
    Checkpoint(Box<dyn StreamSource>),
    /// The whole guest.
    Full(Box<dyn FullSyncSource>),
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Checkpoint(s) => write!(f, "Checkpoint({} bytes)", s.stream_len()),
            Self::Full(s) => write!(f, "Full({} RAM bytes, {} sectors)", s.ram_bytes(), s.disk_sectors()),
        }
    }
}

/// What [`Action::Capture`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureKind {
    /// Dirty pages since the last capture, vCPU and device state.
    Incremental,
    /// Everything (full sync); the driver may return a source that reads the paused guest.
    Full,
}

/// Why the driver must keep the local VM from running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// Secondary: no consistent state yet (waiting for a full sync).
    NotSynced,
    /// Primary: held output or queued link bytes reached a limit and no checkpoint can free
    /// them yet.
    Backpressure,
    /// Primary: a full sync is reading the paused guest.
    FullSync,
}

/// Why the driver could not apply a checkpoint or full sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyFailure {
    /// Guest memory refused it (`checkpoint::ApplyError`).
    Memory,
    /// A vCPU or device refused its state.
    State,
}

/// Inputs.
#[derive(Debug)]
pub enum Event<'a> {
    /// Primary: a client frame addressed to the guest.
    ClientFrame(&'a [u8]),
    /// The local VM sent a frame (PVM output on the primary, SVM output on the secondary).
    GuestOutput(&'a [u8]),
    /// The local VM wrote the disk. Primary: the driver already wrote its disk; the node
    /// replicates the write. Secondary: the node writes it to the SVM overlay.
    GuestDiskWrite {
        /// First sector.
        sector: u64,
        /// Whole sectors.
        data: &'a [u8],
    },
    /// The replication link connected (primary: connect finished; secondary: accepted).
    LinkConnected,
    /// Bytes arrived on the replication link.
    LinkBytes(&'a [u8]),
    /// The replication link closed (either side, or after [`Action::CloseLink`]).
    LinkClosed,
    /// Primary: [`Action::Capture`] is done: the PVM is paused and its state copied.
    CaptureDone {
        /// Epoch from the action.
        epoch: u64,
        /// The stream or full-sync source.
        capture: Capture,
        /// Digest of RAM and disk at the capture point (`None` with verify off).
        digest: Option<u64>,
        /// How long the PVM was paused for the capture, µs.
        pause_us: u64,
        /// Pages captured.
        pages: u64,
    },
    /// Primary: the capture failed; the PVM is paused as it was.
    CaptureFailed {
        /// Epoch from the action.
        epoch: u64,
    },
    /// Secondary: [`Action::ApplyCheckpoint`] or [`Action::FinishFullSync`] is done.
    ApplyDone {
        /// Epoch.
        epoch: u64,
        /// The digest of RAM and disk after the apply (`None` with verify off), or why it failed.
        result: Result<Option<u64>, ApplyFailure>,
        /// How long the apply took, µs.
        apply_us: u64,
    },
    /// Operator command.
    Command(NodeCommand),
}

/// Outputs, carried out by the driver in order.
#[derive(Debug)]
pub enum Action {
    /// Hand this frame to the local VM's NIC (primary: a client frame; secondary: a mirrored one).
    DeliverToGuest(Vec<u8>),
    /// Primary: send this PVM frame to the clients.
    ReleaseToClients(Vec<u8>),
    /// Primary: pause the PVM and capture it; answer with [`Event::CaptureDone`] (or
    /// [`Event::CaptureFailed`]). The PVM stays paused until [`Action::ResumeVm`].
    Capture {
        /// Epoch this capture closes.
        epoch: u64,
        /// What to capture.
        kind: CaptureKind,
    },
    /// Let the local VM run.
    ResumeVm,
    /// Keep the local VM from running until [`Action::ResumeVm`].
    PauseVm(PauseReason),
    /// Secondary: the VM is paused; apply this verified checkpoint all-or-nothing (the pages,
    /// the SVM's own dirty pages back to the checkpoint cache's content, device state, vCPU
    /// reset), then answer [`Event::ApplyDone`]. The node has already committed the epoch's
    /// disk writes (so the digest covers them).
    ApplyCheckpoint(StagedCheckpoint),
    /// Secondary: a full sync starts; pause the SVM and forget its state.
    BeginFullSync {
        /// Epoch the sync establishes.
        epoch: u64,
        /// Guest RAM bytes that will follow.
        ram_bytes: u64,
    },
    /// Secondary: guest RAM bytes of the full sync.
    SyncMemory {
        /// Guest-physical offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Secondary: a vCPU or device state of the full sync.
    SyncState {
        /// Which.
        kind: StateKind,
        /// Index or id.
        id: u64,
        /// Layout tag.
        tag: u32,
        /// Blob.
        data: Vec<u8>,
    },
    /// Secondary: the full sync is complete (disk already written by the node); load the
    /// states, reset the vCPU, answer [`Event::ApplyDone`].
    FinishFullSync {
        /// Epoch.
        epoch: u64,
    },
    /// Close the replication link (the driver reports [`Event::LinkClosed`] and reconnects).
    CloseLink,
    /// Reserved for failover (issue #12): stop the VM and all output.
    Fence,
    /// Reserved for failover (issue #12): the SVM becomes the primary.
    Promote,
}

/// Counters for management.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Checkpoints started, by [`Cause::index`].
    pub checkpoints_by_cause: [u64; 6],
    /// Checkpoints (and full syncs) acknowledged / committed.
    pub checkpoints_committed: u64,
    /// Checkpoints aborted (link lost, refused).
    pub checkpoints_aborted: u64,
    /// Full syncs completed.
    pub full_syncs: u64,
    /// Last and total PVM pause per capture, µs (fed by the driver).
    pub pause_us_last: u64,
    /// Total of pause µs.
    pub pause_us_total: u64,
    /// Last transfer time (capture done to ack), µs (ms resolution).
    pub transfer_us_last: u64,
    /// Total of transfer µs.
    pub transfer_us_total: u64,
    /// Last apply time, µs (fed by the driver; secondary).
    pub apply_us_last: u64,
    /// Total of apply µs.
    pub apply_us_total: u64,
    /// Pages in the last checkpoint.
    pub pages_last: u64,
    /// Pages in all checkpoints.
    pub pages_total: u64,
    /// Stream bytes of the last checkpoint.
    pub bytes_last: u64,
    /// Stream bytes of all checkpoints.
    pub bytes_total: u64,
    /// Client frames mirrored to the secondary.
    pub mirrored_frames: u64,
    /// Client frames dropped because the link queue or the secondary's backlog was full.
    pub input_dropped: u64,
    /// SVM frames sent (secondary) or received (primary).
    pub svm_frames: u64,
    /// SVM frames dropped (secondary: queue full or no link; primary: wrong epoch).
    pub svm_frames_dropped: u64,
    /// PVM disk writes replicated (primary) or buffered (secondary).
    pub disk_writes: u64,
    /// Link errors by [`LinkError::index`].
    pub link_errors: [u64; 8],
    /// Protocol errors (well-formed messages that make no sense here), each closing the link.
    pub protocol_errors: u64,
    /// Link connections.
    pub link_connects: u64,
    /// Link closures.
    pub link_closes: u64,
    /// Checkpoints refused, by `NackReason` wire order.
    pub nacks: [u64; 6],
    /// Verify failures (digest after apply differs).
    pub verify_failures: u64,
    /// Checkpoints not acknowledged in time.
    pub ack_timeouts: u64,
    /// Disk errors (secondary block replica).
    pub disk_errors: u64,
    /// Failover messages received (ignored until issue #12).
    pub failover_messages: u64,
}

impl NodeStats {
    /// Total link errors.
    pub fn link_errors_total(&self) -> u64 {
        self.link_errors.iter().sum()
    }
}

/// State of the link as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection.
    Down,
    /// Connected, hellos not exchanged yet.
    Handshake,
    /// Full sync running.
    Syncing,
    /// COLO running.
    Colo,
}

/// A status snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Role.
    pub role: NodeRole,
    /// Link.
    pub link: LinkState,
    /// Primary: the epoch the PVM runs in. Secondary: the epoch the SVM runs in.
    pub epoch: u64,
    /// Last committed (acknowledged) checkpoint.
    pub committed: u64,
    /// Counters.
    pub stats: NodeStats,
    /// Comparator counters (primary).
    pub comparator: ComparatorStats,
}

/// The rules, as functions, so each has one place.
pub mod rules {
    /// **Epochs**: the epoch SVM output must carry to be compared on the primary: the one after
    /// the last acknowledged checkpoint.
    pub fn epoch_of_svm_output(last_acked: u64) -> u64 {
        last_acked + 1
    }

    /// **Epochs** (secondary): what to do with a mirrored frame of `frame_epoch` when the SVM
    /// runs in `svm_epoch`.
    pub fn mirrored_frame(frame_epoch: u64, svm_epoch: u64) -> MirrorFate {
        use core::cmp::Ordering::*;
        match frame_epoch.cmp(&svm_epoch) {
            Equal => MirrorFate::Deliver,
            Greater => MirrorFate::Backlog,
            Less => MirrorFate::Obsolete,
        }
    }

    /// See [`mirrored_frame`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MirrorFate {
        /// Give it to the SVM now.
        Deliver,
        /// Keep it until the SVM reaches its epoch.
        Backlog,
        /// Drop it: an applied checkpoint already holds its effect.
        Obsolete,
    }

    /// **Consistency**: a held PVM frame may go to clients only when the comparator matched it
    /// (`matched`) or an acknowledged checkpoint captured after it covers it
    /// (`frame_epoch <= acked`).
    pub fn may_release(matched: bool, frame_epoch: u64, acked: u64) -> bool {
        matched || frame_epoch <= acked
    }
}

/// Where the primary's checkpoint stands.
enum Ckpt {
    Idle,
    /// Capture action emitted, waiting for `CaptureDone`.
    Capturing {
        epoch: u64,
        full: bool,
        cause: Cause,
    },
    /// Streaming an incremental checkpoint.
    Sending {
        epoch: u64,
        source: Box<dyn StreamSource>,
        offset: u64,
        len: u64,
        digest: Option<u64>,
        since: Tick,
    },
    /// Streaming a full sync.
    Syncing {
        epoch: u64,
        source: Box<dyn FullSyncSource>,
        digest: Option<u64>,
        since: Tick,
    },
    /// Everything sent, waiting for the ack.
    AwaitAck {
        epoch: u64,
        full: bool,
        digest: Option<u64>,
        since: Tick,
        sent_at: Tick,
    },
}

/// Per-connection state.
struct Conn {
    decoder: LinkDecoder,
    /// Encoded small messages, FIFO.
    control: VecDeque<Vec<u8>>,
    control_bytes: usize,
    /// The message being copied out (bulk or control), and how much of it went already.
    current: Vec<u8>,
    current_sent: usize,
    /// Alternate lanes when both have data.
    bulk_turn: bool,
    hello_received: bool,
    /// Primary: the full sync of this connection was captured (mirroring on); secondary: a
    /// full sync arrived on this connection.
    sync_started: bool,
    /// The secondary acknowledged a full sync on this connection (primary), or the
    /// secondary's SVM is consistent (secondary).
    synced: bool,
    tx_seq: u64,
    rx_seq_frames: u64,
    rx_seq_svm: u64,
    last_rx: Tick,
    last_tx: Tick,
}

impl Conn {
    fn new(now: Tick) -> Self {
        Self {
            decoder: LinkDecoder::new(),
            control: VecDeque::new(),
            control_bytes: 0,
            current: Vec::new(),
            current_sent: 0,
            bulk_turn: false,
            hello_received: false,
            sync_started: false,
            synced: false,
            tx_seq: 0,
            rx_seq_frames: 0,
            rx_seq_svm: 0,
            last_rx: now,
            last_tx: now,
        }
    }

    fn queue(&mut self, repr: &Repr<'_>, now: Tick) {
        let mut v = Vec::with_capacity(repr.buffer_len());
        if repr.emit_to_vec(&mut v).is_some() {
            self.control_bytes += v.len();
            self.control.push_back(v);
            let _ = now;
        }
    }
}

/// A secondary's disk: the replica, or the raw disk while a full sync writes it.
enum Disk<D: BlockBackend> {
    Replica(BlockReplica<D>),
    Raw(D),
    Gone,
}

/// Secondary state.
struct Secondary<D: BlockBackend> {
    disk: Disk<D>,
    rewriter: SequenceRewriter,
    /// Last applied checkpoint (the SVM runs in `applied + 1`); meaningful when synced.
    applied: u64,
    synced: bool,
    /// A full sync in progress: its epoch.
    sync_epoch: Option<u64>,
    /// Receiving checkpoint: epoch, decoder, bytes so far, the verified result once complete.
    receiving: Option<(u64, CheckpointDecoder, u64, Option<StagedCheckpoint>)>,
    /// Applying (checkpoint or full sync): epoch, expected digest.
    applying: Option<(u64, Option<u64>, bool)>,
    /// Mirrored frames of later epochs.
    backlog: VecDeque<(u64, Vec<u8>)>,
    backlog_bytes: usize,
}

/// Primary state.
struct Primary {
    comparator: OutputComparator,
    ckpt: Ckpt,
    /// The epoch the PVM runs in.
    epoch: u64,
    /// Last acknowledged checkpoint.
    acked: u64,
    manual: bool,
    disk_epoch_bytes: usize,
    /// Mirrored bytes sent since the last acknowledged capture (the secondary's worst backlog).
    ahead_bytes: usize,
    last_commit: Tick,
    held_since: Option<Tick>,
    paused_for: Option<PauseReason>,
}

/// One host of a COLO pair. See the module documentation.
pub struct ColoNode<D: BlockBackend = MemDisk> {
    config: NodeConfig,
    conn: Option<Conn>,
    actions: VecDeque<Action>,
    stats: NodeStats,
    primary: Option<Primary>,
    secondary: Option<Secondary<D>>,
    scratch: Vec<u8>,
    last_heartbeat: Tick,
}

impl<D: BlockBackend> fmt::Debug for ColoNode<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ColoNode").field("role", &self.config.role).field("stats", &self.stats).finish()
    }
}

impl ColoNode<MemDisk> {
    /// A primary (its disk stays with the driver).
    pub fn primary(config: NodeConfig, now: Tick) -> Self {
        Self::build(NodeConfig { role: NodeRole::Primary, ..config }, None, now)
    }
}

impl<D: BlockBackend> ColoNode<D> {
    /// A secondary owning the SVM's disk (read it with [`ColoNode::svm_disk_read`]). The SVM
    /// stays paused until a full sync arrives.
    pub fn secondary(config: NodeConfig, disk: D, now: Tick) -> Self {
        Self::build(NodeConfig { role: NodeRole::Secondary, ..config }, Some(disk), now)
    }

    fn build(mut config: NodeConfig, disk: Option<D>, now: Tick) -> Self {
        config.chunk_bytes = config.chunk_bytes.clamp(SECTOR_SIZE, MAX_CHUNK) & !(SECTOR_SIZE - 1);
        let mut node = ColoNode {
            config,
            conn: None,
            actions: VecDeque::new(),
            stats: NodeStats::default(),
            primary: None,
            secondary: None,
            scratch: vec![0; config.chunk_bytes],
            last_heartbeat: now,
        };
        match (config.role, disk) {
            (NodeRole::Primary, _) => {
                let limits = ComparatorLimits {
                    held_frame_timeout: config.compare_timeout_ms,
                    periodic_ticks: 0,
                    ..config.comparator
                };
                node.primary = Some(Primary {
                    comparator: OutputComparator::new(limits),
                    ckpt: Ckpt::Idle,
                    epoch: 1,
                    acked: 0,
                    manual: false,
                    disk_epoch_bytes: 0,
                    ahead_bytes: 0,
                    last_commit: now,
                    held_since: None,
                    paused_for: None,
                });
            }
            (NodeRole::Secondary, disk) => {
                let max_pending = config.max_disk_epoch_bytes.saturating_mul(2);
                node.secondary = Some(Secondary {
                    disk: disk.map_or(Disk::Gone, |d| Disk::Replica(BlockReplica::new(d, max_pending))),
                    rewriter: SequenceRewriter::new(ChecksumFix::Incremental),
                    applied: 0,
                    synced: false,
                    sync_epoch: None,
                    receiving: None,
                    applying: None,
                    backlog: VecDeque::new(),
                    backlog_bytes: 0,
                });
                node.actions.push_back(Action::PauseVm(PauseReason::NotSynced));
            }
        }
        node
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Status for management.
    pub fn status(&self) -> NodeStatus {
        let link = match &self.conn {
            None => LinkState::Down,
            Some(c) if !c.hello_received => LinkState::Handshake,
            Some(c) if !c.synced => LinkState::Syncing,
            Some(_) => LinkState::Colo,
        };
        let (epoch, committed, comparator) = match (&self.primary, &self.secondary) {
            (Some(p), _) => (p.epoch, p.acked, p.comparator.stats().clone()),
            (_, Some(s)) => (s.applied + 1, s.applied, ComparatorStats::default()),
            _ => (0, 0, ComparatorStats::default()),
        };
        NodeStatus { role: self.config.role, link, epoch, committed, stats: self.stats.clone(), comparator }
    }

    /// Secondary: the SVM reads its disk (overlay first, then the disk; pending PVM writes are
    /// invisible).
    pub fn svm_disk_read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        match self.secondary.as_ref().map(|s| &s.disk) {
            Some(Disk::Replica(r)) => r.svm_read(sector, buf),
            Some(Disk::Raw(d)) => read_raw(d, sector, buf),
            _ => Err(BlockError::Backend { sector }),
        }
    }

    /// Secondary: the disk as committed (for the verify digest and tests).
    pub fn secondary_disk(&self) -> Option<&D> {
        match self.secondary.as_ref().map(|s| &s.disk) {
            Some(Disk::Replica(r)) => Some(r.disk()),
            Some(Disk::Raw(d)) => Some(d),
            _ => None,
        }
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`ColoNode::handle_timeout`] next (`None`: only on events).
    pub fn poll_timeout(&self) -> Option<Tick> {
        let mut t: Option<Tick> = None;
        let mut at = |x: Tick| t = Some(t.map_or(x, |y: Tick| y.min(x)));
        if let Some(c) = &self.conn {
            if self.config.heartbeat_ms > 0 {
                at(self.last_heartbeat + self.config.heartbeat_ms);
            }
            if self.config.peer_timeout_ms > 0 {
                at(c.last_rx + self.config.peer_timeout_ms);
            }
        }
        if let Some(p) = &self.primary {
            if let Some(s) = p.held_since {
                at(s + self.config.compare_timeout_ms);
            }
            if self.config.checkpoint_ms > 0 {
                at(p.last_commit + self.config.checkpoint_ms);
            }
            if let Ckpt::AwaitAck { sent_at, .. } = p.ckpt {
                at(sent_at + self.config.ack_timeout_ms);
            }
        }
        t
    }

    /// Time passed: heartbeats, peer and ack timeouts, checkpoint triggers.
    pub fn handle_timeout(&mut self, now: Tick) {
        self.timers(now);
    }

    /// Feed one event.
    pub fn handle(&mut self, now: Tick, event: Event<'_>) {
        match event {
            Event::ClientFrame(f) => self.on_client_frame(now, f),
            Event::GuestOutput(f) => self.on_guest_output(now, f),
            Event::GuestDiskWrite { sector, data } => self.on_disk_write(now, sector, data),
            Event::LinkConnected => self.on_connected(now),
            Event::LinkBytes(b) => self.on_link_bytes(now, b),
            Event::LinkClosed => self.on_closed(now),
            Event::CaptureDone { epoch, capture, digest, pause_us, pages } => {
                self.on_capture_done(now, epoch, capture, digest, pause_us, pages)
            }
            Event::CaptureFailed { epoch } => self.on_capture_failed(now, epoch),
            Event::ApplyDone { epoch, result, apply_us } => self.on_apply_done(now, epoch, result, apply_us),
            Event::Command(NodeCommand::Checkpoint) => {
                if let Some(p) = &mut self.primary {
                    p.manual = true;
                }
            }
        }
        self.timers(now);
    }

    /// Copies link bytes into `buf` (the socket's free space) and returns how many. Checkpoint
    /// and full-sync bytes are read from their source only as space allows.
    pub fn poll_transmit(&mut self, now: Tick, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some(c) = &mut self.conn else { break };
            if c.current_sent == c.current.len() {
                c.current.clear();
                c.current_sent = 0;
                if !self.next_message(now) {
                    break;
                }
            }
            let Some(c) = &mut self.conn else { break };
            let k = (c.current.len() - c.current_sent).min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&c.current[c.current_sent..c.current_sent + k]);
            c.current_sent += k;
            c.last_tx = now;
            n += k;
        }
        if n > 0 {
            self.timers(now);
        }
        n
    }

    /// True when link bytes are waiting for [`ColoNode::poll_transmit`].
    pub fn wants_transmit(&self) -> bool {
        let Some(c) = &self.conn else { return false };
        if c.current_sent < c.current.len() || !c.control.is_empty() {
            return true;
        }
        matches!(self.primary.as_ref().map(|p| &p.ckpt), Some(Ckpt::Sending { .. } | Ckpt::Syncing { .. }))
    }
}

fn read_raw<D: BlockBackend>(d: &D, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
    if buf.is_empty() || buf.len() % SECTOR_SIZE != 0 {
        return Err(BlockError::Misaligned { len: buf.len() });
    }
    for (i, chunk) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let mut tmp = [0u8; SECTOR_SIZE];
        d.read_sector(sector + i as u64, &mut tmp)?;
        chunk.copy_from_slice(&tmp);
    }
    Ok(())
}

// The logic.
impl<D: BlockBackend> ColoNode<D> {
    fn on_client_frame(&mut self, _now: Tick, _f: &[u8]) {}
    fn on_guest_output(&mut self, _now: Tick, _f: &[u8]) {}
    fn on_disk_write(&mut self, _now: Tick, _sector: u64, _data: &[u8]) {}
    fn on_connected(&mut self, _now: Tick) {}
    fn on_link_bytes(&mut self, _now: Tick, _b: &[u8]) {}
    fn on_closed(&mut self, _now: Tick) {}
    fn on_capture_done(
        &mut self,
        _now: Tick,
        _epoch: u64,
        _capture: Capture,
        _digest: Option<u64>,
        _pause_us: u64,
        _pages: u64,
    ) {
    }
    fn on_capture_failed(&mut self, _now: Tick, _epoch: u64) {}
    fn on_apply_done(&mut self, _now: Tick, _epoch: u64, _r: Result<Option<u64>, ApplyFailure>, _us: u64) {}
    fn timers(&mut self, _now: Tick) {}
    fn next_message(&mut self, _now: Tick) -> bool {
        false
    }
}

#[allow(dead_code)]
const _USED: (usize, usize, LinkRole, NackReason, Option<LinkError>, Option<Feed>) =
    (MAX_DISK_WRITE, MAX_FRAME, LinkRole::Primary, NackReason::BadStream, None, None);
