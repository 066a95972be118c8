//! Isolation test guest: makes hypercalls with hostile arguments and checks that each one gets
//! the right error code. Exits 0 only if every one was refused as expected.
#![no_std]
#![no_main]

use guest_shim::abi::{Hypercall, HypercallError, CONSOLE_WRITE_MAX};
use guest_shim::rt::{hypercall_raw, Env};
use guest_shim::{guest_main, println};

guest_main!(main);

fn main(env: &Env) -> i32 {
    let ram = env.ram_size;
    let console = Hypercall::ConsoleWrite as u64;
    let cases: [(&str, u64, u64, u64, HypercallError); 8] = [
        ("unknown hypercall number 0", 0, 0, 0, HypercallError::UnknownHypercall),
        ("unknown hypercall number 0xdead", 0xdead, 0, 0, HypercallError::UnknownHypercall),
        ("unknown hypercall number u64::MAX", u64::MAX, 0, 0, HypercallError::UnknownHypercall),
        ("console pointer past RAM", console, ram, 16, HypercallError::BadAddress),
        ("console pointer near u64::MAX", console, u64::MAX - 8, 16, HypercallError::BadAddress),
        ("console range straddling the end of RAM", console, ram - 8, 16, HypercallError::BadAddress),
        ("console length over the limit", console, 0x10_0000, CONSOLE_WRITE_MAX + 1, HypercallError::TooLong),
        ("console length u64::MAX", console, 0x10_0000, u64::MAX, HypercallError::TooLong),
    ];
    let mut failures = 0;
    for (what, number, a0, a1, expected) in cases {
        let rax = hypercall_raw(number, a0, a1, 0);
        let got = HypercallError::from_rax(rax);
        let ok = got == Err(Some(expected));
        if !ok {
            failures += 1;
        }
        println!("{}: {what}: rax={rax:#x} ({got:?})", if ok { "refused" } else { "WRONG" });
    }
    // A panic message pointer outside RAM must be refused too, without ending the guest.
    let rax = hypercall_raw(Hypercall::Panic as u64, ram + 0x1000, 8, 0);
    if HypercallError::from_rax(rax) != Err(Some(HypercallError::BadAddress)) {
        failures += 1;
        println!("WRONG: panic with a bad message pointer: rax={rax:#x}");
    } else {
        println!("refused: panic message pointer past RAM");
    }
    if failures == 0 {
        println!("all hostile hypercalls refused");
    }
    failures
}
