//! Snapshot test guest: a long computation whose console output depends only on its own state
//! (no clock): an LCG fills a 64-page table, SSE floating point folds it, and every step prints
//! a checksum. A snapshot taken at any moment and restored must reproduce the rest exactly.
#![no_std]
#![no_main]

use guest_shim::rt::Env;
use guest_shim::{guest_main, println};

guest_main!(main);

const TABLE_WORDS: usize = 64 * 512;

/// 64 pages of state, in .bss (the guest is single-threaded).
struct Table(core::cell::UnsafeCell<[u64; TABLE_WORDS]>);
// SAFETY: the guest has one vCPU and one thread; `main` takes the only reference.
unsafe impl Sync for Table {}
static TABLE: Table = Table(core::cell::UnsafeCell::new([0; TABLE_WORDS]));

fn main(env: &Env) -> i32 {
    let steps: u64 = env.arg("steps").and_then(|s| s.parse().ok()).unwrap_or(40);
    // SAFETY: single-threaded guest; this is the only reference to the table ever made.
    let table = unsafe { &mut *TABLE.0.get() };
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc = 0.5f64;
    for step in 0..steps {
        for (i, word) in table.iter_mut().enumerate() {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            *word ^= x.rotate_left((i % 63) as u32);
        }
        let mut sum = 0u64;
        for (i, word) in table.iter().enumerate().step_by(7) {
            sum = sum.wrapping_add(*word ^ i as u64);
            acc = acc * 0.999_999 + ((*word >> 40) as f64) * 1e-12;
        }
        println!("step {step}: checksum {sum:#018x} acc {acc:.12}");
    }
    println!("done after {steps} steps");
    0
}
