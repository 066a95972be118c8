//! Test guest: checks what the hypervisor shows it through CPUID, MSRs and port I/O, then reads
//! an MSR outside the allow-list. The hypervisor injects #GP; with no guest IDT that becomes a
//! triple fault, so the last line printed must be the announcement of that read.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid;

use guest_shim::rt::Env;
use guest_shim::{guest_main, println, HYPERVISOR_SIGNATURE};

guest_main!(main);

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR exits to the hypervisor, which either returns a value or injects #GP.
    unsafe { core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: WRMSR exits to the hypervisor, which validates the value.
    unsafe { core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32) };
}

fn main(_env: &Env) -> i32 {
    let mut failures = 0;
    let mut check = |what: &str, ok: bool| {
        println!("{}: {what}", if ok { "ok" } else { "WRONG" });
        if !ok {
            failures += 1;
        }
    };
    let leaf = __cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&leaf.edx.to_le_bytes());
    check("cpuid 0x40000000 names the hypervisor", &sig == HYPERVISOR_SIGNATURE);
    let one = __cpuid(1);
    check("cpuid 1 hides VMX", one.ecx & (1 << 5) == 0);
    check("cpuid 1 sets the hypervisor bit", one.ecx & (1 << 31) != 0);
    check("cpuid 1 hides XSAVE and AVX", one.ecx & ((1 << 26) | (1 << 28)) == 0);
    check("cpuid 0x80000001 hides SVM", __cpuid(0x8000_0001).ecx & (1 << 2) == 0);
    let efer = rdmsr(0xC000_0080);
    check("IA32_EFER reads with LME and LMA set", efer & 0x500 == 0x500);
    wrmsr(0xC000_0100, 0x1234_5000);
    check("IA32_FS_BASE reads back what was written", rdmsr(0xC000_0100) == 0x1234_5000);
    let port: u8;
    // SAFETY: port I/O exits; no device answers, so the hypervisor returns all ones.
    unsafe { core::arch::asm!("in al, 0x80", out("al") port) };
    check("a read from an empty port floats high", port == 0xFF);
    println!("probe checks done: {failures} wrong");
    println!("reading IA32_FEATURE_CONTROL (expect #GP, then a triple fault: no IDT)");
    let value = rdmsr(0x3A);
    println!("ERROR: IA32_FEATURE_CONTROL read returned {value:#x}");
    1
}
