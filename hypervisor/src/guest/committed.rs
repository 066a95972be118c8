//! The secondary's copy of guest RAM as of the last committed checkpoint ([`CommittedRam`]).
//!
//! A checkpoint must leave the SVM exactly on the PVM's state: the pages the PVM dirtied come in
//! the checkpoint, but the pages the SVM dirtied on its own since the last checkpoint must return
//! to their committed content too, and delta-encoded pages are XORed against the committed
//! content, not against whatever the SVM wrote. So the secondary applies each checkpoint to this
//! copy first (all or nothing, as `StagedCheckpoint::apply_to` guarantees), then copies the
//! checkpoint's pages and the SVM's own dirty pages from it into the guest
//! ([`CommittedRam::restore_into`]). It costs one more copy of guest RAM on the secondary,
//! allocated once (at the initial sync) with a named error when the heap cannot hold it.
#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

use super::memory::GuestMemory;
use crate::colo::checkpoint::GuestMemoryMut;

const PAGE: usize = 4096;

/// The committed copy could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommittedError {
    /// The heap cannot hold a copy of guest RAM.
    NoMemory {
        /// Bytes needed.
        bytes: u64,
    },
    /// Guest RAM is not a whole number of pages, or differs from the copy's size.
    Size {
        /// Bytes found.
        found: u64,
        /// Bytes expected.
        expected: u64,
    },
}

impl fmt::Display for CommittedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoMemory { bytes } => {
                write!(f, "no heap for a committed copy of {bytes} bytes of guest RAM; expected room for one copy")
            }
            Self::Size { found, expected } => {
                write!(f, "guest RAM of {found} bytes; expected {expected} bytes in whole 4 KiB pages")
            }
        }
    }
}

/// Guest RAM as of the last committed checkpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct CommittedRam {
    bytes: Vec<u8>,
}

impl fmt::Debug for CommittedRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommittedRam").field("bytes", &self.bytes.len()).finish()
    }
}

impl CommittedRam {
    /// A copy of `ram` (the guest right after the initial full sync was applied).
    pub fn new(ram: &[u8]) -> Result<Self, CommittedError> {
        let len = ram.len() as u64;
        if !ram.len().is_multiple_of(PAGE) {
            return Err(CommittedError::Size { found: len, expected: len - len % PAGE as u64 });
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(ram.len()).map_err(|_| CommittedError::NoMemory { bytes: len })?;
        bytes.extend_from_slice(ram);
        Ok(Self { bytes })
    }

    /// The committed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes `data` at byte `offset` (a piece of a full sync, which the secondary writes into
    /// the SVM and here alike). Nothing is written when it does not fit.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), CommittedError> {
        let len = self.bytes.len() as u64;
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= len);
        let Some(end) = end else {
            return Err(CommittedError::Size { found: offset.saturating_add(data.len() as u64), expected: len });
        };
        self.bytes[offset as usize..end as usize].copy_from_slice(data);
        Ok(())
    }

    /// Copies every frame in `gfns` from the committed copy into `ram`; returns the pages copied.
    /// `ram` must be the same size; frames outside it are skipped (none are, for a checked
    /// checkpoint and a dirty log of this guest).
    pub fn restore_into(
        &self,
        ram: &mut dyn GuestMemory,
        gfns: impl IntoIterator<Item = u64>,
    ) -> Result<u64, CommittedError> {
        if ram.size() != self.bytes.len() as u64 {
            return Err(CommittedError::Size { found: ram.size(), expected: self.bytes.len() as u64 });
        }
        let mut copied = 0;
        for gfn in gfns {
            let Some(start) = usize::try_from(gfn).ok().and_then(|g| g.checked_mul(PAGE)) else { continue };
            let Some(page) = self.bytes.get(start..start + PAGE) else { continue };
            if ram.write(start as u64, page).is_ok() {
                copied += 1;
            }
        }
        Ok(copied)
    }
}

impl GuestMemoryMut for CommittedRam {
    fn page_size(&self) -> usize {
        PAGE
    }

    fn frame_count(&self) -> u64 {
        (self.bytes.len() / PAGE) as u64
    }

    fn frame_mut(&mut self, gfn: u64) -> &mut [u8] {
        let start = gfn as usize * PAGE;
        &mut self.bytes[start..start + PAGE]
    }
}

/// The frames a checkpoint must write into the SVM: its own pages and the SVM's dirty pages,
/// ascending, each once.
pub fn pages_to_restore(checkpoint: &[u64], svm_dirty: &[u64]) -> Vec<u64> {
    let mut all: Vec<u64> = checkpoint.iter().chain(svm_dirty).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colo::checkpoint::{
        CheckpointDecoder, CheckpointEncoder, DirtyPage, Feed, HeaderInfo, PageStaging, StreamLimits,
    };
    use crate::guest::GuestRam;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect()
    }

    /// PVM and SVM start equal (committed); the PVM changes pages 1 (raw) and 2 (delta), the SVM
    /// scribbles on pages 2 and 5. After the checkpoint the SVM equals the PVM everywhere.
    #[test]
    fn svm_returns_to_the_pvm_state_including_its_own_dirty_pages() {
        let frames = 8;
        let base: Vec<u8> = (0..frames).flat_map(|g| page(g as u8 + 1)).collect();
        let mut committed = CommittedRam::new(&base).unwrap();
        let mut pvm = base.clone();
        pvm[PAGE..2 * PAGE].copy_from_slice(&page(77));
        pvm[2 * PAGE + 10] ^= 0xFF;
        let mut svm = base.clone();
        svm[2 * PAGE..3 * PAGE].fill(0xEE);
        svm[5 * PAGE + 3] = 0x42;

        let limits = StreamLimits::for_guest(frames as u64, 0, 0);
        let info = HeaderInfo { epoch: 4, page_size: PAGE as u32, page_count: 2, vcpu_count: 0, device_count: 0 };
        let mut enc = CheckpointEncoder::new(Vec::new(), info, limits).unwrap();
        enc.pages(&[
            DirtyPage { gfn: 1, data: &pvm[PAGE..2 * PAGE], previous: Some(&base[PAGE..2 * PAGE]) },
            DirtyPage { gfn: 2, data: &pvm[2 * PAGE..3 * PAGE], previous: Some(&base[2 * PAGE..3 * PAGE]) },
        ])
        .unwrap();
        let (stream, summary) = enc.finish().unwrap();
        assert_eq!(summary.delta_pages, 1, "page 2 must travel as a delta against the committed page");
        let Feed::Complete { checkpoint, .. } =
            CheckpointDecoder::new(limits, PageStaging::for_limits(&limits)).feed(&stream).unwrap()
        else {
            panic!("incomplete")
        };
        let gfns: Vec<u64> = checkpoint.pages().map(|p| p.gfn).collect();
        checkpoint.apply_to(&mut committed, 4).unwrap();
        assert_eq!(committed.bytes(), &pvm[..]);
        let restore = pages_to_restore(&gfns, &[2, 5]);
        assert_eq!(restore, [1, 2, 5]);
        let copied = committed.restore_into(&mut GuestRam::new(&mut svm), restore).unwrap();
        assert_eq!(copied, 3);
        assert_eq!(svm, pvm);
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(CommittedRam::new(&[0; 100]).unwrap_err(), CommittedError::Size { found: 100, expected: 0 });
        let committed = CommittedRam::new(&[1; 2 * PAGE]).unwrap();
        let mut small = std::vec![0u8; PAGE];
        assert!(committed.restore_into(&mut GuestRam::new(&mut small), [0]).is_err());
        let mut same = std::vec![0u8; 2 * PAGE];
        assert_eq!(committed.restore_into(&mut GuestRam::new(&mut same), [1, 9, u64::MAX]).unwrap(), 1);
        assert_eq!(&same[PAGE..], &[1; PAGE][..]);
        assert!(CommittedError::NoMemory { bytes: 1 << 32 }.to_string().contains("4294967296 bytes"));
        let mut c = CommittedRam::new(&[0; 2 * PAGE]).unwrap();
        c.write_at(PAGE as u64 - 2, &[7; 4]).unwrap();
        assert_eq!(&c.bytes()[PAGE - 3..PAGE + 3], &[0, 7, 7, 7, 7, 0]);
        assert!(c.write_at(2 * PAGE as u64 - 1, &[1, 2]).is_err());
        assert!(c.write_at(u64::MAX, &[1]).is_err());
        assert_eq!(c.bytes().iter().filter(|&&b| b != 0).count(), 4, "a refused write changes nothing");
    }
}
