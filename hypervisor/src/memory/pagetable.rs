//! One generic 4-level page-table builder and walker for second-level translation (Intel EPT,
//! AMD NPT) and anything else with 512-entry tables. The entry format is a type parameter
//! ([`EntryFormat`]); where tables live is the caller's ([`TableMemory`]: host-physical frames
//! on bare metal, a `Vec` in tests).
#![deny(unsafe_code)]

use core::fmt;
use core::marker::PhantomData;

use super::frames::FrameError;

const PAGE_4K: u64 = 1 << 12;
const PAGE_2M: u64 = 1 << 21;
/// Bits 51:12 of an entry: the next table or the page.
pub const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Storage for page tables.
pub trait TableMemory {
    /// Allocates a zeroed 4 KiB table; returns its physical address.
    fn allocate_table(&mut self) -> Result<u64, FrameError>;
    /// The table at `phys` (one this memory allocated).
    fn table(&mut self, phys: u64) -> &mut [u64; 512];
}

/// The size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB (a PTE).
    Size4K,
    /// 2 MiB (a PDE with the large-page bit).
    Size2M,
}

impl PageSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => PAGE_4K,
            Self::Size2M => PAGE_2M,
        }
    }
}

/// How entries of one kind of table are encoded.
pub trait EntryFormat {
    /// A non-leaf entry pointing at the table at `phys`.
    fn pointer(phys: u64) -> u64;
    /// A leaf entry mapping `phys` (readable, writable, executable, write-back).
    fn leaf(phys: u64, size: PageSize) -> u64;
    /// True if the entry maps or points at something.
    fn is_present(entry: u64) -> bool;
    /// True for a large-page leaf in a page directory.
    fn is_large(entry: u64) -> bool;
    /// The bit that allows writes through an entry.
    const WRITABLE: u64;
    /// The accessed flag (set by the processor on every level it walks, when enabled).
    const ACCESSED: u64;
    /// The dirty flag (set by the processor in leaves it writes through, when enabled).
    const DIRTY: u64;
}

/// Where a leaf lives: its table, its index there, and the size it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafSlot {
    /// Physical address of the table holding the leaf.
    pub table: u64,
    /// Index of the leaf in that table.
    pub index: usize,
    /// The guest address the leaf starts at.
    pub base: u64,
    /// What it maps.
    pub size: PageSize,
}

/// Why a mapping was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// An address or length not 4 KiB-aligned.
    Misaligned {
        /// The guest address.
        guest: u64,
        /// The host address.
        host: u64,
        /// The length.
        len: u64,
    },
    /// Part of the range is already mapped.
    AlreadyMapped {
        /// The guest address.
        guest: u64,
    },
    /// Above the 48-bit space four levels cover.
    OutOfRange {
        /// The guest address.
        guest: u64,
    },
    /// No frame for a table.
    Memory(FrameError),
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { guest, host, len } => {
                write!(
                    f,
                    "mapping {guest:#x} -> {host:#x} ({len:#x} bytes): expected 4 KiB-aligned addresses and length"
                )
            }
            Self::AlreadyMapped { guest } => write!(f, "guest address {guest:#x} is already mapped"),
            Self::OutOfRange { guest } => write!(f, "guest address {guest:#x} is beyond the 48-bit space"),
            Self::Memory(e) => write!(f, "page table frame: {e}"),
        }
    }
}

impl From<FrameError> for MapError {
    fn from(e: FrameError) -> Self {
        Self::Memory(e)
    }
}

/// A 4-level table rooted at `root`.
#[derive(Debug)]
pub struct PageTable<F> {
    root: u64,
    _format: PhantomData<F>,
}

fn index(addr: u64, level: u32) -> usize {
    ((addr >> (12 + 9 * level)) & 0x1FF) as usize
}

impl<F: EntryFormat> PageTable<F> {
    /// An empty table (allocates the root).
    pub fn new(mem: &mut dyn TableMemory) -> Result<Self, FrameError> {
        Ok(Self { root: mem.allocate_table()?, _format: PhantomData })
    }

    /// The root table's physical address (for EPTP / nCR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps `[guest, guest + len)` to `[host, host + len)`, with 2 MiB pages wherever both sides
    /// are 2 MiB-aligned and `large_pages` allows, 4 KiB pages elsewhere.
    pub fn map(
        &mut self,
        mem: &mut dyn TableMemory,
        guest: u64,
        host: u64,
        len: u64,
        large_pages: bool,
    ) -> Result<(), MapError> {
        if !(guest | host | len).is_multiple_of(PAGE_4K) {
            return Err(MapError::Misaligned { guest, host, len });
        }
        let mut offset = 0;
        while offset < len {
            let (g, h) = (guest + offset, host + offset);
            if g >> 48 != 0 {
                return Err(MapError::OutOfRange { guest: g });
            }
            let size = if large_pages && (g | h).is_multiple_of(PAGE_2M) && len - offset >= PAGE_2M {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            self.map_one(mem, g, h, size)?;
            offset += size.bytes();
        }
        Ok(())
    }

    fn map_one(&mut self, mem: &mut dyn TableMemory, guest: u64, host: u64, size: PageSize) -> Result<(), MapError> {
        let leaf_level = if size == PageSize::Size2M { 1 } else { 0 };
        let mut table = self.root;
        for level in (leaf_level + 1..=3).rev() {
            let i = index(guest, level);
            let entry = mem.table(table)[i];
            table = if F::is_present(entry) {
                if level == 1 && F::is_large(entry) {
                    return Err(MapError::AlreadyMapped { guest });
                }
                entry & ADDRESS_MASK
            } else {
                let next = mem.allocate_table()?;
                mem.table(table)[i] = F::pointer(next);
                next
            };
        }
        let slot = &mut mem.table(table)[index(guest, leaf_level)];
        if F::is_present(*slot) {
            return Err(MapError::AlreadyMapped { guest });
        }
        *slot = F::leaf(host, size);
        Ok(())
    }

    /// Calls `f(guest_address, size, entry)` for every leaf, lowest address first; `f` may
    /// change the entry (to clear dirty bits, for example).
    pub fn for_each_leaf(&self, mem: &mut dyn TableMemory, f: &mut dyn FnMut(u64, PageSize, &mut u64)) {
        self.walk(mem, self.root, 3, 0, f);
    }

    fn walk(
        &self,
        mem: &mut dyn TableMemory,
        table: u64,
        level: u32,
        base: u64,
        f: &mut dyn FnMut(u64, PageSize, &mut u64),
    ) {
        for i in 0..512 {
            let entry = mem.table(table)[i];
            if !F::is_present(entry) {
                continue;
            }
            let addr = base | ((i as u64) << (12 + 9 * level));
            match level {
                0 => f(addr, PageSize::Size4K, &mut mem.table(table)[i]),
                1 if F::is_large(entry) => f(addr, PageSize::Size2M, &mut mem.table(table)[i]),
                _ => self.walk(mem, entry & ADDRESS_MASK, level - 1, addr, f),
            }
        }
    }

    /// Applies `f` to the leaf entry mapping `guest`; false if nothing maps it.
    pub fn update_leaf(&self, mem: &mut dyn TableMemory, guest: u64, f: &mut dyn FnMut(&mut u64)) -> bool {
        let mut table = self.root;
        for level in (0..=3).rev() {
            let i = index(guest, level);
            let entry = mem.table(table)[i];
            if !F::is_present(entry) {
                return false;
            }
            if level == 0 || (level == 1 && F::is_large(entry)) {
                f(&mut mem.table(table)[i]);
                return true;
            }
            table = entry & ADDRESS_MASK;
        }
        false
    }

    /// Where the leaf mapping `guest` lives, if anything maps it.
    pub fn leaf_slot(&self, mem: &mut dyn TableMemory, guest: u64) -> Option<LeafSlot> {
        let mut table = self.root;
        for level in (0..=3).rev() {
            let i = index(guest, level);
            let entry = mem.table(table)[i];
            if !F::is_present(entry) {
                return None;
            }
            if level == 0 {
                return Some(LeafSlot { table, index: i, base: guest & !(PAGE_4K - 1), size: PageSize::Size4K });
            }
            if level == 1 && F::is_large(entry) {
                return Some(LeafSlot { table, index: i, base: guest & !(PAGE_2M - 1), size: PageSize::Size2M });
            }
            table = entry & ADDRESS_MASK;
        }
        None
    }

    /// Replaces the 2 MiB leaf at `slot` with the table `new_table` (a zeroed frame the caller
    /// owns from now on as part of this table) holding 512 4 KiB leaves over the same host range,
    /// all without write permission when the large leaf had none.
    pub fn split_large(&self, mem: &mut dyn TableMemory, slot: LeafSlot, new_table: u64) {
        let entry = mem.table(slot.table)[slot.index];
        let host = entry & ADDRESS_MASK & !(PAGE_2M - 1);
        let keep_write = entry & F::WRITABLE != 0;
        let t = mem.table(new_table);
        for (i, e) in t.iter_mut().enumerate() {
            let leaf = F::leaf(host + i as u64 * PAGE_4K, PageSize::Size4K);
            *e = if keep_write { leaf } else { leaf & !F::WRITABLE };
        }
        mem.table(slot.table)[slot.index] = F::pointer(new_table);
    }

    /// Calls `f(guest_address, size, entry)` for every leaf under a non-leaf entry with its
    /// Accessed flag set, and clears that flag on the way: subtrees the processor did not walk
    /// since the last call are skipped, so the cost follows what the guest touched, not its size.
    /// After it the caller must invalidate cached translations (paging-structure caches too), or a
    /// later walk served from a cache would not set the flag again. Returns the leaves visited.
    pub fn for_each_accessed_leaf(&self, mem: &mut dyn TableMemory, f: &mut dyn FnMut(u64, PageSize, &mut u64)) -> u64 {
        self.walk_accessed(mem, self.root, 3, 0, f)
    }

    fn walk_accessed(
        &self,
        mem: &mut dyn TableMemory,
        table: u64,
        level: u32,
        base: u64,
        f: &mut dyn FnMut(u64, PageSize, &mut u64),
    ) -> u64 {
        let mut visited = 0;
        for i in 0..512 {
            let entry = mem.table(table)[i];
            if !F::is_present(entry) {
                continue;
            }
            let addr = base | ((i as u64) << (12 + 9 * level));
            match level {
                0 => {
                    visited += 1;
                    f(addr, PageSize::Size4K, &mut mem.table(table)[i]);
                }
                1 if F::is_large(entry) => {
                    visited += 1;
                    f(addr, PageSize::Size2M, &mut mem.table(table)[i]);
                }
                _ if entry & F::ACCESSED == 0 => {}
                _ => {
                    mem.table(table)[i] = entry & !F::ACCESSED;
                    visited += self.walk_accessed(mem, entry & ADDRESS_MASK, level - 1, addr, f);
                }
            }
        }
        visited
    }

    /// The leaf mapping `guest`: its host address and size.
    pub fn translate(&self, mem: &mut dyn TableMemory, guest: u64) -> Option<(u64, PageSize)> {
        let mut table = self.root;
        for level in (0..=3).rev() {
            let entry = mem.table(table)[index(guest, level)];
            if !F::is_present(entry) {
                return None;
            }
            if level == 0 {
                return Some(((entry & ADDRESS_MASK) | (guest & (PAGE_4K - 1)), PageSize::Size4K));
            }
            if level == 1 && F::is_large(entry) {
                return Some(((entry & ADDRESS_MASK & !(PAGE_2M - 1)) | (guest & (PAGE_2M - 1)), PageSize::Size2M));
            }
            table = entry & ADDRESS_MASK;
        }
        None
    }
}

/// Intel EPT entries (SDM Vol. 3C §29.3.2, Tables 29-1 to 29-6): R/W/X in bits 2:0, memory type
/// in bits 5:3 of leaves (6 = write-back), bit 7 = 2 MiB page, bits 8/9 = accessed/dirty.
#[derive(Debug)]
pub enum EptFormat {}

/// EPT read/write/execute.
pub const EPT_RWX: u64 = 0b111;
/// EPT write permission.
pub const EPT_WRITE: u64 = 0b010;
/// EPT accessed flag (when EPTP bit 6 enables A/D).
pub const EPT_ACCESSED: u64 = 1 << 8;
/// EPT dirty flag.
pub const EPT_DIRTY: u64 = 1 << 9;
const EPT_MEMTYPE_WB: u64 = 6 << 3;
const EPT_LARGE: u64 = 1 << 7;

impl EntryFormat for EptFormat {
    fn pointer(phys: u64) -> u64 {
        phys | EPT_RWX
    }
    fn leaf(phys: u64, size: PageSize) -> u64 {
        phys | EPT_RWX | EPT_MEMTYPE_WB | if size == PageSize::Size2M { EPT_LARGE } else { 0 }
    }
    fn is_present(entry: u64) -> bool {
        entry & EPT_RWX != 0
    }
    fn is_large(entry: u64) -> bool {
        entry & EPT_LARGE != 0
    }
    const WRITABLE: u64 = EPT_WRITE;
    const ACCESSED: u64 = EPT_ACCESSED;
    const DIRTY: u64 = EPT_DIRTY;
}

/// x86-64 / AMD NPT entries (APM Vol. 2 §5.3, §15.25.5): present, writable and user (NPT walks
/// are user accesses) on every level; bit 7 = 2 MiB page; bits 5/6 = accessed/dirty.
#[derive(Debug)]
pub enum X86Format {}

/// Present | writable | user.
pub const X86_PRESENT_RW_USER: u64 = 0b111;
/// Read/write.
pub const X86_WRITABLE: u64 = 0b010;
/// Accessed flag.
pub const X86_ACCESSED: u64 = 1 << 5;
/// Dirty flag.
pub const X86_DIRTY: u64 = 1 << 6;
const X86_LARGE: u64 = 1 << 7;

impl EntryFormat for X86Format {
    fn pointer(phys: u64) -> u64 {
        phys | X86_PRESENT_RW_USER
    }
    fn leaf(phys: u64, size: PageSize) -> u64 {
        phys | X86_PRESENT_RW_USER | if size == PageSize::Size2M { X86_LARGE } else { 0 }
    }
    fn is_present(entry: u64) -> bool {
        entry & 1 != 0
    }
    fn is_large(entry: u64) -> bool {
        entry & X86_LARGE != 0
    }
    const WRITABLE: u64 = X86_WRITABLE;
    const ACCESSED: u64 = X86_ACCESSED;
    const DIRTY: u64 = X86_DIRTY;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Tables in a Vec; "physical" addresses are 0x1000 * (index + 1).
    #[derive(Default)]
    struct VecTables(Vec<[u64; 512]>);

    impl TableMemory for VecTables {
        fn allocate_table(&mut self) -> Result<u64, FrameError> {
            self.0.push([0; 512]);
            Ok(self.0.len() as u64 * PAGE_4K)
        }
        fn table(&mut self, phys: u64) -> &mut [u64; 512] {
            &mut self.0[(phys / PAGE_4K - 1) as usize]
        }
    }

    #[test]
    fn large_pages_where_aligned_small_elsewhere() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<EptFormat>::new(&mut mem).unwrap();
        // 4 MiB + 8 KiB at an aligned host address: two 2 MiB leaves and two 4 KiB leaves.
        pt.map(&mut mem, 0, 0x4000_0000, (4 << 20) + 0x2000, true).unwrap();
        let mut leaves = Vec::new();
        pt.for_each_leaf(&mut mem, &mut |addr, size, _| leaves.push((addr, size)));
        assert_eq!(
            leaves,
            [
                (0, PageSize::Size2M),
                (2 << 20, PageSize::Size2M),
                (4 << 20, PageSize::Size4K),
                ((4 << 20) + 0x1000, PageSize::Size4K)
            ]
        );
        assert_eq!(pt.translate(&mut mem, 0x1234), Some((0x4000_1234, PageSize::Size2M)));
        assert_eq!(pt.translate(&mut mem, (4 << 20) + 0x1010), Some((0x4040_1010, PageSize::Size4K)));
        assert_eq!(pt.translate(&mut mem, 5 << 20), None, "nothing past the range");
    }

    #[test]
    fn unaligned_host_uses_small_pages_and_overlap_is_refused() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<X86Format>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0x1000, 2 << 20, true).unwrap();
        let mut count = 0;
        pt.for_each_leaf(&mut mem, &mut |_, size, _| {
            assert_eq!(size, PageSize::Size4K);
            count += 1;
        });
        assert_eq!(count, 512);
        assert_eq!(pt.map(&mut mem, 0x5000, 0, 0x1000, true), Err(MapError::AlreadyMapped { guest: 0x5000 }));
        assert!(matches!(pt.map(&mut mem, 0x123, 0, 0x1000, true), Err(MapError::Misaligned { .. })));
        assert!(matches!(pt.map(&mut mem, 1 << 48, 0, 0x1000, true), Err(MapError::OutOfRange { .. })));
    }

    #[test]
    fn update_leaf_reaches_one_entry() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<EptFormat>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0, 0x3000, false).unwrap();
        assert!(pt.update_leaf(&mut mem, 0x2fff, &mut |e| *e |= EPT_DIRTY));
        assert!(!pt.update_leaf(&mut mem, 0x3000, &mut |e| *e |= EPT_DIRTY));
        let mut dirty = Vec::new();
        pt.for_each_leaf(&mut mem, &mut |addr, _, e| {
            if *e & EPT_DIRTY != 0 {
                dirty.push(addr);
            }
        });
        assert_eq!(dirty, [0x2000]);
    }

    #[test]
    fn leaf_visitor_can_clear_bits() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<EptFormat>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0, 0x3000, false).unwrap();
        pt.for_each_leaf(&mut mem, &mut |addr, _, e| {
            if addr == 0x1000 {
                *e |= EPT_DIRTY;
            }
        });
        let mut dirty = Vec::new();
        pt.for_each_leaf(&mut mem, &mut |addr, _, e| {
            if *e & EPT_DIRTY != 0 {
                dirty.push(addr);
                *e &= !EPT_DIRTY;
            }
        });
        assert_eq!(dirty, [0x1000]);
        pt.for_each_leaf(&mut mem, &mut |_, _, e| assert_eq!(*e & EPT_DIRTY, 0));
    }

    #[test]
    fn accessed_scan_skips_subtrees_not_walked() {
        let mut mem = VecTables::default();
        let mut pt = PageTable::<X86Format>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0, 0, 8 << 20, false).unwrap();
        // Nothing walked yet: no upper-level Accessed flag, so no leaf is visited.
        assert_eq!(pt.for_each_accessed_leaf(&mut mem, &mut |_, _, _| {}), 0);
        // Play the hardware's walk to 0x40_3000: Accessed on PML4E, PDPTE, PDE; Dirty on the PTE.
        let slot = pt.leaf_slot(&mut mem, 0x40_3000).unwrap();
        let (root, pdpt) = (pt.root(), mem.table(pt.root())[0] & ADDRESS_MASK);
        let pd = mem.table(pdpt)[0] & ADDRESS_MASK;
        mem.table(root)[0] |= X86_ACCESSED;
        mem.table(pdpt)[0] |= X86_ACCESSED;
        mem.table(pd)[2] |= X86_ACCESSED;
        mem.table(slot.table)[slot.index] |= X86_DIRTY;
        let mut dirty = Vec::new();
        let visited = pt.for_each_accessed_leaf(&mut mem, &mut |a, _, e| {
            if *e & X86_DIRTY != 0 {
                dirty.push(a);
                *e &= !X86_DIRTY;
            }
        });
        assert_eq!((visited, dirty), (512, std::vec![0x40_3000]), "one 2 MiB subtree of four");
        assert_eq!(mem.table(pd)[2] & X86_ACCESSED, 0, "cleared for the next epoch");
        assert_eq!(pt.for_each_accessed_leaf(&mut mem, &mut |_, _, _| {}), 0);
    }
}
