//! Guests as the hypervisor sees them before any vCPU exists: their RAM, their ELF image, the
//! boot structures the boot protocol (`guest_shim::abi`) promises them, their module line as a
//! typed spec, and digests of their RAM and disk. Pure logic, host-tested; the runner supplies
//! the RAM.
#![deny(unsafe_code)]

pub mod boot;
pub mod digest;
pub mod elf;
pub mod memory;
pub mod spec;

pub use memory::{GuestMemory, GuestRam, MemoryError};
pub use spec::{GuestSpec, Scenario, SpecError};
