//! Physical memory bookkeeping: address ranges, the frame allocator fed by the boot memory map,
//! and the generic page-table builder used for EPT and NPT.
#![deny(unsafe_code)]

pub mod dirty;
pub mod frames;
pub mod pagetable;

pub use dirty::DirtyLog;
pub use frames::{FrameAllocator, FrameError, PhysRange, PAGE_SIZE};
