//! The two-host driver: one host's loop when it runs as `role=primary` or `role=secondary`
//! (the kernel hands over here; `role=standalone` keeps the runner). Nothing below imports it.
//!
//! It owns the guest, the replication link ([`crate::net::repl`]) and the COLO engine
//! ([`ColoNode`], sans-IO), and carries bytes and events between them:
//! - steps the guest (unless the engine paused it) one exit at a time; a guest waiting in
//!   `BlockUntil` does not hold the loop (the runner defers the wait to the next step);
//! - feeds the engine: client frames for the guest's MAC (primary), the guest's output frames,
//!   the link's bytes and its connects and closes, capture and apply results, the time;
//! - carries out the engine's actions: frames into the guest, frames out to clients (primary),
//!   pause/resume, capture (pause + copy of dirty pages, vCPU and devices, then the PVM resumes
//!   while the stream goes out), full sync from the paused guest in place, checkpoint and full
//!   sync apply (secondary: all-or-nothing through `snapshot::apply_checkpoint_svm_recycle`
//!   and the committed copy of guest RAM, `guest::committed::CommittedRam`, so the SVM's own
//!   dirty pages return to the PVM's content; the checkpoint's page staging goes back to the
//!   engine, `ColoNode::recycle_staging`), closing the link;
//! - copies the engine's link bytes into the socket whenever it has room (bounded both ways);
//! - publishes the engine's status and counters to the registry (`stats::ColoReport`, read by
//!   `status`, `stats` and the metrics page) and takes `checkpoint` requests from it
//!   (`NodeCommand::Checkpoint`).
//!
//! What the secondary holds during a full sync: the SVM's RAM and the committed copy, both
//! written piece by piece as `FullSyncMemory` messages arrive (one link message of at most
//! `MAX_CHUNK` bytes at a time, plus the actions of one 64 KiB read), the disk (written in
//! place into the engine's raw disk), and the vCPU and device blobs (at most
//! [`MAX_SYNC_STATES`], each at most one message; more refuse the sync). Nothing is sized by
//! the primary's word but those capped blobs.
//!
//! The guest's disk (`disk=NAME`): on the primary, writes land on the local disk and go to the
//! engine, which replicates them; on the secondary every read and write goes to the engine's
//! block replica (the SVM's overlay over the committed disk), never to the disk module.
//!
//! Failover (issue 12, the block at the end of this file): witness claims over a smoltcp TCP
//! connection on the management interface ([`Witness`], one etcd request at a time with a
//! deadline; unreachable, slow or malformed is never a grant), promotion (client frames to the
//! engine, released frames to the client NIC, the replication link turned to the primary's
//! side, a gratuitous ARP for the service address), fencing (VM stopped for good, the client
//! NIC's transmit path refuses every frame from the guest's MAC and counts it), `ctl failover`,
//! and the failover state in status and metrics. The holder key under a lease is kept by the
//! serving host for operators (`colo/<cluster>/holder`).

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::boot_info::{BootInfo, BootModule};
use crate::colo::block::MemDisk;
use crate::colo::checkpoint::Crc32c;
use crate::colo::link::{LinkError, StateKind};
use crate::colo::node::{
    Action, ApplyFailure, Capture, CaptureKind, ColoNode, Event, FullSyncSource, LinkState, NodeCommand, NodeConfig,
    NodeRole, SyncPiece, WitnessMode,
};
use crate::colo::Tick;
use crate::config::{Config, NicRoles, Role};
use crate::devices::pvblock::BlockHook;
use crate::devices::state::DeviceStates;
use crate::devices::FrameQueue;
use crate::guest::committed::CommittedRam;
use crate::guest::spec::GuestSpec;
use crate::guest::spec::GUEST_PREFIX;
use crate::guest::GuestMemory;
use crate::host::{shutdown, time};
use crate::memory::{FrameAllocator, PhysRange};
use crate::net::repl::nic::ReplPort;
use crate::net::repl::CloseReason;
use crate::runner::Guest;
use crate::snapshot::{self, Pages};
use crate::vcpu::state::VCPU_STATE_TAG;
use crate::vcpu::{DirtyLogMethod, VcpuState};

const PAGE: usize = 4096;
const SECTOR: usize = 512;
/// Client frames waiting for the engine (primary), and guest output waiting for it.
const QUEUE_FRAMES: usize = 1024;
/// Link bytes moved per copy.
const IO_CHUNK: usize = 64 << 10;
/// vCPU and device state blobs a full sync may carry (one vCPU, a handful of devices); more
/// refuse the sync rather than grow the secondary's buffer.
pub const MAX_SYNC_STATES: usize = 16;
/// How often the engine's status goes to the registry (besides at every state change or commit).
const PUBLISH_MS: u64 = 20;

/// The engine, shared with the guest's block hook (borrowed only outside `Guest::step`, and by
/// the hook only inside it).
type Shared = Rc<RefCell<ColoNode<MemDisk>>>;

/// Beneath the guest's block device. Primary: writes land on the local disk, then go to the
/// engine (which replicates them). Secondary: reads and writes go to the engine's block replica
/// (the SVM's overlay over the committed disk); the disk module itself is never touched.
struct DiskHook {
    node: Shared,
    secondary: bool,
    /// A promoted secondary: the engine still owns the disk, but captures need the written
    /// ranges.
    promoted: Rc<core::cell::Cell<bool>>,
    /// Primary: sector ranges written since the last capture (for the verify digest).
    written: Rc<RefCell<Vec<(u64, u64)>>>,
}

impl BlockHook for DiskHook {
    fn read(&mut self, disk: &[u8], sector: u64, buf: &mut [u8]) {
        if self.secondary {
            if let Err(e) = self.node.borrow().svm_disk_read(sector, buf) {
                log::error!("node: SVM disk read at sector {sector}: {e:?}");
            }
        } else if let Some(src) = disk.get(sector as usize * SECTOR..sector as usize * SECTOR + buf.len()) {
            buf.copy_from_slice(src);
        }
    }

    fn write(&mut self, disk: &mut [u8], sector: u64, data: &[u8]) {
        if !self.secondary {
            if let Some(dst) = disk.get_mut(sector as usize * SECTOR..sector as usize * SECTOR + data.len()) {
                dst.copy_from_slice(data);
            }
            self.written.borrow_mut().push((sector, (data.len() / SECTOR) as u64));
        } else if self.promoted.get() {
            self.written.borrow_mut().push((sector, (data.len() / SECTOR) as u64));
        }
        self.node.borrow_mut().handle(Tick(time::now_ms()), Event::GuestDiskWrite { sector, data });
    }

    fn flushed(&mut self) {}
}

/// The host network stack's hook for the guest's MAC: client frames go to the engine (primary)
/// or nowhere (secondary: the SVM sees only mirrored input).
struct ClientPort {
    mac: [u8; 6],
    queue: Arc<spin::Mutex<FrameQueue>>,
    /// Whether this host serves clients (primary, or promoted).
    serving: Arc<core::sync::atomic::AtomicBool>,
    /// The guest's IPv4 address, learnt from the ARP and IPv4 frames clients send it (for the
    /// gratuitous ARP at promotion).
    guest_ip: Arc<core::sync::atomic::AtomicU32>,
}

impl crate::net::GuestForward for ClientPort {
    fn owns(&self, mac: [u8; 6]) -> bool {
        mac == self.mac
    }

    fn deliver(&mut self, _nic: usize, roles: NicRoles, frame: &[u8]) {
        if !roles.client {
            return;
        }
        if let Some(ip) = guest_ip_in(frame) {
            self.guest_ip.store(u32::from(ip), core::sync::atomic::Ordering::Relaxed);
        }
        if self.serving.load(core::sync::atomic::Ordering::Relaxed) {
            self.queue.lock().push(frame);
        }
    }
}

/// FNV-1a over the guest modules' lines and bytes: both hosts must run the same guest.
fn guest_id(boot: &BootInfo<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for module in boot.modules.iter().filter(|m| m.name().starts_with(GUEST_PREFIX)) {
        module.cmdline.bytes().for_each(&mut eat);
        module_bytes(module).iter().copied().for_each(&mut eat);
    }
    h
}

fn module_bytes<'a>(module: &BootModule<'a>) -> &'a [u8] {
    // SAFETY: the boot loader placed the module at this range, reserved from the allocator and
    // identity-mapped; nothing writes guest images.
    unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) }
}

/// Guest RAM at host-physical `ram`, read-only.
///
/// # Safety
/// `ram` must be a live guest's RAM (identity-mapped, allocated until the guest is destroyed),
/// and the guest must not run while the slice is used.
unsafe fn ram_slice<'a>(ram: PhysRange) -> &'a [u8] {
    // SAFETY: as the caller guarantees.
    unsafe { core::slice::from_raw_parts(ram.start as *const u8, ram.len() as usize) }
}

/// The `checkpoint_verify` digest of guest RAM: one CRC-32C per page, kept up to date page by
/// page (each host recomputes the pages it knows changed: the primary the pages it captured,
/// the secondary the pages a checkpoint wrote and the SVM pages it put back), and the digest is
/// the CRC-32C of that table. A whole-RAM CRC per checkpoint took ~0.4 s of PVM pause for
/// 32 MiB under QEMU TCG. Every full sync recomputes the whole table on both hosts.
struct PageDigests {
    crcs: Vec<u32>,
    sectors: Vec<u32>,
}

impl PageDigests {
    fn new(pages: u64) -> Self {
        Self { crcs: vec![0; pages as usize], sectors: Vec::new() }
    }

    /// Recomputes every page from RAM.
    fn all(&mut self, ram: &[u8]) {
        for (crc, page) in self.crcs.iter_mut().zip(ram.chunks(PAGE)) {
            *crc = Crc32c::checksum(page);
        }
    }

    /// Recomputes page `gfn` from its content.
    fn page(&mut self, gfn: u64, content: &[u8]) {
        if let Some(crc) = self.crcs.get_mut(gfn as usize) {
            *crc = Crc32c::checksum(content);
        }
    }

    /// Recomputes every sector of `disk`.
    fn all_sectors(&mut self, disk: &[u8]) {
        self.sectors = disk.chunks(SECTOR).map(Crc32c::checksum).collect();
    }

    /// Recomputes `count` sectors from `sector` of `disk`.
    fn sectors(&mut self, disk: &[u8], sector: u64, count: u64) {
        for s in sector..sector + count {
            let at = s as usize * SECTOR;
            if let (Some(crc), Some(bytes)) = (self.sectors.get_mut(s as usize), disk.get(at..at + SECTOR)) {
                *crc = Crc32c::checksum(bytes);
            }
        }
    }

    /// The digest: CRC-32C of the page table in the high half, of the sector table in the low.
    fn digest(&self) -> u64 {
        let table = |crcs: &[u32]| {
            let mut crc = Crc32c::new();
            for c in crcs {
                crc.update(&c.to_le_bytes());
            }
            crc.value()
        };
        (u64::from(table(&self.crcs)) << 32) | u64::from(table(&self.sectors))
    }
}

/// The whole paused PVM, read in place piece by piece (the full sync; never copied whole).
struct GuestSync {
    ram: PhysRange,
    offset: u64,
    /// The PVM's disk (the module's bytes, which outlive the guest) and how much was read.
    disk: (*const u8, usize),
    disk_offset: usize,
    states: Vec<(StateKind, u64, u32, Vec<u8>)>,
    next_state: usize,
}

impl FullSyncSource for GuestSync {
    fn ram_bytes(&self) -> u64 {
        self.ram.len()
    }

    fn disk_sectors(&self) -> u64 {
        (self.disk.1 / SECTOR) as u64
    }

    fn next_piece(&mut self, buf: &mut [u8]) -> Option<SyncPiece> {
        if self.offset < self.ram.len() {
            let len = (buf.len() as u64).min(self.ram.len() - self.offset) as usize & !(PAGE - 1);
            let len = if len == 0 { buf.len().min((self.ram.len() - self.offset) as usize) } else { len };
            // SAFETY: the engine keeps the PVM paused (`PauseReason::FullSync`) until this
            // source is dropped, and the guest (its RAM) outlives the engine's use of it.
            let ram = unsafe { ram_slice(self.ram) };
            let at = self.offset as usize;
            buf[..len].copy_from_slice(&ram[at..at + len]);
            let piece = SyncPiece::Memory { offset: self.offset, len };
            self.offset += len as u64;
            return Some(piece);
        }
        if self.disk_offset < self.disk.1 {
            let len = buf.len().min(self.disk.1 - self.disk_offset) & !(SECTOR - 1);
            if len > 0 {
                // SAFETY: the disk module's bytes stay mapped for the hypervisor's life; the
                // PVM is paused while this source exists, so nothing writes them.
                let disk = unsafe { core::slice::from_raw_parts(self.disk.0, self.disk.1) };
                buf[..len].copy_from_slice(&disk[self.disk_offset..self.disk_offset + len]);
                let piece = SyncPiece::Disk { sector: (self.disk_offset / SECTOR) as u64, len };
                self.disk_offset += len;
                return Some(piece);
            }
        }
        let (kind, id, tag, data) = self.states.get(self.next_state)?;
        if data.len() > buf.len() {
            log::error!("node: state blob of {} bytes does not fit a {}-byte sync piece", data.len(), buf.len());
            return None;
        }
        buf[..data.len()].copy_from_slice(data);
        self.next_state += 1;
        Some(SyncPiece::State { kind: *kind, id: *id, tag: *tag, len: data.len() })
    }
}

/// The secondary's view of a full sync being received.
#[derive(Default)]
struct Incoming {
    vcpu: Option<(u32, Vec<u8>)>,
    devices: Vec<(u64, u32, Vec<u8>)>,
    /// More blobs than [`MAX_SYNC_STATES`], or memory outside guest RAM: the sync is refused.
    refused: bool,
}

/// One host: the guest, the engine, the link and the queues between them.
struct Host {
    role: Role,
    guest: Guest,
    node: Shared,
    /// Primary: disk sectors written since the last capture (by the block hook).
    written: Rc<RefCell<Vec<(u64, u64)>>>,
    port: ReplPort,
    client_in: Arc<spin::Mutex<FrameQueue>>,
    guest_out: Arc<spin::Mutex<FrameQueue>>,
    /// The engine keeps the guest from running.
    paused: bool,
    /// The link connection the engine knows about.
    conn: Option<u32>,
    /// Secondary: RAM as of the last committed checkpoint (the PVM's content), through which
    /// checkpoints apply (`snapshot::apply_checkpoint_svm_recycle`).
    committed: Option<CommittedRam>,
    /// Secondary: the pages the last apply wrote into the SVM.
    restored: Vec<u64>,
    incoming: Incoming,
    buf: Vec<u8>,
    last_state: LinkState,
    last_committed: u64,
    /// `checkpoint_verify` page digests.
    digests: PageDigests,
    /// The last verify digest this host computed: (epoch, digest).
    last_digest: Option<(u64, u64)>,
    /// Link error counters (by `LinkError::index`) and protocol errors already reported.
    seen_errors: [u64; 8],
    seen_protocol: u64,
    /// Captures (pause samples) and applies (apply samples) reported to the engine.
    captures: u64,
    applies: u64,
    /// When the status was last published to the registry.
    published_at: u64,
    published: (LinkState, u64),
    /// Failover: the witness client, promotion and fencing state.
    fo: FoState,
}

impl Host {
    fn now() -> Tick {
        Tick(time::now_ms())
    }

    /// One round of the loop.
    fn turn(&mut self) {
        // The guest, one exit (or a deferred wait that is not over yet).
        if !self.paused {
            if let Some(end) = self.guest.step() {
                self.guest.report(&end);
                log::error!("node: the guest ended ({end}); this host stops");
                shutdown::exit(shutdown::ExitStatus::Failure);
            }
        } else if crate::net::poll() == crate::net::PollOutcome::Shutdown {
            shutdown::exit(shutdown::ExitStatus::Success);
        }
        let now = Self::now();
        // Frames: client input (primary) and guest output.
        let mut frame = [0u8; 2048];
        for client in [true, false] {
            let queue = if client { self.client_in.clone() } else { self.guest_out.clone() };
            loop {
                let mut len = 0;
                queue.lock().drain(&mut |f| {
                    if len > 0 || f.len() > frame.len() {
                        return false;
                    }
                    frame[..f.len()].copy_from_slice(f);
                    len = f.len();
                    true
                });
                if len == 0 {
                    break;
                }
                let event = if client { Event::ClientFrame(&frame[..len]) } else { Event::GuestOutput(&frame[..len]) };
                self.node.borrow_mut().handle(now, event);
                self.actions(now);
            }
        }
        self.link(now);
        self.fo_poll(now);
        if self.node.borrow().poll_timeout().is_some_and(|at| at <= now) {
            self.node.borrow_mut().handle_timeout(now);
        }
        self.actions(now);
        self.transmit(now);
        self.report();
        self.publish(now);
    }

    /// The link: connects and closes, received bytes.
    fn link(&mut self, now: Tick) {
        self.port.poll();
        let current = self.port.link.connection().map(|c| c.id);
        if current != self.conn {
            if self.conn.is_some() {
                self.node.borrow_mut().handle(now, Event::LinkClosed);
                self.actions(now);
            }
            self.conn = current;
            if current.is_some() {
                self.node.borrow_mut().handle(now, Event::LinkConnected);
                self.actions(now);
            }
        }
        loop {
            let n = self.port.link.recv(&mut self.buf);
            if n == 0 {
                break;
            }
            let bytes = core::mem::take(&mut self.buf);
            self.fo.last_heard_ms = now.0;
            self.node.borrow_mut().handle(now, Event::LinkBytes(&bytes[..n]));
            self.buf = bytes;
            self.actions(now);
        }
    }

    /// Engine bytes into the socket while both have some.
    fn transmit(&mut self, now: Tick) {
        for _ in 0..64 {
            let room = self.port.link.send_capacity().min(self.buf.len());
            if room == 0 || !self.node.borrow().wants_transmit() {
                break;
            }
            let n = self.node.borrow_mut().poll_transmit(now, &mut self.buf[..room]);
            if n == 0 {
                break;
            }
            let sent = self.port.link.send(&self.buf[..n]);
            debug_assert_eq!(sent, n);
            self.port.poll();
        }
    }

    /// Carries out every queued action, in order.
    fn actions(&mut self, now: Tick) {
        loop {
            let action = self.node.borrow_mut().poll_action();
            let Some(action) = action else { break };
            match action {
                Action::DeliverToGuest(frame) => {
                    if !self.guest.device_hooks.push_input(&frame) {
                        log::warn!("node: guest input queue full; frame of {} bytes not delivered", frame.len());
                    }
                }
                Action::ReleaseToClients(frame) => {
                    if self.fo.first_output_due {
                        self.fo_first_output();
                    }
                    let _ = crate::net::send_from_guest(&frame);
                }
                Action::Capture { epoch, kind } => {
                    self.paused = true;
                    let event = self.capture(epoch, kind);
                    self.node.borrow_mut().handle(Self::now(), event);
                }
                Action::ResumeVm => self.paused = self.fo.fenced,
                Action::PauseVm(reason) => {
                    log::debug!("node: guest paused: {reason:?}");
                    self.paused = true;
                }
                Action::ApplyCheckpoint(staged) => {
                    let event = self.apply_checkpoint(staged);
                    self.node.borrow_mut().handle(Self::now(), event);
                }
                Action::BeginFullSync { epoch, ram_bytes } => {
                    self.paused = true;
                    self.incoming = Incoming::default();
                    log::info!("node: full sync {epoch} begins: {} KiB of guest RAM", ram_bytes >> 10);
                    if ram_bytes != self.guest.ram.len() {
                        log::error!(
                            "node: the primary's guest has {ram_bytes} bytes of RAM, this one {}: set the same guest_mem=",
                            self.guest.ram.len()
                        );
                    }
                }
                Action::SyncMemory { offset, data } => {
                    let mut mem = self.guest.memory();
                    let committed = self.committed.as_mut().map(|c| c.write_at(offset, &data));
                    if mem.write(offset, &data).is_err() || !matches!(committed, Some(Ok(()))) {
                        log::error!("node: full sync memory at {offset:#x} (+{}) outside guest RAM", data.len());
                        self.incoming.refused = true;
                    }
                }
                Action::SyncState { kind, id, tag, data } => {
                    let held = self.incoming.devices.len() + usize::from(self.incoming.vcpu.is_some());
                    match kind {
                        _ if held >= MAX_SYNC_STATES => self.incoming.refused = true,
                        StateKind::Vcpu => self.incoming.vcpu = Some((tag, data)),
                        StateKind::Device => self.incoming.devices.push((id, tag, data)),
                    }
                }
                Action::FinishFullSync { epoch } => {
                    let event = self.finish_full_sync(epoch);
                    self.node.borrow_mut().handle(Self::now(), event);
                }
                Action::CloseLink => {
                    let reason = self.new_error().map_or(CloseReason::Local("engine"), CloseReason::Protocol);
                    self.port.link.close(reason, now.0);
                    if self.conn.take().is_some() {
                        self.node.borrow_mut().handle(now, Event::LinkClosed);
                    }
                }
                Action::Fence => self.fo_fence(),
                Action::Promote => self.fo_promote(),
                Action::AnnounceService => self.fo_announce(),
                Action::ClaimGeneration { generation } => self.fo.witness_claim(generation, now),
            }
        }
    }

    /// Primary: pause and copy (incremental) or a source over the paused guest (full).
    fn capture(&mut self, epoch: u64, kind: CaptureKind) -> Event<'static> {
        let t0 = time::rdtsc();
        self.captures += 1;
        let frames = self.guest.ram.len() / PAGE as u64;
        let verify = self.node.borrow().config().verify;
        match kind {
            CaptureKind::Incremental => {
                let (copy, _) = match snapshot::pause_and_copy(&mut self.guest, Pages::Dirty) {
                    Ok(c) => c,
                    Err(e) => {
                        log::error!("node: capture {epoch}: {e}");
                        return Event::CaptureFailed { epoch };
                    }
                };
                let pause_us = cycles_to_us(time::rdtsc() - t0);
                let pages = copy.gfns.len() as u64;
                let written = core::mem::take(&mut *self.written.borrow_mut());
                let digest = verify.then(|| {
                    for (&gfn, page) in copy.gfns.iter().zip(copy.data.chunks_exact(PAGE)) {
                        self.digests.page(gfn, page);
                    }
                    let (ptr, len) = self.disk_raw();
                    let disk = if len == 0 {
                        &[][..]
                    } else {
                        // SAFETY: the guest's disk (module bytes or the engine's merged disk
                        // after a promotion), unchanged while the guest is paused for the capture.
                        unsafe { core::slice::from_raw_parts(ptr, len) }
                    };
                    for &(sector, count) in &written {
                        self.digests.sectors(disk, sector, count);
                    }
                    self.digests.digest()
                });
                self.last_digest = digest.map(|d| (epoch, d));
                match snapshot::encode(&copy, epoch, frames) {
                    Ok(stream) => Event::CaptureDone {
                        epoch,
                        capture: Capture::Checkpoint(Box::new(stream)),
                        digest,
                        pause_us,
                        pages,
                    },
                    Err(e) => {
                        log::error!("node: encoding checkpoint {epoch}: {e}");
                        Event::CaptureFailed { epoch }
                    }
                }
            }
            CaptureKind::Full => {
                let mut state = match self.guest.vcpu.save_state() {
                    Ok(s) => s,
                    Err(e) => {
                        log::error!("node: full capture {epoch}: {e}");
                        return Event::CaptureFailed { epoch };
                    }
                };
                state.handler_msrs = self.guest.handler.msrs();
                let mut states =
                    vec![(StateKind::Vcpu, 0, VCPU_STATE_TAG, zerocopy::IntoBytes::as_bytes(&state).to_vec())];
                for blob in self.guest.save_devices().blobs() {
                    states.push((StateKind::Device, blob.id, blob.tag, blob.data));
                }
                // The dirty log starts over: the sync covers every page.
                let _ = snapshot::take_dirty(&mut self.guest);
                self.written.borrow_mut().clear();
                let disk = self.disk_raw();
                let digest = verify.then(|| {
                    // SAFETY: the guest is paused (it runs only in `turn`) and alive.
                    self.digests.all(unsafe { ram_slice(self.guest.ram) });
                    let bytes = if disk.1 == 0 {
                        &[][..]
                    } else {
                        // SAFETY: `disk` is the guest's disk as just read (above), unchanged
                        // while the guest is paused.
                        unsafe { core::slice::from_raw_parts(disk.0, disk.1) }
                    };
                    self.digests.all_sectors(bytes);
                    self.digests.digest()
                });
                self.last_digest = digest.map(|d| (epoch, d));
                let pause_us = cycles_to_us(time::rdtsc() - t0);
                log::info!(
                    "node: full sync {epoch}: {} KiB of RAM and {} KiB of disk from the paused PVM",
                    self.guest.ram.len() >> 10,
                    disk.1 >> 10
                );
                Event::CaptureDone {
                    epoch,
                    capture: Capture::Full(Box::new(GuestSync {
                        ram: self.guest.ram,
                        offset: 0,
                        disk,
                        disk_offset: 0,
                        states,
                        next_state: 0,
                    })),
                    digest,
                    pause_us,
                    pages: frames,
                }
            }
        }
    }

    /// Secondary: a verified checkpoint into the SVM, all or nothing, through the committed copy
    /// of guest RAM (the SVM's own dirty pages return to the PVM's content too); the page
    /// staging goes back to the engine.
    fn apply_checkpoint(&mut self, staged: crate::colo::checkpoint::StagedCheckpoint) -> Event<'static> {
        let t0 = time::rdtsc();
        self.applies += 1;
        let epoch = staged.epoch();
        let Some(committed) = self.committed.as_mut() else {
            log::error!("node: checkpoint {epoch} refused: no committed copy of guest RAM");
            if let Some(staging) = staged.into_staging() {
                self.node.borrow_mut().recycle_staging(staging);
            }
            return Event::ApplyDone { epoch, result: Err(ApplyFailure::State), apply_us: 0 };
        };
        let (applied, staging) =
            snapshot::apply_checkpoint_svm_recycle(&mut self.guest, staged, epoch, committed, &mut self.restored);
        if let Some(staging) = staging {
            self.node.borrow_mut().recycle_staging(staging);
        }
        let result = match applied {
            Ok(report) => {
                let bytes = committed.bytes();
                for &gfn in &self.restored {
                    if let Some(page) = bytes.get(gfn as usize * PAGE..(gfn as usize + 1) * PAGE) {
                        self.digests.page(gfn, page);
                    }
                }
                log::debug!(
                    "node: checkpoint {epoch}: {} pages applied, {} SVM pages put back",
                    report.pages,
                    report.svm_dirty_pages
                );
                Ok(self.node.borrow().config().verify.then(|| {
                    let node = self.node.borrow();
                    self.digests.all_sectors(node.secondary_disk().map_or(&[][..], MemDisk::as_bytes));
                    self.digests.digest()
                }))
            }
            Err(e) => {
                log::error!("node: checkpoint {epoch} refused: {e}");
                Err(ApplyFailure::State)
            }
        };
        if let Ok(Some(d)) = result {
            self.last_digest = Some((epoch, d));
        }
        Event::ApplyDone { epoch, result, apply_us: cycles_to_us(time::rdtsc() - t0) }
    }

    /// Secondary: the full sync's states into the SVM.
    fn finish_full_sync(&mut self, epoch: u64) -> Event<'static> {
        let t0 = time::rdtsc();
        self.applies += 1;
        let incoming = core::mem::take(&mut self.incoming);
        let result = (|| {
            if incoming.refused || self.committed.is_none() {
                log::error!(
                    "node: full sync {epoch} refused: more than {MAX_SYNC_STATES} state blobs, memory outside guest RAM, or no committed copy"
                );
                return Err(ApplyFailure::State);
            }
            let (tag, data) = incoming.vcpu.as_ref().ok_or(ApplyFailure::State)?;
            let state = VcpuState::parse(*tag, data).map_err(|e| {
                log::error!("node: full sync {epoch}: vCPU state: {e}");
                ApplyFailure::State
            })?;
            let devices =
                DeviceStates::from_blobs(incoming.devices.iter().map(|(id, tag, d)| (*id, *tag, d.as_slice())))
                    .map_err(|e| {
                        log::error!("node: full sync {epoch}: device states: {e}");
                        ApplyFailure::State
                    })?;
            self.guest.check_devices(&devices).map_err(|e| {
                log::error!("node: full sync {epoch}: device states: {e}");
                ApplyFailure::State
            })?;
            self.guest.vcpu.check_state(&state).map_err(|e| {
                log::error!("node: full sync {epoch}: vCPU state: {e}");
                ApplyFailure::State
            })?;
            self.guest.vcpu.load_state(&state).map_err(|_| ApplyFailure::State)?;
            self.guest.handler.set_msrs(state.handler_msrs);
            self.guest.load_devices(&devices);
            let _ = snapshot::take_dirty(&mut self.guest);
            log::info!("node: full sync {epoch} applied");
            Ok(self.node.borrow().config().verify.then(|| {
                // SAFETY: the SVM is paused (it runs only in `turn`) and alive.
                self.digests.all(unsafe { ram_slice(self.guest.ram) });
                let node = self.node.borrow();
                self.digests.all_sectors(node.secondary_disk().map_or(&[][..], MemDisk::as_bytes));
                self.digests.digest()
            }))
        })();
        if let Ok(Some(d)) = result {
            self.last_digest = Some((epoch, d));
        }
        Event::ApplyDone { epoch, result, apply_us: cycles_to_us(time::rdtsc() - t0) }
    }

    /// The name of a link or protocol error the engine counted since the last report, if any.
    fn new_error(&self) -> Option<&'static str> {
        let node = self.node.borrow();
        let stats = node.stats();
        if let Some(i) = (0..self.seen_errors.len()).find(|&i| stats.link_errors[i] > self.seen_errors[i]) {
            return Some(LinkError::NAMES[i]);
        }
        (stats.protocol_errors > self.seen_protocol).then(|| node.last_protocol_error().unwrap_or("protocol"))
    }

    /// Logs state changes, commits and link errors.
    fn report(&mut self) {
        let node = self.node.clone();
        let node = node.borrow();
        let stats = node.stats();
        for i in 0..self.seen_errors.len() {
            if stats.link_errors[i] > self.seen_errors[i] {
                self.seen_errors[i] = stats.link_errors[i];
                log::warn!("node: link error `{}` (total {})", LinkError::NAMES[i], stats.link_errors[i]);
            }
        }
        if stats.protocol_errors > self.seen_protocol {
            self.seen_protocol = stats.protocol_errors;
            log::warn!(
                "node: link protocol error `{}` (total {})",
                node.last_protocol_error().unwrap_or("?"),
                stats.protocol_errors
            );
        }
        let status = node.status();
        if status.link != self.last_state {
            match status.link {
                LinkState::Colo => log::info!("node: COLO running ({:?}, epoch {})", self.role, status.epoch),
                other => log::info!("node: link {other:?}"),
            }
            self.last_state = status.link;
        }
        if status.committed != self.last_committed {
            self.last_committed = status.committed;
            let s = &status.stats;
            let c = &status.comparator;
            log::info!(
                "node: epoch {} committed; checkpoints {:?} committed {} aborted {}; verify failures {}; link errors {}; \
                 pause {} us, {} pages, {} bytes; mirrored {} (input dropped {}) svm {} (dropped {}); pvm {} released {} (by checkpoint {}) \
                 compared {} B, svm discarded {}; totals pause {} us, transfer {} us, apply {} us; digest {}",
                status.committed,
                s.checkpoints_by_cause,
                s.checkpoints_committed,
                s.checkpoints_aborted,
                s.verify_failures,
                s.link_errors_total(),
                s.pause_us_last,
                s.pages_last,
                s.bytes_last,
                s.mirrored_frames,
                s.input_dropped,
                s.svm_frames,
                s.svm_frames_dropped,
                c.pvm_frames,
                c.released_frames,
                c.released_by_checkpoint,
                c.compared_bytes,
                c.svm_discarded_frames,
                s.pause_us_total,
                s.transfer_us_total,
                s.apply_us_total,
                DigestText(self.last_digest)
            );
        }
    }
}

impl Host {
    /// Publishes the engine's status to the registry every [`PUBLISH_MS`] and at every link
    /// state change or commit, and takes the `checkpoint` requests the management API accepted.
    fn publish(&mut self, now: Tick) {
        // `report` just brought these up to date.
        let (link, committed) = (self.last_state, self.last_committed);
        if now.0 < self.published_at + PUBLISH_MS && (link, committed) == self.published {
            return;
        }
        self.published_at = now.0;
        self.published = (link, committed);
        let report = self.colo_report();
        let requests = crate::stats::with(|s| {
            s.colo = Some(report);
            core::mem::take(&mut s.colo_checkpoint_requests)
        });
        if requests > 0 && self.role == Role::Primary {
            log::info!("node: checkpoint requested over the management API");
            self.node.borrow_mut().handle(now, Event::Command(NodeCommand::Checkpoint));
            self.actions(now);
        }
    }

    /// The registry's view of the engine.
    fn colo_report(&self) -> crate::stats::ColoReport {
        let node = self.node.borrow();
        let status = node.status();
        let (s, c) = (&status.stats, &status.comparator);
        let sample = |last, total, count| crate::stats::Sample { last, total, count };
        crate::stats::ColoReport {
            role: if self.role == Role::Primary { "primary" } else { "secondary" },
            link: match status.link {
                LinkState::Down => "down",
                LinkState::Handshake => "handshake",
                LinkState::Syncing => "syncing",
                LinkState::Colo => "colo",
            },
            epoch: status.epoch,
            committed: status.committed,
            checkpoints_by_cause: s.checkpoints_by_cause,
            checkpoints_committed: s.checkpoints_committed,
            checkpoints_aborted: s.checkpoints_aborted,
            full_syncs: s.full_syncs,
            pause_us: sample(s.pause_us_last, s.pause_us_total, self.captures),
            // Every acknowledged checkpoint (full syncs included) adds one transfer time.
            transfer_us: sample(
                s.transfer_us_last,
                s.transfer_us_total,
                if self.role == Role::Primary { s.checkpoints_committed } else { 0 },
            ),
            apply_us: sample(s.apply_us_last, s.apply_us_total, self.applies),
            pages_last: s.pages_last,
            pages_total: s.pages_total,
            bytes_last: s.bytes_last,
            bytes_total: s.bytes_total,
            compared_bytes: c.compared_bytes + c.retransmitted_bytes,
            matched_bytes: c.compared_bytes,
            released_bytes: c.released_bytes,
            released_frames: c.released_frames,
            released_by_checkpoint: c.released_by_checkpoint,
            held_frames: c.held_frames as u64,
            mirrored_frames: s.mirrored_frames,
            input_dropped: s.input_dropped,
            svm_frames: s.svm_frames,
            svm_frames_dropped: s.svm_frames_dropped,
            link_errors: core::array::from_fn(|i| (LinkError::NAMES[i], s.link_errors[i])),
            protocol_errors: s.protocol_errors,
            verify_failures: s.verify_failures,
            link_connects: s.link_connects,
            link_closes: s.link_closes,
            seq_rewritten: node
                .rewriter_stats()
                .map_or((0, 0, 0), |r| (r.svm_rewritten, r.client_rewritten, r.unknown_offset)),
            digest: self.last_digest,
        }
    }
}

/// `EPOCH:RAMTABLE-DISKTABLE` (hex), or `-` with verify off.
struct DigestText(Option<(u64, u64)>);

impl core::fmt::Display for DigestText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some((epoch, d)) => write!(f, "{epoch}:{:08x}-{:08x}", d >> 32, d as u32),
            None => f.write_str("-"),
        }
    }
}

fn cycles_to_us(cycles: u64) -> u64 {
    cycles * 1000 / time::tsc_per_ms().max(1)
}

fn fail(args: core::fmt::Arguments<'_>) -> ! {
    log::error!("node: {args}");
    shutdown::exit(shutdown::ExitStatus::Failure)
}

/// Runs this host as `config.role` until a `shutdown` request. Never returns.
pub fn run(frames: &mut FrameAllocator, boot: &BootInfo<'_>, config: &Config) -> ! {
    let port = ReplPort::bring_up(config).unwrap_or_else(|e| fail(format_args!("replication link: {e}")));
    let module = boot
        .modules
        .iter()
        .find(|m| m.name().starts_with(GUEST_PREFIX))
        .unwrap_or_else(|| fail(format_args!("no guest module to replicate")));
    let spec =
        GuestSpec::parse(module.cmdline).unwrap_or_else(|e| fail(format_args!("guest `{}`: {e}", module.name())));
    let mac = spec.mac.unwrap_or_else(|| fail(format_args!("guest `{}` needs mac= to be replicated", spec.name)));
    let mut backend =
        crate::backend::Backend::detect(frames).unwrap_or_else(|e| fail(format_args!("no guest can run: {e}")));
    log::info!("backend: {}: {}", backend.name(), backend.describe());
    let mut guest = Guest::create(&mut backend, frames, module, &spec, config.guest_mem_bytes)
        .unwrap_or_else(|e| fail(format_args!("guest `{}` not started: {e}", spec.name)));
    let pages = guest.ram.len() / PAGE as u64;
    // PML where the CPU has it; elsewhere (AMD-V, VT-x without PML) write protection, whose
    // collection costs the pages written, not the guest's size.
    let mut method = match backend.name() {
        "VT-x" => DirtyLogMethod::Pml,
        _ => DirtyLogMethod::WriteProtect,
    };
    if let Err(e) = guest.vcpu.enable_dirty_log(method, frames) {
        if method != DirtyLogMethod::Pml {
            fail(format_args!("dirty logging: {e}"));
        }
        log::info!("node: {e}; using write protection instead");
        method = DirtyLogMethod::WriteProtect;
        if let Err(e) = guest.vcpu.enable_dirty_log(method, frames) {
            fail(format_args!("dirty logging: {e}"));
        }
    }
    guest.dirty = Some(crate::memory::DirtyLog::new(pages));
    let guest_out = Arc::new(spin::Mutex::new(FrameQueue::new(QUEUE_FRAMES)));
    guest.device_hooks.redirect_output(guest_out.clone());
    let client_in = Arc::new(spin::Mutex::new(FrameQueue::new(QUEUE_FRAMES)));
    let serving = Arc::new(core::sync::atomic::AtomicBool::new(config.role == Role::Primary));
    let guest_ip = Arc::new(core::sync::atomic::AtomicU32::new(0));
    crate::net::set_guest_hook(Box::new(ClientPort {
        mac,
        queue: client_in.clone(),
        serving: serving.clone(),
        guest_ip: guest_ip.clone(),
    }));
    guest.defer_blocks(true);
    let role = if config.role == Role::Primary { NodeRole::Primary } else { NodeRole::Secondary };
    if let Some(name) = spec.disk {
        let disk = crate::devices::host::find_disk(&boot.modules, name)
            .unwrap_or_else(|| fail(format_args!("no disk module `disk-{name}` for `disk={name}`")));
        // SAFETY: this host runs one guest for its whole life; nothing else takes the module.
        guest.attach_disk(unsafe { crate::devices::host::disk_bytes(disk) });
    }
    let sectors = guest.disk().map_or(0, |d| (d.len() / SECTOR) as u64);

    let mut node_config = NodeConfig::new(role, pages);
    node_config.host_id = config.host_id.unwrap_or(config.repl_addr.map_or(0, |a| u64::from(u32::from(a.addr))));
    node_config.miss_limit = config.miss_limit;
    node_config.witness = if config.witness.is_some() { WitnessMode::External } else { WitnessMode::None };
    node_config.witness_retry_ms = 200;
    node_config.guest_id = guest_id(boot);
    node_config.checkpoint_ms = config.checkpoint_ms.into();
    node_config.compare_timeout_ms = config.compare_timeout_ms.into();
    node_config.heartbeat_ms = config.heartbeat_ms.into();
    node_config.peer_timeout_ms = (u64::from(config.heartbeat_ms) * 20).max(5_000);
    node_config.ack_timeout_ms = 60_000;
    node_config.verify = config.checkpoint_verify;
    node_config.comparator.max_held_frames = config.queue_limit as usize;
    node_config.output_buffering = config.mode == crate::config::Mode::Buffer;
    let now = Tick(time::now_ms());
    let node = match role {
        NodeRole::Primary => ColoNode::primary(node_config, now),
        NodeRole::Secondary => ColoNode::secondary(node_config, MemDisk::new(sectors), now),
    };
    let node: Shared = Rc::new(RefCell::new(node));
    let written = Rc::new(RefCell::new(Vec::new()));
    let promoted = Rc::new(core::cell::Cell::new(false));
    if sectors > 0 {
        let secondary = role == NodeRole::Secondary;
        guest.set_block_hook(Box::new(DiskHook {
            node: node.clone(),
            secondary,
            promoted: promoted.clone(),
            written: written.clone(),
        }));
    }
    let witness = config.witness.and_then(|addr| {
        let authority = crate::net::mgmt::format(format_args!("{addr}"));
        let id = crate::net::mgmt::format(format_args!("{}", node_config.host_id));
        match crate::witness::etcd::EtcdClient::new(&authority, &config.cluster, &id) {
            Ok(client) => Some(Witness {
                addr,
                client,
                job: None,
                request: Vec::new(),
                sent: 0,
                reader: crate::witness::http::ResponseReader::new(),
                lease: None,
                next_keepalive: 0,
                holder_put: 0,
            }),
            Err(e) => fail(format_args!("witness: {e:?}")),
        }
    });
    match config.witness {
        Some(addr) => log::info!(
            "node: witness etcd at {addr}, cluster `{}`, host id {}; heartbeat_ms={} miss_limit={}",
            config.cluster,
            node_config.host_id,
            config.heartbeat_ms,
            config.miss_limit
        ),
        None => log::info!(
            "node: witness=none: no automatic takeover (only `ctl failover` promotes); heartbeat_ms={} miss_limit={}",
            config.heartbeat_ms,
            config.miss_limit
        ),
    }
    let fo = FoState {
        witness,
        serving,
        guest_ip,
        mac,
        promoted,
        peer: config.peer_addr,
        repl_addr: config.repl_addr,
        fenced: false,
        last_heard_ms: 0,
        first_output_due: false,
        stall_ms: None,
        witness_text: config.witness.map_or_else(|| "none".into(), |a| crate::net::mgmt::format(format_args!("{a}"))),
        next_publish_ms: 0,
    };
    let committed = match role {
        // SAFETY: the guest has not run yet and is alive; the copy is taken before it runs.
        NodeRole::Secondary => Some(
            CommittedRam::new(unsafe { ram_slice(guest.ram) }).unwrap_or_else(|e| fail(format_args!("secondary: {e}"))),
        ),
        NodeRole::Primary => None,
    };
    log::info!(
        "node: {:?} host running guest `{}` ({} MiB, dirty log {method:?}); mode={:?} checkpoint_ms={} compare_timeout_ms={} verify={}",
        config.role,
        guest.name,
        guest.ram.len() >> 20,
        config.mode,
        config.checkpoint_ms,
        config.compare_timeout_ms,
        if config.checkpoint_verify { "on" } else { "off" }
    );
    let mut host = Host {
        role: config.role,
        guest,
        node,
        written,
        port,
        client_in,
        guest_out,
        // The secondary's SVM waits for its first full sync (the engine says so too).
        paused: role == NodeRole::Secondary,
        conn: None,
        committed,
        restored: Vec::new(),
        incoming: Incoming::default(),
        buf: vec![0; IO_CHUNK],
        last_state: LinkState::Down,
        last_committed: 0,
        digests: PageDigests::new(pages),
        last_digest: None,
        seen_errors: [0; 8],
        seen_protocol: 0,
        captures: 0,
        applies: 0,
        published_at: 0,
        published: (LinkState::Down, u64::MAX),
        fo,
    };
    host.actions(now);
    loop {
        host.turn();
    }
}

// ---------------------------------------------------------------------------------------------
// Failover (issue 12): the witness client, promotion, fencing, status.

/// How long one witness request may take (connect, send, the whole reply). Past it the claim
/// is answered `Unreachable`; the engine decides when to claim again.
const WITNESS_DEADLINE_MS: u64 = 1_000;
/// The holder key's lease, and how often it is kept alive.
const HOLDER_TTL_S: i64 = 10;
const HOLDER_KEEPALIVE_MS: u64 = 3_000;

/// What the witness request in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// A generation claim (answered to the engine).
    Claim(u64),
    /// Operators' holder key: a lease grant, its keep-alive, the put.
    LeaseGrant,
    KeepAlive(i64),
    Holder(u64, i64),
}

/// One etcd request at a time over a fresh TCP connection, with a deadline.
struct Witness {
    addr: core::net::SocketAddrV4,
    client: crate::witness::etcd::EtcdClient,
    job: Option<(Job, u64)>,
    request: Vec<u8>,
    sent: usize,
    reader: crate::witness::http::ResponseReader,
    lease: Option<i64>,
    next_keepalive: u64,
    /// The generation the holder key was last put for.
    holder_put: u64,
}

/// The failover part of a host.
struct FoState {
    witness: Option<Witness>,
    /// Whether this host serves clients (shared with the client port).
    serving: Arc<core::sync::atomic::AtomicBool>,
    guest_ip: Arc<core::sync::atomic::AtomicU32>,
    mac: [u8; 6],
    promoted: Rc<core::cell::Cell<bool>>,
    peer: Option<core::net::SocketAddrV4>,
    repl_addr: Option<crate::config::Ipv4Cidr>,
    fenced: bool,
    /// The last time link bytes arrived (for the stall measured here).
    last_heard_ms: u64,
    /// A takeover happened; the first output released afterwards ends the stall.
    first_output_due: bool,
    stall_ms: Option<u64>,
    witness_text: alloc::string::String,
    next_publish_ms: u64,
}

// Status, `ctl failover` and the holder key are looked at every `PUBLISH_MS` too.

impl FoState {
    /// Starts a claim for `generation` (a request in flight for anything else is dropped).
    fn witness_claim(&mut self, generation: u64, now: Tick) {
        let Some(w) = self.witness.as_mut() else {
            log::warn!("node: a witness claim without witness=");
            return;
        };
        if w.job.is_some_and(|(j, _)| j == Job::Claim(generation)) {
            return; // the same claim is still out: its answer comes (or its deadline)
        }
        log::info!("node: claiming generation {generation} at the witness {}", w.addr);
        let request = w.client.claim_request(generation);
        w.start(Job::Claim(generation), request, now.0);
    }
}

impl Witness {
    fn start(&mut self, job: Job, request: Vec<u8>, now_ms: u64) {
        crate::net::witness_abort();
        self.job = Some((job, now_ms + WITNESS_DEADLINE_MS));
        self.request = request;
        self.sent = 0;
        self.reader = crate::witness::http::ResponseReader::new();
        if !crate::net::witness_connect(self.addr) {
            log::warn!("node: witness {}: connect refused locally", self.addr);
        }
    }

    /// Moves the request on; `Some((job, reply))` when it ended (a reply, or `None` for no
    /// usable answer: closed, reset, deadline, malformed).
    fn poll(&mut self, now_ms: u64) -> Option<(Job, Option<crate::witness::http::Response>)> {
        use crate::net::WitnessSocket;
        let (job, deadline) = self.job?;
        let state = crate::net::witness_state();
        if state == WitnessSocket::Open && self.sent < self.request.len() {
            self.sent += crate::net::witness_send(&self.request[self.sent..]);
        }
        let mut buf = [0u8; 2048];
        loop {
            let n = crate::net::witness_recv(&mut buf);
            if n == 0 {
                break;
            }
            match self.reader.push(&buf[..n]) {
                Ok(Some(response)) => return self.end(Some(response)),
                Ok(None) => {}
                Err(e) => {
                    log::warn!("node: witness reply to {job:?}: {e:?}");
                    return self.end(None);
                }
            }
        }
        if state == WitnessSocket::PeerClosed {
            let r = self.reader.finish().ok();
            return self.end(r);
        }
        if state == WitnessSocket::Closed && self.sent > 0 {
            return self.end(None);
        }
        if now_ms >= deadline {
            log::warn!("node: witness {}: no answer to {job:?} within {WITNESS_DEADLINE_MS} ms", self.addr);
            return self.end(None);
        }
        None
    }

    fn end(
        &mut self,
        reply: Option<crate::witness::http::Response>,
    ) -> Option<(Job, Option<crate::witness::http::Response>)> {
        crate::net::witness_abort();
        let (job, _) = self.job.take()?;
        Some((job, reply))
    }
}

/// The IPv4 address a client frame is addressed to (ARP target or IPv4 destination).
fn guest_ip_in(frame: &[u8]) -> Option<core::net::Ipv4Addr> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = match ethertype {
        0x0806 if frame.len() >= 42 => [frame[38], frame[39], frame[40], frame[41]],
        0x0800 if frame.len() >= 34 => [frame[30], frame[31], frame[32], frame[33]],
        _ => return None,
    };
    let ip = core::net::Ipv4Addr::from(ip);
    (!ip.is_broadcast() && !ip.is_multicast() && !ip.is_unspecified()).then_some(ip)
}

/// A gratuitous ARP request from `mac` announcing `ip`.
fn gratuitous_arp(mac: [u8; 6], ip: core::net::Ipv4Addr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[38..42].copy_from_slice(&ip.octets());
    f
}

impl Host {
    /// The guest's disk as bytes: the module's (primary) or the engine's merged disk (promoted).
    fn disk_raw(&self) -> (*const u8, usize) {
        if self.fo.promoted.get() {
            let node = self.node.borrow();
            return node.disk().map_or((core::ptr::null(), 0), |d| (d.as_bytes().as_ptr(), d.as_bytes().len()));
        }
        self.guest.disk().map_or((core::ptr::null(), 0), |d| (d.as_ptr(), d.len()))
    }

    /// Witness replies, `ctl failover`, the holder key, status.
    fn fo_poll(&mut self, now: Tick) {
        if let Some(w) = self.fo.witness.as_mut() {
            if let Some((job, reply)) = w.poll(now.0) {
                self.fo_answer(now, job, reply);
            }
        }
        let requested =
            now.0 >= self.fo.next_publish_ms && crate::stats::with(|s| core::mem::take(&mut s.failover_requested));
        if requested {
            log::info!("node: ctl failover");
            self.fo.first_output_due = true;
            self.node.borrow_mut().handle(now, Event::Command(crate::colo::node::NodeCommand::Failover));
            self.actions(now);
        }
        if now.0 >= self.fo.next_publish_ms {
            self.fo.next_publish_ms = now.0 + PUBLISH_MS;
            self.fo_holder(now);
            self.fo_publish(now);
        }
    }

    fn fo_answer(&mut self, now: Tick, job: Job, reply: Option<crate::witness::http::Response>) {
        use crate::colo::node::ClaimOutcome as Outcome;
        use crate::witness::etcd::ClaimOutcome as Etcd;
        let Some(w) = self.fo.witness.as_mut() else { return };
        match job {
            Job::Claim(generation) => {
                let outcome = match reply.as_ref().map(|r| w.client.parse_claim(r)) {
                    None => Outcome::Unreachable,
                    Some(Ok(Etcd::Granted)) => Outcome::Granted,
                    Some(Ok(Etcd::Denied { holder })) => Outcome::Denied { holder: holder.parse().unwrap_or(u64::MAX) },
                    Some(Err(e)) => {
                        log::warn!("node: witness claim {generation}: {e:?}");
                        Outcome::Error
                    }
                };
                log::info!("node: witness answered claim {generation}: {outcome:?}");
                if outcome == Outcome::Granted {
                    // A takeover (promotion or secondary loss): the stall ends with the next
                    // output released.
                    self.fo.first_output_due = true;
                }
                self.node.borrow_mut().handle(now, Event::ClaimResult { generation, outcome });
                self.actions(now);
            }
            Job::LeaseGrant => match reply.as_ref().map(|r| w.client.parse_lease_grant(r)) {
                Some(Ok(lease)) => {
                    w.lease = Some(lease.id);
                    w.next_keepalive = now.0;
                }
                other => log::debug!("node: holder lease: {other:?}"),
            },
            Job::KeepAlive(_) => {
                if !matches!(reply.as_ref().map(|r| w.client.parse_keepalive(r)), Some(Ok(ttl)) if ttl > 0) {
                    w.lease = None; // expired or unknown: a new one
                }
            }
            Job::Holder(generation, _) => {
                if matches!(reply.as_ref().map(|r| w.client.parse_put(r)), Some(Ok(()))) {
                    w.holder_put = generation;
                }
            }
        }
    }

    /// The serving host keeps `colo/<cluster>/holder` under a lease, for operators. Claims go
    /// first: nothing here starts while a request is out.
    fn fo_holder(&mut self, now: Tick) {
        let (serving, generation) = {
            let node = self.node.borrow();
            let st = node.status();
            (st.role == NodeRole::Primary && st.fenced.is_none(), st.generation)
        };
        let Some(w) = self.fo.witness.as_mut() else { return };
        if !serving || w.job.is_some() {
            return;
        }
        match w.lease {
            None if now.0 >= w.next_keepalive => {
                w.next_keepalive = now.0 + HOLDER_KEEPALIVE_MS;
                let r = w.client.lease_grant_request(HOLDER_TTL_S);
                w.start(Job::LeaseGrant, r, now.0);
            }
            Some(lease) if w.holder_put != generation => {
                let r = w.client.holder_request(generation, lease);
                w.start(Job::Holder(generation, lease), r, now.0);
            }
            Some(lease) if now.0 >= w.next_keepalive => {
                w.next_keepalive = now.0 + HOLDER_KEEPALIVE_MS;
                let r = w.client.keepalive_request(lease);
                w.start(Job::KeepAlive(lease), r, now.0);
            }
            _ => {}
        }
    }

    /// `Action::Promote`: this host serves now.
    fn fo_promote(&mut self) {
        log::warn!("node: PROMOTED: this host serves the guest's clients now");
        self.fo.promoted.set(true);
        self.fo.serving.store(true, core::sync::atomic::Ordering::Relaxed);
        self.fo.first_output_due = true;
        self.role = Role::Primary;
        if let (Some(peer), Some(addr)) = (self.fo.peer, self.fo.repl_addr) {
            self.port.become_primary(peer, addr);
        }
        self.conn = None;
        // The committed copy of the SVM's RAM is a secondary's: a primary has none.
        self.committed = None;
        let _ = snapshot::take_dirty(&mut self.guest);
        self.written.borrow_mut().clear();
    }

    /// `Action::AnnounceService`: a gratuitous ARP from the guest's MAC and IP.
    fn fo_announce(&mut self) {
        let ip = core::net::Ipv4Addr::from(self.fo.guest_ip.load(core::sync::atomic::Ordering::Relaxed));
        if ip.is_unspecified() {
            log::warn!("node: no service address learnt yet; no gratuitous ARP");
            return;
        }
        let frame = gratuitous_arp(self.fo.mac, ip);
        for _ in 0..2 {
            let _ = crate::net::send_from_guest(&frame);
        }
        log::info!("node: gratuitous ARP for {ip} from the guest's MAC");
    }

    /// `Action::Fence`: the VM stops for good and nothing with the guest's MAC leaves.
    fn fo_fence(&mut self) {
        self.fo.fenced = true;
        self.paused = true;
        self.fo.serving.store(false, core::sync::atomic::Ordering::Relaxed);
        crate::net::fence_mac(self.fo.mac);
        let why = self.node.borrow().status().fenced;
        log::warn!("node: FENCED ({why:?}): the guest is stopped and no frame with its MAC leaves this host");
    }

    /// The first output released after a takeover: the stall measured at this hypervisor.
    fn fo_first_output(&mut self) {
        self.fo.first_output_due = false;
        if self.fo.last_heard_ms > 0 {
            let stall = time::now_ms().saturating_sub(self.fo.last_heard_ms);
            self.fo.stall_ms = Some(stall);
            log::info!("node: takeover stall {stall} ms (peer last heard to first output)");
        }
    }

    /// Failover state into the stats registry (status and metrics).
    fn fo_publish(&mut self, now: Tick) {
        use crate::colo::node::{ClaimOutcome, FenceReason, PeerState};
        let node = self.node.borrow();
        let st = node.status();
        let info = crate::stats::FailoverInfo {
            generation: st.generation,
            role: crate::net::mgmt::format(format_args!("{:?}", st.failover_role)).to_lowercase(),
            protected: st.protected,
            peer: match st.peer {
                PeerState::None => "none",
                PeerState::Alive => "alive",
                PeerState::Lost => "lost",
            },
            witness: self.fo.witness_text.clone(),
            last_claim: st.witness.last_claim,
            last_result: st.witness.last_result.map(|r| match r {
                ClaimOutcome::Granted => "granted",
                ClaimOutcome::Denied { .. } => "denied",
                ClaimOutcome::Unreachable => "unreachable",
                ClaimOutcome::Error => "error",
            }),
            last_latency_ms: st.witness.last_latency_ms,
            pending: st.witness.pending,
            failovers: st.stats.failovers,
            claims: [st.stats.claims, st.stats.claims_granted, st.stats.claims_denied, st.stats.claims_failed],
            last_promotion_ms: st.last_promotion.map(|t| t.0),
            stall_ms: self.fo.stall_ms,
            fenced: st.fenced.map(|f| match f {
                FenceReason::WitnessDenied { generation, holder } => {
                    crate::net::mgmt::format(format_args!("the witness gave generation {generation} to host {holder}"))
                }
                FenceReason::NewerGeneration { generation } => {
                    crate::net::mgmt::format(format_args!("the peer serves in the newer generation {generation}"))
                }
            }),
        };
        let _ = now;
        crate::stats::with(|s| s.failover = Some(info));
    }
}
