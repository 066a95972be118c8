//! Dirty-tracking test guest: with `pages=N` on its command line it first touches N pages at
//! 4 MiB (so their guest page-table dirty bits are already set), then, between test marks 1 and
//! 2, writes exactly those N pages and nothing else: the marks and the write loop are one asm
//! block that uses no stack. The hypervisor must report exactly N dirty pages between the marks.
#![no_std]
#![no_main]

use guest_shim::abi::Hypercall;
use guest_shim::rt::{self, Env};
use guest_shim::{guest_main, println};

guest_main!(main);

const BASE: u64 = 4 << 20;

fn main(env: &Env) -> i32 {
    let pages: u64 = env.arg("pages").and_then(|p| p.parse().ok()).unwrap_or(1);
    if BASE + pages * 4096 > env.ram_size {
        println!("pages={pages} does not fit in {} MiB of RAM above 4 MiB", env.ram_size >> 20);
        return 2;
    }
    for i in 0..pages {
        // SAFETY: inside guest RAM (checked above), above the image and stack.
        unsafe { core::ptr::write_volatile((BASE + i * 4096) as *mut u64, 0) };
    }
    println!("touched {pages} pages; writing them between marks");
    let vmmcall = rt::HYPERCALL_INSN.load(core::sync::atomic::Ordering::Relaxed) != 0;
    // SAFETY: writes only the N pages at BASE (in RAM, checked above); the hypercalls change RAX.
    unsafe {
        core::arch::asm!(
            "mov rax, {mark}",
            "mov rdi, 1",
            "test {vmm}, {vmm}",
            "jnz 2f",
            "vmcall",
            "jmp 3f",
            "2:",
            "vmmcall",
            "3:",
            "mov rcx, {n}",
            "mov rdx, {base}",
            "4:",
            "mov qword ptr [rdx], rcx",
            "add rdx, 4096",
            "dec rcx",
            "jnz 4b",
            "mov rax, {mark}",
            "mov rdi, 2",
            "test {vmm}, {vmm}",
            "jnz 5f",
            "vmcall",
            "jmp 6f",
            "5:",
            "vmmcall",
            "6:",
            mark = const Hypercall::TestMark as u64,
            vmm = in(reg) u64::from(vmmcall),
            n = in(reg) pages,
            base = const BASE,
            out("rax") _, out("rdi") _, out("rcx") _, out("rdx") _,
            options(nostack),
        );
    }
    println!("wrote {pages} pages");
    0
}
