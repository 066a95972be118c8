//! The guest image loader: ELF64 executables for x86_64, parsed from untrusted bytes.
//!
//! Only what the boot protocol needs: the entry point and `PT_LOAD` segments. Every segment
//! must lie in guest RAM at or above `GUEST_LOAD_MIN`, with `filesz <= memsz` and file bytes
//! inside the image; the entry point must be inside an executable segment. Loading zeroes each
//! segment's memory, then copies its file bytes.
#![deny(unsafe_code)]

use core::fmt;

use guest_shim::abi::GUEST_LOAD_MIN;

use super::memory::GuestMemory;

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// More program headers than any guest needs.
const MAX_PHDRS: u16 = 64;

/// Why a guest image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than the header or a table it names.
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        len: u64,
    },
    /// A header field with the wrong value.
    BadField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What it must be.
        expected: &'static str,
    },
    /// A segment outside guest RAM or below the load minimum.
    SegmentOutsideRam {
        /// Guest-physical start.
        addr: u64,
        /// Memory size.
        memsz: u64,
        /// Guest RAM size.
        ram: u64,
    },
    /// The entry point is not inside an executable loaded segment.
    EntryOutsideCode {
        /// The entry point.
        entry: u64,
    },
    /// No `PT_LOAD` segment.
    NothingToLoad,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { what, needed, len } => {
                write!(f, "guest image truncated: {what} needs {needed} bytes, image has {len}")
            }
            Self::BadField { field, value, expected } => {
                write!(f, "guest image: {field} is {value:#x}, expected {expected}")
            }
            Self::SegmentOutsideRam { addr, memsz, ram } => write!(
                f,
                "guest image: segment {addr:#x}+{memsz:#x} is outside guest RAM; expected within \
                 {GUEST_LOAD_MIN:#x}..{ram:#x}"
            ),
            Self::EntryOutsideCode { entry } => {
                write!(f, "guest image: entry point {entry:#x} is not inside an executable segment")
            }
            Self::NothingToLoad => write!(f, "guest image has no PT_LOAD segment"),
        }
    }
}

/// One loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical (= virtual) address.
    pub addr: u64,
    /// Bytes in memory.
    pub memsz: u64,
    /// Offset of the file bytes in the image.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Executable.
    pub executable: bool,
}

/// A checked guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage<'a> {
    bytes: &'a [u8],
    /// The entry point.
    pub entry: u64,
    /// The loadable segments.
    pub segments: heapless::Vec<Segment, { MAX_PHDRS as usize }>,
}

fn read<const N: usize>(bytes: &[u8], at: usize, what: &'static str) -> Result<[u8; N], ElfError> {
    bytes.get(at..at + N).and_then(|s| s.try_into().ok()).ok_or(ElfError::Truncated {
        what,
        needed: (at + N) as u64,
        len: bytes.len() as u64,
    })
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, ElfError> {
    read::<2>(b, at, what).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize, what: &'static str) -> Result<u32, ElfError> {
    read::<4>(b, at, what).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize, what: &'static str) -> Result<u64, ElfError> {
    read::<8>(b, at, what).map(u64::from_le_bytes)
}

fn expect(field: &'static str, value: u64, ok: bool, expected: &'static str) -> Result<(), ElfError> {
    if ok {
        Ok(())
    } else {
        Err(ElfError::BadField { field, value, expected })
    }
}

impl<'a> GuestImage<'a> {
    /// Parses and checks `bytes` for a guest with `ram` bytes of RAM.
    pub fn parse(bytes: &'a [u8], ram: u64) -> Result<Self, ElfError> {
        let magic = read::<4>(bytes, 0, "ELF header")?;
        expect("e_ident magic", u32::from_le_bytes(magic) as u64, magic == *b"\x7fELF", "0x464c457f (\\x7fELF)")?;
        let ident = read::<4>(bytes, 4, "ELF header")?;
        expect("EI_CLASS", ident[0] as u64, ident[0] == 2, "2 (64-bit)")?;
        expect("EI_DATA", ident[1] as u64, ident[1] == 1, "1 (little-endian)")?;
        if bytes.len() < EHDR_SIZE {
            return Err(ElfError::Truncated { what: "ELF header", needed: EHDR_SIZE as u64, len: bytes.len() as u64 });
        }
        let e_type = u16_at(bytes, 16, "ELF header")?;
        expect("e_type", e_type.into(), e_type == 2, "2 (ET_EXEC)")?;
        let machine = u16_at(bytes, 18, "ELF header")?;
        expect("e_machine", machine.into(), machine == 0x3E, "0x3e (x86-64)")?;
        let entry = u64_at(bytes, 24, "ELF header")?;
        let phoff = u64_at(bytes, 32, "ELF header")?;
        let phentsize = u16_at(bytes, 54, "ELF header")?;
        expect("e_phentsize", phentsize.into(), phentsize as usize == PHDR_SIZE, "56")?;
        let phnum = u16_at(bytes, 56, "ELF header")?;
        expect("e_phnum", phnum.into(), phnum <= MAX_PHDRS, "at most 64")?;

        let mut segments = heapless::Vec::new();
        for i in 0..phnum as u64 {
            let at = phoff
                .checked_add(i * PHDR_SIZE as u64)
                .filter(|&a| a.saturating_add(PHDR_SIZE as u64) <= bytes.len() as u64)
                .ok_or(ElfError::Truncated {
                    what: "program header table",
                    needed: phoff.saturating_add((i + 1) * PHDR_SIZE as u64),
                    len: bytes.len() as u64,
                })? as usize;
            if u32_at(bytes, at, "program header")? != PT_LOAD {
                continue;
            }
            let flags = u32_at(bytes, at + 4, "program header")?;
            let offset = u64_at(bytes, at + 8, "program header")?;
            let addr = u64_at(bytes, at + 24, "program header")?; // p_paddr
            let filesz = u64_at(bytes, at + 32, "program header")?;
            let memsz = u64_at(bytes, at + 40, "program header")?;
            expect("p_filesz", filesz, filesz <= memsz, "at most p_memsz")?;
            let file_end = offset.checked_add(filesz);
            if file_end.is_none_or(|end| end > bytes.len() as u64) {
                return Err(ElfError::Truncated {
                    what: "segment file bytes",
                    needed: file_end.unwrap_or(u64::MAX),
                    len: bytes.len() as u64,
                });
            }
            let in_ram = addr >= GUEST_LOAD_MIN && addr.checked_add(memsz).is_some_and(|end| end <= ram);
            if !in_ram {
                return Err(ElfError::SegmentOutsideRam { addr, memsz, ram });
            }
            let segment = Segment { addr, memsz, offset, filesz, executable: flags & PF_X != 0 };
            // Cannot overflow: phnum <= MAX_PHDRS, the capacity.
            let _ = segments.push(segment);
        }
        if segments.is_empty() {
            return Err(ElfError::NothingToLoad);
        }
        if !segments.iter().any(|s| s.executable && (s.addr..s.addr + s.memsz).contains(&entry)) {
            return Err(ElfError::EntryOutsideCode { entry });
        }
        Ok(Self { bytes, entry, segments })
    }

    /// Copies the segments into guest memory (zero-filling `memsz - filesz`). Returns the
    /// highest guest-physical address used.
    pub fn load(&self, mem: &mut dyn GuestMemory) -> Result<u64, super::MemoryError> {
        let mut top = 0;
        for s in &self.segments {
            let dst = mem.slice_mut(s.addr, s.memsz)?;
            let (file, zero) = dst.split_at_mut(s.filesz as usize);
            file.copy_from_slice(&self.bytes[s.offset as usize..(s.offset + s.filesz) as usize]);
            zero.fill(0);
            top = top.max(s.addr + s.memsz);
        }
        Ok(top)
    }
}

/// Builds a minimal ELF64 image for tests: one executable segment at `addr` holding `code`.
#[cfg(test)]
pub(crate) fn test_image(addr: u64, entry: u64, code: &[u8], memsz: u64) -> std::vec::Vec<u8> {
    let mut b = std::vec![0u8; EHDR_SIZE + PHDR_SIZE];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&0x3Eu16.to_le_bytes());
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = EHDR_SIZE;
    b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    b[ph + 4..ph + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&((EHDR_SIZE + PHDR_SIZE) as u64).to_le_bytes());
    b[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    b.extend_from_slice(code);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestRam;

    const RAM: u64 = 4 << 20;

    #[test]
    fn loads_segment_and_zero_fills() {
        let image = test_image(0x20_0000, 0x20_0000, &[0xF4, 0x90], 0x1000);
        let parsed = GuestImage::parse(&image, RAM).unwrap();
        assert_eq!(parsed.entry, 0x20_0000);
        let mut buf = std::vec![0xAAu8; RAM as usize];
        let mut ram = GuestRam::new(&mut buf);
        assert_eq!(parsed.load(&mut ram).unwrap(), 0x20_1000);
        assert_eq!(ram.slice(0x20_0000, 3).unwrap(), &[0xF4, 0x90, 0]);
        assert_eq!(ram.slice(0x20_0FFF, 1).unwrap(), &[0]);
        assert_eq!(ram.slice(0x20_1000, 1).unwrap(), &[0xAA], "nothing past memsz is touched");
    }

    #[test]
    fn hostile_images_are_refused_by_name() {
        let good = test_image(0x20_0000, 0x20_0000, &[0xF4], 0x1000);
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        assert!(matches!(GuestImage::parse(&bad_magic, RAM), Err(ElfError::BadField { field: "e_ident magic", .. })));
        assert!(matches!(GuestImage::parse(&good[..40], RAM), Err(ElfError::Truncated { .. })));
        let outside = test_image(RAM - 0x800, RAM - 0x800, &[0xF4], 0x1000);
        assert!(matches!(GuestImage::parse(&outside, RAM), Err(ElfError::SegmentOutsideRam { .. })));
        let low = test_image(0x1000, 0x1000, &[0xF4], 0x1000);
        assert!(matches!(GuestImage::parse(&low, RAM), Err(ElfError::SegmentOutsideRam { .. })));
        let wrapping = test_image(u64::MAX - 0xFFF, u64::MAX - 0xFFF, &[0xF4], 0x2000);
        assert!(matches!(GuestImage::parse(&wrapping, RAM), Err(ElfError::SegmentOutsideRam { .. })));
        let entry_outside = test_image(0x20_0000, 0x30_0000, &[0xF4], 0x1000);
        assert_eq!(GuestImage::parse(&entry_outside, RAM), Err(ElfError::EntryOutsideCode { entry: 0x30_0000 }));
        let mut filesz_too_big = good.clone();
        filesz_too_big[EHDR_SIZE + 32..EHDR_SIZE + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert!(GuestImage::parse(&filesz_too_big, RAM).is_err());
        let mut phoff_huge = good;
        phoff_huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(GuestImage::parse(&phoff_huge, RAM), Err(ElfError::Truncated { .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_9ABC_DEF0u64;
        for len in 0..300usize {
            let mut bytes = test_image(0x20_0000, 0x20_0000, &[0xF4; 16], 0x1000);
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % bytes.len();
                bytes[i] = (seed >> 32) as u8;
            }
            bytes.truncate(len.min(bytes.len()));
            let _ = GuestImage::parse(&bytes, RAM);
        }
    }
}
