//! PCI configuration space through the legacy I/O mechanism (ports 0xCF8/0xCFC), bus
//! enumeration, BAR decoding and command-register control (memory space, bus mastering).
//!
//! Configuration mechanism #1: PCI Local Bus Specification 3.0 §3.2.2.3.2. Enumeration is a
//! brute-force scan of every bus/device/function (functions 1..7 only on multi-function devices);
//! 256 × 32 reads of the vendor ID take well under a second even under Bochs.

use alloc::vec::Vec;
use core::fmt;

use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Command register bits.
const COMMAND_IO: u16 = 1 << 0;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// A device's position on the PCI bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAddress {
    /// Bus 0..=255.
    pub bus: u8,
    /// Device 0..=31.
    pub device: u8,
    /// Function 0..=7.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

impl PciAddress {
    /// Reads the 32-bit register at `offset` (rounded down to a multiple of 4).
    pub fn read32(self, offset: u8) -> u32 {
        let address = self.config_address(offset);
        // SAFETY: 0xCF8/0xCFC are the PC's PCI configuration ports; the hypervisor owns them and
        // runs on one CPU, so the address/data pair cannot be interleaved with another access.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(address);
            Port::<u32>::new(CONFIG_DATA).read()
        }
    }

    /// Writes the 32-bit register at `offset` (rounded down to a multiple of 4).
    pub fn write32(self, offset: u8, value: u32) {
        let address = self.config_address(offset);
        // SAFETY: as in `read32`; callers write only registers whose effect they own (command
        // register, BAR sizing of a device being set up).
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(address);
            Port::<u32>::new(CONFIG_DATA).write(value);
        }
    }

    fn config_address(self, offset: u8) -> u32 {
        (1 << 31)
            | (u32::from(self.bus) << 16)
            | (u32::from(self.device & 31) << 11)
            | (u32::from(self.function & 7) << 8)
            | u32::from(offset & 0xFC)
    }

    /// Vendor and device IDs (0xFFFF vendor: nothing there).
    pub fn ids(self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// The command register.
    pub fn command(self) -> u16 {
        self.read32(4) as u16
    }

    /// Sets bits in the command register (the status half is written as zero, which leaves its
    /// write-one-to-clear bits alone).
    pub fn enable(self, bits: u16) {
        let command = self.command() | bits;
        self.write32(4, u32::from(command));
    }

    /// Turns on memory-space decoding and bus mastering (DMA), and masks legacy INTx: the
    /// drivers poll.
    pub fn enable_mmio_dma(self) {
        self.enable(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
    }

    /// Turns on I/O-space decoding.
    pub fn enable_io(self) {
        self.enable(COMMAND_IO);
    }

    /// Decodes BAR `index` (0..=5), sizing it by the write-ones protocol with decoding
    /// temporarily off. Returns `None` for an unimplemented BAR.
    pub fn bar(self, index: u8) -> Option<Bar> {
        if index > 5 {
            return None;
        }
        let offset = 0x10 + index * 4;
        let original = self.read32(offset);
        let command = self.command();
        // Sizing moves the BAR; stop decoding while it does.
        self.write32(4, u32::from(command & !(COMMAND_IO | COMMAND_MEMORY)));
        self.write32(offset, 0xFFFF_FFFF);
        let mask = self.read32(offset);
        self.write32(offset, original);
        let bar = if original & 1 == 1 {
            let size = (!(mask & !0x3)).wrapping_add(1) & 0xFFFF;
            (mask != 0).then_some(Bar::Io { port: (original & !0x3) as u16, size })
        } else {
            let is64 = (original >> 1) & 0x3 == 0x2;
            let prefetchable = original & 0x8 != 0;
            let (base, size) = if is64 && index < 5 {
                let high = self.read32(offset + 4);
                self.write32(offset + 4, 0xFFFF_FFFF);
                let mask_high = self.read32(offset + 4);
                self.write32(offset + 4, high);
                let mask64 = (u64::from(mask_high) << 32) | u64::from(mask & !0xF);
                ((u64::from(high) << 32) | u64::from(original & !0xF), (!mask64).wrapping_add(1))
            } else {
                (u64::from(original & !0xF), u64::from((!(mask & !0xF)).wrapping_add(1)))
            };
            (mask & !0xF != 0).then_some(Bar::Memory { base, size, is64, prefetchable })
        };
        self.write32(4, u32::from(command));
        bar
    }
}

/// A decoded base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Memory-mapped registers.
    Memory {
        /// Physical base address.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// A 64-bit BAR (uses the next BAR slot too).
        is64: bool,
        /// Prefetchable.
        prefetchable: bool,
    },
    /// I/O ports.
    Io {
        /// First port.
        port: u16,
        /// Number of ports.
        size: u32,
    },
}

/// One function found by [`enumerate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
}

impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:02x}.{:02x}.{:02x}",
            self.address, self.vendor, self.device, self.class.0, self.class.1, self.class.2
        )
    }
}

/// Every function on every bus.
pub fn enumerate() -> Vec<PciFunction> {
    let mut found = Vec::new();
    for bus in 0..=255u8 {
        for device in 0..32u8 {
            let first = PciAddress { bus, device, function: 0 };
            if first.ids().0 == 0xFFFF {
                continue;
            }
            let multi = (first.read32(0x0C) >> 16) & 0x80 != 0;
            for function in 0..if multi { 8 } else { 1 } {
                let address = PciAddress { bus, device, function };
                let (vendor, device_id) = address.ids();
                if vendor == 0xFFFF {
                    continue;
                }
                let class = address.read32(0x08);
                found.push(PciFunction {
                    address,
                    vendor,
                    device: device_id,
                    class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
                });
            }
        }
    }
    found
}
