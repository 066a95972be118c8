//! The host GDT and TSS, and the interrupt stacks (IST) every exception runs on.
//!
//! The precompiled `core` uses the red zone, so no exception may push onto an interrupted stack:
//! every IDT gate names an IST stack (Intel SDM Vol. 3A §6.14.5, "Interrupt Stack Table").
//! Double fault, NMI and machine check get stacks of their own so that a fault inside the handler
//! of another exception still lands on a fresh stack.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (1-based, as in the IDT gate) for exceptions without a dedicated stack.
pub const IST_GENERAL: u8 = 1;
/// IST slot for #DF.
pub const IST_DOUBLE_FAULT: u8 = 2;
/// IST slot for NMI.
pub const IST_NMI: u8 = 3;
/// IST slot for #MC.
pub const IST_MACHINE_CHECK: u8 = 4;

const IST_STACKS: usize = 4;
const IST_STACK_SIZE: usize = 32 * 1024;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_STACKS]);

/// Written only by the CPU when it delivers an exception; Rust code never forms a reference.
static mut IST_STACK_MEMORY: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_STACKS]);

/// The selectors the host runs with.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    /// 64-bit kernel code.
    pub code: SegmentSelector,
    /// Kernel data (also used for SS).
    pub data: SegmentSelector,
    /// The TSS.
    pub tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// Loads the GDT and TSS and reloads every segment register. Call once, early.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let base = (&raw const IST_STACK_MEMORY) as u64;
        for slot in 0..IST_STACKS {
            // Stacks grow down: each IST entry holds the top of its stack.
            tss.interrupt_stack_table[slot] = VirtAddr::new(base + ((slot + 1) * IST_STACK_SIZE) as u64);
        }
        tss
    });
    let (gdt, selectors) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose code segment is a 64-bit ring-0
    // segment and whose data segment is a writable ring-0 segment; the TSS descriptor points to a
    // 'static TSS that is never moved.
    unsafe {
        CS::set_reg(selectors.code);
        for set in [SS::set_reg, DS::set_reg, ES::set_reg, FS::set_reg, GS::set_reg] {
            set(selectors.data);
        }
        load_tss(selectors.tss);
    }
}

/// The selectors, once [`init`] has run.
pub fn selectors() -> Option<Selectors> {
    GDT.get().map(|(_, s)| *s)
}

/// The TSS's address (the host TR base VT-x reloads on every exit).
pub fn tss_base() -> u64 {
    TSS.get().map_or(0, |tss| tss as *const TaskStateSegment as u64)
}
