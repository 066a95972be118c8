//! The hypervisor's start-up sequence, from the boot information `boot` hands over to idle.
//!
//! Order matters: the console comes first (so everything after can report), then GDT/IDT (so a
//! fault is reported, not a silent triple fault), then the configuration (a bad command line stops
//! here with a named error), then memory: frame allocator, host page tables, heap.

use core::fmt::Write;

use crate::backend::Backend;
use crate::config::{self, Config, OnIdle, TestFault};
use crate::guest::spec::GUEST_PREFIX;
use crate::guest::GuestSpec;
use crate::host::{cpu, gdt, heap, idt, paging, serial, shutdown, time};
use crate::memory::{FrameAllocator, PhysRange};
use crate::runner::Guest;

pub use crate::boot_info::{BootInfo, BootModule, MAX_BOOT_RANGES, MAX_MODULES};

/// The kernel heap: a quarter of free memory, within these bounds. Snapshots and checkpoint
/// streams of whole guests live here.
const HEAP_MIN_BYTES: u64 = 16 << 20;
const HEAP_MAX_BYTES: u64 = 256 << 20;

/// Runs the hypervisor. Never returns: it ends in [`shutdown::exit`] or halts.
pub fn run(boot: &BootInfo<'_>) -> ! {
    serial::init();
    serial::init_logger(log::LevelFilter::Info);
    log::info!("COLO hypervisor {} starting (loader: {})", env!("CARGO_PKG_VERSION"), boot.loader);
    gdt::init();
    idt::init();
    log::info!("GDT, TSS (4 IST stacks) and IDT loaded");

    let config = match config::parse(boot.cmdline) {
        Ok(config) => config,
        Err(err) => {
            log::error!("config error: {err}");
            log::error!("kernel command line was: `{}`", boot.cmdline);
            shutdown::exit(shutdown::ExitStatus::Failure);
        }
    };
    serial::init_logger(config.log_level);
    log::info!("command line: `{}`", boot.cmdline);
    log::info!("config: role={:?} guest_mem={} MiB", config.role, config.guest_mem_bytes >> 20);

    let mut frames = FrameAllocator::new();
    let phys_end = init_frames(&mut frames, boot);
    if let Err(err) = paging::init(&mut frames, phys_end, boot.kernel_image) {
        fail(format_args!("host page tables: {err}"));
    }
    log::info!("host page tables loaded: identity map to {:#x}, null page unmapped", phys_end.max(4 << 30));
    let heap_bytes = (frames.free_bytes() / 4).clamp(HEAP_MIN_BYTES, HEAP_MAX_BYTES) & !((2 << 20) - 1);
    match heap::init(&mut frames, heap_bytes) {
        Ok(range) => log::info!("heap: {} MiB at {:#x}", range.len() >> 20, range.start),
        Err(err) => fail(format_args!("heap: {err}")),
    }
    heap_self_check();

    let tsc_per_ms = time::calibrate();
    log::info!("TSC: {} kHz (calibrated against PIT channel 2)", tsc_per_ms);
    let vendor = cpu::vendor();
    log::info!("cpu vendor: {}", core::str::from_utf8(&vendor).unwrap_or("?"));
    for module in &boot.modules {
        log::info!(
            "module `{}` at {:#x}..{:#x} ({} KiB)",
            module.cmdline,
            module.range.start,
            module.range.end,
            module.range.len() >> 10
        );
    }
    log::info!("free memory after start-up: {} KiB", frames.free_bytes() >> 10);
    let token = mgmt_token(boot);
    cluster_key(boot, &config);
    if let Err(err) = crate::net::bring_up(&config, token) {
        fail(format_args!("network: {err}"));
    }

    if let Some(fault) = config.test_fault {
        raise_test_fault(fault);
    }
    cpu::mask_legacy_pic();
    log::info!("boot complete");
    if config.role != config::Role::Standalone {
        crate::node::run(&mut frames, boot, &config);
    }
    run_guest_modules(&mut frames, boot, &config);
    idle(&config)
}

/// Starts the virtualization backend and runs the guest modules, if there are any.
fn run_guest_modules(frames: &mut FrameAllocator, boot: &BootInfo<'_>, config: &Config) {
    if !boot.modules.iter().any(|m| m.name().starts_with(GUEST_PREFIX)) {
        return;
    }
    match crate::backend::Backend::detect(frames) {
        Ok(mut backend) => {
            log::info!("backend: {}: {}", backend.name(), backend.describe());
            log::info!("dirty tracking: {}", backend.dirty_tracking());
            run_guests(&mut backend, frames, &boot.modules, config.guest_mem_bytes);
            log::info!("all guests done");
        }
        Err(e) => log::error!("no guest can run: {e}"),
    }
}

/// Runs every guest module in order: a self-test scenario (`selftest`) or a plain run, `restarts`
/// more times after it ends. A module line with a bad value ends that guest with the error; the
/// hypervisor survives whatever a guest does and goes on with the next module.
fn run_guests(backend: &mut Backend, frames: &mut FrameAllocator, modules: &[BootModule<'_>], guest_mem: u64) {
    for module in modules.iter().filter(|m| m.name().starts_with(GUEST_PREFIX)) {
        let name = module.name();
        let spec = match GuestSpec::parse(module.cmdline) {
            Ok(spec) => spec,
            Err(e) => {
                log::error!("guest `{name}` not started: {e}");
                continue;
            }
        };
        if let Some(scenario) = spec.scenario {
            log::info!("guest `{name}`: self-test scenario `{}` on {}", scenario.name(), backend.name());
            crate::selftest::run(scenario, backend, frames, module, &spec, modules, guest_mem);
            log::info!("free memory: {} KiB", frames.free_bytes() >> 10);
            continue;
        }
        let runs = 1 + spec.restarts;
        for run in 1..=runs {
            log::info!(
                "starting guest `{name}` on {} ({} MiB RAM), run {run} of {runs}",
                backend.name(),
                guest_mem >> 20
            );
            match Guest::create(backend, frames, module, &spec, guest_mem) {
                Ok(mut guest) => {
                    let disk = spec.disk.map(|d| (d, crate::devices::host::find_disk(modules, d)));
                    match disk {
                        Some((_, Some(disk))) => {
                            // SAFETY: guests run one at a time and the slice is dropped with this guest.
                            guest.attach_disk(unsafe { crate::devices::host::disk_bytes(disk) });
                        }
                        Some((d, None)) => log::warn!("guest `{name}`: no disk module `disk-{d}`; no block device"),
                        None => {}
                    }
                    let end = guest.run_to_end();
                    guest.report(&end);
                    guest.destroy(frames);
                }
                Err(e) => log::error!("guest `{name}` not started: {e}"),
            }
            log::info!("free memory: {} KiB", frames.free_bytes() >> 10);
        }
    }
}

/// Feeds the allocator with available RAM minus reservations; returns the end of RAM.
fn init_frames(frames: &mut FrameAllocator, boot: &BootInfo<'_>) -> u64 {
    let mut phys_end = 0;
    for &range in &boot.available {
        phys_end = phys_end.max(range.end);
        if let Err(err) = frames.add(range) {
            log::warn!("memory range {:#x}..{:#x} not used: {err}", range.start, range.end);
        }
    }
    // The first MiB holds the IVT, BIOS data and option ROMs; the kernel never allocates there.
    let low_memory = PhysRange { start: 0, end: 1 << 20 };
    let kernel = boot.kernel_image;
    for &range in boot.reserved.iter().chain([low_memory, kernel].iter()) {
        if let Err(err) = frames.reserve(range) {
            fail(format_args!("reserving {:#x}..{:#x}: {err}", range.start, range.end));
        }
    }
    log::info!(
        "memory: {} MiB available in {} ranges, RAM ends at {:#x}",
        frames.free_bytes() >> 20,
        frames.free_ranges().len(),
        phys_end
    );
    phys_end
}

/// Proves the heap works before anything depends on it.
fn heap_self_check() {
    let mut v = alloc::vec::Vec::with_capacity(1000);
    v.extend(0..1000u32);
    let boxed = alloc::boxed::Box::new(v.iter().sum::<u32>());
    if *boxed != 499_500 {
        fail(format_args!("heap self-check: sum {} != 499500", *boxed));
    }
}

fn raise_test_fault(fault: TestFault) {
    log::warn!("raising deliberate test fault: {fault:?}");
    match fault {
        // SAFETY: a deliberate breakpoint; the IDT reports it and stops the machine.
        TestFault::Breakpoint => unsafe { core::arch::asm!("int3") },
        // SAFETY: a deliberate #UD; the IDT reports it and stops the machine.
        TestFault::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
        TestFault::PageFault => {
            let value: u64;
            // SAFETY: a deliberate read of address 0, which `paging::init` leaves unmapped: it
            // raises #PF with CR2 = 0, which the IDT reports before stopping the machine.
            unsafe { core::arch::asm!("mov {}, qword ptr [0]", out(reg) value, options(nostack, readonly)) };
            log::error!("null read returned {value:#x}: the null page is mapped");
        }
        TestFault::Panic => panic!("deliberate test panic"),
    }
}

fn idle(config: &Config) -> ! {
    if crate::net::is_up() {
        crate::net::serve_until_shutdown()
    }
    match config.on_idle {
        OnIdle::Exit => {
            log::info!("nothing left to run; exiting");
            shutdown::exit(shutdown::ExitStatus::Success)
        }
        OnIdle::Halt => {
            log::info!("nothing left to run; halting");
            serial::drain();
            cpu::halt_forever()
        }
    }
}

/// The management token from the `mgmt-token` module, if there is one. Only its digest is kept;
/// the module's bytes are zeroed, and neither its content nor its length is logged. A module
/// that holds no valid token stops the boot.
fn mgmt_token(boot: &BootInfo<'_>) -> Option<crate::net::auth::MgmtToken> {
    let module =
        boot.modules.iter().find(|m| m.cmdline.split_whitespace().next() == Some(crate::net::auth::TOKEN_MODULE))?;
    // SAFETY: the boot loader placed the module at this range, which `init_frames` reserved from
    // the frame allocator and the host page tables identity-map; nothing else refers to it.
    let bytes = unsafe { core::slice::from_raw_parts_mut(module.range.start as *mut u8, module.range.len() as usize) };
    let token = crate::net::auth::MgmtToken::from_module(bytes);
    bytes.fill(0);
    match token {
        Ok(token) => Some(token),
        Err(err) => fail(format_args!("{err}")),
    }
}

/// The cluster key from the `cluster-key` module, handed to the replication link; the module's
/// bytes are zeroed and never logged. A module that is not exactly 32 bytes stops the boot, as
/// does a replicating host with `repl_auth=on` and no module.
fn cluster_key(boot: &BootInfo<'_>, config: &Config) {
    use crate::net::repl::nic::{install_cluster_key, CLUSTER_KEY_MODULE};
    let replicating = config.role != config::Role::Standalone;
    let Some(module) = boot.modules.iter().find(|m| m.cmdline.split_whitespace().next() == Some(CLUSTER_KEY_MODULE))
    else {
        if replicating && config.repl_auth {
            fail(format_args!("replication link: {}", crate::net::repl::nic::ReplError::NoClusterKey));
        }
        return;
    };
    // SAFETY: the boot loader placed the module at this range, which `init_frames` reserved from
    // the frame allocator and the host page tables identity-map; nothing else refers to it.
    let bytes = unsafe { core::slice::from_raw_parts_mut(module.range.start as *mut u8, module.range.len() as usize) };
    let key = crate::seal::ClusterKey::from_bytes(bytes);
    bytes.fill(0);
    match key {
        Ok(key) => {
            log::info!("module `{CLUSTER_KEY_MODULE}`: a 32-byte cluster key (not shown)");
            install_cluster_key(key);
        }
        Err(err) => {
            fail(format_args!("module `{CLUSTER_KEY_MODULE}`: {err} random bytes (`cargo xtask image` writes one)"))
        }
    }
}

/// Reports a fatal start-up error and stops with a failure status.
fn fail(args: core::fmt::Arguments<'_>) -> ! {
    let _ = writeln!(serial::emergency_writer(), "FATAL: {args}");
    shutdown::exit(shutdown::ExitStatus::Failure)
}
