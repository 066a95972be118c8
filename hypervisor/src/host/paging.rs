//! The host's own page tables: an identity map of all physical memory.
//!
//! The boot stub maps the first 4 GiB with 2 MiB pages, enough to reach Rust. This module replaces
//! that map with one that covers every byte of RAM (and the 32-bit MMIO hole), makes everything
//! but the kernel image non-executable, and leaves the first 4 KiB page unmapped so a null
//! pointer dereference faults instead of reading the real-mode IVT.
//! Entry formats: Intel SDM Vol. 3A §4.5, Tables 4-15 to 4-20.

use crate::memory::{FrameAllocator, FrameError, PhysRange, PAGE_SIZE};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// PS: in a PDE this maps a 2 MiB page.
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

type Table = [u64; 512];

/// Builds the identity map and loads it into CR3. `phys_end` is the end of the highest RAM range;
/// `executable` is the kernel image, the only memory left executable.
pub fn init(frames: &mut FrameAllocator, phys_end: u64, executable: PhysRange) -> Result<(), FrameError> {
    let map_end = phys_end.max(4 * GIB).next_multiple_of(GIB);
    let pml4 = new_table(frames)?;
    for gib in 0..map_end / GIB {
        let pml4_index = (gib / 512) as usize;
        if pml4[pml4_index] & PRESENT == 0 {
            let pdpt = new_table(frames)?;
            pml4[pml4_index] = table_entry(pdpt);
        }
        let pdpt = child(pml4[pml4_index]);
        let pd = new_table(frames)?;
        for (j, entry) in pd.iter_mut().enumerate() {
            let base = gib * GIB + j as u64 * MIB2;
            let overlaps_kernel = base < executable.end && executable.start < base + MIB2;
            let nx = if overlaps_kernel { 0 } else { NO_EXECUTE };
            *entry = if base == 0 {
                let pt = new_table(frames)?;
                for (k, pte) in pt.iter_mut().enumerate().skip(1) {
                    *pte = (k as u64 * PAGE_SIZE) | PRESENT | WRITABLE | NO_EXECUTE;
                }
                table_entry(pt)
            } else {
                base | PRESENT | WRITABLE | LARGE | nx
            };
        }
        pdpt[(gib % 512) as usize] = table_entry(pd);
    }
    let root = pml4.as_ptr() as u64;
    // SAFETY: the new tables identity-map everything the old ones did (the first 4 GiB) except
    // the null page, which nothing may touch, and the kernel image stays executable, so the
    // instruction after the CR3 write and all live data remain reachable at the same addresses.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags));
    }
    Ok(())
}

/// A zeroed page-table frame. Frames come from the identity-mapped region below 4 GiB that the
/// boot tables cover (the allocator hands out the lowest free address first).
fn new_table(frames: &mut FrameAllocator) -> Result<&'static mut Table, FrameError> {
    let frame = frames.allocate_frame()?;
    assert!(frame < 4 * GIB, "page-table frame {frame:#x} is above the boot identity map");
    // SAFETY: the frame was just taken from the allocator, so nothing else refers to it, and it
    // is identity-mapped (below 4 GiB), page-aligned and 4 KiB long.
    let table = unsafe { &mut *(frame as *mut Table) };
    table.fill(0);
    Ok(table)
}

fn table_entry(table: &Table) -> u64 {
    table.as_ptr() as u64 | PRESENT | WRITABLE
}

fn child(entry: u64) -> &'static mut Table {
    let frame = entry & 0x000F_FFFF_FFFF_F000;
    // SAFETY: `entry` was written by `table_entry` in this module for a frame `new_table`
    // allocated; the tables under construction are reached only through this function.
    unsafe { &mut *(frame as *mut Table) }
}

/// Page tables (EPT, NPT) in host frames, reached through the identity map. Every frame it
/// allocates is recorded in `owned` so its owner can give them back.
#[derive(Debug)]
pub struct FrameTables<'a> {
    /// Where new tables come from; `None` for walking existing tables only.
    pub frames: Option<&'a mut FrameAllocator>,
    /// The frames holding the tables, sorted.
    pub owned: &'a mut alloc::vec::Vec<u64>,
}

impl crate::memory::pagetable::TableMemory for FrameTables<'_> {
    fn allocate_table(&mut self) -> Result<u64, FrameError> {
        let frames =
            self.frames.as_deref_mut().ok_or(FrameError::OutOfMemory { bytes: PAGE_SIZE, align: PAGE_SIZE })?;
        let frame = frames.allocate_frame()?;
        // SAFETY: the frame was just allocated, is identity-mapped, page-aligned and unshared.
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE_SIZE as usize) };
        // Kept sorted so `table` can check ownership with a binary search.
        let at = self.owned.binary_search(&frame).unwrap_or_else(|i| i);
        self.owned.insert(at, frame);
        Ok(frame)
    }

    fn table(&mut self, phys: u64) -> &mut [u64; 512] {
        assert!(self.owned.binary_search(&phys).is_ok(), "table {phys:#x} does not belong to this page table");
        // SAFETY: `phys` is one of our own table frames (checked above), identity-mapped, and
        // only reached through this `&mut self`.
        unsafe { &mut *(phys as *mut [u64; 512]) }
    }
}
