//! Block replication on the secondary.
//!
//! - PVM writes arrive between checkpoints tagged with the epoch of the checkpoint that will
//!   cover them. They wait in a pending buffer and reach the disk only when that checkpoint
//!   commits ([`BlockReplica::commit`]). The SVM never sees them before that.
//! - The SVM's own writes go to an overlay. Reads by the SVM see the overlay first, then the
//!   disk. Each checkpoint commit drops the overlay (the SVM is reset to the PVM's state).
//! - On failover ([`BlockReplica::failover`]) pending writes of uncommitted epochs are dropped
//!   (the primary died before covering them: the disk stays at the last consistent state) and
//!   the overlay is merged into the disk (the promoted SVM keeps its own history).
//!
//! Every request is range- and length-checked before anything is buffered or written, so a
//! rejected request changes nothing.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

/// Sector size in bytes.
pub const SECTOR_SIZE: usize = 512;
const _: () = assert!(SECTOR_SIZE.is_power_of_two());

/// Why a block request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// Request reaches past the end of the disk.
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors requested.
        count: u64,
        /// Disk size in sectors.
        disk_sectors: u64,
    },
    /// Data length not a non-zero multiple of the sector size.
    Misaligned {
        /// Length given.
        len: usize,
    },
    /// PVM write for an epoch that already committed.
    EpochAlreadyCommitted {
        /// Epoch of the write or commit.
        epoch: u64,
        /// Last committed epoch.
        committed: u64,
    },
    /// Pending buffer would exceed its cap.
    PendingFull {
        /// Bytes that would be pending.
        needed: usize,
        /// Cap.
        max: usize,
    },
    /// The backend failed.
    Backend {
        /// Sector.
        sector: u64,
    },
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { sector, count, disk_sectors } => write!(
                f,
                "block request of {count} sectors at sector {sector} ends past the disk, expected to end by sector {disk_sectors}"
            ),
            Self::Misaligned { len } => write!(
                f,
                "block data is {len} bytes, expected a non-zero multiple of {SECTOR_SIZE}"
            ),
            Self::EpochAlreadyCommitted { epoch, committed } => write!(
                f,
                "epoch {epoch} already committed, expected an epoch above {committed}"
            ),
            Self::PendingFull { needed, max } => write!(
                f,
                "pending PVM writes would take {needed} bytes, expected at most {max}"
            ),
            Self::Backend { sector } => write!(f, "disk backend failed at sector {sector}"),
        }
    }
}

/// A disk of 512-byte sectors.
pub trait BlockBackend {
    /// Size in sectors.
    fn sector_count(&self) -> u64;
    /// Reads one sector.
    fn read_sector(&self, sector: u64, buf: &mut [u8; SECTOR_SIZE]) -> Result<(), BlockError>;
    /// Writes one sector.
    fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR_SIZE]) -> Result<(), BlockError>;
}

/// In-memory disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDisk {
    bytes: Vec<u8>,
}

impl MemDisk {
    /// A zeroed disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Self { bytes: alloc::vec![0; sectors as usize * SECTOR_SIZE] }
    }

    /// All bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl BlockBackend for MemDisk {
    fn sector_count(&self) -> u64 {
        (self.bytes.len() / SECTOR_SIZE) as u64
    }
    fn read_sector(&self, sector: u64, buf: &mut [u8; SECTOR_SIZE]) -> Result<(), BlockError> {
        let s = usize::try_from(sector).map_err(|_| BlockError::Backend { sector })? * SECTOR_SIZE;
        let src = self.bytes.get(s..s + SECTOR_SIZE).ok_or(BlockError::Backend { sector })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR_SIZE]) -> Result<(), BlockError> {
        let s = usize::try_from(sector).map_err(|_| BlockError::Backend { sector })? * SECTOR_SIZE;
        let dst = self.bytes.get_mut(s..s + SECTOR_SIZE).ok_or(BlockError::Backend { sector })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct PendingWrite {
    epoch: u64,
    sector: u64,
    data: Vec<u8>,
}

/// Totals of a commit or failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockReport {
    /// PVM sectors written to disk.
    pub pvm_sectors_applied: u64,
    /// PVM sectors dropped (uncommitted epochs).
    pub pvm_sectors_discarded: u64,
    /// SVM overlay sectors dropped.
    pub overlay_sectors_dropped: u64,
    /// SVM overlay sectors merged into disk.
    pub overlay_sectors_merged: u64,
}

/// Secondary-side block state: disk, pending PVM writes, SVM overlay.
#[derive(Debug)]
pub struct BlockReplica<B: BlockBackend> {
    disk: B,
    pending: Vec<PendingWrite>,
    pending_bytes: usize,
    max_pending_bytes: usize,
    overlay: BTreeMap<u64, [u8; SECTOR_SIZE]>,
    committed: Option<u64>,
}

impl<B: BlockBackend> BlockReplica<B> {
    /// Wraps `disk`; at most `max_pending_bytes` of PVM writes may wait for a commit.
    pub fn new(disk: B, max_pending_bytes: usize) -> Self {
        Self {
            disk,
            pending: Vec::new(),
            pending_bytes: 0,
            max_pending_bytes,
            overlay: BTreeMap::new(),
            committed: None,
        }
    }

    /// The disk.
    pub fn disk(&self) -> &B {
        &self.disk
    }

    /// Consumes the replica, returning the disk.
    pub fn into_disk(self) -> B {
        self.disk
    }

    /// Last committed epoch.
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    /// Bytes of PVM writes waiting for a commit.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Sectors in the SVM overlay.
    pub fn overlay_sectors(&self) -> usize {
        self.overlay.len()
    }

    fn check(&self, sector: u64, len: usize) -> Result<u64, BlockError> {
        if len == 0 || len & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::Misaligned { len });
        }
        let count = (len / SECTOR_SIZE) as u64;
        let disk_sectors = self.disk.sector_count();
        match sector.checked_add(count) {
            Some(end) if end <= disk_sectors => Ok(count),
            _ => Err(BlockError::OutOfRange { sector, count, disk_sectors }),
        }
    }

    /// Buffers a PVM write that the checkpoint `epoch` will cover.
    pub fn pvm_write(&mut self, epoch: u64, sector: u64, data: &[u8]) -> Result<(), BlockError> {
        self.check(sector, data.len())?;
        if let Some(committed) = self.committed {
            if epoch <= committed {
                return Err(BlockError::EpochAlreadyCommitted { epoch, committed });
            }
        }
        let needed = self.pending_bytes + data.len();
        if needed > self.max_pending_bytes {
            return Err(BlockError::PendingFull { needed, max: self.max_pending_bytes });
        }
        self.pending.push(PendingWrite { epoch, sector, data: data.to_vec() });
        self.pending_bytes = needed;
        Ok(())
    }

    /// The SVM writes: goes to the overlay only.
    pub fn svm_write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlockError> {
        self.check(sector, data.len())?;
        for (i, chunk) in data.chunks_exact(SECTOR_SIZE).enumerate() {
            let mut s = [0u8; SECTOR_SIZE];
            s.copy_from_slice(chunk);
            self.overlay.insert(sector + i as u64, s);
        }
        Ok(())
    }

    /// The SVM reads: overlay first, then the disk. Pending PVM writes are invisible.
    pub fn svm_read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(sector, buf.len())?;
        for (i, chunk) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let s = sector + i as u64;
            if let Some(o) = self.overlay.get(&s) {
                chunk.copy_from_slice(o);
            } else {
                let mut tmp = [0u8; SECTOR_SIZE];
                self.disk.read_sector(s, &mut tmp)?;
                chunk.copy_from_slice(&tmp);
            }
        }
        Ok(())
    }

    fn write_through(disk: &mut B, sector: u64, data: &[u8]) -> Result<u64, BlockError> {
        let mut n = 0;
        for (i, chunk) in data.chunks_exact(SECTOR_SIZE).enumerate() {
            let mut s = [0u8; SECTOR_SIZE];
            s.copy_from_slice(chunk);
            disk.write_sector(sector + i as u64, &s)?;
            n += 1;
        }
        Ok(n)
    }

    /// Checkpoint `epoch` committed: PVM writes of every epoch up to it go to disk in arrival
    /// order, and the SVM overlay is dropped. Later epochs stay pending.
    ///
    /// Write first, then switch state: the writes go to disk before anything is forgotten, so a
    /// disk error leaves the pending writes, the overlay and the committed epoch as they were,
    /// and the same commit can be retried (the writes are idempotent: each puts fixed bytes at
    /// a fixed sector, in the same order).
    pub fn commit(&mut self, epoch: u64) -> Result<BlockReport, BlockError> {
        if let Some(committed) = self.committed {
            if epoch <= committed {
                return Err(BlockError::EpochAlreadyCommitted { epoch, committed });
            }
        }
        let mut report = BlockReport { overlay_sectors_dropped: self.overlay.len() as u64, ..BlockReport::default() };
        for w in self.pending.iter().filter(|w| w.epoch <= epoch) {
            report.pvm_sectors_applied += Self::write_through(&mut self.disk, w.sector, &w.data)?;
        }
        self.pending.retain(|w| w.epoch > epoch);
        self.pending_bytes = self.pending.iter().map(|w| w.data.len()).sum();
        self.overlay.clear();
        self.committed = Some(epoch);
        Ok(report)
    }

    /// The primary is gone: drop uncommitted PVM writes, merge the SVM overlay into the disk.
    /// The overlay is dropped only once all of it is on disk, so a disk error can be retried.
    pub fn failover(&mut self) -> Result<BlockReport, BlockError> {
        let mut report = BlockReport {
            pvm_sectors_discarded: self.pending.iter().map(|w| (w.data.len() / SECTOR_SIZE) as u64).sum(),
            ..BlockReport::default()
        };
        self.pending.clear();
        self.pending_bytes = 0;
        for (s, data) in &self.overlay {
            self.disk.write_sector(*s, data)?;
            report.overlay_sectors_merged += 1;
        }
        self.overlay.clear();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sec(v: u8) -> Vec<u8> {
        vec![v; SECTOR_SIZE]
    }

    fn replica() -> BlockReplica<MemDisk> {
        BlockReplica::new(MemDisk::new(16), 8 * SECTOR_SIZE)
    }

    fn read(r: &BlockReplica<MemDisk>, s: u64) -> u8 {
        let mut b = vec![0u8; SECTOR_SIZE];
        r.svm_read(s, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == b[0]));
        b[0]
    }

    #[test]
    fn pvm_writes_invisible_until_commit() {
        let mut r = replica();
        r.pvm_write(1, 3, &sec(7)).unwrap();
        assert_eq!(read(&r, 3), 0);
        assert_eq!(r.disk().as_bytes()[3 * SECTOR_SIZE], 0);
        let rep = r.commit(1).unwrap();
        assert_eq!(rep.pvm_sectors_applied, 1);
        assert_eq!(read(&r, 3), 7);
        assert_eq!(r.pending_bytes(), 0);
    }

    #[test]
    fn commit_applies_only_covered_epochs_in_order() {
        let mut r = replica();
        r.pvm_write(1, 0, &sec(1)).unwrap();
        r.pvm_write(1, 0, &sec(2)).unwrap();
        r.pvm_write(2, 1, &sec(3)).unwrap();
        r.commit(1).unwrap();
        assert_eq!(read(&r, 0), 2);
        assert_eq!(read(&r, 1), 0);
        r.commit(2).unwrap();
        assert_eq!(read(&r, 1), 3);
    }

    #[test]
    fn svm_overlay_read_through_and_dropped_on_commit() {
        let mut r = replica();
        r.svm_write(5, &[sec(9), sec(8)].concat()).unwrap();
        assert_eq!(read(&r, 5), 9);
        assert_eq!(read(&r, 6), 8);
        assert_eq!(r.disk().as_bytes()[5 * SECTOR_SIZE], 0);
        let rep = r.commit(1).unwrap();
        assert_eq!(rep.overlay_sectors_dropped, 2);
        assert_eq!(read(&r, 5), 0);
    }

    #[test]
    fn failover_discards_uncommitted_and_merges_overlay() {
        let mut r = replica();
        r.pvm_write(1, 0, &sec(1)).unwrap();
        r.commit(1).unwrap();
        r.pvm_write(2, 0, &sec(2)).unwrap(); // primary dies before epoch 2 commits
        r.svm_write(4, &sec(4)).unwrap();
        let rep = r.failover().unwrap();
        assert_eq!(rep.pvm_sectors_discarded, 1);
        assert_eq!(rep.overlay_sectors_merged, 1);
        let d = r.into_disk();
        assert_eq!(d.as_bytes()[0], 1);
        assert_eq!(d.as_bytes()[4 * SECTOR_SIZE], 4);
    }

    #[test]
    fn bad_requests_named_and_change_nothing() {
        let mut r = replica();
        assert_eq!(r.pvm_write(1, 0, &[0; 100]), Err(BlockError::Misaligned { len: 100 }));
        assert_eq!(r.svm_write(0, &[]), Err(BlockError::Misaligned { len: 0 }));
        assert_eq!(r.svm_write(15, &[0; 1024]), Err(BlockError::OutOfRange { sector: 15, count: 2, disk_sectors: 16 }));
        assert_eq!(
            r.pvm_write(1, u64::MAX, &sec(1)),
            Err(BlockError::OutOfRange { sector: u64::MAX, count: 1, disk_sectors: 16 })
        );
        assert_eq!(r.overlay_sectors(), 0);
        assert_eq!(r.pending_bytes(), 0);
        r.commit(3).unwrap();
        assert_eq!(r.pvm_write(3, 0, &sec(1)), Err(BlockError::EpochAlreadyCommitted { epoch: 3, committed: 3 }));
        assert_eq!(r.commit(2), Err(BlockError::EpochAlreadyCommitted { epoch: 2, committed: 3 }));
        let e = BlockError::Misaligned { len: 100 }.to_string();
        assert!(e.contains("100") && e.contains("512"));
    }

    #[test]
    fn pending_cap_enforced() {
        let mut r = BlockReplica::new(MemDisk::new(16), 2 * SECTOR_SIZE);
        r.pvm_write(1, 0, &[0; 1024]).unwrap();
        assert_eq!(r.pvm_write(1, 2, &sec(1)), Err(BlockError::PendingFull { needed: 1536, max: 1024 }));
    }

    /// A disk whose `fail_at`-th write (counting from 0) fails once.
    #[derive(Debug)]
    struct FlakyDisk {
        disk: MemDisk,
        writes: u32,
        fail_at: Option<u32>,
    }

    impl BlockBackend for FlakyDisk {
        fn sector_count(&self) -> u64 {
            self.disk.sector_count()
        }
        fn read_sector(&self, sector: u64, buf: &mut [u8; SECTOR_SIZE]) -> Result<(), BlockError> {
            self.disk.read_sector(sector, buf)
        }
        fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR_SIZE]) -> Result<(), BlockError> {
            let n = self.writes;
            self.writes += 1;
            if self.fail_at == Some(n) {
                self.fail_at = None;
                return Err(BlockError::Backend { sector });
            }
            self.disk.write_sector(sector, data)
        }
    }

    /// Issue 15, item 6: a disk error on the second write of a commit loses nothing; the
    /// retried commit writes everything and only then drops the overlay.
    #[test]
    fn commit_survives_a_disk_error_and_can_be_retried() {
        let disk = FlakyDisk { disk: MemDisk::new(16), writes: 0, fail_at: Some(1) };
        let mut r = BlockReplica::new(disk, 8 * SECTOR_SIZE);
        r.pvm_write(1, 2, &sec(5)).unwrap();
        r.pvm_write(1, 3, &sec(6)).unwrap();
        r.pvm_write(2, 4, &sec(7)).unwrap();
        r.svm_write(9, &sec(9)).unwrap();
        assert_eq!(r.commit(1), Err(BlockError::Backend { sector: 3 }));
        assert_eq!(r.committed_epoch(), None);
        assert_eq!(r.pending_bytes(), 3 * SECTOR_SIZE);
        assert_eq!(r.overlay_sectors(), 1);
        let report = r.commit(1).unwrap();
        assert_eq!(report.pvm_sectors_applied, 2);
        assert_eq!(r.committed_epoch(), Some(1));
        assert_eq!(r.overlay_sectors(), 0);
        assert_eq!(r.pending_bytes(), SECTOR_SIZE);
        let bytes = r.disk().disk.as_bytes();
        assert_eq!((bytes[2 * SECTOR_SIZE], bytes[3 * SECTOR_SIZE], bytes[4 * SECTOR_SIZE]), (5, 6, 0));
    }

    #[test]
    fn failover_merge_survives_a_disk_error() {
        let disk = FlakyDisk { disk: MemDisk::new(16), writes: 0, fail_at: Some(1) };
        let mut r = BlockReplica::new(disk, 8 * SECTOR_SIZE);
        r.svm_write(1, &sec(1)).unwrap();
        r.svm_write(2, &sec(2)).unwrap();
        assert!(r.failover().is_err());
        assert_eq!(r.overlay_sectors(), 2);
        assert_eq!(r.failover().unwrap().overlay_sectors_merged, 2);
        let bytes = r.disk().disk.as_bytes();
        assert_eq!((bytes[SECTOR_SIZE], bytes[2 * SECTOR_SIZE]), (1, 2));
    }
}
