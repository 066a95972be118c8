//! The host hardware layer: everything that touches the physical CPU and platform devices.
//!
//! Only this module tree (and `kernel`) contains `unsafe`; each block says why it is sound.
//! - [`serial`]: COM1 console and the `log` backend;
//! - [`gdt`]: GDT, TSS and the IST stacks every exception runs on;
//! - [`idt`]: exception entry stubs and the report printed for an exception;
//! - [`paging`]: the host's own identity page tables;
//! - [`heap`]: the kernel heap (`linked_list_allocator`) carved from the frame allocator;
//! - [`cpu`]: control registers, CPUID, halting;
//! - [`shutdown`]: the one way out of the emulator, with a pass/fail status;
//! - [`time`]: the TSC, calibrated against the PIT;
//! - [`random`]: fresh nonces (RDRAND, else TSC jitter).

pub mod cpu;
pub mod gdt;
pub mod heap;
pub mod idt;
pub mod paging;
pub mod pci;
pub mod random;
pub mod serial;
pub mod shutdown;
pub mod time;
