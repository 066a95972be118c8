//! Suite `mgmt`: one client must not crash or lock out the hypervisor, and the NIC must never
//! drop a good frame (issue 16). The hypervisor boots under QEMU TCG with an e1000 on a tap in a
//! bridge; hostile and careless clients run in their own network namespace on that bridge:
//! a client that never reads, slowloris on both ports, 50 concurrent clients, a half-closed
//! request, lenient JSON and HTTP, a long redis-benchmark run counting receive errors, and the
//! metrics page with the heap gauges under `promtool check metrics`. Run through
//! `cargo xtask test --suite mgmt` (root). Addresses: 10.77.N.0/24 inside the test's own bridge
//! and namespace only. Every client runs under `timeout`; the machine and the network are
//! removed on drop.

use std::time::Duration;

use qemu_tests::standalone::{HostOptions, StandaloneHost};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const SERVING: &str = "serving the management plane";
const REDIS_LISTENING: &str = "redis: listening on";
/// `REQUEST_DEADLINE_MS` in `net::iface`.
const REQUEST_DEADLINE_S: f64 = 5.0;

/// A standalone host on its own test network.
struct Setup(StandaloneHost);

impl std::ops::Deref for Setup {
    type Target = StandaloneHost;
    fn deref(&self) -> &StandaloneHost {
        &self.0
    }
}

impl Setup {
    /// Boots with `mgmt_addr=10.77.SUBNET.2/24` (client .1, guest .3) and `guests`.
    fn boot(tag: &str, subnet: u8, guests: &[(&str, &str)], disk_kib: Option<usize>, wait_for: &str) -> Self {
        let options =
            HostOptions { guests, disk_kib, wait_for, timeout: BOOT_TIMEOUT, ..HostOptions::new(tag, subnet) };
        Self(StandaloneHost::boot(&options))
    }

    /// One JSON request on a fresh connection; the reply line.
    fn request(&self, line: &str) -> String {
        self.python(ONE_REQUEST, &[&self.mgmt_ip, line], 30).trim().to_string()
    }

    /// The host is up: `status` answers and the serial console has no panic.
    fn assert_alive(&self) -> String {
        let status = self.request(r#"{"cmd":"status"}"#);
        assert!(status.contains("\"ok\":true"), "{status}");
        let serial = self.serial();
        assert!(!serial.contains("PANIC") && !serial.contains("COLO-EXIT"), "{serial}");
        status
    }
}

/// `"name":N` inside the object that follows `"within":` (or anywhere, for an empty `within`).
fn field(json: &str, within: &str, name: &str) -> u64 {
    let scope = if within.is_empty() {
        json
    } else {
        let key = format!("\"{within}\":{{");
        &json[json.find(&key).unwrap_or_else(|| panic!("no {within} in {json}"))..]
    };
    let key = format!("\"{name}\":");
    let start = scope.find(&key).unwrap_or_else(|| panic!("no {name} in {json}")) + key.len();
    scope[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a number")
}

const ONE_REQUEST: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7070), timeout=20)
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile("rb").readline().decode())
"#;

/// Issue 16, point 1: 4 KiB receive buffer, never reads, sends 1.3 MB of `x\n`.
const NON_READER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
s.settimeout(60)
s.connect((sys.argv[1], 7070))
payload = memoryview(b"x\n" * 650000)
t0 = time.time()
sent, outcome = 0, "completed"
try:
    while sent < len(payload):
        sent += s.send(payload[sent:sent + 65536])
    # Everything left this side: keep the connection open (still not reading) until the server
    # gives up on it.
    while time.time() - t0 < 60:
        s.send(b"x")
        time.sleep(0.5)
except socket.timeout:
    outcome = "timeout"
except ConnectionResetError:
    outcome = "reset"
except BrokenPipeError:
    outcome = "broken_pipe"
print("outcome %s sent %d elapsed %.2f" % (outcome, sent, time.time() - t0))
"#;

#[test]
fn a_client_that_never_reads_is_disconnected_and_the_host_stays_up() {
    let s = Setup::boot("nord", 41, &[], None, SERVING);
    let before = s.assert_alive();
    let out = s.python(NON_READER, &[&s.mgmt_ip], 90);
    eprintln!("non-reading client: {}", out.trim());
    assert!(out.contains("outcome reset") || out.contains("outcome broken_pipe"), "the server never closed it: {out}");
    let sent: u64 = out.split_whitespace().nth(3).and_then(|n| n.parse().ok()).expect("sent bytes");
    assert!(sent < 1_300_000, "the server stopped taking requests from a peer that does not read: {out}");
    let status = s.assert_alive();
    let stats = s.request(r#"{"cmd":"stats"}"#);
    assert!(field(&stats, "json", "not_reading") >= 1, "{stats}");
    let (hw0, hw1) = (field(&before, "heap", "high_water"), field(&status, "heap", "high_water"));
    eprintln!(
        "[figure] non-reading client: closed after sending {sent} bytes; heap used {} -> {}, high water {hw0} -> {hw1} of {} bytes",
        field(&before, "heap", "used"),
        field(&status, "heap", "used"),
        field(&status, "heap", "size")
    );
    assert!(hw1 - hw0 < 4 << 20, "one client grew the heap by {} bytes", hw1 - hw0);
}

/// Issue 16, point 2: trickling connections on both ports (reconnecting whenever they are
/// closed), then new clients measure how long they take to get an answer.
const SLOWLORIS: &str = r#"
import socket, sys, threading, time
host = sys.argv[1]
n_json, n_http, warmup, probes = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
stop = threading.Event()
lock = threading.Lock()
stats = {"connects": 0, "closed": 0}
def trickle(port, first, byte):
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port), timeout=5)
        except OSError:
            time.sleep(0.2)
            continue
        with lock: stats["connects"] += 1
        try:
            if first: s.send(first)
            while not stop.is_set():
                s.send(byte)
                stop.wait(1.0)
        except OSError:
            with lock: stats["closed"] += 1
        s.close()
threads = []
for i in range(n_json):
    # Half send a newline a second (never a request), half a request that never ends.
    args = (7070, b"", b"\n") if i % 2 == 0 else (7070, b'{"cmd":"', b"a")
    threads.append(threading.Thread(target=trickle, args=args, daemon=True))
for i in range(n_http):
    threads.append(threading.Thread(target=trickle, args=(9100, b"GET /metrics HTTP/1.1\r\nX-Slow: ", b"a"), daemon=True))
for t in threads: t.start()
time.sleep(warmup)
def probe(port):
    t0 = time.time()
    attempts = 0
    while time.time() - t0 < 30:
        attempts += 1
        try:
            s = socket.create_connection((host, port), timeout=10)
            if port == 7070:
                s.sendall(b'{"cmd":"status"}\n')
                ok = b'"ok":true' in s.makefile("rb").readline()
            else:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
                ok = s.recv(64).startswith(b"HTTP/1.1 200")
            s.close()
            if ok: return time.time() - t0, attempts
        except OSError:
            pass
        time.sleep(0.05)
    return None, attempts
for i in range(probes):
    for port in (7070, 9100):
        took, attempts = probe(port)
        print("probe", port, "none" if took is None else "%.3f" % took, attempts)
    time.sleep(1.5)
stop.set()
print("attack connects", stats["connects"], "closed", stats["closed"])
"#;

#[test]
fn slowloris_on_both_ports_cannot_keep_a_new_client_out() {
    let s = Setup::boot("slow", 42, &[], None, SERVING);
    s.assert_alive();
    // More trickling connections than either server has slots (64 JSON, 16 metrics).
    let out = s.python(SLOWLORIS, &[&s.mgmt_ip, "72", "24", "6", "4"], 240);
    eprintln!("slowloris:\n{out}");
    let mut worst = [0.0f64; 2];
    let mut probes = 0;
    for line in out.lines().filter(|l| l.starts_with("probe ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let took: f64 = f[2].parse().unwrap_or_else(|_| panic!("a new client never got in: {line}\n{out}"));
        let i = usize::from(f[1] == "9100");
        worst[i] = worst[i].max(took);
        probes += 1;
    }
    assert_eq!(probes, 8, "{out}");
    eprintln!(
        "[figure] under slowloris ({} attack connections), a new client waited at most {:.3} s (JSON) and {:.3} s (metrics); request deadline {REQUEST_DEADLINE_S} s",
        out.lines().find(|l| l.starts_with("attack")).unwrap_or(""),
        worst[0],
        worst[1]
    );
    for took in worst {
        assert!(took <= REQUEST_DEADLINE_S, "a new client was kept out {took:.3} s, longer than the request deadline");
    }
    let stats = s.request(r#"{"cmd":"stats"}"#);
    eprintln!("stats after slowloris: {stats}");
    for server in ["json", "http"] {
        assert!(
            field(&stats, server, "evicted") + field(&stats, server, "request_timeouts") > 0,
            "{server}: the slow connections were neither evicted nor timed out: {stats}"
        );
    }
    s.assert_alive();
}

const FIFTY: &str = r#"
import socket, sys, threading, time
host, n = sys.argv[1], int(sys.argv[2])
start = threading.Barrier(n)
replied = threading.Barrier(n, timeout=60)
results = [None] * n
def client(i):
    try:
        start.wait()
        s = socket.create_connection((host, 7070), timeout=30)
        s.sendall(b'{"cmd":"status"}\n')
        line = s.makefile("rb").readline()
        results[i] = b'"ok":true' in line or line[:80]
        replied.wait()  # every connection stays open until all have their reply
        s.close()
    except Exception as e:
        results[i] = repr(e)
t0 = time.time()
threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print("replies", sum(1 for r in results if r is True), "of", n, "in %.2f s" % (time.time() - t0))
for r in results:
    if r is not True: print("failed", r)
"#;

#[test]
fn fifty_concurrent_clients_all_get_replies() {
    let s = Setup::boot("fifty", 43, &[], None, SERVING);
    s.assert_alive();
    let out = s.python(FIFTY, &[&s.mgmt_ip, "50"], 120);
    eprintln!("[figure] 50 concurrent kept-open JSON clients: {}", out.lines().next().unwrap_or(""));
    assert!(out.starts_with("replies 50 of 50"), "{out}");
    let stats = s.request(r#"{"cmd":"stats"}"#);
    assert_eq!(field(&stats, "json", "full"), 0, "{stats}");
}

const HALF_CLOSE: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7070), timeout=20)
s.sendall(b'{"cmd":"status"}')
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    d = s.recv(65536)
    if not d: break
    data += d
print("half-close:", data.decode())
# An over-long line: `too_large`, then the connection ends.
s = socket.create_connection((sys.argv[1], 7070), timeout=20)
try:
    s.sendall(b"x" * 14000)
except OSError:
    pass
data = b""
try:
    while True:
        d = s.recv(65536)
        if not d: break
        data += d
except OSError as e:
    data += b"<" + type(e).__name__.encode() + b">"
print("too-large:", data[:200].decode(errors="replace"))
"#;

#[test]
fn a_request_ended_by_a_half_close_is_answered() {
    let s = Setup::boot("half", 44, &[], None, SERVING);
    let out = s.python(HALF_CLOSE, &[&s.mgmt_ip], 60);
    eprintln!("{out}");
    let half = out.lines().find(|l| l.starts_with("half-close:")).unwrap();
    assert!(half.contains("{\"ok\":true,\"cmd\":\"status\""), "{out}");
    let large = out.lines().find(|l| l.starts_with("too-large:")).unwrap();
    assert!(large.contains("\"error\":\"too_large\""), "{out}");
    let stats = s.request(r#"{"cmd":"stats"}"#);
    assert_eq!(field(&stats, "json", "half_close_requests"), 1, "{stats}");
    assert_eq!(field(&stats, "json", "too_large"), 1, "{stats}");
    s.assert_alive();
}

const STRICT: &str = r#"
import socket, sys
host = sys.argv[1]
s = socket.create_connection((host, 7070), timeout=20)
f = s.makefile("rb")
for line in sys.argv[2:]:
    s.sendall(line.encode() + b"\n")
    print("json", f.readline().decode().strip())
def http(raw):
    c = socket.create_connection((host, 9100), timeout=20)
    c.sendall(raw.encode())
    data = b""
    while True:
        d = c.recv(65536)
        if not d: break
        data += d
    c.close()
    return data.decode(errors="replace")
h = "Host: %s:9100\r\n" % host
print("http-405", repr(http("POST /metrics HTTP/1.1\r\n" + h + "\r\n")[:300]))
print("http-nohost", repr(http("GET /metrics HTTP/1.1\r\n\r\n")[:120]))
print("http-absolute", repr(http("GET http://%s:9100/metrics HTTP/1.1\r\n%s\r\n" % (host, h))[:40]))
"#;

#[test]
fn lenient_json_and_http_are_refused_by_name() {
    let s = Setup::boot("strict", 45, &[], None, SERVING);
    let cases: [(&str, &str); 7] = [
        (r#"{"cmd":"st\u+041atus"}"#, "\"error\":\"bad_json\",\"detail\":\"request is not JSON: expected 4 hex digits after `\\\\u` at byte 12, found `+`\""),
        (r#"{"cmd":"set","key":"heartbeat_ms","value":050}"#, "no leading zeros"),
        (r#"{"cmd":"\ud83d"}"#, "expected `\\\\u` and a low surrogate (DC00-DFFF) after a high surrogate"),
        (r#"{"cmd":"\ud83dx"}"#, "low surrogate"),
        (r#"{"cmd":"\ude00"}"#, "a high surrogate (D800-DBFF) before a low surrogate"),
        (r#"{"cmd":"status","cmd":"shutdown"}"#, "a member name not used before in this object"),
        (r#"{"cmd":"\ud83d\ude00"}"#, "\"error\":\"unknown_command\",\"detail\":\"unknown command `\u{1f600}`"),
    ];
    let mut args = vec![s.mgmt_ip.as_str()];
    args.extend(cases.iter().map(|(line, _)| *line));
    let out = s.python(STRICT, &args, 60);
    eprintln!("{out}");
    let replies: Vec<&str> = out.lines().filter(|l| l.starts_with("json ")).collect();
    assert_eq!(replies.len(), cases.len(), "{out}");
    for ((line, needle), reply) in cases.iter().zip(&replies) {
        assert!(reply.contains(needle), "{line} -> {reply}; expected `{needle}`");
        assert!(reply.contains("\"ok\":false"), "{line} -> {reply}");
    }
    let tunables = s.request(r#"{"cmd":"tunables"}"#);
    assert!(tunables.contains("\"heartbeat_ms\":100"), "`050` changed nothing: {tunables}");
    let line =
        |tag: &str| out.lines().find(|l| l.starts_with(tag)).unwrap_or_else(|| panic!("{tag}: {out}")).to_string();
    let l405 = line("http-405");
    assert!(l405.contains("HTTP/1.1 405 Method Not Allowed") && l405.contains("Allow: GET, HEAD\\r\\n"), "{l405}");
    let nohost = line("http-nohost");
    assert!(nohost.contains("HTTP/1.1 400 Bad Request"), "{nohost}");
    let abs = line("http-absolute");
    assert!(abs.contains("HTTP/1.1 200 OK"), "{abs}");
    s.assert_alive();
}

#[test]
fn e1000_counts_no_receive_error_over_a_long_clean_redis_benchmark() {
    let s = Setup::boot(
        "rxerr",
        46,
        &[("guest-redis", "ip={ip} mac={mac} disk=data time_limit_ms=1800000")],
        Some(8192),
        REDIS_LISTENING,
    );
    let ip = s.guest_ip.clone();
    let ping = s.net.run("redis-cli", &["-h", &ip, "PING"], 30);
    assert!(String::from_utf8_lossy(&ping.stdout).contains("PONG"), "{ping:?}");
    let started = std::time::Instant::now();
    let out = s.net.run("redis-benchmark", &["-h", &ip, "-t", "set,get", "-n", "40000", "-c", "20", "--csv"], 1200);
    let took = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {}\n{stdout}{stderr}", out.status);
    assert!(!stdout.to_lowercase().contains("error"), "{stdout}{stderr}");
    let status = s.assert_alive();
    let (frames, errors) = (field(&status, "", "rx_frames"), field(&status, "", "rx_errors"));
    eprintln!(
        "[figure] redis-benchmark -t set,get -n 40000 -c 20 through the e1000 (QEMU TCG): {took:.1} s, nic0 rx_frames {frames}, rx_errors {errors}\n{stdout}"
    );
    assert!(frames > 80_000, "the benchmark went through the NIC: {status}");
    assert_eq!(errors, 0, "a clean run counted receive errors (good frames dropped): {status}");
}

#[test]
fn metrics_with_heap_gauges_pass_promtool() {
    let s = Setup::boot("heap", 47, &[], None, SERVING);
    s.assert_alive();
    let url = format!("http://{}:9100/metrics", s.mgmt_ip);
    let out = s.net.run("curl", &["-sS", "-m", "20", &url], 30);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl: {body}{}", String::from_utf8_lossy(&out.stderr));
    let gauge = |name: &str| -> u64 {
        let line =
            body.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}:\n{body}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (size, used, free, high) = (
        gauge("colo_heap_size_bytes"),
        gauge("colo_heap_used_bytes"),
        gauge("colo_heap_free_bytes"),
        gauge("colo_heap_high_water_bytes"),
    );
    eprintln!("[figure] heap after boot (QEMU TCG, 512 MiB): size {size}, used {used}, free {free}, high water {high}");
    assert!(size > 0 && used > 0 && used + free == size && high >= used && high <= size, "{body}");
    assert!(body.contains("colo_mgmt_connections_total{server=\"json\",event=\"accepted\"} 1\n"), "{body}");
    qemu_tests::standalone::assert_promtool_accepts(&body);
    let status = s.request(r#"{"cmd":"status"}"#);
    assert!(field(&status, "heap", "used") > 0 && field(&status, "heap", "free") > 0, "{status}");
    assert!(field(&status, "heap", "high_water") >= field(&status, "heap", "used"), "{status}");
}

/// Two connections at once: one idle (nothing sent), one with a request that never ends.
const TIMEOUTS: &str = r#"
import json, socket, sys, threading, time
host = sys.argv[1]
def uptime():
    s = socket.create_connection((host, 7070), timeout=20)
    s.sendall(b'{"cmd":"status"}\n')
    t = time.time()
    u = json.loads(s.makefile("rb").readline())["uptime_ms"]
    s.close()
    return u / 1000.0, t
u0, w0 = uptime()
def watch(name, first, port):
    s = socket.create_connection((host, port), timeout=60)
    t0 = time.time()
    if first: s.sendall(first)
    data = b""
    try:
        while True:
            d = s.recv(4096)
            if not d: break
            data += d
    except OSError as e:
        data += b"<" + type(e).__name__.encode() + b">"
    # One thread's line at a time: concurrent prints interleave.
    with printing:
        print(name, "%.2f" % (time.time() - t0), data[:160].decode(errors="replace").replace("\r\n", " | "), flush=True)
printing = threading.Lock()
threads = [
    threading.Thread(target=watch, args=("idle", b"", 7070)),
    threading.Thread(target=watch, args=("slow-json", b'{"cmd":"sta', 7070)),
    threading.Thread(target=watch, args=("slow-http", b"GET /metrics HTTP/1.1\r\nHost: x", 9100)),
]
for t in threads: t.start()
for t in threads: t.join()
u1, w1 = uptime()
# The hypervisor's clock (TSC calibrated at boot) against this machine's.
print("clock %.4f" % ((u1 - u0) / (w1 - w0)))
"#;

#[test]
fn request_deadline_and_the_one_idle_timeout_close_connections() {
    let s = Setup::boot("tmo", 48, &[], None, SERVING);
    let out = s.python(TIMEOUTS, &[&s.mgmt_ip], 90);
    eprintln!("{out}");
    let took = |name: &str| -> (f64, String) {
        let line = out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {out}"));
        let mut f = line.splitn(3, ' ');
        f.next();
        (f.next().unwrap().parse().unwrap(), f.next().unwrap_or("").to_string())
    };
    // The limits run on the hypervisor's clock, whose rate against this machine's depends on
    // the TSC calibration at boot (a loaded machine skews it): compare in hypervisor seconds.
    let clock: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("clock "))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no clock line: {out}"));
    let (idle, idle_data) = took("idle");
    let (slow_json, json_data) = took("slow-json");
    let (slow_http, http_data) = took("slow-http");
    let (idle, slow_json, slow_http) = (idle * clock, slow_json * clock, slow_http * clock);
    eprintln!(
        "[figure] in hypervisor seconds (its clock ran {clock:.3}x this machine's): idle connection closed after {idle:.2} s (idle timeout 30 s, smoltcp's own 10 s off); unfinished JSON request answered and closed after {slow_json:.2} s, unfinished HTTP head after {slow_http:.2} s (request deadline {REQUEST_DEADLINE_S} s)"
    );
    assert!((29.5..=32.0).contains(&idle), "idle connection closed after {idle} s, expected the 30 s idle timeout");
    assert!(idle_data.is_empty(), "{idle_data}");
    for (t, data, want) in [
        (slow_json, &json_data, "\"error\":\"request_timeout\""),
        (slow_http, &http_data, "HTTP/1.1 408 Request Timeout"),
    ] {
        assert!((REQUEST_DEADLINE_S - 0.5..=REQUEST_DEADLINE_S + 2.0).contains(&t), "closed after {t} s: {data}");
        assert!(data.contains(want), "{data}");
    }
    let stats = s.request(r#"{"cmd":"stats"}"#);
    assert_eq!(field(&stats, "json", "idle_timeouts"), 1, "{stats}");
    assert_eq!(field(&stats, "json", "request_timeouts"), 1, "{stats}");
    assert_eq!(field(&stats, "http", "request_timeouts"), 1, "{stats}");
}
