//! Guest-side library linked into every guest: the hypercall ABI (shared with the hypervisor),
//! paravirtual drivers and the TCP determinism shim. The guest runtime arrives with the vCPU
//! backends; for now this crate holds the ABI constants both sides agree on.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

/// Identifies this hypervisor in CPUID leaf 0x4000_0000 (EBX, ECX, EDX).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"COLOhypervsr";
