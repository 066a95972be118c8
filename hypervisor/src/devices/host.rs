//! The bare-metal glue between the pure device models and the host: the forwarding hook the
//! host network stack calls for frames to a guest's MAC ([`GuestPort`]), the hooks the device
//! models call for guest output ([`HostHooks`]), and the disk modules (`disk-NAME`).
//!
//! [`HostHooks::net_output`] is the single place guest frames leave for the client network and
//! [`GuestPort::deliver`] the single place client frames for a guest enter; the COLO comparator
//! and mirroring will sit there.

use alloc::boxed::Box;
use alloc::sync::Arc;

use super::pvblock::{BlockHook, NoBlockHook};
use super::{DeviceCalls, DeviceHooks, FrameQueue, GuestDevices};
use crate::boot_info::BootModule;
use crate::config::NicRoles;
use crate::guest::GuestMemory;
use guest_shim::abi::{Hypercall, HypercallError};

/// Frames waiting for a guest, between the host NIC and the guest's RX ring.
const RX_QUEUE_FRAMES: usize = 512;

/// Module names starting with this are disks; a guest's `disk=NAME` names `disk-NAME`.
pub const DISK_PREFIX: &str = "disk-";

/// The host network stack's hook for one guest MAC: copies frames into the guest's queue.
struct GuestPort {
    mac: [u8; 6],
    queue: Arc<spin::Mutex<FrameQueue>>,
}

impl crate::net::GuestForward for GuestPort {
    fn owns(&self, mac: [u8; 6]) -> bool {
        mac == self.mac
    }

    fn deliver(&mut self, _nic: usize, roles: NicRoles, frame: &[u8]) {
        if roles.client {
            self.queue.lock().push(frame);
        }
    }
}

/// The hooks of one guest: output to the client NIC, input from its queue, and the block hook
/// every disk read and write goes through.
pub struct HostHooks {
    queue: Arc<spin::Mutex<FrameQueue>>,
    block: Box<dyn BlockHook>,
    /// COLO (`node`): guest output goes here instead of the client NIC.
    output: Option<Arc<spin::Mutex<FrameQueue>>>,
}

impl core::fmt::Debug for HostHooks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostHooks").field("queue_dropped", &self.queue_dropped()).finish_non_exhaustive()
    }
}

impl HostHooks {
    /// Installs the forwarding hook for `mac` (replacing any earlier guest's).
    pub fn install(mac: [u8; 6]) -> Self {
        let queue = Arc::new(spin::Mutex::new(FrameQueue::new(RX_QUEUE_FRAMES)));
        crate::net::set_guest_hook(Box::new(GuestPort { mac, queue: queue.clone() }));
        Self { queue, block: Box::new(NoBlockHook), output: None }
    }

    /// Hooks for a guest without a NIC.
    pub fn without_net() -> Self {
        Self { queue: Arc::new(spin::Mutex::new(FrameQueue::new(1))), block: Box::new(NoBlockHook), output: None }
    }

    /// COLO (`node`): the guest's output frames go into `queue` (for the engine) instead of
    /// out of the client NIC.
    pub fn redirect_output(&mut self, queue: Arc<spin::Mutex<FrameQueue>>) {
        self.output = Some(queue);
    }

    /// COLO (`node`): a frame for the guest (mirrored or client input the engine passed on);
    /// false (counted in `queue_dropped`) when the queue is full.
    pub fn push_input(&self, frame: &[u8]) -> bool {
        self.queue.lock().push(frame)
    }

    /// Puts `hook` beneath the block device.
    pub fn set_block_hook(&mut self, hook: Box<dyn BlockHook>) {
        self.block = hook;
    }

    /// Frames dropped because the queue was full.
    pub fn queue_dropped(&self) -> u64 {
        self.queue.lock().dropped
    }

    /// Whether frames wait for the guest.
    pub fn pending(&self) -> bool {
        !self.queue.lock().is_empty()
    }
}

impl DeviceHooks for HostHooks {
    fn net_output(&mut self, frame: &[u8]) -> bool {
        match &self.output {
            Some(queue) => queue.lock().push(frame),
            None => crate::net::send_from_guest(frame).is_ok(),
        }
    }

    fn net_input(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) {
        self.queue.lock().drain(deliver);
    }

    fn block(&mut self) -> &mut dyn BlockHook {
        self.block.as_mut()
    }
}

/// A guest's devices with their hooks, as the exit handler calls them.
#[derive(Debug)]
pub struct HostDevices<'a, 'd> {
    /// The devices.
    pub devices: &'a mut GuestDevices<'d>,
    /// Their hooks.
    pub hooks: &'a mut HostHooks,
}

impl DeviceCalls for HostDevices<'_, '_> {
    fn call(&mut self, call: Hypercall, args: [u64; 3], mem: &mut dyn GuestMemory) -> Result<u64, HypercallError> {
        self.devices.call(call, args, mem, self.hooks)
    }
}

/// The disk module `disk-NAME` for a guest whose module line says `disk=NAME`.
pub fn find_disk<'m>(modules: &'m [BootModule<'m>], name: &str) -> Option<&'m BootModule<'m>> {
    modules.iter().find(|m| m.name().strip_prefix(DISK_PREFIX) == Some(name))
}

/// The bytes of a disk module.
///
/// # Safety
/// The caller must not create a second slice over the same module while this one is in use:
/// one guest runs at a time and its disk slice is dropped with the guest.
pub unsafe fn disk_bytes(module: &BootModule<'_>) -> &'static mut [u8] {
    // SAFETY: the boot loader placed the module at this range, reserved from the frame allocator
    // and identity-mapped writable; the caller guarantees exclusive use.
    unsafe { core::slice::from_raw_parts_mut(module.range.start as *mut u8, module.range.len() as usize) }
}
