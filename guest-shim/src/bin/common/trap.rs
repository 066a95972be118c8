//! Shared by `guest-arch` and `guest-fuzz`: a guest IDT that records every exception (vector,
//! error code, RIP, DR6) instead of dying, and [`exec`], which runs a few instruction bytes with
//! chosen registers (optionally with RFLAGS.TF and a MOV SS shadow in front) and reports how they
//! ended: completed, or which exceptions were delivered and where.
//!
//! The bytes run from a scratch buffer laid out as `[prologue] INSN C3 [data]`: a fault resumes at
//! the `C3` (RET) after the instruction, and a single-step trap must report exactly that RET as its
//! RIP (a trap comes right after the instruction, SDM Vol. 3A §17.3.1.4).

use core::sync::atomic::{AtomicU64, Ordering};

/// How many exceptions one [`exec`] records.
pub const TRAP_LOG: usize = 4;

/// What the exception handler writes (layout used by the assembly below).
#[repr(C)]
pub struct TrapRecord {
    /// Exceptions since the last reset.
    pub count: AtomicU64,
    /// Where a fault resumes (0: report an unexpected exception and end the guest).
    pub recover: AtomicU64,
    /// (vector, error code, RIP, DR6) of the first [`TRAP_LOG`] exceptions.
    pub log: [[AtomicU64; 4]; TRAP_LOG],
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ENTRY: [AtomicU64; 4] = [ZERO; 4];

/// The handler's record.
#[no_mangle]
pub static COLO_TRAP: TrapRecord = TrapRecord { count: ZERO, recover: ZERO, log: [ENTRY; TRAP_LOG] };

core::arch::global_asm!(
    r#"
    .section .text.colo_trap, "ax"
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
colo_trap_stub_\v:
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    push 0
    .endif
    push \v
    jmp colo_trap_common
    .endr

    // Stack: [rsp] vector, +8 error code, +16 RIP, +24 CS, +32 RFLAGS, +40 RSP, +48 SS.
colo_trap_common:
    push rax
    push rbx
    push rcx
    lea rbx, [rip + COLO_TRAP]
    mov rcx, [rbx]
    cmp rcx, {log}
    jae 1f
    shl rcx, 5
    lea rcx, [rbx + rcx + 16]
    mov rax, [rsp + 24]
    mov [rcx], rax
    mov rax, [rsp + 32]
    mov [rcx + 8], rax
    mov rax, [rsp + 40]
    mov [rcx + 16], rax
    mov rax, dr6
    mov [rcx + 24], rax
1:
    mov eax, 0xFFFF0FF0
    mov dr6, rax
    inc qword ptr [rbx]
    // No more single steps: the handler is done with them.
    and qword ptr [rsp + 56], -257
    mov rax, [rsp + 24]
    cmp rax, 1
    je 2f
    cmp rax, 3
    je 2f
    // A fault (or an abort): resume at the recovery point, or report it.
    mov rax, [rbx + 8]
    test rax, rax
    jnz 3f
    lea rax, [rip + colo_trap_unexpected]
3:
    mov [rsp + 40], rax
2:
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata.colo_trap, "a"
    .balign 8
    .global colo_trap_stubs
colo_trap_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad colo_trap_stub_\v
    .endr

    // colo_exec(regs: *mut Regs, code: u64): loads the registers (and the arithmetic flags) from
    // `regs`, calls `code`, stores them back with RFLAGS, and returns with RFLAGS = 2.
    .section .text.colo_exec, "ax"
    .global colo_exec
colo_exec:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    push rsi
    push qword ptr [rdi + 120]
    popfq
    mov rax, [rdi + 0]
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 56]
    mov r9, [rdi + 64]
    mov r10, [rdi + 72]
    mov r11, [rdi + 80]
    mov r12, [rdi + 88]
    mov r13, [rdi + 96]
    mov r14, [rdi + 104]
    mov r15, [rdi + 112]
    mov rdi, [rdi + 40]
    call [rsp]
    push rdi
    mov rdi, [rsp + 16]
    mov [rdi + 0], rax
    mov [rdi + 8], rbx
    mov [rdi + 16], rcx
    mov [rdi + 24], rdx
    mov [rdi + 32], rsi
    mov [rdi + 48], rbp
    mov [rdi + 56], r8
    mov [rdi + 64], r9
    mov [rdi + 72], r10
    mov [rdi + 80], r11
    mov [rdi + 88], r12
    mov [rdi + 96], r13
    mov [rdi + 104], r14
    mov [rdi + 112], r15
    pop rax
    mov [rdi + 40], rax
    pushfq
    pop rax
    mov [rdi + 120], rax
    push 2
    popfq
    pop rsi
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    "#,
    log = const TRAP_LOG,
);

extern "C" {
    static colo_trap_stubs: [u64; 32];
    fn colo_exec(regs: *mut Regs, code: u64);
}

#[no_mangle]
extern "C" fn colo_trap_unexpected() -> ! {
    let e = &COLO_TRAP.log[0];
    guest_shim::println!(
        "UNEXPECTED exception {} (error {:#x}) at {:#x} outside a probe",
        e[0].load(Ordering::Relaxed),
        e[1].load(Ordering::Relaxed),
        e[2].load(Ordering::Relaxed)
    );
    guest_shim::rt::shutdown(99)
}

#[repr(C, align(16))]
struct Idt([u64; 64]);

static mut IDT: Idt = Idt([0; 64]);

/// Installs the IDT: 32 interrupt gates (type 0xE, DPL 0) in the boot GDT's code segment.
pub fn install() {
    let idt = core::ptr::addr_of_mut!(IDT);
    // SAFETY: `colo_trap_stubs` is the constant table above.
    let stubs = unsafe { &colo_trap_stubs };
    for (v, &handler) in stubs.iter().enumerate() {
        let low = (handler & 0xFFFF)
            | (u64::from(guest_shim::abi::GUEST_CODE_SELECTOR) << 16)
            | (0x8E << 40)
            | ((handler >> 16) & 0xFFFF) << 48;
        // SAFETY: single-threaded guest; the CPU reads the IDT only on exceptions.
        unsafe {
            (*idt).0[2 * v] = low;
            (*idt).0[2 * v + 1] = handler >> 32;
        }
    }
    let pointer: [u16; 5] = {
        let base = idt as u64;
        [16 * 32 - 1, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16]
    };
    // SAFETY: the IDT above is complete and lives for the whole guest.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) pointer.as_ptr()) };
}

/// General-purpose registers (the layout `colo_exec` uses) and RFLAGS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rflags: u64,
}

/// The arithmetic flags (CF, PF, AF, ZF, SF, OF) a probe may set and compare.
pub const ARITHMETIC_FLAGS: u64 = 0x8D5;

/// One delivered exception.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trap {
    /// The vector.
    pub vector: u8,
    /// The error code (0 for vectors without one).
    pub error: u64,
    /// The RIP the CPU pushed.
    pub rip: u64,
    /// DR6 when the handler ran.
    pub dr6: u64,
}

/// How a probe ended.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ended {
    /// Exceptions delivered, in order (at most [`TRAP_LOG`]).
    pub traps: [Trap; TRAP_LOG],
    /// How many.
    pub count: usize,
    /// The address right after the instruction (the RET a trap must point at).
    pub after: u64,
}

impl Ended {
    /// The delivered exceptions.
    pub fn traps(&self) -> &[Trap] {
        &self.traps[..self.count.min(TRAP_LOG)]
    }

    /// True when exactly one single-step #DB came right after the instruction, with DR6.BS.
    pub fn single_step_right_after(&self) -> bool {
        self.count == 1
            && self.traps[0].vector == 1
            && self.traps[0].rip == self.after
            && self.traps[0].dr6 & (1 << 14) != 0
    }

    /// The first fault's vector, if any exception other than #DB came.
    pub fn fault(&self) -> Option<u8> {
        self.traps().iter().find(|t| t.vector != 1).map(|t| t.vector)
    }
}

/// What runs in front of the instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing.
    Plain,
    /// POPF sets TF right before it.
    SingleStep,
    /// POPF sets TF, then MOV SS (a shadow that holds the first single-step trap back).
    MovSsShadow,
}

#[repr(C, align(64))]
struct Scratch([u8; 128]);

static mut SCRATCH: Scratch = Scratch([0; 128]);

/// Runs `insn` once with `regs` in `mode`; `regs` comes back as the instruction left them.
pub fn exec(insn: &[u8], regs: &mut Regs, mode: Mode) -> Ended {
    assert!(insn.len() <= 32);
    let buf = core::ptr::addr_of_mut!(SCRATCH);
    // SAFETY: single-threaded guest; the buffer is only executed by `colo_exec` below.
    let code = unsafe { &mut (*buf).0 };
    let base = code.as_ptr() as u64;
    let mut n = 0;
    let mut put = |bytes: &[u8], n: &mut usize| {
        code[*n..*n + bytes.len()].copy_from_slice(bytes);
        *n += bytes.len();
    };
    if mode != Mode::Plain {
        // pushfq; or qword ptr [rsp], 0x100; popfq
        put(&[0x9C, 0x48, 0x81, 0x0C, 0x24, 0x00, 0x01, 0x00, 0x00, 0x9D], &mut n);
    }
    if mode == Mode::MovSsShadow {
        // mov ss, word ptr [rip + disp32]: the selector word sits at offset 120.
        let next = n + 6;
        let disp = (120 - next as i32).to_le_bytes();
        put(&[0x8E, 0x15, disp[0], disp[1], disp[2], disp[3]], &mut n);
    }
    put(insn, &mut n);
    let after = base + n as u64;
    put(&[0xC3], &mut n);
    code[120..122].copy_from_slice(&guest_shim::abi::GUEST_DATA_SELECTOR.to_le_bytes());
    COLO_TRAP.count.store(0, Ordering::Relaxed);
    COLO_TRAP.recover.store(after, Ordering::Relaxed);
    regs.rflags = (regs.rflags & ARITHMETIC_FLAGS) | 2;
    // SAFETY: the buffer holds the instruction and a RET; every exception it raises resumes at
    // that RET through the handler (faults) or returns after it (traps), so `colo_exec` always
    // returns; the registers are saved and restored by `colo_exec`.
    unsafe { colo_exec(regs, base) };
    COLO_TRAP.recover.store(0, Ordering::Relaxed);
    let count = COLO_TRAP.count.load(Ordering::Relaxed) as usize;
    let mut ended = Ended { count, after, ..Ended::default() };
    for (out, e) in ended.traps.iter_mut().zip(&COLO_TRAP.log).take(count) {
        *out = Trap {
            vector: e[0].load(Ordering::Relaxed) as u8,
            error: e[1].load(Ordering::Relaxed),
            rip: e[2].load(Ordering::Relaxed),
            dr6: e[3].load(Ordering::Relaxed),
        };
    }
    ended
}

/// The hypercall instruction of this backend.
pub fn hypercall_bytes() -> [u8; 3] {
    if guest_shim::rt::HYPERCALL_INSN.load(core::sync::atomic::Ordering::Relaxed)
        == guest_shim::abi::HypercallInsn::Vmmcall as u32
    {
        [0x0F, 0x01, 0xD9]
    } else {
        [0x0F, 0x01, 0xC1]
    }
}

/// True on AMD-V (hypercalls are VMMCALL).
pub fn is_amd() -> bool {
    hypercall_bytes()[2] == 0xD9
}
