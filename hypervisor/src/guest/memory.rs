//! Guest RAM access with bounds checks: every guest-physical range a guest names (hypercall
//! pointers, ELF segments) is checked here, with overflow-safe arithmetic, before any byte moves.
#![deny(unsafe_code)]

use core::fmt;

/// Why a guest-memory access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// `[gpa, gpa + len)` is not inside `[0, size)`.
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The guest's RAM size.
        size: u64,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { gpa, len, size } => write!(
                f,
                "guest-physical range {gpa:#x}+{len:#x} is outside guest RAM; expected a range within 0..{size:#x}"
            ),
        }
    }
}

/// Guest-physical memory.
pub trait GuestMemory {
    /// Bytes of RAM, from guest-physical 0.
    fn size(&self) -> u64;
    /// The bytes `[gpa, gpa + len)`, if they are all RAM.
    fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemoryError>;
    /// The bytes `[gpa, gpa + len)` for writing, if they are all RAM.
    fn slice_mut(&mut self, gpa: u64, len: u64) -> Result<&mut [u8], MemoryError>;

    /// Copies `data` to `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.slice_mut(gpa, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }

    /// Writes a little-endian u64.
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        self.write(gpa, &value.to_le_bytes())
    }
}

/// Guest RAM backed by one contiguous host buffer (host-physical memory on bare metal, a `Vec`
/// in tests).
#[derive(Debug)]
pub struct GuestRam<'a> {
    bytes: &'a mut [u8],
}

impl<'a> GuestRam<'a> {
    /// Guest RAM over `bytes`; guest-physical 0 is `bytes[0]`.
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Self { bytes }
    }

    fn range(&self, gpa: u64, len: u64) -> Result<core::ops::Range<usize>, MemoryError> {
        let size = self.size();
        match gpa.checked_add(len) {
            Some(end) if end <= size => Ok(gpa as usize..end as usize),
            _ => Err(MemoryError::OutOfRange { gpa, len, size }),
        }
    }
}

impl GuestMemory for GuestRam<'_> {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemoryError> {
        let r = self.range(gpa, len)?;
        Ok(&self.bytes[r])
    }

    fn slice_mut(&mut self, gpa: u64, len: u64) -> Result<&mut [u8], MemoryError> {
        let r = self.range(gpa, len)?;
        Ok(&mut self.bytes[r])
    }
}

/// Guest RAM whose every host write is recorded in a [`DirtyLog`]: the path device models and
/// hypercalls use, so what the hypervisor writes into a guest joins the dirty set the hardware
/// keeps. A mutable slice counts as written.
#[derive(Debug)]
pub struct TrackedMemory<'a, 'b> {
    /// The RAM.
    pub ram: GuestRam<'a>,
    /// Where writes are recorded.
    pub log: &'b mut crate::memory::DirtyLog,
}

impl GuestMemory for TrackedMemory<'_, '_> {
    fn size(&self) -> u64 {
        self.ram.size()
    }

    fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemoryError> {
        self.ram.slice(gpa, len)
    }

    fn slice_mut(&mut self, gpa: u64, len: u64) -> Result<&mut [u8], MemoryError> {
        let slice = self.ram.slice_mut(gpa, len)?;
        self.log.mark_range(gpa, len);
        Ok(slice)
    }
}

/// Lets a verified checkpoint be applied straight into guest RAM.
impl crate::colo::checkpoint::GuestMemoryMut for GuestRam<'_> {
    fn page_size(&self) -> usize {
        4096
    }

    fn frame_count(&self) -> u64 {
        self.size() / 4096
    }

    fn frame_mut(&mut self, gfn: u64) -> &mut [u8] {
        let start = (gfn * 4096) as usize;
        &mut self.bytes[start..start + 4096]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_without_overflow() {
        let mut buf = [0u8; 4096];
        let mut ram = GuestRam::new(&mut buf);
        assert!(ram.slice(0, 4096).is_ok());
        assert!(ram.slice(4096, 0).is_ok());
        assert_eq!(ram.slice(4095, 2), Err(MemoryError::OutOfRange { gpa: 4095, len: 2, size: 4096 }));
        assert!(ram.slice(u64::MAX, 2).is_err());
        assert!(ram.slice(8, u64::MAX).is_err());
        ram.write_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(ram.slice(8, 1).unwrap(), &[0x88]);
        assert!(ram.write(4090, &[0; 8]).is_err());
        assert!(ram.slice(4090, 8).unwrap_err().to_string().contains("outside guest RAM"));
    }

    #[test]
    fn tracked_writes_join_the_dirty_log() {
        let mut buf = std::vec![0u8; 4 * 4096];
        let mut log = crate::memory::DirtyLog::new(4);
        let mut mem = TrackedMemory { ram: GuestRam::new(&mut buf), log: &mut log };
        mem.write(4096 + 4000, &[1; 200]).unwrap();
        let _ = mem.slice(0, 4096).unwrap();
        assert!(mem.write(4 * 4096, &[1]).is_err());
        assert_eq!(log.take(), [1, 2]);
    }
}
