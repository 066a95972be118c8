//! The checkpoint stream: what the primary sends and the secondary applies all-or-nothing.
//!
//! # Wire format (version 1, all integers little-endian)
//!
//! ```text
//! StreamHeader (40 bytes)
//!   magic "COLOCKPT", version u16, header_len u16, page_size u32, epoch u64,
//!   page_count u32, vcpu_count u32, device_count u32, reserved u32 (0)
//! Records, each starting with a RecordHeader (24 bytes):
//!   kind u32, tag u32, id u64, len u32, reserved u32 (0)
//!   kind 1 PAGE RUN : id = first guest frame number, len = pages in run (>= 1), tag = 0;
//!                     followed by `len` page entries:
//!                       0x00 ZERO                      (no data: page is all zero)
//!                       0x01 RAW   + page_size bytes
//!                       0x02 DELTA + u32 n + n bytes   (n < page_size; XOR against the
//!                                                       receiver's current page, see below)
//!   kind 2 VCPU     : id = vCPU index, tag = state-layout tag, len = blob bytes, then the blob
//!   kind 3 DEVICE   : id = device id,  tag = state-layout tag, len = blob bytes, then the blob
//!   kind 0x54494D43 COMMIT : id = epoch, tag = 0, len = 24, followed by CommitBody (24 bytes):
//!     body_len u64 (bytes before the commit record), page_count u32, record_count u32
//!     (records before the commit), end_magic u32 "CEND", crc32c u32
//! ```
//!
//! Order is fixed: all page runs (frame numbers strictly increasing across runs), then vCPU
//! records (index strictly increasing), then device records (id strictly increasing), then
//! exactly one commit record. The CRC-32C covers every byte of the stream before the final
//! `crc32c` field. Every length field is checked against [`StreamLimits`] as soon as it is read,
//! before any of the data it announces is buffered.
//!
//! Delta encoding: the page is XORed with the receiver's current content of that frame and the
//! result is written as a sequence of `(zero_run: LEB128, literal_len: LEB128, literal bytes)`
//! operations covering exactly `page_size` bytes; literal bytes are the XOR values. The encoder
//! uses it only when it is smaller than the raw page. The receiver must apply the checkpoint to
//! memory that holds what the sender's `previous` held (the secondary's copy of the last
//! committed checkpoint), which is the COLO invariant.
//!
//! A [`CheckpointDecoder`] only ever hands out a [`StagedCheckpoint`], and only after the commit
//! record and checksum check out. Applying exists only on [`StagedCheckpoint`] and does all its
//! checks before it writes the first byte.

use alloc::vec::Vec;
use core::fmt;
use core::mem::size_of;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Stream magic at offset 0.
pub const MAGIC: [u8; 8] = *b"COLOCKPT";
/// The one format version this code reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Magic inside the commit body.
pub const COMMIT_END_MAGIC: u32 = u32::from_le_bytes(*b"CEND");

const KIND_PAGE_RUN: u32 = 1;
const KIND_VCPU: u32 = 2;
const KIND_DEVICE: u32 = 3;
const KIND_COMMIT: u32 = u32::from_le_bytes(*b"CMIT");

const PAGE_ZERO: u8 = 0;
const PAGE_RAW: u8 = 1;
const PAGE_DELTA: u8 = 2;

/// Fixed stream header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct StreamHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`FORMAT_VERSION`].
    pub version: U16,
    /// `size_of::<StreamHeader>()`.
    pub header_len: U16,
    /// Guest page size in bytes.
    pub page_size: U32,
    /// Checkpoint sequence number.
    pub epoch: U64,
    /// Total pages in all runs.
    pub page_count: U32,
    /// Number of vCPU records.
    pub vcpu_count: U32,
    /// Number of device records.
    pub device_count: U32,
    /// Must be zero.
    pub reserved: U32,
}

/// Fixed header in front of every record.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    /// Record kind.
    pub kind: U32,
    /// State-layout tag (blobs) or 0.
    pub tag: U32,
    /// First frame number, vCPU index, device id or epoch.
    pub id: U64,
    /// Page count (runs) or byte length.
    pub len: U32,
    /// Must be zero.
    pub reserved: U32,
}

/// Body of the commit record.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct CommitBody {
    /// Bytes of stream before the commit record.
    pub body_len: U64,
    /// Total pages.
    pub page_count: U32,
    /// Records before the commit record.
    pub record_count: U32,
    /// [`COMMIT_END_MAGIC`].
    pub end_magic: U32,
    /// CRC-32C of every stream byte before this field.
    pub crc32c: U32,
}

/// Size of [`StreamHeader`] on the wire.
pub const HEADER_LEN: usize = 40;
/// Size of [`RecordHeader`] on the wire.
pub const RECORD_HEADER_LEN: usize = 24;
/// Size of [`CommitBody`] on the wire.
pub const COMMIT_BODY_LEN: usize = 24;
const _: () = assert!(size_of::<StreamHeader>() == HEADER_LEN);
const _: () = assert!(size_of::<RecordHeader>() == RECORD_HEADER_LEN);
const _: () = assert!(size_of::<CommitBody>() == COMMIT_BODY_LEN);
const _: () = assert!(core::mem::align_of::<StreamHeader>() == 1);

// ---------------------------------------------------------------------------------------------
// CRC-32C (Castagnoli), slice-by-8, tables built at compile time.

const CRC32C_POLY_REFLECTED: u32 = 0x82F6_3B78;

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ CRC32C_POLY_REFLECTED } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// Incremental CRC-32C.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c {
    state: u32,
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// A fresh CRC.
    pub const fn new() -> Self {
        Self { state: !0 }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = self.state;
        let mut chunks = bytes.chunks_exact(8);
        for ch in &mut chunks {
            let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
            let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
            c = t[7][(lo & 0xFF) as usize]
                ^ t[6][((lo >> 8) & 0xFF) as usize]
                ^ t[5][((lo >> 16) & 0xFF) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xFF) as usize]
                ^ t[2][((hi >> 8) & 0xFF) as usize]
                ^ t[1][((hi >> 16) & 0xFF) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in chunks.remainder() {
            c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xFF) as usize];
        }
        self.state = c;
    }

    /// The CRC of everything fed so far.
    pub fn value(&self) -> u32 {
        !self.state
    }

    /// One-shot CRC-32C.
    pub fn checksum(bytes: &[u8]) -> u32 {
        let mut c = Self::new();
        c.update(bytes);
        c.value()
    }
}

// ---------------------------------------------------------------------------------------------
// Limits and errors.

/// Caps on everything a stream may announce. The decoder rejects a stream the moment a length
/// field exceeds a cap, before buffering the data it announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Guest page size the stream must use (power of two, 512..=65536).
    pub page_size: u32,
    /// Guest RAM size in frames: every frame number must be below this.
    pub guest_frames: u64,
    /// Most pages one checkpoint may carry.
    pub max_pages: u32,
    /// Most bytes one vCPU/device blob may carry.
    pub max_section_bytes: u32,
    /// Most records (page runs + blobs) one checkpoint may carry.
    pub max_records: u32,
    /// Most bytes one whole checkpoint stream may take.
    pub max_total_bytes: u64,
}

impl StreamLimits {
    /// Limits for a guest of `guest_frames` 4 KiB frames: every page may be dirty, blobs up to
    /// 1 MiB, 4096 records beyond one per page, total as the worst case of those.
    pub fn for_guest(guest_frames: u64) -> Self {
        let max_pages = u32::try_from(guest_frames).unwrap_or(u32::MAX);
        let max_section_bytes = 1 << 20;
        let max_records = max_pages.saturating_add(4096);
        let max_total_bytes = (u64::from(max_pages) * (4096 + 1 + RECORD_HEADER_LEN as u64))
            .saturating_add(4096 * (u64::from(max_section_bytes) + RECORD_HEADER_LEN as u64))
            .saturating_add(1 << 16);
        Self { page_size: 4096, guest_frames, max_pages, max_section_bytes, max_records, max_total_bytes }
    }
}

/// Record kinds, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SectionKind {
    /// The stream header.
    Header,
    /// A page run.
    PageRun,
    /// A vCPU state blob.
    Vcpu,
    /// A device state blob.
    Device,
    /// The commit record.
    Commit,
    /// A record header (kind not yet known).
    RecordHeader,
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::PageRun => "page run",
            Self::Vcpu => "vCPU state",
            Self::Device => "device state",
            Self::Commit => "commit record",
            Self::RecordHeader => "record header",
        })
    }
}

/// Why a stream was rejected. Every message names the value found and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// Wrong magic at the start.
    BadMagic {
        /// Bytes found.
        found: [u8; 8],
    },
    /// Version this code does not speak.
    UnsupportedVersion {
        /// Version found.
        found: u16,
        /// Version expected.
        expected: u16,
    },
    /// Header length field wrong.
    BadHeaderLength {
        /// Found.
        found: u16,
        /// Expected.
        expected: u16,
    },
    /// Page size differs from the configured one.
    PageSizeMismatch {
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
    /// Epoch is not the one the receiver expects next.
    EpochMismatch {
        /// Found.
        found: u64,
        /// Expected.
        expected: u64,
    },
    /// A reserved field is not zero.
    ReservedNotZero {
        /// Where.
        field: &'static str,
        /// Found.
        found: u64,
    },
    /// More pages than allowed.
    TooManyPages {
        /// Count found (declared or reached).
        found: u64,
        /// Cap.
        max: u32,
    },
    /// More records than allowed.
    TooManyRecords {
        /// Count found.
        found: u64,
        /// Cap.
        max: u32,
    },
    /// A blob longer than allowed.
    SectionTooLarge {
        /// Which section.
        kind: SectionKind,
        /// Length found.
        found: u64,
        /// Cap.
        max: u64,
    },
    /// The stream would exceed its total size cap.
    StreamTooLarge {
        /// Stream length needed.
        found: u64,
        /// Cap.
        max: u64,
    },
    /// Unknown record kind.
    UnknownRecordKind {
        /// Found.
        found: u32,
    },
    /// Unknown page entry encoding.
    UnknownPageEncoding {
        /// Frame.
        gfn: u64,
        /// Found.
        found: u8,
    },
    /// A page run with zero pages.
    EmptyRun {
        /// First frame.
        gfn: u64,
    },
    /// A frame outside guest RAM.
    FrameOutOfRange {
        /// Frame (first one past the end of a run when the run overruns).
        gfn: u64,
        /// Guest RAM size in frames.
        frames: u64,
    },
    /// Frame numbers not strictly increasing.
    FrameNotIncreasing {
        /// Frame found.
        gfn: u64,
        /// Lowest acceptable frame.
        expected_at_least: u64,
    },
    /// A section after one that must follow it.
    SectionOutOfOrder {
        /// Section found.
        found: SectionKind,
        /// Section it came after.
        after: SectionKind,
    },
    /// A vCPU or device id repeated.
    DuplicateSection {
        /// Section kind.
        kind: SectionKind,
        /// Id.
        id: u64,
    },
    /// A vCPU or device id lower than the one before it.
    IdNotIncreasing {
        /// Section kind.
        kind: SectionKind,
        /// Id found.
        found: u64,
        /// Previous id.
        previous: u64,
    },
    /// A delta page entry that does not decode to exactly one page.
    BadDelta {
        /// Frame.
        gfn: u64,
        /// Bytes the delta covers (or offset where decoding failed).
        covered: u64,
        /// Page size expected.
        expected: u32,
    },
    /// A delta entry as long as or longer than a raw page.
    DeltaTooLarge {
        /// Frame.
        gfn: u64,
        /// Length found.
        found: u32,
        /// Must be below this.
        max: u32,
    },
    /// Commit record fields disagree with what was received.
    CommitMismatch {
        /// Which field.
        field: &'static str,
        /// Value in the commit record / header.
        found: u64,
        /// Value counted while receiving.
        expected: u64,
    },
    /// Checksum wrong.
    ChecksumMismatch {
        /// CRC in the commit record.
        found: u32,
        /// CRC computed.
        expected: u32,
    },
    /// The stream ended before the commit record.
    Truncated {
        /// Bytes received.
        received: u64,
        /// Bytes needed at least.
        needed: u64,
        /// What was being read.
        reading: SectionKind,
    },
    /// Bytes fed after the checkpoint was complete.
    AlreadyComplete,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic { found } => {
                write!(f, "checkpoint magic is {found:02x?}, expected {MAGIC:02x?} (\"COLOCKPT\")")
            }
            Self::UnsupportedVersion { found, expected } => {
                write!(f, "checkpoint format version is {found}, expected {expected}")
            }
            Self::BadHeaderLength { found, expected } => {
                write!(f, "checkpoint header length is {found}, expected {expected}")
            }
            Self::PageSizeMismatch { found, expected } => {
                write!(f, "checkpoint page size is {found}, expected {expected}")
            }
            Self::EpochMismatch { found, expected } => {
                write!(f, "checkpoint epoch is {found}, expected {expected}")
            }
            Self::ReservedNotZero { field, found } => {
                write!(f, "reserved field {field} is {found}, expected 0")
            }
            Self::TooManyPages { found, max } => {
                write!(f, "checkpoint carries {found} pages, expected at most {max}")
            }
            Self::TooManyRecords { found, max } => {
                write!(f, "checkpoint carries {found} records, expected at most {max}")
            }
            Self::SectionTooLarge { kind, found, max } => {
                write!(f, "{kind} section is {found} bytes, expected at most {max}")
            }
            Self::StreamTooLarge { found, max } => {
                write!(f, "checkpoint stream needs {found} bytes, expected at most {max}")
            }
            Self::UnknownRecordKind { found } => write!(
                f,
                "record kind is {found:#x}, expected 1 (page run), 2 (vCPU), 3 (device) or {KIND_COMMIT:#x} (commit)"
            ),
            Self::UnknownPageEncoding { gfn, found } => {
                write!(f, "page entry for frame {gfn:#x} has encoding {found}, expected 0 (zero), 1 (raw) or 2 (delta)")
            }
            Self::EmptyRun { gfn } => {
                write!(f, "page run at frame {gfn:#x} has 0 pages, expected at least 1")
            }
            Self::FrameOutOfRange { gfn, frames } => {
                write!(f, "frame {gfn:#x} is outside guest RAM, expected below {frames:#x}")
            }
            Self::FrameNotIncreasing { gfn, expected_at_least } => write!(
                f,
                "page run starts at frame {gfn:#x}, expected frame numbers increasing (at least {expected_at_least:#x})"
            ),
            Self::SectionOutOfOrder { found, after } => write!(
                f,
                "{found} section after {after} section, expected order page runs, vCPU state, device state, commit"
            ),
            Self::DuplicateSection { kind, id } => {
                write!(f, "{kind} section with id {id} appears twice, expected once")
            }
            Self::IdNotIncreasing { kind, found, previous } => {
                write!(f, "{kind} section id {found} follows id {previous}, expected increasing ids")
            }
            Self::BadDelta { gfn, covered, expected } => {
                write!(f, "delta for frame {gfn:#x} covers {covered} bytes, expected exactly {expected}")
            }
            Self::DeltaTooLarge { gfn, found, max } => {
                write!(f, "delta for frame {gfn:#x} is {found} bytes, expected fewer than {max}")
            }
            Self::CommitMismatch { field, found, expected } => {
                write!(f, "commit record {field} is {found}, expected {expected}")
            }
            Self::ChecksumMismatch { found, expected } => {
                write!(f, "checkpoint CRC-32C is {found:#010x}, expected {expected:#010x}")
            }
            Self::Truncated { received, needed, reading } => write!(
                f,
                "checkpoint stream ended after {received} bytes while reading the {reading}, expected at least {needed}"
            ),
            Self::AlreadyComplete => {
                write!(f, "bytes fed after the commit record, expected a new decoder")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared structural validation (used by both encoder and decoder, so the encoder can never
// produce a stream the decoder rejects).

#[derive(Debug, Clone)]
struct Validator {
    limits: StreamLimits,
    phase: SectionKind,
    next_gfn: u64,
    last_id: Option<u64>,
    pages: u64,
    records: u64,
    vcpus: u64,
    devices: u64,
}

impl Validator {
    fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            phase: SectionKind::Header,
            next_gfn: 0,
            last_id: None,
            pages: 0,
            records: 0,
            vcpus: 0,
            devices: 0,
        }
    }

    fn header(&mut self, h: &HeaderInfo) -> Result<(), StreamError> {
        if h.page_size != self.limits.page_size {
            return Err(StreamError::PageSizeMismatch { found: h.page_size, expected: self.limits.page_size });
        }
        if h.page_count > self.limits.max_pages {
            return Err(StreamError::TooManyPages { found: h.page_count.into(), max: self.limits.max_pages });
        }
        let recs = u64::from(h.vcpu_count) + u64::from(h.device_count);
        if recs > u64::from(self.limits.max_records) {
            return Err(StreamError::TooManyRecords { found: recs, max: self.limits.max_records });
        }
        self.phase = SectionKind::Header;
        Ok(())
    }

    fn record(&mut self) -> Result<(), StreamError> {
        self.records += 1;
        if self.records > u64::from(self.limits.max_records) {
            return Err(StreamError::TooManyRecords { found: self.records, max: self.limits.max_records });
        }
        Ok(())
    }

    fn run(&mut self, gfn: u64, count: u32) -> Result<(), StreamError> {
        if self.phase > SectionKind::PageRun {
            return Err(StreamError::SectionOutOfOrder { found: SectionKind::PageRun, after: self.phase });
        }
        self.record()?;
        if count == 0 {
            return Err(StreamError::EmptyRun { gfn });
        }
        if self.phase == SectionKind::PageRun && gfn < self.next_gfn {
            return Err(StreamError::FrameNotIncreasing { gfn, expected_at_least: self.next_gfn });
        }
        let frames = self.limits.guest_frames;
        if gfn >= frames {
            return Err(StreamError::FrameOutOfRange { gfn, frames });
        }
        let end = gfn.saturating_add(u64::from(count));
        if end > frames {
            return Err(StreamError::FrameOutOfRange { gfn: frames, frames });
        }
        self.pages += u64::from(count);
        if self.pages > u64::from(self.limits.max_pages) {
            return Err(StreamError::TooManyPages { found: self.pages, max: self.limits.max_pages });
        }
        self.phase = SectionKind::PageRun;
        self.next_gfn = end;
        Ok(())
    }

    fn blob(&mut self, kind: SectionKind, id: u64, len: u32) -> Result<(), StreamError> {
        if self.phase > kind {
            return Err(StreamError::SectionOutOfOrder { found: kind, after: self.phase });
        }
        self.record()?;
        if self.phase == kind {
            if let Some(prev) = self.last_id {
                if id == prev {
                    return Err(StreamError::DuplicateSection { kind, id });
                }
                if id < prev {
                    return Err(StreamError::IdNotIncreasing { kind, found: id, previous: prev });
                }
            }
        }
        if len > self.limits.max_section_bytes {
            return Err(StreamError::SectionTooLarge {
                kind,
                found: len.into(),
                max: self.limits.max_section_bytes.into(),
            });
        }
        match kind {
            SectionKind::Vcpu => self.vcpus += 1,
            _ => self.devices += 1,
        }
        self.phase = kind;
        self.last_id = Some(id);
        Ok(())
    }

    fn commit(&mut self, h: &HeaderInfo) -> Result<(), StreamError> {
        let checks: [(&'static str, u64, u64); 3] = [
            ("page_count (header)", h.page_count.into(), self.pages),
            ("vcpu_count (header)", h.vcpu_count.into(), self.vcpus),
            ("device_count (header)", h.device_count.into(), self.devices),
        ];
        for (field, found, expected) in checks {
            if found != expected {
                return Err(StreamError::CommitMismatch { field, found, expected });
            }
        }
        self.phase = SectionKind::Commit;
        Ok(())
    }
}

fn check_total(len: u64, limits: &StreamLimits) -> Result<(), StreamError> {
    if len > limits.max_total_bytes {
        return Err(StreamError::StreamTooLarge { found: len, max: limits.max_total_bytes });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Delta coding.

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], pos: &mut usize) -> Option<u32> {
    let mut v: u32 = 0;
    for shift in [0u32, 7, 14, 21, 28] {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        let part = u32::from(b & 0x7F);
        if shift == 28 && part > 0x0F {
            return None;
        }
        v |= part << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(8);
    let mut acc = 0u64;
    for c in &mut chunks {
        acc |= u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
    acc == 0 && chunks.remainder().iter().all(|&b| b == 0)
}

/// Zero runs shorter than this inside a literal stay in the literal.
const MIN_ZERO_RUN: usize = 4;

/// Encodes `data` XOR `prev` into `out` (cleared first). Returns false (and leaves `out` in an
/// unspecified state) as soon as the encoding reaches `limit` bytes.
fn encode_delta(data: &[u8], prev: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    out.clear();
    let n = data.len();
    let x = |i: usize| data[i] ^ prev[i];
    let mut i = 0;
    while i < n {
        let zs = i;
        // Skip equal bytes eight at a time where possible.
        while i + 8 <= n && data[i..i + 8] == prev[i..i + 8] {
            i += 8;
        }
        while i < n && x(i) == 0 {
            i += 1;
        }
        let zero = i - zs;
        let ls = i;
        let mut zrun = 0;
        let mut lit_end = n;
        while i < n {
            if x(i) == 0 {
                zrun += 1;
                if zrun >= MIN_ZERO_RUN {
                    lit_end = i + 1 - zrun;
                    break;
                }
            } else {
                zrun = 0;
            }
            i += 1;
            if out.len() + (i - ls) + 6 >= limit {
                return false;
            }
        }
        i = lit_end;
        put_varint(out, zero as u32);
        put_varint(out, (lit_end - ls) as u32);
        out.extend(data[ls..lit_end].iter().zip(&prev[ls..lit_end]).map(|(a, b)| a ^ b));
        if out.len() >= limit {
            return false;
        }
    }
    true
}

/// Checks a delta body covers exactly `page_size` bytes. Returns the covered count on error.
fn validate_delta(body: &[u8], page_size: usize) -> Result<(), u64> {
    let mut pos = 0;
    let mut covered: usize = 0;
    while pos < body.len() {
        let z = get_varint(body, &mut pos).ok_or(covered as u64)? as usize;
        let l = get_varint(body, &mut pos).ok_or(covered as u64)? as usize;
        if z == 0 && l == 0 {
            return Err(covered as u64);
        }
        covered = covered.saturating_add(z).saturating_add(l);
        if covered > page_size || body.len() - pos < l {
            return Err(covered as u64);
        }
        pos += l;
    }
    if covered != page_size {
        return Err(covered as u64);
    }
    Ok(())
}

/// Applies a validated delta body onto `page` in place.
fn apply_delta(body: &[u8], page: &mut [u8]) {
    let mut pos = 0;
    let mut at = 0;
    while pos < body.len() {
        let (Some(z), Some(l)) = (get_varint(body, &mut pos), get_varint(body, &mut pos)) else {
            return;
        };
        at += z as usize;
        let l = l as usize;
        for (d, s) in page[at..at + l].iter_mut().zip(&body[pos..pos + l]) {
            *d ^= s;
        }
        at += l;
        pos += l;
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder.

/// Where encoded bytes go (a socket, a ring, a `Vec`).
pub trait ByteSink {
    /// Writes all of `bytes` or fails.
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), SinkError>;
}

/// A byte sink refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkError {
    /// What the sink says went wrong.
    pub reason: &'static str,
}

impl ByteSink for Vec<u8> {
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

impl<S: ByteSink + ?Sized> ByteSink for &mut S {
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        (**self).write_all(bytes)
    }
}

/// What the sender declares up front (it knows these once the guest is paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// Checkpoint sequence number.
    pub epoch: u64,
    /// Guest page size.
    pub page_size: u32,
    /// Total pages in the checkpoint.
    pub page_count: u32,
    /// vCPU records.
    pub vcpu_count: u32,
    /// Device records.
    pub device_count: u32,
}

/// Why encoding failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The sink refused bytes; the stream is unusable.
    Sink(SinkError),
    /// The call would produce a stream a decoder with the same limits rejects.
    Invalid(StreamError),
    /// `page()` called without an open run, or a run left unfinished.
    RunMismatch {
        /// Pages the open run still expects.
        expected_remaining: u32,
    },
    /// Page data of the wrong length.
    PageLength {
        /// Length given.
        found: usize,
        /// Page size.
        expected: u32,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sink(e) => write!(f, "byte sink refused write: {}", e.reason),
            Self::Invalid(e) => write!(f, "invalid checkpoint: {e}"),
            Self::RunMismatch { expected_remaining } => {
                write!(f, "page run mismatch: open run expects {expected_remaining} more pages")
            }
            Self::PageLength { found, expected } => {
                write!(f, "page data is {found} bytes, expected {expected}")
            }
        }
    }
}

impl From<SinkError> for EncodeError {
    fn from(e: SinkError) -> Self {
        Self::Sink(e)
    }
}

impl From<StreamError> for EncodeError {
    fn from(e: StreamError) -> Self {
        Self::Invalid(e)
    }
}

/// How one page was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEncoding {
    /// All zero, no data.
    Zero,
    /// Whole page.
    Raw,
    /// XOR delta against the receiver's current page, this many bytes.
    Delta(u32),
}

/// One dirty page for [`CheckpointEncoder::pages`].
#[derive(Debug, Clone, Copy)]
pub struct DirtyPage<'a> {
    /// Guest frame number.
    pub gfn: u64,
    /// Current content.
    pub data: &'a [u8],
    /// What the receiver holds for this frame, if the sender knows (enables delta encoding).
    pub previous: Option<&'a [u8]>,
}

/// Totals of a finished stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitSummary {
    /// Epoch.
    pub epoch: u64,
    /// Stream bytes written.
    pub bytes: u64,
    /// Pages.
    pub pages: u32,
    /// Zero pages among them.
    pub zero_pages: u32,
    /// Delta pages among them.
    pub delta_pages: u32,
    /// CRC-32C.
    pub crc32c: u32,
}

/// Streams a checkpoint into a [`ByteSink`] as it is produced.
#[derive(Debug)]
pub struct CheckpointEncoder<S: ByteSink> {
    sink: S,
    info: HeaderInfo,
    limits: StreamLimits,
    val: Validator,
    crc: Crc32c,
    written: u64,
    run_remaining: u32,
    zero_pages: u32,
    delta_pages: u32,
    scratch: Vec<u8>,
}

impl<S: ByteSink> CheckpointEncoder<S> {
    /// Writes the header. Fails if `info` breaks `limits`.
    pub fn new(sink: S, info: HeaderInfo, limits: StreamLimits) -> Result<Self, EncodeError> {
        let mut val = Validator::new(limits);
        val.header(&info)?;
        let mut enc = Self {
            sink,
            info,
            limits,
            val,
            crc: Crc32c::new(),
            written: 0,
            run_remaining: 0,
            zero_pages: 0,
            delta_pages: 0,
            scratch: Vec::with_capacity(info.page_size as usize),
        };
        let h = StreamHeader {
            magic: MAGIC,
            version: U16::new(FORMAT_VERSION),
            header_len: U16::new(HEADER_LEN as u16),
            page_size: U32::new(info.page_size),
            epoch: U64::new(info.epoch),
            page_count: U32::new(info.page_count),
            vcpu_count: U32::new(info.vcpu_count),
            device_count: U32::new(info.device_count),
            reserved: U32::new(0),
        };
        enc.emit(h.as_bytes())?;
        Ok(enc)
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let len = self.written + bytes.len() as u64;
        check_total(len, &self.limits)?;
        self.sink.write_all(bytes)?;
        self.crc.update(bytes);
        self.written = len;
        Ok(())
    }

    fn record_header(&mut self, kind: u32, tag: u32, id: u64, len: u32) -> Result<(), EncodeError> {
        let r = RecordHeader {
            kind: U32::new(kind),
            tag: U32::new(tag),
            id: U64::new(id),
            len: U32::new(len),
            reserved: U32::new(0),
        };
        self.emit(r.as_bytes())
    }

    fn no_open_run(&self) -> Result<(), EncodeError> {
        if self.run_remaining != 0 {
            return Err(EncodeError::RunMismatch { expected_remaining: self.run_remaining });
        }
        Ok(())
    }

    /// Opens a run of `count` pages starting at `first_gfn`; follow with `count` calls to
    /// [`page`](Self::page).
    pub fn begin_run(&mut self, first_gfn: u64, count: u32) -> Result<(), EncodeError> {
        self.no_open_run()?;
        self.val.run(first_gfn, count)?;
        self.record_header(KIND_PAGE_RUN, 0, first_gfn, count)?;
        self.run_remaining = count;
        Ok(())
    }

    /// Writes the next page of the open run, choosing zero, delta (when `previous` is given and
    /// the delta is smaller than the page) or raw.
    pub fn page(&mut self, data: &[u8], previous: Option<&[u8]>) -> Result<PageEncoding, EncodeError> {
        if self.run_remaining == 0 {
            return Err(EncodeError::RunMismatch { expected_remaining: 0 });
        }
        let ps = self.info.page_size as usize;
        for d in core::iter::once(data).chain(previous) {
            if d.len() != ps {
                return Err(EncodeError::PageLength { found: d.len(), expected: self.info.page_size });
            }
        }
        self.run_remaining -= 1;
        if is_zero(data) {
            self.zero_pages += 1;
            self.emit(&[PAGE_ZERO])?;
            return Ok(PageEncoding::Zero);
        }
        if let Some(prev) = previous {
            let mut scratch = core::mem::take(&mut self.scratch);
            // Delta must beat raw including its 4-byte length.
            let ok = encode_delta(data, prev, &mut scratch, ps.saturating_sub(4));
            let res = if ok {
                let n = scratch.len() as u32;
                self.emit(&[PAGE_DELTA])
                    .and_then(|()| self.emit(&n.to_le_bytes()))
                    .and_then(|()| self.emit(&scratch))
                    .map(|()| Some(n))
            } else {
                Ok(None)
            };
            self.scratch = scratch;
            if let Some(n) = res? {
                self.delta_pages += 1;
                return Ok(PageEncoding::Delta(n));
            }
        }
        self.emit(&[PAGE_RAW])?;
        self.emit(data)?;
        Ok(PageEncoding::Raw)
    }

    /// Convenience: writes `pages` (sorted by frame, no duplicates) grouped into runs of
    /// consecutive frames.
    pub fn pages(&mut self, pages: &[DirtyPage<'_>]) -> Result<(), EncodeError> {
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j].gfn == pages[j - 1].gfn.wrapping_add(1) && j - i < u32::MAX as usize {
                j += 1;
            }
            self.begin_run(pages[i].gfn, (j - i) as u32)?;
            for p in &pages[i..j] {
                self.page(p.data, p.previous)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Writes the state of vCPU `index` (layout named by `tag`).
    pub fn vcpu_state(&mut self, index: u32, tag: u32, blob: &[u8]) -> Result<(), EncodeError> {
        self.blob(SectionKind::Vcpu, KIND_VCPU, index.into(), tag, blob)
    }

    /// Writes the state of device `id` (layout named by `tag`).
    pub fn device_state(&mut self, id: u64, tag: u32, blob: &[u8]) -> Result<(), EncodeError> {
        self.blob(SectionKind::Device, KIND_DEVICE, id, tag, blob)
    }

    fn blob(&mut self, kind: SectionKind, wire: u32, id: u64, tag: u32, blob: &[u8]) -> Result<(), EncodeError> {
        self.no_open_run()?;
        let len = u32::try_from(blob.len()).map_err(|_| StreamError::SectionTooLarge {
            kind,
            found: blob.len() as u64,
            max: self.limits.max_section_bytes.into(),
        })?;
        self.val.blob(kind, id, len)?;
        self.record_header(wire, tag, id, len)?;
        self.emit(blob)
    }

    /// Writes the commit record and returns the sink and the totals.
    pub fn finish(mut self) -> Result<(S, CommitSummary), EncodeError> {
        self.no_open_run()?;
        self.val.commit(&self.info)?;
        let body_len = self.written;
        self.record_header(KIND_COMMIT, 0, self.info.epoch, COMMIT_BODY_LEN as u32)?;
        let body = CommitBody {
            body_len: U64::new(body_len),
            page_count: U32::new(self.val.pages as u32),
            record_count: U32::new(self.val.records as u32),
            end_magic: U32::new(COMMIT_END_MAGIC),
            crc32c: U32::new(0),
        };
        let head = &body.as_bytes()[..COMMIT_BODY_LEN - 4];
        self.emit(head)?;
        let crc = self.crc.value();
        self.emit(&crc.to_le_bytes())?;
        let summary = CommitSummary {
            epoch: self.info.epoch,
            bytes: self.written,
            pages: self.val.pages as u32,
            zero_pages: self.zero_pages,
            delta_pages: self.delta_pages,
            crc32c: crc,
        };
        Ok((self.sink, summary))
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Header,
    Record,
    PageKind,
    PageRaw,
    DeltaLen,
    DeltaBody,
    Blob(SectionKind),
    CommitBody,
}

impl Expect {
    fn section(self) -> SectionKind {
        match self {
            Self::Header => SectionKind::Header,
            Self::Record => SectionKind::RecordHeader,
            Self::PageKind | Self::PageRaw | Self::DeltaLen | Self::DeltaBody => SectionKind::PageRun,
            Self::Blob(k) => k,
            Self::CommitBody => SectionKind::Commit,
        }
    }
}

/// Where a page's data sits in a staged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageRef {
    gfn: u64,
    enc: u8,
    offset: usize,
    len: usize,
}

/// Where a blob sits in a staged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlobRef {
    id: u64,
    tag: u32,
    offset: usize,
    len: usize,
}

/// Result of feeding bytes.
#[derive(Debug)]
pub enum Feed {
    /// The checkpoint is not complete yet; all input was consumed.
    NeedMore,
    /// The commit record checked out. `consumed` bytes of the last input belonged to this
    /// checkpoint; the rest belongs to whatever follows on the connection.
    Complete {
        /// The verified checkpoint.
        checkpoint: StagedCheckpoint,
        /// Bytes of the last input used.
        consumed: usize,
    },
}

#[derive(Debug)]
enum DecState {
    Running,
    Failed(StreamError),
    Done,
}

/// Incremental checkpoint decoder: feed it bytes in any chunking; it buffers and validates the
/// whole checkpoint and returns it only once the commit record and checksum check out.
#[derive(Debug)]
pub struct CheckpointDecoder {
    limits: StreamLimits,
    expect_epoch: Option<u64>,
    state: DecState,
    buf: Vec<u8>,
    elem_start: usize,
    need: usize,
    expect: Expect,
    crc: Crc32c,
    val: Validator,
    info: Option<HeaderInfo>,
    cur_gfn: u64,
    run_left: u32,
    pages: Vec<PageRef>,
    vcpus: Vec<BlobRef>,
    devices: Vec<BlobRef>,
    pending_blob: (u64, u32),
}

impl CheckpointDecoder {
    /// A decoder for one checkpoint under `limits`.
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            expect_epoch: None,
            state: DecState::Running,
            buf: Vec::new(),
            elem_start: 0,
            need: HEADER_LEN,
            expect: Expect::Header,
            crc: Crc32c::new(),
            val: Validator::new(limits),
            info: None,
            cur_gfn: 0,
            run_left: 0,
            pages: Vec::new(),
            vcpus: Vec::new(),
            devices: Vec::new(),
            pending_blob: (0, 0),
        }
    }

    /// Also require the header's epoch to be `epoch` (rejects replayed or skipped checkpoints).
    pub fn expecting_epoch(mut self, epoch: u64) -> Self {
        self.expect_epoch = Some(epoch);
        self
    }

    /// Bytes buffered so far.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds the next bytes of the stream. After an error the decoder stays failed and returns
    /// the same error.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Feed, StreamError> {
        match &self.state {
            DecState::Failed(e) => return Err(e.clone()),
            DecState::Done => return Err(StreamError::AlreadyComplete),
            DecState::Running => {}
        }
        let total_in = input.len();
        loop {
            let have = self.buf.len() - self.elem_start;
            if have == self.need {
                match self.step() {
                    Ok(true) => {
                        self.state = DecState::Done;
                        let checkpoint = self.take_staged();
                        return Ok(Feed::Complete { checkpoint, consumed: total_in - input.len() });
                    }
                    Ok(false) => continue,
                    Err(e) => {
                        self.state = DecState::Failed(e.clone());
                        self.buf = Vec::new();
                        return Err(e);
                    }
                }
            }
            if input.is_empty() {
                return Ok(Feed::NeedMore);
            }
            let take = (self.need - have).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
    }

    /// Call when the connection ends: an error unless the checkpoint completed.
    pub fn end_of_stream(&self) -> Result<(), StreamError> {
        match &self.state {
            DecState::Done => Ok(()),
            DecState::Failed(e) => Err(e.clone()),
            DecState::Running => Err(StreamError::Truncated {
                received: self.buf.len() as u64,
                needed: (self.elem_start + self.need) as u64,
                reading: self.expect.section(),
            }),
        }
    }

    /// Sets up the next element of `need` bytes, enforcing the total size cap first.
    fn next(&mut self, expect: Expect, need: usize) -> Result<(), StreamError> {
        let end = self.buf.len() as u64 + need as u64;
        check_total(end, &self.limits)?;
        self.elem_start = self.buf.len();
        self.need = need;
        self.expect = expect;
        Ok(())
    }

    fn after_page(&mut self) -> Result<(), StreamError> {
        self.cur_gfn += 1;
        self.run_left -= 1;
        if self.run_left == 0 {
            self.next(Expect::Record, RECORD_HEADER_LEN)
        } else {
            self.next(Expect::PageKind, 1)
        }
    }

    /// Processes the complete element at `buf[elem_start..]`. Returns true when committed.
    fn step(&mut self) -> Result<bool, StreamError> {
        let start = self.elem_start;
        let elem = &self.buf[start..];
        let ps = self.limits.page_size as usize;
        match self.expect {
            Expect::Header => {
                let h = StreamHeader::read_from_bytes(elem).map_err(|_| StreamError::Truncated {
                    received: elem.len() as u64,
                    needed: HEADER_LEN as u64,
                    reading: SectionKind::Header,
                })?;
                if h.magic != MAGIC {
                    return Err(StreamError::BadMagic { found: h.magic });
                }
                if h.version.get() != FORMAT_VERSION {
                    return Err(StreamError::UnsupportedVersion { found: h.version.get(), expected: FORMAT_VERSION });
                }
                if h.header_len.get() != HEADER_LEN as u16 {
                    return Err(StreamError::BadHeaderLength {
                        found: h.header_len.get(),
                        expected: HEADER_LEN as u16,
                    });
                }
                if h.reserved.get() != 0 {
                    return Err(StreamError::ReservedNotZero {
                        field: "header.reserved",
                        found: h.reserved.get().into(),
                    });
                }
                if let Some(e) = self.expect_epoch {
                    if h.epoch.get() != e {
                        return Err(StreamError::EpochMismatch { found: h.epoch.get(), expected: e });
                    }
                }
                let info = HeaderInfo {
                    epoch: h.epoch.get(),
                    page_size: h.page_size.get(),
                    page_count: h.page_count.get(),
                    vcpu_count: h.vcpu_count.get(),
                    device_count: h.device_count.get(),
                };
                self.val.header(&info)?;
                self.info = Some(info);
                self.pages.reserve(info.page_count as usize);
                // Raw-page worst case for the declared pages, bounded by the total cap.
                let hint = (u64::from(info.page_count) * (u64::from(info.page_size) + 1))
                    .min(self.limits.max_total_bytes)
                    .min(1 << 30);
                self.buf.reserve(hint as usize);
                self.crc.update(&self.buf[start..]);
                self.next(Expect::Record, RECORD_HEADER_LEN)?;
            }
            Expect::Record => {
                let r = RecordHeader::read_from_bytes(elem).map_err(|_| StreamError::Truncated {
                    received: elem.len() as u64,
                    needed: RECORD_HEADER_LEN as u64,
                    reading: SectionKind::Commit,
                })?;
                if r.reserved.get() != 0 {
                    return Err(StreamError::ReservedNotZero {
                        field: "record.reserved",
                        found: r.reserved.get().into(),
                    });
                }
                let (kind, tag, id, len) = (r.kind.get(), r.tag.get(), r.id.get(), r.len.get());
                self.crc.update(&self.buf[start..]);
                match kind {
                    KIND_PAGE_RUN => {
                        if tag != 0 {
                            return Err(StreamError::ReservedNotZero { field: "page run tag", found: tag.into() });
                        }
                        self.val.run(id, len)?;
                        self.cur_gfn = id;
                        self.run_left = len;
                        self.next(Expect::PageKind, 1)?;
                    }
                    KIND_VCPU | KIND_DEVICE => {
                        let sk = if kind == KIND_VCPU { SectionKind::Vcpu } else { SectionKind::Device };
                        self.val.blob(sk, id, len)?;
                        self.pending_blob = (id, tag);
                        self.next(Expect::Blob(sk), len as usize)?;
                    }
                    KIND_COMMIT => {
                        let info = self.info.unwrap_or(HeaderInfo {
                            epoch: 0,
                            page_size: 0,
                            page_count: 0,
                            vcpu_count: 0,
                            device_count: 0,
                        });
                        if id != info.epoch {
                            return Err(StreamError::CommitMismatch {
                                field: "epoch",
                                found: id,
                                expected: info.epoch,
                            });
                        }
                        if tag != 0 {
                            return Err(StreamError::ReservedNotZero { field: "commit tag", found: tag.into() });
                        }
                        if len as usize != COMMIT_BODY_LEN {
                            return Err(StreamError::CommitMismatch {
                                field: "length",
                                found: len.into(),
                                expected: COMMIT_BODY_LEN as u64,
                            });
                        }
                        self.val.commit(&info)?;
                        self.next(Expect::CommitBody, COMMIT_BODY_LEN)?;
                    }
                    other => return Err(StreamError::UnknownRecordKind { found: other }),
                }
            }
            Expect::PageKind => {
                let k = elem[0];
                self.crc.update(&self.buf[start..]);
                match k {
                    PAGE_ZERO => {
                        self.pages.push(PageRef { gfn: self.cur_gfn, enc: PAGE_ZERO, offset: start, len: 0 });
                        self.after_page()?;
                    }
                    PAGE_RAW => self.next(Expect::PageRaw, ps)?,
                    PAGE_DELTA => self.next(Expect::DeltaLen, 4)?,
                    other => return Err(StreamError::UnknownPageEncoding { gfn: self.cur_gfn, found: other }),
                }
            }
            Expect::PageRaw => {
                self.crc.update(&self.buf[start..]);
                self.pages.push(PageRef { gfn: self.cur_gfn, enc: PAGE_RAW, offset: start, len: ps });
                self.after_page()?;
            }
            Expect::DeltaLen => {
                let n = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
                self.crc.update(&self.buf[start..]);
                let max = self.limits.page_size.saturating_sub(4);
                if n >= max {
                    return Err(StreamError::DeltaTooLarge { gfn: self.cur_gfn, found: n, max });
                }
                self.next(Expect::DeltaBody, n as usize)?;
            }
            Expect::DeltaBody => {
                validate_delta(elem, ps).map_err(|covered| StreamError::BadDelta {
                    gfn: self.cur_gfn,
                    covered,
                    expected: self.limits.page_size,
                })?;
                self.crc.update(&self.buf[start..]);
                self.pages.push(PageRef { gfn: self.cur_gfn, enc: PAGE_DELTA, offset: start, len: self.need });
                self.after_page()?;
            }
            Expect::Blob(kind) => {
                self.crc.update(&self.buf[start..]);
                let (id, tag) = self.pending_blob;
                let b = BlobRef { id, tag, offset: start, len: self.need };
                if kind == SectionKind::Vcpu {
                    self.vcpus.push(b);
                } else {
                    self.devices.push(b);
                }
                self.next(Expect::Record, RECORD_HEADER_LEN)?;
            }
            Expect::CommitBody => {
                let c = CommitBody::read_from_bytes(elem).map_err(|_| StreamError::Truncated {
                    received: elem.len() as u64,
                    needed: COMMIT_BODY_LEN as u64,
                    reading: SectionKind::Commit,
                })?;
                self.crc.update(&self.buf[start..start + COMMIT_BODY_LEN - 4]);
                let computed = self.crc.value();
                if c.crc32c.get() != computed {
                    return Err(StreamError::ChecksumMismatch { found: c.crc32c.get(), expected: computed });
                }
                if c.end_magic.get() != COMMIT_END_MAGIC {
                    return Err(StreamError::CommitMismatch {
                        field: "end_magic",
                        found: c.end_magic.get().into(),
                        expected: COMMIT_END_MAGIC.into(),
                    });
                }
                let body_len = (start - RECORD_HEADER_LEN) as u64;
                let checks: [(&'static str, u64, u64); 3] = [
                    ("body_len", c.body_len.get(), body_len),
                    ("page_count", c.page_count.get().into(), self.val.pages),
                    ("record_count", c.record_count.get().into(), self.val.records),
                ];
                for (field, found, expected) in checks {
                    if found != expected {
                        return Err(StreamError::CommitMismatch { field, found, expected });
                    }
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn take_staged(&mut self) -> StagedCheckpoint {
        let info = self.info.unwrap_or(HeaderInfo {
            epoch: 0,
            page_size: self.limits.page_size,
            page_count: 0,
            vcpu_count: 0,
            device_count: 0,
        });
        StagedCheckpoint {
            epoch: info.epoch,
            page_size: info.page_size,
            crc32c: self.crc.value(),
            bytes: core::mem::take(&mut self.buf),
            pages: core::mem::take(&mut self.pages),
            vcpus: core::mem::take(&mut self.vcpus),
            devices: core::mem::take(&mut self.devices),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Staged (verified) checkpoint and applying it.

/// Guest memory a checkpoint is applied to (the secondary's copy of guest RAM).
pub trait GuestMemoryMut {
    /// Page size in bytes.
    fn page_size(&self) -> usize;
    /// Number of frames.
    fn frame_count(&self) -> u64;
    /// Frame `gfn`. Contract: for every `gfn < frame_count()` returns exactly `page_size()`
    /// bytes and never fails; `apply_to` checks the range before calling.
    fn frame_mut(&mut self, gfn: u64) -> &mut [u8];
}

/// Flat in-memory guest RAM (tests, benches, the secondary's checkpoint cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecGuestMemory {
    page_size: usize,
    bytes: Vec<u8>,
}

impl VecGuestMemory {
    /// Zeroed memory of `frames` frames.
    pub fn new(page_size: usize, frames: usize) -> Self {
        Self { page_size, bytes: alloc::vec![0; page_size * frames] }
    }

    /// Frame `gfn`, read-only.
    pub fn frame(&self, gfn: u64) -> &[u8] {
        let s = gfn as usize * self.page_size;
        &self.bytes[s..s + self.page_size]
    }

    /// All bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl GuestMemoryMut for VecGuestMemory {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn frame_count(&self) -> u64 {
        (self.bytes.len() / self.page_size) as u64
    }
    fn frame_mut(&mut self, gfn: u64) -> &mut [u8] {
        let s = gfn as usize * self.page_size;
        &mut self.bytes[s..s + self.page_size]
    }
}

/// Why a verified checkpoint cannot be applied to this memory. Nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyError {
    /// Memory page size differs.
    PageSizeMismatch {
        /// Memory's page size.
        found: usize,
        /// Checkpoint's page size.
        expected: u32,
    },
    /// The checkpoint is not the one the caller expects next.
    EpochMismatch {
        /// The checkpoint's epoch.
        found: u64,
        /// Epoch the caller expected.
        expected: u64,
    },
    /// Memory too small for a frame in the checkpoint.
    FrameOutOfRange {
        /// Frame.
        gfn: u64,
        /// Memory size in frames.
        frames: u64,
    },
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageSizeMismatch { found, expected } => {
                write!(f, "guest memory page size is {found}, expected {expected} (checkpoint's)")
            }
            Self::EpochMismatch { found, expected } => {
                write!(f, "checkpoint epoch is {found}, expected {expected} (the next one to apply)")
            }
            Self::FrameOutOfRange { gfn, frames } => {
                write!(f, "checkpoint frame {gfn:#x} is outside guest memory, expected below {frames:#x}")
            }
        }
    }
}

/// One page of a staged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedPage {
    /// Frame.
    pub gfn: u64,
    /// Encoding used on the wire.
    pub encoding: PageEncoding,
}

/// One vCPU/device state blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBlob<'a> {
    /// vCPU index or device id.
    pub id: u64,
    /// Layout tag.
    pub tag: u32,
    /// Bytes.
    pub data: &'a [u8],
}

/// What applying did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// Epoch applied.
    pub epoch: u64,
    /// Pages written.
    pub pages: u64,
}

/// A fully received checkpoint whose structure, totals and checksum have been verified. Only
/// [`CheckpointDecoder`] makes these, so a partial checkpoint can never be applied.
#[derive(Debug, Clone)]
pub struct StagedCheckpoint {
    epoch: u64,
    page_size: u32,
    crc32c: u32,
    bytes: Vec<u8>,
    pages: Vec<PageRef>,
    vcpus: Vec<BlobRef>,
    devices: Vec<BlobRef>,
}

impl StagedCheckpoint {
    /// Epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of pages.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Stream length in bytes.
    pub fn stream_len(&self) -> usize {
        self.bytes.len()
    }

    /// The stream's CRC-32C.
    pub fn checksum(&self) -> u32 {
        self.crc32c
    }

    /// Pages in frame order.
    pub fn pages(&self) -> impl Iterator<Item = StagedPage> + '_ {
        self.pages.iter().map(|p| StagedPage {
            gfn: p.gfn,
            encoding: match p.enc {
                PAGE_ZERO => PageEncoding::Zero,
                PAGE_RAW => PageEncoding::Raw,
                _ => PageEncoding::Delta(p.len as u32),
            },
        })
    }

    fn blob<'a>(&'a self, b: &BlobRef) -> StateBlob<'a> {
        StateBlob { id: b.id, tag: b.tag, data: &self.bytes[b.offset..b.offset + b.len] }
    }

    /// vCPU state blobs in index order.
    pub fn vcpu_states(&self) -> impl Iterator<Item = StateBlob<'_>> + '_ {
        self.vcpus.iter().map(|b| self.blob(b))
    }

    /// Device state blobs in id order.
    pub fn device_states(&self) -> impl Iterator<Item = StateBlob<'_>> + '_ {
        self.devices.iter().map(|b| self.blob(b))
    }

    /// Checks that this is checkpoint `expected_epoch` and that `mem` can take every page, then
    /// writes them all. On error nothing was written. Delta pages are XORed onto `mem`'s current
    /// content, so applying the same checkpoint twice would undo them: applying consumes the
    /// checkpoint.
    pub fn apply_to<M: GuestMemoryMut + ?Sized>(
        self,
        mem: &mut M,
        expected_epoch: u64,
    ) -> Result<ApplyReport, ApplyError> {
        if self.epoch != expected_epoch {
            return Err(ApplyError::EpochMismatch { found: self.epoch, expected: expected_epoch });
        }
        if mem.page_size() != self.page_size as usize {
            return Err(ApplyError::PageSizeMismatch { found: mem.page_size(), expected: self.page_size });
        }
        let frames = mem.frame_count();
        // Frames are strictly increasing (decoder-verified), so the last is the largest.
        if let Some(last) = self.pages.last() {
            if last.gfn >= frames {
                return Err(ApplyError::FrameOutOfRange { gfn: last.gfn, frames });
            }
        }
        for p in &self.pages {
            let page = mem.frame_mut(p.gfn);
            match p.enc {
                PAGE_ZERO => page.fill(0),
                PAGE_RAW => page.copy_from_slice(&self.bytes[p.offset..p.offset + p.len]),
                _ => apply_delta(&self.bytes[p.offset..p.offset + p.len], page),
            }
        }
        Ok(ApplyReport { epoch: self.epoch, pages: self.pages.len() as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const PS: usize = 4096;

    fn limits() -> StreamLimits {
        StreamLimits {
            page_size: PS as u32,
            guest_frames: 64,
            max_pages: 32,
            max_section_bytes: 1024,
            max_records: 64,
            max_total_bytes: 1 << 20,
        }
    }

    fn info(epoch: u64, pages: u32, vcpus: u32, devices: u32) -> HeaderInfo {
        HeaderInfo { epoch, page_size: PS as u32, page_count: pages, vcpu_count: vcpus, device_count: devices }
    }

    fn pattern(seed: u8) -> Vec<u8> {
        (0..PS).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
    }

    /// Page 2 raw, page 3 zero, page 4 delta against `prev`, page 10 raw, one vCPU, two devices.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let prev = pattern(7);
        let mut delta_page = prev.clone();
        delta_page[100] ^= 0xFF;
        delta_page[4000] = 0;
        let raw = pattern(1);
        let zero = vec![0u8; PS];
        let raw10 = pattern(9);
        let mut enc = CheckpointEncoder::new(Vec::new(), info(5, 4, 1, 2), limits()).unwrap();
        enc.pages(&[
            DirtyPage { gfn: 2, data: &raw, previous: None },
            DirtyPage { gfn: 3, data: &zero, previous: Some(&prev) },
            DirtyPage { gfn: 4, data: &delta_page, previous: Some(&prev) },
            DirtyPage { gfn: 10, data: &raw10, previous: Some(&prev) },
        ])
        .unwrap();
        enc.vcpu_state(0, 0x11, b"vcpu0").unwrap();
        enc.device_state(3, 7, b"nic").unwrap();
        enc.device_state(9, 8, b"").unwrap();
        let (bytes, sum) = enc.finish().unwrap();
        assert_eq!(sum.pages, 4);
        assert_eq!(sum.zero_pages, 1);
        assert_eq!(sum.delta_pages, 1);
        assert_eq!(sum.bytes, bytes.len() as u64);
        (bytes, prev)
    }

    fn decode_all(bytes: &[u8], l: StreamLimits) -> Result<StagedCheckpoint, StreamError> {
        let mut d = CheckpointDecoder::new(l);
        match d.feed(bytes)? {
            Feed::Complete { checkpoint, consumed } => {
                assert_eq!(consumed, bytes.len());
                Ok(checkpoint)
            }
            Feed::NeedMore => Err(d.end_of_stream().unwrap_err()),
        }
    }

    #[test]
    fn crc32c_known_vector() {
        assert_eq!(Crc32c::checksum(b"123456789"), 0xE306_9283);
        let mut c = Crc32c::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.value(), 0xE306_9283);
        assert_eq!(Crc32c::checksum(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn round_trip_applies_all_encodings() {
        let (bytes, prev) = sample();
        let cp = decode_all(&bytes, limits()).unwrap();
        assert_eq!(cp.epoch(), 5);
        assert_eq!(cp.page_count(), 4);
        let encs: Vec<_> = cp.pages().map(|p| (p.gfn, p.encoding)).collect();
        assert_eq!(encs[0], (2, PageEncoding::Raw));
        assert_eq!(encs[1], (3, PageEncoding::Zero));
        assert!(matches!(encs[2], (4, PageEncoding::Delta(_))));
        assert_eq!(encs[3], (10, PageEncoding::Raw));
        let mut mem = VecGuestMemory::new(PS, 64);
        mem.frame_mut(3).fill(0xAA);
        mem.frame_mut(4).copy_from_slice(&prev);
        let v: Vec<_> = cp.vcpu_states().map(|b| (b.id, b.tag, b.data.to_vec())).collect();
        assert_eq!(v, vec![(0, 0x11, b"vcpu0".to_vec())]);
        let d: Vec<_> = cp.device_states().map(|b| (b.id, b.tag, b.data.len())).collect();
        assert_eq!(d, vec![(3, 7, 3), (9, 8, 0)]);
        cp.apply_to(&mut mem, 5).unwrap();
        assert_eq!(mem.frame(2), &pattern(1)[..]);
        assert!(mem.frame(3).iter().all(|&b| b == 0));
        let mut want = prev.clone();
        want[100] ^= 0xFF;
        want[4000] = 0;
        assert_eq!(mem.frame(4), &want[..]);
        assert_eq!(mem.frame(10), &pattern(9)[..]);
    }

    #[test]
    fn byte_at_a_time_feeding_completes_at_commit() {
        let (mut bytes, _) = sample();
        let n = bytes.len();
        bytes.extend_from_slice(b"next");
        let mut d = CheckpointDecoder::new(limits());
        for (i, b) in bytes.iter().enumerate() {
            match d.feed(core::slice::from_ref(b)).unwrap() {
                Feed::NeedMore => assert!(i < n - 1),
                Feed::Complete { consumed, .. } => {
                    assert_eq!(i, n - 1);
                    assert_eq!(consumed, 1);
                    break;
                }
            }
        }
        assert_eq!(d.feed(b"x").unwrap_err(), StreamError::AlreadyComplete);
        // Whole buffer with trailing bytes: consumed excludes them.
        let mut d = CheckpointDecoder::new(limits());
        match d.feed(&bytes).unwrap() {
            Feed::Complete { consumed, .. } => assert_eq!(consumed, n),
            Feed::NeedMore => panic!("should complete"),
        }
    }

    #[test]
    fn truncation_is_rejected_at_every_length() {
        let (bytes, _) = sample();
        for cut in 0..bytes.len() {
            let mut d = CheckpointDecoder::new(limits());
            assert!(matches!(d.feed(&bytes[..cut]), Ok(Feed::NeedMore)));
            assert!(matches!(d.end_of_stream(), Err(StreamError::Truncated { .. })));
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let (bytes, _) = sample();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1 << (i % 8);
            let mut d = CheckpointDecoder::new(limits());
            let r = d.feed(&b);
            assert!(!matches!(r, Ok(Feed::Complete { .. })), "flip at {i} accepted");
        }
    }

    #[test]
    fn bad_magic_and_version_named() {
        let (bytes, _) = sample();
        let mut b = bytes.clone();
        b[0] = b'X';
        let e = decode_all(&b, limits()).unwrap_err();
        assert!(matches!(e, StreamError::BadMagic { .. }));
        let mut b = bytes.clone();
        b[8] = 9;
        let e = decode_all(&b, limits()).unwrap_err();
        assert_eq!(e, StreamError::UnsupportedVersion { found: 9, expected: 1 });
        assert_eq!(e.to_string(), "checkpoint format version is 9, expected 1");
    }

    #[test]
    fn page_size_and_epoch_checked() {
        let (bytes, _) = sample();
        let mut l = limits();
        l.page_size = 8192;
        assert_eq!(decode_all(&bytes, l).unwrap_err(), StreamError::PageSizeMismatch { found: 4096, expected: 8192 });
        let mut d = CheckpointDecoder::new(limits()).expecting_epoch(6);
        assert_eq!(d.feed(&bytes).unwrap_err(), StreamError::EpochMismatch { found: 5, expected: 6 });
    }

    #[test]
    fn limits_reject_before_data_arrives() {
        let (bytes, _) = sample();
        let mut l = limits();
        l.max_pages = 3;
        assert_eq!(decode_all(&bytes, l).unwrap_err(), StreamError::TooManyPages { found: 4, max: 3 });
        let mut l = limits();
        l.guest_frames = 8;
        assert_eq!(decode_all(&bytes, l).unwrap_err(), StreamError::FrameOutOfRange { gfn: 10, frames: 8 });
        let mut l = limits();
        l.max_section_bytes = 4;
        assert!(matches!(
            decode_all(&bytes, l).unwrap_err(),
            StreamError::SectionTooLarge { kind: SectionKind::Vcpu, found: 5, max: 4 }
        ));
        let mut l = limits();
        l.max_total_bytes = 1000;
        // Header + record header fit; the raw page would not: rejected with only 65 bytes fed.
        let mut d = CheckpointDecoder::new(l);
        assert!(matches!(
            d.feed(&bytes[..HEADER_LEN + RECORD_HEADER_LEN + 1]),
            Err(StreamError::StreamTooLarge { .. })
        ));
    }

    fn raw_header(enc: &mut Vec<u8>, pages: u32, vcpus: u32, devices: u32) {
        let h = StreamHeader {
            magic: MAGIC,
            version: U16::new(1),
            header_len: U16::new(40),
            page_size: U32::new(PS as u32),
            epoch: U64::new(1),
            page_count: U32::new(pages),
            vcpu_count: U32::new(vcpus),
            device_count: U32::new(devices),
            reserved: U32::new(0),
        };
        enc.extend_from_slice(h.as_bytes());
    }

    fn raw_record(enc: &mut Vec<u8>, kind: u32, id: u64, len: u32) {
        let r = RecordHeader {
            kind: U32::new(kind),
            tag: U32::new(0),
            id: U64::new(id),
            len: U32::new(len),
            reserved: U32::new(0),
        };
        enc.extend_from_slice(r.as_bytes());
    }

    #[test]
    fn reordered_and_duplicate_sections_rejected() {
        // Device before vCPU.
        let mut s = Vec::new();
        raw_header(&mut s, 0, 1, 1);
        raw_record(&mut s, KIND_DEVICE, 1, 0);
        raw_record(&mut s, KIND_VCPU, 0, 0);
        assert_eq!(
            decode_all(&s, limits()).unwrap_err(),
            StreamError::SectionOutOfOrder { found: SectionKind::Vcpu, after: SectionKind::Device }
        );
        // Duplicate device id.
        let mut s = Vec::new();
        raw_header(&mut s, 0, 0, 2);
        raw_record(&mut s, KIND_DEVICE, 4, 0);
        raw_record(&mut s, KIND_DEVICE, 4, 0);
        assert_eq!(
            decode_all(&s, limits()).unwrap_err(),
            StreamError::DuplicateSection { kind: SectionKind::Device, id: 4 }
        );
        // Page run after a vCPU record.
        let mut s = Vec::new();
        raw_header(&mut s, 1, 1, 0);
        raw_record(&mut s, KIND_VCPU, 0, 0);
        raw_record(&mut s, KIND_PAGE_RUN, 0, 1);
        assert!(matches!(
            decode_all(&s, limits()).unwrap_err(),
            StreamError::SectionOutOfOrder { found: SectionKind::PageRun, .. }
        ));
        // Page runs going backwards.
        let mut s = Vec::new();
        raw_header(&mut s, 2, 0, 0);
        raw_record(&mut s, KIND_PAGE_RUN, 5, 1);
        s.push(PAGE_ZERO);
        raw_record(&mut s, KIND_PAGE_RUN, 5, 1);
        assert_eq!(
            decode_all(&s, limits()).unwrap_err(),
            StreamError::FrameNotIncreasing { gfn: 5, expected_at_least: 6 }
        );
        // Empty run, unknown kind, unknown page encoding.
        let mut s = Vec::new();
        raw_header(&mut s, 0, 0, 0);
        raw_record(&mut s, KIND_PAGE_RUN, 5, 0);
        assert_eq!(decode_all(&s, limits()).unwrap_err(), StreamError::EmptyRun { gfn: 5 });
        let mut s = Vec::new();
        raw_header(&mut s, 0, 0, 0);
        raw_record(&mut s, 77, 5, 0);
        assert_eq!(decode_all(&s, limits()).unwrap_err(), StreamError::UnknownRecordKind { found: 77 });
        let mut s = Vec::new();
        raw_header(&mut s, 1, 0, 0);
        raw_record(&mut s, KIND_PAGE_RUN, 5, 1);
        s.push(9);
        assert_eq!(decode_all(&s, limits()).unwrap_err(), StreamError::UnknownPageEncoding { gfn: 5, found: 9 });
    }

    #[test]
    fn bad_delta_rejected() {
        let mut s = Vec::new();
        raw_header(&mut s, 1, 0, 0);
        raw_record(&mut s, KIND_PAGE_RUN, 5, 1);
        s.push(PAGE_DELTA);
        let mut body = Vec::new();
        put_varint(&mut body, 100);
        put_varint(&mut body, 1);
        body.push(1);
        s.extend_from_slice(&(body.len() as u32).to_le_bytes());
        s.extend_from_slice(&body);
        assert_eq!(
            decode_all(&s, limits()).unwrap_err(),
            StreamError::BadDelta { gfn: 5, covered: 101, expected: 4096 }
        );
    }

    #[test]
    fn header_counts_must_match_commit() {
        let r = CheckpointEncoder::new(Vec::new(), info(1, 2, 0, 0), limits()).and_then(|mut e| {
            e.begin_run(0, 1)?;
            e.page(&[0; PS], None)?;
            e.finish()
        });
        assert!(matches!(r, Err(EncodeError::Invalid(StreamError::CommitMismatch { found: 2, expected: 1, .. }))));
    }

    #[test]
    fn encoder_refuses_what_decoder_would_reject() {
        let mut e = CheckpointEncoder::new(Vec::new(), info(1, 2, 0, 0), limits()).unwrap();
        e.begin_run(3, 1).unwrap();
        e.page(&[0; PS], None).unwrap();
        assert!(matches!(e.begin_run(3, 1), Err(EncodeError::Invalid(StreamError::FrameNotIncreasing { .. }))));
        assert!(matches!(e.page(&[0; 10], None), Err(EncodeError::RunMismatch { .. })));
        e.begin_run(8, 1).unwrap();
        assert!(matches!(e.device_state(0, 0, b""), Err(EncodeError::RunMismatch { .. })));
        assert!(matches!(e.page(&[0; 10], None), Err(EncodeError::PageLength { found: 10, .. })));
    }

    #[test]
    fn delta_chosen_only_when_smaller() {
        let prev = pattern(3);
        let data = pattern(200);
        let mut e = CheckpointEncoder::new(Vec::new(), info(1, 2, 0, 0), limits()).unwrap();
        e.begin_run(0, 2).unwrap();
        assert_eq!(e.page(&data, Some(&prev)).unwrap(), PageEncoding::Raw);
        assert_eq!(e.page(&prev, Some(&prev)).unwrap(), PageEncoding::Delta(3));
    }

    #[test]
    fn apply_is_all_or_nothing_on_small_memory() {
        let (bytes, _) = sample();
        let cp = decode_all(&bytes, limits()).unwrap();
        let mut mem = VecGuestMemory::new(PS, 8);
        mem.frame_mut(2).fill(0x5A);
        let before = mem.clone();
        let epoch = cp.epoch();
        assert_eq!(
            cp.clone().apply_to(&mut mem, epoch).unwrap_err(),
            ApplyError::FrameOutOfRange { gfn: 10, frames: 8 }
        );
        assert_eq!(mem, before);
        let mut small = VecGuestMemory::new(512, 64);
        assert!(matches!(cp.clone().apply_to(&mut small, epoch), Err(ApplyError::PageSizeMismatch { .. })));
        let mut big = VecGuestMemory::new(PS, 64);
        let before = big.clone();
        assert_eq!(
            cp.apply_to(&mut big, epoch + 1).unwrap_err(),
            ApplyError::EpochMismatch { found: epoch, expected: epoch + 1 }
        );
        assert_eq!(big, before);
    }

    #[test]
    fn failed_decoder_stays_failed() {
        let (mut bytes, _) = sample();
        bytes[0] = 0;
        let mut d = CheckpointDecoder::new(limits());
        let e = d.feed(&bytes).unwrap_err();
        assert_eq!(d.feed(b"more").unwrap_err(), e);
        assert_eq!(d.end_of_stream().unwrap_err(), e);
    }
}
