//! The AMD-V (SVM) backend with nested paging: AMD APM Vol. 2 chapter 15, "Secure Virtual
//! Machine". It implements the vendor-neutral [`crate::vcpu::Vcpu`] beside VT-x.
//!
//! - [`decode`]: instruction lengths for intercepts when the CPU lacks NRIPS (QEMU TCG); pure.
//! - [`vmcb`]: the VMCB layout (APM Appendix B), offsets checked at compile time; pure.
//! - [`npt`]: the nested page tables over guest RAM and their dirty-bit scan; pure.
//! - [`state`]: VMCB <-> vendor-neutral vCPU state conversions (segment attributes, events,
//!   interrupt shadow) and the checks a state passes before it is loaded; pure.
//! - `hw` (bare metal): enabling SVM (EFER.SVME, VM_HSAVE_PA), the shared MSR and I/O permission
//!   maps, ASIDs, the VMCB of each vCPU, the VMRUN world switch, exit translation, vCPU state
//!   capture/load and dirty logging with NPT dirty bits.
//! - `timer` (bare metal): preemption with the local APIC timer and the INTR intercept (AMD-V has
//!   no VMX-preemption-timer equivalent).
//!
//! Feature detection ([`SvmFeatures::from_cpuid`]) is pure so that it is host-tested. The pure
//! modules are `#![deny(unsafe_code)]`; `hw` and `timer` hold every `unsafe` block of the backend,
//! each with its reason.

pub mod decode;
pub mod npt;
pub mod state;
pub mod vmcb;

#[cfg(feature = "bare-metal")]
mod hw;
#[cfg(feature = "bare-metal")]
mod timer;

#[cfg(feature = "bare-metal")]
pub use hw::{SvmBackend, SvmError, SvmVcpu};

use crate::vcpu::cpuid::CpuidValues;

/// CPUID Fn8000_0001 ECX bit 2: SVM (APM Vol. 2 §15.4).
const EXT1_ECX_SVM: u32 = 1 << 2;
/// CPUID Fn8000_000A EDX bits (APM Vol. 3 Appendix E.4.9).
mod fn8000_000a_edx {
    /// Nested paging.
    pub const NP: u32 = 1 << 0;
    /// NextRIP save on #VMEXIT.
    pub const NRIPS: u32 = 1 << 3;
    /// TLB_CONTROL flush of one ASID.
    pub const FLUSH_BY_ASID: u32 = 1 << 6;
    /// Decode assists (instruction bytes in the VMCB).
    pub const DECODE_ASSISTS: u32 = 1 << 7;
}

/// What the CPU's SVM implementation offers, from CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmFeatures {
    /// SVM revision (Fn8000_000A EAX[7:0]).
    pub revision: u8,
    /// Number of ASIDs (Fn8000_000A EBX); ASID 0 is the host's.
    pub asids: u32,
    /// NextRIP is saved on #VMEXIT; without it [`decode`] works out instruction lengths.
    pub nrips: bool,
    /// TLB_CONTROL = 3 (flush this guest's ASID) is supported; otherwise flush all (1).
    pub flush_by_asid: bool,
    /// Decode assists.
    pub decode_assists: bool,
}

impl SvmFeatures {
    /// Reads the SVM leaves. `Err` names the first missing required feature: SVM itself
    /// (Fn8000_0001 ECX[2]) or nested paging (Fn8000_000A EDX[0]).
    pub fn from_cpuid(cpuid: &dyn Fn(u32, u32) -> CpuidValues) -> Result<Self, &'static str> {
        let max_extended = cpuid(0x8000_0000, 0).eax;
        if max_extended < 0x8000_000A || cpuid(0x8000_0001, 0).ecx & EXT1_ECX_SVM == 0 {
            return Err("SVM (CPUID Fn8000_0001 ECX[2])");
        }
        let leaf = cpuid(0x8000_000A, 0);
        if leaf.edx & fn8000_000a_edx::NP == 0 {
            return Err("nested paging (CPUID Fn8000_000A EDX[0] NP)");
        }
        if leaf.ebx < 2 {
            return Err("at least one guest ASID (CPUID Fn8000_000A EBX)");
        }
        Ok(Self {
            revision: leaf.eax as u8,
            asids: leaf.ebx,
            nrips: leaf.edx & fn8000_000a_edx::NRIPS != 0,
            flush_by_asid: leaf.edx & fn8000_000a_edx::FLUSH_BY_ASID != 0,
            decode_assists: leaf.edx & fn8000_000a_edx::DECODE_ASSISTS != 0,
        })
    }

    /// How RIP is advanced past an intercepted instruction, for the boot log.
    pub fn rip_advance_method(&self) -> &'static str {
        if self.nrips {
            "NextRIP (NRIPS)"
        } else {
            "instruction decoding (no NRIPS)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(svm: bool, edx_a: u32, asids: u32) -> impl Fn(u32, u32) -> CpuidValues {
        move |leaf, _| match leaf {
            0x8000_0000 => CpuidValues { eax: 0x8000_001F, ..Default::default() },
            0x8000_0001 => CpuidValues { ecx: if svm { 1 << 2 } else { 0 }, ..Default::default() },
            0x8000_000A => CpuidValues { eax: 1, ebx: asids, ecx: 0, edx: edx_a },
            _ => CpuidValues::default(),
        }
    }

    #[test]
    fn qemu_tcg_like_cpu_has_np_without_nrips() {
        let f = SvmFeatures::from_cpuid(&cpu(true, 1, 16)).unwrap();
        assert_eq!(
            f,
            SvmFeatures { revision: 1, asids: 16, nrips: false, flush_by_asid: false, decode_assists: false }
        );
        assert_eq!(f.rip_advance_method(), "instruction decoding (no NRIPS)");
    }

    #[test]
    fn nrips_and_flush_by_asid_are_read() {
        let f = SvmFeatures::from_cpuid(&cpu(true, 1 | 8 | 64, 32768)).unwrap();
        assert!(f.nrips && f.flush_by_asid);
        assert_eq!(f.rip_advance_method(), "NextRIP (NRIPS)");
    }

    #[test]
    fn missing_features_are_named() {
        assert!(SvmFeatures::from_cpuid(&cpu(false, 1, 16)).unwrap_err().starts_with("SVM"));
        assert!(SvmFeatures::from_cpuid(&cpu(true, 8, 16)).unwrap_err().starts_with("nested paging"));
        assert!(SvmFeatures::from_cpuid(&cpu(true, 1, 1)).unwrap_err().contains("ASID"));
        let old = |leaf: u32, _: u32| match leaf {
            0x8000_0000 => CpuidValues { eax: 0x8000_0008, ..Default::default() },
            0x8000_0001 => CpuidValues { ecx: 1 << 2, ..Default::default() },
            _ => CpuidValues::default(),
        };
        assert!(SvmFeatures::from_cpuid(&old).unwrap_err().starts_with("SVM"));
    }
}
