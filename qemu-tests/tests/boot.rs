//! Suite `boot`: the real GRUB image boots on every medium the project supports, reaches Rust,
//! and ends with the status the kernel chose; configuration errors and deliberate faults are
//! reported by name. Run through `cargo xtask test --suite boot`, which builds the kernel first.

use std::time::Duration;

use qemu_tests::{
    built_kernel, make_image, BootMedium, Emulator, Machine, MachineConfig, Outcome, ScratchDir, FIRST_RUST_LINE,
    QEMU_EXIT_FAILURE, QEMU_EXIT_SUCCESS,
};

const QEMU_TIMEOUT: Duration = Duration::from_secs(90);
const BOCHS_TIMEOUT: Duration = Duration::from_secs(240);

/// Boots `cmdline` and waits for the machine to leave by itself.
fn boot(name: &str, emulator: Emulator, medium: BootMedium, cmdline: &str) -> (Outcome, Duration) {
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new(name).expect("scratch dir");
    let image = scratch.path().join("colo.img");
    make_image(&kernel, cmdline, &[], &image).unwrap_or_else(|e| panic!("{e}"));
    let mut machine =
        Machine::start(MachineConfig::new(emulator, medium, &image), name).unwrap_or_else(|e| panic!("{e}"));
    let timeout = if emulator == Emulator::Bochs { BOCHS_TIMEOUT } else { QEMU_TIMEOUT };
    let first = machine.wait_for(FIRST_RUST_LINE, timeout).unwrap_or_else(|e| panic!("{e}"));
    let outcome = machine.wait_exit(timeout).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[timing] {name}: {emulator:?} {medium:?}: first Rust log line after {:.2} s, exit after {:.2} s",
        first.at.as_secs_f64(),
        outcome.elapsed.as_secs_f64()
    );
    (outcome, first.at)
}

fn assert_clean_boot(outcome: &Outcome, emulator: Emulator) {
    let s = &outcome.serial;
    for milestone in [
        FIRST_RUST_LINE,
        "GDT, TSS (4 IST stacks) and IDT loaded",
        "host page tables loaded",
        "MiB at 0x", // the heap line: "heap: N MiB at 0x..."
        "boot complete",
    ] {
        assert!(s.contains(milestone), "missing milestone `{milestone}` in:\n{s}");
    }
    assert_eq!(outcome.verdict, Some(0), "verdict:\n{s}");
    if emulator == Emulator::Qemu {
        assert_eq!(outcome.exit_code, Some(QEMU_EXIT_SUCCESS), "QEMU exit code:\n{s}");
    }
}

fn assert_failed(outcome: &Outcome, emulator: Emulator) {
    assert_eq!(outcome.verdict, Some(1), "verdict:\n{}", outcome.serial);
    if emulator == Emulator::Qemu {
        assert_eq!(outcome.exit_code, Some(QEMU_EXIT_FAILURE), "QEMU exit code:\n{}", outcome.serial);
    }
    assert!(!outcome.serial.contains("boot complete"), "{}", outcome.serial);
}

/// The RIP printed in an exception report, which must lie inside the kernel image (at 2 MiB).
fn reported_rip(serial: &str) -> u64 {
    let field = serial.split("rip=").nth(1).expect("report has rip=").split_whitespace().next().unwrap();
    u64::from_str_radix(field.trim_start_matches("0x"), 16).expect("rip is hex")
}

#[test]
fn qemu_cdrom_boots() {
    let (outcome, _) = boot("qemu-cdrom", Emulator::Qemu, BootMedium::Cdrom, "role=standalone");
    assert_clean_boot(&outcome, Emulator::Qemu);
    assert!(outcome.serial.contains("cpu vendor: AuthenticAMD"), "{}", outcome.serial);
}

#[test]
fn qemu_usb_seabios_boots() {
    let (outcome, _) = boot("qemu-usb-bios", Emulator::Qemu, BootMedium::UsbBios, "role=standalone");
    assert_clean_boot(&outcome, Emulator::Qemu);
}

#[test]
fn qemu_usb_uefi_boots() {
    let (outcome, _) = boot("qemu-usb-uefi", Emulator::Qemu, BootMedium::UsbUefi, "role=standalone");
    assert_clean_boot(&outcome, Emulator::Qemu);
}

#[test]
fn bochs_tigerlake_boots() {
    let (outcome, _) = boot("bochs-cdrom", Emulator::Bochs, BootMedium::Cdrom, "role=standalone log=debug");
    assert_clean_boot(&outcome, Emulator::Bochs);
    assert!(outcome.serial.contains("cpu vendor: GenuineIntel"), "{}", outcome.serial);
}

#[test]
fn bad_value_is_named_with_its_accepted_form() {
    let (outcome, _) = boot("bad-value", Emulator::Qemu, BootMedium::Cdrom, "role=tertiary");
    assert_failed(&outcome, Emulator::Qemu);
    assert!(
        outcome.serial.contains(
            "config error: bad value `tertiary` for key `role`; accepted form: role=primary|secondary|standalone"
        ),
        "{}",
        outcome.serial
    );
}

#[test]
fn unknown_key_is_named() {
    let (outcome, _) = boot("unknown-key", Emulator::Qemu, BootMedium::Cdrom, "role=standalone colour=blue");
    assert_failed(&outcome, Emulator::Qemu);
    assert!(outcome.serial.contains("config error: unknown key `colour`; accepted keys: role"), "{}", outcome.serial);
}

#[test]
fn deliberate_page_fault_is_reported_with_vector_rip_and_cr2() {
    let (outcome, _) = boot("page-fault", Emulator::Qemu, BootMedium::Cdrom, "test_fault=page_fault");
    assert_failed(&outcome, Emulator::Qemu);
    let s = &outcome.serial;
    assert!(s.contains("EXCEPTION: vector=14 (#PF page fault)"), "{s}");
    assert!(s.contains("cr2=0x0000000000000000"), "{s}");
    assert!(s.contains("rax=") && s.contains("r15=") && s.contains("cr3="), "registers missing:\n{s}");
    let rip = reported_rip(s);
    assert!((0x20_0000..0x40_0000).contains(&rip), "rip {rip:#x} is not in the kernel image:\n{s}");
}

#[test]
fn deliberate_invalid_opcode_is_reported_under_bochs() {
    let (outcome, _) = boot("bochs-ud", Emulator::Bochs, BootMedium::Cdrom, "test_fault=invalid_opcode");
    assert_failed(&outcome, Emulator::Bochs);
    assert!(outcome.serial.contains("EXCEPTION: vector=6 (#UD invalid opcode)"), "{}", outcome.serial);
    let rip = reported_rip(&outcome.serial);
    assert!((0x20_0000..0x40_0000).contains(&rip), "rip {rip:#x}:\n{}", outcome.serial);
}

#[test]
fn panic_is_reported_with_location_and_message() {
    let (outcome, _) = boot("panic", Emulator::Qemu, BootMedium::Cdrom, "test_fault=panic");
    assert_failed(&outcome, Emulator::Qemu);
    assert!(outcome.serial.contains("PANIC at hypervisor/src/kernel.rs:"), "{}", outcome.serial);
    assert!(outcome.serial.contains(": deliberate test panic"), "{}", outcome.serial);
}

/// Starts `emulator` with one deliberately broken firmware setting and returns the harness's
/// error, which must be the emulator's early death (not a timeout) with the emulator's own words.
fn early_death(name: &str, emulator: Emulator, broken: &str) -> String {
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new(name).expect("scratch dir");
    let image = scratch.path().join("colo.img");
    make_image(&kernel, "role=standalone", &[], &image).unwrap_or_else(|e| panic!("{e}"));
    let mut config = MachineConfig::new(emulator, BootMedium::Cdrom, &image);
    config.extra = broken.split(' ').map(str::to_string).collect();
    if emulator == Emulator::Bochs {
        config.extra = vec![broken.to_string()];
    }
    let mut machine = Machine::start(config, name).unwrap_or_else(|e| panic!("{e}"));
    let logs = machine.logs_dir().to_path_buf();
    let err = match machine.wait_for(FIRST_RUST_LINE, Duration::from_secs(60)) {
        Ok(line) => panic!("{emulator:?} booted despite `{broken}`: {}", line.text),
        Err(e @ qemu_tests::HarnessError::EmulatorDied { .. }) => e.to_string(),
        Err(other) => panic!("expected the emulator's early death to be reported, got: {other}"),
    };
    eprintln!("[report] {err}");
    drop(machine);
    assert!(err.contains(&logs.display().to_string()), "the report names the kept logs: {err}");
    assert!(logs.join("emulator.err").is_file(), "the logs of a dead emulator are kept in {}", logs.display());
    let _ = std::fs::remove_dir_all(&logs);
    err
}

/// Regression for a fresh machine: an emulator that dies before the first Rust line is reported
/// with its exit status and its own error, not as "no verdict" or a bare timeout.
#[test]
fn bochs_early_death_names_the_cause() {
    let err = early_death("death-bochs", Emulator::Bochs, "romimage: file=/nonexistent/colo-test-bios");
    assert!(err.contains("exited with"), "{err}");
    assert!(err.contains("/nonexistent/colo-test-bios"), "Bochs' own error names the ROM path: {err}");
    assert!(err.contains("never printed its first line"), "{err}");
}

#[test]
fn qemu_early_death_names_the_cause() {
    let err = early_death("death-qemu", Emulator::Qemu, "-bios /nonexistent/colo-test-bios");
    assert!(err.contains("exited with"), "{err}");
    assert!(err.contains("could not load PC BIOS"), "QEMU's own error: {err}");
}
