//! SVM on the real (or emulated) CPU: enabling it, the per-guest VMCB and nested page tables, the
//! VMRUN world switch and the translation of #VMEXITs into [`VmExit`]s. AMD APM Vol. 2 ch. 15.
//!
//! Memory the processor reads (VMCB, host save area, permission maps, nested tables) comes from
//! the frame allocator and is reached through the host's identity map (virtual = physical).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use guest_shim::abi::HypercallInsn;
use x86_64::registers::model_specific::Msr;

use super::decode::{self, Instruction};
use super::npt::{NestedPageTables, DIRTY_TRACKING};
use super::state::{self as conv, AmdEvent};
use super::timer::{self, ApicTimer, NmiWatchdog};
use super::vmcb::{
    attrib, exit_code, intercept3, intercept4, intercept_cr, npf_info, tlb_control, IoExitInfo, Segment, Vmcb,
    EVENTINJ_EV, EVENTINJ_TYPE_EXCEPTION, EVENTINJ_VALID, NP_ENABLE, V_INTR_MASKING,
};
use super::SvmFeatures;
use crate::host::{cpu, idt};
use crate::memory::dirty::{WriteFault, WriteTracker};
use crate::memory::pagetable::{MapError, TableMemory};
use crate::memory::{DirtyLog, FrameAllocator, FrameError, PhysRange, PAGE_SIZE};
use crate::vcpu::cpuid::CpuidValues;
use crate::vcpu::state::{seg, SegmentState};
use crate::vcpu::{
    ControlState, CrAccess, DirtyLogMethod, Exception, GuestEntryState, GuestRegisters, HardwareMsr, MemoryAccess,
    StateError, Vcpu, VcpuError, VcpuState, VmExit, DR6_BS, RFLAGS_TF,
};

/// EFER.SVME (APM Vol. 2 §3.1.7).
const EFER_SVME: u64 = 1 << 12;
/// IA32_EFER.
const MSR_EFER: u32 = 0xC000_0080;
/// VM_CR (APM Vol. 2 §15.30.1): bit 4 SVMDIS.
const MSR_VM_CR: u32 = 0xC001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
/// VM_HSAVE_PA (APM Vol. 2 §15.30.4).
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;
/// The MSR permission map: 8 KiB (APM Vol. 2 §15.11).
const MSRPM_BYTES: u64 = 0x2000;
/// The I/O permission map: 12 KiB (APM Vol. 2 §15.10.1).
const IOPM_BYTES: u64 = 0x3000;
/// #DF.
const DOUBLE_FAULT_VECTOR: u8 = 8;
/// The power-on PAT (APM Vol. 2 §7.8.1), the guest's g_PAT.
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

/// Why the SVM backend could not start or make a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// A required CPU feature is absent (named).
    MissingFeature(&'static str),
    /// The firmware disabled SVM (VM_CR.SVMDIS = 1).
    DisabledByFirmware,
    /// No memory for a control structure.
    Memory(FrameError),
    /// The nested page tables could not be built.
    Map(MapError),
    /// Guest RAM is not a page-aligned range.
    BadGuestRam(PhysRange),
    /// A preemption interrupt gate could not be installed.
    Gate(idt::GateError),
}

impl fmt::Display for SvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingFeature(what) => write!(f, "the CPU lacks {what}"),
            Self::DisabledByFirmware => write!(f, "SVM is disabled by the firmware (VM_CR.SVMDIS = 1)"),
            Self::Memory(e) => write!(f, "SVM control structure: {e}"),
            Self::Map(e) => write!(f, "nested page tables: {e}"),
            Self::BadGuestRam(r) => {
                write!(f, "guest RAM {:#x}..{:#x} is not a non-empty page-aligned range", r.start, r.end)
            }
            Self::Gate(e) => write!(f, "preemption interrupt gate: {e}"),
        }
    }
}

impl From<FrameError> for SvmError {
    fn from(e: FrameError) -> Self {
        Self::Memory(e)
    }
}

/// Frames from the allocator, reached through the identity map, as nested-table storage.
struct IdentityTables<'a>(&'a mut FrameAllocator);

impl TableMemory for IdentityTables<'_> {
    fn allocate_table(&mut self) -> Result<u64, FrameError> {
        let pa = self.0.allocate_frame()?;
        zero_frames(pa, PAGE_SIZE, 0);
        Ok(pa)
    }
    fn table(&mut self, phys: u64) -> &mut [u64; 512] {
        // SAFETY: `phys` is a 4 KiB-aligned frame this allocator handed out for a table (the
        // trait's contract), identity-mapped, and owned by the nested tables being built or
        // walked; the returned borrow is tied to `self`, so no second one exists at the same time.
        unsafe { &mut *(phys as *mut [u64; 512]) }
    }
}

/// Tables already built, walked without allocating.
struct ExistingTables;

impl TableMemory for ExistingTables {
    fn allocate_table(&mut self) -> Result<u64, FrameError> {
        Err(FrameError::TooFragmented)
    }
    fn table(&mut self, phys: u64) -> &mut [u64; 512] {
        // SAFETY: only called by `NestedPageTables` walkers with addresses of its own table
        // frames, identity-mapped and owned by the vCPU; the borrow is tied to `self`.
        unsafe { &mut *(phys as *mut [u64; 512]) }
    }
}

/// Fills `[pa, pa + len)` with `byte`.
fn zero_frames(pa: u64, len: u64, byte: u8) {
    // SAFETY: callers pass frames they just took from the frame allocator, which nothing else
    // references; the host identity map makes physical address = virtual address.
    unsafe { core::ptr::write_bytes(pa as *mut u8, byte, len as usize) }
}

/// SVM enabled on this CPU, with the state every guest shares.
#[derive(Debug)]
pub struct SvmBackend {
    features: SvmFeatures,
    /// The host save area (VM_HSAVE_PA).
    host_save_area: u64,
    /// The page VMSAVE/VMLOAD use for the host's FS/GS/TR/LDTR/syscall MSRs.
    host_vmcb: u64,
    /// The MSR permission map: all ones, every RDMSR/WRMSR intercepted.
    msrpm: u64,
    /// The I/O permission map: all ones, every port intercepted.
    iopm: u64,
    next_asid: u32,
    timer: &'static ApicTimer,
    watchdog: &'static NmiWatchdog,
}

impl SvmBackend {
    /// Checks CPUID, enables SVM (EFER.SVME), sets up the host save area, the shared permission
    /// maps and the preemption timer. APM Vol. 2 §15.4 ("Enabling SVM").
    pub fn enable(frames: &mut FrameAllocator) -> Result<Self, SvmError> {
        let features = SvmFeatures::from_cpuid(&|leaf, subleaf| {
            let r = cpu::cpuid(leaf, subleaf);
            CpuidValues { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
        })
        .map_err(SvmError::MissingFeature)?;
        // SAFETY: VM_CR exists on every CPU reporting SVM (APM Vol. 2 §15.30.1).
        let vm_cr = unsafe { Msr::new(MSR_VM_CR).read() };
        if vm_cr & VM_CR_SVMDIS != 0 {
            return Err(SvmError::DisabledByFirmware);
        }
        let host_save_area = frames.allocate_frame()?;
        zero_frames(host_save_area, PAGE_SIZE, 0);
        let host_vmcb = frames.allocate_frame()?;
        zero_frames(host_vmcb, PAGE_SIZE, 0);
        let msrpm = frames.allocate(MSRPM_BYTES, PAGE_SIZE)?.start;
        zero_frames(msrpm, MSRPM_BYTES, 0xFF);
        let iopm = frames.allocate(IOPM_BYTES, PAGE_SIZE)?.start;
        zero_frames(iopm, IOPM_BYTES, 0xFF);
        // SAFETY: SVM is present and not disabled (checked above). Setting EFER.SVME changes
        // nothing else; VM_HSAVE_PA gets a zeroed, 4 KiB-aligned frame the hypervisor keeps
        // for good (the processor writes host state there on every VMRUN).
        unsafe {
            let mut efer = Msr::new(MSR_EFER);
            let value = efer.read();
            efer.write(value | EFER_SVME);
            Msr::new(MSR_VM_HSAVE_PA).write(host_save_area);
        }
        let timer = ApicTimer::init().map_err(SvmError::Gate)?;
        let watchdog = NmiWatchdog::init(timer.apic_id()).map_err(SvmError::Gate)?;
        // One of each for good: the host IDT points at their stubs from now on.
        let timer: &'static ApicTimer = Box::leak(Box::new(timer));
        let watchdog: &'static NmiWatchdog = Box::leak(Box::new(watchdog));
        Ok(Self { features, host_save_area, host_vmcb, msrpm, iopm, next_asid: 1, timer, watchdog })
    }

    /// "AMD-V".
    pub fn name(&self) -> &'static str {
        "AMD-V"
    }

    /// The dirty-tracking method, for the boot log.
    pub fn dirty_tracking(&self) -> &'static str {
        DIRTY_TRACKING
    }

    /// A line for the boot log: what SVM offers and how the backend uses it.
    pub fn describe(&self) -> String {
        let f = &self.features;
        format!(
            "SVM revision {}, {} ASIDs, nested paging, RIP advance by {}, TLB flush {}, host save area {:#x}, \
             preemption by the local APIC timer at {:#x} ({} counts per 1M TSC ticks) with the INTR intercept, \
             backed by a PIT NMI watchdog (I/O APIC input 2) with the NMI intercept",
            f.revision,
            f.asids,
            f.rip_advance_method(),
            if f.flush_by_asid { "by ASID" } else { "of all ASIDs" },
            self.host_save_area,
            self.timer.base(),
            self.timer.counts_per_million_tsc()
        )
    }

    /// The host save area's physical address (VM_HSAVE_PA).
    pub fn host_save_area(&self) -> u64 {
        self.host_save_area
    }

    /// What CPUID reported.
    pub fn features(&self) -> SvmFeatures {
        self.features
    }

    /// Makes a vCPU for a guest whose RAM (guest-physical `[0, len)`) is host-physical
    /// `guest_ram`, starting in `entry`.
    pub fn create_vcpu(
        &mut self,
        frames: &mut FrameAllocator,
        guest_ram: PhysRange,
        entry: &GuestEntryState,
    ) -> Result<SvmVcpu, SvmError> {
        if guest_ram.is_empty()
            || !guest_ram.start.is_multiple_of(PAGE_SIZE)
            || !guest_ram.len().is_multiple_of(PAGE_SIZE)
        {
            return Err(SvmError::BadGuestRam(guest_ram));
        }
        let npt = match NestedPageTables::build(&mut IdentityTables(frames), guest_ram, true) {
            Ok(npt) => npt,
            Err((e, taken)) => {
                for pa in taken {
                    let _ = frames.free(PhysRange::new(pa, PAGE_SIZE));
                }
                return Err(SvmError::Map(e));
            }
        };
        let vmcb_pa = match frames.allocate_frame() {
            Ok(pa) => pa,
            Err(e) => {
                for &pa in npt.table_frames() {
                    let _ = frames.free(PhysRange::new(pa, PAGE_SIZE));
                }
                return Err(e.into());
            }
        };
        // ASIDs 1..asids-1, round robin; every vCPU flushes its ASID on its first VMRUN, which
        // covers reuse after wrap-around (APM Vol. 2 §15.16).
        let asid = self.next_asid;
        self.next_asid = if asid + 1 >= self.features.asids { 1 } else { asid + 1 };

        let vmcb_ptr = vmcb_pa as *mut Vmcb;
        // SAFETY: a fresh 4 KiB frame, identity-mapped, owned by this vCPU from here on; `Vmcb` is
        // 4096 bytes with alignment 4096 and every bit pattern valid (plain integers).
        unsafe { vmcb_ptr.write(Vmcb::zeroed()) };
        let vmcb = NonNull::new(vmcb_ptr).expect("frame allocator never returns 0 (low memory is reserved)");
        let mut vcpu = SvmVcpu {
            vmcb,
            vmcb_pa,
            npt: Some(npt),
            guest_ram,
            ctx: Box::new(SwitchContext {
                regs: GuestRegisters { rdi: entry.rdi, ..GuestRegisters::default() },
                guest_vmcb_pa: vmcb_pa,
                host_vmcb_pa: self.host_vmcb,
                guest_fx: 0,
                host_fx: 0,
            }),
            guest_fx: Box::new(FxArea::initial()),
            host_fx: Box::new(FxArea([0; 512])),
            features: self.features,
            timer: self.timer,
            watchdog: self.watchdog,
            time_slice: None,
            next_rip: None,
            last_exit: None,
            flush_on_entry: true,
            debug: [0; 4],
            soft_event: None,
            dirty_logging: false,
            wp: None,
            stats: SwitchStats::default(),
        };
        vcpu.ctx.guest_fx = vcpu.guest_fx.0.as_mut_ptr() as u64;
        vcpu.ctx.host_fx = vcpu.host_fx.0.as_mut_ptr() as u64;
        vcpu.load_entry_state(asid, self.iopm, self.msrpm, entry);
        Ok(vcpu)
    }
}

/// A 512-byte FXSAVE64 image, 16-byte aligned (APM Vol. 5, FXSAVE).
#[repr(C, align(16))]
struct FxArea([u8; 512]);

impl FxArea {
    /// The state after FNINIT with the SSE defaults: FCW = 0x037F, MXCSR = 0x1F80, all x87
    /// registers empty (abridged tag 0).
    fn initial() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        Self(a)
    }
}

/// What the world-switch assembly reads and writes. The offsets are used by the assembly.
#[repr(C)]
struct SwitchContext {
    regs: GuestRegisters,
    guest_vmcb_pa: u64,
    host_vmcb_pa: u64,
    guest_fx: u64,
    host_fx: u64,
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(SwitchContext, regs) == 0);
    assert!(offset_of!(GuestRegisters, rbx) == 0x08);
    assert!(offset_of!(GuestRegisters, rcx) == 0x10);
    assert!(offset_of!(GuestRegisters, rdx) == 0x18);
    assert!(offset_of!(GuestRegisters, rsi) == 0x20);
    assert!(offset_of!(GuestRegisters, rdi) == 0x28);
    assert!(offset_of!(GuestRegisters, rbp) == 0x30);
    assert!(offset_of!(GuestRegisters, r8) == 0x38);
    assert!(offset_of!(GuestRegisters, r15) == 0x70);
    assert!(offset_of!(SwitchContext, guest_vmcb_pa) == 0x78);
    assert!(offset_of!(SwitchContext, host_vmcb_pa) == 0x80);
    assert!(offset_of!(SwitchContext, guest_fx) == 0x88);
    assert!(offset_of!(SwitchContext, host_fx) == 0x90);
};

// The world switch (APM Vol. 2 §15.5, §15.5.2 and §15.17):
// - host FPU/SSE saved, guest FPU/SSE loaded (FXSAVE64/FXRSTOR64; XSAVE is hidden from guests);
// - CLGI; VMSAVE of the host's FS, GS, TR, LDTR, KernelGsBase, STAR, LSTAR, CSTAR, SFMASK and
//   SYSENTER MSRs (state VMRUN does not switch); VMLOAD of the guest's;
// - STI so that, with V_INTR_MASKING, a physical interrupt exits the guest (GIF = 0 holds it
//   off until VMRUN sets GIF);
// - guest GPRs loaded (RAX comes from the VMCB), VMRUN;
// - after #VMEXIT (GIF = 0; RAX, RSP, RFLAGS restored from the host save area) guest GPRs stored,
//   CLI, VMSAVE of the guest, VMLOAD of the host (TR again points at the host TSS and its IST
//   stacks), STGI (pending interrupts stay pending: IF = 0), FPU/SSE swapped back.
core::arch::global_asm!(
    r#"
    .section .text.svm_run, "ax"
    .balign 16
    .global colo_svm_run
colo_svm_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, [rdi + 0x90]
    fxsave64 [rax]
    mov rax, [rdi + 0x88]
    fxrstor64 [rax]
    clgi
    mov rax, [rdi + 0x80]
    vmsave rax
    mov rax, [rdi + 0x78]
    vmload rax
    sti
    mov rbx, [rdi + 0x08]
    mov rcx, [rdi + 0x10]
    mov rdx, [rdi + 0x18]
    mov rsi, [rdi + 0x20]
    mov rbp, [rdi + 0x30]
    mov r8,  [rdi + 0x38]
    mov r9,  [rdi + 0x40]
    mov r10, [rdi + 0x48]
    mov r11, [rdi + 0x50]
    mov r12, [rdi + 0x58]
    mov r13, [rdi + 0x60]
    mov r14, [rdi + 0x68]
    mov r15, [rdi + 0x70]
    mov rdi, [rdi + 0x28]
    vmrun rax
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0x08], rbx
    mov [rdi + 0x10], rcx
    mov [rdi + 0x18], rdx
    mov [rdi + 0x20], rsi
    mov [rdi + 0x30], rbp
    mov [rdi + 0x38], r8
    mov [rdi + 0x40], r9
    mov [rdi + 0x48], r10
    mov [rdi + 0x50], r11
    mov [rdi + 0x58], r12
    mov [rdi + 0x60], r13
    mov [rdi + 0x68], r14
    mov [rdi + 0x70], r15
    pop rax
    mov [rdi + 0x28], rax
    cli
    mov rax, [rdi + 0x78]
    vmsave rax
    mov rax, [rdi + 0x80]
    vmload rax
    stgi
    mov rax, [rdi + 0x88]
    fxsave64 [rax]
    mov rax, [rdi + 0x90]
    fxrstor64 [rax]
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    "#
);

extern "C" {
    /// Runs the guest once (see the assembly above). Interrupts must be disabled on entry; they
    /// are disabled on return.
    fn colo_svm_run(ctx: *mut SwitchContext);
}

/// Loads the guest's DR0-DR3 just before VMRUN. The VMCB holds DR6 and DR7 (switched by VMRUN and
/// #VMEXIT, APM Vol. 2 §15.5.1 and Table B-2) but not DR0-DR3, which keep whatever value they have
/// across the world switch: a guest writes them directly (DR accesses are not intercepted), so
/// each vCPU's values are put back before it runs and read after it exits.
///
/// # Safety
/// Called right before the world switch with interrupts off. The host never arms breakpoints
/// (its DR7 has no enable bits set), so the addresses in DR0-DR3 have no effect on the host.
unsafe fn load_guest_debug(dr: &[u64; 4]) {
    // SAFETY: as above; writing DR0-DR3 at CPL 0 has no other side effect.
    unsafe {
        core::arch::asm!(
            "mov dr0, {d0}", "mov dr1, {d1}", "mov dr2, {d2}", "mov dr3, {d3}",
            d0 = in(reg) dr[0], d1 = in(reg) dr[1], d2 = in(reg) dr[2], d3 = in(reg) dr[3],
            options(nostack, nomem)
        );
    }
}

/// Reads the guest's DR0-DR3 right after #VMEXIT.
fn read_guest_debug() -> [u64; 4] {
    let (d0, d1, d2, d3): (u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effects.
    unsafe {
        core::arch::asm!(
            "mov {d0}, dr0", "mov {d1}, dr1", "mov {d2}, dr2", "mov {d3}, dr3",
            d0 = out(reg) d0, d1 = out(reg) d1, d2 = out(reg) d2, d3 = out(reg) d3,
            options(nostack, nomem)
        );
    }
    [d0, d1, d2, d3]
}

/// The processor's MXCSR_MASK (FXSAVE image bytes 28..32; 0 means the default 0xFFBF, APM Vol. 5
/// FXSAVE): the MXCSR bits FXRSTOR accepts.
fn mxcsr_mask() -> u32 {
    let mut area = FxArea([0; 512]);
    // SAFETY: `area` is a 512-byte, 16-byte-aligned buffer on this stack frame; FXSAVE64 only
    // writes it and reads the FPU/SSE state (CR4.OSFXSR is set by the boot stub).
    unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
    match u32::from_le_bytes([area.0[28], area.0[29], area.0[30], area.0[31]]) {
        0 => 0xFFBF,
        mask => mask,
    }
}

/// World-switch timings, in host TSC ticks.
#[derive(Clone, Copy, Debug, Default)]
struct SwitchStats {
    runs: u64,
    /// Sum and minimum of (return from the world switch - call of the world switch), over the
    /// runs that ended in a VMMCALL: VMRUN, the guest's few instructions up to its next
    /// VMMCALL, #VMEXIT, and the host state reload.
    hypercall_runs: u64,
    hypercall_switch_sum: u64,
    hypercall_switch_min: u64,
    /// Host time between a VMMCALL exit and the next entry (handler, decode, bookkeeping).
    host_side_sum: u64,
    host_side_min: u64,
    last_exit_tsc: u64,
    last_was_hypercall: bool,
    preemptions: u64,
    /// Preemptions by the NMI watchdog (the APIC timer's interrupt did not end the guest).
    watchdog_preemptions: u64,
}

/// One AMD-V virtual CPU.
pub struct SvmVcpu {
    vmcb: NonNull<Vmcb>,
    vmcb_pa: u64,
    npt: Option<NestedPageTables>,
    guest_ram: PhysRange,
    ctx: Box<SwitchContext>,
    guest_fx: Box<FxArea>,
    host_fx: Box<FxArea>,
    features: SvmFeatures,
    timer: &'static ApicTimer,
    watchdog: &'static NmiWatchdog,
    time_slice: Option<u64>,
    /// Where `skip_instruction` moves RIP: known for instruction intercepts.
    next_rip: Option<u64>,
    last_exit: Option<VmExit>,
    flush_on_entry: bool,
    /// Guest DR0-DR3: not in the VMCB (DR6 and DR7 are), so switched around every VMRUN.
    debug: [u64; 4],
    /// A software event `load_state` queued with RIP already past its instruction (AMD-V pushes
    /// the VMCB's RIP), kept as (VT-x information, instruction length) so a capture before the
    /// next VMRUN reports it as it was loaded.
    soft_event: Option<(u32, u32)>,
    /// Guest RAM is mapped with 4 KiB nested pages and their dirty bits are being collected.
    dirty_logging: bool,
    /// Write-protect tracking (`DirtyLogMethod::WriteProtect`), when on.
    wp: Option<WriteTracker>,
    stats: SwitchStats,
}

impl fmt::Debug for SvmVcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvmVcpu").field("vmcb", &format_args!("{:#x}", self.vmcb_pa)).finish_non_exhaustive()
    }
}

impl SvmVcpu {
    fn vmcb(&self) -> &Vmcb {
        // SAFETY: `vmcb` points at this vCPU's own VMCB frame (see `create_vcpu`), which lives
        // until `release`; the processor writes it only inside `colo_svm_run`, while no Rust
        // reference exists.
        unsafe { self.vmcb.as_ref() }
    }

    fn vmcb_mut(&mut self) -> &mut Vmcb {
        // SAFETY: as in `vmcb`; `&mut self` makes this the only reference.
        unsafe { self.vmcb.as_mut() }
    }

    /// Fills the VMCB: intercepts, maps, ASID, nested paging and the boot protocol's entry state
    /// (APM Vol. 2 §15.5.1 lists the consistency checks VMRUN applies to it).
    fn load_entry_state(&mut self, asid: u32, iopm: u64, msrpm: u64, entry: &GuestEntryState) {
        let ncr3 = self.npt.as_ref().map_or(0, |n| n.root());
        let v = self.vmcb_mut();
        let c = &mut v.control;
        // Control registers: every CR0 and CR4 write exits and is completed by the exit handler
        // with the architectural checks (the CPU has not made them yet); CR8 writes exit too, so
        // a bad TPR value is #GP on every CPU and emulator alike (VT-x has CR8-load exiting).
        // Reads are not intercepted: CR0/CR4 are the guest's own, CR8 reads V_TPR.
        c.intercept_cr = intercept_cr::WRITE_CR0 | intercept_cr::WRITE_CR4 | intercept_cr::WRITE_CR8;
        // #DF: Bochs 2.7 resets the whole machine on a triple fault in an SVM guest instead of
        // taking the SHUTDOWN intercept, so a guest's double fault ends the guest here, before
        // the third fault can happen (see `translate_exit`).
        c.intercept_exceptions = 1 << DOUBLE_FAULT_VECTOR;
        c.intercept3 = intercept3::INTR
            | intercept3::NMI
            | intercept3::CPUID
            | intercept3::HLT
            | intercept3::IOIO_PROT
            | intercept3::MSR_PROT
            | intercept3::SHUTDOWN
            | intercept3::RDTSC
            | intercept3::INVLPGA
            // INVD would discard cache lines the host wrote: intercepted and handled as WBINVD.
            | intercept3::INVD
            // RDPMC would read the host's counters: #GP (no PMU in the guest's CPUID).
            | intercept3::RDPMC;
        c.intercept4 = intercept4::VMRUN
            | intercept4::VMMCALL
            | intercept4::VMLOAD
            | intercept4::VMSAVE
            | intercept4::STGI
            | intercept4::CLGI
            | intercept4::SKINIT
            | intercept4::RDTSCP
            | intercept4::XSETBV
            // Hidden in CPUID, #UD as on VT-x (docs/exits.md).
            | intercept4::MONITOR
            | intercept4::MWAIT
            | intercept4::MWAIT_CONDITIONAL;
        c.iopm_base_pa = iopm;
        c.msrpm_base_pa = msrpm;
        c.guest_asid = asid;
        c.tlb_control = tlb_control::DO_NOTHING;
        c.virtual_interrupt = V_INTR_MASKING;
        c.nested_control = NP_ENABLE;
        c.nested_cr3 = ncr3;

        let s = &mut v.save;
        let data = Segment::new(entry.data_selector, attrib::DATA, 0xFFFF_FFFF, 0);
        s.cs = Segment::new(entry.code_selector, attrib::CODE64, 0xFFFF_FFFF, 0);
        (s.ds, s.es, s.ss, s.fs, s.gs) = (data, data, data, data, data);
        s.gdtr = Segment::new(0, 0, u32::from(entry.gdt_limit), entry.gdt_base);
        s.idtr = Segment::new(0, 0, 0, 0);
        s.ldtr = Segment::new(0, 0, 0, 0);
        s.tr = Segment::new(0, attrib::TSS_BUSY, 0x67, 0);
        s.cpl = 0;
        // The APM requires EFER.SVME in the guest's EFER (§15.5.1); reads hide it.
        s.efer = entry.efer | EFER_SVME;
        s.cr0 = entry.cr0;
        s.cr3 = entry.cr3;
        s.cr4 = entry.cr4;
        s.dr6 = 0xFFFF_0FF0;
        s.dr7 = 0x400;
        s.rflags = entry.rflags;
        s.rip = entry.rip;
        s.rsp = entry.rsp;
        s.rax = 0;
        s.g_pat = DEFAULT_PAT;
    }

    /// Reads up to 15 bytes of guest memory at `rip`. Under the boot protocol guest-virtual =
    /// guest-physical (identity-mapped guest page tables), so RIP is used as a guest-physical
    /// address; a guest that remapped its code gets a decode error, never a read outside its RAM.
    fn instruction_bytes(&self, rip: u64) -> ([u8; decode::MAX_INSTRUCTION_LENGTH], usize) {
        let mut buf = [0u8; decode::MAX_INSTRUCTION_LENGTH];
        let size = self.guest_ram.len();
        if rip >= size {
            return (buf, 0);
        }
        let len = (size - rip).min(buf.len() as u64) as usize;
        let src = (self.guest_ram.start + rip) as *const u8;
        // SAFETY: `[rip, rip + len)` lies inside guest RAM (checked above), which is host-physical
        // `guest_ram`, identity-mapped and owned by the runner for the guest's lifetime; the guest
        // is not running, so nothing writes it concurrently; `buf` has room for `len` bytes.
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), len) };
        (buf, len)
    }

    /// The address after the intercepted instruction: NextRIP with NRIPS, else decoded.
    fn next_rip_for(&self, expected: Instruction) -> Result<u64, decode::DecodeError> {
        let rip = self.vmcb().save.rip;
        if self.features.nrips {
            return Ok(self.vmcb().control.next_rip);
        }
        let (bytes, len) = self.instruction_bytes(rip);
        let decoded = decode::decode_expecting(&bytes[..len], expected)?;
        Ok(rip.wrapping_add(u64::from(decoded.length)))
    }

    /// Turns the #VMEXIT in the VMCB into a [`VmExit`], noting where RIP goes on `Advance`.
    fn translate_exit(&mut self, timer_fired: bool) -> VmExit {
        let c = &self.vmcb().control;
        let (code, info1, info2) = (c.exit_code, c.exit_info1, c.exit_info2);
        let regs = self.ctx.regs;
        self.next_rip = None;
        let instruction = match code {
            exit_code::CPUID => {
                Some((Instruction::Cpuid, VmExit::Cpuid { leaf: regs.rax as u32, subleaf: regs.rcx as u32 }))
            }
            exit_code::MSR if info1 == 0 => Some((Instruction::Rdmsr, VmExit::MsrRead { msr: regs.rcx as u32 })),
            exit_code::MSR => Some((
                Instruction::Wrmsr,
                VmExit::MsrWrite { msr: regs.rcx as u32, value: (regs.rdx << 32) | (regs.rax & 0xFFFF_FFFF) },
            )),
            exit_code::HLT => Some((Instruction::Hlt, VmExit::Hlt)),
            exit_code::VMMCALL => Some((Instruction::Vmmcall, VmExit::Hypercall)),
            exit_code::RDTSC => Some((Instruction::Rdtsc, VmExit::Rdtsc)),
            exit_code::RDTSCP => Some((Instruction::Rdtscp, VmExit::Rdtscp)),
            exit_code::INVD => Some((Instruction::Invd, VmExit::Invd)),
            exit_code::XSETBV => Some((Instruction::Xsetbv, VmExit::Xsetbv)),
            _ => None,
        };
        // QEMU TCG reports RDTSCP with the RDTSC exit code (it checks the RDTSC intercept for
        // both); without NRIPS the bytes at RIP are decoded anyway, so they decide which it was.
        let instruction = match instruction {
            Some((Instruction::Rdtsc, _)) if !self.features.nrips => {
                let (bytes, len) = self.instruction_bytes(self.vmcb().save.rip);
                match decode::decode(&bytes[..len]) {
                    Ok(d) if d.instruction == Instruction::Rdtscp => Some((Instruction::Rdtscp, VmExit::Rdtscp)),
                    _ => instruction,
                }
            }
            other => other,
        };
        if let Some((insn, exit)) = instruction {
            return match self.next_rip_for(insn) {
                Ok(next) => {
                    self.next_rip = Some(next);
                    exit
                }
                // A LOCK prefix on any of these is #UD (APM Vol. 3 §1.2.5: LOCK is only valid on
                // memory read-modify-write instructions). The CPU checks it before the intercept;
                // QEMU TCG does not, so the decoder catches it.
                Err(decode::DecodeError::LockPrefix) => VmExit::UndefinedInstruction { what: "LOCK prefix" },
                Err(e) => {
                    log::warn!(
                        "AMD-V: cannot find the length of the {} at guest RIP {:#x} (no NRIPS): {e}",
                        insn.name(),
                        self.vmcb().save.rip
                    );
                    VmExit::Unhandled { reason: code as u32 }
                }
            };
        }
        match code {
            exit_code::IOIO => {
                // EXITINFO2 holds the address of the next instruction for IOIO (§15.10.2).
                self.next_rip = Some(info2);
                let io = IoExitInfo::from_exit_info1(info1);
                VmExit::Io { port: io.port, size: io.size, write: io.write, string: io.string }
            }
            exit_code::NPF => {
                if info1 & npf_info::RESERVED != 0 {
                    VmExit::NestedPageMisconfig { gpa: info2 }
                } else {
                    let access = if info1 & npf_info::FETCH != 0 {
                        MemoryAccess::Execute
                    } else if info1 & npf_info::WRITE != 0 {
                        MemoryAccess::Write
                    } else {
                        MemoryAccess::Read
                    };
                    VmExit::NestedPageFault { gpa: info2, access }
                }
            }
            exit_code::SHUTDOWN => VmExit::TripleFault,
            c if c == exit_code::EXCEPTION_BASE + u64::from(DOUBLE_FAULT_VECTOR) => {
                log::warn!(
                    "AMD-V: guest double fault at RIP {:#x} (intercepted #DF, error code {:#x}): ended as a \
                     triple fault",
                    self.vmcb().save.rip,
                    info1
                );
                VmExit::TripleFault
            }
            exit_code::WRITE_CR0..=exit_code::WRITE_CR15 => {
                self.translate_cr_write((code - exit_code::WRITE_CR0) as u8)
            }
            exit_code::RDPMC => VmExit::Rdpmc,
            exit_code::MONITOR => VmExit::UndefinedInstruction { what: "MONITOR" },
            exit_code::MWAIT | exit_code::MWAIT_CONDITIONAL => VmExit::UndefinedInstruction { what: "MWAIT" },
            exit_code::INTR if timer_fired => VmExit::PreemptionTimer,
            exit_code::INTR => VmExit::ExternalInterrupt { vector: None },
            // The NMI was taken by the host after STGI (`timer::nmis` counted it); the watchdog
            // is the only NMI source the hypervisor arms, but any NMI just resumes the guest.
            exit_code::NMI if timer_fired => VmExit::PreemptionTimer,
            exit_code::NMI => VmExit::ExternalInterrupt { vector: Some(2) },
            exit_code::VMRUN
            | exit_code::VMLOAD
            | exit_code::VMSAVE
            | exit_code::STGI
            | exit_code::CLGI
            | exit_code::SKINIT
            | exit_code::INVLPGA => VmExit::VirtualizationInstruction,
            exit_code::INVALID => VmExit::EntryFailed { reason: code as u32, qualification: info1 },
            _ => VmExit::Unhandled { reason: code as u32 },
        }
    }

    /// A CR write intercept (APM Vol. 2 §15.9; CLTS and LMSW count as CR0 writes). Without
    /// decode assists the value is not reported, so the instruction is decoded from guest memory
    /// (MOV to CRn, CLTS, LMSW) to find its source register and length.
    fn translate_cr_write(&mut self, cr: u8) -> VmExit {
        let rip = self.vmcb().save.rip;
        let (bytes, len) = self.instruction_bytes(rip);
        let decoded = match decode::decode_cr_write(&bytes[..len], cr) {
            Ok(decoded) => decoded,
            Err(decode::DecodeError::LockPrefix) => return VmExit::UndefinedInstruction { what: "LOCK prefix" },
            Err(e) => {
                log::warn!("AMD-V: cannot decode the CR{cr} write at guest RIP {rip:#x}: {e}");
                return VmExit::Unhandled { reason: (exit_code::WRITE_CR0 + u64::from(cr)) as u32 };
            }
        };
        self.next_rip = Some(if self.features.nrips {
            self.vmcb().control.next_rip
        } else {
            rip.wrapping_add(u64::from(decoded.length))
        });
        let access = match decoded.instruction {
            Instruction::MovToCr { gpr, .. } => CrAccess::Write { gpr },
            Instruction::Clts => CrAccess::Clts,
            Instruction::Lmsw { gpr: Some(gpr) } => {
                let value = match self.ctx.regs.by_number(gpr) {
                    Some(r) => *r,
                    None => self.vmcb().save.rsp,
                };
                CrAccess::Lmsw { source: Some(value as u16) }
            }
            _ => CrAccess::Lmsw { source: None },
        };
        VmExit::ControlRegisterAccess { cr, access }
    }

    /// Nested-page dirty bits: calls `f(gpa, bytes)` for each dirty leaf and clears it when
    /// `clear` (hierarchically, see [`NestedPageTables::scan_dirty`]; the next VMRUN then flushes
    /// this guest's TLB entries). Returns the dirty count.
    pub fn scan_dirty(&mut self, clear: bool, f: &mut dyn FnMut(u64, u64)) -> u64 {
        let Some(npt) = &self.npt else { return 0 };
        let n = npt.scan_dirty(&mut ExistingTables, clear, f);
        // Upper-level Accessed flags were cleared even when no leaf was dirty: cached upper
        // levels must go too, or a later walk served from them would not set the flags again.
        if clear {
            self.flush_on_entry = true;
        }
        n
    }

    /// The nested page tables' root (nCR3).
    pub fn nested_cr3(&self) -> u64 {
        self.vmcb().control.nested_cr3
    }

    fn log_stats(&self) {
        let s = &self.stats;
        if s.hypercall_runs == 0 {
            log::info!(
                "AMD-V vCPU: {} VMRUNs, {} preemptions ({} by the NMI watchdog)",
                s.runs,
                s.preemptions,
                s.watchdog_preemptions
            );
            return;
        }
        log::info!(
            "AMD-V vCPU: {} VMRUNs, {} preemptions ({} by the NMI watchdog); VMMCALL round trip (host TSC \
             ticks): world switch min {} mean {}, host-side handling min {} (mean {}, BlockUntil waits included)",
            s.runs,
            s.preemptions,
            s.watchdog_preemptions,
            s.hypercall_switch_min,
            s.hypercall_switch_sum / s.hypercall_runs,
            s.host_side_min,
            s.host_side_sum / s.hypercall_runs.max(1)
        );
    }
}

impl SvmVcpu {
    /// One VMRUN with `slice` host TSC ticks of preemption time, and its exit.
    fn enter(&mut self, slice: Option<u64>) -> Result<VmExit, VcpuError> {
        let ticks_before = timer::ticks();
        let nmis_before = timer::nmis();
        let rax = self.ctx.regs.rax;
        let flush = if self.flush_on_entry {
            self.flush_on_entry = false;
            if self.features.flush_by_asid {
                tlb_control::FLUSH_GUEST
            } else {
                tlb_control::FLUSH_ALL
            }
        } else {
            tlb_control::DO_NOTHING
        };
        {
            let v = self.vmcb_mut();
            v.save.rax = rax;
            v.control.tlb_control = flush;
            // An event whose delivery an intercept interrupted is delivered again (§15.7.2),
            // unless the handler queued its own.
            let pending = v.control.exit_int_info;
            if v.control.event_injection & EVENTINJ_VALID == 0 && pending & EVENTINJ_VALID != 0 {
                v.control.event_injection = pending;
            }
            v.control.exit_int_info = 0;
        }
        if let Some(slice) = slice {
            self.timer.arm(slice);
            self.watchdog.arm(slice.saturating_mul(2));
        }
        let start = crate::host::time::rdtsc();
        if self.stats.last_was_hypercall {
            let host_side = start.wrapping_sub(self.stats.last_exit_tsc);
            self.stats.host_side_sum += host_side;
            self.stats.host_side_min =
                if self.stats.host_side_min == 0 { host_side } else { self.stats.host_side_min.min(host_side) };
        }
        let ctx: *mut SwitchContext = &mut *self.ctx;
        // SAFETY: interrupts are off (see below) and the host does not use breakpoints.
        unsafe { load_guest_debug(&self.debug) };
        // SAFETY: interrupts are disabled (the hypervisor never enables them outside `drain`);
        // EFER.SVME and VM_HSAVE_PA are set (`SvmBackend::enable`); the VMCB at
        // `ctx.guest_vmcb_pa` passed VMRUN's checks by construction (`load_entry_state`) or
        // reports VMEXIT_INVALID; the host VMCB and both FXSAVE areas are this vCPU's, 4 KiB
        // and 16-byte aligned. The assembly preserves the callee-saved registers and the host's
        // FS/GS/TR/LDTR/syscall MSRs and FPU/SSE state.
        unsafe { colo_svm_run(ctx) };
        let end = crate::host::time::rdtsc();
        self.debug = read_guest_debug();
        self.timer.disarm();
        self.watchdog.disarm();
        let ticks_after = ApicTimer::drain();
        let timer_fired = ticks_after != ticks_before || timer::nmis() != nmis_before;

        let v = self.vmcb_mut();
        v.control.event_injection = 0;
        v.control.tlb_control = tlb_control::DO_NOTHING;
        let delivery_interrupted = v.control.exit_int_info & EVENTINJ_VALID != 0;
        let guest_rax = v.save.rax;
        self.ctx.regs.rax = guest_rax;
        if !delivery_interrupted {
            // A software event `load_state` queued has been delivered.
            self.soft_event = None;
        }
        let exit = self.translate_exit(timer_fired);
        self.last_exit = Some(exit);

        let by_watchdog = self.vmcb().control.exit_code == exit_code::NMI;
        let s = &mut self.stats;
        s.runs += 1;
        s.last_exit_tsc = end;
        s.last_was_hypercall = exit == VmExit::Hypercall;
        if exit == VmExit::PreemptionTimer {
            s.preemptions += 1;
            if by_watchdog {
                s.watchdog_preemptions += 1;
            }
        }
        if s.last_was_hypercall {
            let switch = end.wrapping_sub(start);
            s.hypercall_runs += 1;
            s.hypercall_switch_sum += switch;
            s.hypercall_switch_min =
                if s.hypercall_switch_min == 0 { switch } else { s.hypercall_switch_min.min(switch) };
        }
        Ok(exit)
    }

    /// Write-protect tracking: the nested tables keep their 2 MiB leaves, all made read-only; a
    /// zeroed frame per 2 MiB leaf is reserved so the fault path can split a leaf without
    /// allocating. Enabling again re-arms (every page read-only, nothing logged).
    fn enable_write_protect(&mut self, frames: &mut FrameAllocator) -> Result<(), StateError> {
        let t0 = crate::host::time::rdtsc();
        let Some(npt) = self.npt.as_ref() else {
            return Err(StateError::Unsupported { backend: "AMD-V", what: "write protection without nested tables" });
        };
        if let Some(wp) = self.wp.as_mut() {
            wp.protect_all(npt.table(), &mut ExistingTables);
            self.flush_on_entry = true;
            return Ok(());
        }
        let needed = WriteTracker::tables_needed(npt.table(), &mut ExistingTables);
        let mut pool = Vec::new();
        let no_memory = StateError::Unsupported { backend: "AMD-V", what: "memory for the 2 MiB split reserve" };
        if pool.try_reserve_exact(needed as usize).is_err() {
            return Err(no_memory);
        }
        for _ in 0..needed {
            match frames.allocate_frame() {
                Ok(pa) => {
                    zero_frames(pa, PAGE_SIZE, 0);
                    pool.push(pa);
                }
                Err(_) => {
                    for pa in pool {
                        let _ = frames.free(PhysRange::new(pa, PAGE_SIZE));
                    }
                    return Err(no_memory);
                }
            }
        }
        let mut wp = WriteTracker::new(pool);
        wp.protect_all(npt.table(), &mut ExistingTables);
        self.wp = Some(wp);
        self.dirty_logging = true;
        // Write permission was removed from every leaf: cached translations go (§15.16.2).
        self.flush_on_entry = true;
        log::info!(
            "AMD-V: write-protect dirty tracking on: {needed} 2 MiB leaves read-only, {needed} split frames reserved, \
             {} TSC cycles",
            crate::host::time::rdtsc() - t0
        );
        Ok(())
    }

    /// Frees the write tracker's table frames (reserved and split-in); the caller replaces or
    /// drops the tables the used ones sit in.
    fn free_write_tracker(&mut self, frames: &mut FrameAllocator) {
        if let Some(t) = self.wp.take() {
            log::info!(
                "AMD-V: write-protect tracking: {} write faults, {} 2 MiB leaves split, {} stale",
                t.faults,
                t.splits,
                t.spurious
            );
            for pa in t.frames() {
                if let Err(e) = frames.free(PhysRange::new(pa, PAGE_SIZE)) {
                    log::warn!("AMD-V: freeing nested table frame {pa:#x}: {e}");
                }
            }
        }
    }
}

impl Vcpu for SvmVcpu {
    /// Enters the guest until an exit the runner must see. With write-protect tracking on, the
    /// nested page faults of first writes are handled here (logged, page made writable, guest
    /// entered again) within the same time slice.
    fn run(&mut self) -> Result<VmExit, VcpuError> {
        let start = crate::host::time::rdtsc();
        let mut slice = self.time_slice;
        loop {
            let exit = self.enter(slice)?;
            let VmExit::NestedPageFault { gpa, .. } = exit else { return Ok(exit) };
            let (Some(wp), Some(npt)) = (self.wp.as_mut(), self.npt.as_ref()) else { return Ok(exit) };
            match wp.on_write_fault(npt.table(), &mut ExistingTables, gpa) {
                // Write permission was only added: no TLB entry allows the write yet (the fault
                // left none), so no flush is needed.
                WriteFault::Logged | WriteFault::Split => {}
                WriteFault::AlreadyWritable => self.flush_on_entry = true,
                WriteFault::NotMapped | WriteFault::NoTable => return Ok(exit),
            }
            if let Some(total) = self.time_slice {
                let used = crate::host::time::rdtsc().wrapping_sub(start);
                if used >= total {
                    return Ok(VmExit::PreemptionTimer);
                }
                slice = Some(total - used);
            }
        }
    }

    fn registers(&mut self) -> &mut GuestRegisters {
        &mut self.ctx.regs
    }

    fn rip(&self) -> u64 {
        self.vmcb().save.rip
    }

    fn rflags(&self) -> u64 {
        self.vmcb().save.rflags
    }

    fn skip_instruction(&mut self) {
        match self.next_rip.take() {
            Some(next) => {
                let v = self.vmcb_mut();
                v.save.rip = next;
                // The instruction completed: an STI/MOV SS shadow before it no longer applies.
                v.control.interrupt_shadow &= !1;
                if v.save.rflags & RFLAGS_TF != 0 {
                    // APM Vol. 2 §13.1.4 (single-step) and §15.7.1: an intercepted instruction
                    // did not execute, so the CPU raised no single-step trap; the instruction is
                    // completed here, so the trap is too: #DB right after it, DR6.BS = 1, RIP
                    // past it. EVENTINJ does not touch DR6 (§15.20), so BS is set first. An
                    // STI/MOV SS shadow before the instruction covered only that instruction.
                    v.save.dr6 |= DR6_BS;
                    self.inject(Exception::DEBUG);
                }
            }
            None => {
                log::warn!("AMD-V: skip_instruction after an exit that was not an instruction ({:?})", self.last_exit)
            }
        }
    }

    fn inject(&mut self, exception: Exception) {
        let mut event = u64::from(exception.vector) | EVENTINJ_TYPE_EXCEPTION | EVENTINJ_VALID;
        if let Some(code) = exception.error_code {
            event |= EVENTINJ_EV | (u64::from(code) << 32);
        }
        let c = &mut self.vmcb_mut().control;
        c.event_injection = event;
        // Delivering an exception ends an STI/MOV SS shadow (as on VT-x).
        c.interrupt_shadow &= !1;
    }

    fn rsp(&self) -> u64 {
        self.vmcb().save.rsp
    }

    fn set_rsp(&mut self, value: u64) {
        self.vmcb_mut().save.rsp = value;
    }

    fn control_state(&self) -> ControlState {
        let v = self.vmcb();
        let s = &v.save;
        ControlState {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            // With V_INTR_MASKING, guest CR8 accesses go to V_TPR (§15.21.1).
            cr8: v.control.virtual_interrupt & 0xF,
            efer: s.efer & !EFER_SVME,
            // CS attribute bit 9: L (Appendix B, segment attribute packing).
            long_mode: s.cs.attrib & (1 << 9) != 0,
        }
    }

    fn set_control_register(&mut self, cr: u8, value: u64) {
        let v = self.vmcb_mut();
        match cr {
            0 => v.save.cr0 = value,
            3 => v.save.cr3 = value,
            4 => v.save.cr4 = value,
            8 => v.control.virtual_interrupt = (v.control.virtual_interrupt & !0xF) | (value & 0xF),
            _ => return,
        }
        if cr != 8 {
            // The CPU did not perform the write, so it did not flush what MOV to CR0/CR3/CR4
            // flushes (PGE, PCIDE toggles...): flush this guest's TLB entries on the next VMRUN.
            self.flush_on_entry = true;
        }
    }

    fn rdtscp_intercepted(&self) -> bool {
        // The RDTSCP intercept is always set (`load_entry_state`); where the CPU lacks RDTSCP,
        // CPUID hides it anyway (the host's bit is 0) and the CPU raises #UD.
        true
    }

    fn hardware_msr(&self, msr: HardwareMsr) -> u64 {
        let s = &self.vmcb().save;
        match msr {
            HardwareMsr::Efer => s.efer & !EFER_SVME,
            HardwareMsr::FsBase => s.fs.base,
            HardwareMsr::GsBase => s.gs.base,
            HardwareMsr::Pat => s.g_pat,
            HardwareMsr::SysenterCs => s.sysenter_cs,
            HardwareMsr::SysenterEsp => s.sysenter_esp,
            HardwareMsr::SysenterEip => s.sysenter_eip,
            // VMSAVE after every #VMEXIT keeps these current (SWAPGS included); VMLOAD before
            // VMRUN loads them (APM Vol. 2 §15.5.2).
            HardwareMsr::Star => s.star,
            HardwareMsr::Lstar => s.lstar,
            HardwareMsr::Cstar => s.cstar,
            HardwareMsr::Fmask => s.sfmask,
            HardwareMsr::KernelGsBase => s.kernel_gs_base,
        }
    }

    fn set_hardware_msr(&mut self, msr: HardwareMsr, value: u64) {
        let s = &mut self.vmcb_mut().save;
        match msr {
            HardwareMsr::Efer => s.efer = value | EFER_SVME,
            HardwareMsr::FsBase => s.fs.base = value,
            HardwareMsr::GsBase => s.gs.base = value,
            HardwareMsr::Pat => s.g_pat = value,
            HardwareMsr::SysenterCs => s.sysenter_cs = value,
            HardwareMsr::SysenterEsp => s.sysenter_esp = value,
            HardwareMsr::SysenterEip => s.sysenter_eip = value,
            HardwareMsr::Star => s.star = value,
            HardwareMsr::Lstar => s.lstar = value,
            HardwareMsr::Cstar => s.cstar = value,
            HardwareMsr::Fmask => s.sfmask = value,
            HardwareMsr::KernelGsBase => s.kernel_gs_base = value,
        }
    }

    fn set_time_slice(&mut self, tsc_ticks: u64) {
        self.time_slice = Some(tsc_ticks);
    }

    fn hypercall_insn(&self) -> HypercallInsn {
        HypercallInsn::Vmmcall
    }

    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        let v = self.vmcb();
        let (c, s, r) = (&v.control, &v.save, &self.ctx.regs);
        writeln!(out, "AMD-V vCPU, VMCB at {:#x}, ASID {}", self.vmcb_pa, c.guest_asid)?;
        writeln!(
            out,
            "  exit code {:#x} info1 {:#x} info2 {:#x} exitintinfo {:#x} next_rip {:#x}",
            c.exit_code, c.exit_info1, c.exit_info2, c.exit_int_info, c.next_rip
        )?;
        writeln!(out, "  guest RIP={:#018x} RSP={:#018x} RFLAGS={:#018x} CPL={}", s.rip, s.rsp, s.rflags, s.cpl)?;
        writeln!(out, "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", r.rax, r.rbx, r.rcx, r.rdx)?;
        writeln!(out, "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}", r.rsi, r.rdi, r.rbp, r.r8)?;
        writeln!(out, "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}", r.r9, r.r10, r.r11, r.r12)?;
        writeln!(out, "  r13={:#018x} r14={:#018x} r15={:#018x}", r.r13, r.r14, r.r15)?;
        writeln!(
            out,
            "  cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x} efer={:#018x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )?;
        for (name, seg) in [("cs", s.cs), ("ss", s.ss), ("ds", s.ds), ("tr", s.tr), ("gdtr", s.gdtr), ("idtr", s.idtr)]
        {
            writeln!(
                out,
                "  {name:4} sel={:#06x} attrib={:#05x} limit={:#010x} base={:#018x}",
                seg.selector, seg.attrib, seg.limit, seg.base
            )?;
        }
        writeln!(out, "  nCR3={:#x} guest RAM {:#x}..{:#x}", c.nested_cr3, self.guest_ram.start, self.guest_ram.end)
    }

    fn backend_name(&self) -> &'static str {
        "AMD-V"
    }

    fn save_state(&self) -> Result<VcpuState, StateError> {
        let v = self.vmcb();
        let (c, sv) = (&v.control, &v.save);
        let mut s = VcpuState::empty();
        s.set_registers(&self.ctx.regs);
        s.rsp = sv.rsp;
        s.rip = sv.rip;
        s.rflags = sv.rflags;
        // AMD-V has no read shadows: CR0/CR4 reads are not intercepted, so the guest sees the
        // VMCB's values (writes exit and are refused, so they are always the entry values).
        s.cr0 = sv.cr0;
        s.cr2 = sv.cr2;
        s.cr3 = sv.cr3;
        s.cr4 = sv.cr4;
        // With V_INTR_MASKING, guest CR8 accesses go to V_TPR (APM Vol. 2 §15.21.1).
        s.cr8 = c.virtual_interrupt & 0xF;
        // EFER.SVME is set for VMRUN's sake only (§15.5.1); the guest never sees it.
        s.efer = sv.efer & !EFER_SVME;
        s.pat = sv.g_pat;
        s.debugctl = sv.dbgctl;
        s.dr = [self.debug[0], self.debug[1], self.debug[2], self.debug[3], sv.dr6, sv.dr7];
        s.sysenter = [sv.sysenter_cs, sv.sysenter_esp, sv.sysenter_eip];
        // The VMCB copies (VMSAVE after every #VMEXIT); the snapshot code then puts the exit
        // handler's store over them, which is what the guest reads back.
        s.handler_msrs = [sv.star, sv.lstar, sv.cstar, sv.sfmask, sv.kernel_gs_base, 0];
        for (i, vs) in [sv.es, sv.cs, sv.ss, sv.ds, sv.fs, sv.gs, sv.ldtr, sv.tr].iter().enumerate() {
            s.segments[i] = SegmentState {
                selector: vs.selector,
                access_rights: conv::access_rights_from_attrib(vs.attrib),
                limit: vs.limit,
                base: vs.base,
                ..SegmentState::default()
            };
        }
        // The VMCB keeps CPL in its own field (§15.5.1); the VT-x layout has it as SS.DPL.
        let ss = &mut s.segments[seg::SS].access_rights;
        *ss = (*ss & !(3 << 5)) | (u32::from(sv.cpl & 3) << 5);
        s.gdtr_base = sv.gdtr.base;
        s.gdtr_limit = sv.gdtr.limit;
        s.idtr_base = sv.idtr.base;
        s.idtr_limit = sv.idtr.limit;
        s.interruptibility = conv::interruptibility_from_shadow(c.interrupt_shadow);
        // HLT is intercepted: the vCPU is never halted in hardware.
        s.activity_state = 0;
        // An event still owed to the guest: one queued in EVENTINJ (by the handler or by
        // `load_state`), or one whose delivery an intercept interrupted (EXITINTINFO, §15.7.2),
        // which the next VMRUN re-injects.
        let event = if c.event_injection & EVENTINJ_VALID != 0 { c.event_injection } else { c.exit_int_info };
        if event & EVENTINJ_VALID != 0 {
            if let Some((info, length)) = self.soft_event {
                // Loaded as a VT-x software event: RIP was moved past the instruction for
                // AMD-V's sake; report it as it was loaded.
                s.pending_event = info;
                s.pending_error_code = 0;
                s.pending_instruction_length = length;
                s.rip = sv.rip.wrapping_sub(length.into());
            } else {
                let (info, code) = conv::event_to_vtx(event).ok_or(StateError::Unsupported {
                    backend: "AMD-V",
                    what: "capturing a pending event of a reserved EVENTINJ type",
                })?;
                s.pending_event = info;
                s.pending_error_code = code;
                if conv::is_software_interrupt(event) {
                    // An INTn whose delivery was intercepted: RIP is the INTn, NextRIP past it.
                    let length = c.next_rip.wrapping_sub(sv.rip);
                    if !self.features.nrips || !(1..=15).contains(&length) {
                        return Err(StateError::Unsupported {
                            backend: "AMD-V",
                            what: "capturing an interrupted INTn without NextRIP (no NRIPS)",
                        });
                    }
                    s.pending_instruction_length = length as u32;
                }
            }
        }
        s.fx = self.guest_fx.0;
        Ok(s)
    }

    fn check_state(&self, s: &VcpuState) -> Result<(), StateError> {
        conv::check_loadable(s, mxcsr_mask())?;
        conv::event_from_vtx(s.pending_event, s.pending_error_code, s.pending_instruction_length)?;
        conv::shadow_from_interruptibility(s.interruptibility)?;
        for state in &s.segments {
            conv::attrib_from_access_rights(state.access_rights)?;
        }
        Ok(())
    }

    fn load_state(&mut self, s: &VcpuState) -> Result<(), StateError> {
        // Everything VMRUN, FXRSTOR or EVENTINJ would refuse is refused here, before anything is
        // written: a load is all or nothing.
        self.check_state(s)?;
        let event = conv::event_from_vtx(s.pending_event, s.pending_error_code, s.pending_instruction_length)?;
        let shadow = conv::shadow_from_interruptibility(s.interruptibility)?;
        let mut segments = [Segment::default(); 8];
        for (out, state) in segments.iter_mut().zip(&s.segments) {
            let attrib = conv::attrib_from_access_rights(state.access_rights)?;
            *out = Segment::new(state.selector, attrib, state.limit, state.base);
        }
        // Nothing below can fail.
        let advance = event.map_or(0, |e: AmdEvent| u64::from(e.rip_advance));
        let v = self.vmcb_mut();
        let sv = &mut v.save;
        [sv.es, sv.cs, sv.ss, sv.ds, sv.fs, sv.gs, sv.ldtr, sv.tr] = segments;
        sv.cpl = ((s.segments[seg::SS].access_rights >> 5) & 3) as u8;
        sv.gdtr = Segment::new(0, 0, s.gdtr_limit, s.gdtr_base);
        sv.idtr = Segment::new(0, 0, s.idtr_limit, s.idtr_base);
        sv.efer = s.efer | EFER_SVME;
        sv.cr0 = s.cr0;
        sv.cr2 = s.cr2;
        sv.cr3 = s.cr3;
        sv.cr4 = s.cr4;
        sv.dr6 = s.dr[4];
        sv.dr7 = s.dr[5];
        sv.rflags = s.rflags;
        sv.rip = s.rip.wrapping_add(advance);
        sv.rsp = s.rsp;
        sv.rax = s.gprs[0];
        sv.g_pat = s.pat;
        sv.dbgctl = s.debugctl;
        [sv.sysenter_cs, sv.sysenter_esp, sv.sysenter_eip] = s.sysenter;
        // VMLOAD puts these into the processor at the next VMRUN.
        [sv.star, sv.lstar, sv.cstar, sv.sfmask, sv.kernel_gs_base] =
            [s.handler_msrs[0], s.handler_msrs[1], s.handler_msrs[2], s.handler_msrs[3], s.handler_msrs[4]];
        let c = &mut v.control;
        c.virtual_interrupt = (c.virtual_interrupt & !0xF) | s.cr8;
        c.interrupt_shadow = shadow;
        c.event_injection = event.map_or(0, |e| e.eventinj);
        c.exit_int_info = 0;
        self.ctx.regs = s.registers();
        self.guest_fx.0 = s.fx;
        self.debug = [s.dr[0], s.dr[1], s.dr[2], s.dr[3]];
        self.soft_event = (advance != 0).then_some((s.pending_event, s.pending_instruction_length));
        self.next_rip = None;
        self.last_exit = None;
        // Guest memory and CR3 changed under this ASID's cached translations (§15.16).
        self.flush_on_entry = true;
        Ok(())
    }

    fn enable_dirty_log(&mut self, method: DirtyLogMethod, frames: &mut FrameAllocator) -> Result<(), StateError> {
        if method == DirtyLogMethod::Pml {
            return Err(StateError::Unsupported {
                backend: "AMD-V",
                what: "PML (AMD-V has no page-modification log; use dirty_log=wp or ad)",
            });
        }
        if method == DirtyLogMethod::WriteProtect {
            return self.enable_write_protect(frames);
        }
        // Dirty flags live in leaf entries (APM Vol. 2 §15.25, §5.4.2): with 2 MiB leaves one
        // write would stand for 512 pages, so guest RAM is remapped with 4 KiB pages.
        let npt = match NestedPageTables::build(&mut IdentityTables(frames), self.guest_ram, false) {
            Ok(npt) => npt,
            Err((_, taken)) => {
                for pa in taken {
                    let _ = frames.free(PhysRange::new(pa, PAGE_SIZE));
                }
                return Err(StateError::Unsupported { backend: "AMD-V", what: "memory for 4 KiB nested page tables" });
            }
        };
        self.vmcb_mut().control.nested_cr3 = npt.root();
        if let Some(old) = self.npt.replace(npt) {
            for &pa in old.table_frames() {
                if let Err(e) = frames.free(PhysRange::new(pa, PAGE_SIZE)) {
                    log::warn!("AMD-V: freeing nested table frame {pa:#x}: {e}");
                }
            }
        }
        // Split tables of write-protect tracking sat in the old tables: they go with them.
        self.free_write_tracker(frames);
        self.dirty_logging = true;
        // Translations cached from the old tables go: the next VMRUN flushes this guest's ASID
        // with TLB_CONTROL (§15.16.2).
        self.flush_on_entry = true;
        Ok(())
    }

    fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), StateError> {
        if let (Some(wp), Some(npt)) = (self.wp.as_mut(), self.npt.as_ref()) {
            // Only the pages logged since the last collection lose write permission again; the
            // TLB may hold writable translations for them, so the next VMRUN flushes this guest's
            // ASID (TLB_CONTROL, APM Vol. 2 §15.16.2; nested translations are tagged by ASID,
            // §15.25).
            if wp.collect(npt.table(), &mut ExistingTables, log) > 0 {
                self.flush_on_entry = true;
            }
            return Ok(());
        }
        if !self.dirty_logging {
            return Err(StateError::Unsupported { backend: "AMD-V", what: "collecting before dirty logging is on" });
        }
        // Take and clear every leaf's Dirty flag. The TLB may still hold translations whose
        // dirty state was already recorded, so a later write through them would not set the flag
        // again: `scan_dirty` makes the next VMRUN flush this guest's ASID (TLB_CONTROL = 3, or 1
        // where flush-by-ASID is absent; §15.16.2), after which the first write to each page walks
        // the nested tables and sets Dirty again.
        self.scan_dirty(true, &mut |gpa, len| log.mark_range(gpa, len));
        Ok(())
    }

    fn release(&mut self, frames: &mut FrameAllocator) {
        self.log_stats();
        self.free_write_tracker(frames);
        if let Some(npt) = self.npt.take() {
            for &pa in npt.table_frames() {
                if let Err(e) = frames.free(PhysRange::new(pa, PAGE_SIZE)) {
                    log::warn!("AMD-V: freeing nested table frame {pa:#x}: {e}");
                }
            }
        }
        if self.vmcb_pa != 0 {
            if let Err(e) = frames.free(PhysRange::new(self.vmcb_pa, PAGE_SIZE)) {
                log::warn!("AMD-V: freeing the VMCB frame {:#x}: {e}", self.vmcb_pa);
            }
            // The frame is gone: the vCPU must not run again (the trait's contract), and its
            // VMCB pointer now dangles, so make any use fail loudly.
            self.vmcb_pa = 0;
            self.ctx.guest_vmcb_pa = 0;
        }
    }
}
