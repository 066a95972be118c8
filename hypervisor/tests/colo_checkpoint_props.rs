//! Property tests for the checkpoint codec and the failover state machine.

use hypervisor::colo::checkpoint::{
    CheckpointDecoder, CheckpointEncoder, DirtyPage, Feed, GuestMemoryMut, HeaderInfo, StagedCheckpoint, StreamError,
    StreamLimits, VecGuestMemory,
};
use hypervisor::colo::failover::{Action, Command, Event, FailoverConfig, FailoverMachine, Role, Tick, Verdict};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};

const PS: usize = 512;
const FRAMES: u64 = 128;

fn limits() -> StreamLimits {
    StreamLimits {
        page_size: PS as u32,
        guest_frames: FRAMES,
        max_pages: FRAMES as u32,
        max_section_bytes: 256,
        max_records: 256,
        max_total_bytes: 1 << 20,
    }
}

fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// How a page's new content relates to the receiver's current content.
#[derive(Debug, Clone)]
enum PageMode {
    Zero,
    Random(u64),
    /// Previous content plus a few byte edits (delta candidate).
    Edited(u64, Vec<(u16, u8)>),
    Unchanged(u64),
}

#[derive(Debug, Clone)]
struct Spec {
    epoch: u64,
    pages: BTreeMap<u64, PageMode>,
    vcpus: Vec<Vec<u8>>,
    devices: BTreeMap<u64, Vec<u8>>,
}

fn page_mode() -> impl Strategy<Value = PageMode> {
    prop_oneof![
        Just(PageMode::Zero),
        any::<u64>().prop_map(PageMode::Random),
        (any::<u64>(), prop::collection::vec((0u16..PS as u16, any::<u8>()), 0..20))
            .prop_map(|(s, e)| PageMode::Edited(s, e)),
        any::<u64>().prop_map(PageMode::Unchanged),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<u64>(),
        prop::collection::btree_map(0..FRAMES, page_mode(), 0..20),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..3),
        prop::collection::btree_map(any::<u64>(), prop::collection::vec(any::<u8>(), 0..64), 0..3),
    )
        .prop_map(|(epoch, pages, vcpus, devices)| Spec { epoch, pages, vcpus, devices })
}

/// Receiver memory: every frame has seeded content; returns (memory, new page contents).
fn materialise(spec: &Spec) -> (VecGuestMemory, BTreeMap<u64, Vec<u8>>) {
    let mut mem = VecGuestMemory::new(PS, FRAMES as usize);
    for gfn in 0..FRAMES {
        fill(gfn.wrapping_mul(0x9E37_79B9) + 1, mem.frame_mut(gfn));
    }
    let mut new = BTreeMap::new();
    for (&gfn, mode) in &spec.pages {
        let mut prev = vec![0u8; PS];
        let mut data = vec![0u8; PS];
        match mode {
            PageMode::Zero => {}
            PageMode::Random(s) => fill(*s, &mut data),
            PageMode::Edited(s, edits) => {
                fill(*s, &mut prev);
                data.copy_from_slice(&prev);
                for &(at, v) in edits {
                    data[at as usize] = v;
                }
            }
            PageMode::Unchanged(s) => {
                fill(*s, &mut prev);
                data.copy_from_slice(&prev);
            }
        }
        if !matches!(mode, PageMode::Zero | PageMode::Random(_)) {
            mem.frame_mut(gfn).copy_from_slice(&prev);
        }
        new.insert(gfn, data);
    }
    (mem, new)
}

fn encode(spec: &Spec, mem: &VecGuestMemory, new: &BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    let info = HeaderInfo {
        epoch: spec.epoch,
        page_size: PS as u32,
        page_count: new.len() as u32,
        vcpu_count: spec.vcpus.len() as u32,
        device_count: spec.devices.len() as u32,
    };
    let mut enc = CheckpointEncoder::new(Vec::new(), info, limits()).unwrap();
    let pages: Vec<DirtyPage<'_>> =
        new.iter().map(|(&gfn, data)| DirtyPage { gfn, data, previous: Some(mem.frame(gfn)) }).collect();
    enc.pages(&pages).unwrap();
    for (i, v) in spec.vcpus.iter().enumerate() {
        enc.vcpu_state(i as u32, 1, v).unwrap();
    }
    for (&id, d) in &spec.devices {
        enc.device_state(id, 2, d).unwrap();
    }
    enc.finish().unwrap().0
}

/// Feeds `bytes` in chunks of the given sizes (cycled); returns the staged checkpoint.
fn decode_chunked(bytes: &[u8], chunks: &[usize]) -> Result<(StagedCheckpoint, usize), StreamError> {
    let mut d = CheckpointDecoder::new(limits());
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let n = chunks.get(i % chunks.len().max(1)).copied().unwrap_or(bytes.len()).max(1);
        let end = (pos + n).min(bytes.len());
        match d.feed(&bytes[pos..end])? {
            Feed::NeedMore => {}
            Feed::Complete { checkpoint, consumed } => return Ok((checkpoint, pos + consumed)),
        }
        pos = end;
        i += 1;
    }
    Err(d.end_of_stream().unwrap_err())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Duplicate(usize, usize),
    Delete(usize),
    Overwrite(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..64).prop_map(|(p, l)| Mutation::Duplicate(p, l)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Overwrite(p, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Flip(p, b) => bytes[p % n] ^= 1 << b,
        Mutation::Truncate(p) => bytes.truncate(p % n),
        Mutation::Insert(p, b) => bytes.insert(p % (n + 1), b),
        Mutation::Duplicate(p, l) => {
            let p = p % n;
            let seg: Vec<u8> = bytes[p..(p + l).min(n)].to_vec();
            let at = (p + seg.len()).min(n);
            bytes.splice(at..at, seg);
        }
        Mutation::Delete(p) => {
            bytes.remove(p % n);
        }
        Mutation::Overwrite(p, b) => bytes[p % n] = b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn codec_round_trip_any_chunking(spec in spec(), chunks in prop::collection::vec(1usize..300, 1..8)) {
        let (mut mem, new) = materialise(&spec);
        let bytes = encode(&spec, &mem, &new);
        let (cp, consumed) = decode_chunked(&bytes, &chunks).unwrap();
        prop_assert_eq!(consumed, bytes.len());
        prop_assert_eq!(cp.epoch(), spec.epoch);
        prop_assert_eq!(cp.page_count(), new.len());
        let before = mem.clone();
        let v: Vec<Vec<u8>> = cp.vcpu_states().map(|b| b.data.to_vec()).collect();
        prop_assert_eq!(v, spec.vcpus.clone());
        let d: BTreeMap<u64, Vec<u8>> = cp.device_states().map(|b| (b.id, b.data.to_vec())).collect();
        prop_assert_eq!(d, spec.devices.clone());
        cp.apply_to(&mut mem, spec.epoch).unwrap();
        for gfn in 0..FRAMES {
            match new.get(&gfn) {
                Some(d) => prop_assert_eq!(mem.frame(gfn), &d[..]),
                None => prop_assert_eq!(mem.frame(gfn), before.frame(gfn)),
            }
        }
    }

    #[test]
    fn corruption_is_rejected_or_harmless(
        spec in spec(),
        muts in prop::collection::vec(mutation(), 1..4),
        chunks in prop::collection::vec(1usize..300, 1..4),
    ) {
        let (mem, new) = materialise(&spec);
        let bytes = encode(&spec, &mem, &new);
        let mut expected = mem.clone();
        decode_chunked(&bytes, &[bytes.len()]).unwrap().0.apply_to(&mut expected, spec.epoch).unwrap();

        let mut bad = bytes.clone();
        for m in &muts {
            if bad.is_empty() { break; }
            mutate(&mut bad, m);
        }
        let mut target = mem.clone();
        match decode_chunked(&bad, &chunks) {
            Ok((cp, _consumed)) => {
                // Only acceptable if the result is exactly the original checkpoint (e.g. the
                // mutation hit bytes after the commit record).
                prop_assert_eq!(cp.epoch(), spec.epoch);
                cp.apply_to(&mut target, spec.epoch).unwrap();
                prop_assert!(target == expected, "undetected corruption changed the result");
            }
            Err(e) => {
                let _ = e.to_string();
                prop_assert!(target == mem, "memory touched on error");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        valid_header in any::<bool>(),
        chunk in 1usize..200,
    ) {
        let mut input = Vec::new();
        if valid_header {
            // A real header so the decoder gets past the magic.
            let spec = Spec { epoch: 1, pages: BTreeMap::new(), vcpus: vec![], devices: BTreeMap::new() };
            let (mem, new) = materialise(&spec);
            input.extend_from_slice(&encode(&spec, &mem, &new)[..40]);
        }
        input.extend_from_slice(&bytes);
        let mut d = CheckpointDecoder::new(limits());
        for c in input.chunks(chunk) {
            match d.feed(c) {
                Ok(Feed::NeedMore) => {}
                Ok(Feed::Complete { .. }) | Err(_) => break,
            }
        }
        let _ = d.end_of_stream();
    }
}

// ---------------------------------------------------------------------------------------------
// Two failover machines, a replication link and a witness.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Heartbeat(u64),
    JoinRequest,
    /// Full-sync data from the primary.
    SyncData(u64),
    /// Joiner: all sync data received.
    SyncAck(u64),
    /// Primary: now protected; joiner may become the secondary.
    ColoStart(u64),
    Checkpoint(u64),
    Ack(u64),
    /// Secondary: the checkpoint was refused.
    Nack(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Deliver(usize),
    Drop(usize),
    Cut {
        notify: [bool; 2],
    },
    Restore,
    WitnessReach(usize, bool),
    /// The witness acts on node n's claims but its replies to n are lost (n sees Unreachable).
    WitnessLossy(usize, bool),
    /// The secondary refuses checkpoints (bad stream) while it keeps sending heartbeats.
    Refuse(bool),
    Crash(usize),
    Restart(usize),
    Cmd(usize, Command),
    PromotionDone(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0usize..2;
    prop_oneof![
        6 => (1u64..15).prop_map(Op::Advance),
        6 => node.clone().prop_map(Op::Deliver),
        1 => node.clone().prop_map(Op::Drop),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Op::Cut { notify: [a, b] }),
        1 => Just(Op::Restore),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, r)| Op::WitnessReach(n, r)),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, r)| Op::WitnessLossy(n, r)),
        1 => any::<bool>().prop_map(Op::Refuse),
        1 => node.clone().prop_map(Op::Crash),
        1 => node.clone().prop_map(Op::Restart),
        2 => (node.clone(), prop_oneof![
            Just(Command::FailoverNow),
            Just(Command::CheckpointNow),
            Just(Command::Stop),
            Just(Command::Rejoin),
        ]).prop_map(|(n, c)| Op::Cmd(n, c)),
        2 => node.prop_map(Op::PromotionDone),
    ]
}

struct World {
    now: Tick,
    nodes: [FailoverMachine; 2],
    alive: [bool; 2],
    link_up: bool,
    /// queues[i]: messages travelling to node i.
    queues: [VecDeque<Msg>; 2],
    witness_reach: [bool; 2],
    witness_lossy: [bool; 2],
    refuse: bool,
    witness_gen: u64,
    witness_owner: usize,
    next_epoch: u64,
}

impl World {
    fn new() -> Self {
        let cfg = FailoverConfig { heartbeat_interval: 10, miss_limit: 3, witness_retry: 7, checkpoint_timeout: 60 };
        Self {
            now: Tick(0),
            nodes: [
                FailoverMachine::new(cfg, Role::Primary, 1, Tick(0)),
                FailoverMachine::new(cfg, Role::Secondary, 1, Tick(0)),
            ],
            alive: [true, true],
            link_up: true,
            queues: [VecDeque::new(), VecDeque::new()],
            witness_reach: [true, true],
            witness_lossy: [false, false],
            refuse: false,
            witness_gen: 1,
            witness_owner: 0,
            next_epoch: 1,
        }
    }

    fn send(&mut self, from: usize, m: Msg) {
        if self.link_up {
            self.queues[1 - from].push_back(m);
        }
    }

    fn event(&mut self, n: usize, e: Event) {
        if !self.alive[n] {
            return;
        }
        let mut work: VecDeque<(usize, Event)> = VecDeque::from([(n, e)]);
        while let Some((n, e)) = work.pop_front() {
            if !self.alive[n] {
                continue;
            }
            let actions = self.nodes[n].handle(self.now, e);
            for a in actions {
                match a {
                    Action::SendHeartbeat { generation } => self.send(n, Msg::Heartbeat(generation)),
                    Action::ClaimWitness { generation } => {
                        let verdict = if !self.witness_reach[n] {
                            Verdict::Unreachable
                        } else if generation > self.witness_gen {
                            self.witness_gen = generation;
                            self.witness_owner = n;
                            Verdict::Granted
                        } else if generation == self.witness_gen && self.witness_owner == n {
                            Verdict::Granted
                        } else {
                            Verdict::Denied
                        };
                        // A lossy witness acted on the claim, but the reply never arrives.
                        let verdict = if self.witness_lossy[n] { Verdict::Unreachable } else { verdict };
                        work.push_back((n, Event::Witness { generation, verdict }));
                    }
                    Action::SendJoinRequest => self.send(n, Msg::JoinRequest),
                    Action::StartFullSync { generation } => self.send(n, Msg::SyncData(generation)),
                    Action::StartColo { generation } if self.nodes[n].role() == Role::Primary => {
                        self.send(n, Msg::ColoStart(generation));
                    }
                    Action::StartCheckpoint => {
                        let epoch = self.next_epoch;
                        self.next_epoch += 1;
                        work.push_back((n, Event::CheckpointBegin { epoch }));
                        self.send(n, Msg::Checkpoint(epoch));
                    }
                    Action::AckCheckpoint { epoch } => self.send(n, Msg::Ack(epoch)),
                    _ => {}
                }
            }
        }
    }

    fn deliver(&mut self, to: usize) {
        let Some(m) = self.queues[to].pop_front() else {
            return;
        };
        if !self.link_up || !self.alive[to] {
            return;
        }
        match m {
            Msg::Heartbeat(generation) => self.event(to, Event::Heartbeat { generation }),
            Msg::JoinRequest => self.event(to, Event::PeerJoinRequest),
            Msg::SyncData(g) => {
                if self.nodes[to].role() == Role::Joining {
                    self.send(to, Msg::SyncAck(g));
                }
            }
            Msg::SyncAck(g) => self.event(to, Event::FullSyncComplete { generation: g }),
            Msg::ColoStart(g) => self.event(to, Event::FullSyncComplete { generation: g }),
            Msg::Checkpoint(epoch) => {
                self.event(to, Event::CheckpointBegin { epoch });
                if self.refuse {
                    self.event(to, Event::CheckpointFailed { epoch });
                    if self.nodes[to].role() == Role::Secondary {
                        self.send(to, Msg::Nack(epoch));
                    }
                } else {
                    self.event(to, Event::CheckpointCommitted { epoch });
                }
            }
            Msg::Ack(epoch) => self.event(to, Event::CheckpointAcked { epoch }),
            Msg::Nack(epoch) => self.event(to, Event::CheckpointFailed { epoch }),
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Advance(dt) => {
                self.now = Tick(self.now.0 + dt);
                self.event(0, Event::Tick);
                self.event(1, Event::Tick);
            }
            Op::Deliver(to) => self.deliver(to),
            Op::Drop(to) => {
                self.queues[to].pop_front();
            }
            Op::Cut { notify } => {
                self.link_up = false;
                self.queues = [VecDeque::new(), VecDeque::new()];
                for (n, &tell) in notify.iter().enumerate() {
                    if tell {
                        self.event(n, Event::LinkDown);
                    }
                }
            }
            Op::Restore => {
                if !self.link_up {
                    self.link_up = true;
                    self.event(0, Event::LinkUp);
                    self.event(1, Event::LinkUp);
                }
            }
            Op::WitnessReach(n, r) => self.witness_reach[n] = r,
            Op::WitnessLossy(n, r) => self.witness_lossy[n] = r,
            Op::Refuse(r) => self.refuse = r,
            Op::Crash(n) => {
                self.alive[n] = false;
                self.queues[n].clear();
            }
            Op::Restart(n) => {
                if !self.alive[n] {
                    self.alive[n] = true;
                    self.nodes[n] = FailoverMachine::new(FailoverConfig::default(), Role::Fenced, 0, self.now);
                }
            }
            Op::Cmd(n, c) => self.event(n, Event::Command(c)),
            Op::PromotionDone(n) => self.event(n, Event::PromotionComplete),
        }
    }

    fn check(&self) -> Result<(), String> {
        let live: Vec<&FailoverMachine> = (0..2).filter(|&i| self.alive[i]).map(|i| &self.nodes[i]).collect();
        let unprotected = live.iter().filter(|m| m.role().releases_unprotected()).count();
        if unprotected > 1 {
            return Err(format!(
                "two hosts release output unprotected: {:?}/{} and {:?}/{}",
                live[0].role(),
                live[0].generation(),
                live[1].role(),
                live[1].generation()
            ));
        }
        if live.len() == 2 {
            let (a, b) = (live[0], live[1]);
            if a.role().faces_clients() && b.role().faces_clients() && a.generation() == b.generation() {
                return Err(format!("two primaries in generation {}", a.generation()));
            }
        }
        // A generation the witness granted is never forgotten by its owner: while the owner
        // still runs in the old generation it keeps claiming the granted one (issue 15, item
        // 5: otherwise the peer's later claim is denied and fences the only live host).
        for i in 0..2 {
            let m = &self.nodes[i];
            if self.alive[i]
                && self.witness_owner == i
                && self.witness_gen > m.generation()
                && matches!(m.role(), Role::Primary | Role::Secondary)
                && m.pending_claim() != Some(self.witness_gen)
            {
                return Err(format!(
                    "node {i} ({:?} at generation {}) dropped its claim on generation {} the witness granted it",
                    m.role(),
                    m.generation(),
                    self.witness_gen
                ));
            }
        }
        // Whoever releases unprotected owns its generation at the witness.
        for i in 0..2 {
            let m = &self.nodes[i];
            if self.alive[i] && m.role().releases_unprotected() && m.role() != Role::Standalone {
                if m.generation() > self.witness_gen {
                    return Err(format!("node {i} at generation {} beyond the witness", m.generation()));
                }
                if m.generation() == self.witness_gen && self.witness_owner != i {
                    return Err(format!("node {i} serves generation {} it does not own", m.generation()));
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn never_two_primaries_facing_clients(ops in prop::collection::vec(op(), 1..120)) {
        let mut w = World::new();
        for (i, op) in ops.iter().enumerate() {
            w.apply(op);
            if let Err(e) = w.check() {
                prop_assert!(false, "after op {} {:?}: {}", i, op, e);
            }
        }
    }
}

/// Without faults the pair stays protected and checkpoints get acknowledged.
#[test]
fn healthy_pair_stays_protected() {
    let mut w = World::new();
    for _ in 0..50 {
        w.apply(&Op::Advance(5));
        w.apply(&Op::Deliver(0));
        w.apply(&Op::Deliver(1));
        w.apply(&Op::Cmd(0, Command::CheckpointNow));
        w.apply(&Op::Deliver(1));
        w.apply(&Op::Deliver(0));
    }
    assert_eq!(w.nodes[0].role(), Role::Primary);
    assert_eq!(w.nodes[1].role(), Role::Secondary);
    assert!(w.next_epoch > 10);
}

/// Issue 15, item 8: the secondary refuses checkpoints for a while (and keeps sending
/// heartbeats); the primary aborts and retries, and checkpoints resume once it accepts again.
#[test]
fn refused_checkpoints_do_not_stall_the_pair() {
    let mut w = World::new();
    w.apply(&Op::Refuse(true));
    w.apply(&Op::Cmd(0, Command::CheckpointNow));
    w.apply(&Op::Deliver(1));
    w.apply(&Op::Deliver(0));
    assert_eq!(w.nodes[0].checkpoint_in_flight(), None, "a refusal aborts at once");
    // The primary keeps retrying while the secondary keeps refusing.
    let first = w.next_epoch;
    for _ in 0..40 {
        w.apply(&Op::Advance(5));
        w.apply(&Op::Deliver(1));
        w.apply(&Op::Deliver(0));
    }
    assert!(w.next_epoch > first + 3, "retries: {} -> {}", first, w.next_epoch);
    assert_eq!(w.nodes[1].last_committed(), None);
    w.apply(&Op::Refuse(false));
    let before = w.next_epoch;
    for _ in 0..100 {
        w.apply(&Op::Advance(5));
        w.apply(&Op::Deliver(1));
        w.apply(&Op::Deliver(0));
    }
    assert!(w.next_epoch > before, "checkpoints started again");
    assert_eq!(w.nodes[0].role(), Role::Primary);
    assert_eq!(w.nodes[1].role(), Role::Secondary);
    assert_eq!(w.nodes[1].last_committed(), Some(w.next_epoch - 1));
    w.check().unwrap();
}

/// Issue 15, item 5 as a scenario: the witness grants S generation 2 but the reply is lost; S
/// hears P again; S keeps claiming, gets the answer and takes over; P is fenced.
#[test]
fn lost_witness_reply_still_ends_with_one_server() {
    let mut w = World::new();
    w.apply(&Op::WitnessLossy(1, true));
    w.apply(&Op::WitnessReach(0, false));
    w.apply(&Op::Cut { notify: [false, true] });
    assert_eq!(w.witness_owner, 1);
    assert_eq!(w.nodes[1].role(), Role::Secondary);
    w.apply(&Op::Restore);
    w.apply(&Op::WitnessLossy(1, false));
    w.apply(&Op::WitnessReach(0, true));
    for _ in 0..20 {
        w.apply(&Op::Advance(5));
        w.apply(&Op::Deliver(0));
        w.apply(&Op::Deliver(1));
        w.check().unwrap();
    }
    assert_eq!(w.nodes[1].role(), Role::FailingOver);
    assert_eq!(w.nodes[0].role(), Role::Fenced);
}

/// Primary crash: the secondary takes over; the old primary restarts and rejoins.
#[test]
fn primary_crash_then_rejoin() {
    let mut w = World::new();
    w.apply(&Op::Crash(0));
    for _ in 0..10 {
        w.apply(&Op::Advance(5));
    }
    assert_eq!(w.nodes[1].role(), Role::FailingOver);
    w.apply(&Op::PromotionDone(1));
    assert_eq!(w.nodes[1].role(), Role::PrimaryUnprotected);
    w.apply(&Op::Restart(0));
    w.apply(&Op::Cmd(0, Command::Rejoin));
    for _ in 0..6 {
        w.apply(&Op::Deliver(1));
        w.apply(&Op::Deliver(0));
    }
    assert_eq!(w.nodes[0].role(), Role::Secondary);
    assert_eq!(w.nodes[1].role(), Role::Primary);
    w.check().unwrap();
}
