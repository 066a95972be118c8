//! Suite `snapshot`: dirty tracking (PML and EPT A/D scanning), vCPU state capture, snapshot and
//! restore, and vCPU reset under VT-x (Bochs Tiger Lake). The scenarios live in
//! `qemu_tests::guests` so another backend can run the same ones.

use qemu_tests::guests::{dirty_pages_are_counted_exactly, snapshot_restore_reproduces_output, BOCHS_VTX};

#[test]
fn dirty_pages_are_counted_exactly_with_pml() {
    dirty_pages_are_counted_exactly(&BOCHS_VTX, "pml", &[1, 37, 300]);
}

#[test]
fn dirty_pages_are_counted_exactly_with_ad_scanning() {
    dirty_pages_are_counted_exactly(&BOCHS_VTX, "ad", &[1, 37, 300]);
}

#[test]
fn snapshot_restore_reproduces_output_and_refuses_corruption() {
    snapshot_restore_reproduces_output(&BOCHS_VTX);
}
