//! The one way the hypervisor leaves the machine, with a pass/fail status the test harness reads.
//!
//! Under QEMU the `isa-debug-exit` device at port 0xF4 ends the emulator with exit code
//! `(value << 1) | 1`: 33 for success, 35 for failure. Bochs has no exit status (it always exits
//! with 1), so the `COLO-EXIT status=N` line on the serial console is the verdict there; the
//! harness reads it under both. Under Bochs, "Shutdown" written to port 0x8900 stops the emulator.
//! On a real machine neither port does anything and the CPU halts.

use x86_64::instructions::port::Port;

use super::{cpu, serial};

/// QEMU isa-debug-exit port (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;
/// Bochs' shutdown port.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitStatus {
    /// Everything the run was asked to do succeeded.
    Success = 0,
    /// A configuration error, an exception, a panic or a failed self-check.
    Failure = 1,
}

/// Prints the verdict, drains the console and leaves the emulator (or halts on hardware).
pub fn exit(status: ExitStatus) -> ! {
    use core::fmt::Write;
    let mut out = serial::emergency_writer();
    let _ = writeln!(out, "COLO-EXIT status={}", status as u32);
    serial::drain();
    // SAFETY: port 0xF4 is QEMU's debug-exit device when present and unclaimed otherwise; the
    // write has no effect on anything this kernel uses.
    unsafe { Port::<u32>::new(QEMU_DEBUG_EXIT_PORT).write(0x10 | status as u32) };
    let mut bochs = Port::<u8>::new(BOCHS_SHUTDOWN_PORT);
    for byte in *b"Shutdown" {
        // SAFETY: port 0x8900 is Bochs' shutdown port; elsewhere it is unclaimed.
        unsafe { bochs.write(byte) };
    }
    cpu::halt_forever()
}
