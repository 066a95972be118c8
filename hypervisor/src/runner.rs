//! The guest runner: [`Guest`] loads a guest module into fresh guest RAM, starts it on a vCPU of
//! the chosen backend, applies the exit handler's decisions until the guest ends, reports how it
//! ended with its exit counters, and frees everything. It also offers what snapshots and the
//! two-host driver need of a live guest: device state save/check/load, its disk, digests.
//!
//! [`apply`] is the one place RIP moves past an exiting instruction. Nothing here imports the
//! modules above it (`snapshot`, `selftest`, `kernel`, the node driver).

use core::fmt::Write;

use alloc::vec::Vec;

use crate::backend::{Backend, BackendError};
use crate::boot_info::BootModule;
use crate::devices::host::{HostDevices, HostHooks};
use crate::devices::pvblock::BlockHook;
use crate::devices::state::{ClockState, ConsoleState, DeviceStateError, DeviceStates};
use crate::devices::{pvblock::PvBlock, pvnet::PvNet, GuestDevices};
use crate::guest::boot::{self, BootError, BootParams};
use crate::guest::digest::{self, GuestDigest};
use crate::guest::elf::{ElfError, GuestImage};
use crate::guest::memory::TrackedMemory;
use crate::guest::GuestMemory;
use crate::guest::{GuestRam, GuestSpec, MemoryError};
use crate::host::{cpu, serial, time};
use crate::memory::{FrameAllocator, FrameError, PhysRange};
use crate::vcpu::cpuid::CpuidValues;
use crate::vcpu::handler::{ExitHandler, HostServices};
use crate::vcpu::{Decision, GuestEnd, Vcpu, VcpuError, VmExit};

/// Guest clock ticks per second (the boot info tells guests).
pub const TICKS_PER_SECOND: u64 = 1000;
/// The preemption time slice unless `time_slice_us=` says otherwise: the hypervisor regains
/// control at least this often.
pub const DEFAULT_TIME_SLICE_US: u64 = 10_000;

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
    /// Guest clock ticks it ran for.
    pub ticks: u64,
}

/// The guest clock: ticks since the guest started, continuing from `base` (a restored guest
/// keeps its own time).
#[derive(Clone, Copy, Debug)]
pub struct GuestClock {
    started_tsc: u64,
    base: u64,
    tsc_per_tick: u64,
}

impl GuestClock {
    /// A clock reading `base` ticks now.
    pub fn starting_at(base: u64) -> Self {
        Self { started_tsc: time::rdtsc(), base, tsc_per_tick: (time::tsc_per_ms() * 1000 / TICKS_PER_SECOND).max(1) }
    }

    /// Ticks now.
    pub fn ticks(&self) -> u64 {
        self.base + (time::rdtsc() - self.started_tsc) / self.tsc_per_tick
    }
}

/// One running guest: its RAM, its vCPU, its exit handler and its clock.
pub struct Guest {
    /// Its name (first word of the module line).
    pub name: alloc::string::String,
    /// Host-physical RAM, mapped at guest-physical 0.
    pub ram: PhysRange,
    /// Its vCPU.
    pub vcpu: alloc::boxed::Box<dyn Vcpu>,
    /// Its exit handler (console, MSRs, counters).
    pub handler: ExitHandler,
    /// Its clock.
    pub clock: GuestClock,
    /// False until the first entry: a guest's time starts when it first runs.
    clock_running: bool,
    /// The preemption time slice in host TSC ticks (`time_slice_us=` on the module line).
    time_slice_tsc: u64,
    /// Host TSC cycles from entry to exit for hypercall exits: (min, sum, count).
    pub hypercall_cycles: (u64, u64, u64),
    /// Its paravirtual devices (`mac=` gives it a NIC, `disk=NAME` the module `disk-NAME`).
    pub devices: GuestDevices<'static>,
    /// The devices' hooks into the host network (and, later, replication).
    pub device_hooks: HostHooks,
    /// Host TSC of the last network poll.
    last_net_poll: u64,
    /// Pages written since the last checkpoint, when dirty logging is on: the backend's log plus
    /// every write the hypervisor makes into guest RAM.
    pub dirty: Option<crate::memory::DirtyLog>,
    /// The last exit.
    pub last_exit: Option<VmExit>,
    /// When set, console lines are also kept here (self-tests compare them).
    pub console_capture: Option<alloc::vec::Vec<alloc::string::String>>,
    /// Console lines the guest has printed (a measure of its progress).
    pub console_lines: u64,
    /// When set (the COLO driver), a `BlockUntil` does not spin inside [`Guest::step`]: the
    /// guest stays blocked until its deadline or input, and each `step` returns at once until
    /// then, so the caller's loop keeps running.
    defer_blocks: bool,
    /// The deadline of a deferred `BlockUntil`.
    blocked_until: Option<u64>,
}

impl core::fmt::Debug for Guest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Guest").field("name", &self.name).field("ram", &self.ram).finish_non_exhaustive()
    }
}

impl Guest {
    /// Allocates RAM, loads the module's ELF image, writes the boot structures and makes a vCPU.
    /// `spec` is the module line, already parsed.
    pub fn create(
        backend: &mut Backend,
        frames: &mut FrameAllocator,
        module: &BootModule<'_>,
        spec: &GuestSpec<'_>,
        guest_mem: u64,
    ) -> Result<Self, StartError> {
        let ram = frames.allocate(guest_mem, 2 << 20).map_err(StartError::Memory)?;
        let result = Self::load(backend, frames, module, spec, ram);
        if result.is_err() {
            if let Err(e) = frames.free(ram) {
                log::error!("freeing guest RAM: {e}");
            }
        }
        result
    }

    fn load(
        backend: &mut Backend,
        frames: &mut FrameAllocator,
        module: &BootModule<'_>,
        spec: &GuestSpec<'_>,
        ram: PhysRange,
    ) -> Result<Self, StartError> {
        let mut mem = ram_of(ram);
        mem.slice_mut(0, ram.len()).map_err(StartError::Load)?.fill(0);
        // SAFETY: the boot loader placed the module at this range, reserved from the allocator
        // and identity-mapped; nothing writes it.
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
        let vcpu = backend.create_vcpu(frames, ram, &entry).map_err(StartError::Backend)?;
        let device_hooks = match spec.mac {
            Some(mac) => HostHooks::install(mac),
            None => HostHooks::without_net(),
        };
        let mut guest = Self {
            name: spec.name.into(),
            ram,
            vcpu,
            handler: ExitHandler::new(spec.time_limit_ms * TICKS_PER_SECOND / 1000),
            clock: GuestClock::starting_at(0),
            clock_running: false,
            time_slice_tsc: DEFAULT_TIME_SLICE_US * time::tsc_per_ms() / 1000,
            hypercall_cycles: (u64::MAX, 0, 0),
            devices: GuestDevices { net: spec.mac.map(PvNet::new), block: None },
            device_hooks,
            last_net_poll: 0,
            dirty: None,
            last_exit: None,
            console_capture: None,
            console_lines: 0,
            defer_blocks: false,
            blocked_until: None,
        };
        if let Some(us) = spec.time_slice_us {
            guest.set_time_slice_us(us);
        }
        Ok(guest)
    }

    /// Sets the preemption time slice (from the next entry on).
    pub fn set_time_slice_us(&mut self, us: u64) {
        self.time_slice_tsc = (us * time::tsc_per_ms() / 1000).max(1);
    }

    /// Puts `hook` beneath the block device: every guest disk read and write goes through it
    /// (the COLO block replica on either role).
    pub fn set_block_hook(&mut self, hook: alloc::boxed::Box<dyn BlockHook>) {
        self.device_hooks.set_block_hook(hook);
    }

    /// The disk's bytes, if the guest has a block device.
    pub fn disk(&self) -> Option<&[u8]> {
        self.devices.block.as_ref().map(PvBlock::disk)
    }

    /// The disk's bytes for writing (a block replica committing beneath the device).
    pub fn disk_mut(&mut self) -> Option<&mut [u8]> {
        self.devices.block.as_mut().map(PvBlock::disk_mut)
    }

    /// Replaces the whole disk (a full sync); it must have the disk's size.
    pub fn replace_disk(&mut self, image: &[u8]) -> Result<(), DeviceStateError> {
        match self.devices.block.as_mut() {
            Some(block) => block.replace_disk(image),
            None => Err(DeviceStateError::Presence { device: "pvblock", in_state: true, in_guest: false }),
        }
    }

    /// Every device's state (the guest is paused: it never runs between `step`s).
    pub fn save_devices(&self) -> DeviceStates {
        let (net, block) = self.devices.save_state();
        DeviceStates {
            clock: ClockState { ticks: self.clock.ticks() },
            console: ConsoleState { pending: self.handler.console_pending().to_vec() },
            net,
            block,
        }
    }

    /// Checks that `states` can be loaded into this guest; changes nothing.
    pub fn check_devices(&self, states: &DeviceStates) -> Result<(), DeviceStateError> {
        self.devices.check_state(states.net.as_ref(), states.block.as_ref(), self.ram.len())
    }

    /// Loads states [`Guest::check_devices`] accepted.
    pub fn load_devices(&mut self, states: &DeviceStates) {
        self.clock = GuestClock::starting_at(states.clock.ticks);
        self.handler.set_console_pending(&states.console.pending);
        self.devices.load_state(states.net.as_ref(), states.block.as_ref());
    }

    /// CRC-32C of all guest RAM and of the whole disk (`checkpoint_verify`).
    pub fn digest(&self) -> GuestDigest {
        let len = self.ram.len();
        let mem = ram_of(self.ram);
        // The whole range is RAM by construction.
        let ram = mem.slice(0, len).unwrap_or(&[]);
        let disk = self.devices.block.as_ref().map_or(&[][..], PvBlock::disk);
        GuestDigest::of(ram, disk)
    }

    /// One CRC-32C per 4 KiB page of guest RAM (to name the first page two hosts disagree on).
    pub fn page_digests(&self) -> Vec<u32> {
        let len = self.ram.len();
        let mem = ram_of(self.ram);
        digest::unit_digests(mem.slice(0, len).unwrap_or(&[]), digest::PAGE_BYTES)
    }

    /// One CRC-32C per 512-byte disk sector (empty without a disk).
    pub fn sector_digests(&self) -> Vec<u32> {
        self.disk().map_or_else(Vec::new, |d| digest::unit_digests(d, digest::SECTOR_BYTES))
    }

    /// Gives the guest the block device over `disk`.
    pub fn attach_disk(&mut self, disk: &'static mut [u8]) {
        log::info!("guest `{}`: block device of {} KiB", self.name, disk.len() >> 10);
        self.devices.block = Some(PvBlock::new(disk));
    }

    /// The guest's RAM.
    pub fn memory(&mut self) -> GuestRam<'_> {
        ram_of(self.ram)
    }

    /// Runs until the guest ends.
    pub fn run_to_end(&mut self) -> GuestEnd {
        loop {
            if let Some(end) = self.step() {
                return end;
            }
        }
    }

    /// Defer `BlockUntil` waits to later [`Guest::step`] calls (see `defer_blocks`).
    pub fn defer_blocks(&mut self, on: bool) {
        self.defer_blocks = on;
    }

    /// Enters the guest once, handles the exit and applies the decision; `Some` when it ended.
    /// With deferred blocks, a guest still waiting is not entered (the call only polls).
    pub fn step(&mut self) -> Option<GuestEnd> {
        if let Some(deadline) = self.blocked_until {
            let (devices, hooks, last_poll, dirty, ram) =
                (&mut self.devices, &mut self.device_hooks, &mut self.last_net_poll, &mut self.dirty, self.ram);
            poll_network(last_poll);
            let woke = hooks.pending()
                && match dirty.as_mut() {
                    Some(log) => devices.deliver_rx(&mut TrackedMemory { ram: ram_of(ram), log }, hooks),
                    None => devices.deliver_rx(&mut ram_of(ram), hooks),
                };
            if !woke && self.clock.ticks() < deadline {
                return None;
            }
            self.blocked_until = None;
            self.vcpu.registers().rax = self.clock.ticks();
        }
        if !self.clock_running {
            // Keep the base (0, or a restored snapshot's ticks); count from the first entry.
            self.clock = GuestClock::starting_at(self.clock.base);
            self.clock_running = true;
        }
        if let Some(end) = self.handler.check_time_limit(self.clock.ticks()) {
            return Some(self.finish(end));
        }
        poll_network(&mut self.last_net_poll);
        self.vcpu.set_time_slice(self.time_slice_tsc);
        let entered = time::rdtsc();
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                report_vcpu(self.vcpu.as_ref(), &self.name, &e);
                return Some(self.finish(GuestEnd::EntryFailed { reason: 0, qualification: entry_error_code(&e) }));
            }
        };
        if exit == VmExit::Hypercall {
            let cycles = time::rdtsc() - entered;
            let (min, sum, count) = self.hypercall_cycles;
            self.hypercall_cycles = (min.min(cycles), sum + cycles, count + 1);
        }
        self.last_exit = Some(exit);
        if exit == VmExit::DirtyLogFull {
            if let Some(log) = self.dirty.as_mut() {
                if let Err(e) = self.vcpu.collect_dirty(log) {
                    log::error!("guest `{}`: draining the dirty log: {e}", self.name);
                }
            }
        }
        let (name, capture, lines) = (self.name.as_str(), &mut self.console_capture, &mut self.console_lines);
        let mut console = |line: &str| {
            *lines += 1;
            console_line(name, capture, line)
        };
        let mut devices = HostDevices { devices: &mut self.devices, hooks: &mut self.device_hooks };
        let mut host = HostServices {
            now_ticks: self.clock.ticks(),
            cpuid: &host_cpuid,
            console_line: &mut console,
            devices: &mut devices,
        };
        let decision = match self.dirty.as_mut() {
            Some(log) => {
                let mut mem = TrackedMemory { ram: ram_of(self.ram), log };
                self.handler.handle(&exit, self.vcpu.as_mut(), &mut mem, &mut host)
            }
            None => self.handler.handle(&exit, self.vcpu.as_mut(), &mut ram_of(self.ram), &mut host),
        };
        if let Decision::End(end) = decision {
            if matches!(end, GuestEnd::Unsupported { .. } | GuestEnd::EntryFailed { .. }) {
                report_vcpu(self.vcpu.as_ref(), &self.name, &end);
            }
            return Some(self.finish(end));
        }
        if let (Decision::BlockUntil { deadline }, true) = (&decision, self.defer_blocks) {
            self.vcpu.skip_instruction();
            self.blocked_until = Some(*deadline);
            return None;
        }
        let (devices, hooks, last_poll, dirty, ram) =
            (&mut self.devices, &mut self.device_hooks, &mut self.last_net_poll, &mut self.dirty, self.ram);
        // A guest blocked in BlockUntil wakes when a frame reaches its RX ring.
        let mut wake = || {
            poll_network(last_poll);
            hooks.pending()
                && match dirty.as_mut() {
                    Some(log) => devices.deliver_rx(&mut TrackedMemory { ram: ram_of(ram), log }, hooks),
                    None => devices.deliver_rx(&mut ram_of(ram), hooks),
                }
        };
        apply(self.vcpu.as_mut(), decision, &self.clock, &mut wake);
        None
    }

    fn finish(&mut self, end: GuestEnd) -> GuestEnd {
        let (name, capture) = (self.name.as_str(), &mut self.console_capture);
        self.handler.flush_console(&mut |line: &str| console_line(name, capture, line));
        end
    }

    /// Logs how the guest ended, with its exit counters and hypercall timing.
    pub fn report(&self, end: &GuestEnd) {
        let name = &self.name;
        log::info!(
            "guest `{name}` {end} after {} ticks; exits: {}; refused hypercalls: {}; ignored port I/O: {}",
            self.clock.ticks(),
            self.handler.counters,
            self.handler.refused_hypercalls,
            self.handler.ignored_port_io
        );
        let (min, sum, count) = self.hypercall_cycles;
        if let Some(mean) = sum.checked_div(count) {
            log::info!("guest `{name}` hypercall round trip (entry to exit, host TSC cycles): min {min}, mean {mean}");
        }
        if self.devices.net.is_some() || self.devices.block.is_some() {
            log::info!(
                "guest `{name}` devices: {}; rx_queue_dropped={}",
                self.devices,
                self.device_hooks.queue_dropped()
            );
        }
    }

    /// Gives back the vCPU's structures and the guest's RAM.
    pub fn destroy(mut self, frames: &mut FrameAllocator) {
        if self.devices.net.is_some() {
            crate::net::clear_guest_hook();
        }
        self.vcpu.release(frames);
        if let Err(e) = frames.free(self.ram) {
            log::error!("freeing guest RAM of `{}`: {e}", self.name);
        }
    }
}

/// Guest RAM at host-physical `ram` as a bounds-checked slice.
fn ram_of(ram: PhysRange) -> GuestRam<'static> {
    // SAFETY: `ram` was taken from the frame allocator for one guest and is identity-mapped and
    // writable; it is freed only by `Guest::destroy`/`create`'s error path, after which no
    // `GuestRam` over it is used. Only the hypervisor's single CPU touches it while the guest is
    // not running.
    GuestRam::new(unsafe { core::slice::from_raw_parts_mut(ram.start as *mut u8, ram.len() as usize) })
}

/// Prints one guest console line, and keeps it when the guest's console is being captured.
fn console_line(name: &str, capture: &mut Option<alloc::vec::Vec<alloc::string::String>>, line: &str) {
    serial::write_fmt(format_args!("[{name}] {line}\n"));
    if let Some(lines) = capture {
        lines.push(line.into());
    }
}

fn host_cpuid(leaf: u32, subleaf: u32) -> CpuidValues {
    let r = cpu::cpuid(leaf, subleaf);
    CpuidValues { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// How often the runner polls the host NICs between exits and while a guest is blocked.
const NET_POLL_INTERVAL_US: u64 = 20;

/// One round of host network work, at most every [`NET_POLL_INTERVAL_US`].
fn poll_network(last_poll_tsc: &mut u64) {
    let now = time::rdtsc();
    if now.wrapping_sub(*last_poll_tsc) >= NET_POLL_INTERVAL_US * time::tsc_per_ms() / 1000 {
        *last_poll_tsc = now;
        // A `shutdown` request is acted on once the guests are done (the idle loop sees it again).
        let _ = crate::net::poll();
    }
}

/// Applies a non-ending decision. The only place RIP is advanced. `wake` ends a BlockUntil
/// early when it returns true (an event for the guest).
fn apply(vcpu: &mut dyn Vcpu, decision: Decision, clock: &GuestClock, wake: &mut dyn FnMut() -> bool) {
    match decision {
        Decision::Resume => {}
        Decision::Advance => vcpu.skip_instruction(),
        Decision::BlockUntil { deadline } => {
            vcpu.skip_instruction();
            while clock.ticks() < deadline {
                if wake() {
                    break;
                }
                core::hint::spin_loop();
            }
            vcpu.registers().rax = clock.ticks();
        }
        Decision::Inject(exception) => vcpu.inject(exception),
        Decision::End(_) => unreachable!("Guest::step handles End before apply"),
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
