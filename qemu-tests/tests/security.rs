//! Suite `security`: nobody gets in where they don't belong (issue 17, the management plane).
//! The hypervisor boots under QEMU TCG with an e1000 on a tap in a bridge and a fresh
//! `mgmt-token` module; clients in their own network namespace (two source addresses) try the
//! management API and the metrics page without the token, with a wrong one and with the right
//! one. Run through `cargo xtask test --suite security` (root). Addresses: 10.77.N.0/24 inside
//! the test's own bridge and namespace only. Every client runs under `timeout`; the machine and
//! the network are removed on drop.

use std::process::{Command, Output, Stdio};
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
        let mut all = vec!["-c", script];
        all.extend_from_slice(args);
        let out: Output = self.net.run("python3", &all, 60);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client script failed ({}):\n{stdout}{}\nserial:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.serial()
        );
        stdout
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
