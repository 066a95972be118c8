//! Nested page tables (NPT): the second-level translation from guest-physical to host-physical
//! addresses. AMD APM Vol. 2 §15.25 ("Nested Paging").
//!
//! The tables have the ordinary long-mode 4-level format (APM Vol. 2 §5.3), built by the shared
//! [`crate::memory::pagetable`] builder with [`X86Format`] entries: every entry carries the User
//! bit because nested walks are user-mode accesses (§15.25.5). The map covers exactly guest RAM
//! `[0, size)`, with 2 MiB pages where guest and host addresses are both aligned; any other
//! guest-physical address raises a nested page fault (§15.25.6).
//!
//! Dirty tracking: the processor sets the Accessed and Dirty bits of the nested entries it uses
//! (§15.25.4). [`NestedPageTables::scan_dirty`] reports leaves with Dirty set and clears them;
//! the vCPU then flushes its ASID's TLB entries so the next write sets the bit again.
#![deny(unsafe_code)]

use alloc::vec::Vec;

use crate::memory::pagetable::{MapError, PageSize, PageTable, TableMemory, X86Format, X86_ACCESSED, X86_DIRTY};
use crate::memory::{FrameError, PhysRange};

/// The dirty-tracking method, as the boot log names it.
pub const DIRTY_TRACKING: &str =
    "NPT write protection (dirty_log=wp) or NPT dirty bits, scanned under upper-level Accessed flags (dirty_log=ad)";

/// Records every table frame an inner [`TableMemory`] hands out, so they can be given back.
struct Recording<'a> {
    inner: &'a mut dyn TableMemory,
    frames: Vec<u64>,
}

impl TableMemory for Recording<'_> {
    fn allocate_table(&mut self) -> Result<u64, FrameError> {
        self.frames.try_reserve(1).map_err(|_| FrameError::TooFragmented)?;
        let pa = self.inner.allocate_table()?;
        self.frames.push(pa);
        Ok(pa)
    }
    fn table(&mut self, phys: u64) -> &mut [u64; 512] {
        self.inner.table(phys)
    }
}

/// Counts of leaf entries, for the log and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingStats {
    /// 4 KiB leaves.
    pub small_pages: u64,
    /// 2 MiB leaves.
    pub large_pages: u64,
    /// Table frames, the PML4 included.
    pub tables: u64,
}

/// The nested page tables of one guest.
#[derive(Debug)]
pub struct NestedPageTables {
    table: PageTable<X86Format>,
    frames: Vec<u64>,
    guest_ram: PhysRange,
}

impl NestedPageTables {
    /// Maps guest-physical `[0, guest_ram.len())` to host-physical `guest_ram`; `large_pages`
    /// allows 2 MiB pages where both sides are aligned. On failure every table frame allocated so
    /// far is listed in the error's second half for the caller to free.
    pub fn build(
        mem: &mut dyn TableMemory,
        guest_ram: PhysRange,
        large_pages: bool,
    ) -> Result<Self, (MapError, Vec<u64>)> {
        let mut rec = Recording { inner: mem, frames: Vec::new() };
        let mut table = match PageTable::<X86Format>::new(&mut rec) {
            Ok(t) => t,
            Err(e) => return Err((MapError::Memory(e), rec.frames)),
        };
        if let Err(e) = table.map(&mut rec, 0, guest_ram.start, guest_ram.len(), large_pages) {
            return Err((e, rec.frames));
        }
        Ok(Self { table, frames: rec.frames, guest_ram })
    }

    /// nCR3: the PML4's physical address.
    pub fn root(&self) -> u64 {
        self.table.root()
    }

    /// The host-physical RAM behind guest-physical `[0, len)`.
    pub fn guest_ram(&self) -> PhysRange {
        self.guest_ram
    }

    /// Every table frame, for release.
    pub fn table_frames(&self) -> &[u64] {
        &self.frames
    }

    /// The host-physical address behind `gpa`, walking the tables as the hardware does.
    pub fn translate(&self, mem: &mut dyn TableMemory, gpa: u64) -> Option<u64> {
        self.table.translate(mem, gpa).map(|(hpa, _)| hpa)
    }

    /// Counts the leaves.
    pub fn stats(&self, mem: &mut dyn TableMemory) -> MappingStats {
        let mut stats = MappingStats { tables: self.frames.len() as u64, ..MappingStats::default() };
        self.table.for_each_leaf(mem, &mut |_, size, _| match size {
            PageSize::Size4K => stats.small_pages += 1,
            PageSize::Size2M => stats.large_pages += 1,
        });
        stats
    }

    /// The table itself (for write-protect tracking).
    pub fn table(&self) -> &PageTable<X86Format> {
        &self.table
    }

    /// Calls `f(gpa, bytes)` for every leaf whose Dirty bit is set and, if `clear`, clears Dirty
    /// and Accessed. Returns how many leaves were dirty. With `clear` the scan is hierarchical:
    /// it descends only into tables whose upper-level Accessed flag the processor set since the
    /// last scan (APM Vol. 2 §15.25.4: nested walks set Accessed on every level they use) and
    /// clears those flags. After clearing, the caller must flush the guest's TLB entries before
    /// it runs again ([`super::SvmVcpu`] does on its next VMRUN), or a walk served from a cached
    /// upper level would leave its Accessed flag clear and the scan would skip a written page.
    pub fn scan_dirty(&self, mem: &mut dyn TableMemory, clear: bool, f: &mut dyn FnMut(u64, u64)) -> u64 {
        let mut dirty = 0;
        let mut visit = |gpa: u64, size: PageSize, entry: &mut u64| {
            if *entry & X86_DIRTY != 0 {
                dirty += 1;
                f(gpa, size.bytes());
                if clear {
                    *entry &= !(X86_DIRTY | X86_ACCESSED);
                }
            }
        };
        if clear {
            self.table.for_each_accessed_leaf(mem, &mut visit);
        } else {
            self.table.for_each_leaf(mem, &mut visit);
        }
        dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::pagetable::ADDRESS_MASK;

    #[derive(Default)]
    struct VecTables(Vec<[u64; 512]>, usize);

    impl TableMemory for VecTables {
        fn allocate_table(&mut self) -> Result<u64, FrameError> {
            if self.1 != 0 && self.0.len() >= self.1 {
                return Err(FrameError::TooFragmented);
            }
            self.0.push([0; 512]);
            Ok(self.0.len() as u64 * 0x1000)
        }
        fn table(&mut self, phys: u64) -> &mut [u64; 512] {
            &mut self.0[(phys / 0x1000 - 1) as usize]
        }
    }

    #[test]
    fn maps_exactly_guest_ram_with_user_bit_everywhere() {
        let mut mem = VecTables::default();
        let ram = PhysRange::new(0x4000_0000, (64 << 20) + 0x3000);
        let npt = NestedPageTables::build(&mut mem, ram, true).unwrap();
        let stats = npt.stats(&mut mem);
        assert_eq!(stats, MappingStats { small_pages: 3, large_pages: 32, tables: 4 });
        assert_eq!(npt.table_frames().len(), 4);
        assert_eq!(npt.translate(&mut mem, 0x123_4567), Some(0x4123_4567));
        assert_eq!(npt.translate(&mut mem, (64 << 20) + 0x2FFF), Some(0x4000_0000 + (64 << 20) + 0x2FFF));
        assert_eq!(npt.translate(&mut mem, (64 << 20) + 0x3000), None);
        assert_eq!(npt.translate(&mut mem, 1 << 40), None);
        for table in &mem.0 {
            for &e in table.iter().filter(|e| **e & 1 != 0) {
                assert_eq!(e & 0b111, 0b111, "present, writable, user: {e:#x}");
                assert_eq!(e & (1 << 63), 0, "executable");
                assert!(e & ADDRESS_MASK != 0);
            }
        }
    }

    #[test]
    fn dirty_scan_reports_and_clears() {
        let mut mem = VecTables::default();
        let npt = NestedPageTables::build(&mut mem, PhysRange::new(0x20_0000, 4 << 20), false).unwrap();
        assert_eq!(npt.stats(&mut mem).small_pages, 1024);
        // Play the hardware: PML4, PDPT, PD, then the two PTs.
        mem.table(0x4000)[5] |= X86_DIRTY | X86_ACCESSED;
        mem.table(0x5000)[0] |= X86_DIRTY;
        // A dirty leaf under upper levels the processor did not mark walked is skipped.
        assert_eq!(npt.scan_dirty(&mut mem, true, &mut |_, _| {}), 0);
        for (table, index) in [(0x1000, 0), (0x2000, 0), (0x3000, 0), (0x3000, 1)] {
            mem.table(table)[index] |= X86_ACCESSED;
        }
        let mut seen = Vec::new();
        assert_eq!(npt.scan_dirty(&mut mem, true, &mut |gpa, len| seen.push((gpa, len))), 2);
        assert_eq!(seen, [(0x5000, 0x1000), (0x20_0000, 0x1000)]);
        assert_eq!(npt.scan_dirty(&mut mem, false, &mut |_, _| {}), 0);
        assert_eq!(mem.table(0x4000)[5] & X86_ACCESSED, 0);
    }

    #[test]
    fn failure_returns_the_frames_taken() {
        let mut mem = VecTables(Vec::new(), 3);
        let (err, frames) = NestedPageTables::build(&mut mem, PhysRange::new(0, 4 << 20), false).unwrap_err();
        assert!(matches!(err, MapError::Memory(_)));
        assert_eq!(frames.len(), 3);
    }
}
