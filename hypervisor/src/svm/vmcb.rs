//! The virtual machine control block (VMCB): AMD APM Vol. 2 Appendix B, "Layout of VMCB".
//!
//! The VMCB is one 4 KiB page: the control area (Table B-1) at offset 0 and the state-save area
//! (Table B-2) at offset 0x400. Both are `#[repr(C)]` with every offset checked against the APM at
//! compile time, so the hardware and this file cannot disagree silently.
#![deny(unsafe_code)]

use core::mem::{offset_of, size_of};

/// CR intercept word (offset 0x000): reads of CRn in bit n, writes in bit 16 + n.
pub mod intercept_cr {
    /// Writes of CR0.
    pub const WRITE_CR0: u32 = 1 << 16;
    /// Writes of CR4.
    pub const WRITE_CR4: u32 = 1 << 20;
    /// Writes of CR8.
    pub const WRITE_CR8: u32 = 1 << 24;
}

/// Intercept vector 3 (offset 0x00C) bits: APM Vol. 2 Table B-1.
pub mod intercept3 {
    /// Physical INTR.
    pub const INTR: u32 = 1 << 0;
    /// Physical NMI.
    pub const NMI: u32 = 1 << 1;
    /// SMI.
    pub const SMI: u32 = 1 << 2;
    /// INIT.
    pub const INIT: u32 = 1 << 3;
    /// RDTSC.
    pub const RDTSC: u32 = 1 << 14;
    /// RDPMC.
    pub const RDPMC: u32 = 1 << 15;
    /// CPUID.
    pub const CPUID: u32 = 1 << 18;
    /// INVD.
    pub const INVD: u32 = 1 << 22;
    /// HLT.
    pub const HLT: u32 = 1 << 24;
    /// INVLPGA.
    pub const INVLPGA: u32 = 1 << 26;
    /// IN/OUT through the I/O permission map.
    pub const IOIO_PROT: u32 = 1 << 27;
    /// RDMSR/WRMSR through the MSR permission map.
    pub const MSR_PROT: u32 = 1 << 28;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept vector 4 (offset 0x010) bits: APM Vol. 2 Table B-1.
pub mod intercept4 {
    /// VMRUN (must be set, §15.5.1).
    pub const VMRUN: u32 = 1 << 0;
    /// VMMCALL.
    pub const VMMCALL: u32 = 1 << 1;
    /// VMLOAD.
    pub const VMLOAD: u32 = 1 << 2;
    /// VMSAVE.
    pub const VMSAVE: u32 = 1 << 3;
    /// STGI.
    pub const STGI: u32 = 1 << 4;
    /// CLGI.
    pub const CLGI: u32 = 1 << 5;
    /// SKINIT.
    pub const SKINIT: u32 = 1 << 6;
    /// RDTSCP.
    pub const RDTSCP: u32 = 1 << 7;
    /// MONITOR/MONITORX.
    pub const MONITOR: u32 = 1 << 10;
    /// MWAIT/MWAITX, unconditionally.
    pub const MWAIT: u32 = 1 << 11;
    /// MWAIT/MWAITX when the monitor hardware is armed.
    pub const MWAIT_CONDITIONAL: u32 = 1 << 12;
    /// XSETBV.
    pub const XSETBV: u32 = 1 << 13;
}

/// Exit codes (`EXITCODE`, offset 0x070): APM Vol. 2 Appendix C, Table C-1.
pub mod exit_code {
    /// Write of CR0 (0x10 + n for CRn).
    pub const WRITE_CR0: u64 = 0x10;
    /// Write of CR15.
    pub const WRITE_CR15: u64 = 0x1F;
    /// First exception exit (0x40 + vector).
    pub const EXCEPTION_BASE: u64 = 0x40;
    /// Physical INTR.
    pub const INTR: u64 = 0x60;
    /// Physical NMI.
    pub const NMI: u64 = 0x61;
    /// RDTSC.
    pub const RDTSC: u64 = 0x6E;
    /// RDPMC.
    pub const RDPMC: u64 = 0x6F;
    /// INVD.
    pub const INVD: u64 = 0x76;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// INVLPGA.
    pub const INVLPGA: u64 = 0x7A;
    /// IN/OUT.
    pub const IOIO: u64 = 0x7B;
    /// RDMSR/WRMSR.
    pub const MSR: u64 = 0x7C;
    /// Shutdown.
    pub const SHUTDOWN: u64 = 0x7F;
    /// VMRUN.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// VMLOAD.
    pub const VMLOAD: u64 = 0x82;
    /// VMSAVE.
    pub const VMSAVE: u64 = 0x83;
    /// STGI.
    pub const STGI: u64 = 0x84;
    /// CLGI.
    pub const CLGI: u64 = 0x85;
    /// SKINIT.
    pub const SKINIT: u64 = 0x86;
    /// RDTSCP.
    pub const RDTSCP: u64 = 0x87;
    /// MONITOR.
    pub const MONITOR: u64 = 0x8A;
    /// MWAIT.
    pub const MWAIT: u64 = 0x8B;
    /// MWAIT when armed.
    pub const MWAIT_CONDITIONAL: u64 = 0x8C;
    /// XSETBV.
    pub const XSETBV: u64 = 0x8D;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN found invalid guest state (-1).
    pub const INVALID: u64 = u64::MAX;
}

/// `TLB_CONTROL` values (offset 0x05C): APM Vol. 2 §15.16.2.
pub mod tlb_control {
    /// Flush nothing.
    pub const DO_NOTHING: u8 = 0;
    /// Flush the entire TLB (all ASIDs).
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's ASID.
    pub const FLUSH_GUEST: u8 = 3;
}

/// `V_INTR_MASKING` in the virtual-interrupt control word (offset 0x060, bit 24): with it set,
/// the host's RFLAGS.IF (not the guest's) masks physical interrupts while the guest runs
/// (APM Vol. 2 §15.21.1).
pub const V_INTR_MASKING: u64 = 1 << 24;
/// `NP_ENABLE` (offset 0x090, bit 0): nested paging (APM Vol. 2 §15.25.3).
pub const NP_ENABLE: u64 = 1 << 0;
/// `EVENTINJ` valid bit (APM Vol. 2 §15.20).
pub const EVENTINJ_VALID: u64 = 1 << 31;
/// `EVENTINJ` error-code-valid bit.
pub const EVENTINJ_EV: u64 = 1 << 11;
/// `EVENTINJ` type 3: exception.
pub const EVENTINJ_TYPE_EXCEPTION: u64 = 3 << 8;

/// The VMCB control area: APM Vol. 2 Table B-1.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct ControlArea {
    /// Reads (bits 15:0) and writes (31:16) of CR0-CR15.
    pub intercept_cr: u32,
    /// Reads and writes of DR0-DR15.
    pub intercept_dr: u32,
    /// Exception vectors 0-31.
    pub intercept_exceptions: u32,
    /// [`intercept3`] bits.
    pub intercept3: u32,
    /// [`intercept4`] bits.
    pub intercept4: u32,
    /// Intercept vector 5 (INVLPGB, ...).
    pub intercept5: u32,
    pub reserved_018: [u8; 0x3C - 0x18],
    pub pause_filter_threshold: u16,
    pub pause_filter_count: u16,
    /// Physical address of the 12 KiB I/O permission map.
    pub iopm_base_pa: u64,
    /// Physical address of the 8 KiB MSR permission map.
    pub msrpm_base_pa: u64,
    pub tsc_offset: u64,
    /// Guest ASID (bits 31:0), then TLB_CONTROL (bits 39:32).
    pub guest_asid: u32,
    pub tlb_control: u8,
    pub reserved_05d: [u8; 3],
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR.
    pub virtual_interrupt: u64,
    /// Bit 0 INTERRUPT_SHADOW, bit 1 GUEST_INTERRUPT_MASK.
    pub interrupt_shadow: u64,
    pub exit_code: u64,
    pub exit_info1: u64,
    pub exit_info2: u64,
    pub exit_int_info: u64,
    /// Bit 0 NP_ENABLE.
    pub nested_control: u64,
    pub avic_apic_bar: u64,
    pub ghcb_pa: u64,
    pub event_injection: u64,
    /// nCR3: the nested page tables' PML4.
    pub nested_cr3: u64,
    /// Bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub virtualization_ext: u64,
    pub vmcb_clean: u32,
    pub reserved_0c4: u32,
    /// NextRIP (with NRIPS).
    pub next_rip: u64,
    /// Guest instruction bytes fetched (with decode assists).
    pub bytes_fetched: u8,
    pub guest_instruction_bytes: [u8; 15],
    pub avic_backing_page: u64,
    pub reserved_0e8: u64,
    pub avic_logical_table: u64,
    pub avic_physical_table: u64,
    pub reserved_100: u64,
    pub vmsa_pointer: u64,
    pub reserved_110: [u8; 0x400 - 0x110],
}

/// A segment register in the state-save area (APM Vol. 2 §15.5.1 and Table B-2). `attrib` is the
/// "compressed" form: descriptor bits 47:40 in attrib 7:0 and bits 55:52 in attrib 11:8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

impl Segment {
    /// A segment with these fields.
    pub const fn new(selector: u16, attrib: u16, limit: u32, base: u64) -> Self {
        Self { selector, attrib, limit, base }
    }
}

/// Compressed segment attributes for the guest's flat segments.
pub mod attrib {
    /// Type 0xB (execute/read, accessed), S, DPL 0, P, L (64-bit), G.
    pub const CODE64: u16 = 0x09B | (1 << 9) | (1 << 11);
    /// Type 0x3 (read/write, accessed), S, DPL 0, P, D/B, G.
    pub const DATA: u16 = 0x093 | (1 << 10) | (1 << 11);
    /// Type 0xB (busy 64-bit TSS), P.
    pub const TSS_BUSY: u16 = 0x08B;
    /// Type 0x2 (LDT), P.
    pub const LDT: u16 = 0x082;
}

/// The VMCB state-save area: APM Vol. 2 Table B-2 (offsets relative to 0x400).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct StateSaveArea {
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub gdtr: Segment,
    pub ldtr: Segment,
    pub idtr: Segment,
    pub tr: Segment,
    pub reserved_0a0: [u8; 0xCB - 0xA0],
    pub cpl: u8,
    pub reserved_0cc: u32,
    pub efer: u64,
    pub reserved_0d8: [u8; 0x148 - 0xD8],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    pub reserved_180: [u8; 0x1D8 - 0x180],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    pub reserved_248: [u8; 0x268 - 0x248],
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_excp_from: u64,
    pub last_excp_to: u64,
    pub reserved_298: [u8; 0xC00 - 0x298],
}

/// The whole VMCB page.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct Vmcb {
    pub control: ControlArea,
    pub save: StateSaveArea,
}

impl Vmcb {
    /// An all-zero VMCB (the APM requires reserved fields to be zero).
    pub const fn zeroed() -> Self {
        Self {
            control: ControlArea {
                intercept_cr: 0,
                intercept_dr: 0,
                intercept_exceptions: 0,
                intercept3: 0,
                intercept4: 0,
                intercept5: 0,
                reserved_018: [0; 0x3C - 0x18],
                pause_filter_threshold: 0,
                pause_filter_count: 0,
                iopm_base_pa: 0,
                msrpm_base_pa: 0,
                tsc_offset: 0,
                guest_asid: 0,
                tlb_control: 0,
                reserved_05d: [0; 3],
                virtual_interrupt: 0,
                interrupt_shadow: 0,
                exit_code: 0,
                exit_info1: 0,
                exit_info2: 0,
                exit_int_info: 0,
                nested_control: 0,
                avic_apic_bar: 0,
                ghcb_pa: 0,
                event_injection: 0,
                nested_cr3: 0,
                virtualization_ext: 0,
                vmcb_clean: 0,
                reserved_0c4: 0,
                next_rip: 0,
                bytes_fetched: 0,
                guest_instruction_bytes: [0; 15],
                avic_backing_page: 0,
                reserved_0e8: 0,
                avic_logical_table: 0,
                avic_physical_table: 0,
                reserved_100: 0,
                vmsa_pointer: 0,
                reserved_110: [0; 0x400 - 0x110],
            },
            save: StateSaveArea {
                es: Segment::new(0, 0, 0, 0),
                cs: Segment::new(0, 0, 0, 0),
                ss: Segment::new(0, 0, 0, 0),
                ds: Segment::new(0, 0, 0, 0),
                fs: Segment::new(0, 0, 0, 0),
                gs: Segment::new(0, 0, 0, 0),
                gdtr: Segment::new(0, 0, 0, 0),
                ldtr: Segment::new(0, 0, 0, 0),
                idtr: Segment::new(0, 0, 0, 0),
                tr: Segment::new(0, 0, 0, 0),
                reserved_0a0: [0; 0xCB - 0xA0],
                cpl: 0,
                reserved_0cc: 0,
                efer: 0,
                reserved_0d8: [0; 0x148 - 0xD8],
                cr4: 0,
                cr3: 0,
                cr0: 0,
                dr7: 0,
                dr6: 0,
                rflags: 0,
                rip: 0,
                reserved_180: [0; 0x1D8 - 0x180],
                rsp: 0,
                s_cet: 0,
                ssp: 0,
                isst_addr: 0,
                rax: 0,
                star: 0,
                lstar: 0,
                cstar: 0,
                sfmask: 0,
                kernel_gs_base: 0,
                sysenter_cs: 0,
                sysenter_esp: 0,
                sysenter_eip: 0,
                cr2: 0,
                reserved_248: [0; 0x268 - 0x248],
                g_pat: 0,
                dbgctl: 0,
                br_from: 0,
                br_to: 0,
                last_excp_from: 0,
                last_excp_to: 0,
                reserved_298: [0; 0xC00 - 0x298],
            },
        }
    }
}

// Control area offsets: APM Vol. 2 Table B-1.
const _: () = {
    assert!(offset_of!(ControlArea, intercept_cr) == 0x000);
    assert!(offset_of!(ControlArea, intercept_dr) == 0x004);
    assert!(offset_of!(ControlArea, intercept_exceptions) == 0x008);
    assert!(offset_of!(ControlArea, intercept3) == 0x00C);
    assert!(offset_of!(ControlArea, intercept4) == 0x010);
    assert!(offset_of!(ControlArea, intercept5) == 0x014);
    assert!(offset_of!(ControlArea, pause_filter_threshold) == 0x03C);
    assert!(offset_of!(ControlArea, pause_filter_count) == 0x03E);
    assert!(offset_of!(ControlArea, iopm_base_pa) == 0x040);
    assert!(offset_of!(ControlArea, msrpm_base_pa) == 0x048);
    assert!(offset_of!(ControlArea, tsc_offset) == 0x050);
    assert!(offset_of!(ControlArea, guest_asid) == 0x058);
    assert!(offset_of!(ControlArea, tlb_control) == 0x05C);
    assert!(offset_of!(ControlArea, virtual_interrupt) == 0x060);
    assert!(offset_of!(ControlArea, interrupt_shadow) == 0x068);
    assert!(offset_of!(ControlArea, exit_code) == 0x070);
    assert!(offset_of!(ControlArea, exit_info1) == 0x078);
    assert!(offset_of!(ControlArea, exit_info2) == 0x080);
    assert!(offset_of!(ControlArea, exit_int_info) == 0x088);
    assert!(offset_of!(ControlArea, nested_control) == 0x090);
    assert!(offset_of!(ControlArea, avic_apic_bar) == 0x098);
    assert!(offset_of!(ControlArea, ghcb_pa) == 0x0A0);
    assert!(offset_of!(ControlArea, event_injection) == 0x0A8);
    assert!(offset_of!(ControlArea, nested_cr3) == 0x0B0);
    assert!(offset_of!(ControlArea, virtualization_ext) == 0x0B8);
    assert!(offset_of!(ControlArea, vmcb_clean) == 0x0C0);
    assert!(offset_of!(ControlArea, next_rip) == 0x0C8);
    assert!(offset_of!(ControlArea, bytes_fetched) == 0x0D0);
    assert!(offset_of!(ControlArea, guest_instruction_bytes) == 0x0D1);
    assert!(offset_of!(ControlArea, avic_backing_page) == 0x0E0);
    assert!(offset_of!(ControlArea, avic_logical_table) == 0x0F0);
    assert!(offset_of!(ControlArea, avic_physical_table) == 0x0F8);
    assert!(offset_of!(ControlArea, vmsa_pointer) == 0x108);
    assert!(size_of::<ControlArea>() == 0x400);
};

// State-save area offsets: APM Vol. 2 Table B-2 (the VMCB offset is 0x400 more).
const _: () = {
    assert!(size_of::<Segment>() == 16);
    assert!(offset_of!(StateSaveArea, es) == 0x000);
    assert!(offset_of!(StateSaveArea, cs) == 0x010);
    assert!(offset_of!(StateSaveArea, ss) == 0x020);
    assert!(offset_of!(StateSaveArea, ds) == 0x030);
    assert!(offset_of!(StateSaveArea, fs) == 0x040);
    assert!(offset_of!(StateSaveArea, gs) == 0x050);
    assert!(offset_of!(StateSaveArea, gdtr) == 0x060);
    assert!(offset_of!(StateSaveArea, ldtr) == 0x070);
    assert!(offset_of!(StateSaveArea, idtr) == 0x080);
    assert!(offset_of!(StateSaveArea, tr) == 0x090);
    assert!(offset_of!(StateSaveArea, cpl) == 0x0CB);
    assert!(offset_of!(StateSaveArea, efer) == 0x0D0);
    assert!(offset_of!(StateSaveArea, cr4) == 0x148);
    assert!(offset_of!(StateSaveArea, cr3) == 0x150);
    assert!(offset_of!(StateSaveArea, cr0) == 0x158);
    assert!(offset_of!(StateSaveArea, dr7) == 0x160);
    assert!(offset_of!(StateSaveArea, dr6) == 0x168);
    assert!(offset_of!(StateSaveArea, rflags) == 0x170);
    assert!(offset_of!(StateSaveArea, rip) == 0x178);
    assert!(offset_of!(StateSaveArea, rsp) == 0x1D8);
    assert!(offset_of!(StateSaveArea, s_cet) == 0x1E0);
    assert!(offset_of!(StateSaveArea, rax) == 0x1F8);
    assert!(offset_of!(StateSaveArea, star) == 0x200);
    assert!(offset_of!(StateSaveArea, lstar) == 0x208);
    assert!(offset_of!(StateSaveArea, cstar) == 0x210);
    assert!(offset_of!(StateSaveArea, sfmask) == 0x218);
    assert!(offset_of!(StateSaveArea, kernel_gs_base) == 0x220);
    assert!(offset_of!(StateSaveArea, sysenter_cs) == 0x228);
    assert!(offset_of!(StateSaveArea, sysenter_esp) == 0x230);
    assert!(offset_of!(StateSaveArea, sysenter_eip) == 0x238);
    assert!(offset_of!(StateSaveArea, cr2) == 0x240);
    assert!(offset_of!(StateSaveArea, g_pat) == 0x268);
    assert!(offset_of!(StateSaveArea, dbgctl) == 0x270);
    assert!(offset_of!(StateSaveArea, last_excp_to) == 0x290);
    assert!(offset_of!(Vmcb, save) == 0x400);
    assert!(size_of::<Vmcb>() == 4096);
};

/// IOIO intercept `EXITINFO1` fields: APM Vol. 2 §15.10.2, Figure 15-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExitInfo {
    /// The port.
    pub port: u16,
    /// 1, 2 or 4.
    pub size: u8,
    /// OUT/OUTS.
    pub write: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
}

impl IoExitInfo {
    /// Decodes `EXITINFO1` of an IOIO intercept.
    pub const fn from_exit_info1(info: u64) -> Self {
        let size = if info & (1 << 4) != 0 {
            1
        } else if info & (1 << 5) != 0 {
            2
        } else {
            4
        };
        Self {
            port: (info >> 16) as u16,
            size,
            write: info & 1 == 0,
            string: info & (1 << 2) != 0,
            rep: info & (1 << 3) != 0,
        }
    }
}

/// Nested page fault `EXITINFO1` bits (a #PF error code plus two more): APM Vol. 2 §15.25.6.
pub mod npf_info {
    /// The entry was present (the fault is a protection violation).
    pub const PRESENT: u64 = 1 << 0;
    /// A write.
    pub const WRITE: u64 = 1 << 1;
    /// A reserved bit was set in an entry.
    pub const RESERVED: u64 = 1 << 3;
    /// An instruction fetch.
    pub const FETCH: u64 = 1 << 4;
    /// The fault occurred on the final guest-physical address.
    pub const FINAL_ADDRESS: u64 = 1 << 32;
    /// The fault occurred on a guest page-table access.
    pub const PAGE_TABLE_WALK: u64 = 1 << 33;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_exit_info_decodes() {
        // OUT DX, AL to port 0x3F8: TYPE=0 (out), SZ8.
        let info = IoExitInfo::from_exit_info1((0x3F8 << 16) | (1 << 4));
        assert_eq!(info, IoExitInfo { port: 0x3F8, size: 1, write: true, string: false, rep: false });
        // REP INSW from port 0x1F0.
        let info = IoExitInfo::from_exit_info1((0x1F0 << 16) | (1 << 5) | (1 << 3) | (1 << 2) | 1);
        assert_eq!(info, IoExitInfo { port: 0x1F0, size: 2, write: false, string: true, rep: true });
        let info = IoExitInfo::from_exit_info1((0x80 << 16) | (1 << 6) | 1);
        assert_eq!(info.size, 4);
        assert!(!info.write);
    }

    #[test]
    fn flat_segment_attributes() {
        // Descriptor 0x00AF9B000000FFFF (64-bit code) compresses to 0xA9B.
        let descriptor: u64 = 0x00AF_9B00_0000_FFFF;
        let compressed = (((descriptor >> 40) & 0xFF) | (((descriptor >> 52) & 0xF) << 8)) as u16;
        assert_eq!(compressed, attrib::CODE64);
        let descriptor: u64 = 0x00CF_9300_0000_FFFF;
        let compressed = (((descriptor >> 40) & 0xFF) | (((descriptor >> 52) & 0xF) << 8)) as u16;
        assert_eq!(compressed, attrib::DATA);
    }
}
