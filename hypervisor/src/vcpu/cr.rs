//! Control-register writes the hypervisor completes for the guest: the architectural checks of
//! MOV to CR0/CR4/CR8, CLTS and LMSW (Intel SDM Vol. 2B "MOV—Move to/from Control Registers",
//! "CLTS", "LMSW"; Vol. 3A §2.5 "Control Registers"; AMD APM Vol. 2 §3.1 and Vol. 3 "MOV CRn").
//!
//! Both backends trap only some writes (VT-x: those that change a bit the guest/host mask gives
//! the host, SDM Vol. 3C §26.1.3; AMD-V: every CR0/CR4 write). A trapped write has not been
//! checked by the CPU yet (the VM exit comes before the #GP checks, SDM Vol. 3C §26.1.1 lists
//! only #UD, privilege and I/O-permission faults as taking priority), so the whole new value is
//! checked here, exactly as the CPU would, against what the guest's CPUID shows it.
#![deny(unsafe_code)]

use super::cpuid::CpuidValues;
use super::ControlState;

/// CR0 bits (SDM Vol. 3A §2.5).
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits (SDM Vol. 3A §2.5, Figure 2-7).
pub mod cr4 {
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// 57-bit linear addresses.
    pub const LA57: u64 = 1 << 12;
    /// VMX enable.
    pub const VMXE: u64 = 1 << 13;
    /// SMX enable.
    pub const SMXE: u64 = 1 << 14;
    /// PCID enable.
    pub const PCIDE: u64 = 1 << 17;
    /// XSAVE and processor extended states enable.
    pub const OSXSAVE: u64 = 1 << 18;
    /// Control-flow enforcement.
    pub const CET: u64 = 1 << 23;
}

/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;

/// What happens to a control-register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrWrite {
    /// The value is architecturally valid: load it and complete the instruction.
    Load(u64),
    /// The architecture raises #GP(0).
    GeneralProtection,
    /// Valid, but the hypervisor does not run guests outside 64-bit long mode.
    Unsupported(&'static str),
}

/// A write of `new` to CR0 (MOV, CLTS or LMSW, already combined with the old value).
pub fn write_cr0(state: &ControlState, new: u64) -> CrWrite {
    let old = state.cr0;
    // MOV to CR0: #GP(0) if bits 63:32 are set, PG without PE, or NW without CD.
    if new >> 32 != 0 || (new & cr0::PG != 0 && new & cr0::PE == 0) || (new & cr0::NW != 0 && new & cr0::CD == 0) {
        return CrWrite::GeneralProtection;
    }
    // §2.5 / MOV CR: clearing WP while CR4.CET = 1 is #GP(0).
    if new & cr0::WP == 0 && state.cr4 & cr4::CET != 0 {
        return CrWrite::GeneralProtection;
    }
    if old & cr0::PG != 0 && new & cr0::PG == 0 && state.efer & EFER_LMA != 0 {
        // In 64-bit mode clearing PG is #GP(0) (SDM Vol. 2B MOV CR: "attempt to clear CR0.PG in
        // 64-bit mode"); from compatibility mode it leaves long mode, which guests here never do.
        return if state.long_mode {
            CrWrite::GeneralProtection
        } else {
            CrWrite::Unsupported("leaving long mode (CR0.PG cleared in compatibility mode)")
        };
    }
    CrWrite::Load(new)
}

/// CLTS: CR0.TS cleared.
pub fn clts(state: &ControlState) -> CrWrite {
    write_cr0(state, state.cr0 & !cr0::TS)
}

/// LMSW: loads CR0[3:0] from `source`, but can set PE and never clear it (SDM Vol. 2A LMSW).
pub fn lmsw(state: &ControlState, source: u16) -> CrWrite {
    let source = u64::from(source) & 0xF;
    write_cr0(state, (state.cr0 & !0xE) | source | (state.cr0 & cr0::PE))
}

/// The CR4 bits the guest may set: those whose feature the guest's CPUID shows (MOV to CR4:
/// "#GP(0) if an attempt is made to write a 1 to any reserved bit").
pub fn cr4_allowed(cpuid: &dyn Fn(u32, u32) -> CpuidValues) -> u64 {
    let one = cpuid(1, 0);
    let seven = if cpuid(0, 0).eax >= 7 { cpuid(7, 0) } else { CpuidValues::default() };
    let has = |word: u32, bit: u32| word & (1 << bit) != 0;
    let mut allowed = 1 << 8; // PCE
    for (bit, present) in [
        (0, has(one.edx, 1)),     // VME (CPUID.1:EDX.VME)
        (1, has(one.edx, 1)),     // PVI
        (2, has(one.edx, 4)),     // TSD (TSC)
        (3, has(one.edx, 2)),     // DE
        (4, has(one.edx, 3)),     // PSE
        (5, has(one.edx, 6)),     // PAE
        (6, has(one.edx, 7)),     // MCE
        (7, has(one.edx, 13)),    // PGE
        (9, has(one.edx, 24)),    // OSFXSR (FXSR)
        (10, has(one.edx, 25)),   // OSXMMEXCPT (SSE)
        (11, has(seven.ecx, 2)),  // UMIP
        (12, has(seven.ecx, 16)), // LA57
        (13, has(one.ecx, 5)),    // VMXE
        (14, has(one.ecx, 6)),    // SMXE
        (16, has(seven.ebx, 0)),  // FSGSBASE
        (17, has(one.ecx, 17)),   // PCIDE
        (18, has(one.ecx, 26)),   // OSXSAVE
        (20, has(seven.ebx, 7)),  // SMEP
        (21, has(seven.ebx, 20)), // SMAP
        (22, has(seven.ecx, 3)),  // PKE
        (23, has(seven.ecx, 7)),  // CET (CET_SS)
        (24, has(seven.ecx, 31)), // PKS
    ] {
        if present {
            allowed |= 1 << bit;
        }
    }
    allowed
}

/// A write of `new` to CR4, given the bits the guest's CPUID allows.
pub fn write_cr4(state: &ControlState, new: u64, allowed: u64) -> CrWrite {
    let old = state.cr4;
    let long = state.efer & EFER_LMA != 0;
    let reserved = new & !allowed != 0;
    // MOV to CR4 (SDM Vol. 2B): #GP(0) for reserved bits; for clearing PAE or changing LA57 in
    // IA-32e mode; for setting PCIDE outside IA-32e mode or with CR3[11:0] != 0; for setting CET
    // while CR0.WP = 0.
    let pae_cleared = long && new & cr4::PAE == 0;
    let la57_changed = long && (old ^ new) & cr4::LA57 != 0;
    let pcide_set = old & cr4::PCIDE == 0 && new & cr4::PCIDE != 0 && (!long || state.cr3 & 0xFFF != 0);
    let cet_without_wp = new & cr4::CET != 0 && state.cr0 & cr0::WP == 0;
    if reserved || pae_cleared || la57_changed || pcide_set || cet_without_wp {
        CrWrite::GeneralProtection
    } else {
        CrWrite::Load(new)
    }
}

/// A write of `new` to CR8: only bits 3:0 (the task priority) exist (SDM Vol. 3A §10.8.6.1).
pub fn write_cr8(new: u64) -> CrWrite {
    if new >> 4 != 0 {
        CrWrite::GeneralProtection
    } else {
        CrWrite::Load(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boot protocol's state: CR0 = PE|MP|ET|NE|WP?|PG, CR4 = PAE|OSFXSR|OSXMMEXCPT, LMA.
    fn boot() -> ControlState {
        ControlState {
            cr0: 0x8000_0033,
            cr3: 0x2000,
            cr4: 0x620,
            cr8: 0,
            efer: crate::guest::boot::GUEST_EFER,
            long_mode: true,
        }
    }

    fn cpu(leaf: u32, _: u32) -> CpuidValues {
        match leaf {
            0 => CpuidValues { eax: 0xD, ..Default::default() },
            // FXSR, SSE, PAE, PGE, DE, PSE, TSC, MCE, VME; PCID.
            1 => CpuidValues { edx: 0x0300_20DE, ecx: 1 << 17, ..Default::default() },
            7 => CpuidValues { ebx: 1 | (1 << 7), ..Default::default() },
            _ => CpuidValues::default(),
        }
    }

    #[test]
    fn cr0_writes_follow_the_mov_cr_rules() {
        let s = boot();
        assert_eq!(write_cr0(&s, s.cr0), CrWrite::Load(s.cr0), "same value");
        assert_eq!(write_cr0(&s, s.cr0 | cr0::CD), CrWrite::Load(s.cr0 | cr0::CD), "CD may be set");
        assert_eq!(write_cr0(&s, s.cr0 | cr0::NW), CrWrite::GeneralProtection, "NW without CD");
        assert_eq!(write_cr0(&s, s.cr0 & !cr0::PE), CrWrite::GeneralProtection, "PG without PE");
        assert_eq!(write_cr0(&s, s.cr0 & !cr0::PG), CrWrite::GeneralProtection, "PG cleared in 64-bit mode");
        assert_eq!(write_cr0(&s, s.cr0 | (1 << 32)), CrWrite::GeneralProtection, "bit 32");
        let compat = ControlState { long_mode: false, ..s };
        assert!(matches!(write_cr0(&compat, s.cr0 & !cr0::PG), CrWrite::Unsupported(_)));
        assert_eq!(clts(&ControlState { cr0: s.cr0 | cr0::TS, ..s }), CrWrite::Load(s.cr0));
        // LMSW cannot clear PE, sets MP/EM/TS from the source.
        assert_eq!(lmsw(&s, 0), CrWrite::Load(s.cr0 & !0xE));
        assert_eq!(lmsw(&s, 0xFFFF), CrWrite::Load(s.cr0 | 0xF));
    }

    #[test]
    fn cr4_writes_follow_the_guests_cpuid() {
        let s = boot();
        let allowed = cr4_allowed(&cpu);
        assert_eq!(write_cr4(&s, s.cr4, allowed), CrWrite::Load(s.cr4));
        for hidden in [cr4::VMXE, cr4::SMXE, cr4::OSXSAVE, cr4::LA57, cr4::CET, 1 << 15, 1 << 40] {
            assert_eq!(write_cr4(&s, s.cr4 | hidden, allowed), CrWrite::GeneralProtection, "{hidden:#x}");
        }
        assert_eq!(write_cr4(&s, s.cr4 & !cr4::PAE, allowed), CrWrite::GeneralProtection, "PAE cleared");
        assert_eq!(write_cr4(&s, s.cr4 | (1 << 7), allowed), CrWrite::Load(s.cr4 | (1 << 7)), "PGE");
        assert_eq!(write_cr4(&s, s.cr4 | cr4::PCIDE, allowed), CrWrite::Load(s.cr4 | cr4::PCIDE));
        let pcid_bits = ControlState { cr3: 0x2001, ..s };
        assert_eq!(write_cr4(&pcid_bits, s.cr4 | cr4::PCIDE, allowed), CrWrite::GeneralProtection);
    }

    #[test]
    fn cr8_holds_four_bits() {
        assert_eq!(write_cr8(15), CrWrite::Load(15));
        assert_eq!(write_cr8(16), CrWrite::GeneralProtection);
    }
}
