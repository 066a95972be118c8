//! Preemption for AMD-V: the local APIC timer plus the INTR intercept, backed by an NMI watchdog.
//!
//! AMD-V has no equivalent of the VMX-preemption timer. Instead the vCPU arms the local APIC
//! timer (one-shot) before VMRUN; with `V_INTR_MASKING` set and the host's RFLAGS.IF = 1 at VMRUN,
//! a physical interrupt while the guest runs causes an INTR intercept (APM Vol. 2 §15.21.1 and
//! §15.13.1), whatever the guest's own RFLAGS.IF. After #VMEXIT the interrupt is held pending
//! (GIF = 0, then IF = 0); the vCPU stops the timer and opens a one-instruction interrupt window so
//! that the pending interrupt is accepted by `colo_svm_timer_interrupt`, which counts it and
//! sends the EOI. A guest that never exits is therefore bounded by the time slice.
//!
//! The NMI watchdog ([`NmiWatchdog`]) bounds a guest's run time independently of any RFLAGS.IF:
//! the 8254 PIT's channel 0 runs one-shot (mode 0) and its output, I/O APIC input 2 (the ISA
//! IRQ 0 override of PC platforms), is programmed with delivery mode NMI (82093AA data sheet
//! §3.2.4). The vCPU sets the NMI intercept (APM Vol. 2 §15.13.2), so the NMI ends the guest
//! with #VMEXIT(NMI); it is held pending while GIF = 0 and taken by the host right after STGI,
//! through the NMI gate installed here (`colo_svm_nmi`, which only counts it). NMIs are not
//! masked by RFLAGS.IF (APM Vol. 2 §8.2.3 and §15.17 "Global Interrupt Flag"), so this also
//! works where an implementation lets the guest's IF = 0 block physical interrupts despite
//! V_INTR_MASKING: Bochs 2.7 does (its VMRUN loads the guest's RFLAGS before it marks the CPU
//! as in guest mode, so IF going 1 -> 0 masks INTR for the whole guest run). The watchdog is
//! armed for twice the slice, so where the APIC timer works it is always first and the watchdog
//! is stopped before it fires.
//!
//! Local APIC registers: APM Vol. 2 §16.3 and §16.4 (Table 16-2). The legacy 8259 PICs are
//! remapped to vectors 0x20-0x2F and fully masked so that their IRQs (the PIT's IRQ 0 lands on
//! vector 8, #DF, under the BIOS mapping) never reach the host while it accepts interrupts.
//!
//! The gates are installed through `host::idt` ([`idt::set_interrupt_gate`],
//! [`idt::set_nmi_gate`]); the stubs below follow its [`idt::InterruptStub`] convention.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::host::{idt, time};

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
    pub const ID: usize = 0x020;
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
/// NMIs taken by the host so far (written by the NMI stub).
#[no_mangle]
static COLO_SVM_NMIS: AtomicU64 = AtomicU64::new(0);
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

    .balign 16
    .global colo_svm_nmi
colo_svm_nmi:
    lock incq COLO_SVM_NMIS(%rip)
    iretq
    "#,
    options(att_syntax)
);

extern "C" {
    /// Counts a timer interrupt and sends the EOI.
    fn colo_svm_timer_interrupt();
    /// Ignores a spurious interrupt (no EOI: APM Vol. 2 §16.4.7).
    fn colo_svm_spurious_interrupt();
    /// Counts an NMI (the watchdog's, or any other: the vCPU tells them apart by the exit).
    fn colo_svm_nmi();
}

/// The calibrated local APIC timer.
#[derive(Debug)]
pub struct ApicTimer {
    base: u64,
    /// APIC timer counts (at divide-by-16) measured over `tsc_measured` TSC ticks.
    apic_measured: u64,
    tsc_measured: u64,
}

impl ApicTimer {
    /// Enables the local APIC, masks the PICs, installs the gates and calibrates the timer
    /// against the TSC. Call once, with interrupts disabled.
    pub fn init() -> Result<Self, idt::GateError> {
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
        install_gates()?;
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
        Ok(timer)
    }

    /// This CPU's local APIC ID (xAPIC ID register bits 31:24, APM Vol. 2 §16.3.3).
    pub fn apic_id(&self) -> u8 {
        (self.read(reg::ID) >> 24) as u8
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

/// Installs the timer, APIC-spurious and PIC-spurious gates through `host::idt`.
fn install_gates() -> Result<(), idt::GateError> {
    idt::set_interrupt_gate(TIMER_VECTOR, colo_svm_timer_interrupt)?;
    for vector in [SPURIOUS_VECTOR, PIC_BASE + 7, PIC_BASE + 15] {
        idt::set_interrupt_gate(vector, colo_svm_spurious_interrupt)?;
    }
    Ok(())
}

/// NMIs the host has taken so far.
pub fn nmis() -> u64 {
    COLO_SVM_NMIS.load(Ordering::Relaxed)
}

/// The default I/O APIC (MP specification 1.4 §3.6.6; ACPI MADT on the platforms used here).
const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// I/O APIC input of the PIT (ISA IRQ 0 with the usual ACPI interrupt source override).
const IOAPIC_PIT_INPUT: u32 = 2;
/// Redirection entry: delivery mode NMI (0b100, bits 10:8); vector 0, physical destination,
/// active high, edge triggered, not masked (82093AA data sheet §3.2.4).
const REDIRECTION_NMI: u32 = 0b100 << 8;
/// 8254 input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Channel 0, low byte then high byte, mode 0 (interrupt on terminal count), binary.
const PIT_CH0_MODE0: u8 = 0x30;

/// The NMI watchdog: PIT channel 0 one-shot, through I/O APIC input 2 as an NMI.
#[derive(Debug)]
pub struct NmiWatchdog {
    _private: (),
}

impl NmiWatchdog {
    /// Installs the NMI gate, stops PIT channel 0 and routes its output to `apic_id` as an NMI.
    /// Call once, with interrupts disabled, after [`ApicTimer::init`].
    pub fn init(apic_id: u8) -> Result<Self, idt::GateError> {
        idt::set_nmi_gate(colo_svm_nmi)?;
        let watchdog = Self { _private: () };
        watchdog.disarm();
        // High dword first, so the entry is complete when the low dword unmasks it. An edge the
        // BIOS's periodic PIT left latched is delivered now, to the gate just installed.
        ioapic_write(0x10 + 2 * IOAPIC_PIT_INPUT + 1, u32::from(apic_id) << 24);
        ioapic_write(0x10 + 2 * IOAPIC_PIT_INPUT, REDIRECTION_NMI);
        Ok(watchdog)
    }

    /// Starts a one-shot NMI after about `tsc_ticks` TSC ticks (clamped to the 16-bit counter:
    /// at most about 55 ms).
    pub fn arm(&self, tsc_ticks: u64) {
        let per_ms = time::tsc_per_ms().max(1);
        let counts = u128::from(tsc_ticks) * u128::from(PIT_HZ) / (u128::from(per_ms) * 1000);
        let counts = counts.clamp(1, 0xFFFF) as u16;
        let [low, high] = counts.to_le_bytes();
        pit_write(0x43, PIT_CH0_MODE0);
        pit_write(0x40, low);
        pit_write(0x40, high);
    }

    /// Stops the count: writing the mode-0 control word holds OUT low until a count is written
    /// (8254 data sheet, mode 0).
    pub fn disarm(&self) {
        pit_write(0x43, PIT_CH0_MODE0);
    }
}

fn pit_write(port: u16, value: u8) {
    // SAFETY: ports 0x40 and 0x43 are PIT channel 0 and the PIT control register; channel 0 is
    // the watchdog's alone (boot calibration uses channel 2). Writing them only reprograms the
    // counter, whose output is routed to the NMI gate `NmiWatchdog::init` installed.
    unsafe { x86_64::instructions::port::Port::<u8>::new(port).write(value) }
}

fn ioapic_write(register: u32, value: u32) {
    // SAFETY: the I/O APIC's IOREGSEL (base) and IOWIN (base + 0x10) registers, identity-mapped
    // by the host page tables (the 32-bit MMIO hole); aligned 32-bit accesses as the 82093AA
    // requires. Only the PIT's redirection entry is written; nothing else programs the I/O APIC.
    unsafe {
        core::ptr::write_volatile(IOAPIC_BASE as usize as *mut u32, register);
        core::ptr::write_volatile((IOAPIC_BASE + 0x10) as usize as *mut u32, value);
    }
}
