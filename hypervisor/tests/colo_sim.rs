//! Deterministic two-host simulation of COLO (FoundationDB simulator / TigerBeetle VOPR style).
//!
//! Both hosts run the real [`ColoNode`]; everything around them is modelled here on a virtual
//! clock (1 step = 1 ms) driven by one seeded PRNG, so a seed replays exactly:
//! - a model guest pair: a key-value service over a TCP-like byte stream (real Ethernet/IPv4/TCP
//!   frames built with `colo::frames`), whose whole state (connections, table, NIC receive ring)
//!   lives in model memory pages, plus one "vCPU register"; its disk is a `MemDisk`. The declared
//!   source of divergence is `T` (TIME), whose reply is the VM's clock;
//! - the drivers: capture (dirty pages encoded with `colo::checkpoint`), apply (checkpoint cache,
//!   pages dirtied by either VM restored, vCPU reset), full sync, disk; the secondary's driver
//!   sometimes refuses a checkpoint (before changing anything), and the secondary host
//!   sometimes restarts with nothing;
//! - the replication link: a reliable in-order byte stream with latency, bandwidth, arbitrary
//!   chunking, cuts and reconnects, and injected garbage;
//! - clients on a network with loss, duplication and reordering (client to server), which
//!   retransmit, and a reference model of the replies they must get.
//!
//! Invariants, checked as the history runs:
//! - consistency: every frame released to a client is covered by a checkpoint the secondary
//!   applied (produced before its capture point), or matched by the SVM's current history (same
//!   bytes at the same stream offsets, acknowledgement not beyond the SVM's, SYN-ACK seen; the
//!   history is reset to the PVM's at the capture point by every apply, and is void while a
//!   restarted secondary holds nothing);
//! - every client stream is released in order, with no byte lost or duplicated (each PVM frame
//!   released once, in production order per connection; clients see no gap and no repeat, and
//!   every reply is what the reference model says);
//! - after each applied checkpoint, the SVM's memory, vCPU and disk equal the PVM's at the
//!   capture point (and `checkpoint_verify` agrees);
//! - no stall: after the faults stop, every request is answered within a bounded time;
//! - the same seed gives the same trace hash.
//!
//! Environment: `COLO_SIM_SEEDS` (histories, default 1000), `COLO_SIM_SEED` (run only this one,
//! verbose), `COLO_SIM_FIRST` (first seed of the range, default 1).

use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt::Write as _;

use hypervisor::colo::block::{BlockBackend, MemDisk, SECTOR_SIZE};
use hypervisor::colo::checkpoint::{
    CheckpointEncoder, Crc32c, DirtyPage, GuestMemoryMut, HeaderInfo, StagedCheckpoint, StreamLimits, VecGuestMemory,
};
use hypervisor::colo::comparator::ComparatorLimits;
use hypervisor::colo::failover::Role as FoRole;
use hypervisor::colo::frames;
use hypervisor::colo::link::StateKind;
use hypervisor::colo::node::{
    Action, ApplyFailure, Capture, CaptureKind, ClaimOutcome, ColoNode, Event, FullSyncSource, NodeCommand, NodeConfig,
    NodeRole, NodeStats, SyncPiece, WitnessMode,
};
use hypervisor::colo::packet::{parse_frame, TcpFlags};
use hypervisor::colo::Tick;
use smoltcp::wire::{Ipv4Address, TcpControl};

// ---------------------------------------------------------------------------------------------
// PRNG: SplitMix64, so seeds stay stable across Rust and crate versions.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `per_million` / 1,000,000.
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

/// Folds `bytes` into a trace hash (CRC-32C of the bytes, then FNV-1a over that and the hash:
/// cheap in debug builds, stable across versions).
fn fold(hash: &mut u64, bytes: &[u8]) {
    fnv(hash, &Crc32c::checksum(bytes).to_le_bytes());
    fnv(hash, &(bytes.len() as u32).to_le_bytes());
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x100_0000_01B3);
    }
}

// ---------------------------------------------------------------------------------------------
// The model guest. All state is in `mem` (and `pc`, its one vCPU register).

const PAGE: usize = 512;
const PAGES: usize = 16;
const MEM: usize = PAGE * PAGES;
const DISK_SECTORS: u64 = 32;
const CONNS: usize = 4;
const CONN_BASE: usize = 0; // 4 x 96 bytes
const CONN_SIZE: usize = 96;
const REQ_MAX: usize = 64;
const KV_BASE: usize = 512; // 32 x u32
const RING_BASE: usize = 1024; // head u32, tail u32, slots
const RING_SLOTS: usize = 8;
const SLOT_SIZE: usize = 160;
const SCRIBBLE: usize = 3072;
/// Per connection: the reply bytes the client has not acknowledged (a ring indexed by stream
/// offset), so the guest retransmits what a failover lost, as a real TCP stack does.
const SNDBUF_BASE: usize = 2400; // 4 x 160 bytes, below SCRIBBLE
const SNDBUF: usize = 160;
/// The longest reply line (a u32 and a newline, or `T` and the clock).
const REPLY_MAX: usize = 12;
const SERVER: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const CLIENT: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
const SERVER_PORT: u16 = 80;
const WINDOW: u16 = 8192;

struct Vm {
    mem: Vec<u8>,
    dirty: Vec<bool>,
    pc: u64,
    running: bool,
    rx_dropped: u64,
    /// Declared divergence: XORed into the ISNs this VM picks (as with `shim_isn=off`), so the
    /// SVM's connections start at other sequence numbers and the rewriter translates them.
    isn_salt: u32,
}

impl Vm {
    fn new() -> Self {
        Vm { mem: vec![0; MEM], dirty: vec![false; PAGES], pc: 0, running: true, rx_dropped: 0, isn_salt: 0 }
    }
    fn r32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.mem[at..at + 4].try_into().unwrap())
    }
    fn r16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.mem[at..at + 2].try_into().unwrap())
    }
    fn write(&mut self, at: usize, bytes: &[u8]) {
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        for p in at / PAGE..=(at + bytes.len().max(1) - 1) / PAGE {
            self.dirty[p] = true;
        }
    }
    fn w32(&mut self, at: usize, v: u32) {
        self.write(at, &v.to_le_bytes());
    }
    fn w16(&mut self, at: usize, v: u16) {
        self.write(at, &v.to_le_bytes());
    }

    /// The NIC writes a received frame into the guest's receive ring (a full ring drops it).
    fn nic_receive(&mut self, frame: &[u8]) {
        let head = self.r32(RING_BASE);
        let tail = self.r32(RING_BASE + 4);
        if tail.wrapping_sub(head) as usize >= RING_SLOTS || frame.len() > SLOT_SIZE - 2 {
            self.rx_dropped += 1;
            return;
        }
        let slot = RING_BASE + 8 + (tail as usize % RING_SLOTS) * SLOT_SIZE;
        self.w16(slot, frame.len() as u16);
        self.write(slot + 2, frame);
        self.w32(RING_BASE + 4, tail.wrapping_add(1));
    }

    fn ring_pop(&mut self) -> Option<Vec<u8>> {
        let head = self.r32(RING_BASE);
        let tail = self.r32(RING_BASE + 4);
        if head == tail {
            return None;
        }
        let slot = RING_BASE + 8 + (head as usize % RING_SLOTS) * SLOT_SIZE;
        let len = self.r16(slot) as usize;
        let f = self.mem[slot + 2..slot + 2 + len].to_vec();
        self.w32(RING_BASE, head.wrapping_add(1));
        Some(f)
    }
}

/// What the guest needs from its disk.
trait GuestDisk {
    fn read(&mut self, sector: u64) -> u32;
    fn write(&mut self, sector: u64, value: u32);
}

fn sector_bytes(value: u32) -> [u8; SECTOR_SIZE] {
    let mut s = [0u8; SECTOR_SIZE];
    s[..4].copy_from_slice(&value.to_le_bytes());
    s[4..8].copy_from_slice(&(!value).to_le_bytes());
    s
}

fn isn_for(port: u16) -> u32 {
    (u32::from(port)).wrapping_mul(0x9E37_79B1) ^ 0x5EED
}

fn server_frame(port: u16, seq: u32, ack: u32, ctl: TcpControl, payload: &[u8]) -> Vec<u8> {
    frames::tcp_v4(SERVER, CLIENT, &frames::tcp_repr((SERVER_PORT, port), seq, Some(ack), ctl, WINDOW, payload))
}

fn client_frame(port: u16, seq: u32, ack: Option<u32>, ctl: TcpControl, payload: &[u8]) -> Vec<u8> {
    frames::tcp_v4(CLIENT, SERVER, &frames::tcp_repr((port, SERVER_PORT), seq, ack, ctl, WINDOW, payload))
}

/// Runs the guest until it has handled one received frame (one "exit"). Returns its output
/// frames, or `None` when the ring is empty.
fn guest_step(vm: &mut Vm, clock: u64, disk: &mut dyn GuestDisk) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    #[allow(clippy::never_loop)]
    loop {
        let f = vm.ring_pop()?;
        vm.pc += 1;
        let p = parse_frame(&f);
        let Some(t) = p.tcp().cloned() else { break };
        let port = p.flow.src_port;
        let slot = (0..CONNS).find(|&i| {
            let b = CONN_BASE + i * CONN_SIZE;
            vm.mem[b] == 1 && vm.r16(b + 2) == port
        });
        if t.flags.contains(TcpFlags::SYN) {
            let b = match slot {
                Some(i) => CONN_BASE + i * CONN_SIZE,
                None => {
                    let Some(i) = (0..CONNS).find(|&i| vm.mem[CONN_BASE + i * CONN_SIZE] == 0) else { break };
                    let b = CONN_BASE + i * CONN_SIZE;
                    let isn = isn_for(port) ^ vm.isn_salt;
                    vm.write(b, &[1, 0]);
                    vm.w16(b + 2, port);
                    vm.w32(b + 4, isn);
                    vm.w32(b + 8, t.seq.wrapping_add(1));
                    vm.w32(b + 12, isn.wrapping_add(1));
                    vm.w16(b + 16, 0);
                    vm.w32(b + 84, isn.wrapping_add(1));
                    b
                }
            };
            if vm.r32(b + 8) == t.seq.wrapping_add(1) {
                out.push(server_frame(port, vm.r32(b + 4), vm.r32(b + 8), TcpControl::Syn, &[]));
            }
            break;
        }
        let Some(i) = slot else { break };
        let b = CONN_BASE + i * CONN_SIZE;
        let rcv_nxt = vm.r32(b + 8);
        let payload = &f[t.payload.clone()];
        // The client's acknowledgement frees reply bytes.
        let (una, nxt) = (vm.r32(b + 84), vm.r32(b + 12));
        if t.flags.contains(TcpFlags::ACK) {
            let acked = t.ack.wrapping_sub(una);
            if acked > 0 && acked <= nxt.wrapping_sub(una) {
                vm.w32(b + 84, t.ack);
            }
        }
        let una = vm.r32(b + 84);
        let unacked = nxt.wrapping_sub(una) as usize;
        let lines = payload.iter().filter(|&&c| c == b'\n').count();
        let room = unacked + lines * REPLY_MAX <= SNDBUF;
        if t.seq != rcv_nxt || payload.is_empty() || !room {
            if unacked > 0 {
                // A probe, a duplicate or no room: retransmit what the client has not
                // acknowledged (a failover may have lost it).
                let isn = vm.r32(b + 4);
                let off = una.wrapping_sub(isn.wrapping_add(1)) as usize;
                let data: Vec<u8> =
                    (0..unacked).map(|k| vm.mem[SNDBUF_BASE + i * SNDBUF + (off + k) % SNDBUF]).collect();
                out.push(server_frame(port, una, rcv_nxt, TcpControl::Psh, &data));
            } else if !payload.is_empty() {
                // Duplicate or out of order: acknowledge what we have.
                out.push(server_frame(port, nxt, rcv_nxt, TcpControl::None, &[]));
            }
            break;
        }
        let mut reply = Vec::new();
        let mut reqlen = vm.r16(b + 16) as usize;
        for &c in payload {
            if c == b'\n' {
                let line = vm.mem[b + 20..b + 20 + reqlen].to_vec();
                reqlen = 0;
                execute(vm, clock, disk, &line, &mut reply);
            } else if reqlen < REQ_MAX {
                vm.mem[b + 20 + reqlen] = c;
                vm.dirty[(b + 20 + reqlen) / PAGE] = true;
                reqlen += 1;
            }
        }
        vm.w16(b + 16, reqlen as u16);
        let rcv_nxt = rcv_nxt.wrapping_add(payload.len() as u32);
        vm.w32(b + 8, rcv_nxt);
        let snd = vm.r32(b + 12);
        if reply.is_empty() {
            out.push(server_frame(port, snd, rcv_nxt, TcpControl::None, &[]));
        } else {
            out.push(server_frame(port, snd, rcv_nxt, TcpControl::Psh, &reply));
            let off = snd.wrapping_sub(vm.r32(b + 4).wrapping_add(1)) as usize;
            for (k, &c) in reply.iter().enumerate() {
                let at = SNDBUF_BASE + i * SNDBUF + (off + k) % SNDBUF;
                vm.mem[at] = c;
                vm.dirty[at / PAGE] = true;
            }
            vm.w32(b + 12, snd.wrapping_add(reply.len() as u32));
        }
        break;
    }
    Some(out)
}

fn parse_num(s: &[u8]) -> Option<u32> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// One request line: `S k v`, `G k`, `I k`, `D k` (value from the disk), `T` (the VM's clock).
fn execute(vm: &mut Vm, clock: u64, disk: &mut dyn GuestDisk, line: &[u8], reply: &mut Vec<u8>) {
    let parts: Vec<&[u8]> = line.split(|&c| c == b' ').collect();
    let key = parts.get(1).and_then(|k| parse_num(k)).filter(|&k| (k as usize) < 32);
    // Deterministic scribbling over more pages, as a real service's heap would.
    let at = SCRIBBLE + (vm.pc.wrapping_mul(0x9E37_79B9) % (MEM - SCRIBBLE - 8) as u64) as usize;
    let pc = vm.pc;
    vm.write(at, &pc.to_le_bytes());
    match (parts[0], key) {
        (b"S", Some(k)) => {
            let v = parts.get(2).and_then(|v| parse_num(v)).unwrap_or(0);
            vm.w32(KV_BASE + 4 * k as usize, v);
            disk.write(u64::from(k), v);
            reply.extend_from_slice(b"OK\n");
        }
        (b"G", Some(k)) => {
            let _ = writeln!(Sink(reply), "{}", vm.r32(KV_BASE + 4 * k as usize));
        }
        (b"I", Some(k)) => {
            let v = vm.r32(KV_BASE + 4 * k as usize).wrapping_add(1);
            vm.w32(KV_BASE + 4 * k as usize, v);
            let _ = writeln!(Sink(reply), "{v}");
        }
        (b"D", Some(k)) => {
            let v = disk.read(u64::from(k));
            let _ = writeln!(Sink(reply), "{v}");
        }
        (b"T", _) => {
            let _ = writeln!(Sink(reply), "T{clock}");
        }
        _ => reply.extend_from_slice(b"ERR\n"),
    }
}

struct Sink<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Drivers' helpers.

fn digest(mem: &[u8], pc: u64, disk: &[u8]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325;
    fold(&mut h, mem);
    fold(&mut h, &pc.to_le_bytes());
    fold(&mut h, disk);
    h
}

fn mem_disk_read(d: &MemDisk, sector: u64) -> u32 {
    let mut s = [0u8; SECTOR_SIZE];
    d.read_sector(sector, &mut s).unwrap();
    u32::from_le_bytes(s[..4].try_into().unwrap())
}

struct FullSource {
    mem: Vec<u8>,
    disk: Vec<u8>,
    pc: u64,
    at: usize,
    piece: usize,
}

impl FullSyncSource for FullSource {
    fn ram_bytes(&self) -> u64 {
        self.mem.len() as u64
    }
    fn disk_sectors(&self) -> u64 {
        (self.disk.len() / SECTOR_SIZE) as u64
    }
    fn next_piece(&mut self, buf: &mut [u8]) -> Option<SyncPiece> {
        let piece = self.piece.min(buf.len());
        if self.at < self.mem.len() {
            let n = piece.min(self.mem.len() - self.at);
            buf[..n].copy_from_slice(&self.mem[self.at..self.at + n]);
            let p = SyncPiece::Memory { offset: self.at as u64, len: n };
            self.at += n;
            return Some(p);
        }
        let d = self.at - self.mem.len();
        if d < self.disk.len() {
            let n = (piece / SECTOR_SIZE * SECTOR_SIZE).max(SECTOR_SIZE).min(self.disk.len() - d);
            buf[..n].copy_from_slice(&self.disk[d..d + n]);
            self.at += n;
            return Some(SyncPiece::Disk { sector: (d / SECTOR_SIZE) as u64, len: n });
        }
        if d == self.disk.len() {
            self.at += 1;
            buf[..8].copy_from_slice(&self.pc.to_le_bytes());
            return Some(SyncPiece::State { kind: StateKind::Vcpu, id: 0, tag: 1, len: 8 });
        }
        None
    }
}

/// What the oracle knows about one connection's PVM output at a capture point.
#[derive(Clone, Default)]
struct FlowView {
    /// Server data bytes by stream offset (offset 0 = ISN + 1).
    stream: Vec<u8>,
    /// Highest client offset acknowledged (ack - client ISN - 1), if any.
    max_ack: Option<u32>,
    /// Server ISN, once a SYN-ACK was sent.
    isn: Option<u32>,
}

struct Snap {
    mem: Vec<u8>,
    pc: u64,
    disk: Vec<u8>,
    flows: BTreeMap<u16, FlowView>,
}

// ---------------------------------------------------------------------------------------------
// Clients.

struct Client {
    port: u16,
    isn: u32,
    key_base: u32,
    start: u64,
    state: u8, // 0 closed, 1 syn sent, 2 established
    server_isn: u32,
    out: Vec<u8>,
    sent: usize,
    acked: usize,
    last_send: u64,
    requests: Vec<Vec<u8>>,
    received: Vec<u8>,
    rcv_next: u32,
    want: usize,
}

impl Client {
    fn new(i: usize, rng: &mut Rng) -> Self {
        Client {
            port: 40000 + i as u16,
            isn: rng.next() as u32,
            key_base: 8 * i as u32,
            start: rng.below(50),
            state: 0,
            server_isn: 0,
            out: Vec::new(),
            sent: 0,
            acked: 0,
            last_send: 0,
            requests: Vec::new(),
            received: Vec::new(),
            rcv_next: 0,
            want: rng.range(3, 24) as usize,
        }
    }

    fn new_request(&mut self, rng: &mut Rng, time_permille: u64) {
        let k = self.key_base + rng.below(8) as u32;
        let r = match rng.below(1000) {
            x if x < time_permille => "T".to_string(),
            x if x < 350 => format!("S {k} {}", rng.below(100_000)),
            x if x < 550 => format!("G {k}"),
            x if x < 800 => format!("I {k}"),
            _ => format!("D {k}"),
        };
        self.out.extend_from_slice(r.as_bytes());
        self.out.push(b'\n');
        self.requests.push(r.into_bytes());
    }

    /// The replies the reference model expects; `T` replies only have their form checked.
    fn check_replies(&self) -> Result<(), String> {
        let mut kv = [0u32; 32];
        let mut disk = [0u32; 32];
        let text = String::from_utf8(self.received.clone()).map_err(|_| "reply stream is not UTF-8".to_string())?;
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        if lines.len() != self.requests.len() {
            return Err(format!("client {}: {} replies for {} requests", self.port, lines.len(), self.requests.len()));
        }
        for (req, got) in self.requests.iter().zip(&lines) {
            let req = std::str::from_utf8(req).unwrap();
            let p: Vec<&str> = req.split(' ').collect();
            let k = p.get(1).map(|k| k.parse::<usize>().unwrap());
            let want = match (p[0], k) {
                ("S", Some(k)) => {
                    let v = p[2].parse().unwrap();
                    kv[k] = v;
                    disk[k] = v;
                    "OK".to_string()
                }
                ("G", Some(k)) => kv[k].to_string(),
                ("I", Some(k)) => {
                    kv[k] = kv[k].wrapping_add(1);
                    kv[k].to_string()
                }
                ("D", Some(k)) => disk[k].to_string(),
                ("T", _) => {
                    if got.starts_with('T') && got[1..].parse::<u64>().is_ok() {
                        continue;
                    }
                    "T<clock>".to_string()
                }
                _ => "ERR".to_string(),
            };
            if *got != want {
                return Err(format!("client {}: request {req:?} got {got:?}, expected {want:?}", self.port));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The world.

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Sched {
    ToServer(Vec<u8>),
    ToClient(Vec<u8>),
    /// Epoch, and the primary's incarnation it was for.
    CaptureDone(u64, u64),
    /// Epoch, and the secondary's incarnation it was for.
    ApplyDone(u64, u64),
    Reconnect(u64),
    /// The witness's answer: host incarnation, generation, outcome (0 granted, 1 denied,
    /// 2 unreachable, 3 error), holder.
    WitnessReply(u64, u64, u8, u64),
}

struct Pipe {
    q: VecDeque<(u64, Vec<u8>)>,
    in_flight: usize,
    last_at: u64,
}

impl Pipe {
    fn new() -> Self {
        Pipe { q: VecDeque::new(), in_flight: 0, last_at: 0 }
    }
}

struct Params {
    steps: u64,
    drain: u64,
    clients: usize,
    latency: u64,
    jitter: u64,
    bandwidth: usize,
    window: usize,
    loss: u64,
    dup: u64,
    reorder_jitter: u64,
    cut: u64,
    garbage: u64,
    manual: u64,
    time_permille: u64,
    request_rate: u64,
    capture_delay: u64,
    apply_delay: u64,
    isn_diverges: bool,
    apply_fail: u64,
    restart: u64,
    /// Chance per step that the primary host dies (more while a checkpoint streams).
    crash_primary: u64,
    /// Chance per step that the witness goes down or comes back.
    witness_flap: u64,
    /// Chance that the witness decides a claim but its reply is lost.
    witness_lose: u64,
    /// Witness reply latency bound (ms).
    witness_latency: u64,
    /// `witness=none` (the sim plays the operator) instead of the fake etcd.
    witness_none: bool,
}

struct Pending {
    capture: Option<(u64, Capture, u64, u64)>,
    /// Epoch and digest (`None`: the driver refused the checkpoint and left the SVM alone).
    apply: Option<(u64, Option<u64>)>,
}

struct World {
    rng: Rng,
    p: Params,
    now: u64,
    seq: u64,
    sched: BinaryHeap<std::cmp::Reverse<(u64, u64, Sched)>>,
    nodes: [ColoNode<MemDisk>; 2],
    vms: [Vm; 2],
    pvm_disk: MemDisk,
    /// Primary's copy of the memory it last captured (the secondary's checkpoint cache if acked).
    prev: Vec<u8>,
    /// Secondary's checkpoint cache.
    cache: VecGuestMemory,
    svm_pc_staged: u64,
    pending: Pending,
    link_up: bool,
    link_gen: u64,
    pipes: [Pipe; 2],
    clients: Vec<Client>,
    /// Oracle: PVM output per connection: frames in production order with their epoch.
    produced: BTreeMap<u16, VecDeque<(Vec<u8>, u64)>>,
    pvm_view: BTreeMap<u16, FlowView>,
    svm_view: BTreeMap<u16, FlowView>,
    snaps: BTreeMap<u64, Snap>,
    client_isn: BTreeMap<u16, u32>,
    trace_hash: u64,
    trace: VecDeque<String>,
    verbose: bool,
    faults_on: bool,
    garbage_sent: bool,
    applied_checks: u64,
    released_frames: u64,
    txbuf: Vec<u8>,
    cfg: NodeConfig,
    /// Incarnation of each host slot (a restarted host is a new incarnation). Slot 0 is the
    /// primary (the serving host): a promotion swaps the slots.
    inc: [u64; 2],
    next_inc: u64,
    host_ids: [u64; 2],
    next_host_id: u64,
    alive: [bool; 2],
    /// The primary's disk is the node's (a promoted secondary), not `pvm_disk`.
    primary_disk_in_node: bool,
    /// The fake witness: generation -> owner host id (a compare-and-set register, permanent).
    witness: BTreeMap<u64, u64>,
    witness_down: bool,
    /// Between `Promote` and `AnnounceService`: releases are the promoted SVM's unconfirmed output.
    flushing: bool,
    swap_pending: bool,
    depth: u32,
    /// **Invariant: one releaser per generation**: generation -> the host id that released
    /// output without its peer in it.
    unprotected_owner: BTreeMap<u64, u64>,
    /// When slot 1 (dead or fenced) comes back as a new secondary.
    revive_at: Option<u64>,
    /// `witness=none`: when the operator (the sim) sees the primary dead.
    operator_at: Option<u64>,
    failovers: u64,
    unprotected_turns: u64,
    fences: u64,
    primary_crashes: u64,
    crashes_mid_checkpoint: u64,
    claims: u64,
    denials: u64,
    revivals: u64,
    /// False from a secondary restart until its first full sync is applied: no SVM holds any
    /// history then, so nobody could fail over and contradict what clients got.
    svm_alive: bool,
}

type SimResult = Result<(), String>;

impl World {
    fn new(seed: u64, verbose: bool) -> World {
        let mut rng = Rng(seed);
        let steps = rng.range(400, 1200);
        let p = Params {
            steps,
            drain: 4000,
            clients: rng.range(1, 3) as usize,
            latency: rng.range(0, 8),
            jitter: rng.range(0, 3),
            bandwidth: [256, 1024, 4096, 16384][rng.below(4) as usize],
            window: [1024, 8192, 65536][rng.below(3) as usize],
            loss: [0, 20_000, 80_000][rng.below(3) as usize],
            dup: [0, 20_000, 50_000][rng.below(3) as usize],
            reorder_jitter: rng.range(0, 4),
            cut: [0, 0, 500, 2000][rng.below(4) as usize],
            garbage: [0, 0, 0, 300][rng.below(4) as usize],
            manual: [0, 2000, 10_000][rng.below(3) as usize],
            time_permille: [0, 30, 150][rng.below(3) as usize],
            request_rate: [20_000, 100_000, 300_000][rng.below(3) as usize],
            capture_delay: rng.range(0, 3),
            apply_delay: rng.range(0, 3),
            isn_diverges: rng.below(3) == 0,
            apply_fail: [0, 0, 30_000][rng.below(3) as usize],
            restart: [0, 0, 0, 1000][rng.below(4) as usize],
            crash_primary: [0, 0, 1000, 3000][rng.below(4) as usize],
            witness_flap: [0, 0, 2000][rng.below(3) as usize],
            witness_lose: [0, 0, 100_000][rng.below(3) as usize],
            witness_latency: rng.range(1, 40),
            witness_none: rng.below(4) == 0,
        };
        let mut cfg = NodeConfig::new(NodeRole::Primary, PAGES as u64);
        cfg.guest_id = 0xC0FFEE;
        cfg.verify = true;
        cfg.checkpoint_ms = [0, 50, 200, 600][rng.below(4) as usize];
        cfg.compare_timeout_ms = rng.range(5, 60);
        cfg.heartbeat_ms = 20;
        cfg.miss_limit = 3;
        cfg.witness = if p.witness_none { WitnessMode::None } else { WitnessMode::External };
        cfg.witness_retry_ms = 30;
        cfg.max_unconfirmed_bytes = [2048, 1 << 20][rng.below(2) as usize];
        cfg.peer_timeout_ms = 400;
        cfg.ack_timeout_ms = 1500;
        cfg.chunk_bytes = [512, 1024, 4096][rng.below(3) as usize];
        cfg.max_link_queue_bytes = [2048, 16384, 1 << 20][rng.below(3) as usize];
        cfg.max_backlog_bytes = [2048, 16384, 1 << 20][rng.below(3) as usize];
        cfg.max_disk_epoch_bytes = [1024, 4096, 1 << 20][rng.below(3) as usize];
        // One frame (one exit of the model guest) completes at most three SETs.
        cfg.max_disk_write = 3 * SECTOR_SIZE;
        cfg.comparator = ComparatorLimits {
            max_held_frames: [4, 16, 256][rng.below(3) as usize],
            max_held_bytes: [2048, 1 << 20][rng.below(2) as usize],
            ..ComparatorLimits::default()
        };
        cfg.stream_limits = StreamLimits {
            page_size: PAGE as u32,
            guest_frames: PAGES as u64,
            max_pages: PAGES as u32,
            max_vcpus: 1,
            max_devices: 0,
            max_section_bytes: 64,
            max_records: PAGES as u32 + 8,
            max_total_bytes: 1 << 20,
        };
        let primary = ColoNode::primary(NodeConfig { host_id: 1, ..cfg }, Tick(0));
        let secondary = new_secondary(cfg, 2, Tick(0));
        let clients = (0..p.clients).map(|i| Client::new(i, &mut rng)).collect();
        let mut w = World {
            rng,
            p,
            now: 0,
            seq: 0,
            sched: BinaryHeap::new(),
            nodes: [primary, secondary],
            vms: [Vm::new(), Vm::new()],
            pvm_disk: MemDisk::new(DISK_SECTORS),
            prev: vec![0; MEM],
            cache: VecGuestMemory::new(PAGE, PAGES),
            svm_pc_staged: 0,
            pending: Pending { capture: None, apply: None },
            link_up: false,
            link_gen: 0,
            pipes: [Pipe::new(), Pipe::new()],
            clients,
            produced: BTreeMap::new(),
            pvm_view: BTreeMap::new(),
            svm_view: BTreeMap::new(),
            snaps: BTreeMap::new(),
            client_isn: BTreeMap::new(),
            trace_hash: 0xCBF2_9CE4_8422_2325,
            trace: VecDeque::new(),
            verbose,
            faults_on: true,
            garbage_sent: false,
            applied_checks: 0,
            released_frames: 0,
            txbuf: Vec::new(),
            cfg,
            inc: [1, 2],
            next_inc: 3,
            host_ids: [1, 2],
            next_host_id: 3,
            alive: [true, true],
            primary_disk_in_node: false,
            witness: BTreeMap::new(),
            witness_down: false,
            flushing: false,
            swap_pending: false,
            depth: 0,
            unprotected_owner: BTreeMap::new(),
            revive_at: None,
            operator_at: None,
            failovers: 0,
            unprotected_turns: 0,
            fences: 0,
            primary_crashes: 0,
            crashes_mid_checkpoint: 0,
            claims: 0,
            denials: 0,
            revivals: 0,
            svm_alive: true,
        };
        w.vms[1].running = false;
        if w.p.isn_diverges {
            w.vms[1].isn_salt = 0x00AB_CDEF;
        }
        w.drain(0).expect("primary start");
        w.drain(1).expect("secondary start");
        // Either host may come up first; the link connects a little later.
        let first_link = w.rng.range(0, 40);
        w.at(first_link, Sched::Reconnect(0));
        w.trace(format!(
            "seed {seed}: {} steps, {} clients, latency {}, bandwidth {}/ms, window {}, loss {}, dup {}, cut {}, garbage {}, ckpt_ms {}, timeout {}, held {}",
            w.p.steps, w.p.clients, w.p.latency, w.p.bandwidth, w.p.window, w.p.loss, w.p.dup, w.p.cut, w.p.garbage,
            cfg.checkpoint_ms, cfg.compare_timeout_ms, cfg.comparator.max_held_frames
        ));
        w
    }

    fn trace(&mut self, line: String) {
        fold(&mut self.trace_hash, line.as_bytes());
        if self.verbose {
            println!("{:6} {line}", self.now);
        }
        if self.trace.len() == 60 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:6} {line}", self.now));
    }

    fn at(&mut self, delay: u64, what: Sched) {
        self.seq += 1;
        self.sched.push(std::cmp::Reverse((self.now + delay, self.seq, what)));
    }

    // --- feeding the nodes ---------------------------------------------------------------

    fn feed(&mut self, h: usize, ev: Event<'_>) -> SimResult {
        if !self.alive[h] {
            return Ok(()); // a dead host hears nothing
        }
        let now = self.now;
        self.nodes[h].handle(Tick(now), ev);
        self.drain(h)
    }

    fn drain(&mut self, h: usize) -> SimResult {
        self.depth += 1;
        while let Some(a) = self.nodes[h].poll_action() {
            if let Err(e) = self.act(h, a) {
                self.depth -= 1;
                return Err(e);
            }
        }
        self.depth -= 1;
        if self.depth == 0 && self.swap_pending {
            self.swap();
        }
        Ok(())
    }

    /// A promoted secondary is the primary now: it takes slot 0, the old primary (dead or
    /// fenced) slot 1, where it will come back as a new secondary.
    fn swap(&mut self) {
        self.swap_pending = false;
        self.nodes.swap(0, 1);
        self.vms.swap(0, 1);
        self.inc.swap(0, 1);
        self.host_ids.swap(0, 1);
        self.alive.swap(0, 1);
        std::mem::swap(&mut self.pvm_view, &mut self.svm_view);
        // The old primary's unreleased output is gone with it; the promoted guest's is new.
        self.produced.clear();
        self.primary_disk_in_node = true;
        self.pending = Pending { capture: None, apply: None };
        self.svm_alive = false;
        self.prev.copy_from_slice(&self.vms[0].mem);
        self.trace("slots swapped: the promoted host is the primary".into());
    }

    /// The fake witness: a compare-and-set register per generation, decided when the claim
    /// arrives; it can be down, slow, or lose its reply (which the driver sees as an error or
    /// no answer, never a grant).
    fn claim(&mut self, h: usize, generation: u64) {
        self.claims += 1;
        let (inc, id) = (self.inc[h], self.host_ids[h]);
        let latency = self.rng.range(1, self.p.witness_latency + 1);
        if self.witness_down {
            self.trace(format!("{} claims {generation}: witness down", name(h)));
            self.at(latency + 20, Sched::WitnessReply(inc, generation, 2, 0));
            return;
        }
        let owner = *self.witness.entry(generation).or_insert(id);
        let lost = self.faults_on && self.rng.chance(self.p.witness_lose);
        self.trace(format!(
            "{} (host {id}) claims {generation}: owner {owner}{}",
            name(h),
            if lost { ", reply lost" } else { "" }
        ));
        if lost {
            let kind = 2 + self.rng.below(2) as u8;
            self.at(latency + 20, Sched::WitnessReply(inc, generation, kind, 0));
        } else {
            let kind = if owner == id { 0 } else { 1 };
            self.at(latency, Sched::WitnessReply(inc, generation, kind, owner));
        }
    }

    fn act(&mut self, h: usize, a: Action) -> SimResult {
        let tag: &[u8] = match &a {
            Action::DeliverToGuest(_) => b"D",
            Action::ReleaseToClients(_) => b"R",
            _ => b"",
        };
        fnv(&mut self.trace_hash, &[h as u8]);
        fnv(&mut self.trace_hash, tag);
        match a {
            Action::DeliverToGuest(f) => {
                fold(&mut self.trace_hash, &f);
                self.vms[h].nic_receive(&f);
            }
            Action::ReleaseToClients(f) if self.flushing => {
                // The promoted SVM's output the old primary had not confirmed: clients check it
                // against what they already have.
                self.released_frames += 1;
                self.at(1, Sched::ToClient(f));
            }
            Action::ReleaseToClients(f) => {
                if h != 0 {
                    return Err(format!("{} released output", name(h)));
                }
                self.release(f)?
            }
            Action::Capture { epoch, kind } => self.capture(epoch, kind)?,
            Action::ResumeVm => {
                self.trace(format!("{} resume", name(h)));
                self.vms[h].running = true;
            }
            Action::PauseVm(r) => {
                self.trace(format!("{} pause {r:?}", name(h)));
                self.vms[h].running = false;
            }
            Action::ApplyCheckpoint(staged) => self.apply(staged)?,
            Action::BeginFullSync { epoch, ram_bytes } => {
                self.trace(format!("secondary begin full sync {epoch}"));
                self.vms[1].running = false;
                if ram_bytes != MEM as u64 {
                    return Err(format!("full sync of {ram_bytes} RAM bytes, expected {MEM}"));
                }
            }
            Action::SyncMemory { offset, data } => {
                let at = offset as usize;
                if at + data.len() > MEM {
                    return Err(format!("full sync memory at {at} + {} beyond RAM", data.len()));
                }
                self.vms[1].mem[at..at + data.len()].copy_from_slice(&data);
                for (i, chunk) in data.chunks(1).enumerate() {
                    let a = at + i;
                    self.cache.frame_mut((a / PAGE) as u64)[a % PAGE] = chunk[0];
                }
            }
            Action::SyncState { kind, id, data, .. } => {
                if kind != StateKind::Vcpu || id != 0 || data.len() != 8 {
                    return Err(format!("unexpected full-sync state {kind:?} {id} of {} bytes", data.len()));
                }
                self.vms[1].pc = u64::from_le_bytes(data[..8].try_into().unwrap());
            }
            Action::FinishFullSync { epoch } => {
                self.vms[1].dirty.iter_mut().for_each(|d| *d = false);
                self.after_apply(epoch)?;
            }
            Action::CloseLink => {
                let why = self.nodes[h].last_protocol_error();
                self.trace(format!("{} closes the link (last protocol error {why:?})", name(h)));
                self.cut()?;
            }
            Action::ClaimGeneration { generation } => self.claim(h, generation),
            Action::Fence => {
                let why = self.nodes[h].fenced();
                self.trace(format!("{} (host {}) fenced: {why:?}", name(h), self.host_ids[h]));
                self.fences += 1;
                self.vms[h].running = false;
            }
            Action::Promote => {
                if h != 1 {
                    return Err("the primary was promoted".into());
                }
                self.trace(format!(
                    "secondary (host {}) promoted, generation {}",
                    self.host_ids[1],
                    self.nodes[1].generation()
                ));
                self.failovers += 1;
                self.flushing = true;
                self.swap_pending = true;
            }
            Action::AnnounceService => self.flushing = false,
        }
        Ok(())
    }

    // --- primary driver ------------------------------------------------------------------

    fn capture(&mut self, epoch: u64, kind: CaptureKind) -> SimResult {
        let disk = self.primary_disk();
        let vm = &mut self.vms[0];
        vm.running = false;
        let d = digest(&vm.mem, vm.pc, &disk);
        let pages: Vec<usize> = (0..PAGES).filter(|&p| vm.dirty[p]).collect();
        let capture = match kind {
            CaptureKind::Incremental => {
                let info = HeaderInfo {
                    epoch,
                    page_size: PAGE as u32,
                    page_count: pages.len() as u32,
                    vcpu_count: 1,
                    device_count: 0,
                };
                let limits = self.nodes[1].config().stream_limits;
                let mut enc = CheckpointEncoder::new(Vec::new(), info, limits).map_err(|e| format!("{e}"))?;
                let dirty: Vec<DirtyPage<'_>> = pages
                    .iter()
                    .map(|&p| DirtyPage {
                        gfn: p as u64,
                        data: &vm.mem[p * PAGE..(p + 1) * PAGE],
                        previous: Some(&self.prev[p * PAGE..(p + 1) * PAGE]),
                    })
                    .collect();
                enc.pages(&dirty).map_err(|e| format!("{e}"))?;
                enc.vcpu_state(0, 1, &vm.pc.to_le_bytes()).map_err(|e| format!("{e}"))?;
                let (bytes, _) = enc.finish().map_err(|e| format!("{e}"))?;
                Capture::Checkpoint(Box::new(bytes))
            }
            CaptureKind::Full => Capture::Full(Box::new(FullSource {
                mem: vm.mem.clone(),
                disk: disk.clone(),
                pc: vm.pc,
                at: 0,
                piece: [256, 1000, 4096][(epoch % 3) as usize],
            })),
        };
        vm.dirty.iter_mut().for_each(|x| *x = false);
        self.prev.copy_from_slice(&vm.mem);
        self.snaps.insert(epoch, Snap { mem: vm.mem.clone(), pc: vm.pc, disk, flows: self.pvm_view.clone() });
        self.trace(format!("primary capture {epoch} {kind:?}: {} dirty pages", pages.len()));
        if self.pending.capture.is_some() {
            return Err("a capture was asked for while one is outstanding".into());
        }
        self.pending.capture = Some((epoch, capture, d, pages.len() as u64));
        let delay = self.p.capture_delay;
        let inc = self.inc[0];
        self.at(delay, Sched::CaptureDone(epoch, inc));
        Ok(())
    }

    fn primary_disk(&self) -> Vec<u8> {
        if self.primary_disk_in_node {
            self.nodes[0].disk().map(|d| d.as_bytes().to_vec()).unwrap_or_default()
        } else {
            self.pvm_disk.as_bytes().to_vec()
        }
    }

    fn pvm_output(&mut self, f: Vec<u8>) -> SimResult {
        let p = parse_frame(&f);
        let t = p.tcp().cloned().ok_or("PVM output is not TCP")?;
        let port = p.flow.dst_port;
        let view = self.pvm_view.entry(port).or_default();
        observe(view, &t, &f, self.client_isn.get(&port).copied());
        let epoch = self.nodes[0].epoch();
        self.produced.entry(port).or_default().push_back((f.clone(), epoch));
        fold(&mut self.trace_hash, &f);
        self.feed(0, Event::GuestOutput(&f))
    }

    /// **Invariant: consistency** and **release order**.
    fn release(&mut self, f: Vec<u8>) -> SimResult {
        let p = parse_frame(&f);
        let t = p.tcp().cloned().ok_or("released frame is not TCP")?;
        let port = p.flow.dst_port;
        let (want, epoch) = self
            .produced
            .get_mut(&port)
            .and_then(|q| q.pop_front())
            .ok_or_else(|| format!("port {port}: released a frame the PVM never produced (or twice)"))?;
        let same = if self.failovers == 0 {
            want == f
        } else {
            // A promoted guest's frames reach clients translated to the old PVM's numbers.
            let w = parse_frame(&want);
            let wt = w.tcp().cloned().ok_or("produced frame is not TCP")?;
            wt.flags == t.flags && want[wt.payload.clone()] == f[t.payload.clone()]
        };
        if !same {
            return Err(format!("port {port}: frames released out of production order (seq {})", t.seq));
        }
        // The checks below are in the guest's own numbering.
        let t = parse_frame(&want).tcp().cloned().ok_or("produced frame is not TCP")?;
        let sent = f;
        let f = want;
        self.released_frames += 1;
        let committed = self.nodes[1].committed();
        let covered = epoch <= committed;
        if !covered && self.svm_alive && !self.nodes[0].releases_unprotected() {
            let svm = self.svm_view.get(&port).cloned().unwrap_or_default();
            let cisn = self.client_isn.get(&port).copied();
            if t.flags.contains(TcpFlags::SYN) {
                // After failover the rewriter carries on the PVM's numbering; the SVM must
                // have answered the SYN (with its own ISN if they diverge).
                if svm.isn.is_none() {
                    return Err(format!(
                        "consistency: port {port}: SYN-ACK isn {} released; SVM has not sent it ({:?}), epoch {epoch} > committed {committed}",
                        t.seq, svm.isn
                    ));
                }
            } else {
                svm.isn.ok_or_else(|| format!("consistency: port {port}: data released before the SVM's SYN-ACK"))?;
                // Stream offsets count from each side's own ISN.
                let pvm_isn = self.pvm_view.get(&port).and_then(|v| v.isn).ok_or("PVM data before its SYN-ACK")?;
                let off = t.seq.wrapping_sub(pvm_isn.wrapping_add(1)) as usize;
                let payload = &f[t.payload.clone()];
                if svm.stream.len() < off + payload.len() || &svm.stream[off..off + payload.len()] != payload {
                    return Err(format!(
                        "consistency: port {port}: released {} bytes at offset {off} the SVM has not matched (SVM has {} bytes), epoch {epoch} > committed {committed}",
                        payload.len(),
                        svm.stream.len()
                    ));
                }
                if let Some(c) = cisn {
                    let ack = t.ack.wrapping_sub(c.wrapping_add(1));
                    if svm.max_ack.is_none_or(|m| ack > m) {
                        return Err(format!(
                            "input durability: port {port}: released ack of client offset {ack}, SVM acknowledged {:?}, epoch {epoch} > committed {committed}",
                            svm.max_ack
                        ));
                    }
                }
            }
        }
        let _ = f;
        self.at(1, Sched::ToClient(sent));
        Ok(())
    }

    // --- secondary driver ----------------------------------------------------------------

    fn apply(&mut self, staged: StagedCheckpoint) -> SimResult {
        let epoch = staged.epoch();
        self.vms[1].running = false;
        let pages: Vec<u64> = staged.pages().map(|p| p.gfn).collect();
        let vcpu: Vec<u8> = staged.vcpu_states().next().map(|b| b.data.to_vec()).unwrap_or_default();
        if self.faults_on && self.rng.chance(self.p.apply_fail) {
            // The driver refuses it (a device rejects its state) before changing anything.
            self.trace(format!("fault: secondary refuses checkpoint {epoch}"));
            self.nodes[1].recycle_staging(staged.into_staging().ok_or("no staging back")?);
            self.pending.apply = Some((epoch, None));
            let delay = self.p.apply_delay;
            let inc = self.inc[1];
            self.at(delay, Sched::ApplyDone(epoch, inc));
            return Ok(());
        }
        let (applied, staging) = staged.apply_and_recycle(&mut self.cache, epoch);
        applied.map_err(|e| format!("apply: {e}"))?;
        self.nodes[1].recycle_staging(staging.ok_or("no staging back")?);
        // Pages dirtied by the PVM (in the checkpoint) or by the SVM go back to the cache's.
        let vm = &mut self.vms[1];
        let svm_dirty = vm.dirty.iter().filter(|&&d| d).count();
        for p in 0..PAGES {
            if vm.dirty[p] || pages.contains(&(p as u64)) {
                vm.mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(self.cache.frame(p as u64));
            }
            vm.dirty[p] = false;
        }
        if vcpu.len() != 8 {
            return Err(format!("checkpoint {epoch} has a vCPU blob of {} bytes", vcpu.len()));
        }
        self.svm_pc_staged = u64::from_le_bytes(vcpu[..8].try_into().unwrap());
        self.vms[1].pc = self.svm_pc_staged;
        self.trace(format!("secondary apply {epoch}: {} pages, {svm_dirty} SVM-dirty", pages.len()));
        self.after_apply(epoch)
    }

    /// **Invariant: the SVM equals the PVM at the capture point** after every apply.
    fn after_apply(&mut self, epoch: u64) -> SimResult {
        let vm = &self.vms[1];
        let disk = self.nodes[1].secondary_disk().map(|d| d.as_bytes().to_vec()).unwrap_or_default();
        let d = digest(&vm.mem, vm.pc, &disk);
        let snap = self.snaps.get(&epoch).ok_or_else(|| format!("secondary applied {epoch}, never captured"))?;
        if vm.mem != snap.mem {
            let page = (0..PAGES).find(|&p| vm.mem[p * PAGE..(p + 1) * PAGE] != snap.mem[p * PAGE..(p + 1) * PAGE]);
            return Err(format!(
                "SVM memory after applying {epoch} differs from the PVM's at capture (first page {page:?})"
            ));
        }
        if vm.pc != snap.pc {
            return Err(format!("SVM vCPU after applying {epoch} is {}, PVM's was {}", vm.pc, snap.pc));
        }
        if disk != snap.disk {
            let s = (0..DISK_SECTORS as usize).find(|&s| {
                disk[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE] != snap.disk[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE]
            });
            let v =
                |d: &[u8]| s.map(|s| u32::from_le_bytes(d[s * SECTOR_SIZE..s * SECTOR_SIZE + 4].try_into().unwrap()));
            return Err(format!(
                "secondary disk after applying {epoch} differs from the PVM's at capture (first sector {s:?}: {:?}, PVM's {:?}; disk writes sent {}, received {}, errors {})",
                v(&disk),
                v(&snap.disk),
                self.nodes[0].stats().disk_writes,
                self.nodes[1].stats().disk_writes,
                self.nodes[1].stats().disk_errors,
            ));
        }
        self.applied_checks += 1;
        self.svm_alive = true;
        // The SVM's history is now the PVM's up to the capture point.
        self.svm_view = snap.flows.clone();
        self.pending.apply = Some((epoch, Some(d)));
        let delay = self.p.apply_delay;
        let inc = self.inc[1];
        self.at(delay, Sched::ApplyDone(epoch, inc));
        Ok(())
    }

    fn svm_output(&mut self, f: Vec<u8>) -> SimResult {
        let p = parse_frame(&f);
        if let Some(t) = p.tcp().cloned() {
            let port = p.flow.dst_port;
            let cisn = self.client_isn.get(&port).copied();
            observe(self.svm_view.entry(port).or_default(), &t, &f, cisn);
        }
        self.feed(1, Event::GuestOutput(&f))
    }

    // --- link ----------------------------------------------------------------------------

    /// The secondary host dies and boots again with nothing: a fresh node, VM and disk.
    fn restart_secondary(&mut self) -> SimResult {
        self.cut()?;
        self.inc[1] = self.next_inc;
        self.next_inc += 1;
        self.host_ids[1] = self.next_host_id;
        self.next_host_id += 1;
        self.alive[1] = true;
        self.trace(format!("secondary host {} starts", self.host_ids[1]));
        self.svm_alive = false;
        self.pending.apply = None;
        self.nodes[1] = new_secondary(self.cfg, self.host_ids[1], Tick(self.now));
        let salt = self.vms[1].isn_salt;
        self.vms[1] = Vm::new();
        self.vms[1].isn_salt = salt;
        self.vms[1].running = false;
        self.cache = VecGuestMemory::new(PAGE, PAGES);
        self.drain(1)
    }

    /// The primary host dies (kill -9): it stops; the survivor sees the link reset or just
    /// silence.
    fn crash_primary(&mut self) -> SimResult {
        let mid = self.pending.capture.is_some() || self.nodes[0].wants_transmit();
        self.trace(format!(
            "fault: primary (host {}) dies{}",
            self.host_ids[0],
            if mid { " mid-checkpoint" } else { "" }
        ));
        self.primary_crashes += 1;
        if mid {
            self.crashes_mid_checkpoint += 1;
        }
        self.alive[0] = false;
        self.vms[0].running = false;
        self.pending.capture = None;
        if self.link_up {
            self.link_up = false;
            self.link_gen += 1;
            self.pipes = [Pipe::new(), Pipe::new()];
            if self.rng.below(2) == 0 {
                self.feed(1, Event::LinkClosed)?;
            }
        }
        self.operator_at = Some(self.now + self.rng.range(50, 300));
        Ok(())
    }

    fn cut(&mut self) -> SimResult {
        if !self.link_up {
            return Ok(());
        }
        self.link_up = false;
        self.link_gen += 1;
        self.pipes = [Pipe::new(), Pipe::new()];
        self.trace("link down".into());
        self.feed(0, Event::LinkClosed)?;
        self.feed(1, Event::LinkClosed)?;
        if self.swap_pending && self.depth == 0 {
            self.swap();
        }
        let d = self.rng.range(5, 150);
        let g = self.link_gen;
        self.at(d, Sched::Reconnect(g));
        Ok(())
    }

    fn transmit(&mut self) -> SimResult {
        if !self.link_up {
            return Ok(());
        }
        for h in 0..2 {
            if !self.alive[h] {
                continue;
            }
            let room = self.p.window.saturating_sub(self.pipes[h].in_flight).min(self.p.bandwidth);
            if room == 0 {
                continue;
            }
            let mut buf = core::mem::take(&mut self.txbuf);
            if buf.len() < room {
                buf.resize(room, 0);
            }
            let n = self.nodes[h].poll_transmit(Tick(self.now), &mut buf[..room]);
            self.drain(h)?;
            if n == 0 || !self.link_up {
                self.txbuf = buf;
                continue;
            }
            // Arbitrary segmentation, in order.
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let k = (self.rng.range(1, 1500) as usize).min(rest.len());
                let at = (self.now + self.p.latency + self.rng.below(self.p.jitter + 1)).max(self.pipes[h].last_at);
                self.pipes[h].last_at = at;
                self.pipes[h].in_flight += k;
                self.pipes[h].q.push_back((at, rest[..k].to_vec()));
                rest = &rest[k..];
            }
            self.txbuf = buf;
        }
        Ok(())
    }

    fn deliver_link(&mut self) -> SimResult {
        for h in 0..2 {
            while self.link_up && self.pipes[h].q.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, bytes) = self.pipes[h].q.pop_front().unwrap();
                self.pipes[h].in_flight -= bytes.len();
                self.feed(1 - h, Event::LinkBytes(&bytes))?;
            }
        }
        Ok(())
    }

    // --- clients -------------------------------------------------------------------------

    fn client_send(&mut self, frame: Vec<u8>) {
        if self.faults_on && self.rng.chance(self.p.loss) {
            return;
        }
        let copies = if self.faults_on && self.rng.chance(self.p.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let d = 1 + if self.faults_on { self.rng.below(self.p.reorder_jitter + 1) } else { 0 };
            self.at(d, Sched::ToServer(frame.clone()));
        }
    }

    fn clients_step(&mut self) {
        let now = self.now;
        let rto = 60;
        for i in 0..self.clients.len() {
            let mut send = Vec::new();
            {
                let rng = &mut self.rng;
                let c = &mut self.clients[i];
                match c.state {
                    0 if now >= c.start => {
                        c.state = 1;
                        c.last_send = now;
                        send.push(client_frame(c.port, c.isn, None, TcpControl::Syn, &[]));
                    }
                    1 if now >= c.last_send + rto => {
                        c.last_send = now;
                        send.push(client_frame(c.port, c.isn, None, TcpControl::Syn, &[]));
                    }
                    2 => {
                        if self.faults_on && c.requests.len() < c.want && rng.chance(self.p.request_rate) {
                            c.new_request(rng, self.p.time_permille);
                        }
                        if c.acked < c.sent && now >= c.last_send + rto {
                            c.sent = c.acked; // go back N
                        } else if now >= c.last_send + rto
                            && c.received.iter().filter(|&&b| b == b'\n').count() < c.requests.len()
                            && c.sent == c.out.len()
                        {
                            // Waiting for replies: a probe (an empty segment with our ACK),
                            // which makes the server retransmit what it has not had
                            // acknowledged.
                            c.last_send = now;
                            let seq = c.isn.wrapping_add(1).wrapping_add(c.sent as u32);
                            send.push(client_frame(c.port, seq, Some(c.rcv_next), TcpControl::None, &[]));
                        }
                        while c.sent < c.out.len() && c.sent - c.acked < 64 {
                            let n = (c.out.len() - c.sent).min(1 + rng.below(16) as usize);
                            let seq = c.isn.wrapping_add(1).wrapping_add(c.sent as u32);
                            let ack = c.rcv_next;
                            send.push(client_frame(
                                c.port,
                                seq,
                                Some(ack),
                                TcpControl::Psh,
                                &c.out[c.sent..c.sent + n],
                            ));
                            c.sent += n;
                            c.last_send = now;
                        }
                    }
                    _ => {}
                }
            }
            for f in send {
                self.client_send(f);
            }
        }
    }

    /// **Invariant: client streams in order, no byte lost or duplicated.**
    fn client_receive(&mut self, f: Vec<u8>) -> SimResult {
        let p = parse_frame(&f);
        let t = p.tcp().cloned().ok_or("client got a non-TCP frame")?;
        let port = p.flow.dst_port;
        let c = self.clients.iter_mut().find(|c| c.port == port).ok_or("frame for an unknown client")?;
        if t.flags.contains(TcpFlags::SYN) {
            if c.state == 1 {
                c.state = 2;
                c.server_isn = t.seq;
                c.rcv_next = t.seq.wrapping_add(1);
            }
            return Ok(());
        }
        if c.state != 2 {
            return Err(format!("client {port}: data before the handshake"));
        }
        let payload = &f[t.payload.clone()];
        if !payload.is_empty() {
            let d = t.seq.wrapping_sub(c.rcv_next) as i32;
            if d > 0 {
                if self.failovers == 0 {
                    return Err(format!(
                        "client {port}: got seq {} while expecting {} ({d} bytes lost)",
                        t.seq, c.rcv_next
                    ));
                }
                // After a takeover: output the old primary never sent comes again when the
                // new primary's guest retransmits; TCP drops the segment.
                return Ok(());
            }
            // **Invariant: what a client received is a prefix of what the service continues
            // from**: bytes it gets again (a retransmission, output a promoted SVM released
            // at once) are the bytes it already has at those offsets.
            let back = d.unsigned_abs() as usize;
            let start = c.received.len() - back.min(c.received.len());
            let overlap = back.min(payload.len());
            if back > c.received.len() || c.received[start..start + overlap] != payload[..overlap] {
                return Err(format!(
                    "client {port}: got other bytes at offset {start} than it received before ({:?} vs {:?})",
                    String::from_utf8_lossy(&payload[..overlap]),
                    String::from_utf8_lossy(
                        &c.received[start.min(c.received.len())..(start + overlap).min(c.received.len())]
                    )
                ));
            }
            let fresh = &payload[overlap..];
            c.received.extend_from_slice(fresh);
            c.rcv_next = c.rcv_next.wrapping_add(fresh.len() as u32);
        }
        let acked = t.ack.wrapping_sub(c.isn.wrapping_add(1)) as usize;
        if acked > c.out.len() {
            return Err(format!("client {port}: server acknowledged {acked} bytes, only {} were sent", c.out.len()));
        }
        c.acked = c.acked.max(acked);
        c.sent = c.sent.max(c.acked);
        Ok(())
    }

    // --- the loop ------------------------------------------------------------------------

    fn step(&mut self) -> SimResult {
        // Scheduled events due now.
        while let Some(std::cmp::Reverse((t, _, _))) = self.sched.peek() {
            if *t > self.now {
                break;
            }
            let std::cmp::Reverse((_, _, what)) = self.sched.pop().unwrap();
            match what {
                Sched::ToServer(f) => {
                    let p = parse_frame(&f);
                    if let Some(t) = p.tcp() {
                        if t.flags.contains(TcpFlags::SYN) {
                            self.client_isn.insert(p.flow.src_port, t.seq);
                        }
                    }
                    self.feed(0, Event::ClientFrame(&f))?
                }
                Sched::ToClient(f) => self.client_receive(f)?,
                Sched::CaptureDone(_, inc) if inc != self.inc[0] || !self.alive[0] => {} // that primary died
                Sched::CaptureDone(e, _) => {
                    let Some((epoch, capture, d, pages)) = self.pending.capture.take() else {
                        return Err("capture done without a capture".into());
                    };
                    debug_assert_eq!(e, epoch);
                    let pause_us = 100 + pages * 10;
                    self.feed(0, Event::CaptureDone { epoch, capture, digest: Some(d), pause_us, pages })?;
                }
                Sched::ApplyDone(_, inc) if inc != self.inc[1] || !self.alive[1] => {} // that secondary died
                Sched::ApplyDone(e, _) => {
                    let Some((epoch, d)) = self.pending.apply.take() else {
                        return Err("apply done without an apply".into());
                    };
                    debug_assert_eq!(e, epoch);
                    self.trace(format!("secondary applied {epoch}: {d:?}"));
                    let result = d.map(Some).ok_or(ApplyFailure::State);
                    self.feed(1, Event::ApplyDone { epoch, result, apply_us: 50 })?;
                }
                Sched::WitnessReply(inc, generation, kind, holder) => {
                    if let Some(h) = (0..2).find(|&h| self.inc[h] == inc && self.alive[h]) {
                        let outcome = match kind {
                            0 => ClaimOutcome::Granted,
                            1 => {
                                self.denials += 1;
                                ClaimOutcome::Denied { holder }
                            }
                            2 => ClaimOutcome::Unreachable,
                            _ => ClaimOutcome::Error,
                        };
                        self.trace(format!("{} gets {outcome:?} for {generation}", name(h)));
                        let was = self.nodes[h].releases_unprotected();
                        self.feed(h, Event::ClaimResult { generation, outcome })?;
                        if h == 0 && !was && self.nodes[0].releases_unprotected() {
                            self.unprotected_turns += 1;
                        }
                    }
                }
                Sched::Reconnect(g) if g == self.link_gen && !self.link_up && !self.can_connect() => {
                    self.at(50, Sched::Reconnect(g));
                }
                Sched::Reconnect(g) => {
                    if g == self.link_gen && !self.link_up {
                        self.link_up = true;
                        self.trace("link up".into());
                        let first = self.rng.below(2) as usize;
                        self.feed(first, Event::LinkConnected)?;
                        self.feed(1 - first, Event::LinkConnected)?;
                    }
                }
            }
        }
        self.deliver_link()?;
        // Guests run.
        // Guests run: up to 3 received frames each, each one an "exit" after which the driver
        // carries out the node's actions (a capture or pause stops the guest there).
        for h in 0..2 {
            for _ in 0..3 {
                if !self.vms[h].running {
                    break;
                }
                let now = self.now;
                let out = if h == 0 {
                    let in_node = self.primary_disk_in_node;
                    let mut d = PvmDisk { disk: &mut self.pvm_disk, node: &mut self.nodes[0], now, in_node };
                    guest_step(&mut self.vms[0], now, &mut d)
                } else {
                    let mut d = SvmDisk { node: &mut self.nodes[1], now };
                    guest_step(&mut self.vms[1], now, &mut d)
                };
                self.drain(h)?;
                let Some(out) = out else { break };
                for f in out {
                    if h == 0 {
                        self.pvm_output(f)?;
                    } else {
                        self.svm_output(f)?;
                    }
                }
            }
        }
        // Timers.
        for h in 0..2 {
            if self.alive[h] && self.nodes[h].poll_timeout().is_some_and(|t| t <= Tick(self.now)) {
                self.nodes[h].handle_timeout(Tick(self.now));
                self.drain(h)?;
            }
        }
        self.transmit()?;
        self.clients_step();
        self.check_releasers()?;
        // Faults.
        let serving = self.alive[0] && self.nodes[0].fenced().is_none();
        if self.faults_on && serving && self.rng.chance(self.p.restart) {
            self.trace("fault: secondary restarts".into());
            self.restart_secondary()?;
        }
        if self.faults_on && self.rng.chance(self.p.witness_flap) {
            self.witness_down = !self.witness_down;
            self.trace(format!("fault: witness {}", if self.witness_down { "down" } else { "up" }));
        }
        let streaming = self.pending.capture.is_some() || self.nodes[0].wants_transmit();
        let chance = if streaming { self.p.crash_primary * 5 } else { self.p.crash_primary };
        if self.faults_on
            && serving
            && self.alive[1]
            && self.nodes[1].fenced().is_none()
            && self.nodes[1].failover_role() == FoRole::Secondary
            && self.rng.chance(chance)
            && self.nodes[0].failover_role() == FoRole::Primary
            && self.nodes[0].status().witness.pending.is_none()
        {
            // One failure at a time: a primary that has claimed the next generation (and may
            // own it) or serves unprotected leaves no secondary able to take over.
            self.crash_primary()?;
        }
        // The operator (`witness=none`): the primary is seen dead, the secondary takes over.
        if self.operator_at.is_some_and(|t| self.now >= t) {
            self.operator_at = None;
            if !self.alive[0] && self.p.witness_none {
                self.trace("operator: failover".into());
                self.feed(1, Event::Command(NodeCommand::Failover))?;
            }
        }
        // A dead or fenced host comes back as a new secondary (the old primary rebooted).
        let serving = self.alive[0] && self.nodes[0].fenced().is_none() && !self.swap_pending;
        if serving && (!self.alive[1] || self.nodes[1].fenced().is_some()) {
            let at = *self.revive_at.get_or_insert(self.now + self.rng.range(20, 300));
            if self.now >= at {
                self.revive_at = None;
                self.revivals += 1;
                self.restart_secondary()?;
                let g = self.link_gen;
                let d = self.rng.range(1, 40);
                self.at(d, Sched::Reconnect(g));
            }
        }
        if self.faults_on {
            if self.link_up && self.rng.chance(self.p.cut) {
                self.trace("fault: link cut".into());
                self.cut()?;
            }
            if self.link_up && self.rng.chance(self.p.garbage) {
                let h = self.rng.below(2) as usize;
                let n = self.rng.range(1, 40) as usize;
                let junk: Vec<u8> = (0..n).map(|_| self.rng.next() as u8).collect();
                self.trace(format!("fault: {n} garbage bytes to {}", name(1 - h)));
                self.garbage_sent = true;
                let at = self.pipes[h].last_at.max(self.now);
                self.pipes[h].in_flight += junk.len();
                self.pipes[h].q.push_back((at, junk));
            }
            if self.rng.chance(self.p.manual) {
                self.trace("manual checkpoint".into());
                self.feed(0, Event::Command(NodeCommand::Checkpoint))?;
            }
        }
        Ok(())
    }

    fn can_connect(&self) -> bool {
        (0..2).all(|h| self.alive[h] && self.nodes[h].fenced().is_none())
    }

    /// **Invariant: one releaser per generation.**
    fn check_releasers(&mut self) -> SimResult {
        for h in 0..2 {
            if self.alive[h] && self.nodes[h].releases_unprotected() {
                let g = self.nodes[h].generation();
                let id = self.host_ids[h];
                let owner = *self.unprotected_owner.entry(g).or_insert(id);
                if owner != id {
                    return Err(format!(
                        "hosts {owner} and {id} both released output without a peer in generation {g}"
                    ));
                }
                if self.witness_owner_mismatch(g, id) {
                    return Err(format!(
                        "host {id} releases unprotected in generation {g}, which the witness gave to another"
                    ));
                }
            }
        }
        Ok(())
    }

    fn witness_owner_mismatch(&self, g: u64, id: u64) -> bool {
        // With a witness every generation above the first was granted by it (the operator is
        // the arbiter with `witness=none`).
        !self.p.witness_none && g > 1 && self.witness.get(&g).is_some_and(|&o| o != id)
    }

    fn done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.state == 2 && c.received.iter().filter(|&&b| b == b'\n').count() == c.requests.len())
            && self.produced.values().all(|q| q.is_empty())
    }

    fn run(&mut self) -> SimResult {
        while self.now < self.p.steps {
            self.step()?;
            self.now += 1;
        }
        self.faults_on = false;
        self.witness_down = false;
        self.trace("faults off".into());
        if !self.link_up {
            let g = self.link_gen;
            self.at(1, Sched::Reconnect(g));
        }
        let end = self.now + self.p.drain;
        while self.now < end {
            self.step()?;
            if self.done() {
                break;
            }
            self.now += 1;
        }
        if !self.done() {
            let pending: usize = self.produced.values().map(|q| q.len()).sum();
            let s = self.nodes[0].status();
            return Err(format!(
                "stall: {} ms after the faults stopped, {pending} PVM frames unreleased, replies {:?}/{:?}; primary link {:?} epoch {} committed {}; secondary committed {}; clients (state, start, sent, acked, out, rcv_next - isn) {:?}; isn diverges {}",
                self.p.drain,
                self.clients.iter().map(|c| c.received.iter().filter(|&&b| b == b'\n').count()).collect::<Vec<_>>(),
                self.clients.iter().map(|c| c.requests.len()).collect::<Vec<_>>(),
                s.link,
                s.epoch,
                s.committed,
                self.nodes[1].committed(),
                self.clients
                    .iter()
                    .map(|c| (c.state, c.start, c.sent, c.acked, c.out.len(), c.rcv_next.wrapping_sub(c.server_isn)))
                    .collect::<Vec<_>>(),
                self.p.isn_diverges,
            ));
        }
        for c in &self.clients {
            c.check_replies()?;
        }
        let (ps, ss) = (self.nodes[0].stats(), self.nodes[1].stats());
        if ps.verify_failures + ss.verify_failures > 0 {
            return Err(format!("verify failures: primary {}, secondary {}", ps.verify_failures, ss.verify_failures));
        }
        // A cut link may end in the middle of a message (`truncated`); anything else needs garbage.
        let errors = |s: &NodeStats| s.protocol_errors + s.link_errors_total() - s.link_errors[7];
        // (A host of an older generation that reconnects is refused by protocol error.)
        if !self.garbage_sent && self.failovers + self.unprotected_turns == 0 && errors(ps) + errors(ss) > 0 {
            return Err(format!(
                "protocol/link errors without injected garbage: primary {} / {:?}, secondary {} / {:?}",
                ps.protocol_errors, ps.link_errors, ss.protocol_errors, ss.link_errors
            ));
        }
        Ok(())
    }
}

fn observe(view: &mut FlowView, t: &hypervisor::colo::packet::TcpSegment, f: &[u8], client_isn: Option<u32>) {
    if t.flags.contains(TcpFlags::SYN) {
        view.isn = Some(t.seq);
    }
    if let Some(isn) = view.isn {
        let payload = &f[t.payload.clone()];
        if !payload.is_empty() {
            let off = t.seq.wrapping_sub(isn.wrapping_add(1)) as usize;
            if view.stream.len() < off + payload.len() {
                view.stream.resize(off + payload.len(), 0);
            }
            view.stream[off..off + payload.len()].copy_from_slice(payload);
        }
    }
    if let Some(c) = client_isn {
        if t.flags.contains(TcpFlags::ACK) {
            let ack = t.ack.wrapping_sub(c.wrapping_add(1));
            view.max_ack = Some(view.max_ack.map_or(ack, |m| m.max(ack)));
        }
    }
}

fn new_secondary(cfg: NodeConfig, host_id: u64, now: Tick) -> ColoNode<MemDisk> {
    ColoNode::secondary(NodeConfig { host_id, role: NodeRole::Secondary, ..cfg }, MemDisk::new(DISK_SECTORS), now)
}

fn name(h: usize) -> &'static str {
    if h == 0 {
        "primary"
    } else {
        "secondary"
    }
}

struct PvmDisk<'a> {
    disk: &'a mut MemDisk,
    node: &'a mut ColoNode<MemDisk>,
    now: u64,
    /// A promoted secondary: the node owns the disk.
    in_node: bool,
}

impl GuestDisk for PvmDisk<'_> {
    fn read(&mut self, sector: u64) -> u32 {
        if self.in_node {
            let mut s = [0u8; SECTOR_SIZE];
            return match self.node.svm_disk_read(sector, &mut s) {
                Ok(()) => u32::from_le_bytes(s[..4].try_into().unwrap()),
                Err(_) => u32::MAX,
            };
        }
        mem_disk_read(self.disk, sector)
    }
    fn write(&mut self, sector: u64, value: u32) {
        let s = sector_bytes(value);
        if !self.in_node {
            self.disk.write_sector(sector, &s).unwrap();
        }
        self.node.handle(Tick(self.now), Event::GuestDiskWrite { sector, data: &s });
    }
}

struct SvmDisk<'a> {
    node: &'a mut ColoNode<MemDisk>,
    now: u64,
}

impl GuestDisk for SvmDisk<'_> {
    fn read(&mut self, sector: u64) -> u32 {
        let mut s = [0u8; SECTOR_SIZE];
        match self.node.svm_disk_read(sector, &mut s) {
            Ok(()) => u32::from_le_bytes(s[..4].try_into().unwrap()),
            Err(_) => u32::MAX,
        }
    }
    fn write(&mut self, sector: u64, value: u32) {
        let s = sector_bytes(value);
        self.node.handle(Tick(self.now), Event::GuestDiskWrite { sector, data: &s });
    }
}

// ---------------------------------------------------------------------------------------------
// Running histories.

struct Outcome {
    hash: u64,
    error: Option<String>,
    trace: Vec<String>,
    checkpoints: u64,
    full_syncs: u64,
    applied_checks: u64,
    released: u64,
    cuts: u64,
    refused: u64,
    garbage_errors: u64,
    /// Promotions, turns to unprotected, fences, primary deaths (mid-checkpoint), witness
    /// claims and denials, hosts that came back as new secondaries.
    failover: [u64; 8],
}

fn run_seed(seed: u64, verbose: bool) -> Outcome {
    let mut w = World::new(seed, verbose);
    let r = w.run();
    let ps = w.nodes[0].stats().clone();
    let ss = w.nodes[1].stats().clone();
    if let Err(e) = &r {
        w.trace(format!("FAILED: {e}"));
    }
    Outcome {
        hash: w.trace_hash,
        error: r.err(),
        trace: w.trace.into_iter().collect(),
        checkpoints: ps.checkpoints_committed,
        full_syncs: ps.full_syncs,
        applied_checks: w.applied_checks,
        released: w.released_frames,
        cuts: ps.link_closes,
        refused: ss.nacks.iter().sum(),
        garbage_errors: ps.link_errors_total() + ss.link_errors_total() + ps.protocol_errors + ss.protocol_errors,
        failover: [
            w.failovers,
            w.unprotected_turns,
            w.fences,
            w.primary_crashes,
            w.crashes_mid_checkpoint,
            w.claims,
            w.denials,
            w.revivals,
        ],
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn histories() {
    if let Some(seed) = env("COLO_SIM_SEED") {
        let o = run_seed(seed, true);
        println!("seed {seed}: trace hash {:016x}", o.hash);
        if let Some(e) = o.error {
            panic!("seed {seed} failed: {e}\nreplay: COLO_SIM_SEED={seed} cargo test -p colo-hypervisor --test colo_sim -- --nocapture histories");
        }
        return;
    }
    let n = env("COLO_SIM_SEEDS").unwrap_or(1000);
    let first = env("COLO_SIM_FIRST").unwrap_or(1);
    let start = std::time::Instant::now();
    let (mut ckpts, mut syncs, mut checks, mut released, mut cuts, mut refused, mut errors) = (0, 0, 0, 0, 0, 0, 0);
    let mut fo = [0u64; 8];
    let mut with_failover = 0;
    let mut failures = Vec::new();
    for seed in first..first + n {
        let o = run_seed(seed, false);
        ckpts += o.checkpoints;
        syncs += o.full_syncs;
        checks += o.applied_checks;
        released += o.released;
        cuts += o.cuts;
        refused += o.refused;
        errors += o.garbage_errors;
        for (a, b) in fo.iter_mut().zip(o.failover) {
            *a += b;
        }
        if o.failover[0] + o.failover[1] > 0 {
            with_failover += 1;
        }
        if let Some(e) = o.error {
            if failures.is_empty() {
                eprintln!("seed {seed} failed: {e}\nlast events:");
                for l in &o.trace {
                    eprintln!("  {l}");
                }
            }
            failures.push((seed, e));
        }
    }
    println!(
        "colo_sim: {n} histories (seeds {first}..{}) in {:.1} s: {ckpts} checkpoints acknowledged ({syncs} full syncs), {checks} applies checked, {released} frames released, {cuts} link closures, {refused} checkpoints refused, {errors} link/protocol errors counted",
        first + n - 1,
        start.elapsed().as_secs_f64()
    );
    println!(
        "colo_sim failover: {with_failover} histories with a takeover; {} promotions, {} primaries turned unprotected, {} fences, {} primary deaths ({} mid-checkpoint), {} witness claims ({} denied), {} hosts back as new secondaries",
        fo[0], fo[1], fo[2], fo[3], fo[4], fo[5], fo[6], fo[7]
    );
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().take(20).map(|(s, e)| format!("  seed {s}: {e}")).collect();
        panic!(
            "{} of {n} histories failed:\n{}\nreplay one with COLO_SIM_SEED=<seed> cargo test -p colo-hypervisor --test colo_sim -- --nocapture histories",
            failures.len(),
            list.join("\n")
        );
    }
}

#[test]
fn same_seed_same_trace() {
    let a = run_seed(77, false);
    let b = run_seed(77, false);
    assert_eq!(a.hash, b.hash, "seed 77 replayed differently");
    assert!(a.error.is_none(), "seed 77 failed: {:?}", a.error);
    let c = run_seed(78, false);
    assert_ne!(a.hash, c.hash, "different seeds gave the same trace");
}

/// Seeds that found bugs while the node was written; each must keep passing.
/// - 10: full-sync memory reached the secondary before `FullSyncBegin` (the begin message went
///   on the control lane behind other messages while the bulk lane started).
/// - 4: PVM disk writes made while the secondary applied the full sync were dropped as stale,
///   so the next checkpoint's disk differed; and a disk write's `handle` could start a capture
///   in the middle of a guest exit, putting a later write in the wrong epoch.
/// - 60, 3938: a disk-pressure checkpoint came too late for the secondary's pending-write cap
///   (the PVM now pauses at `max_disk_epoch_bytes`; the cap allows one more write per epoch).
/// - 255: the link was cut after the secondary applied a checkpoint but before its ack
///   arrived; aborting released PVM output of the next epoch that only the SVM's pre-apply
///   history had matched. Now the outcome waits for the secondary's next hello.
/// - 220720: after a refused checkpoint, a PVM disk write made before the full sync's capture
///   point arrived after `FullSyncBegin` (which overtakes queued messages on the bulk lane) and
///   was taken for a protocol error; it is covered by the sync's disk copy.
///
/// The generator has gained parameters since, so these seeds now replay other histories; each
/// bug is pinned by a unit test in `colo::node` (`full_sync_begin_goes_before_any_sync_data`,
/// `disk_writes_arriving_while_the_full_sync_applies_are_kept`,
/// `disk_pressure_pauses_the_pvm_and_checkpoints`, `a_lost_ack_is_resolved_by_the_next_hello`,
/// `a_disk_write_overtaken_by_the_full_sync_is_covered_by_it`), and the seeds keep running.
#[test]
fn regression_seeds() {
    for seed in [4, 10, 60, 255, 3938, 220720] {
        let o = run_seed(seed, false);
        assert!(o.error.is_none(), "seed {seed}: {:?}\n{}", o.error, o.trace.join("\n"));
    }
}
