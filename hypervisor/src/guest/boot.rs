//! The guest boot protocol, hypervisor side: writes the GDT, the identity page tables, the boot
//! information and the command line into guest RAM, and returns the architectural state the
//! guest starts in. The layout is `guest_shim::abi`'s (one definition for both sides).
#![deny(unsafe_code)]

use guest_shim::abi::{
    GuestBootInfo, HypercallInsn, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, GUEST_BOOT_INFO, GUEST_CMDLINE,
    GUEST_CMDLINE_MAX, GUEST_CODE_SELECTOR, GUEST_DATA_SELECTOR, GUEST_GDT, GUEST_PAGE_TABLES,
};
use zerocopy::IntoBytes;

use super::memory::{GuestMemory, MemoryError};
use crate::vcpu::GuestEntryState;

const GIB: u64 = 1 << 30;
/// Page directories fit between the PDPT and the boot info: 4, so at most 4 GiB of guest RAM.
const MAX_PAGE_DIRECTORIES: u64 = (GUEST_BOOT_INFO - GUEST_PAGE_TABLES - 0x2000) / 0x1000;

/// Flat 64-bit code (L=1, P=1, DPL 0, execute/read) and data (writable) descriptors.
const GDT: [u64; 3] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;

/// CR0: PE, MP, ET, NE, PG.
pub const GUEST_CR0: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 31);
/// CR4: PAE, OSFXSR, OSXMMEXCPT.
pub const GUEST_CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: LME, LMA, NXE.
pub const GUEST_EFER: u64 = (1 << 8) | (1 << 10) | (1 << 11);

/// What the runner knows about the guest it is starting.
#[derive(Clone, Copy, Debug)]
pub struct BootParams<'a> {
    /// The ELF entry point.
    pub entry: u64,
    /// The guest's command line.
    pub cmdline: &'a str,
    /// The backend's hypercall instruction.
    pub hypercall_insn: HypercallInsn,
    /// Clock ticks per second.
    pub ticks_per_second: u64,
}

/// Why the boot structures could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// Guest RAM is too small or too large for the protocol's fixed layout.
    RamSize {
        /// The size given.
        size: u64,
    },
    /// A write outside RAM (cannot happen once the size is checked; kept typed).
    Memory(MemoryError),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::RamSize { size } => {
                write!(f, "guest RAM of {size:#x} bytes: expected 2 MiB to {} GiB", MAX_PAGE_DIRECTORIES)
            }
            Self::Memory(e) => write!(f, "{e}"),
        }
    }
}

impl From<MemoryError> for BootError {
    fn from(e: MemoryError) -> Self {
        Self::Memory(e)
    }
}

/// Writes the boot structures and returns the entry state.
pub fn prepare(mem: &mut dyn GuestMemory, params: &BootParams<'_>) -> Result<GuestEntryState, BootError> {
    let size = mem.size();
    let directories = size.div_ceil(GIB);
    if size < (2 << 20) || directories > MAX_PAGE_DIRECTORIES {
        return Err(BootError::RamSize { size });
    }
    for (i, descriptor) in GDT.iter().enumerate() {
        mem.write_u64(GUEST_GDT + 8 * i as u64, *descriptor)?;
    }
    // PML4 -> PDPT -> `directories` page directories of 2 MiB pages, identity-mapping whole GiBs
    // (addresses past the end of RAM inside the last GiB are mapped here but not in the
    // second-level tables, so touching them is an EPT/NPT violation the hypervisor reports).
    let pml4 = GUEST_PAGE_TABLES;
    let pdpt = pml4 + 0x1000;
    mem.slice_mut(pml4, 0x2000 + directories * 0x1000)?.fill(0);
    mem.write_u64(pml4, pdpt | PTE_PRESENT | PTE_WRITABLE)?;
    for d in 0..directories {
        let pd = pdpt + 0x1000 * (d + 1);
        mem.write_u64(pdpt + 8 * d, pd | PTE_PRESENT | PTE_WRITABLE)?;
        for e in 0..512 {
            let addr = d * GIB + e * (2 << 20);
            mem.write_u64(pd + 8 * e, addr | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE)?;
        }
    }
    let cmdline = &params.cmdline.as_bytes()[..params.cmdline.len().min(GUEST_CMDLINE_MAX)];
    mem.write(GUEST_CMDLINE, cmdline)?;
    let info = GuestBootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        hypercall_insn: params.hypercall_insn as u32,
        ram_size: size,
        ticks_per_second: params.ticks_per_second,
        cmdline_addr: GUEST_CMDLINE,
        cmdline_len: cmdline.len() as u64,
    };
    mem.write(GUEST_BOOT_INFO, info.as_bytes())?;
    Ok(GuestEntryState {
        rip: params.entry,
        rsp: size,
        rdi: GUEST_BOOT_INFO,
        rflags: 1 << 1,
        cr0: GUEST_CR0,
        cr3: pml4,
        cr4: GUEST_CR4,
        efer: GUEST_EFER,
        gdt_base: GUEST_GDT,
        gdt_limit: (GDT.len() * 8 - 1) as u16,
        code_selector: GUEST_CODE_SELECTOR,
        data_selector: GUEST_DATA_SELECTOR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestRam;

    fn params() -> BootParams<'static> {
        BootParams {
            entry: 0x20_0000,
            cmdline: "guest-hello status=3",
            hypercall_insn: HypercallInsn::Vmcall,
            ticks_per_second: 1000,
        }
    }

    #[test]
    fn structures_follow_the_protocol() {
        let mut buf = std::vec![0u8; 16 << 20];
        let mut ram = GuestRam::new(&mut buf);
        let state = prepare(&mut ram, &params()).unwrap();
        assert_eq!(
            (state.rip, state.rsp, state.rdi, state.cr3),
            (0x20_0000, 16 << 20, GUEST_BOOT_INFO, GUEST_PAGE_TABLES)
        );
        let u64_at = |ram: &GuestRam<'_>, gpa| u64::from_le_bytes(ram.slice(gpa, 8).unwrap().try_into().unwrap());
        assert_eq!(u64_at(&ram, GUEST_BOOT_INFO), BOOT_INFO_MAGIC);
        // PD entry 3 maps 6 MiB with a large page.
        assert_eq!(u64_at(&ram, GUEST_PAGE_TABLES + 0x2000 + 3 * 8), (6 << 20) | 0x83);
        assert_eq!(ram.slice(GUEST_CMDLINE, 11).unwrap(), b"guest-hello");
        assert_eq!(u64_at(&ram, GUEST_GDT + 8), GDT[1]);
    }

    #[test]
    fn ram_size_is_bounded() {
        let mut small = std::vec![0u8; 1 << 20];
        assert_eq!(prepare(&mut GuestRam::new(&mut small), &params()), Err(BootError::RamSize { size: 1 << 20 }));
    }
}
