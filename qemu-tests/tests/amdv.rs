//! Suite `amdv`: the AMD-V backend (SVM with nested paging) under QEMU TCG (`-cpu max`: SVM and
//! NPT, no NRIPS, so the hypervisor decodes instruction lengths itself) and under Bochs' Ryzen
//! model (SVM, NPT and NRIPS). The scenarios are the ones the `vtx` suite runs
//! (`qemu_tests::guests`); only the platform differs.

use std::time::Duration;

use qemu_tests::guests::{
    cpuid_msr_and_io_exits_behave, isolation_guests_are_contained, reference_guest_runs, Platform,
};
use qemu_tests::Emulator;

/// AMD-V under QEMU TCG.
const QEMU_AMDV: Platform =
    Platform { emulator: Emulator::Qemu, cpu: "max", backend: "AMD-V", timeout: Duration::from_secs(120) };

/// AMD-V under Bochs' Ryzen model.
const BOCHS_AMDV: Platform =
    Platform { emulator: Emulator::Bochs, cpu: "ryzen", backend: "AMD-V", timeout: Duration::from_secs(300) };

#[test]
fn reference_guest_runs_under_amdv_qemu() {
    reference_guest_runs(&QEMU_AMDV);
}

#[test]
fn isolation_guests_are_contained_under_amdv_qemu() {
    isolation_guests_are_contained(&QEMU_AMDV);
}

#[test]
fn cpuid_msr_and_io_exits_behave_under_amdv_qemu() {
    cpuid_msr_and_io_exits_behave(&QEMU_AMDV);
}

#[test]
fn cpuid_msr_and_io_exits_behave_under_amdv_bochs() {
    cpuid_msr_and_io_exits_behave(&BOCHS_AMDV);
}

#[test]
fn reference_guest_runs_under_amdv_bochs() {
    reference_guest_runs(&BOCHS_AMDV);
}

#[test]
fn isolation_guests_are_contained_under_amdv_bochs() {
    isolation_guests_are_contained(&BOCHS_AMDV);
}
