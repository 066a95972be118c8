//! `DirtyLog`: the set of guest pages written since the last checkpoint, one bit per 4 KiB page.
//!
//! Two sources feed it: the hardware (VT-x PML entries or EPT/NPT dirty bits, collected by the
//! backend) and the hypervisor itself (device writes into guest RAM, through
//! [`crate::guest::memory::TrackedMemory`]). A checkpoint takes the set and leaves it empty.
#![deny(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;

const PAGE_SHIFT: u32 = 12;

/// Dirty bits for a guest of `frames` 4 KiB pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyLog {
    bits: Vec<u64>,
    frames: u64,
    /// Marks for pages outside the guest (ignored, counted: a backend bug or a stray PML entry).
    pub out_of_range: u64,
}

impl DirtyLog {
    /// An empty log for `frames` pages.
    pub fn new(frames: u64) -> Self {
        Self { bits: vec![0; frames.div_ceil(64) as usize], frames, out_of_range: 0 }
    }

    /// Pages covered.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Marks page `gfn`.
    pub fn mark(&mut self, gfn: u64) {
        if gfn < self.frames {
            self.bits[(gfn / 64) as usize] |= 1 << (gfn % 64);
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

    /// Marked pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The marked pages, lowest first, leaving the log empty.
    pub fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count() as usize);
        for (i, word) in self.bits.iter_mut().enumerate() {
            let mut w = core::mem::take(word);
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        out
    }

    /// Empties the log.
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn out_of_range_is_counted_not_stored() {
        let mut log = DirtyLog::new(10);
        log.mark(10);
        log.mark_range(9 << 12, 0x2000);
        log.mark_range(u64::MAX - 5, 10);
        assert_eq!(log.take(), [9]);
        assert_eq!(log.out_of_range, 3);
    }
}
