//! The host clock: the TSC, calibrated once at boot against PIT channel 2.
//!
//! Guests never read this directly: their clock is the coarse tick count the hypervisor derives
//! from it (see `vcpu::handler`). Under Bochs with `clock: sync=none` the PIT and the TSC both
//! follow the instruction count, so timings there are repeatable.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window.
const CALIBRATION_MS: u64 = 10;
/// Used when calibration gives nonsense (no PIT on the platform).
const FALLBACK_TSC_PER_MS: u64 = 1_000_000;

static TSC_PER_MS: AtomicU64 = AtomicU64::new(FALLBACK_TSC_PER_MS);

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86_64 CPU (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Calibration windows; the shortest wins.
const CALIBRATION_ROUNDS: usize = 5;

/// Measures the TSC rate against PIT channel 2 over [`CALIBRATION_ROUNDS`] windows and keeps the
/// smallest: under an emulator on a busy machine the vCPU thread may be descheduled while the
/// (host-time) PIT runs on, which can only make a window count too many TSC ticks. Returns TSC
/// ticks per millisecond.
pub fn calibrate() -> u64 {
    let per_ms = (0..CALIBRATION_ROUNDS).filter_map(|_| calibrate_once()).min().unwrap_or(FALLBACK_TSC_PER_MS);
    TSC_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// One window against PIT channel 2 (gate on port 0x61, one-shot mode 0): TSC ticks per
/// millisecond, or `None` when the PIT never expired or the result is nonsense.
fn calibrate_once() -> Option<u64> {
    let mut control = Port::<u8>::new(0x61);
    let mut command = Port::<u8>::new(0x43);
    let mut channel2 = Port::<u8>::new(0x42);
    let count = PIT_HZ * CALIBRATION_MS / 1000;
    // SAFETY: ports 0x42, 0x43 and 0x61 are the PC's PIT and its channel-2 gate; nothing else in
    // the hypervisor uses them, and the speaker output (bit 1) is kept off.
    let (t0, t1, expired) = unsafe {
        let gate = (control.read() & !0x02) & !0x01;
        control.write(gate);
        command.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        channel2.write(count as u8);
        channel2.write((count >> 8) as u8);
        control.write(gate | 0x01); // rising gate edge starts the count
        let t0 = rdtsc();
        let mut spins = 0u64;
        // OUT2 (bit 5) rises when the count reaches zero.
        while control.read() & 0x20 == 0 && spins < 200_000_000 {
            spins += 1;
        }
        (t0, rdtsc(), spins < 200_000_000)
    };
    let per_ms = (t1 - t0) / CALIBRATION_MS;
    (expired && per_ms > 1000).then_some(per_ms)
}

/// TSC ticks per millisecond, as calibrated.
pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Ordering::Relaxed)
}

/// Milliseconds since the TSC was reset (power-on), by the calibrated rate.
pub fn now_ms() -> u64 {
    rdtsc() / tsc_per_ms()
}

/// Busy-waits `ms` milliseconds.
pub fn delay_ms(ms: u64) {
    let end = rdtsc() + ms * tsc_per_ms();
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}
