//! Guest-side library linked into every guest, and the ABI the hypervisor shares with it.
//!
//! - [`abi`]: hypercall numbers, error codes, the boot protocol (always built; the hypervisor
//!   depends on it);
//! - `freestanding` (feature `freestanding`): C memory functions for freestanding binaries;
//! - `rt` (feature `guest`): the guest runtime: entry, hypercalls, console, clock, panic handler.
//!
//! The test and reference guests are the binaries under `src/bin/`.
#![cfg_attr(not(test), no_std)]

pub mod abi;
#[cfg(feature = "freestanding")]
pub mod freestanding;
#[cfg(feature = "guest")]
pub mod rt;

/// Identifies this hypervisor in CPUID leaf 0x4000_0000 (EBX, ECX, EDX).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"COLOhypervsr";
