//! Digests of a whole guest for `checkpoint_verify`: CRC-32C of all guest RAM and of the whole
//! disk ([`GuestDigest`]), and per-unit digests (one CRC per 4 KiB page or 512-byte sector) so two
//! hosts that disagree can name the first page or sector that differs ([`first_difference`]).
#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

use crate::colo::checkpoint::Crc32c;

/// Page size of guest RAM digests.
pub const PAGE_BYTES: usize = 4096;
/// Sector size of disk digests.
pub const SECTOR_BYTES: usize = 512;

/// One guest's RAM and disk, digested.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestDigest {
    /// CRC-32C of all guest RAM.
    pub ram_crc: u32,
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// CRC-32C of the whole disk (0 bytes: no disk).
    pub disk_crc: u32,
    /// Bytes of disk.
    pub disk_bytes: u64,
}

impl GuestDigest {
    /// Digests `ram` and `disk`.
    pub fn of(ram: &[u8], disk: &[u8]) -> Self {
        Self {
            ram_crc: Crc32c::checksum(ram),
            ram_bytes: ram.len() as u64,
            disk_crc: Crc32c::checksum(disk),
            disk_bytes: disk.len() as u64,
        }
    }

    /// Whether RAM and disk agree.
    pub fn matches(&self, other: &Self) -> bool {
        self == other
    }
}

impl fmt::Display for GuestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ram crc32c={:08x} ({} bytes), disk crc32c={:08x} ({} bytes)",
            self.ram_crc, self.ram_bytes, self.disk_crc, self.disk_bytes
        )
    }
}

/// One CRC-32C per `unit` bytes of `bytes` (the last unit may be shorter).
pub fn unit_digests(bytes: &[u8], unit: usize) -> Vec<u32> {
    bytes.chunks(unit.max(1)).map(Crc32c::checksum).collect()
}

/// The index of the first unit whose digests differ; a length difference counts from the end
/// of the shorter list. `None` when both lists are equal.
pub fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_find_the_first_differing_page() {
        let mut ram = std::vec![0u8; 8 * PAGE_BYTES];
        let disk = std::vec![7u8; 4 * SECTOR_BYTES];
        let a = GuestDigest::of(&ram, &disk);
        let pages_a = unit_digests(&ram, PAGE_BYTES);
        assert_eq!(pages_a.len(), 8);
        ram[5 * PAGE_BYTES + 100] = 1;
        ram[7 * PAGE_BYTES] = 1;
        let b = GuestDigest::of(&ram, &disk);
        assert!(!a.matches(&b) && a.disk_crc == b.disk_crc && a.ram_bytes == b.ram_bytes);
        let pages_b = unit_digests(&ram, PAGE_BYTES);
        assert_eq!(first_difference(&pages_a, &pages_b), Some(5));
        assert_eq!(first_difference(&pages_a, &pages_a), None);
        assert_eq!(first_difference(&pages_a[..3], &pages_a), Some(3));
        assert_eq!(unit_digests(&disk[..700], SECTOR_BYTES).len(), 2);
        assert_eq!(a.ram_crc, Crc32c::checksum(&std::vec![0u8; 8 * PAGE_BYTES]));
        assert!(std::format!("{a}").contains("disk crc32c="));
    }
}
