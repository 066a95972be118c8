//! The paravirtual NIC's device model: two rings in guest memory (layout in
//! `guest_shim::abi`), validated on every use. Nothing the guest writes is trusted: the ring
//! geometry is fixed at attach time, the hypervisor keeps its own consumer indices, and every
//! descriptor is checked against guest RAM and the frame size limits before a byte moves.
//! Refusals are counted in [`PvNetCounters`].
//!
//! [`PvNet::write_rx_frame`] is the one function that writes received frames into guest memory.
#![deny(unsafe_code)]

use core::fmt;

use guest_shim::abi::{
    pv_ring_bytes, PvDesc, PvRingHeader, PV_DESC_DONE, PV_DESC_ERROR, PV_FRAME_MAX, PV_FRAME_MIN, PV_RING_MAGIC,
    PV_RING_MAX_ENTRIES,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::devices::state::{DeviceStateError, Persist, PvNetState, RingState};
use crate::guest::GuestMemory;

const HEADER_BYTES: u64 = core::mem::size_of::<PvRingHeader>() as u64;
const DESC_BYTES: u64 = core::mem::size_of::<PvDesc>() as u64;
/// Offset of `producer` in the header.
const PRODUCER_OFFSET: u64 = 12;
/// Offset of `consumer` in the header.
const CONSUMER_OFFSET: u64 = 16;

/// Why the device refused something the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvNetError {
    /// A doorbell or frame before `NetAttach`.
    NotAttached,
    /// A ring does not lie inside guest RAM.
    RingOutsideRam {
        /// Its guest-physical address.
        gpa: u64,
        /// Bytes it needs.
        len: u64,
    },
    /// A ring header does not start with `PV_RING_MAGIC`.
    BadMagic {
        /// What it holds.
        found: u64,
    },
    /// A ring's `entries` is not a power of two in `1..=PV_RING_MAX_ENTRIES`.
    BadEntries {
        /// What the header says.
        entries: u32,
    },
    /// The RX and TX rings overlap.
    RingsOverlap,
    /// `producer - consumer` exceeds the ring size.
    IndexOutOfRange {
        /// The guest's producer index.
        producer: u32,
        /// The hypervisor's consumer index.
        consumer: u32,
        /// The ring size.
        entries: u32,
    },
}

impl fmt::Display for PvNetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotAttached => write!(f, "the paravirtual NIC is not attached; expected NetAttach first"),
            Self::RingOutsideRam { gpa, len } => {
                write!(f, "ring at {gpa:#x} ({len} bytes) is outside guest RAM; expected it inside RAM")
            }
            Self::BadMagic { found } => write!(f, "ring magic is {found:#x}; expected {PV_RING_MAGIC:#x}"),
            Self::BadEntries { entries } => {
                write!(f, "ring has {entries} entries; expected a power of two from 1 to {PV_RING_MAX_ENTRIES}")
            }
            Self::RingsOverlap => write!(f, "the RX and TX rings overlap; expected disjoint rings"),
            Self::IndexOutOfRange { producer, consumer, entries } => write!(
                f,
                "producer index {producer} is {} ahead of consumer {consumer}; expected at most {entries}",
                producer.wrapping_sub(consumer)
            ),
        }
    }
}

/// Named counters of the paravirtual NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvNetCounters {
    /// Frames the guest sent (handed to the forwarding hook).
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the hook refused (host NIC busy).
    pub tx_dropped: u64,
    /// Frames written into the guest's RX ring.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames for the guest dropped because no RX buffer was posted.
    pub rx_no_buffer: u64,
    /// Attach requests refused.
    pub bad_attach: u64,
    /// Doorbells or deliveries refused because `producer - consumer` exceeded the ring size.
    pub bad_index: u64,
    /// Descriptors pointing outside guest RAM.
    pub bad_descriptor: u64,
    /// TX frames longer than `PV_FRAME_MAX`, or RX frames longer than the posted buffer.
    pub oversized: u64,
    /// TX frames shorter than `PV_FRAME_MIN`.
    pub undersized: u64,
}

impl PvNetCounters {
    /// Every refusal.
    pub fn rejected(&self) -> u64 {
        self.bad_attach + self.bad_index + self.bad_descriptor + self.oversized + self.undersized
    }
}

impl fmt::Display for PvNetCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tx_frames={} tx_bytes={} tx_dropped={} rx_frames={} rx_bytes={} rx_no_buffer={} bad_attach={} \
             bad_index={} bad_descriptor={} oversized={} undersized={}",
            self.tx_frames,
            self.tx_bytes,
            self.tx_dropped,
            self.rx_frames,
            self.rx_bytes,
            self.rx_no_buffer,
            self.bad_attach,
            self.bad_index,
            self.bad_descriptor,
            self.oversized,
            self.undersized
        )
    }
}

/// One ring as the hypervisor knows it: geometry fixed at attach, its own consumer index.
#[derive(Clone, Copy, Debug)]
struct Ring {
    gpa: u64,
    entries: u32,
    consumer: u32,
}

impl Ring {
    /// Reads and checks a ring header the guest wrote (it must lie in RAM and carry the magic).
    fn header(mem: &dyn GuestMemory, gpa: u64) -> Result<PvRingHeader, PvNetError> {
        let header = mem.slice(gpa, HEADER_BYTES).map_err(|_| PvNetError::RingOutsideRam { gpa, len: HEADER_BYTES })?;
        let header = PvRingHeader::read_from_bytes(header).map_err(|_| PvNetError::RingOutsideRam { gpa, len: 0 })?;
        if header.magic != PV_RING_MAGIC {
            return Err(PvNetError::BadMagic { found: header.magic });
        }
        Ok(header)
    }

    /// Descriptors available: `producer - consumer`, checked against the ring size.
    fn available(&self, mem: &dyn GuestMemory) -> Result<u32, PvNetError> {
        let producer = read_u32(mem, self.gpa + PRODUCER_OFFSET);
        let avail = producer.wrapping_sub(self.consumer);
        if avail > self.entries {
            return Err(PvNetError::IndexOutOfRange { producer, consumer: self.consumer, entries: self.entries });
        }
        Ok(avail)
    }

    fn desc_gpa(&self) -> u64 {
        self.gpa + HEADER_BYTES + u64::from(self.consumer & (self.entries - 1)) * DESC_BYTES
    }

    fn read_desc(&self, mem: &dyn GuestMemory) -> PvDesc {
        // The ring was checked to lie in RAM at attach and its geometry never changes.
        mem.slice(self.desc_gpa(), DESC_BYTES).ok().and_then(|b| PvDesc::read_from_bytes(b).ok()).unwrap_or_default()
    }

    /// Completes the descriptor at `consumer` and publishes the new consumer index.
    fn complete(&mut self, mem: &mut dyn GuestMemory, mut desc: PvDesc) {
        let at = self.desc_gpa();
        desc.reserved = 0;
        let _ = mem.write(at, desc.as_bytes());
        self.consumer = self.consumer.wrapping_add(1);
        let _ = mem.write(self.gpa + CONSUMER_OFFSET, &self.consumer.to_le_bytes());
    }
}

/// The ring checks that need only the RAM size: `entries` a power of two in
/// `1..=PV_RING_MAX_ENTRIES`, each ring wholly inside `ram_bytes` of guest RAM, the rings
/// disjoint. `NetAttach` and a loaded device state go through this one function.
pub fn check_geometry(ram_bytes: u64, rx: (u64, u32), tx: (u64, u32)) -> Result<(), PvNetError> {
    for (gpa, entries) in [rx, tx] {
        if entries == 0 || !entries.is_power_of_two() || entries > PV_RING_MAX_ENTRIES {
            return Err(PvNetError::BadEntries { entries });
        }
        let len = pv_ring_bytes(entries);
        if gpa.checked_add(len).is_none_or(|end| end > ram_bytes) {
            return Err(PvNetError::RingOutsideRam { gpa, len });
        }
    }
    let (rx_end, tx_end) = (rx.0 + pv_ring_bytes(rx.1), tx.0 + pv_ring_bytes(tx.1));
    if !(rx_end <= tx.0 || tx_end <= rx.0) {
        return Err(PvNetError::RingsOverlap);
    }
    Ok(())
}

fn read_u32(mem: &dyn GuestMemory, gpa: u64) -> u32 {
    mem.slice(gpa, 4).ok().and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).unwrap_or(0)
}

/// What [`PvNet::write_rx_frame`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into the guest's RX ring.
    Delivered,
    /// Dropped (counted): no buffer posted, a bad ring index, a bad buffer, or too long.
    Dropped,
}

/// The paravirtual NIC of one guest.
#[derive(Debug)]
pub struct PvNet {
    mac: [u8; 6],
    rx: Option<Ring>,
    tx: Option<Ring>,
    /// Its counters.
    pub counters: PvNetCounters,
}

impl PvNet {
    /// A NIC with MAC `mac`, not yet attached.
    pub fn new(mac: [u8; 6]) -> Self {
        Self { mac, rx: None, tx: None, counters: PvNetCounters::default() }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the guest has attached its rings.
    pub fn attached(&self) -> bool {
        self.rx.is_some()
    }

    /// The MAC as `NetAttach` returns it: first octet in the lowest byte.
    pub fn mac_word(&self) -> u64 {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&self.mac);
        u64::from_le_bytes(b)
    }

    /// Attaches the rings at `rx_gpa` and `tx_gpa` after checking them.
    pub fn attach(&mut self, mem: &dyn GuestMemory, rx_gpa: u64, tx_gpa: u64) -> Result<(), PvNetError> {
        let result = (|| {
            let rx = Ring::header(mem, rx_gpa)?;
            let tx = Ring::header(mem, tx_gpa)?;
            check_geometry(mem.size(), (rx_gpa, rx.entries), (tx_gpa, tx.entries))?;
            // Start where the guest's indices are, so a re-attach continues.
            Ok((
                Ring { gpa: rx_gpa, entries: rx.entries, consumer: rx.consumer },
                Ring { gpa: tx_gpa, entries: tx.entries, consumer: tx.consumer },
            ))
        })();
        match result {
            Ok((rx, tx)) => {
                (self.rx, self.tx) = (Some(rx), Some(tx));
                Ok(())
            }
            Err(e) => {
                self.counters.bad_attach += 1;
                Err(e)
            }
        }
    }

    /// The doorbell: hands each frame in the TX ring to `out` (the forwarding hook; `false`
    /// means it could not be sent). Returns the frames sent.
    pub fn process_tx(
        &mut self,
        mem: &mut dyn GuestMemory,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<u32, PvNetError> {
        let Some(mut ring) = self.tx else { return Err(PvNetError::NotAttached) };
        let avail = match ring.available(mem) {
            Ok(n) => n,
            Err(e) => {
                self.counters.bad_index += 1;
                return Err(e);
            }
        };
        let mut sent = 0;
        for _ in 0..avail {
            let mut desc = ring.read_desc(mem);
            desc.flags = PV_DESC_ERROR;
            if desc.len > PV_FRAME_MAX {
                self.counters.oversized += 1;
            } else if desc.len < PV_FRAME_MIN {
                self.counters.undersized += 1;
            } else {
                match mem.slice(desc.addr, desc.len.into()) {
                    Err(_) => self.counters.bad_descriptor += 1,
                    Ok(frame) => {
                        desc.flags = PV_DESC_DONE;
                        if out(frame) {
                            self.counters.tx_frames += 1;
                            self.counters.tx_bytes += u64::from(desc.len);
                            sent += 1;
                        } else {
                            self.counters.tx_dropped += 1;
                        }
                    }
                }
            }
            ring.complete(mem, desc);
        }
        self.tx = Some(ring);
        Ok(sent)
    }

    /// Free RX buffers the guest has posted (0 when not attached or the ring is bad).
    pub fn rx_buffers(&self, mem: &dyn GuestMemory) -> u32 {
        self.rx.and_then(|r| r.available(mem).ok()).unwrap_or(0)
    }

    /// Writes one received frame into the next posted RX buffer. The one place received frames
    /// enter guest memory.
    pub fn write_rx_frame(&mut self, mem: &mut dyn GuestMemory, frame: &[u8]) -> RxOutcome {
        let Some(mut ring) = self.rx else {
            self.counters.rx_no_buffer += 1;
            return RxOutcome::Dropped;
        };
        match ring.available(mem) {
            Ok(0) => {
                self.counters.rx_no_buffer += 1;
                return RxOutcome::Dropped;
            }
            Ok(_) => {}
            Err(_) => {
                self.counters.bad_index += 1;
                return RxOutcome::Dropped;
            }
        }
        let mut desc = ring.read_desc(mem);
        let len = frame.len() as u64;
        let outcome = if len > u64::from(PV_FRAME_MAX) || len > u64::from(desc.len) {
            self.counters.oversized += 1;
            desc.flags = PV_DESC_ERROR;
            desc.len = 0;
            RxOutcome::Dropped
        } else if mem.write(desc.addr, frame).is_err() {
            self.counters.bad_descriptor += 1;
            desc.flags = PV_DESC_ERROR;
            desc.len = 0;
            RxOutcome::Dropped
        } else {
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += len;
            desc.flags = PV_DESC_DONE;
            desc.len = len as u32;
            RxOutcome::Delivered
        };
        ring.complete(mem, desc);
        self.rx = Some(ring);
        outcome
    }
}

impl Persist for PvNet {
    type State = PvNetState;

    fn save_state(&self) -> PvNetState {
        let ring = |r: Ring| RingState { gpa: r.gpa, entries: r.entries, consumer: r.consumer };
        PvNetState { mac: self.mac, rings: self.rx.zip(self.tx).map(|(rx, tx)| (ring(rx), ring(tx))) }
    }

    fn check_state(&self, state: &PvNetState, ram_bytes: u64) -> Result<(), DeviceStateError> {
        if state.mac != self.mac {
            return Err(DeviceStateError::MacMismatch { found: state.mac, expected: self.mac });
        }
        if let Some((rx, tx)) = state.rings {
            check_geometry(ram_bytes, (rx.gpa, rx.entries), (tx.gpa, tx.entries))
                .map_err(DeviceStateError::RingGeometry)?;
        }
        Ok(())
    }

    fn load_state(&mut self, state: &PvNetState) {
        let ring = |r: RingState| Ring { gpa: r.gpa, entries: r.entries, consumer: r.consumer };
        (self.rx, self.tx) = match state.rings {
            Some((rx, tx)) => (Some(ring(rx)), Some(ring(tx))),
            None => (None, None),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestRam;
    use std::vec::Vec;

    const RX: u64 = 0x1000;
    const TX: u64 = 0x2000;
    const BUF: u64 = 0x8000;

    fn ring(ram: &mut [u8], gpa: u64, entries: u32) {
        let h = PvRingHeader { magic: PV_RING_MAGIC, entries, ..Default::default() };
        ram[gpa as usize..gpa as usize + 24].copy_from_slice(h.as_bytes());
    }

    fn set_desc(ram: &mut [u8], ring: u64, slot: u64, addr: u64, len: u32) {
        let d = PvDesc { addr, len, ..Default::default() };
        let at = (ring + 24 + slot * 16) as usize;
        ram[at..at + 16].copy_from_slice(d.as_bytes());
    }

    fn desc(ram: &[u8], ring: u64, slot: u64) -> PvDesc {
        let at = (ring + 24 + slot * 16) as usize;
        PvDesc::read_from_bytes(&ram[at..at + 16]).unwrap()
    }

    fn set_producer(ram: &mut [u8], ring: u64, p: u32) {
        ram[(ring + 12) as usize..(ring + 16) as usize].copy_from_slice(&p.to_le_bytes());
    }

    fn consumer(ram: &[u8], ring: u64) -> u32 {
        u32::from_le_bytes(ram[(ring + 16) as usize..(ring + 20) as usize].try_into().unwrap())
    }

    fn setup() -> (Vec<u8>, PvNet) {
        let mut ram = std::vec![0u8; 1 << 16];
        ring(&mut ram, RX, 4);
        ring(&mut ram, TX, 4);
        let mut net = PvNet::new([2, 0, 0, 0, 0, 1]);
        net.attach(&GuestRam::new(&mut ram), RX, TX).unwrap();
        (ram, net)
    }

    #[test]
    fn attach_checks_rings() {
        let mut ram = std::vec![0u8; 1 << 16];
        let mut net = PvNet::new([2, 0, 0, 0, 0, 1]);
        let e = net.attach(&GuestRam::new(&mut ram), RX, TX).unwrap_err();
        assert!(matches!(e, PvNetError::BadMagic { found: 0 }));
        ring(&mut ram, RX, 3);
        ring(&mut ram, TX, 4);
        assert_eq!(net.attach(&GuestRam::new(&mut ram), RX, TX), Err(PvNetError::BadEntries { entries: 3 }));
        ring(&mut ram, RX, 4096);
        assert_eq!(net.attach(&GuestRam::new(&mut ram), RX, TX), Err(PvNetError::BadEntries { entries: 4096 }));
        ring(&mut ram, RX, 1024);
        assert_eq!(net.attach(&GuestRam::new(&mut ram), RX, TX), Err(PvNetError::RingsOverlap));
        assert!(matches!(
            net.attach(&GuestRam::new(&mut ram), u64::MAX - 4, TX),
            Err(PvNetError::RingOutsideRam { .. })
        ));
        ring(&mut ram, 0xFF00, 64);
        assert!(matches!(net.attach(&GuestRam::new(&mut ram), 0xFF00, TX), Err(PvNetError::RingOutsideRam { .. })));
        assert_eq!(net.counters.bad_attach, 6);
        assert!(!net.attached());
        assert!(PvNetError::BadEntries { entries: 3 }.to_string().contains("expected a power of two"));
    }

    #[test]
    fn tx_sends_valid_frames_and_rejects_hostile_descriptors() {
        let (mut ram, mut net) = setup();
        ram[BUF as usize..BUF as usize + 60].fill(0xAB);
        set_desc(&mut ram, TX, 0, BUF, 60);
        set_desc(&mut ram, TX, 1, 1 << 20, 60); // outside RAM
        set_desc(&mut ram, TX, 2, BUF, 9000); // oversized
        set_desc(&mut ram, TX, 3, u64::MAX - 10, 20); // wraps
        set_producer(&mut ram, TX, 4);
        let mut sent = Vec::new();
        let n = net
            .process_tx(&mut GuestRam::new(&mut ram), &mut |f| {
                sent.push(f.to_vec());
                true
            })
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(sent, [std::vec![0xAB; 60]]);
        assert_eq!(consumer(&ram, TX), 4);
        assert_eq!(desc(&ram, TX, 0).flags, PV_DESC_DONE);
        assert_eq!(desc(&ram, TX, 1).flags, PV_DESC_ERROR);
        assert_eq!((net.counters.bad_descriptor, net.counters.oversized), (2, 1));
        // Undersized, then an index far ahead of the consumer.
        set_desc(&mut ram, TX, 0, BUF, 3);
        set_producer(&mut ram, TX, 5);
        net.process_tx(&mut GuestRam::new(&mut ram), &mut |_| true).unwrap();
        assert_eq!(net.counters.undersized, 1);
        set_producer(&mut ram, TX, 5000);
        let e = net.process_tx(&mut GuestRam::new(&mut ram), &mut |_| true).unwrap_err();
        assert!(matches!(e, PvNetError::IndexOutOfRange { producer: 5000, consumer: 5, entries: 4 }));
        assert!(e.to_string().contains("expected at most 4"));
        assert_eq!(net.counters.bad_index, 1);
        // The guest changing `entries` after attach does not change the geometry.
        ram[(TX + 8) as usize..(TX + 12) as usize].copy_from_slice(&u32::MAX.to_le_bytes());
        set_producer(&mut ram, TX, 6);
        set_desc(&mut ram, TX, 1, BUF, 60);
        assert_eq!(net.process_tx(&mut GuestRam::new(&mut ram), &mut |_| false).unwrap(), 0);
        assert_eq!(net.counters.tx_dropped, 1);
        assert_eq!(net.counters.tx_frames, 1);
    }

    #[test]
    fn rx_fills_posted_buffers_and_counts_refusals() {
        let (mut ram, mut net) = setup();
        let frame = [7u8; 100];
        assert_eq!(net.write_rx_frame(&mut GuestRam::new(&mut ram), &frame), RxOutcome::Dropped);
        assert_eq!(net.counters.rx_no_buffer, 1);
        set_desc(&mut ram, RX, 0, BUF, 2048);
        set_desc(&mut ram, RX, 1, BUF, 50); // too small
        set_desc(&mut ram, RX, 2, (1 << 16) - 10, 2048); // runs off the end of RAM
        set_producer(&mut ram, RX, 3);
        assert_eq!(net.rx_buffers(&GuestRam::new(&mut ram)), 3);
        let mut mem = GuestRam::new(&mut ram);
        assert_eq!(net.write_rx_frame(&mut mem, &frame), RxOutcome::Delivered);
        assert_eq!(net.write_rx_frame(&mut mem, &frame), RxOutcome::Dropped);
        assert_eq!(net.write_rx_frame(&mut mem, &frame), RxOutcome::Dropped);
        assert_eq!(net.write_rx_frame(&mut mem, &[0; 2000]), RxOutcome::Dropped);
        assert_eq!(&ram[BUF as usize..BUF as usize + 100], &frame);
        let d = desc(&ram, RX, 0);
        assert_eq!((d.len, d.flags), (100, PV_DESC_DONE));
        assert_eq!(desc(&ram, RX, 1).flags, PV_DESC_ERROR);
        assert_eq!(consumer(&ram, RX), 3);
        let c = net.counters;
        assert_eq!((c.rx_frames, c.oversized, c.bad_descriptor, c.rx_no_buffer), (1, 1, 1, 2));
        set_producer(&mut ram, RX, 3 + 100);
        assert_eq!(net.write_rx_frame(&mut GuestRam::new(&mut ram), &frame), RxOutcome::Dropped);
        assert_eq!(net.counters.bad_index, 1);
        assert_eq!(net.counters.rejected(), 3);
    }

    #[test]
    fn arbitrary_ring_contents_never_panic() {
        // A cheap fuzz: pseudo-random ring contents and indices.
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let (mut ram, mut net) = setup();
            for i in 0..(4 * 16 + 24) {
                ram[(TX + i) as usize] = next() as u8;
                ram[(RX + 24 + (i % 64)) as usize] = next() as u8;
            }
            ram[(RX + 12) as usize] = next() as u8;
            let _ = net.process_tx(&mut GuestRam::new(&mut ram), &mut |f| f.len() <= PV_FRAME_MAX as usize);
            for len in [0usize, 14, 1514, 1515] {
                let _ = net.write_rx_frame(&mut GuestRam::new(&mut ram), &std::vec![1; len]);
            }
        }
    }
    #[test]
    fn state_saves_and_loads_the_attached_rings() {
        let (mut ram, mut net) = setup();
        set_desc(&mut ram, RX, 0, BUF, 2048);
        set_producer(&mut ram, RX, 1);
        assert_eq!(net.write_rx_frame(&mut GuestRam::new(&mut ram), &[7; 60]), RxOutcome::Delivered);
        let state = net.save_state();
        let (rx, tx) = state.rings.unwrap();
        assert_eq!((rx.gpa, rx.entries, rx.consumer, tx.gpa, tx.consumer), (RX, 4, 1, TX, 0));
        // A fresh NIC with the same MAC comes back attached where the first one was.
        let mut fresh = PvNet::new([2, 0, 0, 0, 0, 1]);
        assert!(!fresh.attached());
        fresh.check_state(&state, 1 << 16).unwrap();
        fresh.load_state(&state);
        assert!(fresh.attached());
        assert_eq!(fresh.save_state(), state);
        set_desc(&mut ram, RX, 1, BUF, 2048);
        set_producer(&mut ram, RX, 2);
        assert_eq!(fresh.write_rx_frame(&mut GuestRam::new(&mut ram), &[8; 60]), RxOutcome::Delivered);
        assert_eq!(consumer(&ram, RX), 2);
        // The attach checks, against this guest's RAM; nothing changes on a refusal.
        let mut other = PvNet::new([2, 0, 0, 0, 0, 1]);
        let mut bad = state;
        bad.rings = Some((RingState { entries: 3, ..rx }, tx));
        assert_eq!(
            other.check_state(&bad, 1 << 16),
            Err(DeviceStateError::RingGeometry(PvNetError::BadEntries { entries: 3 }))
        );
        assert!(matches!(
            other.check_state(&state, 0x2000),
            Err(DeviceStateError::RingGeometry(PvNetError::RingOutsideRam { gpa: TX, .. }))
        ));
        bad.rings = Some((rx, RingState { gpa: RX + 8, ..tx }));
        assert_eq!(other.check_state(&bad, 1 << 16), Err(DeviceStateError::RingGeometry(PvNetError::RingsOverlap)));
        let stranger = PvNet::new([2, 0, 0, 0, 0, 9]);
        assert!(matches!(stranger.check_state(&state, 1 << 16), Err(DeviceStateError::MacMismatch { .. })));
        assert!(!other.attached());
        other.load_state(&PvNetState { mac: [2, 0, 0, 0, 0, 1], rings: None });
        assert!(!other.attached());
    }
}
