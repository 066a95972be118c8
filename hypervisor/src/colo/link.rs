//! The replication link's messages: typed [`Repr`]s parsed from, and emitted into, a byte stream
//! (smoltcp style: `Repr::parse` checks everything before anything is believed, `Repr::emit`
//! writes exactly `Repr::buffer_len` bytes).
//!
//! # Framing (version 1, integers little-endian)
//!
//! ```text
//! magic "CL" (2) | version u8 | kind u8 | payload_len u32 | payload | crc32c u32
//! ```
//!
//! The CRC-32C covers the 8-byte header and the payload. `payload_len` is checked against
//! [`MAX_PAYLOAD`] as soon as the header is in, so a peer can never make the receiver buffer
//! more than one maximal message ([`MAX_MESSAGE`]). Every payload has a fixed part whose length
//! is checked exactly, and variable parts whose lengths are bounded by [`MAX_PAYLOAD`].
//!
//! [`LinkDecoder`] is fed arbitrary chunks of the stream and yields one [`Repr`] at a time; any
//! error is final for the connection (the caller counts it by [`LinkError::name`] and closes
//! the connection).

use alloc::vec::Vec;
use core::fmt;

use super::checkpoint::Crc32c;

/// Stream magic at the start of every message.
pub const MAGIC: [u8; 2] = *b"CL";
/// The one framing version this code speaks.
pub const VERSION: u8 = 1;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 8;
/// Trailer (CRC-32C) bytes after the payload.
pub const TRAILER_LEN: usize = 4;
/// Largest payload a message may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest message on the wire.
pub const MAX_MESSAGE: usize = HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN;
/// Largest checkpoint chunk / full-sync memory data in one message.
pub const MAX_CHUNK: usize = MAX_PAYLOAD - 16;
/// Largest disk write in one message (whole sectors).
pub const MAX_DISK_WRITE: usize = 32 * 1024;
/// Largest Ethernet frame carried (mirrored client frames, SVM output).
pub const MAX_FRAME: usize = 9216;

/// Which side of a pair a host is on (as announced in [`Repr::Hello`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkRole {
    /// Runs the PVM.
    Primary,
    /// Runs (or will run, after a full sync) the SVM.
    Secondary,
}

/// Why the secondary refused a checkpoint ([`Repr::CheckpointNack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackReason {
    /// The checkpoint stream did not decode (bad structure, checksum, limits).
    BadStream,
    /// The stream applied but the digest of RAM and disk differs from the primary's.
    VerifyFailed,
    /// The driver could not apply it (wrong memory size, device refused its state).
    ApplyFailed,
    /// The epoch is not the one the secondary expects.
    UnexpectedEpoch,
    /// The secondary has not been fully synced.
    NotSynced,
    /// Block replication refused a write or the commit.
    Disk,
}

impl NackReason {
    /// Every reason, by wire code.
    pub const ALL: [NackReason; 6] =
        [Self::BadStream, Self::VerifyFailed, Self::ApplyFailed, Self::UnexpectedEpoch, Self::NotSynced, Self::Disk];

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }

    /// Short name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadStream => "bad_stream",
            Self::VerifyFailed => "verify_failed",
            Self::ApplyFailed => "apply_failed",
            Self::UnexpectedEpoch => "unexpected_epoch",
            Self::NotSynced => "not_synced",
            Self::Disk => "disk",
        }
    }
}

/// What a full-sync state record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// A vCPU's state (`id` = vCPU index).
    Vcpu,
    /// A device's state (`id` = device id).
    Device,
}

/// One message of the replication link. Variable parts borrow the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr<'a> {
    /// First message each way on a new connection.
    Hello {
        /// Sender's role.
        role: LinkRole,
        /// Sender's host id (from its configuration).
        host_id: u64,
        /// Pair generation the sender is in.
        generation: u64,
        /// Identity of the guest (hash of image and guest configuration): both hosts must run
        /// the same guest.
        guest_id: u64,
        /// Secondary: last committed epoch (0 = never synced). Primary: its current epoch.
        epoch: u64,
    },
    /// A client frame the PVM received, mirrored to the SVM.
    ClientFrame {
        /// Per-connection sequence number (starts at 0 on each connection).
        seq: u64,
        /// The PVM's epoch when it received the frame.
        epoch: u64,
        /// The Ethernet frame.
        frame: &'a [u8],
    },
    /// An SVM output frame, for the primary's comparator.
    SvmOutput {
        /// Per-connection sequence number.
        seq: u64,
        /// The SVM's epoch when it sent the frame.
        epoch: u64,
        /// The Ethernet frame.
        frame: &'a [u8],
    },
    /// A PVM disk write, covered by checkpoint `epoch`.
    DiskWrite {
        /// Checkpoint that covers it.
        epoch: u64,
        /// First sector.
        sector: u64,
        /// Whole sectors.
        data: &'a [u8],
    },
    /// A piece of checkpoint `epoch`'s stream (`colo::checkpoint` format).
    CheckpointChunk {
        /// Epoch.
        epoch: u64,
        /// Offset of `bytes` in the stream.
        offset: u64,
        /// Stream bytes.
        bytes: &'a [u8],
    },
    /// The last message of checkpoint `epoch`: the whole stream has been sent.
    CheckpointCommit {
        /// Epoch.
        epoch: u64,
        /// Stream length.
        stream_len: u64,
        /// Digest of the PVM's RAM and disk at the capture point (0 with verify off).
        digest: u64,
        /// Whether `digest` is to be checked.
        verify: bool,
    },
    /// The secondary applied and committed checkpoint `epoch`.
    CheckpointAck {
        /// Epoch.
        epoch: u64,
        /// The secondary's digest after the apply (0 with verify off).
        digest: u64,
    },
    /// The secondary refused checkpoint `epoch`.
    CheckpointNack {
        /// Epoch.
        epoch: u64,
        /// Why.
        reason: NackReason,
    },
    /// Liveness and generation.
    Heartbeat {
        /// Sender's generation.
        generation: u64,
        /// Sender's clock (for logs only).
        now: u64,
    },
    /// Full sync starts: the secondary drops its state and receives the whole guest.
    FullSyncBegin {
        /// The epoch the sync establishes (the SVM runs in `epoch + 1` after it).
        epoch: u64,
        /// Guest RAM bytes that will follow.
        ram_bytes: u64,
        /// Disk sectors that will follow.
        disk_sectors: u64,
    },
    /// Guest RAM bytes at `offset`.
    FullSyncMemory {
        /// Guest-physical offset.
        offset: u64,
        /// Bytes.
        data: &'a [u8],
    },
    /// Disk sectors.
    FullSyncDisk {
        /// First sector.
        sector: u64,
        /// Whole sectors.
        data: &'a [u8],
    },
    /// A vCPU or device state blob.
    FullSyncState {
        /// Which.
        kind: StateKind,
        /// vCPU index or device id.
        id: u64,
        /// Layout tag.
        tag: u32,
        /// Blob.
        data: &'a [u8],
    },
    /// Full sync complete.
    FullSyncEnd {
        /// Epoch.
        epoch: u64,
        /// Digest of the PVM's RAM and disk at the sync point (0 with verify off).
        digest: u64,
        /// Whether `digest` is to be checked.
        verify: bool,
    },
    /// Reserved for the failover messages (promotion, witness, fencing: issue #12). Parsed and
    /// checksummed like every message; today's node counts and ignores them.
    Failover {
        /// Sub-kind.
        code: u16,
        /// Body.
        body: &'a [u8],
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const CLIENT_FRAME: u8 = 2;
    pub const SVM_OUTPUT: u8 = 3;
    pub const DISK_WRITE: u8 = 4;
    pub const CKPT_CHUNK: u8 = 5;
    pub const CKPT_COMMIT: u8 = 6;
    pub const CKPT_ACK: u8 = 7;
    pub const CKPT_NACK: u8 = 8;
    pub const HEARTBEAT: u8 = 9;
    pub const SYNC_BEGIN: u8 = 10;
    pub const SYNC_MEMORY: u8 = 11;
    pub const SYNC_DISK: u8 = 12;
    pub const SYNC_STATE: u8 = 13;
    pub const SYNC_END: u8 = 14;
    pub const FAILOVER: u8 = 15;
}

/// Why bytes on the link were refused. Every error is final for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// The message does not start with [`MAGIC`].
    BadMagic {
        /// Bytes found.
        found: [u8; 2],
    },
    /// A framing version this code does not speak.
    UnsupportedVersion {
        /// Found.
        found: u8,
    },
    /// A message kind this code does not know.
    UnknownKind {
        /// Found.
        found: u8,
    },
    /// The payload length is above [`MAX_PAYLOAD`].
    TooLong {
        /// Announced payload length.
        len: u32,
    },
    /// The CRC-32C does not match.
    BadChecksum {
        /// CRC on the wire.
        found: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The payload length does not fit the kind.
    BadLength {
        /// Message kind.
        kind: u8,
        /// Payload length.
        len: usize,
        /// What the kind needs (the fixed part; variable parts must add up exactly).
        expected: usize,
    },
    /// A field holds a value outside its range.
    BadField {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// The connection ended in the middle of a message.
    Truncated {
        /// Bytes of the partial message received.
        received: usize,
    },
}

impl LinkError {
    /// Every error name, in counter order ([`LinkError::index`]).
    pub const NAMES: [&'static str; 8] = [
        "bad_magic",
        "unsupported_version",
        "unknown_kind",
        "too_long",
        "bad_checksum",
        "bad_length",
        "bad_field",
        "truncated",
    ];

    /// Counter index of this error.
    pub fn index(&self) -> usize {
        match self {
            Self::BadMagic { .. } => 0,
            Self::UnsupportedVersion { .. } => 1,
            Self::UnknownKind { .. } => 2,
            Self::TooLong { .. } => 3,
            Self::BadChecksum { .. } => 4,
            Self::BadLength { .. } => 5,
            Self::BadField { .. } => 6,
            Self::Truncated { .. } => 7,
        }
    }

    /// Short name for counters and logs.
    pub fn name(&self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic { found } => write!(f, "link message starts with {found:02x?}, expected \"CL\""),
            Self::UnsupportedVersion { found } => {
                write!(f, "link message version {found}, expected {VERSION}")
            }
            Self::UnknownKind { found } => write!(f, "link message kind {found}, expected 1..=15"),
            Self::TooLong { len } => {
                write!(f, "link message payload of {len} bytes, expected at most {MAX_PAYLOAD}")
            }
            Self::BadChecksum { found, computed } => {
                write!(f, "link message CRC-32C {found:#010x}, expected {computed:#010x}")
            }
            Self::BadLength { kind, len, expected } => write!(
                f,
                "link message kind {kind} has a {len}-byte payload, expected {expected} bytes (plus its declared parts)"
            ),
            Self::BadField { field, value } => {
                write!(f, "link message field `{field}` is {value}, outside its accepted range")
            }
            Self::Truncated { received } => {
                write!(f, "link closed after {received} bytes of a message, expected a whole message")
            }
        }
    }
}

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn flag(field: &'static str, v: u8) -> Result<bool, LinkError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(LinkError::BadField { field, value: u64::from(v) }),
    }
}

fn sectors(field: &'static str, data: &[u8]) -> Result<(), LinkError> {
    if data.is_empty() || !data.len().is_multiple_of(super::block::SECTOR_SIZE) {
        return Err(LinkError::BadField { field, value: data.len() as u64 });
    }
    Ok(())
}

fn frame_len(field: &'static str, data: &[u8]) -> Result<(), LinkError> {
    if data.is_empty() || data.len() > MAX_FRAME {
        return Err(LinkError::BadField { field, value: data.len() as u64 });
    }
    Ok(())
}

impl<'a> Repr<'a> {
    fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => kind::HELLO,
            Self::ClientFrame { .. } => kind::CLIENT_FRAME,
            Self::SvmOutput { .. } => kind::SVM_OUTPUT,
            Self::DiskWrite { .. } => kind::DISK_WRITE,
            Self::CheckpointChunk { .. } => kind::CKPT_CHUNK,
            Self::CheckpointCommit { .. } => kind::CKPT_COMMIT,
            Self::CheckpointAck { .. } => kind::CKPT_ACK,
            Self::CheckpointNack { .. } => kind::CKPT_NACK,
            Self::Heartbeat { .. } => kind::HEARTBEAT,
            Self::FullSyncBegin { .. } => kind::SYNC_BEGIN,
            Self::FullSyncMemory { .. } => kind::SYNC_MEMORY,
            Self::FullSyncDisk { .. } => kind::SYNC_DISK,
            Self::FullSyncState { .. } => kind::SYNC_STATE,
            Self::FullSyncEnd { .. } => kind::SYNC_END,
            Self::Failover { .. } => kind::FAILOVER,
        }
    }

    /// Fixed payload bytes of a kind, and whether a variable tail follows.
    fn fixed_len(kind: u8) -> Option<(usize, bool)> {
        Some(match kind {
            kind::HELLO => (33, false),
            kind::CLIENT_FRAME | kind::SVM_OUTPUT => (16, true),
            kind::DISK_WRITE => (16, true),
            kind::CKPT_CHUNK => (16, true),
            kind::CKPT_COMMIT => (25, false),
            kind::CKPT_ACK => (16, false),
            kind::CKPT_NACK => (9, false),
            kind::HEARTBEAT => (16, false),
            kind::SYNC_BEGIN => (24, false),
            kind::SYNC_MEMORY => (8, true),
            kind::SYNC_DISK => (8, true),
            kind::SYNC_STATE => (13, true),
            kind::SYNC_END => (17, false),
            kind::FAILOVER => (2, true),
            _ => return None,
        })
    }

    /// The variable tail of this message.
    fn tail(&self) -> &'a [u8] {
        match *self {
            Self::ClientFrame { frame, .. } | Self::SvmOutput { frame, .. } => frame,
            Self::DiskWrite { data, .. } => data,
            Self::CheckpointChunk { bytes, .. } => bytes,
            Self::FullSyncMemory { data, .. } | Self::FullSyncDisk { data, .. } => data,
            Self::FullSyncState { data, .. } => data,
            Self::Failover { body, .. } => body,
            _ => &[],
        }
    }

    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        Self::fixed_len(self.kind()).map_or(0, |(f, _)| f) + self.tail().len()
    }

    /// Bytes on the wire (header, payload, CRC).
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len() + TRAILER_LEN
    }

    /// Writes the message into `buf[..self.buffer_len()]`. Returns the bytes written, or
    /// `None` (nothing written) if `buf` is too small or the message is larger than
    /// [`MAX_MESSAGE`].
    pub fn emit(&self, buf: &mut [u8]) -> Option<usize> {
        let plen = self.payload_len();
        let total = HEADER_LEN + plen + TRAILER_LEN;
        if plen > MAX_PAYLOAD || buf.len() < total {
            return None;
        }
        let b = &mut buf[..total];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.kind();
        b[4..8].copy_from_slice(&(plen as u32).to_le_bytes());
        let p = &mut b[HEADER_LEN..HEADER_LEN + plen];
        let mut w = Writer { buf: p, at: 0 };
        match *self {
            Self::Hello { role, host_id, generation, guest_id, epoch } => {
                w.u8(match role {
                    LinkRole::Primary => 1,
                    LinkRole::Secondary => 2,
                });
                w.u64(host_id);
                w.u64(generation);
                w.u64(guest_id);
                w.u64(epoch);
            }
            Self::ClientFrame { seq, epoch, frame } | Self::SvmOutput { seq, epoch, frame } => {
                w.u64(seq);
                w.u64(epoch);
                w.bytes(frame);
            }
            Self::DiskWrite { epoch, sector, data } => {
                w.u64(epoch);
                w.u64(sector);
                w.bytes(data);
            }
            Self::CheckpointChunk { epoch, offset, bytes } => {
                w.u64(epoch);
                w.u64(offset);
                w.bytes(bytes);
            }
            Self::CheckpointCommit { epoch, stream_len, digest, verify } => {
                w.u64(epoch);
                w.u64(stream_len);
                w.u64(digest);
                w.u8(u8::from(verify));
            }
            Self::CheckpointAck { epoch, digest } => {
                w.u64(epoch);
                w.u64(digest);
            }
            Self::CheckpointNack { epoch, reason } => {
                w.u64(epoch);
                w.u8(reason.code());
            }
            Self::Heartbeat { generation, now } => {
                w.u64(generation);
                w.u64(now);
            }
            Self::FullSyncBegin { epoch, ram_bytes, disk_sectors } => {
                w.u64(epoch);
                w.u64(ram_bytes);
                w.u64(disk_sectors);
            }
            Self::FullSyncMemory { offset, data } => {
                w.u64(offset);
                w.bytes(data);
            }
            Self::FullSyncDisk { sector, data } => {
                w.u64(sector);
                w.bytes(data);
            }
            Self::FullSyncState { kind, id, tag, data } => {
                w.u8(match kind {
                    StateKind::Vcpu => 1,
                    StateKind::Device => 2,
                });
                w.u64(id);
                w.u32(tag);
                w.bytes(data);
            }
            Self::FullSyncEnd { epoch, digest, verify } => {
                w.u64(epoch);
                w.u64(digest);
                w.u8(u8::from(verify));
            }
            Self::Failover { code, body } => {
                w.u16(code);
                w.bytes(body);
            }
        }
        debug_assert_eq!(w.at, plen);
        let crc = Crc32c::checksum(&b[..HEADER_LEN + plen]);
        b[HEADER_LEN + plen..].copy_from_slice(&crc.to_le_bytes());
        Some(total)
    }

    /// Appends the message to `out` (convenience form of [`Repr::emit`]).
    pub fn emit_to_vec(&self, out: &mut Vec<u8>) -> Option<usize> {
        let start = out.len();
        out.resize(start + self.buffer_len(), 0);
        let r = self.emit(&mut out[start..]);
        if r.is_none() {
            out.truncate(start);
        }
        r
    }

    /// Parses one whole message (`msg` = header, payload and CRC, exactly). Checks magic,
    /// version, length, CRC, then every field.
    pub fn parse(msg: &'a [u8]) -> Result<Repr<'a>, LinkError> {
        let (kind, plen) = check_header(msg)?;
        if msg.len() < HEADER_LEN + plen + TRAILER_LEN {
            return Err(LinkError::Truncated { received: msg.len() });
        }
        let msg = &msg[..HEADER_LEN + plen + TRAILER_LEN];
        let found = rd_u32(msg, HEADER_LEN + plen);
        let computed = Crc32c::checksum(&msg[..HEADER_LEN + plen]);
        if found != computed {
            return Err(LinkError::BadChecksum { found, computed });
        }
        let p = &msg[HEADER_LEN..HEADER_LEN + plen];
        let (fixed, var) = Self::fixed_len(kind).ok_or(LinkError::UnknownKind { found: kind })?;
        if plen < fixed || (!var && plen != fixed) {
            return Err(LinkError::BadLength { kind, len: plen, expected: fixed });
        }
        let tail = &p[fixed..];
        Ok(match kind {
            kind::HELLO => Self::Hello {
                role: match p[0] {
                    1 => LinkRole::Primary,
                    2 => LinkRole::Secondary,
                    v => return Err(LinkError::BadField { field: "role", value: u64::from(v) }),
                },
                host_id: rd_u64(p, 1),
                generation: rd_u64(p, 9),
                guest_id: rd_u64(p, 17),
                epoch: rd_u64(p, 25),
            },
            kind::CLIENT_FRAME => {
                frame_len("frame length", tail)?;
                Self::ClientFrame { seq: rd_u64(p, 0), epoch: rd_u64(p, 8), frame: tail }
            }
            kind::SVM_OUTPUT => {
                frame_len("frame length", tail)?;
                Self::SvmOutput { seq: rd_u64(p, 0), epoch: rd_u64(p, 8), frame: tail }
            }
            kind::DISK_WRITE => {
                sectors("disk write length", tail)?;
                Self::DiskWrite { epoch: rd_u64(p, 0), sector: rd_u64(p, 8), data: tail }
            }
            kind::CKPT_CHUNK => {
                if tail.is_empty() {
                    return Err(LinkError::BadField { field: "chunk length", value: 0 });
                }
                Self::CheckpointChunk { epoch: rd_u64(p, 0), offset: rd_u64(p, 8), bytes: tail }
            }
            kind::CKPT_COMMIT => Self::CheckpointCommit {
                epoch: rd_u64(p, 0),
                stream_len: rd_u64(p, 8),
                digest: rd_u64(p, 16),
                verify: flag("verify", p[24])?,
            },
            kind::CKPT_ACK => Self::CheckpointAck { epoch: rd_u64(p, 0), digest: rd_u64(p, 8) },
            kind::CKPT_NACK => Self::CheckpointNack {
                epoch: rd_u64(p, 0),
                reason: NackReason::from_code(p[8])
                    .ok_or(LinkError::BadField { field: "nack reason", value: u64::from(p[8]) })?,
            },
            kind::HEARTBEAT => Self::Heartbeat { generation: rd_u64(p, 0), now: rd_u64(p, 8) },
            kind::SYNC_BEGIN => {
                Self::FullSyncBegin { epoch: rd_u64(p, 0), ram_bytes: rd_u64(p, 8), disk_sectors: rd_u64(p, 16) }
            }
            kind::SYNC_MEMORY => {
                if tail.is_empty() {
                    return Err(LinkError::BadField { field: "memory chunk length", value: 0 });
                }
                Self::FullSyncMemory { offset: rd_u64(p, 0), data: tail }
            }
            kind::SYNC_DISK => {
                sectors("disk chunk length", tail)?;
                Self::FullSyncDisk { sector: rd_u64(p, 0), data: tail }
            }
            kind::SYNC_STATE => Self::FullSyncState {
                kind: match p[0] {
                    1 => StateKind::Vcpu,
                    2 => StateKind::Device,
                    v => return Err(LinkError::BadField { field: "state kind", value: u64::from(v) }),
                },
                id: rd_u64(p, 1),
                tag: rd_u32(p, 9),
                data: tail,
            },
            kind::SYNC_END => {
                Self::FullSyncEnd { epoch: rd_u64(p, 0), digest: rd_u64(p, 8), verify: flag("verify", p[16])? }
            }
            kind::FAILOVER => Self::Failover { code: rd_u16(p, 0), body: tail },
            found => return Err(LinkError::UnknownKind { found }),
        })
    }
}

/// Checks the header bytes present so far (magic, version, kind, length cap). Returns the kind
/// and payload length once all [`HEADER_LEN`] bytes are there.
fn check_header(h: &[u8]) -> Result<(u8, usize), LinkError> {
    let n = h.len().min(HEADER_LEN);
    if n >= 1 && h[0] != MAGIC[0] || n >= 2 && h[1] != MAGIC[1] {
        let mut found = [0u8; 2];
        found[..n.min(2)].copy_from_slice(&h[..n.min(2)]);
        return Err(LinkError::BadMagic { found });
    }
    if n >= 3 && h[2] != VERSION {
        return Err(LinkError::UnsupportedVersion { found: h[2] });
    }
    if n >= 4 && Repr::fixed_len(h[3]).is_none() {
        return Err(LinkError::UnknownKind { found: h[3] });
    }
    if n < HEADER_LEN {
        return Err(LinkError::Truncated { received: h.len() });
    }
    let len = rd_u32(h, 4);
    if len as usize > MAX_PAYLOAD {
        return Err(LinkError::TooLong { len });
    }
    Ok((h[3], len as usize))
}

struct Writer<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// Incremental decoder: feed it the link's bytes in any chunking; it hands out one message at a
/// time and never holds more than one [`MAX_MESSAGE`]. After an error it stays failed.
#[derive(Debug, Default)]
pub struct LinkDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` that form the message handed out last (dropped on the next call).
    ready: usize,
    failed: Option<LinkError>,
}

impl LinkDecoder {
    /// A fresh decoder (allocates nothing until fed).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of a partial message held.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.ready
    }

    /// Takes bytes from the front of `input` until one whole message is in, and returns it.
    /// `Ok(None)`: `input` is used up and no message is complete yet. Call again with the rest
    /// of `input` (it is advanced past what was used) until it returns `Ok(None)`. Bad magic,
    /// version, kind or length fail as soon as the header bytes that show it arrive.
    pub fn decode<'s>(&'s mut self, input: &mut &[u8]) -> Result<Option<Repr<'s>>, LinkError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.ready > 0 {
            // The buffer only ever holds one message: the one handed out last.
            self.buf.clear();
            self.ready = 0;
        }
        loop {
            let need = match check_header(&self.buf) {
                Ok((_, plen)) => HEADER_LEN + plen + TRAILER_LEN,
                Err(LinkError::Truncated { .. }) => HEADER_LEN,
                Err(e) => return Err(self.fail(e)),
            };
            if self.buf.len() >= HEADER_LEN && self.buf.len() == need {
                break;
            }
            if input.is_empty() {
                return Ok(None);
            }
            let take = (need - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            *input = &input[take..];
        }
        if let Err(e) = Repr::parse(&self.buf) {
            return Err(self.fail(e));
        }
        self.ready = self.buf.len();
        Repr::parse(&self.buf).map(Some)
    }

    fn fail(&mut self, e: LinkError) -> LinkError {
        self.failed = Some(e);
        self.buf = Vec::new();
        self.ready = 0;
        e
    }

    /// The connection ended: an error if a message was cut in the middle.
    pub fn end_of_stream(&self) -> Result<(), LinkError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.buffered() {
            0 => Ok(()),
            received => Err(LinkError::Truncated { received }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn samples() -> Vec<Repr<'static>> {
        static FRAME: [u8; 60] = [7; 60];
        static SECT: [u8; 1024] = [3; 1024];
        vec![
            Repr::Hello { role: LinkRole::Primary, host_id: 1, generation: 2, guest_id: 3, epoch: 4 },
            Repr::Hello { role: LinkRole::Secondary, host_id: 9, generation: 8, guest_id: 7, epoch: 0 },
            Repr::ClientFrame { seq: 5, epoch: 6, frame: &FRAME },
            Repr::SvmOutput { seq: 1, epoch: 2, frame: &FRAME[..14] },
            Repr::DiskWrite { epoch: 3, sector: 100, data: &SECT },
            Repr::CheckpointChunk { epoch: 3, offset: 4096, bytes: &SECT[..17] },
            Repr::CheckpointCommit { epoch: 3, stream_len: 9999, digest: 0xdead_beef, verify: true },
            Repr::CheckpointAck { epoch: 3, digest: 42 },
            Repr::CheckpointNack { epoch: 3, reason: NackReason::VerifyFailed },
            Repr::Heartbeat { generation: 2, now: 123 },
            Repr::FullSyncBegin { epoch: 1, ram_bytes: 1 << 30, disk_sectors: 2048 },
            Repr::FullSyncMemory { offset: 8192, data: &SECT[..100] },
            Repr::FullSyncDisk { sector: 0, data: &SECT[..512] },
            Repr::FullSyncState { kind: StateKind::Device, id: 3, tag: 0x11, data: &SECT[..5] },
            Repr::FullSyncState { kind: StateKind::Vcpu, id: 0, tag: 1, data: &[] },
            Repr::FullSyncEnd { epoch: 1, digest: 5, verify: false },
            Repr::Failover { code: 1, body: b"promote" },
        ]
    }

    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        for r in samples() {
            r.emit_to_vec(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn every_kind_round_trips() {
        for r in samples() {
            let mut buf = vec![0u8; r.buffer_len()];
            assert_eq!(r.emit(&mut buf), Some(buf.len()));
            assert_eq!(Repr::parse(&buf), Ok(r));
            assert!(r.emit(&mut buf[..r.buffer_len() - 1]).is_none(), "short buffer refused");
        }
    }

    #[test]
    fn decoder_takes_any_chunking() {
        let bytes = stream();
        for step in [1, 2, 3, 7, 64, 1000, bytes.len()] {
            let mut dec = LinkDecoder::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(step) {
                let mut input = chunk;
                while let Some(r) = dec.decode(&mut input).unwrap() {
                    let mut v = Vec::new();
                    r.emit_to_vec(&mut v).unwrap();
                    got.push(v);
                    assert!(dec.buffered() <= MAX_MESSAGE);
                }
                assert!(input.is_empty());
            }
            assert_eq!(got.len(), samples().len(), "step {step}");
            assert_eq!(got.concat(), bytes);
            assert_eq!(dec.end_of_stream(), Ok(()));
        }
    }

    fn first_error(bytes: &[u8]) -> LinkError {
        let mut dec = LinkDecoder::new();
        let mut input = bytes;
        loop {
            match dec.decode(&mut input) {
                Ok(Some(_)) => continue,
                Ok(None) => return dec.end_of_stream().unwrap_err(),
                Err(e) => {
                    // Failed for good.
                    assert_eq!(dec.decode(&mut &b"CL"[..]), Err(e));
                    return e;
                }
            }
        }
    }

    #[test]
    fn corruption_is_named() {
        let mut m = Vec::new();
        Repr::CheckpointAck { epoch: 3, digest: 42 }.emit_to_vec(&mut m).unwrap();
        let mut bad = m.clone();
        bad[0] = b'X';
        assert_eq!(first_error(&bad).name(), "bad_magic");
        let mut bad = m.clone();
        bad[2] = 9;
        assert_eq!(first_error(&bad), LinkError::UnsupportedVersion { found: 9 });
        let mut bad = m.clone();
        bad[3] = 200;
        assert_eq!(first_error(&bad), LinkError::UnknownKind { found: 200 });
        let mut bad = m.clone();
        bad[10] ^= 1;
        assert_eq!(first_error(&bad).name(), "bad_checksum");
        let mut bad = m.clone();
        let n = bad.len();
        bad[n - 1] ^= 0x80;
        assert_eq!(first_error(&bad).name(), "bad_checksum");
        assert_eq!(first_error(&m[..m.len() - 3]), LinkError::Truncated { received: m.len() - 3 });
        assert_eq!(first_error(&m[..3]), LinkError::Truncated { received: 3 });
    }

    /// A message whose CRC is right but whose fields are wrong.
    fn forged(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![b'C', b'L', VERSION, kind];
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        let crc = Crc32c::checksum(&m);
        m.extend_from_slice(&crc.to_le_bytes());
        m
    }

    #[test]
    fn fields_are_checked_after_the_checksum() {
        assert_eq!(
            first_error(&forged(kind::CKPT_ACK, &[0; 15])),
            LinkError::BadLength { kind: kind::CKPT_ACK, len: 15, expected: 16 }
        );
        assert_eq!(first_error(&forged(kind::CKPT_ACK, &[0; 17])).name(), "bad_length");
        let mut hello = [0u8; 33];
        hello[0] = 3;
        assert_eq!(first_error(&forged(kind::HELLO, &hello)), LinkError::BadField { field: "role", value: 3 });
        let mut nack = [0u8; 9];
        nack[8] = 99;
        assert_eq!(first_error(&forged(kind::CKPT_NACK, &nack)).name(), "bad_field");
        // Disk writes must be whole sectors; frames must fit an Ethernet frame.
        assert_eq!(first_error(&forged(kind::DISK_WRITE, &[0; 16 + 100])).name(), "bad_field");
        assert_eq!(first_error(&forged(kind::CLIENT_FRAME, &[0; 16])).name(), "bad_field");
        assert_eq!(first_error(&forged(kind::CLIENT_FRAME, &vec![0; 16 + MAX_FRAME + 1])).name(), "bad_field");
        let mut commit = [0u8; 25];
        commit[24] = 2;
        assert_eq!(first_error(&forged(kind::CKPT_COMMIT, &commit)).name(), "bad_field");
    }

    #[test]
    fn oversized_length_fails_before_any_payload_is_buffered() {
        let mut h = vec![b'C', b'L', VERSION, kind::CKPT_CHUNK];
        h.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let mut dec = LinkDecoder::new();
        let mut input = &h[..];
        assert_eq!(dec.decode(&mut input), Err(LinkError::TooLong { len: MAX_PAYLOAD as u32 + 1 }));
        assert_eq!(dec.buffered(), 0);
        // A maximal message is accepted.
        let big = vec![1u8; MAX_CHUNK];
        let r = Repr::CheckpointChunk { epoch: 1, offset: 0, bytes: &big };
        let mut m = Vec::new();
        assert_eq!(r.emit_to_vec(&mut m), Some(MAX_MESSAGE));
        let mut dec = LinkDecoder::new();
        let mut input = &m[..];
        assert_eq!(dec.decode(&mut input).unwrap(), Some(r));
        // One byte more than the maximum is refused by the emitter.
        let big = vec![1u8; MAX_CHUNK + 1];
        assert!(Repr::CheckpointChunk { epoch: 1, offset: 0, bytes: &big }.emit_to_vec(&mut m).is_none());
    }

    #[test]
    fn bad_header_bytes_fail_as_soon_as_they_arrive() {
        let mut dec = LinkDecoder::new();
        let mut input = &b"CX"[..];
        assert_eq!(dec.decode(&mut input), Err(LinkError::BadMagic { found: *b"CX" }));
        let mut dec = LinkDecoder::new();
        let mut input = &b"CL\x01\x63"[..];
        assert_eq!(dec.decode(&mut input), Err(LinkError::UnknownKind { found: 0x63 }));
    }

    #[test]
    fn random_garbage_never_panics_and_stays_bounded() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200 {
            let mut bytes = stream();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % bytes.len();
                bytes[at] ^= (x >> 32) as u8 | 1;
            }
            let mut dec = LinkDecoder::new();
            for chunk in bytes.chunks(1 + (x as usize % 97)) {
                let mut input = chunk;
                while let Ok(Some(_)) = dec.decode(&mut input) {}
                assert!(dec.buffered() <= MAX_MESSAGE);
            }
        }
    }
}
