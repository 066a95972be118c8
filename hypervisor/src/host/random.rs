//! Fresh random bytes for handshake nonces: RDRAND where CPUID has it (the carry flag checked,
//! retried), else a mix of TSC readings around busy loops of varying length (jitter), the PIT
//! calibration and a counter. Either way the bytes go through SHA-256 with a per-call counter.
//! Which source is used is logged once.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{cpu, time};

static COUNTER: AtomicU64 = AtomicU64::new(0);
static LOGGED: AtomicBool = AtomicBool::new(false);
/// RDRAND tries per 64-bit word before it counts as failing (Intel suggests 10).
const RDRAND_RETRIES: usize = 10;

/// Whether CPUID.1:ECX.RDRAND (bit 30) is set.
pub fn has_rdrand() -> bool {
    cpu::cpuid(1, 0).ecx & (1 << 30) != 0
}

/// One RDRAND word, if the CPU delivered one within [`RDRAND_RETRIES`] tries (carry flag set).
fn rdrand64() -> Option<u64> {
    for _ in 0..RDRAND_RETRIES {
        let mut value = 0u64;
        // SAFETY: only called when CPUID reports RDRAND; the intrinsic writes `value` and
        // returns the carry flag (1: a valid random word).
        if unsafe { rdrand_step(&mut value) } == 1 {
            return Some(value);
        }
    }
    None
}

/// # Safety
/// The CPU must have RDRAND (CPUID.1:ECX bit 30).
#[target_feature(enable = "rdrand")]
unsafe fn rdrand_step(value: &mut u64) -> i32 {
    core::arch::x86_64::_rdrand64_step(value)
}

/// 32 fresh random bytes.
pub fn nonce() -> [u8; 32] {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut hash = Sha256::new();
    hash.update(b"colo nonce v1");
    hash.update(n.to_le_bytes());
    let mut words = 0;
    if has_rdrand() {
        for _ in 0..4 {
            if let Some(w) = rdrand64() {
                hash.update(w.to_le_bytes());
                words += 1;
            }
        }
    }
    let source = if words == 4 {
        "RDRAND"
    } else {
        // TSC jitter: time busy loops whose length depends on the last reading.
        let mut last = time::rdtsc();
        for i in 0..256u64 {
            let spins = (last ^ i) & 0x3f;
            for _ in 0..spins {
                core::hint::spin_loop();
            }
            let now = time::rdtsc();
            hash.update((now.wrapping_sub(last)).to_le_bytes());
            last = now;
        }
        hash.update(time::tsc_per_ms().to_le_bytes());
        hash.update(time::now_ms().to_le_bytes());
        if has_rdrand() {
            "TSC jitter (RDRAND is present but failed)"
        } else {
            "TSC jitter (this CPU has no RDRAND)"
        }
    };
    if !LOGGED.swap(true, Ordering::Relaxed) {
        if words == 4 {
            log::info!("random: handshake nonces from {source}");
        } else {
            log::warn!("random: handshake nonces from {source}: weaker than a hardware source");
        }
    }
    hash.finalize().into()
}
