//! Suite `security`: nobody gets in where they don't belong (issue 17, the management plane).
//! The hypervisor boots under QEMU TCG with an e1000 on a tap in a bridge and a fresh
//! `mgmt-token` module; clients in their own network namespace (two source addresses) try the
//! management API and the metrics page without the token, with a wrong one and with the right
//! one. Run through `cargo xtask test --suite security` (root). Addresses: 10.77.N.0/24 inside
//! the test's own bridge and namespace only. Every client runs under `timeout`; the machine and
//! the network are removed on drop.

use std::process::{Command, Stdio};
use std::time::Duration;

use qemu_tests::standalone::{HostOptions, StandaloneHost};
use qemu_tests::{
    built_kernel, make_image, BootMedium, Emulator, Machine, MachineConfig, ScratchDir, QEMU_EXIT_SUCCESS,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A booted hypervisor with a token, and its client network with two client addresses
/// (.1 and .5; the host is .2). The machine is dropped before the network.
struct Setup {
    host: StandaloneHost,
    /// The client's first address (the namespace's primary one).
    src_a: String,
    /// A second client address in the same namespace: another source for the rate limiter.
    src_b: String,
}

impl std::ops::Deref for Setup {
    type Target = StandaloneHost;
    fn deref(&self) -> &StandaloneHost {
        &self.host
    }
}

impl std::ops::DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut StandaloneHost {
        &mut self.host
    }
}

impl Setup {
    fn boot(tag: &str, subnet: u8, extra_cmdline: &str) -> Self {
        let host = StandaloneHost::boot(&HostOptions {
            extra_cmdline,
            timeout: BOOT_TIMEOUT,
            ..HostOptions::new(tag, subnet)
        });
        assert_eq!(host.token.len(), 64, "32 random bytes, hex");
        let src_b = format!("10.77.{subnet}.5");
        let out = Command::new("ip")
            .args(["-n", &host.net.netns, "addr", "add", &format!("{src_b}/24"), "dev", &host.net.veth_ns])
            .output()
            .expect("ip addr add");
        assert!(out.status.success(), "second client address: {}", String::from_utf8_lossy(&out.stderr));
        Self { host, src_a: format!("10.77.{subnet}.1"), src_b }
    }

    /// Runs a Python script in the client namespace; its stdout (the test fails if it fails).
    fn python(&self, script: &str, args: &[&str]) -> String {
        self.host.python(script, args, 60)
    }

    /// JSON requests on one connection from source address `src`, sent one after the other
    /// (each waits for its reply); the reply lines.
    fn requests(&self, src: &str, lines: &[&str]) -> Vec<String> {
        let mut args = vec![self.mgmt_ip.as_str(), src];
        args.extend_from_slice(lines);
        self.python(REQUESTS, &args).lines().map(str::to_string).collect()
    }

    fn one(&self, src: &str, line: &str) -> String {
        self.requests(src, &[line]).pop().expect("a reply")
    }

    /// `GET /metrics` with `headers`; the status line, the headers and the body.
    fn metrics(&self, headers: &str) -> String {
        self.python(HTTP_GET, &[&self.mgmt_ip, headers])
    }

    /// `xtask ctl ARGS --addr IP:7070 --token-file FILE` from the namespace.
    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let xtask = qemu_tests::target_dir().join("debug/xtask");
        assert!(xtask.is_file(), "{} is missing: build it with `cargo build -p xtask`", xtask.display());
        let addr = format!("{}:7070", self.mgmt_ip);
        let mut c = Command::new("timeout");
        c.args(["30", "ip", "netns", "exec", &self.net.netns]).arg(&xtask).arg("ctl").args(args);
        c.args(["--addr", &addr, "--token-file"]).arg(&self.token_file).stdin(Stdio::null());
        let out = c.output().expect("running xtask ctl");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// The host answers and has neither panicked nor exited; the token never reached the
    /// serial console.
    fn assert_alive(&self) {
        let status =
            self.one(&self.src_a, r#"{"cmd":"status","token":"TOKEN"}"#.replace("TOKEN", &self.token).as_str());
        assert!(status.contains("\"ok\":true"), "{status}");
        let serial = self.serial();
        assert!(!serial.contains("PANIC") && !serial.contains("COLO-EXIT"), "{serial}");
        assert!(!serial.contains(&self.token), "the token appeared on the serial console");
    }

    fn with_token(&self, line: &str) -> String {
        line.replace("TOKEN", &self.token)
    }
}

/// argv: host, source address, request lines (each sent after the previous reply). Prints one reply line each
/// (or `closed` if the connection ended first).
const REQUESTS: &str = r#"
import socket, sys
host, src, lines = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.create_connection((host, 7070), timeout=20, source_address=(src, 0))
f = s.makefile("rb")
for l in lines:
    s.sendall(l.encode() + b"\n")
    reply = f.readline().decode().strip()
    print(reply if reply else "closed")
"#;

/// argv: host, source A, source B, bad request, A's good request, B's good request. From A:
/// five bad tokens and the good one sent at once; then from B its good one; then A's good one
/// again, all within milliseconds. Prints the eight replies, one a line.
const TWO_SOURCES: &str = r#"
import socket, sys
host, src_a, src_b, bad, good_a, good_b = sys.argv[1:7]
def conn(src):
    s = socket.create_connection((host, 7070), timeout=20, source_address=(src, 0))
    return s, s.makefile("rb")
(a, fa), (b, fb) = conn(src_a), conn(src_b)
a.sendall(((bad + "\n") * 5 + good_a + "\n").encode())
for _ in range(6):
    print(fa.readline().decode().strip() or "closed")
b.sendall((good_b + "\n").encode())
print(fb.readline().decode().strip() or "closed")
a.sendall((good_a + "\n").encode())
print(fa.readline().decode().strip() or "closed")
"#;

/// argv: host, extra header lines (`\n`-separated, may be empty). Prints the whole response.
const HTTP_GET: &str = r#"
import socket, sys
host, headers = sys.argv[1], sys.argv[2]
s = socket.create_connection((host, 9100), timeout=20)
extra = "".join(h + "\r\n" for h in headers.split("\n") if h)
s.sendall(("GET /metrics HTTP/1.1\r\nHost: %s:9100\r\n%s\r\n" % (host, extra)).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
"#;

fn error_of(reply: &str) -> &str {
    reply.split("\"error\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("")
}

/// `"name":N` anywhere in `json` after `"within":{`.
fn field(json: &str, within: &str, name: &str) -> u64 {
    let scope = &json[json.find(&format!("\"{within}\":{{")).unwrap_or_else(|| panic!("no {within} in {json}"))..];
    let key = format!("\"{name}\":");
    let start = scope.find(&key).unwrap_or_else(|| panic!("no {name} in {json}")) + key.len();
    scope[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a number")
}

#[test]
fn mutating_commands_without_the_token_are_refused_and_change_nothing() {
    let mut s = Setup::boot("mut", 61, "");
    let wrong = "0".repeat(64);
    // Three failures per source (the rate limiter lets three through before it blocks).
    let a = s.requests(
        &s.src_a,
        &[
            r#"{"cmd":"set","key":"heartbeat_ms","value":50}"#,
            &format!(r#"{{"cmd":"set","key":"heartbeat_ms","value":50,"token":"{wrong}"}}"#),
            r#"{"cmd":"shutdown"}"#,
        ],
    );
    let b = s.requests(
        &s.src_b,
        &[
            &format!(r#"{{"cmd":"shutdown","token":"{wrong}"}}"#),
            r#"{"cmd":"checkpoint"}"#,
            &format!(r#"{{"cmd":"failover","token":"{}"}}"#, &s.token[..63]),
        ],
    );
    for reply in a.iter().chain(&b) {
        assert_eq!(error_of(reply), "unauthorized", "{reply}");
        assert!(reply.contains("\"ok\":false"), "{reply}");
    }
    assert!(a[0].contains("expected a \\\"token\\\" member"), "a missing token is named: {}", a[0]);
    assert!(a[1].contains("does not match"), "a wrong token is named: {}", a[1]);
    // Nothing changed: the tunable is as booted, the host did not shut down.
    let tunables = s.one(&s.src_a, r#"{"cmd":"tunables"}"#);
    assert!(tunables.contains("\"heartbeat_ms\":100"), "an unauthorized set changed the tunable: {tunables}");
    std::thread::sleep(Duration::from_secs(1));
    s.assert_alive();
    let stats = s.one(&s.src_a, r#"{"cmd":"stats"}"#);
    assert_eq!(field(&stats, "auth", "unauthorized"), 6, "{stats}");
    assert_eq!(field(&stats, "auth", "rate_limited"), 0, "{stats}");
    let page = s.metrics("");
    assert!(page.contains("colo_mgmt_auth_total{result=\"unauthorized\"} 6"), "{page}");

    // With the token they work: `ctl` reads it from --token-file.
    let (ok, out) = s.ctl(&["set", "heartbeat_ms", "50"]);
    assert!(ok && out.contains("\"old\":100") && out.contains("\"value\":50"), "{out}");
    let tunables = s.one(&s.src_b, r#"{"cmd":"tunables"}"#);
    assert!(tunables.contains("\"heartbeat_ms\":50"), "{tunables}");
    let (ok, out) = s.ctl(&["checkpoint"]);
    assert!(!ok && out.contains("\"error\":\"not_available\"") && out.contains("\"accepted\":true"), "{out}");
    let reply = s.one(&s.src_b, &s.with_token(r#"{"cmd":"failover","token":"TOKEN"}"#));
    assert_eq!(error_of(&reply), "not_available", "with the token, failover gets past the check: {reply}");
    let (ok, out) = s.ctl(&["shutdown"]);
    assert!(ok && out.contains("\"cmd\":\"shutdown\""), "{out}");
    assert!(!out.contains(&s.token), "ctl never prints the token");
    let machine = s.take_machine();
    let outcome = machine.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.exit_code, Some(QEMU_EXIT_SUCCESS), "{}", outcome.serial);
    assert!(!outcome.serial.contains(&s.token), "the token appeared on the serial console");
    assert!(outcome.serial.contains("management access: token from module `mgmt-token`"), "{}", outcome.serial);
}

#[test]
fn mgmt_open_none_closes_status_and_metrics_to_clients_without_the_token() {
    let s = Setup::boot("none", 62, "mgmt_open=none");
    // JSON: status without the token is refused by name.
    let reply = s.one(&s.src_a, r#"{"cmd":"status"}"#);
    assert_eq!(error_of(&reply), "unauthorized", "{reply}");
    assert!(!reply.contains("\"nics\""), "{reply}");
    // Metrics: 401 with the challenge, no page.
    let page = s.metrics("");
    assert!(page.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{page}");
    assert!(page.contains("\r\nWWW-Authenticate: Bearer realm=\"colo\"\r\n"), "{page}");
    assert!(!page.contains("colo_up"), "{page}");
    let page = s.metrics(&format!("Authorization: Bearer {}", "f".repeat(64)));
    assert!(page.starts_with("HTTP/1.1 401") && page.contains("error=\"invalid_token\""), "{page}");
    // Another source for the rest (source A has three failures now).
    let page = s.metrics(&format!("Authorization: Bearer {}", s.token));
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n") && page.contains("colo_up{role=\"standalone\"} 1"), "{page}");
    assert!(page.contains("colo_mgmt_auth_total{result=\"unauthorized\"} 3"), "{page}");
    let replies = s.requests(
        &s.src_b,
        &[
            r#"{"cmd":"stats"}"#,
            &s.with_token(r#"{"cmd":"auth","token":"TOKEN"}"#),
            r#"{"cmd":"status"}"#,
            r#"{"cmd":"tunables"}"#,
        ],
    );
    assert_eq!(error_of(&replies[0]), "unauthorized", "{}", replies[0]);
    assert!(replies[1].contains("\"authenticated\":true"), "{}", replies[1]);
    assert!(replies[2].contains("\"ok\":true") && replies[2].contains("\"open\":\"none\""), "{}", replies[2]);
    assert!(replies[3].contains("\"ok\":true"), "an authenticated connection is served: {}", replies[3]);
    // A new connection starts unauthenticated.
    assert_eq!(error_of(&s.one(&s.src_b, r#"{"cmd":"tunables"}"#)), "unauthorized");
    // `ctl` sends the token with reads too.
    let (ok, out) = s.ctl(&["status"]);
    assert!(ok && out.contains("\"role\":\"standalone\""), "{out}");
    s.assert_alive();
}

#[test]
fn repeated_bad_tokens_from_one_source_are_rate_limited_while_another_is_served() {
    let s = Setup::boot("rate", 63, "");
    let bad = format!(r#"{{"cmd":"set","key":"heartbeat_ms","value":77,"token":"{}"}}"#, "a".repeat(64));
    let good = s.with_token(r#"{"cmd":"set","key":"heartbeat_ms","value":77,"token":"TOKEN"}"#);
    // Sent at once from A: four bad tokens (the fourth blocks the source for 1 s), a fifth,
    // then the right token, which is not even checked. Then B, with the right token, is served
    // while A is still blocked.
    let other = s.with_token(r#"{"cmd":"set","key":"heartbeat_ms","value":60,"token":"TOKEN"}"#);
    let replies: Vec<String> = s
        .python(TWO_SOURCES, &[&s.mgmt_ip, &s.src_a, &s.src_b, &bad, &good, &other])
        .lines()
        .map(str::to_string)
        .collect();
    let codes: Vec<&str> = replies.iter().map(|r| error_of(r)).collect();
    assert_eq!(
        codes,
        [
            "unauthorized",
            "unauthorized",
            "unauthorized",
            "unauthorized",
            "rate_limited",
            "rate_limited",
            "",
            "rate_limited"
        ],
        "{replies:#?}"
    );
    assert!(replies[5].contains("\"retry_after_ms\":"), "{}", replies[5]);
    assert!(replies[6].contains("\"ok\":true") && replies[6].contains("\"value\":60"), "B is served: {}", replies[6]);
    let tunables = s.one(&s.src_a, r#"{"cmd":"tunables"}"#);
    assert!(tunables.contains("\"heartbeat_ms\":60"), "A's set never got through: {tunables}");
    // Source A gets in again once its back-off is over (1 s on the hypervisor's clock).
    let mut waited = Vec::new();
    let served = (0..40).find_map(|_| {
        let reply = s.one(&s.src_a, &good);
        if reply.contains("\"ok\":true") {
            return Some(reply);
        }
        waited.push(error_of(&reply).to_string());
        std::thread::sleep(Duration::from_millis(250));
        None
    });
    let served = served.unwrap_or_else(|| panic!("source A was never served again: {waited:?}"));
    assert!(served.contains("\"value\":77"), "{served}");
    assert!(waited.iter().all(|w| w == "rate_limited"), "{waited:?}");
    let stats = s.one(&s.src_b, r#"{"cmd":"stats"}"#);
    assert_eq!(field(&stats, "auth", "unauthorized"), 4, "{stats}");
    assert!(field(&stats, "auth", "rate_limited") >= 3, "{stats}");
    assert_eq!(field(&stats, "auth", "authorized"), 2, "{stats}");
    eprintln!(
        "[figure] rate limit: 4 bad tokens then blocked; source A waited {} polls of 250 ms; rate_limited total {}",
        waited.len(),
        field(&stats, "auth", "rate_limited")
    );
    s.assert_alive();
}

/// Boots `cmdline` with a `mgmt-token` module holding `token` (or none) and no network; the
/// hypervisor must stop with the failure status. Returns the serial console.
fn boot_fails(tag: &str, cmdline: &str, token: Option<&[u8]>) -> String {
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new(tag).expect("scratch dir");
    let image = scratch.path().join("colo.img");
    let mut modules = Vec::new();
    if let Some(token) = token {
        let path = scratch.path().join("mgmt-token");
        std::fs::write(&path, token).expect("token file");
        modules.push(qemu_tests::mgmt_token_module(&path));
    }
    make_image(&kernel, cmdline, &modules, &image).unwrap_or_else(|e| panic!("{e}"));
    let machine = Machine::start(MachineConfig::new(Emulator::Qemu, BootMedium::Cdrom, &image), tag)
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome = machine.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.verdict, Some(1), "the boot went on:\n{}", outcome.serial);
    assert_eq!(outcome.exit_code, Some(qemu_tests::QEMU_EXIT_FAILURE), "{}", outcome.serial);
    outcome.serial
}

/// Boots `cmdline` with a `cluster-key` module holding `key` (none: no module) and expects the
/// boot to stop; the serial console.
fn boot_fails_with_key(tag: &str, cmdline: &str, key: Option<&[u8]>) -> String {
    let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new(tag).expect("scratch dir");
    let image = scratch.path().join("colo.img");
    let mut modules = Vec::new();
    if let Some(key) = key {
        let path = scratch.path().join("cluster-key");
        std::fs::write(&path, key).expect("key file");
        modules.push(qemu_tests::cluster_key_module(&path));
    }
    make_image(&kernel, cmdline, &modules, &image).unwrap_or_else(|e| panic!("{e}"));
    let machine = Machine::start(MachineConfig::new(Emulator::Qemu, BootMedium::Cdrom, &image), tag)
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome = machine.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.verdict, Some(1), "the boot went on:\n{}", outcome.serial);
    outcome.serial
}

#[test]
fn a_bad_cluster_key_module_or_a_replicating_host_without_one_stops_the_boot_by_name() {
    // 31 bytes: named by its length, the content never shown.
    let key = b"0123456789abcdefghijklmnopqrstu";
    let serial = boot_fails_with_key("key31", "role=standalone", Some(key));
    assert!(
        serial.contains("FATAL: module `cluster-key`: cluster key of 31 bytes; expected 32 random bytes"),
        "{serial}"
    );
    assert!(!serial.contains("0123456789abcdef"), "{serial}");
    // A replicating host with repl_auth=on (the default) and no key does not start.
    let primary = "role=primary mgmt_addr=10.77.68.2/24 nics=mgmt+client,repl repl_addr=10.79.68.2/24 \
                   peer_addr=10.79.68.3:7000";
    let serial = boot_fails_with_key("nokey", primary, None);
    assert!(
        serial.contains("FATAL: replication link: repl_auth=on (the default) needs a `cluster-key` module"),
        "{serial}"
    );
}

#[test]
fn a_bad_token_module_or_a_closed_plane_without_a_token_stops_the_boot_by_name() {
    // A token too short: named by its length, the content never shown.
    let serial = boot_fails("short", "role=standalone", Some(b"hunter2\n"));
    assert!(serial.contains("FATAL: module `mgmt-token` holds a token of 7 bytes; expected 16 to 256"), "{serial}");
    assert!(!serial.contains("hunter2"), "{serial}");
    // A byte a JSON string or a Bearer header could not carry as is: named by its offset.
    let serial = boot_fails("byte", "role=standalone", Some(b"secret-secret-secret secret"));
    assert!(serial.contains("has a byte at offset 20 outside"), "{serial}");
    assert!(!serial.contains("secret-secret"), "{serial}");
    // mgmt_open=none with no token would lock everyone out.
    let serial = boot_fails("closed", "role=standalone mgmt_addr=10.77.64.2/24 mgmt_open=none", None);
    assert!(
        serial.contains("network: mgmt_open=none is set but no `mgmt-token` module was given; expected the module (or mgmt_open=read)"),
        "{serial}"
    );
    // A bad mgmt_open value is a named configuration error.
    let serial = boot_fails("badopen", "role=standalone mgmt_open=all", None);
    assert!(serial.contains("bad value `all` for key `mgmt_open`; accepted form: mgmt_open=read|none"), "{serial}");
}

// ---------------------------------------------------------------------------------------------
// The replication link (issue 17, point 1): two-host clusters from `qemu_tests::cluster`
// (QEMU TCG, AMD-V), subnets 10.78.S/10.79.S with S = 65..=67.

mod link {
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Stdio};
    use std::time::{Duration, Instant};

    use qemu_tests::cluster::{Cluster, ClusterSpec, Host, Net, COLO_RUNNING, REPL_PORT};
    use qemu_tests::{netns, ScratchDir};

    const WAIT: Duration = Duration::from_secs(120);
    /// The proxy's port in the probe namespace (10.79.S.1).
    const PROXY_PORT: u16 = 7001;

    /// A TCP proxy between the hosts (primary → proxy → secondary), in the probe namespace.
    /// It copies everything it forwards (both ways) to `capture`, and tampers with the primary's
    /// stream once per command written to `mode`: `flip` (one bit of the last byte of a chunk),
    /// `replay` (a chunk sent again after the next one), `reorder` (two chunks swapped),
    /// `truncate` (a chunk without its last 5 bytes, then FIN). It writes `done MODE` to
    /// `events` after each. Only bytes after the first 256 (past the handshake) are touched.
    const PROXY: &str = r#"
import os, socket, sys, threading
lip, lport, tip, tport, d = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
cap = open(os.path.join(d, "capture"), "ab", buffering=0)
ev = open(os.path.join(d, "events"), "a", buffering=1)
lock = threading.Lock()
def mode():
    try:
        return open(os.path.join(d, "mode")).read().strip()
    except OSError:
        return "pass"
def done(m):
    with open(os.path.join(d, "mode"), "w") as f:
        f.write("pass")
    ev.write("done " + m + "\n")
def pump(src, dst, tamper):
    sent, held, last = 0, None, None
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            with lock:
                cap.write(b)
            if tamper and sent > 256:
                m = mode()
                if m == "flip":
                    b = b[:-1] + bytes([b[-1] ^ 1]); done(m)
                elif m == "replay" and last is not None:
                    dst.sendall(b); sent += len(b); b = last; done(m)
                elif m == "reorder":
                    if held is None:
                        held = b
                        continue
                    dst.sendall(b); sent += len(b); b = held; held = None; done(m)
                elif m == "truncate":
                    dst.sendall(b[:max(1, len(b) - 5)]); done(m)
                    # FIN right after the cut record, nothing else: the other pump keeps
                    # reading the secondary, so no close with unread data turns it into a RST
                    # (which would discard the cut record before the host reads it).
                    dst.shutdown(socket.SHUT_WR)
                    return
            dst.sendall(b)
            sent += len(b)
            last = b
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def handle(c):
    try:
        s = socket.create_connection((tip, tport), timeout=5)
        s.settimeout(None)
    except OSError:
        c.close()
        return
    ev.write("connection\n")
    threading.Thread(target=pump, args=(c, s, True), daemon=True).start()
    threading.Thread(target=pump, args=(s, c, False), daemon=True).start()
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((lip, lport))
l.listen(8)
ev.write("listening\n")
while True:
    c, _ = l.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

    struct Proxy {
        child: Child,
        dir: PathBuf,
    }

    impl Proxy {
        fn start(c: &Cluster, dir: &Path, subnet: u8) -> Self {
            std::fs::create_dir_all(dir).expect("proxy dir");
            let mut cmd = c.command(Net::Repl, "python3");
            cmd.args(["-c", PROXY, &format!("10.79.{subnet}.1"), &PROXY_PORT.to_string()]);
            cmd.args([&c.repl_ip(Host::Secondary), &REPL_PORT.to_string()]).arg(dir);
            let child = cmd.stdin(Stdio::null()).spawn().expect("starting the proxy");
            let proxy = Self { child, dir: dir.into() };
            proxy.wait_event("listening", 1);
            proxy
        }

        fn events(&self) -> String {
            std::fs::read_to_string(self.dir.join("events")).unwrap_or_default()
        }

        fn wait_event(&self, event: &str, count: usize) {
            let deadline = Instant::now() + WAIT;
            while self.events().lines().filter(|l| *l == event).count() < count {
                assert!(Instant::now() < deadline, "proxy: no `{event}` (x{count}); events:\n{}", self.events());
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        fn capture(&self) -> Vec<u8> {
            let mut bytes = Vec::new();
            if let Ok(mut f) = std::fs::File::open(self.dir.join("capture")) {
                f.read_to_end(&mut bytes).expect("reading the capture");
            }
            bytes
        }

        fn tamper(&self, mode: &str) {
            std::fs::write(self.dir.join("mode"), mode).expect("proxy mode");
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn spec(dir: &ScratchDir, tag: &str, subnet: u8) -> ClusterSpec {
        assert!(netns::available(), "the security suite needs root and iproute2 (`cargo xtask deps`)");
        ClusterSpec::new(dir.path().join("cluster"), tag, subnet)
    }

    /// The latest value of the link counter `name` a host logged (0 if never).
    fn counter(c: &Cluster, host: Host, name: &str) -> u64 {
        let needle = format!(" {name}=");
        c.serial(host)
            .lines()
            .filter_map(|l| l.split(&needle).nth(1))
            .filter_map(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn wait_until(what: &str, c: &Cluster, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {WAIT:?}\nprimary:\n{}\nsecondary:\n{}",
                c.serial(Host::Primary),
                c.serial(Host::Secondary)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last epoch a host committed (0 if none).
    fn committed(c: &Cluster, host: Host) -> u64 {
        c.serial(host)
            .lines()
            .filter_map(|l| l.split("node: epoch ").nth(1))
            .filter(|rest| rest.contains(" committed;"))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn redis(c: &Cluster, args: &[&str]) -> String {
        let ip = c.service_ip();
        let mut all = vec!["-h", ip.as_str()];
        all.extend_from_slice(args);
        let out = c.run(Net::Client, "redis-cli", &all, 30);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A value no host would print or hold by chance.
    fn secret() -> String {
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("urandom");
        format!("colo-secret-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    /// SETs a fresh secret through the service and waits for the secondary to commit a
    /// checkpoint after it (the page holding it has crossed the link); returns the secret.
    fn set_secret_and_commit(c: &Cluster) -> String {
        let secret = secret();
        let before = committed(c, Host::Secondary);
        assert_eq!(redis(c, &["set", "secret", &secret]), "OK");
        assert_eq!(redis(c, &["get", "secret"]), secret);
        wait_until("a commit after the SET", c, || committed(c, Host::Secondary) > before + 1);
        secret
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_host_with_another_cluster_key_never_joins_and_the_svm_never_leaves_its_pre_sync_state() {
        let dir = ScratchDir::new("wkey").expect("scratch");
        let mut spec = spec(&dir, "wkey", 65);
        spec.foreign_key = Some(Host::Secondary);
        let mut c = Cluster::prepare(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
        for host in Host::BOTH {
            c.boot(host).unwrap_or_else(|e| panic!("{e}"));
        }
        c.wait_for(Host::Primary, "redis: listening on", WAIT).unwrap_or_else(|e| panic!("{e}"));
        // The primary refuses the secondary's proof, again and again; the secondary sees each
        // attempt end before the handshake did.
        wait_until("three refused handshakes", &c, || {
            counter(&c, Host::Primary, "seal_wrong_key") >= 3
                && counter(&c, Host::Secondary, "seal_handshake_incomplete") >= 3
        });
        let p = c.serial(Host::Primary);
        let s = c.serial(Host::Secondary);
        assert!(
            p.contains(&format!(
                "repl: handshake with {}:{REPL_PORT} failed: `seal_wrong_key`",
                c.repl_ip(Host::Secondary)
            )),
            "{p}"
        );
        // What is observable of "no SVM state changed": the secondary never began a full sync
        // (its SVM stays paused in its pre-sync state) and neither host ever ran COLO.
        for (host, serial) in [(Host::Primary, &p), (Host::Secondary, &s)] {
            assert!(!serial.contains(COLO_RUNNING), "the {host} ran COLO with another key:\n{serial}");
            assert!(!serial.contains("repl: connection 1 up"), "the {host} accepted the link:\n{serial}");
            assert!(!serial.contains("node: link error"), "bytes reached the {host}'s engine:\n{serial}");
        }
        assert!(!s.contains("full sync"), "the SVM left its pre-sync state:\n{s}");
        // Neither key is ever printed (raw or hex).
        for path in [c.cluster_key_path(), dir.path().join("cluster/cluster-key.secondary")] {
            let key = std::fs::read(&path).expect("key file");
            assert_eq!(key.len(), 32);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            for serial in [&p, &s] {
                assert!(!serial.contains(&hex) && !serial.contains(&hex.to_uppercase()));
                assert!(!contains(serial.as_bytes(), &key[..16]));
            }
        }
        c.stop();
    }

    #[test]
    fn a_tampering_proxy_is_refused_by_name_colo_recovers_and_the_wire_shows_no_plaintext() {
        let dir = ScratchDir::new("tamp").expect("scratch");
        let mut spec = spec(&dir, "tamp", 66);
        spec.primary_peer = Some(format!("10.79.66.1:{PROXY_PORT}"));
        let mut c = Cluster::prepare(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
        let proxy = Proxy::start(&c, &dir.path().join("proxy"), 66);
        for host in Host::BOTH {
            c.boot(host).unwrap_or_else(|e| panic!("{e}"));
        }
        c.wait_ready(WAIT).unwrap_or_else(|e| panic!("{e}"));

        // The scan: a known value SET through the service crosses the link (mirrored input and
        // the checkpoint of the page holding it), yet never appears on the wire.
        let secret = set_secret_and_commit(&c);
        let wire = proxy.capture();
        assert!(wire.len() > 16 << 20, "the capture should hold the full sync: {} bytes", wire.len());
        assert!(!contains(&wire, secret.as_bytes()), "the secret crossed the replication link in clear");
        assert!(!contains(&wire, b"redis"), "guest text crossed the replication link in clear");

        // Each kind of tampering is refused by name on the secondary, closes that connection,
        // and COLO comes back (full sync on the next connection).
        for (n, (mode, name)) in [
            ("flip", "seal_record_rejected"),
            ("replay", "seal_record_rejected"),
            ("reorder", "seal_record_rejected"),
            ("truncate", "seal_truncated"),
        ]
        .into_iter()
        .enumerate()
        {
            let before = counter(&c, Host::Secondary, name);
            let runs = c.serial(Host::Secondary).matches(COLO_RUNNING).count();
            proxy.tamper(mode);
            proxy.wait_event(&format!("done {mode}"), 1);
            wait_until(&format!("`{name}` after {mode}"), &c, || counter(&c, Host::Secondary, name) > before);
            c.wait_for_count(Host::Secondary, COLO_RUNNING, runs + 1, WAIT)
                .unwrap_or_else(|e| panic!("COLO did not come back after {mode} (#{n}): {e}"));
        }
        let s = c.serial(Host::Secondary);
        assert!(s.contains("repl: record from 10.79.66.1:"), "the log names the peer address:\n{s}");
        // Nothing tampered reached the engine (no codec error, no refused checkpoint), and the
        // service kept its data; the next checkpoint verifies.
        assert!(!s.contains("node: link error"), "tampered bytes reached the engine:\n{s}");
        let refused = |l: &&str| l.contains("refused:") && !l.contains("repl: record from");
        assert!(!s.lines().any(|l| refused(&l)) && !s.contains("verify failures 1"), "{s}");
        assert_eq!(redis(&c, &["get", "secret"]), secret);
        let after = set_secret_and_commit(&c);
        assert!(!contains(&proxy.capture(), after.as_bytes()));
        for host in Host::BOTH {
            let serial = c.serial(host);
            let last = serial.lines().rfind(|l| l.contains(" committed;")).unwrap_or_default().to_string();
            assert!(last.contains("verify failures 0"), "{host}: {last}");
        }
        c.stop();
        drop(proxy);
    }

    #[test]
    fn with_repl_auth_off_the_same_scan_finds_the_plaintext_and_status_says_so() {
        let dir = ScratchDir::new("plain").expect("scratch");
        let mut spec = spec(&dir, "plain", 67);
        spec.primary_peer = Some(format!("10.79.67.1:{PROXY_PORT}"));
        spec.cmdline_extra = "repl_auth=off".into();
        let mut c = Cluster::prepare(spec).unwrap_or_else(|e| panic!("cluster: {e}"));
        let proxy = Proxy::start(&c, &dir.path().join("proxy"), 67);
        for host in Host::BOTH {
            c.boot(host).unwrap_or_else(|e| panic!("{e}"));
        }
        c.wait_ready(WAIT).unwrap_or_else(|e| panic!("{e}"));
        let secret = set_secret_and_commit(&c);
        assert!(contains(&proxy.capture(), secret.as_bytes()), "the control scan did not find the plaintext");
        for host in Host::BOTH {
            assert!(c
                .serial(host)
                .contains("repl_auth=off: the replication link is NEITHER AUTHENTICATED NOR ENCRYPTED"));
            let status = c.mgmt(host, r#"{"cmd":"status"}"#).unwrap_or_else(|e| panic!("{e}"));
            assert!(status.contains(r#""repl_auth":"off""#) && status.contains("repl_auth_warning"), "{status}");
        }
        c.stop();
        drop(proxy);
    }
}
