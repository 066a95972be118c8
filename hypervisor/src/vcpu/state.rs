//! `VcpuState`: everything a vCPU is, as a fixed, versioned byte layout, so it can travel in a
//! checkpoint's vCPU section and be loaded into any vCPU (the seeds' "reset a vCPU" hypercall).
//!
//! Segment access rights use the VT-x layout (SDM Vol. 3C §25.4.1, Table 25-2: type, S, DPL, P,
//! AVL, L, D/B, G, unusable in bit 16); other backends convert. The x87/SSE state is an FXSAVE
//! image (guests see no XSAVE/AVX, so it is complete). Parsing is "parse, don't validate": a blob
//! is only accepted whole, with the right magic, version and length.
#![deny(unsafe_code)]

use core::fmt;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use super::GuestRegisters;

/// "VCPU".
pub const VCPU_STATE_MAGIC: u32 = u32::from_le_bytes(*b"VCPU");
/// Layout version.
pub const VCPU_STATE_VERSION: u32 = 1;
/// The checkpoint record tag for this layout.
pub const VCPU_STATE_TAG: u32 = 0x5643_0001;

/// One segment register with its hidden part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SegmentState {
    /// Selector.
    pub selector: u16,
    /// Padding (zero).
    pub reserved: u16,
    /// Access rights, VT-x layout.
    pub access_rights: u32,
    /// Limit.
    pub limit: u32,
    /// Padding (zero).
    pub reserved2: u32,
    /// Base.
    pub base: u64,
}

const _: () = assert!(core::mem::size_of::<SegmentState>() == 24);

/// Segment registers, in this order.
#[allow(missing_docs)]
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const LDTR: usize = 6;
    pub const TR: usize = 7;
}

/// The complete architectural state of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VcpuState {
    /// [`VCPU_STATE_MAGIC`].
    pub magic: u32,
    /// [`VCPU_STATE_VERSION`].
    pub version: u32,
    /// RAX..R15 without RSP, in [`GuestRegisters`] order.
    pub gprs: [u64; 15],
    /// RSP.
    pub rsp: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0 as the guest sees it.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest sees it.
    pub cr4: u64,
    /// CR8 (TPR).
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_DEBUGCTL.
    pub debugctl: u64,
    /// DR0..DR3, DR6, DR7.
    pub dr: [u64; 6],
    /// IA32_SYSENTER_CS, _ESP, _EIP.
    pub sysenter: [u64; 3],
    /// The MSRs the exit handler keeps (STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE, TSC_AUX).
    pub handler_msrs: [u64; 6],
    /// ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub segments: [SegmentState; 8],
    /// GDTR base.
    pub gdtr_base: u64,
    /// IDTR base.
    pub idtr_base: u64,
    /// GDTR limit.
    pub gdtr_limit: u32,
    /// IDTR limit.
    pub idtr_limit: u32,
    /// Interruptibility (VT-x layout: STI, MOV SS, SMI, NMI blocking).
    pub interruptibility: u32,
    /// Activity state (0 = active).
    pub activity_state: u32,
    /// An event to deliver at the next entry (VT-x interruption-information layout; 0 = none).
    pub pending_event: u32,
    /// Its error code.
    pub pending_error_code: u32,
    /// The instruction length for a pending software event.
    pub pending_instruction_length: u32,
    /// Padding (zero).
    pub reserved: u32,
    /// FXSAVE image of x87/SSE state.
    pub fx: [u8; 512],
}

/// Size of the serialized state.
pub const VCPU_STATE_LEN: usize = core::mem::size_of::<VcpuState>();
const _: () = assert!(VCPU_STATE_LEN == 1088);

/// Why a vCPU state blob or operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Wrong length.
    Length {
        /// Bytes given.
        found: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Wrong magic number.
    Magic {
        /// Found.
        found: u32,
    },
    /// Unsupported layout version.
    Version {
        /// Found.
        found: u32,
    },
    /// Wrong record tag.
    Tag {
        /// Found.
        found: u32,
    },
    /// The backend cannot do this.
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// The hardware refused the state (a VMCS write failed).
    Hardware {
        /// What failed.
        what: &'static str,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { found, expected } => write!(f, "vCPU state is {found} bytes, expected {expected}"),
            Self::Magic { found } => {
                write!(f, "vCPU state magic {found:#x}, expected {VCPU_STATE_MAGIC:#x} (\"VCPU\")")
            }
            Self::Version { found } => write!(f, "vCPU state version {found}, expected {VCPU_STATE_VERSION}"),
            Self::Tag { found } => write!(f, "vCPU record tag {found:#x}, expected {VCPU_STATE_TAG:#x}"),
            Self::Unsupported { backend, what } => write!(f, "{backend} does not support {what}"),
            Self::Hardware { what } => write!(f, "the CPU refused the vCPU state: {what}"),
        }
    }
}

impl VcpuState {
    /// An all-zero state with the header filled in.
    pub fn empty() -> Self {
        let mut s = Self::new_zeroed();
        s.magic = VCPU_STATE_MAGIC;
        s.version = VCPU_STATE_VERSION;
        s
    }

    /// Parses a checkpoint record: tag, length, magic and version must all match.
    pub fn parse(tag: u32, bytes: &[u8]) -> Result<Self, StateError> {
        if tag != VCPU_STATE_TAG {
            return Err(StateError::Tag { found: tag });
        }
        let state = Self::read_from_bytes(bytes)
            .map_err(|_| StateError::Length { found: bytes.len(), expected: VCPU_STATE_LEN })?;
        if state.magic != VCPU_STATE_MAGIC {
            return Err(StateError::Magic { found: state.magic });
        }
        if state.version != VCPU_STATE_VERSION {
            return Err(StateError::Version { found: state.version });
        }
        Ok(state)
    }

    /// The general registers.
    pub fn registers(&self) -> GuestRegisters {
        let g = &self.gprs;
        GuestRegisters {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rbp: g[6],
            r8: g[7],
            r9: g[8],
            r10: g[9],
            r11: g[10],
            r12: g[11],
            r13: g[12],
            r14: g[13],
            r15: g[14],
        }
    }

    /// Stores the general registers.
    pub fn set_registers(&mut self, r: &GuestRegisters) {
        self.gprs =
            [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_bytes() {
        let mut s = VcpuState::empty();
        s.rip = 0x20_1234;
        s.segments[seg::CS].access_rights = 0xA09B;
        s.fx[24] = 0x80;
        let regs = GuestRegisters { rax: 1, r15: 15, ..Default::default() };
        s.set_registers(&regs);
        let parsed = VcpuState::parse(VCPU_STATE_TAG, s.as_bytes()).unwrap();
        assert_eq!(parsed, s);
        assert_eq!(parsed.registers(), regs);
    }

    #[test]
    fn bad_blobs_are_named() {
        let s = VcpuState::empty();
        let bytes = s.as_bytes();
        assert_eq!(VcpuState::parse(1, bytes), Err(StateError::Tag { found: 1 }));
        assert_eq!(
            VcpuState::parse(VCPU_STATE_TAG, &bytes[..100]),
            Err(StateError::Length { found: 100, expected: VCPU_STATE_LEN })
        );
        let mut bad = bytes.to_vec();
        bad[0] ^= 1;
        assert!(matches!(VcpuState::parse(VCPU_STATE_TAG, &bad), Err(StateError::Magic { .. })));
        let mut bad = bytes.to_vec();
        bad[4] = 9;
        assert_eq!(VcpuState::parse(VCPU_STATE_TAG, &bad), Err(StateError::Version { found: 9 }));
    }
}
