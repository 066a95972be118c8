//! The VMX instructions, with their failure conventions (SDM Vol. 3C §31.2): CF=1 is
//! VMfailInvalid (no current VMCS), ZF=1 is VMfailValid with an error number in the VMCS.

use core::arch::asm;
use core::fmt;

use super::fields::VmcsField;

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_ZF: u64 = 1 << 6;

/// A failed VMX instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxFail {
    /// VMfailInvalid: no current VMCS (or VMXON itself failed).
    Invalid {
        /// The instruction.
        instruction: &'static str,
    },
    /// VMfailValid: the VM-instruction error field holds `error` (SDM §31.4, Table 31-1).
    Valid {
        /// The instruction.
        instruction: &'static str,
        /// The VM-instruction error number.
        error: u32,
    },
}

impl fmt::Display for VmxFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid { instruction } => write!(f, "{instruction} failed (VMfailInvalid)"),
            Self::Valid { instruction, error } => {
                write!(f, "{instruction} failed (VMfailValid, VM-instruction error {error})")
            }
        }
    }
}

fn check(instruction: &'static str, rflags: u64) -> Result<(), VmxFail> {
    if rflags & RFLAGS_CF != 0 {
        Err(VmxFail::Invalid { instruction })
    } else if rflags & RFLAGS_ZF != 0 {
        let error = vmread(VmcsField::VmInstructionError).unwrap_or(0) as u32;
        Err(VmxFail::Valid { instruction, error })
    } else {
        Ok(())
    }
}

/// VMXON with the region at physical `region`.
///
/// # Safety
/// CR4.VMXE is set, CR0/CR4 meet the fixed bits, and `region` is a 4 KiB-aligned, zeroed page
/// holding the VMCS revision identifier, owned by the caller for as long as VMX is on.
pub unsafe fn vmxon(region: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: the caller guarantees the preconditions above; the operand is a pointer to a
    // 64-bit physical address on our stack.
    unsafe { asm!("vmxon [{}]", "pushfq", "pop {}", in(reg) &region, lateout(reg) rflags) };
    check("VMXON", rflags)
}

/// VMCLEAR of the VMCS at physical `vmcs`.
///
/// # Safety
/// VMX is on and `vmcs` is a VMCS region owned by the caller.
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: as documented; the operand points to the address on our stack.
    unsafe { asm!("vmclear [{}]", "pushfq", "pop {}", in(reg) &vmcs, lateout(reg) rflags) };
    check("VMCLEAR", rflags)
}

/// VMPTRLD: makes the VMCS at physical `vmcs` current.
///
/// # Safety
/// VMX is on and `vmcs` is a cleared or launched VMCS region with the right revision.
pub unsafe fn vmptrld(vmcs: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: as documented; the operand points to the address on our stack.
    unsafe { asm!("vmptrld [{}]", "pushfq", "pop {}", in(reg) &vmcs, lateout(reg) rflags) };
    check("VMPTRLD", rflags)
}

/// Reads a field of the current VMCS.
pub fn vmread(field: VmcsField) -> Result<u64, VmxFail> {
    let value: u64;
    let rflags: u64;
    // SAFETY: VMREAD only reads the current VMCS; without one (or outside VMX operation, where it
    // is #UD — callers only use it with VMX on) it reports failure in RFLAGS.
    unsafe {
        asm!("vmread {}, {}", "pushfq", "pop {}", lateout(reg) value, in(reg) field.encoding() as u64,
            lateout(reg) rflags)
    };
    if rflags & (RFLAGS_CF | RFLAGS_ZF) != 0 {
        // Avoid recursing through `check` (which itself reads a field).
        return Err(VmxFail::Invalid { instruction: "VMREAD" });
    }
    Ok(value)
}

/// Writes a field of the current VMCS.
///
/// # Safety
/// The field's new value must keep the VMCS consistent with the hypervisor's use of it (host
/// state fields in particular decide where the CPU goes on the next VM exit).
pub unsafe fn vmwrite(field: VmcsField, value: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: the caller vouches for the value; VMWRITE itself only touches the current VMCS.
    unsafe {
        asm!("vmwrite {}, {}", "pushfq", "pop {}", in(reg) field.encoding() as u64, in(reg) value,
            lateout(reg) rflags)
    };
    check("VMWRITE", rflags)
}

/// INVEPT of `kind` (1 = single context for `eptp`, 2 = all contexts) (SDM §31.3).
///
/// # Safety
/// VMX is on and the CPU supports INVEPT of this kind.
pub unsafe fn invept(kind: u64, eptp: u64) -> Result<(), VmxFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    let rflags: u64;
    // SAFETY: as documented; the descriptor is a 128-bit value on our stack.
    unsafe { asm!("invept {}, [{}]", "pushfq", "pop {}", in(reg) kind, in(reg) &descriptor, lateout(reg) rflags) };
    check("INVEPT", rflags)
}

/// INVVPID of `kind` (2 = all contexts except VPID 0).
///
/// # Safety
/// VMX is on and the CPU supports INVVPID of this kind.
pub unsafe fn invvpid(kind: u64, vpid: u16) -> Result<(), VmxFail> {
    let descriptor: [u64; 2] = [vpid as u64, 0];
    let rflags: u64;
    // SAFETY: as documented; the descriptor is a 128-bit value on our stack.
    unsafe { asm!("invvpid {}, [{}]", "pushfq", "pop {}", in(reg) kind, in(reg) &descriptor, lateout(reg) rflags) };
    check("INVVPID", rflags)
}

/// Reads an MSR.
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only called for architectural VMX and host-state MSRs that exist on any CPU that
    // reports VMX (checked before use).
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR exists and the value is valid for it.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded with the caller's guarantee.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) }
}
