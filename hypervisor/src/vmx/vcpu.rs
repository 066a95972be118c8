//! The VT-x backend: VMX bring-up ([`VmxBackend`]) and one vCPU per guest ([`VmxVcpu`]) behind
//! the vendor-neutral [`Vcpu`] trait.
//!
//! Section numbers are Intel SDM Vol. 3C unless noted. Every VMCS field the hardware checks on VM
//! entry (§27.2 controls and host state, §27.3 guest state) is written in `setup_vmcs`, with the
//! rule it satisfies next to it, so the same image runs under Bochs, nested KVM and real hardware.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use guest_shim::abi::HypercallInsn;

use super::controls::{self, ept_cap, MissingControls};
use super::fields::{VmcsField, DUMP_FIELDS};
use super::instructions::{self as insn, rdmsr, vmread, VmxFail};
use crate::host::{gdt, paging::FrameTables};
use crate::memory::dirty::{WriteFault, WriteTracker};
use crate::memory::pagetable::EPT_DIRTY;
use crate::memory::pagetable::{EptFormat, PageTable, TableMemory};
use crate::memory::DirtyLog;
use crate::memory::{FrameAllocator, FrameError, PhysRange, PAGE_SIZE};
use crate::vcpu::state::{seg, SegmentState};
use crate::vcpu::{
    ControlState, CrAccess, DirtyLogMethod, Exception, GuestEntryState, GuestRegisters, HardwareMsr, MemoryAccess,
    StateError, Vcpu, VcpuError, VcpuState, VmExit, DR6_BS, RFLAGS_TF,
};

/// Capability and control MSRs (§A.1-A.10).
mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    pub const IA32_EFER: u32 = 0xC000_0080;
    pub const IA32_FS_BASE: u32 = 0xC000_0100;
    pub const IA32_GS_BASE: u32 = 0xC000_0101;
    /// STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE: not in the VMCS (SYSCALL/SWAPGS state).
    pub const SYSCALL: [u32; 5] = [0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102];
}

const CR4_VMXE: u64 = 1 << 13;
/// Guest CR0 bits the host owns: PE, NE, NW, CD, PG. A guest write that would change them exits.
const CR0_HOST_OWNED: u64 = (1 << 0) | (1 << 5) | (1 << 29) | (1 << 30) | (1 << 31);
/// Guest CR4 bits the host owns: PAE, VMXE, SMXE, OSXSAVE (XSAVE is hidden from guests).
const CR4_HOST_OWNED: u64 = (1 << 5) | (1 << 13) | (1 << 14) | (1 << 18);
/// The power-on IA32_PAT value (SDM Vol. 3A §13.12.4).
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;
/// Access rights (§25.4.1, Table 25-2): 64-bit code, execute/read, accessed, present, G.
const AR_CODE64: u64 = 0xA09B;
/// Read/write data, accessed, present, D/B, G.
const AR_DATA: u64 = 0xC093;
/// 64-bit busy TSS, present.
const AR_TSS_BUSY: u64 = 0x8B;
/// Bit 16: segment unusable.
const AR_UNUSABLE: u64 = 1 << 16;
/// Interruption-information valid bit and hardware-exception type (§25.8.3, Table 25-17).
const INTR_INFO_VALID: u64 = 1 << 31;
const INTR_TYPE_HW_EXCEPTION: u64 = 3 << 8;
const INTR_DELIVER_ERROR_CODE: u64 = 1 << 11;

/// Why the VT-x backend could not start or make a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// A CPU feature the backend needs is missing.
    MissingFeature {
        /// Its name and where it is reported.
        feature: &'static str,
    },
    /// A VMX control the backend needs cannot be set.
    Controls(MissingControls),
    /// The firmware locked VMX off.
    DisabledByFirmware {
        /// IA32_FEATURE_CONTROL.
        feature_control: u64,
    },
    /// A VMX instruction failed.
    Instruction(VmxFail),
    /// No memory for VMX structures.
    Memory(FrameError),
    /// Building the EPT failed.
    Ept(crate::memory::pagetable::MapError),
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingFeature { feature } => write!(f, "VT-x: missing CPU feature: {feature}"),
            Self::Controls(m) => write!(f, "VT-x: {m}"),
            Self::DisabledByFirmware { feature_control } => write!(
                f,
                "VT-x: disabled by firmware: IA32_FEATURE_CONTROL={feature_control:#x} is locked without \
                 bit 2 (VMXON outside SMX)"
            ),
            Self::Instruction(e) => write!(f, "VT-x: {e}"),
            Self::Memory(e) => write!(f, "VT-x: {e}"),
            Self::Ept(e) => write!(f, "VT-x: EPT: {e}"),
        }
    }
}

impl From<VmxFail> for VmxError {
    fn from(e: VmxFail) -> Self {
        Self::Instruction(e)
    }
}

impl From<FrameError> for VmxError {
    fn from(e: FrameError) -> Self {
        Self::Memory(e)
    }
}

/// What VMX bring-up found and chose.
#[derive(Clone, Copy, Debug)]
pub struct VmxCapabilities {
    revision: u32,
    pin: u32,
    primary: u32,
    secondary: u32,
    exit: u32,
    entry: u32,
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
    ept_vpid: u64,
    pml_available: bool,
    /// TSC ticks per preemption-timer tick is `1 << preemption_shift` (§25.5.1, IA32_VMX_MISC[4:0]).
    preemption_shift: u32,
}

impl VmxCapabilities {
    /// EPT accessed/dirty flags are available and enabled.
    pub fn ept_accessed_dirty(&self) -> bool {
        self.ept_vpid & ept_cap::ACCESSED_DIRTY != 0
    }

    /// The CPU has the page-modification log (and the EPT A/D flags it needs).
    pub fn pml(&self) -> bool {
        self.pml_available
    }

    /// VPIDs are in use.
    pub fn vpid(&self) -> bool {
        self.secondary & controls::secondary::ENABLE_VPID != 0
    }

    /// The dirty-tracking method this CPU gives.
    pub fn dirty_tracking(&self) -> &'static str {
        if self.pml() {
            "PML (page-modification log) available"
        } else if self.ept_accessed_dirty() {
            "EPT A/D-bit scan available"
        } else {
            "none (no PML, no EPT A/D flags)"
        }
    }
}

/// VMX operation on this CPU.
#[derive(Debug)]
pub struct VmxBackend {
    caps: VmxCapabilities,
    vmxon_region: u64,
    next_vpid: u16,
}

impl VmxBackend {
    /// Checks every capability the backend relies on, then enters VMX operation (§24.7, §24.8).
    pub fn init(frames: &mut FrameAllocator) -> Result<Self, VmxError> {
        let leaf1 = crate::host::cpu::cpuid(1, 0);
        if leaf1.ecx & (1 << 5) == 0 {
            return Err(VmxError::MissingFeature { feature: "VMX (CPUID.1:ECX[5])" });
        }
        // §24.7: VMXON outside SMX needs IA32_FEATURE_CONTROL bits 0 (lock) and 2.
        let fc = rdmsr(msr::IA32_FEATURE_CONTROL);
        if fc & 1 == 0 {
            // SAFETY: unlocked: set "VMXON outside SMX" and lock, as firmware would.
            unsafe { insn::wrmsr(msr::IA32_FEATURE_CONTROL, fc | 0b101) };
        } else if fc & 0b100 == 0 {
            return Err(VmxError::DisabledByFirmware { feature_control: fc });
        }
        let basic = rdmsr(msr::IA32_VMX_BASIC);
        // §A.1: bits 53:50 memory type for VMCS access must be write-back (6).
        if (basic >> 50) & 0xF != 6 {
            return Err(VmxError::MissingFeature { feature: "write-back VMCS memory type (IA32_VMX_BASIC[53:50])" });
        }
        if (basic >> 32) & 0x1FFF > PAGE_SIZE {
            return Err(VmxError::MissingFeature { feature: "VMCS region of at most 4 KiB (IA32_VMX_BASIC[44:32])" });
        }
        // §A.2: bit 55 says the TRUE capability MSRs exist; use them (they let default-1 controls go to 0).
        let true_ctls = basic & (1 << 55) != 0;
        let pick = |plain, r#true| rdmsr(if true_ctls { r#true } else { plain });
        use controls::{entry, exit, pin, primary, secondary};
        let pin_cap = pick(msr::IA32_VMX_PINBASED_CTLS, msr::IA32_VMX_TRUE_PINBASED_CTLS);
        let primary_cap = pick(msr::IA32_VMX_PROCBASED_CTLS, msr::IA32_VMX_TRUE_PROCBASED_CTLS);
        let exit_cap = pick(msr::IA32_VMX_EXIT_CTLS, msr::IA32_VMX_TRUE_EXIT_CTLS);
        let entry_cap = pick(msr::IA32_VMX_ENTRY_CTLS, msr::IA32_VMX_TRUE_ENTRY_CTLS);
        // Name the features the backend cannot do without, in an order that never reads an MSR
        // the CPU lacks: IA32_VMX_PROCBASED_CTLS2 exists only with secondary controls (§A.3.3),
        // IA32_VMX_EPT_VPID_CAP only with EPT or VPID (§A.10).
        require(
            primary_cap,
            primary::SECONDARY_CONTROLS,
            "secondary processor-based controls (IA32_VMX_PROCBASED_CTLS[63])",
        )?;
        let secondary_cap = rdmsr(msr::IA32_VMX_PROCBASED_CTLS2);
        require(secondary_cap, secondary::ENABLE_EPT, "EPT (IA32_VMX_PROCBASED_CTLS2[33])")?;
        require(pin_cap, pin::PREEMPTION_TIMER, "VMX-preemption timer (IA32_VMX_PINBASED_CTLS[38])")?;
        require(entry_cap, entry::IA32E_MODE_GUEST, "IA-32e mode guests (IA32_VMX_ENTRY_CTLS[41])")?;
        require(entry_cap, entry::LOAD_EFER, "loading IA32_EFER on VM entry (IA32_VMX_ENTRY_CTLS[47])")?;
        require(exit_cap, exit::LOAD_EFER, "loading IA32_EFER on VM exit (IA32_VMX_EXIT_CTLS[53])")?;
        let pin_ctls = controls::adjust(
            "pin-based",
            pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING | pin::PREEMPTION_TIMER,
            0,
            pin_cap,
        )
        .map_err(VmxError::Controls)?;
        let primary_ctls = controls::adjust(
            "primary processor-based",
            primary::HLT_EXITING
                | primary::RDTSC_EXITING
                | primary::USE_IO_BITMAPS
                | primary::USE_MSR_BITMAPS
                | primary::SECONDARY_CONTROLS,
            // CR8 accesses exit and go to the vCPU's own TPR; RDPMC (#GP: no PMU in CPUID) and
            // MONITOR/MWAIT (#UD: hidden in CPUID) exit, as on AMD-V (docs/exits.md).
            primary::CR8_LOAD_EXITING
                | primary::CR8_STORE_EXITING
                | primary::RDPMC_EXITING
                | primary::MWAIT_EXITING
                | primary::MONITOR_EXITING,
            primary_cap,
        )
        .map_err(VmxError::Controls)?;
        let ept_vpid_raw = rdmsr(msr::IA32_VMX_EPT_VPID_CAP);
        for (bit, feature) in [
            (ept_cap::WALK_LENGTH_4, "4-level EPT walk (IA32_VMX_EPT_VPID_CAP[6])"),
            (ept_cap::MEMORY_TYPE_WB, "write-back EPT structures (IA32_VMX_EPT_VPID_CAP[14])"),
            (ept_cap::INVEPT, "INVEPT (IA32_VMX_EPT_VPID_CAP[20])"),
        ] {
            if ept_vpid_raw & bit == 0 {
                return Err(VmxError::MissingFeature { feature });
            }
        }
        // "Enable RDTSCP" with RDTSC exiting makes RDTSCP exit (reason 51) so it reads the coarse
        // clock; without it RDTSCP is #UD and CPUID hides it (§26.1.3, §26.3). "Enable INVPCID"
        // lets INVPCID run natively where CPUID shows it (else it would be #UD).
        let secondary_ctls = controls::adjust(
            "secondary processor-based",
            secondary::ENABLE_EPT,
            secondary::ENABLE_VPID | secondary::ENABLE_RDTSCP | secondary::ENABLE_INVPCID,
            secondary_cap,
        )
        .map_err(VmxError::Controls)?;
        // PML needs EPT A/D flags (§29.3.6). It is switched on per vCPU only when a dirty log
        // buffer is attached, so here it is only recorded.
        let pml_available =
            (secondary_cap >> 32) as u32 & secondary::ENABLE_PML != 0 && ept_vpid_raw & ept_cap::ACCESSED_DIRTY != 0;
        let exit_ctls = controls::adjust(
            "VM-exit",
            exit::HOST_ADDRESS_SPACE_SIZE
                | exit::ACK_INTERRUPT_ON_EXIT
                | exit::SAVE_PAT
                | exit::LOAD_PAT
                | exit::SAVE_EFER
                | exit::LOAD_EFER,
            0,
            exit_cap,
        )
        .map_err(VmxError::Controls)?;
        let entry_ctls =
            controls::adjust("VM-entry", entry::IA32E_MODE_GUEST | entry::LOAD_PAT | entry::LOAD_EFER, 0, entry_cap)
                .map_err(VmxError::Controls)?;
        // Only advertise A/D when the VPID/EPT side also supports it; PML was enabled only then.
        let ept_vpid = ept_vpid_raw;
        let caps = VmxCapabilities {
            revision: basic as u32 & 0x7FFF_FFFF,
            pin: pin_ctls,
            primary: primary_ctls,
            secondary: secondary_ctls,
            exit: exit_ctls,
            entry: entry_ctls,
            cr0_fixed: (rdmsr(msr::IA32_VMX_CR0_FIXED0), rdmsr(msr::IA32_VMX_CR0_FIXED1)),
            cr4_fixed: (rdmsr(msr::IA32_VMX_CR4_FIXED0), rdmsr(msr::IA32_VMX_CR4_FIXED1)),
            ept_vpid,
            pml_available,
            preemption_shift: (rdmsr(msr::IA32_VMX_MISC) & 0x1F) as u32,
        };

        // §24.8: CR0 and CR4 must satisfy the fixed bits (CR0.NE in particular) before VMXON.
        let cr0 = crate::host::cpu::control_registers().cr0;
        let cr4 = crate::host::cpu::control_registers().cr4 | CR4_VMXE;
        let cr0 = controls::fix_control_register(cr0, caps.cr0_fixed.0, caps.cr0_fixed.1);
        let cr4 = controls::fix_control_register(cr4, caps.cr4_fixed.0, caps.cr4_fixed.1);
        // SAFETY: the new values only add bits the VMX fixed MSRs require (NE, VMXE) to the
        // running configuration; paging, protection and SSE settings are unchanged.
        unsafe {
            core::arch::asm!("mov cr0, {}", in(reg) cr0, options(nostack));
            core::arch::asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        }
        let vmxon_region = revision_page(frames, caps.revision)?;
        // SAFETY: CR4.VMXE and the fixed bits are set above; the region is a fresh page holding
        // the revision identifier, and VmxBackend keeps it for the life of VMX operation.
        unsafe { insn::vmxon(vmxon_region)? };
        super::set_vmx_on();
        if ept_vpid & ept_cap::INVEPT_ALL != 0 {
            // SAFETY: VMX is on and all-context INVEPT is supported: drop stale EPT translations.
            unsafe { insn::invept(2, 0)? };
        }
        Ok(Self { caps, vmxon_region, next_vpid: 1 })
    }

    /// What bring-up found.
    pub fn capabilities(&self) -> &VmxCapabilities {
        &self.caps
    }

    /// A one-line description for the boot log.
    pub fn describe(&self) -> impl fmt::Display + '_ {
        struct D<'a>(&'a VmxBackend);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let c = &self.0.caps;
                write!(
                    f,
                    "VMX on (VMCS revision {:#x}); EPT 4-level write-back{}{}; VPID {}; preemption timer at TSC/{}; \
                     dirty tracking: {}",
                    c.revision,
                    if c.ept_vpid & ept_cap::PAGES_2M != 0 { ", 2 MiB pages" } else { "" },
                    if c.ept_accessed_dirty() { ", A/D flags" } else { "" },
                    if c.vpid() { "on" } else { "off" },
                    1u64 << c.preemption_shift,
                    c.dirty_tracking()
                )
            }
        }
        D(self)
    }

    /// A vCPU for a guest whose RAM is `ram` (host-physical; mapped at guest-physical 0).
    pub fn create_vcpu(
        &mut self,
        frames: &mut FrameAllocator,
        ram: PhysRange,
        entry: &GuestEntryState,
    ) -> Result<VmxVcpu, VmxError> {
        let mut owned = Vec::new();
        let result = self.build_vcpu(frames, ram, entry, &mut owned);
        if result.is_err() {
            for frame in owned {
                let _ = frames.free(PhysRange::new(frame, PAGE_SIZE));
            }
        }
        result
    }

    fn build_vcpu(
        &mut self,
        frames: &mut FrameAllocator,
        ram: PhysRange,
        entry: &GuestEntryState,
        owned: &mut Vec<u64>,
    ) -> Result<VmxVcpu, VmxError> {
        let vmcs = revision_page(frames, self.caps.revision)?;
        owned.push(vmcs);
        // All ones: every MSR access and every port exits (§25.6.4, §25.6.9).
        let msr_bitmap = filled_page(frames, 0xFF)?;
        owned.push(msr_bitmap);
        let io_a = filled_page(frames, 0xFF)?;
        owned.push(io_a);
        let io_b = filled_page(frames, 0xFF)?;
        owned.push(io_b);
        let mut ept_frames = Vec::new();
        let ept = {
            let mut tables = FrameTables { frames: Some(frames), owned: &mut ept_frames };
            let mut ept = PageTable::<EptFormat>::new(&mut tables)?;
            let large = self.caps.ept_vpid & ept_cap::PAGES_2M != 0;
            ept.map(&mut tables, 0, ram.start, ram.len(), large).map_err(VmxError::Ept)?;
            ept
        };
        owned.extend_from_slice(&ept_frames);
        let eptp = controls::ept_pointer(ept.root(), self.caps.ept_accessed_dirty());
        let vpid = if self.caps.vpid() { self.allocate_vpid()? } else { 0 };

        let mut vcpu = VmxVcpu {
            caps: self.caps,
            vmcs,
            ept,
            eptp,
            ept_frames,
            bitmaps: [msr_bitmap, io_a, io_b],
            context: Box::new(SwitchContext::new()),
            ram,
            last_exit: ExitInfo::default(),
            pending_event: None,
            cr2: 0,
            debug: [0, 0, 0, 0, 0xFFFF_0FF0],
            pml_page: None,
            dirty_method: None,
            wp: None,
            time_slice: None,
            slice_shortened: false,
            tpr: 0,
            syscall_msrs: [0; 5],
        };
        // A new VMCS may reuse a released one's address: its MSR values are not in the CPU.
        SYSCALL_MSRS_OWNER.store(0, core::sync::atomic::Ordering::Relaxed);
        // SAFETY: VMX is on; `vmcs` is a fresh region with the right revision, owned by the vCPU.
        unsafe {
            insn::vmclear(vmcs)?;
            insn::vmptrld(vmcs)?;
        }
        CURRENT_VMCS.store(vmcs, core::sync::atomic::Ordering::Relaxed);
        vcpu.setup_vmcs(entry, vpid)?;
        if self.caps.ept_vpid & ept_cap::INVEPT_SINGLE != 0 {
            // SAFETY: VMX is on; flush anything cached for this EPTP (a new table may reuse the
            // address of an old one).
            unsafe { insn::invept(1, eptp)? };
        }
        Ok(vcpu)
    }

    fn allocate_vpid(&mut self) -> Result<u16, VmxError> {
        let vpid = self.next_vpid;
        self.next_vpid = self.next_vpid.checked_add(1).unwrap_or(1);
        if self.next_vpid == 1 && self.caps.ept_vpid & ept_cap::INVVPID_ALL != 0 {
            // SAFETY: VMX is on and all-context INVVPID is supported: VPIDs are about to be reused.
            unsafe { insn::invvpid(2, 0)? };
        }
        Ok(vpid)
    }

    /// The VMXON region (kept for the life of VMX operation).
    pub fn vmxon_region(&self) -> u64 {
        self.vmxon_region
    }
}

/// Fails with `feature` unless the capability MSR `cap` allows control `bit` to be 1 (§A.3.1).
fn require(cap: u64, bit: u32, feature: &'static str) -> Result<(), VmxError> {
    if (cap >> 32) as u32 & bit == 0 {
        Err(VmxError::MissingFeature { feature })
    } else {
        Ok(())
    }
}

/// A zeroed page with the VMCS revision identifier in its first 4 bytes (§25.2).
fn revision_page(frames: &mut FrameAllocator, revision: u32) -> Result<u64, VmxError> {
    let page = filled_page(frames, 0)?;
    // SAFETY: the page was just allocated, identity-mapped and 4 KiB long.
    unsafe { (page as *mut u32).write(revision) };
    Ok(page)
}

fn filled_page(frames: &mut FrameAllocator, byte: u8) -> Result<u64, VmxError> {
    let page = frames.allocate_frame()?;
    // SAFETY: the page was just allocated: identity-mapped, unshared, 4 KiB long.
    unsafe { core::ptr::write_bytes(page as *mut u8, byte, PAGE_SIZE as usize) };
    Ok(page)
}

/// FXSAVE area (SDM Vol. 1 §10.5.1): 512 bytes, 16-byte aligned.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct FxArea([u8; 512]);

/// What the world-switch assembly reads and writes.
#[repr(C, align(64))]
struct SwitchContext {
    regs: GuestRegisters,
    launched: u64,
    guest_fx: FxArea,
    host_fx: FxArea,
}

const CTX_LAUNCHED: usize = core::mem::offset_of!(SwitchContext, launched);
const CTX_GUEST_FX: usize = core::mem::offset_of!(SwitchContext, guest_fx);
const CTX_HOST_FX: usize = core::mem::offset_of!(SwitchContext, host_fx);
const _: () = assert!(core::mem::offset_of!(SwitchContext, regs) == 0);
const _: () = assert!(CTX_LAUNCHED == 120);
const _: () = assert!(CTX_GUEST_FX.is_multiple_of(16) && CTX_HOST_FX.is_multiple_of(16));

impl SwitchContext {
    fn new() -> Self {
        // FXSAVE image of the power-on x87/SSE state: FCW = 0x037F, MXCSR = 0x1F80 (Vol. 1 §10.5.1).
        let mut guest_fx = FxArea([0; 512]);
        guest_fx.0[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        guest_fx.0[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        Self { regs: GuestRegisters::default(), launched: 0, guest_fx, host_fx: FxArea([0; 512]) }
    }
}

/// Enters the guest and returns at the next VM exit (0), or at once if VMLAUNCH/VMRESUME failed
/// (RFLAGS of the failure, never 0). Host callee-saved registers survive; host x87/SSE state is
/// swapped with the guest's inside the switch so no compiled code runs with guest FPU state.
///
/// # Safety
/// A VMCS is current and fully set up, `ctx` is valid, and the caller handles the result.
#[unsafe(naked)]
unsafe extern "C" fn vmx_world_switch(ctx: *mut SwitchContext) -> u64 {
    core::arch::naked_asm!(
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        "fxsave64 [rdi + {host_fx}]",
        "fxrstor64 [rdi + {guest_fx}]",
        // The exit lands at 5: with RSP pointing at the saved context pointer.
        "mov rax, {host_rsp}",
        "vmwrite rax, rsp",
        "lea rdx, [rip + 5f]",
        "mov rax, {host_rip}",
        "vmwrite rax, rdx",
        "cmp qword ptr [rdi + {launched}], 0",
        "mov rax, [rdi + 0]",
        "mov rbx, [rdi + 8]",
        "mov rcx, [rdi + 16]",
        "mov rdx, [rdi + 24]",
        "mov rsi, [rdi + 32]",
        "mov rbp, [rdi + 48]",
        "mov r8, [rdi + 56]",
        "mov r9, [rdi + 64]",
        "mov r10, [rdi + 72]",
        "mov r11, [rdi + 80]",
        "mov r12, [rdi + 88]",
        "mov r13, [rdi + 96]",
        "mov r14, [rdi + 104]",
        "mov r15, [rdi + 112]",
        "mov rdi, [rdi + 40]",
        "jne 2f",
        "vmlaunch",
        "jmp 3f",
        "2:",
        "vmresume",
        // Entry failed: RFLAGS says how; the guest registers are in ours, the context is on the stack.
        "3:",
        "pushfq",
        "pop rax",
        "pop rdi",
        "fxrstor64 [rdi + {host_fx}]",
        "jmp 9f",
        // VM exit.
        "5:",
        "push rdi",
        "mov rdi, [rsp + 8]",
        "mov [rdi + 0], rax",
        "mov [rdi + 8], rbx",
        "mov [rdi + 16], rcx",
        "mov [rdi + 24], rdx",
        "mov [rdi + 32], rsi",
        "mov [rdi + 48], rbp",
        "mov [rdi + 56], r8",
        "mov [rdi + 64], r9",
        "mov [rdi + 72], r10",
        "mov [rdi + 80], r11",
        "mov [rdi + 88], r12",
        "mov [rdi + 96], r13",
        "mov [rdi + 104], r14",
        "mov [rdi + 112], r15",
        "pop rax",
        "mov [rdi + 40], rax",
        "add rsp, 8",
        "fxsave64 [rdi + {guest_fx}]",
        "fxrstor64 [rdi + {host_fx}]",
        "xor eax, eax",
        // Both paths: host callee-saved registers back, RAX is the result.
        "9:",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        host_rsp = const VmcsField::HostRsp as u32,
        host_rip = const VmcsField::HostRip as u32,
        launched = const CTX_LAUNCHED,
        guest_fx = const CTX_GUEST_FX,
        host_fx = const CTX_HOST_FX,
    )
}

/// What the last exit left in the read-only VMCS fields.
#[derive(Clone, Copy, Debug, Default)]
struct ExitInfo {
    qualification: u64,
    instruction_length: u64,
    idt_vectoring: u64,
    idt_vectoring_error: u64,
}

/// One guest's vCPU under VT-x.
#[derive(Debug)]
pub struct VmxVcpu {
    caps: VmxCapabilities,
    vmcs: u64,
    ept: PageTable<EptFormat>,
    eptp: u64,
    ept_frames: Vec<u64>,
    /// MSR bitmap, I/O bitmap A, I/O bitmap B.
    bitmaps: [u64; 3],
    context: Box<SwitchContext>,
    ram: PhysRange,
    last_exit: ExitInfo,
    pending_event: Option<Exception>,
    /// Guest CR2 and DR0-DR3, DR6: not in the VMCS, so switched around every entry (§27.3.1).
    cr2: u64,
    debug: [u64; 5],
    /// The page-modification log buffer, when PML is on.
    pml_page: Option<u64>,
    dirty_method: Option<DirtyLogMethod>,
    /// Write-protect tracking, when on (its split frames are EPT frames, in `ept_frames`).
    wp: Option<WriteTracker>,
    /// The time slice in host TSC ticks, when set.
    time_slice: Option<u64>,
    /// The VMCS preemption-timer field holds a remainder, not the whole slice.
    slice_shortened: bool,
    /// The guest's CR8 (TPR): CR8 accesses exit (CR8-load/store exiting), so it lives here.
    tpr: u64,
    /// The guest's STAR, LSTAR, CSTAR, FMASK and KERNEL_GS_BASE. The VMCS does not switch them:
    /// they are written to the CPU before entry when another vCPU's values are there (the host
    /// never executes SYSCALL or SWAPGS, so it needs none of its own), and KERNEL_GS_BASE is
    /// read back after every exit (a native SWAPGS changes it).
    syscall_msrs: [u64; 5],
}

impl fmt::Debug for SwitchContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchContext").field("regs", &self.regs).field("launched", &self.launched).finish()
    }
}

/// Writes a VMCS field during setup, where any failure is a hypervisor bug worth a named error.
fn write(field: VmcsField, value: u64) -> Result<(), VmxError> {
    // SAFETY: only called from `setup_vmcs` and the vCPU's own methods on its current VMCS, with
    // values derived from the SDM rules cited at each call.
    unsafe { insn::vmwrite(field, value) }.map_err(VmxError::Instruction)
}

fn read(field: VmcsField) -> u64 {
    vmread(field).unwrap_or(0)
}

impl VmxVcpu {
    /// Fills the current VMCS: controls (§25.6-25.8), host state (§25.5, checked per §27.2.2-27.2.4)
    /// and guest state (§25.4, checked per §27.3.1).
    fn setup_vmcs(&mut self, e: &GuestEntryState, vpid: u16) -> Result<(), VmxError> {
        use VmcsField as F;
        let c = self.caps;
        // Controls.
        write(F::PinBasedControls, c.pin.into())?;
        write(F::PrimaryProcControls, c.primary.into())?;
        write(F::SecondaryProcControls, c.secondary.into())?;
        write(F::ExitControls, c.exit.into())?;
        write(F::EntryControls, c.entry.into())?;
        write(F::ExceptionBitmap, 0)?;
        write(F::PageFaultErrorCodeMask, 0)?;
        write(F::PageFaultErrorCodeMatch, 0)?;
        write(F::Cr3TargetCount, 0)?;
        write(F::ExitMsrStoreCount, 0)?;
        write(F::ExitMsrLoadCount, 0)?;
        write(F::EntryMsrLoadCount, 0)?;
        write(F::EntryInterruptionInfo, 0)?;
        write(F::MsrBitmap, self.bitmaps[0])?;
        write(F::IoBitmapA, self.bitmaps[1])?;
        write(F::IoBitmapB, self.bitmaps[2])?;
        write(F::TscOffset, 0)?;
        write(F::EptPointer, self.eptp)?;
        if c.vpid() {
            // §27.2.1.1: with "enable VPID" the VPID must not be 0.
            write(F::Vpid, vpid.into())?;
        }
        // §27.3.1.5: the VMCS link pointer must be all ones when shadowing is off.
        write(F::VmcsLinkPointer, u64::MAX)?;
        write(F::Cr0GuestHostMask, CR0_HOST_OWNED)?;
        write(F::Cr4GuestHostMask, CR4_HOST_OWNED)?;
        write(F::Cr0ReadShadow, e.cr0)?;
        write(F::Cr4ReadShadow, e.cr4)?;

        // Host state: what the CPU loads on every VM exit.
        let cr = crate::host::cpu::control_registers();
        write(F::HostCr0, cr.cr0)?;
        write(F::HostCr3, cr.cr3)?;
        write(F::HostCr4, cr.cr4)?;
        let sel = gdt::selectors().expect("GDT loaded before VMX");
        // §27.2.3: host selectors have RPL 0 and TI 0; CS and TR are not null.
        write(F::HostCsSelector, (sel.code.0 & !7).into())?;
        for field in [F::HostSsSelector, F::HostDsSelector, F::HostEsSelector, F::HostFsSelector, F::HostGsSelector] {
            write(field, (sel.data.0 & !7).into())?;
        }
        write(F::HostTrSelector, (sel.tss.0 & !7).into())?;
        write(F::HostFsBase, rdmsr(msr::IA32_FS_BASE))?;
        write(F::HostGsBase, rdmsr(msr::IA32_GS_BASE))?;
        write(F::HostTrBase, gdt::tss_base())?;
        let (gdtr, idtr) = (x86_64::instructions::tables::sgdt(), x86_64::instructions::tables::sidt());
        write(F::HostGdtrBase, gdtr.base.as_u64())?;
        write(F::HostIdtrBase, idtr.base.as_u64())?;
        write(F::HostSysenterCs, rdmsr(msr::IA32_SYSENTER_CS))?;
        write(F::HostSysenterEsp, rdmsr(msr::IA32_SYSENTER_ESP))?;
        write(F::HostSysenterEip, rdmsr(msr::IA32_SYSENTER_EIP))?;
        write(F::HostIa32Efer, rdmsr(msr::IA32_EFER))?;
        write(F::HostIa32Pat, rdmsr(msr::IA32_PAT))?;

        // Guest state: the boot protocol's 64-bit entry state.
        // §27.3.1.1: CR0/CR4 meet the fixed bits (CR4.VMXE in particular, hidden by the shadow).
        write(F::GuestCr0, controls::fix_control_register(e.cr0, c.cr0_fixed.0, c.cr0_fixed.1))?;
        write(F::GuestCr4, controls::fix_control_register(e.cr4 | CR4_VMXE, c.cr4_fixed.0, c.cr4_fixed.1))?;
        write(F::GuestCr3, e.cr3)?;
        // §27.3.1.1: with "IA-32e mode guest", EFER.LMA = EFER.LME = 1 and CR0.PG = CR4.PAE = 1.
        write(F::GuestIa32Efer, e.efer)?;
        write(F::GuestIa32Pat, DEFAULT_PAT)?;
        write(F::GuestIa32Debugctl, 0)?;
        // §27.3.1.1: DR7 bits 63:32 are 0; 0x400 is its reset value.
        write(F::GuestDr7, 0x400)?;
        // §27.3.1.2: CS is a present 64-bit code segment (L=1, D=0) with DPL = SS.DPL = 0.
        write(F::GuestCsSelector, e.code_selector.into())?;
        write(F::GuestCsBase, 0)?;
        write(F::GuestCsLimit, 0xFFFF_FFFF)?;
        write(F::GuestCsAccessRights, AR_CODE64)?;
        for (selector, base, limit, rights) in [
            (F::GuestSsSelector, F::GuestSsBase, F::GuestSsLimit, F::GuestSsAccessRights),
            (F::GuestDsSelector, F::GuestDsBase, F::GuestDsLimit, F::GuestDsAccessRights),
            (F::GuestEsSelector, F::GuestEsBase, F::GuestEsLimit, F::GuestEsAccessRights),
            (F::GuestFsSelector, F::GuestFsBase, F::GuestFsLimit, F::GuestFsAccessRights),
            (F::GuestGsSelector, F::GuestGsBase, F::GuestGsLimit, F::GuestGsAccessRights),
        ] {
            write(selector, e.data_selector.into())?;
            write(base, 0)?;
            // §27.3.1.2: with G=1 the low 12 limit bits must be all ones.
            write(limit, 0xFFFF_FFFF)?;
            write(rights, AR_DATA)?;
        }
        // §27.3.1.2: TR must be usable, a busy 64-bit TSS (type 11), S=0, present. The guest never
        // switches tasks; a zero base and minimal limit satisfy the checks.
        write(F::GuestTrSelector, 0)?;
        write(F::GuestTrBase, 0)?;
        write(F::GuestTrLimit, 0x67)?;
        write(F::GuestTrAccessRights, AR_TSS_BUSY)?;
        write(F::GuestLdtrSelector, 0)?;
        write(F::GuestLdtrBase, 0)?;
        write(F::GuestLdtrLimit, 0)?;
        write(F::GuestLdtrAccessRights, AR_UNUSABLE)?;
        write(F::GuestGdtrBase, e.gdt_base)?;
        write(F::GuestGdtrLimit, e.gdt_limit.into())?;
        // No IDT yet: the guest installs its own; any exception before that escalates to a
        // triple fault, which exits.
        write(F::GuestIdtrBase, 0)?;
        write(F::GuestIdtrLimit, 0)?;
        write(F::GuestRip, e.rip)?;
        write(F::GuestRsp, e.rsp)?;
        // §27.3.1.4: RFLAGS bit 1 set, reserved bits clear, VM = 0.
        write(F::GuestRflags, e.rflags)?;
        write(F::GuestPendingDebugExceptions, 0)?;
        write(F::GuestInterruptibility, 0)?;
        write(F::GuestActivityState, 0)?;
        write(F::GuestSysenterCs, 0)?;
        write(F::GuestSysenterEsp, 0)?;
        write(F::GuestSysenterEip, 0)?;
        write(F::GuestPreemptionTimer, u32::MAX.into())?;
        self.context.regs = GuestRegisters { rdi: e.rdi, ..GuestRegisters::default() };
        Ok(())
    }

    /// Decodes the exit the CPU just reported (§28.2, reasons from Appendix C).
    fn decode_exit(&mut self) -> VmExit {
        use VmcsField as F;
        let reason = read(F::ExitReason) as u32;
        self.last_exit = ExitInfo {
            qualification: read(F::ExitQualification),
            instruction_length: read(F::ExitInstructionLength),
            idt_vectoring: read(F::IdtVectoringInfo),
            idt_vectoring_error: read(F::IdtVectoringErrorCode),
        };
        let q = self.last_exit.qualification;
        let regs = &self.context.regs;
        if reason & (1 << 31) != 0 {
            // §28.8: VM-entry failure during or after loading guest state.
            return VmExit::EntryFailed { reason: reason & 0xFFFF, qualification: q };
        }
        match reason & 0xFFFF {
            0 => {
                let info = read(F::ExitInterruptionInfo);
                if info & 0x7FF == (2 << 8) | 2 {
                    VmExit::ExternalInterrupt { vector: Some(2) }
                } else {
                    VmExit::Unhandled { reason: 0 }
                }
            }
            1 => {
                let info = read(F::ExitInterruptionInfo);
                VmExit::ExternalInterrupt { vector: (info & INTR_INFO_VALID != 0).then_some(info as u8) }
            }
            2 => VmExit::TripleFault,
            10 => VmExit::Cpuid { leaf: regs.rax as u32, subleaf: regs.rcx as u32 },
            // GETSEC exits unconditionally (§26.1.2); SMX is hidden in CPUID, so #UD.
            11 => VmExit::UndefinedInstruction { what: "GETSEC" },
            12 => VmExit::Hlt,
            // INVD exits unconditionally (§26.1.2).
            13 => VmExit::Invd,
            15 => VmExit::Rdpmc,
            16 => VmExit::Rdtsc,
            18 => VmExit::Hypercall,
            // VMCLEAR..VMXON, INVEPT, INVVPID, VMFUNC (§26.1.2).
            19..=27 | 50 | 53 | 59 => VmExit::VirtualizationInstruction,
            28 => VmExit::ControlRegisterAccess { cr: (q & 0xF) as u8, access: cr_access(q) },
            36 => VmExit::UndefinedInstruction { what: "MWAIT" },
            39 => VmExit::UndefinedInstruction { what: "MONITOR" },
            51 => VmExit::Rdtscp,
            // Table 28-5.
            30 => {
                VmExit::Io { port: (q >> 16) as u16, size: ((q & 7) + 1) as u8, write: q & 8 == 0, string: q & 16 != 0 }
            }
            31 => VmExit::MsrRead { msr: regs.rcx as u32 },
            32 => VmExit::MsrWrite { msr: regs.rcx as u32, value: (regs.rdx << 32) | (regs.rax & 0xFFFF_FFFF) },
            // Table 28-7: bit 1 = write, bit 2 = instruction fetch.
            48 => VmExit::NestedPageFault {
                gpa: read(F::GuestPhysicalAddress),
                access: if q & 2 != 0 {
                    MemoryAccess::Write
                } else if q & 4 != 0 {
                    MemoryAccess::Execute
                } else {
                    MemoryAccess::Read
                },
            },
            49 => VmExit::NestedPageMisconfig { gpa: read(F::GuestPhysicalAddress) },
            52 => VmExit::PreemptionTimer,
            55 => VmExit::Xsetbv,
            62 => VmExit::DirtyLogFull,
            other => VmExit::Unhandled { reason: other },
        }
    }

    /// The EPT (for dirty tracking).
    pub fn ept(&self) -> &PageTable<EptFormat> {
        &self.ept
    }

    /// The guest's RAM.
    pub fn ram(&self) -> PhysRange {
        self.ram
    }

    /// Makes this vCPU's VMCS the current one (VMPTRLD), if it is not already. Several vCPUs live
    /// side by side (a snapshot's source and target); every VMCS access goes through here.
    fn activate(&self) {
        use core::sync::atomic::Ordering;
        if CURRENT_VMCS.load(Ordering::Relaxed) != self.vmcs {
            // SAFETY: VMX is on and `vmcs` is this vCPU's VMCS region, cleared at creation and
            // only ever made current by this function.
            match unsafe { insn::vmptrld(self.vmcs) } {
                Ok(()) => CURRENT_VMCS.store(self.vmcs, Ordering::Relaxed),
                Err(e) => log::error!("VT-x: {e}"),
            }
        }
    }

    /// Drops cached guest-physical translations for this EPT (after changing entries, §29.4.3.4).
    fn invalidate_ept(&self) {
        let result = if self.caps.ept_vpid & ept_cap::INVEPT_SINGLE != 0 {
            // SAFETY: VMX is on and single-context INVEPT is supported.
            unsafe { insn::invept(1, self.eptp) }
        } else {
            // SAFETY: VMX is on; INVEPT support was checked at bring-up (all-context then).
            unsafe { insn::invept(2, 0) }
        };
        if let Err(e) = result {
            log::error!("VT-x: {e}");
        }
    }
}

/// Decodes the exit qualification of a control-register access (§28.2.1, Table 28-3): bits 3:0
/// the CR, bits 5:4 the access type (0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW), bits 11:8 the
/// general-purpose register of a MOV (x86 encoding), bits 31:16 the LMSW source data (given for a
/// memory operand too, bit 6 then being 1).
fn cr_access(q: u64) -> CrAccess {
    let gpr = ((q >> 8) & 0xF) as u8;
    match (q >> 4) & 3 {
        0 => CrAccess::Write { gpr },
        1 => CrAccess::Read { gpr },
        2 => CrAccess::Clts,
        _ => CrAccess::Lmsw { source: Some((q >> 16) as u16) },
    }
}

/// The VMCS of the vCPU whose SYSCALL MSRs are in the CPU (0 for none).
static SYSCALL_MSRS_OWNER: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The VMCS region VMPTRLD last made current (0 for none).
static CURRENT_VMCS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Entries in the page-modification log (§29.3.6).
const PML_ENTRIES: u64 = 512;

/// Selector, base, limit and access-rights fields per segment, in `vcpu::state::seg` order.
const SEGMENT_FIELDS: [(VmcsField, VmcsField, VmcsField, VmcsField); 8] = {
    use VmcsField as F;
    let mut t = [(F::GuestEsSelector, F::GuestEsBase, F::GuestEsLimit, F::GuestEsAccessRights); 8];
    t[seg::CS] = (F::GuestCsSelector, F::GuestCsBase, F::GuestCsLimit, F::GuestCsAccessRights);
    t[seg::SS] = (F::GuestSsSelector, F::GuestSsBase, F::GuestSsLimit, F::GuestSsAccessRights);
    t[seg::DS] = (F::GuestDsSelector, F::GuestDsBase, F::GuestDsLimit, F::GuestDsAccessRights);
    t[seg::FS] = (F::GuestFsSelector, F::GuestFsBase, F::GuestFsLimit, F::GuestFsAccessRights);
    t[seg::GS] = (F::GuestGsSelector, F::GuestGsBase, F::GuestGsLimit, F::GuestGsAccessRights);
    t[seg::LDTR] = (F::GuestLdtrSelector, F::GuestLdtrBase, F::GuestLdtrLimit, F::GuestLdtrAccessRights);
    t[seg::TR] = (F::GuestTrSelector, F::GuestTrBase, F::GuestTrLimit, F::GuestTrAccessRights);
    t
};

/// Loads the guest's CR2 and DR0-DR3/DR6 just before entry.
///
/// # Safety
/// Called right before the world switch with interrupts off; the host does not use CR2 or the
/// debug registers, so nothing in the hypervisor observes the guest values.
unsafe fn load_guest_cr2_and_debug(cr2: u64, dr: &[u64; 5]) {
    // SAFETY: as above; the values are the guest's own (DR6's reserved bits are kept as read).
    unsafe {
        core::arch::asm!(
            "mov cr2, {cr2}", "mov dr0, {d0}", "mov dr1, {d1}", "mov dr2, {d2}", "mov dr3, {d3}", "mov dr6, {d6}",
            cr2 = in(reg) cr2, d0 = in(reg) dr[0], d1 = in(reg) dr[1], d2 = in(reg) dr[2], d3 = in(reg) dr[3],
            d6 = in(reg) dr[4] | 0xFFFF_0FF0, options(nostack)
        );
    }
}

/// Reads the guest's CR2 and DR0-DR3/DR6 right after an exit.
fn read_cr2_and_debug() -> (u64, [u64; 5]) {
    let (cr2, d0, d1, d2, d3, d6): (u64, u64, u64, u64, u64, u64);
    // SAFETY: reading control and debug registers has no side effects at CPL 0.
    unsafe {
        core::arch::asm!(
            "mov {cr2}, cr2", "mov {d0}, dr0", "mov {d1}, dr1", "mov {d2}, dr2", "mov {d3}, dr3", "mov {d6}, dr6",
            cr2 = out(reg) cr2, d0 = out(reg) d0, d1 = out(reg) d1, d2 = out(reg) d2, d3 = out(reg) d3,
            d6 = out(reg) d6, options(nostack, nomem)
        );
    }
    (cr2, [d0, d1, d2, d3, d6])
}

impl VmxVcpu {
    /// One VM entry and its exit.
    fn enter(&mut self) -> Result<VmExit, VcpuError> {
        self.activate();
        use VmcsField as F;
        // Events: ours first; otherwise re-deliver an event the last exit interrupted (§28.2.4).
        let event = if let Some(e) = self.pending_event.take() {
            let code = if e.error_code.is_some() { INTR_DELIVER_ERROR_CODE } else { 0 };
            Some((INTR_INFO_VALID | INTR_TYPE_HW_EXCEPTION | code | e.vector as u64, e.error_code.unwrap_or(0).into()))
        } else if self.last_exit.idt_vectoring & INTR_INFO_VALID != 0 {
            Some((self.last_exit.idt_vectoring & !(1 << 12), self.last_exit.idt_vectoring_error))
        } else {
            None
        };
        if let Some((info, code)) = event {
            write(F::EntryInterruptionInfo, info).map_err(|_| VcpuError::EntryInstructionFailed { code: 0 })?;
            write(F::EntryExceptionErrorCode, code).map_err(|_| VcpuError::EntryInstructionFailed { code: 0 })?;
            write(F::EntryInstructionLength, self.last_exit.instruction_length)
                .map_err(|_| VcpuError::EntryInstructionFailed { code: 0 })?;
        }
        self.last_exit.idt_vectoring = 0;
        if SYSCALL_MSRS_OWNER.load(core::sync::atomic::Ordering::Relaxed) != self.vmcs {
            for (msr, value) in msr::SYSCALL.iter().zip(self.syscall_msrs) {
                // SAFETY: the values passed the WRMSR checks of the exit handler or `check_state`
                // (canonical addresses, FMASK[63:32] = 0), so WRMSR cannot fault; the host never
                // executes SYSCALL, SYSRET or SWAPGS, so no host code depends on these MSRs.
                unsafe { insn::wrmsr(*msr, value) };
            }
            SYSCALL_MSRS_OWNER.store(self.vmcs, core::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: this vCPU's VMCS is current (made so at creation; one vCPU runs at a time) and
        // fully set up; the context is boxed, so its address is stable across the switch.
        let result = unsafe {
            load_guest_cr2_and_debug(self.cr2, &self.debug);
            let result = vmx_world_switch(&mut *self.context);
            (self.cr2, self.debug) = read_cr2_and_debug();
            result
        };
        if result != 0 {
            let code = if result & 1 != 0 { 0 } else { read(F::VmInstructionError) as u32 };
            return Err(VcpuError::EntryInstructionFailed { code });
        }
        self.context.launched = 1;
        self.syscall_msrs[4] = rdmsr(msr::SYSCALL[4]);
        // Event injection is one-shot (§27.6).
        let _ = write(F::EntryInterruptionInfo, 0);
        Ok(self.decode_exit())
    }

    /// Write-protect tracking: EPT keeps its 2 MiB leaves, all made read-only; one zeroed EPT
    /// frame per 2 MiB leaf is reserved so the EPT-violation path can split a leaf without
    /// allocating. EPT A/D flags are off (EPTP bit 6 = 0), so the processor's walks of the
    /// guest's own page tables are not treated as writes (SDM Vol. 3C §29.3.5) and only real
    /// writes fault. Enabling again re-arms.
    fn enable_write_protect(&mut self, frames: &mut FrameAllocator) -> Result<(), StateError> {
        let t0 = crate::host::time::rdtsc();
        let unsupported = |what| StateError::Unsupported { backend: "VT-x", what };
        let hw = |_| StateError::Hardware { what: "VMWRITE of dirty-logging controls" };
        if let Some(wp) = self.wp.as_mut() {
            let mut tables = FrameTables { frames: None, owned: &mut self.ept_frames };
            wp.protect_all(&self.ept, &mut tables);
            self.invalidate_ept();
            return Ok(());
        }
        let mut tables = FrameTables { frames: Some(frames), owned: &mut self.ept_frames };
        let needed = WriteTracker::tables_needed(&self.ept, &mut tables);
        let mut pool = Vec::new();
        pool.try_reserve_exact(needed as usize).map_err(|_| unsupported("memory for the 2 MiB split reserve"))?;
        for _ in 0..needed {
            // The frames join the EPT's own (freed with it); a failure leaves them there, unused.
            let frame = tables.allocate_table().map_err(|_| unsupported("memory for the 2 MiB split reserve"))?;
            pool.push(frame);
        }
        let mut wp = WriteTracker::new(pool);
        wp.protect_all(&self.ept, &mut tables);
        let eptp = controls::ept_pointer(self.ept.root(), false);
        write(VmcsField::SecondaryProcControls, self.caps.secondary.into()).map_err(hw)?;
        write(VmcsField::EptPointer, eptp).map_err(hw)?;
        self.eptp = eptp;
        self.wp = Some(wp);
        self.dirty_method = Some(DirtyLogMethod::WriteProtect);
        // Write permission was removed from every leaf: drop cached translations (§29.4.3.4).
        self.invalidate_ept();
        log::info!(
            "VT-x: write-protect dirty tracking on: {needed} 2 MiB leaves read-only, {needed} split frames reserved, \
             {} TSC cycles",
            crate::host::time::rdtsc() - t0
        );
        Ok(())
    }
}

impl Vcpu for VmxVcpu {
    /// Enters the guest until an exit the runner must see. With write-protect tracking on, the
    /// EPT violations of first writes are handled here (logged, page made writable, guest
    /// entered again) within the same time slice.
    fn run(&mut self) -> Result<VmExit, VcpuError> {
        self.activate();
        if self.slice_shortened {
            self.slice_shortened = false;
            if let Some(ticks) = self.time_slice {
                self.set_time_slice(ticks);
            }
        }
        let start = crate::host::time::rdtsc();
        loop {
            let exit = self.enter()?;
            let VmExit::NestedPageFault { gpa, .. } = exit else { return Ok(exit) };
            let Some(wp) = self.wp.as_mut() else { return Ok(exit) };
            let mut tables = FrameTables { frames: None, owned: &mut self.ept_frames };
            match wp.on_write_fault(&self.ept, &mut tables, gpa) {
                // Only write permission was added: the EPT violation invalidated the mappings
                // used for the faulting address (SDM §29.4.3.1), so no INVEPT is needed.
                WriteFault::Logged | WriteFault::Split => {}
                WriteFault::AlreadyWritable => self.invalidate_ept(),
                WriteFault::NotMapped | WriteFault::NoTable => return Ok(exit),
            }
            if let Some(total) = self.time_slice {
                let used = crate::host::time::rdtsc().wrapping_sub(start);
                if used >= total {
                    return Ok(VmExit::PreemptionTimer);
                }
                let value = ((total - used) >> self.caps.preemption_shift).clamp(1, u32::MAX.into());
                let _ = write(VmcsField::GuestPreemptionTimer, value);
                self.slice_shortened = true;
            }
        }
    }

    fn registers(&mut self) -> &mut GuestRegisters {
        &mut self.context.regs
    }

    fn rip(&self) -> u64 {
        self.activate();
        read(VmcsField::GuestRip)
    }

    fn rflags(&self) -> u64 {
        self.activate();
        read(VmcsField::GuestRflags)
    }

    fn skip_instruction(&mut self) {
        self.activate();
        let rip = read(VmcsField::GuestRip) + self.last_exit.instruction_length;
        let _ = write(VmcsField::GuestRip, rip);
        // Emulating an instruction ends STI / MOV-SS blocking (§26.4.2 for the hardware case).
        let interruptibility = read(VmcsField::GuestInterruptibility) & !0b11;
        let _ = write(VmcsField::GuestInterruptibility, interruptibility);
        if read(VmcsField::GuestRflags) & RFLAGS_TF != 0 {
            // Vol. 3A §17.3.1.4: with TF set, a single-step #DB trap follows the instruction,
            // with DR6.BS = 1, and RIP pointing past it. The instruction was completed here, so the
            // trap is raised here: injected as a hardware exception at the new RIP. Event injection
            // (§27.6) delivers the vector through the guest IDT without the DR6 update a real #DB
            // makes, so BS is set in the guest's DR6 (loaded before entry) first.
            // A trap the CPU recorded for an instruction in a MOV SS shadow (pending debug
            // exceptions, §25.4.2) is the same #DB: it is delivered once, now. Blocking by MOV SS
            // never holds this trap back: it covered the completed instruction only (§6.8.3).
            self.debug[4] |= DR6_BS;
            let _ = write(VmcsField::GuestPendingDebugExceptions, 0);
            self.pending_event = Some(Exception::DEBUG);
        }
    }

    fn inject(&mut self, exception: Exception) {
        self.activate();
        // Delivering an exception ends an STI/MOV SS shadow: the handler's first instruction is
        // not in it. Clearing it also keeps the entry check of §27.3.1.5 (TF with blocking by
        // STI or MOV SS needs a pending BS) from failing when the faulting instruction followed
        // MOV SS or STI with TF set: the fault, not a single-step trap, is what the CPU delivers.
        let interruptibility = read(VmcsField::GuestInterruptibility) & !0b11;
        let _ = write(VmcsField::GuestInterruptibility, interruptibility);
        self.pending_event = Some(exception);
    }

    fn rsp(&self) -> u64 {
        self.activate();
        read(VmcsField::GuestRsp)
    }

    fn set_rsp(&mut self, value: u64) {
        self.activate();
        let _ = write(VmcsField::GuestRsp, value);
    }

    fn control_state(&self) -> ControlState {
        self.activate();
        use VmcsField as F;
        // Host-owned bits read from the read shadows (§25.6.6), the rest from the guest fields.
        ControlState {
            cr0: (read(F::GuestCr0) & !CR0_HOST_OWNED) | (read(F::Cr0ReadShadow) & CR0_HOST_OWNED),
            cr3: read(F::GuestCr3),
            cr4: (read(F::GuestCr4) & !CR4_HOST_OWNED) | (read(F::Cr4ReadShadow) & CR4_HOST_OWNED),
            cr8: self.tpr,
            efer: read(F::GuestIa32Efer),
            // CS access rights bit 13: L (§25.4.1, Table 25-2).
            long_mode: read(F::GuestCsAccessRights) & (1 << 13) != 0,
        }
    }

    fn set_control_register(&mut self, cr: u8, value: u64) {
        self.activate();
        use VmcsField as F;
        let c = self.caps;
        // The guest reads `value` back through the shadow; the CPU runs with the fixed bits the
        // VMX operation requires (§24.8, App. A.7/A.8: CR0.NE/PE/PG, CR4.VMXE).
        let _ = match cr {
            0 => write(F::Cr0ReadShadow, value)
                .and_then(|()| write(F::GuestCr0, controls::fix_control_register(value, c.cr0_fixed.0, c.cr0_fixed.1))),
            3 => write(F::GuestCr3, value),
            4 => write(F::Cr4ReadShadow, value).and_then(|()| {
                write(F::GuestCr4, controls::fix_control_register(value | CR4_VMXE, c.cr4_fixed.0, c.cr4_fixed.1))
            }),
            8 => {
                self.tpr = value & 0xF;
                Ok(())
            }
            _ => Ok(()),
        };
    }

    fn rdtscp_intercepted(&self) -> bool {
        self.caps.secondary & controls::secondary::ENABLE_RDTSCP != 0
            && self.caps.primary & controls::primary::RDTSC_EXITING != 0
    }

    fn hardware_msr(&self, which: HardwareMsr) -> u64 {
        self.activate();
        read(match which {
            HardwareMsr::Efer => VmcsField::GuestIa32Efer,
            HardwareMsr::FsBase => VmcsField::GuestFsBase,
            HardwareMsr::GsBase => VmcsField::GuestGsBase,
            HardwareMsr::Pat => VmcsField::GuestIa32Pat,
            HardwareMsr::SysenterCs => VmcsField::GuestSysenterCs,
            HardwareMsr::SysenterEsp => VmcsField::GuestSysenterEsp,
            HardwareMsr::SysenterEip => VmcsField::GuestSysenterEip,
            other => {
                let i = HardwareMsr::SYSCALL.iter().position(|m| *m == other).unwrap_or(0);
                return self.syscall_msrs[i];
            }
        })
    }

    fn set_hardware_msr(&mut self, which: HardwareMsr, value: u64) {
        self.activate();
        let field = match which {
            HardwareMsr::Efer => VmcsField::GuestIa32Efer,
            HardwareMsr::FsBase => VmcsField::GuestFsBase,
            HardwareMsr::GsBase => VmcsField::GuestGsBase,
            HardwareMsr::Pat => VmcsField::GuestIa32Pat,
            HardwareMsr::SysenterCs => VmcsField::GuestSysenterCs,
            HardwareMsr::SysenterEsp => VmcsField::GuestSysenterEsp,
            HardwareMsr::SysenterEip => VmcsField::GuestSysenterEip,
            other => {
                if let Some(i) = HardwareMsr::SYSCALL.iter().position(|m| *m == other) {
                    self.syscall_msrs[i] = value;
                    // Written to the CPU before the next entry.
                    SYSCALL_MSRS_OWNER.store(0, core::sync::atomic::Ordering::Relaxed);
                }
                return;
            }
        };
        let _ = write(field, value);
    }

    fn set_time_slice(&mut self, tsc_ticks: u64) {
        self.activate();
        self.time_slice = Some(tsc_ticks);
        let value = (tsc_ticks >> self.caps.preemption_shift).clamp(1, u32::MAX.into());
        let _ = write(VmcsField::GuestPreemptionTimer, value);
    }

    fn hypercall_insn(&self) -> HypercallInsn {
        HypercallInsn::Vmcall
    }

    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        self.activate();
        let r = &self.context.regs;
        writeln!(out, "VT-x vCPU (VMCS at {:#x}, guest RAM {:#x}..{:#x}):", self.vmcs, self.ram.start, self.ram.end)?;
        writeln!(out, "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", r.rax, r.rbx, r.rcx, r.rdx)?;
        writeln!(out, "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}", r.rsi, r.rdi, r.rbp, r.r8)?;
        writeln!(out, "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}", r.r9, r.r10, r.r11, r.r12)?;
        writeln!(out, "  r13={:#018x} r14={:#018x} r15={:#018x}", r.r13, r.r14, r.r15)?;
        dump_vmcs(out)
    }

    fn backend_name(&self) -> &'static str {
        "VT-x"
    }

    fn save_state(&self) -> Result<VcpuState, StateError> {
        self.activate();
        use VmcsField as F;
        let mut s = VcpuState::empty();
        s.set_registers(&self.context.regs);
        s.rsp = read(F::GuestRsp);
        s.rip = read(F::GuestRip);
        s.rflags = read(F::GuestRflags);
        // The guest-visible control registers: host-owned bits come from the read shadows (§25.6.6).
        s.cr0 = (read(F::GuestCr0) & !CR0_HOST_OWNED) | (read(F::Cr0ReadShadow) & CR0_HOST_OWNED);
        s.cr4 = (read(F::GuestCr4) & !CR4_HOST_OWNED) | (read(F::Cr4ReadShadow) & CR4_HOST_OWNED);
        s.cr2 = self.cr2;
        s.cr3 = read(F::GuestCr3);
        s.cr8 = self.tpr; // CR8 accesses exit and go to the vCPU's own TPR.
        s.efer = read(F::GuestIa32Efer);
        s.pat = read(F::GuestIa32Pat);
        s.debugctl = read(F::GuestIa32Debugctl);
        s.dr = [self.debug[0], self.debug[1], self.debug[2], self.debug[3], self.debug[4], read(F::GuestDr7)];
        s.sysenter = [read(F::GuestSysenterCs), read(F::GuestSysenterEsp), read(F::GuestSysenterEip)];
        for (i, (selector, base, limit, rights)) in SEGMENT_FIELDS.iter().enumerate() {
            s.segments[i] = SegmentState {
                selector: read(*selector) as u16,
                access_rights: read(*rights) as u32,
                limit: read(*limit) as u32,
                base: read(*base),
                ..SegmentState::default()
            };
        }
        s.gdtr_base = read(F::GuestGdtrBase);
        s.gdtr_limit = read(F::GuestGdtrLimit) as u32;
        s.idtr_base = read(F::GuestIdtrBase);
        s.idtr_limit = read(F::GuestIdtrLimit) as u32;
        s.interruptibility = read(F::GuestInterruptibility) as u32;
        s.activity_state = read(F::GuestActivityState) as u32;
        // An event still owed to the guest: one the hypervisor queued, or one an exit interrupted.
        if let Some(e) = self.pending_event {
            let code = if e.error_code.is_some() { INTR_DELIVER_ERROR_CODE } else { 0 };
            s.pending_event = (INTR_INFO_VALID | INTR_TYPE_HW_EXCEPTION | code | u64::from(e.vector)) as u32;
            s.pending_error_code = e.error_code.unwrap_or(0);
        } else if self.last_exit.idt_vectoring & INTR_INFO_VALID != 0 {
            s.pending_event = (self.last_exit.idt_vectoring & !(1 << 12)) as u32;
            s.pending_error_code = self.last_exit.idt_vectoring_error as u32;
            s.pending_instruction_length = self.last_exit.instruction_length as u32;
        }
        s.handler_msrs[..5].copy_from_slice(&self.syscall_msrs);
        s.fx = self.context.guest_fx.0;
        Ok(s)
    }

    fn check_state(&self, s: &VcpuState) -> Result<(), StateError> {
        // Values the entry checks (§27.3.1) would refuse are refused here, before anything is written.
        let reserved_rflags = s.rflags & !0x003F_7FD7 != 0 || s.rflags & 2 == 0;
        if reserved_rflags || s.dr[5] >> 32 != 0 || s.cr3 & !0x000F_FFFF_FFFF_FFFF != 0 {
            return Err(StateError::Hardware { what: "RFLAGS, DR7 or CR3 has reserved bits set" });
        }
        // Loaded with WRMSR before entry: refuse what WRMSR would (#GP in the host).
        let canonical = |v: u64| crate::vcpu::msr::is_canonical(v);
        let m = &s.handler_msrs;
        if !canonical(m[1]) || !canonical(m[2]) || !canonical(m[4]) || m[3] >> 32 != 0 {
            return Err(StateError::Hardware {
                what: "LSTAR, CSTAR or KERNEL_GS_BASE not canonical, or FMASK[63:32] set",
            });
        }
        Ok(())
    }

    fn load_state(&mut self, s: &VcpuState) -> Result<(), StateError> {
        self.activate();
        use VmcsField as F;
        let c = self.caps;
        self.check_state(s)?;
        let w = |field, value| write(field, value).map_err(|_| StateError::Hardware { what: "VMWRITE" });
        w(F::GuestRsp, s.rsp)?;
        w(F::GuestRip, s.rip)?;
        w(F::GuestRflags, s.rflags)?;
        w(F::Cr0ReadShadow, s.cr0)?;
        w(F::Cr4ReadShadow, s.cr4)?;
        w(F::GuestCr0, controls::fix_control_register(s.cr0, c.cr0_fixed.0, c.cr0_fixed.1))?;
        w(F::GuestCr4, controls::fix_control_register(s.cr4 | CR4_VMXE, c.cr4_fixed.0, c.cr4_fixed.1))?;
        w(F::GuestCr3, s.cr3)?;
        w(F::GuestIa32Efer, s.efer)?;
        w(F::GuestIa32Pat, s.pat)?;
        w(F::GuestIa32Debugctl, s.debugctl)?;
        w(F::GuestDr7, s.dr[5])?;
        w(F::GuestSysenterCs, s.sysenter[0])?;
        w(F::GuestSysenterEsp, s.sysenter[1])?;
        w(F::GuestSysenterEip, s.sysenter[2])?;
        for (i, (selector, base, limit, rights)) in SEGMENT_FIELDS.iter().enumerate() {
            let seg = &s.segments[i];
            w(*selector, seg.selector.into())?;
            w(*base, seg.base)?;
            w(*limit, seg.limit.into())?;
            w(*rights, seg.access_rights.into())?;
        }
        w(F::GuestGdtrBase, s.gdtr_base)?;
        w(F::GuestGdtrLimit, s.gdtr_limit.into())?;
        w(F::GuestIdtrBase, s.idtr_base)?;
        w(F::GuestIdtrLimit, s.idtr_limit.into())?;
        w(F::GuestInterruptibility, s.interruptibility.into())?;
        w(F::GuestActivityState, s.activity_state.into())?;
        self.context.regs = s.registers();
        self.context.guest_fx.0 = s.fx;
        self.cr2 = s.cr2;
        self.tpr = s.cr8 & 0xF;
        self.syscall_msrs =
            [s.handler_msrs[0], s.handler_msrs[1], s.handler_msrs[2], s.handler_msrs[3], s.handler_msrs[4]];
        SYSCALL_MSRS_OWNER.store(0, core::sync::atomic::Ordering::Relaxed);
        self.debug = [s.dr[0], s.dr[1], s.dr[2], s.dr[3], s.dr[4]];
        self.pending_event = None;
        self.last_exit = ExitInfo::default();
        if s.pending_event & INTR_INFO_VALID as u32 != 0 {
            // Re-delivered on the next entry through the IDT-vectoring path in `run`.
            self.last_exit.idt_vectoring = s.pending_event.into();
            self.last_exit.idt_vectoring_error = s.pending_error_code.into();
            self.last_exit.instruction_length = s.pending_instruction_length.into();
        }
        Ok(())
    }

    fn enable_dirty_log(&mut self, method: DirtyLogMethod, frames: &mut FrameAllocator) -> Result<(), StateError> {
        self.activate();
        let unsupported = |what| StateError::Unsupported { backend: "VT-x", what };
        match method {
            DirtyLogMethod::Pml if !self.caps.pml() => return Err(unsupported("PML on this CPU")),
            DirtyLogMethod::AccessedDirty if !self.caps.ept_accessed_dirty() => {
                return Err(unsupported("EPT accessed/dirty flags on this CPU"))
            }
            DirtyLogMethod::WriteProtect => return self.enable_write_protect(frames),
            _ => {}
        }
        // Dirty flags live in leaf entries: with 2 MiB leaves one write would stand for 512
        // pages, so guest RAM is remapped with 4 KiB pages first.
        let mut new_frames = Vec::new();
        let ept = {
            let mut tables = FrameTables { frames: Some(frames), owned: &mut new_frames };
            let mut ept = PageTable::<EptFormat>::new(&mut tables).map_err(|_| unsupported("memory for 4 KiB EPT"))?;
            ept.map(&mut tables, 0, self.ram.start, self.ram.len(), false)
                .map_err(|_| unsupported("memory for 4 KiB EPT"))?;
            ept
        };
        let eptp = controls::ept_pointer(ept.root(), true);
        let hw = |_| StateError::Hardware { what: "VMWRITE of dirty-logging controls" };
        if method == DirtyLogMethod::Pml {
            let page = filled_page(frames, 0).map_err(|_| unsupported("memory for the PML buffer"))?;
            self.pml_page = Some(page);
            write(VmcsField::PmlAddress, page).map_err(hw)?;
            write(VmcsField::GuestPmlIndex, PML_ENTRIES - 1).map_err(hw)?;
            let secondary = self.caps.secondary | controls::secondary::ENABLE_PML;
            write(VmcsField::SecondaryProcControls, secondary.into()).map_err(hw)?;
        }
        write(VmcsField::EptPointer, eptp).map_err(hw)?;
        for frame in self.ept_frames.drain(..) {
            let _ = frames.free(PhysRange::new(frame, PAGE_SIZE));
        }
        self.ept = ept;
        self.eptp = eptp;
        self.ept_frames = new_frames;
        // Split frames of write-protect tracking were EPT frames: freed above with the old EPT.
        self.wp = None;
        self.dirty_method = Some(method);
        self.invalidate_ept();
        Ok(())
    }

    fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), StateError> {
        self.activate();
        let Some(method) = self.dirty_method else {
            return Err(StateError::Unsupported { backend: "VT-x", what: "collecting before dirty logging is on" });
        };
        let mut tables = FrameTables { frames: None, owned: &mut self.ept_frames };
        if let Some(wp) = self.wp.as_mut() {
            // Only the pages logged since the last collection lose write permission again, and
            // only then is an INVEPT needed (single-context, §29.4.3.4).
            if wp.collect(&self.ept, &mut tables, log) > 0 {
                self.invalidate_ept();
            }
            return Ok(());
        }
        if let (DirtyLogMethod::Pml, Some(page)) = (method, self.pml_page) {
            // §29.3.6: the CPU writes entries from index 511 downwards and decrements the index;
            // valid entries are index+1..=511 (all 512 after a log-full exit, when it wrapped).
            let index = read(VmcsField::GuestPmlIndex) & 0xFFFF;
            let first = if index >= PML_ENTRIES { 0 } else { index + 1 };
            // SAFETY: `page` is this vCPU's PML buffer: identity-mapped, 4 KiB, and the guest is
            // not running.
            let entries = unsafe { &*(page as *const [u64; 512]) };
            for &gpa in &entries[first as usize..] {
                log.mark(gpa >> 12);
                // PML logs a page when its EPT dirty flag goes from 0 to 1: clearing the flag of
                // each logged page (and only those: no other flag is set) re-arms it, in time
                // proportional to the dirty pages, not to guest RAM.
                self.ept.update_leaf(&mut tables, gpa & !0xFFF, &mut |entry| *entry &= !EPT_DIRTY);
            }
            write(VmcsField::GuestPmlIndex, PML_ENTRIES - 1)
                .map_err(|_| StateError::Hardware { what: "VMWRITE of the PML index" })?;
        } else {
            // A/D scan: every leaf with its dirty flag set was written; clear it for next time.
            // Hierarchical: only tables under an entry whose accessed flag the processor set
            // since the last scan (§29.3.5: it sets the flag on every EPT level it uses) are
            // visited; the flags are cleared on the way and the INVEPT below drops the paging-
            // structure caches, so the next walk through them sets them again.
            self.ept.for_each_accessed_leaf(&mut tables, &mut |gpa, _, entry| {
                if *entry & EPT_DIRTY != 0 {
                    log.mark(gpa >> 12);
                    *entry &= !EPT_DIRTY;
                }
            });
        }
        self.invalidate_ept();
        Ok(())
    }

    fn release(&mut self, frames: &mut FrameAllocator) {
        if let Some(t) = self.wp.take() {
            log::info!(
                "VT-x: write-protect tracking: {} EPT violations handled, {} 2 MiB leaves split, {} stale",
                t.faults,
                t.splits,
                t.spurious
            );
        }
        // SAFETY: VMX is on and the VMCS is ours; VMCLEAR flushes it so the page can be reused.
        let _ = unsafe { insn::vmclear(self.vmcs) };
        // VMCLEAR of the current VMCS leaves no current VMCS (§31.3).
        let _ = CURRENT_VMCS.compare_exchange(
            self.vmcs,
            0,
            core::sync::atomic::Ordering::Relaxed,
            core::sync::atomic::Ordering::Relaxed,
        );
        let mut pages = Vec::new();
        pages.push(self.vmcs);
        pages.extend_from_slice(&self.bitmaps);
        pages.append(&mut self.ept_frames);
        pages.extend(self.pml_page.take());
        for page in pages {
            if let Err(e) = frames.free(PhysRange::new(page, PAGE_SIZE)) {
                log::error!("VT-x: freeing vCPU page {page:#x}: {e}");
            }
        }
        let _ = SYSCALL_MSRS_OWNER.compare_exchange(
            self.vmcs,
            0,
            core::sync::atomic::Ordering::Relaxed,
            core::sync::atomic::Ordering::Relaxed,
        );
        self.vmcs = 0;
    }
}

/// Prints the current VMCS's key fields (for unhandled exits and panics).
pub fn dump_vmcs(out: &mut dyn fmt::Write) -> fmt::Result {
    for (field, name) in DUMP_FIELDS {
        match vmread(*field) {
            Ok(value) => writeln!(out, "  {name:28} {value:#018x}")?,
            Err(_) => {
                writeln!(out, "  (no current VMCS)")?;
                break;
            }
        }
    }
    Ok(())
}
