//! COM1 (I/O port 0x3F8) as the console, and the `log` backend that prints to it.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::SerialPort;
use x86_64::instructions::port::PortReadOnly;

const COM1: u16 = 0x3F8;
/// Line status register bit 6: transmitter empty (holding and shift registers both idle).
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;

static CONSOLE: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Programs COM1 and makes it the console. Idempotent.
pub fn init() {
    let mut console = CONSOLE.lock();
    if console.is_none() {
        // SAFETY: 0x3F8 is COM1 on every PC platform this kernel boots on (QEMU, Bochs, and the
        // legacy UART of real boards); nothing else in the kernel drives these ports.
        let mut port = unsafe { SerialPort::new(COM1) };
        port.init();
        *console = Some(port);
    }
}

/// Writes formatted text to the console. Interrupts stay off while the lock is held so an
/// exception handler that prints can never wait on a lock its own CPU holds.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if let Some(port) = CONSOLE.lock().as_mut() {
            let _ = port.write_fmt(args);
        }
    });
}

/// A console writer for the panic and exception paths: it does not take the console lock, which
/// the failing code may hold. Output may interleave with a half-written line; it is never lost.
pub fn emergency_writer() -> impl Write {
    // SAFETY: as in `init`; the port was initialised at boot (or is in its reset state, which
    // still transmits under both emulators). Sharing it with a lock holder can only interleave bytes.
    unsafe { SerialPort::new(COM1) }
}

/// Waits until every byte written has left the UART (Bochs drops what is still queued at exit).
pub fn drain() {
    let mut lsr = PortReadOnly::<u8>::new(COM1 + 5);
    for _ in 0..1_000_000 {
        // SAFETY: reading the line status register has no side effect on a 16550.
        if unsafe { lsr.read() } & LSR_TRANSMITTER_EMPTY != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// `print!` to the serial console.
#[macro_export]
macro_rules! serial_print {
    ($($arg:tt)*) => { $crate::host::serial::write_fmt(format_args!($($arg)*)) };
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! serial_println {
    () => { $crate::serial_print!("\n") };
    ($($arg:tt)*) => { $crate::host::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

struct SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            write_fmt(format_args!("[{:<5} {}] {}\n", record.level(), record.target(), record.args()));
        }
    }

    fn flush(&self) {
        drain();
    }
}

static LOGGER: SerialLogger = SerialLogger;

/// Makes the serial console the `log` backend, printing `level` and more severe.
pub fn init_logger(level: log::LevelFilter) {
    // A second call only changes the level: the logger itself can be set once.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
