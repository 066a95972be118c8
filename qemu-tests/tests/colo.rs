//! Suite `colo` (root): two emulated hosts (QEMU TCG, AMD-V with NPT) started with
//! `qemu_tests::cluster`, the same cluster `cargo xtask cluster start` gives a person. Run
//! through `cargo xtask test --suite colo` (builds the kernel and guests first).
//!
//! Each test has its own cluster directory under `target/harness/` and its own subnets
//! (10.78.S.0/24 clients, 10.79.S.0/24 replication); the cluster's drop kills both emulators and
//! removes its namespaces, taps and bridges, also when a test fails.

use std::time::Duration;

use qemu_tests::cluster::{Cluster, ClusterSpec, Host, Net, LINK_UP, REPL_PORT};
use qemu_tests::netns;
use qemu_tests::ScratchDir;

const WAIT: Duration = Duration::from_secs(60);

/// A started cluster with its scratch directory (dropped after the cluster).
struct Setup {
    cluster: Cluster,
    _dir: ScratchDir,
}

fn start(tag: &str, subnet: u8, cmdline_extra: &str) -> Setup {
    assert!(netns::available(), "the colo suite needs root and iproute2 (`cargo xtask deps`)");
    let dir = ScratchDir::new(tag).expect("scratch dir");
    let mut spec = ClusterSpec::new(dir.path(), tag, subnet);
    spec.cmdline_extra = cmdline_extra.into();
    let cluster = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
    Setup { cluster, _dir: dir }
}

/// Sends `bytes` to the secondary's replication port from the probe namespace, then half-closes
/// and waits up to 3 s for the host to close the connection; returns the script's output.
fn send_to_secondary_link(c: &Cluster, bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let script = r#"
import socket, sys, time
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
fn replication_link_connects_carries_messages_both_ways_and_refuses_bad_bytes() {
    let s = start("link", 31, "heartbeat_ms=100");
    let c = &s.cluster;
    // Both directions: each host received the other's Hello and heartbeats.
    let primary =
        c.wait_for(Host::Primary, "node: first heartbeat from the peer", WAIT).unwrap_or_else(|e| panic!("{e}"));
    let secondary =
        c.wait_for(Host::Secondary, "node: first heartbeat from the peer", WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(primary.contains("node: link up: hello from the Secondary host"), "{primary}");
    assert!(secondary.contains("node: link up: hello from the Primary host"), "{secondary}");
    let status = c.mgmt(Host::Secondary, r#"{"cmd":"status"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.contains(r#""roles":"repl""#), "{status}");

    // Garbage: a named error, that connection closed, the host up, the primary back on the link.
    let probe = send_to_secondary_link(c, b"GARBAGE GARBAGE GARBAGE\r\n");
    assert!(!probe.contains("still open"), "the secondary kept a connection that sent garbage: {probe}");
    let serial = c
        .wait_for(Host::Secondary, "repl: connection 2 closed: protocol error `bad_magic`", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(serial.contains("node: link error `bad_magic`"), "{serial}");
    c.wait_for_count(Host::Secondary, LINK_UP, 2, WAIT)
        .unwrap_or_else(|e| panic!("the primary did not come back: {e}"));
    c.wait_for_count(Host::Primary, LINK_UP, 2, WAIT).unwrap_or_else(|e| panic!("{e}"));

    // A message cut short (header of a 16-byte heartbeat, 4 bytes of payload, then FIN).
    let mut cut = b"CL".to_vec();
    cut.extend_from_slice(&[1, 9]);
    cut.extend_from_slice(&16u32.to_le_bytes());
    cut.extend_from_slice(&[0; 4]);
    send_to_secondary_link(c, &cut);
    let serial = c.wait_for(Host::Secondary, "node: link error `truncated`", WAIT).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for_count(Host::Secondary, LINK_UP, 3, WAIT)
        .unwrap_or_else(|e| panic!("the primary did not come back: {e}"));
    let last_counters = serial.lines().filter(|l| l.contains("repl: connection")).last().unwrap_or("");
    assert!(last_counters.contains("bad_magic=1"), "{last_counters}");
    assert!(c.alive(Host::Secondary) && c.alive(Host::Primary));
    let status = c.mgmt(Host::Secondary, r#"{"cmd":"status"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.contains(r#""ok":true"#), "{status}");
}

#[test]
fn cluster_serves_the_guest_and_cleans_up() {
    let s = start("serv", 32, "");
    let c = &s.cluster;
    let ip = c.service_ip();
    let out = c.run(Net::Client, "redis-cli", &["-h", &ip, "set", "colo-key", "colo-value"], 30);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "{out:?}");
    let out = c.run(Net::Client, "redis-cli", &["-h", &ip, "get", "colo-key"], 30);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "colo-value", "{out:?}");
    assert!(c.status().contains(&format!("service: {ip}:6379")));
    let ns = c.client_netns();
    drop(s);
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns), "namespace {ns} left behind");
}
