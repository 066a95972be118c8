//! The kernel heap: a `linked_list_allocator` over frames taken from the frame allocator, with
//! its high-water mark and failed allocations counted so the management plane can show heap
//! pressure before it becomes a crash. The `#[global_allocator]` itself is declared by the kernel
//! binary (`boot`), which forwards to [`HEAP`]; host test builds of this crate keep the system
//! allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::ops::Deref;
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;

use crate::memory::{FrameAllocator, FrameError, PhysRange};
use crate::stats::HeapUsage;

/// `LockedHeap` plus a high-water mark and a failure count.
pub struct TrackedHeap {
    inner: LockedHeap,
    high_water: AtomicUsize,
    failures: AtomicU64,
}

/// The kernel heap. `boot` registers it as the global allocator.
pub static HEAP: TrackedHeap =
    TrackedHeap { inner: LockedHeap::empty(), high_water: AtomicUsize::new(0), failures: AtomicU64::new(0) };

impl core::fmt::Debug for TrackedHeap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TrackedHeap").field("high_water", &self.high_water).field("failures", &self.failures).finish()
    }
}

impl Deref for TrackedHeap {
    type Target = LockedHeap;

    fn deref(&self) -> &LockedHeap {
        &self.inner
    }
}

// SAFETY: both methods forward to the locked `linked_list_allocator::Heap` exactly as `LockedHeap`
// does (first fit, then deallocate with the same layout); the extra bookkeeping only reads
// `used()` under the same lock and touches atomics.
unsafe impl GlobalAlloc for TrackedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut heap = self.inner.lock();
        match heap.allocate_first_fit(layout) {
            Ok(ptr) => {
                self.high_water.fetch_max(heap.used(), Ordering::Relaxed);
                ptr.as_ptr()
            }
            Err(()) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                null_mut()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: the caller passes a pointer this allocator returned with the same layout.
            unsafe { self.inner.lock().deallocate(ptr, layout) }
        }
    }
}

/// Carves `bytes` out of physical memory and hands them to [`HEAP`]. Call once.
pub fn init(frames: &mut FrameAllocator, bytes: u64) -> Result<PhysRange, FrameError> {
    let range = frames.allocate(bytes, 2 << 20)?;
    // SAFETY: the range was just taken from the frame allocator, so nothing else uses it; it is
    // identity-mapped and writable, and `init` runs once so the heap is not already initialised.
    unsafe { HEAP.lock().init(range.start as *mut u8, range.len() as usize) };
    Ok(range)
}

/// The heap's size, use, high-water mark and failed allocations now.
pub fn usage() -> HeapUsage {
    let heap = HEAP.lock();
    let (size, used) = (heap.size() as u64, heap.used() as u64);
    drop(heap);
    HeapUsage {
        size,
        used,
        free: size.saturating_sub(used),
        high_water: (HEAP.high_water.load(Ordering::Relaxed) as u64).max(used),
        alloc_failures: HEAP.failures.load(Ordering::Relaxed),
    }
}
