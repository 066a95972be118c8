//! Guests as the hypervisor sees them before any vCPU exists: their RAM, their ELF image and
//! the boot structures the boot protocol (`guest_shim::abi`) promises them. Pure logic,
//! host-tested; the runner supplies the RAM.
#![deny(unsafe_code)]

pub mod boot;
pub mod elf;
pub mod memory;

pub use memory::{GuestMemory, GuestRam, MemoryError};
