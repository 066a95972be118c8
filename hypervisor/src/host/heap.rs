//! The kernel heap: a `linked_list_allocator` over frames taken from the frame allocator.
//! The `#[global_allocator]` itself is declared by the kernel binary (`boot`), so host test
//! builds of this crate keep the system allocator.

use linked_list_allocator::LockedHeap;

use crate::memory::{FrameAllocator, FrameError, PhysRange};

/// The kernel heap. `boot` registers it as the global allocator.
pub static HEAP: LockedHeap = LockedHeap::empty();

/// Carves `bytes` out of physical memory and hands them to [`HEAP`]. Call once.
pub fn init(frames: &mut FrameAllocator, bytes: u64) -> Result<PhysRange, FrameError> {
    let range = frames.allocate(bytes, 2 << 20)?;
    // SAFETY: the range was just taken from the frame allocator, so nothing else uses it; it is
    // identity-mapped and writable, and `init` runs once so the heap is not already initialised.
    unsafe { HEAP.lock().init(range.start as *mut u8, range.len() as usize) };
    Ok(range)
}
