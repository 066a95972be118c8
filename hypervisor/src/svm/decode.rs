//! Instruction-length decoding for the instructions the SVM backend intercepts.
//!
//! On a CPU with NRIPS (AMD APM Vol. 2 §15.7.1, "State Saved on Exit") the VMCB's NextRIP field
//! gives the address of the instruction after the one that caused an intercept. QEMU TCG reports
//! NRIPS = 0, so there the hypervisor must work out the length itself: this module decodes exactly
//! the instructions the backend intercepts, with the prefixes a guest may legitimately put in front
//! of them, and refuses everything else by name. The caller reads the bytes at the guest RIP (under
//! the boot protocol guest-virtual = guest-physical, see `guest_shim::abi`).
//!
//! Encodings: AMD APM Vol. 3, "General-Purpose and System Instructions"; prefixes: APM Vol. 3
//! §1.2 ("Instruction Prefixes") and §1.2.7 ("REX Prefix").
#![deny(unsafe_code)]

use core::fmt;

/// The architectural limit on instruction length (APM Vol. 3 §1.1).
pub const MAX_INSTRUCTION_LENGTH: usize = 15;

/// An instruction the SVM backend intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// VMMCALL (0F 01 D9).
    Vmmcall,
    /// CPUID (0F A2).
    Cpuid,
    /// RDMSR (0F 32).
    Rdmsr,
    /// WRMSR (0F 30).
    Wrmsr,
    /// RDTSC (0F 31).
    Rdtsc,
    /// HLT (F4).
    Hlt,
    /// XSETBV (0F 01 D1).
    Xsetbv,
    /// RDTSCP (0F 01 F9).
    Rdtscp,
    /// INVD (0F 08).
    Invd,
    /// MOV to CRn from a general-purpose register (0F 22 /r; REX.R selects CR8-CR15, REX.B
    /// R8-R15; the mod field is ignored: the operand is always a register, APM Vol. 3 "MOV CRn").
    MovToCr {
        /// The control register.
        cr: u8,
        /// The source register (x86 encoding).
        gpr: u8,
    },
    /// CLTS (0F 06).
    Clts,
    /// LMSW (0F 01 /6): the source register, or `None` for a memory operand.
    Lmsw {
        /// The source register (x86 encoding).
        gpr: Option<u8>,
    },
    /// IN/OUT with an 8-bit immediate port (E4-E7) or the port in DX (EC-EF).
    Io {
        /// OUT (true) or IN (false).
        write: bool,
        /// Operand size in bytes: 1, 2 or 4.
        size: u8,
        /// The immediate port, for E4-E7.
        immediate_port: Option<u8>,
    },
    /// INS/OUTS (6C-6F), possibly with REP.
    StringIo {
        /// OUTS (true) or INS (false).
        write: bool,
        /// Operand size in bytes: 1, 2 or 4.
        size: u8,
        /// An F3 (REP) prefix is present.
        rep: bool,
    },
}

impl Instruction {
    /// The instruction's mnemonic.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Vmmcall => "vmmcall",
            Self::Cpuid => "cpuid",
            Self::Rdmsr => "rdmsr",
            Self::Wrmsr => "wrmsr",
            Self::Rdtsc => "rdtsc",
            Self::Hlt => "hlt",
            Self::Xsetbv => "xsetbv",
            Self::Rdtscp => "rdtscp",
            Self::Invd => "invd",
            Self::MovToCr { .. } => "mov to cr",
            Self::Clts => "clts",
            Self::Lmsw { .. } => "lmsw",
            Self::Io { write: false, .. } => "in",
            Self::Io { write: true, .. } => "out",
            Self::StringIo { write: false, .. } => "ins",
            Self::StringIo { write: true, .. } => "outs",
        }
    }
}

/// A decoded instruction: what it is and how many bytes it occupies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The instruction.
    pub instruction: Instruction,
    /// Its length in bytes, prefixes included (1..=15).
    pub length: u8,
}

/// Why the bytes at RIP could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does (RIP near the end of guest RAM, or no bytes).
    Truncated {
        /// How many bytes were available.
        available: usize,
    },
    /// More than 15 bytes of prefixes and opcode.
    TooLong,
    /// A LOCK prefix (F0): none of the intercepted instructions accepts one (it raises #UD).
    LockPrefix,
    /// An opcode that is not one of the intercepted instructions.
    UnsupportedOpcode {
        /// The opcode bytes seen (one-byte opcode, or 0F xx, or 0F 01 xx), zero-padded.
        opcode: [u8; 3],
        /// How many of `opcode` are meaningful.
        len: u8,
    },
    /// The instruction decoded, but it is not the one the exit reported.
    Mismatch {
        /// What the exit said.
        expected: &'static str,
        /// What the bytes are.
        found: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { available } => {
                write!(f, "instruction truncated after {available} readable bytes")
            }
            Self::TooLong => write!(f, "instruction longer than {MAX_INSTRUCTION_LENGTH} bytes"),
            Self::LockPrefix => write!(f, "LOCK prefix on an intercepted instruction"),
            Self::UnsupportedOpcode { opcode, len } => {
                write!(f, "unsupported opcode")?;
                for b in &opcode[..*len as usize] {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            Self::Mismatch { expected, found } => {
                write!(f, "exit reported {expected} but the instruction at RIP is {found}")
            }
        }
    }
}

/// Prefixes seen before the opcode.
#[derive(Clone, Copy, Debug, Default)]
struct Prefixes {
    operand_size: bool,
    address_size: bool,
    rep: bool,
    rex_w: bool,
    rex_r: bool,
    rex_b: bool,
}

/// Decodes the instruction at the start of `bytes` (the bytes at the guest RIP; at most 15 are
/// looked at).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSTRUCTION_LENGTH)];
    let available = bytes.len();
    let at = |i: usize| {
        bytes.get(i).copied().ok_or(if i >= MAX_INSTRUCTION_LENGTH {
            DecodeError::TooLong
        } else {
            DecodeError::Truncated { available }
        })
    };

    let mut prefixes = Prefixes::default();
    let mut i = 0;
    loop {
        match at(i)? {
            0x66 => prefixes.operand_size = true,
            0xF3 => prefixes.rep = true,
            0x67 => prefixes.address_size = true,
            // REPNE, segment overrides: legal in front of these instructions (they change
            // INS/OUTS addressing only), and only their length matters here.
            0xF2 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 => {}
            0xF0 => return Err(DecodeError::LockPrefix),
            // REX counts only directly before the opcode (APM Vol. 3 §1.2.7): one followed by
            // another prefix is ignored (but still occupies a byte).
            rex @ 0x40..=0x4F => {
                i += 1;
                let next = at(i)?;
                if (0x40..=0x4F).contains(&next) || is_legacy_prefix(next) {
                    // Not the last prefix: ignored, keep scanning from `next`.
                    continue;
                }
                prefixes.rex_w = rex & 0x08 != 0;
                prefixes.rex_r = rex & 0x04 != 0;
                prefixes.rex_b = rex & 0x01 != 0;
                break;
            }
            _ => break,
        }
        i += 1;
    }

    let size = if prefixes.operand_size && !prefixes.rex_w { 2 } else { 4 };
    let opcode = at(i)?;
    let (instruction, end) = match opcode {
        0xF4 => (Instruction::Hlt, i + 1),
        0xE4..=0xE7 => {
            let port = at(i + 1)?;
            let size = if opcode & 1 == 0 { 1 } else { size };
            (Instruction::Io { write: opcode & 2 != 0, size, immediate_port: Some(port) }, i + 2)
        }
        0xEC..=0xEF => {
            let size = if opcode & 1 == 0 { 1 } else { size };
            (Instruction::Io { write: opcode & 2 != 0, size, immediate_port: None }, i + 1)
        }
        0x6C..=0x6F => {
            let size = if opcode & 1 == 0 { 1 } else { size };
            (Instruction::StringIo { write: opcode & 2 != 0, size, rep: prefixes.rep }, i + 1)
        }
        0x0F => {
            let second = at(i + 1)?;
            match second {
                0xA2 => (Instruction::Cpuid, i + 2),
                0x32 => (Instruction::Rdmsr, i + 2),
                0x30 => (Instruction::Wrmsr, i + 2),
                0x31 => (Instruction::Rdtsc, i + 2),
                0x08 => (Instruction::Invd, i + 2),
                0x06 => (Instruction::Clts, i + 2),
                0x22 => {
                    let modrm = at(i + 2)?;
                    let cr = ((modrm >> 3) & 7) | if prefixes.rex_r { 8 } else { 0 };
                    let gpr = (modrm & 7) | if prefixes.rex_b { 8 } else { 0 };
                    (Instruction::MovToCr { cr, gpr }, i + 3)
                }
                0x01 => match at(i + 2)? {
                    0xD9 => (Instruction::Vmmcall, i + 3),
                    0xD1 => (Instruction::Xsetbv, i + 3),
                    0xF9 => (Instruction::Rdtscp, i + 3),
                    modrm if (modrm >> 3) & 7 == 6 => {
                        if modrm >> 6 == 3 {
                            let gpr = (modrm & 7) | if prefixes.rex_b { 8 } else { 0 };
                            (Instruction::Lmsw { gpr: Some(gpr) }, i + 3)
                        } else {
                            let operand = memory_operand_length(modrm, prefixes.address_size, |k| at(i + 3 + k))?;
                            (Instruction::Lmsw { gpr: None }, i + 3 + operand)
                        }
                    }
                    third => return Err(DecodeError::UnsupportedOpcode { opcode: [0x0F, 0x01, third], len: 3 }),
                },
                _ => return Err(DecodeError::UnsupportedOpcode { opcode: [0x0F, second, 0], len: 2 }),
            }
        }
        _ => return Err(DecodeError::UnsupportedOpcode { opcode: [opcode, 0, 0], len: 1 }),
    };
    Ok(Decoded { instruction, length: end as u8 })
}

/// Decodes the instruction at the start of `bytes` and checks that it is the `expected` kind
/// (compared by mnemonic class: IN/OUT and INS/OUTS match on direction only).
pub fn decode_expecting(bytes: &[u8], expected: Instruction) -> Result<Decoded, DecodeError> {
    let decoded = decode(bytes)?;
    let same = match (expected, decoded.instruction) {
        (Instruction::Io { write: a, .. }, Instruction::Io { write: b, .. }) => a == b,
        (Instruction::StringIo { write: a, .. }, Instruction::StringIo { write: b, .. }) => a == b,
        (a, b) => a == b,
    };
    if same {
        Ok(decoded)
    } else {
        Err(DecodeError::Mismatch { expected: expected.name(), found: decoded.instruction.name() })
    }
}

/// Bytes after a ModRM byte with a memory operand (mod != 3): SIB and displacement, 64-bit or
/// 32-bit addressing (APM Vol. 3 §1.4, Tables 1-12/1-14; RIP-relative for mod 00 r/m 101).
fn memory_operand_length(
    modrm: u8,
    address_size_32: bool,
    at: impl Fn(usize) -> Result<u8, DecodeError>,
) -> Result<usize, DecodeError> {
    let _ = address_size_32; // 32-bit addressing in 64-bit mode uses the same ModRM/SIB forms.
    let (mode, rm) = (modrm >> 6, modrm & 7);
    let mut length = 0;
    let mut base_is_disp32 = false;
    if rm == 4 {
        let sib = at(0)?;
        length += 1;
        base_is_disp32 = mode == 0 && sib & 7 == 5;
    }
    length += match mode {
        0 if rm == 5 || base_is_disp32 => 4,
        0 => 0,
        1 => 1,
        _ => 4,
    };
    // The last byte must be readable (and within 15 bytes): check it now.
    if length > 0 {
        at(length - 1)?;
    }
    Ok(length)
}

/// Decodes a write of control register `cr` (a CR write intercept): MOV to CRn, or for CR0 also
/// CLTS and LMSW.
pub fn decode_cr_write(bytes: &[u8], cr: u8) -> Result<Decoded, DecodeError> {
    let decoded = decode(bytes)?;
    match decoded.instruction {
        Instruction::MovToCr { cr: n, .. } if n == cr => Ok(decoded),
        Instruction::Clts | Instruction::Lmsw { .. } if cr == 0 => Ok(decoded),
        other => Err(DecodeError::Mismatch { expected: "mov to cr", found: other.name() }),
    }
}

const fn is_legacy_prefix(b: u8) -> bool {
    matches!(b, 0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(bytes: &[u8]) -> u8 {
        decode(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}")).length
    }

    #[test]
    fn plain_instructions() {
        assert_eq!(decode(&[0x0F, 0x01, 0xD9]), Ok(Decoded { instruction: Instruction::Vmmcall, length: 3 }));
        assert_eq!(decode(&[0x0F, 0xA2]), Ok(Decoded { instruction: Instruction::Cpuid, length: 2 }));
        assert_eq!(decode(&[0x0F, 0x32]), Ok(Decoded { instruction: Instruction::Rdmsr, length: 2 }));
        assert_eq!(decode(&[0x0F, 0x30]), Ok(Decoded { instruction: Instruction::Wrmsr, length: 2 }));
        assert_eq!(decode(&[0x0F, 0x31]), Ok(Decoded { instruction: Instruction::Rdtsc, length: 2 }));
        assert_eq!(decode(&[0xF4]), Ok(Decoded { instruction: Instruction::Hlt, length: 1 }));
        assert_eq!(decode(&[0x0F, 0x01, 0xD1]), Ok(Decoded { instruction: Instruction::Xsetbv, length: 3 }));
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        assert_eq!(len(&[0x0F, 0x01, 0xD9, 0xC3, 0x90, 0x90]), 3);
        assert_eq!(len(&[0xF4, 0xEB, 0xFD]), 1);
    }

    #[test]
    fn port_io_immediate_and_dx() {
        let cases: [(&[u8], Instruction, u8); 12] = [
            (&[0xE4, 0x60], Instruction::Io { write: false, size: 1, immediate_port: Some(0x60) }, 2),
            (&[0xE5, 0x71], Instruction::Io { write: false, size: 4, immediate_port: Some(0x71) }, 2),
            (&[0xE6, 0xF4], Instruction::Io { write: true, size: 1, immediate_port: Some(0xF4) }, 2),
            (&[0xE7, 0x80], Instruction::Io { write: true, size: 4, immediate_port: Some(0x80) }, 2),
            (&[0x66, 0xE5, 0x71], Instruction::Io { write: false, size: 2, immediate_port: Some(0x71) }, 3),
            (&[0x66, 0xE7, 0x80], Instruction::Io { write: true, size: 2, immediate_port: Some(0x80) }, 3),
            (&[0xEC], Instruction::Io { write: false, size: 1, immediate_port: None }, 1),
            (&[0xED], Instruction::Io { write: false, size: 4, immediate_port: None }, 1),
            (&[0xEE], Instruction::Io { write: true, size: 1, immediate_port: None }, 1),
            (&[0xEF], Instruction::Io { write: true, size: 4, immediate_port: None }, 1),
            (&[0x66, 0xEF], Instruction::Io { write: true, size: 2, immediate_port: None }, 2),
            // REX.W does not widen port I/O past 32 bits and overrides 66.
            (&[0x66, 0x48, 0xED], Instruction::Io { write: false, size: 4, immediate_port: None }, 3),
        ];
        for (bytes, instruction, length) in cases {
            assert_eq!(decode(bytes), Ok(Decoded { instruction, length }), "{bytes:02x?}");
        }
    }

    #[test]
    fn string_io_with_rep_and_prefixes() {
        assert_eq!(
            decode(&[0xF3, 0x6E]),
            Ok(Decoded { instruction: Instruction::StringIo { write: true, size: 1, rep: true }, length: 2 })
        );
        assert_eq!(
            decode(&[0x66, 0xF3, 0x6D]),
            Ok(Decoded { instruction: Instruction::StringIo { write: false, size: 2, rep: true }, length: 3 })
        );
        assert_eq!(
            decode(&[0x6C]),
            Ok(Decoded { instruction: Instruction::StringIo { write: false, size: 1, rep: false }, length: 1 })
        );
        assert_eq!(
            decode(&[0xF3, 0x6F]),
            Ok(Decoded { instruction: Instruction::StringIo { write: true, size: 4, rep: true }, length: 2 })
        );
        // Segment override and address size in front of OUTS.
        assert_eq!(len(&[0x2E, 0x67, 0xF3, 0x6E]), 4);
        assert_eq!(len(&[0xF3, 0x48, 0x6F]), 3);
    }

    #[test]
    fn prefixed_system_instructions() {
        // Redundant prefixes change nothing but the length.
        assert_eq!(len(&[0x66, 0x0F, 0xA2]), 3);
        assert_eq!(len(&[0x48, 0x0F, 0x32]), 3);
        assert_eq!(len(&[0x41, 0x0F, 0x30]), 3);
        assert_eq!(len(&[0xF3, 0x0F, 0x31]), 3);
        assert_eq!(len(&[0x66, 0x66, 0x48, 0x0F, 0x01, 0xD9]), 6);
        assert_eq!(len(&[0x3E, 0xF4]), 2);
    }

    #[test]
    fn rex_followed_by_a_legacy_prefix_is_ignored_but_counted() {
        // 48 is not the last prefix, so REX.W does not apply: 66 selects a 16-bit operand.
        assert_eq!(
            decode(&[0x48, 0x66, 0xED]),
            Ok(Decoded { instruction: Instruction::Io { write: false, size: 2, immediate_port: None }, length: 3 })
        );
        assert_eq!(len(&[0x40, 0x41, 0x0F, 0xA2]), 4);
    }

    #[test]
    fn fourteen_prefixes_fit_fifteen_do_not() {
        let mut bytes = [0x66u8; 16];
        bytes[14] = 0xF4;
        assert_eq!(len(&bytes[..15]), 15);
        let mut bytes = [0x66u8; 16];
        bytes[15] = 0xF4;
        assert_eq!(decode(&bytes), Err(DecodeError::TooLong));
        // A two-byte opcode that would end at byte 16.
        let mut bytes = [0x66u8; 16];
        bytes[13] = 0x0F;
        bytes[14] = 0xA2;
        assert_eq!(len(&bytes[..15]), 15);
        let mut bytes = [0x66u8; 17];
        bytes[14] = 0x0F;
        bytes[15] = 0xA2;
        assert_eq!(decode(&bytes), Err(DecodeError::TooLong));
    }

    #[test]
    fn truncated_input() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated { available: 0 }));
        assert_eq!(decode(&[0x0F]), Err(DecodeError::Truncated { available: 1 }));
        assert_eq!(decode(&[0x0F, 0x01]), Err(DecodeError::Truncated { available: 2 }));
        assert_eq!(decode(&[0xE4]), Err(DecodeError::Truncated { available: 1 }));
        assert_eq!(decode(&[0x66, 0x48]), Err(DecodeError::Truncated { available: 2 }));
    }

    #[test]
    fn other_instructions_are_named_errors() {
        assert_eq!(decode(&[0x90]), Err(DecodeError::UnsupportedOpcode { opcode: [0x90, 0, 0], len: 1 }));
        assert_eq!(decode(&[0x0F, 0x05]), Err(DecodeError::UnsupportedOpcode { opcode: [0x0F, 0x05, 0], len: 2 }));
        // VMRUN, VMLOAD, VMCALL (Intel): not decoded here.
        assert_eq!(
            decode(&[0x0F, 0x01, 0xD8]),
            Err(DecodeError::UnsupportedOpcode { opcode: [0x0F, 0x01, 0xD8], len: 3 })
        );
        assert_eq!(
            decode(&[0x0F, 0x01, 0xC1]),
            Err(DecodeError::UnsupportedOpcode { opcode: [0x0F, 0x01, 0xC1], len: 3 })
        );
        assert_eq!(decode(&[0xF0, 0x0F, 0xA2]), Err(DecodeError::LockPrefix));
        let e = decode(&[0x0F, 0x0B]).unwrap_err();
        assert_eq!(e.to_string(), "unsupported opcode 0f 0b");
    }

    #[test]
    fn control_register_writes_and_new_instructions() {
        // mov cr0, rax; mov cr4, rbx; mov cr8, r9 (REX.R and REX.B).
        assert_eq!(decode(&[0x0F, 0x22, 0xC0]).unwrap().instruction, Instruction::MovToCr { cr: 0, gpr: 0 });
        assert_eq!(decode(&[0x0F, 0x22, 0xE3]).unwrap().instruction, Instruction::MovToCr { cr: 4, gpr: 3 });
        assert_eq!(
            decode(&[0x45, 0x0F, 0x22, 0xC1]),
            Ok(Decoded { instruction: Instruction::MovToCr { cr: 8, gpr: 9 }, length: 4 })
        );
        assert_eq!(decode(&[0x0F, 0x06]), Ok(Decoded { instruction: Instruction::Clts, length: 2 }));
        assert_eq!(decode(&[0x0F, 0x08]), Ok(Decoded { instruction: Instruction::Invd, length: 2 }));
        assert_eq!(decode(&[0x0F, 0x01, 0xF9]), Ok(Decoded { instruction: Instruction::Rdtscp, length: 3 }));
        // lmsw ax; lmsw [rax]; lmsw [rip+disp32]; lmsw [rsp+disp8] (SIB).
        assert_eq!(decode(&[0x0F, 0x01, 0xF0]).unwrap().instruction, Instruction::Lmsw { gpr: Some(0) });
        assert_eq!(len(&[0x0F, 0x01, 0x30]), 3);
        assert_eq!(len(&[0x0F, 0x01, 0x35, 1, 2, 3, 4]), 7);
        assert_eq!(len(&[0x0F, 0x01, 0x74, 0x24, 0x08]), 5);
        assert_eq!(decode(&[0x0F, 0x01, 0x35, 1, 2]), Err(DecodeError::Truncated { available: 5 }));
        assert_eq!(decode_cr_write(&[0x0F, 0x06], 0).map(|d| d.length), Ok(2));
        assert!(matches!(decode_cr_write(&[0x0F, 0x06], 4), Err(DecodeError::Mismatch { .. })));
        assert!(matches!(decode_cr_write(&[0x0F, 0x22, 0xC0], 4), Err(DecodeError::Mismatch { .. })));
        assert_eq!(decode_cr_write(&[0xF0, 0x0F, 0x22, 0xC0], 0), Err(DecodeError::LockPrefix));
    }

    #[test]
    fn expecting_checks_the_kind() {
        assert_eq!(decode_expecting(&[0x0F, 0x01, 0xD9], Instruction::Vmmcall).map(|d| d.length), Ok(3));
        assert_eq!(
            decode_expecting(&[0x0F, 0xA2], Instruction::Vmmcall),
            Err(DecodeError::Mismatch { expected: "vmmcall", found: "cpuid" })
        );
        let out = Instruction::Io { write: true, size: 1, immediate_port: None };
        assert_eq!(decode_expecting(&[0x66, 0xE7, 0x80], out).map(|d| d.length), Ok(3));
        assert!(matches!(decode_expecting(&[0xEC], out), Err(DecodeError::Mismatch { .. })));
    }
}
