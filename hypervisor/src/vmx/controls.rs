//! VMX control settings against the capability MSRs (Intel SDM Vol. 3D, Appendix A.3-A.5) and
//! the CR0/CR4 fixed bits (A.7, A.8). Pure: the hardware module reads the MSRs and calls these.
#![deny(unsafe_code)]

use core::fmt;

/// Why a control value could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingControls {
    /// Which control field.
    pub field: &'static str,
    /// Bits we need that the CPU cannot set.
    pub bits: u32,
}

impl fmt::Display for MissingControls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the CPU cannot set {} bits {:#010x}", self.field, self.bits)
    }
}

/// Builds a control value from the `required` bits, the `optional` bits the CPU may lack, and
/// the capability MSR: bits 31:0 are the allowed 0-settings (a 1 there forces the control on),
/// bits 63:32 the allowed 1-settings (a 0 there forces it off) (§A.3.1).
pub fn adjust(field: &'static str, required: u32, optional: u32, capability: u64) -> Result<u32, MissingControls> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let missing = required & !may_be_one;
    if missing != 0 {
        return Err(MissingControls { field, bits: missing });
    }
    Ok((required | (optional & may_be_one) | must_be_one) & may_be_one)
}

/// Applies IA32_VMX_CR{0,4}_FIXED0 (bits that must be 1) and FIXED1 (bits that may be 1).
pub fn fix_control_register(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// Pin-based controls (SDM Vol. 3C §25.6.1, Table 25-5).
pub mod pin {
    /// External-interrupt exiting.
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    /// NMI exiting.
    pub const NMI_EXITING: u32 = 1 << 3;
    /// Activate VMX-preemption timer.
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based controls (§25.6.2, Table 25-6).
pub mod primary {
    /// HLT exiting.
    pub const HLT_EXITING: u32 = 1 << 7;
    /// MWAIT exiting.
    pub const MWAIT_EXITING: u32 = 1 << 10;
    /// RDPMC exiting.
    pub const RDPMC_EXITING: u32 = 1 << 11;
    /// RDTSC exiting.
    pub const RDTSC_EXITING: u32 = 1 << 12;
    /// CR8-load exiting (the guest never reaches the physical TPR).
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    /// CR8-store exiting.
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    /// Use I/O bitmaps.
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    /// Use MSR bitmaps.
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    /// MONITOR exiting.
    pub const MONITOR_EXITING: u32 = 1 << 29;
    /// Activate secondary controls.
    pub const SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based controls (§25.6.2, Table 25-7).
pub mod secondary {
    /// Enable EPT.
    pub const ENABLE_EPT: u32 = 1 << 1;
    /// Enable RDTSCP (0: RDTSCP raises #UD; 1 with RDTSC exiting: RDTSCP exits, §26.1.3).
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    /// Enable VPID.
    pub const ENABLE_VPID: u32 = 1 << 5;
    /// Enable INVPCID (0: INVPCID raises #UD).
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    /// Enable PML.
    pub const ENABLE_PML: u32 = 1 << 17;
}

/// VM-exit controls (§25.7.1, Table 25-13).
pub mod exit {
    /// Host address-space size (64-bit host).
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    /// Acknowledge interrupt on exit.
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    /// Save IA32_PAT.
    pub const SAVE_PAT: u32 = 1 << 18;
    /// Load IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 19;
    /// Save IA32_EFER.
    pub const SAVE_EFER: u32 = 1 << 20;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls (§25.8.1, Table 25-15).
pub mod entry {
    /// IA-32e mode guest.
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    /// Load IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 14;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// IA32_VMX_EPT_VPID_CAP bits (§A.10).
pub mod ept_cap {
    /// Page-walk length of 4.
    pub const WALK_LENGTH_4: u64 = 1 << 6;
    /// Write-back EPT paging structures.
    pub const MEMORY_TYPE_WB: u64 = 1 << 14;
    /// 2 MiB EPT pages.
    pub const PAGES_2M: u64 = 1 << 16;
    /// INVEPT.
    pub const INVEPT: u64 = 1 << 20;
    /// Accessed and dirty flags.
    pub const ACCESSED_DIRTY: u64 = 1 << 21;
    /// Single-context INVEPT.
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    /// All-context INVEPT.
    pub const INVEPT_ALL: u64 = 1 << 26;
    /// INVVPID.
    pub const INVVPID: u64 = 1 << 32;
    /// All-context INVVPID.
    pub const INVVPID_ALL: u64 = 1 << 42;
}

/// The EPT pointer (§25.6.11): write-back, 4-level walk, optional A/D flags.
pub fn ept_pointer(root: u64, accessed_dirty: bool) -> u64 {
    root | 6 | (3 << 3) | if accessed_dirty { 1 << 6 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjust_honours_both_halves() {
        // Bit 1 forced on, bit 4 not allowed, bits 0..=3 allowed.
        let cap = (0b1111u64 << 32) | 0b0010;
        assert_eq!(adjust("pin", 0b0001, 0, cap), Ok(0b0011));
        assert_eq!(adjust("pin", 0b0001, 0b1_0100, cap), Ok(0b0111), "optional bits only where allowed");
        assert_eq!(adjust("pin", 0b1_0001, 0, cap), Err(MissingControls { field: "pin", bits: 0b1_0000 }));
        assert!(MissingControls { field: "pin", bits: 16 }.to_string().contains("pin bits 0x00000010"));
    }

    #[test]
    fn fixed_bits_force_and_clear() {
        // CR0 fixed0 = PE|NE|PG (as on CPUs without unrestricted guest), fixed1 = all low 32 bits.
        let fixed0 = (1 << 0) | (1 << 5) | (1 << 31);
        assert_eq!(fix_control_register(1 << 31, fixed0, 0xFFFF_FFFF), fixed0);
        assert_eq!(fix_control_register(1 << 40, 0, 0xFFFF_FFFF), 0);
    }

    #[test]
    fn ept_pointer_layout() {
        assert_eq!(ept_pointer(0x1000, false), 0x101E);
        assert_eq!(ept_pointer(0x1000, true), 0x105E);
    }
}
