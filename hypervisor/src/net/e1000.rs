//! Driver for the Intel 82540EM ("e1000"), the NIC both QEMU (`-device e1000`) and Bochs
//! (`e1000:`) emulate. Polled: interrupts are masked, receive and transmit rings are checked by
//! [`E1000::receive`] and [`E1000::transmit`].
//!
//! Register and descriptor formats: Intel PCI/PCI-X Family of Gigabit Ethernet Controllers
//! Software Developer's Manual (8254x), §3.2 (receive descriptor), §3.3.3 (legacy transmit
//! descriptor), §13 (registers), §14.4–14.5 (receive/transmit initialisation).
//!
//! DMA memory (rings and buffers) comes from the kernel heap, which `host::paging` identity-maps,
//! so a heap pointer is also the physical address the NIC uses. The buffers are never freed.

use alloc::alloc::{alloc_zeroed, Layout};
use core::fmt;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

use crate::host::pci::{Bar, PciAddress, PciFunction};
use crate::host::time;

/// PCI IDs this driver accepts: 82540EM (QEMU `e1000`, Bochs), 82545EM (QEMU `e1000-82545em`),
/// 82544GC (QEMU `e1000-82544gc`). All share the register set used here.
pub const SUPPORTED: &[(u16, u16)] = &[(0x8086, 0x100E), (0x8086, 0x100F), (0x8086, 0x1004)];

const CTRL: usize = 0x0000;
const STATUS: usize = 0x0008;
const EERD: usize = 0x0014;
const ICR: usize = 0x00C0;
const IMC: usize = 0x00D8;
const RCTL: usize = 0x0100;
const TCTL: usize = 0x0400;
const TIPG: usize = 0x0410;
const RDBAL: usize = 0x2800;
const RDBAH: usize = 0x2804;
const RDLEN: usize = 0x2808;
const RDH: usize = 0x2810;
const RDT: usize = 0x2818;
const TDBAL: usize = 0x3800;
const TDBAH: usize = 0x3804;
const TDLEN: usize = 0x3808;
const TDH: usize = 0x3810;
const TDT: usize = 0x3818;
const MTA: usize = 0x5200;
const RAL0: usize = 0x5400;
const RAH0: usize = 0x5404;

const CTRL_ASDE: u32 = 1 << 5;
const CTRL_SLU: u32 = 1 << 6;
const CTRL_RST: u32 = 1 << 26;
const CTRL_LRST: u32 = 1 << 3;
const CTRL_ILOS: u32 = 1 << 7;
const CTRL_VME: u32 = 1 << 30;
const CTRL_PHY_RST: u32 = 1 << 31;
const STATUS_LU: u32 = 1 << 1;
const EERD_START: u32 = 1 << 0;
const EERD_DONE: u32 = 1 << 4;
const RAH_AV: u32 = 1 << 31;

const RCTL_EN: u32 = 1 << 1;
const RCTL_UPE: u32 = 1 << 3;
const RCTL_MPE: u32 = 1 << 4;
const RCTL_BAM: u32 = 1 << 15;
const RCTL_SECRC: u32 = 1 << 26;
// BSIZE = 00 with BSEX = 0: 2048-byte buffers.

const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TCTL_CT: u32 = 0x10 << 4;
const TCTL_COLD: u32 = 0x40 << 12;

const RX_DD: u8 = 1 << 0;
const RX_EOP: u8 = 1 << 1;
/// CE, SE, SEQ, CXE, RXE: frame errors (TCPE/IPE are checksum-offload results, not enabled).
const RX_FRAME_ERRORS: u8 = 0b1001_0111;

const TX_CMD_EOP: u8 = 1 << 0;
const TX_CMD_IFCS: u8 = 1 << 1;
const TX_CMD_RS: u8 = 1 << 3;
const TX_DD: u8 = 1 << 0;

/// Descriptors per ring (a multiple of 8: ring length must be a multiple of 128 bytes). 256:
/// the replication link's TCP window (256 KiB, ~180 full segments) arrives in bursts that a
/// 64-entry receive ring dropped between two polls of a busy host.
const RING: usize = 256;
/// Bytes per buffer.
pub const BUFFER: usize = 2048;
/// The largest frame sent (without FCS): Ethernet MTU 1500 plus a VLAN-tagged header.
pub const MAX_FRAME: usize = 1518;

#[repr(C)]
#[derive(Clone, Copy)]
struct RxDesc {
    addr: u64,
    length: u16,
    checksum: u16,
    status: u8,
    errors: u8,
    special: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TxDesc {
    addr: u64,
    length: u16,
    cso: u8,
    cmd: u8,
    status: u8,
    css: u8,
    special: u16,
}

/// Why a NIC could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E1000Error {
    /// BAR 0 is not a memory BAR.
    NoMmioBar {
        /// The function.
        address: PciAddress,
        /// What BAR 0 decoded to.
        found: Option<Bar>,
    },
    /// BAR 0 lies above the identity map's 4 GiB (a 64-bit BAR the firmware placed high).
    BarAbove4G {
        /// The function.
        address: PciAddress,
        /// The base address.
        base: u64,
    },
    /// The device did not leave reset.
    ResetTimeout {
        /// The function.
        address: PciAddress,
    },
    /// The heap could not hold the rings.
    OutOfMemory {
        /// Bytes asked for.
        bytes: usize,
    },
}

impl fmt::Display for E1000Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMmioBar { address, found } => {
                write!(f, "e1000 at {address}: BAR 0 is {found:?}; expected a memory BAR")
            }
            Self::BarAbove4G { address, base } => {
                write!(f, "e1000 at {address}: BAR 0 at {base:#x}; expected an address below 4 GiB")
            }
            Self::ResetTimeout { address } => write!(f, "e1000 at {address}: CTRL.RST still set after 100 ms"),
            Self::OutOfMemory { bytes } => write!(f, "e1000: cannot allocate {bytes} bytes of DMA memory"),
        }
    }
}

/// Why a received frame was refused by the NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxError {
    /// The descriptor's error bits were set (CRC, symbol, sequence, carrier extension, RX data).
    Flagged {
        /// The error byte.
        errors: u8,
    },
    /// The frame did not fit one buffer (no end-of-packet bit).
    Fragmented,
}

/// Why a frame was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxError {
    /// Every transmit descriptor is still owned by the NIC.
    RingFull,
    /// The frame is empty or larger than [`MAX_FRAME`].
    BadLength {
        /// The length asked for.
        len: usize,
    },
}

/// One 82540EM.
pub struct E1000 {
    pci: PciAddress,
    regs: usize,
    mac: [u8; 6],
    rx_ring: *mut RxDesc,
    rx_buffers: *mut u8,
    rx_next: usize,
    tx_ring: *mut TxDesc,
    tx_buffers: *mut u8,
    tx_next: usize,
}

impl fmt::Debug for E1000 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("E1000").field("pci", &self.pci).field("regs", &self.regs).field("mac", &self.mac).finish()
    }
}

// SAFETY: the pointers refer to DMA memory and registers owned by this value alone; moving it to
// another CPU context (it is kept behind a lock) does not create aliases.
unsafe impl Send for E1000 {}

fn dma_alloc(bytes: usize) -> Result<*mut u8, E1000Error> {
    let layout = Layout::from_size_align(bytes, 4096).map_err(|_| E1000Error::OutOfMemory { bytes })?;
    // SAFETY: the layout has a non-zero size (every caller asks for at least one ring).
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        Err(E1000Error::OutOfMemory { bytes })
    } else {
        Ok(p)
    }
}

impl E1000 {
    /// Whether this driver handles `function`.
    pub fn supports(function: &PciFunction) -> bool {
        SUPPORTED.contains(&(function.vendor, function.device))
    }

    /// Resets and initialises the NIC: MAC from the receive-address registers (or the EEPROM),
    /// link up, interrupts masked, both rings live.
    pub fn init(function: &PciFunction) -> Result<Self, E1000Error> {
        let address = function.address;
        let base = match address.bar(0) {
            Some(Bar::Memory { base, .. }) if base + 0x20000 <= 1 << 32 => base,
            Some(Bar::Memory { base, .. }) => return Err(E1000Error::BarAbove4G { address, base }),
            found => return Err(E1000Error::NoMmioBar { address, found }),
        };
        address.enable_mmio_dma();
        let rx_ring = dma_alloc(RING * 16)?.cast::<RxDesc>();
        let rx_buffers = dma_alloc(RING * BUFFER)?;
        let tx_ring = dma_alloc(RING * 16)?.cast::<TxDesc>();
        let tx_buffers = dma_alloc(RING * BUFFER)?;
        let mut nic = Self {
            pci: address,
            regs: base as usize,
            mac: [0; 6],
            rx_ring,
            rx_buffers,
            rx_next: 0,
            tx_ring,
            tx_buffers,
            tx_next: 0,
        };
        nic.reset()?;
        nic.mac = nic.read_mac();
        let [a, b, c, d, e, f] = nic.mac;
        nic.write(RAL0, u32::from_le_bytes([a, b, c, d]));
        nic.write(RAH0, u32::from(u16::from_le_bytes([e, f])) | RAH_AV);
        for i in 0..128 {
            nic.write(MTA + 4 * i, 0);
        }
        nic.setup_rx();
        nic.setup_tx();
        Ok(nic)
    }

    fn reset(&mut self) -> Result<(), E1000Error> {
        self.write(IMC, 0xFFFF_FFFF);
        self.write(RCTL, 0);
        self.write(TCTL, TCTL_PSP);
        self.write(CTRL, self.read(CTRL) | CTRL_RST);
        time::delay_ms(1);
        let deadline = time::now_ms() + 100;
        while self.read(CTRL) & CTRL_RST != 0 {
            if time::now_ms() > deadline {
                return Err(E1000Error::ResetTimeout { address: self.pci });
            }
        }
        self.write(IMC, 0xFFFF_FFFF);
        let _ = self.read(ICR);
        let ctrl = self.read(CTRL);
        self.write(CTRL, (ctrl | CTRL_SLU | CTRL_ASDE) & !(CTRL_LRST | CTRL_ILOS | CTRL_VME | CTRL_PHY_RST));
        Ok(())
    }

    fn read_mac(&self) -> [u8; 6] {
        let low = self.read(RAL0).to_le_bytes();
        let high = self.read(RAH0).to_le_bytes();
        let mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        if mac != [0; 6] {
            return mac;
        }
        let mut mac = [0u8; 6];
        for word in 0..3u32 {
            self.write(EERD, (word << 8) | EERD_START);
            let deadline = time::now_ms() + 10;
            let mut value = self.read(EERD);
            while value & EERD_DONE == 0 && time::now_ms() <= deadline {
                value = self.read(EERD);
            }
            let bytes = ((value >> 16) as u16).to_le_bytes();
            mac[word as usize * 2] = bytes[0];
            mac[word as usize * 2 + 1] = bytes[1];
        }
        mac
    }

    fn setup_rx(&mut self) {
        for i in 0..RING {
            let desc = RxDesc {
                addr: self.rx_buffers as u64 + (i * BUFFER) as u64,
                length: 0,
                checksum: 0,
                status: 0,
                errors: 0,
                special: 0,
            };
            // SAFETY: `i < RING` and the ring holds RING descriptors.
            unsafe { ptr::write_volatile(self.rx_ring.add(i), desc) };
        }
        let ring = self.rx_ring as u64;
        self.write(RDBAL, ring as u32);
        self.write(RDBAH, (ring >> 32) as u32);
        self.write(RDLEN, (RING * 16) as u32);
        self.write(RDH, 0);
        self.write(RDT, (RING - 1) as u32);
        self.rx_next = 0;
        self.write(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);
    }

    fn setup_tx(&mut self) {
        for i in 0..RING {
            let desc = TxDesc {
                addr: self.tx_buffers as u64 + (i * BUFFER) as u64,
                length: 0,
                cso: 0,
                cmd: 0,
                status: TX_DD,
                css: 0,
                special: 0,
            };
            // SAFETY: `i < RING` and the ring holds RING descriptors.
            unsafe { ptr::write_volatile(self.tx_ring.add(i), desc) };
        }
        let ring = self.tx_ring as u64;
        self.write(TDBAL, ring as u32);
        self.write(TDBAH, (ring >> 32) as u32);
        self.write(TDLEN, (RING * 16) as u32);
        self.write(TDH, 0);
        self.write(TDT, 0);
        self.tx_next = 0;
        self.write(TIPG, 10 | (8 << 10) | (6 << 20));
        self.write(TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD);
    }

    /// The PCI function.
    pub fn pci(&self) -> PciAddress {
        self.pci
    }

    /// The MAC address in use.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.read(STATUS) & STATUS_LU != 0
    }

    /// Accept every unicast and multicast frame (for forwarding to guests with their own MACs).
    pub fn set_promiscuous(&mut self, on: bool) {
        let rctl = self.read(RCTL);
        let bits = RCTL_UPE | RCTL_MPE;
        self.write(RCTL, if on { rctl | bits } else { rctl & !bits });
    }

    /// Whether a transmit descriptor is free.
    pub fn can_transmit(&self) -> bool {
        self.tx_done(self.tx_next)
    }

    /// Whether the NIC has finished with transmit descriptor `i` (its DD bit; only the status
    /// byte is read, the NIC writes nothing else back).
    fn tx_done(&self, i: usize) -> bool {
        // SAFETY: `i < RING`; the descriptor is DMA memory shared with the NIC, hence volatile.
        let status = unsafe { ptr::read_volatile(ptr::addr_of!((*self.tx_ring.wrapping_add(i)).status)) };
        status & TX_DD != 0
    }

    /// Whether a received frame waits (the next descriptor's DD bit; one volatile read).
    pub fn rx_pending(&self) -> bool {
        // SAFETY: `rx_next < RING`; the descriptor is DMA memory shared with the NIC.
        let status = unsafe { ptr::read_volatile(ptr::addr_of!((*self.rx_ring.wrapping_add(self.rx_next)).status)) };
        status & RX_DD != 0
    }

    /// Takes the next received frame, if any, hands it (or the NIC's verdict on it) to `f`, and
    /// gives the buffer back to the NIC. Returns `None` when nothing is pending.
    pub fn receive<R>(&mut self, f: impl FnOnce(Result<&[u8], RxError>) -> R) -> Option<R> {
        let i = self.rx_next;
        // The NIC writes the descriptor back while this runs: read the status byte alone first,
        // and the length and errors only after DD is seen (a whole-struct read lets the compiler
        // load the length before the status, and a stale length of 0 then drops a good frame).
        let desc = self.rx_ring.wrapping_add(i);
        // SAFETY: `i < RING`; the descriptor is DMA memory shared with the NIC, hence volatile.
        let status = unsafe { ptr::read_volatile(ptr::addr_of!((*desc).status)) };
        if status & RX_DD == 0 {
            return None;
        }
        // Everything the NIC wrote before setting DD (length, errors, the buffer) is read after.
        fence(Ordering::Acquire);
        // SAFETY: as above; DD is set, so the NIC has finished writing this descriptor.
        let (length, errors) = unsafe {
            (ptr::read_volatile(ptr::addr_of!((*desc).length)), ptr::read_volatile(ptr::addr_of!((*desc).errors)))
        };
        let len = usize::from(length).min(BUFFER);
        let result = if errors & RX_FRAME_ERRORS != 0 {
            Err(RxError::Flagged { errors })
        } else if status & RX_EOP == 0 {
            Err(RxError::Fragmented)
        } else {
            // SAFETY: buffer `i` is BUFFER bytes of DMA memory this driver owns; the NIC has
            // finished writing it (DD set) and will not touch it until RDT passes it again.
            Ok(unsafe { core::slice::from_raw_parts(self.rx_buffers.add(i * BUFFER), len) })
        };
        let out = f(result);
        let fresh = RxDesc {
            addr: self.rx_buffers as u64 + (i * BUFFER) as u64,
            length: 0,
            checksum: 0,
            status: 0,
            errors: 0,
            special: 0,
        };
        // SAFETY: as above; the descriptor goes back to the NIC below.
        unsafe { ptr::write_volatile(desc, fresh) };
        fence(Ordering::Release);
        self.write(RDT, i as u32);
        self.rx_next = (i + 1) % RING;
        Some(out)
    }

    /// Sends a frame of `len` bytes that `f` writes. The NIC appends the FCS and pads short
    /// frames (TCTL.PSP).
    pub fn transmit<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, TxError> {
        if len == 0 || len > MAX_FRAME {
            return Err(TxError::BadLength { len });
        }
        let i = self.tx_next;
        if !self.tx_done(i) {
            return Err(TxError::RingFull);
        }
        // The buffer is written only after DD was seen.
        fence(Ordering::Acquire);
        // SAFETY: buffer `i` is BUFFER >= MAX_FRAME bytes of DMA memory this driver owns; the NIC
        // finished with it (DD set) and will not read it before TDT passes it.
        let buf = unsafe { core::slice::from_raw_parts_mut(self.tx_buffers.add(i * BUFFER), len) };
        let out = f(buf);
        let ready = TxDesc {
            addr: self.tx_buffers as u64 + (i * BUFFER) as u64,
            length: len as u16,
            cso: 0,
            cmd: TX_CMD_EOP | TX_CMD_IFCS | TX_CMD_RS,
            status: 0,
            css: 0,
            special: 0,
        };
        // SAFETY: as above.
        unsafe { ptr::write_volatile(self.tx_ring.add(i), ready) };
        fence(Ordering::Release);
        self.tx_next = (i + 1) % RING;
        self.write(TDT, self.tx_next as u32);
        Ok(out)
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `regs` is BAR 0 of this NIC (128 KiB of registers, identity-mapped below 4 GiB
        // by `host::paging`), every offset used is a register inside it, 4-byte aligned.
        unsafe { ptr::read_volatile((self.regs + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile((self.regs + offset) as *mut u32, value) }
    }
}
