//! Heartbeat and role state machine: events in, actions out.
//!
//! No clocks and no I/O in here: the caller passes the current [`Tick`] with every event and
//! carries out the returned [`Action`]s (send a heartbeat, ask the witness, promote the SVM, ...).
//!
//! # Roles
//! - [`Role::Primary`]: runs the PVM, protected by a secondary; output leaves only when the SVM
//!   matched it or a checkpoint the secondary acknowledged covers it.
//! - [`Role::PrimaryUnprotected`]: lost (or never regained) its secondary; releases output at
//!   once and keeps serving; accepts a new secondary (full sync, then [`Role::Primary`]).
//! - [`Role::Standalone`]: configured without replication; like `PrimaryUnprotected`.
//! - [`Role::Joining`]: a host receiving the full sync to become the secondary.
//! - [`Role::Secondary`]: runs the SVM, buffers checkpoints, never talks to clients.
//! - [`Role::FailingOver`]: secondary promoting; becomes `PrimaryUnprotected` on
//!   [`Event::PromotionComplete`].
//! - [`Role::Fenced`]: lost the witness race or saw a newer generation: VM stopped, no output,
//!   no service address, until the operator sends [`Command::Rejoin`].
//! - [`Role::Stopped`]: stopped by the operator.
//!
//! # Split-brain rule: a witness with one grant per generation
//! Every pairing runs in a *generation* `g`. Whenever a host of a pair decides its peer is gone
//! (missed heartbeats, link down, or the operator's "failover now" on the secondary), it does
//! not act on its own: it emits [`Action::ClaimWitness`] for generation `g + 1` and waits. The
//! witness (an arbiter on the client network) is a compare-and-set register: it grants
//! generation `g + 1` to the first host that claims it and denies it to every other host
//! (a repeated claim by the grantee is granted again). The reply comes back as
//! [`Event::Witness`]:
//! - granted: the secondary fails over, the primary goes unprotected, both at generation `g + 1`;
//! - denied: the peer won, so this host fences itself (stops the VM and all output);
//! - unreachable: nothing changes; the claim is retried every `witness_retry` ticks. A protected
//!   primary keeps holding output (it cannot get it matched or acknowledged), a secondary keeps
//!   shadowing. A claim is never abandoned, not even when the peer is heard again: "unreachable"
//!   may mean the witness granted the claim and only its reply was lost, and a host that forgot
//!   such a grant would leave the generation owned by nobody who acts on it (its peer's later
//!   claim would be denied and fence the only live host). So the claim is retried until the
//!   witness answers, and the answer is acted on (the witness grants a repeated claim to its
//!   owner again).
//!
//! So at most one host ever releases output without its peer in each generation, whatever the
//! link does, and both sides decide from the same witness answer. A heartbeat carrying a newer
//! generation than ours means the peer won a claim we did not see: we fence at once. The cost
//! of the rule is availability when the witness is down as well as the peer: then nobody takes
//! over (safety over liveness).
//!
//! Joining follows the same rule: the primary turns protected (holds output) *before* it tells
//! the joiner to start COLO, and the joiner becomes a secondary (and so may ever claim the
//! witness) only on that message. Otherwise a fresh secondary could win the next generation
//! while the primary still releases output unprotected in the old one (the property test found
//! exactly that interleaving).
//!
//! A protected primary whose secondary was promoted behind a cut link may still hold output,
//! but it can release only output the (former) secondary matched or committed, which is the
//! new primary's own history, so clients never see two diverging primaries.

use core::fmt;
use heapless::Vec as HVec;

pub use super::time::Tick;

/// Timing knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverConfig {
    /// Ticks between heartbeats.
    pub heartbeat_interval: u64,
    /// Heartbeat intervals without a heartbeat before the peer counts as lost.
    pub miss_limit: u32,
    /// Ticks between witness claims while the witness is unreachable.
    pub witness_retry: u64,
    /// Primary: ticks a checkpoint may stay unacknowledged before it is aborted and retried
    /// (0: never time out).
    pub checkpoint_timeout: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self { heartbeat_interval: 10, miss_limit: 3, witness_retry: 10, checkpoint_timeout: 100 }
    }
}

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Configured without replication; serves clients.
    Standalone,
    /// Protected primary.
    Primary,
    /// Primary without a secondary; serves clients unprotected.
    PrimaryUnprotected,
    /// Receiving a full sync to become the secondary.
    Joining,
    /// Secondary.
    Secondary,
    /// Secondary promoting itself.
    FailingOver,
    /// Stopped because another host owns the service.
    Fenced,
    /// Stopped by the operator.
    Stopped,
}

impl Role {
    /// True when this host releases output without a peer's agreement.
    pub fn releases_unprotected(self) -> bool {
        matches!(self, Self::Standalone | Self::PrimaryUnprotected | Self::FailingOver)
    }

    /// True when this host runs the service towards clients (owns the service address).
    pub fn faces_clients(self) -> bool {
        self.releases_unprotected() || self == Self::Primary
    }
}

/// What the witness answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This host owns the claimed generation.
    Granted,
    /// Another host owns it.
    Denied,
    /// No answer.
    Unreachable,
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Secondary: take over now (still via the witness).
    FailoverNow,
    /// Primary: take a checkpoint now.
    CheckpointNow,
    /// Stop the VM.
    Stop,
    /// Fenced or stopped host: join the current primary as a new secondary.
    Rejoin,
}

/// Inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Time passed.
    Tick,
    /// A heartbeat from the peer, carrying the peer's generation.
    Heartbeat {
        /// Peer's generation.
        generation: u64,
    },
    /// Replication link went down.
    LinkDown,
    /// Replication link came up.
    LinkUp,
    /// The witness answered a claim for `generation`.
    Witness {
        /// Generation claimed.
        generation: u64,
        /// Answer.
        verdict: Verdict,
    },
    /// A checkpoint started (primary: sending; secondary: receiving).
    CheckpointBegin {
        /// Epoch.
        epoch: u64,
    },
    /// Secondary: the checkpoint was fully received, verified and applied.
    CheckpointCommitted {
        /// Epoch.
        epoch: u64,
    },
    /// Primary: the secondary acknowledged the checkpoint.
    CheckpointAcked {
        /// Epoch.
        epoch: u64,
    },
    /// The checkpoint failed: primary: the secondary refused it, or it could not be sent;
    /// secondary: the stream was rejected (bad bytes, limits, apply error). The primary aborts
    /// it and retries a heartbeat interval later; the secondary discards it.
    CheckpointFailed {
        /// Epoch.
        epoch: u64,
    },
    /// Primary: a host asks to join as secondary.
    PeerJoinRequest,
    /// Primary: the joiner has received the whole sync. Joiner: the primary confirmed it is
    /// protected (its [`Action::StartColo`]); the joiner learns the generation it joins.
    FullSyncComplete {
        /// Generation of the pair.
        generation: u64,
    },
    /// The promotion actions have been carried out.
    PromotionComplete,
    /// Operator command.
    Command(Command),
}

/// Outputs, to be carried out in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a heartbeat with this generation.
    SendHeartbeat {
        /// Our generation.
        generation: u64,
    },
    /// Ask the witness to grant `generation` to this host.
    ClaimWitness {
        /// Generation claimed.
        generation: u64,
    },
    /// Stop the VM, release nothing, drop the service address.
    Fence,
    /// Stop the VM (operator).
    StopVm,
    /// Secondary: throw away a partly received checkpoint.
    DiscardIncompleteCheckpoint {
        /// Its epoch.
        epoch: u64,
    },
    /// Secondary: drop PVM block writes of uncommitted epochs.
    DiscardPendingBlockWrites,
    /// Secondary: make sure the last committed checkpoint is fully applied (no-op if the
    /// engine applied it on commit); the SVM resumes from it plus its own execution since.
    ApplyLastCommitted {
        /// Epoch, if any checkpoint was committed.
        epoch: Option<u64>,
    },
    /// Secondary: merge the SVM's block overlay into the disk.
    MergeBlockOverlay,
    /// Secondary: SVM output now goes to clients.
    Promote,
    /// Send the SVM output the comparator has not acknowledged yet.
    FlushUnackedOutput,
    /// Announce the service address from this host.
    SendGratuitousArp,
    /// Release all held output and from now on release at once.
    ReleaseOutputUnprotected,
    /// Primary: release output held for this checkpoint.
    ReleaseHeldOutput {
        /// Acknowledged epoch.
        epoch: u64,
    },
    /// Primary: abandon a checkpoint the secondary will never acknowledge.
    AbortCheckpoint {
        /// Its epoch.
        epoch: u64,
    },
    /// Primary: start a checkpoint.
    StartCheckpoint,
    /// Secondary: tell the primary the checkpoint committed.
    AckCheckpoint {
        /// Epoch.
        epoch: u64,
    },
    /// Secondary: apply PVM block writes of this epoch to disk (and drop the SVM overlay).
    CommitBlockWrites {
        /// Epoch.
        epoch: u64,
    },
    /// Primary: send all memory and state to the joiner.
    StartFullSync {
        /// Generation the pair will run in.
        generation: u64,
    },
    /// Primary: the joiner is gone; stop syncing.
    AbortFullSync,
    /// Joiner: ask the primary for a full sync.
    SendJoinRequest,
    /// COLO replication starts. From the primary this means "I now hold output (protected)
    /// at `generation`": the caller sends that to the joiner, which must feed it in as
    /// [`Event::FullSyncComplete`] only then, so a joiner never becomes a secondary (able to
    /// claim the witness) while the primary still releases output unprotected.
    StartColo {
        /// Generation of the pair.
        generation: u64,
    },
    /// A command or event that does not apply in this role.
    Rejected {
        /// Command.
        command: Command,
        /// Role it arrived in.
        role: Role,
    },
}

/// Actions returned by one step (never more than 12).
pub type Actions = HVec<Action, 12>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    generation: u64,
    sent_at: Tick,
}

/// The state machine for one host.
#[derive(Debug, Clone)]
pub struct FailoverMachine {
    config: FailoverConfig,
    role: Role,
    generation: u64,
    link_up: bool,
    last_heard: Tick,
    last_sent: Tick,
    claim: Option<Claim>,
    in_flight: Option<u64>,
    /// When the checkpoint in flight began.
    in_flight_since: Tick,
    /// Primary: retry an aborted checkpoint at this tick.
    retry_checkpoint_at: Option<Tick>,
    last_committed: Option<u64>,
    syncing: bool,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FailoverMachine {
    /// A host starting in `role` (one of `Primary`, `Secondary`, `Standalone`, `Joining`) at
    /// `generation` (the witness must have granted it to the primary), at time `now`.
    pub fn new(config: FailoverConfig, role: Role, generation: u64, now: Tick) -> Self {
        Self {
            config,
            role,
            generation,
            link_up: true,
            last_heard: now,
            last_sent: now,
            claim: None,
            in_flight: None,
            in_flight_since: now,
            retry_checkpoint_at: None,
            last_committed: None,
            syncing: false,
        }
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Generation of an outstanding witness claim.
    pub fn pending_claim(&self) -> Option<u64> {
        self.claim.map(|c| c.generation)
    }

    /// Checkpoint in flight, if any.
    pub fn checkpoint_in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Last checkpoint committed on this secondary.
    pub fn last_committed(&self) -> Option<u64> {
        self.last_committed
    }

    /// True while a primary is sending a full sync to a joiner.
    pub fn syncing(&self) -> bool {
        self.syncing
    }

    /// The next tick at which [`Event::Tick`] has something to do (a heartbeat, the peer's
    /// miss deadline, a witness retry, a checkpoint timeout or retry); `None`: only events.
    pub fn poll_timeout(&self) -> Option<Tick> {
        let hb = self.config.heartbeat_interval.max(1);
        let mut t: Option<Tick> = None;
        let mut at = |x: Tick| t = Some(t.map_or(x, |y: Tick| if x.0 < y.0 { x } else { y }));
        if self.has_peer() && self.link_up {
            at(self.last_sent.after(hb));
        }
        if self.role == Role::Joining && self.link_up {
            at(self.last_sent.after(hb));
        }
        match self.claim {
            Some(c) => at(c.sent_at.after(self.config.witness_retry.max(1))),
            None if self.has_peer() => {
                at(self.last_heard.after(hb.saturating_mul(u64::from(self.config.miss_limit.max(1)))))
            }
            None => {}
        }
        if self.role == Role::Primary && self.claim.is_none() {
            if self.in_flight.is_some() && self.config.checkpoint_timeout > 0 {
                at(self.in_flight_since.after(self.config.checkpoint_timeout));
            } else if let Some(r) = self.retry_checkpoint_at {
                at(r);
            }
        }
        t
    }

    /// Roles that exchange heartbeats with a peer.
    fn has_peer(&self) -> bool {
        match self.role {
            Role::Primary | Role::Secondary => true,
            Role::PrimaryUnprotected => self.syncing,
            _ => false,
        }
    }

    fn push(out: &mut Actions, a: Action) {
        // Capacity is sized for the longest sequence below; never silently drop in debug.
        let r = out.push(a);
        debug_assert!(r.is_ok(), "action buffer too small");
    }

    /// Feeds one event at time `now`.
    pub fn handle(&mut self, now: Tick, event: Event) -> Actions {
        let mut out = Actions::new();
        match event {
            Event::Tick => self.on_tick(now, &mut out),
            Event::Heartbeat { generation } => self.on_heartbeat(now, generation, &mut out),
            Event::LinkDown => {
                self.link_up = false;
                if self.has_peer() {
                    self.peer_lost(now, &mut out);
                }
            }
            Event::LinkUp => {
                self.link_up = true;
                if self.role == Role::Joining {
                    self.last_sent = now;
                    Self::push(&mut out, Action::SendJoinRequest);
                }
            }
            Event::Witness { generation, verdict } => self.on_witness(generation, verdict, &mut out),
            Event::CheckpointBegin { epoch } => {
                if matches!(self.role, Role::Primary | Role::Secondary) && self.claim.is_none() {
                    self.in_flight = Some(epoch);
                    self.in_flight_since = now;
                    self.retry_checkpoint_at = None;
                }
            }
            Event::CheckpointFailed { epoch } => {
                if self.in_flight == Some(epoch) {
                    match self.role {
                        Role::Primary => self.abort_checkpoint(now, epoch, &mut out),
                        Role::Secondary => {
                            self.in_flight = None;
                            Self::push(&mut out, Action::DiscardIncompleteCheckpoint { epoch });
                        }
                        _ => {}
                    }
                }
            }
            Event::CheckpointCommitted { epoch } => {
                if self.role == Role::Secondary && self.in_flight == Some(epoch) {
                    self.in_flight = None;
                    self.last_committed = Some(epoch);
                    Self::push(&mut out, Action::CommitBlockWrites { epoch });
                    Self::push(&mut out, Action::AckCheckpoint { epoch });
                }
            }
            Event::CheckpointAcked { epoch } => {
                if self.role == Role::Primary && self.in_flight == Some(epoch) {
                    self.in_flight = None;
                    Self::push(&mut out, Action::ReleaseHeldOutput { epoch });
                }
            }
            Event::PeerJoinRequest => {
                if matches!(self.role, Role::PrimaryUnprotected | Role::Standalone) && !self.syncing {
                    if self.role == Role::Standalone {
                        self.role = Role::PrimaryUnprotected;
                    }
                    self.syncing = true;
                    self.last_heard = now;
                    Self::push(&mut out, Action::StartFullSync { generation: self.generation });
                }
            }
            Event::FullSyncComplete { generation } => match self.role {
                Role::PrimaryUnprotected if self.syncing && generation == self.generation => {
                    self.syncing = false;
                    self.role = Role::Primary;
                    self.last_heard = now;
                    self.in_flight = None;
                    Self::push(&mut out, Action::StartColo { generation: self.generation });
                }
                Role::Joining => {
                    self.generation = generation;
                    self.role = Role::Secondary;
                    self.last_heard = now;
                    self.in_flight = None;
                    self.last_committed = None;
                    Self::push(&mut out, Action::StartColo { generation: self.generation });
                }
                _ => {}
            },
            Event::PromotionComplete => {
                if self.role == Role::FailingOver {
                    self.role = Role::PrimaryUnprotected;
                    Self::push(&mut out, Action::ReleaseOutputUnprotected);
                }
            }
            Event::Command(c) => self.on_command(now, c, &mut out),
        }
        out
    }

    /// **Rule (a checkpoint never stalls the pair)**: a checkpoint the secondary refused, or
    /// one not acknowledged within `checkpoint_timeout` ticks, is aborted (the caller abandons
    /// its capture mark, so its held output stays held) and a new one is started a heartbeat
    /// interval later, covering the same output.
    fn abort_checkpoint(&mut self, now: Tick, epoch: u64, out: &mut Actions) {
        self.in_flight = None;
        self.retry_checkpoint_at = Some(now.after(self.config.heartbeat_interval.max(1)));
        Self::push(out, Action::AbortCheckpoint { epoch });
    }

    fn on_tick(&mut self, now: Tick, out: &mut Actions) {
        let hb = self.config.heartbeat_interval.max(1);
        if self.role == Role::Primary && self.claim.is_none() {
            if let Some(epoch) = self.in_flight {
                let limit = self.config.checkpoint_timeout;
                if limit > 0 && now.since(self.in_flight_since) >= limit {
                    self.abort_checkpoint(now, epoch, out);
                }
            } else if self.retry_checkpoint_at.is_some_and(|t| now >= t) {
                self.retry_checkpoint_at = None;
                Self::push(out, Action::StartCheckpoint);
            }
        }
        if self.has_peer() && self.link_up && now.since(self.last_sent) >= hb {
            self.last_sent = now;
            Self::push(out, Action::SendHeartbeat { generation: self.generation });
        }
        if self.role == Role::Joining && self.link_up && now.since(self.last_sent) >= hb {
            self.last_sent = now;
            Self::push(out, Action::SendJoinRequest);
        }
        if let Some(c) = self.claim {
            if now.since(c.sent_at) >= self.config.witness_retry.max(1) {
                self.claim = Some(Claim { sent_at: now, ..c });
                Self::push(out, Action::ClaimWitness { generation: c.generation });
            }
            return;
        }
        let timeout = hb.saturating_mul(u64::from(self.config.miss_limit.max(1)));
        if self.has_peer() && now.since(self.last_heard) >= timeout {
            self.peer_lost(now, out);
        }
    }

    fn on_heartbeat(&mut self, now: Tick, generation: u64, out: &mut Actions) {
        if generation > self.generation
            && matches!(
                self.role,
                Role::Primary | Role::PrimaryUnprotected | Role::Secondary | Role::FailingOver | Role::Standalone
            )
        {
            // The peer won a generation we never saw: we are stale.
            self.fence(out);
            return;
        }
        if generation == self.generation {
            self.last_heard = now;
        }
    }

    /// The peer is gone (or the operator says so): ask the witness, or just stop syncing.
    fn peer_lost(&mut self, now: Tick, out: &mut Actions) {
        match self.role {
            Role::Primary | Role::Secondary if self.claim.is_none() => {
                let generation = self.generation + 1;
                self.claim = Some(Claim { generation, sent_at: now });
                Self::push(out, Action::ClaimWitness { generation });
            }
            Role::PrimaryUnprotected if self.syncing => {
                self.syncing = false;
                Self::push(out, Action::AbortFullSync);
            }
            _ => {}
        }
    }

    fn on_witness(&mut self, generation: u64, verdict: Verdict, out: &mut Actions) {
        let Some(claim) = self.claim else { return };
        if claim.generation != generation {
            return;
        }
        match verdict {
            Verdict::Unreachable => {
                // Keep the claim: the witness may have granted it and lost the reply. It is
                // retried from `on_tick` until the witness answers.
            }
            Verdict::Denied => {
                self.claim = None;
                self.fence(out);
            }
            Verdict::Granted => {
                self.claim = None;
                self.generation = generation;
                match self.role {
                    Role::Secondary => {
                        self.role = Role::FailingOver;
                        if let Some(epoch) = self.in_flight.take() {
                            Self::push(out, Action::DiscardIncompleteCheckpoint { epoch });
                        }
                        Self::push(out, Action::DiscardPendingBlockWrites);
                        Self::push(out, Action::ApplyLastCommitted { epoch: self.last_committed });
                        Self::push(out, Action::MergeBlockOverlay);
                        Self::push(out, Action::Promote);
                        Self::push(out, Action::FlushUnackedOutput);
                        Self::push(out, Action::SendGratuitousArp);
                    }
                    Role::Primary => {
                        self.role = Role::PrimaryUnprotected;
                        if let Some(epoch) = self.in_flight.take() {
                            Self::push(out, Action::AbortCheckpoint { epoch });
                        }
                        Self::push(out, Action::ReleaseOutputUnprotected);
                    }
                    _ => {}
                }
            }
        }
    }

    fn fence(&mut self, out: &mut Actions) {
        self.role = Role::Fenced;
        self.claim = None;
        self.in_flight = None;
        self.syncing = false;
        Self::push(out, Action::Fence);
    }

    fn on_command(&mut self, now: Tick, c: Command, out: &mut Actions) {
        let reject = |out: &mut Actions, role| Self::push(out, Action::Rejected { command: c, role });
        match c {
            Command::FailoverNow => {
                if self.role == Role::Secondary {
                    self.peer_lost(now, out);
                } else {
                    reject(out, self.role);
                }
            }
            Command::CheckpointNow => {
                if self.role == Role::Primary && self.in_flight.is_none() && self.claim.is_none() {
                    self.retry_checkpoint_at = None;
                    Self::push(out, Action::StartCheckpoint);
                } else {
                    reject(out, self.role);
                }
            }
            Command::Stop => {
                self.role = Role::Stopped;
                self.claim = None;
                self.in_flight = None;
                self.syncing = false;
                Self::push(out, Action::StopVm);
            }
            Command::Rejoin => {
                if matches!(self.role, Role::Fenced | Role::Stopped) {
                    self.role = Role::Joining;
                    self.generation = 0;
                    self.last_committed = None;
                    self.last_sent = now;
                    if self.link_up {
                        Self::push(out, Action::SendJoinRequest);
                    }
                } else {
                    reject(out, self.role);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FailoverConfig {
        FailoverConfig { heartbeat_interval: 10, miss_limit: 3, witness_retry: 5, checkpoint_timeout: 50 }
    }

    fn m(role: Role) -> FailoverMachine {
        FailoverMachine::new(cfg(), role, 1, Tick(0))
    }

    fn has(a: &Actions, x: Action) -> bool {
        a.contains(&x)
    }

    #[test]
    fn heartbeats_sent_every_interval() {
        let mut p = m(Role::Primary);
        assert!(p.handle(Tick(5), Event::Tick).is_empty());
        let a = p.handle(Tick(10), Event::Tick);
        assert_eq!(a.as_slice(), &[Action::SendHeartbeat { generation: 1 }]);
        assert!(p.handle(Tick(15), Event::Heartbeat { generation: 1 }).is_empty());
        assert!(p.handle(Tick(19), Event::Tick).is_empty());
    }

    #[test]
    fn missed_heartbeats_trigger_a_witness_claim_not_a_promotion() {
        let mut s = m(Role::Secondary);
        s.handle(Tick(10), Event::Heartbeat { generation: 1 });
        let a = s.handle(Tick(39), Event::Tick);
        assert!(!has(&a, Action::ClaimWitness { generation: 2 }));
        let a = s.handle(Tick(40), Event::Tick);
        assert!(has(&a, Action::ClaimWitness { generation: 2 }));
        assert_eq!(s.role(), Role::Secondary);
    }

    #[test]
    fn primary_loss_promotes_secondary_when_witness_grants() {
        let mut s = m(Role::Secondary);
        s.handle(Tick(1), Event::CheckpointBegin { epoch: 7 });
        s.handle(Tick(2), Event::CheckpointCommitted { epoch: 7 });
        s.handle(Tick(3), Event::CheckpointBegin { epoch: 8 });
        s.handle(Tick(4), Event::LinkDown);
        assert_eq!(s.pending_claim(), Some(2));
        let a = s.handle(Tick(5), Event::Witness { generation: 2, verdict: Verdict::Granted });
        assert_eq!(
            a.as_slice(),
            &[
                Action::DiscardIncompleteCheckpoint { epoch: 8 },
                Action::DiscardPendingBlockWrites,
                Action::ApplyLastCommitted { epoch: Some(7) },
                Action::MergeBlockOverlay,
                Action::Promote,
                Action::FlushUnackedOutput,
                Action::SendGratuitousArp,
            ]
        );
        assert_eq!(s.role(), Role::FailingOver);
        assert_eq!(s.generation(), 2);
        let a = s.handle(Tick(6), Event::PromotionComplete);
        assert_eq!(a.as_slice(), &[Action::ReleaseOutputUnprotected]);
        assert_eq!(s.role(), Role::PrimaryUnprotected);
    }

    #[test]
    fn secondary_loss_makes_primary_unprotected_and_aborts_checkpoint() {
        let mut p = m(Role::Primary);
        p.handle(Tick(1), Event::CheckpointBegin { epoch: 3 });
        let a = p.handle(Tick(30), Event::Tick);
        assert!(has(&a, Action::ClaimWitness { generation: 2 }));
        let a = p.handle(Tick(31), Event::Witness { generation: 2, verdict: Verdict::Granted });
        assert_eq!(a.as_slice(), &[Action::AbortCheckpoint { epoch: 3 }, Action::ReleaseOutputUnprotected]);
        assert_eq!(p.role(), Role::PrimaryUnprotected);
    }

    #[test]
    fn denied_claim_fences() {
        let mut p = m(Role::Primary);
        p.handle(Tick(1), Event::LinkDown);
        let a = p.handle(Tick(2), Event::Witness { generation: 2, verdict: Verdict::Denied });
        assert_eq!(a.as_slice(), &[Action::Fence]);
        assert_eq!(p.role(), Role::Fenced);
        assert!(!p.role().faces_clients());
    }

    #[test]
    fn link_cut_with_both_alive_gives_one_owner() {
        // Both claim generation 2; the witness grants the first, denies the second.
        let mut p = m(Role::Primary);
        let mut s = m(Role::Secondary);
        assert!(has(&p.handle(Tick(1), Event::LinkDown), Action::ClaimWitness { generation: 2 }));
        assert!(has(&s.handle(Tick(1), Event::LinkDown), Action::ClaimWitness { generation: 2 }));
        s.handle(Tick(2), Event::Witness { generation: 2, verdict: Verdict::Granted });
        p.handle(Tick(2), Event::Witness { generation: 2, verdict: Verdict::Denied });
        assert_eq!(s.role(), Role::FailingOver);
        assert_eq!(p.role(), Role::Fenced);
    }

    #[test]
    fn unreachable_witness_retries_and_never_promotes() {
        let mut s = m(Role::Secondary);
        s.handle(Tick(1), Event::LinkDown);
        s.handle(Tick(2), Event::Witness { generation: 2, verdict: Verdict::Unreachable });
        assert_eq!(s.role(), Role::Secondary);
        let a = s.handle(Tick(6), Event::Tick);
        assert!(has(&a, Action::ClaimWitness { generation: 2 }));
        assert_eq!(s.role(), Role::Secondary);
    }

    /// Issue 15, item 5: the witness grants S generation 2 but the reply is lost; S hears P
    /// again. S must keep its claim, retry, and act on the grant, instead of carrying on as a
    /// secondary while the witness counts it as the owner of generation 2.
    #[test]
    fn claim_with_lost_reply_is_kept_and_retried() {
        let mut s = m(Role::Secondary);
        assert!(has(&s.handle(Tick(1), Event::LinkDown), Action::ClaimWitness { generation: 2 }));
        // Granted at the witness, reply lost.
        s.handle(Tick(2), Event::Witness { generation: 2, verdict: Verdict::Unreachable });
        s.handle(Tick(3), Event::LinkUp);
        s.handle(Tick(3), Event::Heartbeat { generation: 1 });
        assert_eq!(s.pending_claim(), Some(2), "claim kept although the peer is heard");
        assert_eq!(s.role(), Role::Secondary);
        let a = s.handle(Tick(7), Event::Tick);
        assert!(has(&a, Action::ClaimWitness { generation: 2 }), "{a:?}");
        let a = s.handle(Tick(8), Event::Witness { generation: 2, verdict: Verdict::Granted });
        assert!(has(&a, Action::Promote));
        assert_eq!(s.role(), Role::FailingOver);
        assert_eq!(s.generation(), 2);
        // The primary's own claim is denied and it fences: one host serves.
        let mut p = m(Role::Primary);
        p.handle(Tick(1), Event::LinkDown);
        p.handle(Tick(9), Event::Witness { generation: 2, verdict: Verdict::Denied });
        assert_eq!(p.role(), Role::Fenced);
    }

    /// Issue 15, item 8: a checkpoint the secondary refuses (while it keeps sending heartbeats)
    /// is aborted after `checkpoint_timeout` and retried; an explicit failure aborts at once.
    #[test]
    fn refused_checkpoint_times_out_and_is_retried() {
        let mut p = m(Role::Primary);
        assert_eq!(p.handle(Tick(0), Event::Command(Command::CheckpointNow)).as_slice(), &[Action::StartCheckpoint]);
        p.handle(Tick(0), Event::CheckpointBegin { epoch: 1 });
        let mut aborted = None;
        let mut restarted = None;
        let mut t = 0;
        while t < 100_000 && restarted.is_none() {
            t += 1;
            if t % 10 == 0 {
                p.handle(Tick(t), Event::Heartbeat { generation: 1 });
            }
            let a = p.handle(Tick(t), Event::Tick);
            if has(&a, Action::AbortCheckpoint { epoch: 1 }) {
                aborted = Some(t);
            }
            if has(&a, Action::StartCheckpoint) {
                restarted = Some(t);
            }
        }
        assert_eq!(aborted, Some(50));
        assert_eq!(restarted, Some(60));
        assert_eq!(p.role(), Role::Primary);
        assert_eq!(p.checkpoint_in_flight(), None);
        // Explicit refusal: aborted at once; the secondary discards its partial copy.
        p.handle(Tick(61), Event::CheckpointBegin { epoch: 2 });
        let a = p.handle(Tick(62), Event::CheckpointFailed { epoch: 2 });
        assert_eq!(a.as_slice(), &[Action::AbortCheckpoint { epoch: 2 }]);
        assert!(has(&p.handle(Tick(72), Event::Tick), Action::StartCheckpoint));
        let mut s = m(Role::Secondary);
        s.handle(Tick(0), Event::CheckpointBegin { epoch: 2 });
        let a = s.handle(Tick(1), Event::CheckpointFailed { epoch: 2 });
        assert_eq!(a.as_slice(), &[Action::DiscardIncompleteCheckpoint { epoch: 2 }]);
        assert_eq!(s.checkpoint_in_flight(), None);
        // A stale failure changes nothing.
        assert!(s.handle(Tick(2), Event::CheckpointFailed { epoch: 1 }).is_empty());
    }

    #[test]
    fn stale_witness_reply_ignored() {
        let mut s = m(Role::Secondary);
        assert!(s.handle(Tick(1), Event::Witness { generation: 2, verdict: Verdict::Granted }).is_empty());
        assert_eq!(s.role(), Role::Secondary);
    }

    #[test]
    fn newer_generation_heartbeat_fences() {
        let mut p = m(Role::Primary);
        let a = p.handle(Tick(1), Event::Heartbeat { generation: 2 });
        assert_eq!(a.as_slice(), &[Action::Fence]);
        let mut s = m(Role::Secondary);
        s.handle(Tick(1), Event::Heartbeat { generation: 0 });
        assert_eq!(s.role(), Role::Secondary);
    }

    #[test]
    fn new_secondary_joins_with_full_sync() {
        let mut p = m(Role::PrimaryUnprotected);
        let mut j = FailoverMachine::new(cfg(), Role::Fenced, 0, Tick(0));
        assert_eq!(j.handle(Tick(1), Event::Command(Command::Rejoin)).as_slice(), &[Action::SendJoinRequest]);
        assert_eq!(p.handle(Tick(2), Event::PeerJoinRequest).as_slice(), &[Action::StartFullSync { generation: 1 }]);
        assert!(p.syncing());
        assert!(p.role().releases_unprotected());
        assert_eq!(
            p.handle(Tick(3), Event::FullSyncComplete { generation: 1 }).as_slice(),
            &[Action::StartColo { generation: 1 }]
        );
        assert_eq!(
            j.handle(Tick(3), Event::FullSyncComplete { generation: 1 }).as_slice(),
            &[Action::StartColo { generation: 1 }]
        );
        assert_eq!(p.role(), Role::Primary);
        assert_eq!(j.role(), Role::Secondary);
        assert_eq!(j.generation(), 1);
    }

    #[test]
    fn joiner_lost_during_sync_aborts_it() {
        let mut p = m(Role::PrimaryUnprotected);
        p.handle(Tick(0), Event::PeerJoinRequest);
        let a = p.handle(Tick(30), Event::Tick);
        assert!(has(&a, Action::AbortFullSync));
        assert_eq!(p.role(), Role::PrimaryUnprotected);
        assert!(!p.syncing());
    }

    #[test]
    fn checkpoint_commit_and_ack_flow() {
        let mut p = m(Role::Primary);
        let mut s = m(Role::Secondary);
        assert_eq!(p.handle(Tick(0), Event::Command(Command::CheckpointNow)).as_slice(), &[Action::StartCheckpoint]);
        p.handle(Tick(0), Event::CheckpointBegin { epoch: 1 });
        s.handle(Tick(0), Event::CheckpointBegin { epoch: 1 });
        assert!(matches!(
            p.handle(Tick(0), Event::Command(Command::CheckpointNow)).as_slice(),
            [Action::Rejected { .. }]
        ));
        assert_eq!(
            s.handle(Tick(1), Event::CheckpointCommitted { epoch: 1 }).as_slice(),
            &[Action::CommitBlockWrites { epoch: 1 }, Action::AckCheckpoint { epoch: 1 }]
        );
        assert_eq!(
            p.handle(Tick(2), Event::CheckpointAcked { epoch: 1 }).as_slice(),
            &[Action::ReleaseHeldOutput { epoch: 1 }]
        );
    }

    #[test]
    fn failover_now_only_on_secondary() {
        let mut p = m(Role::Primary);
        assert!(matches!(
            p.handle(Tick(0), Event::Command(Command::FailoverNow)).as_slice(),
            [Action::Rejected { command: Command::FailoverNow, role: Role::Primary }]
        ));
        let mut s = m(Role::Secondary);
        assert_eq!(
            s.handle(Tick(0), Event::Command(Command::FailoverNow)).as_slice(),
            &[Action::ClaimWitness { generation: 2 }]
        );
    }

    #[test]
    fn stop_and_rejoin() {
        let mut p = m(Role::Primary);
        assert_eq!(p.handle(Tick(0), Event::Command(Command::Stop)).as_slice(), &[Action::StopVm]);
        assert_eq!(p.role(), Role::Stopped);
        p.handle(Tick(1), Event::Command(Command::Rejoin));
        assert_eq!(p.role(), Role::Joining);
        assert!(has(&p.handle(Tick(11), Event::Tick), Action::SendJoinRequest));
    }
}
