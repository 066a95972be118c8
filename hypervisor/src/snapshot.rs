//! Guest snapshots on one host: what every checkpoint is made of.
//!
//! - [`pause_and_copy`]: with the guest paused, capture its vCPU and device state and copy its
//!   pages (all of them, or the dirty ones) into a [`LocalCopy`]. This is the whole PVM pause of a
//!   pipelined checkpoint: the guest may resume as soon as it returns.
//! - [`encode`]: the local copy in the checkpoint stream format (`colo::checkpoint`).
//! - [`restore`]: decode and verify a whole stream, check every state blob, then write memory and
//!   load the vCPU (the vCPU reset): all or nothing.
//!
//! Device state: each device saves its own blob. Today's devices are the clock (ticks) and the
//! console (an unfinished line).
//!
//! The self-test scenarios (`scenario=` on a guest's module line) drive these from real guests:
//! `dirty-count`, `snapshot-restore` and `snapshot-bench`.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use zerocopy::IntoBytes;

use crate::backend::Backend;
use crate::colo::checkpoint::{
    ApplyError, CheckpointDecoder, CheckpointEncoder, EncodeError, Feed, HeaderInfo, PageStaging, StreamError,
    StreamLimits,
};
use crate::guest::GuestMemory;
use crate::host::time;
use crate::kernel::BootModule;
use crate::memory::{DirtyLog, FrameAllocator};
use crate::runner::{module_arg, Guest, GuestClock};
use crate::vcpu::state::VCPU_STATE_TAG;
use crate::vcpu::{DirtyLogMethod, StateError, VcpuState, VmExit};

const PAGE: usize = 4096;
/// Device id and layout tag of the clock's state (8 bytes: ticks, little-endian).
pub const CLOCK_DEVICE: u64 = 1;
const CLOCK_TAG: u32 = 0x434C_0001;
/// Device id and layout tag of the console's state (the unfinished line's bytes).
pub const CONSOLE_DEVICE: u64 = 2;
const CONSOLE_TAG: u32 = 0x434F_0001;
const CONSOLE_MAX: usize = 200;

/// Why a snapshot could not be taken or restored.
#[derive(Debug)]
pub enum SnapshotError {
    /// The vCPU refused to save or load state.
    State(StateError),
    /// Encoding failed.
    Encode(EncodeError),
    /// The stream is malformed.
    Stream(StreamError),
    /// The stream ended before its commit record.
    Incomplete {
        /// Bytes received.
        bytes: usize,
    },
    /// The stream carries no vCPU state (or more than one).
    VcpuCount {
        /// How many it carries.
        found: usize,
    },
    /// A device blob is malformed.
    Device {
        /// The device id.
        id: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// Writing memory failed.
    Apply(ApplyError),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::State(e) => write!(f, "{e}"),
            Self::Encode(e) => write!(f, "encoding: {e:?}"),
            Self::Stream(e) => write!(f, "{e}"),
            Self::Incomplete { bytes } => write!(f, "stream ended after {bytes} bytes, before its commit record"),
            Self::VcpuCount { found } => write!(f, "stream carries {found} vCPU states, expected 1"),
            Self::Device { id, what } => write!(f, "device {id}: {what}"),
            Self::Apply(e) => write!(f, "{e:?}"),
        }
    }
}

impl From<StateError> for SnapshotError {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}

/// Which pages a capture copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    /// Every page of guest RAM.
    All,
    /// The pages the dirty log holds (hardware log drained first).
    Dirty,
}

/// A paused guest, copied out.
#[derive(Debug)]
pub struct LocalCopy {
    /// The vCPU.
    pub state: VcpuState,
    /// The clock device.
    pub clock_ticks: u64,
    /// The console device.
    pub console: Vec<u8>,
    /// Copied page numbers, ascending.
    pub gfns: Vec<u64>,
    /// Their contents, `PAGE` bytes each, in `gfns` order.
    pub data: Vec<u8>,
}

/// Where the pause went, in host TSC cycles.
#[derive(Clone, Copy, Debug, Default)]
pub struct PauseTimings {
    /// vCPU and device state capture, plus draining the dirty log.
    pub capture_cycles: u64,
    /// Copying the pages.
    pub copy_cycles: u64,
}

/// Captures a paused guest. The guest must not be running (it never is between `step`s).
pub fn pause_and_copy(guest: &mut Guest, pages: Pages) -> Result<(LocalCopy, PauseTimings), SnapshotError> {
    let t0 = time::rdtsc();
    let mut state = guest.vcpu.save_state()?;
    state.handler_msrs = guest.handler.msrs();
    let clock_ticks = guest.clock.ticks();
    let console = guest.handler.console_pending().to_vec();
    let frames = guest.ram.len() / PAGE as u64;
    let gfns: Vec<u64> = match pages {
        Pages::All => (0..frames).collect(),
        Pages::Dirty => {
            let log = guest.dirty.get_or_insert_with(|| DirtyLog::new(frames));
            guest.vcpu.collect_dirty(log)?;
            log.take()
        }
    };
    let t1 = time::rdtsc();
    let mut data = Vec::with_capacity(gfns.len() * PAGE);
    let mem = guest.memory();
    for &gfn in &gfns {
        // In range by construction: gfns come from 0..frames or from a log sized to frames.
        data.extend_from_slice(mem.slice(gfn * PAGE as u64, PAGE as u64).unwrap_or(&[0; PAGE]));
    }
    let t2 = time::rdtsc();
    let copy = LocalCopy { state, clock_ticks, console, gfns, data };
    Ok((copy, PauseTimings { capture_cycles: t1 - t0, copy_cycles: t2 - t1 }))
}

/// Stream limits for a snapshot of a guest of `frames` pages: one vCPU, two devices (clock,
/// console).
fn limits(frames: u64) -> StreamLimits {
    StreamLimits::for_guest(frames, 1, 2)
}

/// The local copy as a checkpoint stream for a guest of `frames` pages.
pub fn encode(copy: &LocalCopy, epoch: u64, frames: u64) -> Result<Vec<u8>, SnapshotError> {
    let info = HeaderInfo {
        epoch,
        page_size: PAGE as u32,
        page_count: copy.gfns.len() as u32,
        vcpu_count: 1,
        device_count: 2,
    };
    let mut encoder = CheckpointEncoder::new(Vec::new(), info, limits(frames)).map_err(SnapshotError::Encode)?;
    let mut i = 0;
    while i < copy.gfns.len() {
        let mut run = 1;
        while i + run < copy.gfns.len() && copy.gfns[i + run] == copy.gfns[i] + run as u64 && run < 4096 {
            run += 1;
        }
        encoder.begin_run(copy.gfns[i], run as u32).map_err(SnapshotError::Encode)?;
        for page in copy.data[i * PAGE..(i + run) * PAGE].chunks_exact(PAGE) {
            encoder.page(page, None).map_err(SnapshotError::Encode)?;
        }
        i += run;
    }
    encoder.vcpu_state(0, VCPU_STATE_TAG, copy.state.as_bytes()).map_err(SnapshotError::Encode)?;
    encoder.device_state(CLOCK_DEVICE, CLOCK_TAG, &copy.clock_ticks.to_le_bytes()).map_err(SnapshotError::Encode)?;
    encoder.device_state(CONSOLE_DEVICE, CONSOLE_TAG, &copy.console).map_err(SnapshotError::Encode)?;
    let (bytes, _) = encoder.finish().map_err(SnapshotError::Encode)?;
    Ok(bytes)
}

/// What a restore did.
#[derive(Clone, Copy, Debug)]
pub struct RestoreReport {
    /// Pages written.
    pub pages: u64,
    /// The restored guest clock.
    pub clock_ticks: u64,
}

/// Restores a whole snapshot stream of checkpoint `epoch` into `guest`: nothing is changed
/// unless everything checks out.
pub fn restore(guest: &mut Guest, stream: &[u8], epoch: u64) -> Result<RestoreReport, SnapshotError> {
    let frames = guest.ram.len() / PAGE as u64;
    // The stream is already in memory: its pages cannot need more staging than its own length.
    let staged_bytes = stream.len().min(frames as usize * PAGE);
    let staged_pages = (stream.len() as u64).min(frames) as u32;
    let staging = PageStaging::new(alloc::vec![0u8; staged_bytes], staged_pages);
    let mut decoder = CheckpointDecoder::new(limits(frames), staging).expecting_epoch(epoch);
    let checkpoint = match decoder.feed(stream).map_err(SnapshotError::Stream)? {
        Feed::Complete { checkpoint, .. } => checkpoint,
        Feed::NeedMore => return Err(SnapshotError::Incomplete { bytes: stream.len() }),
    };
    // Every blob is checked before the first byte of guest state changes.
    let vcpus: Vec<_> = checkpoint.vcpu_states().collect();
    if vcpus.len() != 1 {
        return Err(SnapshotError::VcpuCount { found: vcpus.len() });
    }
    let state = VcpuState::parse(vcpus[0].tag, vcpus[0].data)?;
    let mut clock_ticks = None;
    let mut console = None;
    for blob in checkpoint.device_states() {
        match (blob.id, blob.tag) {
            (CLOCK_DEVICE, CLOCK_TAG) => {
                let bytes: [u8; 8] = blob
                    .data
                    .try_into()
                    .map_err(|_| SnapshotError::Device { id: blob.id, what: "clock state is not 8 bytes" })?;
                clock_ticks = Some(u64::from_le_bytes(bytes));
            }
            (CONSOLE_DEVICE, CONSOLE_TAG) if blob.data.len() <= CONSOLE_MAX => console = Some(blob.data.to_vec()),
            (CONSOLE_DEVICE, CONSOLE_TAG) => {
                return Err(SnapshotError::Device { id: blob.id, what: "console line longer than 200 bytes" })
            }
            (id, _) => return Err(SnapshotError::Device { id, what: "unknown device or layout tag" }),
        }
    }
    let clock_ticks = clock_ticks.ok_or(SnapshotError::Device { id: CLOCK_DEVICE, what: "missing" })?;
    let console = console.ok_or(SnapshotError::Device { id: CONSOLE_DEVICE, what: "missing" })?;
    guest.vcpu.check_state(&state)?;
    let report = checkpoint.apply_to(&mut guest.memory(), epoch).map_err(SnapshotError::Apply)?;
    guest.vcpu.load_state(&state)?;
    guest.handler.set_msrs(state.handler_msrs);
    guest.handler.set_console_pending(&console);
    guest.clock = GuestClock::starting_at(clock_ticks);
    if let Some(log) = guest.dirty.as_mut() {
        log.clear();
    }
    Ok(RestoreReport { pages: report.pages, clock_ticks })
}

/// Runs the self-test scenario a guest's module line names. Returns false for an unknown name.
pub fn run_scenario(
    scenario: &str,
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    guest_mem: u64,
) -> bool {
    let result = match scenario {
        "dirty-count" | "snapshot-bench" => dirty_between_marks(scenario, backend, frames, module, guest_mem),
        "snapshot-restore" => snapshot_restore(backend, frames, module, guest_mem),
        _ => return false,
    };
    if let Err(e) = result {
        log::error!("scenario {scenario}: {e}");
    }
    true
}

fn create(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    mem: u64,
) -> Result<Guest, String> {
    Guest::create(backend, frames, module, mem).map_err(|e| alloc::format!("guest not started: {e}"))
}

/// `dirty-count`: the pages dirtied between test marks 1 and 2, counted by the method named in
/// `dirty_log=pml|ad`. `snapshot-bench` also times the PVM pause for those pages against a plain
/// copy of the same number of bytes.
fn dirty_between_marks(
    scenario: &str,
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    guest_mem: u64,
) -> Result<(), String> {
    let method = match module_arg(module.cmdline, "dirty_log").unwrap_or("pml") {
        "pml" => DirtyLogMethod::Pml,
        "ad" => DirtyLogMethod::AccessedDirty,
        other => return Err(alloc::format!("bad value `{other}` for dirty_log; accepted: pml|ad")),
    };
    let mut guest = create(backend, frames, module, guest_mem)?;
    let frames_in_guest = guest.ram.len() / PAGE as u64;
    let result = (|| {
        guest.vcpu.enable_dirty_log(method, frames).map_err(|e| alloc::format!("{e}"))?;
        guest.dirty = Some(DirtyLog::new(frames_in_guest));
        let end = loop {
            if let Some(end) = guest.step() {
                break end;
            }
            for mark in guest.handler.take_marks() {
                match mark {
                    1 => {
                        let log = guest.dirty.as_mut().expect("dirty log on");
                        guest.vcpu.collect_dirty(log).map_err(|e| alloc::format!("{e}"))?;
                        log.clear();
                    }
                    2 if scenario == "snapshot-bench" => bench_pause(&mut guest, method)?,
                    2 => {
                        let log = guest.dirty.as_mut().expect("dirty log on");
                        guest.vcpu.collect_dirty(log).map_err(|e| alloc::format!("{e}"))?;
                        let pages = log.take();
                        // With EPT/NPT A/D flags on, the CPU's walks of the guest's own page tables
                        // count as writes to them (SDM Vol. 3C §29.3.5), and clearing dirty flags
                        // needs a TLB flush that makes the guest walk again: those pages are
                        // reported dirty too, and a checkpoint carries them. Name them apart.
                        let tables = guest_shim::abi::GUEST_PAGE_TABLES >> 12..(guest_shim::abi::GUEST_BOOT_INFO >> 12);
                        let walked = pages.iter().filter(|g| tables.contains(g)).count();
                        let first: Vec<u64> = pages.iter().filter(|g| !tables.contains(g)).take(3).copied().collect();
                        log::info!(
                            "dirty-count: {} pages dirty between marks ({method:?}): {} written pages (first gfns \
                             {first:x?}) + {walked} guest page-table pages",
                            pages.len(),
                            pages.len() - walked
                        );
                    }
                    _ => {}
                }
            }
        };
        guest.report(&end);
        Ok(())
    })();
    guest.destroy(frames);
    result
}

/// One PVM pause for the pages dirtied between the marks, split into capture and copy, next to a
/// plain copy of the same bytes in the same run.
fn bench_pause(guest: &mut Guest, method: DirtyLogMethod) -> Result<(), String> {
    let (copy, t) = pause_and_copy(guest, Pages::Dirty).map_err(|e| alloc::format!("{e}"))?;
    let bytes = copy.data.len();
    let mem = guest.memory();
    let src = mem.slice(4 << 20, bytes as u64).map_err(|e| alloc::format!("{e}"))?;
    let mut dst: Vec<u8> = Vec::with_capacity(bytes);
    let t0 = time::rdtsc();
    dst.extend_from_slice(src);
    let memcpy_cycles = time::rdtsc() - t0;
    core::hint::black_box(&dst);
    let pause = t.capture_cycles + t.copy_cycles;
    log::info!(
        "snapshot-bench: method={method:?} dirty_pages={} capture_cycles={} copy_cycles={} pause_cycles={pause} \
         memcpy_cycles={memcpy_cycles} pause_per_memcpy_x100={}",
        copy.gfns.len(),
        t.capture_cycles,
        t.copy_cycles,
        pause * 100 / memcpy_cycles.max(1)
    );
    Ok(())
}

/// `snapshot-restore`: snapshot guest A at its `snapshot_after=K`-th preemption-timer exit, let A
/// finish, restore the snapshot into a fresh guest B and back into A, and compare what each
/// printed after the snapshot point; then show a corrupted and a truncated snapshot refused with
/// the target untouched.
/// Epoch of the one snapshot the snapshot-restore scenario takes.
const SNAPSHOT_EPOCH: u64 = 1;

fn snapshot_restore(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    guest_mem: u64,
) -> Result<(), String> {
    let after: u64 = module_arg(module.cmdline, "snapshot_after").and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut a = create(backend, frames, module, guest_mem)?;
    let mut b = match create(backend, frames, module, guest_mem) {
        Ok(b) => b,
        Err(e) => {
            a.destroy(frames);
            return Err(e);
        }
    };
    let result = (|| {
        let frames_in_guest = a.ram.len() / PAGE as u64;
        let mut preemptions = 0;
        let mut snapshot = None;
        let end_a = loop {
            if let Some(end) = a.step() {
                break end;
            }
            if a.last_exit == Some(VmExit::PreemptionTimer) {
                preemptions += 1;
                if preemptions == after && snapshot.is_none() {
                    let rip = a.vcpu.rip();
                    let (copy, t) = pause_and_copy(&mut a, Pages::All).map_err(|e| alloc::format!("{e}"))?;
                    let stream = encode(&copy, SNAPSHOT_EPOCH, frames_in_guest).map_err(|e| alloc::format!("{e}"))?;
                    log::info!(
                        "snapshot-restore: snapshot of `{}` at preemption {after}, rip {rip:#x}: {} pages, {} bytes \
                         encoded (capture {} + copy {} TSC cycles)",
                        a.name,
                        copy.gfns.len(),
                        stream.len(),
                        t.capture_cycles,
                        t.copy_cycles
                    );
                    snapshot = Some(stream);
                    a.console_capture = Some(Vec::new());
                }
            }
        };
        let snapshot = snapshot.ok_or(alloc::format!("the guest ended before preemption {after}"))?;
        let original = a.console_capture.take().unwrap_or_default();
        log::info!("snapshot-restore: original run {end_a}; {} lines after the snapshot", original.len());

        for (label, target) in [("a second guest", &mut b), ("the same guest", &mut a)] {
            let report =
                restore(target, &snapshot, SNAPSHOT_EPOCH).map_err(|e| alloc::format!("restore into {label}: {e}"))?;
            target.console_capture = Some(Vec::new());
            let end = target.run_to_end();
            let replay = target.console_capture.take().unwrap_or_default();
            let first_difference = original.iter().zip(&replay).position(|(x, y)| x != y);
            let identical = first_difference.is_none() && original.len() == replay.len();
            log::info!(
                "snapshot-restore: restored into {label} ({} pages, clock {}): {end}; {} lines; identical to the \
                 original: {}",
                report.pages,
                report.clock_ticks,
                replay.len(),
                if identical { "yes" } else { "NO" }
            );
            if let Some(i) = first_difference {
                log::error!("snapshot-restore: first difference at line {i}: `{}` vs `{}`", original[i], replay[i]);
            }
        }

        let before = ram_checksum(&mut b);
        let mut corrupted = snapshot.clone();
        let middle = corrupted.len() / 2;
        corrupted[middle] ^= 0x40;
        match restore(&mut b, &corrupted, SNAPSHOT_EPOCH) {
            Err(e) => log::info!(
                "snapshot-restore: corrupted snapshot refused: {e}; target memory unchanged: {}",
                if ram_checksum(&mut b) == before { "yes" } else { "NO" }
            ),
            Ok(_) => log::error!("snapshot-restore: a corrupted snapshot was applied"),
        }
        match restore(&mut b, &snapshot[..snapshot.len() - 100], SNAPSHOT_EPOCH) {
            Err(e) => log::info!(
                "snapshot-restore: truncated snapshot refused: {e}; target memory unchanged: {}",
                if ram_checksum(&mut b) == before { "yes" } else { "NO" }
            ),
            Ok(_) => log::error!("snapshot-restore: a truncated snapshot was applied"),
        }
        Ok(())
    })();
    a.destroy(frames);
    b.destroy(frames);
    result
}

/// CRC-32C of a guest's whole RAM.
fn ram_checksum(guest: &mut Guest) -> u32 {
    let len = guest.ram.len();
    // The whole range is RAM by construction.
    guest.memory().slice(0, len).map_or(0, crate::colo::checkpoint::Crc32c::checksum)
}
