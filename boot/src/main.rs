//! The bootable kernel binary.
//!
//! GRUB loads this ELF at 2 MiB and enters `_start` in 32-bit protected mode with paging off,
//! EAX = the multiboot2 magic and EBX = the physical address of the boot information
//! (Multiboot2 spec §3.3, "I386 machine state"). The stub below builds a 4 GiB identity map with
//! 2 MiB pages, enables PAE, long mode, NX and SSE (the precompiled `core` uses SSE), loads a
//! 64-bit GDT and calls [`kernel_main`], which parses the boot information with the `multiboot2`
//! crate and hands it to `hypervisor::kernel::run`.
#![no_std]
#![no_main]

use core::fmt::Write;

// Links the C memory functions and `rust_eh_personality` a freestanding binary needs.
use guest_shim as _;

use hypervisor::host::{heap, serial, shutdown};
use hypervisor::kernel::{BootInfo, BootModule};
use hypervisor::memory::PhysRange;
use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

/// The value GRUB leaves in EAX for a multiboot2 kernel.
const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36D7_6289;

core::arch::global_asm!(
    r#"
    .set MB2_MAGIC, 0xE85250D6
    .set MB2_ARCH_I386, 0

    .section .multiboot2_header, "a"
    .balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH_I386 + (mb2_header_end - mb2_header_start))
    // End tag.
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl $boot_stack_top, %esp
    movl %eax, %edi
    movl %ebx, %esi

    // Long mode (CPUID 0x80000001 EDX bit 29) is required; say so on COM1 if it is missing.
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb no_long_mode
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 29), %edx
    jz no_long_mode
    movl %edx, %ebp

    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages: identity 0..4 GiB.
    movl $boot_pdpt, %eax
    orl $3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $3, %eax
    movl %eax, boot_pdpt
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 8
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 16
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 24
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %ecx, %edx
    shrl $11, %edx
    movl %eax, boot_pd(,%ecx,8)
    movl %edx, boot_pd + 4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b

    // CR4: PAE | OSFXSR | OSXMMEXCPT.
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3

    // EFER: LME, plus NXE where CPUID 0x80000001 EDX bit 20 says NX exists.
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    testl $(1 << 20), %ebp
    jz 2f
    orl $(1 << 11), %eax
2:
    wrmsr

    // CR0: PG | PE | MP, with EM and TS clear so SSE instructions run.
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax
    orl $((1 << 31) | (1 << 1) | 1), %eax
    movl %eax, %cr0

    lgdt boot_gdt_pointer
    ljmpl $0x08, $long_mode_entry

no_long_mode:
    movl $no_long_mode_message, %esi
3:
    movb (%esi), %al
    testb %al, %al
    jz 4f
    movw $0x3F8, %dx
    outb %al, %dx
    incl %esi
    jmp 3b
4:
    hlt
    jmp 4b

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    // The upper halves of 64-bit registers are undefined after the mode switch.
    movl %edi, %edi
    movl %esi, %esi
    xorl %ebp, %ebp
    fninit
    call kernel_main
5:
    hlt
    jmp 5b

    .section .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
boot_gdt_pointer:
    .short boot_gdt_pointer - boot_gdt - 1
    .long boot_gdt
no_long_mode_message:
    .asciz "COLO: this CPU has no 64-bit long mode; stopping.\n"

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
boot_stack:
    .skip 64 * 1024
boot_stack_top:
    "#,
    options(att_syntax)
);

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

#[global_allocator]
static ALLOCATOR: linked_list_allocator_shim::Heap = linked_list_allocator_shim::Heap;

/// Forwards the global allocator to the hypervisor's heap, which owns its memory.
mod linked_list_allocator_shim {
    use core::alloc::{GlobalAlloc, Layout};

    /// The kernel's global allocator.
    #[derive(Debug)]
    pub struct Heap;

    // SAFETY: both methods forward to `LockedHeap`, a correct `GlobalAlloc`.
    unsafe impl GlobalAlloc for Heap {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { hypervisor::host::heap::HEAP.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { hypervisor::host::heap::HEAP.dealloc(ptr, layout) }
        }
    }
}

/// The 64-bit entry, called by the boot stub with the loader's EAX and EBX.
#[no_mangle]
extern "C" fn kernel_main(magic: u32, info_address: u32) -> ! {
    serial::init();
    if magic != MULTIBOOT2_BOOTLOADER_MAGIC {
        fatal(format_args!(
            "not booted by a multiboot2 loader: EAX={magic:#x}, expected {MULTIBOOT2_BOOTLOADER_MAGIC:#x}"
        ));
    }
    // SAFETY: a multiboot2 loader left a valid boot information structure at EBX, identity-mapped
    // by the boot stub, and nothing writes to it while we read it.
    let info = match unsafe { BootInformation::load(info_address as usize as *const BootInformationHeader) } {
        Ok(info) => info,
        Err(err) => fatal(format_args!("multiboot2 boot information at {info_address:#x} is malformed: {err:?}")),
    };
    let mut boot = BootInfo {
        loader: info.boot_loader_name_tag().and_then(|t| t.name().ok()).unwrap_or("unknown"),
        cmdline: info.command_line_tag().and_then(|t| t.cmdline().ok()).unwrap_or(""),
        available: heapless::Vec::new(),
        reserved: heapless::Vec::new(),
        kernel_image: PhysRange { start: (&raw const __kernel_start) as u64, end: (&raw const __kernel_end) as u64 },
        modules: heapless::Vec::new(),
    };
    let Some(memory_map) = info.memory_map_tag() else {
        fatal(format_args!("the boot loader passed no memory map (multiboot2 tag 6)"));
    };
    for area in memory_map.memory_areas() {
        if area.typ() == MemoryAreaType::Available {
            let range = PhysRange { start: area.start_address(), end: area.end_address() };
            if boot.available.push(range).is_err() {
                log_dropped("memory range", range);
            }
        }
    }
    let info_range = PhysRange { start: info.start_address() as u64, end: info.end_address() as u64 };
    let _ = boot.reserved.push(info_range);
    for module in info.module_tags() {
        let range = PhysRange { start: module.start_address().into(), end: module.end_address().into() };
        let _ = boot.reserved.push(range);
        let cmdline = module.cmdline().unwrap_or("");
        if boot.modules.push(BootModule { range, cmdline }).is_err() {
            log_dropped("module", range);
        }
    }
    hypervisor::kernel::run(&boot)
}

fn log_dropped(what: &str, range: PhysRange) {
    let _ = writeln!(
        serial::emergency_writer(),
        "warning: {what} {:#x}..{:#x} ignored: too many in the boot information",
        range.start,
        range.end
    );
}

fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    let _ = writeln!(serial::emergency_writer(), "FATAL: {args}");
    shutdown::exit(shutdown::ExitStatus::Failure)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut out = serial::emergency_writer();
    let _ = write!(out, "\nPANIC");
    if let Some(location) = info.location() {
        let _ = write!(out, " at {}:{}:{}", location.file(), location.line(), location.column());
    }
    let _ = writeln!(out, ": {}", info.message());
    let _ = writeln!(out, "{:#x?}", hypervisor::host::cpu::control_registers());
    // The vCPU the hypervisor was running, if any (VMCS fields; VMREAD is safe only with VMX on).
    hypervisor::vmx::panic_dump(&mut out);
    let _ = heap::HEAP.try_lock().map(|h| writeln!(out, "heap: {} of {} bytes used", h.used(), h.size()));
    shutdown::exit(shutdown::ExitStatus::Failure)
}
