//! Isolation test guest: raises an exception with no IDT loaded (IDTR limit 0), which escalates
//! to a triple fault. The hypervisor must end it and keep running.
#![no_std]
#![no_main]

use guest_shim::rt::Env;
use guest_shim::{guest_main, println};

guest_main!(main);

fn main(_env: &Env) -> i32 {
    println!("raising #UD with no IDT: expect a triple fault");
    // SAFETY: deliberately faults; the guest never continues past this.
    unsafe { core::arch::asm!("ud2") };
    1
}
