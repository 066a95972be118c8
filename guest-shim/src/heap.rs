//! The guest heap: the upper half of guest RAM (above the image, which is loaded at 2 MiB and
//! stays far below it; the boot stack at the top of RAM is abandoned by `_start`), set up on the
//! first allocation so guests that never allocate are unaffected.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, Ordering};

use linked_list_allocator::LockedHeap;

/// Guests with less RAM than this get no heap (allocation fails).
const MIN_RAM: u64 = 8 << 20;

/// The allocator.
pub struct GuestHeap {
    heap: LockedHeap,
    ready: AtomicBool,
}

impl core::fmt::Debug for GuestHeap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GuestHeap").field("ready", &self.ready).finish_non_exhaustive()
    }
}

impl GuestHeap {
    fn init(&self) {
        let mut heap = self.heap.lock();
        if self.ready.load(Ordering::Acquire) {
            return;
        }
        let ram = crate::rt::RAM_SIZE.load(Ordering::Relaxed);
        if ram >= MIN_RAM {
            let start = (ram / 2) & !0xFFF;
            // SAFETY: [ram/2, ram) is guest RAM, identity-mapped and writable; nothing else uses
            // it (the image lies at 2 MiB and is smaller than ram/2 - 2 MiB for every guest
            // that allocates; `_start` moved the stack into the image's .bss).
            unsafe { heap.init(start as *mut u8, (ram - start) as usize) };
        }
        self.ready.store(true, Ordering::Release);
    }
}

// SAFETY: delegates to `LockedHeap`, a correct allocator, after giving it its region once.
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.ready.load(Ordering::Acquire) {
            self.init();
        }
        // SAFETY: the caller's layout contract is passed on unchanged.
        unsafe { self.heap.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with `layout` (the caller's contract).
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: GuestHeap = GuestHeap { heap: LockedHeap::empty(), ready: AtomicBool::new(false) };
