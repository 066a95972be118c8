//! Device state for snapshots and checkpoints, in the manner of Firecracker's persist modules:
//! each device saves its own versioned blob and loads it back, with named errors for an unknown
//! version, a wrong length or a bad value. The snapshot code handles only [`DeviceStates`]
//! (all blobs of one guest) and the [`Persist`] interface; it never reaches into a device.
//!
//! A blob travels in a checkpoint DEVICE record: `id` is the device id, `tag` is
//! `kind << 16 | version` ([`tag`]), the data is the device's encoding below (little-endian).
//!
//! | device | id | kind | version | bytes | fields |
//! |---|---|---|---|---|---|
//! | clock | 1 | `CL` 0x434C | 1 | 8 | ticks u64 |
//! | console | 2 | `CO` 0x434F | 1 | 0..=200 | the unfinished console line |
//! | PV NIC | 3 | `NI` 0x4E49 | 1 | 40 | mac [6], attached u8 (0/1), reserved u8 (0), rx_gpa u64, rx_entries u32, rx_consumer u32, tx_gpa u64, tx_entries u32, tx_consumer u32 (rings all zero when detached) |
//! | PV block | 4 | `BK` 0x424B | 1 | 8 | disk size in bytes u64 |
//!
//! The clock and console are always present; the NIC and the block device exactly when the guest
//! has them. Loading is two-phase so a restore is all-or-nothing: [`Persist::check_state`]
//! refuses a state without changing anything (the NIC's ring geometry is checked against guest
//! RAM by the same function `NetAttach` uses), then [`Persist::load_state`] cannot fail.
#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

/// Most bytes of an unfinished console line.
pub const CONSOLE_MAX: usize = 200;

/// Device ids in a checkpoint (ascending order on the wire).
pub const CLOCK_ID: u64 = 1;
/// The console's id.
pub const CONSOLE_ID: u64 = 2;
/// The paravirtual NIC's id.
pub const PVNET_ID: u64 = 3;
/// The paravirtual block device's id.
pub const PVBLOCK_ID: u64 = 4;

/// A record tag: device kind in the high 16 bits, layout version in the low 16.
pub const fn tag(kind: u16, version: u16) -> u32 {
    (kind as u32) << 16 | version as u32
}

/// Why a device state blob was refused. Every message names the device, what was found and
/// what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStateError {
    /// A blob for a device id this hypervisor does not know.
    UnknownDevice {
        /// The id found.
        id: u64,
    },
    /// The tag's kind is not the device's.
    WrongKind {
        /// The device.
        device: &'static str,
        /// The tag found.
        tag: u32,
        /// The kind expected.
        expected: u16,
    },
    /// A layout version this code does not read.
    UnsupportedVersion {
        /// The device.
        device: &'static str,
        /// The version found.
        found: u16,
        /// The newest version supported.
        supported: u16,
    },
    /// The blob's length does not fit its version.
    BadLength {
        /// The device.
        device: &'static str,
        /// Bytes found.
        found: usize,
        /// Bytes expected (at most, for the console).
        expected: usize,
    },
    /// A field with a value outside its range.
    BadValue {
        /// The device.
        device: &'static str,
        /// The field.
        field: &'static str,
        /// The value found.
        found: u64,
        /// What is accepted.
        expected: &'static str,
    },
    /// Two blobs for one device.
    Duplicate {
        /// The device.
        device: &'static str,
    },
    /// A required device's blob is missing.
    Missing {
        /// The device.
        device: &'static str,
    },
    /// The state has a device the target guest lacks, or lacks one the target has.
    Presence {
        /// The device.
        device: &'static str,
        /// Whether the state carries it.
        in_state: bool,
        /// Whether the target guest has it.
        in_guest: bool,
    },
    /// The NIC's MAC differs from the target's.
    MacMismatch {
        /// MAC in the state.
        found: [u8; 6],
        /// The target's MAC.
        expected: [u8; 6],
    },
    /// The NIC's saved rings do not pass the attach checks against this guest's RAM.
    RingGeometry(crate::devices::pvnet::PvNetError),
    /// The disk size differs from the target's disk.
    DiskSize {
        /// Size in the state.
        found: u64,
        /// The target's disk size.
        expected: u64,
    },
}

impl fmt::Display for DeviceStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UnknownDevice { id } => {
                write!(
                    f,
                    "device state for unknown device id {id}; expected 1 (clock), 2 (console), 3 (pvnet), 4 (pvblock)"
                )
            }
            Self::WrongKind { device, tag, expected } => {
                write!(f, "{device} state tag {tag:#010x}; expected kind {expected:#06x} in the high 16 bits")
            }
            Self::UnsupportedVersion { device, found, supported } => {
                write!(f, "{device} state version {found}; expected 1 to {supported}")
            }
            Self::BadLength { device, found, expected } => {
                write!(f, "{device} state of {found} bytes; expected {expected}")
            }
            Self::BadValue { device, field, found, expected } => {
                write!(f, "{device} state field {field} = {found:#x}; expected {expected}")
            }
            Self::Duplicate { device } => write!(f, "{device} state given twice; expected once"),
            Self::Missing { device } => write!(f, "no {device} state; expected one"),
            Self::Presence { device, in_state, in_guest } => write!(
                f,
                "{device} state {} but the target guest {} one; expected both or neither",
                if in_state { "present" } else { "absent" },
                if in_guest { "has" } else { "has no" }
            ),
            Self::MacMismatch { found, expected } => {
                write!(f, "pvnet state MAC {found:02x?}; expected the target's {expected:02x?}")
            }
            Self::RingGeometry(e) => write!(f, "pvnet state rings: {e}"),
            Self::DiskSize { found, expected } => {
                write!(f, "pvblock state disk of {found} bytes; expected the target's {expected} bytes")
            }
        }
    }
}

/// One device's state format.
pub trait DeviceBlob: Sized {
    /// Device id in the checkpoint.
    const ID: u64;
    /// Name for messages.
    const NAME: &'static str;
    /// Kind (high half of the tag).
    const KIND: u16;
    /// The version [`DeviceBlob::encode`] writes (and the newest [`DeviceBlob::decode`] reads).
    const VERSION: u16;
    /// The blob bytes of the current version.
    fn encode(&self, out: &mut Vec<u8>);
    /// Parses a blob of `version`.
    fn decode(version: u16, bytes: &[u8]) -> Result<Self, DeviceStateError>;

    /// The record tag of the current version.
    fn tag() -> u32 {
        tag(Self::KIND, Self::VERSION)
    }

    /// Parses a blob with its record tag (kind and version checked).
    fn from_record(record_tag: u32, bytes: &[u8]) -> Result<Self, DeviceStateError> {
        if (record_tag >> 16) as u16 != Self::KIND {
            return Err(DeviceStateError::WrongKind { device: Self::NAME, tag: record_tag, expected: Self::KIND });
        }
        let version = record_tag as u16;
        if version == 0 || version > Self::VERSION {
            return Err(DeviceStateError::UnsupportedVersion {
                device: Self::NAME,
                found: version,
                supported: Self::VERSION,
            });
        }
        Self::decode(version, bytes)
    }
}

/// A device whose state can be saved and loaded: the one interface snapshots use.
pub trait Persist {
    /// The saved form.
    type State: DeviceBlob;
    /// Captures the state (the guest is paused).
    fn save_state(&self) -> Self::State;
    /// Checks that `state` can be loaded into this device of a guest with `ram_bytes` of RAM;
    /// changes nothing.
    fn check_state(&self, state: &Self::State, ram_bytes: u64) -> Result<(), DeviceStateError>;
    /// Loads a state [`Persist::check_state`] accepted.
    fn load_state(&mut self, state: &Self::State);
}

fn exact<const N: usize>(device: &'static str, bytes: &[u8]) -> Result<[u8; N], DeviceStateError> {
    bytes.try_into().map_err(|_| DeviceStateError::BadLength { device, found: bytes.len(), expected: N })
}

/// The guest clock: ticks at the capture point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockState {
    /// Guest clock ticks.
    pub ticks: u64,
}

impl DeviceBlob for ClockState {
    const ID: u64 = CLOCK_ID;
    const NAME: &'static str = "clock";
    const KIND: u16 = 0x434C;
    const VERSION: u16 = 1;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ticks.to_le_bytes());
    }
    fn decode(_: u16, bytes: &[u8]) -> Result<Self, DeviceStateError> {
        Ok(Self { ticks: u64::from_le_bytes(exact::<8>(Self::NAME, bytes)?) })
    }
}

/// The console: the line the guest has not finished.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleState {
    /// Its bytes (at most [`CONSOLE_MAX`]).
    pub pending: Vec<u8>,
}

impl DeviceBlob for ConsoleState {
    const ID: u64 = CONSOLE_ID;
    const NAME: &'static str = "console";
    const KIND: u16 = 0x434F;
    const VERSION: u16 = 1;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pending[..self.pending.len().min(CONSOLE_MAX)]);
    }
    fn decode(_: u16, bytes: &[u8]) -> Result<Self, DeviceStateError> {
        if bytes.len() > CONSOLE_MAX {
            return Err(DeviceStateError::BadLength { device: Self::NAME, found: bytes.len(), expected: CONSOLE_MAX });
        }
        Ok(Self { pending: bytes.to_vec() })
    }
}

/// One ring of the paravirtual NIC as the hypervisor keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingState {
    /// Guest-physical address of its header.
    pub gpa: u64,
    /// Descriptors (a power of two).
    pub entries: u32,
    /// The hypervisor's consumer index.
    pub consumer: u32,
}

/// The paravirtual NIC: its MAC and, when attached, both rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvNetState {
    /// Its MAC.
    pub mac: [u8; 6],
    /// The RX and TX rings; `None` before `NetAttach`.
    pub rings: Option<(RingState, RingState)>,
}

const PVNET_BYTES: usize = 40;

impl DeviceBlob for PvNetState {
    const ID: u64 = PVNET_ID;
    const NAME: &'static str = "pvnet";
    const KIND: u16 = 0x4E49;
    const VERSION: u16 = 1;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.mac);
        out.push(u8::from(self.rings.is_some()));
        out.push(0);
        let (rx, tx) = self.rings.unwrap_or_default();
        for ring in [rx, tx] {
            out.extend_from_slice(&ring.gpa.to_le_bytes());
            out.extend_from_slice(&ring.entries.to_le_bytes());
            out.extend_from_slice(&ring.consumer.to_le_bytes());
        }
    }
    fn decode(_: u16, bytes: &[u8]) -> Result<Self, DeviceStateError> {
        let b = exact::<PVNET_BYTES>(Self::NAME, bytes)?;
        let bad =
            |field, found: u64, expected| DeviceStateError::BadValue { device: Self::NAME, field, found, expected };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[..6]);
        if mac[0] & 1 != 0 {
            return Err(bad("mac", u64::from(mac[0]), "a unicast MAC (first octet even)"));
        }
        if b[7] != 0 {
            return Err(bad("reserved", u64::from(b[7]), "0"));
        }
        let ring = |at: usize| RingState {
            gpa: u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default()),
            entries: u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap_or_default()),
            consumer: u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap_or_default()),
        };
        let (rx, tx) = (ring(8), ring(24));
        let rings = match b[6] {
            0 if rx == RingState::default() && tx == RingState::default() => None,
            0 => {
                return Err(bad(
                    "rings",
                    rx.gpa | tx.gpa | u64::from(rx.entries | tx.entries),
                    "all zero when detached",
                ))
            }
            1 => Some((rx, tx)),
            other => return Err(bad("attached", u64::from(other), "0 or 1")),
        };
        Ok(Self { mac, rings })
    }
}

/// The paravirtual block device: the size of the disk it serves (the disk's content travels
/// apart, through the block replica or a full sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvBlockState {
    /// Disk bytes.
    pub size: u64,
}

impl DeviceBlob for PvBlockState {
    const ID: u64 = PVBLOCK_ID;
    const NAME: &'static str = "pvblock";
    const KIND: u16 = 0x424B;
    const VERSION: u16 = 1;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_le_bytes());
    }
    fn decode(_: u16, bytes: &[u8]) -> Result<Self, DeviceStateError> {
        let size = u64::from_le_bytes(exact::<8>(Self::NAME, bytes)?);
        if size % 512 != 0 {
            return Err(DeviceStateError::BadValue {
                device: Self::NAME,
                field: "size",
                found: size,
                expected: "a multiple of 512",
            });
        }
        Ok(Self { size })
    }
}

/// One device blob as it travels: device id, record tag, bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Device id.
    pub id: u64,
    /// Record tag (kind and version).
    pub tag: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Every device state of one guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStates {
    /// The clock.
    pub clock: ClockState,
    /// The console.
    pub console: ConsoleState,
    /// The paravirtual NIC, when the guest has one.
    pub net: Option<PvNetState>,
    /// The block device, when the guest has one.
    pub block: Option<PvBlockState>,
}

fn blob<S: DeviceBlob>(state: &S) -> Blob {
    let mut data = Vec::new();
    state.encode(&mut data);
    Blob { id: S::ID, tag: S::tag(), data }
}

fn once<S: DeviceBlob>(slot: &mut Option<S>, tag: u32, data: &[u8]) -> Result<(), DeviceStateError> {
    if slot.is_some() {
        return Err(DeviceStateError::Duplicate { device: S::NAME });
    }
    *slot = Some(S::from_record(tag, data)?);
    Ok(())
}

impl DeviceStates {
    /// The blobs in ascending device id (the checkpoint's order).
    pub fn blobs(&self) -> Vec<Blob> {
        let mut out = alloc::vec![blob(&self.clock), blob(&self.console)];
        out.extend(self.net.as_ref().map(blob));
        out.extend(self.block.as_ref().map(blob));
        out
    }

    /// Parses the blobs of a checkpoint (`(id, tag, data)`); the clock and console are required.
    pub fn from_blobs<'a>(blobs: impl IntoIterator<Item = (u64, u32, &'a [u8])>) -> Result<Self, DeviceStateError> {
        let (mut clock, mut console, mut net, mut block) = (None, None, None, None);
        for (id, tag, data) in blobs {
            match id {
                CLOCK_ID => once::<ClockState>(&mut clock, tag, data)?,
                CONSOLE_ID => once::<ConsoleState>(&mut console, tag, data)?,
                PVNET_ID => once::<PvNetState>(&mut net, tag, data)?,
                PVBLOCK_ID => once::<PvBlockState>(&mut block, tag, data)?,
                id => return Err(DeviceStateError::UnknownDevice { id }),
            }
        }
        Ok(Self {
            clock: clock.ok_or(DeviceStateError::Missing { device: ClockState::NAME })?,
            console: console.ok_or(DeviceStateError::Missing { device: ConsoleState::NAME })?,
            net,
            block,
        })
    }
}

/// Checks an optional device against an optional state: both or neither, then the device's own
/// check.
pub fn check_optional<D: Persist>(
    device: Option<&D>,
    state: Option<&D::State>,
    ram_bytes: u64,
) -> Result<(), DeviceStateError> {
    match (device, state) {
        (Some(d), Some(s)) => d.check_state(s, ram_bytes),
        (None, None) => Ok(()),
        (d, s) => Err(DeviceStateError::Presence {
            device: <D::State as DeviceBlob>::NAME,
            in_state: s.is_some(),
            in_guest: d.is_some(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    fn sample() -> DeviceStates {
        DeviceStates {
            clock: ClockState { ticks: 12_345 },
            console: ConsoleState { pending: b"half a li".to_vec() },
            net: Some(PvNetState {
                mac: [0x52, 0x54, 0, 0xC0, 1, 3],
                rings: Some((
                    RingState { gpa: 0x10_0000, entries: 256, consumer: 77 },
                    RingState { gpa: 0x11_0000, entries: 128, consumer: u32::MAX },
                )),
            }),
            block: Some(PvBlockState { size: 1 << 20 }),
        }
    }

    fn parse(blobs: &[Blob]) -> Result<DeviceStates, DeviceStateError> {
        DeviceStates::from_blobs(blobs.iter().map(|b| (b.id, b.tag, b.data.as_slice())))
    }

    #[test]
    fn states_round_trip_in_id_order() {
        let s = sample();
        let blobs = s.blobs();
        assert_eq!(blobs.iter().map(|b| b.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(
            blobs.iter().map(|b| b.tag).collect::<Vec<_>>(),
            [0x434C_0001, 0x434F_0001, 0x4E49_0001, 0x424B_0001]
        );
        assert_eq!(blobs[2].data.len(), 40);
        assert_eq!(parse(&blobs).unwrap(), s);
        let detached =
            DeviceStates { net: Some(PvNetState { mac: [2, 0, 0, 0, 0, 1], rings: None }), block: None, ..s };
        assert_eq!(parse(&detached.blobs()).unwrap(), detached);
    }

    #[test]
    fn bad_blobs_are_named() {
        let good = sample().blobs();
        let with = |i: usize, f: &dyn Fn(&mut Blob)| {
            let mut b = good.clone();
            f(&mut b[i]);
            parse(&b).unwrap_err()
        };
        assert_eq!(
            with(0, &|b| b.tag = tag(0x434C, 2)),
            DeviceStateError::UnsupportedVersion { device: "clock", found: 2, supported: 1 }
        );
        assert_eq!(with(0, &|b| b.tag = tag(0x434C, 0)).to_string(), "clock state version 0; expected 1 to 1");
        assert!(matches!(with(2, &|b| b.tag = tag(0x434C, 1)), DeviceStateError::WrongKind { device: "pvnet", .. }));
        assert_eq!(
            with(0, &|b| b.data.push(0)),
            DeviceStateError::BadLength { device: "clock", found: 9, expected: 8 }
        );
        assert_eq!(
            with(1, &|b| b.data = std::vec![b'x'; 201]),
            DeviceStateError::BadLength { device: "console", found: 201, expected: 200 }
        );
        assert_eq!(
            with(2, &|b| b.data.truncate(39)),
            DeviceStateError::BadLength { device: "pvnet", found: 39, expected: 40 }
        );
        let e = with(2, &|b| b.data[6] = 2);
        assert_eq!(e.to_string(), "pvnet state field attached = 0x2; expected 0 or 1");
        assert!(matches!(with(2, &|b| b.data[6] = 0), DeviceStateError::BadValue { field: "rings", .. }));
        assert!(matches!(with(2, &|b| b.data[7] = 1), DeviceStateError::BadValue { field: "reserved", .. }));
        assert!(matches!(with(2, &|b| b.data[0] = 1), DeviceStateError::BadValue { field: "mac", .. }));
        assert!(matches!(with(3, &|b| b.data[0] = 1), DeviceStateError::BadValue { field: "size", .. }));
        assert_eq!(with(3, &|b| b.id = 9), DeviceStateError::UnknownDevice { id: 9 });
        assert_eq!(with(3, &|b| *b = good[2].clone()), DeviceStateError::Duplicate { device: "pvnet" });
        assert_eq!(parse(&good[1..]).unwrap_err(), DeviceStateError::Missing { device: "clock" });
    }
}
