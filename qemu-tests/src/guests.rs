//! Guest scenarios shared by the vCPU backend suites (`vtx`, `amdv`): each function boots the
//! real image with guest modules on one [`Platform`] and asserts what the serial console shows.
//! The suites differ only in the platform they pass.

use std::path::PathBuf;
use std::time::Duration;

use crate::{
    built_kernel, make_image, target_dir, BootMedium, Emulator, ImageModule, Machine, MachineConfig, Outcome,
    ScratchDir,
};

/// An emulator and CPU model that gives the hypervisor one backend.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// The emulator.
    pub emulator: Emulator,
    /// Its CPU model (`-cpu` for QEMU, `cpu: model=` for Bochs).
    pub cpu: &'static str,
    /// The backend the boot log must name: "VT-x" or "AMD-V".
    pub backend: &'static str,
    /// How long a whole boot may take.
    pub timeout: Duration,
}

/// VT-x with EPT under Bochs' Tiger Lake model.
pub const BOCHS_VTX: Platform =
    Platform { emulator: Emulator::Bochs, cpu: "tigerlake", backend: "VT-x", timeout: Duration::from_secs(300) };

/// A built guest binary (`cargo xtask build` puts them in `target/guests/`).
pub fn guest_path(name: &str) -> PathBuf {
    target_dir().join("guests").join(name)
}

/// Boots the hypervisor with `cmdline` and the guests `modules` (name, extra module arguments),
/// waits for it to leave by itself, and returns the outcome. The hypervisor itself must end well.
pub fn boot_guests(platform: &Platform, test: &str, cmdline: &str, modules: &[(&str, &str)]) -> Outcome {
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new(test).expect("scratch dir");
    let image = scratch.path().join("colo.img");
    let modules: Vec<ImageModule> = modules
        .iter()
        .map(|(name, args)| {
            let path = guest_path(name);
            assert!(path.is_file(), "{} missing: run `cargo xtask build`", path.display());
            ImageModule { path, name: name.to_string(), args: args.to_string() }
        })
        .collect();
    make_image(&kernel, cmdline, &modules, &image).unwrap_or_else(|e| panic!("{e}"));
    let mut config = MachineConfig::new(platform.emulator, BootMedium::Cdrom, &image);
    config.cpu = platform.cpu.to_string();
    let machine = Machine::start(config, test).unwrap_or_else(|e| panic!("{e}"));
    let outcome = machine.wait_exit(platform.timeout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.verdict, Some(0), "the hypervisor itself must end well:\n{}", outcome.serial);
    assert!(
        outcome.serial.contains(&format!("backend: {}", platform.backend)),
        "boot log does not name the {} backend:\n{}",
        platform.backend,
        outcome.serial
    );
    outcome
}

/// The line the runner prints when guest `name` ends.
pub fn end_line<'a>(serial: &'a str, name: &str) -> &'a str {
    let prefix = format!("guest `{name}` ");
    serial
        .lines()
        .find(|l| l.contains(&prefix) && l.contains("exits: total="))
        .unwrap_or_else(|| panic!("no end line for `{name}`:\n{serial}"))
}

/// The reference guest prints, computes, keeps its SSE state across exits, reads only virtual
/// time, sleeps on the coarse clock and exits with the status it was given.
pub fn reference_guest_runs(platform: &Platform) {
    let outcome = boot_guests(platform, "reference", "guest_mem=16M", &[("guest-hello", "status=3")]);
    let s = &outcome.serial;
    for expected in [
        "[guest-hello] hello from guest `guest-hello status=3`: 16 MiB of RAM, 1000 ticks/s",
        "[guest-hello] primes below 20000: 2262",
        "[guest-hello] harmonic(200) = 5.878030948",
        "[guest-hello] sse registers across hypercalls: preserved",
        "[guest-hello] slept 60 ms: tick",
        "[guest-hello] exiting with status 3",
    ] {
        assert!(s.contains(expected), "missing `{expected}`:\n{s}");
    }
    // RDTSC must give the coarse clock times 1,000,000, never host TSC.
    let rdtsc_line = s.lines().find(|l| l.contains("rdtsc reads")).expect("rdtsc line");
    let value: u64 = rdtsc_line.split("rdtsc reads ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert_eq!(value % 1_000_000, 0, "guest read host time through RDTSC: {rdtsc_line}");
    let end = end_line(s, "guest-hello");
    assert!(end.contains("shut down with status 3"), "{end}");
    assert!(end.contains(" hypercall="), "{end}");
    eprintln!("[figures] {}: {end}", platform.backend);
    if let Some(rt) = s.lines().find(|l| l.contains("hypercall round trip")) {
        eprintln!("[figures] {}: {rt}", platform.backend);
    }
    eprintln!("[figures] {}: whole boot took {:.1} s", platform.backend, outcome.elapsed.as_secs_f64());
}

/// Hostile guests are ended (or refused) by name, one after the other, and the hypervisor keeps
/// running: the reference guest after them still succeeds, and no memory leaks between guests.
pub fn isolation_guests_are_contained(platform: &Platform) {
    let outcome = boot_guests(
        platform,
        "isolation",
        "guest_mem=16M",
        &[
            ("guest-bad-write", ""),
            ("guest-hostile", ""),
            ("guest-triple-fault", ""),
            ("guest-spinner", "time_limit_ms=300"),
            ("guest-cr-write", ""),
            ("guest-hello", ""),
        ],
    );
    let s = &outcome.serial;
    let bad_write = end_line(s, "guest-bad-write");
    assert!(bad_write.contains("ended: Write access to guest-physical 0x1001000 outside its RAM"), "{bad_write}");
    assert!(!s.contains("ERROR: the write outside guest RAM succeeded"), "{s}");

    let hostile = end_line(s, "guest-hostile");
    assert!(s.contains("[guest-hostile] all hostile hypercalls refused"), "{s}");
    assert!(!s.contains("[guest-hostile] WRONG"), "{s}");
    assert!(hostile.contains("shut down with status 0") && hostile.contains("refused hypercalls: 9"), "{hostile}");

    assert!(end_line(s, "guest-triple-fault").contains("ended: triple fault"), "{s}");

    let spinner = end_line(s, "guest-spinner");
    assert!(spinner.contains("ended: ran past its time limit of 300 ticks"), "{spinner}");
    assert!(spinner.contains("preemption-timer="), "the spinner must be preempted: {spinner}");

    let cr = end_line(s, "guest-cr-write");
    assert!(cr.contains("ended: unsupported write to a control-register bit the hypervisor owns"), "{cr}");
    assert!(!s.contains("ERROR: CR0.PE write was not intercepted"), "{s}");
    assert!(s.contains(&format!("{} vCPU dump:", platform.backend)) && s.contains("guest RIP"), "no vCPU dump:\n{s}");

    assert!(end_line(s, "guest-hello").contains("shut down with status 0"), "{s}");
    let free: Vec<&str> = s.lines().filter(|l| l.contains("] free memory: ")).collect();
    assert_eq!(free.len(), 6, "{s}");
    assert!(free.windows(2).all(|w| w[0] == w[1]), "memory leaked between guests: {free:?}");
}

/// CPUID is filtered, allowed MSRs work, empty ports float high, and an MSR outside the
/// allow-list gets #GP (which, with no guest IDT, ends the guest in a triple fault).
pub fn cpuid_msr_and_io_exits_behave(platform: &Platform) {
    let outcome = boot_guests(platform, "probe", "guest_mem=16M", &[("guest-probe", "")]);
    let s = &outcome.serial;
    assert!(s.contains("[guest-probe] probe checks done: 0 wrong"), "{s}");
    assert!(!s.contains("[guest-probe] WRONG"), "{s}");
    assert!(s.contains("[guest-probe] reading IA32_FEATURE_CONTROL (expect #GP"), "{s}");
    assert!(!s.contains("ERROR: IA32_FEATURE_CONTROL read returned"), "the denied MSR read returned:\n{s}");
    let end = end_line(s, "guest-probe");
    assert!(end.contains("ended: triple fault"), "{end}");
    for counter in [" cpuid=", " rdmsr=", " wrmsr=1", " io=1"] {
        assert!(end.contains(counter), "missing `{counter}` in {end}");
    }
}

/// A guest that writes exactly N distinct pages between two marks is reported with exactly N
/// written pages, by `method` ("pml" or "ad"), for each N in `counts`. With second-level A/D flags
/// the CPU's walks of the guest's page tables count as writes (SDM §29.3.5), so those pages (at
/// most the PML4, PDPT and four directories) are reported too, and named apart.
pub fn dirty_pages_are_counted_exactly(platform: &Platform, method: &str, counts: &[u64]) {
    let args: Vec<String> =
        counts.iter().map(|n| format!("pages={n} scenario=dirty-count dirty_log={method}")).collect();
    let modules: Vec<(&str, &str)> = args.iter().map(|a| ("guest-dirty", a.as_str())).collect();
    let outcome = boot_guests(platform, &format!("dirty-{method}"), "guest_mem=16M", &modules);
    let s = &outcome.serial;
    let reports: Vec<&str> = s.lines().filter(|l| l.contains("dirty-count: ")).collect();
    assert_eq!(reports.len(), counts.len(), "one report per guest expected:\n{s}");
    for (report, n) in reports.iter().zip(counts) {
        let field = |before: &str| -> u64 {
            let at = report.find(before).unwrap_or_else(|| panic!("no `{before}` in {report}"));
            report[..at].rsplit(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).unwrap().parse().unwrap()
        };
        let total = field(" pages dirty between marks");
        let written = field(" written pages");
        let walked = field(" guest page-table pages");
        assert_eq!(written, *n, "pages={n}: {report}");
        assert!(walked <= 6, "pages={n}: more page-table pages than the guest has: {report}");
        assert_eq!(total, written + walked, "{report}");
        eprintln!("[figures] {} {method}: pages={n}: {report}", platform.backend);
    }
}

/// A snapshot taken at a preemption-timer exit (mid-computation), restored into a second guest
/// and back into the same guest, reproduces the rest of the console output byte for byte; a
/// corrupted and a truncated snapshot are refused and leave the target's memory as it was.
///
/// The snapshot point follows the guest's progress (the first preemption after K console lines,
/// with a short time slice from then on), not a count of preemptions: under TCG preemption
/// follows host time, so a count could outlast the guest on a loaded machine.
pub fn snapshot_restore_reproduces_output(platform: &Platform) {
    let outcome = boot_guests(
        platform,
        "snapshot-restore",
        "guest_mem=16M",
        &[
            // A short time slice makes sure the preemption timer fires mid-step on every backend
            // (the guest exits for its console output more often than every 10 ms under QEMU).
            ("guest-counter", "steps=30 scenario=snapshot-restore snapshot_after_lines=2 time_slice_us=200"),
            ("guest-counter", "steps=30 scenario=snapshot-restore snapshot_after_lines=11 time_slice_us=200"),
        ],
    );
    let s = &outcome.serial;
    let taken: Vec<&str> = s.lines().filter(|l| l.contains("snapshot-restore: snapshot of")).collect();
    assert_eq!(taken.len(), 2, "{s}");
    for (line, k) in taken.iter().zip([2u64, 11]) {
        // Taken at a preemption (mid-step) once the guest printed K lines, and before its end:
        // the rest of the run is what the restores must reproduce.
        let lines: u64 = line
            .split("at the first preemption after ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no line count in {line}"));
        assert!((k..30).contains(&lines), "snapshot after {lines} lines, expected {k} to 29: {line}\n{s}");
    }
    for line in &taken {
        eprintln!("[figures] {}: {line}", platform.backend);
    }
    let identical = s.lines().filter(|l| l.contains("identical to the original: yes")).count();
    assert_eq!(identical, 4, "two restores per snapshot must reproduce the output:\n{s}");
    assert!(!s.contains("identical to the original: NO"), "{s}");
    assert!(!s.contains("first difference"), "{s}");
    for refused in ["corrupted snapshot refused: checkpoint CRC-32C", "truncated snapshot refused: stream ended"] {
        let count = s.lines().filter(|l| l.contains(refused) && l.contains("target memory unchanged: yes")).count();
        assert_eq!(count, 2, "`{refused}` with the target unchanged, twice:\n{s}");
    }
    assert!(!s.contains("snapshot was applied"), "{s}");
    let originals: Vec<&str> = s.lines().filter(|l| l.contains("original run shut down with status 0")).collect();
    assert_eq!(originals.len(), 2, "{s}");
}

/// A module line with a bad value ends that guest with the key, the value and the accepted form;
/// the hypervisor goes on and the next guest runs.
pub fn bad_guest_arguments_are_named(platform: &Platform) {
    let outcome = boot_guests(
        platform,
        "guest-spec",
        "guest_mem=16M",
        &[("guest-hello", "time_limit_ms=soon"), ("guest-hello", "mac=01:00:5e:00:00:01"), ("guest-hello", "status=0")],
    );
    let s = &outcome.serial;
    for expected in [
        "guest `guest-hello` not started: bad module argument `time_limit_ms=soon`: expected a whole number of \
         milliseconds from 1 to 86400000",
        "guest `guest-hello` not started: bad module argument `mac=01:00:5e:00:00:01`: expected a unicast MAC address",
    ] {
        assert!(s.contains(expected), "missing `{expected}`:\n{s}");
    }
    let ends: Vec<&str> =
        s.lines().filter(|l| l.contains("guest `guest-hello` ") && l.contains("exits: total=")).collect();
    assert_eq!(ends.len(), 1, "only the good guest runs:\n{s}");
    assert!(ends[0].contains("shut down with status 0"), "{}", ends[0]);
}
