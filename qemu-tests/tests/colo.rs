//! Suite `colo` (root): two emulated hosts (QEMU TCG, AMD-V with NPT) started with
//! `qemu_tests::cluster`, the same cluster `cargo xtask cluster start` gives a person: the
//! primary runs the PVM, the secondary the SVM, `guest-redis` is the replicated service. Run
//! through `cargo xtask test --suite colo` (builds the kernel and guests first).
//!
//! Each test has its own cluster directory under `target/harness/` and its own subnets
//! (10.78.S.0/24 clients, 10.79.S.0/24 replication); the cluster's drop kills both emulators and
//! removes its namespaces, taps and bridges, also when a test fails.
//!
//! The engine's counters are read from each host's management API (`status`: its `colo` object,
//! what `cargo xtask ctl status` prints); the per-epoch verify digests from the lines the driver
//! prints at every commit (`node: epoch N committed; ...; digest EPOCH:RAM-DISK`).

use std::time::Duration;

use qemu_tests::cluster::{Cluster, ClusterSpec, Host, Net, COLO_RUNNING, REPL_PORT};
use qemu_tests::netns;
use qemu_tests::ScratchDir;

const WAIT: Duration = Duration::from_secs(90);

/// A cluster with its scratch directory (dropped after the cluster).
struct Setup {
    cluster: Cluster,
    _dir: ScratchDir,
}

fn spec(tag: &str, subnet: u8, cmdline_extra: &str) -> (ClusterSpec, ScratchDir) {
    assert!(netns::available(), "the colo suite needs root and iproute2 (`cargo xtask deps`)");
    let dir = ScratchDir::new(tag).expect("scratch dir");
    let mut spec = ClusterSpec::new(dir.path(), tag, subnet);
    spec.cmdline_extra = cmdline_extra.into();
    (spec, dir)
}

fn start(tag: &str, subnet: u8, cmdline_extra: &str) -> Setup {
    let (spec, dir) = spec(tag, subnet, cmdline_extra);
    let cluster = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
    Setup { cluster, _dir: dir }
}

/// The engine's counters at the last commit a host printed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Commit {
    epoch: u64,
    /// mismatch, timeout, pressure, periodic, manual, full sync.
    by_cause: [u64; 6],
    verify_failures: u64,
}

/// The `colo` object of `host`'s `status` reply (what `cargo xtask ctl status` prints).
fn colo_status(c: &Cluster, host: Host) -> String {
    for _ in 0..5 {
        if let Ok(reply) = c.mgmt(host, r#"{"cmd":"status"}"#) {
            if let Some(at) = reply.find("\"colo\":{") {
                return reply[at..].to_string();
            }
            return String::new();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no status from the {host}:\n{}", c.serial(host))
}

/// The number after `"key":` in `json` (the first occurrence).
fn num(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let rest = json.split(&pat).nth(1).unwrap_or_else(|| panic!("no `{key}` in {json}"));
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("`{key}` in {json}"))
}

/// The engine's counters now (zero before the host publishes any).
fn last_commit(c: &Cluster, host: Host) -> Commit {
    let colo = colo_status(c, host);
    if colo.is_empty() {
        return Commit::default();
    }
    let mut by_cause = [0; 6];
    for (slot, cause) in by_cause.iter_mut().zip(["mismatch", "timeout", "pressure", "periodic", "manual", "full_sync"])
    {
        *slot = num(&colo, cause);
    }
    Commit { epoch: num(&colo, "committed"), by_cause, verify_failures: num(&colo, "verify_failures") }
}

/// Waits until `host` has committed an epoch after `epoch`.
fn wait_commit_after(c: &Cluster, host: Host, epoch: u64) -> Commit {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let commit = last_commit(c, host);
        if commit.epoch > epoch {
            return commit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no commit after epoch {epoch} on the {host}:\n{}",
            c.serial(host)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `redis-cli -h SERVICE ARGS` from the client namespace; its trimmed stdout.
fn cli(c: &Cluster, args: &[&str]) -> String {
    let ip = c.service_ip();
    let mut all = vec!["-h", ip.as_str()];
    all.extend_from_slice(args);
    let out = c.run(Net::Client, "redis-cli", &all, 30);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed ({}): {text}{}\nprimary:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        c.serial(Host::Primary)
    );
    text
}

/// Both hosts report COLO running and the verify counters are clean.
fn assert_colo_clean(c: &Cluster) {
    for host in Host::BOTH {
        let serial = c.serial(host);
        assert!(serial.contains(COLO_RUNNING), "the {host} never reached COLO:\n{serial}");
        let colo = colo_status(c, host);
        assert!(colo.contains("\"link\":\"colo\""), "the {host}'s status does not say COLO: {colo}");
        assert_eq!(num(&colo, "verify_failures"), 0, "verify failures on the {host}: {colo}\n{serial}");
        assert!(!serial.contains("refused:"), "the {host} refused a checkpoint:\n{serial}");
    }
}

#[test]
fn redis_set_get_incr_through_the_replicated_service() {
    let s = start("rset", 41, "");
    let c = &s.cluster;
    let before = wait_commit_after(c, Host::Primary, 0);
    assert_eq!(cli(c, &["set", "colo-key", "colo-value"]), "OK");
    assert_eq!(cli(c, &["get", "colo-key"]), "colo-value");
    for n in 1..=5 {
        assert_eq!(cli(c, &["incr", "counter"]), n.to_string());
    }
    assert!(c.status().contains(&format!("service: {}:6379", c.service_ip())));
    // A deterministic workload: checkpoints are the full sync and periodic ones only (a
    // timeout or mismatch here would mean PVM and SVM disagreed on deterministic replies).
    let after = wait_commit_after(c, Host::Primary, before.epoch + 1);
    assert_eq!(after.by_cause[0], 0, "mismatch checkpoints for a deterministic workload: {after:?}");
    assert!(after.by_cause[3] >= 1, "no periodic checkpoint: {after:?}");
    // The secondary committed the same epochs and its digests matched the primary's.
    wait_commit_after(c, Host::Secondary, before.epoch + 1);
    assert_colo_clean(c);
}

#[test]
fn ctl_checkpoint_raises_the_manual_counter_and_verifies() {
    let s = start("ctlc", 51, "checkpoint_ms=600000");
    let c = &s.cluster;
    let before = wait_commit_after(c, Host::Primary, 0);
    assert_eq!(before.by_cause[4], 0, "a manual checkpoint before any request: {before:?}");
    // The secondary refuses by name: checkpoints are the primary's.
    let refused = c.mgmt(Host::Secondary, r#"{"cmd":"checkpoint"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert!(refused.contains("\"ok\":false") && refused.contains("taken by the primary"), "{refused}");
    let reply = c.mgmt(Host::Primary, r#"{"cmd":"checkpoint"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.contains("\"ok\":true") && reply.contains("\"accepted\":true"), "{reply}");
    let after = wait_commit_after(c, Host::Primary, before.epoch);
    assert_eq!(after.by_cause[4], 1, "one request, one manual checkpoint: {before:?} -> {after:?}");
    assert_eq!(after.by_cause[3], before.by_cause[3], "checkpoint_ms=600000 took a periodic one");
    // The secondary applied and verified that epoch.
    let s_after = wait_commit_after(c, Host::Secondary, after.epoch - 1);
    assert!(s_after.epoch >= after.epoch, "{s_after:?} vs {after:?}");
    let p = colo_status(c, Host::Primary);
    for key in ["pause_us", "transfer_us"] {
        let part = p.split(&format!("\"{key}\":")).nth(1).expect(key);
        assert!(num(part, "count") >= 2, "{key}: no samples for the full sync and the manual checkpoint: {p}");
    }
    assert!(num(colo_status(c, Host::Secondary).split("\"apply_us\":").nth(1).expect("apply_us"), "count") >= 2);
    assert!(num(&p, "pages_last") > 0 && num(&p, "bytes_last") > 0, "{p}");
    assert_colo_clean(c);
}

/// A client that keeps one connection open across `rounds` manual checkpoints: `INCR key`, then
/// `checkpoint` on the primary's management API, then a pause; prints each reply.
fn incr_across_checkpoints(c: &Cluster, key: &str, rounds: u32) -> String {
    let script = r#"
import socket, sys, time
svc, mgmt, key, rounds, token = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4]), sys.argv[5]
def cmd(*words):
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
s = socket.create_connection((svc, 6379), timeout=30)
for i in range(rounds):
    s.sendall(cmd(b"INCR", key))
    print(s.recv(100).decode().strip(), flush=True)
    m = socket.create_connection((mgmt, 7070), timeout=30)
    m.sendall(b'{"cmd":"checkpoint","token":"%s"}\n' % token.encode())
    assert b'"ok":true' in m.recv(1000)
    m.close()
    time.sleep(1.5)
s.sendall(cmd(b"GET", key))
print(s.recv(100).decode().split()[-1], flush=True)
"#;
    let (svc, mgmt) = (c.service_ip(), c.mgmt_ip(Host::Primary));
    let token = std::fs::read_to_string(c.token_path()).expect("the cluster's mgmt-token");
    let args = ["-c", script, &svc, &mgmt, key, &rounds.to_string(), token.trim()];
    let out = c.run(Net::Client, "python3", &args, 120);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "client failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn differing_isns_are_translated_and_connections_survive_checkpoints() {
    // shim_isn=off: the guest's ISNs depend on time, so the SVM answers each SYN with another
    // ISN than the PVM and the secondary's rewriter translates the client's input for it.
    let (mut spec, dir) = spec("isn", 52, "checkpoint_ms=600000");
    spec.guest_extra = "shim_isn=off".into();
    let cluster = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
    let s = Setup { cluster, _dir: dir };
    let c = &s.cluster;
    wait_commit_after(c, Host::Primary, 0);
    let before = last_commit(c, Host::Primary);
    for i in 0..5 {
        assert_eq!(cli(c, &["set", &format!("isn-{i}"), &format!("v{i}")]), "OK");
        assert_eq!(cli(c, &["get", &format!("isn-{i}")]), format!("v{i}"));
    }
    let replies = incr_across_checkpoints(c, "isn-counter", 4);
    assert_eq!(replies.split_whitespace().collect::<Vec<_>>(), [":1", ":2", ":3", ":4", "4"], "{replies}");
    let after = wait_commit_after(c, Host::Primary, before.epoch + 3);
    assert!(after.by_cause[4] >= 4, "the manual checkpoints did not happen: {before:?} -> {after:?}");
    let secondary = colo_status(c, Host::Secondary);
    let rewritten = secondary.split("\"seq_rewritten\":").nth(1).expect("seq_rewritten");
    eprintln!("shim_isn=off: primary {before:?} -> {after:?}; secondary rewriter {rewritten}");
    // The ISNs differed: mirrored client input was translated into the SVM's sequence space and
    // the SVM's output back into the PVM's, and every connection above kept working across the
    // checkpoints. A new connection's SYN-ACK can still cost one mismatch checkpoint (the PVM's
    // ISN is learnt from the client's ACK): reported, not asserted away.
    assert!(num(rewritten, "client_frames") > 0, "nothing translated: ISNs did not differ? {secondary}");
    assert!(num(rewritten, "svm_frames") > 0, "SVM output was not translated: {secondary}");
    eprintln!(
        "[figure] differing ISNs: {} mismatch checkpoints for 6 connections",
        after.by_cause[0] - before.by_cause[0]
    );
    assert_colo_clean(c);
}

#[test]
fn each_time_request_diverges_and_forces_one_checkpoint() {
    let s = start("time", 42, "");
    let c = &s.cluster;
    let before = wait_commit_after(c, Host::Primary, 0);
    let mut replies = Vec::new();
    for _ in 0..5 {
        let reply = cli(c, &["time"]);
        let lines: Vec<&str> = reply.lines().collect();
        assert_eq!(lines.len(), 2, "TIME gives seconds and microseconds, exactly once: {reply:?}");
        replies.push(reply.clone());
    }
    replies.dedup();
    assert_eq!(replies.len(), 5, "TIME replies repeat: {replies:?}");
    // Each reply left with its checkpoint's commit, which is logged just after.
    let deadline = std::time::Instant::now() + WAIT;
    let mut after = last_commit(c, Host::Primary);
    while after.by_cause[0] < before.by_cause[0] + 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = last_commit(c, Host::Primary);
    }
    let mismatches = after.by_cause[0] - before.by_cause[0];
    assert!(mismatches >= 5, "5 TIME requests forced {mismatches} mismatch checkpoints: {before:?} -> {after:?}");
    wait_commit_after(c, Host::Secondary, after.epoch - 1);
    assert_colo_clean(c);
}

#[test]
fn a_small_queue_limit_forces_pressure_checkpoints_without_drops() {
    // compare_timeout_ms high so held frames wait for pressure (queue_limit=2), not the timeout.
    let s = start("pres", 43, "queue_limit=2 compare_timeout_ms=60000 checkpoint_ms=600000");
    let c = &s.cluster;
    let before = wait_commit_after(c, Host::Primary, 0);
    // 20 clients at once: their replies are held together, beyond two frames.
    let ip = c.service_ip();
    let args = ["-h", ip.as_str(), "-t", "set", "-n", "400", "-c", "20", "--csv"];
    let out = c.run(Net::Client, "redis-benchmark", &args, 300);
    assert!(out.status.success(), "redis-benchmark: {out:?}");
    assert_eq!(cli(c, &["get", "key:__rand_int__"]).len(), 3);
    // The checkpoint that released the replies commits (and is logged) just after they leave.
    let after = wait_commit_after(c, Host::Primary, before.epoch);
    assert!(after.by_cause[2] > before.by_cause[2], "no pressure checkpoint: {before:?} -> {after:?}");
    let primary = c.serial(Host::Primary);
    assert!(!primary.contains("not delivered"), "frames dropped:\n{primary}");
    for line in primary.lines().filter(|l| l.contains(" committed;")) {
        assert!(line.contains("(input dropped 0)") && line.contains("(dropped 0)"), "frames dropped: {line}");
    }
    let colo = colo_status(c, Host::Primary);
    assert_eq!((num(&colo, "input_dropped"), num(&colo, "svm_frames_dropped")), (0, 0), "{colo}");
    assert_colo_clean(c);
}

#[test]
fn redis_benchmark_runs_without_errors_and_its_writes_read_back() {
    let s = start("bnch", 48, "");
    let c = &s.cluster;
    let ip = c.service_ip();
    let args = ["-h", ip.as_str(), "-t", "set,get,incr", "-n", "20000", "-c", "20", "--csv"];
    let out = c.run(Net::Client, "redis-benchmark", &args, 900);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("redis-benchmark under COLO (QEMU TCG, AMD-V):\n{stdout}{stderr}");
    assert!(out.status.success(), "redis-benchmark failed: {}\n{stdout}{stderr}", out.status);
    for test in ["SET", "GET", "INCR"] {
        assert!(stdout.contains(&format!("\"{test}\"")), "no {test} line:\n{stdout}");
    }
    assert!(!stderr.to_lowercase().contains("error"), "{stderr}");
    // redis-benchmark 7 writes 3 random bytes per SET to `key:__rand_int__` (no -r) and INCRs
    // `counter:__rand_int__` once per request.
    assert_eq!(cli(c, &["get", "key:__rand_int__"]).len(), 3);
    assert_eq!(cli(c, &["get", "counter:__rand_int__"]), "20000");
    let now = last_commit(c, Host::Primary);
    wait_commit_after(c, Host::Secondary, now.epoch);
    assert_colo_clean(c);
}

/// The verify digests (`EPOCH:RAM-DISK`) a host printed at its commits, by epoch.
fn digests(c: &Cluster, host: Host) -> std::collections::BTreeMap<u64, (String, String)> {
    c.serial(host)
        .lines()
        .filter_map(|l| l.split("; digest ").nth(1))
        .filter_map(|d| {
            let (epoch, rest) = d.trim().split_once(':')?;
            let (ram, disk) = rest.split_once('-')?;
            Some((epoch.parse().ok()?, (ram.to_string(), disk.to_string())))
        })
        .collect()
}

#[test]
fn after_set_load_the_secondary_disk_digest_equals_the_primary_disk_digest() {
    let s = start("disk", 49, "");
    let c = &s.cluster;
    wait_commit_after(c, Host::Primary, 0);
    for i in 0..40 {
        assert_eq!(cli(c, &["set", &format!("disk-key-{i}"), &format!("value-{i}")]), "OK");
    }
    let p = wait_commit_after(c, Host::Primary, last_commit(c, Host::Primary).epoch);
    wait_commit_after(c, Host::Secondary, p.epoch);
    let (dp, ds) = (digests(c, Host::Primary), digests(c, Host::Secondary));
    let common: Vec<u64> = dp.keys().filter(|e| ds.contains_key(e)).copied().collect();
    assert!(common.len() >= 2, "no common epochs: primary {dp:?} secondary {ds:?}");
    for e in &common {
        assert_eq!(dp[e], ds[e], "epoch {e}: primary and secondary digests differ");
    }
    // The SETs reached the disk (guest-redis appends them to its log) and the disk changed.
    let (first, last) = (common[0], *common.last().expect("common"));
    assert_ne!(dp[&first].1, dp[&last].1, "the disk digest did not change between epochs {first} and {last}");
    assert_colo_clean(c);
}

/// Sends `bytes` to the secondary's replication port from the probe namespace, then half-closes
/// and waits up to 3 s for the host to close the connection; returns the script's output.
fn send_to_secondary_link(c: &Cluster, bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let script = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(bytes.fromhex(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
s.settimeout(3)
got = b""
try:
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
    print("closed by host after", len(got), "bytes")
except ConnectionResetError:
    print("reset by host after", len(got), "bytes")
except socket.timeout:
    print("still open after", len(got), "bytes")
"#;
    let ip = c.repl_ip(Host::Secondary);
    let out = c.run(Net::Repl, "python3", &["-c", script, &ip, &REPL_PORT.to_string(), &hex], 30);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "probe failed: {text}");
    text
}

#[test]
fn bad_bytes_on_the_replication_port_are_counted_and_colo_resumes() {
    // The link codec's own checks, reached from the probe namespace: only with repl_auth=off
    // (with the default, bytes that are not a handshake never reach the codec; the security
    // suite tests that).
    let s = start("link", 44, "repl_auth=off");
    let c = &s.cluster;
    assert_eq!(cli(c, &["set", "before", "1"]), "OK");

    // Garbage: a named error, that connection closed, the host up, the primary back: full sync,
    // COLO again.
    let probe = send_to_secondary_link(c, b"GARBAGE GARBAGE GARBAGE\r\n");
    assert!(!probe.contains("still open"), "the secondary kept a connection that sent garbage: {probe}");
    let serial =
        c.wait_for(Host::Secondary, "node: link error `bad_magic` (total 1)", WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(serial.contains("closed: protocol error `bad_magic`"), "{serial}");
    let errors = colo_status(c, Host::Secondary);
    let errors = errors.split("\"link_errors\":").nth(1).expect("link_errors");
    assert_eq!(num(errors, "bad_magic"), 1, "{errors}");
    c.wait_for_count(Host::Secondary, COLO_RUNNING, 2, WAIT).unwrap_or_else(|e| panic!("COLO did not resume: {e}"));
    c.wait_for_count(Host::Primary, COLO_RUNNING, 2, WAIT).unwrap_or_else(|e| panic!("{e}"));

    // A message cut short: the header of a 16-byte heartbeat, 4 bytes of payload, then FIN.
    let mut cut = b"CL".to_vec();
    cut.extend_from_slice(&[1, 9]);
    cut.extend_from_slice(&16u32.to_le_bytes());
    cut.extend_from_slice(&[0; 4]);
    send_to_secondary_link(c, &cut);
    c.wait_for(Host::Secondary, "node: link error `truncated` (total 1)", WAIT).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for_count(Host::Secondary, COLO_RUNNING, 3, WAIT).unwrap_or_else(|e| panic!("COLO did not resume: {e}"));

    // The service kept its data; the next checkpoint verifies.
    assert_eq!(cli(c, &["get", "before"]), "1");
    assert_eq!(cli(c, &["set", "after", "2"]), "OK");
    let now = last_commit(c, Host::Primary);
    wait_commit_after(c, Host::Secondary, now.epoch);
    assert!(c.alive(Host::Secondary) && c.alive(Host::Primary));
    assert_colo_clean(c);
}

#[test]
fn either_host_may_boot_first() {
    for (first, second, subnet) in [(Host::Secondary, Host::Primary, 45), (Host::Primary, Host::Secondary, 46)] {
        let (spec, _dir) = spec(&format!("ord{subnet}"), subnet, "");
        let mut c = Cluster::prepare(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
        c.boot(first).unwrap_or_else(|e| panic!("{e}"));
        let waiting = if first == Host::Primary { "redis: listening on" } else { "listening on TCP port" };
        c.wait_for(first, waiting, WAIT).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_secs(3));
        c.boot(second).unwrap_or_else(|e| panic!("{e}"));
        c.wait_ready(WAIT).unwrap_or_else(|e| panic!("{first} first: {e}"));
        assert_eq!(cli(&c, &["set", "order", first.name()]), "OK");
        assert_eq!(cli(&c, &["get", "order"]), first.name());
        assert_colo_clean(&c);
    }
}

#[test]
fn a_new_secondary_joins_after_the_old_one_is_killed() {
    let s = start("join", 50, "");
    let mut c = s.cluster;
    assert_eq!(cli(&c, &["set", "before", "1"]), "OK");
    c.kill(Host::Secondary).unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.alive(Host::Secondary));
    c.boot(Host::Secondary).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for_count(Host::Primary, COLO_RUNNING, 2, WAIT).unwrap_or_else(|e| panic!("no COLO again: {e}"));
    c.wait_for(Host::Secondary, COLO_RUNNING, WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cli(&c, &["get", "before"]), "1");
    assert_eq!(cli(&c, &["incr", "before"]), "2");
    let now = last_commit(&c, Host::Primary);
    wait_commit_after(&c, Host::Secondary, now.epoch);
    assert_colo_clean(&c);
}

#[test]
fn a_stopped_cluster_leaves_nothing_behind() {
    let s = start("stop", 47, "");
    let ns = s.cluster.client_netns();
    drop(s);
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns), "namespace {ns} left behind");
    let links = std::process::Command::new("ip").args(["-o", "link"]).output().expect("ip link");
    let id = ns.trim_start_matches("colo-c");
    assert!(!String::from_utf8_lossy(&links.stdout).contains(id), "interfaces of {id} left behind");
}

/// The figures for issue 11's closing note (not a test: nothing is asserted about speed):
/// `redis-benchmark -t set,get -n 10000 -c 20 --csv` against the same guest standalone (one
/// QEMU TCG host, `role=standalone`) and replicated (the cluster), one run each, with both hosts'
/// `colo` status after the COLO run. Run with
/// `cargo test -p qemu-tests --test colo -- --ignored --nocapture measure`.
#[test]
#[ignore = "a measurement, run on demand"]
fn measure_colo_against_standalone() {
    let bench = |c: &Cluster| {
        let ip = c.service_ip();
        let args = ["-h", ip.as_str(), "-t", "set,get", "-n", "10000", "-c", "20", "--csv"];
        let started = std::time::Instant::now();
        let out = c.run(Net::Client, "redis-benchmark", &args, 900);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        format!("{text}(wall {:.1} s)", started.elapsed().as_secs_f64())
    };
    // COLO_MEASURE_GUEST / COLO_MEASURE_CMDLINE: extra guest and kernel words (experiments).
    let guest_extra = std::env::var("COLO_MEASURE_GUEST").unwrap_or_default();
    let cmdline_extra = std::env::var("COLO_MEASURE_CMDLINE").unwrap_or_default();
    let alone = if std::env::var_os("COLO_MEASURE_COLO_ONLY").is_some() {
        String::from("(skipped)")
    } else {
        let (mut spec_s, _dir_s) = spec("msta", 53, "role=standalone");
        spec_s.guest_extra = guest_extra.clone();
        let mut standalone = Cluster::prepare(spec_s).unwrap_or_else(|e| panic!("{e}"));
        standalone.boot(Host::Primary).unwrap_or_else(|e| panic!("{e}"));
        standalone.wait_for(Host::Primary, "redis: listening on", WAIT).unwrap_or_else(|e| panic!("{e}"));
        bench(&standalone)
    };
    let (mut spec_c, dir_c) = spec("mcol", 54, &cmdline_extra);
    spec_c.guest_extra = guest_extra;
    let s = Setup { cluster: Cluster::start(spec_c).unwrap_or_else(|e| panic!("cluster: {e}")), _dir: dir_c };
    let colo = bench(&s.cluster);
    eprintln!("standalone:\n{alone}\nCOLO:\n{colo}");
    for host in Host::BOTH {
        eprintln!("{host}: {}", colo_status(&s.cluster, host));
    }
}
