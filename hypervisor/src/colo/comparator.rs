//! The output comparator: the primary's gatekeeper between the VMs and the clients.
//!
//! Every frame the PVM sends toward clients is pushed with [`OutputComparator::push_pvm`] and
//! *held*; every frame the SVM sends (over the replication link, never to clients) is pushed with
//! [`OutputComparator::push_svm`]. A held PVM frame is *released* (drained with
//! [`OutputComparator::drain_released`]) once the SVM has produced everything it carries; a
//! disagreement, a held frame that waits too long, memory pressure or the periodic timer make the
//! comparator ask for a checkpoint ([`CheckpointRequest`]).
//!
//! # Epochs
//! When the primary captures a checkpoint it calls [`OutputComparator::mark_capture`] at the
//! capture instant. The returned [`CaptureMark`] records the frame order and, per connection,
//! the PVM's stream position, anchor and control state at that instant. Output the PVM produces
//! after the mark belongs to the next epoch: it is held (never released by the pending
//! checkpoint), and its bytes are not compared past the marked position until the checkpoint is
//! decided. Once the secondary acknowledges, [`OutputComparator::on_checkpoint_committed`]
//! releases exactly the frames before the mark and re-bases every connection from the marked
//! state; the later frames are then compared with what the SVM produces after it applied the
//! checkpoint. If the checkpoint fails, [`OutputComparator::on_checkpoint_aborted`] releases
//! nothing and comparison goes on as if no mark had been taken: a later checkpoint covers the
//! held frames. One capture is outstanding at a time (a new mark abandons an older one).
//!
//! The COLO rules this module implements each live in one function, with a doc comment that
//! starts with "**COLO rule**":
//! - TCP stream comparison by offset: [`TcpConn::feed`] and [`TcpConn::compare_pending`];
//! - ISN / offset learning: [`Side::learn_anchor`];
//! - connection incarnations on a reused 4-tuple: [`Side::starts_new_incarnation`];
//! - keep-alive probes: [`Side::is_keepalive_probe`];
//! - control (SYN/FIN/RST) comparison: [`TcpConn::check_controls`];
//! - when a held TCP frame (data, control, pure ACK, window update) may be released:
//!   [`TcpNeed::satisfied`];
//! - datagram comparison: [`OutputComparator::push_datagram`];
//! - per-flow release order: [`OutputComparator::release_ready`];
//! - never drop a frame, pressure becomes a checkpoint: [`OutputComparator::check_pressure`];
//! - checkpoint triggers and their priority: [`OutputComparator::poll`];
//! - the capture point: [`OutputComparator::mark_capture`];
//! - what a committed checkpoint does: [`OutputComparator::on_checkpoint_committed`].
//!
//! Memory: held PVM frames are copied into buffers recycled through a pool (up to
//! `max_held_frames` of them) and indexed by a slot table reserved up front; TCP bytes waiting
//! for the other side live in per-connection `VecDeque`s that are reused; out-of-order TCP
//! pieces and unmatched SVM datagrams are copied into their own `Vec`s. All of it is bounded by
//! [`ComparatorLimits`] through the pressure rule (crossing a limit asks for a checkpoint, whose
//! commit frees everything before its mark).
//!
//! Caller contract: SVM frames pushed after `on_checkpoint_committed` must come from the SVM
//! *after* it applied that checkpoint (the replication link delivers in order, and the secondary
//! acknowledges a checkpoint only after it applied it, so every SVM frame produced before the
//! apply reaches the comparator before the commit).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use super::packet::{parse_frame_with, ChecksumPolicy, FlowKey, FrameClass, ParseError, TcpFlags};
pub use super::time::Tick;

/// Most live incarnations (connections on one reused 4-tuple) a flow keeps between two
/// checkpoints; one more asks for a checkpoint ([`PressureResource::Incarnations`]).
pub const MAX_INCARNATIONS: usize = 4;

/// Resource limits. Crossing one asks for a checkpoint; it never drops a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComparatorLimits {
    /// Held PVM frames above which a checkpoint is requested.
    pub max_held_frames: usize,
    /// Bytes (held PVM frames + buffered unmatched SVM output) above which a checkpoint is
    /// requested.
    pub max_held_bytes: usize,
    /// Tracked flows (TCP connections and datagram flows) above which a checkpoint is requested.
    pub max_connections: usize,
    /// A held frame older than this many ticks requests a checkpoint.
    pub held_frame_timeout: u64,
    /// Ticks between periodic checkpoints (0 = no periodic checkpoints).
    pub periodic_ticks: u64,
    /// Per-connection bytes of already-matched stream kept to re-compare retransmissions.
    pub retransmit_history: usize,
    /// Whether parsing verifies checksums.
    pub checksums: ChecksumPolicy,
}

impl Default for ComparatorLimits {
    fn default() -> Self {
        ComparatorLimits {
            max_held_frames: 4096,
            max_held_bytes: 4 << 20,
            max_connections: 1024,
            held_frame_timeout: 100,
            periodic_ticks: 0,
            retransmit_history: 16 << 10,
            checksums: ChecksumPolicy::Verify,
        }
    }
}

/// Which limit was crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureResource {
    /// [`ComparatorLimits::max_held_frames`].
    HeldFrames,
    /// [`ComparatorLimits::max_held_bytes`].
    HeldBytes,
    /// [`ComparatorLimits::max_connections`].
    Connections,
    /// [`MAX_INCARNATIONS`] connections on one 4-tuple within one epoch.
    Incarnations,
}

/// Why the comparator wants a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointRequest {
    /// PVM and SVM output differ on `conn` at stream `offset` (TCP: bytes after the ISN, the
    /// first data byte is offset 0; SYN differences are reported at 0, FIN/RST at their
    /// position).
    PayloadMismatch {
        /// The flow.
        conn: FlowKey,
        /// First differing stream offset.
        offset: u64,
    },
    /// The oldest held frame of `conn` has waited `age` ticks.
    HeldFrameTimeout {
        /// The flow (or [`FlowKey::OPAQUE`] for frames of untracked flows).
        conn: FlowKey,
        /// Its age in ticks.
        age: u64,
    },
    /// A limit was crossed.
    MemoryPressure {
        /// Which limit.
        resource: PressureResource,
        /// Current use.
        used: usize,
        /// The limit.
        limit: usize,
    },
    /// The periodic timer expired.
    Periodic,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// PVM frame held until the SVM matches it (or a checkpoint commits).
    Held,
    /// PVM frame released at once (it is in the release queue).
    Released,
    /// SVM frame fully matched PVM output already seen.
    Matched,
    /// SVM frame buffered, waiting for the PVM's output.
    Buffered,
    /// SVM frame not compared: its flow already diverged or is untracked; the coming checkpoint
    /// replaces the SVM's state anyway.
    Discarded,
    /// Frame accepted (PVM frames are always kept), and a checkpoint is needed.
    CheckpointRequired(CheckpointRequest),
}

/// The capture point of one checkpoint, from [`OutputComparator::mark_capture`]. Hand it back
/// to [`OutputComparator::on_checkpoint_committed`] or
/// [`OutputComparator::on_checkpoint_aborted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureMark {
    id: u64,
    order: u64,
}

impl CaptureMark {
    /// Sequence number of this mark (the comparator's own count, starting at 0).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Number of PVM frames pushed before the capture (frames `0..frames_before()` in push
    /// order belong to this checkpoint's epoch).
    pub fn frames_before(&self) -> u64 {
        self.order
    }
}

/// A commit or abort named a mark that is not the outstanding one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkError {
    /// The mark was already committed or aborted, or a newer mark replaced it.
    NotOutstanding {
        /// The mark given.
        mark: u64,
        /// The outstanding mark, if any.
        outstanding: Option<u64>,
    },
}

impl fmt::Display for MarkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOutstanding { mark, outstanding: Some(o) } => {
                write!(f, "capture mark {mark} is not outstanding, expected mark {o}")
            }
            Self::NotOutstanding { mark, outstanding: None } => {
                write!(f, "capture mark {mark} is not outstanding, expected no commit or abort (no mark outstanding)")
            }
        }
    }
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComparatorStats {
    /// PVM frames pushed.
    pub pvm_frames: u64,
    /// SVM frames pushed.
    pub svm_frames: u64,
    /// PVM frames released to clients.
    pub released_frames: u64,
    /// Bytes of released PVM frames.
    pub released_bytes: u64,
    /// Frames released because a checkpoint committed.
    pub released_by_checkpoint: u64,
    /// TCP stream bytes matched between PVM and SVM (each byte counted once).
    pub compared_bytes: u64,
    /// TCP bytes re-sent below the matched frontier (re-compared where history allows).
    pub retransmitted_bytes: u64,
    /// Retransmitted bytes older than the history that could not be re-compared.
    pub uncompared_retransmitted_bytes: u64,
    /// TCP keep-alive probes seen (their garbage byte is not compared).
    pub keepalive_probes: u64,
    /// TCP connections started on a 4-tuple that already had one (new ISN or after a reset).
    pub incarnations: u64,
    /// Datagrams matched.
    pub matched_datagrams: u64,
    /// SVM frames discarded (diverged or untracked flow).
    pub svm_discarded_frames: u64,
    /// Opaque PVM frames.
    pub opaque_pvm_frames: u64,
    /// Opaque SVM frames.
    pub opaque_svm_frames: u64,
    /// Opaque frames by reason, indexed by [`ParseError::index`].
    pub parse_errors: [u64; ParseError::ALL.len()],
    /// Mismatches detected.
    pub mismatches: u64,
    /// Held-frame timeouts detected.
    pub timeouts: u64,
    /// Limit crossings detected.
    pub pressure_events: u64,
    /// Periodic checkpoint requests.
    pub periodic_requests: u64,
    /// Checkpoints committed.
    pub checkpoints_committed: u64,
    /// Checkpoints aborted.
    pub checkpoints_aborted: u64,
    /// Currently held PVM frames.
    pub held_frames: usize,
    /// Bytes of currently held PVM frames.
    pub held_bytes: usize,
    /// Bytes of SVM output buffered unmatched.
    pub svm_buffered_bytes: usize,
    /// Tracked flows.
    pub connections: usize,
}

/// Per-side TCP state (PVM or SVM) of one connection incarnation.
#[derive(Debug, Default)]
struct Side {
    /// (sequence number, stream offset) pair that maps this side's sequence space to offsets.
    anchor: Option<(u32, u64)>,
    /// ISN of this side's SYN.
    isn: Option<u32>,
    /// SYN seen, with whether it carried ACK.
    syn: Option<bool>,
    /// Offset of the FIN.
    fin: Option<u64>,
    /// Offset of the RST.
    rst: Option<u64>,
    /// Highest acknowledgement number sent (client sequence space).
    max_ack: Option<u32>,
    /// Highest data end offset seen (segments without payload do not count).
    high: u64,
    /// Unmatched bytes contiguous from the connection's `matched` offset.
    pend: VecDeque<u8>,
    /// Unmatched bytes beyond a gap: (start offset, bytes); may overlap each other.
    ooo: Vec<(u64, Vec<u8>)>,
}

impl Side {
    /// The scalar state (anchor, controls, position) without buffered bytes.
    fn snapshot(&self) -> Side {
        Side {
            anchor: self.anchor,
            isn: self.isn,
            syn: self.syn,
            fin: self.fin,
            rst: self.rst,
            max_ack: self.max_ack,
            high: self.high,
            pend: VecDeque::new(),
            ooo: Vec::new(),
        }
    }

    /// **COLO rule (offset learning)**: stream offset 0 is the first data byte. A side learns
    /// its ISN from its SYN / SYN-ACK (offset 0 = ISN + 1). On a connection with no SYN since
    /// the last commit (older than the join or the last checkpoint), the SVM is a copy of the
    /// PVM, so both sides use the same sequence numbers: a side first seen mid-connection takes
    /// the other side's anchor if it has one (offset difference 0), and only otherwise anchors
    /// on its own first segment (which the other side then shares). So a retransmission that
    /// happens to be one side's first segment cannot shift the comparison. The PVM/SVM sequence
    /// offset of a connection is the difference of the two anchors
    /// ([`OutputComparator::seq_offset`]). A committed checkpoint copies the PVM's anchor to the
    /// SVM (the SVM now *is* the PVM).
    fn learn_anchor(&mut self, seq: u32, syn: bool, other: &Side) {
        if self.anchor.is_some() {
            return;
        }
        self.anchor = Some(if syn {
            self.isn = Some(seq);
            (seq.wrapping_add(1), 0)
        } else if other.syn.is_none() {
            other.anchor.unwrap_or((seq, 0))
        } else {
            (seq, 0)
        });
    }

    /// **COLO rule (incarnations)**: a 4-tuple can carry one connection after another. A
    /// segment starts a fresh connection (incarnation) on its side when that side already reset
    /// this one (anything after an RST, including another RST), or when it is a SYN that is not
    /// a retransmission of this side's own SYN: a SYN with a different ISN, a SYN after this
    /// side's FIN, or a SYN on a connection this side was seen on mid-stream. Each incarnation is
    /// compared on its own, so the old connection's SVM SYN, ACKs and bytes never satisfy the
    /// new one's.
    fn starts_new_incarnation(&self, seq: u32, flags: TcpFlags) -> bool {
        if self.rst.is_some() {
            return true;
        }
        if flags.contains(TcpFlags::SYN) {
            if self.fin.is_some() {
                return true;
            }
            return match self.isn {
                Some(isn) => isn != seq,
                None => self.anchor.is_some(),
            };
        }
        false
    }

    /// **COLO rule (keep-alive probe)**: a TCP keep-alive probe is a segment at `snd_nxt - 1`
    /// with no data (Linux) or one garbage byte (smoltcp, Windows). The byte is not stream data
    /// (the client already has the byte at that position and discards it), so it is not
    /// compared; the probe is released like a pure ACK. It is recognised only when the byte it
    /// sits on is already matched (`start < matched`), so the probe can never carry a byte the
    /// client has not received from matched output first.
    fn is_keepalive_probe(&self, start: i64, len: usize, flags: TcpFlags, matched: u64) -> bool {
        len == 1
            && !flags.intersects(TcpFlags::SYN | TcpFlags::FIN | TcpFlags::RST)
            && start + 1 == self.high as i64
            && start < matched as i64
    }

    /// Stream offset of `seq` (negative: before offset 0). Anchor must be known.
    fn offset(&self, seq: u32) -> i64 {
        let (aseq, aoff) = self.anchor.unwrap_or((seq, 0));
        aoff as i64 + i64::from(seq.wrapping_sub(aseq) as i32)
    }

    /// Move the anchor forward so 32-bit wraparound never confuses [`Side::offset`].
    fn advance_anchor(&mut self, end: u64) {
        if let Some((aseq, aoff)) = self.anchor {
            if end > aoff + (1 << 30) {
                self.anchor = Some((aseq.wrapping_add((end - aoff) as u32), end));
            }
        }
    }

    fn buffered(&self) -> usize {
        self.pend.len() + self.ooo.iter().map(|(_, v)| v.len()).sum::<usize>()
    }

    /// Moves out-of-order pieces the pending bytes now reach into `pend`; returns the offset
    /// of a self-inconsistency.
    fn merge_ooo(&mut self, matched: u64) -> Option<u64> {
        loop {
            let pend_end = matched + self.pend.len() as u64;
            let i = self.ooo.iter().position(|(o, _)| *o <= pend_end)?;
            let (o, v) = self.ooo.swap_remove(i);
            if let Some(off) = TcpConn::insert(self, matched, o, &v) {
                return Some(off);
            }
        }
    }
}

/// What a held PVM TCP frame waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpNeed {
    /// Incarnation the frame belongs to.
    inc: u32,
    data_end: u64,
    syn: Option<bool>,
    fin: Option<u64>,
    rst: Option<u64>,
    ack: Option<u32>,
}

impl TcpNeed {
    /// **COLO rule (TCP release)**: a held PVM TCP frame is released when everything it tells
    /// the client is something the SVM has told it too, in the same connection incarnation:
    /// - its payload: all stream bytes up to its end are matched;
    /// - SYN: the SVM sent a SYN with the same ACK flag (SYN vs SYN-ACK);
    /// - FIN: the SVM sent a FIN at the same offset and all bytes before it matched;
    /// - RST: the SVM sent an RST at the same offset;
    /// - its acknowledgement number (data segments, pure ACKs and window updates alike): the SVM
    ///   has acknowledged at least as far. Releasing an ACK the SVM has not sent would let the
    ///   client discard data the SVM may never have received, which a failover would lose.
    ///
    /// The advertised window is not compared: it is flow control, not state a client can lose,
    /// and TCP tolerates a window that shrinks after failover. So a pure ACK or window update is
    /// released as soon as its ACK is not ahead of the SVM's and the frames before it in its flow
    /// are released (see [`OutputComparator::release_ready`]).
    fn satisfied(&self, tc: &TcpConn) -> bool {
        self.data_end <= tc.matched
            && self.syn.is_none_or(|a| tc.svm.syn == Some(a))
            && self.fin.is_none_or(|f| tc.svm.fin == Some(f) && tc.matched >= f)
            && self.rst.is_none_or(|r| tc.svm.rst == Some(r))
            && self.ack.is_none_or(|a| tc.svm.max_ack.is_some_and(|m| m.wrapping_sub(a) as i32 >= 0))
    }
}

/// Per-incarnation TCP comparison state.
#[derive(Debug, Default)]
struct TcpConn {
    pvm: Side,
    svm: Side,
    /// Every stream byte before this offset was produced identically by both sides (or is
    /// covered by a committed checkpoint).
    matched: u64,
    /// The last matched bytes, ending at `matched`, for re-comparing retransmissions.
    history: VecDeque<u8>,
    /// While a capture is outstanding: the PVM's stream position at the mark (0 for
    /// incarnations the PVM started after it). Bytes past it belong to the next epoch and are
    /// not compared until the checkpoint commits or aborts.
    cap: Option<u64>,
}

/// All connection incarnations of one TCP 4-tuple that are still referenced.
#[derive(Debug)]
struct TcpFlow {
    /// Incarnations `base..base + incs.len()`.
    incs: VecDeque<TcpConn>,
    base: u32,
    /// Incarnation the PVM's / SVM's segments currently go to.
    pvm_inc: u32,
    svm_inc: u32,
}

impl TcpFlow {
    fn new(cap: Option<u64>) -> Self {
        let mut incs = VecDeque::with_capacity(1);
        incs.push_back(TcpConn { cap, ..TcpConn::default() });
        TcpFlow { incs, base: 0, pvm_inc: 0, svm_inc: 0 }
    }

    fn inc(&self, n: u32) -> Option<&TcpConn> {
        self.incs.get(n.checked_sub(self.base)? as usize)
    }

    fn inc_mut(&mut self, n: u32) -> Option<&mut TcpConn> {
        self.incs.get_mut(n.checked_sub(self.base)? as usize)
    }

    /// Forget incarnations nothing refers to any more (both sides moved on, no held frame,
    /// not the outstanding mark's).
    fn collect(&mut self, oldest_held: Option<u32>, marked: Option<u32>) {
        let mut keep = self.pvm_inc.min(self.svm_inc);
        if let Some(h) = oldest_held {
            keep = keep.min(h);
        }
        if let Some(m) = marked {
            keep = keep.min(m);
        }
        while self.base < keep && self.incs.len() > 1 {
            self.incs.pop_front();
            self.base += 1;
        }
    }
}

/// Outcome of feeding bytes: counters and an optional mismatch offset.
#[derive(Debug, Default)]
struct FeedResult {
    mismatch: Option<u64>,
    retransmitted: u64,
    uncompared: u64,
    compared: u64,
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        None
    } else {
        a.iter().zip(b).position(|(x, y)| x != y)
    }
}

fn deque_diff(d: &VecDeque<u8>, start: usize, data: &[u8]) -> Option<usize> {
    let (a, b) = d.as_slices();
    let mut i = 0;
    while i < data.len() {
        let idx = start + i;
        let (src, off) = if idx < a.len() { (a, idx) } else { (b, idx - a.len()) };
        let n = (src.len() - off).min(data.len() - i);
        if let Some(p) = first_diff(&src[off..off + n], &data[i..i + n]) {
            return Some(i + p);
        }
        i += n;
    }
    None
}

impl TcpConn {
    fn side(&mut self, pvm: bool) -> &mut Side {
        if pvm {
            &mut self.pvm
        } else {
            &mut self.svm
        }
    }

    /// **COLO rule (TCP byte streams)**: payload is placed by stream offset, so how either side
    /// segments its output never matters. Bytes below the matched frontier are a retransmission:
    /// they are re-compared against the retained history (not counted again); older ones were
    /// matched or checkpointed already and pass. Bytes this side already sent but the other has
    /// not matched yet are compared against that side's own earlier copy. New bytes are buffered
    /// (out-of-order ones beyond a gap until the gap fills) for [`TcpConn::compare_pending`].
    fn feed(&mut self, pvm: bool, start: i64, mut data: &[u8]) -> FeedResult {
        let mut r = FeedResult::default();
        let mut s = start;
        // Part before offset 0 (before the ISN this comparator knows): nothing to compare.
        if s < 0 {
            let skip = ((-s) as usize).min(data.len());
            data = &data[skip..];
            s += skip as i64;
            r.uncompared += skip as u64;
        }
        let matched = self.matched as i64;
        if s < matched && !data.is_empty() {
            let old_end = (s + data.len() as i64).min(matched);
            let hist_start = matched - self.history.len() as i64;
            r.retransmitted += (old_end - s) as u64;
            let cmp_start = s.max(hist_start);
            if cmp_start < old_end {
                let part = &data[(cmp_start - s) as usize..(old_end - s) as usize];
                if let Some(p) = deque_diff(&self.history, (cmp_start - hist_start) as usize, part) {
                    r.mismatch = Some((cmp_start + p as i64) as u64);
                    return r;
                }
            }
            r.uncompared += (cmp_start.min(old_end) - s) as u64;
            data = &data[(old_end - s) as usize..];
            s = old_end;
        }
        if data.is_empty() {
            return r;
        }
        let side = self.side(pvm);
        let s = s as u64;
        if let Some(off) = Self::insert(side, matched as u64, s, data) {
            r.mismatch = Some(off);
            return r;
        }
        // Merge out-of-order pieces the new bytes made contiguous.
        r.mismatch = side.merge_ooo(matched as u64);
        r
    }

    /// Put `data` at offset `s` (>= matched) into `side`'s pending bytes; returns the offset of a
    /// self-inconsistency (the side re-sent different bytes at an offset).
    fn insert(side: &mut Side, matched: u64, s: u64, data: &[u8]) -> Option<u64> {
        let pend_end = matched + side.pend.len() as u64;
        if s > pend_end {
            side.ooo.push((s, data.to_vec()));
            return None;
        }
        let rel = (s - matched) as usize;
        let overlap = (side.pend.len() - rel).min(data.len());
        if let Some(p) = deque_diff(&side.pend, rel, &data[..overlap]) {
            return Some(s + p as u64);
        }
        side.pend.extend(&data[overlap..]);
        None
    }

    /// **COLO rule (TCP byte streams, comparison)**: the bytes both sides have produced past the
    /// matched frontier are compared; equal bytes advance the frontier (and enter the retransmit
    /// history), the first differing byte is a mismatch at its stream offset. While a capture is
    /// outstanding the frontier stops at the PVM's marked position: later PVM bytes belong to
    /// the next epoch and are compared only with the SVM's output after it applied the
    /// checkpoint (or, if the checkpoint aborts, with the SVM's output as it is).
    fn compare_pending(&mut self, hist_cap: usize) -> FeedResult {
        let mut r = FeedResult::default();
        let mut n = self.pvm.pend.len().min(self.svm.pend.len());
        if let Some(cap) = self.cap {
            n = n.min(cap.saturating_sub(self.matched) as usize);
        }
        if n == 0 {
            return r;
        }
        let a = &self.pvm.pend.make_contiguous()[..n];
        let b = &self.svm.pend.make_contiguous()[..n];
        let eq = match first_diff(a, b) {
            None => n,
            Some(p) => {
                r.mismatch = Some(self.matched + p as u64);
                p
            }
        };
        if hist_cap > 0 {
            let keep = eq.min(hist_cap);
            self.history.extend(&a[eq - keep..eq]);
            let excess = self.history.len().saturating_sub(hist_cap);
            self.history.drain(..excess);
        }
        self.pvm.pend.drain(..eq);
        self.svm.pend.drain(..eq);
        self.matched += eq as u64;
        r.compared = eq as u64;
        r
    }

    /// **COLO rule (TCP control)**: SYN (with or without ACK), FIN and RST are compared by
    /// position: both SYNs must agree on the ACK flag (reported at offset 0); FINs and RSTs must
    /// sit at the same offset; data past the other side's FIN is a mismatch at the FIN (a FIN
    /// takes one sequence number, so a segment without data at FIN + 1, such as the final ACK,
    /// is not data past it).
    fn check_controls(&self) -> Option<u64> {
        let (p, s) = (&self.pvm, &self.svm);
        if let (Some(a), Some(b)) = (p.syn, s.syn) {
            if a != b {
                return Some(0);
            }
        }
        if let (Some(a), Some(b)) = (p.fin, s.fin) {
            if a != b {
                return Some(a.min(b));
            }
        }
        if let Some(f) = p.fin {
            if s.high > f {
                return Some(f);
            }
        }
        if let Some(f) = s.fin {
            if p.high > f {
                return Some(f);
            }
        }
        if let (Some(a), Some(b)) = (p.rst, s.rst) {
            if a != b {
                return Some(a.min(b));
            }
        }
        None
    }

    /// Compare what both sides have (unless the flow diverged); returns the mismatch offset.
    fn compare_all(&mut self, hist_cap: usize, stats: &mut ComparatorStats) -> Option<u64> {
        let c = self.compare_pending(hist_cap);
        stats.compared_bytes += c.compared;
        c.mismatch.or_else(|| self.check_controls())
    }

    /// The checkpoint captured at `mark` (the PVM side of this incarnation at the capture)
    /// committed: the SVM side becomes the marked PVM side, the matched frontier moves to the
    /// marked position, and PVM bytes from before the mark leave the pending buffers (into the
    /// retransmit history where contiguous). PVM bytes after the mark stay pending, to be
    /// compared with the SVM's post-apply output.
    fn rebase_to(&mut self, mark: &Side, hist_cap: usize) {
        let target = mark.high.max(self.matched);
        let p = &mut self.pvm;
        let contiguous_end = self.matched + p.pend.len() as u64;
        if contiguous_end >= target {
            let n = (target - self.matched) as usize;
            if hist_cap > 0 {
                self.history.extend(p.pend.range(..n));
                let excess = self.history.len().saturating_sub(hist_cap);
                self.history.drain(..excess);
            }
            p.pend.drain(..n);
        } else {
            self.history.clear();
            p.pend.clear();
        }
        p.ooo.retain_mut(|(o, v)| {
            let end = *o + v.len() as u64;
            if end <= target {
                return false;
            }
            if *o < target {
                v.drain(..(target - *o) as usize);
                *o = target;
            }
            true
        });
        self.matched = target;
        // Cannot fail: the pieces are the PVM's own bytes, already checked against each other.
        let _ = p.merge_ooo(target);
        self.svm = mark.snapshot();
        self.cap = None;
    }

    /// This incarnation lies wholly after the capture (for the PVM): the SVM's pre-apply state in
    /// it is forgotten.
    fn reset_svm(&mut self) {
        self.svm = Side::default();
        self.cap = None;
    }

    fn closed(&self) -> bool {
        self.pvm.rst.is_some() || self.pvm.fin.is_some()
    }
}

/// Per-flow datagram state.
#[derive(Debug, Default)]
struct DgramConn {
    /// SVM datagram contents not matched by a PVM datagram yet.
    svm_unmatched: VecDeque<Vec<u8>>,
}

#[derive(Debug)]
enum ConnState {
    Tcp(Box<TcpFlow>),
    Dgram(DgramConn),
}

/// The PVM's state of a TCP flow at the outstanding capture.
#[derive(Debug)]
struct TcpMark {
    /// The PVM's incarnation at the capture.
    inc: u32,
    /// Its PVM side at the capture (no buffered bytes).
    pvm: Side,
}

#[derive(Debug)]
struct Conn {
    /// Held PVM frames of this flow, oldest first (slot indices).
    held: VecDeque<u32>,
    state: ConnState,
    /// A mismatch was found: nothing more is compared or released until a checkpoint commits.
    diverged: bool,
    /// The PVM's state at the outstanding capture (TCP flows that existed at the capture).
    mark: Option<TcpMark>,
}

impl Conn {
    fn svm_buffered(&self) -> usize {
        match &self.state {
            ConnState::Tcp(t) => t.incs.iter().map(|i| i.svm.buffered()).sum(),
            ConnState::Dgram(d) => d.svm_unmatched.iter().map(Vec::len).sum(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Tcp(TcpNeed),
    Datagram {
        matched: bool,
    },
    /// Frame of an untracked flow (connection table full, or too many incarnations): waits for
    /// a checkpoint captured after it.
    Checkpoint,
}

#[derive(Debug)]
struct HeldFrame {
    data: Vec<u8>,
    arrived: Tick,
    order: u64,
    content: Range<usize>,
    need: Need,
}

/// The per-connection output comparator. See the module documentation.
#[derive(Debug)]
pub struct OutputComparator {
    limits: ComparatorLimits,
    conns: BTreeMap<FlowKey, Conn>,
    slots: Vec<Option<HeldFrame>>,
    free_slots: Vec<u32>,
    /// Frames of untracked flows, oldest first.
    overflow: VecDeque<u32>,
    released: VecDeque<u32>,
    pool: Vec<Vec<u8>>,
    next_order: u64,
    request: Option<CheckpointRequest>,
    epoch_start: Option<Tick>,
    /// The capture whose checkpoint is not decided yet.
    outstanding: Option<CaptureMark>,
    next_mark: u64,
    stats: ComparatorStats,
}

impl OutputComparator {
    /// A comparator with the given limits; queues are reserved up front.
    pub fn new(limits: ComparatorLimits) -> Self {
        let frames = limits.max_held_frames.min(1 << 16);
        OutputComparator {
            limits,
            conns: BTreeMap::new(),
            slots: Vec::with_capacity(frames),
            free_slots: Vec::with_capacity(frames),
            overflow: VecDeque::new(),
            released: VecDeque::with_capacity(frames),
            pool: Vec::with_capacity(frames),
            next_order: 0,
            request: None,
            epoch_start: None,
            outstanding: None,
            next_mark: 0,
            stats: ComparatorStats::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &ComparatorLimits {
        &self.limits
    }

    /// Counters.
    pub fn stats(&self) -> &ComparatorStats {
        &self.stats
    }

    /// Number of released frames not drained yet.
    pub fn released_pending(&self) -> usize {
        self.released.len()
    }

    /// The checkpoint request recorded so far (mismatch, pressure, timeout), if any.
    pub fn pending_request(&self) -> Option<CheckpointRequest> {
        self.request
    }

    /// The capture whose checkpoint is not committed or aborted yet.
    pub fn outstanding_mark(&self) -> Option<CaptureMark> {
        self.outstanding
    }

    /// `svm_seq - pvm_seq` (mod 2^32) for the SVM's current incarnation of a TCP connection
    /// whose both anchors are known. The [`super::rewriter::SequenceRewriter`]'s delta
    /// (`pvm - svm`) is its negation: `set_delta(conn, offset.wrapping_neg())`.
    pub fn seq_offset(&self, conn: &FlowKey) -> Option<u32> {
        match &self.conns.get(conn)?.state {
            ConnState::Tcp(flow) => {
                let t = flow.inc(flow.svm_inc)?;
                let (ps, po) = t.pvm.anchor?;
                let (ss, so) = t.svm.anchor?;
                let p0 = ps.wrapping_sub(po as u32);
                let s0 = ss.wrapping_sub(so as u32);
                Some(s0.wrapping_sub(p0))
            }
            ConnState::Dgram(_) => None,
        }
    }

    /// Hand every released PVM frame, in release order, to `out`, and recycle its buffer.
    pub fn drain_released(&mut self, mut out: impl FnMut(&[u8])) {
        while let Some(slot) = self.released.pop_front() {
            if let Some(f) = self.slots[slot as usize].take() {
                out(&f.data);
                self.recycle(slot, f.data);
            }
        }
    }

    /// Take the next released PVM frame (allocating convenience form of
    /// [`OutputComparator::drain_released`]).
    pub fn pop_released(&mut self) -> Option<Vec<u8>> {
        let slot = self.released.pop_front()?;
        let f = self.slots[slot as usize].take()?;
        self.free_slots.push(slot);
        Some(f.data)
    }

    fn recycle(&mut self, slot: u32, buf: Vec<u8>) {
        self.free_slots.push(slot);
        if self.pool.len() < self.limits.max_held_frames.min(1 << 16) {
            self.pool.push(buf);
        }
    }

    fn store(&mut self, frame: &[u8], now: Tick, content: Range<usize>, need: Need) -> u32 {
        let mut data = self.pool.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(frame);
        let held = HeldFrame { data, arrived: now, order: self.next_order, content, need };
        self.next_order += 1;
        self.stats.held_frames += 1;
        self.stats.held_bytes += frame.len();
        match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(held);
                s
            }
            None => {
                self.slots.push(Some(held));
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn release_slot(&mut self, slot: u32) {
        if let Some(f) = &self.slots[slot as usize] {
            self.stats.held_frames -= 1;
            self.stats.held_bytes -= f.data.len();
            self.stats.released_frames += 1;
            self.stats.released_bytes += f.data.len() as u64;
        }
        self.released.push_back(slot);
    }

    fn note_request(&mut self, r: CheckpointRequest) {
        match r {
            CheckpointRequest::PayloadMismatch { .. } => self.stats.mismatches += 1,
            CheckpointRequest::HeldFrameTimeout { .. } => self.stats.timeouts += 1,
            CheckpointRequest::MemoryPressure { .. } => self.stats.pressure_events += 1,
            CheckpointRequest::Periodic => self.stats.periodic_requests += 1,
        }
        if self.request.is_none() {
            self.request = Some(r);
        }
    }

    /// **COLO rule (never drop; pressure becomes a checkpoint)**: limits are checked *after* a
    /// frame is stored. A PVM frame is always kept (storage grows past the reservation if it
    /// must) and the push answers [`Verdict::CheckpointRequired`]; the caller is expected to stop
    /// feeding the PVM's NIC until the checkpoint commits, which releases everything held before
    /// its mark. So no client output is ever lost, and memory stays bounded by the limit plus
    /// what is in flight while the checkpoint is taken. SVM output beyond the limits is likewise
    /// kept (it is only discarded by a committed checkpoint, or when its flow already diverged).
    fn check_pressure(&mut self) -> Option<CheckpointRequest> {
        let l = self.limits;
        let bytes = self.stats.held_bytes + self.stats.svm_buffered_bytes;
        let r = if self.stats.held_frames > l.max_held_frames {
            Some((PressureResource::HeldFrames, self.stats.held_frames, l.max_held_frames))
        } else if bytes > l.max_held_bytes {
            Some((PressureResource::HeldBytes, bytes, l.max_held_bytes))
        } else if self.conns.len() >= l.max_connections && !self.overflow.is_empty() {
            Some((PressureResource::Connections, self.conns.len() + 1, l.max_connections))
        } else {
            None
        };
        r.map(|(resource, used, limit)| CheckpointRequest::MemoryPressure { resource, used, limit })
    }

    fn finish_push(&mut self, own: Option<CheckpointRequest>, ok: Verdict) -> Verdict {
        if let Some(r) = own {
            if self.request != Some(r) {
                self.note_request(r);
            }
            return Verdict::CheckpointRequired(r);
        }
        if let Some(r) = self.check_pressure() {
            if self.request.is_none() {
                self.note_request(r);
            }
            return Verdict::CheckpointRequired(r);
        }
        ok
    }

    fn start_epoch(&mut self, now: Tick) {
        if self.epoch_start.is_none() {
            self.epoch_start = Some(now);
        }
    }

    /// Push a frame the PVM sent toward clients. The frame is copied and held (or released at
    /// once if the SVM already produced everything it carries).
    pub fn push_pvm(&mut self, frame: &[u8], now: Tick) -> Verdict {
        self.start_epoch(now);
        self.stats.pvm_frames += 1;
        self.push(true, frame, now)
    }

    /// Push a frame the SVM sent (arriving over the replication link). It is compared and
    /// buffered as needed, never sent to clients.
    pub fn push_svm(&mut self, frame: &[u8], now: Tick) -> Verdict {
        self.start_epoch(now);
        self.stats.svm_frames += 1;
        self.push(false, frame, now)
    }

    fn push(&mut self, pvm: bool, frame: &[u8], now: Tick) -> Verdict {
        let parsed = parse_frame_with(frame, self.limits.checksums);
        if let Some(e) = parsed.parse_error() {
            self.stats.parse_errors[e.index()] += 1;
            if pvm {
                self.stats.opaque_pvm_frames += 1;
            } else {
                self.stats.opaque_svm_frames += 1;
            }
        }
        let key = parsed.flow;
        if !self.conns.contains_key(&key) {
            if self.conns.len() >= self.limits.max_connections {
                // Untracked flow: keep PVM frames until the checkpoint, ignore SVM frames.
                if pvm {
                    let slot = self.store(frame, now, 0..0, Need::Checkpoint);
                    self.overflow.push_back(slot);
                    return self.finish_push(None, Verdict::Held);
                }
                self.stats.svm_discarded_frames += 1;
                return self.finish_push(None, Verdict::Discarded);
            }
            // A flow first seen while a capture is outstanding lies wholly after the mark.
            let cap = self.outstanding.map(|_| 0);
            let state = match parsed.class {
                FrameClass::Tcp(_) => ConnState::Tcp(Box::new(TcpFlow::new(cap))),
                _ => ConnState::Dgram(DgramConn::default()),
            };
            self.conns.insert(key, Conn { held: VecDeque::new(), state, diverged: false, mark: None });
            self.stats.connections = self.conns.len();
        }
        let diverged = self.conns.get(&key).is_some_and(|c| c.diverged);
        if diverged && !pvm {
            self.stats.svm_discarded_frames += 1;
            return self.finish_push(None, Verdict::Discarded);
        }
        match parsed.class {
            FrameClass::Tcp(seg) => self.push_tcp(pvm, key, frame, &seg, now),
            _ => self.push_datagram(pvm, key, frame, parsed.content, now),
        }
    }

    fn push_tcp(
        &mut self,
        pvm: bool,
        key: FlowKey,
        frame: &[u8],
        seg: &super::packet::TcpSegment,
        now: Tick,
    ) -> Verdict {
        let hist_cap = self.limits.retransmit_history;
        let marking = self.outstanding.is_some();
        let Some(conn) = self.conns.get_mut(&key) else {
            return Verdict::Discarded;
        };
        let before = conn.svm_buffered();
        let diverged = conn.diverged;
        let ConnState::Tcp(flow) = &mut conn.state else {
            // Cannot happen: the protocol is part of the flow key.
            return Verdict::Discarded;
        };
        let flags = seg.flags;
        let syn = flags.contains(TcpFlags::SYN);

        // Which incarnation this segment belongs to.
        let cur = if pvm { flow.pvm_inc } else { flow.svm_inc };
        let starts_new = flow.inc(cur).is_some_and(|tc| {
            let side = if pvm { &tc.pvm } else { &tc.svm };
            side.starts_new_incarnation(seg.seq, flags)
        });
        let mut inc = Some(cur);
        if starts_new {
            let next = cur + 1;
            if flow.inc(next).is_none() {
                if flow.incs.len() >= MAX_INCARNATIONS {
                    inc = None;
                } else {
                    flow.incs.push_back(TcpConn { cap: marking.then_some(0), ..TcpConn::default() });
                    self.stats.incarnations += 1;
                }
            }
            if inc.is_some() {
                inc = Some(next);
                if pvm {
                    flow.pvm_inc = next;
                } else {
                    flow.svm_inc = next;
                }
            }
        }
        let Some(inc) = inc else {
            // Too many connections on this 4-tuple in one epoch: stop comparing it; a
            // checkpoint captured after this frame releases it.
            conn.diverged = true;
            let r = CheckpointRequest::MemoryPressure {
                resource: PressureResource::Incarnations,
                used: MAX_INCARNATIONS + 1,
                limit: MAX_INCARNATIONS,
            };
            if !pvm {
                self.stats.svm_discarded_frames += 1;
                return self.finish_push(Some(r), Verdict::Discarded);
            }
            let slot = self.store(frame, now, 0..0, Need::Checkpoint);
            if let Some(c) = self.conns.get_mut(&key) {
                c.held.push_back(slot);
            }
            return self.finish_push(Some(r), Verdict::Held);
        };
        let Some(tc) = flow.inc_mut(inc) else {
            return Verdict::Discarded;
        };

        let TcpConn { pvm: p, svm: s, matched, .. } = &mut *tc;
        let matched = *matched;
        let (side, other) = if pvm { (p, &*s) } else { (s, &*p) };
        side.learn_anchor(seg.seq, syn, other);
        let data_seq = if syn { seg.seq.wrapping_add(1) } else { seg.seq };
        let start = side.offset(data_seq);
        let mut payload = &frame[seg.payload.clone()];
        let mut probe = false;
        if side.is_keepalive_probe(start, payload.len(), flags, matched) {
            payload = &[];
            probe = true;
        }
        // On a SYN-anchored side, data before the ISN cannot exist: that is a different stream.
        let mut mismatch = (!payload.is_empty() && start < 0 && side.syn.is_some()).then_some(0);
        let end = start + payload.len() as i64;
        if !payload.is_empty() && end > 0 {
            side.high = side.high.max(end as u64);
            side.advance_anchor(end as u64);
        }
        let end_off = end.max(0) as u64;
        if syn {
            side.syn = Some(flags.contains(TcpFlags::ACK));
        }
        if flags.contains(TcpFlags::FIN) && side.fin.is_none() {
            side.fin = Some(end_off);
        }
        if flags.contains(TcpFlags::RST) && side.rst.is_none() {
            side.rst = Some(start.max(0) as u64);
        }
        if flags.contains(TcpFlags::ACK) {
            side.max_ack = Some(match side.max_ack {
                Some(m) if m.wrapping_sub(seg.ack) as i32 >= 0 => m,
                _ => seg.ack,
            });
        }
        let mut fr = FeedResult::default();
        if !diverged {
            fr = tc.feed(pvm, start, payload);
            if fr.mismatch.is_none() {
                let c = tc.compare_pending(hist_cap);
                fr.compared = c.compared;
                fr.mismatch = c.mismatch;
            }
            mismatch = mismatch.or(fr.mismatch).or_else(|| tc.check_controls());
        } else if pvm {
            // A diverged flow still records the PVM's bytes, so that what the PVM sends after
            // the capture can be compared with the SVM once the checkpoint commits.
            let _ = tc.feed(true, start, payload);
        }
        self.stats.keepalive_probes += u64::from(probe);
        self.stats.compared_bytes += fr.compared;
        self.stats.retransmitted_bytes += fr.retransmitted;
        self.stats.uncompared_retransmitted_bytes += fr.uncompared;
        let marked = conn.mark.as_ref().map(|m| m.inc);
        let after = conn.svm_buffered();
        self.stats.svm_buffered_bytes = self.stats.svm_buffered_bytes + after - before;
        let own = mismatch.map(|offset| {
            conn.diverged = true;
            CheckpointRequest::PayloadMismatch { conn: key, offset }
        });
        let own = own.or(if diverged { self.request } else { None });
        let ok = if pvm {
            let need = Need::Tcp(TcpNeed {
                inc,
                data_end: if payload.is_empty() { 0 } else { end_off },
                syn: syn.then(|| flags.contains(TcpFlags::ACK)),
                fin: flags.contains(TcpFlags::FIN).then_some(end_off),
                rst: flags.contains(TcpFlags::RST).then_some(start.max(0) as u64),
                ack: flags.contains(TcpFlags::ACK).then_some(seg.ack),
            });
            let slot = self.store(frame, now, 0..0, need);
            if let Some(c) = self.conns.get_mut(&key) {
                c.held.push_back(slot);
            }
            self.release_ready(&key);
            if self.flow_drained(&key) {
                Verdict::Released
            } else {
                Verdict::Held
            }
        } else {
            self.release_ready(&key);
            let buffered = self.conns.get(&key).is_some_and(|c| c.svm_buffered() > 0);
            if buffered {
                Verdict::Buffered
            } else {
                Verdict::Matched
            }
        };
        self.collect_incarnations(&key, marked);
        self.finish_push(own, ok)
    }

    /// Forget incarnations of `key` nothing refers to any more.
    fn collect_incarnations(&mut self, key: &FlowKey, marked: Option<u32>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let oldest_held = match conn.held.front().and_then(|&s| self.slots[s as usize].as_ref()) {
            None => None,
            Some(HeldFrame { need: Need::Tcp(n), .. }) => Some(n.inc),
            // An untracked-incarnation frame: keep everything until a checkpoint.
            Some(_) => Some(0),
        };
        if let ConnState::Tcp(flow) = &mut conn.state {
            flow.collect(oldest_held, marked);
        }
    }

    /// The flow holds nothing: the frame just pushed (its newest) was released.
    fn flow_drained(&self, key: &FlowKey) -> bool {
        self.conns.get(key).is_none_or(|c| c.held.is_empty())
    }

    /// **COLO rule (datagrams)**: UDP, ICMP, ARP, other IP, IPv4 fragments, other ethertypes and
    /// opaque frames are compared as whole datagrams (their
    /// [`super::packet::ParsedFrame::content`]) within their flow, in any order: a PVM datagram
    /// is matched by the first equal unmatched SVM datagram of the flow and vice versa. A
    /// datagram the SVM never produces is found by the held-frame timeout.
    fn push_datagram(&mut self, pvm: bool, key: FlowKey, frame: &[u8], content: Range<usize>, now: Tick) -> Verdict {
        let body = &frame[content.clone()];
        let Some(conn) = self.conns.get_mut(&key) else {
            return Verdict::Discarded;
        };
        let own = if conn.diverged { self.request } else { None };
        let ConnState::Dgram(dc) = &mut conn.state else {
            return Verdict::Discarded;
        };
        if pvm {
            let pos = dc.svm_unmatched.iter().position(|d| d.as_slice() == body);
            let matched = if let Some(p) = pos {
                if let Some(d) = dc.svm_unmatched.remove(p) {
                    self.stats.svm_buffered_bytes -= d.len();
                }
                self.stats.matched_datagrams += 1;
                true
            } else {
                false
            };
            let slot = self.store(frame, now, content, Need::Datagram { matched });
            if let Some(c) = self.conns.get_mut(&key) {
                c.held.push_back(slot);
            }
            self.release_ready(&key);
            let v = if self.flow_drained(&key) { Verdict::Released } else { Verdict::Held };
            return self.finish_push(own, v);
        }
        let slots = &mut self.slots;
        let hit = conn.held.iter().copied().find(|&s| {
            slots[s as usize]
                .as_ref()
                .is_some_and(|f| f.need == Need::Datagram { matched: false } && &f.data[f.content.clone()] == body)
        });
        let v = match hit {
            Some(s) => {
                if let Some(f) = slots[s as usize].as_mut() {
                    f.need = Need::Datagram { matched: true };
                }
                self.stats.matched_datagrams += 1;
                self.release_ready(&key);
                Verdict::Matched
            }
            None => {
                dc.svm_unmatched.push_back(body.to_vec());
                self.stats.svm_buffered_bytes += body.len();
                Verdict::Buffered
            }
        };
        self.finish_push(None, v)
    }

    /// **COLO rule (release order)**: a flow's held PVM frames leave in the order the PVM sent
    /// them: the oldest is released as soon as its own need is met ([`TcpNeed::satisfied`], or a
    /// matched datagram), then the next, and so on; a frame whose need is met waits behind an
    /// older unmatched one. Nothing is released from a diverged flow before the checkpoint, and
    /// nothing pushed after an outstanding capture mark before that checkpoint is decided.
    fn release_ready(&mut self, key: &FlowKey) {
        let fence = self.outstanding.map(|m| m.order);
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.diverged {
                return;
            }
            let Some(&slot) = conn.held.front() else {
                return;
            };
            let Some(f) = self.slots[slot as usize].as_ref() else {
                conn.held.pop_front();
                continue;
            };
            if fence.is_some_and(|o| f.order >= o) {
                return;
            }
            let ready = match (&f.need, &conn.state) {
                (Need::Tcp(n), ConnState::Tcp(flow)) => flow.inc(n.inc).is_some_and(|tc| n.satisfied(tc)),
                (Need::Datagram { matched }, _) => *matched,
                _ => false,
            };
            if !ready {
                return;
            }
            conn.held.pop_front();
            self.release_slot(slot);
        }
    }

    /// **COLO rule (checkpoint triggers)**: level-triggered; returns a request while one is
    /// needed and no checkpoint has committed since. In priority order: a recorded mismatch or
    /// limit crossing (the first one recorded), current memory pressure, the oldest held frame
    /// older than [`ComparatorLimits::held_frame_timeout`], then the periodic timer (measured
    /// from the first push/poll after the last commit).
    pub fn poll(&mut self, now: Tick) -> Option<CheckpointRequest> {
        self.start_epoch(now);
        if let Some(r) = self.request {
            return Some(r);
        }
        if let Some(r) = self.check_pressure() {
            self.note_request(r);
            return Some(r);
        }
        let mut oldest: Option<(FlowKey, Tick)> = None;
        let mut consider = |k: FlowKey, slot: Option<&u32>, slots: &Vec<Option<HeldFrame>>| {
            if let Some(f) = slot.and_then(|&s| slots[s as usize].as_ref()) {
                if oldest.is_none_or(|(_, t)| f.arrived < t) {
                    oldest = Some((k, f.arrived));
                }
            }
        };
        for (k, c) in &self.conns {
            consider(*k, c.held.front(), &self.slots);
        }
        consider(FlowKey::OPAQUE, self.overflow.front(), &self.slots);
        if let Some((conn, t)) = oldest {
            let age = now.since(t);
            if age >= self.limits.held_frame_timeout {
                let r = CheckpointRequest::HeldFrameTimeout { conn, age };
                self.note_request(r);
                return Some(r);
            }
        }
        if self.limits.periodic_ticks > 0 {
            if let Some(s) = self.epoch_start {
                if now.since(s) >= self.limits.periodic_ticks {
                    self.note_request(CheckpointRequest::Periodic);
                    return Some(CheckpointRequest::Periodic);
                }
            }
        }
        None
    }

    /// **COLO rule (capture point)**: call at the instant the checkpoint's state is captured
    /// (PVM paused). Records the frame order and, for every TCP connection, the PVM's current
    /// incarnation with its anchor, controls and stream position. From now until the checkpoint
    /// is committed or aborted, frames pushed later are held whatever the SVM sends, and PVM
    /// bytes past the marked position are not compared. Marking while another capture is
    /// outstanding abandons that one (as [`OutputComparator::on_checkpoint_aborted`] would).
    pub fn mark_capture(&mut self) -> CaptureMark {
        if let Some(old) = self.outstanding {
            let _ = self.on_checkpoint_aborted(old);
        }
        let mark = CaptureMark { id: self.next_mark, order: self.next_order };
        self.next_mark += 1;
        for c in self.conns.values_mut() {
            let ConnState::Tcp(flow) = &mut c.state else {
                continue;
            };
            let mi = flow.pvm_inc;
            let Some(snap) = flow.inc(mi).map(|tc| tc.pvm.snapshot()) else {
                continue;
            };
            let base = flow.base;
            for (i, tc) in flow.incs.iter_mut().enumerate() {
                let n = base + i as u32;
                tc.cap = match n.cmp(&mi) {
                    core::cmp::Ordering::Less => None,
                    core::cmp::Ordering::Equal => Some(snap.high.max(tc.matched)),
                    core::cmp::Ordering::Greater => Some(tc.matched),
                };
            }
            c.mark = Some(TcpMark { inc: mi, pvm: snap });
        }
        self.outstanding = Some(mark);
        mark
    }

    fn check_mark(&self, mark: CaptureMark) -> Result<(), MarkError> {
        if self.outstanding == Some(mark) {
            Ok(())
        } else {
            Err(MarkError::NotOutstanding { mark: mark.id, outstanding: self.outstanding.map(|m| m.id) })
        }
    }

    fn release_all_ready(&mut self) {
        let keys: Vec<FlowKey> = self.conns.keys().copied().collect();
        for k in &keys {
            self.release_ready(k);
        }
    }

    /// **COLO rule (checkpoint commit)**: call once the secondary acknowledged the checkpoint
    /// captured at `mark`. Held PVM frames pushed before the mark are released in their original
    /// global order (the checkpoint made them the SVM's own history); frames pushed after it
    /// stay held. SVM state (buffered output, divergence) is discarded: SVM frames pushed from
    /// now on come from the SVM after it applied the checkpoint. Each TCP connection is re-based
    /// from its marked state: incarnations the PVM left before the mark are forgotten; in the
    /// marked one the SVM side takes the PVM side's anchor, controls and ACK as they were at
    /// the mark and the matched frontier moves to the PVM's marked position, so PVM bytes sent
    /// after the mark stay pending and are compared with the SVM's post-apply output; in later
    /// incarnations the SVM starts from nothing. Datagrams pushed after the mark must be
    /// matched again. Closed connections, connections the PVM never spoke on and datagram flows
    /// with nothing held are forgotten, and, when the connection table is full, so are idle
    /// TCP connections (a connection seen again later shares the PVM's anchor, see
    /// [`Side::learn_anchor`]). Pending requests and the periodic timer are reset.
    pub fn on_checkpoint_committed(&mut self, mark: CaptureMark) -> Result<(), MarkError> {
        self.check_mark(mark)?;
        self.outstanding = None;
        let fence = mark.order;
        let slots = &self.slots;
        let before = |s: &u32| slots[*s as usize].as_ref().is_some_and(|f| f.order < fence);
        let mut due: Vec<u32> = Vec::with_capacity(self.stats.held_frames);
        while self.overflow.front().is_some_and(before) {
            due.extend(self.overflow.pop_front());
        }
        for c in self.conns.values_mut() {
            while c.held.front().is_some_and(before) {
                due.extend(c.held.pop_front());
            }
        }
        due.sort_unstable_by_key(|&s| slots[s as usize].as_ref().map_or(0, |f| f.order));
        self.stats.released_by_checkpoint += due.len() as u64;
        for s in due {
            self.release_slot(s);
        }
        let hist_cap = self.limits.retransmit_history;
        let forget_idle = self.conns.len() >= self.limits.max_connections || !self.overflow.is_empty();
        let slots = &mut self.slots;
        self.conns.retain(|_, c| {
            c.diverged = false;
            let mark = c.mark.take();
            match &mut c.state {
                ConnState::Dgram(d) => {
                    d.svm_unmatched.clear();
                    for &s in &c.held {
                        if let Some(f) = slots[s as usize].as_mut() {
                            if let Need::Datagram { matched } = &mut f.need {
                                *matched = false;
                            }
                        }
                    }
                    !c.held.is_empty()
                }
                ConnState::Tcp(flow) => {
                    match mark {
                        Some(m) => {
                            while flow.base < m.inc && flow.incs.len() > 1 {
                                flow.incs.pop_front();
                                flow.base += 1;
                            }
                            let base = flow.base;
                            for (i, tc) in flow.incs.iter_mut().enumerate() {
                                if base + i as u32 == m.inc {
                                    tc.rebase_to(&m.pvm, hist_cap);
                                } else {
                                    tc.reset_svm();
                                }
                            }
                            flow.svm_inc = m.inc.max(base);
                            flow.pvm_inc = flow.pvm_inc.max(flow.svm_inc);
                        }
                        None => {
                            for tc in flow.incs.iter_mut() {
                                tc.reset_svm();
                            }
                            flow.svm_inc = flow.base;
                        }
                    }
                    let idle = c.held.is_empty()
                        && flow.incs.len() == 1
                        && flow.incs[0].pvm.pend.is_empty()
                        && flow.incs[0].pvm.ooo.is_empty();
                    let t = &flow.incs[0];
                    !(idle && (t.pvm.anchor.is_none() || t.closed() || forget_idle))
                }
            }
        });
        self.stats.connections = self.conns.len();
        self.stats.svm_buffered_bytes = 0;
        self.stats.checkpoints_committed += 1;
        self.request = None;
        self.epoch_start = None;
        self.release_all_ready();
        Ok(())
    }

    /// The checkpoint captured at `mark` failed (the secondary refused it, the link dropped, a
    /// timeout): nothing is released, every held frame stays held, and comparison carries on
    /// as if the mark had never been taken, so a later checkpoint covers the held output.
    /// Recorded checkpoint requests stay.
    pub fn on_checkpoint_aborted(&mut self, mark: CaptureMark) -> Result<(), MarkError> {
        self.check_mark(mark)?;
        self.outstanding = None;
        self.stats.checkpoints_aborted += 1;
        let hist_cap = self.limits.retransmit_history;
        let mut mismatches: Vec<CheckpointRequest> = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            c.mark = None;
            let ConnState::Tcp(flow) = &mut c.state else {
                continue;
            };
            for tc in flow.incs.iter_mut() {
                tc.cap = None;
                if !c.diverged {
                    if let Some(offset) = tc.compare_all(hist_cap, &mut self.stats) {
                        c.diverged = true;
                        mismatches.push(CheckpointRequest::PayloadMismatch { conn: *k, offset });
                    }
                }
            }
        }
        self.stats.svm_buffered_bytes = self.conns.values().map(Conn::svm_buffered).sum();
        for r in mismatches {
            self.note_request(r);
        }
        self.release_all_ready();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Address, TcpControl, UdpPacket, UdpRepr};

    const SRV: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
    const CLI: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

    fn ip_frame(proto: IpProtocol, l4_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
        crate::colo::frames::ipv4_frame(SRV, CLI, proto, l4_len, fill)
    }

    fn seg(port: u16, seq: u32, ack: Option<u32>, ctl: TcpControl, payload: &[u8]) -> Vec<u8> {
        crate::colo::frames::tcp_v4(
            SRV,
            CLI,
            &crate::colo::frames::tcp_repr((port, 40000), seq, ack, ctl, 1000, payload),
        )
    }

    fn data(seq: u32, payload: &[u8]) -> Vec<u8> {
        seg(80, seq, Some(1), TcpControl::None, payload)
    }

    fn udp(port: u16, payload: &[u8]) -> Vec<u8> {
        ip_frame(IpProtocol::Udp, 8 + payload.len(), |b| {
            let mut u = UdpPacket::new_unchecked(b);
            UdpRepr { src_port: port, dst_port: 9 }.emit(
                &mut u,
                &SRV.into(),
                &CLI.into(),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        })
    }

    fn cmp() -> OutputComparator {
        OutputComparator::new(ComparatorLimits::default())
    }

    /// Capture and commit at once (no pipelining).
    fn commit(c: &mut OutputComparator) {
        let m = c.mark_capture();
        c.on_checkpoint_committed(m).unwrap();
    }

    fn drain(c: &mut OutputComparator) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        c.drain_released(|f| v.push(f.to_vec()));
        v
    }

    #[test]
    fn different_segmentation_matches() {
        let mut c = cmp();
        let stream: Vec<u8> = (0..100u8).collect();
        // PVM: 3 segments; SVM: 2 different ones, different ISN (learnt from the SYN-ACKs).
        let (sp, ss) = (seg(80, 999, Some(1), TcpControl::Syn, b""), seg(80, 4999, Some(1), TcpControl::Syn, b""));
        assert_eq!(c.push_pvm(&sp, Tick(0)), Verdict::Held);
        assert_eq!(c.push_svm(&ss, Tick(0)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![sp]);
        let p = [data(1000, &stream[..30]), data(1030, &stream[30..70]), data(1070, &stream[70..])];
        for f in &p {
            assert_eq!(c.push_pvm(f, Tick(0)), Verdict::Held);
        }
        assert_eq!(c.push_svm(&data(5000, &stream[..50]), Tick(0)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![p[0].clone()]);
        assert_eq!(c.push_svm(&data(5050, &stream[50..]), Tick(0)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![p[1].clone(), p[2].clone()]);
        assert_eq!(c.poll(Tick(1)), None);
        assert_eq!(c.stats().compared_bytes, 100);
        assert_eq!(c.stats().held_frames, 0);
    }

    #[test]
    fn svm_first_releases_pvm_at_once() {
        let mut c = cmp();
        assert_eq!(c.push_svm(&data(100, b"abcdef"), Tick(0)), Verdict::Buffered);
        assert_eq!(c.push_pvm(&data(100, b"abc"), Tick(0)), Verdict::Released);
        assert_eq!(c.push_pvm(&data(103, b"def"), Tick(0)), Verdict::Released);
        assert_eq!(drain(&mut c).len(), 2);
    }

    #[test]
    fn single_byte_mismatch_reports_offset_and_holds() {
        let mut c = cmp();
        let key = crate::colo::packet::parse_frame(&data(1, b"x")).flow;
        c.push_pvm(&data(1, b"hello world"), Tick(0));
        let v = c.push_svm(&data(1, b"hello World"), Tick(0));
        let want = CheckpointRequest::PayloadMismatch { conn: key, offset: 6 };
        assert_eq!(v, Verdict::CheckpointRequired(want));
        assert_eq!(c.poll(Tick(0)), Some(want));
        assert!(drain(&mut c).is_empty());
        // Further output on the diverged flow is held, SVM output discarded.
        assert_eq!(c.push_pvm(&data(12, b"!"), Tick(0)), Verdict::CheckpointRequired(want));
        commit(&mut c);
        assert_eq!(drain(&mut c).len(), 2);
        assert_eq!(c.poll(Tick(1)), None);
    }

    #[test]
    fn retransmission_recompared_not_double_counted() {
        let mut c = cmp();
        c.push_pvm(&data(1, b"abcdef"), Tick(0));
        c.push_svm(&data(1, b"abcdef"), Tick(0));
        assert_eq!(c.stats().compared_bytes, 6);
        // PVM retransmits part of it, overlapping new bytes.
        assert_eq!(c.push_pvm(&data(4, b"defgh"), Tick(0)), Verdict::Held);
        assert_eq!(c.push_svm(&data(7, b"gh"), Tick(0)), Verdict::Matched);
        assert_eq!(c.stats().compared_bytes, 8);
        assert_eq!(c.stats().retransmitted_bytes, 3);
        assert_eq!(drain(&mut c).len(), 2);
        // A "retransmission" with different bytes is a mismatch at that offset.
        let v = c.push_pvm(&data(2, b"XY"), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 1, .. })));
    }

    #[test]
    fn out_of_order_segments() {
        let mut c = cmp();
        c.push_pvm(&data(100, b"ab"), Tick(0));
        c.push_pvm(&data(102, b"cd"), Tick(0));
        c.push_svm(&data(100, b"ab"), Tick(0));
        c.push_svm(&data(104, b"ef"), Tick(0)); // beyond a gap
        assert_eq!(drain(&mut c).len(), 1);
        c.push_pvm(&data(104, b"ef"), Tick(0));
        assert!(drain(&mut c).is_empty());
        c.push_svm(&data(102, b"cd"), Tick(0)); // fills the gap
        assert_eq!(drain(&mut c).len(), 2);
        assert_eq!(c.stats().svm_buffered_bytes, 0);
        assert_eq!(c.poll(Tick(0)), None);
    }

    #[test]
    fn syn_learns_isn_and_offset() {
        let mut c = cmp();
        let synack_p = seg(80, 1000, Some(501), TcpControl::Syn, b"");
        let synack_s = seg(80, 7000, Some(501), TcpControl::Syn, b"");
        assert_eq!(c.push_pvm(&synack_p, Tick(0)), Verdict::Held);
        assert_eq!(c.push_svm(&synack_s, Tick(0)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![synack_p]);
        let key = crate::colo::packet::parse_frame(&synack_s).flow;
        assert_eq!(c.seq_offset(&key), Some(6000));
        c.push_pvm(&data(1001, b"hi"), Tick(0));
        c.push_svm(&data(7001, b"hi"), Tick(0));
        assert_eq!(drain(&mut c).len(), 1);
    }

    #[test]
    fn syn_vs_synack_is_mismatch() {
        let mut c = cmp();
        c.push_pvm(&seg(80, 1, Some(5), TcpControl::Syn, b""), Tick(0));
        let v = c.push_svm(&seg(80, 1, None, TcpControl::Syn, b""), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 0, .. })));
    }

    #[test]
    fn fin_compared_by_position() {
        let mut c = cmp();
        let f = seg(80, 1, Some(1), TcpControl::Fin, b"bye");
        c.push_pvm(&f, Tick(0));
        c.push_svm(&data(1, b"bye"), Tick(0));
        assert!(drain(&mut c).is_empty(), "FIN not matched yet");
        c.push_svm(&seg(80, 4, Some(1), TcpControl::Fin, b""), Tick(0));
        assert_eq!(drain(&mut c), vec![f]);
        // FIN at a different offset.
        let mut c = cmp();
        c.push_pvm(&seg(81, 1, Some(1), TcpControl::Fin, b"bye"), Tick(0));
        let v = c.push_svm(&seg(81, 1, Some(1), TcpControl::Fin, b"by"), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 2, .. })));
        // Data past the other side's FIN.
        let mut c = cmp();
        c.push_pvm(&seg(82, 1, Some(1), TcpControl::Fin, b"ab"), Tick(0));
        let v = c.push_svm(&seg(82, 1, Some(1), TcpControl::None, b"abc"), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 2, .. })));
    }

    #[test]
    fn rst_compared_by_position() {
        let mut c = cmp();
        c.push_pvm(&data(1, b"ab"), Tick(0));
        c.push_svm(&data(1, b"ab"), Tick(0));
        let r = seg(80, 3, None, TcpControl::Rst, b"");
        assert_eq!(c.push_pvm(&r, Tick(0)), Verdict::Held);
        c.push_svm(&seg(80, 3, None, TcpControl::Rst, b""), Tick(0));
        assert_eq!(drain(&mut c).len(), 2);
        let mut c = cmp();
        c.push_pvm(&data(1, b"ab"), Tick(0));
        c.push_svm(&data(1, b"ab"), Tick(0));
        c.push_pvm(&seg(80, 3, None, TcpControl::Rst, b""), Tick(0));
        let v = c.push_svm(&seg(80, 2, None, TcpControl::Rst, b""), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 1, .. })));
    }

    #[test]
    fn pure_ack_waits_for_svm_ack() {
        let mut c = cmp();
        let ack = |a| seg(80, 1, Some(a), TcpControl::None, b"");
        assert_eq!(c.push_pvm(&ack(100), Tick(0)), Verdict::Held);
        c.push_svm(&ack(50), Tick(0));
        assert!(drain(&mut c).is_empty(), "SVM has not acked as far");
        c.push_svm(&ack(100), Tick(0));
        assert_eq!(drain(&mut c).len(), 1);
        // A window update / duplicate ACK not ahead of the SVM's goes at once.
        assert_eq!(c.push_pvm(&ack(90), Tick(0)), Verdict::Released);
        // Data segments carry ACKs too: held until the SVM acks as far.
        assert_eq!(c.push_svm(&seg(80, 1, Some(100), TcpControl::None, b"z"), Tick(0)), Verdict::Buffered);
        assert_eq!(c.push_pvm(&seg(80, 1, Some(120), TcpControl::None, b"z"), Tick(0)), Verdict::Held);
        c.push_svm(&ack(130), Tick(0));
        assert_eq!(drain(&mut c).len(), 2);
    }

    #[test]
    fn datagrams_match_in_any_order() {
        let mut c = cmp();
        let (a, b) = (udp(53, b"one"), udp(53, b"two"));
        assert_eq!(c.push_pvm(&a, Tick(0)), Verdict::Held);
        assert_eq!(c.push_pvm(&b, Tick(0)), Verdict::Held);
        assert_eq!(c.push_svm(&udp(53, b"two"), Tick(0)), Verdict::Matched);
        assert!(drain(&mut c).is_empty(), "order per flow: b waits for a");
        assert_eq!(c.push_svm(&udp(53, b"one"), Tick(0)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![a, b]);
        assert_eq!(c.push_svm(&udp(53, b"three"), Tick(0)), Verdict::Buffered);
        assert_eq!(c.push_pvm(&udp(53, b"three"), Tick(0)), Verdict::Released);
        // Different flow (port) does not match.
        assert_eq!(c.push_pvm(&udp(54, b"x"), Tick(0)), Verdict::Held);
        assert_eq!(c.push_svm(&udp(55, b"x"), Tick(0)), Verdict::Buffered);
        assert_eq!(c.stats().matched_datagrams, 3);
    }

    #[test]
    fn opaque_frames_counted_and_compared() {
        let mut c = cmp();
        let mut bad = data(1, b"abc");
        let n = bad.len();
        bad[n - 1] ^= 0x55;
        assert_eq!(c.push_pvm(&bad, Tick(0)), Verdict::Held);
        assert_eq!(c.stats().opaque_pvm_frames, 1);
        assert_eq!(c.stats().parse_errors[ParseError::TcpChecksum.index()], 1);
        assert_eq!(c.push_svm(&bad, Tick(0)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![bad]);
    }

    #[test]
    fn held_frame_timeout() {
        let mut c = OutputComparator::new(ComparatorLimits { held_frame_timeout: 10, ..ComparatorLimits::default() });
        c.push_pvm(&udp(53, b"lonely"), Tick(5));
        assert_eq!(c.poll(Tick(14)), None);
        let key = crate::colo::packet::parse_frame(&udp(53, b"")).flow;
        assert_eq!(c.poll(Tick(15)), Some(CheckpointRequest::HeldFrameTimeout { conn: key, age: 10 }));
        commit(&mut c);
        assert_eq!(drain(&mut c).len(), 1);
        assert_eq!(c.poll(Tick(100)), None);
    }

    #[test]
    fn pressure_requests_checkpoint_and_keeps_frames() {
        let mut c = OutputComparator::new(ComparatorLimits { max_held_frames: 3, ..ComparatorLimits::default() });
        for i in 0..3 {
            assert_eq!(c.push_pvm(&data(1 + i, b"a"), Tick(0)), Verdict::Held);
        }
        let v = c.push_pvm(&data(4, b"a"), Tick(0));
        let want = CheckpointRequest::MemoryPressure { resource: PressureResource::HeldFrames, used: 4, limit: 3 };
        assert_eq!(v, Verdict::CheckpointRequired(want));
        assert!(matches!(c.push_pvm(&data(5, b"a"), Tick(0)), Verdict::CheckpointRequired(_)));
        assert_eq!(c.stats().held_frames, 5);
        assert_eq!(c.poll(Tick(0)), Some(want));
        commit(&mut c);
        assert_eq!(drain(&mut c).len(), 5);
        // Byte limit.
        let mut c = OutputComparator::new(ComparatorLimits { max_held_bytes: 100, ..ComparatorLimits::default() });
        let v = c.push_svm(&data(1, &[7u8; 120]), Tick(0));
        assert!(matches!(
            v,
            Verdict::CheckpointRequired(CheckpointRequest::MemoryPressure {
                resource: PressureResource::HeldBytes,
                ..
            })
        ));
    }

    #[test]
    fn connection_limit_keeps_untracked_frames() {
        let mut c = OutputComparator::new(ComparatorLimits { max_connections: 1, ..ComparatorLimits::default() });
        c.push_pvm(&udp(1, b"a"), Tick(0));
        let v = c.push_pvm(&udp(2, b"b"), Tick(0));
        assert!(matches!(
            v,
            Verdict::CheckpointRequired(CheckpointRequest::MemoryPressure {
                resource: PressureResource::Connections,
                ..
            })
        ));
        assert_eq!(c.push_svm(&udp(2, b"b"), Tick(0)), Verdict::CheckpointRequired(c.pending_request().unwrap()));
        commit(&mut c);
        assert_eq!(drain(&mut c), vec![udp(1, b"a"), udp(2, b"b")]);
    }

    #[test]
    fn periodic_checkpoint() {
        let mut c = OutputComparator::new(ComparatorLimits { periodic_ticks: 50, ..ComparatorLimits::default() });
        assert_eq!(c.poll(Tick(10)), None);
        assert_eq!(c.poll(Tick(59)), None);
        assert_eq!(c.poll(Tick(60)), Some(CheckpointRequest::Periodic));
        commit(&mut c);
        assert_eq!(c.poll(Tick(61)), None);
        assert_eq!(c.poll(Tick(111)), Some(CheckpointRequest::Periodic));
    }

    #[test]
    fn commit_rebases_connection() {
        let mut c = cmp();
        // The SVM diverges before the checkpoint.
        c.push_pvm(&data(1000, b"abc"), Tick(0));
        c.push_svm(&data(1000, b"abX"), Tick(0));
        assert!(c.pending_request().is_some());
        c.push_pvm(&data(1003, b"def"), Tick(0));
        commit(&mut c);
        assert_eq!(drain(&mut c).len(), 2);
        // After the checkpoint the SVM runs the PVM's state: same sequence numbers.
        assert_eq!(c.push_pvm(&data(1006, b"ghi"), Tick(1)), Verdict::Held);
        assert_eq!(c.push_svm(&data(1006, b"ghi"), Tick(1)), Verdict::Matched);
        assert_eq!(drain(&mut c).len(), 1);
        // A PVM retransmission of checkpointed bytes is released (re-compared with history).
        assert_eq!(c.push_pvm(&data(1003, b"def"), Tick(1)), Verdict::Released);
        assert_eq!(c.poll(Tick(2)), None);
    }

    #[test]
    fn release_order_per_flow_and_global_on_commit() {
        let mut c = cmp();
        let a1 = udp(1, b"a1");
        let b1 = udp(2, b"b1");
        let a2 = udp(1, b"a2");
        c.push_pvm(&a1, Tick(0));
        c.push_pvm(&b1, Tick(0));
        c.push_pvm(&a2, Tick(0));
        c.push_svm(&udp(1, b"a2"), Tick(0));
        assert!(drain(&mut c).is_empty());
        commit(&mut c);
        assert_eq!(drain(&mut c), vec![a1, b1, a2]);
    }

    #[test]
    fn sequence_wraparound() {
        // Mid-stream: both sides share the PVM's anchor, so the SVM's first segment starting
        // at "def" is compared at offset 3, across the wrap.
        let mut c = cmp();
        let start = u32::MAX - 2;
        c.push_pvm(&data(start, b"abcdef"), Tick(0));
        c.push_svm(&data(start.wrapping_add(3), b"def"), Tick(0));
        assert_eq!(c.pending_request(), None);
        c.push_svm(&data(start, b"abc"), Tick(0));
        assert_eq!(drain(&mut c).len(), 1);
        // SYN-anchored, different ISNs, the PVM's stream wraps.
        let mut c = cmp();
        c.push_pvm(&seg(80, start - 1, Some(1), TcpControl::Syn, b""), Tick(0));
        c.push_svm(&seg(80, 6, Some(1), TcpControl::Syn, b""), Tick(0));
        c.push_pvm(&data(start, b"abc"), Tick(0));
        c.push_pvm(&data(start.wrapping_add(3), b"def"), Tick(0));
        c.push_svm(&data(7, b"abcdef"), Tick(0));
        assert_eq!(drain(&mut c).len(), 3);
        assert_eq!(c.pending_request(), None);
    }

    /// Issue 15, item 1: a mismatch, then the capture, then a new PVM datagram (the next
    /// epoch's reply), then the commit: the late datagram is not released by that commit; it
    /// waits for the SVM's post-apply output.
    #[test]
    fn commit_releases_only_frames_before_the_capture_mark() {
        let mut c = cmp();
        c.push_pvm(&data(1, b"hello"), Tick(0));
        c.push_svm(&data(1, b"HELLO"), Tick(0));
        assert!(matches!(c.pending_request(), Some(CheckpointRequest::PayloadMismatch { offset: 0, .. })));
        let mark = c.mark_capture();
        let late = udp(53, b"next epoch");
        assert_eq!(c.push_pvm(&late, Tick(1)), Verdict::Held);
        // The SVM (not yet reset) produces the same datagram: still held, pre-apply output.
        assert_eq!(c.push_svm(&udp(53, b"next epoch"), Tick(1)), Verdict::Matched);
        assert!(drain(&mut c).is_empty());
        c.on_checkpoint_committed(mark).unwrap();
        assert_eq!(drain(&mut c), vec![data(1, b"hello")]);
        assert_eq!(c.stats().held_frames, 1, "the late datagram waits");
        // The SVM after applying the checkpoint produces it: now it goes.
        assert_eq!(c.push_svm(&udp(53, b"next epoch"), Tick(2)), Verdict::Matched);
        assert_eq!(drain(&mut c), vec![late]);
        // A stale mark is refused by name.
        assert_eq!(
            c.on_checkpoint_committed(mark),
            Err(MarkError::NotOutstanding { mark: mark.id(), outstanding: None })
        );
    }

    /// TCP bytes the PVM sends after the mark are compared with the SVM's post-apply output,
    /// at the offsets of the marked state.
    #[test]
    fn tcp_after_mark_compared_with_post_apply_output() {
        let mut c = cmp();
        c.push_pvm(&seg(80, 99, Some(1), TcpControl::Syn, b""), Tick(0));
        c.push_svm(&seg(80, 5000, Some(1), TcpControl::Syn, b""), Tick(0));
        c.push_pvm(&data(100, b"abc"), Tick(0));
        let mark = c.mark_capture();
        c.push_pvm(&data(103, b"def"), Tick(1));
        // Pre-apply SVM output: matches "abc" (before the mark) and "def" (not compared).
        c.push_svm(&data(5001, b"abcdef"), Tick(1));
        assert_eq!(drain(&mut c).len(), 2, "SYN-ACK and abc matched before the mark");
        assert_eq!(c.stats().compared_bytes, 3, "bytes past the mark are not compared");
        c.on_checkpoint_committed(mark).unwrap();
        assert!(drain(&mut c).is_empty(), "def waits for the post-apply SVM");
        // The SVM now runs the PVM's state: the PVM's sequence numbers.
        assert_eq!(
            c.push_svm(&data(103, b"dXf"), Tick(2)),
            Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch {
                conn: crate::colo::packet::parse_frame(&data(1, b"")).flow,
                offset: 4
            })
        );
        let mut c2 = cmp();
        c2.push_pvm(&data(100, b"abc"), Tick(0));
        let mark = c2.mark_capture();
        c2.push_pvm(&data(103, b"def"), Tick(1));
        c2.on_checkpoint_committed(mark).unwrap();
        assert_eq!(drain(&mut c2).len(), 1);
        assert_eq!(c2.push_svm(&data(103, b"def"), Tick(2)), Verdict::Matched);
        assert_eq!(drain(&mut c2), vec![data(103, b"def")]);
    }

    /// An aborted checkpoint releases nothing; comparison resumes as if there was no mark.
    #[test]
    fn aborted_capture_releases_nothing_and_resumes() {
        let mut c = cmp();
        c.push_pvm(&data(100, b"abc"), Tick(0));
        let mark = c.mark_capture();
        c.push_pvm(&data(103, b"def"), Tick(1));
        c.push_svm(&data(100, b"abcdef"), Tick(1));
        assert_eq!(drain(&mut c).len(), 1, "abc matched, def past the mark");
        c.on_checkpoint_aborted(mark).unwrap();
        assert_eq!(drain(&mut c), vec![data(103, b"def")]);
        assert_eq!(c.stats().checkpoints_aborted, 1);
        assert_eq!(c.on_checkpoint_aborted(mark), Err(MarkError::NotOutstanding { mark: 0, outstanding: None }));
    }

    fn rst(seq: u32) -> Vec<u8> {
        seg(80, seq, None, TcpControl::Rst, b"")
    }

    /// Issue 15, item 2: after a connection on a 4-tuple ended (SYN-ACK, "hello", RST on both
    /// sides), the PVM alone opens a new one on the same 4-tuple in the same epoch: its
    /// SYN-ACK (new ISN) and "SECRET" must wait for the SVM's own.
    #[test]
    fn reused_four_tuple_starts_a_fresh_connection() {
        let mut c = cmp();
        c.push_pvm(&seg(80, 1000, Some(501), TcpControl::Syn, b""), Tick(0));
        c.push_svm(&seg(80, 7000, Some(501), TcpControl::Syn, b""), Tick(0));
        c.push_pvm(&seg(80, 1001, Some(501), TcpControl::Psh, b"hello"), Tick(0));
        c.push_svm(&seg(80, 7001, Some(501), TcpControl::Psh, b"hello"), Tick(0));
        c.push_pvm(&rst(1006), Tick(0));
        c.push_svm(&rst(7006), Tick(0));
        assert_eq!(drain(&mut c).len(), 3);
        let synack = seg(80, 3000, Some(900), TcpControl::Syn, b"");
        let secret = seg(80, 3001, Some(900), TcpControl::Psh, b"SECRET");
        assert_eq!(c.push_pvm(&synack, Tick(1)), Verdict::Held);
        assert_eq!(c.push_pvm(&secret, Tick(1)), Verdict::Held);
        assert!(drain(&mut c).is_empty(), "nothing of the new connection without the SVM");
        assert_eq!(c.pending_request(), None);
        assert_eq!(c.stats().incarnations, 1);
        // The SVM opens its own new connection (its own ISN): both frames go.
        c.push_svm(&seg(80, 9000, Some(900), TcpControl::Syn, b""), Tick(2));
        assert_eq!(drain(&mut c), vec![synack]);
        c.push_svm(&seg(80, 9001, Some(900), TcpControl::Psh, b"SECRET"), Tick(2));
        assert_eq!(drain(&mut c), vec![secret]);
        let key = crate::colo::packet::parse_frame(&rst(1)).flow;
        assert_eq!(c.seq_offset(&key), Some(6000));
    }

    /// Item 2, second half: on a SYN-anchored connection, data before the ISN is a mismatch.
    #[test]
    fn data_before_the_isn_is_a_mismatch() {
        let mut c = cmp();
        c.push_pvm(&seg(80, 1000, Some(1), TcpControl::Syn, b""), Tick(0));
        let v = c.push_pvm(&data(990, b"x"), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 0, .. })));
        assert!(drain(&mut c).is_empty());
    }

    /// Every RST is compared (each one after the first starts a fresh incarnation).
    #[test]
    fn every_rst_is_compared() {
        let mut c = cmp();
        c.push_pvm(&rst(50), Tick(0));
        c.push_svm(&rst(50), Tick(0));
        c.push_pvm(&rst(80), Tick(0));
        assert_eq!(drain(&mut c).len(), 1);
        let v = c.push_svm(&rst(90), Tick(0));
        assert!(matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { .. })), "{v:?}");
        assert!(drain(&mut c).is_empty());
    }

    /// More than `MAX_INCARNATIONS` connections on one 4-tuple in one epoch ask for a
    /// checkpoint; the frames wait for it and are never dropped.
    #[test]
    fn too_many_incarnations_ask_for_a_checkpoint() {
        let mut c = cmp();
        for i in 0..MAX_INCARNATIONS as u32 {
            assert_eq!(c.push_pvm(&rst(100 * i), Tick(0)), Verdict::Held);
        }
        let v = c.push_pvm(&rst(1000), Tick(0));
        let want = CheckpointRequest::MemoryPressure {
            resource: PressureResource::Incarnations,
            used: MAX_INCARNATIONS + 1,
            limit: MAX_INCARNATIONS,
        };
        assert_eq!(v, Verdict::CheckpointRequired(want));
        commit(&mut c);
        assert_eq!(drain(&mut c).len(), MAX_INCARNATIONS + 1);
    }

    /// Issue 15, item 3: a connection older than the last commit. The PVM sends "PING" at
    /// 1000; the SVM's first segment is a retransmission ("PING" at 996), then "PONG" at 1000.
    /// Both sides share the PVM's anchor, so "PONG" is compared with "PING": a mismatch.
    #[test]
    fn mid_stream_sides_share_the_anchor() {
        let mut c = cmp();
        assert_eq!(c.push_pvm(&data(1000, b"PING"), Tick(0)), Verdict::Held);
        c.push_svm(&data(996, b"PING"), Tick(0));
        let v = c.push_svm(&data(1000, b"PONG"), Tick(0));
        assert!(
            matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 1, .. })),
            "{v:?}"
        );
        assert!(drain(&mut c).is_empty());
    }

    /// Issue 15, item 4: a server-initiated close (FIN with "bye" on both sides, then the final
    /// ACK at FIN + 1 on both) matches: the FIN's sequence slot is not data.
    #[test]
    fn final_ack_after_fin_is_not_data_past_it() {
        let mut c = cmp();
        let fin = seg(80, 1, Some(1), TcpControl::Fin, b"bye");
        let last = seg(80, 5, Some(2), TcpControl::None, b"");
        c.push_pvm(&fin, Tick(0));
        c.push_svm(&fin, Tick(0));
        c.push_pvm(&last, Tick(0));
        c.push_svm(&last, Tick(0));
        assert_eq!(c.pending_request(), None);
        assert_eq!(drain(&mut c), vec![fin, last]);
    }

    /// Issue 15, item 10: a keep-alive probe (one 0x00 byte at snd_nxt - 1) is not compared
    /// against the stream history.
    #[test]
    fn keepalive_probe_is_recognised() {
        let mut c = cmp();
        c.push_pvm(&data(1, b"abc"), Tick(0));
        c.push_svm(&data(1, b"abc"), Tick(0));
        assert_eq!(drain(&mut c).len(), 1);
        let probe = data(3, &[0]);
        assert_eq!(c.push_pvm(&probe, Tick(1)), Verdict::Released);
        assert_eq!(c.push_svm(&probe, Tick(1)), Verdict::Matched);
        assert_eq!(c.pending_request(), None);
        assert_eq!(c.stats().keepalive_probes, 2);
        // Before any data on a SYN-anchored connection: the probe sits on the ISN.
        let mut c = cmp();
        c.push_pvm(&seg(80, 100, Some(1), TcpControl::Syn, b""), Tick(0));
        c.push_svm(&seg(80, 100, Some(1), TcpControl::Syn, b""), Tick(0));
        assert_eq!(c.push_pvm(&data(100, &[0]), Tick(1)), Verdict::Released);
        assert_eq!(c.pending_request(), None);
        // Not a probe: the byte under it is not matched yet, so it is compared.
        let mut c = cmp();
        c.push_pvm(&data(1, b"abc"), Tick(0));
        let v = c.push_pvm(&data(3, b"X"), Tick(0));
        assert!(
            matches!(v, Verdict::CheckpointRequired(CheckpointRequest::PayloadMismatch { offset: 2, .. })),
            "{v:?}"
        );
    }
}
