//! Conversions between the VMCB and the vendor-neutral [`VcpuState`], and the checks a state must
//! pass before it is loaded into a VMCB. Pure, so that it is host-tested.
//!
//! - Segment attributes: the VMCB keeps them "compressed" (APM Vol. 2 §15.5.1 and Appendix B,
//!   Table B-2: descriptor bits 47:40 in attrib 7:0, bits 55:52 in attrib 11:8); the state uses the
//!   VT-x access-rights layout (the same bits at 7:0 and 15:12, "unusable" in bit 16).
//! - Events: `EVENTINJ` / `EXITINTINFO` (APM Vol. 2 §15.20, §15.7.2) and the VT-x
//!   interruption-information layout share vector (7:0), type (10:8), error-code-valid (11) and
//!   valid (31); the types differ: AMD-V has no "software exception" types, so INT3/INTO/INT1
//!   are injected as exceptions with RIP already past the instruction, and INTn is injected as a
//!   software interrupt with RIP already past it (the processor pushes the VMCB's RIP).
//! - Interruptibility: AMD-V has one interrupt shadow bit (§15.21.5) for STI and MOV SS alike, and
//!   no NMI/SMI blocking state in the VMCB.
//! - [`check_loadable`]: the VMRUN consistency checks of §15.5.1 (and what FXRSTOR, WRMSR and
//!   event injection would refuse), applied to a state before any of it is written.
#![deny(unsafe_code)]

use crate::vcpu::state::{seg, VcpuState};
use crate::vcpu::StateError;

/// VT-x access rights: the "unusable" bit.
pub const AR_UNUSABLE: u32 = 1 << 16;
/// Compressed attribute: P.
const ATTRIB_PRESENT: u16 = 1 << 7;
/// VT-x access-rights bits that must be zero (11:8 and 31:17).
const AR_RESERVED: u32 = 0xFFFE_0F00;

/// `EVENTINJ`/`EXITINTINFO` and VT-x interruption information: valid.
pub const EVENT_VALID: u32 = 1 << 31;
/// Error code valid.
pub const EVENT_ERROR_CODE: u32 = 1 << 11;
/// Bits 30:12 are reserved in both layouts.
const EVENT_RESERVED: u32 = 0x7FFF_F000;

/// Event types, `EVENTINJ` (APM Vol. 2 §15.20).
mod amd_type {
    pub const INTR: u32 = 0;
    pub const NMI: u32 = 2;
    pub const EXCEPTION: u32 = 3;
    pub const SOFTWARE_INTERRUPT: u32 = 4;
}

/// Event types, VT-x interruption information (SDM Vol. 3C §25.8.3).
mod vtx_type {
    pub const EXTERNAL_INTERRUPT: u32 = 0;
    pub const NMI: u32 = 2;
    pub const HARDWARE_EXCEPTION: u32 = 3;
    pub const SOFTWARE_INTERRUPT: u32 = 4;
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const SOFTWARE_EXCEPTION: u32 = 6;
}

/// VT-x interruptibility: blocking by STI, by MOV SS, by SMI, by NMI.
const BLOCKING_STI: u32 = 1 << 0;
const BLOCKING_MOV_SS: u32 = 1 << 1;

/// EFER bits the guest may hold: SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE (APM Vol. 2
/// §3.1.7); the rest must be zero (§15.5.1).
const EFER_ALLOWED: u64 = 0xFD01;
const EFER_LME: u64 = 1 << 8;
/// CR0.
const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// CR4 bits an AMD64 processor defines (VME..UMIP, LA57, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP,
/// PKE, CET); bit 13 (VMXE) and the rest are reserved (APM Vol. 2 §3.1.3).
const CR4_ALLOWED: u64 = 0x00F7_1FFF;
const CR4_PAE: u64 = 1 << 5;
/// RFLAGS bits that exist (CF..ID without the reserved 1, 3, 5, 15 and 22-63); bit 1 must be one.
const RFLAGS_DEFINED: u64 = 0x003F_7FD7;

/// VMCB compressed attributes to VT-x access rights. A segment that is not present is reported
/// unusable, as a null selector load leaves it.
pub fn access_rights_from_attrib(attrib: u16) -> u32 {
    let a = u32::from(attrib);
    let rights = (a & 0xFF) | ((a & 0xF00) << 4);
    if attrib & ATTRIB_PRESENT == 0 {
        rights | AR_UNUSABLE
    } else {
        rights
    }
}

/// VT-x access rights to VMCB compressed attributes: an unusable segment is loaded not present.
pub fn attrib_from_access_rights(rights: u32) -> Result<u16, StateError> {
    if rights & AR_RESERVED != 0 {
        return Err(StateError::Hardware { what: "segment access rights with reserved bits set" });
    }
    let attrib = ((rights & 0xFF) | ((rights >> 4) & 0xF00)) as u16;
    Ok(if rights & AR_UNUSABLE != 0 { attrib & !ATTRIB_PRESENT } else { attrib })
}

/// A pending event, AMD-V side: what goes into `EVENTINJ`, and how far RIP moves first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmdEvent {
    /// The `EVENTINJ` value (error code in bits 63:32).
    pub eventinj: u64,
    /// Bytes RIP advances before injection (the length of a software event's instruction).
    pub rip_advance: u32,
}

/// A pending event in the VT-x layout of [`VcpuState`], converted for `EVENTINJ`. `Ok(None)` for
/// no event.
pub fn event_from_vtx(info: u32, error_code: u32, length: u32) -> Result<Option<AmdEvent>, StateError> {
    if info & EVENT_VALID == 0 {
        return Ok(None);
    }
    if info & EVENT_RESERVED != 0 {
        return Err(StateError::Hardware { what: "pending event with reserved bits set" });
    }
    let vector = info & 0xFF;
    let has_error = info & EVENT_ERROR_CODE != 0;
    let software = |amd: u32| {
        if !(1..=15).contains(&length) {
            return Err(StateError::Hardware { what: "pending software event without an instruction length of 1-15" });
        }
        if has_error {
            return Err(StateError::Hardware { what: "pending software event with an error code" });
        }
        Ok((amd, length))
    };
    let (amd, advance) = match (info >> 8) & 7 {
        vtx_type::EXTERNAL_INTERRUPT if !has_error => (amd_type::INTR, 0),
        vtx_type::NMI if vector == 2 && !has_error => (amd_type::NMI, 0),
        vtx_type::HARDWARE_EXCEPTION if vector < 32 && vector != 2 => (amd_type::EXCEPTION, 0),
        // INTn: injected as a software interrupt pushing the address after the instruction.
        vtx_type::SOFTWARE_INTERRUPT => software(amd_type::SOFTWARE_INTERRUPT)?,
        // INT1 (ICEBP), INT3 and INTO: exceptions, trap-like, so RIP goes past the instruction.
        vtx_type::PRIVILEGED_SOFTWARE_EXCEPTION if vector == 1 => software(amd_type::EXCEPTION)?,
        vtx_type::SOFTWARE_EXCEPTION if vector == 3 || vector == 4 => software(amd_type::EXCEPTION)?,
        _ => return Err(StateError::Hardware { what: "pending event of a type or vector EVENTINJ cannot carry" }),
    };
    let mut eventinj = u64::from(vector | (amd << 8) | EVENT_VALID);
    if has_error {
        eventinj |= u64::from(EVENT_ERROR_CODE) | (u64::from(error_code) << 32);
    }
    Ok(Some(AmdEvent { eventinj, rip_advance: advance }))
}

/// A valid `EVENTINJ`/`EXITINTINFO` value in the VT-x layout: (information, error code). A
/// software interrupt (type 4) keeps type 4; its instruction length is the caller's to supply.
/// `None` for an invalid event or an AMD-V type VT-x has no equivalent for.
pub fn event_to_vtx(event: u64) -> Option<(u32, u32)> {
    let low = event as u32;
    if low & EVENT_VALID == 0 {
        return None;
    }
    let ty = match (low >> 8) & 7 {
        amd_type::INTR => vtx_type::EXTERNAL_INTERRUPT,
        amd_type::NMI => vtx_type::NMI,
        amd_type::EXCEPTION => vtx_type::HARDWARE_EXCEPTION,
        amd_type::SOFTWARE_INTERRUPT => vtx_type::SOFTWARE_INTERRUPT,
        _ => return None,
    };
    let info = (low & 0xFF) | (ty << 8) | (low & EVENT_ERROR_CODE) | EVENT_VALID;
    let code = if low & EVENT_ERROR_CODE != 0 { (event >> 32) as u32 } else { 0 };
    Some((info, code))
}

/// True for an AMD-V software interrupt (INTn) event.
pub fn is_software_interrupt(event: u64) -> bool {
    (event >> 8) & 7 == u64::from(amd_type::SOFTWARE_INTERRUPT)
}

/// The VMCB interrupt shadow (bit 0) as VT-x interruptibility: AMD-V does not say whether STI or
/// MOV SS made it; STI blocking is reported.
pub fn interruptibility_from_shadow(shadow: u64) -> u32 {
    if shadow & 1 != 0 {
        BLOCKING_STI
    } else {
        0
    }
}

/// VT-x interruptibility as the VMCB interrupt shadow. SMI and NMI blocking have no place in the
/// VMCB and are refused.
pub fn shadow_from_interruptibility(interruptibility: u32) -> Result<u64, StateError> {
    if interruptibility & !(BLOCKING_STI | BLOCKING_MOV_SS) != 0 {
        return Err(StateError::Unsupported {
            backend: "AMD-V",
            what: "SMI or NMI blocking (or reserved bits) in the interruptibility state",
        });
    }
    Ok(u64::from(interruptibility != 0))
}

fn canonical(address: u64) -> bool {
    let top = (address as i64) >> 47;
    top == 0 || top == -1
}

/// Checks everything in `s` that VMRUN (APM Vol. 2 §15.5.1), VMLOAD, FXRSTOR or event injection
/// (§15.20) would refuse, or that the VMCB cannot represent, so that a load either writes all of
/// the state or none of it. `mxcsr_mask` is the processor's (FXSAVE image offset 28).
pub fn check_loadable(s: &VcpuState, mxcsr_mask: u32) -> Result<(), StateError> {
    let hw = |what| Err(StateError::Hardware { what });
    if s.rflags & !RFLAGS_DEFINED != 0 || s.rflags & 2 == 0 {
        return hw("RFLAGS has reserved bits set or bit 1 clear");
    }
    if s.cr0 >> 32 != 0 || (s.cr0 & CR0_NW != 0 && s.cr0 & CR0_CD == 0) {
        return hw("CR0 has bits 63:32 set, or NW set with CD clear");
    }
    if s.cr3 >> 52 != 0 {
        return hw("CR3 has reserved bits 63:52 set");
    }
    if s.cr4 & !CR4_ALLOWED != 0 {
        return hw("CR4 has reserved bits set (VMXE included)");
    }
    if s.cr8 > 15 {
        return hw("CR8 above 15");
    }
    if s.efer & !EFER_ALLOWED != 0 {
        return hw("EFER has reserved bits set");
    }
    let cs = &s.segments[seg::CS];
    let long_paging = s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0;
    if long_paging && (s.cr4 & CR4_PAE == 0 || s.cr0 & CR0_PE == 0) {
        return hw("EFER.LME and CR0.PG set with CR4.PAE or CR0.PE clear");
    }
    // L is access-rights bit 13, D/B bit 14.
    if long_paging && cs.access_rights & (1 << 13) != 0 && cs.access_rights & (1 << 14) != 0 {
        return hw("long mode with CS.L and CS.D both set");
    }
    if s.dr[4] >> 32 != 0 || s.dr[5] >> 32 != 0 {
        return hw("DR6 or DR7 has bits 63:32 set");
    }
    if s.dr[..4].iter().any(|&d| !canonical(d)) {
        return hw("DR0-DR3 holds a non-canonical address");
    }
    // Every PAT entry must be a defined memory type (UC, WC, WT, WP, WB, UC-).
    if s.pat.to_le_bytes().iter().any(|&t| !matches!(t, 0 | 1 | 4 | 5 | 6 | 7)) {
        return hw("PAT holds an undefined memory type");
    }
    for seg in &s.segments {
        attrib_from_access_rights(seg.access_rights)?;
    }
    let bases = [
        s.segments[seg::FS].base,
        s.segments[seg::GS].base,
        s.segments[seg::TR].base,
        s.segments[seg::LDTR].base,
        s.gdtr_base,
        s.idtr_base,
        s.sysenter[1],
        s.sysenter[2],
        s.handler_msrs[1],
        s.handler_msrs[2],
        s.handler_msrs[4],
    ];
    if bases.iter().any(|&b| !canonical(b)) {
        return hw("a segment base, descriptor-table base or MSR address is not canonical");
    }
    if s.gdtr_limit > 0xFFFF || s.idtr_limit > 0xFFFF {
        return hw("GDTR or IDTR limit above 0xFFFF");
    }
    shadow_from_interruptibility(s.interruptibility)?;
    if s.activity_state != 0 {
        return Err(StateError::Unsupported { backend: "AMD-V", what: "a non-active activity state (HLT exits)" });
    }
    event_from_vtx(s.pending_event, s.pending_error_code, s.pending_instruction_length)?;
    let mxcsr = u32::from_le_bytes([s.fx[24], s.fx[25], s.fx[26], s.fx[27]]);
    if mxcsr & !mxcsr_mask != 0 {
        return hw("MXCSR has bits set that the processor's MXCSR_MASK does not allow");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svm::vmcb::attrib;

    #[test]
    fn attributes_round_trip_through_access_rights() {
        assert_eq!(access_rights_from_attrib(attrib::CODE64), 0xA09B);
        assert_eq!(access_rights_from_attrib(attrib::DATA), 0xC093);
        assert_eq!(access_rights_from_attrib(attrib::TSS_BUSY), 0x8B);
        assert_eq!(access_rights_from_attrib(0), AR_UNUSABLE);
        for a in [attrib::CODE64, attrib::DATA, attrib::TSS_BUSY, attrib::LDT, 0] {
            assert_eq!(attrib_from_access_rights(access_rights_from_attrib(a)), Ok(a));
        }
        // An unusable segment keeps its type but loads not present.
        assert_eq!(attrib_from_access_rights(AR_UNUSABLE | 0xC093), Ok(attrib::DATA & !ATTRIB_PRESENT));
        assert!(attrib_from_access_rights(0x0100).is_err());
        assert!(attrib_from_access_rights(1 << 17).is_err());
    }

    #[test]
    fn events_convert_both_ways() {
        // #GP(0) as AMD-V reports it in EXITINTINFO.
        let gp = 13 | (3 << 8) | (1 << 11) | (1 << 31);
        assert_eq!(event_to_vtx(gp), Some((13 | (3 << 8) | (1 << 11) | (1 << 31), 0)));
        let with_code = gp | (0x18 << 32);
        let (info, code) = event_to_vtx(with_code).unwrap();
        assert_eq!(code, 0x18);
        assert_eq!(event_from_vtx(info, code, 0), Ok(Some(AmdEvent { eventinj: with_code, rip_advance: 0 })));
        // An external interrupt and an NMI.
        let intr = 0x20 | (1u64 << 31);
        assert_eq!(event_from_vtx(event_to_vtx(intr).unwrap().0, 0, 0).unwrap().unwrap().eventinj, intr);
        let nmi = 2 | (2 << 8) | (1u64 << 31);
        assert_eq!(event_from_vtx(event_to_vtx(nmi).unwrap().0, 0, 0).unwrap().unwrap().eventinj, nmi);
        // VT-x INT3 (software exception, 1 byte): an AMD-V exception after RIP moves past it.
        let int3 = 3 | (6 << 8) | (1 << 31);
        assert_eq!(
            event_from_vtx(int3, 0, 1),
            Ok(Some(AmdEvent { eventinj: 3 | (3 << 8) | (1 << 31), rip_advance: 1 }))
        );
        // INT 0x80 (2 bytes): an AMD-V software interrupt after RIP moves past it.
        let intn = 0x80 | (4 << 8) | (1 << 31);
        let converted = event_from_vtx(intn, 0, 2).unwrap().unwrap();
        assert_eq!(converted, AmdEvent { eventinj: u64::from(intn), rip_advance: 2 });
        assert!(is_software_interrupt(converted.eventinj));
        assert_eq!(event_from_vtx(0, 0, 0), Ok(None));
        assert_eq!(event_to_vtx(0x0E), None);
    }

    #[test]
    fn events_eventinj_cannot_carry_are_refused() {
        for (info, len) in [
            (2 | (3 << 8) | (1 << 31), 0),     // NMI vector as an exception
            (32 | (3 << 8) | (1 << 31), 0),    // exception vector above 31
            (0x80 | (4 << 8) | (1 << 31), 0),  // INTn without a length
            ((7 << 8) | (1 << 31), 0),         // "other event" (MTF)
            (13 | (1 << 20) | (1 << 31), 0),   // reserved bit
            (0x20 | (1 << 11) | (1 << 31), 0), // interrupt with an error code
        ] {
            assert!(event_from_vtx(info, 0, len).is_err(), "{info:#x}");
        }
    }

    #[test]
    fn interrupt_shadow_converts() {
        assert_eq!(interruptibility_from_shadow(1), 1);
        assert_eq!(interruptibility_from_shadow(2), 0);
        assert_eq!(shadow_from_interruptibility(2), Ok(1));
        assert_eq!(shadow_from_interruptibility(0), Ok(0));
        assert!(shadow_from_interruptibility(8).is_err());
    }

    fn loadable() -> VcpuState {
        let mut s = VcpuState::empty();
        s.rflags = 2;
        s.cr0 = 0x8000_0033;
        s.cr4 = 0x620;
        s.efer = 0xD00;
        s.pat = 0x0007_0406_0007_0406;
        s.dr[4] = 0xFFFF_0FF0;
        s.dr[5] = 0x400;
        s.segments[seg::CS].access_rights = 0xA09B;
        s.segments[seg::TR].access_rights = 0x8B;
        s.fx[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        s
    }

    #[test]
    fn a_consistent_state_is_loadable() {
        assert_eq!(check_loadable(&loadable(), 0xFFBF), Ok(()));
    }

    #[test]
    fn states_vmrun_would_refuse_are_named() {
        type Corruption = (&'static str, fn(&mut VcpuState));
        let cases: [Corruption; 12] = [
            ("RFLAGS", |s| s.rflags = 0),
            ("CR0", |s| s.cr0 |= CR0_NW),
            ("CR3", |s| s.cr3 = 1 << 60),
            ("CR4", |s| s.cr4 |= 1 << 13),
            ("EFER", |s| s.efer |= 1 << 20),
            ("CR4.PAE", |s| s.cr4 &= !CR4_PAE),
            ("CS.L", |s| s.segments[seg::CS].access_rights |= 1 << 14),
            ("DR7", |s| s.dr[5] = 1 << 40),
            ("PAT", |s| s.pat = 2),
            ("canonical", |s| s.segments[seg::FS].base = 1 << 50),
            ("MXCSR", |s| s.fx[26] = 1),
            ("activity", |s| s.activity_state = 1),
        ];
        for (name, corrupt) in cases {
            let mut s = loadable();
            corrupt(&mut s);
            assert!(check_loadable(&s, 0xFFBF).is_err(), "{name} accepted");
        }
    }
}
