//! The COLO hypervisor library.
//!
//! Two halves live here:
//! - pure logic that compiles and is unit-tested on the host (`config`, `memory::frames`, `colo`,
//!   `vcpu`),
//!   each module `#![deny(unsafe_code)]`;
//! - the hardware layer (`host`, `kernel`), built only with the `bare-metal` feature, which the
//!   `boot` crate enables when it links the kernel.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod boot_info;
pub mod colo;
pub mod config;
pub mod devices;
pub mod guest;
pub mod memory;
pub mod net;
pub mod seal;
pub mod stats;
pub mod svm;
pub mod vcpu;
pub mod vmx;
pub mod witness;

#[cfg(feature = "bare-metal")]
pub mod backend;
#[cfg(feature = "bare-metal")]
pub mod host;
#[cfg(feature = "bare-metal")]
pub mod kernel;
#[cfg(feature = "bare-metal")]
pub mod node;
#[cfg(feature = "bare-metal")]
pub mod runner;
#[cfg(feature = "bare-metal")]
pub mod selftest;
#[cfg(feature = "bare-metal")]
pub mod snapshot;
