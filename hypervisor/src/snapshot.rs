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
    StagedCheckpoint, StreamError, StreamLimits,
};
use crate::devices::state::{DeviceStateError, DeviceStates};
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
    let mut encoder =
        CheckpointEncoder::new(sink, info, StreamLimits::for_guest(frames)).map_err(SnapshotError::Encode)?;
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
    /// Pages written.
    pub pages: u64,
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
pub fn apply_checkpoint(
    guest: &mut Guest,
    checkpoint: StagedCheckpoint,
    expected_epoch: u64,
) -> Result<RestoreReport, SnapshotError> {
    // Every blob is checked before the first byte of guest state changes.
    let vcpus: Vec<_> = checkpoint.vcpu_states().collect();
    if vcpus.len() != 1 {
        return Err(SnapshotError::VcpuCount { found: vcpus.len() });
    }
    let state = VcpuState::parse(vcpus[0].tag, vcpus[0].data)?;
    let devices = DeviceStates::from_blobs(checkpoint.device_states().map(|b| (b.id, b.tag, b.data)))?;
    guest.check_devices(&devices)?;
    guest.vcpu.check_state(&state)?;
    let report = checkpoint.apply_to(&mut guest.memory(), expected_epoch).map_err(SnapshotError::Apply)?;
    // `check_state` accepted it: loading cannot fail for a reason the checks did not cover.
    guest.vcpu.load_state(&state)?;
    guest.handler.set_msrs(state.handler_msrs);
    guest.load_devices(&devices);
    if let Some(log) = guest.dirty.as_mut() {
        log.clear();
    }
    Ok(RestoreReport {
        epoch: report.epoch,
        pages: report.pages,
        clock_ticks: devices.clock.ticks,
        nic_attached: guest.devices.net.as_ref().is_some_and(|n| n.attached()),
    })
}

/// Decodes a whole snapshot stream of checkpoint `epoch` and applies it to `guest`.
pub fn restore(guest: &mut Guest, stream: &[u8], epoch: u64) -> Result<RestoreReport, SnapshotError> {
    let checkpoint = decode(guest, stream, epoch)?;
    apply_checkpoint(guest, checkpoint, epoch)
}

/// Decodes and verifies a whole stream of checkpoint `epoch` for `guest`'s RAM size.
pub fn decode(guest: &Guest, stream: &[u8], epoch: u64) -> Result<StagedCheckpoint, SnapshotError> {
    let frames = guest.ram.len() / PAGE as u64;
    let mut decoder = CheckpointDecoder::new(StreamLimits::for_guest(frames)).expecting_epoch(epoch);
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
