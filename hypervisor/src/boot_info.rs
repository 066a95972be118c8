//! What the boot loader hands over, as the rest of the hypervisor sees it: memory ranges, the
//! kernel command line and the modules (guest images, disk images). `boot` parses the multiboot2
//! information into a [`BootInfo`]; `kernel` starts from it; the runner and the devices read the
//! modules. Pure data, below everything that uses it (no module here imports `kernel`).
#![deny(unsafe_code)]

use crate::memory::PhysRange;

/// Most memory ranges and modules taken from the boot information.
pub const MAX_BOOT_RANGES: usize = 64;
/// Most multiboot2 modules.
pub const MAX_MODULES: usize = 16;

/// A module the boot loader loaded (a guest image or a disk image).
#[derive(Clone, Copy, Debug)]
pub struct BootModule<'a> {
    /// Where it sits in physical memory.
    pub range: PhysRange,
    /// The module's own command line (its name, then `key=value` arguments).
    pub cmdline: &'a str,
}

impl<'a> BootModule<'a> {
    /// The module's name: the first word of its command line.
    pub fn name(&self) -> &'a str {
        self.cmdline.split_ascii_whitespace().next().unwrap_or(self.cmdline)
    }
}

/// What the boot loader told us, already parsed by `boot`.
#[derive(Debug)]
pub struct BootInfo<'a> {
    /// Which loader booted us.
    pub loader: &'a str,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// RAM the firmware reports as available.
    pub available: heapless::Vec<PhysRange, MAX_BOOT_RANGES>,
    /// Memory in use that the allocator must not hand out: the kernel image, the boot
    /// information, the modules.
    pub reserved: heapless::Vec<PhysRange, MAX_BOOT_RANGES>,
    /// The kernel image (the only executable memory).
    pub kernel_image: PhysRange,
    /// Loaded modules.
    pub modules: heapless::Vec<BootModule<'a>, MAX_MODULES>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_name_is_the_first_word() {
        let m = BootModule { range: PhysRange { start: 0, end: 4096 }, cmdline: "guest-redis ip=10.0.0.3/24" };
        assert_eq!(m.name(), "guest-redis");
        assert_eq!(BootModule { cmdline: "", ..m }.name(), "");
    }
}
