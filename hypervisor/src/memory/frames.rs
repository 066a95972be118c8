//! The physical frame allocator.
//!
//! It owns the list of free physical ranges: the boot loader's available memory, minus what is
//! reserved (the first MiB, the kernel image, the boot information, the modules). It hands out
//! 4 KiB-aligned runs of frames, contiguous and aligned as asked (2 MiB runs for large-page guest
//! memory), and takes them back, merging neighbours. The list has a fixed capacity so the
//! allocator works before the heap exists.
#![deny(unsafe_code)]

use core::fmt;

/// The size of one frame.
pub const PAGE_SIZE: u64 = 4096;

/// Most free ranges tracked at once; the memory maps seen from BIOS and UEFI have well under this.
const MAX_RANGES: usize = 128;

/// A half-open physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl PhysRange {
    /// The range `[start, start + len)`, saturating at the top of the address space.
    pub const fn new(start: u64, len: u64) -> Self {
        Self { start, end: start.saturating_add(len) }
    }

    /// Its length in bytes.
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when it holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The largest page-aligned range inside this one.
    fn shrink_to_pages(self) -> Self {
        let start = self.start.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
        let end = self.end / PAGE_SIZE * PAGE_SIZE;
        Self { start, end: end.max(start) }
    }
}

/// Why the allocator refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No free run of `bytes` bytes aligned to `align` exists.
    OutOfMemory {
        /// Bytes asked for.
        bytes: u64,
        /// Alignment asked for.
        align: u64,
    },
    /// The free list is full (more than its fixed capacity of ranges).
    TooFragmented,
    /// An argument is not page-sized or a power-of-two alignment.
    BadRequest {
        /// Bytes asked for.
        bytes: u64,
        /// Alignment asked for.
        align: u64,
    },
    /// A range given back overlaps memory that is already free.
    DoubleFree {
        /// The range given back.
        range: PhysRange,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory { bytes, align } => {
                write!(f, "out of physical memory: no free run of {bytes:#x} bytes aligned to {align:#x}")
            }
            Self::TooFragmented => write!(f, "free list full: more than {MAX_RANGES} free ranges"),
            Self::BadRequest { bytes, align } => write!(
                f,
                "bad allocation request: {bytes:#x} bytes aligned to {align:#x}; expected a non-zero \
                 multiple of {PAGE_SIZE:#x} and a power-of-two alignment of at least {PAGE_SIZE:#x}"
            ),
            Self::DoubleFree { range } => {
                write!(f, "range {:#x}..{:#x} given back while (partly) free", range.start, range.end)
            }
        }
    }
}

/// Free physical memory as a sorted list of disjoint, non-adjacent page-aligned ranges.
#[derive(Debug, Default)]
pub struct FrameAllocator {
    free: heapless::Vec<PhysRange, MAX_RANGES>,
}

impl FrameAllocator {
    /// An allocator with no memory.
    pub const fn new() -> Self {
        Self { free: heapless::Vec::new() }
    }

    /// Adds available memory (only its whole pages). Overlaps with what is already free are merged.
    pub fn add(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let range = range.shrink_to_pages();
        if range.is_empty() {
            return Ok(());
        }
        // Remove the overlap first so `insert` sees disjoint input.
        self.reserve(range)?;
        self.insert(range)
    }

    /// Takes `range` out of the free memory (the kernel image, modules, firmware areas).
    pub fn reserve(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let mut i = 0;
        while i < self.free.len() {
            let cur = self.free[i];
            if cur.end <= range.start || range.end <= cur.start {
                i += 1;
                continue;
            }
            let below = PhysRange { start: cur.start, end: range.start.max(cur.start) };
            let above = PhysRange { start: range.end.min(cur.end), end: cur.end };
            let above = above.shrink_to_pages();
            let below = PhysRange { start: below.start, end: below.end / PAGE_SIZE * PAGE_SIZE };
            self.free.remove(i);
            if !above.is_empty() {
                self.free.insert(i, above).map_err(|_| FrameError::TooFragmented)?;
            }
            if !below.is_empty() {
                self.free.insert(i, below).map_err(|_| FrameError::TooFragmented)?;
                i += 1;
            }
            if !above.is_empty() {
                i += 1;
            }
        }
        Ok(())
    }

    /// Allocates `bytes` (a multiple of 4 KiB) at an address aligned to `align` (a power of two
    /// of at least 4 KiB). Takes the lowest fitting address.
    pub fn allocate(&mut self, bytes: u64, align: u64) -> Result<PhysRange, FrameError> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) || !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(FrameError::BadRequest { bytes, align });
        }
        for i in 0..self.free.len() {
            let cur = self.free[i];
            let Some(start) = cur.start.checked_next_multiple_of(align) else {
                continue;
            };
            let Some(end) = start.checked_add(bytes) else {
                continue;
            };
            if end > cur.end {
                continue;
            }
            let taken = PhysRange { start, end };
            self.reserve(taken)?;
            return Ok(taken);
        }
        Err(FrameError::OutOfMemory { bytes, align })
    }

    /// One 4 KiB frame.
    pub fn allocate_frame(&mut self) -> Result<u64, FrameError> {
        self.allocate(PAGE_SIZE, PAGE_SIZE).map(|r| r.start)
    }

    /// Gives back a range obtained from [`Self::allocate`].
    pub fn free(&mut self, range: PhysRange) -> Result<(), FrameError> {
        if range.is_empty() || !range.start.is_multiple_of(PAGE_SIZE) || !range.end.is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::BadRequest { bytes: range.len(), align: PAGE_SIZE });
        }
        if self.free.iter().any(|f| f.start < range.end && range.start < f.end) {
            return Err(FrameError::DoubleFree { range });
        }
        self.insert(range)
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(PhysRange::len).sum()
    }

    /// The free ranges, lowest first.
    pub fn free_ranges(&self) -> &[PhysRange] {
        &self.free
    }

    /// Inserts a range disjoint from every free range, merging with neighbours it touches.
    fn insert(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let i = self.free.partition_point(|f| f.start < range.start);
        let merge_prev = i > 0 && self.free[i - 1].end == range.start;
        let merge_next = i < self.free.len() && self.free[i].start == range.end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.free[i - 1].end = self.free[i].end;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].end = range.end,
            (false, true) => self.free[i].start = range.start,
            (false, false) => self.free.insert(i, range).map_err(|_| FrameError::TooFragmented)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn allocator(ranges: &[(u64, u64)]) -> FrameAllocator {
        let mut a = FrameAllocator::new();
        for &(start, end) in ranges {
            a.add(PhysRange { start, end }).unwrap();
        }
        a
    }

    #[test]
    fn partial_pages_at_the_edges_are_dropped() {
        let a = allocator(&[(0x1001, 0x5fff)]);
        assert_eq!(a.free_ranges(), &[PhysRange { start: 0x2000, end: 0x5000 }]);
    }

    #[test]
    fn reservations_split_ranges() {
        let mut a = allocator(&[(0, 16 * MIB)]);
        a.reserve(PhysRange { start: 0, end: MIB }).unwrap();
        a.reserve(PhysRange { start: 2 * MIB, end: 3 * MIB + 1 }).unwrap();
        assert_eq!(
            a.free_ranges(),
            &[PhysRange { start: MIB, end: 2 * MIB }, PhysRange { start: 3 * MIB + PAGE_SIZE, end: 16 * MIB }]
        );
        assert_eq!(a.free_bytes(), 14 * MIB - PAGE_SIZE);
    }

    #[test]
    fn aligned_allocation_skips_to_the_alignment() {
        let mut a = allocator(&[(MIB, 8 * MIB)]);
        let r = a.allocate(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(r, PhysRange { start: 2 * MIB, end: 4 * MIB });
        // The gap below the aligned run stays free.
        assert_eq!(a.allocate_frame().unwrap(), MIB);
    }

    #[test]
    fn exhaustion_and_bad_requests_are_named() {
        let mut a = allocator(&[(0, 2 * PAGE_SIZE)]);
        assert_eq!(
            a.allocate(3 * PAGE_SIZE, PAGE_SIZE),
            Err(FrameError::OutOfMemory { bytes: 3 * PAGE_SIZE, align: PAGE_SIZE })
        );
        assert!(matches!(a.allocate(100, PAGE_SIZE), Err(FrameError::BadRequest { .. })));
        assert!(matches!(a.allocate(PAGE_SIZE, 3 * PAGE_SIZE), Err(FrameError::BadRequest { .. })));
        assert_eq!(a.allocate_frame(), Ok(0));
        assert_eq!(a.allocate_frame(), Ok(PAGE_SIZE));
        assert!(a.allocate_frame().is_err());
    }

    #[test]
    fn freeing_merges_and_double_free_is_caught() {
        let mut a = allocator(&[(0, 4 * PAGE_SIZE)]);
        let x = a.allocate(PAGE_SIZE, PAGE_SIZE).unwrap();
        let y = a.allocate(PAGE_SIZE, PAGE_SIZE).unwrap();
        a.free(x).unwrap();
        assert_eq!(a.free(x), Err(FrameError::DoubleFree { range: x }));
        a.free(y).unwrap();
        assert_eq!(a.free_ranges(), &[PhysRange { start: 0, end: 4 * PAGE_SIZE }]);
    }

    #[test]
    fn overlapping_adds_merge() {
        let a = allocator(&[(0, 3 * MIB), (2 * MIB, 5 * MIB), (5 * MIB, 6 * MIB)]);
        assert_eq!(a.free_ranges(), &[PhysRange { start: 0, end: 6 * MIB }]);
    }

    #[test]
    fn allocations_never_overlap_reservations() {
        // A small deterministic sweep in place of a property test.
        let mut a = allocator(&[(0, 64 * MIB)]);
        let holes = [PhysRange::new(5 * MIB + 123, 77_777), PhysRange::new(31 * MIB, MIB)];
        for h in holes {
            a.reserve(h).unwrap();
        }
        let mut got = std::vec::Vec::new();
        while let Ok(r) = a.allocate(3 * PAGE_SIZE, PAGE_SIZE) {
            got.push(r);
        }
        for r in &got {
            for h in holes {
                assert!(r.end <= h.start || h.end <= r.start, "{r:?} overlaps {h:?}");
            }
        }
        got.sort();
        assert!(got.windows(2).all(|w| w[0].end <= w[1].start));
    }
}
