//! Preemption for AMD-V: the local APIC timer plus the INTR intercept.
//!
//! AMD-V has no equivalent of the VMX-preemption timer. Instead the vCPU arms the local APIC
//! timer (one-shot) before VMRUN; with `V_INTR_MASKING` set and the host's RFLAGS.IF = 1 at VMRUN,
//! a physical interrupt while the guest runs causes an INTR intercept (APM Vol. 2 §15.21.1 and
//! §15.13.1), whatever the guest's own RFLAGS.IF. After #VMEXIT the interrupt is held pending
//! (GIF = 0, then IF = 0); the vCPU stops the timer and opens a one-instruction interrupt window so
//! that the pending interrupt is accepted by [`colo_svm_timer_interrupt`], which counts it and
//! sends the EOI. A guest that never exits is therefore bounded by the time slice.
//!
//! Local APIC registers: APM Vol. 2 §16.3 and §16.4 (Table 16-2). The legacy 8259 PICs are
//! remapped to vectors 0x20-0x2F and fully masked so that their IRQs (the PIT's IRQ 0 lands on
//! vector 8, #DF, under the BIOS mapping) never reach the host while it accepts interrupts.
//!
//! The host IDT (`host::idt`) fills only the 32 exception vectors; the gates for the vectors used
//! here are written into the loaded IDT (found with SIDT) by [`init`].

use core::sync::atomic::{AtomicU64, Ordering};

use crate::host::{gdt, time};

/// The timer's interrupt vector.
pub const TIMER_VECTOR: u8 = 0xF0;
/// The local APIC spurious-interrupt vector (low nibble all ones, as older APICs require).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Where the 8259 PICs are moved (only their spurious IRQ 7 / IRQ 15 can ever arrive).
const PIC_BASE: u8 = 0x20;

/// IA32_APIC_BASE.
const MSR_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;

mod reg {
    pub const TPR: usize = 0x080;
    pub const EOI: usize = 0x0B0;
    pub const SVR: usize = 0x0F0;
    pub const LVT_TIMER: usize = 0x320;
    pub const INITIAL_COUNT: usize = 0x380;
    pub const CURRENT_COUNT: usize = 0x390;
    pub const DIVIDE_CONFIG: usize = 0x3E0;
}
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration 0b0011: divide by 16.
const DIVIDE_BY_16: u32 = 0b0011;

/// Timer interrupts accepted so far (written by the interrupt stub).
#[no_mangle]
static COLO_SVM_TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// The linear address of the local APIC's EOI register (read by the interrupt stub).
#[no_mangle]
static COLO_SVM_APIC_EOI: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .text.svm_timer, "ax"
    .balign 16
    .global colo_svm_timer_interrupt
colo_svm_timer_interrupt:
    pushq %rax
    lock incq COLO_SVM_TIMER_TICKS(%rip)
    movq COLO_SVM_APIC_EOI(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .balign 16
    .global colo_svm_spurious_interrupt
colo_svm_spurious_interrupt:
    iretq
    "#,
    options(att_syntax)
);

extern "C" {
    /// Counts a timer interrupt and sends the EOI.
    fn colo_svm_timer_interrupt();
    /// Ignores a spurious interrupt (no EOI: APM Vol. 2 §16.4.7).
    fn colo_svm_spurious_interrupt();
}

/// The calibrated local APIC timer.
#[derive(Debug)]
pub struct ApicTimer {
    base: u64,
    /// APIC timer counts (at divide-by-16) measured over `tsc_measured` TSC ticks.
    apic_measured: u64,
    tsc_measured: u64,
}

/// A 64-bit interrupt gate, as in `host::idt` (AMD APM Vol. 2 §4.8.4, Figure 4-24).
fn gate(handler: u64, selector: u16, ist: u8) -> [u64; 2] {
    let low = (handler & 0xFFFF)
        | (u64::from(selector) << 16)
        | (u64::from(ist) << 32)
        | (0x8E << 40)
        | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

impl ApicTimer {
    /// Enables the local APIC, masks the PICs, installs the gates and calibrates the timer
    /// against the TSC. Call once, with interrupts disabled.
    pub fn init() -> Self {
        // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; setting the global enable bit keeps
        // the default base and touches nothing else.
        let apic_base = unsafe {
            let mut msr = x86_64::registers::model_specific::Msr::new(MSR_APIC_BASE);
            let value = msr.read();
            if value & APIC_BASE_ENABLE == 0 {
                msr.write(value | APIC_BASE_ENABLE);
            }
            value & 0x000F_FFFF_FFFF_F000
        };
        mask_pics();
        install_gates();
        COLO_SVM_APIC_EOI.store(apic_base + reg::EOI as u64, Ordering::Relaxed);
        let mut timer = Self { base: apic_base, apic_measured: 1, tsc_measured: 1 };
        timer.write(reg::TPR, 0);
        timer.write(reg::SVR, (1 << 8) | u32::from(SPURIOUS_VECTOR));
        timer.write(reg::DIVIDE_CONFIG, DIVIDE_BY_16);
        timer.write(reg::LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
        // Calibrate: let the (masked) timer count down for 2 ms of TSC time.
        timer.write(reg::INITIAL_COUNT, u32::MAX);
        let t0 = time::rdtsc();
        time::delay_ms(2);
        let left = timer.read(reg::CURRENT_COUNT);
        let t1 = time::rdtsc();
        timer.write(reg::INITIAL_COUNT, 0);
        timer.apic_measured = u64::from(u32::MAX - left).max(1);
        timer.tsc_measured = (t1 - t0).max(1);
        timer
    }

    /// The local APIC's physical base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// APIC timer counts per million TSC ticks, for the log.
    pub fn counts_per_million_tsc(&self) -> u64 {
        (u128::from(self.apic_measured) * 1_000_000 / u128::from(self.tsc_measured)) as u64
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: `base` is the local APIC's MMIO page, identity-mapped by the host page tables
        // (which cover the 32-bit MMIO hole); `offset` is one of the architectural registers and
        // the access is an aligned 32-bit store, as the APIC requires.
        unsafe { core::ptr::write_volatile((self.base as usize + offset) as *mut u32, value) }
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: as in `write`, an aligned 32-bit load of an architectural register.
        unsafe { core::ptr::read_volatile((self.base as usize + offset) as *const u32) }
    }

    /// Arms a one-shot interrupt after about `tsc_ticks` TSC ticks (at least one APIC count).
    pub fn arm(&self, tsc_ticks: u64) {
        let counts = u128::from(tsc_ticks) * u128::from(self.apic_measured) / u128::from(self.tsc_measured);
        let counts = counts.clamp(1, u128::from(u32::MAX)) as u32;
        self.write(reg::LVT_TIMER, u32::from(TIMER_VECTOR));
        self.write(reg::INITIAL_COUNT, counts);
    }

    /// Stops the timer. A count that already expired stays pending until [`Self::drain`].
    pub fn disarm(&self) {
        self.write(reg::INITIAL_COUNT, 0);
    }

    /// Accepts interrupts held pending while the guest ran (one instruction with IF = 1); returns
    /// how many timer interrupts have been accepted in total.
    pub fn drain() -> u64 {
        // SAFETY: the only interrupts that can be pending are the APIC timer and spurious vectors,
        // whose gates `init` installed on an IST stack (so the red zone of this function is not
        // touched); both handlers preserve every register and return with IRETQ.
        unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
        ticks()
    }
}

/// Timer interrupts accepted so far.
pub fn ticks() -> u64 {
    COLO_SVM_TIMER_TICKS.load(Ordering::Relaxed)
}

/// Remaps both 8259 PICs to `PIC_BASE` and masks every IRQ (the initialisation sequence of the
/// 8259A data sheet: ICW1-ICW4, then OCW1).
fn mask_pics() {
    use x86_64::instructions::port::Port;
    let mut master_cmd = Port::<u8>::new(0x20);
    let mut master_data = Port::<u8>::new(0x21);
    let mut slave_cmd = Port::<u8>::new(0xA0);
    let mut slave_data = Port::<u8>::new(0xA1);
    // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the PC's two PICs, which nothing else in the
    // hypervisor programs; interrupts are disabled during the sequence.
    unsafe {
        master_cmd.write(0x11);
        slave_cmd.write(0x11);
        master_data.write(PIC_BASE);
        slave_data.write(PIC_BASE + 8);
        master_data.write(0x04);
        slave_data.write(0x02);
        master_data.write(0x01);
        slave_data.write(0x01);
        master_data.write(0xFF);
        slave_data.write(0xFF);
    }
}

/// Writes the timer, APIC-spurious and PIC-spurious gates into the loaded IDT.
fn install_gates() {
    let mut idtr = x86_64::structures::DescriptorTablePointer { limit: 0, base: x86_64::VirtAddr::zero() };
    // SAFETY: SIDT only stores the IDTR into the given 10-byte structure.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) &mut idtr, options(nostack, preserves_flags)) };
    let code = gdt::selectors().expect("gdt::init runs before the SVM backend").code.0;
    let timer = colo_svm_timer_interrupt as *const () as u64;
    let spurious = colo_svm_spurious_interrupt as *const () as u64;
    for (vector, handler) in
        [(TIMER_VECTOR, timer), (SPURIOUS_VECTOR, spurious), (PIC_BASE + 7, spurious), (PIC_BASE + 15, spurious)]
    {
        let offset = u64::from(vector) * 16;
        assert!(offset + 15 <= u64::from(idtr.limit), "IDT too short for vector {vector:#x}");
        let entry = (idtr.base.as_u64() + offset) as *mut [u64; 2];
        // SAFETY: the IDT is the 256-gate 'static table `host::idt::init` loaded (its limit was
        // checked above); these vectors are otherwise unused (not-present gates), interrupts are
        // off, and a 16-byte store of a valid gate leaves the table consistent for the CPU.
        unsafe { entry.write_volatile(gate(handler, code, gdt::IST_GENERAL)) };
    }
}
