//! Suite `net`: the hypervisor boots under QEMU TCG with an e1000 on a tap in a bridge; a client
//! in its own network namespace on that bridge pings the management address, talks to the JSON
//! API with the real `cargo xtask ctl` binary, scrapes the metrics page (checked with
//! `promtool check metrics`), sends malformed requests and malformed Ethernet frames, and shuts
//! the hypervisor down. Run through `cargo xtask test --suite net` (root; builds the kernel and
//! `xtask` first). Addresses: 10.77.N.0/24 inside the test's own bridge and namespace only.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::standalone::{HostOptions, StandaloneHost};
use qemu_tests::QEMU_EXIT_SUCCESS;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// A standalone host without guests on its own test network.
struct Setup(StandaloneHost);

impl std::ops::Deref for Setup {
    type Target = StandaloneHost;
    fn deref(&self) -> &StandaloneHost {
        &self.0
    }
}

impl std::ops::DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut StandaloneHost {
        &mut self.0
    }
}

impl Setup {
    /// Boots with `mgmt_addr=10.77.SUBNET.2/24` and a fresh `mgmt-token`; the client is
    /// 10.77.SUBNET.1.
    fn boot(tag: &str, subnet: u8) -> Self {
        Self(StandaloneHost::boot(&HostOptions { timeout: BOOT_TIMEOUT, ..HostOptions::new(tag, subnet) }))
    }

    /// `xtask ctl ARGS --addr IP:7070` from the namespace; returns (success, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let addr = format!("{}:7070", self.mgmt_ip);
        let xtask = xtask_binary();
        let mut all: Vec<&str> = vec!["ctl"];
        all.extend_from_slice(args);
        let token_file = self.token_file.to_string_lossy().into_owned();
        all.extend_from_slice(&["--addr", &addr, "--token-file", &token_file]);
        let mut c = Command::new("timeout");
        c.args(["20", "ip", "netns", "exec", &self.net.netns]).arg(&xtask).args(&all);
        c.env("COLO_CTL_TIMING", "1").stdin(Stdio::null());
        let out = c.output().expect("running xtask ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn status_ok(&self) -> String {
        let (ok, out, err) = self.ctl(&["status"]);
        assert!(ok, "ctl status failed: {out}{err}");
        out
    }

    fn python(&self, script: &str, args: &[&str]) -> Output {
        let mut all = vec!["-c", script];
        all.extend_from_slice(args);
        self.run("python3", &all, 30)
    }
}

fn xtask_binary() -> PathBuf {
    let path = qemu_tests::target_dir().join("debug/xtask");
    assert!(path.is_file(), "{} is missing: build it with `cargo build -p xtask`", path.display());
    path
}

/// The first `"name":N` in a JSON text.
fn field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let start = json.find(&key).unwrap_or_else(|| panic!("no {name} in {json}")) + key.len();
    json[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a number")
}

/// Round trip of `ctl` as it reports it on stderr (`ctl: round trip X ms`).
fn round_trip_ms(stderr: &str) -> Option<f64> {
    stderr.split("round trip ").nth(1)?.split_whitespace().next()?.parse().ok()
}

#[test]
fn ping_reaches_the_management_address() {
    let s = Setup::boot("ping", 11);
    // The first exchange includes ARP and the emulator warming up; measure after it.
    let _ = s.run("ping", &["-c", "1", "-W", "5", &s.mgmt_ip], 10);
    let out = s.run("ping", &["-c", "10", "-i", "0.2", "-W", "2", &s.mgmt_ip], 30);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(" 0% packet loss"), "{text}");
    let rtt = text.lines().find(|l| l.contains("rtt")).unwrap_or("");
    eprintln!("[timing] ping 10.77.11.2 (QEMU TCG e1000): {rtt}");
}

#[test]
fn ctl_status_reports_role_uptime_and_counters() {
    let s = Setup::boot("stat", 12);
    let out = s.run("ping", &["-c", "3", "-i", "0.2", &s.mgmt_ip], 20);
    assert!(out.status.success(), "ping: {}", String::from_utf8_lossy(&out.stdout));
    let status = s.status_ok();
    assert!(status.contains("\"ok\":true"), "{status}");
    assert!(status.contains("\"role\":\"standalone\""), "{status}");
    assert!(status.contains(&format!("\"mac\":\"{}\"", s.nic_mac)), "{status}");
    assert!(status.contains("\"link_up\":true"), "{status}");
    assert!(field(&status, "uptime_ms") > 0, "{status}");
    assert!(field(&status, "rx_frames") >= 3 && field(&status, "tx_frames") >= 3, "{status}");
    assert!(field(&status, "rx_bytes") > 0 && field(&status, "tx_bytes") > 0, "{status}");
    // Uptime moves forward.
    std::thread::sleep(Duration::from_millis(300));
    let later = s.status_ok();
    assert!(field(&later, "uptime_ms") > field(&status, "uptime_ms"), "{status}\n{later}");

    let (ok, out, _) = s.ctl(&["set", "heartbeat_ms", "50"]);
    assert!(ok && out.contains("\"old\":100") && out.contains("\"value\":50"), "{out}");
    let (ok, out, _) = s.ctl(&["tunables"]);
    assert!(ok && out.contains("\"heartbeat_ms\":50"), "{out}");
    let (ok, out, _) = s.ctl(&["stats"]);
    assert!(ok && out.contains("\"mgmt\":{\"requests\":"), "{out}");
    for cmd in ["checkpoint", "failover"] {
        let (ok, out, _) = s.ctl(&[cmd]);
        assert!(!ok && out.contains("not available until replication is running"), "{cmd}: {out}");
    }

    let mut times = Vec::new();
    for _ in 0..20 {
        let (ok, out, err) = s.ctl(&["status"]);
        assert!(ok, "{out}{err}");
        times.extend(round_trip_ms(&err));
    }
    times.sort_by(f64::total_cmp);
    if !times.is_empty() {
        eprintln!(
            "[timing] ctl status round trip (connect+request+reply, QEMU TCG): min {:.2} ms, median {:.2} ms, max {:.2} ms over {}",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            times.len()
        );
    }
}

#[test]
fn metrics_page_passes_promtool() {
    let s = Setup::boot("metr", 13);
    s.status_ok();
    let url = format!("http://{}:9100/metrics", s.mgmt_ip);
    let started = Instant::now();
    let out = s.run("curl", &["-sS", "-m", "10", "-D", "-", &url], 20);
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    for needle in
        ["colo_up{role=\"standalone\"} 1", "colo_nic_rx_frames_total{nic=\"nic0\"", "colo_mgmt_requests_total 1"]
    {
        assert!(body.contains(needle), "missing `{needle}` in:\n{body}");
    }
    eprintln!(
        "[timing] metrics page ({} bytes) via curl incl. process start, QEMU TCG: {:.1} ms",
        body.len(),
        elapsed.as_secs_f64() * 1e3
    );

    qemu_tests::standalone::assert_promtool_accepts(body);

    // Wrong path, wrong method, garbage: error statuses, and the page still works after.
    let out = s.run(
        "curl",
        &["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}:9100/x", s.mgmt_ip)],
        20,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let out = s.run("curl", &["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", &url], 20);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
    let out = s.run("curl", &["-sS", "-m", "10", &url], 20);
    assert!(String::from_utf8_lossy(&out.stdout).contains("colo_metrics_scrapes_total 1"), "{:?}", out);
}

const GARBAGE_TCP: &str = r#"
import socket, sys, os
host, port = sys.argv[1], int(sys.argv[2])
results = []
# 1. 20 KB of random bytes without a newline: an error reply or a closed connection.
s = socket.create_connection((host, port), timeout=10)
try:
    s.sendall(os.urandom(20000))
except OSError as e:
    pass
data = b""
try:
    while True:
        d = s.recv(65536)
        if not d: break
        data += d
except OSError as e:
    data += b"<" + type(e).__name__.encode() + b">"
s.close()
print("garbage:", data[:300])
# 2. Binary lines: one named error per line, connection stays open.
s = socket.create_connection((host, port), timeout=10)
s.sendall(b"\x00\xff\xfe garbage\n{\"cmd\":\"status\"}\n")
f = s.makefile("rb")
print("line1:", f.readline()[:300])
print("line2:", f.readline()[:80])
s.close()
# 3. Connect and close without a byte, twice.
for _ in range(2):
    socket.create_connection((host, port), timeout=10).close()
# 4. Garbage to the metrics port.
s = socket.create_connection((host, 9100), timeout=10)
s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
print("http:", s.recv(200)[:40])
s.close()
"#;

#[test]
fn malformed_requests_get_named_errors_and_service_continues() {
    let s = Setup::boot("bad", 14);
    for (raw, code, detail) in [
        ("{\"cmd\":", "bad_json", "expected a JSON value at byte 7, found end of input"),
        ("not json", "bad_json", "found `n`"),
        ("{\"cmd\":\"reboot\"}", "unknown_command", "unknown command `reboot`; accepted: status"),
        ("{\"command\":\"status\"}", "bad_request", "request has no `cmd`"),
        (
            "{\"cmd\":\"set\",\"key\":\"heartbeat_ms\",\"value\":1,\"token\":\"TOKEN\"}",
            "bad_value",
            "bad value `1` for `heartbeat_ms`",
        ),
    ] {
        // `raw` is sent as is: a mutating command carries the token in its own text.
        let raw = &raw.replace("TOKEN", &s.token);
        let (ok, out, err) = s.ctl(&["raw", raw]);
        assert!(!ok, "{raw}: {out}");
        assert!(out.contains(&format!("\"error\":\"{code}\"")), "{raw}: {out}{err}");
        assert!(out.contains(detail), "{raw}: {out}");
    }
    let oversized = format!("{{\"cmd\":\"{}\"}}", "x".repeat(5000));
    let (ok, out, err) = s.ctl(&["raw", &oversized]);
    assert!(!ok && out.contains("\"error\":\"too_large\"") && out.contains("at most 4096 bytes"), "{out}{err}");
    s.status_ok();

    let out = s.python(GARBAGE_TCP, &[&s.mgmt_ip, "7070"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "garbage client failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("garbage client saw:\n{text}");
    let garbage = text.lines().find(|l| l.starts_with("garbage:")).unwrap();
    assert!(garbage.contains("too_large") || garbage.contains("bad_json") || garbage.contains("Reset"), "{garbage}");
    assert!(text.contains("line1: b'{\"ok\":false,\"error\":\"bad_json\""), "{text}");
    assert!(text.contains("line2: b'{\"ok\":true,\"cmd\":\"status\""), "{text}");
    assert!(text.contains("http: b'HTTP/1.1 400 Bad Request"), "{text}");

    let status = s.status_ok();
    let (_, stats, _) = s.ctl(&["stats"]);
    assert!(field(&stats, "request_errors") >= 8, "{stats}");
    assert!(status.contains("\"ok\":true"));
}

const BAD_FRAMES: &str = r#"
import socket, struct, sys
ifname, dst_ip = sys.argv[1], sys.argv[2]
dst = bytes.fromhex(sys.argv[3].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = s.getsockname()[4]
src_ip = socket.inet_aton(sys.argv[4])
dip = socket.inet_aton(dst_ip)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff
def ipv4(proto, payload, good=True, version=4, total=None):
    total = total if total is not None else 20 + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", (version << 4) | 5, 0, total, 1, 0, 64, proto, 0, src_ip, dip)
    c = csum(h) if good else (csum(h) ^ 0x5555)
    return h[:10] + struct.pack("!H", c) + h[12:] + payload
def eth(t, payload): return dst + src + struct.pack("!H", t) + payload
icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"x" * 16
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
tcp = struct.pack("!HHIIBBHHH", 40000, 7070, 1, 0, 5 << 4, 0x02, 1000, 0xdead, 0)
bad = [
    ("ipv4 bad header checksum", eth(0x0800, ipv4(1, icmp, good=False))),
    ("ipv4 IHL beyond the frame", eth(0x0800, b"\x4f" + b"\0" * 9)),
    ("ipv4 total length beyond the frame", eth(0x0800, ipv4(1, icmp, total=1400))),
    ("ipv4 ethertype carrying version 6", eth(0x0800, ipv4(1, icmp, version=6))),
    ("tcp bad checksum", eth(0x0800, ipv4(6, tcp))),
    ("icmp bad checksum", eth(0x0800, ipv4(1, icmp[:2] + b"\0\0" + icmp[4:]))),
    ("arp with absurd address lengths", eth(0x0806, struct.pack("!HHBBH", 1, 0x0800, 200, 200, 1) + b"\0" * 30)),
]
dropped = [
    ("unknown ethertype", eth(0x88b5, b"garbage!" * 8)),
    ("ipv4 to another unicast MAC", b"\x02\x00\x00\x00\x00\x99" + src + b"\x08\x00" + ipv4(1, icmp)),
]
for rounds in range(3):
    for name, f in bad + dropped:
        s.send(f)
# The first four are malformed at the IPv4 header, which a host bridge with br_netfilter
# (bridge-nf-call-iptables=1) validates and drops itself before they reach the tap.
print(len(bad) * 3, 4 * 3, len(dropped) * 3)
"#;

#[test]
fn malformed_frames_are_counted_and_harmless() {
    let mut s = Setup::boot("frm", 15);
    let before = s.status_ok();
    let (errors0, dropped0) = (field(&before, "rx_errors"), field(&before, "rx_dropped"));
    let out = s.python(BAD_FRAMES, &[&s.net.veth_ns.clone(), &s.mgmt_ip, &s.nic_mac, "10.77.15.1"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "frame injector failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    let mut counts = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    let (bad, ip_header_level, unwanted) = (counts.next().unwrap(), counts.next().unwrap(), counts.next().unwrap());
    let bridge_filters =
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").is_ok_and(|v| v.trim() == "1");
    let expected = if bridge_filters {
        eprintln!(
            "note: br_netfilter is active on this machine (bridge-nf-call-iptables=1): the bridge drops the \
             {ip_header_level} frames with broken IPv4 headers itself, so only {} malformed frames reach the NIC",
            bad - ip_header_level
        );
        bad - ip_header_level
    } else {
        bad
    };
    std::thread::sleep(Duration::from_millis(500));
    let ping = s.run("ping", &["-c", "3", "-i", "0.2", "-W", "2", &s.mgmt_ip], 20);
    assert!(ping.status.success(), "ping after bad frames: {}", String::from_utf8_lossy(&ping.stdout));
    let after = s.status_ok();
    let (errors1, dropped1) = (field(&after, "rx_errors"), field(&after, "rx_dropped"));
    eprintln!("rx_errors {errors0} -> {errors1} (sent {bad} malformed), rx_dropped {dropped0} -> {dropped1} (sent {unwanted} unwanted; the bridge may not forward frames for unknown MACs)");
    assert_eq!(errors1 - errors0, expected, "every malformed frame is counted as an error:\n{after}");
    assert!(dropped1 - dropped0 >= 3, "unknown-ethertype frames are counted as drops:\n{after}");
    assert!(!s.machine().serial().contains("PANIC"), "{}", s.machine().serial());
}

#[test]
fn shutdown_ends_the_hypervisor_with_success() {
    let mut s = Setup::boot("shut", 16);
    s.status_ok();
    let (ok, out, err) = s.ctl(&["shutdown"]);
    assert!(ok && out.contains("\"cmd\":\"shutdown\""), "{out}{err}");
    let machine = s.take_machine();
    let outcome = machine.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.exit_code, Some(QEMU_EXIT_SUCCESS), "{}", outcome.serial);
    assert_eq!(outcome.verdict, Some(0), "{}", outcome.serial);
    assert!(outcome.serial.contains("shutdown requested over the management API"), "{}", outcome.serial);
}

// ------------------------------------------------------------------------------------------
// The guest service: `guest-redis` on the paravirtual NIC and block device, reached from the
// client namespace through tap + bridge + e1000 + the hypervisor's forwarding hook.
// ------------------------------------------------------------------------------------------

/// The serial line `guest-redis` prints once it listens.
const REDIS_LISTENING: &str = "redis: listening on";
/// How long a guest test may take end to end.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A standalone host with guests on its own test network.
struct GuestSetup(StandaloneHost);

impl std::ops::Deref for GuestSetup {
    type Target = StandaloneHost;
    fn deref(&self) -> &StandaloneHost {
        &self.0
    }
}

impl std::ops::DerefMut for GuestSetup {
    fn deref_mut(&mut self) -> &mut StandaloneHost {
        &mut self.0
    }
}

impl GuestSetup {
    /// Boots with `guests` (binary name, module arguments; `{ip}` and `{mac}` are replaced) and,
    /// when `disk_kib` is set, a zeroed disk module `disk-data` of that size.
    fn boot(tag: &str, subnet: u8, guests: &[(&str, &str)], disk_kib: Option<usize>, wait_for: &str) -> Self {
        let options =
            HostOptions { guests, disk_kib, wait_for, timeout: GUEST_TIMEOUT, ..HostOptions::new(tag, subnet) };
        Self(StandaloneHost::boot(&options))
    }

    /// `redis-cli -h GUEST ARGS`; returns its trimmed stdout (failing on a non-zero exit).
    fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-h", self.guest_ip.as_str(), "-p", "6379"];
        all.extend_from_slice(args);
        let out = self.run("redis-cli", &all, 30);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "redis-cli {args:?} failed ({}): {text}{}\nserial:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.serial()
        );
        text
    }
}

#[test]
fn redis_cli_round_trips_through_the_guest() {
    let s = GuestSetup::boot(
        "rcli",
        21,
        &[("guest-redis", "ip={ip} mac={mac} time_limit_ms=600000")],
        None,
        REDIS_LISTENING,
    );
    let started = Instant::now();
    assert_eq!(s.cli(&["PING"]), "PONG");
    eprintln!("[timing] first PING (ARP + connect) {:.0} ms", started.elapsed().as_secs_f64() * 1000.0);
    assert_eq!(s.cli(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(s.cli(&["GET", "greeting"]), "hello world");
    assert_eq!(s.cli(&["ECHO", "abc"]), "abc");
    assert_eq!(s.cli(&["GET", "missing"]), "");
    assert_eq!(s.cli(&["INCR", "n"]), "1");
    assert_eq!(s.cli(&["INCR", "n"]), "2");
    assert_eq!(s.cli(&["MSET", "a", "1", "b", "2"]), "OK");
    assert_eq!(s.cli(&["MGET", "a", "b", "zz"]), "1\n2");
    assert_eq!(s.cli(&["EXISTS", "a", "b", "zz"]), "2");
    assert_eq!(s.cli(&["DBSIZE"]), "4");
    assert_eq!(s.cli(&["DEL", "a", "zz"]), "1");
    assert!(s.cli(&["INCR", "greeting"]).contains("not an integer"));
    assert!(s.cli(&["NOSUCHCMD"]).contains("unknown command"));
    assert_eq!(s.cli(&["FLUSHALL"]), "OK");
    assert_eq!(s.cli(&["DBSIZE"]), "0");
    let started = Instant::now();
    for i in 0..10 {
        assert_eq!(s.cli(&["SET", &format!("k{i}"), "v"]), "OK");
    }
    eprintln!(
        "[timing] redis-cli SET (new process + connection each): {:.1} ms mean",
        started.elapsed().as_secs_f64() * 100.0
    );
}

/// Raw RESP over one connection: malformed requests get errors and the connection survives;
/// pipelined requests get their replies in order.
const RAW_RESP: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 6379), timeout=10)
def exchange(data, want):
    s.sendall(data)
    got = b""
    deadline = time.time() + 10
    while got.count(b"\r\n") < want and time.time() < deadline:
        got += s.recv(65536)
    return got
print(repr(exchange(b"*abc\r\n", 1)))
print(repr(exchange(b"*1\r\n$x\r\n", 1)))
print(repr(exchange(b"*2\r\n$3\r\nGET\r\n$99999999999\r\n", 1)))
print(repr(exchange(b"*1\r\n$4\r\nPINGXX\r\n", 1)))
print(repr(exchange(b"PING\r\n", 1)))
print(repr(exchange(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n" * 50 + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 52)))
print(repr(exchange(b"*1\r\n$3\r\nGET\r\n", 1)))
"#;

#[test]
fn malformed_resp_gets_errors_and_the_connection_survives() {
    let s = GuestSetup::boot(
        "rbad",
        22,
        &[("guest-redis", "ip={ip} mac={mac} time_limit_ms=600000")],
        None,
        REDIS_LISTENING,
    );
    let out = s.run("python3", &["-c", RAW_RESP, &s.guest_ip], 60);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(lines[0].contains("-ERR Protocol error: invalid multibulk length"), "{text}");
    assert!(lines[1].contains("-ERR Protocol error: invalid bulk length"), "{text}");
    assert!(lines[2].contains("-ERR Protocol error: invalid bulk length"), "{text}");
    assert!(lines[3].contains("-ERR Protocol error"), "{text}");
    assert!(lines[4].contains("+PONG"), "connection survived: {text}");
    assert!(lines[5].starts_with("b'+OK\\r\\n") && lines[5].ends_with("$1\\r\\nv\\r\\n'"), "{text}");
    assert!(lines[6].contains("wrong number of arguments"), "{text}");
}

#[test]
fn redis_benchmark_set_get_completes_without_errors() {
    let mut s = GuestSetup::boot(
        "rbench",
        23,
        &[("guest-redis", "ip={ip} mac={mac} disk=data time_limit_ms=900000")],
        Some(8192),
        REDIS_LISTENING,
    );
    assert_eq!(s.cli(&["PING"]), "PONG");
    let ip = s.guest_ip.clone();
    let out = s.run("redis-benchmark", &["-h", &ip, "-t", "set,get", "-n", "10000", "-c", "20", "--csv"], 600);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("redis-benchmark:\n{stdout}{stderr}");
    assert!(out.status.success(), "redis-benchmark failed: {}\n{stdout}{stderr}", out.status);
    assert!(!stderr.to_lowercase().contains("error") && !stdout.to_lowercase().contains("error"), "{stdout}{stderr}");
    let rows = qemu_tests::report::parse_redis_benchmark_csv(&stdout);
    assert_eq!(rows.len(), 2, "{stdout}");
    for r in &rows {
        assert!(r.rps > 0.0, "{}: {}", r.test, r.rps);
        eprintln!(
            "[bench] QEMU TCG + AMD-V, guest-redis, -n 10000 -c 20: {}: {:.0} req/s, p50 {} ms, p99 {} ms",
            r.test, r.rps, r.p50_ms, r.p99_ms
        );
    }
    // The guest is still healthy and its data is there.
    // redis-benchmark 7 writes 3 random bytes per SET to this key.
    assert_eq!(s.cli(&["GET", "key:__rand_int__"]).len(), 3);
    let out = s.run("ping", &["-c", "1", "-W", "5", &s.mgmt_ip], 10);
    assert!(out.status.success(), "management address still answers:\n{}", s.machine().serial());
}

#[test]
fn redis_data_survives_a_guest_restart() {
    let mut s = GuestSetup::boot(
        "rrst",
        24,
        &[("guest-redis", "ip={ip} mac={mac} disk=data restarts=1 time_limit_ms=600000")],
        Some(1024),
        REDIS_LISTENING,
    );
    assert_eq!(s.cli(&["SET", "survivor", "still here"]), "OK");
    assert_eq!(s.cli(&["INCR", "count"]), "1");
    assert_eq!(s.cli(&["INCR", "count"]), "2");
    assert_eq!(s.cli(&["SET", "gone", "x"]), "OK");
    assert_eq!(s.cli(&["DEL", "gone"]), "1");
    // SHUTDOWN closes the connection without a reply (as in Redis); the exit status does not matter.
    let _ = s.run("redis-cli", &["-h", &s.guest_ip, "SHUTDOWN"], 20);
    s.machine().wait_for("run 2 of 2", GUEST_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    s.machine().wait_for("2 keys restored", GUEST_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.cli(&["GET", "survivor"]), "still here");
    assert_eq!(s.cli(&["GET", "count"]), "2");
    assert_eq!(s.cli(&["EXISTS", "gone"]), "0");
    let serial = s.machine().serial();
    assert!(serial.contains("guest `guest-redis` shut down with status 0") || serial.contains("status 0"), "{serial}");
}

#[test]
fn hostile_rings_are_refused_and_counted() {
    let mut s = GuestSetup::boot(
        "rring",
        25,
        &[("guest-badring", "mac={mac} disk=data"), ("guest-hello", "")],
        Some(64),
        "guest `guest-badring` devices:",
    );
    let serial = s.machine().serial();
    assert!(serial.contains("badring: every hostile request was refused"), "{serial}");
    let line = serial.lines().find(|l| l.contains("guest `guest-badring` devices:")).expect("devices line");
    for counter in
        ["bad_attach=2", "bad_index=1", "bad_descriptor=2", "oversized=1", "undersized=1", "tx_frames=0", "rejected=5"]
    {
        assert!(line.contains(counter), "{counter} missing from: {line}");
    }
    // The hypervisor carries on: the next guest runs and the management address answers.
    s.machine().wait_for("guest `guest-hello` shut down", GUEST_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let out = s.run("ping", &["-c", "2", "-W", "5", &s.mgmt_ip], 20);
    assert!(out.status.success(), "management address after the hostile guest");
}
