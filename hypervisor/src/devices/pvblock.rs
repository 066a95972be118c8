//! The paravirtual block device's model: a disk in host RAM (a multiboot2 module) and
//! synchronous requests ([`guest_shim::abi::PvBlockRequest`]) validated before a byte moves:
//! the request itself must lie in guest RAM, the operation must be known, the length a non-zero
//! multiple of the sector size no larger than `BLOCK_REQUEST_MAX`, the sector range inside the
//! disk and the buffer inside guest RAM. Refusals are counted in [`PvBlockCounters`].
//!
//! Every write reaches the [`BlockHook`] after it has been applied: the point where replication
//! of the disk will sit.
#![deny(unsafe_code)]

use core::fmt;

use guest_shim::abi::{
    PvBlockRequest, BLOCK_OP_FLUSH, BLOCK_OP_READ, BLOCK_OP_WRITE, BLOCK_REQUEST_MAX, BLOCK_SECTOR_SIZE,
    BLOCK_STATUS_ERROR, BLOCK_STATUS_OK,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::devices::state::{DeviceStateError, Persist, PvBlockState};
use crate::guest::GuestMemory;

const REQUEST_BYTES: u64 = core::mem::size_of::<PvBlockRequest>() as u64;

/// The block device's backend hook: every guest read and write goes through it, with the
/// disk passed in, so COLO can sit beneath the device. The defaults serve the disk directly and
/// report each write to [`BlockHook::written`] after applying it (the primary streams it from
/// there); the secondary's block replica overrides [`BlockHook::write`] and [`BlockHook::read`]
/// to keep the SVM's writes in its overlay instead. Ranges are validated by the device before a
/// hook sees them: `sector * 512 + len` lies within `disk`.
pub trait BlockHook {
    /// Fills `buf` from `sector` for the guest.
    fn read(&mut self, disk: &[u8], sector: u64, buf: &mut [u8]) {
        let start = sector as usize * BLOCK_SECTOR_SIZE as usize;
        if let Some(src) = disk.get(start..start + buf.len()) {
            buf.copy_from_slice(src);
        }
    }
    /// Carries out the guest's write of `data` at `sector`.
    fn write(&mut self, disk: &mut [u8], sector: u64, data: &[u8]) {
        let start = sector as usize * BLOCK_SECTOR_SIZE as usize;
        if let Some(dst) = disk.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
        self.written(sector, data);
    }
    /// `data` was written at `sector` (called by the default [`BlockHook::write`]).
    fn written(&mut self, sector: u64, data: &[u8]) {
        let _ = (sector, data);
    }
    /// The guest asked for earlier writes to be durable.
    fn flushed(&mut self);
}

/// A hook that does nothing beyond serving the disk (no replication).
#[derive(Debug, Default)]
pub struct NoBlockHook;

impl BlockHook for NoBlockHook {
    fn flushed(&mut self) {}
}

/// Why a block request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvBlockError {
    /// The request structure is not inside guest RAM.
    RequestOutsideRam {
        /// Its guest-physical address.
        gpa: u64,
    },
    /// Unknown operation.
    BadOp {
        /// The operation number.
        op: u32,
    },
    /// Length zero, not a multiple of the sector size, or too long.
    BadLength {
        /// The length asked for.
        len: u64,
    },
    /// Sectors beyond the end of the disk.
    OutOfDisk {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
        /// Disk size in bytes.
        disk: u64,
    },
    /// The buffer is not inside guest RAM.
    BufferOutsideRam {
        /// Its guest-physical address.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

impl fmt::Display for PvBlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::RequestOutsideRam { gpa } => {
                write!(f, "block request at {gpa:#x} is outside guest RAM; expected {REQUEST_BYTES} bytes inside RAM")
            }
            Self::BadOp { op } => write!(
                f,
                "block operation {op}; expected {BLOCK_OP_READ} (read), {BLOCK_OP_WRITE} (write) or {BLOCK_OP_FLUSH} (flush)"
            ),
            Self::BadLength { len } => write!(
                f,
                "block request length {len}; expected a non-zero multiple of {BLOCK_SECTOR_SIZE} up to {BLOCK_REQUEST_MAX}"
            ),
            Self::OutOfDisk { sector, len, disk } => {
                write!(f, "sector {sector} + {len} bytes is beyond the disk; expected a range within {disk} bytes")
            }
            Self::BufferOutsideRam { addr, len } => {
                write!(f, "block buffer {addr:#x}+{len:#x} is outside guest RAM; expected it inside RAM")
            }
        }
    }
}

/// Named counters of the block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvBlockCounters {
    /// Read requests done.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests done.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Requests refused (any [`PvBlockError`]).
    pub rejected: u64,
}

impl fmt::Display for PvBlockCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reads={} read_bytes={} writes={} write_bytes={} flushes={} rejected={}",
            self.reads, self.read_bytes, self.writes, self.write_bytes, self.flushes, self.rejected
        )
    }
}

/// The block device of one guest over `disk`.
#[derive(Debug)]
pub struct PvBlock<'d> {
    disk: &'d mut [u8],
    /// Its counters.
    pub counters: PvBlockCounters,
}

impl<'d> PvBlock<'d> {
    /// A device over `disk` (its length is rounded down to whole sectors).
    pub fn new(disk: &'d mut [u8]) -> Self {
        let whole = disk.len() - disk.len() % BLOCK_SECTOR_SIZE as usize;
        Self { disk: &mut disk[..whole], counters: PvBlockCounters::default() }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.len() as u64
    }

    /// The disk's bytes (for a digest or a full sync to the secondary).
    pub fn disk(&self) -> &[u8] {
        self.disk
    }

    /// The disk's bytes for writing (a block replica committing PVM writes beneath the device).
    pub fn disk_mut(&mut self) -> &mut [u8] {
        self.disk
    }

    /// Replaces the whole disk with `image` (a full sync); it must have the disk's size.
    pub fn replace_disk(&mut self, image: &[u8]) -> Result<(), DeviceStateError> {
        if image.len() != self.disk.len() {
            return Err(DeviceStateError::DiskSize { found: image.len() as u64, expected: self.size() });
        }
        self.disk.copy_from_slice(image);
        Ok(())
    }

    /// Carries out the request at `gpa`; writes its status. Returns the bytes moved.
    pub fn request(
        &mut self,
        mem: &mut dyn GuestMemory,
        gpa: u64,
        hook: &mut dyn BlockHook,
    ) -> Result<u64, PvBlockError> {
        let Some(req) = mem.slice(gpa, REQUEST_BYTES).ok().and_then(|b| PvBlockRequest::read_from_bytes(b).ok()) else {
            self.counters.rejected += 1;
            return Err(PvBlockError::RequestOutsideRam { gpa });
        };
        let result = self.execute(mem, &req, hook);
        if result.is_err() {
            self.counters.rejected += 1;
        }
        let status = if result.is_ok() { BLOCK_STATUS_OK } else { BLOCK_STATUS_ERROR };
        let _ = mem.write(gpa + 4, status.as_bytes());
        result
    }

    fn execute(
        &mut self,
        mem: &mut dyn GuestMemory,
        req: &PvBlockRequest,
        hook: &mut dyn BlockHook,
    ) -> Result<u64, PvBlockError> {
        if req.op == BLOCK_OP_FLUSH {
            self.counters.flushes += 1;
            hook.flushed();
            return Ok(0);
        }
        if req.op != BLOCK_OP_READ && req.op != BLOCK_OP_WRITE {
            return Err(PvBlockError::BadOp { op: req.op });
        }
        let len = req.len;
        if len == 0 || !len.is_multiple_of(BLOCK_SECTOR_SIZE) || len > BLOCK_REQUEST_MAX {
            return Err(PvBlockError::BadLength { len });
        }
        let disk = self.size();
        req.sector
            .checked_mul(BLOCK_SECTOR_SIZE)
            .and_then(|start| Some(start..start.checked_add(len)?))
            .filter(|r| r.end <= disk)
            .ok_or(PvBlockError::OutOfDisk { sector: req.sector, len, disk })?;
        let bad_buffer = PvBlockError::BufferOutsideRam { addr: req.addr, len };
        if req.op == BLOCK_OP_READ {
            let buf = mem.slice_mut(req.addr, len).map_err(|_| bad_buffer)?;
            hook.read(self.disk, req.sector, buf);
            self.counters.reads += 1;
            self.counters.read_bytes += len;
        } else {
            let data = mem.slice(req.addr, len).map_err(|_| bad_buffer)?;
            hook.write(self.disk, req.sector, data);
            self.counters.writes += 1;
            self.counters.write_bytes += len;
        }
        Ok(len)
    }
}

impl Persist for PvBlock<'_> {
    type State = PvBlockState;

    fn save_state(&self) -> PvBlockState {
        PvBlockState { size: self.size() }
    }

    fn check_state(&self, state: &PvBlockState, _ram_bytes: u64) -> Result<(), DeviceStateError> {
        if state.size != self.size() {
            return Err(DeviceStateError::DiskSize { found: state.size, expected: self.size() });
        }
        Ok(())
    }

    fn load_state(&mut self, _state: &PvBlockState) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestRam;
    use std::vec::Vec;

    #[derive(Default)]
    struct Log(Vec<(u64, usize)>, u32);

    impl BlockHook for Log {
        fn written(&mut self, sector: u64, data: &[u8]) {
            self.0.push((sector, data.len()));
        }
        fn flushed(&mut self) {
            self.1 += 1;
        }
    }

    fn put(ram: &mut [u8], gpa: usize, op: u32, sector: u64, len: u64, addr: u64) {
        let r = PvBlockRequest { op, status: 9, sector, len, addr };
        ram[gpa..gpa + 32].copy_from_slice(r.as_bytes());
    }

    fn status(ram: &[u8], gpa: usize) -> u32 {
        u32::from_le_bytes(ram[gpa + 4..gpa + 8].try_into().unwrap())
    }

    #[test]
    fn reads_and_writes_round_trip_through_the_hook() {
        let mut disk = std::vec![0u8; 8 * 512 + 100];
        let mut ram = std::vec![0u8; 1 << 16];
        let mut hook = Log::default();
        let mut dev = PvBlock::new(&mut disk);
        assert_eq!(dev.size(), 8 * 512);
        ram[0x2000..0x2400].fill(0x5A);
        put(&mut ram, 0x1000, BLOCK_OP_WRITE, 3, 1024, 0x2000);
        assert_eq!(dev.request(&mut GuestRam::new(&mut ram), 0x1000, &mut hook), Ok(1024));
        assert_eq!(status(&ram, 0x1000), BLOCK_STATUS_OK);
        put(&mut ram, 0x1000, BLOCK_OP_READ, 2, 2048, 0x4000);
        assert_eq!(dev.request(&mut GuestRam::new(&mut ram), 0x1000, &mut hook), Ok(2048));
        assert!(ram[0x4000..0x4200].iter().all(|&b| b == 0));
        assert!(ram[0x4200..0x4600].iter().all(|&b| b == 0x5A));
        put(&mut ram, 0x1000, BLOCK_OP_FLUSH, 0, 0, 0);
        assert_eq!(dev.request(&mut GuestRam::new(&mut ram), 0x1000, &mut hook), Ok(0));
        assert_eq!(hook.0, [(3, 1024)]);
        assert_eq!(hook.1, 1);
        assert_eq!((dev.counters.reads, dev.counters.writes, dev.counters.flushes), (1, 1, 1));
    }

    #[test]
    fn hostile_requests_are_refused_and_counted() {
        let mut disk = std::vec![0u8; 8 * 512];
        let mut ram = std::vec![0u8; 1 << 16];
        let mut hook = Log::default();
        let mut dev = PvBlock::new(&mut disk);
        let cases: [(u32, u64, u64, u64, &str); 7] = [
            (7, 0, 512, 0x2000, "block operation 7"),
            (BLOCK_OP_READ, 0, 0, 0x2000, "length 0"),
            (BLOCK_OP_READ, 0, 100, 0x2000, "length 100"),
            (BLOCK_OP_READ, 0, 2 << 20, 0x2000, "length 2097152"),
            (BLOCK_OP_READ, 7, 1024, 0x2000, "beyond the disk"),
            (BLOCK_OP_WRITE, u64::MAX / 256, 512, 0x2000, "beyond the disk"),
            (BLOCK_OP_READ, 0, 512, (1 << 16) - 100, "outside guest RAM"),
        ];
        for (op, sector, len, addr, expect) in cases {
            put(&mut ram, 0x1000, op, sector, len, addr);
            let e = dev.request(&mut GuestRam::new(&mut ram), 0x1000, &mut hook).unwrap_err();
            assert!(e.to_string().contains(expect), "{e}");
            assert_eq!(status(&ram, 0x1000), BLOCK_STATUS_ERROR);
        }
        let e = dev.request(&mut GuestRam::new(&mut ram), u64::MAX - 8, &mut hook).unwrap_err();
        assert!(matches!(e, PvBlockError::RequestOutsideRam { .. }));
        assert_eq!(dev.counters.rejected, 8);
        assert!(hook.0.is_empty());
    }
    /// A hook beneath the device that keeps writes to itself (as the SVM's overlay does).
    #[derive(Default)]
    struct Overlay(std::collections::BTreeMap<u64, Vec<u8>>);

    impl BlockHook for Overlay {
        fn read(&mut self, disk: &[u8], sector: u64, buf: &mut [u8]) {
            for (i, chunk) in buf.chunks_exact_mut(512).enumerate() {
                let s = sector + i as u64;
                match self.0.get(&s) {
                    Some(data) => chunk.copy_from_slice(data),
                    None => chunk.copy_from_slice(&disk[s as usize * 512..(s as usize + 1) * 512]),
                }
            }
        }
        fn write(&mut self, _disk: &mut [u8], sector: u64, data: &[u8]) {
            for (i, chunk) in data.chunks_exact(512).enumerate() {
                self.0.insert(sector + i as u64, chunk.to_vec());
            }
        }
        fn flushed(&mut self) {}
    }

    #[test]
    fn a_hook_can_intercept_writes_and_the_disk_can_be_replaced() {
        let mut disk = std::vec![0u8; 8 * 512];
        let mut ram = std::vec![0u8; 1 << 16];
        let mut hook = Overlay::default();
        let mut dev = PvBlock::new(&mut disk);
        ram[0x2000..0x2200].fill(0x33);
        put(&mut ram, 0x1000, BLOCK_OP_WRITE, 1, 512, 0x2000);
        assert_eq!(dev.request(&mut GuestRam::new(&mut ram), 0x1000, &mut hook), Ok(512));
        assert!(dev.disk().iter().all(|&b| b == 0), "the write must stay in the hook");
        put(&mut ram, 0x1000, BLOCK_OP_READ, 0, 1024, 0x4000);
        assert_eq!(dev.request(&mut GuestRam::new(&mut ram), 0x1000, &mut hook), Ok(1024));
        assert!(ram[0x4000..0x4200].iter().all(|&b| b == 0) && ram[0x4200..0x4400].iter().all(|&b| b == 0x33));
        assert_eq!(dev.replace_disk(&[1; 512]), Err(DeviceStateError::DiskSize { found: 512, expected: 4096 }));
        dev.replace_disk(&[9; 4096]).unwrap();
        assert_eq!(dev.disk(), &[9; 4096][..]);
        let state = dev.save_state();
        assert_eq!(state, PvBlockState { size: 4096 });
        dev.check_state(&state, 0).unwrap();
        assert!(dev.check_state(&PvBlockState { size: 512 }, 0).is_err());
    }
}
