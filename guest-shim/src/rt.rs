//! The guest runtime: entry point, hypercalls, console, the coarse clock, blocking, shutdown and
//! the panic handler.
//!
//! A guest binary defines its main function with [`guest_main!`]; the runtime calls it with the
//! [`Env`] built from the boot information and ends the guest with the status it returns.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::abi::{
    GuestBootInfo, Hypercall, HypercallError, HypercallInsn, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, CONSOLE_WRITE_MAX,
};

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    lea guest_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    call colo_guest_entry
    ud2

    .section .bss.guest_stack, "aw", @nobits
    .balign 16
guest_stack:
    .skip 256 * 1024
guest_stack_top:
    "#,
    options(att_syntax)
);

/// The hypercall instruction in use (a [`HypercallInsn`] value), set at entry from the boot info.
/// Public so hand-written assembly can test it.
pub static HYPERCALL_INSN: AtomicU32 = AtomicU32::new(HypercallInsn::Vmcall as u32);
static TICKS_PER_SECOND: AtomicU64 = AtomicU64::new(1000);
/// Bytes of guest RAM (from the boot info); the heap takes its upper half.
pub(crate) static RAM_SIZE: AtomicU64 = AtomicU64::new(0);

/// What a guest's main function is given.
#[derive(Debug)]
pub struct Env {
    /// Bytes of guest RAM, from guest-physical 0.
    pub ram_size: u64,
    /// Ticks per second of [`clock_now`].
    pub ticks_per_second: u64,
    /// The guest's command line (its module line: its name, then `key=value` words).
    pub cmdline: &'static str,
}

impl Env {
    /// The value of `key=` on the command line.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Defines the guest's main function: `guest_main!(main)` with `fn main(env: &Env) -> i32`.
#[macro_export]
macro_rules! guest_main {
    ($main:path) => {
        #[no_mangle]
        fn colo_guest_main(env: &$crate::rt::Env) -> i32 {
            $main(env)
        }
    };
}

extern "Rust" {
    fn colo_guest_main(env: &Env) -> i32;
}

#[no_mangle]
extern "C" fn colo_guest_entry(info: *const GuestBootInfo) -> ! {
    // SAFETY: the hypervisor's boot protocol puts a GuestBootInfo at RDI, inside guest RAM,
    // identity-mapped; a wrong pointer faults, which the hypervisor reports.
    let info = unsafe { info.read_volatile() };
    if info.magic != BOOT_INFO_MAGIC || info.version != BOOT_INFO_VERSION {
        shutdown(0xB007);
    }
    HYPERCALL_INSN.store(info.hypercall_insn, Ordering::Relaxed);
    RAM_SIZE.store(info.ram_size, Ordering::Relaxed);
    TICKS_PER_SECOND.store(info.ticks_per_second.max(1), Ordering::Relaxed);
    let len = info.cmdline_len.min(crate::abi::GUEST_CMDLINE_MAX as u64) as usize;
    // SAFETY: the hypervisor wrote `cmdline_len` bytes at `cmdline_addr` inside guest RAM and
    // nothing writes them afterwards.
    let bytes = unsafe { core::slice::from_raw_parts(info.cmdline_addr as *const u8, len) };
    let env = Env {
        ram_size: info.ram_size,
        ticks_per_second: info.ticks_per_second,
        cmdline: core::str::from_utf8(bytes).unwrap_or(""),
    };
    // SAFETY: `guest_main!` defines this symbol with exactly this signature.
    let status = unsafe { colo_guest_main(&env) };
    shutdown(status as u32 as u64)
}

/// Makes a raw hypercall. Returns RAX.
pub fn hypercall_raw(number: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret: u64;
    if HYPERCALL_INSN.load(Ordering::Relaxed) == HypercallInsn::Vmmcall as u32 {
        // SAFETY: VMMCALL exits to the hypervisor, which reads RAX/RDI/RSI/RDX, writes RAX and
        // changes nothing else in guest state.
        unsafe {
            core::arch::asm!("vmmcall", inout("rax") number => ret, in("rdi") a0, in("rsi") a1, in("rdx") a2,
                options(nostack));
        }
    } else {
        // SAFETY: as for VMMCALL, with VMCALL on Intel VT-x.
        unsafe {
            core::arch::asm!("vmcall", inout("rax") number => ret, in("rdi") a0, in("rsi") a1, in("rdx") a2,
                options(nostack));
        }
    }
    ret
}

/// Makes a hypercall and decodes the result.
pub fn hypercall(call: Hypercall, a0: u64, a1: u64, a2: u64) -> Result<u64, Option<HypercallError>> {
    HypercallError::from_rax(hypercall_raw(call as u64, a0, a1, a2))
}

/// Writes bytes to the console.
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(CONSOLE_WRITE_MAX as usize) {
        let _ = hypercall(Hypercall::ConsoleWrite, chunk.as_ptr() as u64, chunk.len() as u64, 0);
    }
}

/// The coarse clock, in ticks since the guest started.
pub fn clock_now() -> u64 {
    hypercall(Hypercall::ClockNow, 0, 0, 0).unwrap_or(0)
}

/// Ticks per second of [`clock_now`].
pub fn ticks_per_second() -> u64 {
    TICKS_PER_SECOND.load(Ordering::Relaxed)
}

/// Blocks until the clock reaches `deadline` (or an event arrives); returns the clock.
pub fn block_until(deadline: u64) -> u64 {
    hypercall(Hypercall::BlockUntil, deadline, 0, 0).unwrap_or(0)
}

/// Sleeps for `ms` milliseconds of guest time.
pub fn sleep_ms(ms: u64) -> u64 {
    let deadline = clock_now() + ms * ticks_per_second() / 1000;
    let mut now = block_until(deadline);
    while now < deadline {
        now = block_until(deadline);
    }
    now
}

/// Ends the guest with `status`.
pub fn shutdown(status: u64) -> ! {
    loop {
        let _ = hypercall(Hypercall::Shutdown, status, 0, 0);
    }
}

/// The console as a `fmt::Write` sink (buffers a line per hypercall).
#[derive(Debug)]
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    /// An empty console buffer.
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) {
        console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `print!` to the guest console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::rt::Console::new(), $($arg)*);
    }};
}

/// `println!` to the guest console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::rt::Console::new(), $($arg)*);
    }};
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    struct Buf {
        bytes: [u8; 512],
        len: usize,
    }
    impl Write for Buf {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let n = s.len().min(self.bytes.len() - self.len);
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut buf = Buf { bytes: [0; 512], len: 0 };
    let _ = write!(buf, "{info}");
    loop {
        let _ = hypercall(Hypercall::Panic, buf.bytes.as_ptr() as u64, buf.len as u64, 0);
    }
}
