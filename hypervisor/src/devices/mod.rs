//! Guest devices: the paravirtual NIC ([`pvnet`]) and block device ([`pvblock`]) models, the
//! queue that carries frames from the host NIC to a guest ([`FrameQueue`]), and the dispatch of
//! the device hypercalls ([`GuestDevices`], reached from the exit handler through
//! [`DeviceCalls`]). All of it is pure and host-tested; the runner supplies the hooks.
//!
//! The hook points where COLO sits: [`DeviceHooks::net_output`] (every frame a guest sends) and
//! [`DeviceHooks::block`] (every disk read and write goes through its [`pvblock::BlockHook`]);
//! frames for a guest enter its memory only through [`pvnet::PvNet::write_rx_frame`]. Each
//! device saves and loads its own versioned state ([`state`]).
#![deny(unsafe_code)]

#[cfg(feature = "bare-metal")]
#[allow(unsafe_code)]
pub mod host;
pub mod pvblock;
pub mod pvnet;
pub mod state;

use alloc::vec::Vec;
use core::fmt;

use guest_shim::abi::{Hypercall, HypercallError, PV_FRAME_MAX};

use crate::guest::GuestMemory;
use pvblock::{BlockHook, PvBlock};
use pvnet::{PvNet, RxOutcome};
use state::{check_optional, DeviceStateError, Persist, PvBlockState, PvNetState};

/// The device hypercalls, as the exit handler sees them.
pub trait DeviceCalls {
    /// Handles device hypercall `call` with arguments RDI, RSI, RDX; the result goes to RAX.
    fn call(&mut self, call: Hypercall, args: [u64; 3], mem: &mut dyn GuestMemory) -> Result<u64, HypercallError>;
}

/// A guest without devices.
#[derive(Debug, Default)]
pub struct NoDevices;

impl DeviceCalls for NoDevices {
    fn call(&mut self, _: Hypercall, _: [u64; 3], _: &mut dyn GuestMemory) -> Result<u64, HypercallError> {
        Err(HypercallError::NoDevice)
    }
}

/// Where device output goes: the hook points for COLO.
pub trait DeviceHooks {
    /// A frame the guest sent; `false` when it could not be sent.
    fn net_output(&mut self, frame: &[u8]) -> bool;
    /// Frames waiting for the guest: called after each doorbell to fill posted RX buffers with
    /// `deliver` (which returns false once the guest has no buffer left).
    fn net_input(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool);
    /// Where disk writes go.
    fn block(&mut self) -> &mut dyn BlockHook;
}

/// The devices of one guest.
#[derive(Debug, Default)]
pub struct GuestDevices<'d> {
    /// The paravirtual NIC, if the guest has one.
    pub net: Option<PvNet>,
    /// The block device, if the guest has one.
    pub block: Option<PvBlock<'d>>,
}

impl GuestDevices<'_> {
    /// Handles a device hypercall with `hooks`.
    pub fn call(
        &mut self,
        call: Hypercall,
        args: [u64; 3],
        mem: &mut dyn GuestMemory,
        hooks: &mut dyn DeviceHooks,
    ) -> Result<u64, HypercallError> {
        match call {
            Hypercall::NetAttach => {
                let net = self.net.as_mut().ok_or(HypercallError::NoDevice)?;
                match net.attach(mem, args[0], args[1]) {
                    Ok(()) => Ok(net.mac_word()),
                    Err(pvnet::PvNetError::RingOutsideRam { .. }) => Err(HypercallError::BadAddress),
                    Err(_) => Err(HypercallError::InvalidArgument),
                }
            }
            Hypercall::NetNotify => {
                let net = self.net.as_mut().filter(|n| n.attached()).ok_or(HypercallError::NoDevice)?;
                let sent = net.process_tx(mem, &mut |frame| hooks.net_output(frame));
                self.deliver_rx(mem, hooks);
                sent.map(u64::from).map_err(|_| HypercallError::DeviceError)
            }
            Hypercall::BlockInfo => self.block.as_ref().map(PvBlock::size).ok_or(HypercallError::NoDevice),
            Hypercall::BlockRequest => {
                let block = self.block.as_mut().ok_or(HypercallError::NoDevice)?;
                block.request(mem, args[0], hooks.block()).map_err(|e| match e {
                    pvblock::PvBlockError::RequestOutsideRam { .. } => HypercallError::BadAddress,
                    _ => HypercallError::DeviceError,
                })
            }
            _ => Err(HypercallError::UnknownHypercall),
        }
    }

    /// The NIC's and the block device's states (the guest is paused).
    pub fn save_state(&self) -> (Option<PvNetState>, Option<PvBlockState>) {
        (self.net.as_ref().map(Persist::save_state), self.block.as_ref().map(Persist::save_state))
    }

    /// Checks saved NIC and block states against these devices in a guest of `ram_bytes`:
    /// each must be present exactly when the device is. Changes nothing.
    pub fn check_state(
        &self,
        net: Option<&PvNetState>,
        block: Option<&PvBlockState>,
        ram_bytes: u64,
    ) -> Result<(), DeviceStateError> {
        check_optional(self.net.as_ref(), net, ram_bytes)?;
        check_optional(self.block.as_ref(), block, ram_bytes)
    }

    /// Loads states [`GuestDevices::check_state`] accepted.
    pub fn load_state(&mut self, net: Option<&PvNetState>, block: Option<&PvBlockState>) {
        if let (Some(dev), Some(s)) = (self.net.as_mut(), net) {
            dev.load_state(s);
        }
        if let (Some(dev), Some(s)) = (self.block.as_mut(), block) {
            dev.load_state(s);
        }
    }

    /// Moves waiting frames into posted RX buffers; true when at least one was delivered.
    pub fn deliver_rx(&mut self, mem: &mut dyn GuestMemory, hooks: &mut dyn DeviceHooks) -> bool {
        let Some(net) = self.net.as_mut().filter(|n| n.attached()) else { return false };
        let mut delivered = false;
        hooks.net_input(&mut |frame| {
            if net.rx_buffers(mem) == 0 {
                return false;
            }
            delivered |= net.write_rx_frame(mem, frame) == RxOutcome::Delivered;
            true
        });
        delivered
    }
}

impl fmt::Display for GuestDevices<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.net {
            Some(n) => write!(f, "pvnet: {}", n.counters)?,
            None => write!(f, "pvnet: none")?,
        }
        match &self.block {
            Some(b) => write!(f, "; pvblock: {}", b.counters),
            None => write!(f, "; pvblock: none"),
        }
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (a guest's `mac=`): unicast only.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// A bounded queue of frames with its storage allocated once: the path from the host NIC to a
/// guest allocates nothing per frame. A full queue drops (and counts) the newest frame.
#[derive(Debug)]
pub struct FrameQueue {
    slots: Vec<[u8; PV_FRAME_MAX as usize]>,
    lens: Vec<u16>,
    head: usize,
    len: usize,
    /// Frames dropped because the queue was full or the frame too long.
    pub dropped: u64,
}

impl FrameQueue {
    /// A queue of `capacity` frames.
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: alloc::vec![[0; PV_FRAME_MAX as usize]; capacity.max(1)],
            lens: alloc::vec![0; capacity.max(1)],
            head: 0,
            len: 0,
            dropped: 0,
        }
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `frame` in; false (counted) when full or too long.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.len == self.slots.len() || frame.len() > PV_FRAME_MAX as usize {
            self.dropped += 1;
            return false;
        }
        let slot = (self.head + self.len) % self.slots.len();
        self.slots[slot][..frame.len()].copy_from_slice(frame);
        self.lens[slot] = frame.len() as u16;
        self.len += 1;
        true
    }

    /// Offers waiting frames to `take` in order until it returns false (that frame stays).
    pub fn drain(&mut self, take: &mut dyn FnMut(&[u8]) -> bool) {
        while self.len > 0 {
            let slot = self.head;
            if !take(&self.slots[slot][..usize::from(self.lens[slot])]) {
                return;
            }
            self.head = (self.head + 1) % self.slots.len();
            self.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestRam;
    use guest_shim::abi::{PvDesc, PvRingHeader, PV_RING_MAGIC};
    use std::vec::Vec;
    use zerocopy::IntoBytes;

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("52:54:00:c0:10:03"), Some([0x52, 0x54, 0, 0xC0, 0x10, 3]));
        for bad in
            ["", "52:54:00:c0:10", "52:54:00:c0:10:03:04", "01:00:5e:00:00:01", "5:54:00:c0:10:03", "zz:54:00:c0:10:03"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn frame_queue_is_bounded_and_ordered() {
        let mut q = FrameQueue::new(2);
        assert!(q.push(&[1; 20]) && q.push(&[2; 30]));
        assert!(!q.push(&[3; 40]));
        assert!(!q.push(&[0; 2000]));
        assert_eq!(q.dropped, 2);
        let mut seen = Vec::new();
        q.drain(&mut |f| {
            seen.push(f.len());
            false
        });
        assert_eq!((seen.as_slice(), q.len()), (&[20][..], 2));
        q.drain(&mut |f| {
            seen.push(f.len());
            true
        });
        assert_eq!(seen, [20, 20, 30]);
        assert!(q.is_empty());
    }

    struct Hooks {
        out: Vec<Vec<u8>>,
        queue: FrameQueue,
        block: pvblock::NoBlockHook,
    }

    impl DeviceHooks for Hooks {
        fn net_output(&mut self, frame: &[u8]) -> bool {
            self.out.push(frame.to_vec());
            true
        }
        fn net_input(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) {
            self.queue.drain(deliver);
        }
        fn block(&mut self) -> &mut dyn BlockHook {
            &mut self.block
        }
    }

    #[test]
    fn hypercalls_dispatch_to_the_devices() {
        let mut ram = std::vec![0u8; 1 << 16];
        let mut hooks = Hooks { out: Vec::new(), queue: FrameQueue::new(4), block: pvblock::NoBlockHook };
        let mut none = GuestDevices::default();
        let mut mem = GuestRam::new(&mut ram);
        assert_eq!(none.call(Hypercall::NetAttach, [0; 3], &mut mem, &mut hooks), Err(HypercallError::NoDevice));
        assert_eq!(none.call(Hypercall::BlockInfo, [0; 3], &mut mem, &mut hooks), Err(HypercallError::NoDevice));
        let mac = [0x52, 0x54, 0, 0xC0, 0, 3];
        let mut disk = std::vec![0u8; 4096];
        let mut devs = GuestDevices { net: Some(PvNet::new(mac)), block: Some(PvBlock::new(&mut disk)) };
        assert_eq!(devs.call(Hypercall::BlockInfo, [0; 3], &mut mem, &mut hooks), Ok(4096));
        assert_eq!(devs.call(Hypercall::NetNotify, [0; 3], &mut mem, &mut hooks), Err(HypercallError::NoDevice));
        assert_eq!(
            devs.call(Hypercall::NetAttach, [0x1000, 0x2000, 0], &mut mem, &mut hooks),
            Err(HypercallError::InvalidArgument)
        );
        let header = PvRingHeader { magic: PV_RING_MAGIC, entries: 2, ..Default::default() };
        mem.write(0x1000, header.as_bytes()).unwrap();
        mem.write(0x2000, header.as_bytes()).unwrap();
        let word = devs.call(Hypercall::NetAttach, [0x1000, 0x2000, 0], &mut mem, &mut hooks).unwrap();
        assert_eq!(word.to_le_bytes()[..6], mac);
        // One TX frame, one RX buffer, two frames waiting: one delivered, one stays queued.
        mem.write(0x2000 + 24, PvDesc { addr: 0x3000, len: 64, ..Default::default() }.as_bytes()).unwrap();
        mem.write(0x2000 + 12, &1u32.to_le_bytes()).unwrap();
        mem.write(0x1000 + 24, PvDesc { addr: 0x4000, len: 2048, ..Default::default() }.as_bytes()).unwrap();
        mem.write(0x1000 + 12, &1u32.to_le_bytes()).unwrap();
        hooks.queue.push(&[9; 60]);
        hooks.queue.push(&[8; 60]);
        assert_eq!(devs.call(Hypercall::NetNotify, [0; 3], &mut mem, &mut hooks), Ok(1));
        assert_eq!(hooks.out.len(), 1);
        assert_eq!(hooks.queue.len(), 1);
        assert_eq!(mem.slice(0x4000, 60).unwrap(), &[9; 60]);
        let text = std::format!("{devs}");
        assert!(text.contains("tx_frames=1") && text.contains("rx_frames=1"), "{text}");
        assert_eq!(
            devs.call(Hypercall::BlockRequest, [u64::MAX, 0, 0], &mut mem, &mut hooks),
            Err(HypercallError::BadAddress)
        );
    }
}
