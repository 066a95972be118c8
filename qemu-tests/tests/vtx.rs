//! Suite `vtx`: the VT-x backend under Bochs (Tiger Lake: VMX, EPT, VPID, preemption timer).
//! The scenarios are shared with the AMD-V suite (`qemu_tests::guests`).

use qemu_tests::guests::{isolation_guests_are_contained, reference_guest_runs, BOCHS_VTX};

#[test]
fn reference_guest_runs_under_vtx() {
    reference_guest_runs(&BOCHS_VTX);
}

#[test]
fn isolation_guests_are_contained_under_vtx() {
    isolation_guests_are_contained(&BOCHS_VTX);
}
