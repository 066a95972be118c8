//! Guest snapshots and checkpoints on one host: what every checkpoint is made of. This is the
//! guest-side interface the two-host driver uses.
//!
//! - [`pause_and_copy`]: with the guest paused, capture its vCPU and every device's state and copy
//!   its pages (all of them, or the dirty ones) into a [`LocalCopy`]. This is the whole PVM pause
//!   of a pipelined checkpoint: the guest may resume as soon as it returns.
//! - [`encode`] / [`encode_into`]: the local copy in the checkpoint stream format
//!   (`colo::checkpoint`): page runs, the vCPU record, one DEVICE record per device blob
//!   (`devices::state`), into a `Vec` or any `ByteSink`.
//! - [`encode_full_into`]: a paused guest's whole RAM, vCPU and devices streamed straight from
//!   guest memory into a sink (the initial full sync; no copy of the guest is built).
//! - [`apply_checkpoint`]: a verified [`StagedCheckpoint`] into a live guest, all or nothing:
//!   the epoch, the vCPU state and every device blob are checked (device states against this
//!   guest: same devices, same MAC, ring geometry inside its RAM, same disk size) before the
//!   first byte of guest memory changes; then memory, vCPU reset, devices.
//! - [`apply_checkpoint_svm`]: the secondary's apply: through its committed copy of guest RAM
//!   (`guest::committed`), so the pages the SVM dirtied on its own return to the PVM's content
//!   too, and delta pages XOR against the committed content.
//! - [`restore`]: decode a whole stream and apply it.
//! - [`take_dirty`]: the pages a guest dirtied since the last call (the SVM's own dirty set,
//!   which a checkpoint must return to the PVM's content).
//!
//! Device state goes through `Guest::save_devices`/`check_devices`/`load_devices` only: this
//! module never reaches into a device. The self-test scenarios that drive these from real guests
//! live in `selftest`.

use alloc::vec::Vec;
use core::fmt;

use zerocopy::IntoBytes;

use crate::colo::checkpoint::{
    ApplyError, ByteSink, CheckpointDecoder, CheckpointEncoder, CommitSummary, EncodeError, Feed, HeaderInfo,
    PageStaging, StagedCheckpoint, StreamError, StreamLimits,
};
use crate::devices::state::{DeviceStateError, DeviceStates};
use crate::guest::committed::{pages_to_restore, CommittedError, CommittedRam};
use crate::guest::GuestMemory;
use crate::host::time;
use crate::memory::DirtyLog;
use crate::runner::Guest;
use crate::vcpu::state::VCPU_STATE_TAG;
use crate::vcpu::{StateError, VcpuState};

const PAGE: usize = 4096;

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
    /// A device blob is malformed or does not fit the target guest.
    Device(DeviceStateError),
    /// Writing memory failed.
    Apply(ApplyError),
    /// The secondary's committed copy of guest RAM does not fit this guest.
    Committed(CommittedError),
    /// The SVM has no dirty log, so its own dirty pages cannot be named.
    NoDirtyLog,
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::State(e) => write!(f, "{e}"),
            Self::Encode(e) => write!(f, "encoding: {e:?}"),
            Self::Stream(e) => write!(f, "{e}"),
            Self::Incomplete { bytes } => write!(f, "stream ended after {bytes} bytes, before its commit record"),
            Self::VcpuCount { found } => write!(f, "stream carries {found} vCPU states, expected 1"),
            Self::Device(e) => write!(f, "{e}"),
            Self::Apply(e) => write!(f, "{e}"),
            Self::Committed(e) => write!(f, "{e}"),
            Self::NoDirtyLog => write!(f, "the SVM's dirty log is off; expected it on to name the SVM's own pages"),
        }
    }
}

impl From<DeviceStateError> for SnapshotError {
    fn from(e: DeviceStateError) -> Self {
        Self::Device(e)
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
    /// Every device's state.
    pub devices: DeviceStates,
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
    let devices = guest.save_devices();
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
    let copy = LocalCopy { state, devices, gfns, data };
    Ok((copy, PauseTimings { capture_cycles: t1 - t0, copy_cycles: t2 - t1 }))
}

/// Stream limits for a checkpoint of a guest of `frames` pages: one vCPU, at most every device.
pub fn limits(frames: u64) -> StreamLimits {
    StreamLimits::for_guest(frames, 1, crate::devices::state::MAX_DEVICES)
}

/// The local copy as a checkpoint stream for a guest of `frames` pages.
pub fn encode(copy: &LocalCopy, epoch: u64, frames: u64) -> Result<Vec<u8>, SnapshotError> {
    encode_into(copy, epoch, frames, Vec::new()).map(|(bytes, _)| bytes)
}

/// The local copy as a checkpoint stream into `sink` (a socket, a ring) as it is produced.
pub fn encode_into<S: ByteSink>(
    copy: &LocalCopy,
    epoch: u64,
    frames: u64,
    sink: S,
) -> Result<(S, CommitSummary), SnapshotError> {
    let pages = copy.gfns.iter().zip(copy.data.chunks_exact(PAGE)).map(|(&gfn, page)| (gfn, page));
    write_stream(sink, epoch, frames, copy.gfns.len() as u32, pages, &copy.state, &copy.devices)
}

/// A paused guest's whole state (every page of RAM, read in place, the vCPU and every device)
/// as a checkpoint stream into `sink`: the initial full sync, never built as one buffer. The
/// guest's dirty log, if on, starts over (the stream covers every page).
pub fn encode_full_into<S: ByteSink>(
    guest: &mut Guest,
    epoch: u64,
    sink: S,
) -> Result<(S, CommitSummary), SnapshotError> {
    let mut state = guest.vcpu.save_state()?;
    state.handler_msrs = guest.handler.msrs();
    let devices = guest.save_devices();
    if let Some(log) = guest.dirty.as_mut() {
        guest.vcpu.collect_dirty(log)?;
        log.clear();
    }
    let frames = guest.ram.len() / PAGE as u64;
    let mem = guest.memory();
    let pages = (0..frames).map(|gfn| (gfn, mem.slice(gfn * PAGE as u64, PAGE as u64).unwrap_or(&[0; PAGE])));
    write_stream(sink, epoch, frames, frames as u32, pages, &state, &devices)
}

/// Page runs (consecutive frames, at most 4096 a run), the vCPU record, the device records, the
/// commit record.
fn write_stream<'p, S: ByteSink>(
    sink: S,
    epoch: u64,
    frames: u64,
    page_count: u32,
    pages: impl Iterator<Item = (u64, &'p [u8])> + Clone,
    state: &VcpuState,
    devices: &DeviceStates,
) -> Result<(S, CommitSummary), SnapshotError> {
    let blobs = devices.blobs();
    let info =
        HeaderInfo { epoch, page_size: PAGE as u32, page_count, vcpu_count: 1, device_count: blobs.len() as u32 };
    let mut encoder = CheckpointEncoder::new(sink, info, limits(frames)).map_err(SnapshotError::Encode)?;
    let mut pages = pages.peekable();
    while let Some(&(first, _)) = pages.peek() {
        // The run: consecutive frames from `first`, counted on a clone of the iterator.
        let run = pages.clone().enumerate().take_while(|&(i, (gfn, _))| gfn == first + i as u64 && i < 4096).count();
        encoder.begin_run(first, run as u32).map_err(SnapshotError::Encode)?;
        for (_, page) in pages.by_ref().take(run) {
            encoder.page(page, None).map_err(SnapshotError::Encode)?;
        }
    }
    encoder.vcpu_state(0, VCPU_STATE_TAG, state.as_bytes()).map_err(SnapshotError::Encode)?;
    for blob in &blobs {
        encoder.device_state(blob.id, blob.tag, &blob.data).map_err(SnapshotError::Encode)?;
    }
    encoder.finish().map_err(SnapshotError::Encode)
}

/// What an apply did.
#[derive(Clone, Copy, Debug)]
pub struct RestoreReport {
    /// The epoch applied.
    pub epoch: u64,
    /// Pages the checkpoint carried.
    pub pages: u64,
    /// Pages the SVM had dirtied on its own, returned to their committed content.
    pub svm_dirty_pages: u64,
    /// The restored guest clock.
    pub clock_ticks: u64,
    /// Whether the restored guest has an attached NIC.
    pub nic_attached: bool,
}

/// Applies a verified checkpoint to a live (paused) guest, all or nothing: nothing changes
/// unless the stream carries exactly one vCPU state the vCPU accepts, every device blob parses
/// and fits this guest, and (checked by `StagedCheckpoint::apply_to`, the one place of that
/// rule) the checkpoint is epoch `expected_epoch`. Then guest memory, the vCPU reset and the
/// devices; the guest's dirty log starts empty (a new epoch).
pub fn apply_checkpoint<B: AsRef<[u8]> + AsMut<[u8]>>(
    guest: &mut Guest,
    checkpoint: StagedCheckpoint<B>,
    expected_epoch: u64,
) -> Result<RestoreReport, SnapshotError> {
    let checked = check(guest, &checkpoint)?;
    let report = checkpoint.apply_to(&mut guest.memory(), expected_epoch).map_err(SnapshotError::Apply)?;
    load(guest, &checked)?;
    Ok(RestoreReport {
        epoch: report.epoch,
        pages: report.pages,
        svm_dirty_pages: 0,
        clock_ticks: checked.devices.clock.ticks,
        nic_attached: guest.devices.net.as_ref().is_some_and(|n| n.attached()),
    })
}

/// Applies a verified checkpoint to the SVM on the secondary, all or nothing, through
/// `committed` (guest RAM as of the last committed checkpoint): the vCPU and device states are
/// checked first; the checkpoint is applied to `committed` (so delta pages XOR against the
/// committed content; a refusal there changes nothing); then the checkpoint's pages **and the
/// pages the SVM dirtied on its own since the last checkpoint** are copied from `committed` into
/// guest RAM, the vCPU is reset and the devices loaded. The SVM then equals the PVM at the
/// capture point. The guest's dirty log must be on (it names the SVM's own pages) and starts
/// over.
pub fn apply_checkpoint_svm<B: AsRef<[u8]> + AsMut<[u8]>>(
    guest: &mut Guest,
    checkpoint: StagedCheckpoint<B>,
    expected_epoch: u64,
    committed: &mut CommittedRam,
) -> Result<RestoreReport, SnapshotError> {
    apply_checkpoint_svm_recycle(guest, checkpoint, expected_epoch, committed, &mut Vec::new()).0
}

/// [`apply_checkpoint_svm`] for the two-host driver: also hands the checkpoint's page staging
/// back (whether or not the apply succeeded; `ColoNode::recycle_staging` takes it, so the next
/// checkpoint decodes into the same memory) and fills `restored` with every page written into
/// the SVM (the checkpoint's and the SVM's own dirty pages, ascending), so the caller can keep
/// per-page digests current.
pub fn apply_checkpoint_svm_recycle<B: AsRef<[u8]> + AsMut<[u8]>>(
    guest: &mut Guest,
    checkpoint: StagedCheckpoint<B>,
    expected_epoch: u64,
    committed: &mut CommittedRam,
    restored: &mut Vec<u64>,
) -> (Result<RestoreReport, SnapshotError>, Option<PageStaging<B>>) {
    restored.clear();
    let checked = match check(guest, &checkpoint) {
        Ok(c) => c,
        Err(e) => return (Err(e), checkpoint.into_staging()),
    };
    if committed.bytes().len() as u64 != guest.ram.len() {
        let e = CommittedError::Size { found: guest.ram.len(), expected: committed.bytes().len() as u64 };
        return (Err(SnapshotError::Committed(e)), checkpoint.into_staging());
    }
    if guest.dirty.is_none() {
        return (Err(SnapshotError::NoDirtyLog), checkpoint.into_staging());
    }
    let gfns: Vec<u64> = checkpoint.pages().map(|p| p.gfn).collect();
    let svm_dirty = match take_dirty(guest) {
        Ok(d) => d,
        Err(e) => return (Err(e), checkpoint.into_staging()),
    };
    let (applied, staging) = checkpoint.apply_and_recycle(committed, expected_epoch);
    let report = match applied {
        Ok(report) => report,
        Err(e) => {
            // Nothing changed: the SVM's dirty pages stay owed to the next checkpoint.
            if let Some(log) = guest.dirty.as_mut() {
                svm_dirty.iter().for_each(|&gfn| log.mark(gfn));
            }
            return (Err(SnapshotError::Apply(e)), staging);
        }
    };
    *restored = pages_to_restore(&gfns, &svm_dirty);
    // Same size (checked above): this cannot fail.
    if let Err(e) = committed.restore_into(&mut guest.memory(), restored.iter().copied()) {
        return (Err(SnapshotError::Committed(e)), staging);
    }
    if let Err(e) = load(guest, &checked) {
        return (Err(e), staging);
    }
    let report = RestoreReport {
        epoch: report.epoch,
        pages: report.pages,
        svm_dirty_pages: svm_dirty.len() as u64,
        clock_ticks: checked.devices.clock.ticks,
        nic_attached: guest.devices.net.as_ref().is_some_and(|n| n.attached()),
    };
    (Ok(report), staging)
}

/// A checkpoint's vCPU and device states, checked against a guest.
struct Checked {
    state: VcpuState,
    devices: DeviceStates,
}

/// Every blob is checked before the first byte of guest state changes.
fn check<B: AsRef<[u8]> + AsMut<[u8]>>(
    guest: &Guest,
    checkpoint: &StagedCheckpoint<B>,
) -> Result<Checked, SnapshotError> {
    let vcpus: Vec<_> = checkpoint.vcpu_states().collect();
    if vcpus.len() != 1 {
        return Err(SnapshotError::VcpuCount { found: vcpus.len() });
    }
    let state = VcpuState::parse(vcpus[0].tag, vcpus[0].data)?;
    let devices = DeviceStates::from_blobs(checkpoint.device_states().map(|b| (b.id, b.tag, b.data)))?;
    guest.check_devices(&devices)?;
    guest.vcpu.check_state(&state)?;
    Ok(Checked { state, devices })
}

/// The vCPU reset and the device states, after memory; the dirty log starts over.
fn load(guest: &mut Guest, checked: &Checked) -> Result<(), SnapshotError> {
    // `check_state` accepted it: loading cannot fail for a reason the checks did not cover.
    guest.vcpu.load_state(&checked.state)?;
    guest.handler.set_msrs(checked.state.handler_msrs);
    guest.load_devices(&checked.devices);
    if let Some(log) = guest.dirty.as_mut() {
        log.clear();
    }
    Ok(())
}

/// Decodes a whole snapshot stream of checkpoint `epoch` and applies it to `guest`.
pub fn restore(guest: &mut Guest, stream: &[u8], epoch: u64) -> Result<RestoreReport, SnapshotError> {
    let checkpoint = decode(guest, stream, epoch)?;
    apply_checkpoint(guest, checkpoint, epoch)
}

/// Decodes and verifies a whole stream of checkpoint `epoch` for `guest`'s RAM size.
pub fn decode(guest: &Guest, stream: &[u8], epoch: u64) -> Result<StagedCheckpoint<Vec<u8>>, SnapshotError> {
    let frames = guest.ram.len() / PAGE as u64;
    // The stream is already in memory: its pages cannot need more staging than its own length.
    let staged_bytes = stream.len().min(frames as usize * PAGE);
    let staged_pages = (stream.len() as u64).min(frames) as u32;
    let staging = PageStaging::new(alloc::vec![0u8; staged_bytes], staged_pages);
    let mut decoder = CheckpointDecoder::new(limits(frames), staging).expecting_epoch(epoch);
    match decoder.feed(stream).map_err(SnapshotError::Stream)? {
        Feed::Complete { checkpoint, .. } => Ok(checkpoint),
        Feed::NeedMore => Err(SnapshotError::Incomplete { bytes: stream.len() }),
    }
}

/// The pages `guest` dirtied since the last call (hardware log drained, hypervisor writes
/// included), ascending; the log starts over. Turns the guest's dirty log on at the first call.
pub fn take_dirty(guest: &mut Guest) -> Result<Vec<u64>, SnapshotError> {
    let frames = guest.ram.len() / PAGE as u64;
    let log = guest.dirty.get_or_insert_with(|| DirtyLog::new(frames));
    guest.vcpu.collect_dirty(log)?;
    Ok(log.take())
}
