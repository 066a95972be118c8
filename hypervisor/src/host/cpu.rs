//! Small CPU helpers: control registers for reports, CPUID, halting.

use core::arch::x86_64::{__cpuid_count, CpuidResult};

/// CPUID with a sub-leaf.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

/// The CPU vendor string ("GenuineIntel", "AuthenticAMD").
pub fn vendor() -> [u8; 12] {
    let r = cpuid(0, 0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// Control registers and EFER, for exception and panic reports.
#[derive(Clone, Copy, Debug)]
pub struct ControlRegisters {
    /// CR0.
    pub cr0: u64,
    /// CR2: the faulting linear address of the last page fault.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// Reads CR0, CR2, CR3, CR4 and EFER.
pub fn control_registers() -> ControlRegisters {
    use x86_64::registers::control::{Cr0, Cr2, Cr3, Cr4};
    use x86_64::registers::model_specific::Efer;
    ControlRegisters {
        cr0: Cr0::read_raw(),
        cr2: Cr2::read_raw(),
        cr3: Cr3::read_raw().0.start_address().as_u64(),
        cr4: Cr4::read_raw(),
        efer: Efer::read_raw(),
    }
}

/// Stops this CPU for good: interrupts off, then `hlt` forever.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Masks every line of both legacy 8259 PICs. The hypervisor polls its devices; an unmasked PIC
/// would raise interrupts that VM exits acknowledge and nothing would end (no EOI).
pub fn mask_legacy_pic() {
    use x86_64::instructions::port::Port;
    // SAFETY: 0x21 and 0xA1 are the PICs' interrupt-mask registers; masking all lines only stops
    // interrupts the hypervisor never handles.
    unsafe {
        Port::<u8>::new(0x21).write(0xFF);
        Port::<u8>::new(0xA1).write(0xFF);
    }
}
