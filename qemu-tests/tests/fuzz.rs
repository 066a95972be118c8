//! Suite `fuzz`: the vCPU tells the truth to a hostile guest (issue 14), on both backends.
//!
//! Each test boots one platform with `guest-arch` (the six architectural points, see
//! `guest-shim/src/bin/arch.rs`), `guest-fuzz` with a few fixed seeds (random hypercalls with
//! planted rings and block requests, port I/O, MSRs, CPUID, and the instruction endgame checked
//! against `docs/exits.md`), and the reference guest last. It asserts that the hypervisor stays
//! up (it ends well and the last guest still runs), that free memory is the same after every
//! guest, that every guest found nothing wrong (no register but RAX changed across any hypercall,
//! every instruction ended as documented), and that no guest byte reached the serial console
//! unescaped.
//!
//! `cargo xtask fuzz --seeds N` runs the ignored `many_seeds` test: seeds 1..=N spread over
//! the three platforms.

use std::path::PathBuf;
use std::time::Duration;

use qemu_tests::guests::{guest_path, Platform, BOCHS_VTX};
use qemu_tests::{built_kernel, make_image, BootMedium, Emulator, ImageModule, Machine, MachineConfig, ScratchDir};

/// AMD-V under QEMU TCG (no NRIPS: the hypervisor decodes instruction lengths).
const QEMU_AMDV: Platform =
    Platform { emulator: Emulator::Qemu, cpu: "max", backend: "AMD-V", timeout: Duration::from_secs(240) };

/// AMD-V under Bochs' Ryzen model (NRIPS).
const BOCHS_AMDV: Platform =
    Platform { emulator: Emulator::Bochs, cpu: "ryzen", backend: "AMD-V", timeout: Duration::from_secs(480) };

/// Bochs VT-x with a longer limit: the fuzz guests make tens of thousands of exits.
const BOCHS_VTX_FUZZ: Platform = Platform { timeout: Duration::from_secs(480), ..BOCHS_VTX };

/// Boots `platform` with guest-arch, one guest-fuzz per seed (with a NIC and a 64 KiB disk to
/// aim its rings and block requests at), and guest-hello; checks everything the suite promises.
fn fuzz_platform(platform: &Platform, test: &str, seeds: &[u64], counts: &str) {
    // Bochs 2.7's SVM does not clear a pending single-step trap on #VMEXIT (`Svm_Vmexit` leaves
    // `debug_trap` set; only intercepted exceptions clear it), so a guest stepping over an
    // intercepted instruction has the #DB delivered to the host, before VMLOAD has given the
    // host its TR back, and Bochs resets the machine. Real AMD CPUs and QEMU do not: the TF
    // checks run there and on VT-x (docs/exits.md).
    let bochs_svm = platform.emulator == Emulator::Bochs && platform.backend == "AMD-V";
    let tf = if bochs_svm { " tf=off" } else { "" };
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new(test).expect("scratch dir");
    let disk: PathBuf = scratch.path().join("disk-fuzz");
    std::fs::write(&disk, vec![0u8; 64 << 10]).expect("disk image");
    let module = |name: &str, args: String| {
        let path = guest_path(name);
        assert!(path.is_file(), "{} missing: run `cargo xtask build`", path.display());
        ImageModule { path, name: name.into(), args }
    };
    let mut modules = vec![ImageModule { path: disk, name: "disk-fuzz".into(), args: String::new() }];
    modules.push(module("guest-arch", tf.trim().into()));
    for seed in seeds {
        modules.push(module(
            "guest-fuzz",
            format!("seed={seed} {counts} disk=fuzz mac=52:54:00:f0:00:01 time_limit_ms=600000{tf}"),
        ));
    }
    modules.push(module("guest-hello", "status=0".into()));
    let image = scratch.path().join("colo.img");
    make_image(&kernel, "guest_mem=16M", &modules, &image).unwrap_or_else(|e| panic!("{e}"));
    let mut config = MachineConfig::new(platform.emulator, BootMedium::Cdrom, &image);
    config.cpu = platform.cpu.to_string();
    let machine = Machine::start(config, test).unwrap_or_else(|e| panic!("{e}"));
    let outcome = machine.wait_exit(platform.timeout).unwrap_or_else(|e| panic!("{e}"));
    let s = &outcome.serial;
    // The hypervisor stays up: it ends by itself, well, after running the last guest.
    assert_eq!(outcome.verdict, Some(0), "the hypervisor itself must end well:\n{s}");
    assert!(s.contains(&format!("backend: {}", platform.backend)), "wrong backend:\n{s}");
    assert!(s.contains("[guest-hello] exiting with status 0"), "the reference guest after the fuzzers:\n{s}");

    // Issue 14's six points.
    assert!(s.contains("[guest-arch] arch checks done: 0 wrong"), "{s}");
    let wrong: Vec<&str> = s.lines().filter(|l| l.contains("WRONG")).collect();
    assert!(wrong.is_empty(), "guests saw non-architectural outcomes:\n{}", wrong.join("\n"));
    for point in 1..=4 {
        assert!(s.contains(&format!("[guest-arch] point {point} ")), "point {point} did not run:\n{s}");
    }
    for beyond in [
        "[guest-arch] point 7 SYSCALL goes to the guest's LSTAR and returns: ok",
        "[guest-arch] point 7 SWAPGS uses the guest's KERNEL_GS_BASE and RDMSR follows it: ok",
    ] {
        assert!(s.contains(beyond), "missing `{beyond}`:\n{s}");
    }
    let stepped = s.contains("[guest-arch] point 5 single-step #DB right after (behind MOV SS): ok");
    assert!(stepped || bochs_svm, "point 5 did not run:\n{s}");
    assert!(s.contains("[guest-arch] point 2: RDTSCP shown in CPUID"), "RDTSCP must be the coarse clock:\n{s}");
    // Point 6: what could be printed is, the rest is escaped.
    let escaped = r"[guest-arch] point 6 console: bad \xff\xfe esc \x1b[2J c1 \u{9b} e-acute \u{e9} tab\tend";
    assert!(s.contains(escaped), "console escaping: expected `{escaped}` in\n{s}");
    for line in s.lines().filter(|l| l.starts_with("[guest-")) {
        assert!(line.chars().all(|c| (' '..='~').contains(&c)), "a guest console line carries a raw byte: {line:?}");
    }

    // Every fuzz guest finished clean, and memory never leaked.
    for seed in seeds {
        let done = format!("[guest-fuzz] fuzz seed={seed} done: ");
        let line = s.lines().find(|l| l.contains(&done)).unwrap_or_else(|| panic!("seed {seed} did not finish:\n{s}"));
        assert!(line.ends_with("wrong=0"), "{line}");
        eprintln!("[figures] {} {line}", platform.backend);
    }
    let ends: Vec<&str> = s.lines().filter(|l| l.contains("guest `guest-") && l.contains("exits: total=")).collect();
    assert_eq!(ends.len(), seeds.len() + 2, "{s}");
    for end in &ends {
        assert!(end.contains("shut down with status 0"), "{end}");
        eprintln!("[figures] {}: {end}", platform.backend);
    }
    let free: Vec<&str> = s.lines().filter(|l| l.contains("] free memory: ")).collect();
    assert_eq!(free.len(), seeds.len() + 2, "{s}");
    assert!(free.windows(2).all(|w| w[0] == w[1]), "free memory changed between guests: {free:?}");
    eprintln!("[figures] {}: {} seeds in {:.1} s", platform.backend, seeds.len(), outcome.elapsed.as_secs_f64());
}

/// Exit counts for CI (the endgame always runs whole).
const CI_COUNTS: &str = "hypercalls=1500 ports=300 msrs=300 cpuids=150 rounds=2";

#[test]
fn fuzz_under_vtx_bochs() {
    fuzz_platform(&BOCHS_VTX_FUZZ, "fuzz-vtx", &[1, 2], CI_COUNTS);
}

#[test]
fn fuzz_under_amdv_qemu() {
    fuzz_platform(&QEMU_AMDV, "fuzz-amdv-qemu", &[1, 2, 3], CI_COUNTS);
}

#[test]
fn fuzz_under_amdv_bochs() {
    fuzz_platform(&BOCHS_AMDV, "fuzz-amdv-bochs", &[1], CI_COUNTS);
}

/// `cargo xtask fuzz --seeds N` (environment `COLO_FUZZ_SEEDS=N`): seeds 1..=N, at most 4 per boot,
/// round robin over QEMU AMD-V, Bochs VT-x and Bochs AMD-V, each seed with [`MANY_COUNTS`].
/// Per-seed counts of `many_seeds`.
const MANY_COUNTS: &str = "hypercalls=10000 ports=2000 msrs=2000 cpuids=1000 rounds=8";

#[test]
#[ignore = "run by `cargo xtask fuzz --seeds N`"]
fn many_seeds() {
    let n: u64 = std::env::var("COLO_FUZZ_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let platforms = [&QEMU_AMDV, &BOCHS_VTX_FUZZ, &BOCHS_AMDV];
    let mut per_platform: [Vec<u64>; 3] = Default::default();
    for seed in 1..=n {
        per_platform[(seed as usize - 1) % 3].push(seed);
    }
    for (platform, seeds) in platforms.iter().zip(&per_platform) {
        for (i, chunk) in seeds.chunks(4).enumerate() {
            let slow = Platform { timeout: platform.timeout * 3, ..**platform };
            fuzz_platform(&slow, &format!("fuzz-many-{}-{i}", platform.cpu), chunk, MANY_COUNTS);
        }
    }
}
