//! Suite `amdv`: the AMD-V backend (SVM with nested paging) under QEMU TCG (`-cpu max`: SVM and
//! NPT, no NRIPS, so the hypervisor decodes instruction lengths itself) and under Bochs' Ryzen
//! model (SVM, NPT and NRIPS). The scenarios are the ones the `vtx` suite runs
//! (`qemu_tests::guests`), and the `snapshot` suite's dirty-count and snapshot/restore scenarios
//! (with NPT write protection, `dirty_log=wp`, and with NPT dirty bits scanned under upper-level
//! Accessed flags, `dirty_log=ad`: AMD-V has no PML); only the platform differs.

use std::time::Duration;

use qemu_tests::guests::{
    bad_guest_arguments_are_named, checkpoint_pair_makes_the_svm_equal_the_pvm, cpuid_msr_and_io_exits_behave,
    dirty_pages_are_counted_exactly, isolation_guests_are_contained, reference_guest_runs,
    snapshot_restore_reproduces_output, Platform,
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

#[test]
fn dirty_pages_are_counted_exactly_with_npt_dirty_bits_under_amdv_qemu() {
    dirty_pages_are_counted_exactly(&QEMU_AMDV, "ad", &[1, 37, 300]);
}

#[test]
fn dirty_pages_are_counted_exactly_with_npt_dirty_bits_under_amdv_bochs() {
    dirty_pages_are_counted_exactly(&BOCHS_AMDV, "ad", &[1, 37, 300]);
}

#[test]
fn dirty_pages_are_counted_exactly_with_write_protection_under_amdv_qemu() {
    dirty_pages_are_counted_exactly(&QEMU_AMDV, "wp", &[1, 37, 300]);
}

#[test]
fn dirty_pages_are_counted_exactly_with_write_protection_under_amdv_bochs() {
    dirty_pages_are_counted_exactly(&BOCHS_AMDV, "wp", &[1, 37, 300]);
}

#[test]
fn checkpoint_pair_makes_the_svm_equal_the_pvm_with_write_protection_under_amdv_qemu() {
    checkpoint_pair_makes_the_svm_equal_the_pvm(&QEMU_AMDV, "wp");
}

#[test]
fn snapshot_restore_reproduces_output_under_amdv_qemu() {
    snapshot_restore_reproduces_output(&QEMU_AMDV);
}

#[test]
fn snapshot_restore_reproduces_output_under_amdv_bochs() {
    snapshot_restore_reproduces_output(&BOCHS_AMDV);
}

#[test]
fn bad_guest_arguments_are_named_under_amdv_qemu() {
    bad_guest_arguments_are_named(&QEMU_AMDV);
}

#[test]
fn checkpoint_pair_makes_the_svm_equal_the_pvm_under_amdv_qemu() {
    checkpoint_pair_makes_the_svm_equal_the_pvm(&QEMU_AMDV, "ad");
}
