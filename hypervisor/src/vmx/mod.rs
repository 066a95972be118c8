//! Intel VT-x with EPT: the design card's vCPU backend.
//!
//! - [`fields`]: typed VMCS field encodings (pure);
//! - [`controls`]: control values against the capability MSRs, CR0/CR4 fixed bits, the EPT
//!   pointer (pure, host-tested);
//! - `instructions`: VMXON, VMCLEAR, VMPTRLD, VMREAD, VMWRITE, INVEPT, INVVPID (bare metal);
//! - `vcpu`: bring-up ([`VmxBackend`]), the VMCS, the world switch and exit decoding ([`VmxVcpu`]).

pub mod controls;
pub mod fields;
#[cfg(feature = "bare-metal")]
pub mod instructions;
#[cfg(feature = "bare-metal")]
mod vcpu;

#[cfg(feature = "bare-metal")]
pub use vcpu::{dump_vmcs, VmxBackend, VmxCapabilities, VmxError, VmxVcpu};

#[cfg(feature = "bare-metal")]
static VMX_ON: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Records that VMXON succeeded (VMREAD is #UD outside VMX operation).
#[cfg(feature = "bare-metal")]
pub(crate) fn set_vmx_on() {
    VMX_ON.store(true, core::sync::atomic::Ordering::Relaxed);
}

/// For the panic handler: dumps the current VMCS if VMX is on and one is loaded.
#[cfg(feature = "bare-metal")]
pub fn panic_dump(out: &mut dyn core::fmt::Write) {
    if VMX_ON.load(core::sync::atomic::Ordering::Relaxed) {
        let _ = writeln!(out, "current VMCS:");
        let _ = dump_vmcs(out);
    }
}
