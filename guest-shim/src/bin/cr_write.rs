//! Test guest: clears CR0.PE, a bit the hypervisor owns. The write exits; the hypervisor does
//! not emulate it, so it must end this guest with a full vCPU/VMCS dump and keep running.
#![no_std]
#![no_main]

use guest_shim::rt::Env;
use guest_shim::{guest_main, println};

guest_main!(main);

fn main(_env: &Env) -> i32 {
    println!("clearing CR0.PE");
    // SAFETY: deliberately invalid in long mode; the hypervisor intercepts the write.
    unsafe {
        core::arch::asm!("mov rax, cr0", "and rax, -2", "mov cr0, rax", out("rax") _);
    }
    println!("ERROR: CR0.PE write was not intercepted");
    1
}
