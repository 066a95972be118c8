//! Isolation test guest: writes one page past the end of its RAM. The hypervisor must end it
//! with an EPT/NPT violation naming the address, and keep running.
#![no_std]
#![no_main]

use guest_shim::rt::Env;
use guest_shim::{guest_main, println};

guest_main!(main);

fn main(env: &Env) -> i32 {
    // Guest-physical = virtual for RAM; above RAM the boot page tables still map up to the next
    // GiB boundary, so this reaches the hypervisor's second-level tables, which do not map it.
    let target = env.ram_size + 0x1000;
    println!("writing outside guest RAM at {target:#x}");
    // SAFETY: deliberately not sound: the point is that the hypervisor stops this write.
    unsafe { core::ptr::write_volatile(target as *mut u64, 0xBAD) };
    println!("ERROR: the write outside guest RAM succeeded");
    1
}
