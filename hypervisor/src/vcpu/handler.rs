//! The vendor-neutral exit handler: one place that decides what every [`VmExit`] means for a
//! guest. Backends only translate hardware exits into `VmExit`s and apply [`Decision`]s.
//!
//! Guest time is the coarse clock: ticks since the guest started, supplied by the runner. Guests
//! never see host time: RDTSC exits and returns `ticks * VIRTUAL_TSC_PER_TICK`.
#![deny(unsafe_code)]

use guest_shim::abi::{Hypercall, HypercallError, CONSOLE_WRITE_MAX};

use super::cpuid::{self, CpuidValues, GuestFeatures};
use super::cr::{self, CrWrite};
use super::msr::{self, GuestMsrs, MsrSlot};
use super::{read_gpr, write_gpr, CrAccess, Decision, Exception, ExitCounters, GuestEnd, HardwareMsr, Vcpu, VmExit};
use crate::guest::GuestMemory;

/// The guest's virtual TSC rate: 1 GHz at one tick per millisecond.
pub const VIRTUAL_TSC_PER_TICK: u64 = 1_000_000;
/// Longest panic message kept.
const PANIC_MESSAGE_MAX: u64 = 256;
/// Console lines are cut at this length.
const CONSOLE_LINE_MAX: usize = 200;

/// What the handler needs from the host for one exit.
pub struct HostServices<'a> {
    /// The guest clock now, in ticks since the guest started.
    pub now_ticks: u64,
    /// The host's CPUID.
    pub cpuid: &'a dyn Fn(u32, u32) -> CpuidValues,
    /// Prints one complete line of the guest's console.
    pub console_line: &'a mut dyn FnMut(&str),
    /// The guest's devices (the NIC and block hypercalls go here).
    pub devices: &'a mut dyn crate::devices::DeviceCalls,
}

impl core::fmt::Debug for HostServices<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostServices").field("now_ticks", &self.now_ticks).finish_non_exhaustive()
    }
}

/// Per-guest handler state.
#[derive(Debug)]
pub struct ExitHandler {
    msrs: GuestMsrs,
    console: heapless::Vec<u8, CONSOLE_LINE_MAX>,
    time_limit_ticks: u64,
    /// Exits seen, by kind.
    pub counters: ExitCounters,
    /// Hypercalls refused with an error code.
    pub refused_hypercalls: u64,
    /// Port I/O the guest attempted (there are no devices behind ports).
    pub ignored_port_io: u64,
    marks: heapless::Vec<u64, 8>,
}

impl ExitHandler {
    /// A handler for a guest that may run for `time_limit_ticks` ticks.
    pub fn new(time_limit_ticks: u64) -> Self {
        Self {
            msrs: GuestMsrs::default(),
            console: heapless::Vec::new(),
            time_limit_ticks,
            counters: ExitCounters::default(),
            refused_hypercalls: 0,
            ignored_port_io: 0,
            marks: heapless::Vec::new(),
        }
    }

    /// The MSRs this handler keeps, for vCPU state capture.
    pub fn msrs(&self) -> [u64; 6] {
        self.msrs.all()
    }

    /// Restores the MSRs this handler keeps (vCPU reset).
    pub fn set_msrs(&mut self, values: [u64; 6]) {
        self.msrs.set_all(values);
    }

    /// The console bytes of a line not yet finished (console device state).
    pub fn console_pending(&self) -> &[u8] {
        &self.console
    }

    /// Restores an unfinished console line (console device state), cut to the line length.
    pub fn set_console_pending(&mut self, bytes: &[u8]) {
        self.console.clear();
        let _ = self.console.extend_from_slice(&bytes[..bytes.len().min(CONSOLE_LINE_MAX)]);
    }

    /// Takes the test marks the guest set since the last call (hypercall `TestMark`).
    pub fn take_marks(&mut self) -> heapless::Vec<u64, 8> {
        core::mem::take(&mut self.marks)
    }

    /// The guest's end if it has used up its time.
    pub fn check_time_limit(&self, now_ticks: u64) -> Option<GuestEnd> {
        (now_ticks >= self.time_limit_ticks).then_some(GuestEnd::TimeLimit { ticks: self.time_limit_ticks })
    }

    /// Decides what `exit` means. Register results are written to `vcpu` here; RIP is not: the
    /// runner applies the decision.
    pub fn handle(
        &mut self,
        exit: &VmExit,
        vcpu: &mut dyn Vcpu,
        mem: &mut dyn GuestMemory,
        host: &mut HostServices<'_>,
    ) -> Decision {
        self.counters.record(exit);
        // SWAPGS runs natively and exchanges GS.base with IA32_KERNEL_GS_BASE: take the CPU's
        // value so the store (what RDMSR and state capture read) follows it.
        let kgs = HardwareMsr::KernelGsBase;
        if let Some(MsrSlot::Stored(index)) = msr::slot(msr::numbers::IA32_KERNEL_GS_BASE) {
            self.msrs.set(index, vcpu.hardware_msr(kgs));
        }
        match *exit {
            VmExit::Cpuid { leaf, subleaf } => {
                let features = GuestFeatures { rdtscp: vcpu.rdtscp_intercepted() };
                let v = cpuid::filter(leaf, subleaf, (host.cpuid)(leaf, subleaf), features);
                let r = vcpu.registers();
                (r.rax, r.rbx, r.rcx, r.rdx) = (v.eax.into(), v.ebx.into(), v.ecx.into(), v.edx.into());
                Decision::Advance
            }
            VmExit::MsrRead { msr } => match self.read_msr(msr, vcpu, host.now_ticks) {
                Some(value) => {
                    let r = vcpu.registers();
                    (r.rax, r.rdx) = (value & 0xFFFF_FFFF, value >> 32);
                    Decision::Advance
                }
                None => Decision::Inject(Exception::GENERAL_PROTECTION),
            },
            VmExit::MsrWrite { msr, value } => {
                if self.write_msr(msr, value, vcpu) {
                    Decision::Advance
                } else {
                    Decision::Inject(Exception::GENERAL_PROTECTION)
                }
            }
            VmExit::Io { string: true, .. } => {
                Decision::End(GuestEnd::Unsupported { what: "string port I/O (no port devices)", exit: *exit })
            }
            VmExit::Io { size, write, .. } => {
                self.ignored_port_io += 1;
                if !write {
                    // No device answers: the bus floats high. IN AL/AX merges into RAX; IN EAX is
                    // a 32-bit destination and zero-extends into RAX (SDM Vol. 1 §3.4.1.1).
                    let r = vcpu.registers();
                    r.rax = match size {
                        1 => r.rax | 0xFF,
                        2 => r.rax | 0xFFFF,
                        _ => 0xFFFF_FFFF,
                    };
                }
                Decision::Advance
            }
            VmExit::Hlt => Decision::End(GuestEnd::HaltedForever),
            VmExit::Hypercall => self.hypercall(vcpu, mem, host),
            VmExit::Rdtsc => {
                let tsc = host.now_ticks.wrapping_mul(VIRTUAL_TSC_PER_TICK);
                let r = vcpu.registers();
                (r.rax, r.rdx) = (tsc & 0xFFFF_FFFF, tsc >> 32);
                Decision::Advance
            }
            VmExit::Rdtscp => {
                // RDTSCP: EDX:EAX = TSC, ECX = IA32_TSC_AUX[31:0] (SDM Vol. 2B RDTSCP).
                let tsc = host.now_ticks.wrapping_mul(VIRTUAL_TSC_PER_TICK);
                let aux = self.read_msr(msr::numbers::IA32_TSC_AUX, vcpu, host.now_ticks).unwrap_or(0);
                let r = vcpu.registers();
                (r.rax, r.rdx, r.rcx) = (tsc & 0xFFFF_FFFF, tsc >> 32, aux & 0xFFFF_FFFF);
                Decision::Advance
            }
            // INVD is handled as WBINVD: under EPT/NPT with write-back memory the caches are
            // coherent, so writing back is nothing to do, and discarding is never done.
            VmExit::Invd => Decision::Advance,
            // RDPMC: "#GP(0) if ECX does not specify a valid counter" (SDM Vol. 2B); the guest's
            // CPUID (leaf 0xA empty) gives it none.
            VmExit::Rdpmc => Decision::Inject(Exception::GENERAL_PROTECTION),
            VmExit::Xsetbv | VmExit::VirtualizationInstruction | VmExit::UndefinedInstruction { .. } => {
                Decision::Inject(Exception::INVALID_OPCODE)
            }
            VmExit::NestedPageFault { gpa, access } => Decision::End(GuestEnd::MemoryViolation { gpa, access }),
            VmExit::NestedPageMisconfig { .. } => Decision::End(GuestEnd::Unsupported {
                what: "second-level page table entry (hypervisor bug)",
                exit: *exit,
            }),
            VmExit::ExternalInterrupt { .. } | VmExit::PreemptionTimer | VmExit::DirtyLogFull => Decision::Resume,
            VmExit::TripleFault => Decision::End(GuestEnd::TripleFault),
            VmExit::ControlRegisterAccess { cr, access } => self.control_register(cr, access, exit, vcpu, host),
            VmExit::EntryFailed { reason, qualification } => {
                Decision::End(GuestEnd::EntryFailed { reason, qualification })
            }
            VmExit::Unhandled { .. } => Decision::End(GuestEnd::Unsupported { what: "exit reason", exit: *exit }),
        }
    }

    /// MOV to/from CR, CLTS and LMSW, completed for the guest as the CPU would (see [`cr`]).
    fn control_register(
        &mut self,
        number: u8,
        access: CrAccess,
        exit: &VmExit,
        vcpu: &mut dyn Vcpu,
        host: &mut HostServices<'_>,
    ) -> Decision {
        let state = vcpu.control_state();
        let write = match (number, access) {
            (_, CrAccess::Read { gpr }) => {
                let value = match number {
                    0 => state.cr0,
                    3 => state.cr3,
                    4 => state.cr4,
                    8 => state.cr8,
                    // CR1, CR5-CR7, CR9-CR15 do not exist: #UD (SDM Vol. 2B MOV CR).
                    _ => return Decision::Inject(Exception::INVALID_OPCODE),
                };
                write_gpr(vcpu, gpr, value);
                return Decision::Advance;
            }
            (0, CrAccess::Write { gpr }) => cr::write_cr0(&state, read_gpr(vcpu, gpr)),
            (0, CrAccess::Clts) => cr::clts(&state),
            (0, CrAccess::Lmsw { source: Some(source) }) => cr::lmsw(&state, source),
            (0, CrAccess::Lmsw { source: None }) => CrWrite::Unsupported("LMSW with a memory operand"),
            (4, CrAccess::Write { gpr }) => {
                let features = GuestFeatures { rdtscp: vcpu.rdtscp_intercepted() };
                let guest_cpuid = |leaf, subleaf| cpuid::filter(leaf, subleaf, (host.cpuid)(leaf, subleaf), features);
                cr::write_cr4(&state, read_gpr(vcpu, gpr), cr::cr4_allowed(&guest_cpuid))
            }
            (8, CrAccess::Write { gpr }) => cr::write_cr8(read_gpr(vcpu, gpr)),
            (3, CrAccess::Write { .. }) => CrWrite::Unsupported("CR3 write exit (this CPU forces CR3-load exiting)"),
            _ => return Decision::Inject(Exception::INVALID_OPCODE),
        };
        match write {
            CrWrite::Load(value) => {
                vcpu.set_control_register(number, value);
                Decision::Advance
            }
            CrWrite::GeneralProtection => Decision::Inject(Exception::GENERAL_PROTECTION),
            CrWrite::Unsupported(what) => Decision::End(GuestEnd::Unsupported { what, exit: *exit }),
        }
    }

    fn read_msr(&self, msr: u32, vcpu: &dyn Vcpu, now_ticks: u64) -> Option<u64> {
        Some(match msr::slot(msr)? {
            MsrSlot::Hardware(which) => vcpu.hardware_msr(which),
            MsrSlot::Stored(index) => self.msrs.get(index),
            MsrSlot::Tsc => now_ticks.wrapping_mul(VIRTUAL_TSC_PER_TICK),
            MsrSlot::Constant(value) => value,
        })
    }

    /// Applies an allowed, valid MSR write; false means #GP.
    fn write_msr(&mut self, msr: u32, value: u64, vcpu: &mut dyn Vcpu) -> bool {
        let Some(slot) = msr::slot(msr) else { return false };
        match slot {
            MsrSlot::Hardware(HardwareMsr::Efer) => {
                let current = vcpu.hardware_msr(HardwareMsr::Efer);
                if (current ^ value) & !msr::EFER_GUEST_WRITABLE != 0 {
                    return false;
                }
                vcpu.set_hardware_msr(HardwareMsr::Efer, value);
            }
            MsrSlot::Hardware(HardwareMsr::SysenterCs) => {
                if value >> 32 != 0 {
                    return false;
                }
                vcpu.set_hardware_msr(HardwareMsr::SysenterCs, value);
            }
            MsrSlot::Hardware(
                which @ (HardwareMsr::FsBase
                | HardwareMsr::GsBase
                | HardwareMsr::SysenterEsp
                | HardwareMsr::SysenterEip),
            ) => {
                if !msr::is_canonical(value) {
                    return false;
                }
                vcpu.set_hardware_msr(which, value);
            }
            MsrSlot::Hardware(HardwareMsr::Pat) => {
                if !msr::is_valid_pat(value) {
                    return false;
                }
                vcpu.set_hardware_msr(HardwareMsr::Pat, value);
            }
            MsrSlot::Stored(index) => {
                let address_msr = matches!(
                    msr,
                    msr::numbers::IA32_LSTAR | msr::numbers::IA32_CSTAR | msr::numbers::IA32_KERNEL_GS_BASE
                );
                // IA32_FMASK and IA32_TSC_AUX: bits 63:32 are reserved (#GP if set).
                let upper_reserved = matches!(msr, msr::numbers::IA32_TSC_AUX | msr::numbers::IA32_FMASK);
                if (address_msr && !msr::is_canonical(value)) || (upper_reserved && value >> 32 != 0) {
                    return false;
                }
                self.msrs.set(index, value);
                if let Some(&hardware) = HardwareMsr::SYSCALL.get(index) {
                    vcpu.set_hardware_msr(hardware, value);
                }
            }
            // The SYSCALL MSRs are `Stored` (the store is their record); never slotted here.
            MsrSlot::Hardware(
                HardwareMsr::Star
                | HardwareMsr::Lstar
                | HardwareMsr::Cstar
                | HardwareMsr::Fmask
                | HardwareMsr::KernelGsBase,
            ) => return false,
            // The guest clock is the hypervisor's to keep.
            MsrSlot::Tsc => return false,
            MsrSlot::Constant(expected) => return value == expected,
        }
        true
    }

    fn hypercall(&mut self, vcpu: &mut dyn Vcpu, mem: &mut dyn GuestMemory, host: &mut HostServices<'_>) -> Decision {
        let r = *vcpu.registers();
        let result: Result<u64, HypercallError> = match Hypercall::from_number(r.rax) {
            None => Err(HypercallError::UnknownHypercall),
            Some(Hypercall::ConsoleWrite) => {
                if r.rsi > CONSOLE_WRITE_MAX {
                    Err(HypercallError::TooLong)
                } else {
                    match mem.slice(r.rdi, r.rsi) {
                        Ok(bytes) => {
                            self.console_bytes(bytes, host.console_line);
                            Ok(r.rsi)
                        }
                        Err(_) => Err(HypercallError::BadAddress),
                    }
                }
            }
            Some(Hypercall::ClockNow) => Ok(host.now_ticks),
            Some(Hypercall::TestMark) => {
                // A full mark list drops the oldest: marks are a test aid, never a reason to fail.
                if self.marks.is_full() {
                    self.marks.remove(0);
                }
                let _ = self.marks.push(r.rdi);
                Ok(0)
            }
            Some(Hypercall::BlockUntil) => {
                if r.rdi <= host.now_ticks {
                    Ok(host.now_ticks)
                } else {
                    return Decision::BlockUntil { deadline: r.rdi.min(self.time_limit_ticks) };
                }
            }
            Some(Hypercall::Shutdown) => {
                self.flush_console(host.console_line);
                return Decision::End(GuestEnd::Shutdown { status: r.rdi });
            }
            Some(Hypercall::Panic) => match mem.slice(r.rdi, r.rsi.min(PANIC_MESSAGE_MAX)) {
                Ok(bytes) => {
                    self.flush_console(host.console_line);
                    let mut message = alloc::string::String::new();
                    escape_console(bytes, &mut message);
                    return Decision::End(GuestEnd::Panic { message });
                }
                Err(_) => Err(HypercallError::BadAddress),
            },
            Some(
                call @ (Hypercall::NetAttach | Hypercall::NetNotify | Hypercall::BlockInfo | Hypercall::BlockRequest),
            ) => host.devices.call(call, [r.rdi, r.rsi, r.rdx], mem),
        };
        vcpu.registers().rax = match result {
            Ok(value) => value,
            Err(e) => {
                self.refused_hypercalls += 1;
                e.to_rax()
            }
        };
        Decision::Advance
    }

    /// Buffers console bytes into lines (raw; [`escape_console`] makes them printable on flush).
    fn console_bytes(&mut self, bytes: &[u8], out: &mut dyn FnMut(&str)) {
        for &b in bytes {
            if b == b'\n' {
                self.flush_console(out);
                continue;
            }
            if self.console.push(b).is_err() {
                self.flush_console(out);
                let _ = self.console.push(b);
            }
        }
    }

    /// Emits a partial line, if any (at guest end, so nothing is lost).
    pub fn flush_console(&mut self, out: &mut dyn FnMut(&str)) {
        if !self.console.is_empty() {
            let mut text = alloc::string::String::new();
            escape_console(&self.console, &mut text);
            out(&text);
            self.console.clear();
        }
    }
}

/// Makes guest console bytes safe for the operator's terminal: printable ASCII passes, a
/// backslash becomes `\\`, tab `\t`, carriage return `\r`, a valid non-ASCII character
/// `\u{XXXX}`, and every other byte (control bytes, bytes of invalid UTF-8) `\xNN`. The result
/// is pure printable ASCII, so no guest can send escape sequences or raw bytes >= 0x80 to the
/// serial console, and nothing printable is lost.
pub fn escape_console(bytes: &[u8], out: &mut alloc::string::String) {
    use core::fmt::Write as _;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let _ = match c {
                '\\' => out.write_str("\\\\"),
                '\t' => out.write_str("\\t"),
                '\r' => out.write_str("\\r"),
                ' '..='~' => out.write_char(c),
                c if c.is_ascii() => write!(out, "\\x{:02x}", c as u32),
                c => write!(out, "\\u{{{:x}}}", c as u32),
            };
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestRam;
    use crate::vcpu::{GuestRegisters, VcpuError};
    use std::string::{String, ToString};
    use std::vec::Vec;

    #[derive(Default)]
    struct FakeVcpu {
        regs: GuestRegisters,
        efer: u64,
        fs: u64,
        rsp: u64,
        control: crate::vcpu::ControlState,
        syscall: [u64; 5],
    }

    impl Vcpu for FakeVcpu {
        fn run(&mut self) -> Result<VmExit, VcpuError> {
            unreachable!()
        }
        fn registers(&mut self) -> &mut GuestRegisters {
            &mut self.regs
        }
        fn rip(&self) -> u64 {
            0
        }
        fn rflags(&self) -> u64 {
            2
        }
        fn skip_instruction(&mut self) {}
        fn inject(&mut self, _: Exception) {}
        fn hardware_msr(&self, msr: HardwareMsr) -> u64 {
            match msr {
                HardwareMsr::Efer => self.efer,
                HardwareMsr::FsBase => self.fs,
                other => HardwareMsr::SYSCALL.iter().position(|m| *m == other).map_or(0, |i| self.syscall[i]),
            }
        }
        fn set_hardware_msr(&mut self, msr: HardwareMsr, value: u64) {
            match msr {
                HardwareMsr::Efer => self.efer = value,
                HardwareMsr::FsBase => self.fs = value,
                other => {
                    if let Some(i) = HardwareMsr::SYSCALL.iter().position(|m| *m == other) {
                        self.syscall[i] = value;
                    }
                }
            }
        }
        fn rsp(&self) -> u64 {
            self.rsp
        }
        fn set_rsp(&mut self, value: u64) {
            self.rsp = value;
        }
        fn control_state(&self) -> crate::vcpu::ControlState {
            crate::vcpu::ControlState { efer: self.efer, ..self.control }
        }
        fn set_control_register(&mut self, cr: u8, value: u64) {
            match cr {
                0 => self.control.cr0 = value,
                3 => self.control.cr3 = value,
                4 => self.control.cr4 = value,
                _ => self.control.cr8 = value,
            }
        }
        fn rdtscp_intercepted(&self) -> bool {
            true
        }
        fn set_time_slice(&mut self, _: u64) {}
        fn hypercall_insn(&self) -> guest_shim::abi::HypercallInsn {
            guest_shim::abi::HypercallInsn::Vmcall
        }
        fn dump(&self, _: &mut dyn core::fmt::Write) -> core::fmt::Result {
            Ok(())
        }
        fn backend_name(&self) -> &'static str {
            "fake"
        }
        fn release(&mut self, _: &mut crate::memory::FrameAllocator) {}
    }

    struct Rig {
        handler: ExitHandler,
        vcpu: FakeVcpu,
        ram: Vec<u8>,
        lines: Vec<String>,
        now: u64,
    }

    impl Rig {
        fn new() -> Self {
            let control = crate::vcpu::ControlState {
                cr0: 0x8000_0033,
                cr3: 0x2000,
                cr4: 0x620,
                long_mode: true,
                ..Default::default()
            };
            let vcpu = FakeVcpu { efer: crate::guest::boot::GUEST_EFER, control, ..Default::default() };
            Self { handler: ExitHandler::new(1000), vcpu, ram: std::vec![0; 1 << 20], lines: Vec::new(), now: 5 }
        }

        fn exit(&mut self, exit: VmExit) -> Decision {
            // Leaf 1: FXSR, SSE, PAE, PGE (EDX); everything in ECX. Leaf 7: nothing.
            let cpuid = |leaf: u32, _| match leaf {
                7 => CpuidValues::default(),
                _ => CpuidValues { eax: leaf, ebx: 0, ecx: u32::MAX, edx: 0x0300_2040 },
            };
            let lines = &mut self.lines;
            let mut console = |l: &str| lines.push(l.to_string());
            let mut devices = crate::devices::NoDevices;
            let mut host =
                HostServices { now_ticks: self.now, cpuid: &cpuid, console_line: &mut console, devices: &mut devices };
            let mut mem = GuestRam::new(&mut self.ram);
            self.handler.handle(&exit, &mut self.vcpu, &mut mem, &mut host)
        }

        fn hypercall(&mut self, number: u64, a0: u64, a1: u64) -> Decision {
            (self.vcpu.regs.rax, self.vcpu.regs.rdi, self.vcpu.regs.rsi) = (number, a0, a1);
            self.exit(VmExit::Hypercall)
        }
    }

    #[test]
    fn cpuid_results_are_filtered_into_registers() {
        let mut rig = Rig::new();
        rig.vcpu.regs.rbx = u64::MAX;
        assert_eq!(rig.exit(VmExit::Cpuid { leaf: 1, subleaf: 0 }), Decision::Advance);
        assert_eq!(rig.vcpu.regs.rcx & (1 << 5), 0, "VMX hidden");
        assert_eq!(rig.vcpu.regs.rbx, 0, "upper half cleared");
    }

    #[test]
    fn msrs_outside_the_allow_list_get_gp() {
        let mut rig = Rig::new();
        assert_eq!(rig.exit(VmExit::MsrRead { msr: 0x480 }), Decision::Inject(Exception::GENERAL_PROTECTION));
        assert_eq!(rig.exit(VmExit::MsrWrite { msr: 0x3A, value: 5 }), Decision::Inject(Exception::GENERAL_PROTECTION));
        assert_eq!(rig.exit(VmExit::MsrWrite { msr: 0x10, value: 5 }), Decision::Inject(Exception::GENERAL_PROTECTION));
    }

    #[test]
    fn msr_writes_are_validated_and_read_back() {
        let mut rig = Rig::new();
        let lme_off = crate::guest::boot::GUEST_EFER & !(1 << 8);
        assert_eq!(
            rig.exit(VmExit::MsrWrite { msr: msr::numbers::IA32_EFER, value: lme_off }),
            Decision::Inject(Exception::GENERAL_PROTECTION)
        );
        let sce = crate::guest::boot::GUEST_EFER | 1;
        assert_eq!(rig.exit(VmExit::MsrWrite { msr: msr::numbers::IA32_EFER, value: sce }), Decision::Advance);
        assert_eq!(rig.vcpu.efer, sce);
        assert_eq!(
            rig.exit(VmExit::MsrWrite { msr: msr::numbers::IA32_FS_BASE, value: 0x8000_0000_0000 }),
            Decision::Inject(Exception::GENERAL_PROTECTION)
        );
        assert_eq!(rig.exit(VmExit::MsrWrite { msr: msr::numbers::IA32_LSTAR, value: 0x1234 }), Decision::Advance);
        assert_eq!(rig.exit(VmExit::MsrRead { msr: msr::numbers::IA32_LSTAR }), Decision::Advance);
        assert_eq!((rig.vcpu.regs.rax, rig.vcpu.regs.rdx), (0x1234, 0));
        assert_eq!(rig.vcpu.syscall[1], 0x1234, "LSTAR reaches the CPU (SYSCALL uses it)");
        let fmask = VmExit::MsrWrite { msr: msr::numbers::IA32_FMASK, value: 1 << 32 };
        assert_eq!(rig.exit(fmask), Decision::Inject(Exception::GENERAL_PROTECTION), "FMASK[63:32] reserved");
        // A native SWAPGS changed IA32_KERNEL_GS_BASE in the CPU: RDMSR follows it.
        rig.vcpu.syscall[4] = 0xFFFF_8000_0000_1000;
        assert_eq!(rig.exit(VmExit::MsrRead { msr: msr::numbers::IA32_KERNEL_GS_BASE }), Decision::Advance);
        assert_eq!((rig.vcpu.regs.rax, rig.vcpu.regs.rdx), (0x1000, 0xFFFF_8000));
        assert_eq!(rig.handler.msrs()[4], 0xFFFF_8000_0000_1000, "state capture sees it too");
    }

    #[test]
    fn console_hypercall_checks_pointer_and_length() {
        let mut rig = Rig::new();
        rig.ram[0x2000..0x200C].copy_from_slice(b"hello\nworld\n");
        assert_eq!(rig.hypercall(1, 0x2000, 12), Decision::Advance);
        assert_eq!(rig.vcpu.regs.rax, 12);
        assert_eq!(rig.lines, ["hello", "world"]);
        rig.hypercall(1, 1 << 20, 1);
        assert_eq!(rig.vcpu.regs.rax, HypercallError::BadAddress.to_rax());
        rig.hypercall(1, u64::MAX, 2);
        assert_eq!(rig.vcpu.regs.rax, HypercallError::BadAddress.to_rax());
        rig.hypercall(1, 0, CONSOLE_WRITE_MAX + 1);
        assert_eq!(rig.vcpu.regs.rax, HypercallError::TooLong.to_rax());
        rig.hypercall(0xdead, 0, 0);
        assert_eq!(rig.vcpu.regs.rax, HypercallError::UnknownHypercall.to_rax());
        assert_eq!(rig.handler.refused_hypercalls, 4);
    }

    #[test]
    fn device_hypercalls_reach_the_devices() {
        let mut rig = Rig::new();
        for call in [Hypercall::NetAttach, Hypercall::NetNotify, Hypercall::BlockInfo, Hypercall::BlockRequest] {
            assert_eq!(rig.hypercall(call as u64, 0x1000, 0x2000), Decision::Advance);
            assert_eq!(rig.vcpu.regs.rax, HypercallError::NoDevice.to_rax(), "{call:?}");
        }
        assert_eq!(rig.handler.refused_hypercalls, 4);
    }

    #[test]
    fn clock_block_shutdown_and_panic() {
        let mut rig = Rig::new();
        rig.hypercall(2, 0, 0);
        assert_eq!(rig.vcpu.regs.rax, 5);
        assert_eq!(rig.hypercall(3, 3, 0), Decision::Advance, "a deadline in the past returns at once");
        assert_eq!(rig.hypercall(3, 50, 0), Decision::BlockUntil { deadline: 50 });
        assert_eq!(rig.hypercall(3, u64::MAX, 0), Decision::BlockUntil { deadline: 1000 }, "capped at the time limit");
        rig.ram[0x3000..0x3004].copy_from_slice(b"boom");
        assert_eq!(rig.hypercall(5, 1 << 21, 4), Decision::Advance, "bad panic pointer is refused, not fatal");
        match rig.hypercall(5, 0x3000, 4) {
            Decision::End(GuestEnd::Panic { message }) => assert_eq!(message.as_str(), "boom"),
            other => panic!("{other:?}"),
        }
        rig.ram[0x3000..0x3005].copy_from_slice(b"x\x1b[J\xff");
        match rig.hypercall(5, 0x3000, 6) {
            Decision::End(GuestEnd::Panic { message }) => assert_eq!(message.as_str(), "x\\x1b[J\\xff\\x00"),
            other => panic!("{other:?}"),
        }
        assert_eq!(rig.hypercall(4, 7, 0), Decision::End(GuestEnd::Shutdown { status: 7 }));
    }

    #[test]
    fn rdtsc_is_the_coarse_clock_and_io_floats_high() {
        let mut rig = Rig::new();
        rig.exit(VmExit::Rdtsc);
        assert_eq!(rig.vcpu.regs.rax, 5 * VIRTUAL_TSC_PER_TICK);
        rig.vcpu.regs.rax = 0x1234_5600;
        rig.exit(VmExit::Io { port: 0x60, size: 1, write: false, string: false });
        assert_eq!(rig.vcpu.regs.rax, 0x1234_56FF);
        rig.vcpu.regs.rax = u64::MAX - 5;
        rig.exit(VmExit::Io { port: 0x60, size: 4, write: false, string: false });
        assert_eq!(rig.vcpu.regs.rax, 0xFFFF_FFFF, "a 32-bit IN zero-extends");
        assert!(matches!(
            rig.exit(VmExit::Io { port: 0x60, size: 1, write: false, string: true }),
            Decision::End(GuestEnd::Unsupported { .. })
        ));
    }

    #[test]
    fn control_register_accesses_are_completed_as_the_cpu_would() {
        let mut rig = Rig::new();
        let cr = |access| VmExit::ControlRegisterAccess { cr: 8, access };
        // MOV to CR8 from RBX (x86 register 3), then MOV from CR8 to RSP (register 4).
        rig.vcpu.regs.rbx = 9;
        assert_eq!(rig.exit(cr(CrAccess::Write { gpr: 3 })), Decision::Advance);
        assert_eq!(rig.exit(cr(CrAccess::Read { gpr: 4 })), Decision::Advance);
        assert_eq!(rig.vcpu.rsp, 9, "CR8 reads back into RSP");
        rig.vcpu.regs.rbx = 16;
        assert_eq!(rig.exit(cr(CrAccess::Write { gpr: 3 })), Decision::Inject(Exception::GENERAL_PROTECTION));
        let cr0 = |access| VmExit::ControlRegisterAccess { cr: 0, access };
        rig.vcpu.regs.rax = 0x8000_0032; // PE cleared while PG is set
        assert_eq!(rig.exit(cr0(CrAccess::Write { gpr: 0 })), Decision::Inject(Exception::GENERAL_PROTECTION));
        rig.vcpu.regs.rax = 0xC000_0033; // CD set: valid
        assert_eq!(rig.exit(cr0(CrAccess::Write { gpr: 0 })), Decision::Advance);
        assert_eq!(rig.vcpu.control.cr0, 0xC000_0033);
        rig.vcpu.control.cr0 |= 8;
        assert_eq!(rig.exit(cr0(CrAccess::Clts)), Decision::Advance);
        assert_eq!(rig.vcpu.control.cr0 & 8, 0, "CLTS clears TS");
        assert!(matches!(rig.exit(cr0(CrAccess::Lmsw { source: None })), Decision::End(GuestEnd::Unsupported { .. })));
        let cr4 = |access| VmExit::ControlRegisterAccess { cr: 4, access };
        rig.vcpu.regs.rcx = 0x620 | (1 << 13); // VMXE: hidden in CPUID
        assert_eq!(rig.exit(cr4(CrAccess::Write { gpr: 1 })), Decision::Inject(Exception::GENERAL_PROTECTION));
        rig.vcpu.regs.rcx = 0x6A0; // PGE
        assert_eq!(rig.exit(cr4(CrAccess::Write { gpr: 1 })), Decision::Advance);
        assert_eq!(rig.vcpu.control.cr4, 0x6A0);
        let cr5 = VmExit::ControlRegisterAccess { cr: 5, access: CrAccess::Read { gpr: 0 } };
        assert_eq!(rig.exit(cr5), Decision::Inject(Exception::INVALID_OPCODE));
    }

    #[test]
    fn rdtscp_invd_rdpmc_and_undefined_instructions() {
        let mut rig = Rig::new();
        assert_eq!(rig.exit(VmExit::MsrWrite { msr: msr::numbers::IA32_TSC_AUX, value: 0x42 }), Decision::Advance);
        rig.vcpu.regs.rcx = u64::MAX;
        assert_eq!(rig.exit(VmExit::Rdtscp), Decision::Advance);
        assert_eq!((rig.vcpu.regs.rax, rig.vcpu.regs.rcx), (5 * VIRTUAL_TSC_PER_TICK, 0x42));
        assert_eq!(rig.exit(VmExit::Invd), Decision::Advance, "INVD completes (as WBINVD)");
        assert_eq!(rig.exit(VmExit::Rdpmc), Decision::Inject(Exception::GENERAL_PROTECTION));
        let lock = VmExit::UndefinedInstruction { what: "LOCK prefix" };
        assert_eq!(rig.exit(lock), Decision::Inject(Exception::INVALID_OPCODE));
    }

    #[test]
    fn console_escapes_what_it_cannot_print() {
        let mut rig = Rig::new();
        let line = b"ok \xff\x1b[2J caf\xc3\xa9 tab\tback\\slash \xe2\x82\n";
        rig.ram[0x2000..0x2000 + line.len()].copy_from_slice(line);
        rig.hypercall(1, 0x2000, line.len() as u64);
        assert_eq!(rig.lines, ["ok \\xff\\x1b[2J caf\\u{e9} tab\\tback\\\\slash \\xe2\\x82"]);
        assert!(rig.lines[0].bytes().all(|b| (0x20..0x7F).contains(&b)), "printable ASCII only");
        let mut out = String::new();
        escape_console(b"\x00\x7f\r", &mut out);
        assert_eq!(out, "\\x00\\x7f\\r");
    }

    #[test]
    fn faults_end_the_guest_with_a_reason() {
        let mut rig = Rig::new();
        assert_eq!(rig.exit(VmExit::TripleFault), Decision::End(GuestEnd::TripleFault));
        let npf = VmExit::NestedPageFault { gpa: 0x400_1000, access: crate::vcpu::MemoryAccess::Write };
        let violation = GuestEnd::MemoryViolation { gpa: 0x400_1000, access: crate::vcpu::MemoryAccess::Write };
        assert_eq!(rig.exit(npf), Decision::End(violation));
        assert_eq!(rig.exit(VmExit::VirtualizationInstruction), Decision::Inject(Exception::INVALID_OPCODE));
        assert_eq!(rig.handler.check_time_limit(999), None);
        assert_eq!(rig.handler.check_time_limit(1000), Some(GuestEnd::TimeLimit { ticks: 1000 }));
        assert_eq!(rig.handler.counters.get("triple-fault"), 1);
        assert_eq!(rig.handler.counters.total(), 3);
    }
}
