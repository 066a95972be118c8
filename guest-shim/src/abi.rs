//! The hypercall ABI and the guest boot protocol: the one definition both the hypervisor and
//! guests compile against.
//!
//! # Boot protocol
//! A guest is an ELF64 executable whose `PT_LOAD` segments lie inside guest-physical RAM
//! `[0, ram_size)` at or above [`GUEST_LOAD_MIN`]. The hypervisor starts it at its ELF entry in
//! 64-bit mode with paging on: guest RAM is identity-mapped (virtual = guest-physical) with 2 MiB
//! pages by tables at [`GUEST_PAGE_TABLES`], a flat GDT at [`GUEST_GDT`] (CS = 0x08, data = 0x10),
//! CR0.PE|PG|NE|MP|ET, CR4.PAE|OSFXSR|OSXMMEXCPT, EFER.LME|LMA|NXE, interrupts off, RSP = the top of
//! RAM, and RDI = the guest-physical address of a [`GuestBootInfo`] at [`GUEST_BOOT_INFO`].
//! The first page of RAM is left unused so a null pointer is never a valid object.
//!
//! # Hypercalls
//! RAX = hypercall number ([`Hypercall`]), arguments in RDI, RSI, RDX; the result comes back in RAX:
//! a value `>= 0`, or `-(error code)` ([`HypercallError`]). The instruction is VMCALL on Intel
//! VT-x and VMMCALL on AMD-V; [`GuestBootInfo::hypercall_insn`] says which one to use.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Guest-physical address of the flat GDT the hypervisor builds.
pub const GUEST_GDT: u64 = 0x1000;
/// Guest-physical address of the boot page tables (PML4, then PDPT, then page directories).
pub const GUEST_PAGE_TABLES: u64 = 0x2000;
/// Guest-physical address of the [`GuestBootInfo`].
pub const GUEST_BOOT_INFO: u64 = 0x8000;
/// Guest-physical address of the guest command line (NUL-free, length in the boot info).
pub const GUEST_CMDLINE: u64 = 0x9000;
/// Longest guest command line.
pub const GUEST_CMDLINE_MAX: usize = 4096;
/// Lowest address an ELF segment may be loaded at.
pub const GUEST_LOAD_MIN: u64 = 0x10_0000;
/// The guest code segment selector.
pub const GUEST_CODE_SELECTOR: u16 = 0x08;
/// The guest data segment selector.
pub const GUEST_DATA_SELECTOR: u16 = 0x10;

/// "COLOBOOT" in little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"COLOBOOT");
/// The boot protocol version.
pub const BOOT_INFO_VERSION: u32 = 1;

/// Which instruction makes a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum HypercallInsn {
    /// `vmcall` (Intel VT-x).
    Vmcall = 0,
    /// `vmmcall` (AMD-V).
    Vmmcall = 1,
}

/// What the hypervisor tells a guest at entry (RDI points here).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestBootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// A [`HypercallInsn`] value.
    pub hypercall_insn: u32,
    /// Bytes of guest RAM, from guest-physical 0.
    pub ram_size: u64,
    /// Clock ticks per second of [`Hypercall::ClockNow`].
    pub ticks_per_second: u64,
    /// Guest-physical address of the command line.
    pub cmdline_addr: u64,
    /// Its length in bytes.
    pub cmdline_len: u64,
}

const _: () = assert!(core::mem::size_of::<GuestBootInfo>() == 48);

/// Hypercall numbers (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Hypercall {
    /// Write bytes to the guest's console: RDI = address, RSI = length. Returns the length.
    ConsoleWrite = 1,
    /// The coarse clock: returns ticks since the guest started.
    ClockNow = 2,
    /// Block until the clock reaches RDI ticks or an event arrives. Returns the clock.
    BlockUntil = 3,
    /// End the guest with status RDI (0 = success). Does not return.
    Shutdown = 4,
    /// Report a guest panic: RDI = address, RSI = length of the message. Ends the guest.
    Panic = 5,
    /// Attach the paravirtual NIC: RDI = guest-physical address of the RX ring, RSI = of the TX
    /// ring (each a [`PvRingHeader`] followed by its descriptors). Returns the guest's MAC
    /// address (the hypervisor assigns it) in the low 48 bits, first octet lowest.
    NetAttach = 6,
    /// The NIC doorbell: the hypervisor sends what the TX ring holds and fills posted RX buffers.
    /// Returns the number of frames sent.
    NetNotify = 7,
    /// The paravirtual block device's size in bytes (a multiple of [`BLOCK_SECTOR_SIZE`]).
    BlockInfo = 8,
    /// One block request: RDI = guest-physical address of a [`PvBlockRequest`]. Returns the
    /// bytes transferred; the request's `status` is written as well.
    BlockRequest = 9,
    /// Test aid: records mark RDI for the hypervisor's self-test scenarios (dirty-page counts,
    /// snapshot points). Writes nothing to guest memory. Returns 0.
    TestMark = 0x100,
}

impl Hypercall {
    /// The hypercall with number `n`.
    pub const fn from_number(n: u64) -> Option<Self> {
        Some(match n {
            1 => Self::ConsoleWrite,
            2 => Self::ClockNow,
            3 => Self::BlockUntil,
            4 => Self::Shutdown,
            5 => Self::Panic,
            6 => Self::NetAttach,
            7 => Self::NetNotify,
            8 => Self::BlockInfo,
            9 => Self::BlockRequest,
            0x100 => Self::TestMark,
            _ => return None,
        })
    }
}

/// Why a hypercall failed; RAX holds `-(code)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum HypercallError {
    /// No hypercall has this number.
    UnknownHypercall = 1,
    /// A pointer argument does not lie inside the guest's RAM.
    BadAddress = 2,
    /// A length argument is larger than the hypercall accepts.
    TooLong = 3,
    /// An argument has a value the hypercall does not accept.
    InvalidArgument = 4,
    /// The guest has no such device (no `mac=`/`disk=` on its module line, or not attached).
    NoDevice = 5,
    /// The device refused the request (see its counters).
    DeviceError = 6,
}

impl HypercallError {
    /// Encodes as the RAX return value.
    pub const fn to_rax(self) -> u64 {
        (self as u64).wrapping_neg()
    }

    /// Decodes a RAX return value: `Ok(value)` or the error.
    pub const fn from_rax(rax: u64) -> Result<u64, Option<Self>> {
        if (rax as i64) >= 0 {
            return Ok(rax);
        }
        Err(match rax.wrapping_neg() {
            1 => Some(Self::UnknownHypercall),
            2 => Some(Self::BadAddress),
            3 => Some(Self::TooLong),
            4 => Some(Self::InvalidArgument),
            5 => Some(Self::NoDevice),
            6 => Some(Self::DeviceError),
            _ => None,
        })
    }
}

/// Longest console write in one hypercall.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Paravirtual NIC
//
// Two rings in guest memory, each a `PvRingHeader` followed by `entries` `PvDesc`s (the whole
// ring inside guest RAM, `entries` a power of two up to `PV_RING_MAX_ENTRIES`). Indices are
// free-running u32 counters; slot = index % entries.
//
// TX: the guest writes `desc[producer % entries] = { addr, len }` (one whole Ethernet frame,
// without FCS, `PV_FRAME_MIN..=PV_FRAME_MAX` bytes) and increments `producer`, then rings
// `NetNotify`. The hypervisor sends each frame and advances `consumer`; the buffer may be reused
// once `consumer` has passed it. A rejected descriptor is consumed too, with `flags = PV_DESC_ERROR`.
//
// RX: the guest posts empty buffers: `desc[producer % entries] = { addr, len = capacity }`,
// then increments `producer`. The hypervisor fills the buffer at `consumer`, sets `len` to the
// frame length and `flags = PV_DESC_DONE` (or `PV_DESC_ERROR` when the buffer was refused), and
// advances `consumer`; a frame that arrives while the guest is blocked in `BlockUntil` wakes it.
//
// The hypervisor validates everything on every use: a header whose `producer - consumer`
// exceeds `entries`, a descriptor outside guest RAM and a frame or buffer of a bad size are
// refused and counted, never trusted.
// ---------------------------------------------------------------------------------------------

/// "PVRING01" in little-endian: [`PvRingHeader::magic`].
pub const PV_RING_MAGIC: u64 = u64::from_le_bytes(*b"PVRING01");
/// Most descriptors in one ring.
pub const PV_RING_MAX_ENTRIES: u32 = 1024;
/// Longest frame (Ethernet header + 1500-byte payload, no FCS).
pub const PV_FRAME_MAX: u32 = 1514;
/// Shortest frame (an Ethernet header).
pub const PV_FRAME_MIN: u32 = 14;
/// Descriptor flag: the hypervisor completed it.
pub const PV_DESC_DONE: u16 = 1;
/// Descriptor flag: the hypervisor refused it (bad address or size).
pub const PV_DESC_ERROR: u16 = 2;

/// The header at the start of each ring.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PvRingHeader {
    /// [`PV_RING_MAGIC`].
    pub magic: u64,
    /// Descriptors after the header (a power of two, at most [`PV_RING_MAX_ENTRIES`]).
    pub entries: u32,
    /// Written by the guest: descriptors made available.
    pub producer: u32,
    /// Written by the hypervisor: descriptors completed.
    pub consumer: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<PvRingHeader>() == 24);

/// One descriptor: a guest-physical buffer.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PvDesc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// TX: the frame length; RX: the buffer capacity when posted, the frame length when done.
    pub len: u32,
    /// [`PV_DESC_DONE`] / [`PV_DESC_ERROR`] (written by the hypervisor).
    pub flags: u16,
    /// Reserved, zero.
    pub reserved: u16,
}

const _: () = assert!(core::mem::size_of::<PvDesc>() == 16);

/// Bytes a ring with `entries` descriptors occupies.
pub const fn pv_ring_bytes(entries: u32) -> u64 {
    core::mem::size_of::<PvRingHeader>() as u64 + entries as u64 * core::mem::size_of::<PvDesc>() as u64
}

// ---------------------------------------------------------------------------------------------
// Paravirtual block device: synchronous requests. The guest fills a `PvBlockRequest` and makes
// the `BlockRequest` hypercall; the hypervisor validates the operation, the sector range against
// the disk and the buffer against guest RAM, moves the bytes, and writes `status`.
// ---------------------------------------------------------------------------------------------

/// Bytes per sector.
pub const BLOCK_SECTOR_SIZE: u64 = 512;
/// Most bytes in one request.
pub const BLOCK_REQUEST_MAX: u64 = 1 << 20;
/// [`PvBlockRequest::op`]: read sectors into the buffer.
pub const BLOCK_OP_READ: u32 = 1;
/// [`PvBlockRequest::op`]: write the buffer to sectors.
pub const BLOCK_OP_WRITE: u32 = 2;
/// [`PvBlockRequest::op`]: make earlier writes durable (a no-op for RAM, a barrier for replication).
pub const BLOCK_OP_FLUSH: u32 = 3;
/// [`PvBlockRequest::status`]: done.
pub const BLOCK_STATUS_OK: u32 = 0;
/// [`PvBlockRequest::status`]: refused (bad operation, range or buffer).
pub const BLOCK_STATUS_ERROR: u32 = 1;

/// One block request in guest memory.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PvBlockRequest {
    /// `BLOCK_OP_*`.
    pub op: u32,
    /// Written by the hypervisor: `BLOCK_STATUS_*`.
    pub status: u32,
    /// First sector.
    pub sector: u64,
    /// Bytes (a multiple of [`BLOCK_SECTOR_SIZE`], at most [`BLOCK_REQUEST_MAX`]).
    pub len: u64,
    /// Guest-physical address of the buffer.
    pub addr: u64,
}

const _: () = assert!(core::mem::size_of::<PvBlockRequest>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_rax() {
        for e in [
            HypercallError::UnknownHypercall,
            HypercallError::BadAddress,
            HypercallError::TooLong,
            HypercallError::InvalidArgument,
            HypercallError::NoDevice,
            HypercallError::DeviceError,
        ] {
            assert_eq!(HypercallError::from_rax(e.to_rax()), Err(Some(e)));
        }
        assert_eq!(HypercallError::from_rax(42), Ok(42));
        assert_eq!(HypercallError::from_rax(u64::MAX - 100), Err(None));
    }

    #[test]
    fn numbers_round_trip() {
        for h in [
            Hypercall::ConsoleWrite,
            Hypercall::ClockNow,
            Hypercall::BlockUntil,
            Hypercall::Shutdown,
            Hypercall::Panic,
            Hypercall::NetAttach,
            Hypercall::NetNotify,
            Hypercall::BlockInfo,
            Hypercall::BlockRequest,
        ] {
            assert_eq!(Hypercall::from_number(h as u64), Some(h));
        }
        assert_eq!(Hypercall::from_number(0), None);
        assert_eq!(Hypercall::from_number(u64::MAX), None);
    }
}
