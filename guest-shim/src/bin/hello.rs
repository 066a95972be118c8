//! The reference guest: prints, computes (integer and SSE floating point), checks that its SSE
//! registers survive hypercalls, sleeps on the coarse clock, and exits with the status given as
//! `status=N` on its command line (0 by default).
#![no_std]
#![no_main]

use guest_shim::rt::{self, Env};
use guest_shim::{guest_main, println};

guest_main!(main);

fn main(env: &Env) -> i32 {
    println!("hello from guest `{}`: {} MiB of RAM, {} ticks/s", env.cmdline, env.ram_size >> 20, env.ticks_per_second);

    // Integer work: count primes below 20000.
    let primes = (2u32..20_000).filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)).count();
    println!("primes below 20000: {primes}");

    // Floating point through many exits: a harmonic sum that crosses a hypercall every step.
    let mut sum = 0.0f64;
    for k in 1..=200u32 {
        sum += 1.0 / f64::from(k);
        let _ = rt::clock_now();
    }
    println!("harmonic(200) = {:.9}", sum);

    println!("sse registers across hypercalls: {}", if sse_survives_hypercalls() { "preserved" } else { "CORRUPTED" });

    // RDTSC is trapped: the guest sees the coarse clock scaled, never host time.
    // SAFETY: RDTSC has no side effects.
    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
    println!("rdtsc reads {tsc} (clock tick {})", rt::clock_now());

    let start = rt::clock_now();
    for i in 1..=3 {
        let now = rt::sleep_ms(20);
        println!("slept {} ms: tick {}", 20 * i, now - start);
    }
    let status = env.arg("status").and_then(|s| s.parse().ok()).unwrap_or(0);
    println!("exiting with status {status}");
    status
}

/// Loads a pattern into xmm0..xmm15, makes a hypercall (the hypervisor formats text with SSE in
/// between), and checks the pattern is still there.
fn sse_survives_hypercalls() -> bool {
    let pattern: [u64; 32] =
        core::array::from_fn(|i| 0x0123_4567_89AB_CDEF ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut after = [0u64; 32];
    // SAFETY: reads `pattern` and writes `after` (both 256 bytes, 16-aligned access not required
    // by movdqu); the hypercall changes only RAX, which is declared clobbered.
    unsafe {
        core::arch::asm!(
            "movdqu xmm0, [{p}]", "movdqu xmm1, [{p} + 16]", "movdqu xmm2, [{p} + 32]", "movdqu xmm3, [{p} + 48]",
            "movdqu xmm4, [{p} + 64]", "movdqu xmm5, [{p} + 80]", "movdqu xmm6, [{p} + 96]", "movdqu xmm7, [{p} + 112]",
            "movdqu xmm8, [{p} + 128]", "movdqu xmm9, [{p} + 144]", "movdqu xmm10, [{p} + 160]", "movdqu xmm11, [{p} + 176]",
            "movdqu xmm12, [{p} + 192]", "movdqu xmm13, [{p} + 208]", "movdqu xmm14, [{p} + 224]", "movdqu xmm15, [{p} + 240]",
            "call {hc}",
            "movdqu [{a}], xmm0", "movdqu [{a} + 16], xmm1", "movdqu [{a} + 32], xmm2", "movdqu [{a} + 48], xmm3",
            "movdqu [{a} + 64], xmm4", "movdqu [{a} + 80], xmm5", "movdqu [{a} + 96], xmm6", "movdqu [{a} + 112], xmm7",
            "movdqu [{a} + 128], xmm8", "movdqu [{a} + 144], xmm9", "movdqu [{a} + 160], xmm10", "movdqu [{a} + 176], xmm11",
            "movdqu [{a} + 192], xmm12", "movdqu [{a} + 208], xmm13", "movdqu [{a} + 224], xmm14", "movdqu [{a} + 240], xmm15",
            p = in(reg) pattern.as_ptr(),
            a = in(reg) after.as_mut_ptr(),
            hc = sym console_hypercall_preserving_sse,
            out("rax") _, out("rdi") _, out("rsi") _, out("rdx") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
    pattern == after
}

/// A console hypercall that touches no SSE register in the guest (naked: no compiler code).
#[unsafe(naked)]
extern "C" fn console_hypercall_preserving_sse() {
    core::arch::naked_asm!(
        "lea rdi, [rip + {msg}]",
        "mov rsi, {len}",
        "mov rax, 1",
        "cmp dword ptr [rip + {insn}], 1",
        "je 2f",
        "vmcall",
        "ret",
        "2:",
        "vmmcall",
        "ret",
        msg = sym SSE_MESSAGE,
        len = const SSE_MESSAGE.len(),
        insn = sym rt::HYPERCALL_INSN,
    )
}

static SSE_MESSAGE: [u8; 43] = *b"(hypercall made with a pattern in xmm0-15)\n";
