//! Self-test scenarios, named on a guest's module line with `scenario=`: they drive the snapshot
//! code and the runner from real guests and print what the emulator suites check. This module
//! sits above `runner` and `snapshot` (and below `kernel`, which calls [`run`]); nothing below
//! imports it.
//!
//! - `dirty-count`: the pages dirtied between test marks 1 and 2, by `dirty_log=pml|ad|wp`;
//! - `snapshot-bench`: the PVM pause for those pages next to a plain copy of the same bytes;
//! - `snapshot-restore`: snapshot mid-computation (at the first preemption-timer exit after
//!   `snapshot_after_lines=K` console lines), restore into a second guest and the same guest,
//!   compare the output, and refuse a corrupted and a truncated snapshot;
//! - `snapshot-serve`: snapshot a serving guest (NIC attached) once its disk took
//!   `snapshot_after_writes=N` writes, end it, and go on in a fresh guest restored from the
//!   snapshot;
//! - `checkpoint-pair`: a PVM and an SVM from the same module on one host, both with dirty
//!   logging: a full sync, the SVM runs on its own, the PVM's dirty pages since the sync are
//!   applied to the SVM through its committed copy (the secondary's apply): the SVM's RAM digest
//!   must equal the PVM's and both must print the same from there to their end.

use alloc::string::String;
use alloc::vec::Vec;

use crate::backend::Backend;
use crate::boot_info::BootModule;
use crate::guest::committed::CommittedRam;
use crate::guest::{GuestMemory, GuestSpec, Scenario};
use crate::host::time;
use crate::memory::{DirtyLog, FrameAllocator};
use crate::runner::Guest;
use crate::runner::DEFAULT_TIME_SLICE_US;
use crate::snapshot::{
    apply_checkpoint, apply_checkpoint_svm, decode, encode, encode_full_into, pause_and_copy, restore, LocalCopy, Pages,
};
use crate::vcpu::{DirtyLogMethod, VmExit};

const PAGE: usize = 4096;
/// Epoch of the one snapshot each scenario takes.
const SNAPSHOT_EPOCH: u64 = 1;
/// The time slice `snapshot-restore` switches to once the guest printed its K lines, so a
/// preemption-timer exit comes soon after that point whatever the emulator's speed.
const SNAPSHOT_SLICE_US: u64 = 10;

/// Runs `scenario` for the guest module `module` (`spec` is its parsed line; `modules` are all
/// boot modules, for its disk). Errors are reported on the console; the hypervisor goes on.
pub fn run(
    scenario: Scenario,
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    spec: &GuestSpec<'_>,
    modules: &[BootModule<'_>],
    guest_mem: u64,
) {
    let result = match scenario {
        Scenario::DirtyCount | Scenario::SnapshotBench => {
            dirty_between_marks(scenario, backend, frames, module, spec, guest_mem)
        }
        Scenario::SnapshotRestore => snapshot_restore(backend, frames, module, spec, guest_mem),
        Scenario::SnapshotServe => snapshot_serve(backend, frames, module, spec, modules, guest_mem),
        Scenario::CheckpointPair => checkpoint_pair(backend, frames, module, spec, guest_mem),
    };
    if let Err(e) = result {
        log::error!("scenario {}: {e}", scenario.name());
    }
}

fn create(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    spec: &GuestSpec<'_>,
    mem: u64,
) -> Result<Guest, String> {
    Guest::create(backend, frames, module, spec, mem).map_err(|e| alloc::format!("guest not started: {e}"))
}

/// `dirty-count`: the pages dirtied between test marks 1 and 2, counted by the method named in
/// `dirty_log=pml|ad|wp`. `snapshot-bench` also times the PVM pause for those pages against a plain
/// copy of the same number of bytes, and the guest's run between the marks (its N first writes:
/// faults under write-protect tracking).
fn dirty_between_marks(
    scenario: Scenario,
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    spec: &GuestSpec<'_>,
    guest_mem: u64,
) -> Result<(), String> {
    let method = spec.dirty_log;
    let mut guest = create(backend, frames, module, spec, guest_mem)?;
    let frames_in_guest = guest.ram.len() / PAGE as u64;
    let result = (|| {
        guest.vcpu.enable_dirty_log(method, frames).map_err(|e| alloc::format!("{e}"))?;
        guest.dirty = Some(DirtyLog::new(frames_in_guest));
        // When the guest resumed after mark 1: the time to mark 2 is its run between checkpoints
        // (the N writes, each a fault under write-protect tracking).
        let mut resumed_at = 0;
        let end = loop {
            if let Some(end) = guest.step() {
                break end;
            }
            for mark in guest.handler.take_marks() {
                match mark {
                    1 => {
                        let log = guest.dirty.as_mut().expect("dirty log on");
                        if scenario == Scenario::SnapshotBench {
                            // A pause like the measured one, discarded: it starts the epoch and
                            // runs the capture path once, so the measured pause is not the first
                            // (under QEMU TCG the first run of any code pays for its translation).
                            pause_and_copy(&mut guest, Pages::Dirty).map_err(|e| alloc::format!("{e}"))?;
                        } else {
                            guest.vcpu.collect_dirty(log).map_err(|e| alloc::format!("{e}"))?;
                            log.clear();
                        }
                        resumed_at = time::rdtsc();
                    }
                    2 if scenario == Scenario::SnapshotBench => {
                        let guest_cycles = time::rdtsc() - resumed_at;
                        bench_pause(&mut guest, method, guest_cycles)?;
                    }
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
fn bench_pause(guest: &mut Guest, method: DirtyLogMethod, guest_cycles: u64) -> Result<(), String> {
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
    // The same pause again at once, nothing dirtied since: its capture is the cost that does not
    // depend on dirty pages (vCPU and device state, an empty collection).
    let (_, empty) = pause_and_copy(guest, Pages::Dirty).map_err(|e| alloc::format!("{e}"))?;
    if copy.gfns.len() <= 8 && method == DirtyLogMethod::WriteProtect {
        full_sync_bench(guest)?;
    }
    log::info!(
        "snapshot-bench: method={} guest_mib={} dirty_pages={} capture_cycles={} copy_cycles={} pause_cycles={pause} \
         memcpy_cycles={memcpy_cycles} pause_per_memcpy_x100={} guest_cycles={guest_cycles} empty_capture_cycles={} \
         tsc_per_ms={}",
        method.name(),
        guest.ram.len() >> 20,
        copy.gfns.len(),
        t.capture_cycles,
        t.copy_cycles,
        pause * 100 / memcpy_cycles.max(1),
        empty.capture_cycles,
        time::tsc_per_ms()
    );
    Ok(())
}

/// A sink that keeps nothing but a count and a checksum: the bounded-memory end of a stream.
struct CountingSink {
    bytes: u64,
    sum: u64,
}

impl crate::colo::checkpoint::ByteSink for CountingSink {
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), crate::colo::checkpoint::SinkError> {
        self.bytes += bytes.len() as u64;
        self.sum = self.sum.wrapping_add(bytes.first().copied().map_or(0, u64::from));
        Ok(())
    }
}

/// The initial full sync of the paused guest (`encode_full_into`: every page read in place and
/// streamed, no copy of the guest built) into a counting sink: its time for this guest's size.
fn full_sync_bench(guest: &mut Guest) -> Result<(), String> {
    let t0 = time::rdtsc();
    let (sink, summary) = encode_full_into(guest, SNAPSHOT_EPOCH + 1, CountingSink { bytes: 0, sum: 0 })
        .map_err(|e| alloc::format!("full sync: {e}"))?;
    let cycles = time::rdtsc() - t0;
    log::info!(
        "snapshot-bench: full_sync guest_mib={} pages={} zero_pages={} stream_bytes={} full_sync_cycles={cycles} \
         full_sync_us={} heap_high_water_bytes={} tsc_per_ms={}",
        guest.ram.len() >> 20,
        summary.pages,
        summary.zero_pages,
        sink.bytes,
        micros(cycles),
        crate::host::heap::usage().high_water,
        time::tsc_per_ms()
    );
    Ok(())
}

/// `snapshot-restore`: snapshot guest A at the first preemption-timer exit after it printed
/// `snapshot_after_lines=K` console lines (so mid-computation, at a point set by the guest's
/// progress rather than by how fast the emulator runs), let A finish, restore the snapshot into a
/// fresh guest B and back into A, and compare what each printed after the snapshot point; then
/// show a corrupted and a truncated snapshot refused with the target untouched.
fn snapshot_restore(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    spec: &GuestSpec<'_>,
    guest_mem: u64,
) -> Result<(), String> {
    let after = spec.snapshot_after_lines.unwrap_or(3);
    let mut a = create(backend, frames, module, spec, guest_mem)?;
    let mut b = match create(backend, frames, module, spec, guest_mem) {
        Ok(b) => b,
        Err(e) => {
            a.destroy(frames);
            return Err(e);
        }
    };
    let result = (|| {
        let frames_in_guest = a.ram.len() / PAGE as u64;
        let mut snapshot = None;
        let mut armed = false;
        let end_a = loop {
            if let Some(end) = a.step() {
                break end;
            }
            if !armed && a.console_lines >= after {
                armed = true;
                a.set_time_slice_us(SNAPSHOT_SLICE_US.min(spec.time_slice_us.unwrap_or(SNAPSHOT_SLICE_US)));
            }
            if a.last_exit == Some(VmExit::PreemptionTimer) && armed && snapshot.is_none() {
                {
                    let rip = a.vcpu.rip();
                    let (copy, t) = pause_and_copy(&mut a, Pages::All).map_err(|e| alloc::format!("{e}"))?;
                    let stream = encode(&copy, SNAPSHOT_EPOCH, frames_in_guest).map_err(|e| alloc::format!("{e}"))?;
                    log::info!(
                        "snapshot-restore: snapshot of `{}` at the first preemption after {} console lines, rip \
                         {rip:#x}: {} pages, {} bytes encoded (capture {} + copy {} TSC cycles)",
                        a.name,
                        a.console_lines,
                        copy.gfns.len(),
                        stream.len(),
                        t.capture_cycles,
                        t.copy_cycles
                    );
                    snapshot = Some(stream);
                    a.console_capture = Some(Vec::new());
                    if let Some(us) = spec.time_slice_us {
                        a.set_time_slice_us(us);
                    }
                }
            }
        };
        let snapshot = snapshot
            .ok_or(alloc::format!("the guest ended before a preemption after {after} console lines ({end_a})"))?;
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

/// Gives `guest` its disk module, if its spec names one.
fn attach_disk(guest: &mut Guest, spec: &GuestSpec<'_>, modules: &[BootModule<'_>]) -> Result<(), String> {
    let Some(name) = spec.disk else { return Ok(()) };
    let disk = crate::devices::host::find_disk(modules, name)
        .ok_or_else(|| alloc::format!("no disk module `disk-{name}` for `disk={name}`"))?;
    // SAFETY: one guest at a time holds this slice; it is dropped with that guest (`destroy`)
    // before the next guest takes the same module.
    guest.attach_disk(unsafe { crate::devices::host::disk_bytes(disk) });
    Ok(())
}

/// `snapshot-serve`: run a serving guest until its disk has taken `snapshot_after_writes=N`
/// writes (the guest's own progress: for `guest-redis`, one write per round of requests that
/// changed data), snapshot it there (all pages, vCPU, every device: the NIC attached with its
/// rings and indices), end it, and restore the snapshot into a fresh guest on the same disk and
/// MAC, which then goes on serving until it ends.
fn snapshot_serve(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    spec: &GuestSpec<'_>,
    modules: &[BootModule<'_>],
    guest_mem: u64,
) -> Result<(), String> {
    let writes = spec.snapshot_after_writes.ok_or("snapshot-serve needs snapshot_after_writes=N and disk=NAME")?;
    if spec.disk.is_none() {
        return Err("snapshot-serve needs disk=NAME (it counts the guest's disk writes)".into());
    }
    let mut a = create(backend, frames, module, spec, guest_mem)?;
    let taken = (|| {
        attach_disk(&mut a, spec, modules)?;
        loop {
            if let Some(end) = a.step() {
                a.report(&end);
                return Err(alloc::format!("the guest ended ({end}) before its disk took {writes} writes"));
            }
            if a.devices.block.as_ref().is_some_and(|b| b.counters.writes >= writes) {
                // The full-sync path: every page streamed from guest RAM into the sink in place.
                let t0 = time::rdtsc();
                let devices = a.save_devices();
                let (stream, summary) =
                    encode_full_into(&mut a, SNAPSHOT_EPOCH, Vec::new()).map_err(|e| alloc::format!("{e}"))?;
                let attached = devices.net.is_some_and(|n| n.rings.is_some());
                log::info!(
                    "snapshot-serve: snapshot of `{}` after {writes} disk writes: NIC attached: {}, {} pages ({} zero), \
                     {} device states, {} bytes streamed in {} us; ending it",
                    a.name,
                    if attached { "yes" } else { "no" },
                    summary.pages,
                    summary.zero_pages,
                    devices.blobs().len(),
                    stream.len(),
                    micros(time::rdtsc() - t0)
                );
                // The same capture with the NIC's RX ring moved past the end of RAM, plus one page:
                // a restore must refuse it before writing that page.
                let mut state = a.vcpu.save_state().map_err(|e| alloc::format!("{e}"))?;
                state.handler_msrs = a.handler.msrs();
                let mut bad = devices.clone();
                if let Some((rx, _)) = bad.net.as_mut().and_then(|n| n.rings.as_mut()) {
                    rx.gpa = a.ram.len() - 8;
                }
                let copy = LocalCopy { state, devices: bad, gfns: alloc::vec![0x100], data: alloc::vec![0xAA; PAGE] };
                let bad_stream =
                    encode(&copy, SNAPSHOT_EPOCH, a.ram.len() / PAGE as u64).map_err(|e| alloc::format!("{e}"))?;
                return Ok((stream, bad_stream, a.digest(), a.page_digests()));
            }
        }
    })();
    a.destroy(frames);
    let (stream, bad_stream, original, original_pages) = taken?;

    let mut b = create(backend, frames, module, spec, guest_mem)?;
    let result = (|| {
        attach_disk(&mut b, spec, modules)?;
        let before = b.digest();
        match restore(&mut b, &bad_stream, SNAPSHOT_EPOCH) {
            Err(e) => log::info!(
                "snapshot-serve: a NIC state with its RX ring outside guest RAM refused: {e}; target unchanged: {}",
                if b.digest() == before { "yes" } else { "NO" }
            ),
            Ok(_) => log::error!("snapshot-serve: a NIC state with its RX ring outside guest RAM was applied"),
        }
        let report =
            restore(&mut b, &stream, SNAPSHOT_EPOCH).map_err(|e| alloc::format!("restore into a fresh guest: {e}"))?;
        log::info!(
            "snapshot-serve: restored into a fresh guest: {} pages, clock {} ticks, NIC attached: {}",
            report.pages,
            report.clock_ticks,
            if report.nic_attached { "yes" } else { "no" }
        );
        // `checkpoint_verify` in small: the restored guest's RAM and disk digest as the original's.
        let t0 = time::rdtsc();
        let restored = b.digest();
        let digest_us = micros(time::rdtsc() - t0);
        if restored == original {
            log::info!(
                "snapshot-serve: digest of the restored guest equals the original's: {restored} ({digest_us} us)"
            );
        } else {
            let page = crate::guest::digest::first_difference(&original_pages, &b.page_digests());
            log::error!(
                "snapshot-serve: digest of the restored guest {restored} differs from the original's {original}; \
                 first differing page: {page:?}"
            );
        }
        let end = b.run_to_end();
        log::info!("snapshot-serve: restored guest {end}");
        b.report(&end);
        Ok(())
    })();
    b.destroy(frames);
    result
}

/// Host TSC cycles in microseconds.
fn micros(cycles: u64) -> u64 {
    cycles * 1000 / time::tsc_per_ms().max(1)
}

/// Runs `guest` to the first preemption-timer exit after it printed `lines` console lines (a
/// short time slice from that point on, the guest's own slice again after it).
fn run_to_preemption_after(guest: &mut Guest, lines: u64, spec: &GuestSpec<'_>) -> Result<(), String> {
    let mut armed = false;
    loop {
        if let Some(end) = guest.step() {
            return Err(alloc::format!("`{}` ended ({end}) before a preemption after {lines} lines", guest.name));
        }
        if !armed && guest.console_lines >= lines {
            armed = true;
            guest.set_time_slice_us(SNAPSHOT_SLICE_US);
        }
        if armed && guest.last_exit == Some(VmExit::PreemptionTimer) {
            guest.set_time_slice_us(spec.time_slice_us.unwrap_or(DEFAULT_TIME_SLICE_US));
            return Ok(());
        }
    }
}

/// `checkpoint-pair`: see the module documentation.
fn checkpoint_pair(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    spec: &GuestSpec<'_>,
    guest_mem: u64,
) -> Result<(), String> {
    let sync_after = spec.snapshot_after_lines.unwrap_or(3);
    let mut pvm = create(backend, frames, module, spec, guest_mem)?;
    let mut svm = match create(backend, frames, module, spec, guest_mem) {
        Ok(g) => g,
        Err(e) => {
            pvm.destroy(frames);
            return Err(e);
        }
    };
    let result = (|| {
        let err = |e: &dyn core::fmt::Display| alloc::format!("{e}");
        let n = pvm.ram.len() / PAGE as u64;
        for g in [&mut pvm, &mut svm] {
            g.vcpu.enable_dirty_log(spec.dirty_log, frames).map_err(|e| err(&e))?;
            g.dirty = Some(DirtyLog::new(n));
        }
        // Epoch 1: the initial full sync, streamed from the paused PVM's RAM.
        run_to_preemption_after(&mut pvm, sync_after, spec)?;
        let (full, _) = encode_full_into(&mut pvm, 1, Vec::new()).map_err(|e| err(&e))?;
        let checkpoint = decode(&svm, &full, 1).map_err(|e| err(&e))?;
        apply_checkpoint(&mut svm, checkpoint, 1).map_err(|e| err(&e))?;
        let len = svm.ram.len();
        let mut committed = CommittedRam::new(svm.memory().slice(0, len).map_err(|e| err(&e))?).map_err(|e| err(&e))?;
        // The SVM runs on its own for three lines: pages it dirties must return to the PVM's.
        let until = svm.console_lines + 3;
        while svm.console_lines < until {
            if let Some(end) = svm.step() {
                return Err(alloc::format!("the SVM ended ({end}) while diverging"));
            }
        }
        // A hypervisor write into a page only the SVM has (as a device would write): the PVM's
        // checkpoint does not carry it, so only the SVM's own dirty set can put it back.
        let marker = len - PAGE as u64;
        svm.memory().write(marker, &[0xA5; 64]).map_err(|e| err(&e))?;
        if let Some(log) = svm.dirty.as_mut() {
            log.mark_range(marker, 64);
        }
        // Epoch 2: the PVM's dirty pages since the sync, at a preemption five lines on.
        let lines = pvm.console_lines + 5;
        run_to_preemption_after(&mut pvm, lines, spec)?;
        let (copy, t) = pause_and_copy(&mut pvm, Pages::Dirty).map_err(|e| err(&e))?;
        let stream = encode(&copy, 2, n).map_err(|e| err(&e))?;
        let (pvm_digest, pvm_pages) = (pvm.digest(), pvm.page_digests());
        let checkpoint = decode(&svm, &stream, 2).map_err(|e| err(&e))?;
        let t0 = time::rdtsc();
        let report = apply_checkpoint_svm(&mut svm, checkpoint, 2, &mut committed).map_err(|e| err(&e))?;
        let apply_us = micros(time::rdtsc() - t0);
        let svm_digest = svm.digest();
        log::info!(
            "checkpoint-pair: checkpoint 2 ({:?}): {} PVM pages, {} bytes, pause {} us, apply {apply_us} us; {} \
             SVM-dirtied pages returned; SVM digest equals the PVM's: {}",
            spec.dirty_log,
            report.pages,
            stream.len(),
            micros(t.capture_cycles + t.copy_cycles),
            report.svm_dirty_pages,
            if svm_digest == pvm_digest { "yes" } else { "NO" }
        );
        if svm_digest != pvm_digest {
            let page = crate::guest::digest::first_difference(&pvm_pages, &svm.page_digests());
            log::error!("checkpoint-pair: SVM {svm_digest} vs PVM {pvm_digest}; first differing page: {page:?}");
        }
        // From here both must print the same to their end.
        pvm.console_capture = Some(Vec::new());
        svm.console_capture = Some(Vec::new());
        let (end_pvm, end_svm) = (pvm.run_to_end(), svm.run_to_end());
        let (a, b) = (pvm.console_capture.take().unwrap_or_default(), svm.console_capture.take().unwrap_or_default());
        log::info!(
            "checkpoint-pair: PVM {end_pvm}, SVM {end_svm}; {} and {} lines after checkpoint 2; identical: {}",
            a.len(),
            b.len(),
            if a == b { "yes" } else { "NO" }
        );
        Ok(())
    })();
    pvm.destroy(frames);
    svm.destroy(frames);
    result
}
