//! The guest's MSRs: an allow-list. Every RDMSR/WRMSR exits (the MSR bitmap/permission map
//! intercepts all of them); the handler serves the MSRs below and injects #GP for the rest, as a
//! CPU does for an MSR it does not implement. Nothing reaches a host MSR.
#![deny(unsafe_code)]

use super::HardwareMsr;

/// Where an allowed MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrSlot {
    /// In the VMCS/VMCB guest state.
    Hardware(HardwareMsr),
    /// In the handler's own per-guest store (index into [`GuestMsrs`]).
    Stored(usize),
    /// IA32_TSC: the guest's virtual TSC, read-only.
    Tsc,
    /// Read-only constant; writes of the same value are accepted, others get #GP.
    Constant(u64),
}

/// MSR numbers.
#[allow(missing_docs)]
pub mod numbers {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_APIC_BASE: u32 = 0x1B;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_DEBUGCTL: u32 = 0x1D9;
    pub const IA32_MISC_ENABLE: u32 = 0x1A0;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_EFER: u32 = 0xC000_0080;
    pub const IA32_STAR: u32 = 0xC000_0081;
    pub const IA32_LSTAR: u32 = 0xC000_0082;
    pub const IA32_CSTAR: u32 = 0xC000_0083;
    pub const IA32_FMASK: u32 = 0xC000_0084;
    pub const IA32_FS_BASE: u32 = 0xC000_0100;
    pub const IA32_GS_BASE: u32 = 0xC000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;
    pub const IA32_TSC_AUX: u32 = 0xC000_0103;
}

/// MSRs kept in the handler's store (the record vCPU state capture takes). The first five are
/// also loaded into the CPU for the guest (SYSCALL, SYSRET and SWAPGS use them: AMD-V through the
/// VMCB and VMLOAD, VT-x by writing the MSRs before entry), see [`HardwareMsr::SYSCALL`].
const STORED: [u32; 6] = [
    numbers::IA32_STAR,
    numbers::IA32_LSTAR,
    numbers::IA32_CSTAR,
    numbers::IA32_FMASK,
    numbers::IA32_KERNEL_GS_BASE,
    numbers::IA32_TSC_AUX,
];

/// IA32_APIC_BASE as the guest sees it: default base, BSP, xAPIC disabled (there is no APIC).
const APIC_BASE_VALUE: u64 = 0xFEE0_0000 | (1 << 8);
/// IA32_MISC_ENABLE: fast-strings only.
const MISC_ENABLE_VALUE: u64 = 1;

/// The allow-list.
pub fn slot(msr: u32) -> Option<MsrSlot> {
    use numbers::*;
    Some(match msr {
        IA32_EFER => MsrSlot::Hardware(HardwareMsr::Efer),
        IA32_FS_BASE => MsrSlot::Hardware(HardwareMsr::FsBase),
        IA32_GS_BASE => MsrSlot::Hardware(HardwareMsr::GsBase),
        IA32_PAT => MsrSlot::Hardware(HardwareMsr::Pat),
        IA32_SYSENTER_CS => MsrSlot::Hardware(HardwareMsr::SysenterCs),
        IA32_SYSENTER_ESP => MsrSlot::Hardware(HardwareMsr::SysenterEsp),
        IA32_SYSENTER_EIP => MsrSlot::Hardware(HardwareMsr::SysenterEip),
        // Architectural on every CPU the guest can see (no CPUID bit); no debug-store, LBR or BTF
        // features are offered, so it reads 0 and only 0 may be written.
        IA32_DEBUGCTL => MsrSlot::Constant(0),
        IA32_TSC => MsrSlot::Tsc,
        IA32_APIC_BASE => MsrSlot::Constant(APIC_BASE_VALUE),
        IA32_MISC_ENABLE => MsrSlot::Constant(MISC_ENABLE_VALUE),
        _ => MsrSlot::Stored(STORED.iter().position(|&m| m == msr)?),
    })
}

/// Per-guest values of the stored MSRs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestMsrs {
    values: [u64; STORED.len()],
}

impl GuestMsrs {
    /// The stored value at `index`.
    pub fn get(&self, index: usize) -> u64 {
        self.values[index]
    }

    /// Stores `value` at `index`.
    pub fn set(&mut self, index: usize, value: u64) {
        self.values[index] = value;
    }

    /// All stored values (for vCPU state capture), in allow-list order.
    pub fn all(&self) -> [u64; 6] {
        self.values
    }

    /// Replaces all stored values (vCPU reset).
    pub fn set_all(&mut self, values: [u64; 6]) {
        self.values = values;
    }
}

/// True when `value` is canonical (bits 63:47 all equal), as base-address MSRs require.
pub fn is_canonical(value: u64) -> bool {
    let top = value >> 47;
    top == 0 || top == 0x1_FFFF
}

/// EFER bits a guest may change: SCE (0) and NXE (11). LME/LMA/SVME stay as the hypervisor set them.
pub const EFER_GUEST_WRITABLE: u64 = (1 << 0) | (1 << 11);

/// The PAT memory types a valid IA32_PAT entry may hold (0, 1, 4, 5, 6, 7).
pub fn is_valid_pat(value: u64) -> bool {
    value.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_covers_what_guests_touch_and_nothing_else() {
        assert_eq!(slot(numbers::IA32_EFER), Some(MsrSlot::Hardware(HardwareMsr::Efer)));
        assert_eq!(slot(numbers::IA32_TSC), Some(MsrSlot::Tsc));
        assert!(matches!(slot(numbers::IA32_LSTAR), Some(MsrSlot::Stored(_))));
        for denied in
            [0x3A /* FEATURE_CONTROL */, 0x480 /* VMX_BASIC */, 0xC001_0117 /* VM_HSAVE_PA */, 0xDEAD]
        {
            assert_eq!(slot(denied), None, "{denied:#x}");
        }
    }

    #[test]
    fn canonical_and_pat_checks() {
        assert!(is_canonical(0x0000_7FFF_FFFF_FFFF));
        assert!(is_canonical(0xFFFF_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
        assert!(is_valid_pat(0x0007_0406_0007_0406));
        assert!(!is_valid_pat(0x0007_0406_0007_0402));
    }
}
