//! VMCS field encodings (Intel SDM Vol. 3D, Appendix B), typed: every `vmread`/`vmwrite` names a
//! [`VmcsField`], never a bare number.
#![deny(unsafe_code)]

/// A VMCS field. The encoding's bits 14:13 give its width (§B: 0 = 16-bit, 1 = 64-bit,
/// 2 = 32-bit, 3 = natural width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum VmcsField {
    // 16-bit control (B.1.1), guest state (B.1.2), host state (B.1.3).
    Vpid = 0x0000,
    GuestEsSelector = 0x0800,
    GuestCsSelector = 0x0802,
    GuestSsSelector = 0x0804,
    GuestDsSelector = 0x0806,
    GuestFsSelector = 0x0808,
    GuestGsSelector = 0x080A,
    GuestLdtrSelector = 0x080C,
    GuestTrSelector = 0x080E,
    GuestPmlIndex = 0x0812,
    HostEsSelector = 0x0C00,
    HostCsSelector = 0x0C02,
    HostSsSelector = 0x0C04,
    HostDsSelector = 0x0C06,
    HostFsSelector = 0x0C08,
    HostGsSelector = 0x0C0A,
    HostTrSelector = 0x0C0C,
    // 64-bit control (B.2.1), read-only data (B.2.2), guest (B.2.3), host (B.2.4).
    IoBitmapA = 0x2000,
    IoBitmapB = 0x2002,
    MsrBitmap = 0x2004,
    PmlAddress = 0x200E,
    TscOffset = 0x2010,
    EptPointer = 0x201A,
    GuestPhysicalAddress = 0x2400,
    VmcsLinkPointer = 0x2800,
    GuestIa32Debugctl = 0x2802,
    GuestIa32Pat = 0x2804,
    GuestIa32Efer = 0x2806,
    HostIa32Pat = 0x2C00,
    HostIa32Efer = 0x2C02,
    // 32-bit control (B.3.1), read-only data (B.3.2), guest (B.3.3), host (B.3.4).
    PinBasedControls = 0x4000,
    PrimaryProcControls = 0x4002,
    ExceptionBitmap = 0x4004,
    PageFaultErrorCodeMask = 0x4006,
    PageFaultErrorCodeMatch = 0x4008,
    Cr3TargetCount = 0x400A,
    ExitControls = 0x400C,
    ExitMsrStoreCount = 0x400E,
    ExitMsrLoadCount = 0x4010,
    EntryControls = 0x4012,
    EntryMsrLoadCount = 0x4014,
    EntryInterruptionInfo = 0x4016,
    EntryExceptionErrorCode = 0x4018,
    EntryInstructionLength = 0x401A,
    SecondaryProcControls = 0x401E,
    VmInstructionError = 0x4400,
    ExitReason = 0x4402,
    ExitInterruptionInfo = 0x4404,
    ExitInterruptionErrorCode = 0x4406,
    IdtVectoringInfo = 0x4408,
    IdtVectoringErrorCode = 0x440A,
    ExitInstructionLength = 0x440C,
    ExitInstructionInfo = 0x440E,
    GuestEsLimit = 0x4800,
    GuestCsLimit = 0x4802,
    GuestSsLimit = 0x4804,
    GuestDsLimit = 0x4806,
    GuestFsLimit = 0x4808,
    GuestGsLimit = 0x480A,
    GuestLdtrLimit = 0x480C,
    GuestTrLimit = 0x480E,
    GuestGdtrLimit = 0x4810,
    GuestIdtrLimit = 0x4812,
    GuestEsAccessRights = 0x4814,
    GuestCsAccessRights = 0x4816,
    GuestSsAccessRights = 0x4818,
    GuestDsAccessRights = 0x481A,
    GuestFsAccessRights = 0x481C,
    GuestGsAccessRights = 0x481E,
    GuestLdtrAccessRights = 0x4820,
    GuestTrAccessRights = 0x4822,
    GuestInterruptibility = 0x4824,
    GuestActivityState = 0x4826,
    GuestSysenterCs = 0x482A,
    GuestPreemptionTimer = 0x482E,
    HostSysenterCs = 0x4C00,
    // Natural-width control (B.4.1), read-only data (B.4.2), guest (B.4.3), host (B.4.4).
    Cr0GuestHostMask = 0x6000,
    Cr4GuestHostMask = 0x6002,
    Cr0ReadShadow = 0x6004,
    Cr4ReadShadow = 0x6006,
    ExitQualification = 0x6400,
    GuestLinearAddress = 0x640A,
    GuestCr0 = 0x6800,
    GuestCr3 = 0x6802,
    GuestCr4 = 0x6804,
    GuestEsBase = 0x6806,
    GuestCsBase = 0x6808,
    GuestSsBase = 0x680A,
    GuestDsBase = 0x680C,
    GuestFsBase = 0x680E,
    GuestGsBase = 0x6810,
    GuestLdtrBase = 0x6812,
    GuestTrBase = 0x6814,
    GuestGdtrBase = 0x6816,
    GuestIdtrBase = 0x6818,
    GuestDr7 = 0x681A,
    GuestRsp = 0x681C,
    GuestRip = 0x681E,
    GuestRflags = 0x6820,
    GuestPendingDebugExceptions = 0x6822,
    GuestSysenterEsp = 0x6824,
    GuestSysenterEip = 0x6826,
    HostCr0 = 0x6C00,
    HostCr3 = 0x6C02,
    HostCr4 = 0x6C04,
    HostFsBase = 0x6C06,
    HostGsBase = 0x6C08,
    HostTrBase = 0x6C0A,
    HostGdtrBase = 0x6C0C,
    HostIdtrBase = 0x6C0E,
    HostSysenterEsp = 0x6C10,
    HostSysenterEip = 0x6C12,
    HostRsp = 0x6C14,
    HostRip = 0x6C16,
}

/// A field's width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldWidth {
    /// 16 bits.
    Word,
    /// 64 bits.
    Quad,
    /// 32 bits.
    Double,
    /// Natural width (64 bits on x86_64).
    Natural,
}

impl VmcsField {
    /// The encoding.
    pub const fn encoding(self) -> u32 {
        self as u32
    }

    /// The width, from encoding bits 14:13.
    pub const fn width(self) -> FieldWidth {
        match (self as u32 >> 13) & 3 {
            0 => FieldWidth::Word,
            1 => FieldWidth::Quad,
            2 => FieldWidth::Double,
            _ => FieldWidth::Natural,
        }
    }
}

/// The fields a VMCS dump prints, in order.
pub const DUMP_FIELDS: &[(VmcsField, &str)] = &[
    (VmcsField::GuestRip, "guest RIP"),
    (VmcsField::GuestRsp, "guest RSP"),
    (VmcsField::GuestRflags, "guest RFLAGS"),
    (VmcsField::GuestCr0, "guest CR0"),
    (VmcsField::GuestCr3, "guest CR3"),
    (VmcsField::GuestCr4, "guest CR4"),
    (VmcsField::GuestIa32Efer, "guest EFER"),
    (VmcsField::GuestCsSelector, "guest CS"),
    (VmcsField::GuestCsAccessRights, "guest CS AR"),
    (VmcsField::GuestSsSelector, "guest SS"),
    (VmcsField::GuestSsAccessRights, "guest SS AR"),
    (VmcsField::GuestTrAccessRights, "guest TR AR"),
    (VmcsField::GuestGdtrBase, "guest GDTR base"),
    (VmcsField::GuestIdtrBase, "guest IDTR base"),
    (VmcsField::GuestIdtrLimit, "guest IDTR limit"),
    (VmcsField::GuestInterruptibility, "guest interruptibility"),
    (VmcsField::GuestActivityState, "guest activity state"),
    (VmcsField::ExitReason, "exit reason"),
    (VmcsField::ExitQualification, "exit qualification"),
    (VmcsField::GuestPhysicalAddress, "guest-physical address"),
    (VmcsField::ExitInterruptionInfo, "exit interruption info"),
    (VmcsField::IdtVectoringInfo, "IDT-vectoring info"),
    (VmcsField::ExitInstructionLength, "exit instruction length"),
    (VmcsField::VmInstructionError, "VM-instruction error"),
    (VmcsField::PinBasedControls, "pin-based controls"),
    (VmcsField::PrimaryProcControls, "primary processor controls"),
    (VmcsField::SecondaryProcControls, "secondary processor controls"),
    (VmcsField::ExitControls, "exit controls"),
    (VmcsField::EntryControls, "entry controls"),
    (VmcsField::EptPointer, "EPT pointer"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_follow_the_encoding() {
        assert_eq!(VmcsField::Vpid.width(), FieldWidth::Word);
        assert_eq!(VmcsField::EptPointer.width(), FieldWidth::Quad);
        assert_eq!(VmcsField::ExitReason.width(), FieldWidth::Double);
        assert_eq!(VmcsField::GuestRip.width(), FieldWidth::Natural);
        assert_eq!(VmcsField::HostRip.encoding(), 0x6C16);
    }
}
