//! Which vendor's vCPU implementation this CPU gets, chosen from CPUID at boot.

use alloc::boxed::Box;
use alloc::string::String;
use core::fmt;

use guest_shim::abi::HypercallInsn;

use crate::memory::{FrameAllocator, PhysRange};
use crate::svm::{SvmBackend, SvmError};
use crate::vcpu::{GuestEntryState, Vcpu};
use crate::vmx::{VmxBackend, VmxError};

/// The hardware-virtualization backend in use.
#[derive(Debug)]
pub enum Backend {
    /// Intel VT-x with EPT.
    Vmx(VmxBackend),
    /// AMD-V with NPT.
    Svm(SvmBackend),
}

/// Why no backend could start, or a vCPU could not be made.
#[derive(Clone, Debug)]
pub enum BackendError {
    /// The CPU reports no hardware virtualization this hypervisor supports.
    NoVirtualization {
        /// The CPU vendor string.
        vendor: String,
    },
    /// VT-x failed.
    Vmx(VmxError),
    /// AMD-V failed.
    Svm(SvmError),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoVirtualization { vendor } => write!(
                f,
                "no usable hardware virtualization on this `{vendor}` CPU: expected VT-x (CPUID.1:ECX[5]) \
                 or AMD-V (CPUID.8000_0001:ECX[2])"
            ),
            Self::Vmx(e) => write!(f, "{e}"),
            Self::Svm(e) => write!(f, "AMD-V: {e}"),
        }
    }
}

impl From<VmxError> for BackendError {
    fn from(e: VmxError) -> Self {
        Self::Vmx(e)
    }
}

impl From<SvmError> for BackendError {
    fn from(e: SvmError) -> Self {
        Self::Svm(e)
    }
}

impl Backend {
    /// Picks and starts the backend for this CPU.
    pub fn detect(frames: &mut FrameAllocator) -> Result<Self, BackendError> {
        let cpu = crate::host::cpu::cpuid(1, 0);
        if cpu.ecx & (1 << 5) != 0 {
            return Ok(Self::Vmx(VmxBackend::init(frames)?));
        }
        let ext = crate::host::cpu::cpuid(0x8000_0000, 0).eax;
        if ext >= 0x8000_0001 && crate::host::cpu::cpuid(0x8000_0001, 0).ecx & (1 << 2) != 0 {
            return Ok(Self::Svm(SvmBackend::enable(frames)?));
        }
        let vendor = crate::host::cpu::vendor();
        Err(BackendError::NoVirtualization { vendor: String::from_utf8_lossy(&vendor).into_owned() })
    }

    /// "VT-x" or "AMD-V".
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vmx(_) => "VT-x",
            Self::Svm(b) => b.name(),
        }
    }

    /// The dirty-tracking method this backend uses.
    pub fn dirty_tracking(&self) -> &'static str {
        match self {
            Self::Vmx(b) => b.capabilities().dirty_tracking(),
            Self::Svm(b) => b.dirty_tracking(),
        }
    }

    /// A line for the boot log.
    pub fn describe(&self) -> String {
        match self {
            Self::Vmx(b) => alloc::format!("{}", b.describe()),
            Self::Svm(b) => b.describe(),
        }
    }

    /// The instruction guests use for hypercalls.
    pub fn hypercall_insn(&self) -> HypercallInsn {
        match self {
            Self::Vmx(_) => HypercallInsn::Vmcall,
            Self::Svm(_) => HypercallInsn::Vmmcall,
        }
    }

    /// A vCPU for a guest whose RAM is the host-physical `ram`, starting in `entry`.
    pub fn create_vcpu(
        &mut self,
        frames: &mut FrameAllocator,
        ram: PhysRange,
        entry: &GuestEntryState,
    ) -> Result<Box<dyn Vcpu>, BackendError> {
        match self {
            Self::Vmx(b) => Ok(Box::new(b.create_vcpu(frames, ram, entry)?)),
            Self::Svm(b) => Ok(Box::new(b.create_vcpu(frames, ram, entry)?)),
        }
    }
}
