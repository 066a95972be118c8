//! The guest runner: loads each guest module into fresh guest RAM, starts it on a vCPU of the
//! chosen backend, applies the exit handler's decisions until the guest ends, reports how it
//! ended with its exit counters, and frees everything before the next guest.
//!
//! [`apply`] is the one place RIP moves past an exiting instruction.

use core::fmt::Write;

use crate::backend::{Backend, BackendError};
use crate::guest::boot::{self, BootError, BootParams};
use crate::guest::elf::{ElfError, GuestImage};
use crate::guest::{GuestRam, MemoryError};
use crate::host::{cpu, serial, time};
use crate::kernel::BootModule;
use crate::memory::{FrameAllocator, FrameError};
use crate::vcpu::cpuid::CpuidValues;
use crate::vcpu::handler::{ExitHandler, HostServices};
use crate::vcpu::{Decision, GuestEnd, Vcpu, VcpuError, VmExit};

/// Guest clock ticks per second (the boot info tells guests).
pub const TICKS_PER_SECOND: u64 = 1000;
/// How long a guest may run unless its module line says `time_limit_ms=N`.
const DEFAULT_TIME_LIMIT_MS: u64 = 30_000;
/// The preemption time slice: the hypervisor regains control at least this often.
const TIME_SLICE_MS: u64 = 10;

/// Module names starting with this are guests.
pub const GUEST_PREFIX: &str = "guest-";

/// Why a guest could not be started.
#[derive(Clone, Debug)]
pub enum StartError {
    /// No memory for its RAM.
    Memory(FrameError),
    /// Its image is not a loadable guest.
    Image(ElfError),
    /// Its image does not fit.
    Load(MemoryError),
    /// The boot structures could not be written.
    Boot(BootError),
    /// The backend refused the vCPU.
    Backend(BackendError),
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Memory(e) => write!(f, "guest RAM: {e}"),
            Self::Image(e) => write!(f, "{e}"),
            Self::Load(e) => write!(f, "loading: {e}"),
            Self::Boot(e) => write!(f, "boot structures: {e}"),
            Self::Backend(e) => write!(f, "vCPU: {e}"),
        }
    }
}

/// The outcome of one guest.
#[derive(Debug)]
pub struct GuestReport {
    /// How it ended.
    pub end: GuestEnd,
    /// Its exit counters, refusals and timings.
    pub handler: ExitHandler,
    /// Guest clock ticks it ran for.
    pub ticks: u64,
    /// Host TSC cycles from entry to exit for hypercall exits: (min, sum, count).
    pub hypercall_cycles: (u64, u64, u64),
}

/// Runs every guest module in order. The hypervisor survives whatever a guest does.
pub fn run_guests(backend: &mut Backend, frames: &mut FrameAllocator, modules: &[BootModule<'_>], guest_mem: u64) {
    for module in modules.iter().filter(|m| m.cmdline.starts_with(GUEST_PREFIX)) {
        let name = module.cmdline.split_ascii_whitespace().next().unwrap_or(module.cmdline);
        log::info!("starting guest `{name}` on {} ({} MiB RAM)", backend.name(), guest_mem >> 20);
        match run_guest(backend, frames, module, name, guest_mem) {
            Ok(report) => {
                let (min, sum, count) = report.hypercall_cycles;
                log::info!(
                    "guest `{name}` {} after {} ticks; exits: {}; refused hypercalls: {}; ignored port I/O: {}",
                    report.end,
                    report.ticks,
                    report.handler.counters,
                    report.handler.refused_hypercalls,
                    report.handler.ignored_port_io
                );
                if let Some(mean) = sum.checked_div(count) {
                    log::info!(
                        "guest `{name}` hypercall round trip (entry to exit, host TSC cycles): min {min}, mean {mean}"
                    );
                }
            }
            Err(e) => log::error!("guest `{name}` not started: {e}"),
        }
        log::info!("free memory: {} KiB", frames.free_bytes() >> 10);
    }
}

fn run_guest(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    name: &str,
    guest_mem: u64,
) -> Result<GuestReport, StartError> {
    let ram = frames.allocate(guest_mem, 2 << 20).map_err(StartError::Memory)?;
    // SAFETY: the range was just taken from the frame allocator, so nothing else uses it; it is
    // identity-mapped and writable. It is given back below before this function returns.
    let bytes = unsafe { core::slice::from_raw_parts_mut(ram.start as *mut u8, ram.len() as usize) };
    bytes.fill(0);
    let result = start_and_run(backend, frames, module, name, GuestRam::new(bytes), ram);
    if let Err(e) = frames.free(ram) {
        log::error!("freeing guest RAM of `{name}`: {e}");
    }
    result
}

fn start_and_run(
    backend: &mut Backend,
    frames: &mut FrameAllocator,
    module: &BootModule<'_>,
    name: &str,
    mut mem: GuestRam<'_>,
    ram: crate::memory::PhysRange,
) -> Result<GuestReport, StartError> {
    // SAFETY: the boot loader placed the module at this range, reserved from the allocator and
    // identity-mapped; nothing writes it.
    let image_bytes =
        unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) };
    let image = GuestImage::parse(image_bytes, ram.len()).map_err(StartError::Image)?;
    image.load(&mut mem).map_err(StartError::Load)?;
    let params = BootParams {
        entry: image.entry,
        cmdline: module.cmdline,
        hypercall_insn: backend.hypercall_insn(),
        ticks_per_second: TICKS_PER_SECOND,
    };
    let entry = boot::prepare(&mut mem, &params).map_err(StartError::Boot)?;
    let mut vcpu = backend.create_vcpu(frames, ram, &entry).map_err(StartError::Backend)?;
    let time_limit_ms = module
        .cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("time_limit_ms=")?.parse().ok())
        .unwrap_or(DEFAULT_TIME_LIMIT_MS);
    let report = run_vcpu(vcpu.as_mut(), &mut mem, name, time_limit_ms * TICKS_PER_SECOND / 1000);
    vcpu.release(frames);
    Ok(report)
}

/// The guest clock: ticks since the guest started.
struct GuestClock {
    start: u64,
    tsc_per_tick: u64,
}

impl GuestClock {
    fn start() -> Self {
        Self { start: time::rdtsc(), tsc_per_tick: (time::tsc_per_ms() * 1000 / TICKS_PER_SECOND).max(1) }
    }

    fn ticks(&self) -> u64 {
        (time::rdtsc() - self.start) / self.tsc_per_tick
    }
}

fn host_cpuid(leaf: u32, subleaf: u32) -> CpuidValues {
    let r = cpu::cpuid(leaf, subleaf);
    CpuidValues { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

fn run_vcpu(vcpu: &mut dyn Vcpu, mem: &mut GuestRam<'_>, name: &str, time_limit_ticks: u64) -> GuestReport {
    let mut handler = ExitHandler::new(time_limit_ticks);
    let clock = GuestClock::start();
    let slice = TIME_SLICE_MS * time::tsc_per_ms();
    let mut console = |line: &str| serial::write_fmt(format_args!("[{name}] {line}\n"));
    let mut hypercall_cycles = (u64::MAX, 0, 0);
    let end = loop {
        if let Some(end) = handler.check_time_limit(clock.ticks()) {
            break end;
        }
        vcpu.set_time_slice(slice);
        let entered = time::rdtsc();
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                report_vcpu(vcpu, name, &e);
                break GuestEnd::EntryFailed { reason: 0, qualification: entry_error_code(&e) };
            }
        };
        if exit == VmExit::Hypercall {
            let cycles = time::rdtsc() - entered;
            hypercall_cycles = (hypercall_cycles.0.min(cycles), hypercall_cycles.1 + cycles, hypercall_cycles.2 + 1);
        }
        let mut host = HostServices { now_ticks: clock.ticks(), cpuid: &host_cpuid, console_line: &mut console };
        let decision = handler.handle(&exit, vcpu, mem, &mut host);
        if let Decision::End(end) = decision {
            if matches!(end, GuestEnd::Unsupported { .. } | GuestEnd::EntryFailed { .. }) {
                report_vcpu(vcpu, name, &end);
            }
            break end;
        }
        apply(vcpu, decision, &clock);
    };
    handler.flush_console(&mut console);
    if hypercall_cycles.2 == 0 {
        hypercall_cycles.0 = 0;
    }
    GuestReport { end, handler, ticks: clock.ticks(), hypercall_cycles }
}

/// Applies a non-ending decision. The only place RIP is advanced.
fn apply(vcpu: &mut dyn Vcpu, decision: Decision, clock: &GuestClock) {
    match decision {
        Decision::Resume => {}
        Decision::Advance => vcpu.skip_instruction(),
        Decision::BlockUntil { deadline } => {
            vcpu.skip_instruction();
            while clock.ticks() < deadline {
                core::hint::spin_loop();
            }
            vcpu.registers().rax = clock.ticks();
        }
        Decision::Inject(exception) => vcpu.inject(exception),
        Decision::End(_) => unreachable!("the run loop handles End before apply"),
    }
}

fn entry_error_code(e: &VcpuError) -> u64 {
    match e {
        VcpuError::EntryInstructionFailed { code } => (*code).into(),
    }
}

/// Prints the full vCPU state for a guest the hypervisor could not handle.
fn report_vcpu(vcpu: &dyn Vcpu, name: &str, why: &dyn core::fmt::Display) {
    let mut out = serial::emergency_writer();
    let _ = writeln!(out, "guest `{name}`: {why}; {} vCPU dump:", vcpu.backend_name());
    let _ = vcpu.dump(&mut out);
}
