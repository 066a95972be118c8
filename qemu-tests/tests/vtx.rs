//! Suite `vtx`: the VT-x backend under Bochs (Tiger Lake: VMX, EPT, VPID, preemption timer).
//! The scenarios are shared with the AMD-V suite (`qemu_tests::guests`).

use qemu_tests::guests::{
    cpuid_msr_and_io_exits_behave, isolation_guests_are_contained, reference_guest_runs, BOCHS_VTX,
};

#[test]
fn reference_guest_runs_under_vtx() {
    reference_guest_runs(&BOCHS_VTX);
}

#[test]
fn cpuid_msr_and_io_exits_behave_under_vtx() {
    cpuid_msr_and_io_exits_behave(&BOCHS_VTX);
}

#[test]
fn isolation_guests_are_contained_under_vtx() {
    isolation_guests_are_contained(&BOCHS_VTX);
}

/// A CPU without VT-x or AMD-V: the boot log names what is missing, no guest runs, and the
/// hypervisor still ends cleanly.
#[test]
fn missing_virtualization_is_named() {
    use qemu_tests::{built_kernel, make_image, BootMedium, Emulator, ImageModule, Machine, MachineConfig, ScratchDir};
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new("no-virt").unwrap();
    let image = scratch.path().join("colo.img");
    let guest = ImageModule {
        path: qemu_tests::guests::guest_path("guest-hello"),
        name: "guest-hello".into(),
        args: String::new(),
    };
    make_image(&kernel, "guest_mem=16M", &[guest], &image).unwrap_or_else(|e| panic!("{e}"));
    let mut config = MachineConfig::new(Emulator::Qemu, BootMedium::Cdrom, &image);
    config.cpu = "qemu64,-svm,-vmx".into();
    let machine = Machine::start(config, "no-virt").unwrap_or_else(|e| panic!("{e}"));
    let outcome = machine.wait_exit(std::time::Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"));
    let s = &outcome.serial;
    assert!(
        s.contains("no guest can run: no usable hardware virtualization on this `AuthenticAMD` CPU: expected VT-x"),
        "{s}"
    );
    assert!(!s.contains("[guest-hello]"), "{s}");
    assert_eq!(outcome.verdict, Some(0), "{s}");
}
