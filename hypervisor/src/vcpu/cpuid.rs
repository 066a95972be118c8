//! What CPUID tells a guest: the host's answer, filtered.
//!
//! Hidden: VMX and SVM (no nested virtualization), XSAVE/OSXSAVE/AVX and their leaves (guest
//! FPU state is switched with FXSAVE, which covers x87/SSE only), the PMU (leaf 0xA), thermal
//! and power management (leaf 6), the host's APIC ID, MONITOR/MWAIT and MONITORX/MWAITX (both
//! backends intercept them and raise #UD), features whose MSRs the allow-list does not offer
//! (MTRR, MCA, x2APIC, TSC-deadline, debug store, thermal, AMD speculation control), RDPID (it would read the host's IA32_TSC_AUX without
//! an exit), and RDTSCP where the backend cannot intercept it ([`GuestFeatures::rdtscp`]). Added: the hypervisor-present bit
//! (leaf 1 ECX bit 31) and a hypervisor leaf 0x4000_0000 naming this hypervisor.
#![deny(unsafe_code)]

use guest_shim::HYPERVISOR_SIGNATURE;

/// A CPUID result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CpuidValues {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// What the backend lets the guest use, beyond what the host CPU has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestFeatures {
    /// RDTSCP exits on this backend (it returns the coarse clock and IA32_TSC_AUX), so
    /// CPUID Fn8000_0001 EDX[27] may be shown; otherwise it is hidden and RDTSCP raises #UD.
    pub rdtscp: bool,
}

/// The highest hypervisor leaf.
pub const HYPERVISOR_LEAF_MAX: u32 = 0x4000_0000;

mod bits {
    pub const LEAF1_ECX_MONITOR: u32 = 1 << 3;
    pub const LEAF1_ECX_VMX: u32 = 1 << 5;
    pub const LEAF1_ECX_SMX: u32 = 1 << 6;
    pub const LEAF1_ECX_XSAVE: u32 = 1 << 26;
    pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
    pub const LEAF1_ECX_AVX: u32 = 1 << 28;
    pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
    /// AVX2 (5), AVX512F (16), AVX512DQ (17), AVX512IFMA (21), AVX512PF (26), AVX512ER (27),
    /// AVX512CD (28), AVX512BW (30), AVX512VL (31).
    pub const LEAF7_EBX_AVX_FAMILY: u32 =
        (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
    /// AVX512VBMI (1), AVX512VBMI2 (6), VAES (9), VPCLMULQDQ (10), AVX512VNNI (11), AVX512BITALG (12),
    /// AVX512VPOPCNTDQ (14).
    pub const LEAF7_ECX_AVX_FAMILY: u32 =
        (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
    pub const LEAF7_ECX_RDPID: u32 = 1 << 22;
    /// Features whose MSRs the allow-list does not offer: DTES64 (2), DS-CPL (4), EST (7), TM2 (8),
    /// xTPR (14), PDCM (15), x2APIC (21), TSC-deadline (24).
    pub const LEAF1_ECX_MSR_FEATURES: u32 =
        (1 << 2) | (1 << 4) | (1 << 7) | (1 << 8) | (1 << 14) | (1 << 15) | (1 << 21) | (1 << 24);
    /// MTRR (12), MCA (14), DS (21), ACPI (22), TM (29), PBE (31).
    pub const LEAF1_EDX_MSR_FEATURES: u32 = (1 << 12) | (1 << 14) | (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
    /// AltMovCr8 (LOCK MOV CR0 as CR8): the decoder gives a LOCK prefix #UD.
    pub const EXT1_ECX_ALT_MOV_CR8: u32 = 1 << 4;
    pub const EXT1_ECX_SVM: u32 = 1 << 2;
    pub const EXT1_ECX_MONITORX: u32 = 1 << 29;
    pub const EXT1_EDX_RDTSCP: u32 = 1 << 27;
}

/// The guest's view of CPUID leaf `leaf`, sub-leaf `subleaf`, given the host's answer `host`.
pub fn filter(leaf: u32, subleaf: u32, host: CpuidValues, features: GuestFeatures) -> CpuidValues {
    let _ = subleaf;
    let mut v = host;
    match leaf {
        1 => {
            v.ecx &= !(bits::LEAF1_ECX_MONITOR
                | bits::LEAF1_ECX_VMX
                | bits::LEAF1_ECX_SMX
                | bits::LEAF1_ECX_XSAVE
                | bits::LEAF1_ECX_OSXSAVE
                | bits::LEAF1_ECX_AVX
                | bits::LEAF1_ECX_MSR_FEATURES);
            v.edx &= !bits::LEAF1_EDX_MSR_FEATURES;
            v.ecx |= bits::LEAF1_ECX_HYPERVISOR;
            // EBX[31:24] is the initial APIC ID: every guest sees vCPU 0.
            v.ebx &= 0x00FF_FFFF;
        }
        6 | 0xA | 0xD => v = CpuidValues::default(),
        7 => {
            v.ebx &= !bits::LEAF7_EBX_AVX_FAMILY;
            v.ecx &= !(bits::LEAF7_ECX_AVX_FAMILY | bits::LEAF7_ECX_RDPID);
            v.edx = 0;
        }
        HYPERVISOR_LEAF_MAX => {
            let sig = HYPERVISOR_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
            v = CpuidValues { eax: HYPERVISOR_LEAF_MAX, ebx: word(0), ecx: word(4), edx: word(8) };
        }
        0x4000_0001..=0x4FFF_FFFF => v = CpuidValues::default(),
        0x8000_0001 => {
            v.ecx &= !(bits::EXT1_ECX_SVM | bits::EXT1_ECX_MONITORX | bits::EXT1_ECX_ALT_MOV_CR8);
            if !features.rdtscp {
                v.edx &= !bits::EXT1_EDX_RDTSCP;
            }
        }
        // EBX: AMD speculation-control features (IBPB, IBRS, STIBP, SSBD...) whose MSRs the
        // allow-list does not offer.
        0x8000_0008 => v.ebx = 0,
        // SVM feature leaf: nothing to offer.
        0x8000_000A => v = CpuidValues::default(),
        _ => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CpuidValues = CpuidValues { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };
    const NONE: GuestFeatures = GuestFeatures { rdtscp: false };

    #[test]
    fn rdtscp_shown_only_when_intercepted_and_monitor_rdpid_hidden() {
        assert_eq!(filter(0x8000_0001, 0, ALL, NONE).edx & bits::EXT1_EDX_RDTSCP, 0);
        let shown = filter(0x8000_0001, 0, ALL, GuestFeatures { rdtscp: true });
        assert_ne!(shown.edx & bits::EXT1_EDX_RDTSCP, 0);
        assert_eq!(shown.ecx & bits::EXT1_ECX_MONITORX, 0);
        assert_eq!(filter(1, 0, ALL, NONE).ecx & bits::LEAF1_ECX_MONITOR, 0);
        assert_eq!(filter(7, 0, ALL, NONE).ecx & bits::LEAF7_ECX_RDPID, 0);
    }

    #[test]
    fn leaf1_hides_vmx_and_xsave_and_sets_hypervisor_bit() {
        let v =
            filter(1, 0, CpuidValues { ecx: bits::LEAF1_ECX_VMX | bits::LEAF1_ECX_AVX, ebx: 0x0700_0800, ..ALL }, NONE);
        assert_eq!(v.ecx & bits::LEAF1_ECX_VMX, 0);
        assert_eq!(v.ecx & bits::LEAF1_ECX_AVX, 0);
        assert_eq!(v.ecx & bits::LEAF1_ECX_HYPERVISOR, bits::LEAF1_ECX_HYPERVISOR);
        assert_eq!(v.ebx >> 24, 0, "APIC ID hidden");
        assert_eq!(v.ebx & 0xFFFF, 0x0800, "other EBX fields kept");
    }

    #[test]
    fn svm_is_hidden() {
        assert_eq!(filter(0x8000_0001, 0, ALL, NONE).ecx & bits::EXT1_ECX_SVM, 0);
        assert_eq!(filter(0x8000_000A, 0, ALL, NONE), CpuidValues::default());
    }

    #[test]
    fn hypervisor_leaf_names_us() {
        let v = filter(0x4000_0000, 0, CpuidValues::default(), NONE);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&v.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&v.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&v.edx.to_le_bytes());
        assert_eq!(&sig, HYPERVISOR_SIGNATURE);
        assert_eq!(v.eax, HYPERVISOR_LEAF_MAX);
        assert_eq!(filter(0x4000_0001, 0, ALL, NONE), CpuidValues::default());
    }

    #[test]
    fn xsave_pmu_and_avx_leaves_are_empty_or_masked() {
        for leaf in [6, 0xA, 0xD] {
            assert_eq!(filter(leaf, 0, ALL, NONE), CpuidValues::default(), "leaf {leaf:#x}");
        }
        let v = filter(7, 0, ALL, NONE);
        assert_eq!(v.ebx & (1 << 5), 0, "AVX2 hidden");
        assert_eq!(v.ebx & 1, 1, "FSGSBASE kept");
    }

    #[test]
    fn other_leaves_pass_through() {
        assert_eq!(filter(0, 0, ALL, NONE), ALL);
        assert_eq!(filter(0x8000_0007, 0, ALL, NONE), ALL);
        assert_eq!(filter(0x8000_0008, 0, ALL, NONE), CpuidValues { ebx: 0, ..ALL });
    }
}
