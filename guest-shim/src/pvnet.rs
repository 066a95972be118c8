//! The paravirtual NIC from the guest side (ring layout in [`crate::abi`]) as a smoltcp
//! [`Device`]. The rings and buffers are allocated once at attach; the per-frame path allocates
//! nothing. The hypervisor writes the rings only while the guest is inside a hypercall, so every
//! access to hypervisor-written fields is a volatile read after a hypercall.

use alloc::boxed::Box;
use alloc::vec;
use core::marker::PhantomData;
use core::ptr::{addr_of, addr_of_mut};

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::abi::{Hypercall, HypercallError, PvDesc, PvRingHeader, PV_DESC_DONE, PV_FRAME_MAX, PV_RING_MAGIC};
use crate::rt::hypercall;

/// RX descriptors (and buffers).
pub const RX_ENTRIES: usize = 256;
/// TX descriptors (and buffers).
pub const TX_ENTRIES: usize = 256;
/// Bytes per buffer.
const BUF_BYTES: usize = 2048;

#[repr(C, align(4096))]
struct Ring<const N: usize> {
    header: PvRingHeader,
    desc: [PvDesc; N],
}

/// What the NIC has counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct NicCounters {
    /// Frames received.
    pub rx_frames: u64,
    /// Received descriptors the hypervisor marked as refused.
    pub rx_errors: u64,
    /// Frames queued for sending.
    pub tx_frames: u64,
    /// Times the TX ring was full.
    pub tx_full: u64,
    /// TCP windows the shim rounded.
    pub windows_rounded: u64,
}

/// The paravirtual NIC.
#[derive(Debug)]
pub struct PvNic {
    rx: *mut Ring<RX_ENTRIES>,
    tx: *mut Ring<TX_ENTRIES>,
    rx_bufs: *mut [u8; BUF_BYTES],
    tx_bufs: *mut [u8; BUF_BYTES],
    rx_next: u32,
    tx_producer: u32,
    tx_pending: bool,
    mac: [u8; 6],
    /// Round advertised TCP windows down to [`crate::netshim::WINDOW_QUANTUM`] (determinism shim).
    pub coarse_window: bool,
    /// Its counters.
    pub counters: NicCounters,
}

fn vread<T: Copy>(p: *const T) -> T {
    // SAFETY: every pointer passed here points into a ring or buffer `PvNic::attach` leaked, which
    // lives for the rest of the guest; volatile because the hypervisor writes it between hypercalls.
    unsafe { p.read_volatile() }
}

fn vwrite<T: Copy>(p: *mut T, v: T) {
    // SAFETY: as for `vread`; the guest is the only writer of these fields while it runs.
    unsafe { p.write_volatile(v) }
}

impl PvNic {
    /// Allocates the rings, posts every RX buffer and attaches; the hypervisor assigns the MAC.
    pub fn attach() -> Result<Self, Option<HypercallError>> {
        let rx = Box::into_raw(Box::new(Ring::<RX_ENTRIES> {
            header: PvRingHeader { magic: PV_RING_MAGIC, entries: RX_ENTRIES as u32, ..Default::default() },
            desc: [PvDesc::default(); RX_ENTRIES],
        }));
        let tx = Box::into_raw(Box::new(Ring::<TX_ENTRIES> {
            header: PvRingHeader { magic: PV_RING_MAGIC, entries: TX_ENTRIES as u32, ..Default::default() },
            desc: [PvDesc::default(); TX_ENTRIES],
        }));
        let rx_bufs = Box::leak(vec![[0u8; BUF_BYTES]; RX_ENTRIES].into_boxed_slice()).as_mut_ptr();
        let tx_bufs = Box::leak(vec![[0u8; BUF_BYTES]; TX_ENTRIES].into_boxed_slice()).as_mut_ptr();
        let mut nic = Self {
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            rx_next: 0,
            tx_producer: 0,
            tx_pending: false,
            mac: [0; 6],
            coarse_window: true,
            counters: NicCounters::default(),
        };
        for slot in 0..RX_ENTRIES {
            nic.post_rx(slot);
        }
        // SAFETY: a field of the ring leaked above.
        vwrite(unsafe { addr_of_mut!((*nic.rx).header.producer) }, RX_ENTRIES as u32);
        let word = hypercall(Hypercall::NetAttach, rx as u64, tx as u64, 0)?;
        nic.mac.copy_from_slice(&word.to_le_bytes()[..6]);
        Ok(nic)
    }

    fn post_rx(&mut self, slot: usize) {
        // SAFETY: slot < RX_ENTRIES: inside the leaked buffer array.
        let addr = unsafe { self.rx_bufs.add(slot) } as u64;
        // SAFETY: slot < RX_ENTRIES, inside the leaked ring.
        let desc = unsafe { addr_of_mut!((*self.rx).desc[slot]) };
        vwrite(desc, PvDesc { addr, len: BUF_BYTES as u32, flags: 0, reserved: 0 });
    }

    /// The MAC address the hypervisor gave this NIC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Rings the doorbell: sends queued frames and collects received ones.
    pub fn notify(&mut self) {
        let _ = hypercall(Hypercall::NetNotify, 0, 0, 0);
        self.tx_pending = false;
    }

    /// Rings the doorbell if frames were queued since the last one.
    pub fn flush(&mut self) {
        if self.tx_pending {
            self.notify();
        }
    }

    /// Whether a received frame is waiting.
    pub fn rx_ready(&self) -> bool {
        // SAFETY: a field of the leaked ring.
        self.rx_next != vread(unsafe { addr_of!((*self.rx).header.consumer) })
    }

    fn tx_free(&self) -> bool {
        // SAFETY: a field of the leaked ring.
        let consumer = vread(unsafe { addr_of!((*self.tx).header.consumer) });
        self.tx_producer.wrapping_sub(consumer) < TX_ENTRIES as u32
    }
}

/// A received frame, handed back to the ring once smoltcp has read it.
#[derive(Debug)]
pub struct RxToken<'a> {
    nic: *mut PvNic,
    slot: usize,
    len: usize,
    _nic: PhantomData<&'a mut PvNic>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the token was made from `&mut PvNic` for lifetime 'a; smoltcp uses the RX and
        // TX tokens of one `receive` one after the other, never both at once.
        let nic = unsafe { &mut *self.nic };
        // SAFETY: slot < RX_ENTRIES and len <= BUF_BYTES (checked in `receive`); the hypervisor
        // does not write this buffer until it is posted again below.
        let buf = unsafe { &(&*nic.rx_bufs.add(self.slot))[..self.len] };
        let r = f(buf);
        nic.post_rx(self.slot);
        nic.rx_next = nic.rx_next.wrapping_add(1);
        let producer = nic.rx_next.wrapping_add(RX_ENTRIES as u32);
        // SAFETY: a field of the leaked ring.
        vwrite(unsafe { addr_of_mut!((*nic.rx).header.producer) }, producer);
        r
    }
}

/// Permission to queue one frame.
#[derive(Debug)]
pub struct TxToken<'a> {
    nic: *mut PvNic,
    _nic: PhantomData<&'a mut PvNic>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // SAFETY: as for `RxToken::consume`.
        let nic = unsafe { &mut *self.nic };
        let len = len.min(PV_FRAME_MAX as usize);
        let slot = nic.tx_producer as usize % TX_ENTRIES;
        // SAFETY: slot < TX_ENTRIES; the hypervisor has consumed this slot (`transmit` checked
        // `tx_free`), so nothing else reads or writes it.
        let buf = unsafe { &mut (&mut *nic.tx_bufs.add(slot))[..len] };
        let r = f(buf);
        if nic.coarse_window && crate::netshim::round_tcp_window(buf) {
            nic.counters.windows_rounded += 1;
        }
        // SAFETY: slot < TX_ENTRIES, inside the leaked ring.
        let desc = unsafe { addr_of_mut!((*nic.tx).desc[slot]) };
        vwrite(desc, PvDesc { addr: buf.as_ptr() as u64, len: len as u32, flags: 0, reserved: 0 });
        nic.tx_producer = nic.tx_producer.wrapping_add(1);
        // SAFETY: a field of the leaked ring.
        vwrite(unsafe { addr_of_mut!((*nic.tx).header.producer) }, nic.tx_producer);
        nic.counters.tx_frames += 1;
        nic.tx_pending = true;
        r
    }
}

impl Device for PvNic {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        while self.rx_ready() {
            let slot = self.rx_next as usize % RX_ENTRIES;
            // SAFETY: slot < RX_ENTRIES, inside the leaked ring.
            let desc = vread(unsafe { addr_of!((*self.rx).desc[slot]) });
            if desc.flags & PV_DESC_DONE == 0 || desc.len as usize > BUF_BYTES {
                self.counters.rx_errors += 1;
                self.post_rx(slot);
                self.rx_next = self.rx_next.wrapping_add(1);
                let producer = self.rx_next.wrapping_add(RX_ENTRIES as u32);
                // SAFETY: a field of the leaked ring.
                vwrite(unsafe { addr_of_mut!((*self.rx).header.producer) }, producer);
                continue;
            }
            if !self.tx_free() {
                self.notify();
                if !self.tx_free() {
                    self.counters.tx_full += 1;
                    return None;
                }
            }
            self.counters.rx_frames += 1;
            // Both tokens borrow the NIC; smoltcp uses them one after the other.
            let this: *mut PvNic = self;
            return Some((
                RxToken { nic: this, slot, len: desc.len as usize, _nic: PhantomData },
                TxToken { nic: this, _nic: PhantomData },
            ));
        }
        None
    }

    fn transmit(&mut self, _: Instant) -> Option<Self::TxToken<'_>> {
        if !self.tx_free() {
            self.notify();
            if !self.tx_free() {
                self.counters.tx_full += 1;
                return None;
            }
        }
        Some(TxToken { nic: self, _nic: PhantomData })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = PV_FRAME_MAX as usize;
        caps
    }
}
