//! Exception handling: the IDT, its entry stubs, and the report printed for an exception.
//!
//! Each of the 32 architectural vectors has a 16-byte assembly stub that pushes a zero where the
//! CPU pushes no error code (Intel SDM Vol. 3A §6.13, Table 6-1 lists which vectors have one),
//! then the vector number, and jumps to a common routine that saves every general register and
//! calls [`exception_dispatch`]. An exception in the hypervisor itself is a bug: the report names
//! the vector, error code, RIP, CR2 and all registers, then the machine stops with a failure.
//!
//! Other code installs its own interrupt handlers with [`set_interrupt_gate`] (vectors 32-255)
//! and [`set_nmi_gate`], never by writing the table itself; the handler convention is
//! [`InterruptStub`].

use core::fmt::Write;
use core::mem::{offset_of, size_of};

use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::gdt::{self, IST_DOUBLE_FAULT, IST_GENERAL, IST_MACHINE_CHECK, IST_NMI};
use super::{cpu, serial, shutdown};

const STUB_SIZE: usize = 16;

core::arch::global_asm!(
    r#"
    .section .text.exceptions, "ax"
    .balign 16
    .global colo_exception_stubs
colo_exception_stubs:
    // Vectors with a CPU-pushed error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX.
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\vector == 8) || (\vector == 10) || (\vector == 11) || (\vector == 12) || (\vector == 13) || (\vector == 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
    .else
    pushq $0
    .endif
    pushq $\vector
    jmp colo_exception_common
    .endr

colo_exception_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call colo_exception_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    "#,
    options(att_syntax)
);

extern "C" {
    /// The first of 32 stubs, each `STUB_SIZE` bytes apart.
    static colo_exception_stubs: u8;
}

/// What the stubs and the CPU leave on the stack, lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Pushed by the stub.
    pub vector: u64,
    /// Pushed by the CPU, or zero pushed by the stub.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// The layout the assembly above builds: 15 registers, then vector and error code, then the
// CPU's five-word interrupt frame (SDM Vol. 3A §6.14.1, Figure 6-9).
const _: () = assert!(offset_of!(ExceptionFrame, rax) == 14 * 8);
const _: () = assert!(offset_of!(ExceptionFrame, vector) == 15 * 8);
const _: () = assert!(offset_of!(ExceptionFrame, rip) == 17 * 8);
const _: () = assert!(size_of::<ExceptionFrame>() == 22 * 8);

/// A 64-bit IDT gate descriptor (SDM Vol. 3A §6.14.1, Figure 6-8).
#[repr(C)]
#[derive(Clone, Copy)]
struct IdtGate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(size_of::<IdtGate>() == 16);

/// Present, DPL 0, 64-bit interrupt gate (type 0xE): IF is cleared on entry.
const INTERRUPT_GATE: u8 = 0x8E;

impl IdtGate {
    const MISSING: Self =
        Self { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    fn new(handler: u64, selector: u16, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector,
            ist,
            type_attr: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([IdtGate; 256]);

/// Written once by [`init`] before `lidt`, then only read by the CPU.
static mut IDT: Idt = Idt([IdtGate::MISSING; 256]);

/// Fills the 32 exception gates and loads the IDT. Needs [`gdt::init`] first.
pub fn init() {
    let code = gdt::selectors().expect("gdt::init runs before idt::init").code.0;
    let stubs = (&raw const colo_exception_stubs) as u64;
    let mut table = Idt([IdtGate::MISSING; 256]);
    for vector in 0..32u8 {
        let ist = match vector {
            2 => IST_NMI,
            8 => IST_DOUBLE_FAULT,
            18 => IST_MACHINE_CHECK,
            _ => IST_GENERAL,
        };
        table.0[vector as usize] = IdtGate::new(stubs + vector as u64 * STUB_SIZE as u64, code, ist);
    }
    // SAFETY: single CPU, interrupts are off at boot and the IDT is written before `lidt` makes
    // the CPU read it; no reference to the static exists.
    unsafe { (&raw mut IDT).write(table) };
    let pointer =
        DescriptorTablePointer { limit: (size_of::<Idt>() - 1) as u16, base: VirtAddr::new((&raw const IDT) as u64) };
    // SAFETY: the IDT is 'static, fully initialised, and every present gate points at a stub
    // above that runs on an IST stack and ends in `iretq` with the frame it was given.
    unsafe { lidt(&pointer) };
    LOADED.store(true, core::sync::atomic::Ordering::Release);
}

/// Why [`set_interrupt_gate`] or [`set_nmi_gate`] refused a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateError {
    /// Vectors 0-31 are the architectural exceptions, owned by the stubs above (NMI only through
    /// [`set_nmi_gate`]).
    ExceptionVector(u8),
    /// [`init`] has not loaded the IDT yet.
    NotLoaded,
}

impl core::fmt::Display for GateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::ExceptionVector(v) => write!(f, "vector {v:#x} is an exception vector owned by host::idt"),
            Self::NotLoaded => write!(f, "the IDT is not loaded yet (host::idt::init)"),
        }
    }
}

/// Whether [`init`] has loaded [`IDT`].
static LOADED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// An interrupt handler for [`set_interrupt_gate`] / [`set_nmi_gate`].
///
/// Stub convention: the address of an assembly routine entered through a 64-bit interrupt gate
/// (IF = 0 on entry) on the gate's IST stack, with the CPU's five-word frame and no error code
/// (vectors 32-255 and NMI push none: SDM Vol. 3A §6.14.1-6.14.2). It must preserve every register
/// and end in `iretq`; it must not touch the interrupted stack (IST, so the red zone is safe).
pub type InterruptStub = unsafe extern "C" fn();

/// Installs `handler` for external-interrupt `vector` (32-255) on the general IST stack, in the
/// loaded IDT. Call with interrupts disabled, before the source of `vector` is enabled.
pub fn set_interrupt_gate(vector: u8, handler: InterruptStub) -> Result<(), GateError> {
    if vector < 32 {
        return Err(GateError::ExceptionVector(vector));
    }
    write_gate(vector, handler, IST_GENERAL)
}

/// Replaces the NMI gate (vector 2; by default the fatal exception report) with `handler`, on the
/// NMI IST stack. For an NMI source the hypervisor owns (the SVM preemption watchdog).
pub fn set_nmi_gate(handler: InterruptStub) -> Result<(), GateError> {
    write_gate(2, handler, IST_NMI)
}

fn write_gate(vector: u8, handler: InterruptStub, ist: u8) -> Result<(), GateError> {
    if !LOADED.load(core::sync::atomic::Ordering::Acquire) {
        return Err(GateError::NotLoaded);
    }
    let code = gdt::selectors().ok_or(GateError::NotLoaded)?.code.0;
    let gate = IdtGate::new(handler as usize as u64, code, ist);
    let entry = (&raw mut IDT).cast::<IdtGate>().wrapping_add(usize::from(vector));
    // SAFETY: `IDT` is the 'static 256-gate table `init` loaded (LOADED), so `entry` is inside
    // it; no Rust reference to the static exists. Single CPU; callers run with interrupts
    // disabled and before the vector's source is enabled, so the CPU does not read this gate
    // while the 16 bytes are stored; the new gate is a valid present interrupt gate to a stub
    // following the [`InterruptStub`] convention.
    unsafe { entry.write_volatile(gate) };
    Ok(())
}

/// The architectural name of an exception vector.
pub fn vector_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD exception",
        "#VE virtualization exception",
        "#CP control protection",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV hypervisor injection",
        "#VC VMM communication",
        "#SX security exception",
        "reserved",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("unknown")
}

/// Called by the common stub with the saved frame. Every exception in the hypervisor is fatal.
#[no_mangle]
extern "C" fn colo_exception_dispatch(frame: &mut ExceptionFrame) {
    let cr = cpu::control_registers();
    let mut out = serial::emergency_writer();
    let f = &*frame;
    let _ = writeln!(
        out,
        "\nEXCEPTION: vector={} ({}) error_code={:#x} rip={:#018x} cr2={:#018x}",
        f.vector,
        vector_name(f.vector),
        f.error_code,
        f.rip,
        cr.cr2
    );
    let _ = writeln!(out, "  cs={:#06x} ss={:#06x} rflags={:#018x} rsp={:#018x}", f.cs, f.ss, f.rflags, f.rsp);
    let _ = writeln!(out, "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", f.rax, f.rbx, f.rcx, f.rdx);
    let _ = writeln!(out, "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}", f.rsi, f.rdi, f.rbp, f.r8);
    let _ = writeln!(out, "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}", f.r9, f.r10, f.r11, f.r12);
    let _ = writeln!(out, "  r13={:#018x} r14={:#018x} r15={:#018x}", f.r13, f.r14, f.r15);
    let _ = writeln!(out, "  cr0={:#018x} cr3={:#018x} cr4={:#018x} efer={:#018x}", cr.cr0, cr.cr3, cr.cr4, cr.efer);
    crate::vmx::panic_dump(&mut out);
    shutdown::exit(shutdown::ExitStatus::Failure)
}
