//! The vendor-neutral vCPU interface.
//!
//! A backend (VT-x in `vmx`, AMD-V in `svm`) implements [`Vcpu`]: `run()` enters the guest and
//! returns a typed [`VmExit`]. The exit handler ([`handler::ExitHandler`]) turns each exit into
//! a [`Decision`], and the guest runner applies it: the RIP is advanced in exactly one place
//! (`Decision::Advance` → [`Vcpu::skip_instruction`], which also raises the single-step trap).
//! What every exit means on each backend is tabled in `docs/exits.md`.
#![deny(unsafe_code)]

use core::fmt;

pub mod cpuid;
pub mod cr;
pub mod handler;
pub mod msr;
pub mod state;

pub use state::{StateError, VcpuState};

/// The guest's general-purpose registers other than RSP (which lives in the VMCS/VMCB).
/// The world-switch assembly reads and writes this layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

const _: () = assert!(core::mem::size_of::<GuestRegisters>() == 15 * 8);
const _: () = assert!(core::mem::offset_of!(GuestRegisters, rdi) == 5 * 8);
const _: () = assert!(core::mem::offset_of!(GuestRegisters, r15) == 14 * 8);

/// The kind of memory access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryAccess {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

/// Why the guest stopped running, with the details a handler needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// CPUID with EAX = `leaf`, ECX = `subleaf`.
    Cpuid {
        /// EAX.
        leaf: u32,
        /// ECX.
        subleaf: u32,
    },
    /// RDMSR of ECX = `msr`.
    MsrRead {
        /// ECX.
        msr: u32,
    },
    /// WRMSR of EDX:EAX to ECX = `msr`.
    MsrWrite {
        /// ECX.
        msr: u32,
        /// EDX:EAX.
        value: u64,
    },
    /// IN/OUT (and their string forms).
    Io {
        /// The port.
        port: u16,
        /// 1, 2 or 4 bytes.
        size: u8,
        /// OUT (true) or IN (false).
        write: bool,
        /// INS/OUTS.
        string: bool,
    },
    /// HLT.
    Hlt,
    /// VMCALL (VT-x) or VMMCALL (AMD-V): a hypercall.
    Hypercall,
    /// RDTSC.
    Rdtsc,
    /// RDTSCP (the coarse clock plus IA32_TSC_AUX in ECX).
    Rdtscp,
    /// INVD: handled as WBINVD (caches are coherent under EPT/NPT, so nothing to do); a guest
    /// never throws away cache lines the host wrote.
    Invd,
    /// RDPMC: the PMU is hidden (CPUID leaf 0xA is empty), so every counter number is invalid.
    Rdpmc,
    /// An intercepted instruction that the guest's CPU model does not have, or whose encoding is
    /// invalid (a LOCK prefix): the architecture says #UD.
    UndefinedInstruction {
        /// What it was, for reports.
        what: &'static str,
    },
    /// XSETBV.
    Xsetbv,
    /// A VMX/SVM instruction executed by the guest.
    VirtualizationInstruction,
    /// A guest-physical access the second-level tables (EPT/NPT) do not allow.
    NestedPageFault {
        /// The guest-physical address.
        gpa: u64,
        /// What kind of access.
        access: MemoryAccess,
    },
    /// A second-level table entry the hardware considers malformed (a hypervisor bug).
    NestedPageMisconfig {
        /// The guest-physical address.
        gpa: u64,
    },
    /// A physical interrupt arrived while the guest ran.
    ExternalInterrupt {
        /// Its vector, when the CPU acknowledged it on exit.
        vector: Option<u8>,
    },
    /// The preemption timer expired: the hypervisor's deadline.
    PreemptionTimer,
    /// The page-modification log is full (VT-x PML).
    DirtyLogFull,
    /// The guest triple-faulted (VT-x exit 2, AMD-V SHUTDOWN intercept).
    TripleFault,
    /// A control-register access that the guest/host masks (VT-x) or the CR intercepts (AMD-V)
    /// trap, decoded by access type (SDM Vol. 3C §28.2.1, Table 28-3).
    ControlRegisterAccess {
        /// CR number.
        cr: u8,
        /// MOV to/from CR, CLTS or LMSW.
        access: CrAccess,
    },
    /// VM entry failed on a guest-state check; `reason` is the vendor's code.
    EntryFailed {
        /// Vendor exit reason (VT-x 33, 34 or 41; AMD-V VMEXIT_INVALID).
        reason: u32,
        /// The exit qualification.
        qualification: u64,
    },
    /// Any exit this interface does not type.
    Unhandled {
        /// The vendor's raw exit reason.
        reason: u32,
    },
}

/// How an intercepted instruction touched a control register (SDM Vol. 3C Table 28-3 access types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CR from general-purpose register `gpr` (x86 encoding: 0 = RAX ... 4 = RSP ... 15 = R15).
    Write {
        /// The source register.
        gpr: u8,
    },
    /// MOV from CR into general-purpose register `gpr`.
    Read {
        /// The destination register.
        gpr: u8,
    },
    /// CLTS.
    Clts,
    /// LMSW with the 16-bit source, or `None` when it is a memory operand the backend could not
    /// read (AMD-V without decode assists).
    Lmsw {
        /// The source operand.
        source: Option<u16>,
    },
}

/// The guest-visible control state an instruction emulation needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlState {
    /// CR0 as the guest reads it.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest reads it.
    pub cr4: u64,
    /// CR8 (the task-priority register).
    pub cr8: u64,
    /// IA32_EFER as the guest reads it.
    pub efer: u64,
    /// CS.L: the guest runs in 64-bit mode (not compatibility mode).
    pub long_mode: bool,
}

/// Number of [`VmExit`] kinds, for counters.
pub const EXIT_KINDS: usize = 23;

impl VmExit {
    /// A dense index for counters.
    pub const fn kind_index(&self) -> usize {
        match self {
            Self::Cpuid { .. } => 0,
            Self::MsrRead { .. } => 1,
            Self::MsrWrite { .. } => 2,
            Self::Io { .. } => 3,
            Self::Hlt => 4,
            Self::Hypercall => 5,
            Self::Rdtsc => 6,
            Self::Xsetbv => 7,
            Self::VirtualizationInstruction => 8,
            Self::NestedPageFault { .. } => 9,
            Self::NestedPageMisconfig { .. } => 10,
            Self::ExternalInterrupt { .. } => 11,
            Self::PreemptionTimer => 12,
            Self::DirtyLogFull => 13,
            Self::TripleFault => 14,
            Self::ControlRegisterAccess { .. } => 15,
            Self::EntryFailed { .. } => 16,
            Self::Unhandled { .. } => 17,
            Self::Rdtscp => 18,
            Self::Invd => 19,
            Self::Rdpmc => 20,
            Self::UndefinedInstruction { .. } => 21,
        }
    }

    /// The counter names, by [`Self::kind_index`].
    pub const KIND_NAMES: [&'static str; EXIT_KINDS] = [
        "cpuid",
        "rdmsr",
        "wrmsr",
        "io",
        "hlt",
        "hypercall",
        "rdtsc",
        "xsetbv",
        "vmx/svm-instruction",
        "nested-page-fault",
        "nested-page-misconfig",
        "external-interrupt",
        "preemption-timer",
        "dirty-log-full",
        "triple-fault",
        "cr-access",
        "entry-failed",
        "unhandled",
        "rdtscp",
        "invd",
        "rdpmc",
        "undefined-instruction",
        "reserved",
    ];
}

/// Per-exit-kind counters for one guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitCounters {
    counts: [u64; EXIT_KINDS],
}

impl ExitCounters {
    /// Counts one exit.
    pub fn record(&mut self, exit: &VmExit) {
        self.counts[exit.kind_index()] += 1;
    }

    /// The count for the kind named `name`.
    pub fn get(&self, name: &str) -> u64 {
        VmExit::KIND_NAMES.iter().position(|n| *n == name).map_or(0, |i| self.counts[i])
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl fmt::Display for ExitCounters {
    /// `total=N cpuid=3 hypercall=120 ...` (kinds with a zero count are left out).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "total={}", self.total())?;
        for (name, count) in VmExit::KIND_NAMES.iter().zip(self.counts) {
            if count > 0 {
                write!(f, " {name}={count}")?;
            }
        }
        Ok(())
    }
}

/// An exception to deliver to the guest on the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    /// The vector.
    pub vector: u8,
    /// The error code, for vectors that push one.
    pub error_code: Option<u32>,
}

impl Exception {
    /// #UD.
    pub const INVALID_OPCODE: Self = Self { vector: 6, error_code: None };
    /// #GP(0).
    pub const GENERAL_PROTECTION: Self = Self { vector: 13, error_code: Some(0) };
    /// #DB (a trap when raised for single-step).
    pub const DEBUG: Self = Self { vector: 1, error_code: None };
}

/// How a guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest asked to stop with this status.
    Shutdown {
        /// 0 = success.
        status: u64,
    },
    /// The guest reported a panic.
    Panic {
        /// Its message (at most 256 bytes, as the handler reads it).
        message: alloc::string::String,
    },
    /// An access outside the guest's RAM.
    MemoryViolation {
        /// The guest-physical address.
        gpa: u64,
        /// The access.
        access: MemoryAccess,
    },
    /// The guest triple-faulted.
    TripleFault,
    /// The guest ran past its time limit.
    TimeLimit {
        /// The limit, in clock ticks.
        ticks: u64,
    },
    /// HLT with interrupts off and nothing to wake it.
    HaltedForever,
    /// An exit the hypervisor does not handle, or an instruction it does not emulate.
    Unsupported {
        /// What it was.
        what: &'static str,
        /// The exit's details.
        exit: VmExit,
    },
    /// VM entry failed (invalid guest state and the like).
    EntryFailed {
        /// The vendor reason.
        reason: u32,
        /// The qualification.
        qualification: u64,
    },
}

impl GuestEnd {
    /// True for a guest that ended by asking to, with status 0.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Shutdown { status: 0 })
    }
}

impl fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown { status } => write!(f, "shut down with status {status}"),
            Self::Panic { message } => write!(f, "guest panic: {message}"),
            Self::MemoryViolation { gpa, access } => {
                write!(f, "ended: {access:?} access to guest-physical {gpa:#x} outside its RAM")
            }
            Self::TripleFault => write!(f, "ended: triple fault"),
            Self::TimeLimit { ticks } => write!(f, "ended: ran past its time limit of {ticks} ticks"),
            Self::HaltedForever => write!(f, "ended: HLT with interrupts disabled and no wake-up source"),
            Self::Unsupported { what, exit } => write!(f, "ended: unsupported {what} ({exit:?})"),
            Self::EntryFailed { reason, qualification } => {
                write!(f, "ended: VM entry failed (reason {reason}, qualification {qualification:#x})")
            }
        }
    }
}

/// What the runner does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Re-enter at the same RIP (the exit was not caused by an instruction, or it must re-run).
    Resume,
    /// Skip the exiting instruction, then re-enter.
    Advance,
    /// Skip the instruction, wait until the clock reaches `deadline` ticks, put the clock in RAX.
    BlockUntil {
        /// The deadline in clock ticks.
        deadline: u64,
    },
    /// Deliver an exception at the current RIP, then re-enter.
    Inject(Exception),
    /// Stop the guest.
    End(GuestEnd),
}

/// Guest MSRs that live in the VMCS/VMCB rather than in the handler's own store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareMsr {
    /// IA32_EFER.
    Efer,
    /// IA32_FS_BASE.
    FsBase,
    /// IA32_GS_BASE.
    GsBase,
    /// IA32_PAT.
    Pat,
    /// IA32_SYSENTER_CS (CPUID.1:EDX.SEP says it exists).
    SysenterCs,
    /// IA32_SYSENTER_ESP.
    SysenterEsp,
    /// IA32_SYSENTER_EIP.
    SysenterEip,
    /// IA32_STAR (SYSCALL/SYSRET selectors).
    Star,
    /// IA32_LSTAR (64-bit SYSCALL target).
    Lstar,
    /// IA32_CSTAR (compatibility-mode SYSCALL target).
    Cstar,
    /// IA32_FMASK (RFLAGS mask of SYSCALL).
    Fmask,
    /// IA32_KERNEL_GS_BASE (what SWAPGS exchanges with GS.base).
    KernelGsBase,
}

impl HardwareMsr {
    /// The SYSCALL/SWAPGS MSRs, in the order of the exit handler's store and of
    /// `VcpuState::handler_msrs` (STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE).
    pub const SYSCALL: [Self; 5] = [Self::Star, Self::Lstar, Self::Cstar, Self::Fmask, Self::KernelGsBase];
}

/// A failure of the backend itself (as opposed to the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuError {
    /// VMLAUNCH/VMRESUME or VMRUN failed before the guest ran; `code` is the VM-instruction error.
    EntryInstructionFailed {
        /// The VT-x VM-instruction error number (SDM Vol. 3C §31.4), or 0 for VMfailInvalid.
        code: u32,
    },
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EntryInstructionFailed { code } => {
                write!(f, "VM entry instruction failed with VM-instruction error {code}")
            }
        }
    }
}

/// The architectural state a guest starts in, as the boot protocol (`guest_shim::abi`) defines
/// it: 64-bit mode, paging on, flat segments from the guest's own GDT. Backends load exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestEntryState {
    /// The ELF entry point.
    pub rip: u64,
    /// The top of guest RAM.
    pub rsp: u64,
    /// The boot information's guest-physical address.
    pub rdi: u64,
    /// RFLAGS (only the reserved bit 1 set: interrupts off).
    pub rflags: u64,
    /// CR0: PE | MP | ET | NE | PG.
    pub cr0: u64,
    /// CR3: the guest's PML4.
    pub cr3: u64,
    /// CR4: PAE | OSFXSR | OSXMMEXCPT.
    pub cr4: u64,
    /// EFER: LME | LMA | NXE.
    pub efer: u64,
    /// GDTR base.
    pub gdt_base: u64,
    /// GDTR limit.
    pub gdt_limit: u16,
    /// CS.
    pub code_selector: u16,
    /// DS, ES, SS, FS, GS.
    pub data_selector: u16,
}

impl GuestRegisters {
    /// The register with x86 encoding number `n` (0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX, 5 = RBP,
    /// 6 = RSI, 7 = RDI, 8-15 = R8-R15); `None` for 4 (RSP lives in the VMCS/VMCB).
    pub fn by_number(&mut self, n: u8) -> Option<&mut u64> {
        Some(match n & 15 {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => return None,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        })
    }
}

/// Reads general-purpose register `n` (x86 encoding) of `vcpu`, RSP included.
pub fn read_gpr(vcpu: &mut dyn Vcpu, n: u8) -> u64 {
    match vcpu.registers().by_number(n) {
        Some(r) => *r,
        None => vcpu.rsp(),
    }
}

/// Writes general-purpose register `n` (x86 encoding) of `vcpu`, RSP included.
pub fn write_gpr(vcpu: &mut dyn Vcpu, n: u8, value: u64) {
    match vcpu.registers().by_number(n) {
        Some(r) => *r = value,
        None => vcpu.set_rsp(value),
    }
}

/// RFLAGS.TF.
pub const RFLAGS_TF: u64 = 1 << 8;
/// DR6.BS: the debug exception was a single-step trap (SDM Vol. 3A §17.2.3).
pub const DR6_BS: u64 = 1 << 14;

/// How a backend tracks the guest pages it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMethod {
    /// VT-x page-modification log: the CPU appends each newly dirtied page to a buffer.
    Pml,
    /// Scan second-level (EPT/NPT) dirty flags and clear them, descending only into subtrees
    /// whose upper-level Accessed flag shows the processor walked them since the last scan.
    AccessedDirty,
    /// Write-protect tracking: second-level leaves are read-only after each collection; the
    /// first write to a page faults, the backend logs it and makes it writable without leaving
    /// `run`; collection re-protects the logged pages only. 2 MiB leaves stay large until their
    /// first write. Works on every CPU with EPT or NPT.
    WriteProtect,
}

impl DirtyLogMethod {
    /// The name `dirty_log=` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pml => "pml",
            Self::AccessedDirty => "ad",
            Self::WriteProtect => "wp",
        }
    }
}

/// One virtual CPU, as the runner and the exit handler see it.
pub trait Vcpu {
    /// Enters the guest and runs it until the next exit.
    fn run(&mut self) -> Result<VmExit, VcpuError>;
    /// The general registers (RSP excluded).
    fn registers(&mut self) -> &mut GuestRegisters;
    /// The guest RIP.
    fn rip(&self) -> u64;
    /// The guest RFLAGS.
    fn rflags(&self) -> u64;
    /// Moves RIP past the instruction that caused the last exit: the hypervisor completed it for
    /// the guest. As the CPU would, this ends an STI/MOV SS shadow and, when RFLAGS.TF was set,
    /// raises the single-step #DB trap right after the instruction with DR6.BS set (SDM Vol. 3A
    /// §17.3.1.4; AMD APM Vol. 2 §13.1.4 and §15.7.1).
    fn skip_instruction(&mut self);
    /// Queues an exception for the next entry.
    fn inject(&mut self, exception: Exception);
    /// Reads a guest MSR held in hardware state.
    fn hardware_msr(&self, msr: HardwareMsr) -> u64;
    /// Writes a guest MSR held in hardware state.
    fn set_hardware_msr(&mut self, msr: HardwareMsr, value: u64);
    /// The guest's RSP (it lives in the VMCS/VMCB, not in [`GuestRegisters`]).
    fn rsp(&self) -> u64;
    /// Sets the guest's RSP.
    fn set_rsp(&mut self, value: u64);
    /// The guest-visible control registers, EFER and CS.L.
    fn control_state(&self) -> ControlState;
    /// Loads a guest control register (0, 3, 4 or 8) after the handler checked the value against
    /// the architecture: the guest reads `value` back; the backend keeps the bits it must own.
    fn set_control_register(&mut self, cr: u8, value: u64);
    /// RDTSCP exits on this backend, so the guest may be shown it in CPUID.
    fn rdtscp_intercepted(&self) -> bool;
    /// Arms the preemption timer: the guest exits after at most `tsc_ticks` host TSC ticks.
    fn set_time_slice(&mut self, tsc_ticks: u64);
    /// The instruction a guest uses for hypercalls on this backend.
    fn hypercall_insn(&self) -> guest_shim::abi::HypercallInsn;
    /// Writes the complete vCPU state (registers, control state, last exit) for a report.
    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result;
    /// The backend's name for reports: "VT-x" or "AMD-V".
    fn backend_name(&self) -> &'static str;
    /// Gives back every frame the vCPU allocated (control structures, second-level tables,
    /// bitmaps). Guest RAM belongs to the runner. The vCPU must not run afterwards.
    fn release(&mut self, frames: &mut crate::memory::FrameAllocator);

    /// Captures the complete vCPU state (the exit handler adds the MSRs it keeps).
    fn save_state(&self) -> Result<VcpuState, StateError> {
        Err(StateError::Unsupported { backend: self.backend_name(), what: "vCPU state capture" })
    }

    /// Checks that `state` could be loaded, changing nothing: `load_state` on the same state then
    /// only fails if the hardware itself refuses. A restore calls this before writing guest memory,
    /// so it stays all or nothing.
    fn check_state(&self, state: &VcpuState) -> Result<(), StateError> {
        let _ = state;
        Err(StateError::Unsupported { backend: self.backend_name(), what: "vCPU reset" })
    }

    /// Loads a complete vCPU state: the vCPU reset a checkpoint ends with.
    fn load_state(&mut self, state: &VcpuState) -> Result<(), StateError> {
        let _ = state;
        Err(StateError::Unsupported { backend: self.backend_name(), what: "vCPU reset" })
    }

    /// Starts tracking guest writes with `method` (second-level tables switch to 4 KiB pages so
    /// every page is tracked on its own).
    fn enable_dirty_log(
        &mut self,
        method: DirtyLogMethod,
        frames: &mut crate::memory::FrameAllocator,
    ) -> Result<(), StateError> {
        let _ = (method, frames);
        Err(StateError::Unsupported { backend: self.backend_name(), what: "dirty logging" })
    }

    /// Adds the pages written since the last call to `log` and re-arms tracking.
    fn collect_dirty(&mut self, log: &mut crate::memory::DirtyLog) -> Result<(), StateError> {
        let _ = log;
        Err(StateError::Unsupported { backend: self.backend_name(), what: "dirty logging" })
    }
}
