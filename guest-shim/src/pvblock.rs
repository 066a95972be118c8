//! The paravirtual block device from the guest side: synchronous sector reads and writes.

use crate::abi::{
    Hypercall, HypercallError, PvBlockRequest, BLOCK_OP_FLUSH, BLOCK_OP_READ, BLOCK_OP_WRITE, BLOCK_REQUEST_MAX,
    BLOCK_SECTOR_SIZE,
};
use crate::rt::hypercall;

/// Why a disk operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// The guest has no disk (`disk=` missing on its module line).
    NoDisk,
    /// The buffer is not a whole number of sectors.
    NotSectors {
        /// Its length.
        len: usize,
    },
    /// The hypervisor refused the request.
    Refused(Option<HypercallError>),
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoDisk => write!(f, "no block device; expected `disk=NAME` and a module `disk-NAME`"),
            Self::NotSectors { len } => write!(f, "buffer of {len} bytes; expected a multiple of {BLOCK_SECTOR_SIZE}"),
            Self::Refused(e) => write!(f, "block request refused: {e:?}"),
        }
    }
}

/// The disk.
#[derive(Debug)]
pub struct Disk {
    size: u64,
}

impl Disk {
    /// Opens the disk, if the guest has one.
    pub fn open() -> Result<Self, DiskError> {
        let size = hypercall(Hypercall::BlockInfo, 0, 0, 0).map_err(|_| DiskError::NoDisk)?;
        Ok(Self { size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(op: u32, sector: u64, addr: u64, len: u64) -> Result<(), DiskError> {
        let req = PvBlockRequest { op, status: 0, sector, len, addr };
        hypercall(Hypercall::BlockRequest, &req as *const PvBlockRequest as u64, 0, 0).map_err(DiskError::Refused)?;
        Ok(())
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector`.
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if !(buf.len() as u64).is_multiple_of(BLOCK_SECTOR_SIZE) {
            return Err(DiskError::NotSectors { len: buf.len() });
        }
        for (i, chunk) in buf.chunks_mut(BLOCK_REQUEST_MAX as usize).enumerate() {
            let at = sector + i as u64 * (BLOCK_REQUEST_MAX / BLOCK_SECTOR_SIZE);
            Self::request(BLOCK_OP_READ, at, chunk.as_mut_ptr() as u64, chunk.len() as u64)?;
        }
        Ok(())
    }

    /// Writes `data` (whole sectors) at `sector`.
    pub fn write(&self, sector: u64, data: &[u8]) -> Result<(), DiskError> {
        if !(data.len() as u64).is_multiple_of(BLOCK_SECTOR_SIZE) {
            return Err(DiskError::NotSectors { len: data.len() });
        }
        for (i, chunk) in data.chunks(BLOCK_REQUEST_MAX as usize).enumerate() {
            let at = sector + i as u64 * (BLOCK_REQUEST_MAX / BLOCK_SECTOR_SIZE);
            Self::request(BLOCK_OP_WRITE, at, chunk.as_ptr() as u64, chunk.len() as u64)?;
        }
        Ok(())
    }

    /// Makes earlier writes durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        Self::request(BLOCK_OP_FLUSH, 0, 0, 0)
    }
}
