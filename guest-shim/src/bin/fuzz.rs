//! `guest-fuzz`: a seeded hostile guest. Module arguments: `seed=N` (default 1), `hypercalls=`,
//! `ports=`, `msrs=`, `cpuids=`, `rounds=` (endgame passes), `tf=off` (no RFLAGS.TF or MOV SS
//! shadow runs: for Bochs 2.7's SVM, which delivers a guest's pending single-step trap to the
//! host after an intercepted instruction, see docs/exits.md).
//!
//! 1. Hypercalls with random numbers (valid, invalid, huge) and arguments at and past the edges of
//!    RAM, planted and mutated PV ring headers/descriptors and block requests. Every register but
//!    RAX (and the arithmetic flags) must be unchanged afterwards, refused or not; some run with
//!    RFLAGS.TF and must be followed by exactly one single-step #DB.
//! 2. Random port reads and writes (all forms but the string ones): reads float high (an 8- or
//!    16-bit IN merges into RAX, a 32-bit IN zero-extends), nothing else changes.
//! 3. Random RDMSR/WRMSR: the allow-list answers, everything else is #GP.
//! 4. Random CPUID leaves: always complete, with the filtered bits hidden.
//! 5. The instruction endgame: privileged, virtualization and prefixed instructions, each plain,
//!    with TF, and with TF behind a MOV SS shadow, checked against the table in docs/exits.md.
//!
//! Prints `fuzz seed=N done: ... wrong=W` and exits with W (capped at 255).
#![no_std]
#![no_main]

#[path = "common/trap.rs"]
mod trap;

use guest_shim::abi::{PvBlockRequest, PvDesc, PvRingHeader, PV_RING_MAGIC};
use guest_shim::rt::Env;
use guest_shim::{guest_main, println};
use trap::{exec, Ended, Mode, Regs, ARITHMETIC_FLAGS};

guest_main!(main);

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn regs(&mut self) -> Regs {
        Regs {
            rax: self.next(),
            rbx: self.next(),
            rcx: self.next(),
            rdx: self.next(),
            rsi: self.next(),
            rdi: self.next(),
            rbp: self.next(),
            r8: self.next(),
            r9: self.next(),
            r10: self.next(),
            r11: self.next(),
            r12: self.next(),
            r13: self.next(),
            r14: self.next(),
            r15: self.next(),
            rflags: self.next() & ARITHMETIC_FLAGS,
        }
    }
}

const RING_BYTES: usize = 24 + 1024 * 16;

#[repr(C, align(4096))]
struct Area<const N: usize>([u8; N]);

static mut RING_A: Area<RING_BYTES> = Area([0; RING_BYTES]);
static mut RING_B: Area<RING_BYTES> = Area([0; RING_BYTES]);
static mut REQUEST: Area<4096> = Area([0; 4096]);
static mut BLOCK_BUF: Area<{ (1 << 20) + 4096 }> = Area([0; (1 << 20) + 4096]);
static mut TEXT: Area<64> = Area([0; 64]);

fn addr_of<const N: usize>(area: *mut Area<N>) -> u64 {
    area as u64
}

struct Fuzz {
    rng: Rng,
    ram: u64,
    wrong: u32,
    amd: bool,
    rdtscp: bool,
    tf: bool,
}

impl Fuzz {
    fn wrong(&mut self, what: core::fmt::Arguments<'_>) {
        self.wrong += 1;
        if self.wrong <= 20 {
            println!("WRONG: {what}");
        }
    }

    /// An address at or past the edges of RAM, or a planted buffer.
    fn edge(&mut self) -> u64 {
        let ram = self.ram;
        match self.rng.below(16) {
            0 => 0,
            1 => 1,
            2 => ram - 1,
            3 => ram,
            4 => ram + 1,
            5 => ram - 8,
            6 => ram - 4096,
            7 => u64::MAX,
            8 => u64::MAX - 7,
            9 => 1 << 63,
            10 => self.rng.next(),
            11 => addr_of(core::ptr::addr_of_mut!(RING_A)),
            12 => addr_of(core::ptr::addr_of_mut!(RING_B)),
            13 => addr_of(core::ptr::addr_of_mut!(REQUEST)),
            14 => self.rng.below(1 << 40),
            _ => 0x1000,
        }
    }

    fn plant_ring(&mut self, ring: *mut Area<RING_BYTES>) {
        let entries = self.rng.pick(&[0u32, 1, 2, 3, 8, 64, 1024, 1025, u32::MAX]);
        let header = PvRingHeader {
            magic: if self.rng.below(4) == 0 { self.rng.next() } else { PV_RING_MAGIC },
            entries,
            producer: self.rng.pick(&[0u32, 1, 7, 8, 1024, 1025, u32::MAX]) ^ (self.rng.below(3) as u32),
            consumer: self.rng.pick(&[0u32, 1, u32::MAX]),
            reserved: 0,
        };
        // SAFETY: single-threaded guest; the rings are plain bytes the hypervisor reads and writes
        // only during hypercalls.
        unsafe {
            let base = (*ring).0.as_mut_ptr();
            (base as *mut PvRingHeader).write_unaligned(header);
            for i in 0..8 {
                let len = self.rng.pick(&[0u32, 13, 14, 60, 1514, 1515, u32::MAX]);
                let desc = PvDesc { addr: self.edge(), len, flags: self.rng.next() as u16, reserved: 0 };
                (base.add(24 + 16 * i) as *mut PvDesc).write_unaligned(desc);
            }
        }
    }

    fn plant_request(&mut self) {
        let ram = self.ram;
        let buf = addr_of(core::ptr::addr_of_mut!(BLOCK_BUF));
        let request = PvBlockRequest {
            op: self.rng.pick(&[0u32, 1, 2, 3, 4, u32::MAX]),
            status: self.rng.next() as u32,
            sector: self.rng.pick(&[0u64, 1, 127, 128, 129, u64::MAX, u64::MAX / 512, 1 << 55]),
            len: self.rng.pick(&[0u64, 1, 511, 512, 4096, 1 << 20, (1 << 20) + 512, u64::MAX]),
            // Never this guest's code, data or stack: the planted buffer or past/at the end of RAM.
            addr: self.rng.pick(&[buf, buf + 1, ram, ram + 512, u64::MAX - 511, 1 << 63]),
        };
        // SAFETY: as in `plant_ring`.
        unsafe { (core::ptr::addr_of_mut!(REQUEST) as *mut PvBlockRequest).write(request) };
    }

    fn hypercalls(&mut self, count: u32) -> (u32, u32) {
        let hc = trap::hypercall_bytes();
        let (mut refused, mut stepped) = (0, 0);
        for i in 0..count {
            let mut regs = self.rng.regs();
            let (a0, a1, a2) = (self.edge(), self.edge(), self.edge());
            let number = match self.rng.below(13) {
                0 => {
                    // Console: random bytes (escaped by the hypervisor), or a random range.
                    let text = core::ptr::addr_of_mut!(TEXT);
                    // SAFETY: single-threaded guest.
                    unsafe { (*text).0.iter_mut().for_each(|b| *b = self.rng.next() as u8) };
                    if self.rng.below(8) == 0 {
                        (regs.rdi, regs.rsi) = (addr_of(text), self.rng.below(64));
                        // SAFETY: as above; the line ends here, whatever the random bytes held.
                        unsafe { (*text).0[regs.rsi as usize] = b'\n' };
                        regs.rsi += 1;
                    } else {
                        // Pointers past RAM or lengths past the limit: refused, nothing printed.
                        (regs.rdi, regs.rsi) = (self.ram - self.rng.below(16), 17 + self.rng.below(1 << 20));
                    }
                    1
                }
                1 => 2,
                2 => {
                    regs.rdi = self.rng.below(3); // BlockUntil a deadline now or in the past
                    3
                }
                3 => {
                    self.plant_ring(core::ptr::addr_of_mut!(RING_A));
                    self.plant_ring(core::ptr::addr_of_mut!(RING_B));
                    (regs.rdi, regs.rsi, regs.rdx) = (a0, a1, a2);
                    6
                }
                4 => 7,
                5 => 8,
                6 => {
                    self.plant_request();
                    regs.rdi = if self.rng.below(4) == 0 { a0 } else { addr_of(core::ptr::addr_of_mut!(REQUEST)) };
                    9
                }
                7 => 0x100,
                8 => 0,
                9 => 10 + self.rng.below(0xF0),
                10 => self.rng.next() | (1 << 63),
                11 => {
                    // Panic with a message pointer outside RAM: refused, the guest goes on.
                    (regs.rdi, regs.rsi) = (self.ram + self.rng.below(1 << 30), 1 + self.rng.below(300));
                    5
                }
                _ => self.rng.next(),
            };
            // Shutdown ends the guest: its number is never made.
            if number == 4 {
                continue;
            }
            regs.rax = number;
            if !matches!(number, 1 | 3 | 5 | 6 | 9) {
                (regs.rdi, regs.rsi, regs.rdx) = (a0, a1, a2);
            }
            let before = regs;
            let mode = if self.tf && i % 16 == 0 { Mode::SingleStep } else { Mode::Plain };
            let ended = exec(&hc, &mut regs, mode);
            if (regs.rax as i64) < 0 {
                refused += 1;
            }
            let changed = Regs { rax: before.rax, rflags: regs.rflags & ARITHMETIC_FLAGS, ..regs };
            let expected = Regs { rflags: before.rflags & ARITHMETIC_FLAGS, ..before };
            if changed != expected {
                self.wrong(format_args!(
                    "hypercall {number:#x} ({:#x}, {:#x}, {:#x}) -> rax {:#x} changed other registers: {before:x?} -> {regs:x?}",
                    before.rdi, before.rsi, before.rdx, regs.rax
                ));
            }
            let ok = match mode {
                Mode::Plain => ended.count == 0,
                _ => {
                    stepped += 1;
                    ended.single_step_right_after()
                }
            };
            if !ok {
                self.wrong(format_args!("hypercall {number:#x} in {mode:?}: exceptions {:x?}", ended.traps()));
            }
        }
        (refused, stepped)
    }

    fn ports(&mut self, count: u32) {
        for _ in 0..count {
            let mut regs = self.rng.regs();
            let port = self.rng.next() as u16;
            regs.rdx = (regs.rdx & !0xFFFF) | u64::from(port);
            let imm = port as u8;
            let (insn, len, size, write): ([u8; 3], usize, u8, bool) = match self.rng.below(10) {
                0 => ([0xEC, 0, 0], 1, 1, false),
                1 => ([0x66, 0xED, 0], 2, 2, false),
                2 => ([0xED, 0, 0], 1, 4, false),
                3 => ([0xEE, 0, 0], 1, 1, true),
                4 => ([0x66, 0xEF, 0], 2, 2, true),
                5 => ([0xEF, 0, 0], 1, 4, true),
                6 => ([0xE4, imm, 0], 2, 1, false),
                7 => ([0xE5, imm, 0], 2, 4, false),
                8 => ([0xE6, imm, 0], 2, 1, true),
                _ => ([0x66, 0xE7, imm], 3, 2, true),
            };
            let before = regs;
            let ended = exec(&insn[..len], &mut regs, Mode::Plain);
            let mut expected = Regs { rflags: before.rflags & ARITHMETIC_FLAGS, ..before };
            if !write {
                // No device answers: all ones. A 32-bit destination zero-extends into RAX
                // (SDM Vol. 1 §3.4.1.1); 8 and 16 bits leave the rest of RAX alone.
                expected.rax = match size {
                    1 => (before.rax & !0xFF) | 0xFF,
                    2 => (before.rax & !0xFFFF) | 0xFFFF,
                    _ => 0xFFFF_FFFF,
                };
            }
            let got = Regs { rflags: regs.rflags & ARITHMETIC_FLAGS, ..regs };
            if ended.count != 0 || got != expected {
                self.wrong(format_args!(
                    "port {port:#x} {insn:02x?}: {:x?}, rax {:#x} -> {:#x} (expected {:#x})",
                    ended.traps(),
                    before.rax,
                    regs.rax,
                    expected.rax
                ));
            }
        }
    }

    fn msrs(&mut self, count: u32) {
        // The allow-list (hypervisor `vcpu::msr`): everything else is #GP.
        const READABLE: [u32; 17] = [
            0x10,
            0x1B,
            0x1A0,
            0x1D9,
            0x277,
            0x174,
            0x175,
            0x176,
            0xC000_0080,
            0xC000_0081,
            0xC000_0082,
            0xC000_0083,
            0xC000_0084,
            0xC000_0100,
            0xC000_0101,
            0xC000_0102,
            0xC000_0103,
        ];
        const OTHERS: [u32; 20] = [
            0,
            1,
            0x3A,
            0x48,
            0x49,
            0x8B,
            0xE7,
            0xE8,
            0xFE,
            0x10A,
            0x1DA,
            0x2FF,
            0x480,
            0x48D,
            0x491,
            0x6E0,
            0x802,
            0x830,
            0xC001_0114,
            0xC001_0117,
        ];
        for _ in 0..count {
            let msr = match self.rng.below(3) {
                0 => self.rng.pick(&READABLE),
                1 => self.rng.pick(&OTHERS),
                _ => self.rng.next() as u32,
            };
            let allowed = READABLE.contains(&msr);
            let mut regs = self.rng.regs();
            // RCX[63:32] is ignored by RDMSR, but QEMU TCG's MSR-permission-map lookup uses the
            // whole RCX (and then skips the intercept), so the fuzzer keeps it zero.
            regs.rcx = u64::from(msr);
            let before = regs;
            let ended = exec(&[0x0F, 0x32], &mut regs, Mode::Plain);
            let fault = ended.fault();
            if allowed && (fault.is_some() || regs.rax >> 32 != 0 || regs.rdx >> 32 != 0) {
                self.wrong(format_args!(
                    "RDMSR {msr:#x}: {:x?} rax={:#x} rdx={:#x}",
                    ended.traps(),
                    regs.rax,
                    regs.rdx
                ));
            } else if !allowed && (fault != Some(13) || regs.rax != before.rax) {
                self.wrong(format_args!("RDMSR {msr:#x} (not allowed): {:x?}, expected #GP", ended.traps()));
            }
            // Writes: to MSRs that cannot hurt this guest (values validated by the hypervisor),
            // and to everything outside the allow-list (#GP).
            let (target, value) = match self.rng.below(4) {
                0 => {
                    let msr = self.rng.pick(&[0xC000_0081u32, 0xC000_0082, 0xC000_0084, 0xC000_0102, 0x175]);
                    let value = self.rng.next();
                    (msr, if self.rng.below(2) == 0 { value & 0x0000_7FFF_FFFF_FFFF } else { value })
                }
                1 => (0xC000_0103, self.rng.next() & if self.rng.below(2) == 0 { 0xFFFF_FFFF } else { u64::MAX }),
                2 => (self.rng.pick(&OTHERS), self.rng.next()),
                _ => (0x10, self.rng.next()),
            };
            let mut w = self.rng.regs();
            (w.rcx, w.rax, w.rdx) = (u64::from(target), value & 0xFFFF_FFFF, value >> 32);
            let ended = exec(&[0x0F, 0x30], &mut w, Mode::Plain);
            let canonical = (value >> 47) == 0 || (value >> 47) == 0x1_FFFF;
            let expect_gp = match target {
                0xC000_0082 | 0xC000_0102 | 0x175 => !canonical,
                0xC000_0103 | 0xC000_0084 => value >> 32 != 0,
                0xC000_0081 => false,
                _ => true, // TSC (the hypervisor's clock) and the others
            };
            if (ended.fault() == Some(13)) != expect_gp || (!expect_gp && ended.count != 0) {
                self.wrong(format_args!(
                    "WRMSR {target:#x} = {value:#x}: {:x?} (expected #GP: {expect_gp})",
                    ended.traps()
                ));
            }
        }
    }

    fn cpuids(&mut self, count: u32) {
        for _ in 0..count {
            let leaf = match self.rng.below(4) {
                0 => self.rng.pick(&[0u32, 1, 6, 7, 0xA, 0xB, 0xD, 0x4000_0000, 0x4000_0001]),
                1 => 0x8000_0000 + self.rng.below(0x20) as u32,
                2 => self.rng.below(0x20) as u32,
                _ => self.rng.next() as u32,
            };
            let mut regs = self.rng.regs();
            regs.rax = u64::from(leaf) | (self.rng.next() << 32);
            let ended = exec(&[0x0F, 0xA2], &mut regs, Mode::Plain);
            let hidden = match leaf {
                1 => {
                    regs.rcx & ((1 << 3) | (1 << 5) | (1 << 6) | (1 << 26) | (1 << 27) | (1 << 28)) != 0
                        || regs.rcx & (1 << 31) == 0
                }
                0xA | 0xD | 6 => regs.rax | regs.rbx | regs.rcx | regs.rdx != 0,
                0x8000_0001 => regs.rcx & (1 << 2) != 0,
                _ => false,
            };
            let upper = regs.rax >> 32 | regs.rbx >> 32 | regs.rcx >> 32 | regs.rdx >> 32;
            if ended.count != 0 || hidden || upper != 0 {
                self.wrong(format_args!("CPUID {leaf:#x}: {:x?} -> {regs:x?}", ended.traps()));
            }
        }
    }

    fn endgame(&mut self, rounds: u32) -> u32 {
        let (cr0, _) = run(&[0x0F, 0x20, 0xC0], Regs::default());
        let (cr4, _) = run(&[0x0F, 0x20, 0xE0], Regs::default());
        let (amd, rdtscp) = (self.amd, self.rdtscp);
        let ok = Outcome::Completes;
        let ud = Outcome::Fault(6);
        let gp = Outcome::Fault(13);
        let on = |vtx: Outcome, amdv: Outcome| if amd { amdv } else { vtx };
        // (name, bytes, RAX, RCX, outcome): the table of docs/exits.md, "instruction endgame".
        let table: [(&str, &[u8], u64, u64, Outcome); 48] = [
            ("cpuid", &[0x0F, 0xA2], 0, 0, ok),
            ("rep cpuid", &[0xF3, 0x0F, 0xA2], 1, 0, ok),
            ("rex.w cpuid", &[0x48, 0x0F, 0xA2], 0x4000_0000, 0, ok),
            (
                "13x66 cpuid (15 bytes)",
                &[0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x0F, 0xA2],
                0,
                0,
                ok,
            ),
            (
                "14x66 cpuid (16 bytes)",
                &[0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x0F, 0xA2],
                0,
                0,
                gp,
            ),
            ("lock cpuid", &[0xF0, 0x0F, 0xA2], 0, 0, ud),
            ("rdtsc", &[0x0F, 0x31], 0, 0, ok),
            ("lock rdtsc", &[0xF0, 0x0F, 0x31], 0, 0, ud),
            ("rdtscp", &[0x0F, 0x01, 0xF9], 0, 0, if rdtscp { ok } else { ud }),
            ("rdmsr efer", &[0x0F, 0x32], 0, 0xC000_0080, ok),
            ("rdmsr feature_control", &[0x0F, 0x32], 0, 0x3A, gp),
            ("lock rdmsr", &[0xF0, 0x0F, 0x32], 0, 0xC000_0080, ud),
            ("wrmsr tsc", &[0x0F, 0x30], 0, 0x10, gp),
            ("rdpmc 0", &[0x0F, 0x33], 0, 0, gp),
            ("in al, 0x80", &[0xE4, 0x80], 0, 0, ok),
            ("out 0x80, al", &[0xE6, 0x80], 0, 0, ok),
            ("rep out (not string)", &[0xF3, 0xE6, 0x80], 0, 0, ok),
            ("invd", &[0x0F, 0x08], 0, 0, ok),
            ("wbinvd", &[0x0F, 0x09], 0, 0, ok),
            ("mov rax, cr8", &[0x44, 0x0F, 0x20, 0xC0], 0, 0, ok),
            ("mov cr8, rax=3", &[0x44, 0x0F, 0x22, 0xC0], 3, 0, ok),
            ("mov cr8, rax=16", &[0x44, 0x0F, 0x22, 0xC0], 16, 0, gp),
            ("mov rax, cr9", &[0x44, 0x0F, 0x20, 0xC8], 0, 0, ud),
            ("mov cr0, rax (same)", &[0x0F, 0x22, 0xC0], cr0.rax, 0, ok),
            ("mov cr0, rax (PE cleared)", &[0x0F, 0x22, 0xC0], cr0.rax & !1, 0, gp),
            ("mov cr0, rax (PG cleared)", &[0x0F, 0x22, 0xC0], cr0.rax & !(1 << 31), 0, gp),
            ("mov cr0, rcx (bit 32)", &[0x0F, 0x22, 0xC1], 0, cr0.rax | (1 << 32), gp),
            ("clts", &[0x0F, 0x06], 0, 0, ok),
            ("lmsw cx (same)", &[0x0F, 0x01, 0xF1], 0, cr0.rax & 0xF, ok),
            ("mov cr4, rax (same)", &[0x0F, 0x22, 0xE0], cr4.rax, 0, ok),
            ("mov cr4, rax (VMXE)", &[0x0F, 0x22, 0xE0], cr4.rax | (1 << 13), 0, gp),
            ("mov cr4, rax (OSXSAVE)", &[0x0F, 0x22, 0xE0], cr4.rax | (1 << 18), 0, gp),
            ("mov cr4, rax (PAE cleared)", &[0x0F, 0x22, 0xE0], cr4.rax & !(1 << 5), 0, gp),
            ("xsetbv", &[0x0F, 0x01, 0xD1], 0, 0, ud),
            ("xgetbv", &[0x0F, 0x01, 0xD0], 0, 0, ud),
            ("monitor", &[0x0F, 0x01, 0xC8], 0, 0, ud),
            ("mwait", &[0x0F, 0x01, 0xC9], 0, 0, ud),
            ("vmcall (clock)", &[0x0F, 0x01, 0xC1], 2, 0, on(ok, ud)),
            ("vmmcall (clock)", &[0x0F, 0x01, 0xD9], 2, 0, on(ud, ok)),
            ("66 vmmcall (clock)", &[0x66, 0x0F, 0x01, 0xD9], 2, 0, on(ud, ok)),
            ("lock vmcall", &[0xF0, 0x0F, 0x01, 0xC1], 2, 0, ud),
            ("lock vmmcall", &[0xF0, 0x0F, 0x01, 0xD9], 2, 0, ud),
            ("vmlaunch", &[0x0F, 0x01, 0xC2], 0, 0, ud),
            ("vmxoff", &[0x0F, 0x01, 0xC4], 0, 0, ud),
            ("vmrun", &[0x0F, 0x01, 0xD8], 0, 0, ud),
            ("stgi", &[0x0F, 0x01, 0xDC], 0, 0, ud),
            ("getsec", &[0x0F, 0x37], 0, 0, ud),
            ("ud2", &[0x0F, 0x0B], 0, 0, ud),
        ];
        let mut checked = 0;
        for _ in 0..rounds {
            for _ in 0..table.len() {
                let (name, bytes, rax, rcx, outcome) = table[self.rng.below(table.len() as u64) as usize];
                let mode = self.rng.pick(&[Mode::Plain, Mode::SingleStep, Mode::MovSsShadow]);
                let mode = if self.tf { mode } else { Mode::Plain };
                let mut regs = self.rng.regs();
                (regs.rax, regs.rcx) = (rax, rcx);
                let ended = exec(bytes, &mut regs, mode);
                checked += 1;
                if !outcome.matches(&ended, mode) {
                    self.wrong(format_args!("{name} {mode:?}: expected {outcome:?}, got {:x?}", ended.traps()));
                }
                // Put CR8 back for the next instruction.
                let _ = run(&[0x44, 0x0F, 0x22, 0xC0], Regs::default());
            }
        }
        checked
    }
}

/// How an instruction must end (docs/exits.md).
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// It completes: no exception, or exactly one single-step #DB right after it under TF.
    Completes,
    /// It raises this fault (and no single-step trap: it did not complete).
    Fault(u8),
}

impl Outcome {
    fn matches(&self, e: &Ended, mode: Mode) -> bool {
        match (*self, mode) {
            (Self::Completes, Mode::Plain) => e.count == 0,
            (Self::Completes, _) => e.single_step_right_after(),
            (Self::Fault(v), Mode::MovSsShadow) => {
                // The MOV SS's own held-back single-step trap may be delivered or lost.
                e.count >= 1 && e.traps[0].vector == v && e.traps()[1..].iter().all(|t| t.vector == 1)
            }
            (Self::Fault(v), _) => e.count == 1 && e.traps[0].vector == v && e.traps[0].rip != e.after,
        }
    }
}

fn run(insn: &[u8], regs: Regs) -> (Regs, Ended) {
    let mut r = regs;
    let e = exec(insn, &mut r, Mode::Plain);
    (r, e)
}

fn arg(env: &Env, key: &str, default: u32) -> u32 {
    env.arg(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main(env: &Env) -> i32 {
    trap::install();
    let seed: u64 = env.arg("seed").and_then(|v| v.parse().ok()).unwrap_or(1);
    let (ext, _) = run(&[0x0F, 0xA2], Regs { rax: 0x8000_0001, ..Regs::default() });
    let mut f = Fuzz {
        rng: Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xC010),
        ram: env.ram_size,
        wrong: 0,
        amd: trap::is_amd(),
        rdtscp: ext.rdx & (1 << 27) != 0,
        tf: env.arg("tf") != Some("off"),
    };
    println!("fuzz seed={seed} on {}", if f.amd { "AMD-V" } else { "VT-x" });
    let (refused, stepped) = f.hypercalls(arg(env, "hypercalls", 2000));
    println!(
        "fuzz seed={seed}: hypercalls done: {refused} refused, {stepped} single-stepped, wrong so far {}",
        f.wrong
    );
    f.ports(arg(env, "ports", 400));
    f.msrs(arg(env, "msrs", 400));
    f.cpuids(arg(env, "cpuids", 200));
    let checked = f.endgame(arg(env, "rounds", 3));
    println!("fuzz seed={seed} done: refused hypercalls {refused}, endgame instructions {checked}, wrong={}", f.wrong);
    f.wrong.min(255) as i32
}
