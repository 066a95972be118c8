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
            _ => None,
        })
    }
}

/// Longest console write in one hypercall.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

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
        ] {
            assert_eq!(HypercallError::from_rax(e.to_rax()), Err(Some(e)));
        }
        assert_eq!(HypercallError::from_rax(42), Ok(42));
        assert_eq!(HypercallError::from_rax(u64::MAX - 100), Err(None));
    }

    #[test]
    fn numbers_round_trip() {
        for h in
            [Hypercall::ConsoleWrite, Hypercall::ClockNow, Hypercall::BlockUntil, Hypercall::Shutdown, Hypercall::Panic]
        {
            assert_eq!(Hypercall::from_number(h as u64), Some(h));
        }
        assert_eq!(Hypercall::from_number(0), None);
        assert_eq!(Hypercall::from_number(u64::MAX), None);
    }
}
