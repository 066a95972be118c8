//! `DirtyLog`: the set of guest pages written since the last checkpoint, one bit per 4 KiB page.
//!
//! Two sources feed it: the hardware (VT-x PML entries or EPT/NPT dirty bits, collected by the
//! backend) and the hypervisor itself (device writes into guest RAM, through
//! [`crate::guest::memory::TrackedMemory`]). A checkpoint takes the set and leaves it empty.
#![deny(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;

use super::pagetable::{EntryFormat, PageSize, PageTable, TableMemory};

const PAGE_SHIFT: u32 = 12;

/// Dirty bits for a guest of `frames` 4 KiB pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyLog {
    bits: Vec<u64>,
    /// Bit `i` set: word `i` of `bits` may be non-zero. `take`, `count` and `clear` visit only
    /// those words, so they cost the dirty pages plus one bit per 256 KiB of guest RAM.
    summary: Vec<u64>,
    frames: u64,
    /// Marks for pages outside the guest (ignored, counted: a backend bug or a stray PML entry).
    pub out_of_range: u64,
}

impl DirtyLog {
    /// An empty log for `frames` pages.
    pub fn new(frames: u64) -> Self {
        let words = frames.div_ceil(64) as usize;
        Self { bits: vec![0; words], summary: vec![0; words.div_ceil(64)], frames, out_of_range: 0 }
    }

    /// Pages covered.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Marks page `gfn`.
    pub fn mark(&mut self, gfn: u64) {
        if gfn < self.frames {
            let word = (gfn / 64) as usize;
            self.bits[word] |= 1 << (gfn % 64);
            self.summary[word / 64] |= 1 << (word % 64);
        } else {
            self.out_of_range += 1;
        }
    }

    /// Marks every page `[gpa, gpa + len)` touches.
    pub fn mark_range(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        for gfn in first..=last.min(self.frames.saturating_sub(1)) {
            self.mark(gfn);
        }
        if last >= self.frames {
            self.out_of_range += 1;
        }
    }

    /// True if `gfn` is marked.
    pub fn is_dirty(&self, gfn: u64) -> bool {
        gfn < self.frames && self.bits[(gfn / 64) as usize] & (1 << (gfn % 64)) != 0
    }

    /// Indices of the words of `bits` the summary says may be non-zero, lowest first.
    fn touched_words(summary: &[u64]) -> impl Iterator<Item = usize> + '_ {
        summary.iter().enumerate().flat_map(|(i, &s)| {
            let mut s = s;
            core::iter::from_fn(move || {
                (s != 0).then(|| {
                    let bit = s.trailing_zeros() as usize;
                    s &= s - 1;
                    i * 64 + bit
                })
            })
        })
    }

    /// Marked pages.
    pub fn count(&self) -> u64 {
        Self::touched_words(&self.summary).map(|i| u64::from(self.bits[i].count_ones())).sum()
    }

    /// The marked pages, lowest first, leaving the log empty.
    pub fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count() as usize);
        for i in Self::touched_words(&self.summary) {
            let mut w = core::mem::take(&mut self.bits[i]);
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        self.summary.fill(0);
        out
    }

    /// Empties the log.
    pub fn clear(&mut self) {
        for i in Self::touched_words(&self.summary) {
            self.bits[i] = 0;
        }
        self.summary.fill(0);
    }
}

/// What a write fault on a tracked second-level table turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFault {
    /// A first write since the last collection: the page is logged and now writable.
    Logged,
    /// The first write into a 2 MiB leaf: split into 512 read-only 4 KiB leaves, the written one
    /// logged and writable.
    Split,
    /// The page is already writable (a stale translation): nothing to log; the caller flushes.
    AlreadyWritable,
    /// Nothing maps the address: a real violation, for the exit handler.
    NotMapped,
    /// A 2 MiB leaf must be split but the reserved table frames are used up (cannot happen when
    /// the pool was sized by [`WriteTracker::tables_needed`]).
    NoTable,
}

/// Write-protect dirty tracking over one second-level table (EPT or NPT): after each collection
/// every leaf is read-only; the first write to a page faults, [`WriteTracker::on_write_fault`]
/// logs it and makes it writable (splitting a 2 MiB leaf on its first write, so regions the guest
/// never writes keep their large pages), and [`WriteTracker::collect`] removes write permission
/// from the logged pages only. Collection therefore costs time in proportion to the pages
/// written, whatever the guest's size; the price is one fault per page per epoch.
///
/// Permission upgrades need no invalidation: a write that faulted leaves no writable translation
/// behind (SDM Vol. 3C §29.4.3.1: an EPT violation invalidates the mappings used for the faulting
/// address; on AMD-V a nested page fault likewise caches no translation that permits the write).
/// Downgrades do: after [`WriteTracker::collect`] and [`WriteTracker::protect_all`] removed write
/// permission the caller must invalidate (INVEPT single-context on VT-x, SDM §29.4.3.4; a flush of
/// the guest's ASID with TLB_CONTROL on AMD-V, APM Vol. 2 §15.16.2 and §15.25).
#[derive(Debug)]
pub struct WriteTracker {
    /// Pages made writable since the last collection, each once.
    logged: Vec<u64>,
    /// Zeroed table frames reserved for splitting 2 MiB leaves.
    pool: Vec<u64>,
    /// Table frames taken from the pool (now part of the table; the owner frees them with it).
    used: Vec<u64>,
    /// Write faults handled, 2 MiB leaves split, stale-translation faults.
    pub faults: u64,
    /// 2 MiB leaves split so far.
    pub splits: u64,
    /// Faults on pages that were already writable.
    pub spurious: u64,
}

impl WriteTracker {
    /// A tracker with `pool` reserved (zeroed) table frames for splits.
    pub fn new(pool: Vec<u64>) -> Self {
        Self { logged: Vec::new(), pool, used: Vec::new(), faults: 0, splits: 0, spurious: 0 }
    }

    /// How many table frames splitting every 2 MiB leaf of `table` would take.
    pub fn tables_needed<F: EntryFormat>(table: &PageTable<F>, mem: &mut dyn TableMemory) -> u64 {
        let mut n = 0;
        table.for_each_leaf(mem, &mut |_, size, _| n += u64::from(size == PageSize::Size2M));
        n
    }

    /// Removes write permission from every leaf (tracking starts; O(leaves), done once). The
    /// caller invalidates cached translations.
    pub fn protect_all<F: EntryFormat>(&mut self, table: &PageTable<F>, mem: &mut dyn TableMemory) {
        table.for_each_leaf(mem, &mut |_, _, e| *e &= !F::WRITABLE);
        self.logged.clear();
    }

    /// Handles a write fault at guest-physical `gpa`.
    pub fn on_write_fault<F: EntryFormat>(
        &mut self,
        table: &PageTable<F>,
        mem: &mut dyn TableMemory,
        gpa: u64,
    ) -> WriteFault {
        let Some(slot) = table.leaf_slot(mem, gpa) else { return WriteFault::NotMapped };
        let entry = mem.table(slot.table)[slot.index];
        if entry & F::WRITABLE != 0 {
            self.spurious += 1;
            return WriteFault::AlreadyWritable;
        }
        if self.logged.try_reserve(1).is_err() {
            return WriteFault::NoTable;
        }
        let outcome = match slot.size {
            PageSize::Size4K => {
                mem.table(slot.table)[slot.index] = entry | F::WRITABLE;
                WriteFault::Logged
            }
            PageSize::Size2M => {
                if self.used.try_reserve(1).is_err() {
                    return WriteFault::NoTable;
                }
                let Some(frame) = self.pool.pop() else { return WriteFault::NoTable };
                table.split_large(mem, slot, frame);
                self.used.push(frame);
                self.splits += 1;
                let i = ((gpa - slot.base) >> PAGE_SHIFT) as usize;
                mem.table(frame)[i] |= F::WRITABLE;
                WriteFault::Split
            }
        };
        self.faults += 1;
        self.logged.push(gpa >> PAGE_SHIFT);
        outcome
    }

    /// Pages logged since the last collection.
    pub fn pending(&self) -> usize {
        self.logged.len()
    }

    /// Marks every page written since the last call in `log` and write-protects it again, in
    /// time proportional to those pages. Returns how many; when not zero the caller must
    /// invalidate cached translations before the guest runs again.
    pub fn collect<F: EntryFormat>(
        &mut self,
        table: &PageTable<F>,
        mem: &mut dyn TableMemory,
        log: &mut DirtyLog,
    ) -> u64 {
        let n = self.logged.len() as u64;
        for gfn in self.logged.drain(..) {
            log.mark(gfn);
            table.update_leaf(mem, gfn << PAGE_SHIFT, &mut |e| *e &= !F::WRITABLE);
        }
        n
    }

    /// The reserved frames not used yet and the frames now inside the table, for release.
    pub fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        self.pool.iter().chain(self.used.iter()).copied()
    }

    /// Reserved frames still unused.
    pub fn pool_left(&self) -> usize {
        self.pool.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::pagetable::{EptFormat, X86Format, ADDRESS_MASK, EPT_WRITE, X86_WRITABLE};
    use crate::memory::FrameError;

    #[derive(Default)]
    struct VecTables(Vec<[u64; 512]>);

    impl TableMemory for VecTables {
        fn allocate_table(&mut self) -> Result<u64, FrameError> {
            self.0.push([0; 512]);
            Ok(self.0.len() as u64 * 0x1000)
        }
        fn table(&mut self, phys: u64) -> &mut [u64; 512] {
            &mut self.0[(phys / 0x1000 - 1) as usize]
        }
    }

    fn writable<F: EntryFormat>(pt: &PageTable<F>, mem: &mut VecTables, gpa: u64) -> bool {
        let slot = pt.leaf_slot(mem, gpa).unwrap();
        mem.table(slot.table)[slot.index] & F::WRITABLE != 0
    }

    fn tracker_for<F: EntryFormat>(pt: &PageTable<F>, mem: &mut VecTables) -> WriteTracker {
        let n = WriteTracker::tables_needed(pt, mem);
        let pool = (0..n).map(|_| mem.allocate_table().unwrap()).collect();
        let mut t = WriteTracker::new(pool);
        t.protect_all(pt, mem);
        t
    }

    #[test]
    fn first_write_splits_a_large_page_and_only_that_page_is_writable() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<X86Format>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0x4000_0000, 8 << 20, true).unwrap();
        let mut t = tracker_for(&pt, &mut mem);
        assert_eq!(t.pool_left(), 4);
        assert!(!writable(&pt, &mut mem, 0x20_5000));
        assert_eq!(t.on_write_fault(&pt, &mut mem, 0x20_5123), WriteFault::Split);
        assert_eq!(pt.translate(&mut mem, 0x20_5123), Some((0x4020_5123, PageSize::Size4K)), "same host page");
        assert!(writable(&pt, &mut mem, 0x20_5000));
        assert!(!writable(&pt, &mut mem, 0x20_4000) && !writable(&pt, &mut mem, 0x20_6000));
        assert_eq!(pt.translate(&mut mem, 0x3F_FFFF), Some((0x403F_FFFF, PageSize::Size4K)));
        assert_eq!(pt.translate(&mut mem, 0x40_0000), Some((0x4040_0000, PageSize::Size2M)), "others stay large");
        assert_eq!(t.on_write_fault(&pt, &mut mem, 0x20_6000), WriteFault::Logged);
        assert_eq!(t.on_write_fault(&pt, &mut mem, 0x20_6008), WriteFault::AlreadyWritable);
        assert_eq!(t.on_write_fault(&pt, &mut mem, 8 << 20), WriteFault::NotMapped);
        let mut log = DirtyLog::new(2048);
        log.mark(7); // a hypervisor write stays in the log beside the hardware's
        assert_eq!(t.collect(&pt, &mut mem, &mut log), 2);
        assert_eq!(log.take(), [7, 0x205, 0x206]);
        assert!(!writable(&pt, &mut mem, 0x20_5000) && !writable(&pt, &mut mem, 0x20_6000));
        assert_eq!(t.collect(&pt, &mut mem, &mut log), 0);
        assert_eq!((t.faults, t.splits, t.spurious, t.pool_left()), (2, 1, 1, 3));
        assert_eq!(t.frames().count(), 4);
    }

    #[test]
    fn exact_counts_over_many_epochs_on_ept() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<EptFormat>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0, 16 << 20, true).unwrap();
        let mut t = tracker_for(&pt, &mut mem);
        let mut log = DirtyLog::new(4096);
        let mut seed = 0x1234_5678u64;
        for epoch in 0..20u64 {
            let mut expected = std::collections::BTreeSet::new();
            for _ in 0..(epoch * 37 % 300) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let gpa = (seed >> 20) % (16 << 20);
                let was = expected.insert(gpa >> 12);
                let r = t.on_write_fault(&pt, &mut mem, gpa);
                // A page already written this epoch is writable: a real CPU would not fault.
                assert_eq!(was, r != WriteFault::AlreadyWritable, "{gpa:#x}: {r:?}");
            }
            t.collect(&pt, &mut mem, &mut log);
            assert_eq!(log.take(), expected.into_iter().collect::<Vec<_>>(), "epoch {epoch}");
            pt.for_each_leaf(&mut mem, &mut |a, _, e| assert_eq!(*e & EPT_WRITE, 0, "{a:#x} writable"));
        }
    }

    #[test]
    fn split_table_keeps_the_host_addresses() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<X86Format>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0x20_0000, 2 << 20, true).unwrap();
        let mut t = tracker_for(&pt, &mut mem);
        t.on_write_fault(&pt, &mut mem, 0x1000);
        let mut n = 0;
        pt.for_each_leaf(&mut mem, &mut |a, size, e| {
            assert_eq!(size, PageSize::Size4K);
            assert_eq!(*e & ADDRESS_MASK, 0x20_0000 + a);
            assert_eq!(*e & X86_WRITABLE != 0, a == 0x1000);
            n += 1;
        });
        assert_eq!(n, 512);
    }

    #[test]
    fn marks_ranges_and_takes_in_order() {
        let mut log = DirtyLog::new(100);
        log.mark(99);
        log.mark_range(0x1FFF, 2); // pages 1 and 2
        log.mark(1);
        assert_eq!(log.count(), 3);
        assert!(log.is_dirty(2) && !log.is_dirty(3));
        assert_eq!(log.take(), [1, 2, 99]);
        assert_eq!(log.count(), 0);
    }

    #[test]
    fn summary_keeps_take_and_count_exact_across_epochs() {
        let mut log = DirtyLog::new(1 << 20);
        for epoch in 0..5u64 {
            let pages: Vec<u64> = (0..300).map(|i| (i * 7919 + epoch * 104_729) % (1 << 20)).collect();
            pages.iter().for_each(|&g| log.mark(g));
            let mut expected = pages.clone();
            expected.sort_unstable();
            expected.dedup();
            assert_eq!(log.count(), expected.len() as u64);
            assert_eq!(log.take(), expected, "epoch {epoch}");
            assert_eq!(log.count(), 0);
            log.mark(5);
            log.clear();
            assert!(log.take().is_empty() && !log.is_dirty(5));
        }
    }

    #[test]
    fn out_of_range_is_counted_not_stored() {
        let mut log = DirtyLog::new(10);
        log.mark(10);
        log.mark_range(9 << 12, 0x2000);
        log.mark_range(u64::MAX - 5, 10);
        assert_eq!(log.take(), [9]);
        assert_eq!(log.out_of_range, 3);
    }
}
