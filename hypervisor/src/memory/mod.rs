//! Physical memory bookkeeping: address ranges and the frame allocator fed by the boot memory map.
#![deny(unsafe_code)]

pub mod frames;

pub use frames::{FrameAllocator, FrameError, PhysRange, PAGE_SIZE};
