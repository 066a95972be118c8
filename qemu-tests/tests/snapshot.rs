//! Suite `snapshot`: dirty tracking (PML, EPT A/D scanning and EPT write protection), vCPU state capture, snapshot and
//! restore, and vCPU reset under VT-x (Bochs Tiger Lake); and, under QEMU TCG with AMD-V, a
//! serving `guest-redis` (NIC attached, keys set) snapshotted mid-service and restored into a
//! fresh guest that answers `redis-cli` with the same keys (root: tap, bridge and a client
//! network namespace, removed on drop). The Bochs scenarios live in `qemu_tests::guests` so
//! another backend can run the same ones.

use std::time::Duration;

use qemu_tests::guests::{
    checkpoint_pair_makes_the_svm_equal_the_pvm, dirty_pages_are_counted_exactly, guest_path,
    snapshot_restore_reproduces_output, BOCHS_VTX,
};
use qemu_tests::netns::{self, TestNet};
use qemu_tests::{built_kernel, make_image, BootMedium, Emulator, ImageModule, Machine, MachineConfig, ScratchDir};

#[test]
fn dirty_pages_are_counted_exactly_with_pml() {
    dirty_pages_are_counted_exactly(&BOCHS_VTX, "pml", &[1, 37, 300]);
}

#[test]
fn dirty_pages_are_counted_exactly_with_ad_scanning() {
    dirty_pages_are_counted_exactly(&BOCHS_VTX, "ad", &[1, 37, 300]);
}

#[test]
fn dirty_pages_are_counted_exactly_with_write_protection() {
    dirty_pages_are_counted_exactly(&BOCHS_VTX, "wp", &[1, 37, 300]);
}

#[test]
fn snapshot_restore_reproduces_output_and_refuses_corruption() {
    snapshot_restore_reproduces_output(&BOCHS_VTX);
}

#[test]
fn checkpoint_pair_makes_the_svm_equal_the_pvm_with_pml() {
    checkpoint_pair_makes_the_svm_equal_the_pvm(&BOCHS_VTX, "pml");
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// `redis-cli ARGS` from the client namespace; its trimmed stdout (a failed run fails the test
/// with the serial console).
fn cli(net: &TestNet, machine: &Machine, ip: &str, args: &[&str]) -> String {
    let mut all = vec!["-h", ip, "-p", "6379"];
    all.extend_from_slice(args);
    let out = net.run("redis-cli", &all, 40);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed ({}): {text}{}\nserial:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        machine.serial()
    );
    text
}

/// `guest-redis` formats its empty disk (disk write 1), takes SET, SET, INCR (writes 2 to 4) and
/// is snapshotted right after the 4th write, before it answers the INCR; the original guest is
/// ended and a fresh guest restored from the snapshot answers that INCR, serves the keys, takes
/// new ones and reports TIME from its (restored) clock, without booting again.
#[test]
fn serving_redis_is_restored_into_a_fresh_guest_under_amdv_qemu() {
    assert!(netns::available(), "this test needs root and iproute2 (`cargo xtask deps`)");
    let subnet = 41u8;
    let (ip, mgmt) = (format!("10.77.{subnet}.3"), format!("10.77.{subnet}.2/24"));
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new("snapshot-serve").expect("scratch dir");
    let image = scratch.path().join("colo.img");
    let disk = scratch.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("writing the disk image");
    let redis = guest_path("guest-redis");
    assert!(redis.is_file(), "{} missing: run `cargo xtask build`", redis.display());
    let args = format!(
        "ip={ip}/24 mac=52:54:00:c0:{subnet:02x}:03 disk=data time_limit_ms=600000 scenario=snapshot-serve \
         snapshot_after_writes=4"
    );
    let modules = [
        ImageModule { path: redis, name: "guest-redis".into(), args },
        ImageModule { path: disk, name: "disk-data".into(), args: String::new() },
    ];
    make_image(&kernel, &format!("role=standalone mgmt_addr={mgmt}"), &modules, &image)
        .unwrap_or_else(|e| panic!("{e}"));
    let net = TestNet::new("snap", &format!("10.77.{subnet}.1/24")).unwrap_or_else(|e| panic!("test network: {e}"));
    let mut config = MachineConfig::new(Emulator::Qemu, BootMedium::Cdrom, &image);
    config.extra = net.qemu_nic_args("n0", &format!("52:54:00:77:{subnet:02x}:02"));
    let mut machine = Machine::start(config, "snapshot-serve").unwrap_or_else(|e| panic!("{e}"));
    machine.wait_for("redis: listening on", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(cli(&net, &machine, &ip, &["SET", "alpha", "one"]), "OK");
    assert_eq!(cli(&net, &machine, &ip, &["SET", "beta", "two"]), "OK");
    // The snapshot is taken after this request's disk write; the restored guest answers it.
    assert_eq!(cli(&net, &machine, &ip, &["INCR", "gamma"]), "1");
    let restored =
        machine.wait_for("snapshot-serve: restored into a fresh guest", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(restored.text.contains("NIC attached: yes"), "{}", restored.text);
    let serial = machine.serial();
    let taken = serial.lines().find(|l| l.contains("snapshot-serve: snapshot of")).expect("snapshot line");
    assert!(taken.contains("after 4 disk writes: NIC attached: yes") && taken.contains("4 device states"), "{taken}");
    eprintln!("[figures] QEMU TCG AMD-V: {taken}");
    if let Some(digest) = serial.lines().find(|l| l.contains("digest of the restored guest")) {
        eprintln!("[figures] QEMU TCG AMD-V: {digest}");
    }
    assert!(serial.contains("snapshot-serve: digest of the restored guest equals the original's"), "{serial}");
    let refused = serial.lines().find(|l| l.contains("RX ring outside guest RAM refused")).expect("refusal line");
    assert!(refused.contains("pvnet state rings: ring at") && refused.ends_with("target unchanged: yes"), "{refused}");

    assert_eq!(cli(&net, &machine, &ip, &["GET", "alpha"]), "one");
    assert_eq!(cli(&net, &machine, &ip, &["GET", "beta"]), "two");
    assert_eq!(cli(&net, &machine, &ip, &["INCR", "gamma"]), "2");
    assert_eq!(cli(&net, &machine, &ip, &["SET", "delta", "four"]), "OK");
    assert_eq!(cli(&net, &machine, &ip, &["DBSIZE"]), "4");
    let time = cli(&net, &machine, &ip, &["TIME"]);
    let parts: Vec<u64> = time.lines().map(|l| l.trim().parse().expect("TIME fields are integers")).collect();
    assert!(parts.len() == 2 && parts[1] < 1_000_000, "TIME: {time:?}");
    // The restored guest did not boot again: one `listening` line in the whole run.
    let serial = machine.serial();
    assert_eq!(serial.matches("redis: listening on").count(), 1, "{serial}");

    let _ = net.run("redis-cli", &["-h", &ip, "SHUTDOWN"], 20);
    let end = machine.wait_for("snapshot-serve: restored guest shut down", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(end.text.contains("shut down with status 0"), "{}", end.text);
    assert!(machine.serial().contains("redis: shutting down with 4 keys"), "{}", machine.serial());
    drop(machine);
    drop(net);
}
