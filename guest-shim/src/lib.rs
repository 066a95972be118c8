//! Guest-side library linked into every guest, and the ABI the hypervisor shares with it.
//!
//! - [`abi`]: hypercall numbers, error codes, the boot protocol (always built; the hypervisor
//!   depends on it);
//! - `freestanding` (feature `freestanding`): C memory functions for freestanding binaries;
//! - `rt` (feature `guest`): the guest runtime: entry, hypercalls, console, clock, panic handler;
//! - `heap`, `pvnet`, `pvblock`, `netshim` (feature `guest`): the heap (upper half of guest RAM),
//!   the paravirtual NIC as a smoltcp `Device`, the block device, and the TCP determinism shim.
//!
//! The test and reference guests are the binaries under `src/bin/`.
#![cfg_attr(not(test), no_std)]

#[cfg(feature = "guest")]
extern crate alloc;

pub mod abi;
#[cfg(feature = "freestanding")]
pub mod freestanding;
#[cfg(feature = "guest")]
pub mod heap;
#[cfg(feature = "guest")]
pub mod netshim;
#[cfg(feature = "guest")]
pub mod pvblock;
#[cfg(feature = "guest")]
pub mod pvnet;
#[cfg(feature = "guest")]
pub mod rt;

/// Identifies this hypervisor in CPUID leaf 0x4000_0000 (EBX, ECX, EDX).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"COLOhypervsr";
