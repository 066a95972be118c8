//! Preemption test guest: spins forever without a single exit. Only the hypervisor's
//! preemption timer can take control back; the guest's run-time limit then ends it.
#![no_std]
#![no_main]

use guest_shim::rt::Env;
use guest_shim::{guest_main, println};

guest_main!(main);

fn main(_env: &Env) -> i32 {
    println!("spinning without exits");
    let mut x: u64 = 0;
    loop {
        x = core::hint::black_box(x.wrapping_add(1));
    }
}
