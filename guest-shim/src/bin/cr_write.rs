//! Test guest: clears CR0.PE (with PG set), a bit the hypervisor owns. The write exits; the
//! hypervisor completes it as the CPU would: #GP (SDM Vol. 2B MOV CR). This guest has no IDT, so
//! the #GP becomes a triple fault, which ends only this guest.
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
